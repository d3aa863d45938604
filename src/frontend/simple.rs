//! Simple mode: listeners bound directly by this process, so that every configured (address,
//! port) is served: per port and family, a wildcard listener where some app there takes more
//! than single addresses (every address, or a prefix), else one listener per configured
//! address. A port whose apps take every address of both families gets one dual-stack socket,
//! as it always has. Which app a connection belongs to is decided after accept, from its local
//! address (and server name), the same as in bpf mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::Arc;

use mio::net::TcpListener;

use crate::backends::routing::Routes;
pub use crate::frontend::ports::Bind;
use crate::frontend::ports::{PortChange, PortError, PortSource};
use crate::relay::doors::{Door, Doors};
use crate::sys::net::{listen, listen_any};

/// Simple mode's listeners, by what they bind, each open as a door the relay threads accept
/// from.
pub struct PerPort {
    doors: Arc<Doors>,
    listeners: BTreeMap<Bind, Arc<Door>>,
    /// Listeners handed over by the process we upgrade, used instead of binding anew; those
    /// the config no longer wants are closed after the first apply.
    inherited: HashMap<SocketAddr, TcpListener>,
    /// The most listeners the descriptor budget has room for (unknown before the start has
    /// fitted the connection bound to it). A reload past it is refused before anything is
    /// bound: binding until EMFILE would take, for a moment, the descriptors that the open
    /// connections' targets and the clients being accepted need.
    room: Option<u64>,
}

/// The listeners the table `routes` needs: per port and family, a wildcard where some app
/// takes more than single addresses, else one per address; one dual-stack socket where both
/// families need a wildcard. Read from the table's bindings, which are the config's (port,
/// prefix) pairs: a count of those pairs kept beside it was about 200 bytes an app at 200,000
/// apps with addresses of their own, and the addresses of a family a wildcard covers are not
/// even looked at.
pub fn wanted(routes: &Routes) -> BTreeSet<Bind> {
    let mut out = BTreeSet::new();
    for (port, table) in routes.ports() {
        let at = |ip: IpAddr| SocketAddr::new(ip, port);
        let (all4, all6) = (table.wide(true), table.wide(false));
        if all4 && all6 {
            out.insert(Bind {
                addr: at(Ipv6Addr::UNSPECIFIED.into()),
                dual: true,
            });
            continue;
        }
        if all4 {
            out.insert(Bind {
                addr: at(Ipv4Addr::UNSPECIFIED.into()),
                dual: false,
            });
        }
        if all6 {
            out.insert(Bind {
                addr: at(Ipv6Addr::UNSPECIFIED.into()),
                dual: false,
            });
        }
        for ip in table.hosts() {
            if (ip.is_ipv4() && !all4) || (ip.is_ipv6() && !all6) {
                out.insert(Bind {
                    addr: at(ip),
                    dual: false,
                });
            }
        }
    }
    out
}

/// Whether two listeners of ours would refuse each other's bind: the same port, the same
/// family (or a dual-stack one), and the same address or a wildcard on one side.
fn clash(a: &Bind, b: &Bind) -> bool {
    if a.addr.port() != b.addr.port() {
        return false;
    }
    let same_family = a.addr.is_ipv4() == b.addr.is_ipv4() || a.dual || b.dual;
    same_family
        && (a.addr.ip() == b.addr.ip()
            || a.addr.ip().is_unspecified()
            || b.addr.ip().is_unspecified())
}

impl PerPort {
    pub fn new(doors: Arc<Doors>, inherited: HashMap<SocketAddr, TcpListener>) -> PerPort {
        PerPort {
            doors,
            listeners: BTreeMap::new(),
            inherited,
            room: None,
        }
    }

    /// The listener for `bind`: the inherited one if there is one, else a new one. An inherited
    /// one may come from an older process that did not set the option accepted sockets inherit.
    fn open(&mut self, bind: Bind) -> io::Result<TcpListener> {
        if let Some(l) = self.inherited.remove(&bind.addr) {
            return crate::sys::net::set_nodelay(l.as_raw_fd()).map(|()| l);
        }
        if bind.dual {
            // An inherited IPv4-only wildcard (a host without IPv6) serves the same purpose.
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), bind.addr.port());
            if let Some(l) = self.inherited.remove(&v4) {
                return crate::sys::net::set_nodelay(l.as_raw_fd()).map(|()| l);
            }
            return listen_any(bind.addr.port());
        }
        listen(bind.addr, bind.addr.is_ipv6())
    }

    /// Bind `bind` and open it as a door.
    fn add(&mut self, bind: Bind) -> Result<Arc<Door>, PortError> {
        let l = self.open(bind).map_err(|error| PortError::Listen {
            port: bind.addr.port(),
            addr: (!bind.addr.ip().is_unspecified()).then_some(bind.addr.ip()),
            error,
        })?;
        self.doors.open(l).map_err(PortError::Register)
    }

    fn close(&mut self, bind: &Bind) -> bool {
        match self.listeners.remove(bind) {
            Some(door) => {
                self.doors.close(&door);
                true
            }
            None => false,
        }
    }
}

impl PortSource for PerPort {
    fn set_listener_room(&mut self, room: u64) {
        self.room = Some(room);
    }

    fn serve_all(&mut self, routes: &Routes) -> Result<(), PortError> {
        // The whole set of listeners, bounded by the descriptor budget as any change is.
        self.apply(&PortChange {
            binds: wanted(routes),
            steer: Vec::new(),
        })
    }

    fn apply(&mut self, change: &PortChange) -> Result<(), PortError> {
        let want = &change.binds;
        let have: BTreeSet<Bind> = self.listeners.keys().copied().collect();
        let gone: Vec<Bind> = have.difference(want).copied().collect();
        let new: Vec<Bind> = want.difference(&have).copied().collect();
        if let Some(room) = self.room {
            if want.len() as u64 > room && new.len() > gone.len() {
                return Err(PortError::TooManyListeners {
                    wanted: want.len(),
                    room,
                });
            }
        }

        // Bind every new listener first, so that one that cannot be bound refuses the whole
        // change before anything else has moved. A new listener that would clash with one of
        // ours that is going away (a port going from single addresses to every address, or
        // back) can only be bound once that one is closed: those come second.
        let mut fresh: Vec<(Bind, Arc<Door>)> = Vec::new();
        let (later, now): (Vec<Bind>, Vec<Bind>) = new
            .into_iter()
            .partition(|b| gone.iter().any(|g| clash(b, g)));
        let doors = Arc::clone(&self.doors);
        let undo = |fresh: Vec<(Bind, Arc<Door>)>| {
            for (_, door) in fresh {
                doors.close(&door);
            }
        };
        for bind in now {
            match self.add(bind) {
                Ok(door) => fresh.push((bind, door)),
                Err(e) => {
                    undo(fresh);
                    return Err(e);
                }
            }
        }
        if !later.is_empty() {
            // Connections queued on the closed listeners are lost, and for a moment the
            // address refuses: the price of changing a port's kind of binding.
            let closed: Vec<Bind> = gone
                .iter()
                .filter(|g| later.iter().any(|b| clash(b, g)))
                .copied()
                .collect();
            for g in &closed {
                self.close(g);
            }
            for bind in later {
                match self.add(bind) {
                    Ok(door) => fresh.push((bind, door)),
                    Err(e) => {
                        undo(fresh);
                        // Put back what was closed, so the running config keeps serving.
                        for g in closed {
                            match self.add(g) {
                                Ok(door) => {
                                    self.listeners.insert(g, door);
                                }
                                Err(again) => crate::error!(
                                    "cannot listen again on {} after a refused reload: {again}",
                                    g.addr
                                ),
                            }
                        }
                        return Err(e);
                    }
                }
            }
        }
        for g in &gone {
            self.close(g);
        }
        self.listeners.extend(fresh);
        self.inherited.clear();
        Ok(())
    }

    fn stop(&mut self) {
        let all: Vec<Bind> = self.listeners.keys().copied().collect();
        for b in &all {
            self.close(b);
        }
    }

    fn listeners(&self) -> usize {
        self.listeners.len()
    }

    fn handover(&self) -> Vec<(SocketAddr, RawFd)> {
        self.listeners
            .values()
            .filter_map(|d| d.handover())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn binds(json: &str) -> Vec<String> {
        let c = Config::parse(Path::new("c"), json.as_bytes()).unwrap();
        wanted(&Routes::new(&c, None))
            .into_iter()
            .map(|b| format!("{}{}", b.addr, if b.dual { " dual" } else { "" }))
            .collect()
    }

    #[test]
    fn binds_what_the_apps_ask() {
        assert_eq!(
            binds(r#"{"Apps":[{"Name":"a","Ports":[80],"Targets":["h:1"]}]}"#),
            ["[::]:80 dual"]
        );
        assert_eq!(
            binds(
                r#"{"Apps":[{"Name":"a","Ports":[80],"Addresses":["127.0.0.2","::1"],"Targets":["h:1"]},
                            {"Name":"b","Ports":[80],"Addresses":["127.0.0.3"],"Targets":["h:1"]}]}"#
            ),
            ["127.0.0.2:80", "127.0.0.3:80", "[::1]:80"]
        );
        assert_eq!(
            binds(
                r#"{"Apps":[{"Name":"a","Ports":[80],"Addresses":["127.0.0.0/8","::1"],"Targets":["h:1"]},
                            {"Name":"b","Ports":[80],"Addresses":["127.0.0.3"],"Targets":["h:1"]}]}"#
            ),
            ["0.0.0.0:80", "[::1]:80"]
        );
    }

    /// A table an update made wants what the new config wants, down to a port no app is left
    /// on.
    #[test]
    fn an_updated_table_wants_what_the_new_config_wants() {
        let parse = |json: &str| Config::parse(Path::new("c"), json.as_bytes()).unwrap();
        let old = parse(
            r#"{"Apps":[{"Name":"a","Ports":[80,81],"Addresses":["127.0.0.2"],"Targets":["h:1"]},
                        {"Name":"b","Ports":[80],"Addresses":["127.0.0.3","::1"],"Targets":["h:1"]},
                        {"Name":"c","Ports":[82],"Targets":["h:1"]}]}"#,
        );
        let new = parse(
            r#"{"Apps":[{"Name":"a","Ports":[80],"Addresses":["127.0.0.0/8"],"Targets":["h:1"]},
                        {"Name":"b","Ports":[80],"Addresses":["127.0.0.3","::1"],"Targets":["h:1"]}]}"#,
        );
        let before = Routes::new(&old, None);
        let after = before.update(&new, &crate::config::Diff::between(&old, &new));
        assert_eq!(wanted(&after), wanted(&Routes::new(&new, None)));
        assert_ne!(wanted(&before), wanted(&after));
    }
}
