//! One client connection's life, run on a relay thread: connect to a backend of its app,
//! relay until done, and log how it ended. The same code serves both modes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;

use crate::backends::balance;
use crate::backends::proxy_protocol;
use crate::backends::routing::{AppRoute, Binding, Unrouted, UnroutedCounts};
use crate::cli::Settings;
use crate::ops::log::{self, Field, Level};
use crate::relay::conns::Conns;
use crate::relay::preread::{self, Hello};
use crate::relay::transfer as relay;

/// An accepted client connection, on its way to a relay thread.
pub struct Job {
    pub client: TcpStream,
    pub peer: SocketAddr,
    /// The address and port the client dialled (canonical: IPv4 as IPv4).
    pub local: SocketAddr,
    /// The apps on that address and port; the relay thread picks one.
    pub binding: Arc<Binding>,
    pub accepted: Instant,
}

/// What every session reads besides its own job: the options in force, and the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
    /// Connections no app took, by port and reason.
    pub unrouted: Arc<UnroutedCounts>,
}

/// The app a connection goes to, and what was read from it to decide.
struct Choice {
    app: Result<Arc<AppRoute>, Unrouted>,
    /// Bytes read for the server name, to be sent to the target first.
    first_bytes: Vec<u8>,
    /// The server name as the client sent it, if one was read.
    sni: Option<String>,
}

/// Pick the app on `binding`: the only one, or, where Hostnames tell apps apart, by the server
/// name of the ClientHello read from `client` within `timeout`.
fn choose(binding: &Binding, client: &TcpStream, timeout: std::time::Duration) -> Choice {
    if !binding.needs_server_name() {
        return Choice {
            app: binding.default_app().cloned().ok_or(Unrouted::NoServerName),
            first_bytes: Vec::new(),
            sni: None,
        };
    }
    let (hello, first_bytes) = preread::read_hello(client, timeout);
    let (app, sni) = match hello {
        Hello::Name { sent, name } => {
            let app = match &name {
                Some(n) => binding.for_name(n),
                // Not a DNS name: no configured hostname can match it.
                None => binding.without_name(Unrouted::UnknownServerName),
            };
            (app, Some(sent))
        }
        Hello::NoName => (binding.without_name(Unrouted::NoServerName), None),
        Hello::NotTls => (binding.without_name(Unrouted::NotTls), None),
        Hello::TooLarge => (binding.without_name(Unrouted::TooLarge), None),
        // Never routed to the default: a client that has not finished its hello has not
        // asked for anything yet.
        Hello::Timeout => (Err(Unrouted::PrereadTimeout), None),
        Hello::Closed => (Err(Unrouted::ClientClosed), None),
    };
    Choice {
        app: app.cloned(),
        first_bytes,
        sni,
    }
}

/// Pick the app of `job` (reading its ClientHello first where apps share the binding by
/// Hostnames), connect to a backend of it, relay until either side is done, and log how it
/// ended.
pub fn serve(job: Job, cx: &Context) {
    let Job {
        client,
        peer,
        local,
        binding,
        accepted,
    } = job;
    let port = local.port();
    let client_addr = peer.to_string();
    // TCP_NODELAY: we forward whatever arrives at once; Nagle would only add latency.
    let _ = client.set_nodelay(true);

    // Registered first, so that a drain (its port removed, shutdown, upgrade) reaches the
    // connection even while it waits for its ClientHello or for a slot of its app.
    let reg = cx.conns.register(port, client, accepted);
    let entry = &reg.entry;

    let Choice {
        app,
        first_bytes,
        sni,
    } = choose(&binding, &entry.client, cx.settings.preread_timeout);
    let app = match app {
        Ok(app) => app,
        Err(why) => {
            let end = if entry.was_drained() {
                "drained"
            } else {
                cx.unrouted.count(port, why);
                "no_route"
            };
            let mut fields = vec![
                ("app", Field::Str("-")),
                ("client", Field::Str(&client_addr)),
                ("port", Field::Num(u64::from(port))),
                ("target", Field::Str("-")),
                ("up", Field::Num(0)),
                ("down", Field::Num(0)),
                ("duration", Field::Secs(accepted.elapsed().as_secs_f64())),
                ("end", Field::Str(end)),
                ("reason", Field::Str(why.as_str())),
                ("detail", Field::Str(why.describe())),
            ];
            if let Some(name) = &sni {
                fields.push(("sni", Field::Str(name)));
            }
            return log::record(Level::Warn, "conn", &fields);
        }
    };
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
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
        if let Some(name) = &sni {
            fields.push(("sni", Field::Str(name)));
        }
        log::record(level, "conn", &fields);
    };

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
        // socket's send buffer, so this cannot stall. The destination is what the client
        // dialled: the accepted socket's local address, in both modes.
        let sent = (&backend).write_all(&proxy_protocol::header(version, peer, local));
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
    if !first_bytes.is_empty() {
        // The bytes read for the server name go first, unchanged. Still blocking, with the
        // connect timeout as a bound: at most MAX_PREREAD bytes to a fresh connection, which
        // its send buffer and the target's window take at once unless the target is broken.
        let _ = backend.set_write_timeout(Some(cx.settings.connect_timeout));
        if let Err(e) = (&backend).write_all(&first_bytes) {
            return end(
                &target,
                0,
                0,
                "reset",
                Some(format!("sending the client's first bytes: {e}")),
            );
        }
        let _ = backend.set_write_timeout(None);
        target_state
            .bytes_up
            .fetch_add(first_bytes.len() as u64, Ordering::Relaxed);
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
    end(
        &target,
        outcome.up + first_bytes.len() as u64,
        outcome.down,
        how,
        None,
    );
}
