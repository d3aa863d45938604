//! bpf mode's port source: one listener per address family, and the sk_lookup program that
//! steers every configured port to it. A reload only rewrites the port map, as a diff.
//!
//! Map writes that fail do not refuse a reload (the config is valid, and the ports already
//! steered keep working): the port stays wanted and is retried at every reload tick.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};

use super::{BpfError, Steering};
use crate::ports::{self, Accepted, PortError, PortSource, FIRST_LISTENER};

/// Listener tokens above every simple-mode port token, so the two can never be confused.
const V4: Token = Token(FIRST_LISTENER + 65_536);
const V6: Token = Token(FIRST_LISTENER + 65_537);

pub struct Steered {
    v4: Option<TcpListener>,
    v6: Option<TcpListener>,
    steering: Steering,
    /// Ports the config wants steered.
    wanted: BTreeSet<u16>,
    /// Ports written into the map.
    steered: BTreeSet<u16>,
    /// A failed map write has been logged and not yet recovered, so retries stay quiet.
    failing: bool,
    registered: bool,
}

/// Why bpf mode could not start.
#[derive(Debug)]
pub enum StartError {
    /// The listener itself could not be bound.
    Listen(SocketAddr, io::Error),
    Bpf(BpfError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Bpf(e) => write!(f, "{e}"),
        }
    }
}

impl Steered {
    /// Bind the listener(s) on `port` (all addresses, or `bind`), load the program with them in
    /// its socket map, and attach it to this network namespace. No port is steered yet.
    pub fn start(port: u16, bind: Option<IpAddr>) -> Result<Steered, StartError> {
        let listen = |addr: SocketAddr, v6only| {
            ports::listen(addr, v6only).map_err(|e| StartError::Listen(addr, e))
        };
        // Two sockets rather than one dual-stack one: the program picks the socket by the
        // packet's family, and a v6-only socket keeps `local_addr` of an IPv4 connection a
        // plain IPv4 address.
        let (v4, v6) = match bind {
            None => (
                Some(listen(
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                    false,
                )?),
                match listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true) {
                    Ok(l) => Some(l),
                    // A host without IPv6 still serves IPv4.
                    Err(StartError::Listen(_, e))
                        if e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                    {
                        None
                    }
                    Err(e) => return Err(e),
                },
            ),
            Some(ip @ IpAddr::V4(_)) => (Some(listen(SocketAddr::new(ip, port), false)?), None),
            Some(ip @ IpAddr::V6(_)) => (None, Some(listen(SocketAddr::new(ip, port), true)?)),
        };
        let steering = Steering::attach(
            v4.as_ref().map(|l| l.as_fd()),
            v6.as_ref().map(|l| l.as_fd()),
        )
        .map_err(StartError::Bpf)?;
        Ok(Steered {
            v4,
            v6,
            steering,
            wanted: BTreeSet::new(),
            steered: BTreeSet::new(),
            failing: false,
            registered: false,
        })
    }

    /// Bring the map in line with `wanted`; failures are logged and left for the next tick.
    fn sync(&mut self) {
        let mut failed: Option<(u16, BpfError)> = None;
        let mut failures = 0usize;
        let remove: Vec<u16> = self.steered.difference(&self.wanted).copied().collect();
        for port in remove {
            match self.steering.remove_port(port) {
                Ok(()) => {
                    self.steered.remove(&port);
                }
                Err(e) => {
                    failures += 1;
                    failed.get_or_insert((port, e));
                }
            }
        }
        let add: Vec<u16> = self.wanted.difference(&self.steered).copied().collect();
        for port in add {
            match self.steering.add_port(port) {
                Ok(()) => {
                    self.steered.insert(port);
                }
                Err(e) => {
                    failures += 1;
                    failed.get_or_insert((port, e));
                }
            }
        }
        match failed {
            Some((port, e)) => {
                if !self.failing {
                    crate::error!(
                        "bpf: cannot update the port map for {failures} ports (first: port {port}: {e}); retrying at every reload tick"
                    );
                }
                self.failing = true;
            }
            None if self.failing => {
                crate::info!("bpf: port map updated after earlier failures; every port steered");
                self.failing = false;
            }
            None => {}
        }
    }
}

impl PortSource for Steered {
    fn apply(
        &mut self,
        registry: &Registry,
        added: &[u16],
        removed: &[u16],
    ) -> Result<(), PortError> {
        if !self.registered {
            for (l, token) in [(&mut self.v4, V4), (&mut self.v6, V6)] {
                if let Some(l) = l {
                    registry
                        .register(l, token, Interest::READABLE)
                        .map_err(|error| PortError { port: 0, error })?;
                }
            }
            self.registered = true;
        }
        self.wanted.extend(added);
        for p in removed {
            self.wanted.remove(p);
        }
        self.sync();
        Ok(())
    }

    fn tick(&mut self) {
        if self.wanted != self.steered {
            self.sync();
        }
    }

    fn accept(&mut self, token: Token) -> io::Result<Option<Accepted>> {
        let listener = match token {
            V4 => self.v4.as_ref(),
            V6 => self.v6.as_ref(),
            _ => None,
        };
        match listener {
            // The accepted socket's local address keeps the port the client dialled.
            Some(l) => ports::accept_from(l, None),
            None => Ok(None),
        }
    }

    fn stop(&mut self, registry: &Registry) {
        // Detach first: from here on the kernel refuses connections to our ports at once,
        // instead of queueing SYNs on a listener that is about to close.
        self.steering.detach();
        for l in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            let mut l = l;
            let _ = registry.deregister(&mut l);
        }
    }

    fn listeners(&self) -> usize {
        2
    }
}
