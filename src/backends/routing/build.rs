//! `Routes::new`: a table built whole from a config (at start, and for a whole file read
//! again), on a thread per core for a large one.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use super::binding::{binding, is_sole};
use super::{AppRoute, Binding, Named, OwnFrontends, Placed, PortTable, Routes, ORDER_GAP};
use crate::backends::shards::Shards;
use crate::config::prefix::Prefix;
use crate::config::{App, Config};
// Keyed by ports and by lists of apps, from the config: see the hasher's module doc.
use crate::sys::hash::FastMap;

impl Routes {
    /// Build the table for `config`, keeping the state of `previous` for what remains. A large
    /// config is built on a thread per core (see `PARALLEL_FROM`): the routes of the apps in
    /// slices, then each port's table and the index of names.
    pub fn new(config: &Config, previous: Option<&Routes>) -> Routes {
        let own = previous.map_or_else(Arc::default, |p| Arc::clone(&p.own));
        let threads = if config.apps.len() >= PARALLEL_FROM {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            1
        };
        let (by_port, by_name) = {
            let apps = routes_of(&config.apps, previous, &own, threads);
            // Port -> the apps on it, by index in config order.
            let mut on_port: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
            for (i, app) in config.apps.iter().enumerate() {
                for &port in &app.ports {
                    on_port.entry(port).or_default().push(i);
                }
            }
            // Ports served by the same apps share one table, built once (kept: the table
            // before of the first such port).
            let mut lists: FastMap<Vec<usize>, usize> = FastMap::default();
            let mut jobs: Vec<(Vec<usize>, Option<&PortTable>)> = Vec::new();
            let ports: Vec<(u16, usize)> = on_port
                .into_iter()
                .map(|(port, on)| {
                    let next = lists.len();
                    let job = *lists.entry(on).or_insert_with_key(|on| {
                        let kept = previous.and_then(|p| p.by_port.get(&port));
                        jobs.push((on.clone(), kept.map(|t| &**t)));
                        next
                    });
                    (port, job)
                })
                .collect();
            // The index of names needs only the routes: made beside the port tables.
            let (tables, by_name) = if threads > 1 {
                std::thread::scope(|s| {
                    let tables = s.spawn(|| port_tables(&apps, jobs, threads));
                    let by_name = names_of(&apps, &config.apps);
                    (joined(tables), by_name)
                })
            } else {
                (
                    port_tables(&apps, jobs, threads),
                    names_of(&apps, &config.apps),
                )
            };
            let by_port = ports
                .into_iter()
                .map(|(port, job)| (port, Arc::clone(&tables[job])))
                .collect();
            (by_port, by_name)
        };
        let routes = Routes::of(by_port, by_name, own);
        if previous.is_none() {
            routes.in_force();
        }
        routes
    }
}

/// Every app's route by name, with its ports and its place in config order (`routes` and
/// `apps` side by side).
fn names_of(routes: &[Arc<AppRoute>], apps: &[Arc<App>]) -> Shards<Named, Placed> {
    // Apps with the same ports share one list (an edge has a handful of lists for 200,000
    // apps: a copy each was 32 bytes an app).
    let mut lists: FastMap<&[u16], Arc<[u16]>> = FastMap::default();
    routes
        .iter()
        .zip(apps)
        .enumerate()
        .map(|(i, (route, app))| {
            let ports = lists
                .entry(&app.ports[..])
                .or_insert_with_key(|&p| p.into());
            let placed = Placed {
                ports: Arc::clone(ports),
                order: (i as u64 + 1) * ORDER_GAP,
            };
            (Named(Arc::clone(route)), placed)
        })
        .collect()
}

/// The table of a port served by the apps `on` (indices into `routes`); `kept`, the port's
/// table before, whose counts taken at accept are kept where a binding has the same apps.
/// A binding of one app alone is that app's `sole` binding, the same on all its ports.
fn port_table(
    routes: &[Arc<AppRoute>],
    on: &[usize],
    kept: Option<&PortTable>,
    sole: &[OnceLock<Arc<Binding>>],
) -> PortTable {
    // Every (prefix, app) pair sorted, so that each prefix's apps are side by side in config
    // order: a sort of 400,000 pairs costs a fraction of as many inserts into a tree of
    // prefixes (at 200,000 apps with addresses of their own).
    let mut pairs: Vec<(Prefix, usize)> = on
        .iter()
        .flat_map(|&i| routes[i].prefixes().iter().map(move |&p| (p, i)))
        .collect();
    pairs.sort_unstable();
    let mut bindings = Vec::new();
    let mut here: Vec<&Arc<AppRoute>> = Vec::new();
    for (k, &(prefix, i)) in pairs.iter().enumerate() {
        here.push(&routes[i]);
        if pairs.get(k + 1).is_some_and(|&(next, _)| next == prefix) {
            continue;
        }
        let b = if is_sole(&here) {
            Arc::clone(sole[i].get_or_init(|| Arc::new(binding(&here, None))))
        } else {
            let old = kept.and_then(|k| k.binding(&prefix));
            Arc::new(binding(&here, old.map(|b| &**b)))
        };
        bindings.push((prefix, b));
        here.clear();
    }
    PortTable::of(bindings)
}

/// From this many apps `Routes::new` builds on more than one thread: below it, starting
/// threads costs about what they save (a table of 10,000 apps takes some 30 ms).
const PARALLEL_FROM: usize = 10_000;

/// The routes of `apps` (keeping the state of their routes in `previous`), in order: in
/// `threads` slices side by side.
fn routes_of(
    apps: &[Arc<App>],
    previous: Option<&Routes>,
    own: &Arc<OwnFrontends>,
    threads: usize,
) -> Vec<Arc<AppRoute>> {
    let make = move |apps: &[Arc<App>]| -> Vec<Arc<AppRoute>> {
        apps.iter()
            .map(|app| {
                let old = previous.and_then(|p| p.route(&app.name));
                Arc::new(AppRoute::new(app, old, own))
            })
            .collect()
    };
    let slice = apps.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let mut slices = apps.chunks(slice);
        let first = slices.next().unwrap_or_default();
        let others: Vec<_> = slices.map(|part| s.spawn(move || make(part))).collect();
        let mut all = make(first);
        all.reserve(apps.len() - all.len());
        for t in others {
            all.extend(joined(t));
        }
        all
    })
}

/// The table of each of `jobs` (the apps of some ports, by index into `routes`, with the
/// table there before), in order: the largest first, each given to the least loaded of
/// `threads`.
fn port_tables(
    routes: &[Arc<AppRoute>],
    jobs: Vec<(Vec<usize>, Option<&PortTable>)>,
    threads: usize,
) -> Vec<Arc<PortTable>> {
    // Each app's binding where it is alone (see `is_sole`), made by the first table needing it.
    let sole: Vec<OnceLock<Arc<Binding>>> = routes.iter().map(|_| OnceLock::new()).collect();
    let sole = &sole;
    let build =
        move |on: &[usize], kept: Option<&PortTable>| Arc::new(port_table(routes, on, kept, sole));
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_unstable_by_key(|&j| std::cmp::Reverse(jobs[j].0.len()));
    // A thread per job up to twice the cores: three ports' tables of the same size on two
    // cores finish together after one and a half tables' time, where two threads took two.
    let threads = if threads > 1 {
        jobs.len().clamp(threads, 2 * threads)
    } else {
        1
    };
    let mut shares: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); threads];
    for j in order {
        // `shares` is never empty (at least one thread).
        if let Some(least) = shares.iter_mut().min_by_key(|(load, _)| *load) {
            least.0 += jobs[j].0.len();
            least.1.push(j);
        }
    }
    let jobs = &jobs;
    let run = move |mine: Vec<usize>| -> Vec<(usize, Arc<PortTable>)> {
        mine.into_iter()
            .map(|j| (j, build(&jobs[j].0, jobs[j].1)))
            .collect()
    };
    let mut shares = shares.into_iter().map(|(_, mine)| mine);
    let first = shares.next().unwrap_or_default();
    let mut made = std::thread::scope(|s| {
        let others: Vec<_> = shares
            .filter(|mine| !mine.is_empty())
            .map(|mine| s.spawn(move || run(mine)))
            .collect();
        let mut made = run(first);
        for t in others {
            made.extend(joined(t));
        }
        made
    });
    made.sort_unstable_by_key(|&(j, _)| j);
    made.into_iter().map(|(_, t)| t).collect()
}

/// What a building thread returned; its panic, passed on (a bug in building the table, which
/// on one thread would have panicked here too).
fn joined<T>(t: std::thread::ScopedJoinHandle<'_, T>) -> T {
    t.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
