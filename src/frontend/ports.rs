//! How configured ports reach the process: the one thing the two modes do differently.
//!
//! `PortSource` is what the listener loop needs from a mode: make a set of ports reachable,
//! change it by a diff on reload (a `PortChange`, worked out off the loop by the config
//! plane), with listeners opened as doors (`relay::doors`), from which the relay threads
//! accept. `simple::PerPort` is the simple mode (one listener per port); `bpf::Steered` is the
//! bpf mode's, beside it. Everything from `accept()` on is shared.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use crate::backends::routing::Routes;
use crate::config::prefix::Prefix;
use crate::metrics::LookupReader;

/// Why a set of ports could not be made reachable.
#[derive(Debug)]
pub enum PortError {
    /// This port (on this address, when the listener was for one address rather than every
    /// one) could not be listened on.
    Listen {
        port: u16,
        addr: Option<std::net::IpAddr>,
        error: io::Error,
    },
    /// A listener could not be watched by the relay threads.
    Register(io::Error),
    /// More listeners than the open-file limit leaves room for beside the connection bound.
    TooManyListeners { wanted: usize, room: u64 },
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortError::Listen { port, addr, error } => {
                let hint = match error.kind() {
                    io::ErrorKind::AddrInUse => " (another process listens on it)",
                    io::ErrorKind::PermissionDenied => {
                        " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                    }
                    io::ErrorKind::AddrNotAvailable => match addr {
                        Some(IpAddr::V6(_)) => NONLOCAL_V6,
                        _ => NONLOCAL_V4,
                    },
                    _ => "",
                };
                match addr {
                    Some(a) => write!(f, "cannot listen on port {port} on {a}: {error}{hint}"),
                    None => write!(f, "cannot listen on port {port}: {error}{hint}"),
                }
            }
            PortError::Register(error) => {
                write!(f, "cannot add a listener to the event loop: {error}")
            }
            PortError::TooManyListeners { wanted, room } => write!(
                f,
                "the config needs {wanted} listening sockets, but the open-file limit leaves \
                 room for {room} beside the connections (--max-connections) and the proxy's \
                 own descriptors: raise the limit, lower --max-connections or use fewer ports"
            ),
        }
    }
}

/// What to do about an address this host does not have: the exact sysctl (for an address
/// that is assigned later, as a floating or anycast address is), or bpf mode.
const NONLOCAL_V4: &str =
    " (the address is not on this host: simple mode listens only on local addresses; \
     to listen on it before it is assigned, run `sysctl -w net.ipv4.ip_nonlocal_bind=1` (and \
     set it in /etc/sysctl.d/ to keep it), or use bpf mode, which serves any address routed here)";
const NONLOCAL_V6: &str =
    " (the address is not on this host: simple mode listens only on local addresses; \
     to listen on it before it is assigned, run `sysctl -w net.ipv6.ip_nonlocal_bind=1` (and \
     set it in /etc/sysctl.d/ to keep it), or use bpf mode, which serves any address routed here)";

impl std::error::Error for PortError {}

/// A listening socket as the config wants it: where, and for `[::]`, whether IPv4 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bind {
    pub addr: SocketAddr,
    /// `[::]` taking IPv4 as well (dual-stack). False for every other address.
    pub dual: bool,
}

/// What a new config asks of the mode's ports, worked out by the config plane (off the
/// listener loop) so that applying it costs the loop only what changed. Only the part the
/// mode reads is filled (see `PortSource::steers`).
#[derive(Debug, Default)]
pub struct PortChange {
    /// Simple mode: every listener the config wants (bounded by the descriptor budget, so
    /// the loop compares it with what it has).
    pub binds: BTreeSet<Bind>,
    /// bpf mode: the (port, prefix) pairs whose apps changed, each with its port group (the
    /// names of the apps there, sorted and joined with `+`), or None where no app answers
    /// any more. Pairs not listed stay as they are.
    pub steer: Vec<((u16, Prefix), Option<String>)>,
}

pub trait PortSource {
    /// Serve the ports as `change` says (the first change, at start-up, lists everything).
    /// On error nothing has changed: the reload (or the start-up) is refused whole.
    fn apply(&mut self, change: &PortChange) -> Result<(), PortError>;

    /// Whether the mode reads `PortChange::steer` (bpf) rather than `binds` (simple).
    fn steers(&self) -> bool {
        false
    }

    /// Start-up: serve every app of `routes` from nothing, as `apply` of a change listing
    /// everything would. Each mode reads the table its own way (bpf straight from it: at
    /// 200,000 apps a change's 800,000 owned group names cost a tenth of the start). On error
    /// the start-up is refused.
    fn serve_all(&mut self, routes: &Routes) -> Result<(), PortError>;

    /// Called at every reload tick, for work that may need retrying.
    fn tick(&mut self) {}

    /// The most listening sockets the descriptor budget leaves room for, once the connection
    /// bound is fitted to it (a mode with a fixed number of listeners ignores it).
    fn set_listener_room(&mut self, _room: u64) {}

    /// Stop taking new connections (shutdown): the doors are closed, so that no relay thread
    /// accepts again once this returns. Open connections are left alone.
    fn stop(&mut self);

    /// Listener sockets held, for fd accounting.
    fn listeners(&self) -> usize;

    /// The listening sockets to hand to a new process on upgrade: bound address and fd.
    fn handover(&self) -> Vec<(SocketAddr, RawFd)>;

    /// A reader of the mode's lookup counters, for metrics (bpf mode only).
    fn lookup_stats(&self) -> Option<LookupReader> {
        None
    }
}
