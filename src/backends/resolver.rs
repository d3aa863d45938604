//! Names resolved off the connection's path: a few threads of their own call getaddrinfo (which
//! blocks, for as long as the system's resolver takes: seconds for a name whose DNS server does
//! not answer), and everyone else asks without waiting.
//!
//! - An IP literal is answered at once and never queued.
//! - A name asked for again within `--dns-ttl` (its positive answer) or `FAILURE_TTL` (a
//!   failure) is answered at once from the cache. A failure is kept briefly only: long enough
//!   that a burst of connections to a broken name costs one lookup, short enough that a fixed
//!   name is followed within a second.
//! - Otherwise the asker gets a `Waiting` and goes on with something else (a connection waits in
//!   the parking lot, the health checker with its other checks); the `Notify` it gave is called
//!   once the answer is in. Concurrent askers of one name share one lookup.
//!
//! Bounded by construction, whatever clients do: at most `THREADS` lookups at once (a lookup
//! that hangs holds one thread until getaddrinfo gives up, and every connection asking for the
//! same name shares it); at most `QUEUE` names waiting for a thread (names come from the config,
//! so the queue fills only with that many names unresolved at once); past it a lookup fails at
//! once, counted (`Stats::rejected`) and said as the resolver being busy, which marks no target
//! down. A waiter is forgotten when its `Waiting` is dropped (its connection ended or timed
//! out), so waiters are bounded by the connections open, and the cache by the names configured
//! (expired entries are swept as it grows). Threads are started on demand and leave after a
//! minute without work: a proxy whose targets are all addresses has none.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Lookups under way at once, at most. A constant rather than an option: each is a thread
/// blocked in getaddrinfo, and a few are enough while every lookup of one name is merged (one
/// name that hangs takes one of them; three that hang leave one for every other name).
pub const THREADS: usize = 4;
/// Names waiting for a resolver thread, at most.
pub const QUEUE: usize = 1024;
/// How long a failed lookup is remembered.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);
/// A resolver thread without work for this long exits.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// getaddrinfo with the NSS modules is the deepest thing the threads call (see `pool`'s
/// STACK_SIZE, which the relay threads used for it before).
const STACK_SIZE: usize = 256 * 1024;

/// The addresses a name resolved to, in the order the system's resolver gave them.
pub type Addrs = Arc<[IpAddr]>;
/// A lookup's answer.
pub type Answer = Result<Addrs, ResolveError>;
/// Called once, from a resolver thread, when the answer a `Waiting` waits for is in.
pub type Notify = Box<dyn FnOnce() + Send>;

/// Why a name gave no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The system's resolver failed or found no address: its message.
    Failed(Arc<str>),
    /// `QUEUE` names were already waiting for a resolver thread: not looked up.
    Busy,
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Failed(why) => write!(f, "{why}"),
            ResolveError::Busy => write!(
                f,
                "not looked up: {QUEUE} names already wait for the resolver"
            ),
        }
    }
}

/// What `Resolver::lookup` gives.
pub enum Lookup {
    /// The answer, at once (an IP literal, or from the cache).
    Done(Answer),
    /// The lookup is under way; its `Notify` is called when the answer is in.
    Waiting(Waiting),
}

/// A place among the waiters for one name's answer. Dropping it forgets the waiter.
pub struct Waiting {
    shared: Arc<Shared>,
    host: String,
    id: u64,
    answer: Arc<OnceLock<Answer>>,
}

impl Waiting {
    /// The answer, once it is in.
    pub fn answer(&self) -> Option<Answer> {
        self.answer.get().cloned()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.answer.get().is_some() {
            return;
        }
        let mut state = self.shared.lock();
        let gone = match state.names.get_mut(&self.host) {
            Some(Name::Pending { answer, waiters }) if Arc::ptr_eq(answer, &self.answer) => waiters
                .iter()
                .position(|(id, _)| *id == self.id)
                .map(|i| waiters.swap_remove(i)),
            _ => None,
        };
        drop(state);
        // Dropped without the lock: a notifier holds what it wakes.
        drop(gone);
    }
}

/// What the resolver did, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lookups started (each a getaddrinfo call).
    pub lookups: u64,
    /// Lookups refused because the queue was full.
    pub rejected: u64,
}

/// The resolver: cheap to clone, shared by the relay and the health checker.
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
}

struct Shared {
    /// How long a positive answer is kept.
    ttl: Duration,
    state: Mutex<State>,
    /// Resolver threads wait here for names to look up.
    work: Condvar,
    lookups: AtomicU64,
    rejected: AtomicU64,
}

struct State {
    names: HashMap<String, Name>,
    /// Names waiting for a thread, in the order they were asked for.
    queue: VecDeque<String>,
    /// Resolver threads alive, and those of them waiting for work.
    threads: usize,
    idle: usize,
    next_waiter: u64,
    /// The size of `names` after the last sweep of expired entries.
    swept: usize,
}

enum Name {
    /// Queued or being looked up: who waits for it.
    Pending {
        answer: Arc<OnceLock<Answer>>,
        waiters: Vec<(u64, Notify)>,
    },
    Known {
        answer: Answer,
        until: Instant,
    },
}

impl Resolver {
    /// A resolver keeping positive answers for `ttl` (zero: not kept; lookups of one name
    /// under way at once are still merged).
    pub fn new(ttl: Duration) -> Resolver {
        Resolver {
            shared: Arc::new(Shared {
                ttl,
                state: Mutex::new(State {
                    names: HashMap::new(),
                    queue: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                    next_waiter: 0,
                    swept: 0,
                }),
                work: Condvar::new(),
                lookups: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
            }),
        }
    }

    /// The addresses of `host`, at once if it is an IP literal or cached; else a `Waiting`,
    /// and `notify()` is called once the answer is in (asked for only then).
    pub fn lookup(&self, host: &str, notify: &mut dyn FnMut() -> Notify) -> Lookup {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Lookup::Done(Ok(Arc::from([ip])));
        }
        let now = Instant::now();
        let mut state = self.shared.lock();
        let id = state.next_waiter;
        state.next_waiter += 1;
        match state.names.get_mut(host) {
            Some(Name::Known { answer, until }) if *until > now => {
                return Lookup::Done(answer.clone());
            }
            Some(Name::Pending { answer, waiters }) => {
                waiters.push((id, notify()));
                let answer = Arc::clone(answer);
                return Lookup::Waiting(self.waiting(host, id, answer));
            }
            _ => {}
        }
        if state.queue.len() >= QUEUE {
            drop(state);
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Lookup::Done(Err(ResolveError::Busy));
        }
        state.sweep(now);
        let answer = Arc::new(OnceLock::new());
        let pending = Name::Pending {
            answer: Arc::clone(&answer),
            waiters: vec![(id, notify())],
        };
        state.names.insert(host.to_owned(), pending);
        state.queue.push_back(host.to_owned());
        let spawn = state.queue.len() > state.idle && state.threads < THREADS;
        if spawn {
            state.threads += 1;
        }
        drop(state);
        if spawn {
            self.spawn();
        } else {
            self.shared.work.notify_one();
        }
        Lookup::Waiting(self.waiting(host, id, answer))
    }

    /// Lookups started and refused so far.
    pub fn stats(&self) -> Stats {
        Stats {
            lookups: self.shared.lookups.load(Ordering::Relaxed),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
        }
    }

    fn waiting(&self, host: &str, id: u64, answer: Arc<OnceLock<Answer>>) -> Waiting {
        Waiting {
            shared: Arc::clone(&self.shared),
            host: host.to_owned(),
            id,
            answer,
        }
    }

    fn spawn(&self) {
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .stack_size(STACK_SIZE)
            .spawn(move || shared.work());
        if let Err(e) = spawned {
            let mut state = self.shared.lock();
            state.threads -= 1;
            let none = state.threads == 0;
            drop(state);
            if none {
                // Nobody would take the queued names: fail them now rather than leave their
                // askers to their deadlines.
                crate::error!("cannot start a resolver thread: {e}");
                self.shared
                    .fail_queued(&format!("cannot start a resolver thread: {e}"));
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map or queue operations: a poisoned lock is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A resolver thread: look up queued names until none comes for `IDLE_EXPIRY`.
    fn work(&self) {
        let mut state = self.lock();
        loop {
            if let Some(host) = state.queue.pop_front() {
                drop(state);
                self.lookups.fetch_add(1, Ordering::Relaxed);
                let answer = resolve(&host);
                self.answer(&host, answer);
                state = self.lock();
                continue;
            }
            state.idle += 1;
            let (s, waited) = self
                .work
                .wait_timeout(state, IDLE_EXPIRY)
                .unwrap_or_else(|e| e.into_inner());
            state = s;
            state.idle -= 1;
            if waited.timed_out() && state.queue.is_empty() {
                state.threads -= 1;
                return;
            }
        }
    }

    /// Keep `answer` for `host` and tell its waiters.
    fn answer(&self, host: &str, answer: Answer) {
        let ttl = match answer {
            Ok(_) => self.ttl,
            Err(_) => FAILURE_TTL.min(self.ttl.max(Duration::from_millis(1))),
        };
        let known = Name::Known {
            answer: answer.clone(),
            until: Instant::now() + ttl,
        };
        let mut state = self.lock();
        let was = state.names.insert(host.to_owned(), known);
        drop(state);
        if let Some(Name::Pending {
            answer: cell,
            waiters,
        }) = was
        {
            // Set before the waiters are told, so each finds it when it looks.
            let _ = cell.set(answer);
            for (_, notify) in waiters {
                notify();
            }
        }
    }

    /// Fail every queued name with `why` (no thread is left to look them up).
    fn fail_queued(&self, why: &str) {
        let queued: Vec<String> = self.lock().queue.drain(..).collect();
        for host in queued {
            self.answer(&host, Err(ResolveError::Failed(why.into())));
        }
    }
}

impl State {
    /// Forget expired answers once the cache has doubled since the last sweep: it holds the
    /// names configured now, not every name ever configured.
    fn sweep(&mut self, now: Instant) {
        if self.names.len() < 2 * self.swept + 64 {
            return;
        }
        self.names
            .retain(|_, n| !matches!(n, Name::Known { until, .. } if *until <= now));
        self.swept = self.names.len();
    }
}

/// Ask the system's resolver (getaddrinfo, following /etc/nsswitch.conf, /etc/hosts and
/// /etc/resolv.conf): blocks for as long as it takes.
fn resolve(host: &str) -> Answer {
    let failed = |e: io::Error| ResolveError::Failed(e.to_string().into());
    let mut addrs: Vec<IpAddr> = Vec::new();
    for a in (host, 0).to_socket_addrs().map_err(failed)? {
        // getaddrinfo lists an address once per socket type unless told otherwise.
        if !addrs.contains(&a.ip()) {
            addrs.push(a.ip());
        }
    }
    if addrs.is_empty() {
        return Err(ResolveError::Failed("no addresses".into()));
    }
    Ok(addrs.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn no_notify() -> Notify {
        Box::new(|| {})
    }

    #[test]
    fn literals_are_answered_at_once() {
        let r = Resolver::new(Duration::from_secs(10));
        for (host, ip) in [("127.0.0.1", "127.0.0.1"), ("::1", "::1")] {
            let Lookup::Done(Ok(addrs)) = r.lookup(host, &mut no_notify) else {
                panic!("{host} queued");
            };
            assert_eq!(&addrs[..], &[ip.parse::<IpAddr>().unwrap()]);
        }
        assert_eq!(r.stats(), Stats::default());
        assert_eq!(r.shared.lock().threads, 0, "no thread for literals");
    }

    /// `localhost` resolves from /etc/hosts, without DNS, on a resolver thread: the first asker
    /// waits and is told; later askers share the lookup under way or find the answer cached
    /// (which, depends on how fast /etc/hosts answers); one lookup in all.
    #[test]
    fn a_name_is_looked_up_on_a_resolver_thread_once() {
        let r = Resolver::new(Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        let mut notify = || -> Notify {
            let tx = tx.clone();
            Box::new(move || tx.send(()).unwrap())
        };
        let mut waiting = Vec::new();
        let mut told = 0;
        for _ in 0..3 {
            match r.lookup("localhost", &mut notify) {
                Lookup::Waiting(w) => waiting.push(w),
                Lookup::Done(a) => assert!(a.unwrap().iter().all(|ip| ip.is_loopback())),
            }
        }
        assert!(!waiting.is_empty(), "the first asker waits for the lookup");
        while told < waiting.len() {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
            told += 1;
        }
        for w in &waiting {
            let addrs = w.answer().unwrap().unwrap();
            assert!(addrs.iter().all(|a| a.is_loopback()), "{addrs:?}");
        }
        assert!(matches!(
            r.lookup("localhost", &mut no_notify),
            Lookup::Done(Ok(_))
        ));
        assert_eq!(r.stats().lookups, 1);
    }

    /// Askers of a name being looked up share that lookup: each waits, each is told once when
    /// the answer is in, and finds it; the next finds it cached. (The lookup is put in place by
    /// hand, as if a resolver thread had it, so that no answer can come before every ask.)
    #[test]
    fn concurrent_askers_share_one_lookup() {
        let r = Resolver::new(Duration::from_secs(10));
        r.shared.lock().names.insert(
            "shared.invalid".into(),
            Name::Pending {
                answer: Arc::new(OnceLock::new()),
                waiters: Vec::new(),
            },
        );
        let told = Arc::new(AtomicU64::new(0));
        let mut notify = || -> Notify {
            let told = Arc::clone(&told);
            Box::new(move || {
                told.fetch_add(1, Ordering::Relaxed);
            })
        };
        let waiting: Vec<Waiting> = (0..3)
            .map(|_| match r.lookup("shared.invalid", &mut notify) {
                Lookup::Waiting(w) => w,
                Lookup::Done(a) => panic!("not merged: {a:?}"),
            })
            .collect();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        r.shared.answer("shared.invalid", Ok(Arc::from([ip])));
        assert_eq!(told.load(Ordering::Relaxed), 3, "each waiter told once");
        for w in &waiting {
            assert_eq!(w.answer(), Some(Ok(Arc::from([ip]))));
        }
        assert!(matches!(
            r.lookup("shared.invalid", &mut no_notify),
            Lookup::Done(Ok(_))
        ));
        assert_eq!(r.stats().lookups, 0, "no lookup of its own");
    }

    #[test]
    fn failures_are_kept_briefly_and_a_dropped_waiter_is_forgotten() {
        let r = Resolver::new(Duration::from_secs(10));
        r.shared
            .answer("gone.invalid", Err(ResolveError::Failed("nx".into())));
        assert!(matches!(
            r.lookup("gone.invalid", &mut no_notify),
            Lookup::Done(Err(ResolveError::Failed(_)))
        ));
        // Pending by hand (no thread takes it): a waiter dropped leaves none behind.
        let cell = Arc::new(OnceLock::new());
        r.shared.lock().names.insert(
            "slow.invalid".into(),
            Name::Pending {
                answer: Arc::clone(&cell),
                waiters: Vec::new(),
            },
        );
        let Lookup::Waiting(w) = r.lookup("slow.invalid", &mut no_notify) else {
            panic!("not merged");
        };
        drop(w);
        let state = r.shared.lock();
        let Some(Name::Pending { waiters, .. }) = state.names.get("slow.invalid") else {
            panic!("not pending");
        };
        assert!(waiters.is_empty());
    }

    #[test]
    fn a_full_queue_fails_at_once_and_counts() {
        let r = Resolver::new(Duration::from_secs(10));
        {
            let mut state = r.shared.lock();
            // As if every thread were busy and QUEUE names waited.
            state.threads = THREADS;
            for i in 0..QUEUE {
                state.queue.push_back(format!("n{i}.invalid"));
            }
        }
        assert!(matches!(
            r.lookup("one.more.invalid", &mut no_notify),
            Lookup::Done(Err(ResolveError::Busy))
        ));
        assert_eq!(r.stats().rejected, 1);
        r.shared.lock().queue.clear();
    }
}
