//! The admission: take a slot of the app's MaxConnections, where it has the bound. A connection
//! that must wait for one queues behind the app's other waiters (`AppLimit`) and waits in the
//! parking lot, not on a thread: otherwise as many waiters as `--max-threads` would hold every
//! relay thread for the connect timeout. Nothing wakes it to look again: a slot given back goes
//! to the first waiter, whose connection the releasing thread wakes through the lot; its only
//! timer is its deadline, the connect timeout. Its client socket is watched meanwhile, for
//! failure only (bytes the client sends wait in its socket): a reset, or a drain, which shuts it
//! down, ends it at once, and it leaves the queue as it ends.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::greeting::Greeted;
use super::phase::{Conn, Ending, Route, Step, Timeouts, Wait};
use crate::backends::limit::{Acquired, LimitDenied, LimitGuard, LimitWait};
use crate::relay::conns::Phase;
use crate::relay::park::{self, Side, Ticket};

pub(super) struct Admission {
    route: Route,
    first_bytes: Vec<u8>,
    /// Its place among the app's waiters, and until when it waits.
    wait: Option<(LimitWait, Instant)>,
    /// When it began to wait for a slot (its `queue_wait` counts from then).
    queued: Option<Instant>,
}

/// What the admission is done with.
pub(super) struct Admitted {
    pub(super) route: Route,
    pub(super) first_bytes: Vec<u8>,
    /// The app's MaxConnections slot, if it has the bound.
    pub(super) limit: Option<LimitGuard>,
}

impl Admission {
    pub(super) fn new(greeted: Greeted) -> Admission {
        Admission {
            route: greeted.route,
            first_bytes: greeted.first_bytes,
            wait: None,
            queued: None,
        }
    }

    /// `ticket` gives the connection its place in the lot if it has none yet: a waiter is
    /// woken through it.
    pub(super) fn step(
        mut self,
        conn: &mut Conn,
        timeouts: &Timeouts,
        ticket: impl FnOnce() -> Ticket,
    ) -> Step<Admission, Admitted> {
        let Some(limit) = self.route.app.limit.clone() else {
            return Step::Done(self.admitted(conn, None));
        };
        let (waiting, deadline) = match &self.wait {
            Some(w) => w,
            None => {
                let waker = conn.ticket.get_or_insert_with(ticket).waker();
                match limit.acquire_or_wait(Box::new(move || waker.wake())) {
                    Ok(Acquired::Slot(slot)) => return Step::Done(self.admitted(conn, Some(slot))),
                    Ok(Acquired::Wait(w)) => {
                        conn.reg.entry.set_phase(Phase::Queued);
                        let now = Instant::now();
                        self.queued = Some(now);
                        self.wait.insert((w, now + timeouts.connect))
                    }
                    Err(denied) => return Step::End(self.limited(conn, denied)),
                }
            }
        };
        let deadline = *deadline;
        if let Some(slot) = waiting.try_take() {
            return Step::Done(self.admitted(conn, Some(slot)));
        }
        if conn.reg.entry.was_drained() {
            let end = conn.reg.entry.cut_end();
            return Step::End(self.route.ending(None, end, None));
        }
        if conn.woke.gone(Side::Client) {
            return Step::End(self.route.client_gone(conn));
        }
        if Instant::now() >= deadline {
            return Step::End(self.limited(conn, LimitDenied::TimedOut));
        }
        // Armed for failure only: bytes the client sends meanwhile wait in its socket.
        Step::Wait(self, Wait::client(park::FAILURE, deadline))
    }

    /// Its place among the waiters, if it had one, goes with it; how long it waited is noted.
    fn admitted(self, conn: &mut Conn, limit: Option<LimitGuard>) -> Admitted {
        conn.timings.queue = Some(self.queued.map_or(Duration::ZERO, |t| t.elapsed()));
        Admitted {
            route: self.route,
            first_bytes: self.first_bytes,
            limit,
        }
    }

    /// Its place among the waiters goes with it (a slot given to it meanwhile goes on to the
    /// next); how long it waited in vain is noted (as HAProxy's `Tw` is).
    fn limited(self, conn: &mut Conn, denied: LimitDenied) -> Ending {
        conn.timings.queue = Some(self.queued.map_or(Duration::ZERO, |t| t.elapsed()));
        self.route.app.stats.limited.fetch_add(1, Ordering::Relaxed);
        self.route
            .ending(None, "limit", Some(denied.reason().into()))
    }
}
