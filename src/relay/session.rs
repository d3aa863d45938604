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
    /// The app's limit has been checked (it may have none).
    app_checked: bool,
}

impl ClientSlots {
    /// Count a new connection from `peer` under the global limit and, when the app is known at
    /// accept, under `app`'s. Err names the limit already reached for this client and its
    /// value (nothing stays counted then). Where the app is only known once the server name
    /// is read, `take_app` counts it then.
    pub fn take(
        global: Option<&Arc<ClientCounts>>,
        app: Option<&AppRoute>,
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
        let mut slots = ClientSlots {
            _global: global,
            _app: None,
            app_checked: false,
        };
        if let Some(app) = app {
            slots.take_app(app, peer)?;
        }
        Ok(slots)
    }

    /// Count the connection under `app`'s `MaxConnectionsPerClient`, once.
    pub fn take_app(
        &mut self,
        app: &AppRoute,
        peer: SocketAddr,
    ) -> Result<(), (&'static str, usize)> {
        if self.app_checked {
            return Ok(());
        }
        if let Some(c) = &app.per_client {
            let slot = c
                .acquire(ClientKey::of(peer.ip()))
                .ok_or(("the app's MaxConnectionsPerClient", c.limit()))?;
            self._app = Some(slot);
        }
        self.app_checked = true;
        Ok(())
    }
}

/// What every session reads besides its own job: the options in force, and the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
    /// Connections no app took, by port and reason.
    pub unrouted: Arc<UnroutedCounts>,
}

/// The conn line of a connection no app took: `end` (no_route, or drained meanwhile) and why.
fn log_unrouted(
    client_addr: &str,
    port: u16,
    accepted: Instant,
    end: &str,
    why: Unrouted,
    sni: Option<&str>,
) {
    let mut fields = vec![
        ("app", Field::Str("-")),
        ("client", Field::Str(client_addr)),
        ("port", Field::Num(u64::from(port))),
        ("target", Field::Str("-")),
        ("up", Field::Num(0)),
        ("down", Field::Num(0)),
        ("duration", Field::Secs(accepted.elapsed().as_secs_f64())),
        ("end", Field::Str(end)),
        ("reason", Field::Str(why.as_str())),
        ("detail", Field::Str(why.describe())),
    ];
    if let Some(name) = sni {
        fields.push(("sni", Field::Str(name)));
    }
    log::record(Level::Warn, "conn", &fields);
}

/// What goes to the target before relaying: the PROXY header if the app sends one, then the
/// client's bytes read for its server name. The reason, if the target would not take them.
fn send_preamble(
    backend: &TcpStream,
    app: &AppRoute,
    peer: SocketAddr,
    local: SocketAddr,
    first_bytes: &[u8],
    cx: &Context,
) -> Result<(), String> {
    // Writing needs only a shared reference (`Write` is implemented for `&TcpStream`).
    let mut to = backend;
    if let Some(version) = app.proxy_protocol {
        // Sent while the socket is still blocking: a header this small always fits in a fresh
        // socket's send buffer, so this cannot stall. The destination is what the client
        // dialled: the accepted socket's local address, in both modes.
        to.write_all(&proxy_protocol::header(version, peer, local))
            .map_err(|e| format!("sending the PROXY header: {e}"))?;
    }
    if !first_bytes.is_empty() {
        // The bytes read for the server name go first, unchanged. Still blocking, with the
        // connect timeout as a bound: at most MAX_PREREAD bytes to a fresh connection, which
        // its send buffer and the target's window take at once unless the target is broken.
        let _ = backend.set_write_timeout(Some(cx.settings.connect_timeout));
        to.write_all(first_bytes)
            .map_err(|e| format!("sending the client's first bytes: {e}"))?;
        let _ = backend.set_write_timeout(None);
    }
    Ok(())
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
    sni: Option<&str>,
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
    if let Some(name) = sni {
        fields.push(("sni", Field::Str(name)));
    }
    log::record(level, "conn", &fields);
}

/// A connection closed at accept because its client address already has `limit` connections
/// open under `which` limit: counted and logged as `end=client_limit`. Called by the listener
/// loop instead of handing the connection on.
/// `app` is None where the app is not known yet (it would be picked by the server name).
pub fn refuse_client_limit(
    app: Option<&AppRoute>,
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    reached: (&str, usize),
) {
    let accepted = Instant::now();
    drop(client);
    client_limited(app, &peer.to_string(), port, accepted, reached, None);
}

/// Count and log a connection refused by a per-client limit.
fn client_limited(
    app: Option<&AppRoute>,
    client: &str,
    port: u16,
    accepted: Instant,
    (which, limit): (&str, usize),
    sni: Option<&str>,
) {
    if let Some(app) = app {
        app.stats.accepted.fetch_add(1, Ordering::Relaxed);
        app.stats.client_limited.fetch_add(1, Ordering::Relaxed);
    }
    let reason = format!("the client address has {limit} connections open ({which})");
    log_conn(
        app.map_or("-", |a| a.name.as_str()),
        client,
        port,
        "-",
        (0, 0),
        accepted,
        "client_limit",
        Some(&reason),
        sni,
    );
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
        mut client_slots,
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
            drop(client_slots);
            let end = if entry.was_drained() {
                "drained"
            } else {
                cx.unrouted.count(port, why);
                "no_route"
            };
            return log_unrouted(&client_addr, port, accepted, end, why, sni.as_deref());
        }
    };
    // The app's per-client limit, where the app was only known now.
    if let Err(reached) = client_slots.take_app(&app, peer) {
        drop(client_slots);
        return client_limited(
            Some(&app),
            &client_addr,
            port,
            accepted,
            reached,
            sni.as_deref(),
        );
    }
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
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
            sni.as_deref(),
        );
    };

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
    if let Err(reason) = send_preamble(&backend, &app, peer, local, &first_bytes, cx) {
        return end(&target, 0, 0, "reset", Some(reason));
    }
    target_state
        .bytes_up
        .fetch_add(first_bytes.len() as u64, Ordering::Relaxed);
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
