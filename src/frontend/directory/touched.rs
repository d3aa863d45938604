//! What a directory refresh changed, noted as it goes (see `Touched`).

use std::sync::Arc;

// App names and ports from the files: see the hasher's module doc.
use crate::sys::hash::FastMap;

use super::Directory;
use crate::config::{App, Diff};

/// What a refresh touched, noted as files are taken in and out: each app name with what
/// served under it before the refresh, and each port with whether it was served before. The
/// refresh's diff compares these with what serves at its end, so a change costs the apps of
/// the files that changed, never a pass over every app.
#[derive(Default)]
pub(super) struct Touched {
    apps: FastMap<String, Option<Arc<App>>>,
    ports: FastMap<u16, bool>,
    /// Noting nothing: the first load, whose diff nobody reads (at 200,000 apps the notes
    /// were a copy of every name, on the one thread taking the files in).
    pub(super) off: bool,
}

impl Directory {
    /// The diff of what the refresh touched (see `Touched`), which it clears.
    pub(super) fn diff_touched(&mut self) -> Diff {
        let touched = std::mem::take(&mut self.touched);
        let mut diff = Diff::default();
        for (name, before) in touched.apps {
            match (before, self.serving(&name)) {
                (None, Some(_)) => diff.apps_added.push(name),
                (Some(_), None) => diff.apps_removed.push(name),
                (Some(old), Some(new)) if !Arc::ptr_eq(&old, new) && old != *new => {
                    diff.apps_changed.push(name)
                }
                _ => {}
            }
        }
        for (port, before) in touched.ports {
            match (before, self.port_served(port)) {
                (false, true) => diff.ports_added.push(port),
                (true, false) => diff.ports_removed.push(port),
                _ => {}
            }
        }
        // Sorted, as `Diff::between` gives them (the log line lists them).
        diff.apps_added.sort_unstable();
        diff.apps_removed.sort_unstable();
        diff.apps_changed.sort_unstable();
        diff.ports_added.sort_unstable();
        diff.ports_removed.sort_unstable();
        diff
    }

    /// The app serving under `name`.
    pub fn serving(&self, name: &str) -> Option<&Arc<App>> {
        let file = self.owners.get(name)?;
        let (apps, _) = self.files.get(&**file)?.good.as_ref()?;
        apps.iter().find(|a| a.name == name)
    }

    /// Whether some app serves on `port`.
    pub fn port_served(&self, port: u16) -> bool {
        self.ports.get(&port).is_some_and(|&(slots, _)| slots > 0)
    }

    /// `app` is about to serve or stop serving: note what served under its name and on its
    /// ports before this refresh, if this refresh has not yet.
    pub(super) fn note(&mut self, app: &Arc<App>, serving: bool) {
        if self.touched.off {
            return;
        }
        if !self.touched.apps.contains_key(&app.name) {
            let before = serving.then(|| Arc::clone(app));
            self.touched.apps.insert(app.name.clone(), before);
        }
        for &port in &app.ports {
            if !self.touched.ports.contains_key(&port) {
                let served = self.port_served(port);
                self.touched.ports.insert(port, served);
            }
        }
    }
}
