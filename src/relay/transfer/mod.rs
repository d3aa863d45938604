//! Moving bytes between a client and its backend, both ways, until both sides are done.
//!
//! A relay thread runs a connection with non-blocking reads and writes on its two sockets (no
//! thread per direction) until every one it wants would block; `Relay::run` then returns
//! `Pause::Wait` and the connection waits in the parking lot without a thread (see `park`)
//! until a socket has news for it. Past its `SLICE` while other connections wait for a thread,
//! a relay still moving bytes returns to be continued later. The state kept between runs is
//! `Relay`. Bulk bytes go through a pooled kernel pipe with `splice(2)`, held only while bytes
//! are in flight; small exchanges are copied through a pooled user-space buffer instead, which
//! costs fewer system calls than a splice in and out (splice-auto, as HAProxy calls it).
//! Half-close is carried through: when one side shuts down its write side, the other side's
//! write side is shut down once every byte before it has been delivered, and the reply keeps
//! flowing the other way. A reset on one side is passed on as a reset on the other, so neither
//! peer hangs. An error reported on a socket nothing is wanted from is acted on at once, and a
//! socket that hung up is not armed again once nothing is wanted from it, so no close sequence
//! leaves a thread spinning.

mod carrier;
mod direction;

use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::relay::conns::OpenConn;
use crate::relay::park::{self, Woke};
use direction::Direction;

pub use carrier::Carriers;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their write side and every byte was delivered.
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// One side reset the connection or a socket error occurred; the other side was reset.
    Reset,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::IdleTimeout => "idle_timeout",
            End::Reset => "reset",
        }
    }
}

/// How long a busy connection keeps its thread while other connections wait for one: short, as
/// the threads that wait for events are few (one per core), and a connection whose peer just
/// spoke should not wait long behind a transfer that never pauses.
pub const SLICE: Duration = Duration::from_millis(5);

/// Why `Relay::run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The connection is over (both sockets are to be closed).
    Ended(End),
    /// Every read and write it wants would block: it waits in the parking lot, without a
    /// thread, for an event on its sockets or `Relay::deadline`. It holds a buffer or pipe only
    /// if bytes are in flight.
    Wait,
    /// The time slice ended while other connections wait for a thread, with bytes still
    /// moving: continue later, after them.
    Yield,
}

/// The state of a relayed connection between two runs: both directions' progress, the time of
/// the last byte moved and the events seen on its sockets since it last ran. It holds a buffer
/// or a pipe only while bytes are in flight, so a waiting relay is a few dozen bytes.
pub struct Relay {
    up: Direction,
    down: Direction,
    last_activity: Instant,
    /// Events seen on the client and the backend socket since the last run (epoll bits).
    woke: Woke,
    /// A hang-up without error was seen on the client or backend socket while nothing was
    /// wanted from it: nothing more can come from it, and polled or armed again it would report
    /// the hang-up again at once, every time.
    hup: [bool; 2],
    /// The client and the backend socket were armed for reading when the relay last waited:
    /// one that did not wake it has nothing to read (the lot would have said so), so the next
    /// run does not ask it (a read that would only say EAGAIN, one per request on a kept-alive
    /// connection).
    armed_read: [bool; 2],
}

/// The two live counters (the target's, for metrics) that delivered bytes are added to, and
/// the connection's entry in the table of open connections, where its own totals are
/// published (with the bytes sent before relaying, `sent_before`) as they move.
pub struct Counters<'a> {
    pub up: &'a AtomicU64,
    pub down: &'a AtomicU64,
    pub conn: Option<&'a OpenConn>,
    pub sent_before: u64,
}

impl Default for Relay {
    fn default() -> Relay {
        Relay::new()
    }
}

impl Relay {
    pub fn new() -> Relay {
        Relay {
            up: Direction::new(),
            down: Direction::new(),
            last_activity: Instant::now(),
            woke: Woke::default(),
            hup: [false; 2],
            armed_read: [false; 2],
        }
    }

    /// Bytes delivered so far: client to backend, backend to client.
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// When a waiting relay is to be run even if nothing happens: its idle timeout.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        idle.map(|d| self.last_activity + d)
    }

    /// Note what woke the relay, for its next run.
    pub fn woke(&mut self, woke: Woke) {
        for i in 0..2 {
            self.woke.0[i] |= woke.0[i];
        }
    }

    /// What to arm the client and the backend socket for while the relay waits (see
    /// `park::Ticket::arm`): reading where a direction reads from it, writing where one has bytes
    /// for it, and otherwise only an error, unless it hung up (None: nothing can come from it).
    /// Called as it waits: it remembers which sockets it armed for reading.
    ///
    /// Kept armed (`park::EDGE`) while neither direction is a bulk transfer: requests and
    /// replies then wait without a re-arm each (`run` waits only once every read and write it
    /// wants would block, or a short read drained the socket, as an edge-triggered socket
    /// needs). A bulk transfer's sockets are armed one-shot, so that its news, which comes all
    /// the time, does not wake another thread while one runs it.
    pub fn interest(&mut self) -> [Option<u32>; 2] {
        let edge = if self.up.bulk || self.down.bulk {
            0
        } else {
            park::EDGE
        };
        let on = |read: bool, write: bool, hup: bool| {
            let mut events = park::FAILURE;
            if read {
                events |= park::READ;
            }
            if write {
                events |= park::WRITE;
            }
            (events != park::FAILURE || !hup).then_some(events | edge)
        };
        self.armed_read = [self.up.wants_read(), self.down.wants_read()];
        [
            on(self.up.wants_read(), self.down.wants_write(), self.hup[0]),
            on(self.down.wants_read(), self.up.wants_write(), self.hup[1]),
        ]
    }

    /// Whether anything is still wanted from the client and from the backend socket.
    fn wanted(&self) -> [bool; 2] {
        [
            self.up.wants_read() || self.down.wants_write(),
            self.down.wants_read() || self.up.wants_write(),
        ]
    }

    /// Relay between `client` and `backend` (both non-blocking) while bytes can move without
    /// waiting: until both directions are closed, one fails, nothing moved for `idle`, every
    /// read and write it wants would block (`Pause::Wait`), or its time slice ends while
    /// `others_waiting` (`Pause::Yield`). The caller closes the sockets once it has `Ended`.
    pub fn run(
        &mut self,
        client: &TcpStream,
        backend: &TcpStream,
        idle: Option<Duration>,
        counters: &Counters,
        carriers: &Carriers,
        others_waiting: &dyn Fn() -> bool,
    ) -> Pause {
        let mut slice_end = Instant::now() + SLICE;
        // Sockets it waited on for reading that did not wake it: not read on the first pass.
        let mut quiet = [0, 1].map(|i| self.armed_read[i] && self.woke.0[i] == 0);
        self.armed_read = [false; 2];
        loop {
            // Where something is wanted from a socket, the pump's read or write meets whatever
            // happened there (bytes, end of stream, or the error) in order, so nothing already
            // received is lost. Where nothing is wanted, an error is acted on here: it is
            // reported once (one-shot), and a reset must be passed on, not wait.
            let woke = std::mem::take(&mut self.woke);
            let closing = (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32;
            self.up.closing |= woke.0[0] & closing != 0;
            self.down.closing |= woke.0[1] & closing != 0;
            let wanted = self.wanted();
            let sockets = [(client, "client"), (backend, "target")];
            for (i, &(s, side)) in sockets.iter().enumerate() {
                if !wanted[i] && failed(s, woke.0[i], side) {
                    return self.fail(client, backend);
                }
                // Closed both ways without an error: nothing more can come from or go to it
                // (what is still in it is read all the same).
                let bits = woke.0[i];
                if bits & libc::EPOLLHUP as u32 != 0 && bits & libc::EPOLLERR as u32 == 0 {
                    self.hup[i] = true;
                }
            }
            let (up_done, down_done) = (self.up.done(), self.down.done());
            let stepped = (
                self.up
                    .pump(client, backend, counters.up, down_done, !quiet[0], carriers),
                self.down
                    .pump(backend, client, counters.down, up_done, !quiet[1], carriers),
            );
            quiet = [false; 2];
            let (a, b) = match stepped {
                (Err(e), _) | (_, Err(e)) => {
                    crate::debug!("relay error: {e}");
                    return self.fail(client, backend);
                }
                (Ok(a), Ok(b)) => (a, b),
            };
            let now = Instant::now();
            if a.moved || b.moved {
                self.last_activity = now;
                if let Some(c) = counters.conn {
                    c.moved(self.up.moved + counters.sent_before, self.down.moved, now);
                }
            }
            if self.up.done() && self.down.done() {
                return Pause::Ended(End::Closed);
            }
            if idle.is_some_and(|d| now >= self.last_activity + d) {
                return Pause::Ended(End::IdleTimeout);
            }
            if !a.more && !b.more {
                return Pause::Wait;
            }
            if now >= slice_end {
                if others_waiting() {
                    return Pause::Yield;
                }
                slice_end = now + SLICE;
            }
        }
    }

    fn fail(&mut self, client: &TcpStream, backend: &TcpStream) -> Pause {
        crate::sys::net::reset_on_close(client);
        crate::sys::net::reset_on_close(backend);
        Pause::Ended(End::Reset)
    }
}

/// Whether `events` on a socket from which nothing was wanted say it failed (a reset, a
/// timeout): then the connection cannot complete. A hang-up alone (closed both ways without an
/// error: its peer's FIN arrived and ours went, or the proxy cut it) leaves what is still to do
/// to the other socket.
fn failed(s: &TcpStream, events: u32, side: &str) -> bool {
    if events & libc::EPOLLERR as u32 == 0 {
        return false;
    }
    // Read (and so clear) the pending error, for the log.
    match s.take_error() {
        Ok(Some(e)) => crate::debug!("relay: {side} socket failed: {e}"),
        Ok(None) => crate::debug!("relay: {side} socket reported an error"),
        Err(e) => crate::debug!("relay: {side} socket: {e}"),
    }
    true
}
