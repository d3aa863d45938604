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
    // Connects in flight by token: (backend index, stream).
    let mut pending: HashMap<usize, (usize, TcpStream)> = HashMap::new();
    // Per backend: connects still in flight, its deadline, and its last error.
    let mut open: Vec<(usize, Instant, Option<ConnectError>)> = Vec::with_capacity(batch.len());
    let mut next_token = 0;
    for (i, b) in batch.iter().enumerate() {
        let deadline = start + b.check_settings().timeout;
        open.push((0, deadline, None));
        let addrs = match backend::resolve(&b.target) {
            Ok(a) => a,
            Err(e) => {
                open[i].2 = Some(e);
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
                    open[i].0 += 1;
                    next_token += 1;
                }
                Err(e) => open[i].2 = Some(e),
            }
        }
    }
    // Backends with nothing in flight are decided already.
    let mut decided = vec![false; batch.len()];
    for (i, b) in batch.iter().enumerate() {
        if open[i].0 == 0 {
            decided[i] = true;
            b.checked(Err(open[i].2.take().unwrap_or(ConnectError::Timeout)));
        }
    }
    let mut events = Events::with_capacity(64);
    while !pending.is_empty() {
        let now = Instant::now();
        let deadline = pending
            .values()
            .map(|(i, _)| open[*i].1)
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
            if decided[i] {
                continue;
            }
            open[i].0 -= 1;
            match result {
                Ok(()) => {
                    decided[i] = true;
                    batch[i].checked(Ok(()));
                }
                Err(e) if open[i].0 == 0 => {
                    decided[i] = true;
                    batch[i].checked(Err(e));
                }
                Err(e) => open[i].2 = Some(e),
            }
        }
        // Streams of decided backends need not be waited for; backends past their timeout
        // fail, and their remaining connects are dropped.
        let now = Instant::now();
        pending.retain(|_, (i, _)| {
            if decided[*i] {
                return false;
            }
            if open[*i].1 > now {
                return true;
            }
            decided[*i] = true;
            batch[*i].checked(Err(ConnectError::Timeout));
            false
        });
    }
}
