//! The instance lock: proof that no earlier process with this instance id is alive.
//!
//! A state instance with a stable id (`instance_id`) and an `instance_lock_dir` holds an
//! exclusive lock (`flock`) on `<dir>/tether-state-<id>.lock` for as long as it runs. The
//! kernel releases such a lock only when the process holding it has ended (exit, crash,
//! `kill -9`); a stopped or hung process keeps it. So a process that gets the lock knows
//! that every earlier process of this id that used the same directory is dead, and the
//! leases still held under its id in the lease bucket belong to a dead process: it may
//! take them over at once instead of waiting for them to expire (`leases.rs`,
//! "Taking over a dead incarnation"). A second process started while the first still runs
//! does not get the lock and does not start at all.
//!
//! The proof covers the processes that share the directory (one host, or one volume that
//! moves with the instance id). The id itself must stay unique among live instances, as
//! before: two live processes with one id on different hosts with different directories
//! would both believe they own the same partitions, with or without this lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Errors of [`InstanceLock::acquire`].
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock of this instance id.
    #[error("instance id {id:?} is in use by a live process (lock {path} held)")]
    Held {
        /// The instance id.
        id: String,
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be created or locked.
    #[error("instance lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The held lock of one instance id; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock of `instance_id` in `dir` (created if missing), or fails at once if
    /// a live process holds it.
    pub fn acquire(dir: &Path, instance_id: &str) -> Result<Self, LockError> {
        let path = dir.join(format!("tether-state-{instance_id}.lock"));
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held {
                id: instance_id.to_owned(),
                path,
            }),
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_free_again_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let first = InstanceLock::acquire(dir.path(), "state-a").expect("first");
        assert!(matches!(
            InstanceLock::acquire(dir.path(), "state-a"),
            Err(LockError::Held { .. })
        ));
        // Another id is another lock.
        let _other = InstanceLock::acquire(dir.path(), "state-b").expect("other id");
        drop(first);
        InstanceLock::acquire(dir.path(), "state-a").expect("free after the holder ended");
    }
}
