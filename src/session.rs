//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{self, ActiveGuard};
use crate::cli::Settings;
use crate::conns::Conns;
use crate::relay::{self, End};
use crate::routing::AppRoute;

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
    // TCP_NODELAY: we forward whatever arrives at once; Nagle would only add latency.
    let _ = client.set_nodelay(true);
    let reg = shared.conns.register(port, client);
    let entry = &reg.entry;

    let (backend, guard) = match backend::connect(&app.backends, shared.settings.connect_timeout) {
        Ok((stream, b)) => (stream, ActiveGuard::new(b)),
        Err(failed) => {
            crate::warn!(
                "conn app={} client={peer} port={port} target=- up=0 down=0 duration={:.3}s end=connect_failed reason=\"{failed}\"",
                app.name,
                accepted.elapsed().as_secs_f64()
            );
            return;
        }
    };
    let target = guard.backend().target.to_string();
    let _ = backend.set_nodelay(true);
    if let Err(e) = backend.set_nonblocking(true) {
        crate::error!(
            "conn app={} client={peer}: cannot make backend socket non-blocking: {e}",
            app.name
        );
        return;
    }
    let backend = entry.backend.get_or_init(|| backend);
    let outcome = if entry.was_drained() {
        // Cut while we were connecting: do not start relaying.
        relay::Outcome {
            up: 0,
            down: 0,
            end: End::Closed,
        }
    } else {
        relay::relay(&entry.client, backend, shared.settings.idle_timeout)
    };
    let end = if entry.was_drained() {
        "drained"
    } else {
        outcome.end.as_str()
    };
    crate::info!(
        "conn app={} client={peer} port={port} target={target} up={} down={} duration={:.3}s end={end}",
        app.name,
        outcome.up,
        outcome.down,
        accepted.elapsed().as_secs_f64()
    );
}
