//! The Python example business service (`examples/chat_service.py`) as a child process.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{APP, WAIT};

/// Result of the helpers here.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The running service; killed when dropped.
pub struct PythonService {
    /// The process.
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl PythonService {
    /// Installs nats-py into `.tools/venv` if needed, starts the service for app `demo`
    /// and waits for its `ready` line.
    pub async fn start(nats_url: &str) -> Res<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let install = Command::new("bash")
            .arg(root.join("examples/install.sh"))
            .status()
            .await?;
        if !install.success() {
            return Err(format!("examples/install.sh failed: {install}").into());
        }
        let mut child = Command::new(root.join(".tools/venv/bin/python"))
            .arg(root.join("examples/chat_service.py"))
            .args(["--nats", nats_url, "--app", APP])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("chat_service: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = PythonService { child, lines };
        service.expect("ready").await?;
        Ok(service)
    }

    /// Waits for the next stdout line starting with `prefix` (earlier lines are skipped).
    pub async fn expect(&mut self, prefix: &str) -> Res<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| format!("no {prefix:?} line from chat_service.py"))?
                .ok_or_else(|| format!("chat_service.py exited before {prefix:?}"))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }
}
