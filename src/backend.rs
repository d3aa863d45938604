//! Backends: a configured target's live state, resolving its name, and connecting to one of an
//! app's targets with failover.
//!
//! Names are resolved at every connect (in the relay thread, never in the listener loop), so a
//! target whose address changes is followed without a reload.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;

use crate::config::Target;

/// At most this many distinct targets are tried for one client connection.
pub const MAX_ATTEMPTS: usize = 3;

/// A target and what the proxy knows of it. One `Backend` per distinct target, shared by every
/// app that names it and kept across reloads while the target stays in the config.
#[derive(Debug)]
pub struct Backend {
    pub target: Target,
    /// Connections relaying to this target now.
    pub active: AtomicUsize,
}

impl Backend {
    pub fn new(target: Target) -> Backend {
        Backend {
            target,
            active: AtomicUsize::new(0),
        }
    }
}

/// Why one target could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    /// The name did not resolve (or resolved to nothing).
    Unresolvable(io::Error),
    /// Every address refused the connection.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// Anything else (unreachable network, no route, ...).
    Other(io::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Unresolvable(e) => write!(f, "name does not resolve ({e})"),
            ConnectError::Refused => write!(f, "connection refused"),
            ConnectError::Timeout => write!(f, "no answer within the connect timeout"),
            ConnectError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// Every target tried for one client connection failed; each failure, in order.
#[derive(Debug)]
pub struct AllFailed(pub Vec<(Arc<Backend>, ConnectError)>);

impl fmt::Display for AllFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (b, e)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {e}", b.target)?;
        }
        Ok(())
    }
}

/// Connect to one of `targets`: picked at random, at most `MAX_ATTEMPTS` distinct ones, each
/// given the whole `timeout`.
pub fn connect(
    targets: &[Arc<Backend>],
    timeout: Duration,
) -> Result<(TcpStream, Arc<Backend>), AllFailed> {
    let mut order: Vec<&Arc<Backend>> = targets.iter().collect();
    order.shuffle(&mut rand::rng());
    let mut failures = Vec::new();
    for backend in order.into_iter().take(MAX_ATTEMPTS) {
        match connect_one(&backend.target, timeout) {
            Ok(stream) => return Ok((stream, Arc::clone(backend))),
            Err(e) => {
                crate::warn!("connect target={} failed: {e}", backend.target);
                failures.push((Arc::clone(backend), e));
            }
        }
    }
    Err(AllFailed(failures))
}

/// Resolve `target` now and connect to the first of its addresses that answers within the
/// time left of `timeout`.
pub fn connect_one(target: &Target, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(ConnectError::Unresolvable)?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::Unresolvable(io::Error::other("no addresses")));
    }
    let mut last = ConnectError::Timeout;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Timeout);
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last = match e.kind() {
                    io::ErrorKind::ConnectionRefused => ConnectError::Refused,
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectError::Timeout,
                    _ => ConnectError::Other(e),
                }
            }
        }
    }
    Err(last)
}

/// Counts a connection on a backend for as long as it lives.
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn new(backend: Arc<Backend>) -> ActiveGuard {
        backend.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
