//! One client connection's life, run on relay threads: connect to a backend of its app, relay
//! until done, and log how it ended. The same code serves both modes.
//!
//! A connection that waits (no byte either way for `transfer::PARK_AFTER`) leaves its thread
//! and waits in the parking lot (`park`) as a `Session`, and comes back to a pool thread as a
//! `Task::Resume` when a socket wakes it; a busy one hands its thread on after a time slice
//! while others wait. Either way it stays registered and counted as open until it ends.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;

use crate::backends::backend::ActiveGuard;
use crate::backends::balance;
use crate::backends::proxy_protocol;
use crate::backends::routing::{AppRoute, LimitGuard};
use crate::cli::Settings;
use crate::net;
use crate::ops::log::{self, Field, Level};
use crate::relay::conns::{Conns, Registered};
use crate::relay::park::Lot;
use crate::relay::pool::Turn;
use crate::relay::slots::Slots;
use crate::relay::transfer::{Counters, Pause, Relay};

/// An accepted client connection, on its way to a relay thread.
pub struct Job {
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub port: u16,
    pub app: Arc<AppRoute>,
    pub accepted: Instant,
}

/// What a relay thread is given to run.
pub enum Task {
    /// A connection just accepted.
    New(Job),
    /// A connection that was parked or gave its thread up, to carry on.
    Resume(Box<Session>),
}

/// What every session reads besides its own job: the options in force, the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it, the
/// connection bound it gives its slot back to, and where it waits when idle.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
    pub slots: Arc<Slots>,
    pub lot: Arc<Lot<Box<Session>>>,
}

/// A connection being relayed: everything it holds between two runs on a thread.
pub struct Session {
    reg: Registered,
    app: Arc<AppRoute>,
    client_addr: String,
    port: u16,
    accepted: Instant,
    /// The app's MaxConnections slot, if it has the bound.
    _limit: Option<LimitGuard>,
    /// Counts the connection on its target (least-connections) and carries its byte counters.
    target: ActiveGuard,
    target_name: String,
    relay: Relay,
}

/// Run `task` on this thread until the connection ends, parks, or (past its time slice while
/// others wait) gives the thread up: then it is returned, to be continued after them.
pub fn run(task: Task, cx: &Context, turn: &Turn) -> Option<Task> {
    let session = match task {
        Task::New(job) => start(job, cx)?,
        Task::Resume(s) => s,
    };
    relay(session, cx, turn)
}

fn relay(mut s: Box<Session>, cx: &Context, turn: &Turn) -> Option<Task> {
    let idle = cx.settings.idle_timeout;
    loop {
        let Some(backend) = s.reg.entry.backend.get() else {
            // A Session is only made once the backend is set (see `start`).
            unreachable!("a session without its backend socket");
        };
        let bytes = &s.target.backend();
        let counters = Counters {
            up: &bytes.bytes_up,
            down: &bytes.bytes_down,
        };
        let pause = s
            .relay
            .run(&s.reg.entry.client, backend, idle, &counters, &|| {
                turn.others_waiting()
            });
        match pause {
            Pause::Ended(end) => {
                let (up, down) = s.relay.moved();
                let how = if s.reg.entry.was_drained() {
                    "drained"
                } else {
                    end.as_str()
                };
                let Session {
                    reg,
                    app,
                    client_addr,
                    port,
                    accepted,
                    target_name,
                    ..
                } = *s;
                let conn = Conn {
                    app: &app,
                    client: &client_addr,
                    port,
                    accepted,
                };
                conn.log(&target_name, up, down, how, None);
                drop(reg);
                cx.slots.release();
                return None;
            }
            Pause::Yield => return Some(Task::Resume(s)),
            Pause::Park => {
                let (on_client, on_backend) = s.relay.wanted();
                let sockets = [
                    (s.reg.entry.client.as_raw_fd(), on_client),
                    (backend.as_raw_fd(), on_backend),
                ];
                let deadline = s.relay.deadline(idle);
                match cx.lot.park(s, sockets, deadline) {
                    Ok(()) => return None,
                    Err(back) => {
                        // Could not park (out of memory for the registration): keep the thread.
                        s = back;
                        s.relay.hold_thread();
                    }
                }
            }
        }
    }
}

/// What a connection's log line says about it besides how it ended.
struct Conn<'a> {
    app: &'a AppRoute,
    client: &'a str,
    port: u16,
    accepted: Instant,
}

impl Conn<'_> {
    /// Log the connection's end and stop counting it as active on its app.
    fn log(&self, target: &str, up: u64, down: u64, end: &str, reason: Option<String>) {
        self.app.stats.active.fetch_sub(1, Ordering::Relaxed);
        let level = if reason.is_some() {
            Level::Warn
        } else {
            Level::Info
        };
        let mut fields = vec![
            ("app", Field::Str(&self.app.name)),
            ("client", Field::Str(self.client)),
            ("port", Field::Num(u64::from(self.port))),
            ("target", Field::Str(target)),
            ("up", Field::Num(up)),
            ("down", Field::Num(down)),
            (
                "duration",
                Field::Secs(self.accepted.elapsed().as_secs_f64()),
            ),
            ("end", Field::Str(end)),
        ];
        if let Some(r) = &reason {
            fields.push(("reason", Field::Str(r)));
        }
        log::record(level, "conn", &fields);
    }
}

/// Connect `job` to a backend of its app: the session to relay, or None if it ended here
/// (logged, its slot given back).
fn start(job: Job, cx: &Context) -> Option<Box<Session>> {
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
    let conn = Conn {
        app: &app,
        client: &client_addr,
        port,
        accepted,
    };
    // Ends the connection before it is relayed. The registration (and the sockets) are
    // dropped by the caller's return, before the slot is given back.
    let end = |reg: Registered, target: &str, end: &str, reason: Option<String>| {
        conn.log(target, 0, 0, end, reason);
        drop(reg);
        cx.slots.release();
        None
    };
    // TCP_NODELAY is inherited from the listener (net::listen), and the backend socket comes
    // non-blocking with it from its connect: no socket option is set here.
    // Registered first, so that a drain (its port removed, shutdown, upgrade) reaches the
    // connection even while it waits for a slot of its app.
    let reg = cx.conns.register(port, client, accepted);
    let entry = Arc::clone(&reg.entry);

    // The app's own bound, if it has one: wait for a slot as long as a connect may take.
    let limit = match &app.limit {
        None => None,
        Some(limit) => match limit.acquire(cx.settings.connect_timeout, || entry.was_drained()) {
            Some(slot) => Some(slot),
            None if entry.was_drained() => return end(reg, "-", "drained", None),
            None => {
                stats.limited.fetch_add(1, Ordering::Relaxed);
                let reason = "the app's MaxConnections stayed reached for the connect timeout";
                return end(reg, "-", "limit", Some(reason.into()));
            }
        },
    };
    let (backend, guard) = match balance::connect(&app, cx.settings.connect_timeout) {
        Ok(ok) => ok,
        Err(failed) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return end(reg, "-", "connect_failed", Some(failed.to_string()));
        }
    };
    let target = guard.backend().target.to_string();
    if let Some(version) = app.proxy_protocol {
        // A header this small always fits in a fresh socket's send buffer, so this write on the
        // non-blocking socket cannot come back short.
        let frontend = entry.client.local_addr().map(net::canonical);
        let sent =
            frontend.and_then(|f| (&backend).write_all(&proxy_protocol::header(version, peer, f)));
        if let Err(e) = sent {
            let reason = format!("sending the PROXY header: {e}");
            return end(reg, &target, "reset", Some(reason));
        }
    }
    entry.backend.get_or_init(|| backend);
    if entry.was_drained() {
        // Cut while we were connecting: do not start relaying.
        return end(reg, &target, "drained", None);
    }
    Some(Box::new(Session {
        reg,
        app: Arc::clone(&app),
        client_addr,
        port,
        accepted,
        _limit: limit,
        target: guard,
        target_name: target,
        relay: Relay::new(),
    }))
}
