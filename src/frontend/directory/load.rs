//! The first look at a config directory (start-up, `flyproxy check DIR`): every file read,
//! hashed and parsed on a few threads at once, and taken in one by one in name order, as a
//! full refresh would take them. At 200,000 files the reading and parsing are most of a
//! start-up; what a file's apps clash with depends on the files before it, so taking them in
//! stays on one thread, which takes each batch as soon as it and those before it are read
//! (taking in all of them after the last was read left a core idle for a second).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{
    is_config_file, parse, touched, Directory, FileState, Line, Parsed, Refresh, Sha, UNREAD,
};
use crate::config::{self, sha256, ConfigDir};
use crate::frontend::watch::{FileSig, Watch};

/// At most this many threads read and parse, one per core: the thread taking the files in runs
/// beside them (and has a core when a reader waits for the disk). With two per core it had a
/// fifth of a 2-core machine, and finished 0.8 s after the last file was read (200,000 files).
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
    /// Its line of the directory's digest, if it was read (worked out here, on the reading
    /// threads: the thread taking the files in is the one the others wait for).
    line: Option<Line>,
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
        // Typically an app a file: the index of names at its size at once.
        self.owners.reserve(names.len());
        self.touched.off = true;
        let mut out = Refresh::default();
        let dir = self.dir.clone();
        // Opened once, its files by name (see `ConfigDir`); unopenable now (gone since the
        // listing), each file by its path, as a refresh reads one.
        let at = ConfigDir::open(&dir).ok();
        // The files' states in name order, made into the tree at the end (see below): taking a
        // file in looks nothing up in the tree, where a refresh's five look-ups of a name
        // (18 levels of string compares at 200,000 files) were a sixth of the taking thread's
        // time, the thread the readers wait for.
        let mut states = Vec::with_capacity(names.len());
        read_all(&dir, at.as_ref(), &names, |name, file| {
            if let Some(sig) = file.sig {
                states.push(self.take_new(name, sig, file, &mut out));
            }
        });
        // Built whole from its sorted entries, every node of the tree is full (taken in one
        // by one in name order, they were about half full: at 200,000 files, 300 bytes a file
        // against 130; a change of a file later changes its entry in place).
        debug_assert!(
            self.files.is_empty(),
            "a first load of a directory already read"
        );
        self.files = states.into_iter().collect();
        if out.changed {
            self.retry_pending(&mut out);
        }
        // Noting again, for the refreshes to come.
        self.touched = touched::Touched::default();
        out
    }

    /// Take in `file`, read as `name` with metadata `sig`, a file the directory has no state
    /// of yet, if its apps pass beside those taken before: `take_parsed` for a first load,
    /// giving the file's state instead of putting it in `files`.
    fn take_new(
        &mut self,
        name: &str,
        sig: FileSig,
        file: FileRead,
        out: &mut Refresh,
    ) -> (Arc<str>, FileState) {
        let key: Arc<str> = Arc::from(name);
        let mut state = FileState {
            sig: Some(sig),
            sha256: file.sha,
            good: None,
        };
        match file.parsed {
            Err(problems) => self.refuse(name, problems, None, out),
            Ok(apps) => {
                let problems = self.clashes(name, &apps);
                if problems.is_empty() {
                    let sha = file.sha;
                    self.digest
                        .add(file.line.unwrap_or_else(|| Line::of(&sha, name)));
                    self.index(&key, &apps);
                    state.good = Some((apps.into_boxed_slice(), sha));
                    out.changed = true;
                } else {
                    self.refuse(name, problems, Some(apps), out);
                }
            }
        }
        (key, state)
    }
}

/// Each of `names` (files of `dir`) read, hashed and parsed, and given to `take` with its name
/// in the same order, on the calling thread: while readers read on, it takes each batch in as
/// soon as it and every batch before it are read.
fn read_all(
    dir: &Path,
    at: Option<&ConfigDir>,
    names: &[String],
    mut take: impl FnMut(&str, FileRead),
) {
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(READERS_MAX);
    if readers < 2 || names.len() < THREADED_FROM {
        for n in names {
            take(n, read_one(dir, at, n));
        }
        return;
    }
    let next = AtomicUsize::new(0);
    // Batches read and not yet taken, by the index of their first file.
    let done: Mutex<BTreeMap<usize, Vec<FileRead>>> = Mutex::new(BTreeMap::new());
    let more = Condvar::new();
    // Readers still reading: none left while a batch is missing means one panicked (a bug).
    let reading = AtomicUsize::new(readers);
    let read = || {
        let _leaving = Leaving(&reading, &more);
        loop {
            let from = next.fetch_add(BATCH, Ordering::Relaxed);
            if from >= names.len() {
                break;
            }
            let to = (from + BATCH).min(names.len());
            let batch: Vec<FileRead> = names[from..to]
                .iter()
                .map(|n| read_one(dir, at, n))
                .collect();
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(from, batch);
            more.notify_one();
        }
    };
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(read);
        }
        // Batches are handed out in order: the one wanted next is being read, or read.
        for from in (0..names.len()).step_by(BATCH) {
            let batch = {
                let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(batch) = done.remove(&from) {
                        break Some(batch);
                    }
                    if reading.load(Ordering::Acquire) == 0 {
                        break None;
                    }
                    // Woken by every batch read and every reader leaving; the timeout only
                    // covers a reader leaving between the check above and this wait.
                    let (d, _) = more
                        .wait_timeout(done, std::time::Duration::from_millis(20))
                        .unwrap_or_else(|e| e.into_inner());
                    done = d;
                }
            };
            // None: the scope ends here, and passes the reader's panic on.
            let Some(batch) = batch else { break };
            for (name, file) in names[from..].iter().zip(batch) {
                take(name, file);
            }
        }
    });
}

/// Marks a reader gone, however it ends, and wakes the taker to see it.
struct Leaving<'a>(&'a AtomicUsize, &'a Condvar);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
        self.1.notify_all();
    }
}

/// The file `name` of `dir` (opened as `at`), read, hashed and parsed.
fn read_one(dir: &Path, at: Option<&ConfigDir>, name: &str) -> FileRead {
    let read = match at {
        Some(at) => at.read_file_meta(name),
        None => config::read_file_meta(&dir.join(name)),
    };
    match read {
        Ok((bytes, meta)) => {
            let sha = sha256::digest(&bytes);
            FileRead {
                sig: Some(FileSig::of(&meta)),
                sha,
                line: Some(Line::of(&sha, name)),
                parsed: parse(dir, name, &bytes),
            }
        }
        Err(problem) => {
            let path = dir.join(name);
            FileRead {
                // Refused with its metadata (a FIFO, a directory, too large), as a refresh that
                // listed it would; gone since the listing: skipped.
                sig: Watch::stat(&path),
                sha: UNREAD,
                line: None,
                parsed: Err(vec![format!("{}: {problem}", path.display())]),
            }
        }
    }
}
