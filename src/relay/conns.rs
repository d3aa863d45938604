//! The table of open client connections, so that the listener loop can drain them: those of a
//! port removed by a reload, or all of them at shutdown, are closed once their drain deadline
//! passes.
//!
//! Each entry also says where its connection is (`Phase`), its app and target once known, and
//! how many bytes it moved and when it last moved one, so that the admin socket can list and
//! end connections (`show conns`, `kill conn`). The relay publishes them with a few relaxed
//! stores at phase changes and as bytes move, never under a lock.
//!
//! Closing is done with `shutdown(2)` on both sockets, which wakes the connection wherever it
//! is (a relay thread, or the parking lot: a hang-up is reported however a socket is armed) and
//! makes it finish; the sockets are owned by the entry, behind an `Arc`, so a descriptor is
//! never shut down after its number was reused by another connection.

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::backends::backend::Backend;
use crate::backends::routing::AppRoute;

/// Where an open connection is in its life, as `show conns` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its ClientHello (or about to pick its app).
    Greeting = 0,
    /// Waiting for a slot of its app's MaxConnections.
    Queued = 1,
    /// Looking up and connecting to a target.
    Connecting = 2,
    /// Moving bytes.
    Relaying = 3,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Greeting => "greeting",
            Phase::Queued => "queued",
            Phase::Connecting => "connecting",
            Phase::Relaying => "relaying",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Queued,
            2 => Phase::Connecting,
            3 => Phase::Relaying,
            _ => Phase::Greeting,
        }
    }
}

/// Why the proxy cut a connection, for its log line's `end=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Its port was removed, or the proxy stops or upgrades, and its drain deadline passed.
    Drained = 1,
    /// An operator ended it (`kill conn`, `kill conns`).
    Killed = 2,
}

/// An open connection's sockets, where a drain reaches them, its drain state, and what the
/// admin socket shows of it.
pub struct OpenConn {
    /// Its number in this process, as `show conns` lists it and `kill conn` takes it.
    pub id: u64,
    /// The frontend port the client connected to.
    pub port: u16,
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub accepted: Instant,
    /// Set once the backend is connected.
    pub backend: OnceLock<TcpStream>,
    /// When this connection is to be cut, if it is draining.
    drain_at: Mutex<Option<Instant>>,
    /// Set (to a `Cut`) when the proxy cut the connection, so its log line says why.
    cut: AtomicU8,
    /// Its app, once its greeting picked it; its target, once connected.
    pub app: OnceLock<Arc<AppRoute>>,
    pub target: OnceLock<Arc<Backend>>,
    phase: AtomicU8,
    /// Bytes delivered client to target and back, and when the last one moved (milliseconds
    /// after `accepted`), as the relay last published them.
    up: AtomicU64,
    down: AtomicU64,
    active_ms: AtomicU64,
}

impl OpenConn {
    /// True once the proxy cut it (a drain, or an operator): it must end.
    pub fn was_drained(&self) -> bool {
        self.cut.load(Ordering::Acquire) != 0
    }

    /// The `end=` of a connection the proxy cut: `drained` or `killed`.
    pub fn cut_end(&self) -> &'static str {
        if self.cut.load(Ordering::Acquire) == Cut::Killed as u8 {
            "killed"
        } else {
            "drained"
        }
    }

    /// End it now: both sockets shut down, which wakes it wherever it waits.
    pub fn cut(&self, why: Cut) {
        // The first reason stays: a drain that cut it is not turned into a kill.
        let _ = self
            .cut
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(b) = self.backend.get() {
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The relay moved bytes: `up` and `down` delivered so far in all, at `now`. Three
    /// relaxed stores, on the relay's path only when bytes moved.
    pub fn moved(&self, up: u64, down: u64, now: Instant) {
        self.up.store(up, Ordering::Relaxed);
        self.down.store(down, Ordering::Relaxed);
        let ms = now.saturating_duration_since(self.accepted).as_millis() as u64;
        self.active_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes delivered client to target, and back, as last published.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    /// How long since a byte last moved (since the accept if none has).
    pub fn idle(&self, now: Instant) -> Duration {
        let at = self.accepted + Duration::from_millis(self.active_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(at)
    }
}

#[derive(Default)]
pub struct Conns {
    next_id: AtomicU64,
    map: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    open: HashMap<u64, Arc<OpenConn>>,
    /// Drains still running, so that a connection accepted before a drain began but
    /// registered after it (its relay thread was just starting) gets the deadline too.
    rules: Vec<Rule>,
}

struct Rule {
    began: Instant,
    ports: Ports,
    at: Instant,
}

/// Which connections a drain is for.
pub enum Ports {
    All,
    Some(HashSet<u16>),
}

impl Ports {
    fn contains(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Some(set) => set.contains(&port),
        }
    }
}

/// Keeps a connection in the table while it lives; dropping it removes the entry.
pub struct Registered {
    conns: Arc<Conns>,
    id: u64,
    pub entry: Arc<OpenConn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section is a single map operation: a poisoned map is still whole.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a connection from `peer` accepted at `accepted` on `port`.
    pub fn register(
        self: &Arc<Self>,
        port: u16,
        client: TcpStream,
        peer: SocketAddr,
        accepted: Instant,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        let at = table
            .rules
            .iter()
            .filter(|r| r.began >= accepted && r.ports.contains(port))
            .map(|r| r.at)
            .min();
        let entry = Arc::new(OpenConn {
            id,
            port,
            client,
            peer,
            accepted,
            backend: OnceLock::new(),
            drain_at: Mutex::new(at),
            cut: AtomicU8::new(0),
            app: OnceLock::new(),
            target: OnceLock::new(),
            phase: AtomicU8::new(Phase::Greeting as u8),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            active_ms: AtomicU64::new(0),
        });
        table.open.insert(id, Arc::clone(&entry));
        drop(table);
        if at.is_some_and(|at| at <= Instant::now()) {
            // Its drain ran out before it even started.
            entry.cut(Cut::Drained);
        }
        Registered {
            conns: Arc::clone(self),
            id,
            entry,
        }
    }

    /// Give every open connection on `ports` until `at` to finish. A deadline already set is
    /// kept if it is earlier. Connections accepted before now but not registered yet get it
    /// when they register.
    pub fn drain(&self, ports: Ports, at: Instant) -> usize {
        let mut table = self.lock();
        let mut n = 0;
        for e in table.open.values().filter(|e| ports.contains(e.port)) {
            let mut d = e.drain_at.lock().unwrap_or_else(|e| e.into_inner());
            if d.is_none_or(|d| d > at) {
                *d = Some(at);
            }
            n += 1;
        }
        table.rules.push(Rule {
            began: Instant::now(),
            ports,
            at,
        });
        n
    }

    /// Cut the connections whose deadline has passed; return how many, and the next deadline.
    pub fn cut_expired(&self, now: Instant) -> (usize, Option<Instant>) {
        /// A rule outlives its deadline this long, for connections that register late.
        const RULE_GRACE: Duration = Duration::from_secs(60);
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let mut later = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        {
            let mut table = self.lock();
            for e in table.open.values() {
                let at = *e.drain_at.lock().unwrap_or_else(|e| e.into_inner());
                match at {
                    Some(at) if at <= now => due.push(Arc::clone(e)),
                    Some(at) => later(at),
                    None => {}
                }
            }
            table.rules.retain(|r| r.at + RULE_GRACE > now);
            for r in table.rules.iter().filter(|r| r.at > now) {
                later(r.at);
            }
        }
        // Shut down outside the lock: relay threads finishing now need it to unregister.
        for e in &due {
            e.cut(Cut::Drained);
        }
        (due.len(), next)
    }

    /// The open connections `keep` selects, by id (copies of their entries: the table's
    /// lock is held only while they are picked).
    pub fn select(&self, keep: impl Fn(&OpenConn) -> bool) -> Vec<Arc<OpenConn>> {
        let table = self.lock();
        let mut picked: Vec<Arc<OpenConn>> =
            table.open.values().filter(|e| keep(e)).cloned().collect();
        drop(table);
        picked.sort_unstable_by_key(|e| e.id);
        picked
    }

    /// The open connection numbered `id`, if there is one.
    pub fn get(&self, id: u64) -> Option<Arc<OpenConn>> {
        self.lock().open.get(&id).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }
}
