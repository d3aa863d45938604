//! The follower: get, write, watch from the next revision, resync, and start over after a
//! backoff when a cycle fails (see the folder's documentation for why each step is so).

use std::fs;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::sha256;
use crate::fleet::args::Settings;
use crate::fleet::error::SyncError;
use crate::fleet::etcdctl::{self, collect_stderr, read_lines};
use crate::fleet::file::write_atomically;
use crate::fleet::output::{parse_watch_line, Snapshot, WatchUpdate};
use crate::sys::systemd;

/// First wait after a failure; doubled at each failure in a row up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The follower's state: what the file holds as of which revision.
pub struct Follower {
    settings: Settings,
    /// The revision the file is known to be current as of; watch events below it are old.
    revision: i64,
    /// The key was absent at the last look (said once, not at every resync).
    absent: bool,
    /// systemd has been told READY=1 (once, after the first attempt).
    ready: bool,
}

impl Follower {
    pub fn new(settings: Settings) -> Follower {
        Follower {
            settings,
            revision: 0,
            absent: false,
            ready: false,
        }
    }

    /// `etcdctl get`: the key's value now.
    pub fn get(&self) -> Result<Snapshot, SyncError> {
        etcdctl::get(&self.settings.etcdctl, &self.settings.key)
    }

    /// Bring the file to what a `get` returned: the key as it is now, whatever came before. (A
    /// lower revision than seen so far means another cluster, or one restored from a backup:
    /// it is still the truth now.) `Ok(true)` when the file was written.
    pub fn apply_get(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        Ok(written)
    }

    /// Bring the file to a watched change, unless a `get` already brought it past that (a
    /// resync racing the watch). `Ok(true)` when the file was written.
    pub fn apply_event(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        if snap.revision < self.revision {
            return Ok(false);
        }
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        Ok(written)
    }

    /// Write `value` (the key at `revision`) unless the file holds it already; an absent key
    /// leaves the file as it is.
    fn write(&mut self, value: Option<Vec<u8>>, revision: i64) -> Result<bool, SyncError> {
        let path = &self.settings.config;
        Ok(match value {
            None if self.absent => false,
            None => {
                self.absent = true;
                crate::warn!(
                    "etcd key {:?} is absent (revision {revision}): {} left as it is",
                    self.settings.key,
                    path.display()
                );
                false
            }
            Some(value) => {
                self.absent = false;
                if fs::read(path).is_ok_and(|now| now == value) {
                    crate::debug!("{} already holds revision {revision}", path.display());
                    false
                } else {
                    write_atomically(path, &value)
                        .map_err(|e| SyncError::Write(path.clone(), e))?;
                    crate::info!(
                        "wrote {} from etcd key {:?} revision={revision} bytes={} sha256={}",
                        path.display(),
                        self.settings.key,
                        value.len(),
                        sha256::hex(&value)
                    );
                    true
                }
            }
        })
    }

    /// Get, then watch until the watch ends; `Err` is why the cycle stopped early.
    fn cycle(&mut self) -> Result<(), SyncError> {
        let snap = self.get()?;
        let from = snap.revision + 1;
        self.apply_get(snap)?;
        self.notify(&format!("following from revision {from}"));
        let mut child = etcdctl::command(&self.settings.etcdctl)
            .args([
                "watch",
                "-w",
                "json",
                &format!("--rev={from}"),
                &self.settings.key,
            ])
            .spawn()
            .map_err(SyncError::Spawn)?;
        let lines = read_lines(&mut child);
        let stderr = collect_stderr(&mut child);
        crate::info!(
            "watching etcd key {:?} from revision {from}",
            self.settings.key
        );
        let result = self.follow(&lines);
        // The watch may still run (a resync or parse failure stopped following): end it.
        let _ = child.kill();
        let status = child.wait();
        let stderr = stderr.join().unwrap_or_default();
        match (result, status) {
            (Err(e), _) => Err(e),
            (Ok(()), Ok(status)) if !status.success() => Err(SyncError::Etcdctl { status, stderr }),
            (Ok(()), _) => Ok(()),
        }
    }

    /// Apply watch responses as they come; get again every `resync`. Returns when the watch
    /// output ends or asks for a fresh get.
    fn follow(&mut self, lines: &Receiver<String>) -> Result<(), SyncError> {
        let mut next_resync = Instant::now() + self.settings.resync;
        loop {
            let wait = next_resync.saturating_duration_since(Instant::now());
            match lines.recv_timeout(wait) {
                Ok(line) => match parse_watch_line(&line, &self.settings.key)? {
                    WatchUpdate::Changed(snap) => {
                        self.apply_event(snap)?;
                    }
                    WatchUpdate::Nothing => {}
                    WatchUpdate::Ended(why) => {
                        crate::warn!("etcd watch ended: {why}; getting the key again");
                        return Ok(());
                    }
                },
                Err(RecvTimeoutError::Timeout) => {
                    next_resync = Instant::now() + self.settings.resync;
                    // A successful resync catches anything the watch could have missed. A
                    // failed one means etcd is unreachable: the watch would wait for it on its
                    // client library's own reconnect backoff (gRPC's grows to two minutes), so
                    // end it and reconnect on ours, with a fresh get when etcd answers.
                    if self.apply_get(self.get()?)? {
                        crate::warn!("resync found a change the watch had not delivered");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Follow for ever: cycles, with a backoff between failed ones. Returns only when etcdctl
    /// cannot be started at all.
    pub fn run(&mut self) -> SyncError {
        crate::info!(
            "flyproxy-etcd-sync {}: following etcd key {:?} into {} (endpoints: {})",
            crate::VERSION,
            self.settings.key,
            self.settings.config.display(),
            std::env::var("ETCDCTL_ENDPOINTS").unwrap_or_else(|_| "etcdctl's default".into())
        );
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match self.cycle() {
                Err(e @ SyncError::Spawn(_)) => return e,
                Err(e) => {
                    crate::warn!(
                        "{e}; {} left as it is; retrying in {:.1}s",
                        self.settings.config.display(),
                        backoff.as_secs_f64()
                    );
                    // The first attempt over without etcd: ready all the same, so the proxy
                    // ordered after this unit starts on the last good file.
                    self.notify(&match e {
                        SyncError::Etcdctl { .. } => {
                            "etcd unreachable; the config file is left as it is".to_string()
                        }
                        other => format!("{other}; the config file is left as it is"),
                    });
                }
                Ok(()) => crate::info!(
                    "etcd watch ended; retrying in {:.1}s",
                    backoff.as_secs_f64()
                ),
            }
            // A cycle that ran long (a watch that held) was a success: start the backoff over.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl Follower {
    /// Tell systemd (a `Type=notify` unit) how it goes, for `systemctl status`; the first time
    /// also READY=1: the first attempt is over, whatever its outcome, so a proxy ordered after
    /// this unit starts on the freshest file there is and never waits for etcd.
    fn notify(&mut self, status: &str) {
        let ready = if self.ready { "" } else { "READY=1\n" };
        self.ready = true;
        if let Err(e) = systemd::notify(&format!("{ready}STATUS={status}")) {
            crate::warn!("cannot notify systemd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::args::DEFAULT_RESYNC;

    #[test]
    fn older_changes_and_absent_keys_leave_the_file() {
        let dir = std::env::temp_dir().join(format!("etcd-sync-apply-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let mut f = Follower::new(Settings {
            key: "/k".into(),
            config: path.clone(),
            etcdctl: "etcdctl".into(),
            resync: DEFAULT_RESYNC,
        });
        let snap = |revision: i64, value: Option<&[u8]>| Snapshot {
            revision,
            value: value.map(<[u8]>::to_vec),
        };
        assert!(f.apply_get(snap(5, Some(b"five"))).unwrap());
        // The same bytes again: nothing written.
        assert!(!f.apply_event(snap(5, Some(b"five"))).unwrap());
        // A watch event older than what a get already gave (a resync racing the watch).
        assert!(!f.apply_event(snap(4, Some(b"four"))).unwrap());
        // Deleted: the file stays, said once.
        assert!(!f.apply_event(snap(6, None)).unwrap());
        assert!(!f.apply_get(snap(6, None)).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"five");
        assert!(f.apply_event(snap(7, Some(b""))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"");
        // A get is the truth even at a lower revision (etcd rebuilt or restored from a backup),
        // and later events are compared with it.
        assert!(f.apply_get(snap(2, Some(b"rebuilt"))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"rebuilt");
        assert!(f.apply_event(snap(3, Some(b"three"))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"three");
        fs::remove_dir_all(&dir).unwrap();
    }
}
