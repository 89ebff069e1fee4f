//! Logs through `tracing`, filtered by `RUST_LOG` (default `info,async_nats=warn`), written
//! to stderr so that commands' own output on stdout (banners, JSON, tokens) stays clean.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
