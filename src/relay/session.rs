//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;

use crate::backends::balance;
use crate::backends::proxy_protocol;
use crate::backends::routing::AppRoute;
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

/// What every session reads besides its own job: the options in force, and the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
}

/// Connect `job` to a backend of its app, relay until either side is done, and log how it
/// ended.
pub fn serve(job: Job, cx: &Context) {
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
    let reg = cx.conns.register(port, client, accepted);
    let entry = &reg.entry;

    // The app's own bound, if it has one: wait for a slot as long as a connect may take.
    let _slot = match &app.limit {
        None => None,
        Some(limit) => match limit.acquire(cx.settings.connect_timeout, || entry.was_drained()) {
            Some(slot) => Some(slot),
            None if entry.was_drained() => return end("-", 0, 0, "drained", None),
            None => {
                stats.limited.fetch_add(1, Ordering::Relaxed);
                let reason = "the app's MaxConnections stayed reached for the connect timeout";
                return end("-", 0, 0, "limit", Some(reason.into()));
            }
        },
    };
    let (backend, guard) = match balance::connect(&app, cx.settings.connect_timeout) {
        Ok(ok) => ok,
        Err(failed) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
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
        cx.settings.idle_timeout,
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
