//! What a reload changes: the ports added and removed, and the apps changed, for applying it as
//! a diff and for the log line that says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::config::model::{App, Config};

/// What a reload changes, for applying it as a diff and for the log line that says so.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub ports_added: Vec<u16>,
    pub ports_removed: Vec<u16>,
    pub apps_added: Vec<String>,
    pub apps_removed: Vec<String>,
    /// Apps present in both that differ in any setting (ports, addresses, hostnames, targets,
    /// health check, balancing, limits, PROXY protocol): the whole app is compared.
    pub apps_changed: Vec<String>,
}

impl Diff {
    pub fn between(old: &Config, new: &Config) -> Diff {
        let old_ports: BTreeSet<u16> = old.ports().collect();
        let new_ports: BTreeSet<u16> = new.ports().collect();
        let old_apps: BTreeMap<&str, &Arc<App>> =
            old.apps.iter().map(|a| (a.name.as_str(), a)).collect();
        let new_apps: BTreeMap<&str, &Arc<App>> =
            new.apps.iter().map(|a| (a.name.as_str(), a)).collect();
        Diff {
            ports_added: new_ports.difference(&old_ports).copied().collect(),
            ports_removed: old_ports.difference(&new_ports).copied().collect(),
            apps_added: new_apps
                .keys()
                .filter(|n| !old_apps.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            apps_removed: old_apps
                .keys()
                .filter(|n| !new_apps.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            apps_changed: new_apps
                .iter()
                .filter(|(n, a)| {
                    // The same Arc is the same app (shared, unchanged): no deep compare.
                    old_apps
                        .get(*n)
                        .is_some_and(|old| !Arc::ptr_eq(old, a) && old != *a)
                })
                .map(|(n, _)| n.to_string())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(items: &[T]) -> String {
            let shown: Vec<String> = items.iter().take(20).map(|i| i.to_string()).collect();
            let more = items.len().saturating_sub(20);
            if more > 0 {
                format!("{} (+{more} more)", shown.join(","))
            } else {
                shown.join(",")
            }
        }
        write!(
            f,
            "ports_added={} ports_removed={} apps_added={} apps_removed={} apps_changed={}",
            self.ports_added.len(),
            self.ports_removed.len(),
            self.apps_added.len(),
            self.apps_removed.len(),
            self.apps_changed.len()
        )?;
        for (label, items) in [
            ("added", list(&self.ports_added)),
            ("removed", list(&self.ports_removed)),
        ] {
            if !items.is_empty() {
                write!(f, " {label}=[{items}]")?;
            }
        }
        for (label, items) in [
            ("new", list(&self.apps_added)),
            ("gone", list(&self.apps_removed)),
            ("changed", list(&self.apps_changed)),
        ] {
            if !items.is_empty() {
                write!(f, " {label}=[{items}]")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn diff() {
        let a = parse(r#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1"]}]}"#).unwrap();
        let b = parse(r#"{"Apps":[{"Name":"a","Ports":[2,3],"Targets":["h:1"]},{"Name":"b","Ports":[4],"Targets":["h:2"]}]}"#).unwrap();
        let d = Diff::between(&a, &b);
        assert_eq!(d.ports_added, vec![3, 4]);
        assert_eq!(d.ports_removed, vec![1]);
        assert_eq!(d.apps_added, vec!["b"]);
        assert_eq!(d.apps_changed, vec!["a"]);
        assert!(Diff::between(&a, &a).is_empty());
    }
}
