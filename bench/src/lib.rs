//! tether-bench: load scenarios against a real Tether stack, run by `tether bench`.
//!
//! - [`conns`]: open many idle, logged-in client connections at a paced rate and measure
//!   login latency, gateway RSS per connection and kernel socket memory.
//! - [`procfs`]: the few `/proc` readings the scenarios report.

pub mod conns;
pub mod procfs;

/// Why a bench scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Invalid arguments.
    #[error("invalid arguments: {0}")]
    Args(String),
    /// More connections than one load-generator process can hold.
    #[error(
        "{requested} connections need more file descriptors than one process may hold \
         (at most {max} here); the multi-process load generator is not built yet"
    )]
    TooManyConnections {
        /// Requested connections.
        requested: usize,
        /// Most this process can open.
        max: usize,
    },
    /// Starting the stack (nats-server, gateway, keys) failed.
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
