//! The skeleton every bench scenario shares. A scenario is its arguments (the flags of
//! `tether bench <name>`: its own, then [`RunningArgs`] where it can target a running
//! stack, then [`CommonArgs`]) implementing [`Scenario`]: its name, the parameters it
//! records, and how it measures one target. [`run`] does the rest the same way for all:
//! Tether first, then each peer on fresh source addresses, each [`Report`] printed, then
//! the [`Comparison`] (and, with `--json`, its JSON object on the last line).

use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::BenchError;
use crate::client_codec::Proto;
use crate::compare::{self, Comparison, Figure, Outcome};
use crate::stack::Running;

/// The flags of every scenario. No source address (the default) means the scenario's
/// own ([`Scenario::default_sources`]).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Peers measured in the same run: nats, mosquitto (repeat or comma separate).
    #[arg(long = "peer", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<Proto>,
    /// Client source addresses (comma separated 127.0.0.x; peers take the next ones).
    #[arg(long = "source", value_name = "SOURCE", value_delimiter = ',')]
    pub sources: Vec<IpAddr>,
    /// App id of the bench devices.
    #[arg(long, default_value = "bench")]
    pub app: String,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Pin the server side and the load generator to different CPUs: `SERVER/LOAD`, e.g.
    /// `1/0` (lists and ranges: `2-3/0,1`).
    #[arg(long, value_name = "SERVER/LOAD")]
    pub pin: Option<crate::pin::Pinning>,
}

impl Default for CommonArgs {
    fn default() -> Self {
        defaults()
    }
}

/// A running Tether stack to target instead of starting one (all three flags or none).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunningArgs {
    /// NATS URL of a running stack (with --endpoint and --key; default: start one).
    #[arg(long = "nats", requires_all = ["endpoint", "key"])]
    pub nats_url: Option<String>,
    /// A running gateway's TCP client address.
    #[arg(long, requires = "nats_url")]
    pub endpoint: Option<SocketAddr>,
    /// The running gateways' token signing key (private PEM).
    #[arg(long, requires = "nats_url")]
    pub key: Option<PathBuf>,
}

impl RunningArgs {
    /// The running stack, when all three flags are given.
    pub fn running(&self) -> Option<Running> {
        Some(Running {
            nats_url: self.nats_url.clone()?,
            endpoint: self.endpoint?,
            key: self.key.clone()?,
        })
    }
}

/// `--peer`: `nats` or `mosquitto` (`mqtt`).
pub fn parse_peer(s: &str) -> Result<Proto, String> {
    match Proto::parse(s) {
        Some(Proto::Tether) | None => Err(format!("unknown peer {s:?} (nats, mosquitto)")),
        Some(p) => Ok(p),
    }
}

/// The values of `A` when no flag is given: the defaults its `#[arg]`s declare, the one
/// place they are written.
///
/// # Panics
/// If `A` declares a required argument (a programming error: the unit tests build the
/// defaults of every scenario).
pub fn defaults<A: clap::Args>() -> A {
    let command = A::augment_args(clap::Command::new("defaults"));
    command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| A::from_arg_matches(&matches))
        .unwrap_or_else(|e| panic!("arguments without defaults: {e}"))
}

/// What one target's run reports: printed as text, kept whole as the outcome's `detail`.
pub trait Report: Serialize + Display {
    /// `tether`, `nats` or `mosquitto`.
    fn target(&self) -> &str;

    /// The figures compared across targets.
    fn figures(&self) -> Vec<Figure>;

    /// This target's outcome: its figures, and the whole report as `detail`.
    fn outcome(&self) -> Outcome {
        Outcome {
            target: self.target().into(),
            figures: self.figures(),
            detail: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// One bench scenario, driven by [`run`] (from `tether bench <name>` and the suite).
pub trait Scenario: Sync {
    /// What the run against one target reports.
    type Report: Report;

    /// The name: `tether bench <NAME>`, and the `scenario` of the comparison.
    const NAME: &'static str;

    /// Whether the peers are still measured after Tether failed (its outcome is then
    /// recorded as failed); otherwise Tether's error ends the run.
    const PEERS_AFTER_TETHER_FAILURE: bool = false;

    /// The flags every scenario has.
    fn common(&self) -> &CommonArgs;

    /// Client source addresses used without `--source`.
    fn default_sources() -> Vec<IpAddr>;

    /// The parameters recorded in the comparison (`params`).
    fn params(&self) -> Value;

    /// The protocol of the Tether clients (TCP frames unless the scenario says otherwise).
    fn tether(&self) -> Proto {
        Proto::Tether
    }

    /// Measures one target, Tether (`target` is then [`Scenario::tether`]) or a peer,
    /// with clients bound to `sources`: starts what it needs (or uses the running stack),
    /// runs, and stops what it started.
    fn measure(
        &self,
        target: Proto,
        sources: &[IpAddr],
    ) -> impl Future<Output = Result<Self::Report, BenchError>> + Send;
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct Ran<R> {
    /// Tether beside its peers (already printed).
    pub comparison: Comparison,
    /// Tether's own report; `None` when it failed and the peers were measured anyway.
    pub tether: Option<R>,
}

/// Runs `scenario` against Tether and then each peer, prints every report and the
/// comparison (and, with `--json`, the JSON object as the last line).
pub async fn run<S: Scenario>(scenario: &S) -> Result<Ran<S::Report>, BenchError> {
    let common = scenario.common();
    if let Some(pinning) = &common.pin {
        crate::pin::configure(pinning)?;
        eprintln!("{} pinned: {pinning}", S::NAME);
    }
    let sources = if common.sources.is_empty() {
        S::default_sources()
    } else {
        common.sources.clone()
    };
    let mut outcomes = Vec::new();
    let mut tether = None;
    for (k, (target, sources)) in targets(scenario.tether(), &common.peers, &sources)
        .into_iter()
        .enumerate()
    {
        match scenario.measure(target, &sources).await {
            Ok(report) => {
                println!("{report}");
                outcomes.push(report.outcome());
                if k == 0 {
                    tether = Some(report);
                }
            }
            Err(e) if k == 0 && S::PEERS_AFTER_TETHER_FAILURE && !common.peers.is_empty() => {
                eprintln!(
                    "{} [tether] failed: {e}; measuring the peers anyway",
                    S::NAME
                );
                outcomes.push(compare::failed("tether", &e));
            }
            Err(e) => return Err(e),
        }
    }
    let mut params = scenario.params();
    if let (Some(pinning), Some(object)) = (&common.pin, params.as_object_mut()) {
        object.insert("pin".into(), serde_json::json!(pinning));
    }
    let comparison = Comparison {
        scenario: S::NAME.into(),
        params,
        outcomes,
    };
    comparison.print(common.json);
    Ok(Ran { comparison, tether })
}

/// The targets of one run, in order: Tether (as `tether`) first, then each peer, each
/// with its own source addresses (a run right after another needs fresh ones: closed
/// sockets sit in TIME_WAIT for a minute).
pub fn targets(tether: Proto, peers: &[Proto], sources: &[IpAddr]) -> Vec<(Proto, Vec<IpAddr>)> {
    std::iter::once(tether)
        .chain(peers.iter().copied())
        .enumerate()
        .map(|(k, proto)| (proto, shift_sources(sources, k)))
        .collect()
}

/// `count` addresses from 127.0.0.`first` on (127.0.0.255 is followed by 127.0.1.0; all
/// of 127/8 answers on `lo`).
pub fn source_range(first: u16, count: u16) -> Vec<IpAddr> {
    (0..count)
        .map(|i| nth_loopback(u32::from(first) + u32::from(i)))
        .collect()
}

fn nth_loopback(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, (n >> 8) as u8, (n & 0xff) as u8))
}

/// The `k`-th fresh set of source addresses after `sources`.
pub fn shift_sources(sources: &[IpAddr], k: usize) -> Vec<IpAddr> {
    let by = (k * sources.len()) as u16;
    sources
        .iter()
        .map(|a| match a {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                nth_loopback(u32::from(o[2]) * 256 + u32::from(o[3]) + u32::from(by))
            }
            other => *other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_shift_past_the_used_ones() {
        let s = source_range(2, 8);
        assert_eq!(s[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(s[7], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
        let t = shift_sources(&s, 1);
        assert_eq!(t[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)));
        assert_eq!(
            source_range(255, 2)[1],
            IpAddr::V4(Ipv4Addr::new(127, 0, 1, 0))
        );
    }

    #[test]
    fn tether_then_each_peer_on_fresh_sources() {
        let s = source_range(20, 2);
        let t = targets(Proto::TetherWs, &[Proto::Nats, Proto::Mqtt], &s);
        let protos: Vec<_> = t.iter().map(|(p, _)| *p).collect();
        assert_eq!(protos, [Proto::TetherWs, Proto::Nats, Proto::Mqtt]);
        assert_eq!(t[0].1, s);
        assert_eq!(t[2].1, source_range(24, 2));
    }

    #[test]
    fn every_scenario_defaults_to_its_flags_defaults() {
        use crate::{conns::ConnsArgs, fanout::FanoutArgs, p2p::P2pArgs, uplink::UplinkArgs};
        let f = FanoutArgs::default();
        assert_eq!((f.members, f.messages, f.rate), (1_000, 100, 10));
        assert!(f.running.running().is_none());
        let p = P2pArgs::default();
        assert_eq!(
            (p.pairs, p.rate, p.duration_secs, p.qos1, p.regions),
            (100, 10_000, 10.0, false, 1)
        );
        let u = UplinkArgs::default();
        assert_eq!((u.devices, u.window, u.duration_secs), (50, 32, 10.0));
        assert_eq!(ConnsArgs::default().common.app, "bench");
        let names = [
            ConnsArgs::NAME,
            FanoutArgs::NAME,
            P2pArgs::NAME,
            UplinkArgs::NAME,
        ];
        assert_eq!(names, ["conns", "fanout", "p2p", "uplink"]);
        assert_eq!(FanoutArgs::default_sources(), source_range(20, 4));
    }

    #[test]
    fn peers_parse_and_running_needs_all_three() {
        assert_eq!(parse_peer("mosquitto"), Ok(Proto::Mqtt));
        assert!(parse_peer("tether").is_err());
        let common = CommonArgs::default();
        assert_eq!(common.app, "bench");
        assert!(common.peers.is_empty() && common.sources.is_empty() && !common.json);
        let partial = RunningArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..RunningArgs::default()
        };
        assert!(partial.running().is_none());
    }
}
