//! bpf mode's port source: one listener per address family, and the sk_lookup program that
//! steers every configured port to it. A reload only rewrites the port map, as a diff.
//!
//! Map writes that fail do not refuse a reload (the config is valid, and the ports already
//! steered keep working): the port stays wanted and is retried at every reload tick.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};

use super::{BpfError, Steering, MAX_GROUPS};
use crate::config::Config;
use crate::frontend::ports::LookupStats;
use crate::frontend::ports::{self, Accepted, LookupReader, PortError, PortSource, FIRST_LISTENER};

/// Listener tokens above every simple-mode port token, so the two can never be confused.
const V4: Token = Token(FIRST_LISTENER + 65_536);
const V6: Token = Token(FIRST_LISTENER + 65_537);

pub struct Steered {
    v4: Option<TcpListener>,
    v6: Option<TcpListener>,
    steering: Steering,
    /// Ports the config wants steered, with their port group.
    wanted: BTreeMap<u16, u32>,
    /// Ports written into the map, with the group written.
    steered: BTreeMap<u16, u32>,
    /// Port group (counter index) of each app, by name; never reused within a run, so a
    /// group's counters always belong to one app.
    groups: Arc<Mutex<GroupNames>>,
    /// A failed map write has been logged and not yet recovered, so retries stay quiet.
    failing: bool,
    registered: bool,
}

/// App names to port-group ids. Ids are handed out in order and never reused; past the
/// program's MAX_GROUPS the apps share the last counter, which is named for all of them.
#[derive(Default)]
pub struct GroupNames {
    by_name: BTreeMap<String, u32>,
}

impl GroupNames {
    fn id(&mut self, app: &str) -> u32 {
        let next = (self.by_name.len() as u32).min(MAX_GROUPS - 1);
        if next == MAX_GROUPS - 1 && !self.by_name.contains_key(app) {
            // Shared overflow counter: report it once, under a name that says so.
            self.by_name.insert("(other apps)".into(), next);
            return next;
        }
        *self.by_name.entry(app.to_owned()).or_insert(next)
    }
}

/// Why bpf mode could not start.
#[derive(Debug)]
pub enum StartError {
    /// The listener itself could not be bound.
    Listen(SocketAddr, io::Error),
    Bpf(BpfError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Bpf(e) => write!(f, "{e}"),
        }
    }
}

impl Steered {
    /// Bind the listener(s) on `port` (all addresses, or `bind`), load the program with them in
    /// its socket map, and attach it to this network namespace. No port is steered yet.
    /// Listeners in `inherited` (handed over by the process we upgrade) are used instead of
    /// binding anew.
    pub fn start(
        port: u16,
        bind: Option<IpAddr>,
        mut inherited: HashMap<SocketAddr, TcpListener>,
    ) -> Result<Steered, StartError> {
        let mut listen = |addr: SocketAddr, v6only| match inherited.remove(&addr) {
            Some(l) => Ok(l),
            None => crate::net::listen(addr, v6only).map_err(|e| StartError::Listen(addr, e)),
        };
        // Two sockets rather than one dual-stack one: the program picks the socket by the
        // packet's family, and a v6-only socket keeps `local_addr` of an IPv4 connection a
        // plain IPv4 address.
        let (v4, v6) = match bind {
            None => (
                Some(listen(
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                    false,
                )?),
                match listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true) {
                    Ok(l) => Some(l),
                    // A host without IPv6 still serves IPv4.
                    Err(StartError::Listen(_, e))
                        if e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                    {
                        None
                    }
                    Err(e) => return Err(e),
                },
            ),
            Some(ip @ IpAddr::V4(_)) => (Some(listen(SocketAddr::new(ip, port), false)?), None),
            Some(ip @ IpAddr::V6(_)) => (None, Some(listen(SocketAddr::new(ip, port), true)?)),
        };
        let steering = Steering::attach(
            v4.as_ref().map(|l| l.as_fd()),
            v6.as_ref().map(|l| l.as_fd()),
            bind,
        )
        .map_err(StartError::Bpf)?;
        Ok(Steered {
            v4,
            v6,
            steering,
            wanted: BTreeMap::new(),
            steered: BTreeMap::new(),
            groups: Arc::default(),
            failing: false,
            registered: false,
        })
    }

    /// Bring the map in line with `wanted`; failures are logged and left for the next tick.
    fn sync(&mut self) {
        let mut failed: Option<(u16, BpfError)> = None;
        let mut failures = 0usize;
        let remove: Vec<u16> = self
            .steered
            .keys()
            .filter(|p| !self.wanted.contains_key(p))
            .copied()
            .collect();
        for port in remove {
            match self.steering.remove_port(port) {
                Ok(()) => {
                    self.steered.remove(&port);
                }
                Err(e) => {
                    failures += 1;
                    failed.get_or_insert((port, e));
                }
            }
        }
        // New ports, and ports whose app (so group) changed.
        let add: Vec<(u16, u32)> = self
            .wanted
            .iter()
            .filter(|(p, g)| self.steered.get(p) != Some(g))
            .map(|(p, g)| (*p, *g))
            .collect();
        for (port, group) in add {
            match self.steering.add_port(port, group) {
                Ok(()) => {
                    self.steered.insert(port, group);
                }
                Err(e) => {
                    failures += 1;
                    failed.get_or_insert((port, e));
                }
            }
        }
        match failed {
            Some((port, e)) => {
                if !self.failing {
                    crate::error!(
                        "bpf: cannot update the port map for {failures} ports (first: port {port}: {e}); retrying at every reload tick"
                    );
                }
                self.failing = true;
            }
            None if self.failing => {
                crate::info!("bpf: port map updated after earlier failures; every port steered");
                self.failing = false;
            }
            None => {}
        }
    }
}

impl PortSource for Steered {
    fn apply(
        &mut self,
        registry: &Registry,
        config: &Config,
        _added: &[u16],
        _removed: &[u16],
    ) -> Result<(), PortError> {
        if !self.registered {
            for (l, token) in [(&mut self.v4, V4), (&mut self.v6, V6)] {
                if let Some(l) = l {
                    registry
                        .register(l, token, Interest::READABLE)
                        .map_err(|error| PortError { port: 0, error })?;
                }
            }
            self.registered = true;
        }
        // The whole wanted map from the config: a port that moved to another app keeps being
        // steered, only its group changes.
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        self.wanted = config
            .apps
            .iter()
            .flat_map(|app| {
                let g = groups.id(&app.name);
                app.ports.iter().map(move |&p| (p, g))
            })
            .collect();
        drop(groups);
        self.sync();
        Ok(())
    }

    fn tick(&mut self) {
        if self.wanted != self.steered {
            self.sync();
        }
    }

    fn accept(&mut self, token: Token) -> io::Result<Option<Accepted>> {
        let listener = match token {
            V4 => self.v4.as_ref(),
            V6 => self.v6.as_ref(),
            _ => None,
        };
        match listener {
            // The accepted socket's local address keeps the port the client dialled.
            Some(l) => ports::accept_from(l, None),
            None => Ok(None),
        }
    }

    fn stop(&mut self, registry: &Registry) {
        // Detach first: from here on the kernel refuses connections to our ports at once,
        // instead of queueing SYNs on a listener that is about to close.
        self.steering.detach();
        for l in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            let mut l = l;
            let _ = registry.deregister(&mut l);
        }
    }

    fn listeners(&self) -> usize {
        2
    }

    fn handover(&self) -> Vec<(SocketAddr, RawFd)> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .filter_map(ports::handover_of)
            .collect()
    }

    fn lookup_stats(&self) -> Option<LookupReader> {
        let counters = match self.steering.counters() {
            Ok(c) => c,
            Err(e) => {
                crate::error!("bpf: lookup counters unavailable for metrics: {e}");
                return None;
            }
        };
        let groups = Arc::clone(&self.groups);
        Some(Box::new(move || {
            let names: Vec<(String, u32)> = {
                let g = groups.lock().unwrap_or_else(|e| e.into_inner());
                g.by_name.iter().map(|(n, id)| (n.clone(), *id)).collect()
            };
            names
                .into_iter()
                .filter_map(|(group, id)| {
                    let (steered, dropped) = counters.group(id).ok()?;
                    Some(LookupStats {
                        group,
                        steered,
                        dropped,
                    })
                })
                .collect()
        }))
    }
}
