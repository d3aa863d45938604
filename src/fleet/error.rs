//! Why a step of the follower failed.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a step failed; each is logged and retried, none ends the follower except `Spawn`.
#[derive(Debug)]
pub enum SyncError {
    /// `etcdctl` could not be started at all (missing, not executable).
    Spawn(io::Error),
    /// `etcdctl` ran and failed: etcd unreachable, no leader, auth refused, ...
    Etcdctl { status: ExitStatus, stderr: String },
    /// `etcdctl` said something this follower does not understand.
    Output(String),
    /// The config file could not be written (the old one is still in place).
    Write(PathBuf, io::Error),
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::Spawn(e) => write!(f, "cannot run etcdctl: {e}"),
            SyncError::Etcdctl { status, stderr } if stderr.is_empty() => {
                write!(f, "etcdctl failed ({status})")
            }
            SyncError::Etcdctl { status, stderr } => {
                write!(f, "etcdctl failed ({status}): {stderr}")
            }
            SyncError::Output(why) => write!(f, "unexpected etcdctl output: {why}"),
            SyncError::Write(path, e) => write!(f, "cannot write {}: {e}", path.display()),
        }
    }
}
