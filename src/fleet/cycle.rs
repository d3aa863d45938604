//! What both modes share: following in cycles (list, then watch from the next revision), with
//! a backoff between failed ones, and telling systemd how it goes.

use std::thread;
use std::time::{Duration, Instant};

use crate::fleet::error::SyncError;
use crate::fleet::status::Monitor;
use crate::sys::systemd;

/// First wait after a failure; doubled at each failure in a row up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One mode of following.
pub(super) trait Cycle {
    /// List, then watch until the watch ends; `Err` is why the cycle stopped early.
    fn cycle(&mut self, notify: &mut Notifier) -> Result<(), SyncError>;
    /// What an unreachable etcd leaves as it is: in short for systemd ("the config file is left
    /// as it is"), and naming the path for the log.
    fn kept(&self) -> (&'static str, String);
    fn monitor(&mut self) -> &mut Monitor;
}

/// Follow for ever: cycles, with a backoff between failed ones. Returns only when etcdctl
/// cannot be started at all.
pub(super) fn run(follower: &mut impl Cycle) -> SyncError {
    let mut notify = Notifier { ready: false };
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match follower.cycle(&mut notify) {
            Err(e @ SyncError::Spawn(_)) => return e,
            Err(e) => {
                let (kept, path) = follower.kept();
                crate::warn!("{e}; {path}; retrying in {:.1}s", backoff.as_secs_f64());
                let monitor = follower.monitor();
                monitor.failed(e.to_string());
                monitor.save();
                // The first attempt over without etcd: ready all the same, so the proxy
                // ordered after this unit starts on the last good file.
                notify.status(&match e {
                    SyncError::Etcdctl { .. } => format!("etcd unreachable; {kept}"),
                    other => format!("{other}; {kept}"),
                });
            }
            Ok(()) => {
                // Ended by etcd's answer (compacted, cancelled), not by a failure: no reason
                // to wait long (still a little, so a watch that keeps ending cannot spin).
                backoff = BACKOFF_MIN;
                crate::info!(
                    "etcd watch ended; retrying in {:.1}s",
                    backoff.as_secs_f64()
                );
            }
        }
        // A cycle that ran long (a watch that held) was a success: start the backoff over.
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Tells systemd (a `Type=notify` unit) how it goes, for `systemctl status`.
pub(super) struct Notifier {
    /// READY=1 has been sent (once, after the first attempt).
    ready: bool,
}

impl Notifier {
    /// The first time also READY=1: the first attempt is over, whatever its outcome, so a
    /// proxy ordered after this unit starts on the freshest files there are and never waits
    /// for etcd.
    pub(super) fn status(&mut self, status: &str) {
        let ready = if self.ready { "" } else { "READY=1\n" };
        self.ready = true;
        if let Err(e) = systemd::notify(&format!("{ready}STATUS={status}")) {
            crate::warn!("cannot notify systemd: {e}");
        }
    }
}
