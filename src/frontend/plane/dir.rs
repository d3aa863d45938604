//! The plane's reload of a config directory: the directory says what changed (`Refresh`), and
//! the table in force is changed by that alone; nothing here passes over every app.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{Outcome, Plane, Source};
use crate::backends::routing::Routes;
use crate::config::Diff;
use crate::frontend::directory::Directory;

/// The apps and ports of directory changes the loop refused (a port that could not be bound):
/// the directory took them in, the table in force does not have them. The next reload
/// applies them with its own, each compared between the table in force and the directory.
pub(super) struct Owed {
    apps: BTreeSet<String>,
    ports: BTreeSet<u16>,
}

impl Owed {
    pub(super) fn of(diff: &Diff) -> Owed {
        let mut owed = Owed {
            apps: BTreeSet::new(),
            ports: BTreeSet::new(),
        };
        owed.add(diff);
        owed
    }

    fn add(&mut self, diff: &Diff) {
        let apps = [&diff.apps_added, &diff.apps_removed, &diff.apps_changed];
        self.apps.extend(apps.into_iter().flatten().cloned());
        self.ports
            .extend(diff.ports_added.iter().chain(&diff.ports_removed));
    }

    /// The diff from the table in force (`routes`) to what `dir` serves now, over what is
    /// owed and what `found` (the latest refresh's diff) names. An app in both is taken as
    /// changed (its route is rebuilt, keeping its state).
    fn rebase(mut self, found: &Diff, routes: &Routes, dir: &Directory) -> Diff {
        self.add(found);
        let mut diff = Diff::default();
        let mut ports = self.ports;
        for name in self.apps {
            let before = routes.route(&name).is_some();
            ports.extend(routes.pairs_of(&name).into_iter().map(|(port, _)| port));
            let now = dir.serving(&name);
            if let Some(app) = now {
                ports.extend(&app.ports);
            }
            match (before, now.is_some()) {
                (false, true) => diff.apps_added.push(name),
                (true, false) => diff.apps_removed.push(name),
                (true, true) => diff.apps_changed.push(name),
                (false, false) => {}
            }
        }
        for port in ports {
            match (routes.port(port).is_some(), dir.port_served(port)) {
                (false, true) => diff.ports_added.push(port),
                (true, false) => diff.ports_removed.push(port),
                _ => {}
            }
        }
        diff
    }
}

impl Plane {
    /// Look for changed files in the config directory, take in those that pass, report
    /// those that do not, and have the loop apply the result.
    pub(super) fn reload_dir(&mut self, forced: bool) -> Option<Outcome> {
        let began = Instant::now();
        let Source::Dir(dir) = &mut self.at.source else {
            return None;
        };
        let found = dir.refresh(forced);
        // Published before it is logged: whoever reads the log line finds it in /status.
        // What is published is the files refused now, not every file.
        if !found.rejected.is_empty() || found.changed {
            self.at
                .published
                .files_rejected(found.rejected.len(), dir.rejected());
        }
        let mut problems = Vec::new();
        for r in &found.rejected {
            for p in &r.problems {
                crate::error!("reload rejected: config file {}: {p}", r.file);
                problems.push(format!("{}: {p}", r.file));
            }
        }
        // A change the loop refused (a port that could not be bound) is tried again at the
        // next change or SIGHUP, not at every tick.
        let retry = self.owed.is_some() && forced;
        if !(found.changed || retry) {
            if !found.rejected.is_empty() {
                return Some(Outcome::Rejected { problems });
            }
            if forced {
                let sha = dir.sha256();
                crate::info!("reload: config unchanged sha256={sha}");
                return Some(Outcome::Unchanged { sha256: sha });
            }
            return Some(Outcome::Unchanged {
                sha256: self.at.published.config_hashes().running,
            });
        }
        let sha = dir.sha256();
        // The directory says what changed, from the files that did: no compare of every app.
        // After a change the loop refused, the table in force is older than the directory's
        // last refresh: what was owed is compared again.
        let diff = match self.owed.take() {
            Some(owed) => owed.rebase(&found.diff, &self.at.routes, dir),
            None => found.diff,
        };
        if diff.is_empty() {
            return Some(self.unchanged(sha, forced));
        }
        let fresh = dir.fresh(&diff);
        let order = |each: &mut dyn FnMut(&str)| dir.each_name(each);
        let routes = self.at.routes.update_with(&diff, &fresh, &order, false);
        drop(fresh);
        // Applied with some files refused is Applied: the refused files are logged and listed
        // in /status.
        let outcome = self.commit(routes, &diff, sha, began)?;
        if let Outcome::Rejected { .. } = outcome {
            self.owed = Some(Owed::of(&diff));
        }
        Some(outcome)
    }
}
