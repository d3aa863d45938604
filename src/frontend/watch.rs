//! Notices that the config file changed: by its metadata at each reload tick, and by its
//! contents after a rejected version (so a file fixed within the same mtime tick is still
//! picked up).

use std::path::Path;
use std::time::{Duration, SystemTime};

pub(super) struct Watch {
    sig: Option<FileSig>,
    /// The contents last read (applied or not).
    last: Vec<u8>,
    /// The last contents read were refused.
    rejected: bool,
    /// The last error reading the file, while it stays unreadable.
    unreadable: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct FileSig {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl FileSig {
    /// The signature of a file with metadata `m`.
    pub fn of(m: &std::fs::Metadata) -> FileSig {
        use std::os::unix::fs::MetadataExt;
        FileSig {
            mtime: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        }
    }
}

/// A file modified this recently may have changed again within the same timestamp tick
/// (coarse on some kernels and filesystems) without its size changing: compare contents.
const RECENT: Duration = Duration::from_secs(2);

impl Watch {
    pub(super) fn new() -> Watch {
        Watch {
            sig: None,
            last: Vec::new(),
            rejected: false,
            unreadable: None,
        }
    }

    pub fn stat(path: &Path) -> Option<FileSig> {
        Some(FileSig::of(&std::fs::metadata(path).ok()?))
    }

    /// Remember the file as it was read (at a load or a reload attempt).
    pub(super) fn seen(&mut self, sig: Option<FileSig>, bytes: Vec<u8>) {
        self.sig = sig;
        self.last = bytes;
        self.rejected = false;
        self.unreadable = None;
    }

    /// The file could not be read; true if this error is new (to be logged). The contents
    /// last read stay, so a file put back as it was is no change.
    pub(super) fn unreadable(&mut self, sig: Option<FileSig>, error: &str) -> bool {
        self.sig = sig;
        let new = self.unreadable.as_deref() != Some(error);
        self.unreadable = Some(error.to_owned());
        new
    }

    pub(super) fn rejected(&mut self) {
        self.rejected = true;
    }

    pub(super) fn changed(&self, path: &Path) -> bool {
        let Some(sig) = Watch::stat(path) else {
            // Missing for a moment (being replaced) or gone: keep serving what we have.
            return false;
        };
        if Some(sig) != self.sig {
            return true;
        }
        // Same metadata. Compare contents after a refused version (fixed within the same
        // tick) and while the file is fresh (rewritten within the same tick, same size).
        let recent = sig
            .mtime
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RECENT);
        (self.rejected || recent)
            && crate::config::read_file(path).is_ok_and(|now| now != self.last)
    }
}
