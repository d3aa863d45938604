//! One key, one file: get, write, watch from the next revision, resync, and start over after a
//! backoff when a cycle fails (see the folder's documentation for why each step is so). A value
//! is written only when the proxy's own validation accepts it.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::config::sha256;
use crate::fleet::cycle::{Cycle, Notifier};
use crate::fleet::error::SyncError;
use crate::fleet::etcdctl::{self, collect_stderr, read_lines};
use crate::fleet::file::{read_regular, write_atomically};
use crate::fleet::output::{parse_watch_line, Snapshot, WatchUpdate};
use crate::fleet::status::Monitor;
use crate::fleet::value::check_config;

/// The follower's state: what the file holds as of which revision.
pub struct Follower {
    key: String,
    config: PathBuf,
    etcdctl: PathBuf,
    resync: Duration,
    /// The revision the file is known to be current as of; watch events below it are old.
    revision: i64,
    /// The key was absent at the last look (said once, not at every resync).
    absent: bool,
    /// The digest of the last value refused (said once, not at every resync).
    rejected: Option<[u8; 32]>,
    monitor: Monitor,
}

impl Follower {
    pub fn new(
        key: String,
        config: PathBuf,
        etcdctl: PathBuf,
        resync: Duration,
        status_file: Option<PathBuf>,
    ) -> Follower {
        let monitor = Monitor::new(status_file, "key", &key, config.display().to_string());
        Follower {
            key,
            config,
            etcdctl,
            resync,
            revision: 0,
            absent: false,
            rejected: None,
            monitor,
        }
    }

    /// `etcdctl get`: the key's value now.
    pub fn get(&self) -> Result<Snapshot, SyncError> {
        etcdctl::get(&self.etcdctl, &self.key)
    }

    /// Bring the file to what a `get` returned: the key as it is now, whatever came before. (A
    /// lower revision than seen so far means another cluster, or one restored from a backup:
    /// it is still the truth now.) `Ok(true)` when the file was written.
    pub fn apply_get(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        if snap.revision < self.revision {
            self.monitor.restart_revisions(snap.revision);
        }
        self.monitor.contact(snap.revision);
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        self.monitor.revision = snap.revision;
        self.monitor.save();
        Ok(written)
    }

    /// Bring the file to a watched change, unless a `get` already brought it past that (a
    /// resync racing the watch). `Ok(true)` when the file was written.
    pub fn apply_event(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        if snap.revision < self.revision {
            return Ok(false);
        }
        self.monitor.contact(snap.revision);
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        self.monitor.revision = snap.revision;
        self.monitor.save();
        Ok(written)
    }

    /// Write `value` (the key at `revision`) unless the file holds it already or the proxy
    /// would refuse it; an absent key leaves the file as it is. The file is read as the proxy
    /// reads it (never a FIFO, never through a symlink): anything but a regular file there is
    /// an error, and nothing is written over it.
    fn write(&mut self, value: Option<Vec<u8>>, revision: i64) -> Result<bool, SyncError> {
        let path = &self.config;
        let Some(value) = value else {
            if !self.absent {
                self.absent = true;
                crate::warn!(
                    "etcd key {:?} is absent (revision {revision}): {} left as it is",
                    self.key,
                    path.display()
                );
            }
            return Ok(false);
        };
        self.absent = false;
        if let Err(problems) = check_config(path, &value) {
            let digest = sha256::digest(&value);
            if self.rejected != Some(digest) {
                self.rejected = Some(digest);
                let stays = format!("{} left as it is", path.display());
                self.monitor.reject(&self.key, revision, &stays, problems);
            }
            return Ok(false);
        }
        self.rejected = None;
        self.monitor.clear(&self.key);
        let now = read_regular(path).map_err(|e| SyncError::Write(path.clone(), e))?;
        self.monitor.files = 1;
        if now.as_deref() == Some(&value[..]) {
            crate::debug!("{} already holds revision {revision}", path.display());
            return Ok(false);
        }
        write_atomically(path, &value).map_err(|e| SyncError::Write(path.clone(), e))?;
        self.monitor.applied(&self.key, revision, "written");
        crate::info!(
            "wrote {} from etcd key {:?} revision={revision} bytes={} sha256={}",
            path.display(),
            self.key,
            value.len(),
            sha256::hex(&value)
        );
        Ok(true)
    }

    /// Apply watch responses as they come; get again every `resync`. Returns when the watch
    /// output ends or asks for a fresh get.
    fn follow(&mut self, lines: &Receiver<String>) -> Result<(), SyncError> {
        let mut next_resync = Instant::now() + self.resync;
        loop {
            let wait = next_resync.saturating_duration_since(Instant::now());
            match lines.recv_timeout(wait) {
                Ok(line) => match parse_watch_line(&line, &self.key)? {
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
                    next_resync = Instant::now() + self.resync;
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
}

impl Cycle for Follower {
    /// Get, then watch until the watch ends.
    fn cycle(&mut self, notify: &mut Notifier) -> Result<(), SyncError> {
        let snap = self.get()?;
        let from = snap.revision + 1;
        self.apply_get(snap)?;
        notify.status(&format!("following from revision {from}"));
        let mut child = etcdctl::command(&self.etcdctl)
            .args(["watch", "-w", "json", &format!("--rev={from}"), &self.key])
            .spawn()
            .map_err(SyncError::Spawn)?;
        let lines = read_lines(&mut child);
        let stderr = collect_stderr(&mut child);
        crate::info!("watching etcd key {:?} from revision {from}", self.key);
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

    fn kept(&self) -> (&'static str, String) {
        (
            "the config file is left as it is",
            format!("{} left as it is", self.config.display()),
        )
    }

    fn monitor(&mut self) -> &mut Monitor {
        &mut self.monitor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::args::DEFAULT_RESYNC;
    use std::fs;

    #[test]
    fn older_changes_and_absent_keys_leave_the_file() {
        let dir = std::env::temp_dir().join(format!("etcd-sync-apply-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let mut f = Follower::new(
            "/k".into(),
            path.clone(),
            "etcdctl".into(),
            DEFAULT_RESYNC,
            None,
        );
        // Valid configs told apart by their port.
        let v = |port: u16| {
            format!(r#"{{"Apps": [{{"Name": "a", "Ports": [{port}], "Targets": ["h:1"]}}]}}"#)
                .into_bytes()
        };
        let snap = |revision: i64, value: Option<Vec<u8>>| Snapshot { revision, value };
        assert!(f.apply_get(snap(5, Some(v(5)))).unwrap());
        // The same bytes again: nothing written.
        assert!(!f.apply_event(snap(5, Some(v(5)))).unwrap());
        // A watch event older than what a get already gave (a resync racing the watch).
        assert!(!f.apply_event(snap(4, Some(v(4)))).unwrap());
        // Deleted: the file stays, said once.
        assert!(!f.apply_event(snap(6, None)).unwrap());
        assert!(!f.apply_get(snap(6, None)).unwrap());
        assert_eq!(fs::read(&path).unwrap(), v(5));
        // A value the proxy would refuse (empty, not a config, a bad port): never written.
        for bad in [
            &b""[..],
            b"five",
            br#"{"Apps": [{"Name": "a", "Ports": [0]}]}"#,
        ] {
            assert!(!f.apply_event(snap(7, Some(bad.to_vec()))).unwrap());
            assert_eq!(fs::read(&path).unwrap(), v(5));
        }
        assert!(f.apply_event(snap(8, Some(v(8)))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), v(8));
        // A get is the truth even at a lower revision (etcd rebuilt or restored from a backup),
        // and later events are compared with it.
        assert!(f.apply_get(snap(2, Some(v(2)))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), v(2));
        assert!(f.apply_event(snap(3, Some(v(3)))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), v(3));
        fs::remove_dir_all(&dir).unwrap();
    }
}
