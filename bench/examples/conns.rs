//! Runs the `conns` scenario against a self-started stack (needs the `tether` binary).
//!
//! `cargo run --release -p tether-bench --example conns -- [CONNECTIONS] [RATE] [HOLD_SECS] [FIRST_SOURCE_OCTET]`

use std::net::{IpAddr, Ipv4Addr};

use tether_bench::conns::ConnsArgs;
use tether_bench::scenario::{self, CommonArgs};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut argv = std::env::args().skip(1);
    let mut next = |default: u64| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(argv
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let connections = usize::try_from(next(10_000)?)?;
    let rate = u32::try_from(next(5_000)?)?;
    let hold_secs = next(5)?;
    // A fresh run needs fresh source addresses (TIME_WAIT): pick the first octet.
    let first = u8::try_from(next(2)?)?;
    let sources = (0..8u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, first.saturating_add(i))))
        .collect();
    scenario::run(&ConnsArgs {
        connections,
        rate,
        hold_secs,
        common: CommonArgs {
            sources,
            json: true,
            ..CommonArgs::default()
        },
        ..ConnsArgs::default()
    })
    .await?;
    Ok(())
}
