//! One key per app: every key under `--prefix` is one app, written as `DIR/<name>.json` (see
//! `value` for the format and the names allowed).
//!
//! The cycle: when the follower has no revision to resume from (at start, after a compaction
//! that passed it, after etcd came back with lower revisions or as another cluster: rebuilt or
//! restored), it lists the
//! whole prefix at one revision (`etcdctl get`, in pages read at the first one's revision) and
//! reconciles the directory with it, a page at a time;
//! then it watches from the next revision (`etcdctl watch --prefix --rev`). Each put is written
//! as its app's file, each delete removes it. When the watch ends (etcd unreachable, no
//! leader), the next cycle resumes the watch from the last revision applied: etcd replays every
//! change since, deletes included, so nothing is listed again unless that revision was
//! compacted. Every `--resync` a cheap `get --keys-only --limit=1` tells an etcd that stopped
//! answering (the watch would wait on gRPC's own backoff), another cluster (its revisions are not
//! ours) and the store's revision for the status file.
//!
//! Reconcile: every key's value is validated and its file written if it differs; an owned file
//! whose key is gone is removed, unless the prefix holds no key at all (then every file stays:
//! see `reconcile`). The follower owns exactly the `*.json` files in DIR whose name
//! does not start with '.' (the proxy reads those, and nothing else); any other file is left
//! alone. A key whose value is refused keeps its last good file, if it had one.
//!
//! A problem with one app (a bad value, a FIFO at its path, a write that failed) is that app's:
//! logged, listed in the status file, and every other app goes on.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::config::sha256;
use crate::fleet::cycle::{Cycle, Notifier};
use crate::fleet::error::SyncError;
use crate::fleet::etcdctl::{self, collect_stderr, read_lines, Listed};
use crate::fleet::file::{read_regular, remove_regular, write_all_atomically};
use crate::fleet::output::{parse_watch_prefix, KeyValue, PrefixUpdate};
use crate::fleet::status::Monitor;
use crate::fleet::value::{app_file, app_name};

/// A watch response's files written together (`write_all_atomically`): at most this many. A
/// listing writes a page's at once.
const BATCH: usize = 512;

/// A good value whose file differs: to be written (by `flush`, with others).
struct Pending {
    /// The key, for messages and the status file.
    shown: String,
    revision: i64,
    path: PathBuf,
    bytes: Vec<u8>,
    /// No file was there.
    new: bool,
}

/// What a put asks of its file.
enum Put {
    Write(Pending),
    Unchanged,
    Refused,
}

pub struct PrefixFollower {
    prefix: String,
    dir: PathBuf,
    etcdctl: PathBuf,
    resync: Duration,
    /// The revision the files are current as of; 0: list the prefix before watching.
    revision: i64,
    /// The cluster `revision` is of.
    cluster_id: u64,
    monitor: Monitor,
}

impl PrefixFollower {
    pub fn new(
        prefix: String,
        dir: PathBuf,
        etcdctl: PathBuf,
        resync: Duration,
        status_file: Option<PathBuf>,
    ) -> PrefixFollower {
        let monitor = Monitor::new(status_file, "prefix", &prefix, dir.display().to_string());
        PrefixFollower {
            prefix,
            dir,
            etcdctl,
            resync,
            revision: 0,
            cluster_id: 0,
            monitor,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Judge a put of `key` at `revision`: refused (logged, listed), unchanged, or a file to
    /// write.
    fn plan(&mut self, key: &[u8], revision: i64, value: &[u8]) -> Put {
        let shown = String::from_utf8_lossy(key).into_owned();
        let name = match app_name(&self.prefix, key) {
            Ok(n) => n,
            Err(why) => {
                self.monitor
                    .reject(&shown, revision, "no file is written for it", vec![why]);
                return Put::Refused;
            }
        };
        let path = self.path(name);
        let bytes = match app_file(name, value, &path) {
            Ok(b) => b,
            Err(problems) => {
                let stays = format!("{} left as it is", path.display());
                self.monitor.reject(&shown, revision, &stays, problems);
                return Put::Refused;
            }
        };
        match read_regular(&path) {
            Ok(Some(now)) if now == bytes => {
                self.monitor.clear(&shown);
                Put::Unchanged
            }
            Ok(now) => Put::Write(Pending {
                shown,
                revision,
                path,
                bytes,
                new: now.is_none(),
            }),
            Err(e) => {
                self.refuse_write(&shown, revision, &path, e);
                Put::Refused
            }
        }
    }

    fn refuse_write(&mut self, shown: &str, revision: i64, path: &Path, e: io::Error) {
        let why = format!("cannot write {}: {e}", path.display());
        let stays = format!("{} left as it is", path.display());
        self.monitor.reject(shown, revision, &stays, vec![why]);
    }

    /// Write every pending file (one sync for all). `listing`: part of a reconcile, whose files
    /// are logged at debug level (a cold start of 200,000 apps would otherwise log 200,000
    /// lines) and summed up in one line. Returns (written, refused).
    fn flush(&mut self, batch: &mut Vec<Pending>, listing: bool) -> (usize, usize) {
        if batch.is_empty() {
            return (0, 0);
        }
        let files: Vec<(PathBuf, Vec<u8>)> = batch
            .iter_mut()
            .map(|p| (p.path.clone(), std::mem::take(&mut p.bytes)))
            .collect();
        let results = write_all_atomically(&self.dir, &files);
        let (mut written, mut refused) = (0, 0);
        let level = if listing {
            crate::sys::log::Level::Debug
        } else {
            crate::sys::log::Level::Info
        };
        for ((p, (_, bytes)), result) in batch.drain(..).zip(&files).zip(results) {
            match result {
                Ok(()) => {
                    written += 1;
                    if p.new {
                        self.monitor.files += 1;
                    }
                    self.monitor.clear(&p.shown);
                    self.monitor.applied(&p.shown, p.revision, "written");
                    crate::log_at!(
                        level,
                        "wrote {} from etcd key {:?} revision={} bytes={} sha256={}",
                        p.path.display(),
                        p.shown,
                        p.revision,
                        bytes.len(),
                        sha256::hex(bytes)
                    );
                }
                Err(e) => {
                    refused += 1;
                    self.refuse_write(&p.shown, p.revision, &p.path, e);
                }
            }
        }
        (written, refused)
    }

    /// Apply a delete of `key` at `revision`: its file removed.
    fn delete(&mut self, key: &[u8], revision: i64) {
        let shown = String::from_utf8_lossy(key).into_owned();
        self.monitor.clear(&shown);
        // A key that names no safe file never had one.
        let Ok(name) = app_name(&self.prefix, key) else {
            return;
        };
        let path = self.path(name);
        match remove_regular(&path) {
            Ok(false) => {}
            Ok(true) => {
                self.monitor.files = self.monitor.files.saturating_sub(1);
                self.monitor.applied(&shown, revision, "removed");
                crate::info!(
                    "removed {}: etcd key {shown:?} deleted at revision={revision}",
                    path.display()
                );
            }
            Err(e) => crate::warn!(
                "etcd key {shown:?} deleted at revision={revision}, but cannot remove {}: {e}",
                path.display()
            ),
        }
    }

    /// The files this follower owns in DIR, by app name: `*.json`, not starting with '.'. A
    /// temporary file left by a follower that died mid-write (`.NAME.json.etcd-sync.PID`) is
    /// removed on the way.
    fn owned(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let file = entry?.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some(name) = file.strip_suffix(".json") {
                if !file.starts_with('.') {
                    names.push(name.to_string());
                }
            } else if is_leftover(file) {
                let path = self.dir.join(file);
                match remove_regular(&path) {
                    Ok(_) => crate::info!("removed {}: a write never finished", path.display()),
                    Err(e) => crate::warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
        Ok(names)
    }

    /// List the prefix and bring DIR to it, a page at a time (a page's files written with one
    /// sync): every key's file written if it differs, then every owned file whose key is gone
    /// removed. The revision is the listing's after. What is held per key meanwhile is the
    /// owned files' names (to tell which to remove), not the values.
    fn reconcile(&mut self) -> Result<Listed, SyncError> {
        let dir_error = |e| SyncError::Write(self.dir.clone(), e);
        fs::create_dir_all(&self.dir).map_err(dir_error)?;
        let mut owned = self.owned().map_err(dir_error)?;
        // Keys come in byte order; a sorted list found by binary search tells which owned
        // files a key of the listing names, without a set of every key.
        owned.sort_unstable();
        let mut present = vec![false; owned.len()];
        self.monitor.begin_listing();
        self.monitor.files = owned.len();
        let (mut written, mut unchanged, mut refused) = (0, 0, 0);
        let (etcdctl, prefix) = (self.etcdctl.clone(), self.prefix.clone());
        let listing = etcdctl::list_prefix(&etcdctl, &prefix, |kvs| {
            let mut batch = Vec::with_capacity(kvs.len());
            for kv in &kvs {
                let value = kv.value.as_deref().unwrap_or_default();
                match self.plan(&kv.key, kv.revision, value) {
                    Put::Write(p) => batch.push(p),
                    Put::Unchanged => unchanged += 1,
                    Put::Refused => refused += 1,
                }
                if let Ok(name) = app_name(&prefix, &kv.key) {
                    if let Ok(i) = owned.binary_search_by(|o| o.as_str().cmp(name)) {
                        present[i] = true;
                    }
                }
            }
            let (w, r) = self.flush(&mut batch, true);
            (written, refused) = (written + w, refused + r);
            Ok(())
        })?;
        self.monitor.end_listing();
        let mut removed = 0;
        // No key at all while DIR holds apps: an etcd rebuilt empty or restored from the wrong
        // backup, or a prefix mistyped, would otherwise take every app of the node down at once.
        // The files stay (deletes seen by the watch still remove theirs, one by one).
        let keep_all = listing.keys == 0 && !owned.is_empty();
        if keep_all {
            crate::warn!(
                "etcd prefix {:?} holds no key at revision={}: the {} app files in {} are kept, not removed (delete them by hand if that is meant)",
                self.prefix,
                listing.revision,
                owned.len(),
                self.dir.display()
            );
        }
        for (name, _) in owned
            .iter()
            .zip(&present)
            .filter(|(_, &present)| !keep_all && !present)
        {
            let path = self.path(name);
            match remove_regular(&path) {
                Ok(true) => {
                    removed += 1;
                    self.monitor.files = self.monitor.files.saturating_sub(1);
                    crate::info!(
                        "removed {}: no etcd key {:?} at revision={}",
                        path.display(),
                        format!("{}{name}", self.prefix),
                        listing.revision
                    );
                }
                Ok(false) => {}
                Err(e) => crate::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        crate::info!(
            "reconciled {} with etcd prefix {:?} at revision={}: {} keys, {written} written, {unchanged} unchanged, {removed} removed, {refused} refused",
            self.dir.display(),
            self.prefix,
            listing.revision,
            listing.keys
        );
        self.set_revision(listing.revision);
        Ok(listing)
    }

    fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
        self.monitor.revision = revision;
        self.monitor.save();
    }

    /// Apply one watch response's changes, in order: puts written together (a response may
    /// hold many: a transaction, or the changes replayed after an outage), flushed before a
    /// delete and before a second change to a key already waiting.
    fn apply(&mut self, revision: i64, events: Vec<KeyValue>) {
        let mut last = self.revision;
        let mut batch: Vec<Pending> = Vec::new();
        for ev in events {
            let shown = String::from_utf8_lossy(&ev.key);
            if ev.value.is_none() || batch.iter().any(|p| p.shown == shown) {
                self.flush(&mut batch, false);
            }
            match &ev.value {
                Some(v) => {
                    if let Put::Write(p) = self.plan(&ev.key, ev.revision, v) {
                        batch.push(p);
                    }
                    if batch.len() >= BATCH {
                        self.flush(&mut batch, false);
                    }
                }
                None => self.delete(&ev.key, ev.revision),
            }
            last = last.max(ev.revision);
        }
        self.flush(&mut batch, false);
        // The response's revision: every change up to it has been delivered.
        self.monitor.contact(revision);
        let revision = last.max(revision);
        self.revision = revision;
        self.monitor.revision = revision;
        self.monitor.save_soon();
    }

    /// A cheap get: reachable, and at which revision. Another cluster, or a store revision
    /// below what the files are current as of, is another history (rebuilt, restored): list
    /// again.
    fn probe(&mut self) -> Result<bool, SyncError> {
        let count = etcdctl::probe_prefix(&self.etcdctl, &self.prefix)?;
        self.monitor.contact(count.revision);
        if count.revision < self.revision || count.cluster_id != self.cluster_id {
            crate::warn!(
                "etcd is at revision {} of cluster {:x}, the files are current as of revision {} of cluster {:x} (rebuilt or restored?): listing {:?} again",
                count.revision,
                count.cluster_id,
                self.revision,
                self.cluster_id,
                self.prefix
            );
            self.revision = 0;
            return Ok(false);
        }
        self.monitor.save();
        Ok(true)
    }

    /// Apply watch responses as they come; probe every `resync`. Returns when the watch
    /// output ends or the prefix must be listed again.
    fn follow(&mut self, lines: &Receiver<String>) -> Result<(), SyncError> {
        let mut next_probe = Instant::now() + self.resync;
        loop {
            let until = self
                .monitor
                .save_due()
                .map_or(next_probe, |due| due.min(next_probe));
            match lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => match parse_watch_prefix(&line, &self.prefix)? {
                    PrefixUpdate::Changed { revision, events } => self.apply(revision, events),
                    PrefixUpdate::Ended(why) => {
                        crate::warn!("etcd watch ended: {why}; listing {:?} again", self.prefix);
                        self.revision = 0;
                        return Ok(());
                    }
                },
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if now >= next_probe {
                        next_probe = now + self.resync;
                        // Saves the file too.
                        if !self.probe()? {
                            return Ok(());
                        }
                    } else if self.monitor.save_due().is_some_and(|due| due <= now) {
                        self.monitor.save();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

impl Cycle for PrefixFollower {
    fn cycle(&mut self, notify: &mut Notifier) -> Result<(), SyncError> {
        // Reachable first (and not another history), cheaply: the watch would wait instead.
        if self.revision != 0 {
            self.probe()?;
        }
        if self.revision == 0 {
            let listing = self.reconcile()?;
            self.monitor.contact(listing.revision);
            self.cluster_id = listing.cluster_id;
        }
        let from = self.revision + 1;
        notify.status(&format!("following from revision {from}"));
        let mut child = etcdctl::command(&self.etcdctl)
            .args(["watch", "-w", "json", "--prefix"])
            .arg(format!("--rev={from}"))
            .arg(&self.prefix)
            .spawn()
            .map_err(SyncError::Spawn)?;
        let lines = read_lines(&mut child);
        let stderr = collect_stderr(&mut child);
        crate::info!(
            "watching etcd prefix {:?} from revision {from}",
            self.prefix
        );
        let result = self.follow(&lines);
        let _ = child.kill();
        let status = child.wait();
        let stderr = stderr.join().unwrap_or_default();
        match (result, status) {
            (Err(e), _) => Err(e),
            (Ok(()), Ok(status)) if !status.success() && self.revision != 0 => {
                Err(SyncError::Etcdctl { status, stderr })
            }
            (Ok(()), _) => Ok(()),
        }
    }

    fn kept(&self) -> (&'static str, String) {
        (
            "the app files are left as they are",
            format!("the files in {} left as they are", self.dir.display()),
        )
    }

    fn monitor(&mut self) -> &mut Monitor {
        &mut self.monitor
    }
}

/// A temporary file of `write_all_atomically`, `.NAME.json.etcd-sync.PID`, from another process
/// (this one's own are gone once a write returns).
fn is_leftover(file: &str) -> bool {
    let Some((stem, pid)) = file.rsplit_once(".etcd-sync.") else {
        return false;
    };
    file.starts_with('.')
        && stem.ends_with(".json")
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && pid != std::process::id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers() {
        assert!(is_leftover(".web.json.etcd-sync.1"));
        for not in [
            "web.json.etcd-sync.1",
            ".web.json.etcd-sync.",
            ".web.json.etcd-sync.1x",
            ".web.txt.etcd-sync.1",
            ".web.json",
            &format!(".web.json.etcd-sync.{}", std::process::id()),
        ] {
            assert!(!is_leftover(not), "{not}");
        }
    }
}
