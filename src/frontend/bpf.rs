//! bpf mode's port source: one listener per address family, and the sk_lookup program that
//! steers every configured (address prefix, port) to it. A reload writes or deletes only the
//! map entries of the (prefix, port) pairs whose apps changed (the config plane works out
//! which), never the whole map.
//!
//! Map writes that fail do not refuse a reload (the config is valid, and what is already
//! steered keeps working): the binding stays wanted and is retried at every reload tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use mio::net::TcpListener;

use crate::bpf::{BpfError, Steering, MAX_GROUPS, STEER_BATCH};
use crate::config::prefix::Prefix;
// (port, prefix) pairs and group ids from the config: see the hasher's module doc.
use crate::frontend::ports::{PortChange, PortError, PortSource};
use crate::metrics::{LookupReader, LookupStats};
use crate::relay::doors::{Door, Doors};
use crate::sys::hash::{FastMap, FastSet};

pub struct Steered {
    /// The listeners, open as doors the relay threads accept from; both closed by `stop`.
    v4: Option<Arc<Door>>,
    v6: Option<Arc<Door>>,
    doors: Arc<Doors>,
    steering: Steering,
    /// (port, prefix) pairs the config wants steered, with their port group.
    wanted: FastMap<(u16, Prefix), u32>,
    /// Pairs written into the map, with the group written.
    steered: FastMap<(u16, Prefix), u32>,
    /// Pairs where `wanted` and `steered` may differ: a change not yet written, or a write
    /// that failed and is retried at every tick. Only these are looked at (in order: see
    /// `sync`). Hash maps and sets: a start with 200,000 apps puts 800,000 pairs in each.
    dirty: FastSet<(u16, Prefix)>,
    /// How many entries of `wanted` and `steered` name each group: a group no entry names
    /// any more is released.
    uses: FastMap<u32, usize>,
    /// Port group (counter index) of each app, or of the apps sharing a binding by Hostnames
    /// (their names joined with `+`), by name (see `GroupNames`).
    groups: Arc<Mutex<GroupNames>>,
    /// A failed map write has been logged and not yet recovered, so retries stay quiet.
    failing: bool,
}

/// App names to port-group ids (the index of an app's lookup counters). An app keeps its id
/// while it is in the config; once an app is gone and no steered port names its group any more,
/// the id is released (its series leaves /metrics) and given to the next new app, its counters
/// zeroed first. Past the program's MAX_GROUPS the apps share the last counter, which is named
/// for all of them.
#[derive(Default)]
pub struct GroupNames {
    by_name: BTreeMap<String, u32>,
    /// The same, by id (every id is handed to one name; the overflow id to `OVERFLOW`).
    by_id: HashMap<u32, String>,
    /// Released ids, reused before new ones.
    free: Vec<u32>,
    /// The next id never handed out.
    next: u32,
    /// Released ids whose counters still hold the last app's counts.
    stale: BTreeSet<u32>,
}

/// The name of the shared counter of the apps past MAX_GROUPS.
const OVERFLOW: &str = "(other apps)";

impl GroupNames {
    /// The group of `app`, handing out one if it has none; the second value says whether the
    /// group's counters must be zeroed before the app's ports use it.
    fn id(&mut self, app: &str) -> (u32, bool) {
        if let Some(&g) = self.by_name.get(app) {
            return (g, false);
        }
        let (name, g) = if let Some(g) = self.free.pop() {
            (app, g)
        } else if self.next < MAX_GROUPS - 1 {
            self.next += 1;
            (app, self.next - 1)
        } else {
            // Shared overflow counter: reported once, under a name that says so.
            (OVERFLOW, MAX_GROUPS - 1)
        };
        let stale = self.stale.remove(&g);
        self.by_name.entry(name.to_owned()).or_insert(g);
        self.by_id.entry(g).or_insert_with(|| name.to_owned());
        (g, stale)
    }

    /// Release group `g`, which no port uses any more (neither wanted nor still in the map).
    fn release(&mut self, g: u32) {
        if let Some(name) = self.by_id.remove(&g) {
            self.by_name.remove(&name);
            self.stale.insert(g);
            if g != MAX_GROUPS - 1 {
                self.free.push(g);
            }
        }
    }
}

/// Why bpf mode's listeners and program could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// The listener itself could not be bound.
    Listen(SocketAddr, io::Error),
    Bpf(BpfError),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            SetupError::Bpf(e) => write!(f, "{e}"),
        }
    }
}

impl Steered {
    /// Bind the listener(s) on `port` (all addresses, or `bind`), load the program with them in
    /// its socket map, and attach it to this network namespace. No port is steered yet.
    /// Listeners in `inherited` (handed over by the process we upgrade) are used instead of
    /// binding anew. They are opened as `doors` at once (accepting starts with the relay
    /// threads; nothing is steered to them before the first `apply`).
    pub fn start(
        port: u16,
        bind: Option<IpAddr>,
        mut inherited: HashMap<SocketAddr, TcpListener>,
        doors: Arc<Doors>,
    ) -> Result<Steered, SetupError> {
        let mut listen = |addr: SocketAddr, v6only| match inherited.remove(&addr) {
            // From an older process, perhaps without the option its accepted sockets inherit.
            Some(l) => crate::sys::net::set_nodelay(l.as_raw_fd())
                .map(|()| l)
                .map_err(|e| SetupError::Listen(addr, e)),
            None => crate::sys::net::listen(addr, v6only).map_err(|e| SetupError::Listen(addr, e)),
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
                    Err(SetupError::Listen(_, e))
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
        .map_err(SetupError::Bpf)?;
        let open = |l: Option<TcpListener>| match l {
            Some(l) => {
                let addr = l
                    .local_addr()
                    .map_err(|e| SetupError::Listen(addr_of(port), e))?;
                doors
                    .open(l)
                    .map(Some)
                    .map_err(|e| SetupError::Listen(addr, e))
            }
            None => Ok(None),
        };
        let (v4, v6) = (open(v4)?, open(v6)?);
        Ok(Steered {
            v4,
            v6,
            doors,
            steering,
            wanted: FastMap::default(),
            steered: FastMap::default(),
            dirty: FastSet::default(),
            uses: FastMap::default(),
            groups: Arc::default(),
            failing: false,
        })
    }

    /// Count one more (`true`) or one fewer use of group `g`; a group no longer used is
    /// returned, for the caller to release at once (a failed map write keeps a group until a
    /// retry removes its ports).
    fn count(&mut self, g: u32, more: bool) -> Option<u32> {
        let n = self.uses.entry(g).or_insert(0);
        if more {
            *n += 1;
            return None;
        }
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.uses.remove(&g);
            return Some(g);
        }
        None
    }

    /// Release group `g`, which nothing uses any more.
    fn release(&self, g: u32) {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(g);
    }

    /// Set what `wanted` (`steered: false`) or `steered` holds for `key`, counting uses; a
    /// group no longer used is returned, to release at once.
    #[must_use]
    fn set(&mut self, steered: bool, key: (u16, Prefix), group: Option<u32>) -> Option<u32> {
        let map = if steered {
            &mut self.steered
        } else {
            &mut self.wanted
        };
        let old = match group {
            Some(g) => map.insert(key, g),
            None => map.remove(&key),
        };
        if old == group {
            return None;
        }
        // Count the new use before dropping the old one: a group moving between two entries
        // is never released in between.
        if let Some(g) = group {
            self.count(g, true);
        }
        self.count(old?, false)
    }

    /// `set`, releasing at once a group no longer used.
    fn set_steered(&mut self, key: (u16, Prefix), group: Option<u32>) {
        if let Some(unused) = self.set(true, key, group) {
            self.release(unused);
        }
    }

    /// Bring the map in line with `wanted` for the pairs not yet in line; failures are logged
    /// and left for the next tick. New bindings go in before old ones go out: a longer prefix
    /// added beside a shorter one takes over at once, and a port never has a moment with
    /// neither.
    fn sync(&mut self) {
        let mut failed: Option<(u16, BpfError)> = None;
        // Ports (not bindings) that failed, for the message.
        let mut failures = BTreeSet::new();
        // In order, so that the batches, and which port a failure names first, are the same
        // from run to run.
        let mut keys: Vec<(u16, Prefix)> = self.dirty.iter().copied().collect();
        keys.sort_unstable();
        // New bindings, and bindings whose apps (so group) changed: in batches (one syscall
        // for thousands), each batch that fails written again one by one, for the failures'
        // ports.
        let adds: Vec<((u16, Prefix), u32)> = keys
            .iter()
            .filter_map(|key| {
                let group = *self.wanted.get(key)?;
                (self.steered.get(key) != Some(&group)).then_some((*key, group))
            })
            .collect();
        self.steered.reserve(adds.len());
        for chunk in adds.chunks(STEER_BATCH) {
            let items: Vec<(Prefix, u16, u32)> = chunk
                .iter()
                .map(|&((port, prefix), group)| (prefix, port, group))
                .collect();
            if chunk.len() > 1 && self.steering.add_bindings(&items).is_ok() {
                for &(key, group) in chunk {
                    self.set_steered(key, Some(group));
                }
                continue;
            }
            for &((port, prefix), group) in chunk {
                match self.steering.add_binding(prefix, port, group) {
                    Ok(()) => self.set_steered((port, prefix), Some(group)),
                    Err(e) => {
                        failures.insert(port);
                        failed.get_or_insert((port, e));
                    }
                }
            }
        }
        for &(port, prefix) in &keys {
            if self.wanted.contains_key(&(port, prefix))
                || !self.steered.contains_key(&(port, prefix))
            {
                continue;
            }
            match self.steering.remove_binding(prefix, port) {
                Ok(()) => self.set_steered((port, prefix), None),
                Err(e) => {
                    failures.insert(port);
                    failed.get_or_insert((port, e));
                }
            }
        }
        for key in keys {
            if self.wanted.get(&key) == self.steered.get(&key) {
                self.dirty.remove(&key);
            }
        }
        match failed {
            Some((port, e)) => {
                if !self.failing {
                    crate::error!(
                        "bpf: cannot update the port map for {} ports (first: port {port}: {e}); retrying at every reload tick",
                        failures.len()
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

/// The wildcard address on `port`, for a listener whose own address cannot be read.
fn addr_of(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
}

impl PortSource for Steered {
    fn apply(&mut self, change: &PortChange) -> Result<(), PortError> {
        // Only the pairs whose apps changed: a binding that moved to another app keeps being
        // steered, only its group changes.
        // One lock for the whole change (not one per pair: a start has 800,000); a group
        // released on the way is released under it, in the same order as ever.
        let groups = Arc::clone(&self.groups);
        let mut names = groups.lock().unwrap_or_else(|e| e.into_inner());
        self.wanted.reserve(change.steer.len());
        self.dirty.reserve(change.steer.len());
        for (key, group) in &change.steer {
            let g = group.as_deref().map(|name| {
                let (g, zero) = names.id(name);
                if zero {
                    // Not fatal: the app's counters would start from the last app's counts.
                    if let Err(e) = self.steering.clear_group(g) {
                        crate::error!("bpf: {e}");
                    }
                }
                g
            });
            if let Some(unused) = self.set(false, *key, g) {
                names.release(unused);
            }
            self.dirty.insert(*key);
        }
        drop(names);
        self.sync();
        Ok(())
    }

    fn steers(&self) -> bool {
        true
    }

    fn tick(&mut self) {
        if !self.dirty.is_empty() {
            self.sync();
        }
    }

    fn stop(&mut self) {
        // Detach first: from here on the kernel refuses connections to our ports at once,
        // instead of queueing SYNs on a listener that is about to close.
        self.steering.detach();
        for door in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            self.doors.close(&door);
        }
    }

    fn listeners(&self) -> usize {
        2
    }

    fn handover(&self) -> Vec<(SocketAddr, RawFd)> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .filter_map(|d| d.handover())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_of_removed_apps_are_released_and_reused_zeroed() {
        let mut g = GroupNames::default();
        assert_eq!(g.id("a"), (0, false));
        assert_eq!(g.id("b"), (1, false));
        assert_eq!(g.id("a"), (0, false));
        // "b" leaves the config: its group is no longer in use.
        g.release(1);
        assert!(!g.by_name.contains_key("b"));
        // The next new app gets it, to be zeroed first; then it is simply its own.
        assert_eq!(g.id("c"), (1, true));
        assert_eq!(g.id("c"), (1, false));
        assert_eq!(g.id("d"), (2, false));
    }
}
