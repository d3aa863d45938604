//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::io::Write;

use crate::backends::balance;
use crate::backends::proxy_protocol;
use crate::backends::routing::{AppRoute, Routes};
use crate::cli::Settings;
use crate::net;
use crate::ops::log::{self, Field, Level};
use crate::relay::conns::Conns;
use crate::relay::transfer as relay;

/// An accepted client connection, on its way to a relay thread.
pub struct Job {
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub port: u16,
    pub app: Arc<AppRoute>,
    pub accepted: Instant,
}

/// What the listener loop and the relay threads share.
pub struct Shared {
    pub settings: Settings,
    /// The connection bound actually in force (the option, lowered to fit the fd limit).
    pub max_connections: usize,
    pub conns: Conns,
    /// Connection slots taken: a slot is taken at accept and given back by the pool once the
    /// relay thread is idle again, so accepted connections never outnumber threads.
    pub active: AtomicUsize,
    /// Set once shutdown has begun, so that the last slot given back wakes the loop.
    pub stopping: AtomicBool,
    pub waker: mio::Waker,
    /// The routing table in force, published by the listener loop for metrics and status.
    pub routes: Mutex<Arc<Routes>>,
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// Unix time in milliseconds of the last successful (re)load.
    pub last_reload_ok_ms: AtomicU64,
    /// Accepting is held back by the connection bound.
    pub accept_paused: AtomicBool,
    /// A new process took over (upgrade): the metrics thread stops serving.
    pub handed_over: AtomicBool,
}

impl Shared {
    /// Give a slot back, waking the listener loop if it is waiting for one (paused at the
    /// bound, or draining for shutdown). Waking only then keeps the common path free of
    /// cross-thread wake-ups.
    pub fn release_slot(&self) {
        let before = self.active.fetch_sub(1, Ordering::AcqRel);
        if before == self.max_connections || self.stopping.load(Ordering::Acquire) {
            if let Err(e) = self.waker.wake() {
                crate::error!("cannot wake the listener loop: {e}");
            }
        }
    }
}

pub fn serve(job: Job, shared: &Shared) {
    let Job {
        client,
        peer,
        port,
        app,
        accepted,
    } = job;
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let client_addr = peer.to_string();
    let end = |target: &str, up: u64, down: u64, end: &str, reason: Option<String>| {
        stats.active.fetch_sub(1, Ordering::Relaxed);
        let level = if reason.is_some() {
            Level::Warn
        } else {
            Level::Info
        };
        let mut fields = vec![
            ("app", Field::Str(&app.name)),
            ("client", Field::Str(&client_addr)),
            ("port", Field::Num(u64::from(port))),
            ("target", Field::Str(target)),
            ("up", Field::Num(up)),
            ("down", Field::Num(down)),
            ("duration", Field::Secs(accepted.elapsed().as_secs_f64())),
            ("end", Field::Str(end)),
        ];
        if let Some(r) = &reason {
            fields.push(("reason", Field::Str(r)));
        }
        log::record(level, "conn", &fields);
    };
    // TCP_NODELAY: we forward whatever arrives at once; Nagle would only add latency.
    let _ = client.set_nodelay(true);

    // Registered first, so that a drain (its port removed, shutdown, upgrade) reaches the
    // connection even while it waits for a slot of its app.
    let reg = shared.conns.register(port, client, accepted);
    let entry = &reg.entry;

    // The app's own bound, if it has one: wait for a slot as long as a connect may take.
    let _slot = match &app.limit {
        None => None,
        Some(limit) => match limit.acquire(shared.settings.connect_timeout, || entry.was_drained())
        {
            Some(slot) => Some(slot),
            None if entry.was_drained() => return end("-", 0, 0, "drained", None),
            None => {
                stats.limited.fetch_add(1, Ordering::Relaxed);
                let reason = "the app's MaxConnections stayed reached for the connect timeout";
                return end("-", 0, 0, "limit", Some(reason.into()));
            }
        },
    };
    let (backend, guard) = match balance::connect(&app, shared.settings.connect_timeout) {
        Ok(ok) => ok,
        Err(failed) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            // Every target tried was this proxy itself: say so in one word, naming the first
            // (the `target ... is down` line gives the address it resolved to).
            if let Some(first) = failed.only_loops() {
                let target = first.to_string();
                return end(&target, 0, 0, "connect_failed", Some("loop".into()));
            }
            return end("-", 0, 0, "connect_failed", Some(failed.to_string()));
        }
    };
    let target_state = guard.backend();
    let target = target_state.target.to_string();
    if let Some(version) = app.proxy_protocol {
        // Sent while the socket is still blocking: a header this small always fits in a fresh
        // socket's send buffer, so this cannot stall.
        let frontend = entry.client.local_addr().map(net::canonical);
        let sent =
            frontend.and_then(|f| (&backend).write_all(&proxy_protocol::header(version, peer, f)));
        if let Err(e) = sent {
            return end(
                &target,
                0,
                0,
                "reset",
                Some(format!("sending the PROXY header: {e}")),
            );
        }
    }
    let _ = backend.set_nodelay(true);
    if let Err(e) = backend.set_nonblocking(true) {
        return end(&target, 0, 0, "reset", Some(format!("backend socket: {e}")));
    }
    let backend = entry.backend.get_or_init(|| backend);
    if entry.was_drained() {
        // Cut while we were connecting: do not start relaying.
        return end(&target, 0, 0, "drained", None);
    }
    let outcome = relay::relay(
        &entry.client,
        backend,
        shared.settings.idle_timeout,
        &target_state.bytes_up,
        &target_state.bytes_down,
    );
    let how = if entry.was_drained() {
        "drained"
    } else {
        outcome.end.as_str()
    };
    end(&target, outcome.up, outcome.down, how, None);
}
