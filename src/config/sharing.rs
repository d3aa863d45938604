//! Where apps may share an (address prefix, port): only where Hostnames tell them apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::config::hostname::Pattern;
use crate::config::limits::MAX_BINDINGS;
use crate::config::model::{app_prefixes, App};
use crate::config::ports::port_ranges;
use crate::config::prefix::Prefix;
use crate::config::problem::{Problem, Problems};

/// Apps may share an (address prefix, port) only if Hostnames tell them apart: at most one app
/// there without Hostnames, and no hostname on two of them. One problem per pair of apps and
/// conflict, naming every port and address it concerns (a range of 10,000 shared ports is one
/// line, not 10,000).
pub(super) fn check_sharing(apps: &[App], unusable: &[bool], problems: &mut Problems) {
    // Counted before anything is built: the count is cheap, the map below is not.
    let pairs: usize = apps
        .iter()
        .map(|app| app.ports.len() * app_prefixes(app).len())
        .sum();
    if pairs > MAX_BINDINGS {
        return problems.push(Problem::TooManyBindings { pairs });
    }
    // One app shares with nobody: a config directory's file typically holds one, and the map
    // below was a fifth of the allocations of reading one.
    if apps.len() < 2 {
        return;
    }
    // (port, prefix) -> apps there, by index, in config order.
    let mut at: HashMap<(u16, Prefix), Vec<usize>> = HashMap::new();
    for (i, app) in apps.iter().enumerate() {
        if unusable[i] {
            continue;
        }
        for &prefix in app_prefixes(app) {
            for &port in &app.ports {
                at.entry((port, prefix)).or_default().push(i);
            }
        }
    }
    // (later app, first app, hostname or None for "both defaults") -> prefixes and ports.
    type Clash = (usize, usize, Option<Pattern>);
    let mut clashes: BTreeMap<Clash, (BTreeSet<Prefix>, BTreeSet<u16>)> = BTreeMap::new();
    for ((port, prefix), list) in &at {
        if list.len() < 2 {
            continue;
        }
        let mut default: Option<usize> = None;
        let mut names: HashMap<&Pattern, usize> = HashMap::new();
        for &i in list {
            let app = &apps[i];
            let mut clash = |key: Clash| {
                let e = clashes.entry(key).or_default();
                e.0.insert(*prefix);
                e.1.insert(*port);
            };
            if app.hostnames.is_empty() {
                match default {
                    Some(first) => clash((i, first, None)),
                    None => default = Some(i),
                }
            }
            for h in &app.hostnames {
                match names.get(h) {
                    Some(&first) if first != i => clash((i, first, Some(h.clone()))),
                    Some(_) => {}
                    None => {
                        names.insert(h, i);
                    }
                }
            }
        }
    }
    for ((i, first, name), (prefixes, ports)) in clashes {
        let addresses = if prefixes.len() == 2
            && prefixes.contains(&Prefix::ALL_V4)
            && prefixes.contains(&Prefix::ALL_V6)
        {
            "every address".to_owned()
        } else {
            prefixes
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ports = port_ranges(ports);
        let (app, first) = (apps[i].name.clone(), apps[first].name.clone());
        problems.push(match name {
            None => Problem::SharedDefault {
                app,
                first,
                ports,
                addresses,
            },
            Some(h) => Problem::SharedHostname {
                app,
                first,
                hostname: h.to_string(),
                ports,
                addresses,
            },
        });
    }
}
