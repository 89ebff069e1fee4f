//! Process-level helpers: spawn with a parent-death signal, terminate, probe health.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::connect::BusError;

/// Starts `binary -c conf` with output appended to `log`.
pub(super) fn spawn(binary: &Path, conf: &Path, log: &Path) -> Result<Child, BusError> {
    let open_log = || {
        File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| BusError::Server(format!("open {}: {e}", log.display())))
    };
    let mut command = Command::new(binary);
    command
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?);
    // Its own process group: a Ctrl-C in the terminal reaches Tether, which then stops the
    // server after its clients are done, instead of the server vanishing under them.
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // The server dies with the thread that started it, even if that process is
            // killed without running destructors (a test runner's timeout, kill -9).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| BusError::Server(format!("spawn {}: {e}", binary.display())))
}

/// Sends SIGTERM (or SIGKILL when `grace` is zero), waits up to `grace`, then SIGKILLs.
pub(super) fn terminate(mut child: Child, grace: Duration) {
    if grace.is_zero() {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child we own and have not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `GET /healthz` on the monitoring port answers 200.
pub(super) fn health_ok(host: &str, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((host, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}
