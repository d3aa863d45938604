//! Active health checks: one background thread that checks targets with a TCP connect, a down
//! target every `IntervalMs` and an up one every `UP_CHECK_FACTOR` intervals. Checks due at
//! the same time run together as non-blocking connects in one poll, so a slow target does not
//! hold the others back and the checker stays one thread however many targets there are.
//!
//! The listener loop hands it the current backends after each reload; backends that left the
//! config are simply no longer checked.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::backends::backend::{self, Backend, ConnectError};

/// An up target is checked this many times less often than a down one: passive checks (every
/// real connection) already watch up targets closely.
const UP_CHECK_FACTOR: u32 = 5;

/// Shared between the listener loop (which replaces the list) and the checker thread.
#[derive(Default)]
pub struct Checker {
    backends: Mutex<Vec<Arc<Backend>>>,
    changed: Condvar,
}

impl Checker {
    /// Start the checker thread.
    pub fn start() -> io::Result<Arc<Checker>> {
        let checker = Arc::new(Checker::default());
        let c = Arc::clone(&checker);
        std::thread::Builder::new()
            .name("health".into())
            .stack_size(256 * 1024)
            .spawn(move || c.run())?;
        Ok(checker)
    }

    /// Check these backends from now on.
    pub fn set(&self, backends: Vec<Arc<Backend>>) {
        *self.backends.lock().unwrap_or_else(|e| e.into_inner()) = backends;
        self.changed.notify_one();
    }

    fn run(&self) {
        // When each backend (by the address of its state) was last checked, or first seen.
        // Its next check is that plus its interval as of now, so a target that a failed
        // connection just marked down is due at the shorter interval at once.
        let mut last: HashMap<*const Backend, Instant> = HashMap::new();
        loop {
            let now = Instant::now();
            let backends = self
                .backends
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut batch = Vec::new();
            // Wake at least every shortest down interval, to notice targets marked down
            // passively since the last pass.
            let mut next = now + Duration::from_secs(60);
            for b in &backends {
                let since = *last.entry(Arc::as_ptr(b)).or_insert(now);
                let at = since + interval_of(b);
                if at <= now {
                    batch.push(Arc::clone(b));
                } else {
                    next = next.min(at).min(now + b.check_settings().interval);
                }
            }
            let current: HashSet<*const Backend> = backends.iter().map(Arc::as_ptr).collect();
            last.retain(|k, _| current.contains(k));
            if !batch.is_empty() {
                check_all(&batch);
                let done = Instant::now();
                for b in &batch {
                    last.insert(Arc::as_ptr(b), done);
                }
                continue;
            }
            let guard = self.backends.lock().unwrap_or_else(|e| e.into_inner());
            let wait = next.saturating_duration_since(Instant::now());
            // Woken early by a reload, so new backends get their schedule at once.
            let _ = self.changed.wait_timeout(guard, wait);
        }
    }
}

fn interval_of(b: &Backend) -> Duration {
    let check = b.check_settings();
    if b.is_up() {
        check.interval * UP_CHECK_FACTOR
    } else {
        check.interval
    }
}

/// One backend's check within a round.
struct Check<'a> {
    backend: &'a Backend,
    /// Connects still in flight.
    in_flight: usize,
    deadline: Instant,
    /// The last connect that failed, reported if none succeeds.
    last_error: Option<ConnectError>,
    /// The result is recorded; later connects are ignored.
    decided: bool,
}

impl Check<'_> {
    fn decide(&mut self, result: Result<(), ConnectError>) {
        self.decided = true;
        self.backend.checked(result);
    }

    /// A connect of this check finished: the first success passes the backend, and the last
    /// failure fails it.
    fn finished(&mut self, result: Result<(), ConnectError>) {
        if self.decided {
            return;
        }
        self.in_flight -= 1;
        match result {
            Ok(()) => self.decide(Ok(())),
            Err(e) if self.in_flight == 0 => self.decide(Err(e)),
            Err(e) => self.last_error = Some(e),
        }
    }
}

/// Connects in flight by token: the index of their check, and the stream.
type Pending = HashMap<usize, (usize, TcpStream)>;

/// Check every backend in `batch` at once: resolve each name now and start a non-blocking
/// connect to every address it resolves to (as a real connection would try them all); a
/// backend passes when any of them connects within its timeout.
fn check_all(batch: &[Arc<Backend>]) {
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            crate::error!("health checks skipped: cannot create a poll: {e}");
            return;
        }
    };
    let start = Instant::now();
    let mut checks: Vec<Check> = batch
        .iter()
        .map(|b| Check {
            backend: b,
            in_flight: 0,
            deadline: start + b.check_settings().timeout,
            last_error: None,
            decided: false,
        })
        .collect();
    let mut pending = start_connects(&poll, &mut checks);
    // Backends with nothing in flight are decided already.
    for c in &mut checks {
        if c.in_flight == 0 {
            let e = c.last_error.take().unwrap_or(ConnectError::Timeout);
            c.decide(Err(e));
        }
    }
    wait_for_connects(&mut poll, &mut pending, &mut checks);
}

/// Resolve every check's target and start a connect to each of its addresses.
fn start_connects(poll: &Poll, checks: &mut [Check]) -> Pending {
    let mut pending = Pending::new();
    let mut next_token = 0;
    for (i, check) in checks.iter_mut().enumerate() {
        let addrs = match backend::resolve(&check.backend.target) {
            Ok(a) => a,
            Err(e) => {
                check.last_error = Some(e);
                continue;
            }
        };
        for addr in addrs {
            let started = TcpStream::connect(addr)
                .map_err(ConnectError::from_io)
                .and_then(|mut s| {
                    poll.registry()
                        .register(&mut s, Token(next_token), Interest::WRITABLE)
                        .map_err(ConnectError::Other)?;
                    Ok(s)
                });
            match started {
                Ok(s) => {
                    pending.insert(next_token, (i, s));
                    check.in_flight += 1;
                    next_token += 1;
                }
                Err(e) => check.last_error = Some(e),
            }
        }
    }
    pending
}

/// Wait until every check is decided: by a connect that succeeds, by its last connect
/// failing, or by its timeout.
fn wait_for_connects(poll: &mut Poll, pending: &mut Pending, checks: &mut [Check]) {
    let mut events = Events::with_capacity(64);
    while !pending.is_empty() {
        let now = Instant::now();
        let deadline = pending
            .values()
            .map(|(i, _)| checks[*i].deadline)
            .min()
            .unwrap_or(now);
        if let Err(e) = poll.poll(&mut events, Some(deadline.saturating_duration_since(now))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            crate::error!("health checks: poll failed: {e}");
            return;
        }
        for ev in events.iter() {
            let Some((i, s)) = pending.remove(&ev.token().0) else {
                continue;
            };
            // Writable means the connect finished: connected, or failed with SO_ERROR set.
            let result = match s.take_error() {
                Ok(None) => s.peer_addr().map(|_| ()).map_err(ConnectError::from_io),
                Ok(Some(e)) | Err(e) => Err(ConnectError::from_io(e)),
            };
            checks[i].finished(result);
        }
        // Streams of decided backends need not be waited for; backends past their timeout
        // fail, and their remaining connects are dropped.
        let now = Instant::now();
        pending.retain(|_, (i, _)| {
            let check = &mut checks[*i];
            if check.decided {
                return false;
            }
            if check.deadline > now {
                return true;
            }
            check.decide(Err(ConnectError::Timeout));
            false
        });
    }
}
