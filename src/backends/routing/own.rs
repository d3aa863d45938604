//! `OwnFrontends`: where this proxy accepts, as the table in force says, for the loop check at
//! each connect (see `loops`). The table's own port tables answer it: a (port, prefix) some
//! app answers on is a binding there, so a separate index of the same pairs (a quarter of a
//! KB an app at 200,000 apps with addresses of their own) is not kept beside it.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};

use super::Ports;
use crate::backends::loops::{dialled, is_local};

/// The port tables of the table in force, shared by every app's route: a route is kept across
/// reloads while its app is unchanged, the frontends are the whole config's, so they are
/// replaced in place. Weak: the tables hold the routes, which hold this; the table in force is
/// held by those serving with it.
#[derive(Debug, Default)]
pub struct OwnFrontends(RwLock<Weak<Ports>>);

impl OwnFrontends {
    /// `addr` would be accepted by this proxy itself, as the table in force says.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        let now = self.0.read().unwrap_or_else(|e| e.into_inner()).upgrade();
        // None: no table is in force (the process is stopping), so nothing accepts.
        let Some(ports) = now else {
            return false;
        };
        // The port first: a bind test costs three system calls, and most targets are remote.
        let Some(table) = ports.get(&addr.port()) else {
            return false;
        };
        let ip = dialled(addr.ip());
        table.lookup(ip).is_some() && is_local(ip)
    }

    /// These are the frontends from now on.
    pub(super) fn set(&self, ports: &Arc<Ports>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(ports);
    }
}
