//! A connection's place under the per-client limits: `--max-connections-per-client` (taken by the
//! accepting relay thread at accept) and its app's `MaxConnectionsPerClient` (taken at accept where the
//! app is known then, or by the session once the server name picked it). Where the server name
//! picks the app and every app on the (address, port) has `MaxConnectionsPerClient`, the largest
//! of them is taken at accept too (`Binding::per_client`), so that a client's silent connections
//! cannot hold every slot while their names are awaited. The counts are given back as the
//! connection ends, however it ends.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::backends::clients::{ClientCounts, ClientKey, ClientSlot};
use crate::backends::routing::AppRoute;
use crate::relay::access_log::ConnLine;

/// Which limit a client reached, and its value.
pub type Reached = (&'static str, usize);

/// The limit taken at accept where every app on the port has one, in a refusal's reason.
const EVERY_APP: &str = "the largest MaxConnectionsPerClient of the apps on the port";

/// A connection's place under `--max-connections-per-client` and its app's
/// `MaxConnectionsPerClient` (either may be absent).
#[derive(Debug, Default)]
pub struct ClientSlots {
    _global: Option<ClientSlot>,
    /// Under the largest of the apps' limits, before the server name picks one.
    _apps: Option<ClientSlot>,
    _app: Option<ClientSlot>,
    /// The app's limit has been checked (it may have none).
    app_checked: bool,
}

impl ClientSlots {
    /// Count a new connection from `peer` under the global limit, under `apps` (the counts of a
    /// binding whose apps all have a limit, see `Binding::per_client`) and, when the app is
    /// known at accept, under `app`'s. Err names the limit already reached for this client and
    /// its value (nothing stays counted then). Where the app is only known once the server name
    /// is read, `take_app` counts it then.
    pub fn take(
        global: Option<&Arc<ClientCounts>>,
        apps: Option<&Arc<ClientCounts>>,
        app: Option<&AppRoute>,
        peer: SocketAddr,
    ) -> Result<ClientSlots, Reached> {
        let key = ClientKey::of(peer.ip());
        let global = match global {
            Some(c) => Some(
                c.acquire(key)
                    .ok_or(("--max-connections-per-client", c.limit()))?,
            ),
            None => None,
        };
        let apps = match apps {
            Some(c) => Some(c.acquire(key).ok_or((EVERY_APP, c.limit()))?),
            None => None,
        };
        let mut slots = ClientSlots {
            _global: global,
            _apps: apps,
            _app: None,
            app_checked: false,
        };
        if let Some(app) = app {
            slots.take_app(app, peer)?;
        }
        Ok(slots)
    }

    /// Count the connection under `app`'s `MaxConnectionsPerClient`, once.
    pub fn take_app(&mut self, app: &AppRoute, peer: SocketAddr) -> Result<(), Reached> {
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

/// A connection closed at accept because its client address already has `limit` connections
/// open under `which` limit: counted and logged as `end=client_limit`. Called at accept
/// instead of starting the connection's session.
/// `app` is None where the app is not known yet (it would be picked by the server name).
pub fn refuse_client_limit(
    app: Option<&AppRoute>,
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    reached: Reached,
) {
    let accepted = Instant::now();
    drop(client);
    let reason = refused(app, reached);
    ConnLine {
        app: app.map(|a| a.name()),
        client: peer,
        port,
        target: None,
        up: 0,
        down: 0,
        accepted,
        end: CLIENT_LIMIT,
        reason: Some(&reason),
        detail: None,
        sni: None,
        timings: &Default::default(),
    }
    .write();
}

/// The `end` of a connection refused by a per-client limit.
pub const CLIENT_LIMIT: &str = "client_limit";

/// Count a connection refused by a per-client limit on its app (where it is known), and say
/// why, for its log line.
pub fn refused(app: Option<&AppRoute>, (which, limit): Reached) -> String {
    if let Some(app) = app {
        app.stats.accepted.fetch_add(1, Ordering::Relaxed);
        app.stats.client_limited.fetch_add(1, Ordering::Relaxed);
    }
    format!("the client address has {limit} connections open ({which})")
}
