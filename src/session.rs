//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;

use crate::backend;
use crate::cli::Settings;
use crate::conns::Conns;
use crate::log::Level;
use crate::relay;
use crate::routing::AppRoute;
use crate::{ports, proxy_protocol};

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
    let end = |target: &str, up: u64, down: u64, end: &str, reason: Option<String>| {
        let level = if reason.is_some() {
            Level::Warn
        } else {
            Level::Info
        };
        crate::log_at!(
            level,
            "conn app={} client={peer} port={port} target={target} up={up} down={down} duration={:.3}s end={end}{}",
            app.name,
            accepted.elapsed().as_secs_f64(),
            reason.map(|r| format!(" reason=\"{r}\"")).unwrap_or_default()
        );
    };
    // TCP_NODELAY: we forward whatever arrives at once; Nagle would only add latency.
    let _ = client.set_nodelay(true);

    // The app's own bound, if it has one: wait for a slot as long as a connect may take.
    let _slot = match &app.limit {
        None => None,
        Some(limit) => match limit.acquire(shared.settings.connect_timeout) {
            Some(slot) => Some(slot),
            None => {
                let reason = "the app's MaxConnections stayed reached for the connect timeout";
                return end("-", 0, 0, "limit", Some(reason.into()));
            }
        },
    };

    let reg = shared.conns.register(port, client);
    let entry = &reg.entry;
    let (backend, guard) = match backend::connect(&app, shared.settings.connect_timeout) {
        Ok(ok) => ok,
        Err(failed) => return end("-", 0, 0, "connect_failed", Some(failed.to_string())),
    };
    let target = guard.backend().target.to_string();
    if let Some(version) = app.proxy_protocol {
        // Sent while the socket is still blocking: a header this small always fits in a fresh
        // socket's send buffer, so this cannot stall.
        let frontend = entry.client.local_addr().map(ports::canonical);
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
    let outcome = relay::relay(&entry.client, backend, shared.settings.idle_timeout);
    let how = if entry.was_drained() {
        "drained"
    } else {
        outcome.end.as_str()
    };
    end(&target, outcome.up, outcome.down, how, None);
}
