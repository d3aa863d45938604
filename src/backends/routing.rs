//! Routing: which app a connection belongs to, and what that app routes to (its backends,
//! balancing, limit, PROXY protocol).
//!
//! Who gets a connection: on its port, the most specific address prefix covering the address
//! the client dialled (longest prefix wins); on that (prefix, port), a `Binding`, the app whose
//! Hostnames match the ClientHello's server name (exact before wildcard), else the app there
//! without Hostnames (the default). The listener loop looks the binding up at accept; the relay
//! thread reads the server name if the binding needs it and picks the app.
//!
//! A `Routes` is built whole from a validated `Config` at start (`build`); a reload makes the next one
//! from it and the reload's diff (`update`), sharing whatever the diff does not name, and the
//! new table replaces the old one whole. A connection keeps the binding (so the apps) it was accepted with, so a reload never changes
//! the target of a connection already open; the next connection sees the new table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use crate::backends::backend::Backend;
use crate::backends::clients::ClientCounts;
use crate::backends::histogram::Histogram;
use crate::backends::limit::AppLimit;
use crate::backends::shards::Shards;
use crate::config::hostname::{self, Pattern};
use crate::config::prefix::Prefix;
use crate::config::{App, Balance, ProxyProtocol};
// Keyed by ports and by lists of apps, from the config: see the hasher's module doc.
use crate::sys::hash::FastMap;

// Re-exported because the relay (rewritten in parallel) imports them from here; new code
// should import them from `limit`, and this line can go once nothing does.
pub use crate::backends::limit::{Acquired, LimitDenied, LimitGuard, LimitWait};
// Likewise: they lived here before.
pub use crate::backends::unrouted::{Unrouted, UnroutedCounts};
pub use own::OwnFrontends;
pub use update::Fresh;

#[derive(Debug)]
pub struct AppRoute {
    /// The app as configured (the config's own record, shared, not copied: its name,
    /// addresses and hostnames were a copy per route, about 100 bytes an app at the edge).
    pub app: Arc<App>,
    pub backends: Vec<Arc<Backend>>,
    pub limit: Option<Arc<AppLimit>>,
    /// Open connections per client address, with the app's `MaxConnectionsPerClient`.
    pub per_client: Option<Arc<ClientCounts>>,
    /// Round-robin position.
    pub next: AtomicUsize,
    /// This proxy's own frontends in the config in force: a target resolving to one of
    /// them is a loop.
    pub own: Arc<OwnFrontends>,
    pub stats: Arc<AppStats>,
}

/// Per-app counters, kept across reloads while the app stays.
#[derive(Debug, Default)]
pub struct AppStats {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now (connecting or relaying).
    pub active: AtomicUsize,
    /// Closed because the app's MaxConnections stayed reached.
    pub limited: AtomicU64,
    /// Closed because no target could be connected.
    pub failed: AtomicU64,
    /// Closed at accept because the client address had its limit of connections open.
    pub client_limited: AtomicU64,
    /// How long the connect to the target finally used took (its lookup included).
    pub connect_time: Histogram,
    /// Client connections' whole life, accept to close.
    pub duration: Histogram,
    /// Set by the admin socket's `disable app`: new connections are refused (reset) as soon
    /// as the app is known, open ones go on. Here, with the counters, because these are kept
    /// across reloads while the app stays.
    pub disabled: std::sync::atomic::AtomicBool,
    /// Connections refused because the app was disabled.
    pub refused_disabled: AtomicU64,
}

/// The apps on one (address prefix, port): told apart by the ClientHello's server name.
#[derive(Debug, Default)]
pub struct Binding {
    /// The apps here with Hostnames; None where none has any (an edge's binding is mostly
    /// one app on an address of its own: two empty maps there were 96 bytes, four times an
    /// app).
    names: Option<Box<Names>>,
    /// The app without Hostnames, if there is one.
    default: Option<Arc<AppRoute>>,
    /// The port group where more than one app is here (see `group`); None: the one app's
    /// name is the group (not a copy of it per binding, four times an app at the edge).
    shared_group: Option<Box<str>>,
    /// Where the server name picks the app and every app here has `MaxConnectionsPerClient`:
    /// open connections per client to any of them, limited to the largest of theirs, counted
    /// at accept (before the name is read, and before a slot is taken), so that one address
    /// cannot hold every slot with silent connections. The app's own limit is counted too,
    /// once the name picked it.
    pub per_client: Option<Arc<ClientCounts>>,
}

/// A binding's apps with Hostnames, by name. Looked up by the server name a client sends:
/// SipHash (`HashMap`'s own), not the config's fast hasher.
#[derive(Debug, Default)]
struct Names {
    /// Exact hostnames, lower-case.
    exact: HashMap<String, Arc<AppRoute>>,
    /// Wildcards by the suffix after `*.`.
    wildcard: HashMap<String, Arc<AppRoute>>,
}

impl Binding {
    /// Whether the server name must be read to pick the app.
    pub fn needs_server_name(&self) -> bool {
        self.names
            .as_ref()
            .is_some_and(|n| !n.exact.is_empty() || !n.wildcard.is_empty())
    }

    /// The names of every app here, sorted and joined with `+`: the port group (counter
    /// label) of this binding in bpf mode, where the kernel cannot tell them apart.
    pub fn group(&self) -> &str {
        match &self.shared_group {
            Some(g) => g,
            None => self
                .default
                .iter()
                .chain(self.named())
                .next()
                .map_or("", |r| r.name()),
        }
    }

    /// The apps with Hostnames, exact ones first (none if no app here has any).
    fn named(&self) -> impl Iterator<Item = &Arc<AppRoute>> {
        self.names
            .iter()
            .flat_map(|n| n.exact.values().chain(n.wildcard.values()))
    }

    /// The app without Hostnames (the only app of a binding that needs no server name).
    pub fn default_app(&self) -> Option<&Arc<AppRoute>> {
        self.default.as_ref()
    }

    /// The app for a (normalised) server name: exact, then wildcard, then the default.
    pub fn for_name(&self, name: &str) -> Result<&Arc<AppRoute>, Unrouted> {
        let named = self.names.as_ref().and_then(|n| {
            n.exact.get(name).or_else(|| {
                hostname::wildcard_suffix(name).and_then(|suffix| n.wildcard.get(suffix))
            })
        });
        named
            .or(self.default.as_ref())
            .ok_or(Unrouted::UnknownServerName)
    }

    /// The app when the start of the connection gave no usable name (`why`).
    pub fn without_name(&self, why: Unrouted) -> Result<&Arc<AppRoute>, Unrouted> {
        self.default.as_ref().ok_or(why)
    }
}

/// The bindings of one port, looked up by masking the dialled address to each prefix length in
/// use, longest first: a hash lookup per length (at most 33 + 129), so the cost of routing a
/// new connection does not grow with the apps on the port (a scan of every binding cost
/// 250 us per connection at 100,000 apps, each with an address of its own). The bindings are
/// `Shards`, so the next table of a port with an address per app copies only the shards of
/// the prefixes a reload touched.
#[derive(Debug, Default, Clone)]
pub struct PortTable {
    bindings: Shards<Prefix, Arc<Binding>>,
    /// The prefix lengths in `bindings`, per family, longest first, each with how many
    /// bindings have it (kept as bindings come and go, never recounted).
    v4_lens: Vec<(u8, u32)>,
    v6_lens: Vec<(u8, u32)>,
}

impl PortTable {
    /// Put `binding` at `prefix` (replacing what was there).
    fn insert(&mut self, prefix: Prefix, binding: Arc<Binding>) {
        if self.bindings.insert(prefix, binding).is_none() {
            self.count_len(&prefix, true);
        }
    }

    /// Take the binding at `prefix` out.
    fn remove(&mut self, prefix: &Prefix) -> Option<Arc<Binding>> {
        let b = self.bindings.remove(prefix)?;
        self.count_len(prefix, false);
        Some(b)
    }

    fn count_len(&mut self, prefix: &Prefix, add: bool) {
        let lens = if prefix.is_v4() {
            &mut self.v4_lens
        } else {
            &mut self.v6_lens
        };
        let len = prefix.prefix_len();
        match lens.iter().position(|&(l, _)| l == len) {
            Some(i) if add => lens[i].1 += 1,
            Some(i) => {
                lens[i].1 -= 1;
                if lens[i].1 == 0 {
                    lens.remove(i);
                }
            }
            None if add => {
                lens.push((len, 1));
                lens.sort_unstable_by_key(|&(len, _)| std::cmp::Reverse(len));
            }
            None => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// The table of `bindings` (each prefix once), made at its size at once.
    fn of(bindings: Vec<(Prefix, Arc<Binding>)>) -> PortTable {
        let (mut v4, mut v6) = ([0u32; 33], [0u32; 129]);
        for (prefix, _) in &bindings {
            let len = usize::from(prefix.prefix_len());
            if prefix.is_v4() {
                v4[len] += 1;
            } else {
                v6[len] += 1;
            }
        }
        // Longest first, as `count_len` keeps them.
        let lens = |counts: &[u32]| -> Vec<(u8, u32)> {
            (0..counts.len())
                .rev()
                .filter(|&l| counts[l] > 0)
                // At most 128: fits.
                .map(|l| (l as u8, counts[l]))
                .collect()
        };
        PortTable {
            v4_lens: lens(&v4),
            v6_lens: lens(&v6),
            bindings: bindings.into_iter().collect(),
        }
    }

    /// The binding of the longest prefix covering `ip` (an IPv4-mapped address as IPv4).
    pub fn lookup(&self, ip: std::net::IpAddr) -> Option<&Arc<Binding>> {
        let ip = crate::config::prefix::canonical(ip);
        let lens = if ip.is_ipv4() {
            &self.v4_lens
        } else {
            &self.v6_lens
        };
        lens.iter()
            .find_map(|&(len, _)| self.bindings.get(&Prefix::new(ip, len)))
    }

    /// Whether a binding here takes more than one address of the family (IPv4 if `v4`).
    pub fn wide(&self, v4: bool) -> bool {
        let (lens, host) = if v4 {
            (&self.v4_lens, 32)
        } else {
            (&self.v6_lens, 128)
        };
        lens.iter().any(|&(len, _)| len < host)
    }

    /// The single addresses here: each binding's of a /32 or /128.
    pub fn hosts(&self) -> impl Iterator<Item = std::net::IpAddr> + '_ {
        self.bindings
            .keys()
            .filter(|p| p.is_host())
            .map(|p| p.addr())
    }

    /// The binding of exactly `prefix`.
    pub fn binding(&self, prefix: &Prefix) -> Option<&Arc<Binding>> {
        self.bindings.get(prefix)
    }

    /// Every binding with its prefix, in no particular order.
    pub fn bindings(&self) -> impl Iterator<Item = (&Prefix, &Arc<Binding>)> {
        self.bindings.iter()
    }
}

#[derive(Debug)]
pub struct Routes {
    /// Ports served by the same apps share one table (a range of 10,000 ports is one table).
    /// Shared with `own` once the table is in force: they are also where the proxy accepts.
    by_port: Arc<Ports>,
    /// Every app by name, with its ports and its place in config order: where the next table
    /// finds an app's route (kept whole while the app is unchanged) and its state (backends,
    /// limits, counters: kept for what remains). `Shards`, so that the next table copies
    /// only the shards of the apps a reload names.
    by_name: Shards<Named, Placed>,
    /// The frontends every route checks its targets against, shared by all tables.
    own: Arc<OwnFrontends>,
}

/// Each port's table.
type Ports = FastMap<u16, Arc<PortTable>>;

/// An app's ports, and its place in config order: apps are listed by `order`, which leaves
/// room (`ORDER_GAP`) between neighbours for an app added between them.
#[derive(Debug, Clone)]
struct Placed {
    /// Shared: copying a shard of the index copies no list of ports.
    ports: Arc<[u16]>,
    order: u64,
}

/// The distance between the places of neighbours in a table built whole.
const ORDER_GAP: u64 = 1 << 20;

/// An app's route, hashed and compared by its name (so a map of them needs no copy of it).
#[derive(Debug, Clone)]
struct Named(Arc<AppRoute>);

impl std::hash::Hash for Named {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.app.name.as_str().hash(h)
    }
}

impl PartialEq for Named {
    fn eq(&self, other: &Named) -> bool {
        self.0.app.name == other.0.app.name
    }
}

impl Eq for Named {}

impl std::borrow::Borrow<str> for Named {
    fn borrow(&self) -> &str {
        &self.0.app.name
    }
}

impl AppRoute {
    /// The route of `app`, keeping the state of its previous route `old` (the same app in the
    /// table before): the backends of the targets it still has (their health and load), its
    /// limit and counts (connections open across the reload still count), its counters.
    fn new(app: &Arc<App>, old: Option<&AppRoute>, own: &Arc<OwnFrontends>) -> AppRoute {
        let mut backends: Vec<Arc<Backend>> = Vec::with_capacity(app.targets.len());
        for spec in &app.targets {
            let t = &spec.target;
            // A target listed twice in one app is one backend with two turns.
            let b = match backends.iter().find(|b| b.target == *t) {
                Some(b) => Arc::clone(b),
                None => match old.and_then(|o| o.backends.iter().find(|b| b.target == *t)) {
                    Some(b) => {
                        b.set_check(Arc::clone(&app.health));
                        Arc::clone(b)
                    }
                    None => {
                        // One name for the app's targets, not a copy each.
                        let name = backends
                            .first()
                            .map_or_else(|| Arc::from(app.name.as_str()), |b| Arc::clone(&b.app));
                        Arc::new(Backend::new(name, t.clone(), Arc::clone(&app.health)))
                    }
                },
            };
            b.follow_config(spec);
            backends.push(b);
        }
        let limit = app.max_connections.map(|max| {
            let l = old.and_then(|o| o.limit.clone()).unwrap_or_default();
            l.set_max(max as usize);
            l
        });
        let per_client = app.max_connections_per_client.map(|max| {
            match old.and_then(|o| o.per_client.as_ref()) {
                Some(c) => {
                    c.set_limit(max as usize);
                    Arc::clone(c)
                }
                None => ClientCounts::new(max as usize),
            }
        });
        AppRoute {
            app: Arc::clone(app),
            backends,
            limit,
            per_client,
            next: AtomicUsize::new(0),
            own: Arc::clone(own),
            stats: old.map(|o| Arc::clone(&o.stats)).unwrap_or_default(),
        }
    }

    /// The app's name.
    pub fn name(&self) -> &str {
        &self.app.name
    }

    pub fn balance(&self) -> Balance {
        self.app.balance
    }

    /// Distinct targets tried for one client connection before it is closed.
    pub fn connect_attempts(&self) -> usize {
        self.app.connect_attempts as usize
    }

    pub fn proxy_protocol(&self) -> Option<ProxyProtocol> {
        self.app.proxy_protocol
    }

    /// Where the app answers, for status: its `Addresses` (empty: every address) and
    /// `Hostnames`.
    pub fn addresses(&self) -> &[Prefix] {
        &self.app.addresses
    }

    pub fn hostnames(&self) -> &[Pattern] {
        &self.app.hostnames
    }

    /// The prefixes the app answers on: its `Addresses`, or every IPv4 and IPv6 address.
    fn prefixes(&self) -> &[Prefix] {
        const EVERY: [Prefix; 2] = [Prefix::ALL_V4, Prefix::ALL_V6];
        if self.app.addresses.is_empty() {
            &EVERY
        } else {
            &self.app.addresses
        }
    }
}

impl Routes {
    fn of(by_port: Ports, by_name: Shards<Named, Placed>, own: Arc<OwnFrontends>) -> Routes {
        Routes {
            by_port: Arc::new(by_port),
            by_name,
            own,
        }
    }

    /// This table is in force from now on: its frontends are the ones every route's targets
    /// are checked against (a new table is built before it is known to be applied).
    pub fn in_force(&self) {
        self.own.set(&self.by_port);
    }

    /// The route of the app named `name`.
    pub fn route(&self, name: &str) -> Option<&AppRoute> {
        self.by_name.get_key_value(name).map(|(n, _)| &*n.0)
    }

    /// The route of the app named `name`, shared.
    pub fn route_arc(&self, name: &str) -> Option<&Arc<AppRoute>> {
        self.by_name.get_key_value(name).map(|(n, _)| &n.0)
    }

    /// How many apps the table routes to.
    pub fn app_count(&self) -> usize {
        self.by_name.len()
    }

    /// The (port, prefix) pairs where the app named `name` answers.
    pub fn pairs_of(&self, name: &str) -> Vec<(u16, Prefix)> {
        let Some((Named(route), placed)) = self.by_name.get_key_value(name) else {
            return Vec::new();
        };
        let prefixes = route.prefixes();
        placed
            .ports
            .iter()
            .flat_map(|&port| prefixes.iter().map(move |&p| (port, p)))
            .collect()
    }

    /// The binding that takes a connection to `local` (the address the client dialled).
    pub fn lookup(&self, local: SocketAddr) -> Option<&Arc<Binding>> {
        self.by_port.get(&local.port())?.lookup(local.ip())
    }

    /// The port group (see `Binding::group`) of exactly (`port`, `prefix`), if some app
    /// answers there.
    pub fn group(&self, port: u16, prefix: &Prefix) -> Option<&str> {
        Some(self.by_port.get(&port)?.binding(prefix)?.group())
    }

    /// Every (port, prefix) some app answers on, in order, with its port group (see
    /// `Binding::group`): what bpf mode steers. Straight from the tables: through the config's
    /// pairs and a look-up each, this was a large part of a start at 200,000 apps.
    pub fn every_group(&self) -> Vec<((u16, Prefix), &str)> {
        let mut out: Vec<((u16, Prefix), &str)> = Vec::new();
        for (&port, table) in self.by_port.iter() {
            out.reserve(table.bindings.len());
            for (prefix, b) in table.bindings.iter() {
                out.push(((port, *prefix), b.group()));
            }
        }
        out.sort_unstable_by_key(|&(pair, _)| pair);
        out
    }

    /// Every configured port with its bindings.
    pub fn ports(&self) -> impl Iterator<Item = (u16, &PortTable)> {
        self.by_port.iter().map(|(&port, t)| (port, &**t))
    }

    /// The bindings of `port`, if it is configured.
    pub fn port(&self, port: u16) -> Option<&Arc<PortTable>> {
        self.by_port.get(&port)
    }

    /// The app of `port` on every address without Hostnames (tests, and ports not shared).
    pub fn app_for(&self, port: u16) -> Option<&Arc<AppRoute>> {
        let table = self.by_port.get(&port)?;
        [Prefix::ALL_V4, Prefix::ALL_V6]
            .iter()
            .find_map(|p| table.bindings.get(p))
            .and_then(|b| b.default.as_ref())
    }

    /// Every app with its ports, in config order, for metrics, status and the admin socket.
    /// Sorted anew for each reader, who drops it: one allocation of references, so that
    /// freeing it costs nothing. (Kept in the table, it was a list of 200,000 apps, each an
    /// `Arc` and a list of ports of its own, that the first reload after a read freed on the
    /// config plane's thread: 4-6 ms of a one-app change's 0.3.)
    pub fn apps(&self) -> Vec<(&Arc<AppRoute>, &[u16])> {
        let mut all: Vec<(u64, &Arc<AppRoute>, &[u16])> = self
            .by_name
            .iter()
            .map(|(n, p)| (p.order, &n.0, &*p.ports))
            .collect();
        all.sort_unstable_by_key(|&(order, _, _)| order);
        all.into_iter()
            .map(|(_, route, ports)| (route, ports))
            .collect()
    }

    /// The app named `name`, with its ports.
    pub fn app(&self, name: &str) -> Option<(&Arc<AppRoute>, &[u16])> {
        self.by_name
            .get_key_value(name)
            .map(|(n, p)| (&n.0, &*p.ports))
    }

    /// Every backend, for the health checker.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.by_name
            .keys()
            .flat_map(|n| n.0.backends.iter().cloned())
            .collect()
    }
}

mod binding;
mod build;
mod own;
mod update;

#[cfg(test)]
mod tests;
