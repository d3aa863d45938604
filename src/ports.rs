//! How configured ports reach the process: the one thing the two modes do differently.
//!
//! `PortSource` is what the listener loop needs from a mode: make a set of ports reachable,
//! change it by a diff on reload, and accept from its listeners. `PerPort` is the simple mode
//! (one listener per port); the bpf mode's source lives in `bpf::listener`. Everything after
//! `accept()` is shared.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use mio::net::TcpListener;

use crate::config::Config;
use mio::{Interest, Registry, Token};

/// Reads per-port-group lookup counters; called from the metrics thread.
pub type LookupReader = Box<dyn Fn() -> Vec<crate::session::LookupStats> + Send + Sync>;

/// Tokens at and above this belong to listeners; below it the loop reserves its own.
pub const FIRST_LISTENER: usize = 16;

/// Listen backlog: how many completed connections the kernel queues for us while we are
/// paused at the connection bound or busy. The kernel caps it at net.core.somaxconn.
const BACKLOG: libc::c_int = 4096;

/// A port that could not be made reachable, with the OS error.
#[derive(Debug)]
pub struct PortError {
    pub port: u16,
    pub error: io::Error,
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.error.kind() {
            io::ErrorKind::AddrInUse => " (another process listens on it)",
            io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        write!(f, "port {}: {}{hint}", self.port, self.error)
    }
}

impl std::error::Error for PortError {}

/// One accepted connection and the frontend port it came in on.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub port: u16,
}

pub trait PortSource {
    /// Serve `config`'s ports: `added` become reachable and `removed` unreachable (the
    /// config tells a mode that needs it which app each port is). On error nothing has
    /// changed: the reload (or the start-up) is refused whole.
    fn apply(
        &mut self,
        registry: &Registry,
        config: &Config,
        added: &[u16],
        removed: &[u16],
    ) -> Result<(), PortError>;

    /// Called at every reload tick, for work that may need retrying.
    fn tick(&mut self) {}

    /// Accept one connection from the listener behind `token`. `Ok(None)`: nothing waiting
    /// (or a token that is no longer ours).
    fn accept(&mut self, token: Token) -> io::Result<Option<Accepted>>;

    /// Stop taking new connections (shutdown). Open connections are left alone.
    fn stop(&mut self, registry: &Registry);

    /// Listener sockets held, for fd accounting.
    fn listeners(&self) -> usize;

    /// The listening sockets to hand to a new process on upgrade: bound address and fd.
    fn handover(&self) -> Vec<(SocketAddr, RawFd)>;

    /// A reader of the mode's lookup counters, for metrics (bpf mode only).
    fn lookup_stats(&self) -> Option<LookupReader> {
        None
    }
}

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

/// A listener's bound address and fd, for an upgrade.
pub fn handover_of(l: &TcpListener) -> Option<(SocketAddr, RawFd)> {
    Some((l.local_addr().ok()?, l.as_raw_fd()))
}

fn token_for(port: u16) -> Token {
    Token(FIRST_LISTENER + port as usize)
}

/// Accept one connection. The port is the listener's own when known (simple mode); otherwise
/// it is read from the accepted socket's local address, which keeps the original destination
/// port when sk_lookup steered the connection to us.
pub fn accept_from(listener: &TcpListener, port: Option<u16>) -> io::Result<Option<Accepted>> {
    let (stream, peer) = match listener.accept() {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    // mio accepts with SOCK_NONBLOCK; the relay wants exactly that, as a std stream.
    // SAFETY: into_raw_fd hands over sole ownership of a valid, open socket.
    let stream = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
    let port = match port {
        Some(p) => p,
        None => stream.local_addr()?.port(),
    };
    Ok(Some(Accepted {
        stream,
        peer: canonical(peer),
        port,
    }))
}

/// `::ffff:a.b.c.d` (an IPv4 client on a dual-stack socket) written as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Listen on `port` on every local address, IPv4 and IPv6, with one dual-stack socket; on a
/// host without IPv6, IPv4 only.
pub fn listen_any(port: u16) -> io::Result<TcpListener> {
    match listen(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        false,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => listen(
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
            false,
        ),
        other => other,
    }
}

/// A new non-blocking, close-on-exec TCP socket of `addr`'s family.
pub(crate) fn tcp_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking listening socket on `addr`. `v6only` is set explicitly either way rather than
/// left to the net.ipv6.bindv6only sysctl, so behaviour does not depend on the host.
pub fn listen(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    let listener = TcpListener::from_std(std::net::TcpListener::from(tcp_socket(addr)?));
    let fd = listener.as_raw_fd();
    let one: libc::c_int = 1;
    // SO_REUSEADDR: a restarted proxy can bind while old connections sit in TIME_WAIT.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, one)?;
    if addr.is_ipv6() {
        setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(v6only),
        )?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    if unsafe { libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a bound stream socket.
    if unsafe { libc::listen(fd, BACKLOG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

fn setsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a c_int, as these options expect.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
