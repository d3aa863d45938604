//! bpf mode's port source: one listener per address family, and the sk_lookup program that
//! steers every configured (address prefix, port) to it. A reload writes or deletes only the
//! map entries of the (prefix, port) pairs whose apps changed (the config plane works out
//! which), never the whole map.
//!
//! Map writes that fail do not refuse a reload (the config is valid, and what is already
//! steered keeps working): the binding stays pending and is retried at every reload tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::net::TcpListener;

use crate::backends::routing::Routes;
use crate::bpf::{Bindings, BpfError, Steering, MAX_GROUPS, STEER_BATCH};
use crate::config::prefix::Prefix;
// (port, prefix) pairs and group ids from the config: see the hasher's module doc.
use crate::frontend::ports::{PortChange, PortError, PortSource};
use crate::metrics::{LookupReader, LookupStats};
use crate::relay::doors::{Door, Doors};
use crate::sys::hash::FastMap;

/// A steered (port, address prefix).
type Pair = (u16, Prefix);

pub struct Steered {
    /// The listeners, open as doors the relay threads accept from; both closed by `stop`.
    v4: Option<Arc<Door>>,
    v6: Option<Arc<Door>>,
    doors: Arc<Doors>,
    steering: Steering,
    /// Pairs written into the map, with the group written.
    steered: FastMap<Pair, u32>,
    /// Pairs whose map entry is not what the config wants, because a write failed: the group
    /// to write, or None to delete. Retried at every tick (and with every change); empty
    /// while every write succeeds (a change is written as it comes, never kept here).
    pending: FastMap<Pair, Option<u32>>,
    /// How many entries of `steered` and `pending` (and of a change being written) name each
    /// group, by group id (every id is below MAX_GROUPS): a group nothing names any more is
    /// released. A vector, not a map: a start counts 800,000 entries.
    uses: Vec<u32>,
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
        } else if let Some(&g) = self.by_name.get(OVERFLOW) {
            // Most apps of a large config: named already (and so not stale), nothing to copy.
            return (g, false);
        } else {
            // Shared overflow counter: reported once, under a name that says so.
            (OVERFLOW, MAX_GROUPS - 1)
        };
        let stale = self.stale.remove(&g);
        self.by_name.insert(name.to_owned(), g);
        self.by_id.entry(g).or_insert_with(|| name.to_owned());
        (g, stale)
    }

    /// The group `id` gives every name it has not named yet, if nothing can change what it
    /// gives any name: every id handed out and the shared overflow group named (a config past
    /// MAX_GROUPS apps), with none released since. `id` then changes nothing, and can be
    /// answered from what it holds, on several threads.
    fn frozen(&self) -> Option<u32> {
        if !self.free.is_empty() || self.next < MAX_GROUPS - 1 {
            return None;
        }
        self.by_name.get(OVERFLOW).copied()
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
            steered: FastMap::default(),
            pending: FastMap::default(),
            uses: vec![0; MAX_GROUPS as usize],
            groups: Arc::default(),
            failing: false,
        })
    }

    /// One fewer use of group `g`: whether nothing uses it any more (to be released at once; a
    /// failed map write keeps a group until a retry removes its ports).
    #[must_use]
    fn unuse(&mut self, g: u32) -> bool {
        let n = &mut self.uses[g as usize];
        *n = n.saturating_sub(1);
        *n == 0
    }

    /// Release group `g`, which nothing uses any more.
    fn release(&self, g: u32) {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(g);
    }

    /// Write `steer` (each (port, prefix) with the name of its group, or None to stop steering
    /// it) and what is still pending from failed writes: groups handed out under one lock (a
    /// start has 800,000 pairs), then the writes, logged if any fails.
    fn change<'a>(&mut self, steer: impl ExactSizeIterator<Item = (Pair, Option<&'a str>)>) {
        let groups = Arc::clone(&self.groups);
        let mut names = groups.lock().unwrap_or_else(|e| e.into_inner());
        let mut items: Vec<(Pair, Option<u32>)> =
            Vec::with_capacity(steer.len() + self.pending.len());
        // Each name's group, once looked up: an app has several pairs, and past MAX_GROUPS
        // every look-up in `names` misses (0.3 s of a start at 200,000 apps).
        let mut known: FastMap<&str, u32> = FastMap::default();
        for (key, group) in steer {
            let g = group.map(|name| {
                if let Some(&g) = known.get(name) {
                    return g;
                }
                let (g, zero) = names.id(name);
                known.insert(name, g);
                if zero {
                    // Not fatal: the app's counters would start from the last app's counts.
                    if let Err(e) = self.steering.clear_group(g) {
                        crate::error!("bpf: {e}");
                    }
                }
                g
            });
            // The item's use, counted before the one it replaces is dropped: a group moving
            // between two entries is never released in between.
            if let Some(g) = g {
                self.uses[g as usize] += 1;
            }
            // A failed write of this pair, not retried: this change replaces it.
            if let Some(Some(old)) = self.pending.remove(&key) {
                if self.unuse(old) {
                    names.release(old);
                }
            }
            items.push((key, g));
        }
        drop(names);
        items.extend(self.pending.drain());
        self.write(items);
    }

    /// Bring the map in line with `items` (each pair with its group, or None to delete it, a
    /// use of that group counted for each): failed writes go to `pending`, logged, and are
    /// retried at the next tick. New bindings go in before old ones go out: a longer prefix
    /// added beside a shorter one takes over at once, and a port never has a moment with
    /// neither.
    fn write(&mut self, mut items: Vec<(Pair, Option<u32>)>) {
        let mut failed: Option<(u16, BpfError)> = None;
        // Ports (not bindings) that failed, for the message.
        let mut failures = BTreeSet::new();
        // In order, so that the batches, and which port a failure names first, are the same
        // from run to run (a change comes sorted: this costs little).
        items.sort_unstable_by_key(|&(key, _)| key);
        // New bindings, and bindings whose apps (so group) changed, in batches (one syscall
        // for thousands), on several threads for a start; each batch that fails written again
        // one by one, for the failures' ports. A pair already in the map as wanted (a retry
        // after a change back) needs no write.
        let mut adds: Vec<(Pair, u32)> = Vec::with_capacity(items.len());
        for &(key, g) in &items {
            let Some(g) = g else { continue };
            if self.steered.get(&key) == Some(&g) {
                self.settle(key, Some(g));
            } else {
                adds.push((key, g));
            }
        }
        let written = write_batches(self.steering.bindings(), &adds);
        self.settle_written(&adds, &written, &mut failed, &mut failures);
        for &((port, prefix), g) in &items {
            if g.is_some() {
                continue;
            }
            if !self.steered.contains_key(&(port, prefix)) {
                continue;
            }
            match self.steering.remove_binding(prefix, port) {
                Ok(()) => self.settle((port, prefix), None),
                Err(e) => {
                    failures.insert(port);
                    failed.get_or_insert((port, e));
                    self.pending.insert((port, prefix), None);
                }
            }
        }
        self.report(failed, &failures);
    }

    /// `adds` were written in batches of `STEER_BATCH`, each whole or not as `written` says:
    /// those written are settled; each of a batch that failed is written again one by one, for
    /// the failures' ports, and what still fails goes to `pending`.
    fn settle_written(
        &mut self,
        adds: &[(Pair, u32)],
        written: &[bool],
        failed: &mut Option<(u16, BpfError)>,
        failures: &mut BTreeSet<u16>,
    ) {
        self.steered.reserve(adds.len());
        for (chunk, &ok) in adds.chunks(STEER_BATCH).zip(written) {
            if ok {
                for &(key, g) in chunk {
                    self.settle(key, Some(g));
                }
                continue;
            }
            for &((port, prefix), g) in chunk {
                match self.steering.add_binding(prefix, port, g) {
                    Ok(()) => self.settle((port, prefix), Some(g)),
                    Err(e) => {
                        failures.insert(port);
                        failed.get_or_insert((port, e));
                        self.pending.insert((port, prefix), Some(g));
                    }
                }
            }
        }
    }

    /// Log a write's first failure (once, until every port is steered again), or the recovery.
    fn report(&mut self, failed: Option<(u16, BpfError)>, failures: &BTreeSet<u16>) {
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

    /// `key` is in the map as `group` says (None: not in it): the item's use of `group` moves
    /// to `steered`, and the group written before is used once fewer (released if nothing
    /// else uses it).
    fn settle(&mut self, key: Pair, group: Option<u32>) {
        let old = match group {
            Some(g) => self.steered.insert(key, g),
            None => self.steered.remove(&key),
        };
        if let Some(old) = old {
            if self.unuse(old) {
                self.release(old);
            }
        }
    }
}

/// Write `adds` in batches of `STEER_BATCH`, on a thread per core when there are many (a start
/// at 200,000 apps writes 800,000 bindings, a microsecond each in the kernel, most of bpf
/// mode's start once the table is built); whether each batch was written whole.
fn write_batches(maps: &Bindings, adds: &[(Pair, u32)]) -> Vec<bool> {
    let chunks: Vec<&[(Pair, u32)]> = adds.chunks(STEER_BATCH).collect();
    // A batch of one is written by the caller, one by one, for its error.
    let write = |chunk: &[(Pair, u32)]| {
        chunk.len() > 1
            && maps
                .add_many(chunk.iter().map(|&((port, prefix), g)| (prefix, port, g)))
                .is_ok()
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len() / PARALLEL_BATCHES);
    if threads < 2 {
        return chunks.into_iter().map(write).collect();
    }
    let next = AtomicUsize::new(0);
    let take = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(i) else {
                return done;
            };
            done.push((i, write(chunk)));
        }
    };
    let mut written = vec![false; chunks.len()];
    std::thread::scope(|s| {
        let others: Vec<_> = (1..threads).map(|_| s.spawn(take)).collect();
        let mut done = take();
        for t in others {
            // A panic in a writer (a bug) leaves its batches unmarked: written again one by one.
            done.extend(t.join().unwrap_or_default());
        }
        for (i, ok) in done {
            written[i] = ok;
        }
    });
    written
}

/// Batches per writing thread, at least, before `write_batches` starts threads: a reload's few
/// batches are written on the loop's thread.
const PARALLEL_BATCHES: usize = 4;

/// The wildcard address on `port`, for a listener whose own address cannot be read.
fn addr_of(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
}

impl PortSource for Steered {
    fn apply(&mut self, change: &PortChange) -> Result<(), PortError> {
        // Only the pairs whose apps changed: a binding that moved to another app keeps being
        // steered, only its group changes.
        self.change(change.steer.iter().map(|(key, g)| (*key, g.as_deref())));
        Ok(())
    }

    fn serve_all(&mut self, routes: &Routes) -> Result<(), PortError> {
        if self.steered.is_empty() && self.pending.is_empty() {
            self.steer_first(routes);
            return Ok(());
        }
        let all = routes.every_group();
        self.change(all.into_iter().map(|(key, g)| (key, Some(g))));
        Ok(())
    }

    fn steers(&self) -> bool {
        true
    }

    fn tick(&mut self) {
        if !self.pending.is_empty() {
            self.change(std::iter::empty());
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

mod first;

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
