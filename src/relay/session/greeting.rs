//! The greeting: pick the app a connection goes to. The only app of its binding, or, where
//! Hostnames tell apps apart, the one its TLS ClientHello names: read within the preread timeout
//! (counted from the accept), while the client is silent waiting in the parking lot, not on a
//! thread. Otherwise as many silent clients as `--max-threads` would hold every relay thread for
//! the preread timeout, and no other connection on any port would be served meanwhile. Its step
//! never blocks, so the threads that wait for events run it as the bytes come, like relaying:
//! a client trickling its hello a byte at a time costs a wake-up per byte, never a thread.
//!
//! Done with the app (counted there as accepted and active, and under its per-client limit) and
//! the bytes read, which go to the target first; or the connection ends here, routed nowhere or
//! refused by the app's per-client limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::phase::{Conn, Ending, Route, Step, Timeouts, Wait};
use crate::backends::routing::{AppRoute, Binding, Unrouted, UnroutedCounts};
use crate::relay::park;
use crate::relay::per_client::{self, CLIENT_LIMIT};
use crate::relay::preread::{Hello, HelloReader};

pub(super) struct Greeting {
    binding: Arc<Binding>,
    hello: HelloReader,
}

/// What the greeting is done with.
pub(super) struct Greeted {
    pub(super) route: Route,
    /// Bytes read for the server name, to be sent to the target first.
    pub(super) first_bytes: Vec<u8>,
}

/// The app picked, and what was read from the client to pick it.
struct Choice {
    app: Result<Arc<AppRoute>, Unrouted>,
    first_bytes: Vec<u8>,
    /// The server name as the client sent it, if one was read.
    sni: Option<String>,
}

impl Greeting {
    pub(super) fn new(binding: Arc<Binding>) -> Greeting {
        Greeting {
            binding,
            hello: HelloReader::new(),
        }
    }

    /// `unrouted` counts the connections no app takes.
    pub(super) fn step(
        mut self,
        conn: &mut Conn,
        timeouts: &Timeouts,
        unrouted: &UnroutedCounts,
    ) -> Step<Greeting, Greeted> {
        let choice = if !self.binding.needs_server_name() {
            Choice {
                app: self
                    .binding
                    .default_app()
                    .cloned()
                    .ok_or(Unrouted::NoServerName),
                first_bytes: Vec::new(),
                sni: None,
            }
        } else {
            // The preread timeout counts from the accept, however the wait was split.
            let deadline = conn.accepted + timeouts.preread;
            let hello = match self.hello.step(&conn.reg.entry.client) {
                Some(hello) => hello,
                None if Instant::now() >= deadline => Hello::Timeout,
                // Kept armed (the reader reads to "would block"): a hello trickled a byte at a time
                // costs a wake-up per byte, not a re-arm too.
                None => return Step::Wait(self, Wait::client(park::READ | park::EDGE, deadline)),
            };
            let bytes = std::mem::take(&mut self.hello).into_bytes();
            choose(&self.binding, hello, bytes)
        };
        route(conn, choice, unrouted)
    }
}

/// Pick the app on `binding` by what the ClientHello said.
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

/// Take the connection to its app: counted there, under the app's per-client limit where the
/// app was only known now.
fn route(conn: &mut Conn, choice: Choice, unrouted: &UnroutedCounts) -> Step<Greeting, Greeted> {
    let Choice {
        app,
        first_bytes,
        sni,
    } = choice;
    let app = match app {
        Ok(app) => app,
        Err(why) => {
            let end = if conn.reg.entry.was_drained() {
                conn.reg.entry.cut_end()
            } else {
                unrouted.count(conn.local.port(), why);
                "no_route"
            };
            return Step::End(Ending {
                app: None,
                active: false,
                target: None,
                moved: (0, 0),
                end,
                reason: Some(why.as_str().into()),
                detail: Some(why.describe()),
                sni,
            });
        }
    };
    let _ = conn.reg.entry.app.set(Arc::clone(&app));
    if app.stats.disabled.load(Ordering::Relaxed) {
        // `disable app`: refused as it would be at accept, with a reset, before it counts
        // anywhere (where the server name picks the app, it is known only now).
        app.stats.refused_disabled.fetch_add(1, Ordering::Relaxed);
        crate::sys::net::reset_on_close(&conn.reg.entry.client);
        return Step::End(Ending {
            app: Some(app),
            active: false,
            target: None,
            moved: (0, 0),
            end: "disabled",
            // An operator's choice, not a fault: logged at info, saying how to undo it.
            reason: None,
            detail: Some("the app is disabled (flyproxy ctl enable app)"),
            sni,
        });
    }
    if let Err(reached) = conn.client_slots.take_app(&app, conn.peer) {
        let reason = per_client::refused(Some(&app), reached);
        return Step::End(Ending {
            app: Some(app),
            active: false,
            target: None,
            moved: (0, 0),
            end: CLIENT_LIMIT,
            reason: Some(reason),
            detail: None,
            sni,
        });
    }
    let stats = &app.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    Step::Done(Greeted {
        route: Route { app, sni },
        first_bytes,
    })
}
