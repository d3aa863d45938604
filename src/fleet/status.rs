//! What monitoring sees of a follower: the `--status-file`, a JSON object replaced atomically
//! (renamed into place; not synced to disk, as it is rewritten at every change and a report, not
//! a config) whenever something changes (and at every resync, which refreshes `etcd_revision` and
//! `checked_unix`); for changes applied one key per app, at most once every `SAVE_EVERY`
//! (rejections and failures at once):
//!
//! - `revision`: the etcd revision the files are current as of (0: never synced). A node is
//!   behind while this is below the `mod_revision` of the latest change under its key or
//!   prefix; `etcd_revision` is the store's revision at the follower's last contact, to compare
//!   with `etcdctl endpoint status` (which counts changes to every key, so it may be ahead
//!   without anything to follow).
//! - `etcd_reachable`, `checked_unix`, `last_error`: whether the last contact worked.
//! - `last_applied`: the last key written or removed, with its revision.
//! - `rejected`: every key whose current value was refused, with its revision and problems
//!   (the first `SHOWN` keys, `rejected_count` all of them); a key leaves the list when a good
//!   value or a delete replaces the bad one.
//!
//! Rejections are also logged, one line each with the key, the revision and every problem.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::fleet::file::replace_unsynced;

/// Rejected keys listed in the file (all are counted and logged).
const SHOWN: usize = 100;
/// Problems listed per rejected key (all are logged).
const PROBLEMS_SHOWN: usize = 20;
/// The file is rewritten at most this often for changes applied (`save_soon`): at 10 puts/s,
/// a rewrite per put cost the follower a third of what the put's own file did (the rename
/// over the old report flushes the new one to disk on ext4).
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub key: String,
    pub revision: i64,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub key: String,
    pub revision: i64,
    /// "written" or "removed".
    pub action: &'static str,
}

/// The file's contents.
#[derive(Debug, Serialize)]
struct Report<'a> {
    mode: &'static str,
    source: &'a str,
    target: String,
    revision: i64,
    etcd_revision: i64,
    etcd_reachable: bool,
    checked_unix: u64,
    last_error: Option<&'a str>,
    last_applied: Option<&'a Applied>,
    files: usize,
    rejected_count: usize,
    rejected: Vec<&'a Rejected>,
    updated_unix: u64,
}

/// The follower's state as monitoring sees it, and where it is written.
pub struct Monitor {
    path: Option<PathBuf>,
    mode: &'static str,
    source: String,
    target: String,
    pub revision: i64,
    etcd_revision: i64,
    reachable: bool,
    checked_unix: u64,
    last_error: Option<String>,
    last_applied: Option<Applied>,
    pub files: usize,
    rejected: BTreeMap<String, Rejected>,
    /// During a listing: the keys it rejected (`begin_listing`).
    relisted: Option<std::collections::HashSet<String>>,
    /// The last write of the file failed (said once until one succeeds).
    save_failed: bool,
    /// When the file was last written, and whether something changed since.
    saved_at: Option<Instant>,
    unsaved: bool,
    /// A rejection since the last write: written at once, not at `SAVE_EVERY`.
    urgent: bool,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Monitor {
    pub fn new(path: Option<PathBuf>, mode: &'static str, source: &str, target: String) -> Self {
        Monitor {
            path,
            mode,
            source: source.to_string(),
            target,
            revision: 0,
            etcd_revision: 0,
            reachable: false,
            checked_unix: 0,
            last_error: None,
            last_applied: None,
            files: 0,
            rejected: BTreeMap::new(),
            relisted: None,
            save_failed: false,
            saved_at: None,
            unsaved: false,
            urgent: false,
        }
    }

    /// etcd answered, at store revision `revision`.
    pub fn contact(&mut self, revision: i64) {
        self.etcd_revision = self.etcd_revision.max(revision);
        self.reachable = true;
        self.checked_unix = now_unix();
        self.last_error = None;
    }

    /// etcd (or the watch) failed.
    pub fn failed(&mut self, why: String) {
        self.reachable = false;
        self.checked_unix = now_unix();
        self.last_error = Some(why);
    }

    /// A listing from a rebuilt or restored etcd starts the revisions again.
    pub fn restart_revisions(&mut self, revision: i64) {
        self.etcd_revision = revision;
        self.revision = revision;
    }

    /// `key`'s value at `revision` is refused: logged with every problem, listed.
    pub fn reject(&mut self, key: &str, revision: i64, what_stays: &str, problems: Vec<String>) {
        crate::warn!(
            "rejected etcd key {key:?} revision={revision}: not written, {what_stays}; {} problem(s): {}",
            problems.len(),
            problems.join("; ")
        );
        let mut problems = problems;
        if problems.len() > PROBLEMS_SHOWN {
            let more = problems.len() - PROBLEMS_SHOWN;
            problems.truncate(PROBLEMS_SHOWN);
            problems.push(format!("... and {more} more (see the log)"));
        }
        if let Some(keys) = &mut self.relisted {
            keys.insert(key.to_string());
        }
        self.urgent = true;
        self.rejected.insert(
            key.to_string(),
            Rejected {
                key: key.to_string(),
                revision,
                problems,
            },
        );
    }

    /// `key` holds a good value now, or none: no longer rejected.
    pub fn clear(&mut self, key: &str) {
        self.rejected.remove(key);
    }

    /// A full listing starts: a rejection it does not make again goes at `end_listing` (its
    /// key is gone, or fixed by a change the watch missed). Until then the rejections stay
    /// listed, also if the listing fails half way.
    pub fn begin_listing(&mut self) {
        self.relisted = Some(std::collections::HashSet::new());
    }

    /// The listing is over: only the rejections it made stay.
    pub fn end_listing(&mut self) {
        if let Some(keys) = self.relisted.take() {
            self.rejected.retain(|key, _| keys.contains(key));
        }
    }

    pub fn applied(&mut self, key: &str, revision: i64, action: &'static str) {
        self.last_applied = Some(Applied {
            key: key.to_string(),
            revision,
            action,
        });
    }

    /// Write the status file now if it was last written `SAVE_EVERY` ago or a key was
    /// rejected since; else later, when `save_due` says.
    pub fn save_soon(&mut self) {
        let due = self.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
        if due || self.urgent {
            self.save();
        } else {
            self.unsaved = true;
        }
    }

    /// When a change put off by `save_soon` is to be written (`save`), if one is.
    pub fn save_due(&self) -> Option<Instant> {
        self.unsaved
            .then(|| self.saved_at.map_or_else(Instant::now, |t| t + SAVE_EVERY))
    }

    /// Write the status file, if there is one. A failure is logged (once until a write
    /// works) and does not stop the follower: the files matter more than the report.
    pub fn save(&mut self) {
        self.saved_at = Some(Instant::now());
        self.unsaved = false;
        self.urgent = false;
        let Some(path) = &self.path else { return };
        let report = Report {
            mode: self.mode,
            source: &self.source,
            target: self.target.clone(),
            revision: self.revision,
            etcd_revision: self.etcd_revision,
            etcd_reachable: self.reachable,
            checked_unix: self.checked_unix,
            last_error: self.last_error.as_deref(),
            last_applied: self.last_applied.as_ref(),
            files: self.files,
            rejected_count: self.rejected.len(),
            rejected: self.rejected.values().take(SHOWN).collect(),
            updated_unix: now_unix(),
        };
        let mut bytes = match serde_json::to_vec_pretty(&report) {
            Ok(b) => b,
            Err(e) => {
                crate::warn!("cannot encode the status: {e}");
                return;
            }
        };
        bytes.push(b'\n');
        match replace_unsynced(path, &bytes) {
            Ok(()) => self.save_failed = false,
            Err(e) if !self.save_failed => {
                self.save_failed = true;
                crate::warn!("cannot write the status file {}: {e}", path.display());
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_saved_at_most_every_second_but_rejections_at_once() {
        let dir = std::env::temp_dir().join(format!("etcd-sync-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        let mut m = Monitor::new(Some(path.clone()), "prefix", "/p/", "d".into());
        let revision_in_file = || {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            v["revision"].as_i64().unwrap()
        };
        m.revision = 1;
        m.save_soon();
        assert_eq!(revision_in_file(), 1, "the first change is saved at once");
        assert_eq!(m.save_due(), None);
        m.revision = 2;
        m.save_soon();
        assert_eq!(revision_in_file(), 1, "the next one waits");
        let due = m.save_due().expect("a save is due");
        assert!(due > Instant::now() && due <= Instant::now() + SAVE_EVERY);
        m.reject("/p/a", 3, "kept", vec!["bad".into()]);
        m.revision = 3;
        m.save_soon();
        assert_eq!(revision_in_file(), 3, "a rejection is saved at once");
        assert_eq!(m.save_due(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_listing_keeps_the_rejections_it_makes_again_and_only_those() {
        let mut m = Monitor::new(None, "prefix", "/p/", "d".into());
        m.reject("/p/gone", 1, "kept", vec!["bad".into()]);
        m.reject("/p/still", 1, "kept", vec!["bad".into()]);
        m.begin_listing();
        m.reject("/p/still", 5, "kept", vec!["bad".into()]);
        assert_eq!(m.rejected.len(), 2, "listed until the listing is over");
        m.end_listing();
        let keys: Vec<&String> = m.rejected.keys().collect();
        assert_eq!(keys, ["/p/still"]);
        assert_eq!(m.rejected["/p/still"].revision, 5);
        // A listing that failed half way (begun, never ended) removed nothing; the next one
        // judges afresh.
        m.begin_listing();
        m.begin_listing();
        m.reject("/p/new", 6, "kept", vec!["bad".into()]);
        m.end_listing();
        let keys: Vec<&String> = m.rejected.keys().collect();
        assert_eq!(keys, ["/p/new"]);
    }
}
