//! The first look at a config directory (start-up, `flyproxy check DIR`): every file read,
//! hashed and parsed on a few threads at once, then taken in one by one in name order, as a
//! full refresh would take them. At 200,000 files the reading and parsing are most of a
//! start-up; what a file's apps clash with depends on the files before it, so taking them in
//! stays on one thread.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{is_config_file, parse, touched, Directory, Parsed, Refresh, Sha, UNREAD};
use crate::config::{self, sha256};
use crate::frontend::watch::{FileSig, Watch};

/// At most this many threads read and parse: two per core, so that a thread waiting for the
/// disk (a directory not in the page cache) leaves its core to another; more gain nothing.
const READERS_MAX: usize = 4;

/// Below this many files one thread reads them all: starting threads would cost more.
const THREADED_FROM: usize = 256;

/// Files a reader takes at a time from the shared list (few trips to the shared counter).
const BATCH: usize = 64;

/// One file as a reader left it.
struct FileRead {
    /// Its metadata when read (None: it could not be stat'ed either; it is skipped, as a
    /// file gone between the listing and the read).
    sig: Option<FileSig>,
    /// SHA-256 of its contents (`UNREAD` if unreadable).
    sha: Sha,
    parsed: Parsed,
}

impl Directory {
    /// Read every config file of the directory and take in those that pass, as
    /// `refresh(true)` does on a directory nothing was read from yet. The diff it returns is
    /// empty (everything is new; nobody compares a first load with anything).
    pub fn load(&mut self) -> Refresh {
        if self.watch.is_none() {
            self.dir_sig = Watch::stat(&self.dir);
        }
        let mut names: Vec<String> = match fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| is_config_file(n))
                .collect(),
            // Unreadable now: nothing serves yet, and the next tick looks again.
            Err(_) => Vec::new(),
        };
        // The order `files` (a BTreeMap) and a full refresh take them in.
        names.sort_unstable();
        let read = read_all(&self.dir, &names);
        // Typically an app a file: the index of names at its size at once.
        self.owners.reserve(names.len());
        let mut out = Refresh::default();
        for (name, file) in names.iter().zip(read) {
            let Some(sig) = file.sig else {
                continue;
            };
            self.take_parsed(name, sig, file.sha, file.parsed, &mut out);
        }
        if out.changed {
            self.retry_pending(&mut out);
        }
        // What taking the files in noted for a refresh's diff: nothing to compare with.
        self.touched = touched::Touched::default();
        out
    }
}

/// Each of `names` (files of `dir`) read, hashed and parsed, in the same order.
fn read_all(dir: &Path, names: &[String]) -> Vec<FileRead> {
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get() * 2)
        .min(READERS_MAX);
    if readers < 2 || names.len() < THREADED_FROM {
        return names.iter().map(|n| read_one(dir, n)).collect();
    }
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, Vec<FileRead>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| loop {
                let from = next.fetch_add(BATCH, Ordering::Relaxed);
                if from >= names.len() {
                    break;
                }
                let to = (from + BATCH).min(names.len());
                let batch: Vec<FileRead> =
                    names[from..to].iter().map(|n| read_one(dir, n)).collect();
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((from, batch));
            });
        }
    });
    let mut batches = done.into_inner().unwrap_or_else(|e| e.into_inner());
    batches.sort_unstable_by_key(|(from, _)| *from);
    batches.into_iter().flat_map(|(_, b)| b).collect()
}

/// The file `name` of `dir`, read, hashed and parsed.
fn read_one(dir: &Path, name: &str) -> FileRead {
    let path = dir.join(name);
    match config::read_file_meta(&path) {
        Ok((bytes, meta)) => FileRead {
            sig: Some(FileSig::of(&meta)),
            sha: sha256::digest(&bytes),
            parsed: parse(&path, &bytes),
        },
        Err(problem) => FileRead {
            // Refused with its metadata (a FIFO, a directory, too large), as a refresh that
            // listed it would; gone since the listing: skipped.
            sig: Watch::stat(&path),
            sha: UNREAD,
            parsed: Err(vec![format!("{}: {problem}", path.display())]),
        },
    }
}
