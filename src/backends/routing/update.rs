//! `Routes::update`: the next table from this one and a diff, rebuilding only what the
//! apps added, removed or changed touch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::{binding, AppRoute, PortTable, Routes};
use crate::config::prefix::Prefix;
use crate::config::{Config, Diff};

impl Routes {
    /// The table for `config`, which differs from this table's config by `diff`: the routes
    /// of unchanged apps are kept whole (shared, not rebuilt), and only the ports of apps
    /// added, removed or changed get new tables, in which only the bindings of those apps
    /// are rebuilt.
    pub fn update(&self, config: &Config, diff: &Diff) -> Routes {
        let new_names: HashSet<&str> = diff
            .apps_added
            .iter()
            .chain(&diff.apps_changed)
            .map(String::as_str)
            .collect();
        let gone: HashSet<&str> = diff
            .apps_removed
            .iter()
            .chain(&diff.apps_changed)
            .map(String::as_str)
            .collect();
        let mut apps = Vec::with_capacity(config.apps.len());
        // The new routes of added and changed apps, with their ports.
        let mut fresh: Vec<(Arc<AppRoute>, &[u16])> = Vec::with_capacity(new_names.len());
        for app in &config.apps {
            let old = self.by_name.get(app.name.as_str()).map(|&i| &self.apps[i]);
            let route = match old {
                Some((route, _)) if !new_names.contains(app.name.as_str()) => Arc::clone(route),
                _ => {
                    let r = Arc::new(AppRoute::new(app, old.map(|o| &*o.0), &self.own));
                    fresh.push((Arc::clone(&r), &app.ports));
                    r
                }
            };
            apps.push((route, app.ports.clone()));
        }
        // Port -> the prefixes touched there, each with the new routes that answer on it.
        // Grouped by prefix here, once per route, so that rebuilding a binding looks only at
        // its own routes: scanning every fresh route per touched prefix made a rewrite of
        // every app quadratic (20,000 apps with an address each never finished).
        let mut touched: BTreeMap<u16, Touched> = BTreeMap::new();
        // The (port, prefix) pairs that leave and join the frontends.
        let (mut out, mut into) = (Vec::new(), Vec::new());
        for name in &gone {
            if let Some(&i) = self.by_name.get(*name) {
                let (route, ports) = &self.apps[i];
                let prefixes = route.prefixes();
                for port in ports {
                    let t = touched.entry(*port).or_default();
                    for prefix in &prefixes {
                        t.on.entry(*prefix).or_default();
                        out.push((*port, *prefix));
                    }
                }
            }
        }
        for (route, ports) in &fresh {
            let prefixes = route.prefixes();
            for port in ports.iter() {
                let t = touched.entry(*port).or_default();
                t.names.push(route.name.as_str());
                for prefix in &prefixes {
                    into.push((*port, *prefix));
                    let on = t.on.entry(*prefix).or_default();
                    // An address listed twice is one binding of the app, as in `port_table`.
                    if !on.last().is_some_and(|r| Arc::ptr_eq(r, route)) {
                        on.push(Arc::clone(route));
                    }
                }
            }
        }
        let mut by_port = self.by_port.clone();
        // Ports that shared a table and change alike share the new one.
        let mut made: HashMap<(usize, Vec<&str>), Option<Arc<PortTable>>> = HashMap::new();
        for (port, mut t) in touched {
            let old = self.by_port.get(&port);
            t.names.sort_unstable();
            let key = (old.map_or(0, |t| Arc::as_ptr(t) as usize), t.names);
            let table = made
                .entry(key)
                .or_insert_with(|| updated_table(old.map(|t| &**t), &t.on, &gone))
                .clone();
            match table {
                Some(t) => by_port.insert(port, t),
                None => by_port.remove(&port),
            };
        }
        // The loop check's index of frontends, changed by the pairs of the apps changed alone.
        let frontends = Arc::new(self.frontends.changed(&out, &into));
        Routes::of(by_port, apps, Arc::clone(&self.own), frontends)
    }
}

/// What an update changes on one port: each prefix touched, with the new routes answering
/// there (none: only apps gone or changed away), and the names of those new routes.
#[derive(Default)]
struct Touched<'a> {
    on: BTreeMap<Prefix, Vec<Arc<AppRoute>>>,
    names: Vec<&'a str>,
}

/// `old` (a port's table; None: a port new to the config) with the bindings of the prefixes
/// in `touched` rebuilt: without the apps in `gone`, with the new routes `touched` gives for
/// each. None: no app is left on the port.
fn updated_table(
    old: Option<&PortTable>,
    touched: &BTreeMap<Prefix, Vec<Arc<AppRoute>>>,
    gone: &HashSet<&str>,
) -> Option<Arc<PortTable>> {
    let mut bindings = old.map(|t| t.bindings.clone()).unwrap_or_default();
    for (prefix, fresh) in touched {
        let before = bindings.remove(prefix);
        let mut on: Vec<&Arc<AppRoute>> = before
            .as_ref()
            .map(|b| b.routes())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !gone.contains(r.name.as_str()))
            .collect();
        on.extend(fresh);
        if !on.is_empty() {
            let b = binding(&on, before.as_deref());
            bindings.insert(*prefix, Arc::new(b));
        }
    }
    (!bindings.is_empty()).then(|| Arc::new(PortTable::new(bindings)))
}
