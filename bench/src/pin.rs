//! `--pin SERVER/LOAD`: the server side of a run (nats-server, gateways, state, ipconfig,
//! the peers) on the CPUs `SERVER`, the load generator (this process, its threads and the
//! load processes it starts) on the CPUs `LOAD`, so the two do not compete for a core and
//! a figure says what the server side did with the cores it had.
//!
//! A process is pinned by setting the affinity of every thread it has (`/proc/<pid>/task`);
//! threads it starts later inherit it. The run's report says where each side ran.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;
use serde::Serialize;

use crate::BenchError;

/// Which CPUs each side runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pinning {
    /// CPUs of the server side.
    pub server: Vec<usize>,
    /// CPUs of the load generator.
    pub load: Vec<usize>,
}

impl FromStr for Pinning {
    type Err = String;

    /// `SERVER/LOAD`, each a comma-separated list of CPU numbers or ranges (`1/0`,
    /// `2-3/0,1`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (server, load) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected SERVER_CPUS/LOAD_CPUS, e.g. 1/0"))?;
        let pinning = Pinning {
            server: cpu_list(server)?,
            load: cpu_list(load)?,
        };
        if let Some(cpu) = pinning.server.iter().find(|c| pinning.load.contains(c)) {
            return Err(format!("cpu {cpu} is in both sets"));
        }
        Ok(pinning)
    }
}

impl fmt::Display for Pinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server side on cpu {}, load generator on cpu {}",
            join(&self.server),
            join(&self.load)
        )
    }
}

fn join(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let number = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| format!("{n:?} is not a cpu number"))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last || last >= CpuSet::count() {
            return Err(format!("cpu range {part:?} is not valid"));
        }
        cpus.extend(first..=last);
    }
    if cpus.is_empty() {
        return Err(format!("{s:?}: no cpu"));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

static PINNING: OnceLock<Pinning> = OnceLock::new();

/// Pins this process (the load generator) to the load CPUs and remembers the server
/// CPUs for [`server_process`]. Once per process; a second, different call is an error.
pub fn configure(pinning: &Pinning) -> Result<(), BenchError> {
    let set = PINNING.get_or_init(|| pinning.clone());
    if set != pinning {
        return Err(BenchError::Setup(format!(
            "already pinned differently ({set})"
        )));
    }
    pin_threads(std::process::id(), &pinning.load)
        .map_err(|e| BenchError::Setup(format!("pin the load generator: {e}")))?;
    Ok(())
}

/// The pinning of this run, if any.
pub fn current() -> Option<&'static Pinning> {
    PINNING.get()
}

/// Pins a server-side process (every thread it has now, and so those it starts later) to
/// the server CPUs, when the run is pinned. A process that cannot be pinned is reported
/// and runs unpinned.
pub fn server_process(pid: u32) {
    let Some(pinning) = PINNING.get() else {
        return;
    };
    match pin_threads(pid, &pinning.server) {
        Ok(threads) => eprintln!(
            "pinned pid {pid} ({threads} threads) to cpu {}",
            join(&pinning.server)
        ),
        Err(error) => eprintln!(
            "warning: pid {pid} not pinned to cpu {}: {error}",
            join(&pinning.server)
        ),
    }
}

/// Sets the affinity of every thread of `pid` to `cpus`; returns how many threads.
fn pin_threads(pid: u32, cpus: &[usize]) -> Result<usize, String> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    let mut pinned = 0;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            Ok(()) => pinned += 1,
            // The thread ended meanwhile.
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(format!("thread {tid}: {e}")),
        }
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges_and_refuses_overlaps() {
        assert_eq!(
            "1/0".parse::<Pinning>(),
            Ok(Pinning {
                server: vec![1],
                load: vec![0]
            })
        );
        assert_eq!(
            "2-3/0,1".parse::<Pinning>(),
            Ok(Pinning {
                server: vec![2, 3],
                load: vec![0, 1]
            })
        );
        for bad in ["1", "1/1", "a/0", "3-2/0", "/0", "1/"] {
            assert!(bad.parse::<Pinning>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_process_is_pinned_thread_by_thread() {
        // This test process, to the CPUs it may already use (so nothing changes for the
        // other tests): every thread's affinity is set.
        let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).expect("affinity");
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let threads = pin_threads(std::process::id(), &cpus).expect("pinned");
        assert!(threads >= 1);
        assert!(pin_threads(u32::MAX, &cpus).is_err(), "no such process");
    }
}
