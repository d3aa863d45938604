//! What the listener loop publishes for the metrics endpoint, and everything the endpoint reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::backends::resolver::Resolver;
use crate::backends::routing::{Routes, UnroutedCounts};
use crate::relay::slots::Slots;

/// Reads per-port-group lookup counters; called from the metrics thread.
pub type LookupReader = Box<dyn Fn() -> Vec<LookupStats> + Send + Sync>;

/// sk_lookup verdicts for one group of ports (one app), from the program's per-CPU counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupStats {
    pub group: String,
    pub steered: u64,
    pub dropped: u64,
}

/// What the listener loop publishes for the endpoint: the routing table in force, how reloads
/// went, which config file is in force, and whether accepts are held back. The loop writes
/// every field; `unrouted` is also counted into by the relay threads (a session that finds no
/// app for a server name), through a handle start-up gives them. The endpoint only reads.
pub struct Published {
    pub routes: Mutex<Arc<Routes>>,
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// Unix time in milliseconds of the last successful (re)load.
    pub last_reload_ok_ms: AtomicU64,
    /// Which config file is in force, and which was last refused: how an operator tells which
    /// config each instance of a fleet runs.
    config_sha256: Mutex<ConfigHashes>,
    /// Accepting is held back by the connection bound.
    pub accept_paused: Arc<AtomicBool>,
    /// Connections no app took (counted at accept and by the sessions).
    pub unrouted: Arc<UnroutedCounts>,
    /// Directory mode: the files refused now, each with its problems, and how many
    /// refusals there were since start (a file refused again after a change counts again).
    rejected_files: Mutex<Vec<RejectedFile>>,
    pub file_rejections: AtomicU64,
    /// The config is a directory (`-c DIR`): the families above are exposed.
    pub directory: AtomicBool,
}

/// A config file of a directory that is refused, with every problem (its last good version,
/// if any, serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedFile {
    pub file: String,
    pub problems: Vec<String>,
}

/// SHA-256 (hex, as `sha256sum` prints it) of config files' bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigHashes {
    /// The file in force.
    pub running: String,
    /// The last file rejected since the running one was loaded; cleared by the next success.
    pub rejected: Option<String>,
}

impl Published {
    /// The state at start-up: `routes` just loaded from the file hashing to `sha256`, no reload
    /// yet.
    pub fn new(routes: Arc<Routes>, sha256: String) -> Published {
        Published {
            routes: Mutex::new(routes),
            reloads_ok: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            last_reload_ok_ms: AtomicU64::new(unix_ms()),
            config_sha256: Mutex::new(ConfigHashes {
                running: sha256,
                rejected: None,
            }),
            accept_paused: Arc::new(AtomicBool::new(false)),
            unrouted: Arc::default(),
            rejected_files: Mutex::default(),
            file_rejections: AtomicU64::new(0),
            directory: AtomicBool::new(false),
        }
    }

    /// The config hashes now (a copy: the lock is held only for that).
    pub fn config_hashes(&self) -> ConfigHashes {
        self.config_sha256
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The file hashing to `sha256` is in force from now on (any rejection is history).
    /// `false` if it was already.
    pub fn config_file(&self, sha256: &str) -> bool {
        let mut h = self.config_sha256.lock().unwrap_or_else(|e| e.into_inner());
        let changed = h.running != sha256 || h.rejected.is_some();
        h.running = sha256.to_owned();
        h.rejected = None;
        changed
    }

    /// The routing table in force.
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A reload was applied: `routes`, from the file hashing to `sha256`, is in force from
    /// now on.
    pub fn reloaded(&self, routes: Arc<Routes>, sha256: &str) {
        *self.routes.lock().unwrap_or_else(|e| e.into_inner()) = routes;
        self.config_file(sha256);
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.last_reload_ok_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Directory mode: `refused` more files were refused; `now`, every file refused now.
    pub fn files_rejected(&self, refused: usize, now: Vec<RejectedFile>) {
        self.file_rejections
            .fetch_add(refused as u64, Ordering::Relaxed);
        *self
            .rejected_files
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// The config files refused now (directory mode).
    pub fn rejected_files(&self) -> Vec<RejectedFile> {
        self.rejected_files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A reload was refused: the running config stays. `sha256` names the refused file when
    /// it could be read.
    pub fn rejected(&self, sha256: Option<&str>) {
        if let Some(sha) = sha256 {
            let mut h = self.config_sha256.lock().unwrap_or_else(|e| e.into_inner());
            h.rejected = Some(sha.to_owned());
        }
        self.reloads_rejected.fetch_add(1, Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the endpoint reads.
pub struct Sources {
    pub published: Arc<Published>,
    pub slots: Arc<Slots>,
    /// The mode's lookup counters (bpf mode only).
    pub lookups: Option<LookupReader>,
    /// Target names' lookups, for their counters.
    pub resolver: Resolver,
    /// The bound on per-target series in /metrics (`--metrics-target-series`).
    pub target_series: SeriesCap,
    /// The bound on per-app series in /metrics (`--metrics-app-series`).
    pub app_series: SeriesCap,
}

/// A bound on series in /metrics. Per-target series are served while the config has at most
/// `--metrics-target-series` targets (each app's targets, each once): with two targets per app
/// they are about 60% of the exposition (2,000 apps: 14.2 MB, 5.9 MB without them). Per-app
/// series are served while it has at most `--metrics-app-series` apps: about 2.9 KB an app,
/// most of it the two histograms, so 590 MB at 200,000 apps; past it each per-app family is
/// one series of every app's sum. Either way `/metrics?app=NAME` serves one app's all. Also
/// remembers whether the last scrape left series out, so that starting to leave them out is
/// logged once, not per scrape.
pub struct SeriesCap {
    pub max: usize,
    omitting: AtomicBool,
}

impl SeriesCap {
    /// Serve the series while the config has at most `max` of what they are about.
    pub fn new(max: usize) -> SeriesCap {
        SeriesCap {
            max,
            omitting: AtomicBool::new(false),
        }
    }

    /// Record whether this scrape leaves the series out; true if the last one did not.
    pub(super) fn started_omitting(&self, now: bool) -> bool {
        let before = self.omitting.swap(now, Ordering::Relaxed);
        now && !before
    }
}
