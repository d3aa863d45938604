//! One client connection's life, run on relay threads, the same in both modes: a `Session` is
//! what every phase shares (its sockets, its client, its place in the parking lot) and the phase
//! it is in, each phase in a file of its own:
//!
//! ```text
//!   accepted ──> greeting ──> admission ──> connecting ──> relaying ──> logged
//!                 │  ^          │  ^           │  ^          │  ^
//!                 └──┘          └──┘           └──┘          └──┘
//!             waits for the  waits for a    waits for a    waits for its sockets,
//!             ClientHello    MaxConnections name lookup,   or hands its thread on
//!                            slot           its connect
//! ```
//!
//! - `greeting`: read the ClientHello where apps share the port by Hostnames, pick the app.
//! - `admission`: take a slot of the app's MaxConnections, waiting for one if it must.
//! - `connecting`: look up and connect to a target of the app (without blocking: names are
//!   resolved by the resolver's threads, `backends::resolver`) and send what goes first.
//! - `relaying`: move bytes both ways until both are done (`transfer`).
//!
//! A phase's `step` runs it as far as it can without waiting and says what came of it (`Step`):
//! wait for the sockets or a deadline, hand the thread on, done (with what the next phase starts
//! from), or the end of the connection. `run` is the one loop that acts on that: a connection
//! that has to wait leaves its thread at once and waits in the parking lot (`park`), whole, and
//! comes back to a pool thread as a `Task::Resume` when a socket, its deadline or (for a slot,
//! or its target's name looked up) another thread wakes it, in the phase it was in; `upgrade` is
//! the one place that moves from a phase to the next. Every phase is an event step, run by the
//! threads that wait for events.
//! Silent clients and connections waiting for a slot hold no thread, and a connection stays
//! registered (for drains) and counted under the connection bound until `end` writes its log
//! line.

mod admission;
mod connecting;
mod greeting;
mod phase;
mod relaying;

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backends::resolver::Resolver;
use crate::backends::routing::UnroutedCounts;
use crate::relay::accept::Accepting;
use crate::relay::access_log::{ConnLine, Timings};
use crate::relay::conns::{self, Conns};
use crate::relay::park::{self, Listening, Lot, Side, Wakeable, Woke};
use crate::relay::pool::Turn;
use crate::relay::slots::Slots;
use crate::relay::transfer::Carriers;
use admission::{Admission, Admitted};
use connecting::{Connected, Connecting};
use greeting::{Greeted, Greeting};
use phase::{Conn, Ending, Step, Wait};
use relaying::Relaying;

pub use crate::relay::accept::Incoming;
pub use phase::Timeouts;

/// What every session reads besides its own connection: its timeouts, the carriers its bytes
/// go through, the table of open connections through which drains (a removed port, a stop, an
/// upgrade) reach it, the connection bound it gives its slot back to, and where it waits.
pub struct Context {
    pub timeouts: Timeouts,
    pub carriers: Carriers,
    pub conns: Arc<Conns>,
    /// Connections no app took, by port and reason.
    pub unrouted: Arc<UnroutedCounts>,
    pub slots: Arc<Slots>,
    pub lot: Arc<Lot<Box<Session>>>,
    /// Looks target names up, off the relay threads.
    pub resolver: Resolver,
    /// Where new connections come from.
    pub accepting: Arc<Accepting>,
}

/// What a relay thread is given to run.
pub enum Task {
    /// A listener with connections waiting: accept them and start each on this thread.
    Accept(Listening),
    /// A connection just accepted.
    New(Incoming),
    /// A connection that waited in the parking lot or gave its thread up, to carry on in the
    /// phase it was in.
    Resume(Box<Session>),
}

impl From<Listening> for Task {
    fn from(l: Listening) -> Task {
        Task::Accept(l)
    }
}

impl From<Box<Session>> for Task {
    fn from(s: Box<Session>) -> Task {
        Task::Resume(s)
    }
}

/// A connection: what every phase shares, and the phase it is in.
pub struct Session {
    conn: Conn,
    phase: Phase,
}

/// The phase a connection is in. A phase that has to wait says so from its own `step` with a
/// `Step::Wait` naming what to arm: `run`, `park` and the lot stay as they are.
enum Phase {
    Greeting(Greeting),
    Admission(Admission),
    Connecting(Connecting),
    Relaying(Relaying),
}

impl Phase {
    /// The phase `show conns` names (an admission that waits says `queued` itself).
    fn shown(&self) -> conns::Phase {
        match self {
            Phase::Greeting(_) | Phase::Admission(_) => conns::Phase::Greeting,
            Phase::Connecting(_) => conns::Phase::Connecting,
            Phase::Relaying(_) => conns::Phase::Relaying,
        }
    }
}

/// What a phase is done with: what the next one starts from.
enum Done {
    Greeted(Greeted),
    Admitted(Admitted),
    Connected(Connected),
}

/// Run `task` on this thread until the connection ends, parks, or (past its time slice while
/// others wait) gives the thread up: then it is returned, to be continued after them. No phase
/// blocks the thread: each waits in the lot (`Step::Wait`) for what it needs.
pub fn run(task: Task, cx: &Context, turn: &Turn<Task>) -> Option<Task> {
    let mut s = match task {
        Task::Accept(door) => return accept(door, cx, turn),
        Task::New(incoming) => Session::new(incoming, cx),
        Task::Resume(s) => s,
    };
    loop {
        let conn = &mut s.conn;
        let step = match s.phase {
            Phase::Greeting(p) => p
                .step(conn, &cx.timeouts, &cx.unrouted)
                .map(Phase::Greeting, Done::Greeted),
            Phase::Admission(p) => p
                .step(conn, &cx.timeouts, || cx.lot.ticket())
                .map(Phase::Admission, Done::Admitted),
            Phase::Connecting(p) => p
                .step(conn, &cx.timeouts, &cx.resolver, &|| cx.lot.ticket())
                .map(Phase::Connecting, Done::Connected),
            Phase::Relaying(p) => p
                .step(conn, &cx.timeouts, &cx.carriers, turn)
                .map(Phase::Relaying, |never: Infallible| match never {}),
        };
        match step {
            Step::Done(done) => {
                s.phase = upgrade(done);
                s.conn.reg.entry.set_phase(s.phase.shown());
            }
            Step::End(ending) => {
                end(s.conn, ending, cx);
                return None;
            }
            Step::Yield(phase) => {
                s.phase = phase;
                return Some(Task::Resume(s));
            }
            Step::Wait(phase, wait) => {
                s.phase = phase;
                s = park(s, wait, cx)?;
            }
        }
    }
}

/// Accept the connections waiting on `door`, re-arm it, run the first on this thread until it
/// waits (as a connection woken in the lot would be) and queue the others for whichever thread
/// is free first: a connection runs up to its first wait for its reply (a target on this host
/// has answered the connect by then), so a batch run here one after another, the door unarmed
/// meanwhile, would leave the other cores idle while new connections wait in the backlog.
fn accept(door: Listening, cx: &Context, turn: &Turn<Task>) -> Option<Task> {
    let mut batch = cx.accepting.batch(door.0)?;
    let first = batch.take()?;
    while let Some(incoming) = batch.take() {
        turn.queue(Task::New(incoming));
    }
    // Re-armed by now (the batch is over), so whichever thread is free takes the next ones.
    drop(batch);
    run(Task::New(first), cx, turn)
}

/// The one place a connection moves from a phase to the next, from what the phase was done
/// with.
fn upgrade(done: Done) -> Phase {
    match done {
        Done::Greeted(greeted) => Phase::Admission(Admission::new(greeted)),
        Done::Admitted(admitted) => Phase::Connecting(Connecting::new(admitted)),
        Done::Connected(connected) => Phase::Relaying(Relaying::new(connected)),
    }
}

impl Session {
    /// Register the connection, so that a drain (its port removed, shutdown, upgrade) reaches
    /// it even while it waits for its ClientHello or for a slot of its app.
    fn new(incoming: Incoming, cx: &Context) -> Box<Session> {
        let Incoming {
            client,
            peer,
            local,
            binding,
            accepted,
            client_slots,
        } = incoming;
        Box::new(Session {
            conn: Conn {
                reg: cx.conns.register(local.port(), client, peer, accepted),
                peer,
                local,
                accepted,
                client_slots,
                ticket: None,
                woke: Woke::default(),
                timings: Timings::default(),
            },
            phase: Phase::Greeting(Greeting::new(binding)),
        })
    }
}

impl Wakeable for Box<Session> {
    /// Note what woke it: its ticket learns which sockets fired, its phase what they showed.
    fn woke(&mut self, woke: Woke) {
        if let Some(t) = &mut self.conn.ticket {
            t.fired(woke);
        }
        self.conn.woke.merge(woke);
    }
}

/// Leave `s` in the lot until what it waits for: None once it is there. It is given back to be
/// stepped again at once if its sockets had news while it ran, or if the lot cannot watch it
/// (out of memory, or fs.epoll.max_user_watches reached): then it waits on this thread instead,
/// and tries the lot again next time.
fn park(mut s: Box<Session>, wait: Wait, cx: &Context) -> Option<Box<Session>> {
    let conn = &mut s.conn;
    let client = conn.reg.entry.client.as_raw_fd();
    let backend = wait.backend;
    let ticket = conn.ticket.get_or_insert_with(|| cx.lot.ticket());
    let armed = ticket
        .arm(Side::Client, client, wait.events[0])
        .and_then(|()| match backend {
            Some(fd) => ticket.arm(Side::Backend, fd, wait.events[1]),
            None => Ok(()),
        });
    if let Err(e) = armed {
        crate::debug!("cannot park a connection: {e}");
        let woke = park::wait_here([Some(client), backend], wait.events, wait.until);
        conn.woke.merge(woke);
        return Some(s);
    }
    let id = ticket.id();
    match cx.lot.wait(id, s, wait.until) {
        Ok(()) => None,
        Err((mut s, woke)) => {
            // Something happened while it ran: step it again at once.
            s.woke(woke);
            Some(s)
        }
    }
}

/// End the connection: its client counts given back, its app's count of active connections
/// lowered, its log line written, its sockets closed, and its slot under the connection bound
/// freed.
fn end(conn: Conn, e: Ending, cx: &Context) {
    let Conn {
        reg,
        peer,
        local,
        accepted,
        client_slots,
        timings,
        ..
    } = conn;
    drop(client_slots);
    if let (Some(app), true) = (&e.app, e.active) {
        app.stats.active.fetch_sub(1, Ordering::Relaxed);
        app.stats.duration.observe(accepted.elapsed());
    }
    ConnLine {
        app: e.app.as_ref().map(|a| a.name()),
        client: peer,
        port: local.port(),
        target: e.target.as_deref(),
        up: e.moved.0,
        down: e.moved.1,
        accepted,
        end: e.end,
        reason: e.reason.as_deref(),
        detail: e.detail,
        sni: e.sni.as_deref(),
        timings: &timings,
    }
    .write();
    drop(reg);
    cx.slots.release();
}
