//! Where the apps a refresh added or changed stand in config order (file name order, then the
//! order within a file), for the routing table to place them without a pass over every app.

use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use super::Directory;
use crate::backends::routing::Fresh;
use crate::config::{App, Diff};

impl Directory {
    /// The apps `diff` adds and changes, as they serve now, in config order, each with the
    /// apps serving just before and after it.
    pub fn fresh<'a>(&'a self, diff: &Diff) -> Vec<Fresh<'a>> {
        let mut at: Vec<(&'a str, usize, &'a Arc<App>)> = Vec::new();
        for name in diff.apps_added.iter().chain(&diff.apps_changed) {
            let Some(file) = self.owners.get(name.as_str()) else {
                continue;
            };
            let Some((key, f)) = self.files.get_key_value(&**file) else {
                continue;
            };
            let Some((apps, _)) = &f.good else {
                continue;
            };
            if let Some(i) = apps.iter().position(|a| a.name == *name) {
                at.push((&**key, i, &apps[i]));
            }
        }
        at.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        at.into_iter()
            .map(|(file, i, app)| Fresh {
                app,
                after: self.serving_before(file, i),
                before: self.serving_after(file, i),
            })
            .collect()
    }

    /// The app serving just before the `i`th of `file`'s apps in force.
    fn serving_before(&self, file: &str, i: usize) -> Option<&str> {
        if i > 0 {
            let (apps, _) = self.files.get(file)?.good.as_ref()?;
            return Some(&apps[i - 1].name);
        }
        // The files before that serve (those without a version in force are skipped: as
        // many as are refused, not every file).
        self.files
            .range::<str, _>((Unbounded, Excluded(file)))
            .rev()
            .find_map(|(_, f)| f.good.as_ref()?.0.last())
            .map(|a| a.name.as_str())
    }

    /// The app serving just after the `i`th of `file`'s apps in force.
    fn serving_after(&self, file: &str, i: usize) -> Option<&str> {
        let (apps, _) = self.files.get(file)?.good.as_ref()?;
        if let Some(next) = apps.get(i + 1) {
            return Some(&next.name);
        }
        self.files
            .range::<str, _>((Excluded(file), Unbounded))
            .find_map(|(_, f)| f.good.as_ref()?.0.first())
            .map(|a| a.name.as_str())
    }

    /// Call `each` with the name of every app in force, in config order.
    pub fn each_name(&self, each: &mut dyn FnMut(&str)) {
        for f in self.files.values() {
            if let Some((apps, _)) = &f.good {
                apps.iter().for_each(|a| each(&a.name));
            }
        }
    }
}
