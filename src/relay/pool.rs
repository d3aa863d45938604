//! The bounded pool of relay threads.
//!
//! A relay thread runs a connection while it can move bytes without waiting; a connection that
//! would have to wait gives its thread back at once and waits in the parking lot (see `park`).
//! The threads themselves wait on the lot, at most `waiters` of them at a time (one per core),
//! and take up whichever connections become ready: under load a thread goes from connection to
//! connection without sleeping in between, and an idle connection holds no thread. Jobs that
//! cannot block (relaying, reading a ClientHello, waiting for a slot: `Job::may_block` false)
//! are only ever run by these threads, however many there are. So the pool needs about as many
//! threads as cores for them. (Every step of a session is such a job now; the threads of their
//! own for jobs that may block stay for one that ever does again.)
//!
//! The bound (`--max-threads`) may be far below the number of open connections: work that finds
//! every thread busy waits in a FIFO queue, and a relay that is still moving bytes at the end of
//! its time slice while others wait goes to the back of it, so every connection gets a thread
//! within a bounded time however long the transfers are. Starting connections take at most the
//! bound less `waiters` threads: the others are kept for relaying, so that connects to a slow
//! target, however many, never stop the connections already relaying (at a bound of 1, the one
//! thread does both in turn).
//!
//! Threads beyond the waiters are kept on an idle stack for connections that start: a new
//! connection is handed to one directly (through its own channel, so it wakes exactly that
//! thread), or to a new thread while under the bound. The stack is LIFO so the warmest threads
//! are reused. A few idle threads are kept for a minute; beyond them, an idle thread exits after
//! a moment, so that a burst of connections does not leave a thread behind for each.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Idle threads kept warm for `IDLE_EXPIRY`.
const SPARE: usize = 8;
/// A kept idle thread exits after this long without work, giving back its stack.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// An idle thread beyond `SPARE` exits after this long without work.
const EXTRA_EXPIRY: Duration = Duration::from_millis(200);

/// Relay threads need little stack: the relay loop keeps its buffers on the heap. Name
/// resolution (getaddrinfo) is the deepest thing they call; 256 KiB leaves it ample room, and
/// only the pages a thread touches count in RSS.
const STACK_SIZE: usize = 256 * 1024;

/// A unit of work: a connection to start or to carry on.
pub trait Job: Send + 'static {
    /// It may block its thread for a while (a connect, a name lookup): it is run by a thread of
    /// its own rather than by one of the threads that wait for events, so that the waiting
    /// connections are never held up behind it.
    fn may_block(&self) -> bool;
}

/// Where waiting jobs come from when they are ready: the parking lot.
pub trait Source<J>: Send + Sync {
    /// Add the jobs that are ready to `out`; with `block`, wait until there is one or until
    /// `interrupt`.
    fn collect(&self, block: bool, out: &mut Vec<J>);
    /// Wake one thread blocked in `collect`.
    fn interrupt(&self);
}

pub struct Pool<J: Job> {
    inner: Arc<Inner<J>>,
}

impl<J: Job> Clone for Pool<J> {
    fn clone(&self) -> Pool<J> {
        Pool {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// What a handler can ask of the pool while it runs a job.
pub struct Turn<'a> {
    others_waiting: &'a dyn Fn() -> bool,
}

impl Turn<'_> {
    /// Jobs are waiting for a thread (ready connections included): a handler past its time slice
    /// should hand its thread on.
    pub fn others_waiting(&self) -> bool {
        (self.others_waiting)()
    }
}

struct Inner<J> {
    max: usize,
    /// Threads that may wait for events at once.
    waiters: usize,
    /// Threads that may run jobs that may block at once: the bound less the waiters.
    start_limit: usize,
    state: Mutex<State<J>>,
    /// Jobs waiting that a free thread could run now (relaying ones, and starting ones within
    /// their bound), readable without the lock.
    queued: AtomicUsize,
    /// Runs a job; Some(job) gives the job back to be continued later, after those waiting.
    handler: Handler<J>,
    source: Arc<dyn Source<J>>,
}

type Handler<J> = Box<dyn Fn(J, &Turn) -> Option<J> + Send + Sync>;

struct State<J> {
    idle: Vec<Worker<J>>,
    /// Relaying jobs waiting for a thread, in arrival order (with their place in the order).
    queue: VecDeque<(u64, J)>,
    /// Jobs that may block (starting connections) waiting for a thread, in arrival order.
    starts: VecDeque<(u64, J)>,
    /// The next place in the arrival order of both queues: a thread takes whichever job came
    /// first of those it may run, so neither kind starves the other.
    next_seq: u64,
    /// Threads running a job that may block.
    starting: usize,
    /// Threads alive, busy, waiting for events or idle.
    total: usize,
    /// Threads blocked in `Source::collect`.
    waiting: usize,
    next_id: u64,
}

struct Worker<J> {
    id: u64,
    jobs: Sender<J>,
}

/// What to do with a job that is not taken by a waiting thread.
enum Placed<J> {
    Done,
    /// Start a thread for it (the count is already taken).
    Spawn(J, u64),
}

impl<J: Job> Pool<J> {
    /// A pool of at most `max` threads, `waiters` of which wait on `source` at once.
    pub fn new(
        max: usize,
        waiters: usize,
        source: Arc<dyn Source<J>>,
        handler: impl Fn(J, &Turn) -> Option<J> + Send + Sync + 'static,
    ) -> Pool<J> {
        let max = max.max(1);
        // At least one thread is kept from starting connections for the waiting ones, and one
        // can always start connections: with a bound of 1, the one thread does both.
        let waiters = if max >= 2 {
            waiters.clamp(1, max - 1)
        } else {
            1
        };
        let start_limit = if max >= 2 { max - waiters } else { 1 };
        Pool {
            inner: Arc::new(Inner {
                max,
                waiters,
                start_limit,
                state: Mutex::new(State {
                    idle: Vec::new(),
                    queue: VecDeque::new(),
                    starts: VecDeque::new(),
                    next_seq: 0,
                    starting: 0,
                    total: 0,
                    waiting: 0,
                    next_id: 0,
                }),
                queued: AtomicUsize::new(0),
                handler: Box::new(handler),
                source,
            }),
        }
    }

    /// The thread bound.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Hand `job` to a thread waiting for events (if it cannot block), to an idle thread, to a
    /// new one, or queue it if the bound is reached. Fails only if the OS refuses a thread while
    /// none is alive to take the job later; the job is given back so the caller can close its
    /// connection.
    pub fn submit(&self, job: J) -> Result<(), (J, io::Error)> {
        let state = self.inner.lock();
        if !job.may_block() {
            return self.inner.submit_event(state, job);
        }
        match self.inner.place(state, job) {
            Placed::Done => Ok(()),
            Placed::Spawn(job, id) => self.inner.spawn(id, job),
        }
    }
}

impl<J: Job> Inner<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        // A panic while holding this lock cannot leave the state inconsistent (every update is
        // a single field write or one queue operation), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `job`: with the relaying jobs, or, if it may block, with the starting ones.
    fn enqueue(&self, state: &mut State<J>, job: J) {
        let seq = state.next_seq;
        state.next_seq += 1;
        if job.may_block() {
            state.starts.push_back((seq, job));
        } else {
            state.queue.push_back((seq, job));
        }
        self.count(state);
    }

    /// Publish how many waiting jobs a free thread could run now; called wherever the queues
    /// or the count of starting threads change.
    fn count(&self, state: &State<J>) {
        let startable = if state.starting < self.start_limit {
            state.starts.len()
        } else {
            0
        };
        self.queued
            .store(state.queue.len() + startable, Ordering::Relaxed);
    }

    /// The next job for a free thread: whichever came first of the relaying ones and the
    /// starting ones (these within their bound).
    fn dequeue(&self, state: &mut State<J>) -> Option<J> {
        let may_start = state.starting < self.start_limit;
        let relay = state.queue.front().map(|&(seq, _)| seq);
        let start = state
            .starts
            .front()
            .filter(|_| may_start)
            .map(|&(seq, _)| seq);
        let job = match (relay, start) {
            (Some(r), Some(s)) if s < r => state.starts.pop_front(),
            (Some(_), _) => state.queue.pop_front(),
            (None, Some(_)) => state.starts.pop_front(),
            (None, None) => None,
        }
        .map(|(_, job)| job);
        if job.as_ref().is_some_and(|j| j.may_block()) {
            state.starting += 1;
        }
        self.count(state);
        job
    }

    /// Queue `job` (one that cannot block) for the threads that wait for events, waking one.
    /// Only while fewer threads than `waiters` take events (at start, or with all of them
    /// gone idle) is one brought in for it: an idle thread, or a new one under the bound.
    fn submit_event(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State<J>>,
        job: J,
    ) -> Result<(), (J, io::Error)> {
        // Threads waiting for events or running jobs that cannot block.
        let events = state
            .total
            .saturating_sub(state.starting + state.idle.len());
        let mut job = job;
        if state.waiting == 0 && events < self.waiters {
            while let Some(worker) = state.idle.pop() {
                match worker.jobs.send(job) {
                    Ok(()) => return Ok(()),
                    // The worker expired between popping itself and exiting; try the next one.
                    Err(mpsc::SendError(j)) => job = j,
                }
            }
            if state.total < self.max {
                let id = state.next_id;
                state.next_id += 1;
                state.total += 1;
                drop(state);
                return self.spawn(id, job);
            }
        }
        self.enqueue(&mut state, job);
        drop(state);
        self.source.interrupt();
        Ok(())
    }

    /// Give `job` (one that may block) to an idle thread, or count a new thread for it, within
    /// the bound of starting threads; or queue it, waking a waiting thread to take it if one
    /// may.
    fn place(&self, mut state: MutexGuard<'_, State<J>>, job: J) -> Placed<J> {
        let mut job = job;
        if state.starting < self.start_limit {
            while let Some(worker) = state.idle.pop() {
                match worker.jobs.send(job) {
                    Ok(()) => {
                        state.starting += 1;
                        self.count(&state);
                        return Placed::Done;
                    }
                    // The worker expired between popping itself and exiting; try the next one.
                    Err(mpsc::SendError(j)) => job = j,
                }
            }
            if state.total < self.max {
                let id = state.next_id;
                state.next_id += 1;
                state.total += 1;
                state.starting += 1;
                self.count(&state);
                return Placed::Spawn(job, id);
            }
        }
        let startable = state.starting < self.start_limit;
        self.enqueue(&mut state, job);
        let wake = startable && state.waiting > 0;
        drop(state);
        if wake {
            self.source.interrupt();
        }
        Placed::Done
    }

    fn spawn(self: &Arc<Self>, id: u64, job: J) -> Result<(), (J, io::Error)> {
        // The channel exists before the thread so that the job is still ours if spawn fails.
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(self);
        let own_tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("relay-{id}"))
            .stack_size(STACK_SIZE)
            .spawn(move || inner.work(id, own_tx, rx));
        match spawned {
            Ok(_) => match tx.send(job) {
                Ok(()) => Ok(()),
                Err(mpsc::SendError(j)) => {
                    Err((j, io::Error::other("relay thread exited at start")))
                }
            },
            Err(e) => {
                let mut state = self.lock();
                state.total -= 1;
                if job.may_block() {
                    state.starting -= 1;
                }
                self.count(&state);
                if state.total > 0 {
                    // A live thread takes it when it is done with its own.
                    self.enqueue(&mut state, job);
                    let wake = state.waiting > 0;
                    drop(state);
                    if wake {
                        self.source.interrupt();
                    }
                    return Ok(());
                }
                Err((job, e))
            }
        }
    }

    /// Take ready connections from the source without waiting, into the queue: a thread that
    /// has been busy for a time slice looks whether others wait, even if no thread was free to
    /// wait for events meanwhile.
    fn others_waiting(self: &Arc<Self>, got: &mut Vec<J>) -> bool {
        // Even with jobs queued: connections whose peers spoke must get in line too.
        if self.lock().waiting == 0 {
            self.source.collect(false, got);
            self.take(got);
        }
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// Queue what the source gave: relaying jobs for the threads that wait for events (waking
    /// one to share a batch), and jobs that may block for threads of their own.
    fn take(self: &Arc<Self>, got: &mut Vec<J>) {
        if got.is_empty() {
            return;
        }
        let mut state = self.lock();
        self.queue_ready(&mut state, got);
        let share = state.queue.len() > 1 && state.waiting > 0;
        drop(state);
        if share {
            self.source.interrupt();
        }
        for job in got.drain(..) {
            self.hand_on(job);
        }
    }

    /// Give `job`, one that may block, to a thread of its own (see `place`).
    fn hand_on(self: &Arc<Self>, job: J) {
        if let Placed::Spawn(job, id) = self.place(self.lock(), job) {
            if let Err((_, e)) = self.spawn(id, job) {
                // spawn queued it for a live thread, or there is none: then it is dropped
                // with its connection, which is closed.
                crate::error!("cannot start a relay thread: {e}; a connection was closed");
            }
        }
    }

    /// Queue the jobs of `got` that cannot block, leaving the others in it.
    fn queue_ready(&self, state: &mut State<J>, got: &mut Vec<J>) {
        let mut i = 0;
        while i < got.len() {
            if got[i].may_block() {
                i += 1;
            } else {
                let job = got.swap_remove(i);
                self.enqueue(state, job);
            }
        }
    }

    fn work(self: Arc<Self>, id: u64, tx: Sender<J>, rx: Receiver<J>) {
        // The first job comes through the channel like every later one.
        let Ok(mut job) = rx.recv() else {
            self.lock().total -= 1;
            return;
        };
        let mut got = Vec::new();
        let mut harvest = Vec::new();
        let me = Arc::clone(&self);
        let others = move || me.others_waiting(&mut harvest);
        // The closure needs its own buffer and a shared borrow of the pool only.
        let others = std::cell::RefCell::new(others);
        let others_waiting = || (others.borrow_mut())();
        let turn = Turn {
            others_waiting: &others_waiting,
        };
        'jobs: loop {
            let started = job.may_block();
            // A panic in one connection's code must not take the thread with it.
            let back = match catch_unwind(AssertUnwindSafe(|| (self.handler)(job, &turn))) {
                Ok(back) => back,
                Err(_) => {
                    crate::error!(
                        "relay thread {id}: a connection handler panicked; connection closed"
                    );
                    None
                }
            };
            let mut state = self.lock();
            if started {
                state.starting -= 1;
                self.count(&state);
            }
            match back {
                // A connection that goes on to a step that may block (its connect) goes to a
                // thread of its own, not to this one, which waits for events.
                Some(j) if j.may_block() && !started => {
                    drop(state);
                    self.hand_on(j);
                    state = self.lock();
                }
                Some(j) => self.enqueue(&mut state, j),
                None => {}
            }
            loop {
                if let Some(j) = self.dequeue(&mut state) {
                    job = j;
                    continue 'jobs;
                }
                if state.waiting < self.waiters {
                    state.waiting += 1;
                    drop(state);
                    self.source.collect(true, &mut got);
                    state = self.lock();
                    state.waiting -= 1;
                    if !got.is_empty() {
                        drop(state);
                        self.take(&mut got);
                        state = self.lock();
                    }
                    continue;
                }
                break;
            }
            let expiry = if state.idle.len() >= SPARE {
                EXTRA_EXPIRY
            } else {
                IDLE_EXPIRY
            };
            state.idle.push(Worker {
                id,
                jobs: tx.clone(),
            });
            drop(state);
            job = match rx.recv_timeout(expiry) {
                Ok(j) => j,
                // Unreachable in practice: this thread holds `tx`, so the channel stays open.
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let mut state = self.lock();
                    if let Some(i) = state.idle.iter().position(|w| w.id == id) {
                        state.idle.remove(i);
                        state.total -= 1;
                        return;
                    }
                    // A submitter popped us just as we timed out: its job is on the way.
                    drop(state);
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                }
            };
        }
    }
}
