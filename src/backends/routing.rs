//! Routing: which app a connection belongs to, and what that app routes to (its backends,
//! balancing, limit, PROXY protocol).
//!
//! Who gets a connection: on its port, the most specific address prefix covering the address
//! the client dialled (longest prefix wins); on that (prefix, port), a `Binding`, the app whose
//! Hostnames match the ClientHello's server name (exact before wildcard), else the app there
//! without Hostnames (the default). The listener loop looks the binding up at accept; the relay
//! thread reads the server name if the binding needs it and picks the app.
//!
//! A `Routes` is built whole from a validated `Config` and replaced whole on reload. A
//! connection keeps the binding (so the apps) it was accepted with, so a reload never changes
//! the target of a connection already open; the next connection sees the new table.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use crate::backends::backend::Backend;
use crate::backends::clients::ClientCounts;
use crate::backends::histogram::Histogram;
use crate::backends::limit::AppLimit;
use crate::backends::loops::Frontends;
use crate::config::hostname::{self, Pattern};
use crate::config::prefix::Prefix;
use crate::config::{app_prefixes, Balance, Config, ProxyProtocol, Target};

// Re-exported because the relay (rewritten in parallel) imports them from here; new code
// should import them from `limit`, and this line can go once nothing does.
pub use crate::backends::limit::{Acquired, LimitDenied, LimitGuard, LimitWait};

#[derive(Debug)]
pub struct AppRoute {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub balance: Balance,
    pub connect_attempts: usize,
    pub limit: Option<Arc<AppLimit>>,
    /// Open connections per client address, with the app's `MaxConnectionsPerClient`.
    pub per_client: Option<Arc<ClientCounts>>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Where the app answers, for status: its `Addresses` (empty: every address) and
    /// `Hostnames`.
    pub addresses: Vec<Prefix>,
    pub hostnames: Vec<Pattern>,
    /// Round-robin position.
    pub next: AtomicUsize,
    /// This proxy's own frontends in the config of this route: a target resolving to one of
    /// them is a loop.
    pub own: Arc<Frontends>,
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
}

/// The apps on one (address prefix, port): told apart by the ClientHello's server name.
#[derive(Debug, Default)]
pub struct Binding {
    /// Exact hostnames, lower-case.
    exact: HashMap<String, Arc<AppRoute>>,
    /// Wildcards by the suffix after `*.`.
    wildcard: HashMap<String, Arc<AppRoute>>,
    /// The app without Hostnames, if there is one.
    default: Option<Arc<AppRoute>>,
    /// The names of every app here, sorted and joined with `+`: the port group (counter
    /// label) of this binding in bpf mode, where the kernel cannot tell them apart.
    pub group: String,
    /// Where the server name picks the app and every app here has `MaxConnectionsPerClient`:
    /// open connections per client to any of them, limited to the largest of theirs, counted
    /// at accept (before the name is read, and before a slot is taken), so that one address
    /// cannot hold every slot with silent connections. The app's own limit is counted too,
    /// once the name picked it.
    pub per_client: Option<Arc<ClientCounts>>,
}

/// Why a connection found no app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unrouted {
    /// No app on the dialled address (simple mode: a wildcard listener of the port took it).
    NoApp,
    /// A ClientHello without a server name, and no default app.
    NoServerName,
    /// A server name no app claims, and no default app.
    UnknownServerName,
    /// The first bytes were not a TLS ClientHello, and no default app.
    NotTls,
    /// The ClientHello did not fit in the preread bound, and no default app.
    TooLarge,
    /// The client sent no whole ClientHello within `--preread-timeout`.
    PrereadTimeout,
    /// The client closed or reset before its ClientHello was whole.
    ClientClosed,
}

impl Unrouted {
    /// The `reason` label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrouted::NoApp => "no_app",
            Unrouted::NoServerName => "no_server_name",
            Unrouted::UnknownServerName => "unknown_server_name",
            Unrouted::NotTls => "not_tls",
            Unrouted::TooLarge => "too_large",
            Unrouted::PrereadTimeout => "preread_timeout",
            Unrouted::ClientClosed => "client_closed",
        }
    }

    /// What happened, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Unrouted::NoApp => "no app on the dialled address",
            Unrouted::NoServerName => {
                "the ClientHello has no server name, and no app here is without Hostnames"
            }
            Unrouted::UnknownServerName => {
                "no app here has the server name in its Hostnames, and none is without Hostnames"
            }
            Unrouted::NotTls => "not a TLS ClientHello, and no app here is without Hostnames",
            Unrouted::TooLarge => {
                "the ClientHello is larger than the preread bound, and no app here is without Hostnames"
            }
            Unrouted::PrereadTimeout => "no whole ClientHello within the preread timeout",
            Unrouted::ClientClosed => "the client closed before its ClientHello was whole",
        }
    }
}

/// Connections no app took, by port and reason, for metrics.
#[derive(Debug, Default)]
pub struct UnroutedCounts(Mutex<BTreeMap<(u16, Unrouted), u64>>);

impl UnroutedCounts {
    pub fn count(&self, port: u16, why: Unrouted) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((port, why))
            .or_insert(0) += 1;
    }

    /// Every count so far, by port then reason.
    pub fn snapshot(&self) -> Vec<((u16, Unrouted), u64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl Binding {
    /// Whether the server name must be read to pick the app.
    pub fn needs_server_name(&self) -> bool {
        !self.exact.is_empty() || !self.wildcard.is_empty()
    }

    /// The app without Hostnames (the only app of a binding that needs no server name).
    pub fn default_app(&self) -> Option<&Arc<AppRoute>> {
        self.default.as_ref()
    }

    /// The app for a (normalised) server name: exact, then wildcard, then the default.
    pub fn for_name(&self, name: &str) -> Result<&Arc<AppRoute>, Unrouted> {
        self.exact
            .get(name)
            .or_else(|| {
                hostname::wildcard_suffix(name).and_then(|suffix| self.wildcard.get(suffix))
            })
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
/// 250 us per connection at 100,000 apps, each with an address of its own).
#[derive(Debug, Default)]
pub struct PortTable {
    bindings: HashMap<Prefix, Arc<Binding>>,
    /// The distinct prefix lengths in `bindings`, per family, longest first.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl PortTable {
    /// The table of these bindings.
    fn new(bindings: HashMap<Prefix, Arc<Binding>>) -> PortTable {
        let mut t = PortTable {
            bindings,
            ..PortTable::default()
        };
        for p in t.bindings.keys() {
            let lens = if p.is_v4() {
                &mut t.v4_lens
            } else {
                &mut t.v6_lens
            };
            if !lens.contains(&p.prefix_len()) {
                lens.push(p.prefix_len());
            }
        }
        t.v4_lens.sort_unstable_by(|a, b| b.cmp(a));
        t.v6_lens.sort_unstable_by(|a, b| b.cmp(a));
        t
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
            .find_map(|&len| self.bindings.get(&Prefix::new(ip, len)))
    }

    /// The binding of exactly `prefix`.
    pub fn binding(&self, prefix: &Prefix) -> Option<&Arc<Binding>> {
        self.bindings.get(prefix)
    }
}

#[derive(Debug)]
pub struct Routes {
    /// Ports served by the same apps share one table (a range of 10,000 ports is one table).
    by_port: HashMap<u16, Arc<PortTable>>,
    /// Per (app, target), reused by the next `Routes` so that health and load survive a reload.
    backends: HashMap<(String, Target), Arc<Backend>>,
    /// Per app, reused likewise so connections open across a reload still count.
    limits: HashMap<String, Arc<AppLimit>>,
    /// Per app, likewise: connections open across a reload still count against the client.
    per_client: HashMap<String, Arc<ClientCounts>>,
    /// Per binding (its apps, its prefix) counted at accept, likewise.
    binding_clients: HashMap<(String, Prefix), Arc<ClientCounts>>,
    stats: HashMap<String, Arc<AppStats>>,
    /// Every app with its ports, in config order, for metrics and status.
    apps: Vec<(Arc<AppRoute>, Vec<u16>)>,
}

impl Routes {
    /// Build the table for `config`, keeping the state of `previous` for what remains.
    pub fn new(config: &Config, previous: Option<&Routes>) -> Routes {
        let mut backends = HashMap::new();
        let mut limits = HashMap::new();
        let mut per_client = HashMap::new();
        let mut stats = HashMap::new();
        let mut apps = Vec::with_capacity(config.apps.len());
        let mut routes = Vec::with_capacity(config.apps.len());
        // Port -> the apps on it, by index in config order.
        let mut on_port: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        let own = Arc::new(Frontends::new(config));
        for (i, app) in config.apps.iter().enumerate() {
            let app_backends = app
                .targets
                .iter()
                .map(|t| {
                    let key = (app.name.clone(), t.clone());
                    // A target listed twice in one app is one backend with two turns.
                    if let Some(b) = backends.get(&key) {
                        return Arc::clone(b);
                    }
                    let b = match previous.and_then(|p| p.backends.get(&key)) {
                        Some(b) => {
                            *b.check.lock().unwrap_or_else(|e| e.into_inner()) = app.health;
                            Arc::clone(b)
                        }
                        None => Arc::new(Backend::new(&app.name, t.clone(), app.health)),
                    };
                    backends.insert(key, Arc::clone(&b));
                    b
                })
                .collect();
            let limit = app.max_connections.map(|max| {
                let l = match previous.and_then(|p| p.limits.get(&app.name)) {
                    Some(l) => Arc::clone(l),
                    None => Arc::new(AppLimit::default()),
                };
                l.set_max(max);
                limits.insert(app.name.clone(), Arc::clone(&l));
                l
            });
            let app_per_client = app.max_connections_per_client.map(|max| {
                let c = match previous.and_then(|p| p.per_client.get(&app.name)) {
                    Some(c) => {
                        c.set_limit(max);
                        Arc::clone(c)
                    }
                    None => ClientCounts::new(max),
                };
                per_client.insert(app.name.clone(), Arc::clone(&c));
                c
            });
            let app_stats = previous
                .and_then(|p| p.stats.get(&app.name).cloned())
                .unwrap_or_default();
            stats.insert(app.name.clone(), Arc::clone(&app_stats));
            let route = Arc::new(AppRoute {
                name: app.name.clone(),
                backends: app_backends,
                balance: app.balance,
                connect_attempts: app.connect_attempts,
                limit,
                per_client: app_per_client,
                proxy_protocol: app.proxy_protocol,
                addresses: app.addresses.clone(),
                hostnames: app.hostnames.clone(),
                next: AtomicUsize::new(0),
                own: Arc::clone(&own),
                stats: app_stats,
            });
            for &port in &app.ports {
                on_port.entry(port).or_default().push(i);
            }
            apps.push((Arc::clone(&route), app.ports.clone()));
            routes.push(route);
        }
        let mut tables: HashMap<Vec<usize>, Arc<PortTable>> = HashMap::new();
        let mut binding_clients = HashMap::new();
        let by_port = on_port
            .into_iter()
            .map(|(port, on)| {
                let table = tables.entry(on).or_insert_with_key(|on| {
                    let kept = previous.map(|p| &p.binding_clients);
                    Arc::new(port_table(config, &routes, on, kept, &mut binding_clients))
                });
                (port, Arc::clone(table))
            })
            .collect();
        Routes {
            by_port,
            backends,
            limits,
            per_client,
            binding_clients,
            stats,
            apps,
        }
    }

    /// The binding that takes a connection to `local` (the address the client dialled).
    pub fn lookup(&self, local: SocketAddr) -> Option<&Arc<Binding>> {
        self.by_port.get(&local.port())?.lookup(local.ip())
    }

    /// The port group (see `Binding::group`) of exactly (`port`, `prefix`), if some app
    /// answers there.
    pub fn group(&self, port: u16, prefix: &Prefix) -> Option<&str> {
        Some(&self.by_port.get(&port)?.binding(prefix)?.group)
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

    /// Every app with its ports, in config order.
    pub fn apps(&self) -> &[(Arc<AppRoute>, Vec<u16>)] {
        &self.apps
    }

    /// Every backend, for the health checker.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.values().cloned().collect()
    }
}

/// The counts a binding takes at accept (see `Binding::per_client`), kept from the previous
/// table if it had them for the same apps on the same prefix; None where the server name does
/// not pick the app or an app here has no `MaxConnectionsPerClient`.
fn counted_at_accept(
    b: &Binding,
    prefix: Prefix,
    previous: Option<&HashMap<(String, Prefix), Arc<ClientCounts>>>,
) -> Option<Arc<ClientCounts>> {
    if !b.needs_server_name() {
        return None;
    }
    let apps = b
        .exact
        .values()
        .chain(b.wildcard.values())
        .chain(&b.default);
    let mut largest = 0;
    for app in apps {
        largest = largest.max(app.per_client.as_ref()?.limit());
    }
    match previous.and_then(|p| p.get(&(b.group.clone(), prefix))) {
        Some(c) => {
            c.set_limit(largest);
            Some(Arc::clone(c))
        }
        None => Some(ClientCounts::new(largest)),
    }
}

/// The table of a port served by the apps `on` (indices into `config.apps` and `routes`).
/// `kept`, the counts taken at accept in the previous table; `counted`, those of this one.
fn port_table(
    config: &Config,
    routes: &[Arc<AppRoute>],
    on: &[usize],
    kept: Option<&HashMap<(String, Prefix), Arc<ClientCounts>>>,
    counted: &mut HashMap<(String, Prefix), Arc<ClientCounts>>,
) -> PortTable {
    let mut by_prefix: BTreeMap<Prefix, Binding> = BTreeMap::new();
    let mut names: BTreeMap<Prefix, Vec<&str>> = BTreeMap::new();
    for &i in on {
        let app = &config.apps[i];
        for prefix in app_prefixes(app) {
            let b = by_prefix.entry(prefix).or_default();
            names.entry(prefix).or_default().push(&app.name);
            if app.hostnames.is_empty() {
                b.default = Some(Arc::clone(&routes[i]));
            }
            for h in &app.hostnames {
                let map = match h {
                    Pattern::Exact(_) => &mut b.exact,
                    Pattern::Wildcard(_) => &mut b.wildcard,
                };
                let (Pattern::Exact(key) | Pattern::Wildcard(key)) = h;
                map.insert(key.clone(), Arc::clone(&routes[i]));
            }
        }
    }
    let bindings = by_prefix
        .into_iter()
        .map(|(prefix, mut b)| {
            let mut n = names.remove(&prefix).unwrap_or_default();
            n.sort_unstable();
            b.group = n.join("+");
            b.per_client = counted_at_accept(&b, prefix, kept);
            if let Some(c) = &b.per_client {
                counted.insert((b.group.clone(), prefix), Arc::clone(c));
            }
            (prefix, Arc::new(b))
        })
        .collect();
    PortTable::new(bindings)
}

#[cfg(test)]
mod tests;
