//! The bounded pool of relay threads.
//!
//! A relay thread runs a connection while it can move bytes without waiting; a connection that
//! would have to wait gives its thread back at once and waits in the parking lot (see `park`).
//! The threads themselves wait on the lot, at most `waiters` of them at a time (one per core),
//! and take up whichever connections become ready: under load a thread goes from connection to
//! connection without sleeping in between, and an idle connection holds no thread. So the pool
//! needs about as many threads as cores for relaying, plus one for each connection that is
//! starting (connecting to its backend or resolving its name, which block).
//!
//! The bound (`--max-threads`) may be far below the number of open connections: work that finds
//! every thread busy waits in a FIFO queue, and a relay that is still moving bytes at the end of
//! its time slice while others wait goes to the back of it, so every connection gets a thread
//! within a bounded time however long the transfers are.
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
    state: Mutex<State<J>>,
    /// Length of `State::queue`, readable without the lock.
    queued: AtomicUsize,
    /// Runs a job; Some(job) gives the job back to be continued later, after those waiting.
    handler: Handler<J>,
    source: Arc<dyn Source<J>>,
}

type Handler<J> = Box<dyn Fn(J, &Turn) -> Option<J> + Send + Sync>;

struct State<J> {
    idle: Vec<Worker<J>>,
    /// Jobs waiting for a thread, in arrival order.
    queue: VecDeque<J>,
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
        Pool {
            inner: Arc::new(Inner {
                max,
                waiters: waiters.clamp(1, max),
                state: Mutex::new(State {
                    idle: Vec::new(),
                    queue: VecDeque::new(),
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
        if state.waiting > 0 && !job.may_block() {
            let mut state = state;
            self.inner.enqueue(&mut state, job);
            drop(state);
            self.inner.source.interrupt();
            return Ok(());
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

    fn enqueue(&self, state: &mut State<J>, job: J) {
        state.queue.push_back(job);
        self.queued.store(state.queue.len(), Ordering::Relaxed);
    }

    fn dequeue(&self, state: &mut State<J>) -> Option<J> {
        let job = state.queue.pop_front();
        self.queued.store(state.queue.len(), Ordering::Relaxed);
        job
    }

    /// Give `job` to an idle thread, or count a new thread for it, or queue it (waking a
    /// waiting thread to take it).
    fn place(&self, mut state: MutexGuard<'_, State<J>>, job: J) -> Placed<J> {
        let mut job = job;
        while let Some(worker) = state.idle.pop() {
            match worker.jobs.send(job) {
                Ok(()) => return Placed::Done,
                // The worker expired between popping itself and exiting; try the next one.
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        if state.total < self.max {
            let id = state.next_id;
            state.next_id += 1;
            state.total += 1;
            return Placed::Spawn(job, id);
        }
        self.enqueue(&mut state, job);
        let wake = state.waiting > 0;
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
        if self.queued.load(Ordering::Relaxed) > 0 {
            return true;
        }
        if self.lock().waiting == 0 {
            self.source.collect(false, got);
            self.take(got);
        }
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// Queue jobs the source gave; those that may block go to threads of their own.
    fn take(self: &Arc<Self>, got: &mut Vec<J>) {
        let mut state = self.lock();
        self.queue_ready(&mut state, got);
        drop(state);
        self.place_blocking(got);
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

    /// Give each job of `got` (those that may block) a thread of its own, or queue it.
    fn place_blocking(self: &Arc<Self>, got: &mut Vec<J>) {
        for job in got.drain(..) {
            if let Placed::Spawn(job, id) = self.place(self.lock(), job) {
                if let Err((job, e)) = self.spawn(id, job) {
                    // No thread at all can be had: a busy one runs it when it is free.
                    crate::warn!("cannot start a relay thread: {e}");
                    let mut state = self.lock();
                    self.enqueue(&mut state, job);
                }
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
            if let Some(j) = back {
                self.enqueue(&mut state, j);
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
                    self.queue_ready(&mut state, &mut got);
                    // A batch of several: let another waiting thread share it.
                    let share = state.queue.len() > 1 && state.waiting > 0;
                    if share || !got.is_empty() {
                        drop(state);
                        if share {
                            self.source.interrupt();
                        }
                        self.place_blocking(&mut got);
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
