//! Runtime state: what an operator set through the admin socket (a target's state and weight,
//! an app disabled), as opposed to what the config says. It lives where the proxy reads it
//! (the target's `Backend`, the app's counters), which reloads keep for every target and app
//! that stays, so it survives a reload and goes with what a reload removes. What was set is
//! remembered here by (app, target), so that it can be saved whole and restored:
//!
//! - with `--state-file PATH`, written atomically (a temporary file renamed over it) on every
//!   change and read at start; a file that cannot be read or parsed is a warning, never a
//!   refusal to start;
//! - to the new process of an upgrade, which asks the old one (`show state`) before it serves.
//!
//! The saved form is JSON, in the config's spelling:
//! `{"Targets": [{"App": "web", "Target": "10.0.0.1:80", "State": "drain", "Weight": 3}],
//!   "DisabledApps": ["api"]}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::backends::backend::{Backend, TargetState};
use crate::backends::routing::{AppRoute, Routes};

/// The state as saved and handed over.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    #[serde(rename = "Targets", default)]
    targets: Vec<SavedTarget>,
    #[serde(rename = "DisabledApps", default)]
    disabled_apps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedTarget {
    #[serde(rename = "App")]
    app: String,
    #[serde(rename = "Target")]
    target: String,
    #[serde(rename = "State", default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(rename = "Weight", default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

/// What was set on one target through the socket.
#[derive(Debug, Default, Clone, Copy)]
struct Set {
    state: bool,
    weight: bool,
}

/// Why saved state could not be read or written.
#[derive(Debug)]
pub enum StateError {
    /// Not a regular file, larger than a config may be, or unreadable: what is wrong.
    Read(PathBuf, String),
    /// Not the saved form: what serde said.
    Parse(String),
    Write(PathBuf, io::Error),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Read(p, why) => {
                write!(f, "--state-file {}: cannot read: {why}", p.display())
            }
            StateError::Parse(why) => write!(f, "not a flyproxy runtime state: {why}"),
            StateError::Write(p, e) => {
                write!(f, "--state-file {}: cannot write: {e}", p.display())
            }
        }
    }
}

impl std::error::Error for StateError {}

/// What was set through the socket, and where it is saved.
pub struct RuntimeState {
    file: Option<PathBuf>,
    targets: Mutex<BTreeMap<(String, String), Set>>,
}

impl RuntimeState {
    pub fn new(file: Option<PathBuf>) -> Arc<RuntimeState> {
        Arc::new(RuntimeState {
            file,
            targets: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Set>> {
        // Each critical section is one map operation or a copy: a poisoned map is whole.
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note that `state` (or, if false, the weight) of `target` of `app` was set.
    pub fn target_set(&self, app: &str, target: &str, state: bool) {
        let mut map = self.lock();
        let set = map.entry((app.to_owned(), target.to_owned())).or_default();
        if state {
            set.state = true;
        } else {
            set.weight = true;
        }
    }

    /// The state now, as JSON on one line: what was set on targets still in `routes` (their
    /// live values) and the apps disabled.
    pub fn to_json(&self, routes: &Routes) -> String {
        let saved = self.saved(routes);
        // A struct of strings and numbers always serialises.
        serde_json::to_string(&saved).unwrap_or_default()
    }

    fn saved(&self, routes: &Routes) -> Saved {
        let mut saved = Saved::default();
        let map = self.lock().clone();
        for (app, _) in routes.apps() {
            if app.stats.disabled.load(Ordering::Relaxed) {
                saved.disabled_apps.push(app.name().to_owned());
            }
            let mut seen = BTreeSet::new();
            for b in &app.backends {
                let target = b.target.to_string();
                let Some(set) = map.get(&(app.name().to_owned(), target.clone())) else {
                    continue;
                };
                if !seen.insert(target.clone()) {
                    continue;
                }
                saved.targets.push(SavedTarget {
                    app: app.name().to_owned(),
                    target,
                    state: set.state.then(|| b.state().as_str().to_owned()),
                    weight: set.weight.then(|| b.weight()),
                });
            }
        }
        saved
    }

    /// Forget what was set on targets no longer in `routes` (a reload removed them): a target
    /// added again later starts as the config says.
    pub fn prune(&self, routes: &Routes) {
        let live: BTreeSet<(String, String)> = routes
            .apps()
            .iter()
            .flat_map(|(app, _)| {
                app.backends
                    .iter()
                    .map(|b| (app.name().to_owned(), b.target.to_string()))
            })
            .collect();
        self.lock().retain(|k, _| live.contains(k));
    }

    /// Save the state now to the --state-file, if there is one: written to a temporary file
    /// beside it, synced, then renamed over it, so that a crash leaves the old or the new.
    pub fn save(&self, routes: &Routes) -> Result<(), StateError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        self.prune(routes);
        let mut json = serde_json::to_string_pretty(&self.saved(routes)).unwrap_or_default();
        json.push('\n');
        write_atomically(path, json.as_bytes()).map_err(|e| StateError::Write(path.clone(), e))
    }

    /// Read the --state-file, if there is one and it exists, and apply it to `routes`. Read
    /// as the config is (`config::read_file`): a regular file only, never blocking on a FIFO
    /// put there, and no larger than a config may be.
    pub fn load_file(&self, routes: &Routes) -> Result<Applied, StateError> {
        let Some(path) = &self.file else {
            return Ok(Applied::default());
        };
        if let Err(e) = std::fs::symlink_metadata(path) {
            if e.kind() == io::ErrorKind::NotFound {
                return Ok(Applied::default());
            }
        }
        let bytes = crate::config::read_file(path)
            .map_err(|p| StateError::Read(path.clone(), p.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| StateError::Parse("the file is not UTF-8 text".into()))?;
        self.apply_json(&text, routes)
    }

    /// Apply saved state (`show state`'s answer, or a --state-file) to `routes`: what names a
    /// target or app `routes` lacks is skipped and counted.
    pub fn apply_json(&self, json: &str, routes: &Routes) -> Result<Applied, StateError> {
        let saved: Saved =
            serde_json::from_str(json).map_err(|e| StateError::Parse(e.to_string()))?;
        let mut applied = Applied::default();
        // Indexed once: a file may name every target of 100,000 apps.
        let apps: HashMap<&str, &Arc<AppRoute>> = routes
            .apps()
            .into_iter()
            .map(|(a, _)| (a.name(), a))
            .collect();
        for t in &saved.targets {
            let state = match t.state.as_deref().map(TargetState::parse) {
                Some(None) => {
                    applied.skipped.push(format!(
                        "target {} of app {}: state {:?} is not ready, drain or maint",
                        t.target,
                        t.app,
                        t.state.as_deref().unwrap_or("")
                    ));
                    continue;
                }
                Some(Some(s)) => Some(s),
                None => None,
            };
            let backends = apps
                .get(t.app.as_str())
                .map_or_else(Vec::new, |app| backends_of(app, &t.target));
            if backends.is_empty() {
                applied.skipped.push(format!(
                    "target {} of app {}: not in the config",
                    t.target, t.app
                ));
                continue;
            }
            for b in &backends {
                if let Some(s) = state {
                    b.set_state(s);
                }
                if let Some(w) = t.weight {
                    b.set_weight(w);
                }
            }
            let mut map = self.lock();
            let set = map.entry((t.app.clone(), t.target.clone())).or_default();
            set.state |= state.is_some();
            set.weight |= t.weight.is_some();
            applied.targets += 1;
        }
        for name in &saved.disabled_apps {
            match apps.get(name.as_str()) {
                Some(app) => {
                    app.stats.disabled.store(true, Ordering::Relaxed);
                    applied.apps += 1;
                }
                None => applied
                    .skipped
                    .push(format!("disabled app {name}: not in the config")),
            }
        }
        Ok(applied)
    }
}

/// What applying saved state did.
#[derive(Debug, Default)]
pub struct Applied {
    pub targets: usize,
    pub apps: usize,
    /// What named something the config lacks, or was not a state.
    pub skipped: Vec<String>,
}

/// The app named `name` in `routes`.
pub(super) fn find_app<'a>(routes: &'a Routes, name: &str) -> Option<&'a Arc<AppRoute>> {
    routes.route_arc(name)
}

/// The backends of app `app` whose target is `target` as the config spells it (one unless the
/// app lists it twice, which is one backend with two turns: deduplicated).
pub(super) fn find_target(routes: &Routes, app: &str, target: &str) -> Vec<Arc<Backend>> {
    find_app(routes, app).map_or_else(Vec::new, |app| backends_of(app, target))
}

/// The backends of `app` whose target is `target`, each once.
fn backends_of(app: &AppRoute, target: &str) -> Vec<Arc<Backend>> {
    let mut found: Vec<Arc<Backend>> = Vec::new();
    for b in &app.backends {
        if b.target.to_string() == target && !found.iter().any(|f| Arc::ptr_eq(f, b)) {
            found.push(Arc::clone(b));
        }
    }
    found
}

/// Write `bytes` to `path` through a temporary file in the same directory, synced and renamed.
/// The temporary file is created anew (`O_EXCL`): a symlink planted at its name is never
/// followed, and a rename replaces one planted at `path` itself.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // One left by a crash of a process with our pid, or planted: not ours to follow.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_form_reads_back_and_refuses_what_it_does_not_know() {
        let s: Saved = serde_json::from_str(
            r#"{"Targets":[{"App":"a","Target":"h:1","State":"drain"}],"DisabledApps":["b"]}"#,
        )
        .unwrap();
        assert_eq!(s.targets[0].state.as_deref(), Some("drain"));
        assert_eq!(s.targets[0].weight, None);
        let back: Saved = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Saved>(r#"{"Tragets":[]}"#).is_err());
        assert!(serde_json::from_str::<Saved>("{").is_err());
    }
}
