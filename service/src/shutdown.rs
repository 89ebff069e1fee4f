//! One shutdown signal for every task.

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal: every long-lived task selects on [`Shutdown::wait`].
pub type Shutdown = CancellationToken;

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => tracing::info!("interrupt received, shutting down"),
                    _ = term.recv() => tracing::info!("sigterm received, shutting down"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for sigterm");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Cancels `shutdown` when an OS signal arrives.
pub fn cancel_on_signal(shutdown: Shutdown) {
    tokio::spawn(async move {
        os_signal().await;
        shutdown.cancel();
    });
}
