//! The table of open client connections, so that the listener loop can drain them: those of a
//! port removed by a reload, or all of them at shutdown, are closed once their drain deadline
//! passes.
//!
//! Closing is done with `shutdown(2)` on both sockets, which wakes the connection wherever it
//! is (a relay thread, or the parking lot: a hang-up is reported however a socket is armed) and
//! makes it finish; the sockets are owned by the entry, behind an `Arc`, so a descriptor is
//! never shut down after its number was reused by another connection.

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// An open connection's sockets, where a drain reaches them, and its drain state.
pub struct OpenConn {
    /// The frontend port the client connected to.
    pub port: u16,
    pub client: TcpStream,
    /// Set once the backend is connected.
    pub backend: OnceLock<TcpStream>,
    /// When this connection is to be cut, if it is draining.
    drain_at: Mutex<Option<Instant>>,
    /// Set when the proxy cut the connection, so its log line says `drained`.
    drained: AtomicBool,
}

impl OpenConn {
    pub fn was_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    fn cut(&self) {
        self.drained.store(true, Ordering::Release);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(b) = self.backend.get() {
            let _ = b.shutdown(Shutdown::Both);
        }
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

    /// Add a connection accepted at `accepted` on `port`.
    pub fn register(
        self: &Arc<Self>,
        port: u16,
        client: TcpStream,
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
            port,
            client,
            backend: OnceLock::new(),
            drain_at: Mutex::new(at),
            drained: AtomicBool::new(false),
        });
        table.open.insert(id, Arc::clone(&entry));
        drop(table);
        if at.is_some_and(|at| at <= Instant::now()) {
            // Its drain ran out before it even started.
            entry.cut();
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
            e.cut();
        }
        (due.len(), next)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }
}
