//! Connecting: connect to a target of the app (trying others as `balance::connect` decides),
//! send what goes first (the PROXY header if the app sends one, then the bytes read for the
//! server name), and hand the backend socket to the table of open connections, where drains
//! reach it. Done with the target it is connected to; or the connection ends here, its client
//! gone, every target failed, or cut by a drain meanwhile.
//!
//! The connect and the first writes block this thread for at most the connect timeout each
//! (the pool runs starting connections on threads of their own, see `pool`).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;

use super::admission::Admitted;
use super::phase::{Conn, Route, Step, Timeouts};
use crate::backends::backend::ActiveGuard;
use crate::backends::routing::{AppRoute, LimitGuard};
use crate::backends::{balance, proxy_protocol};
use crate::relay::park::Side;

pub(super) struct Connecting {
    route: Route,
    first_bytes: Vec<u8>,
    limit: Option<LimitGuard>,
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
        }
    }

    pub(super) fn step(self, conn: &mut Conn, timeouts: &Timeouts) -> Step<Connecting, Connected> {
        let Connecting {
            route,
            first_bytes,
            limit,
        } = self;
        if conn.woke.gone(Side::Client) {
            return Step::End(route.client_gone(conn));
        }
        let (backend, guard) = match balance::connect(&route.app, timeouts.connect) {
            Ok(ok) => ok,
            Err(failed) => {
                route.app.stats.failed.fetch_add(1, Ordering::Relaxed);
                // Every target tried was this proxy itself: say so in one word, naming the first
                // (the `target ... is down` line gives the address it resolved to).
                if let Some(first) = failed.only_loops() {
                    let target = Some(first.to_string());
                    return Step::End(route.ending(target, "connect_failed", Some("loop".into())));
                }
                let reason = Some(failed.to_string());
                return Step::End(route.ending(None, "connect_failed", reason));
            }
        };
        let target_state = guard.backend();
        let target = target_state.target.to_string();
        let sent = send_preamble(&backend, &route.app, conn, &first_bytes, timeouts.connect);
        if let Err(reason) = sent {
            return Step::End(route.ending(Some(target), "reset", Some(reason)));
        }
        target_state
            .bytes_up
            .fetch_add(first_bytes.len() as u64, Ordering::Relaxed);
        // TCP_NODELAY is inherited from the listener (net::listen), and the backend socket
        // comes non-blocking with it from its connect: no socket option is set here.
        conn.reg.entry.backend.get_or_init(|| backend);
        if conn.reg.entry.was_drained() {
            // Cut while we were connecting: do not start relaying.
            return Step::End(route.ending(Some(target), "drained", None));
        }
        Step::Done(Connected {
            route,
            limit,
            target: guard,
            target_name: target,
            first_bytes: first_bytes.len() as u64,
        })
    }
}

/// What goes to the target before relaying: the PROXY header if the app sends one, then the
/// client's bytes read for its server name. The reason, if the target would not take them.
fn send_preamble(
    backend: &TcpStream,
    app: &AppRoute,
    conn: &Conn,
    first_bytes: &[u8],
    timeout: std::time::Duration,
) -> Result<(), String> {
    let (peer, local): (SocketAddr, SocketAddr) = (conn.peer, conn.local);
    if let Some(version) = app.proxy_protocol {
        // The destination is what the client dialled: the accepted socket's local address, in
        // both modes.
        let header = proxy_protocol::header(version, peer, local);
        crate::sys::net::write_all_within(backend, &header, timeout)
            .map_err(|e| format!("sending the PROXY header: {e}"))?;
    }
    if !first_bytes.is_empty() {
        // The bytes read for the server name go first, unchanged: at most MAX_PREREAD bytes to
        // a fresh connection, which its send buffer and the target's window take at once
        // unless the target is broken.
        crate::sys::net::write_all_within(backend, first_bytes, timeout)
            .map_err(|e| format!("sending the client's first bytes: {e}"))?;
    }
    Ok(())
}
