//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;

use crate::backends::balance;
use crate::backends::clients::{ClientCounts, ClientKey, ClientSlot};
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
    /// The client's counts under the per-client limits in force, given back as the
    /// connection ends, however it ends.
    pub client_slots: ClientSlots,
}

/// A connection's place under `--max-connections-per-client` and its app's
/// `MaxConnectionsPerClient` (either may be absent).
#[derive(Debug, Default)]
pub struct ClientSlots {
    _global: Option<ClientSlot>,
    _app: Option<ClientSlot>,
}

impl ClientSlots {
    /// Count a new connection from `peer` to `app` under both limits. Err names the limit
    /// already reached for this client and its value (nothing stays counted then).
    pub fn take(
        global: Option<&Arc<ClientCounts>>,
        app: &AppRoute,
        peer: SocketAddr,
    ) -> Result<ClientSlots, (&'static str, usize)> {
        let key = ClientKey::of(peer.ip());
        let global = match global {
            Some(c) => Some(
                c.acquire(key)
                    .ok_or(("--max-connections-per-client", c.limit()))?,
            ),
            None => None,
        };
        let app = match &app.per_client {
            Some(c) => Some(
                c.acquire(key)
                    .ok_or(("the app's MaxConnectionsPerClient", c.limit()))?,
            ),
            None => None,
        };
        Ok(ClientSlots {
            _global: global,
            _app: app,
        })
    }
}

/// What every session reads besides its own job: the options in force, and the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
}

/// Write a connection's access-log line: a warning when `reason` says why it was refused or
/// failed.
#[allow(clippy::too_many_arguments)]
fn log_conn(
    app: &str,
    client: &str,
    port: u16,
    target: &str,
    (up, down): (u64, u64),
    accepted: Instant,
    end: &str,
    reason: Option<&str>,
) {
    let level = if reason.is_some() {
        Level::Warn
    } else {
        Level::Info
    };
    let mut fields = vec![
        ("app", Field::Str(app)),
        ("client", Field::Str(client)),
        ("port", Field::Num(u64::from(port))),
        ("target", Field::Str(target)),
        ("up", Field::Num(up)),
        ("down", Field::Num(down)),
        ("duration", Field::Secs(accepted.elapsed().as_secs_f64())),
        ("end", Field::Str(end)),
    ];
    if let Some(r) = reason {
        fields.push(("reason", Field::Str(r)));
    }
    log::record(level, "conn", &fields);
}

/// A connection closed at accept because its client address already has `limit` connections
/// open under `which` limit: counted and logged as `end=client_limit`. Called by the listener
/// loop instead of handing the connection on.
pub fn refuse_client_limit(
    app: &AppRoute,
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    (which, limit): (&str, usize),
) {
    let accepted = Instant::now();
    drop(client);
    app.stats.accepted.fetch_add(1, Ordering::Relaxed);
    app.stats.client_limited.fetch_add(1, Ordering::Relaxed);
    let reason = format!("the client address has {limit} connections open ({which})");
    log_conn(
        &app.name,
        &peer.to_string(),
        port,
        "-",
        (0, 0),
        accepted,
        "client_limit",
        Some(&reason),
    );
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
        client_slots,
    } = job;
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let client_addr = peer.to_string();
    // Given back as the connection ends, before its log line: a client that saw it end may
    // open another at once.
    let client_slots = std::cell::Cell::new(Some(client_slots));
    let end = |target: &str, up: u64, down: u64, end: &str, reason: Option<String>| {
        drop(client_slots.take());
        stats.active.fetch_sub(1, Ordering::Relaxed);
        log_conn(
            &app.name,
            &client_addr,
            port,
            target,
            (up, down),
            accepted,
            end,
            reason.as_deref(),
        );
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
            Ok(slot) => Some(slot),
            Err(_) if entry.was_drained() => return end("-", 0, 0, "drained", None),
            Err(denied) => {
                stats.limited.fetch_add(1, Ordering::Relaxed);
                return end("-", 0, 0, "limit", Some(denied.reason().into()));
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
