//! The config plane: a thread of its own that reloads the config, so that the listener loop
//! never stops accepting for one. It reads, parses, validates, checks for loops, hashes and
//! diffs the file, builds the new routing table and works out what the mode's ports must do
//! (`PortChange`); the loop only swaps the table in and applies the port change, then hands
//! the table it replaced back here to be dropped (freeing a large table is itself work the
//! accepting thread should not do).
//!
//! One entry, [`Reloads`], asks for a reload and, if wanted, for its [`Outcome`]: SIGHUP,
//! the reload tick and the admin command all go through it. Requests that arrive while a
//! reload runs are answered together by the next one.
//!
//! ```text
//!  SIGHUP / tick / admin ──Request──> plane: load, validate, diff, build ──Change──> loop
//!                                        <──────────── Verdict (old table) ──────────┘
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use mio::net::UnixStream;

use crate::backends::health::Checker;
use crate::backends::routing::Routes;
use crate::config::prefix::Prefix;
use crate::config::{Config, ConfigError, Diff};
use crate::frontend::candidate::{self, LoadError};
use crate::frontend::directory::Directory;
use crate::frontend::ports::PortChange;
use crate::frontend::reserved;
use crate::frontend::simple;
use crate::frontend::watch::Watch;
use crate::metrics::{Published, RejectedFile};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file hashing to `sha256` is in force from now on.
    Applied { sha256: String },
    /// The file says what the running config says (perhaps in other bytes).
    Unchanged { sha256: String },
    /// Refused, with every problem; the running config keeps serving.
    Rejected { problems: Vec<String> },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Applied { sha256 } => write!(f, "reload ok: sha256={sha256}"),
            Outcome::Unchanged { sha256 } => write!(f, "config unchanged: sha256={sha256}"),
            Outcome::Rejected { problems } => {
                write!(f, "reload rejected: {}", problems.join("; "))
            }
        }
    }
}

/// Asks the config plane for reloads. Cheap to clone; every method returns at once except
/// [`Reloads::reload`], which waits for the outcome.
#[derive(Clone)]
pub struct Reloads(Sender<Request>);

enum Request {
    /// Reload now (SIGHUP, admin), telling `reply` how it went.
    Reload { reply: Option<Sender<Outcome>> },
    /// The reload tick: reload if the file changed.
    Tick,
}

impl Reloads {
    /// Reload now, as SIGHUP does, without waiting.
    pub fn request(&self) {
        let _ = self.0.send(Request::Reload { reply: None });
    }

    /// Reload now and wait for the outcome (for a caller on a thread of its own: the
    /// listener loop must never wait for the plane). None if the plane has stopped (the
    /// process is exiting).
    pub fn reload(&self) -> Option<Outcome> {
        let (tx, rx) = mpsc::channel();
        self.0.send(Request::Reload { reply: Some(tx) }).ok()?;
        rx.recv().ok()
    }

    /// The reload tick: the plane looks whether the file changed.
    pub(super) fn tick(&self) {
        let _ = self.0.send(Request::Tick);
    }
}

/// A new routing table for the loop to swap in, and what its ports must do.
pub(super) struct Change {
    pub(super) routes: Arc<Routes>,
    pub(super) ports: PortChange,
    /// Ports no app has any more: their open connections drain.
    pub(super) ports_removed: Vec<u16>,
}

/// The loop's answer to a `Change`.
pub(super) struct Verdict {
    /// Why the change could not be applied (a port that cannot be listened on, a stop under
    /// way); None: applied.
    pub(super) refused: Option<String>,
    /// The table no longer in force (the replaced one, or the refused new one), to be
    /// dropped here.
    pub(super) dropped: Arc<Routes>,
}

/// The loop's end of the plane: where changes arrive and verdicts go.
pub(super) struct LoopEnd {
    pub(super) reloads: Reloads,
    pub(super) changes: Receiver<Change>,
    pub(super) verdicts: Sender<Verdict>,
    /// Readable when a change is waiting (register it with `tokens::PLANE`).
    pub(super) pipe: UnixStream,
}

/// What the plane starts from: the config in force (as loaded at start-up) and those who
/// follow it.
pub(super) struct InForce {
    pub(super) path: PathBuf,
    pub(super) source: Source,
    pub(super) config: Config,
    pub(super) routes: Arc<Routes>,
    pub(super) checker: Arc<Checker>,
    pub(super) published: Arc<Published>,
    /// The mode reads `PortChange::steer` (bpf) rather than `binds`.
    pub(super) steers: bool,
    /// The --metrics address: a reload refuses an app on it, as start-up does.
    pub(super) metrics: Option<SocketAddr>,
}

/// Where the config comes from.
pub(super) enum Source {
    /// One file, and what was last seen of it.
    File(Watch),
    /// A directory of files (`-c DIR`).
    Dir(Box<Directory>),
}

struct Plane {
    at: InForce,
    /// A change of a directory was refused by the loop (its ports): the directory's apps are
    /// not all in force, and the next reload tries again even if no file changed.
    owed: Option<dir::Owed>,
    /// Apps named by the reloads applied since memory was last given back (see `commit`).
    untrimmed: usize,
    requests: Receiver<Request>,
    changes: Sender<Change>,
    verdicts: Receiver<Verdict>,
    pipe: UnixStream,
}

/// What start-up loaded: the config, where it comes from, its SHA-256, and the directory's
/// files refused (each logged; the proxy starts with the others).
pub(super) struct Loaded {
    pub(super) config: Config,
    pub(super) source: Source,
    pub(super) sha256: String,
    pub(super) rejected: Vec<RejectedFile>,
}

/// Load the config file at `path` (see `candidate`), or every file of the config directory
/// there (see `directory`), and start watching it.
pub(super) fn load(path: &Path) -> Result<Loaded, ConfigError> {
    if path.is_dir() {
        let mut dir = Directory::open(path);
        let found = dir.load();
        for r in &found.rejected {
            for p in &r.problems {
                crate::error!("config file rejected: {}: {p}", r.file);
            }
        }
        let (files, serving) = dir.counts();
        crate::info!(
            "config directory {}: {files} files, {serving} serving, {} rejected",
            path.display(),
            found.rejected.len()
        );
        return Ok(Loaded {
            config: dir.config(),
            sha256: dir.sha256(),
            source: Source::Dir(Box::new(dir)),
            rejected: found.rejected,
        });
    }
    // Stat before loading: a change written while we start shows as a change at the first
    // tick instead of being taken for what we loaded.
    let loaded_sig = Watch::stat(path);
    let c = candidate::load(path).map_err(|e| e.into_config_error())?;
    let mut watch = Watch::new();
    watch.seen(loaded_sig, c.bytes);
    Ok(Loaded {
        config: c.config,
        source: Source::File(watch),
        sha256: c.sha256,
        rejected: Vec::new(),
    })
}

/// Start the plane's thread; the loop's end of it is returned.
pub(super) fn start(at: InForce) -> io::Result<LoopEnd> {
    let (req_tx, requests) = mpsc::channel();
    let (changes, changes_rx) = mpsc::channel();
    let (verdicts_tx, verdicts) = mpsc::channel();
    let (pipe, loop_pipe) = UnixStream::pair()?;
    let plane = Plane {
        at,
        owed: None,
        untrimmed: 0,
        requests,
        changes,
        verdicts,
        pipe,
    };
    std::thread::Builder::new()
        .name("config-plane".into())
        .spawn(move || plane.run())?;
    Ok(LoopEnd {
        reloads: Reloads(req_tx),
        changes: changes_rx,
        verdicts: verdicts_tx,
        pipe: loop_pipe,
    })
}

/// bpf mode: what the map entries must become to go from `old` to `routes` by `diff`: the
/// pairs of the apps the diff names, each compared between the two tables.
fn steer_change(
    old: &Routes,
    diff: &Diff,
    routes: &Routes,
) -> Vec<((u16, Prefix), Option<String>)> {
    let mut touched = BTreeSet::new();
    for name in diff.apps_removed.iter().chain(&diff.apps_changed) {
        touched.extend(old.pairs_of(name));
    }
    for name in diff.apps_added.iter().chain(&diff.apps_changed) {
        touched.extend(routes.pairs_of(name));
    }
    touched
        .into_iter()
        .filter_map(|(port, prefix)| {
            let group = routes.group(port, &prefix);
            (group != old.group(port, &prefix)).then(|| ((port, prefix), group.map(str::to_owned)))
        })
        .collect()
}

/// Directory reloads that named this many apps in all hand what they freed back to the system.
const TRIM_AT: usize = 1000;

/// Hand the memory a reload freed back to the system. A reload frees as much as it allocates
/// (the old config and table), but glibc keeps freed memory in its arenas, so without this
/// the resident size grew by about 100 MB per reload at 200,000 apps. On this thread, never
/// the listener loop's.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns unused memory of the allocator's heaps; it takes the
    // allocator's own locks and has no precondition.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Plane {
    /// Serve requests until the loop is gone.
    fn run(mut self) {
        if let Source::Dir(dir) = &mut self.at.source {
            // The directory holds the apps in force, and a reload changes the table by the
            // directory's diff: a copy of the list of every app here would be memory, and a
            // list to rebuild per reload.
            self.at.config = Config { apps: Vec::new() };
            dir.reserve(self.at.metrics);
        }
        // What start-up freed (the files read, the parse) goes back too.
        give_back_freed_memory();
        while let Ok(first) = self.requests.recv() {
            // Everything asked meanwhile is answered by this one reload.
            let mut asked = false;
            let mut replies = Vec::new();
            for r in std::iter::once(first).chain(self.requests.try_iter()) {
                if let Request::Reload { reply } = r {
                    asked = true;
                    replies.extend(reply);
                }
            }
            let look = match &self.at.source {
                Source::File(watch) => asked || watch.changed(&self.at.path),
                // Finding what changed is the reload's first step.
                Source::Dir(_) => true,
            };
            if !look {
                continue;
            }
            let Some(outcome) = self.reload(asked) else {
                return;
            };
            for r in replies {
                let _ = r.send(outcome.clone());
            }
        }
    }

    /// Re-read the config and have the loop apply it as a diff. Any error leaves the running
    /// config as it is. None: the loop is gone.
    fn reload(&mut self, forced: bool) -> Option<Outcome> {
        if let Source::Dir(_) = self.at.source {
            return self.reload_dir(forced);
        }
        let began = Instant::now();
        let path = self.at.path.clone();
        let Source::File(watch) = &mut self.at.source else {
            return None;
        };
        // Stat before reading: a write that lands after the read then still shows as a change
        // at the next tick.
        let sig = Watch::stat(&path);
        // The file's identity as a fleet sees it (`sha256sum` of the file, or of the etcd value).
        let (new, sha) = match candidate::load(&path) {
            Ok(c) => {
                watch.seen(sig, c.bytes);
                (c.config, c.sha256)
            }
            Err(LoadError::Unreadable { problem, .. }) => {
                // Logged once per distinct error (and on every SIGHUP, which asks): a path left
                // pointing at a directory must not write a line per tick forever.
                let message = problem.to_string();
                if watch.unreadable(sig, &message) || forced {
                    crate::error!(
                        "reload rejected: {}: {message}; keeping the running config",
                        path.display()
                    );
                    self.at.published.rejected(None);
                }
                return Some(Outcome::Rejected {
                    problems: vec![format!("{}: {message}", path.display())],
                });
            }
            Err(LoadError::Invalid {
                error,
                bytes,
                sha256,
            }) => {
                watch.seen(sig, bytes);
                let text = error.to_string();
                for line in text.lines() {
                    crate::error!("reload rejected: {line}");
                }
                self.reject("", &sha256);
                return Some(Outcome::Rejected {
                    problems: text.lines().map(str::to_owned).collect(),
                });
            }
        };
        if let Some(clash) = reserved::clash(new.apps.iter().map(|a| &**a), self.at.metrics) {
            crate::error!("reload rejected: {clash}");
            self.reject("", &sha);
            return Some(Outcome::Rejected {
                problems: vec![clash.to_string()],
            });
        }
        self.apply_file(new, sha, began, forced)
    }

    /// Have the loop apply `new` (a whole file, hashing to `sha`), as a diff from the config
    /// in force found by comparing every app.
    fn apply_file(
        &mut self,
        new: Config,
        sha: String,
        began: Instant,
        forced: bool,
    ) -> Option<Outcome> {
        let diff = Diff::between(&self.at.config, &new);
        if diff.is_empty() {
            return Some(self.unchanged(sha, forced));
        }
        let routes = self.at.routes.update(&new, &diff);
        let outcome = self.commit(routes, &diff, sha, began)?;
        if let Outcome::Applied { .. } = outcome {
            // The old config is dropped here, on this thread.
            self.at.config = new;
        }
        Some(outcome)
    }

    /// The apps in force are the same (perhaps in other bytes: spacing, key order): the file
    /// hashing to `sha` is still what serves, and its hash is what a fleet compares.
    fn unchanged(&mut self, sha: String, forced: bool) -> Outcome {
        if self.at.published.config_file(&sha) {
            crate::info!("reload: config unchanged, new file sha256={sha}");
        } else if forced {
            crate::info!("reload: config unchanged sha256={sha}");
        }
        Outcome::Unchanged { sha256: sha }
    }

    /// Have the loop swap `routes` (the table in force changed by `diff`, from the config
    /// hashing to `sha`) in, and follow it: ports, health checks, what the endpoints show.
    fn commit(
        &mut self,
        routes: Routes,
        diff: &Diff,
        sha: String,
        began: Instant,
    ) -> Option<Outcome> {
        let routes = Arc::new(routes);
        let ports = if self.at.steers {
            PortChange {
                binds: Default::default(),
                steer: steer_change(&self.at.routes, diff, &routes),
            }
        } else {
            PortChange {
                binds: simple::wanted(&routes),
                steer: Vec::new(),
            }
        };
        let change = Change {
            routes: Arc::clone(&routes),
            ports,
            ports_removed: diff.ports_removed.clone(),
        };
        let verdict = self.ask_loop(change)?;
        drop(verdict.dropped);
        if let Some(why) = verdict.refused {
            self.reject(&format!("{why}; "), &sha);
            return Some(Outcome::Rejected {
                problems: vec![why],
            });
        }
        routes.in_force();
        // The health checker gets the backends of the apps the diff names, not the list of
        // every backend.
        let backends_of = |r: &Routes, names: &[&Vec<String>]| -> Vec<_> {
            names
                .iter()
                .flat_map(|n| n.iter())
                .filter_map(|n| r.route(n))
                .flat_map(|route| route.backends.iter().cloned())
                .collect()
        };
        let removed = backends_of(&self.at.routes, &[&diff.apps_removed, &diff.apps_changed]);
        let added = backends_of(&routes, &[&diff.apps_added, &diff.apps_changed]);
        self.at.checker.change(added, removed);
        self.at.published.reloaded(Arc::clone(&routes), &sha);
        // The old table is dropped here, on this thread.
        self.at.routes = routes;
        let took = began.elapsed();
        // A few apps' change frees little, and what it frees the next one reuses; handing it
        // back each time would have the next reload fault it in again (at 200,000 apps the
        // trim and the faults were a third of a one-app change). So the trim comes once the
        // reloads since the last have named `TRIM_AT` apps: a rewrite of every app, in
        // reloads of a few hundred, still gives its memory back as it goes.
        self.untrimmed += diff.apps_added.len() + diff.apps_removed.len() + diff.apps_changed.len();
        if matches!(self.at.source, Source::File(_)) || self.untrimmed >= TRIM_AT {
            give_back_freed_memory();
            self.untrimmed = 0;
        }
        crate::info!(
            "reload ok: {diff} took={:.3}ms sha256={sha}",
            took.as_secs_f64() * 1000.0
        );
        Some(Outcome::Applied { sha256: sha })
    }

    /// Hand `change` to the loop, wake it, and wait for its verdict. None: the loop is gone.
    fn ask_loop(&mut self, change: Change) -> Option<Verdict> {
        self.changes.send(change).ok()?;
        match self.pipe.write(&[1]) {
            // A full pipe is already readable: the loop will look.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
        self.verdicts.recv().ok()
    }

    /// A reload of the file hashing to `sha` failed (for `why`, or for reasons already
    /// logged): say which file was refused and which one keeps serving.
    fn reject(&mut self, why: &str, sha: &str) {
        let running = self.at.published.config_hashes().running;
        crate::error!(
            "reload rejected: {why}keeping the running config; rejected sha256={sha} running={running}"
        );
        self.at.published.rejected(Some(sha));
        if let Source::File(watch) = &mut self.at.source {
            watch.rejected();
        }
    }
}

mod dir;
