//! Relaying: move bytes both ways until both are done (`transfer`). While every read and write it
//! wants would block, the connection waits in the parking lot for its sockets (or its idle
//! timeout); past its time slice while others wait for a thread, it hands its thread on. It ends
//! closed, reset, idle, or drained, with the bytes it moved.

use std::convert::Infallible;
use std::os::fd::AsRawFd;

use super::connecting::Connected;
use super::phase::{Conn, Ending, Route, Step, Timeouts, Wait};
use super::Task;
use crate::backends::backend::ActiveGuard;
use crate::backends::routing::LimitGuard;
use crate::relay::pool::Turn;
use crate::relay::transfer::{Carriers, Counters, End, Pause, Relay};

pub(super) struct Relaying {
    route: Route,
    /// The app's MaxConnections slot, held until the end.
    _limit: Option<LimitGuard>,
    target: ActiveGuard,
    target_name: String,
    /// Bytes read for the server name and sent before relaying began.
    first_bytes: u64,
    relay: Relay,
}

impl Relaying {
    pub(super) fn new(connected: Connected) -> Relaying {
        Relaying {
            route: connected.route,
            _limit: connected.limit,
            target: connected.target,
            target_name: connected.target_name,
            first_bytes: connected.first_bytes,
            relay: Relay::new(),
        }
    }

    /// Never done: a relayed connection only ends.
    pub(super) fn step(
        mut self,
        conn: &mut Conn,
        timeouts: &Timeouts,
        carriers: &Carriers,
        turn: &Turn<Task>,
    ) -> Step<Relaying, Infallible> {
        // Set by the connecting phase before it is done (`Connecting::step`), never unset.
        let Some(backend) = conn.reg.entry.backend.get() else {
            unreachable!("relaying without a backend socket");
        };
        // What its sockets showed while it waited (before relaying too: an end of stream seen
        // then must not be forgotten).
        self.relay.woke(std::mem::take(&mut conn.woke));
        let idle = timeouts.idle;
        let bytes = self.target.backend().traffic();
        let counters = Counters {
            up: &bytes.bytes_up,
            down: &bytes.bytes_down,
            conn: Some(&conn.reg.entry),
            sent_before: self.first_bytes,
        };
        let pause = self.relay.run(
            &conn.reg.entry.client,
            backend,
            idle,
            &counters,
            carriers,
            &|| turn.others_waiting(),
        );
        // The target's first byte: seen at the step that moved it (it woke this one).
        if conn.timings.first_byte.is_none() && self.relay.moved().1 > 0 {
            if let Some(at) = conn.timings.connected {
                conn.timings.first_byte = Some(at.elapsed());
            }
        }
        match pause {
            Pause::Ended(end) => Step::End(self.ended(conn, end)),
            Pause::Yield => Step::Yield(self),
            Pause::Wait => {
                let wait = Wait {
                    events: self.relay.interest(),
                    backend: Some(backend.as_raw_fd()),
                    until: self.relay.deadline(idle),
                };
                Step::Wait(self, wait)
            }
        }
    }

    fn ended(self, conn: &Conn, end: End) -> Ending {
        let (up, down) = self.relay.moved();
        let how = if conn.reg.entry.was_drained() {
            conn.reg.entry.cut_end()
        } else {
            end.as_str()
        };
        let mut ending = self.route.ending(Some(self.target_name), how, None);
        ending.moved = (up + self.first_bytes, down);
        ending
    }
}
