//! Connecting: connect to a target of the app (trying others as `dial` decides), send what goes
//! first (the PROXY header if the app sends one, then the bytes read for the server name), with
//! the backend socket in the table of open connections, where drains reach it. Done with the
//! target it is connected to; or the connection ends here, its client gone, every target
//! failed, or cut by a drain meanwhile.
//!
//! Nothing here blocks: a target's name is looked up by the resolver's own threads (at once if
//! it is an address or cached), the connect is non-blocking, and the first bytes are written as
//! the socket takes them. Whatever must be waited for (the lookup's answer, which nudges the
//! connection's waker; the connect, its socket writable; room for the first bytes) is waited for in the
//! parking lot under the connect timeout, with the client socket watched for failure only (a
//! reset, or a drain, which shuts it down, ends the connection at once). So a connection to an
//! address or a cached name reaches its target on the thread that accepted its turn, with no
//! hand-off to another thread.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admission::Admitted;
use super::phase::{Conn, Route, Step, Timeouts, Wait};
use crate::backends::backend::ActiveGuard;
use crate::backends::dial::{Dial, Progress};
use crate::backends::proxy_protocol;
use crate::backends::resolver::{Notify, Resolver};
use crate::backends::routing::LimitGuard;
use crate::relay::park::{self, Side, Ticket};

pub(super) struct Connecting {
    route: Route,
    first_bytes: Vec<u8>,
    limit: Option<LimitGuard>,
    stage: Stage,
}

enum Stage {
    /// Looking the target up and connecting.
    Dialing(Dial),
    /// Connected; sending what goes first (`preamble`, from `sent` on) until `until`. The
    /// socket is the connection's backend socket in the table of open connections.
    Sending {
        target: ActiveGuard,
        preamble: Vec<u8>,
        /// Bytes of `preamble` that are the PROXY header.
        header: usize,
        sent: usize,
        until: Instant,
    },
}

/// What connecting is done with.
pub(super) struct Connected {
    pub(super) route: Route,
    pub(super) limit: Option<LimitGuard>,
    /// Counts the connection on its target (least-connections) and carries its byte counters.
    pub(super) target: ActiveGuard,
    pub(super) target_name: String,
    /// Bytes read for the server name and sent before relaying began.
    pub(super) first_bytes: u64,
}

impl Connecting {
    pub(super) fn new(admitted: Admitted) -> Connecting {
        Connecting {
            route: admitted.route,
            first_bytes: admitted.first_bytes,
            limit: admitted.limit,
            stage: Stage::Dialing(Dial::default()),
        }
    }

    /// `new_ticket` gives the connection its place in the lot if it has none yet (a lookup
    /// that must be waited for needs it, to be nudged when the answer is in).
    pub(super) fn step(
        mut self,
        conn: &mut Conn,
        timeouts: &Timeouts,
        resolver: &Resolver,
        new_ticket: &dyn Fn() -> Ticket,
    ) -> Step<Connecting, Connected> {
        // What the backend socket showed is the connect's (or the first bytes') news, not the
        // relay's: taken here.
        let backend_woke = std::mem::take(&mut conn.woke.0[Side::Backend as usize]) != 0;
        let ending = conn.woke.gone(Side::Client) || conn.reg.entry.was_drained();
        if let (true, Stage::Dialing(dial)) = (ending, &self.stage) {
            // Cut while dialing: its line still says which targets it tried.
            tried(conn, dial);
        }
        if conn.woke.gone(Side::Client) {
            return Step::End(self.route.client_gone(conn));
        }
        if conn.reg.entry.was_drained() {
            let target = self.target_name();
            let end = conn.reg.entry.cut_end();
            return Step::End(self.route.ending(target, end, None));
        }
        if let Stage::Dialing(dial) = &mut self.stage {
            let mut notify = || -> Notify {
                let waker = conn.ticket.get_or_insert_with(new_ticket).waker();
                Box::new(move || waker.wake())
            };
            let app = &self.route.app;
            match dial.step(app, resolver, timeouts.connect, backend_woke, &mut notify) {
                Progress::Wait {
                    socket,
                    fresh,
                    until,
                } => {
                    if fresh {
                        if let Some(t) = &mut conn.ticket {
                            t.replaced(Side::Backend);
                        }
                    }
                    let wait = Wait {
                        events: [Some(park::FAILURE), socket.map(|_| park::WRITE)],
                        backend: socket,
                        until: Some(until),
                    };
                    return Step::Wait(self, wait);
                }
                Progress::Failed(failed) => {
                    self.route.app.stats.failed.fetch_add(1, Ordering::Relaxed);
                    conn.timings.attempts = failed.0.len();
                    for (b, e) in &failed.0 {
                        conn.timings.failed(&b.target.to_string(), e.reason());
                    }
                    // Every target tried was this proxy itself: say so in one word, naming the
                    // first (the `target ... is down` line gives the address it resolved to).
                    if let Some(first) = failed.only_loops() {
                        let target = Some(first.to_string());
                        let reason = Some("loop".into());
                        return Step::End(self.route.ending(target, "connect_failed", reason));
                    }
                    let reason = Some(failed.to_string());
                    return Step::End(self.route.ending(None, "connect_failed", reason));
                }
                Progress::Connected {
                    stream: backend,
                    target,
                    fresh,
                } => {
                    // A socket closed before this one may have been registered in the lot under
                    // the same side: this one is registered anew when it waits.
                    if fresh {
                        if let Some(t) = &mut conn.ticket {
                            t.replaced(Side::Backend);
                        }
                    }
                    // TCP_NODELAY and non-blocking come from the connect (`dial`).
                    conn.reg.entry.backend.get_or_init(|| backend);
                    let _ = conn.reg.entry.target.set(Arc::clone(target.backend()));
                    let took = connected(conn, dial, &self.route);
                    let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
                    target
                        .backend()
                        .traffic()
                        .connect_us
                        .fetch_add(us, Ordering::Relaxed);
                    self.stage = self.sending(target, conn, timeouts);
                }
            }
        }
        self.send(conn)
    }

    /// The target being sent to, once connected.
    fn target_name(&self) -> Option<String> {
        match &self.stage {
            Stage::Dialing(_) => None,
            Stage::Sending { target, .. } => Some(target.backend().target.to_string()),
        }
    }

    /// What goes to the target before relaying: the PROXY header if the app sends one (its
    /// destination is what the client dialled: the accepted socket's local address, in both
    /// modes), then the client's bytes read for its server name, unchanged.
    fn sending(&mut self, target: ActiveGuard, conn: &Conn, timeouts: &Timeouts) -> Stage {
        let (peer, local): (SocketAddr, SocketAddr) = (conn.peer, conn.local);
        let mut preamble = match self.route.app.proxy_protocol() {
            Some(version) => proxy_protocol::header(version, peer, local),
            None => Vec::new(),
        };
        let header = preamble.len();
        preamble.extend_from_slice(&self.first_bytes);
        Stage::Sending {
            target,
            preamble,
            header,
            sent: 0,
            until: Instant::now() + timeouts.connect,
        }
    }

    /// Send the rest of the preamble, as far as the socket takes it; done once it is all sent.
    /// At most MAX_PREREAD bytes and a header go to a fresh connection, which its send buffer
    /// and the target's window take at once unless the target is broken.
    fn send(mut self, conn: &mut Conn) -> Step<Connecting, Connected> {
        let Stage::Sending {
            preamble,
            header,
            sent,
            until,
            ..
        } = &mut self.stage
        else {
            unreachable!("dialing returns before sending");
        };
        // Set when connected (just above, or before the wait that brought us here).
        let Some(backend) = conn.reg.entry.backend.get() else {
            unreachable!("sending without a backend socket");
        };
        while *sent < preamble.len() {
            let what = if *sent < *header {
                "sending the PROXY header"
            } else {
                "sending the client's first bytes"
            };
            let failed = match (&*backend).write(&preamble[*sent..]) {
                Ok(0) => Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    *sent += n;
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= *until {
                        Some(io::Error::from(io::ErrorKind::TimedOut))
                    } else {
                        let wait = Wait {
                            events: [Some(park::FAILURE), Some(park::WRITE)],
                            backend: Some(backend.as_raw_fd()),
                            until: Some(*until),
                        };
                        return Step::Wait(self, wait);
                    }
                }
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                let target = self.target_name();
                return Step::End(
                    self.route
                        .ending(target, "reset", Some(format!("{what}: {e}"))),
                );
            }
        }
        let Stage::Sending { target, .. } = self.stage else {
            unreachable!("sending above");
        };
        let target_state = target.backend();
        let target_name = target_state.target.to_string();
        let first_bytes = self.first_bytes.len() as u64;
        target_state
            .traffic()
            .bytes_up
            .fetch_add(first_bytes, Ordering::Relaxed);
        Step::Done(Connected {
            route: self.route,
            limit: self.limit,
            target,
            target_name,
            first_bytes,
        })
    }
}

/// Note how the connect went, for the log line and the app's histogram: the time since the
/// target connected to was picked, and the targets tried before it. That time is returned.
fn connected(conn: &mut Conn, dial: &Dial, route: &Route) -> Duration {
    let t = &mut conn.timings;
    let now = Instant::now();
    let took = dial
        .began()
        .map_or(Duration::ZERO, |b| now.duration_since(b));
    route.app.stats.connect_time.observe(took);
    t.connect = Some(took);
    t.connected = Some(now);
    tried(conn, dial);
    took
}

/// Note the targets tried so far, and those that failed.
fn tried(conn: &mut Conn, dial: &Dial) {
    let t = &mut conn.timings;
    t.attempts = dial.attempts();
    for (b, e) in dial.failures() {
        t.failed(&b.target.to_string(), e.reason());
    }
}
