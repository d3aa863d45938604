//! Active health checks: one background thread that checks targets, a down target every
//! `IntervalMs` and an up one every `UP_CHECK_FACTOR` intervals: a TCP connect, then for the
//! `http` and `tls` kinds a request and its answer (`probe` says what is sent and judges what
//! comes back), all within the check's `TimeoutMs`.
//!
//! Checks run as non-blocking connects in one poll, so a slow target does not hold the others
//! back and the checker stays one thread however many targets there are. Two bounds keep it
//! inside the process's descriptor budget and its fair share of the network:
//! - at most `MAX_IN_FLIGHT` connects are open at once (their descriptors are reserved when the
//!   connection bound is fitted to the open-file limit, see `FDS`); targets due meanwhile wait
//!   their turn, the longest-waiting first, so with thousands of unreachable targets the checks
//!   fall behind their interval rather than take descriptors from clients;
//! - a target is checked once however many apps list it with the same kind of check (a
//!   `Probe`: the target and the kind with its settings), and the result goes to every app's
//!   view of it (each applying its own `Fall` and `Rise`, and judging the time the check took
//!   against its own `TimeoutMs`).
//!
//! An http or tls check's exchange runs on the connection that connected first (the others
//! are closed): its request is written and its answer read without blocking, at most
//! `probe::READ_MAX` bytes, and judged as soon as it can be.
//!
//! Names are looked up by the same `Resolver` the relay uses (its cache too), without blocking
//! the checker: a check whose target is a name waits for the answer beside the other checks, and
//! its clock (its `TimeoutMs`) starts only once the addresses are known, so a name whose lookup
//! hangs delays and fails no other target's check. (It fails only its own, when the lookup does.)
//!
//! The listener loop hands it the current backends after each reload; backends that left the
//! config are simply no longer checked. Nor is a backend in maintenance (`TargetState::Maint`):
//! the operator is working on it, and its checks would only log noise. It is found due again
//! at the first scan after it leaves maintenance (scans come at least every shortest interval).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::backends::backend::{Backend, ConnectError, TargetState, HEALTH_EPOCH};
use crate::backends::probe::{self, Verdict};
use crate::backends::resolver::{Answer, Lookup, Notify, Resolver, Waiting};
use crate::config::{CheckKind, Target};
use due::Due;

/// An up target is checked this many times less often than a down one: passive checks (every
/// real connection) already watch up targets closely.
const UP_CHECK_FACTOR: u32 = 5;

/// Connects in flight at once, at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// Descriptors the checker may hold at once: its connects, its poll and its waker.
pub const FDS: u64 = MAX_IN_FLIGHT as u64 + 2;

/// Woken by `Checker::set` (a reload), and by the resolver when a name's answer is in.
const WAKE: Token = Token(usize::MAX);

/// Shared between the listener loop (which replaces the list) and the checker thread.
pub struct Checker {
    /// What `set` and `change` asked since the checker thread last looked, in order.
    backends: Mutex<Vec<follow::Update>>,
    waker: Arc<Waker>,
}

impl Checker {
    /// Start the checker thread, looking names up with `resolver`.
    pub fn start(resolver: Resolver) -> io::Result<Arc<Checker>> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let checker = Arc::new(Checker {
            backends: Mutex::new(Vec::new()),
            waker: Arc::clone(&waker),
        });
        let c = Arc::clone(&checker);
        std::thread::Builder::new()
            .name("health".into())
            .stack_size(256 * 1024)
            .spawn(move || Run::new(poll, resolver, waker).run(&c))?;
        Ok(checker)
    }

    /// Check these backends from now on.
    pub fn set(&self, backends: Vec<Arc<Backend>>) {
        self.ask(true, follow::Update::Set(backends));
    }

    /// Check `added` too, and `removed` no more (a reload's apps added, removed and changed:
    /// a backend kept by a changed app is in both). Costs the backends named, not all.
    pub fn change(&self, added: Vec<Arc<Backend>>, removed: Vec<Arc<Backend>>) {
        self.ask(false, follow::Update::Change { added, removed });
    }

    fn ask(&self, replaces: bool, update: follow::Update) {
        let mut queued = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if replaces {
            queued.clear();
        }
        queued.push(update);
        drop(queued);
        if let Err(e) = self.waker.wake() {
            crate::error!("cannot wake the health checker: {e}");
        }
    }

    /// What `set` and `change` asked since the last call.
    fn take(&self) -> Vec<follow::Update> {
        std::mem::take(&mut *self.backends.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The checker thread's state.
struct Run {
    poll: Poll,
    resolver: Resolver,
    /// What the resolver wakes the poll with when an answer is in.
    waker: Arc<Waker>,
    /// The backends of each distinct target and kind of check, as of the last `set`, each
    /// with when it was last checked, or first seen. Its next check is that plus its interval
    /// as of now, so a target that a failed connection just marked down is due at the shorter
    /// interval at once.
    targets: HashMap<Probe, follow::Listed>,
    /// Backends that joined a list so far (see `follow::Entry::joined`).
    joined: u64,
    /// Checks under way, by target.
    checks: HashMap<Probe, Check>,
    /// When each target is due, as the last scan found it (see `scan`).
    due_at: HashMap<Probe, Due>,
    /// Targets found due by the last scan and not started yet (the bound was reached), the
    /// longest-waiting first. The targets are scanned again only once these are all started,
    /// so a connect finishing costs no pass over every target.
    queue: VecDeque<Probe>,
    /// When to scan the targets again for checks due.
    next_scan: Instant,
    /// Connects and exchanges in flight, by token.
    sockets: HashMap<Token, Conn>,
    next_token: usize,
}

/// What one check does: a target and the kind of check (with its settings). Apps that list
/// the target with the same kind share its checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Probe {
    target: Target,
    kind: CheckKind,
}

/// One socket of a check: connecting, then (http, tls) exchanging.
struct Conn {
    probe: Probe,
    stream: TcpStream,
    /// Once connected, for a kind that sends a request: its exchange.
    exchange: Option<probe::Exchange>,
}

/// One target's check: every address it resolved to is tried at once (as far as the bound
/// allows); the first to connect passes it.
struct Check {
    /// `Run::joined` when the check began: its verdict goes to the backends that had joined
    /// by then (and are still listed).
    joined: u64,
    /// The longest `TimeoutMs` among its backends when it began: it ends by then, once it
    /// began.
    timeout: Duration,
    /// The name's lookup, while its answer is awaited; the check's clock has not started.
    lookup: Option<Waiting>,
    /// When the addresses were known: the check's clock starts then.
    began: Instant,
    /// When it ends (`timeout` after it began; None while its name is looked up).
    deadline: Option<Instant>,
    /// Addresses not tried yet because the bound was reached.
    queued: Vec<SocketAddr>,
    /// Connects (or the exchange) of this check in flight.
    open: usize,
    /// Connected, and exchanging (http, tls): a deadline passed now is the answer's.
    answering: bool,
    last_error: Option<ConnectError>,
}

impl Run {
    fn new(poll: Poll, resolver: Resolver, waker: Arc<Waker>) -> Run {
        Run {
            poll,
            resolver,
            waker,
            targets: HashMap::new(),
            joined: 0,
            checks: HashMap::new(),
            due_at: HashMap::new(),
            queue: VecDeque::new(),
            next_scan: Instant::now(),
            sockets: HashMap::new(),
            next_token: 0,
        }
    }

    fn run(mut self, checker: &Checker) {
        let mut events = Events::with_capacity(256);
        loop {
            for update in checker.take() {
                self.follow(update);
            }
            self.resolved();
            let now = Instant::now();
            self.expire(now);
            self.fill_queued();
            if self.queue.is_empty() && now >= self.next_scan {
                self.scan(now);
            }
            self.start_queued();
            // While targets wait for room, a finished connect or a check's deadline wakes the
            // poll; otherwise also the next scan.
            let deadline = self.checks.values().filter_map(|c| c.deadline).min();
            let wake = match (self.queue.is_empty(), deadline) {
                (true, Some(d)) => d.min(self.next_scan),
                (true, None) => self.next_scan,
                (false, Some(d)) => d,
                // Targets wait for room only while connects are in flight; be safe anyway.
                (false, None) => now + Duration::from_millis(100),
            };
            let timeout = Some(wake.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::error!("health checks: poll failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                continue;
            }
            for ev in events.iter() {
                if ev.token() != WAKE {
                    self.ready(ev.token());
                }
            }
        }
    }

    /// Find the targets due now, the longest overdue first, into the queue; and when to look
    /// again.
    fn scan(&mut self, now: Instant) {
        // Look again at least every minute, and every shortest down interval, to notice
        // targets marked down passively since.
        let mut next = now + Duration::from_secs(60);
        let mut due: Vec<(Instant, &Probe)> = Vec::new();
        let epoch = HEALTH_EPOCH.load(Ordering::Relaxed);
        for (target, backends) in &self.targets {
            // Kept while no backend's health or state changed, and its list and its checks'
            // times did not (`follow` and `finish` forget it then): a scan then costs a
            // lookup per target, not a pass over every app listing it.
            let s = match self.due_at.get(target) {
                Some(s) if s.epoch == epoch => *s,
                _ => {
                    let s = Due::of(backends, epoch);
                    self.due_at.insert(target.clone(), s);
                    s
                }
            };
            next = next.min(now + s.shortest);
            if self.checks.contains_key(target) {
                continue;
            }
            let Some(at) = s.at else {
                continue;
            };
            if at <= now {
                due.push((at, target));
            } else {
                next = next.min(at);
            }
        }
        due.sort_by_key(|(at, _)| *at);
        self.queue = due.into_iter().map(|(_, t)| t.clone()).collect();
        self.next_scan = next;
    }

    /// Begin the queued checks, while the bound allows.
    fn start_queued(&mut self) {
        while self.sockets.len() < MAX_IN_FLIGHT {
            let Some(target) = self.queue.pop_front() else {
                return;
            };
            // A reload may have removed it since the scan.
            if self.targets.contains_key(&target) && !self.checks.contains_key(&target) {
                self.begin(target);
            }
        }
    }

    /// Begin checking `target`: ask for its addresses; if they are known now (an address, or
    /// cached), connect to as many as the bound allows (the rest as room frees up), else once
    /// the resolver has them (`resolved`).
    fn begin(&mut self, target: Probe) {
        let Some(backends) = self.targets.get(&target) else {
            return;
        };
        // As the scan found it, unless a backend's health or state changed since.
        let epoch = HEALTH_EPOCH.load(Ordering::Relaxed);
        let due = match self.due_at.get(&target) {
            Some(d) if d.epoch == epoch => *d,
            _ => {
                let d = Due::of(backends, epoch);
                self.due_at.insert(target.clone(), d);
                d
            }
        };
        if due.at.is_none() {
            // Every one went into maintenance since the scan.
            return;
        }
        let waker = &self.waker;
        let mut notify = || -> Notify {
            let waker = Arc::clone(waker);
            Box::new(move || {
                if let Err(e) = waker.wake() {
                    crate::error!("cannot wake the health checker: {e}");
                }
            })
        };
        let mut check = Check {
            joined: self.joined,
            timeout: due.timeout,
            lookup: None,
            began: Instant::now(),
            deadline: None,
            queued: Vec::new(),
            open: 0,
            answering: false,
            last_error: None,
        };
        match self.resolver.lookup(&target.target.host, &mut notify) {
            Lookup::Done(answer) => check.start(answer, target.target.port),
            Lookup::Waiting(w) => check.lookup = Some(w),
        }
        let started = check.lookup.is_none();
        self.checks.insert(target.clone(), check);
        if started {
            self.fill(&target);
            self.finish_if_failed(&target);
        }
    }

    /// Start the checks whose name's answer came in.
    fn resolved(&mut self) {
        let answered: Vec<(Probe, Answer)> = self
            .checks
            .iter()
            .filter_map(|(t, c)| Some((t.clone(), c.lookup.as_ref()?.answer()?)))
            .collect();
        for (target, answer) in answered {
            if let Some(check) = self.checks.get_mut(&target) {
                check.start(answer, target.target.port);
            }
            self.fill(&target);
            self.finish_if_failed(&target);
        }
    }

    /// Start queued addresses of checks under way, while the bound allows.
    fn fill_queued(&mut self) {
        let waiting: Vec<Probe> = self
            .checks
            .iter()
            .filter(|(_, c)| !c.queued.is_empty())
            .map(|(t, _)| t.clone())
            .collect();
        for t in waiting {
            if self.sockets.len() >= MAX_IN_FLIGHT {
                return;
            }
            self.fill(&t);
            self.finish_if_failed(&t);
        }
    }

    /// Start connects to `target`'s queued addresses, while the bound allows.
    fn fill(&mut self, target: &Probe) {
        while self.sockets.len() < MAX_IN_FLIGHT {
            let Some(check) = self.checks.get_mut(target) else {
                return;
            };
            let Some(addr) = check.queued.pop() else {
                return;
            };
            let token = Token(self.next_token);
            // Wraps long before WAKE could be reached on any real run; skip it if it is.
            self.next_token = (self.next_token + 1) % WAKE.0;
            let started = TcpStream::connect(addr)
                .map_err(ConnectError::from_io)
                .and_then(|mut s| {
                    self.poll
                        .registry()
                        .register(&mut s, token, Interest::WRITABLE)
                        .map_err(ConnectError::Other)?;
                    Ok(s)
                });
            match started {
                Ok(s) => {
                    check.open += 1;
                    let conn = Conn {
                        probe: target.clone(),
                        stream: s,
                        exchange: None,
                    };
                    self.sockets.insert(token, conn);
                }
                Err(e) => check.last_error = Some(e),
            }
        }
    }

    /// A check with nothing in flight and nothing left to try has failed.
    fn finish_if_failed(&mut self, target: &Probe) {
        if let Some(c) = self.checks.get(target) {
            if c.lookup.is_none() && c.open == 0 && c.queued.is_empty() {
                let e = self
                    .checks
                    .get_mut(target)
                    .and_then(|c| c.last_error.take())
                    .unwrap_or(ConnectError::Timeout);
                self.finish(target, Err(e));
            }
        }
    }

    /// A socket is ready: its connect finished (connected, or failed with SO_ERROR set), or
    /// its exchange can go on.
    fn ready(&mut self, token: Token) {
        let Some(conn) = self.sockets.get_mut(&token) else {
            return;
        };
        if conn.exchange.is_none() {
            let result = match conn.stream.take_error() {
                Ok(None) => conn
                    .stream
                    .peer_addr()
                    .map(|_| ())
                    .map_err(ConnectError::from_io),
                Ok(Some(e)) | Err(e) => Err(ConnectError::from_io(e)),
            };
            let probe = conn.probe.clone();
            if let Err(e) = result {
                self.sockets.remove(&token);
                if let Some(check) = self.checks.get_mut(&probe) {
                    check.open -= 1;
                    check.last_error = Some(e);
                }
                self.fill(&probe);
                self.finish_if_failed(&probe);
                return;
            }
            let request = probe::request(&probe.kind, &probe.target);
            if request.is_empty() {
                self.sockets.remove(&token);
                self.finish(&probe, Ok(()));
                return;
            }
            if let Err(e) = self.answer_on(token, &probe, request) {
                self.finish(&probe, Err(ConnectError::Other(e)));
                return;
            }
        }
        self.exchange(token);
    }

    /// `token`'s connection connected first: the check's exchange runs on it and the check's
    /// other connects (and addresses not tried yet) are dropped.
    fn answer_on(&mut self, token: Token, probe: &Probe, request: Vec<u8>) -> io::Result<()> {
        self.sockets.retain(|t, c| *t == token || c.probe != *probe);
        if let Some(check) = self.checks.get_mut(probe) {
            check.open = 1;
            check.queued.clear();
            check.answering = true;
        }
        let Some(conn) = self.sockets.get_mut(&token) else {
            return Ok(());
        };
        conn.exchange = Some(probe::Exchange::new(request));
        self.poll.registry().reregister(
            &mut conn.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Write what is left of the request and read what came of the answer, each until it would
    /// block (the poll is edge-triggered), then judge the answer.
    fn exchange(&mut self, token: Token) {
        let Some(conn) = self.sockets.get_mut(&token) else {
            return;
        };
        let Some(ex) = conn.exchange.as_mut() else {
            return;
        };
        let probe = conn.probe.clone();
        let verdict = match ex.step(&mut conn.stream) {
            Err(e) => Err(ConnectError::from_io(e)),
            Ok(closed) => match probe::judge(&probe.kind, ex.answer(), closed) {
                Verdict::More => return,
                Verdict::Pass => Ok(()),
                Verdict::Fail(why) => Err(ConnectError::Unhealthy(why)),
            },
        };
        self.sockets.remove(&token);
        self.finish(&probe, verdict);
    }
    /// Checks past their deadline fail with a timeout.
    fn expire(&mut self, now: Instant) {
        let late: Vec<Probe> = self
            .checks
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| t.clone())
            .collect();
        for t in late {
            let answering = self.checks.get(&t).is_some_and(|c| c.answering);
            let e = if answering {
                ConnectError::Unhealthy(format!(
                    "connected, but no whole {} answer within the timeout",
                    t.kind.as_str()
                ))
            } else {
                ConnectError::Timeout
            };
            self.finish(&t, Err(e));
        }
    }
}

impl Check {
    /// The addresses are known (or the lookup failed): the clock starts now.
    fn start(&mut self, answer: Answer, port: u16) {
        self.lookup = None;
        self.began = Instant::now();
        self.deadline = Some(self.began + self.timeout);
        match answer {
            // Tried in the order the resolver gave, like a real connection: popped from the end.
            Ok(addrs) => {
                self.queued = addrs
                    .iter()
                    .rev()
                    .map(|&ip| SocketAddr::new(ip, port))
                    .collect();
            }
            Err(e) => self.last_error = Some(ConnectError::from_resolve(e)),
        }
    }
}

/// Whether `b` is health checked: not while it is in maintenance.
fn checked(b: &Backend) -> bool {
    b.state() != TargetState::Maint
}

fn interval_of(b: &Backend) -> Duration {
    let (interval, _) = b.check_timing();
    if b.is_up() {
        interval * UP_CHECK_FACTOR
    } else {
        interval
    }
}

mod due;
mod follow;
mod verdict;

#[cfg(test)]
mod tests;
