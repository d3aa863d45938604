//! One client connection's life, run on relay threads: connect to a backend of its app, relay
//! until done, and log how it ended. The same code serves both modes.
//!
//! A connection that has to wait (every read and write it wants would block) leaves its thread
//! at once and waits in the parking lot (`park`) as a `Session`, and comes back to a pool
//! thread as a `Task::Resume` when a socket wakes it; a busy one hands its thread on after a
//! time slice while others wait. Either way it stays registered and counted as open until it
//! ends. A connection still waiting for its ClientHello, or for a slot of its app, waits in the
//! lot the same way, so silent clients hold no thread either.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::io::{self, Write};

use crate::backends::backend::ActiveGuard;
use crate::backends::balance;
use crate::backends::clients::{ClientCounts, ClientKey, ClientSlot};
use crate::backends::proxy_protocol;
use crate::backends::routing::{
    Acquired, AppRoute, Binding, LimitDenied, LimitGuard, LimitWait, Unrouted, UnroutedCounts,
};
use crate::cli::Settings;
use crate::relay::conns::{Conns, Registered};
use crate::relay::park::{self, Lot, Side, Ticket, Wakeable, Woke};
use crate::relay::pool::{Job as PoolJob, Turn};
use crate::relay::preread::{self, Hello};
use crate::relay::slots::Slots;
use crate::relay::transfer::{Counters, Pause, Relay};
use crate::sys::log::{self, Field, Level};

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

/// What a relay thread is given to run.
pub enum Task {
    /// A connection just accepted.
    New(Job),
    /// A connection that waited for the rest of its ClientHello without a thread, to carry on.
    Greet(Box<Greeting>),
    /// A connection that waited for a slot of its app without a thread, to carry on.
    Admit(Box<Admitted>),
    /// A connection that was parked or gave its thread up, to carry on.
    Resume(Box<Session>),
}

impl Wakeable for Task {
    fn woke(&mut self, woke: Woke) {
        match self {
            Task::Resume(s) => s.woke(woke),
            Task::Greet(g) => g.lot.noted(woke),
            Task::Admit(a) => a.lot.noted(woke),
            Task::New(_) => {}
        }
    }
}

impl PoolJob for Task {
    fn may_block(&self) -> bool {
        // Starting a connection resolves and connects to its backend, which blocks; relaying
        // never does.
        !matches!(self, Task::Resume(_))
    }
}

/// A connection reading its ClientHello (where apps share its binding by Hostnames). While the
/// client is silent it waits in the parking lot, not on a thread: otherwise as many silent
/// clients as `--max-threads` would hold every relay thread for the preread timeout, and no
/// other connection on any port would be served meanwhile.
pub struct Greeting {
    reg: Registered,
    peer: SocketAddr,
    local: SocketAddr,
    binding: Arc<Binding>,
    accepted: Instant,
    client_slots: ClientSlots,
    hello: preread::HelloReader,
    lot: InLot,
}

/// A connection's place in the parking lot before it relays, carried from its greeting to its
/// admission to its session.
#[derive(Default)]
struct InLot {
    /// Taken at its first wait.
    ticket: Option<Ticket>,
    /// What its client socket showed while it waited, carried on to the relay: an end of stream
    /// seen there must not be forgotten (see `transfer`).
    woke: Woke,
}

impl InLot {
    /// Note what woke it: its ticket learns which sockets fired.
    fn noted(&mut self, woke: Woke) {
        if let Some(t) = &mut self.ticket {
            t.fired(woke);
        }
        self.woke.merge(woke);
    }
}

/// A connection that is not relaying yet and may wait in the lot for its client socket: its
/// greeting (for the ClientHello) or its admission (for a slot of its app).
trait Pending: Sized {
    fn lot(&mut self) -> &mut InLot;
    fn client_fd(&self) -> std::os::fd::RawFd;
    fn into_task(self: Box<Self>) -> Task;
    /// The lot gives back what it was given.
    fn from_task(task: Task) -> Box<Self>;
}

impl Pending for Greeting {
    fn lot(&mut self) -> &mut InLot {
        &mut self.lot
    }
    fn client_fd(&self) -> std::os::fd::RawFd {
        self.reg.entry.client.as_raw_fd()
    }
    fn into_task(self: Box<Self>) -> Task {
        Task::Greet(self)
    }
    fn from_task(task: Task) -> Box<Self> {
        match task {
            Task::Greet(g) => g,
            _ => unreachable!("the parking lot gave back another task"),
        }
    }
}

impl Pending for Admitted {
    fn lot(&mut self) -> &mut InLot {
        &mut self.lot
    }
    fn client_fd(&self) -> std::os::fd::RawFd {
        self.reg.entry.client.as_raw_fd()
    }
    fn into_task(self: Box<Self>) -> Task {
        Task::Admit(self)
    }
    fn from_task(task: Task) -> Box<Self> {
        match task {
            Task::Admit(a) => a,
            _ => unreachable!("the parking lot gave back another task"),
        }
    }
}

/// What became of a pending connection that asked to wait.
enum Waited<P> {
    /// It waits in the lot; a thread takes it up when it is woken.
    Parked,
    /// Its client socket had news while it ran: carry on at once.
    Again(Box<P>),
    /// The lot cannot watch it (out of memory for the registration): wait on this thread.
    Here(Box<P>),
}

/// Leave `p` in the lot until its client socket shows `events` or `until`.
fn wait_for_client<P: Pending>(
    mut p: Box<P>,
    cx: &Context,
    events: u32,
    until: Instant,
) -> Waited<P> {
    let fd = p.client_fd();
    let lot = p.lot();
    match arm(&mut lot.ticket, cx, Side::Client, fd, Some(events)).map(|t| t.id()) {
        Ok(id) => match cx.lot.wait(id, p.into_task(), Some(until)) {
            Ok(()) => Waited::Parked,
            Err((task, woke)) => {
                let mut p = P::from_task(task);
                p.lot().noted(woke);
                Waited::Again(p)
            }
        },
        Err(e) => {
            crate::debug!("cannot park a connection: {e}");
            Waited::Here(p)
        }
    }
}

/// What every session reads besides its own job: the options in force, the table of open
/// connections through which drains (a removed port, a stop, an upgrade) reach it, the
/// connection bound it gives its slot back to, and where it waits when idle.
pub struct Context {
    pub settings: Settings,
    pub conns: Arc<Conns>,
    /// Connections no app took, by port and reason.
    pub unrouted: Arc<UnroutedCounts>,
    pub slots: Arc<Slots>,
    pub lot: Arc<Lot<Task>>,
}

/// A connection being relayed: everything it holds between two runs on a thread.
pub struct Session {
    reg: Registered,
    app: Arc<AppRoute>,
    client_addr: String,
    port: u16,
    accepted: Instant,
    sni: Option<String>,
    /// Given back as the connection ends, before its log line: a client that saw it end may
    /// open another at once.
    client_slots: Option<ClientSlots>,
    /// The app's MaxConnections slot, if it has the bound.
    _limit: Option<LimitGuard>,
    /// Counts the connection on its target (least-connections) and carries its byte counters.
    target: ActiveGuard,
    target_name: String,
    /// Bytes read for the server name and sent before relaying began.
    first_bytes: u64,
    relay: Relay,
    ticket: Option<Ticket>,
}

/// Run `task` on this thread until the connection ends, parks, or (past its time slice while
/// others wait) gives the thread up: then it is returned, to be continued after them.
pub fn run(task: Task, cx: &Context, turn: &Turn) -> Option<Task> {
    let greeting = match task {
        Task::New(job) => greet(job, cx),
        Task::Greet(g) => g,
        Task::Admit(a) => return started(admit(a, cx), cx, turn),
        Task::Resume(s) => return relay(s, cx, turn),
    };
    started(start(greeting, cx), cx, turn)
}

/// Carry on with what `start` or `admit` made of a connection.
fn started(start: Start, cx: &Context, turn: &Turn) -> Option<Task> {
    match start {
        Start::Relay(s) => relay(s, cx, turn),
        Start::Wait => None,
        Start::Ended => {
            // Ended before relaying (logged; its sockets closed): its slot is free.
            cx.slots.release();
            None
        }
    }
}

fn relay(mut s: Box<Session>, cx: &Context, turn: &Turn) -> Option<Task> {
    let idle = cx.settings.idle_timeout;
    loop {
        let Some(backend) = s.reg.entry.backend.get() else {
            // A Session is only made once the backend is set (see `start`).
            unreachable!("a session without its backend socket");
        };
        let bytes = s.target.backend();
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
                    sni,
                    client_slots,
                    target_name,
                    first_bytes,
                    ..
                } = *s;
                drop(client_slots);
                app.stats.active.fetch_sub(1, Ordering::Relaxed);
                log_conn(
                    &app.name,
                    &client_addr,
                    port,
                    &target_name,
                    (up + first_bytes, down),
                    accepted,
                    how,
                    None,
                    sni.as_deref(),
                );
                drop(reg);
                cx.slots.release();
                return None;
            }
            Pause::Yield => return Some(Task::Resume(s)),
            Pause::Wait => {
                let deadline = s.relay.deadline(idle);
                let client = s.reg.entry.client.as_raw_fd();
                let [on_client, on_backend] = s.relay.interest();
                let armed = arm(&mut s.ticket, cx, Side::Client, client, on_client).and_then(|t| {
                    t.arm(Side::Backend, backend.as_raw_fd(), on_backend)
                        .map(|()| t.id())
                });
                let id = match armed {
                    Ok(id) => id,
                    Err(e) => {
                        // The lot cannot watch it (out of memory, or fs.epoll.max_user_watches
                        // reached): wait on this thread instead, and try again next time.
                        crate::debug!("cannot park a connection: {e}");
                        s.relay.wait_here(&s.reg.entry.client, backend, deadline);
                        continue;
                    }
                };
                match cx.lot.wait(id, Task::Resume(s), deadline) {
                    Ok(()) => return None,
                    Err((Task::Resume(back), woke)) => {
                        // Something happened while it ran: run it again at once.
                        s = back;
                        s.woke(woke);
                    }
                    // The lot gives back what it was given.
                    Err(_) => unreachable!("the parking lot gave back another task"),
                }
            }
        }
    }
}

impl Session {
    /// Note what woke it: its ticket learns which sockets fired, its relay what they showed.
    fn woke(&mut self, woke: Woke) {
        if let Some(t) = &mut self.ticket {
            t.fired(woke);
        }
        self.relay.woke(woke);
    }
}

/// The connection's ticket in the lot (taken at its first wait), with `side` armed for `events`.
fn arm<'t>(
    ticket: &'t mut Option<Ticket>,
    cx: &Context,
    side: Side,
    fd: std::os::fd::RawFd,
    events: Option<u32>,
) -> io::Result<&'t mut Ticket> {
    let t = ticket.get_or_insert_with(|| cx.lot.ticket());
    t.arm(side, fd, events)?;
    Ok(t)
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
    let timeout = cx.settings.connect_timeout;
    if let Some(version) = app.proxy_protocol {
        // The destination is what the client dialled: the accepted socket's local address, in
        // both modes.
        let header = proxy_protocol::header(version, peer, local);
        write_all_within(backend, &header, timeout)
            .map_err(|e| format!("sending the PROXY header: {e}"))?;
    }
    if !first_bytes.is_empty() {
        // The bytes read for the server name go first, unchanged: at most MAX_PREREAD bytes to
        // a fresh connection, which its send buffer and the target's window take at once
        // unless the target is broken.
        write_all_within(backend, first_bytes, timeout)
            .map_err(|e| format!("sending the client's first bytes: {e}"))?;
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
fn choose(binding: &Binding, hello: Hello, first_bytes: Vec<u8>) -> Choice {
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

/// Register `job`'s connection, so that a drain (its port removed, shutdown, upgrade) reaches
/// it even while it waits for its ClientHello or for a slot of its app.
fn greet(job: Job, cx: &Context) -> Box<Greeting> {
    let Job {
        client,
        peer,
        local,
        binding,
        accepted,
        client_slots,
    } = job;
    Box::new(Greeting {
        reg: cx.conns.register(local.port(), client, accepted),
        peer,
        local,
        binding,
        accepted,
        client_slots,
        hello: preread::HelloReader::new(),
        lot: InLot::default(),
    })
}

/// What `start` made of a connection.
enum Start {
    /// Connected to a backend: relay it.
    Relay(Box<Session>),
    /// Waiting in the parking lot for the rest of its ClientHello or for a slot of its app.
    Wait,
    /// Ended here (logged, its sockets closed).
    Ended,
}

/// Pick the app of the connection (reading its ClientHello first where apps share the binding
/// by Hostnames, waiting for it in the parking lot while the client is silent) and connect to a
/// backend of it.
fn start(mut g: Box<Greeting>, cx: &Context) -> Start {
    let Choice {
        app,
        first_bytes,
        sni,
    } = if !g.binding.needs_server_name() {
        Choice {
            app: g
                .binding
                .default_app()
                .cloned()
                .ok_or(Unrouted::NoServerName),
            first_bytes: Vec::new(),
            sni: None,
        }
    } else {
        // The preread timeout counts from the accept, however the wait was split.
        let deadline = g.accepted + cx.settings.preread_timeout;
        let hello = loop {
            if let Some(hello) = g.hello.step(&g.reg.entry.client) {
                break hello;
            }
            let now = Instant::now();
            if now >= deadline {
                break Hello::Timeout;
            }
            match wait_for_client(g, cx, park::READ, deadline) {
                Waited::Parked => return Start::Wait,
                // Bytes came meanwhile: read them.
                Waited::Again(back) => g = back,
                Waited::Here(back) => {
                    g = back;
                    preread::wait_readable(&g.reg.entry.client, deadline - now);
                }
            }
        };
        let bytes = std::mem::take(&mut g.hello).into_bytes();
        choose(&g.binding, hello, bytes)
    };
    let Greeting {
        reg,
        peer,
        local,
        accepted,
        mut client_slots,
        lot,
        ..
    } = *g;
    let port = local.port();
    let client_addr = peer.to_string();
    // TCP_NODELAY is inherited from the listener (net::listen), and the backend socket comes
    // non-blocking with it from its connect: no socket option is set here.
    let entry = Arc::clone(&reg.entry);

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
            log_unrouted(&client_addr, port, accepted, end, why, sni.as_deref());
            return Start::Ended;
        }
    };
    // The app's per-client limit, where the app was only known now.
    if let Err(reached) = client_slots.take_app(&app, peer) {
        drop(client_slots);
        client_limited(
            Some(&app),
            &client_addr,
            port,
            accepted,
            reached,
            sni.as_deref(),
        );
        return Start::Ended;
    }
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    admit(
        Box::new(Admitted {
            reg,
            app,
            client_addr,
            port,
            peer,
            local,
            accepted,
            sni,
            client_slots,
            first_bytes,
            wait: None,
            lot,
        }),
        cx,
    )
}

/// How often a connection waiting in the parking lot for a slot of its app looks again.
const LIMIT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// A connection routed to its app and counted there, on its way to a backend: it may have to
/// wait for a slot of the app's MaxConnections first, which it does in the parking lot (looking
/// again every `LIMIT_RETRY`), not on a thread: otherwise as many waiters as `--max-threads`
/// would hold every relay thread for the connect timeout.
pub struct Admitted {
    reg: Registered,
    app: Arc<AppRoute>,
    client_addr: String,
    port: u16,
    peer: SocketAddr,
    local: SocketAddr,
    accepted: Instant,
    sni: Option<String>,
    client_slots: ClientSlots,
    first_bytes: Vec<u8>,
    /// Its place among the app's waiters, and until when it waits.
    wait: Option<(LimitWait, Instant)>,
    lot: InLot,
}

impl Admitted {
    /// End it before it is relayed: logged with `target` (the one it was connected to, or
    /// "-"), its client count given back before the line (a client that saw it end may open
    /// another at once); its sockets go with it.
    fn end(self: Box<Self>, target: &str, end: &str, reason: Option<String>) -> Start {
        let a = *self;
        drop(a.client_slots);
        a.app.stats.active.fetch_sub(1, Ordering::Relaxed);
        log_conn(
            &a.app.name,
            &a.client_addr,
            a.port,
            target,
            (0, 0),
            a.accepted,
            end,
            reason.as_deref(),
            a.sni.as_deref(),
        );
        Start::Ended
    }

    /// Its client reset while it waited (for its ClientHello or a slot): nobody to connect for.
    /// (A drain shuts the client socket down too, which looks the same: said as a drain.)
    fn client_gone(self: Box<Self>) -> Start {
        if self.reg.entry.was_drained() {
            return self.end("-", "drained", None);
        }
        let why = "the client reset before a target was connected";
        self.end("-", "reset", Some(why.into()))
    }

    fn limited(self: Box<Self>, denied: LimitDenied) -> Start {
        self.app.stats.limited.fetch_add(1, Ordering::Relaxed);
        self.end("-", "limit", Some(denied.reason().into()))
    }
}

/// Take a slot of the app's MaxConnections, if it has one (waiting in the parking lot as long
/// as a connect may take), connect to a backend and send what goes first.
fn admit(mut a: Box<Admitted>, cx: &Context) -> Start {
    let limit = match a.app.limit.clone() {
        None => None,
        Some(limit) => loop {
            if a.wait.is_none() {
                match limit.acquire_or_wait() {
                    Ok(Acquired::Slot(slot)) => break Some(slot),
                    Ok(Acquired::Wait(w)) => {
                        a.wait = Some((w, Instant::now() + cx.settings.connect_timeout))
                    }
                    Err(denied) => return a.limited(denied),
                }
            }
            let Some((w, deadline)) = &a.wait else {
                unreachable!("a waiter's place is set just above");
            };
            let deadline = *deadline;
            if let Some(slot) = w.try_take() {
                a.wait = None;
                break Some(slot);
            }
            if a.reg.entry.was_drained() {
                return a.end("-", "drained", None);
            }
            if a.lot.woke.gone(Side::Client) {
                return a.client_gone();
            }
            let now = Instant::now();
            if now >= deadline {
                return a.limited(LimitDenied::TimedOut);
            }
            // Its client socket is watched meanwhile: a drain shuts it down, which wakes the
            // connection at once.
            let at = deadline.min(now + LIMIT_RETRY);
            // Armed for failure only: bytes the client sends meanwhile wait in its socket.
            match wait_for_client(a, cx, park::FAILURE, at) {
                Waited::Parked => return Start::Wait,
                // Its socket failed meanwhile, or was cut: look again.
                Waited::Again(back) => a = back,
                Waited::Here(back) => {
                    a = back;
                    std::thread::sleep(at - now);
                }
            }
        },
    };
    if a.lot.woke.gone(Side::Client) {
        return a.client_gone();
    }
    let (backend, guard) = match balance::connect(&a.app, cx.settings.connect_timeout) {
        Ok(ok) => ok,
        Err(failed) => {
            a.app.stats.failed.fetch_add(1, Ordering::Relaxed);
            // Every target tried was this proxy itself: say so in one word, naming the first
            // (the `target ... is down` line gives the address it resolved to).
            if let Some(first) = failed.only_loops() {
                let target = first.to_string();
                return a.end(&target, "connect_failed", Some("loop".into()));
            }
            return a.end("-", "connect_failed", Some(failed.to_string()));
        }
    };
    let target_state = guard.backend();
    let target = target_state.target.to_string();
    if let Err(reason) = send_preamble(&backend, &a.app, a.peer, a.local, &a.first_bytes, cx) {
        return a.end(&target, "reset", Some(reason));
    }
    target_state
        .bytes_up
        .fetch_add(a.first_bytes.len() as u64, Ordering::Relaxed);
    a.reg.entry.backend.get_or_init(|| backend);
    if a.reg.entry.was_drained() {
        // Cut while we were connecting: do not start relaying.
        return a.end(&target, "drained", None);
    }
    let Admitted {
        reg,
        app,
        client_addr,
        port,
        accepted,
        sni,
        client_slots,
        first_bytes,
        lot: InLot { ticket, woke },
        ..
    } = *a;
    Start::Relay(Box::new(Session {
        reg,
        app,
        client_addr,
        port,
        accepted,
        sni,
        client_slots: Some(client_slots),
        _limit: limit,
        target: guard,
        target_name: target,
        first_bytes: first_bytes.len() as u64,
        relay: {
            let mut relay = Relay::new();
            relay.woke(woke);
            relay
        },
        ticket,
    }))
}

/// Write all of `buf` to the non-blocking `s` before relaying starts (a PROXY header, the bytes
/// read for the server name), waiting for room at most `timeout` in all.
fn write_all_within(s: &TcpStream, mut buf: &[u8], timeout: std::time::Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !buf.is_empty() {
        match (&*s).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, crate::sys::net::poll_ms(left)) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
