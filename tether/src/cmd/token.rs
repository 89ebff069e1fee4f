//! `tether token keygen|issue`: Ed25519 signing keys and gateway tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tether_auth::{Claims, Right, TokenSigner, public_key_path, unix_now, write_keypair};

/// `tether token …`
#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write a new signing key to FILE (mode 0600) and its public key to FILE.pub.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a gateway token signed with the key in --key.
    Issue(IssueArgs),
}

#[derive(Args)]
struct IssueArgs {
    /// App id.
    #[arg(long)]
    app: String,
    /// User id.
    #[arg(long)]
    uid: String,
    /// Device id.
    #[arg(long)]
    did: String,
    /// Lifetime, e.g. 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Private signing key (PEM), as written by `tether token keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Sessions to join at login (repeat or comma separate).
    #[arg(long, value_delimiter = ',')]
    session: Vec<String>,
    /// Bind the token to one gateway id.
    #[arg(long)]
    gateway: Option<String>,
    /// Receive only: the token does not allow UP frames.
    #[arg(long)]
    no_uplink: bool,
    /// Grant the `rooms` right: room cursors at LOGIN resume recoverable rooms.
    #[arg(long)]
    rooms: bool,
}

/// Runs `tether token …`.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    match args.command {
        TokenCommand::Keygen { out, force } => {
            write_keypair(&out, force)
                .with_context(|| format!("cannot write key {}", out.display()))?;
            println!("private key: {}", out.display());
            println!("public key:  {}", public_key_path(&out).display());
            Ok(())
        }
        TokenCommand::Issue(issue) => {
            let signer = TokenSigner::from_file(&issue.key)
                .with_context(|| format!("cannot read signing key {}", issue.key.display()))?;
            let ttl = parse_duration(&issue.ttl)?;
            let mut claims = Claims::new(issue.app, issue.uid, issue.did, unix_now(), ttl);
            claims.sess = issue.session;
            claims.gw = issue.gateway;
            if issue.rooms {
                claims.rights = claims.rights.with(Right::Rooms);
            }
            if issue.no_uplink {
                claims.rights = claims.rights.without(Right::Up);
            }
            println!("{}", signer.sign(&claims)?);
            Ok(())
        }
    }
}

/// Parses `90`, `30s`, `15m`, `1h`, `7d`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Ok(number) = number.parse::<u64>() else {
        bail!("invalid duration {text:?}: expected a number with s, m, h or d, e.g. 1h");
    };
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => bail!("invalid duration unit {unit:?} in {text:?}: use s, m, h or d"),
    };
    if seconds == 0 {
        bail!("duration must be positive");
    }
    Ok(Duration::from_secs(seconds))
}
