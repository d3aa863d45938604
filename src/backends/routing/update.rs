//! `Routes::update`: the next table from this one and a diff, rebuilding only what the
//! apps added, removed or changed touch.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::binding::{binding, is_sole};
use super::{AppRoute, Binding, Named, Placed, PortTable, Routes, ORDER_GAP};
use crate::backends::shards::Shards;
use crate::config::prefix::Prefix;
use crate::config::{App, Config, Diff};
// App names and ports from the config: see the hasher's module doc.
use crate::sys::hash::{FastMap, FastSet};

/// An app a reload adds or changes, with its neighbours in config order: the apps serving just
/// before and just after it (None: it is the first, or the last). The new table places it
/// between them without renumbering the others.
pub struct Fresh<'a> {
    pub app: &'a Arc<App>,
    pub after: Option<&'a str>,
    pub before: Option<&'a str>,
}

/// Visits every app's name in config order (see `Routes::update_with`).
pub type EachName<'a> = dyn Fn(&mut dyn FnMut(&str)) + 'a;

impl Routes {
    /// The table for `config` (a whole file), which differs from this table's config by
    /// `diff`; the apps are listed in `config`'s order.
    pub fn update(&self, config: &Config, diff: &Diff) -> Routes {
        let named: FastSet<&str> = diff
            .apps_added
            .iter()
            .chain(&diff.apps_changed)
            .map(String::as_str)
            .collect();
        let fresh: Vec<Fresh> = config
            .apps
            .iter()
            .filter(|a| named.contains(a.name.as_str()))
            .map(|app| Fresh {
                app,
                after: None,
                before: None,
            })
            .collect();
        let order = |each: &mut dyn FnMut(&str)| config.apps.iter().for_each(|a| each(&a.name));
        self.update_with(diff, &fresh, &order, true)
    }

    /// The table that differs from this one by `diff`: the routes of unchanged apps are kept
    /// whole (shared, not rebuilt), and only the ports of apps added, removed or changed get
    /// new tables, in which only the bindings of those apps are rebuilt. `fresh` are the apps
    /// added and changed, in config order, each placed between its neighbours; `order` visits
    /// every app's name in config order, and is called only when `reorder` asks (a whole file
    /// read anyway) or when the neighbours leave no room (many apps added side by side).
    pub fn update_with(
        &self,
        diff: &Diff,
        fresh: &[Fresh],
        order: &EachName,
        reorder: bool,
    ) -> Routes {
        let gone: FastSet<&str> = diff
            .apps_removed
            .iter()
            .chain(&diff.apps_changed)
            .map(String::as_str)
            .collect();
        let mut by_name = self.by_name.clone();
        for name in &diff.apps_removed {
            by_name.remove(name.as_str());
        }
        let pending: FastSet<&str> = fresh.iter().map(|f| f.app.name.as_str()).collect();
        let mut placed_all = !reorder;
        let mut done: FastSet<&str> =
            FastSet::with_capacity_and_hasher(fresh.len(), Default::default());
        // The new routes of added and changed apps, with their ports.
        let mut new_routes: Vec<(Arc<AppRoute>, &[u16])> = Vec::with_capacity(fresh.len());
        for f in fresh {
            let name = f.app.name.as_str();
            let old = self.by_name.get_key_value(name);
            let route = Arc::new(AppRoute::new(f.app, old.map(|(n, _)| &*n.0), &self.own));
            let place = Place {
                by_name: &by_name,
                pending: &pending,
                done: &done,
            };
            let at = placed_all
                .then(|| place.between(f, old.map(|(_, p)| p.order)))
                .flatten();
            placed_all &= at.is_some();
            let placed = Placed {
                ports: f.app.ports[..].into(),
                order: at.unwrap_or(0),
            };
            by_name.insert(Named(Arc::clone(&route)), placed);
            done.insert(name);
            new_routes.push((route, &f.app.ports));
        }
        if !placed_all {
            let mut i = 0;
            order(&mut |name| {
                i += 1;
                let at = i * ORDER_GAP;
                if by_name.get(name).is_some_and(|p| p.order != at) {
                    if let Some(p) = by_name.get_mut(name) {
                        p.order = at;
                    }
                }
            });
        }
        // Port -> the prefixes touched there, each with the new routes that answer on it.
        // Grouped by prefix here, once per route, so that rebuilding a binding looks only at
        // its own routes: scanning every fresh route per touched prefix made a rewrite of
        // every app quadratic (20,000 apps with an address each never finished).
        let mut touched: BTreeMap<u16, Touched> = BTreeMap::new();
        for name in &gone {
            if let Some((Named(route), placed)) = self.by_name.get_key_value(*name) {
                let prefixes = route.prefixes();
                for port in placed.ports.iter() {
                    let t = touched.entry(*port).or_default();
                    for prefix in prefixes {
                        t.on.entry(*prefix).or_default();
                    }
                }
            }
        }
        for (route, ports) in &new_routes {
            let prefixes = route.prefixes();
            for port in ports.iter() {
                let t = touched.entry(*port).or_default();
                t.names.push(route.name());
                for prefix in prefixes {
                    let on = t.on.entry(*prefix).or_default();
                    // An address listed twice is one binding of the app, as in `port_table`.
                    if !on.last().is_some_and(|r| Arc::ptr_eq(r, route)) {
                        on.push(Arc::clone(route));
                    }
                }
            }
        }
        let mut by_port = (*self.by_port).clone();
        // Ports that shared a table and change alike share the new one.
        let mut made: FastMap<(usize, Vec<&str>), Option<Arc<PortTable>>> = FastMap::default();
        let mut sole = Sole::default();
        for (port, mut t) in touched {
            let old = self.by_port.get(&port);
            t.names.sort_unstable();
            let key = (old.map_or(0, |t| Arc::as_ptr(t) as usize), t.names);
            let table = made
                .entry(key)
                .or_insert_with(|| updated_table(old.map(|t| &**t), &t.on, &gone, &mut sole))
                .clone();
            match table {
                Some(t) => by_port.insert(port, t),
                None => by_port.remove(&port),
            };
        }
        Routes::of(by_port, by_name, Arc::clone(&self.own))
    }
}

/// What an update changes on one port: each prefix touched, with the new routes answering
/// there (none: only apps gone or changed away), and the names of those new routes.
#[derive(Default)]
struct Touched<'a> {
    on: BTreeMap<Prefix, Vec<Arc<AppRoute>>>,
    names: Vec<&'a str>,
}

/// The bindings of apps alone where they answer (see `is_sole`) made by an update, by route:
/// each shared by the app's pairs the update rebuilds.
type Sole = FastMap<*const AppRoute, Arc<Binding>>;

/// `old` (a port's table; None: a port new to the config) with the bindings of the prefixes
/// in `touched` rebuilt: without the apps in `gone`, with the new routes `touched` gives for
/// each. None: no app is left on the port.
fn updated_table(
    old: Option<&PortTable>,
    touched: &BTreeMap<Prefix, Vec<Arc<AppRoute>>>,
    gone: &FastSet<&str>,
    sole: &mut Sole,
) -> Option<Arc<PortTable>> {
    // Shares the old table's shards but those of the prefixes touched.
    let mut table = old.cloned().unwrap_or_default();
    for (prefix, fresh) in touched {
        let before = table.remove(prefix);
        let mut on: Vec<&Arc<AppRoute>> = before
            .as_ref()
            .map(|b| b.routes())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !gone.contains(r.name()))
            .collect();
        on.extend(fresh);
        if is_sole(&on) {
            let b = sole
                .entry(Arc::as_ptr(on[0]))
                .or_insert_with(|| Arc::new(binding(&on, None)));
            table.insert(*prefix, Arc::clone(b));
        } else if !on.is_empty() {
            let b = binding(&on, before.as_deref());
            table.insert(*prefix, Arc::new(b));
        }
    }
    (!table.is_empty()).then(|| Arc::new(table))
}

/// Where a fresh app goes in config order, as the table under construction has its
/// neighbours.
struct Place<'a, 'b> {
    by_name: &'a Shards<Named, Placed>,
    /// The fresh apps, and those of them placed so far (in config order).
    pending: &'a FastSet<&'b str>,
    done: &'a FastSet<&'b str>,
}

/// Where the place of a fresh app's next neighbour stands.
enum Upper {
    /// It is the last app.
    None,
    /// Placed: below this.
    Below(u64),
    /// Fresh too and not placed yet: it checks its own place against this one's.
    Later,
}

impl Place<'_, '_> {
    /// The place of `f` (which had `current`, if it was in the table): kept if it is still
    /// between its neighbours', else between them. None: no room, or a neighbour that is not
    /// where config order says (then every app is placed again).
    fn between(&self, f: &Fresh, current: Option<u64>) -> Option<u64> {
        let unplaced = |n: &str| self.pending.contains(n) && !self.done.contains(n);
        let lo = match f.after {
            None => 0,
            Some(n) if unplaced(n) => return None,
            Some(n) => self.by_name.get(n)?.order,
        };
        let hi = match f.before {
            None => Upper::None,
            Some(n) if unplaced(n) => Upper::Later,
            Some(n) => Upper::Below(self.by_name.get(n)?.order),
        };
        match (hi, current) {
            (Upper::Below(hi), Some(c)) if lo < c && c < hi => Some(c),
            (Upper::Below(hi), _) => (hi > lo + 1).then(|| lo + (hi - lo) / 2),
            (Upper::None | Upper::Later, Some(c)) if lo < c => Some(c),
            (Upper::None | Upper::Later, _) => lo.checked_add(ORDER_GAP),
        }
    }
}
