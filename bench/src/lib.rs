//! tether-bench: load scenarios against a real Tether stack and its peers (nats-server
//! alone, Mosquitto), measured in the same invocation; run by `tether bench`.
//!
//! Scenarios share one skeleton, [`scenario`]: the [`scenario::Scenario`] trait, the
//! flags they have in common, and the run that measures Tether and then each peer (each
//! prints a live progress bar, a human summary, and with `--json` one JSON object on the
//! last line):
//! - [`conns`]: N idle logged-in connections: connect rate, login latency, server RSS
//!   per connection, kernel socket memory, load-generator RSS; several load processes
//!   ([`worker`]) and several gateway processes for large N.
//! - [`fanout`]: N members of one session, M broadcasts: deliveries/s and latency.
//! - [`p2p`]: device pairs through an echo service at an open-loop rate; with
//!   `--regions 2` within one region and across two ([`regions`]) in one run.
//! - [`uplink`]: the highest uplink rate with store receipts.
//! - [`drain`]: a gateway of N devices drained to another by REDIRECT: time, QoS1 lost.
//! - [`restart`]: a gateway restarted by hand-off under a steady ping stream: the pause
//!   devices see, connections kept, messages lost.
//! - [`suite`]: the table of BENCHMARKS.md (`make bench`), with [`chart`]s.
//!
//! Plumbing: [`client_codec`] (raw Tether/NATS/MQTT clients), [`fleet`] (opening many
//! connections at a rate), [`reader`] (per-connection readers), [`stats`] (HDR
//! histograms), [`stack`] (starting and stopping the processes), [`compare`] (ratios
//! Tether/peer), [`progress`], [`procfs`], [`pin`] (server side and load generator on
//! different CPUs, `--pin`).

pub mod chart;
pub mod client_codec;
pub mod compare;
pub mod conns;
pub mod drain;
pub mod fanout;
pub mod fleet;
pub mod p2p;
pub mod pin;
pub mod procfs;
pub mod progress;
pub mod reader;
pub mod regions;
pub mod restart;
pub mod scenario;
pub mod stack;
pub mod stats;
pub mod suite;
pub mod uplink;
pub mod worker;

/// Why a bench scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Invalid arguments.
    #[error("invalid arguments: {0}")]
    Args(String),
    /// More connections than the load-generator processes can hold.
    #[error(
        "{requested} connections need more file descriptors than allowed here (at most {max} \
         with these processes; add --workers)"
    )]
    TooManyConnections {
        /// Requested connections.
        requested: usize,
        /// Most that can be opened.
        max: usize,
    },
    /// Starting the stack (nats-server, gateway, keys) or a peer failed.
    #[error("setup: {0}")]
    Setup(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        error: std::io::Error,
    },
    /// No connection could log in.
    #[error("no connection logged in; first error: {0}")]
    NoConnections(String),
}

impl BenchError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let context = context.into();
        move |error| BenchError::Io { context, error }
    }
}
