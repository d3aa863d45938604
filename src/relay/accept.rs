//! Accepting, on the relay threads: a thread that the parking lot tells of connections waiting
//! on a door accepts a batch of them, and for each does the accept-time work (its app's
//! binding by the address it dialled, the per-client limits, a slot under the connection bound).
//! It re-arms the door once the batch is over (whichever thread is free next takes the rest),
//! then starts the first session on itself and queues the others for whichever thread is free
//! first (`relay::session`).
//!
//! Accepting pauses, the door left unarmed, while every slot of the bound is taken (the
//! listener loop, woken by the slot given back at the bound, resumes it: `resume`) and after an
//! accept error such as EMFILE, for a back-off that doubles up to a second (the loop resumes it
//! when that has passed). Connections wait in the kernel's backlog meanwhile.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backends::clients::ClientCounts;
use crate::backends::routing::{Binding, Routes, Unrouted, UnroutedCounts};
use crate::relay::doors::{Accepted, Door, Doors};
use crate::relay::per_client::{self, ClientSlots};
use crate::relay::slots::Slots;

/// Connections accepted from a door before the thread re-arms it and runs what else is ready:
/// small enough that connections already open are not kept waiting behind a burst of new ones
/// (each new one runs up to its connect before the next is accepted).
const BATCH: usize = 16;

/// An accepted client connection, about to start its session.
pub struct Incoming {
    pub client: TcpStream,
    pub peer: SocketAddr,
    /// The address and port the client dialled (canonical: IPv4 as IPv4).
    pub local: SocketAddr,
    /// The apps on that address and port; the session picks one.
    pub binding: Arc<Binding>,
    pub accepted: Instant,
    /// The client's counts under the per-client limits in force, given back as the
    /// connection ends, however it ends.
    pub client_slots: ClientSlots,
}

/// What accepting reads and shares: the doors, the routing table in force, the bounds.
pub struct Accepting {
    doors: Arc<Doors>,
    /// Swapped by the listener loop on reload (`set_routes`); locked for one lookup.
    routes: Mutex<Arc<Routes>>,
    slots: Arc<Slots>,
    /// With --max-connections-per-client; None without a limit.
    clients: Option<Arc<ClientCounts>>,
    unrouted: Arc<UnroutedCounts>,
    /// Accepting is paused at the connection bound (published, for metrics and the status
    /// page).
    paused: Arc<AtomicBool>,
    held: Mutex<Held>,
    /// An accept error's back-off is running (or was, and no accept has succeeded since):
    /// the lock is only taken then.
    backing_off: AtomicBool,
}

/// Doors left unarmed, and the back-off after an accept error.
#[derive(Default)]
struct Held {
    doors: Vec<Arc<Door>>,
    backoff: Duration,
    until: Option<Instant>,
}

impl Accepting {
    pub fn new(
        doors: Arc<Doors>,
        routes: Arc<Routes>,
        slots: Arc<Slots>,
        clients: Option<Arc<ClientCounts>>,
        unrouted: Arc<UnroutedCounts>,
        paused: Arc<AtomicBool>,
    ) -> Accepting {
        Accepting {
            doors,
            routes: Mutex::new(routes),
            slots,
            clients,
            unrouted,
            paused,
            held: Mutex::new(Held::default()),
            backing_off: AtomicBool::new(false),
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // Every critical section is a few field updates: a poisoned lock is still whole.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route new connections by `routes` from now on; the table that was in force comes back
    /// (for the caller to drop where it costs nothing).
    pub fn set_routes(&self, routes: Arc<Routes>) -> Arc<Routes> {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *r, routes)
    }

    /// The batch of connections waiting on door `key`; None if it was closed meanwhile.
    pub fn batch(&self, key: u64) -> Option<Batch<'_>> {
        let door = self.doors.get(key)?;
        Some(Batch {
            accepting: self,
            door,
            accepted: 0,
            done: false,
        })
    }

    /// When the back-off after an accept error ends, if one runs.
    pub fn backoff_until(&self) -> Option<Instant> {
        if !self.backing_off.load(Ordering::Acquire) {
            return None;
        }
        self.held().until
    }

    /// Arm the doors left unarmed again if accepting may go on: below the bound, and past the
    /// back-off. Called by the listener loop when a slot came back at the bound, and when the
    /// back-off ends.
    pub fn resume(&self, now: Instant) {
        if self.slots.is_full() {
            return;
        }
        let mut held = self.held();
        if held.until.is_some_and(|t| now < t) {
            return;
        }
        held.until = None;
        let doors = std::mem::take(&mut held.doors);
        drop(held);
        if self.paused.swap(false, Ordering::Relaxed) {
            crate::info!("below the connection limit again: accepting");
        }
        for door in doors {
            door.rearm(self.doors.listeners());
        }
    }

    /// Leave `door` unarmed: every slot is taken.
    fn pause_at_bound(&self, door: &Arc<Door>) {
        self.held().doors.push(Arc::clone(door));
        if !self.paused.swap(true, Ordering::Relaxed) {
            crate::warn!(
                "connection limit reached ({}): new connections wait in the kernel backlog",
                self.slots.max()
            );
        }
        // A slot given back before the door was held woke the loop for nothing: look again.
        if !self.slots.is_full() {
            self.resume(Instant::now());
        }
    }

    /// Whether a back-off runs; if so, `door` is held until it ends.
    fn holds(&self, door: &Arc<Door>) -> bool {
        if !self.backing_off.load(Ordering::Acquire) {
            return false;
        }
        let mut held = self.held();
        if held.until.is_none_or(|t| Instant::now() >= t) {
            return false;
        }
        held.doors.push(Arc::clone(door));
        true
    }

    /// An accept succeeded: the back-off starts from nothing at the next error.
    fn accepted(&self) {
        if self.backing_off.load(Ordering::Acquire) {
            let mut held = self.held();
            if held.until.is_none() {
                held.backoff = Duration::ZERO;
                self.backing_off.store(false, Ordering::Release);
            }
        }
    }

    /// Decide what an accept error means; true if `door` is held for a back-off.
    fn accept_error(&self, e: io::Error, door: &Arc<Door>) -> bool {
        match e.raw_os_error() {
            // The client gave up before we got to it, or a signal: nothing wrong with us.
            Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO) => false,
            // Out of descriptors or memory: the connection stays queued in the kernel. Back off
            // (doubling up to a second) instead of spinning on the same error.
            _ => {
                let mut held = self.held();
                held.backoff =
                    (held.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                held.until = Some(Instant::now() + held.backoff);
                held.doors.push(Arc::clone(door));
                let backoff = held.backoff;
                self.backing_off.store(true, Ordering::Release);
                drop(held);
                crate::error!("accept failed: {e}; pausing accepts for {backoff:?}");
                // The loop resumes accepting when the back-off ends: it must know when.
                self.slots.wake_loop();
                true
            }
        }
    }

    /// The accept-time work for one connection: its binding by the address it dialled, and
    /// its counts under the per-client limits. None if it was closed here (no app on that
    /// address, a client at its limit); it then holds no slot.
    fn admit(&self, conn: Accepted) -> Option<Incoming> {
        let port = conn.local.port();
        let binding = {
            let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let Some(table) = routes.port(port) else {
                // bpf mode, a port removed from the config while the kernel still queued a
                // connection for it. Closing it is what a removed listener would have done.
                crate::debug!(
                    "conn client={} port={port}: port no longer configured, closed",
                    conn.peer,
                );
                return None;
            };
            table.lookup(conn.local.ip()).cloned()
        };
        let Some(binding) = binding else {
            // A wildcard listener of the port took a connection to an address no app on it
            // answers (simple mode), or the config changed while it was queued: reset at once,
            // as a refused connection would be.
            self.unrouted.count(port, Unrouted::NoApp);
            crate::debug!(
                "conn client={} local={}: no app on this address, reset",
                conn.peer,
                conn.local
            );
            crate::sys::net::reset(conn.stream);
            return None;
        };
        // Per-client limits first, before the connection costs anything more: a client at its
        // limit is closed at once. Where the app is picked by the server name, only the global
        // limit and the largest of the apps' (if every app has one) are known yet; the session
        // checks the app's.
        let app = (!binding.needs_server_name())
            .then(|| binding.default_app())
            .flatten();
        let apps = binding.per_client.as_ref();
        let client_slots =
            match ClientSlots::take(self.clients.as_ref(), apps, app.map(|a| &**a), conn.peer) {
                Ok(slots) => slots,
                Err(reached) => {
                    per_client::refuse_client_limit(
                        app.map(|a| &**a),
                        conn.stream,
                        conn.peer,
                        port,
                        reached,
                    );
                    return None;
                }
            };
        Some(Incoming {
            client: conn.stream,
            peer: conn.peer,
            local: conn.local,
            binding,
            accepted: Instant::now(),
            client_slots,
        })
    }
}

/// The connections a thread accepts from one door before it arms it again.
pub struct Batch<'a> {
    accepting: &'a Accepting,
    door: Arc<Door>,
    accepted: usize,
    /// The door was re-armed or held: nothing more to do with it.
    done: bool,
}

impl Batch<'_> {
    /// The next connection, with a slot of the bound taken for it (the session gives it back
    /// as it ends); None once the batch is over, the door re-armed or held.
    pub fn take(&mut self) -> Option<Incoming> {
        let a = self.accepting;
        while !self.done {
            if self.accepted == BATCH {
                self.stop();
                break;
            }
            if a.holds(&self.door) {
                self.done = true;
                break;
            }
            // Taken before the accept, so that threads accepting at once never pass the bound.
            if !a.slots.try_take() {
                a.pause_at_bound(&self.door);
                self.done = true;
                break;
            }
            match self.door.accept() {
                Ok(Some(conn)) => {
                    self.accepted += 1;
                    a.accepted();
                    match a.admit(conn) {
                        Some(incoming) => return Some(incoming),
                        None => a.slots.release(),
                    }
                }
                Ok(None) => {
                    a.slots.release();
                    self.stop();
                }
                Err(e) => {
                    a.slots.release();
                    if a.accept_error(e, &self.door) {
                        self.done = true;
                    }
                }
            }
        }
        None
    }

    /// Done with the door before it said nothing waits (the batch is full, or the thread is
    /// needed elsewhere): arm it again, so that whichever thread is free takes the rest.
    pub fn stop(&mut self) {
        if !self.done {
            self.done = true;
            self.door.rearm(self.accepting.doors.listeners());
        }
    }
}

impl Drop for Batch<'_> {
    /// A batch left early (a panic in a session's first step) still re-arms its door.
    fn drop(&mut self) {
        self.stop();
    }
}
