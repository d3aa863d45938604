//! What every phase of a session shares and speaks: the connection's state kept through all
//! of them (`Conn`), what a phase's step comes to (`Step`, `Wait`), the app once it is picked
//! (`Route`), and how a connection ends (`Ending`, written by `session::end`). The phases import
//! this file, and `session` imports them, so that no two files import each other.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::routing::AppRoute;
use crate::relay::access_log::Timings;
use crate::relay::conns::Registered;
use crate::relay::park::{Ticket, Woke};
use crate::relay::per_client::ClientSlots;

/// The timeouts the relay reads, given by whoever builds it (from its own settings).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a connect to a target, and for a slot of an app's MaxConnections.
    pub connect: Duration,
    /// Without a byte moved either way, a relayed connection is closed; None: never.
    pub idle: Option<Duration>,
    /// For a whole ClientHello, counted from the accept.
    pub preread: Duration,
}

/// What a connection keeps through every phase.
pub(super) struct Conn {
    /// Its client socket (and, once connected, its backend socket), where drains reach them.
    pub(super) reg: Registered,
    pub(super) peer: SocketAddr,
    /// The address and port the client dialled.
    pub(super) local: SocketAddr,
    pub(super) accepted: Instant,
    /// Given back as the connection ends, before its log line: a client that saw it end may
    /// open another at once.
    pub(super) client_slots: ClientSlots,
    /// Its place in the parking lot, taken at its first wait.
    pub(super) ticket: Option<Ticket>,
    /// What its sockets showed while it waited, for its phase to act on: an end of stream seen
    /// before relaying must not be forgotten once it relays (see `transfer`).
    pub(super) woke: Woke,
    /// Where its time went on the way to its target, for its log line and its app's
    /// histograms.
    pub(super) timings: Timings,
}

/// What became of a phase `P` that was stepped; `D` is what it is done with.
pub(super) enum Step<P, D> {
    /// It waits (without a thread, in the lot) for its sockets or a deadline, then is stepped
    /// again.
    Wait(P, Wait),
    /// Its time slice ended while others wait for a thread: step it again after them.
    Yield(P),
    /// It is done; the next phase starts from `D` (see `upgrade`).
    Done(D),
    /// The connection ends here.
    End(Ending),
}

impl<P, D> Step<P, D> {
    pub(super) fn map<Q, E>(
        self,
        phase: impl FnOnce(P) -> Q,
        done: impl FnOnce(D) -> E,
    ) -> Step<Q, E> {
        match self {
            Step::Wait(p, w) => Step::Wait(phase(p), w),
            Step::Yield(p) => Step::Yield(phase(p)),
            Step::Done(d) => Step::Done(done(d)),
            Step::End(e) => Step::End(e),
        }
    }
}

/// What a waiting phase waits for.
pub(super) struct Wait {
    /// What to arm the client and the backend socket for (`park::READ`, ...; see
    /// `park::Ticket::arm`).
    pub(super) events: [Option<u32>; 2],
    /// The backend socket, once the phase has one (it must stay open while the connection
    /// lives: closing it is what takes it out of the lot's epoll set).
    pub(super) backend: Option<RawFd>,
    /// When to step it again even if nothing happens.
    pub(super) until: Option<Instant>,
}

impl Wait {
    /// For `events` on the client socket, or `until`.
    pub(super) fn client(events: u32, until: Instant) -> Wait {
        Wait {
            events: [Some(events), None],
            backend: None,
            until: Some(until),
        }
    }
}

/// The app a connection goes to, once its greeting picked it, with the server name the client
/// asked for; counted as accepted and active on the app from then on.
pub(super) struct Route {
    pub(super) app: Arc<AppRoute>,
    pub(super) sni: Option<String>,
}

impl Route {
    /// The connection ends, counted on its app: `target`, the one it was connected to.
    pub(super) fn ending(
        self,
        target: Option<String>,
        end: &'static str,
        reason: Option<String>,
    ) -> Ending {
        Ending {
            app: Some(self.app),
            active: true,
            target,
            moved: (0, 0),
            end,
            reason,
            detail: None,
            sni: self.sni,
        }
    }

    /// Its client reset while it waited (for its ClientHello or a slot): nobody to connect for.
    /// (A drain shuts the client socket down too, which looks the same: said as a drain.)
    pub(super) fn client_gone(self, conn: &Conn) -> Ending {
        if conn.reg.entry.was_drained() {
            return self.ending(None, conn.reg.entry.cut_end(), None);
        }
        let why = "the client reset before a target was connected";
        self.ending(None, "reset", Some(why.into()))
    }
}

/// How a connection ended, for its log line.
pub(super) struct Ending {
    /// The app that took it, if one did.
    pub(super) app: Option<Arc<AppRoute>>,
    /// It is counted in the app's active connections.
    pub(super) active: bool,
    pub(super) target: Option<String>,
    /// Bytes delivered: client to target (with those read for the server name), and back.
    pub(super) moved: (u64, u64),
    pub(super) end: &'static str,
    pub(super) reason: Option<String>,
    pub(super) detail: Option<&'static str>,
    pub(super) sni: Option<String>,
}
