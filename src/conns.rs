//! The table of open client connections, so that the listener loop can drain them: those of a
//! port removed by a reload, or all of them at shutdown, are closed once their drain deadline
//! passes.
//!
//! Closing is done with `shutdown(2)` on both sockets, which wakes the relay thread's `poll`
//! and makes it finish; the sockets are owned by the entry, behind an `Arc`, so a descriptor is
//! never shut down after its number was reused by another connection.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

pub struct Entry {
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

impl Entry {
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
    map: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// Keeps a connection in the table while it lives; dropping it removes the entry.
pub struct Registered<'a> {
    conns: &'a Conns,
    id: u64,
    pub entry: Arc<Entry>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // Every critical section is a single map operation: a poisoned map is still whole.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, port: u16, client: TcpStream) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            port,
            client,
            backend: OnceLock::new(),
            drain_at: Mutex::new(None),
            drained: AtomicBool::new(false),
        });
        self.lock().insert(id, Arc::clone(&entry));
        Registered {
            conns: self,
            id,
            entry,
        }
    }

    /// Give every open connection on a port for which `on_port` is true (every connection, for
    /// shutdown) until `at` to finish. A deadline already set is kept if it is earlier.
    pub fn drain(&self, on_port: impl Fn(u16) -> bool, at: Instant) -> usize {
        let map = self.lock();
        let mut n = 0;
        for e in map.values().filter(|e| on_port(e.port)) {
            let mut d = e.drain_at.lock().unwrap_or_else(|e| e.into_inner());
            if d.is_none_or(|d| d > at) {
                *d = Some(at);
            }
            n += 1;
        }
        n
    }

    /// Cut the connections whose deadline has passed; return how many, and the next deadline.
    pub fn cut_expired(&self, now: Instant) -> (usize, Option<Instant>) {
        let due: Vec<Arc<Entry>>;
        let mut next = None;
        {
            let map = self.lock();
            let mut d = Vec::new();
            for e in map.values() {
                let at = *e.drain_at.lock().unwrap_or_else(|e| e.into_inner());
                match at {
                    Some(at) if at <= now => d.push(Arc::clone(e)),
                    Some(at) => next = Some(next.map_or(at, |n: Instant| n.min(at))),
                    None => {}
                }
            }
            due = d;
        }
        // Shut down outside the lock: relay threads finishing now need it to unregister.
        for e in &due {
            e.cut();
        }
        (due.len(), next)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}
