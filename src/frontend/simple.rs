//! Simple mode: one dual-stack listener per configured port, bound directly by this process.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};

use super::ports::{accept_from, handover_of, Accepted, PortError, PortSource, FIRST_LISTENER};
use crate::config::Config;
use crate::net::listen_any;

/// Simple mode: one dual-stack listener per port, token = `FIRST_LISTENER + port`.
pub struct PerPort {
    listeners: HashMap<u16, TcpListener>,
    /// Listeners handed over by the process we upgrade, used instead of binding anew; those
    /// the config no longer wants are closed after the first apply.
    inherited: HashMap<SocketAddr, TcpListener>,
}

impl PerPort {
    pub fn new(inherited: HashMap<SocketAddr, TcpListener>) -> PerPort {
        PerPort {
            listeners: HashMap::new(),
            inherited,
        }
    }

    /// The listener for `port`: the inherited one if there is one, else a new one.
    fn listener_for(&mut self, port: u16) -> io::Result<TcpListener> {
        let dual = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port);
        match self
            .inherited
            .remove(&dual)
            .or_else(|| self.inherited.remove(&v4))
        {
            Some(l) => Ok(l),
            None => listen_any(port),
        }
    }
}

impl PortSource for PerPort {
    fn apply(
        &mut self,
        registry: &Registry,
        _config: &Config,
        added: &[u16],
        removed: &[u16],
    ) -> Result<(), PortError> {
        // Bind every new port first, so that a port that cannot be bound refuses the whole
        // change before anything else has moved.
        let mut fresh = Vec::with_capacity(added.len());
        for &port in added {
            let bound = self.listener_for(port).and_then(|mut l| {
                registry.register(&mut l, token_for(port), Interest::READABLE)?;
                Ok(l)
            });
            match bound {
                Ok(l) => fresh.push((port, l)),
                Err(error) => {
                    for (_, mut l) in fresh {
                        let _ = registry.deregister(&mut l);
                    }
                    return Err(PortError { port, error });
                }
            }
        }
        for port in removed {
            if let Some(mut l) = self.listeners.remove(port) {
                let _ = registry.deregister(&mut l);
            }
        }
        self.listeners.extend(fresh);
        self.inherited.clear();
        Ok(())
    }

    fn accept(&mut self, token: Token) -> io::Result<Option<Accepted>> {
        let Some(port) = token
            .0
            .checked_sub(FIRST_LISTENER)
            .and_then(|p| u16::try_from(p).ok())
        else {
            return Ok(None);
        };
        let Some(listener) = self.listeners.get(&port) else {
            return Ok(None);
        };
        accept_from(listener, Some(port))
    }

    fn stop(&mut self, registry: &Registry) {
        for (_, mut l) in self.listeners.drain() {
            let _ = registry.deregister(&mut l);
        }
    }

    fn listeners(&self) -> usize {
        self.listeners.len()
    }

    fn handover(&self) -> Vec<(SocketAddr, RawFd)> {
        self.listeners.values().filter_map(handover_of).collect()
    }
}

fn token_for(port: u16) -> Token {
    Token(FIRST_LISTENER + port as usize)
}
