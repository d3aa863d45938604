//! Connecting to one of an app's targets without ever blocking: a `Dial` is stepped by whoever
//! runs the connection, and says each time whether it is connected, has failed every target it
//! could try, or waits (for its socket to become writable, for the answer of a name lookup, or
//! for its deadline).
//!
//! The targets are tried as `balance::pick` orders them (healthy first, then down ones: fail
//! open), at most `ConnectAttempts` distinct ones, each given the whole connect timeout for its
//! lookup and its connect together: a name that does not resolve in time fails that target
//! with a timeout at its deadline, as a connect that gets no answer does, and the next target
//! is tried. A target's addresses are tried in the order the resolver gave, within its one
//! deadline. Every outcome is told to the target (`Backend::connect_failed`, `connect_succeeded`)
//! as it happens, so passive health is the same as for a connect that blocks.
//!
//! The connect itself: a non-blocking socket, `connect(2)` returning `EINPROGRESS`, then the
//! socket reported writable (or failed) by the caller's event loop, and `SO_ERROR` saying which.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::backend::{ActiveGuard, AllFailed, Backend, ConnectError};
use crate::backends::balance::pick;
use crate::backends::resolver::{Answer, Lookup, Notify, Resolver, Waiting};
use crate::backends::routing::AppRoute;

/// Connecting a client connection to one of its app's targets.
#[derive(Default)]
pub struct Dial {
    /// Indexes into the app's backends, in the order tried.
    tried: Vec<usize>,
    failures: Vec<(Arc<Backend>, ConnectError)>,
    /// The target being tried.
    attempt: Option<Attempt>,
    /// When the last target was picked: its connect's time (lookup included) counts from then.
    began: Option<Instant>,
}

/// What a `Dial` came to.
pub enum Progress {
    /// Step it again when `socket` (if there is one) is writable or fails, when the lookup's
    /// notifier is called, or at `until`. `fresh`: the socket is another than the one waited
    /// for last time (the earlier one was closed).
    Wait {
        socket: Option<RawFd>,
        fresh: bool,
        until: Instant,
    },
    /// Connected (the socket non-blocking, with TCP_NODELAY); counted on its target until the
    /// guard drops. `fresh` as for `Wait`: the socket was never waited for.
    Connected {
        stream: TcpStream,
        target: ActiveGuard,
        fresh: bool,
    },
    /// Every target tried failed; each failure, in order.
    Failed(AllFailed),
}

/// One target being tried.
struct Attempt {
    /// Counted on the target from its pick, so that concurrent picks (p2c) see the load it is
    /// about to add.
    guard: ActiveGuard,
    deadline: Instant,
    stage: Stage,
}

enum Stage {
    /// Waiting for the target's name to resolve.
    Resolving(Waiting),
    /// Connecting to its addresses in turn.
    Connecting {
        /// Not tried yet, the next last.
        left: Vec<SocketAddr>,
        /// The connect in progress.
        socket: Option<TcpStream>,
        /// Why the last address failed.
        last: ConnectError,
    },
}

/// What one step of an attempt came to.
enum Outcome {
    /// The socket, if one, whether it is new since the last wait, and until when.
    Wait(Option<RawFd>, bool, Instant),
    /// The socket, and whether it is new since the last wait.
    Connected(TcpStream, bool),
    Failed(ConnectError),
}

impl Dial {
    /// Go on as far as possible without waiting. `timeout`: each target's time for its lookup
    /// and connect together. `socket_woke`: the socket waited for reported
    /// something (writable, an error or a hang-up) since the last step. `notify` makes what a
    /// resolver thread calls to have this stepped again, if a lookup must be waited for.
    pub fn step(
        &mut self,
        app: &AppRoute,
        resolver: &Resolver,
        timeout: Duration,
        mut socket_woke: bool,
        notify: &mut dyn FnMut() -> Notify,
    ) -> Progress {
        loop {
            let Some(attempt) = &mut self.attempt else {
                match self.next_attempt(app, resolver, timeout, notify) {
                    Some(attempt) => self.attempt = Some(attempt),
                    None => return Progress::Failed(AllFailed(std::mem::take(&mut self.failures))),
                }
                socket_woke = false;
                continue;
            };
            let outcome = attempt.step(app, socket_woke);
            socket_woke = false;
            match outcome {
                Outcome::Wait(socket, fresh, until) => {
                    return Progress::Wait {
                        socket,
                        fresh,
                        until,
                    }
                }
                Outcome::Connected(stream, fresh) => {
                    // Some(attempt) matched above; taken only here and below.
                    let Some(attempt) = self.attempt.take() else {
                        unreachable!("an attempt connected without being there");
                    };
                    attempt.guard.backend().connect_succeeded();
                    return Progress::Connected {
                        stream,
                        target: attempt.guard,
                        fresh,
                    };
                }
                Outcome::Failed(e) => {
                    let Some(attempt) = self.attempt.take() else {
                        unreachable!("an attempt failed without being there");
                    };
                    let backend = Arc::clone(attempt.guard.backend());
                    // The guard goes first: the failed target no longer counts this one.
                    drop(attempt);
                    backend.connect_failed(&e);
                    self.failures.push((backend, e));
                }
            }
        }
    }

    /// Targets picked so far (the one being tried or connected included).
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }

    /// The targets that failed so far, each with why, in order (until `Progress::Failed`
    /// hands them over).
    pub fn failures(&self) -> &[(Arc<Backend>, ConnectError)] {
        &self.failures
    }

    /// When the last target was picked (its lookup and connect began), if one was.
    pub fn began(&self) -> Option<Instant> {
        self.began
    }

    /// Pick the next target and ask for its addresses; None if no target is left to try.
    fn next_attempt(
        &mut self,
        app: &AppRoute,
        resolver: &Resolver,
        timeout: Duration,
        notify: &mut dyn FnMut() -> Notify,
    ) -> Option<Attempt> {
        if self.tried.len() >= app.connect_attempts() {
            return None;
        }
        let i = pick(app, &self.tried)?;
        self.tried.push(i);
        let backend = &app.backends[i];
        let guard = ActiveGuard::new(Arc::clone(backend));
        let now = Instant::now();
        self.began = Some(now);
        let deadline = now + timeout;
        let stage = match resolver.lookup(&backend.target.host, notify) {
            Lookup::Done(answer) => Stage::connecting(answer, backend.target.port),
            Lookup::Waiting(waiting) => Stage::Resolving(waiting),
        };
        Some(Attempt {
            guard,
            deadline,
            stage,
        })
    }
}

impl Stage {
    /// Connect to the addresses of `answer` at `port` next.
    fn connecting(answer: Answer, port: u16) -> Stage {
        let mut left: Vec<SocketAddr> = match answer {
            Ok(addrs) => addrs.iter().map(|&ip| SocketAddr::new(ip, port)).collect(),
            Err(e) => {
                return Stage::Connecting {
                    left: Vec::new(),
                    socket: None,
                    last: ConnectError::from_resolve(e),
                }
            }
        };
        // Tried in the resolver's order, popped from the end.
        left.reverse();
        Stage::Connecting {
            left,
            socket: None,
            last: ConnectError::Timeout,
        }
    }
}

impl Attempt {
    fn step(&mut self, app: &AppRoute, socket_woke: bool) -> Outcome {
        let port = self.guard.backend().target.port;
        if let Stage::Resolving(waiting) = &self.stage {
            match waiting.answer() {
                Some(answer) => self.stage = Stage::connecting(answer, port),
                None if Instant::now() >= self.deadline => {
                    return Outcome::Failed(ConnectError::LookupTimeout)
                }
                None => return Outcome::Wait(None, false, self.deadline),
            }
        }
        let Stage::Connecting { left, socket, last } = &mut self.stage else {
            unreachable!("resolved just above");
        };
        if let Some(s) = socket.as_ref() {
            match finished(s, socket_woke) {
                Ok(true) => {
                    // Some: looked at just above.
                    let Some(s) = socket.take() else {
                        unreachable!()
                    };
                    return Outcome::Connected(s, false);
                }
                Ok(false) if Instant::now() >= self.deadline => {
                    return Outcome::Failed(ConnectError::Timeout)
                }
                Ok(false) => return Outcome::Wait(Some(s.as_raw_fd()), false, self.deadline),
                Err(e) => {
                    *last = ConnectError::from_io(e);
                    // Closed before the next is opened: the caller's epoll set forgets it.
                    *socket = None;
                }
            }
        }
        while let Some(addr) = left.pop() {
            if app.own.is_own(addr) {
                *last = ConnectError::Loop(addr);
                continue;
            }
            if Instant::now() >= self.deadline {
                return Outcome::Failed(ConnectError::Timeout);
            }
            match start(addr) {
                Ok(Started::Connected(s)) => return Outcome::Connected(s, true),
                Ok(Started::InProgress(s)) => {
                    let fd = s.as_raw_fd();
                    *socket = Some(s);
                    return Outcome::Wait(Some(fd), true, self.deadline);
                }
                Err(e) => *last = ConnectError::from_io(e),
            }
        }
        Outcome::Failed(std::mem::replace(last, ConnectError::Timeout))
    }
}

enum Started {
    Connected(TcpStream),
    InProgress(TcpStream),
}

/// Start connecting to `addr`: a non-blocking socket with TCP_NODELAY (we forward whatever
/// arrives at once; Nagle would only add latency), as the relay wants it.
fn start(addr: SocketAddr) -> io::Result<Started> {
    let stream = TcpStream::from(crate::sys::net::tcp_socket(addr)?);
    stream.set_nodelay(true)?;
    let (storage, len) = crate::sys::net::sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if rc == 0 {
        return Ok(Started::Connected(stream));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(e);
    }
    // A target on this host (loopback) has usually answered before connect() returns: the
    // handshake runs in the call, which says EINPROGRESS all the same. Asking at once saves
    // the connection a wait in the lot (its socket registered for writing, an epoll wake-up,
    // a re-arm for reading): one system call that a remote target's connect makes in vain.
    if stream.peer_addr().is_ok() {
        return Ok(Started::Connected(stream));
    }
    Ok(Started::InProgress(stream))
}

/// Whether the connect of `s` is done: Ok(true) connected, Ok(false) still under way, Err how
/// it failed. Looked at only once its socket reported something (`woke`); then the peer's
/// address says that it connected (a report may be stale: one that came for a socket closed
/// since, whose number this one reuses), and only where there is none, `SO_ERROR` whether it
/// failed: one system call for a connect that succeeded.
fn finished(s: &TcpStream, woke: bool) -> io::Result<bool> {
    if !woke {
        return Ok(false);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => match s.take_error()? {
            Some(e) => Err(e),
            None => Ok(false),
        },
        Err(e) => Err(e),
    }
}
