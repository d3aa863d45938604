//! The bounded pool of relay threads.
//!
//! A relay thread runs a connection while it can move bytes without waiting; a connection that
//! would have to wait gives its thread back at once and waits in the parking lot (see `park`).
//! The threads themselves wait on the lot, at most `waiters` of them at a time (one per core),
//! and take up whichever connections become ready: under load a thread goes from connection to
//! connection without sleeping in between, and an idle connection holds no thread. No step of a
//! connection blocks its thread (greeting, admission and relaying wait in the lot, a connect is
//! non-blocking and names are looked up on the resolver's threads), so the pool needs about as
//! many threads as cores.
//!
//! The bound (`--max-threads`) may be far below the number of open connections: work that finds
//! every thread busy waits in a FIFO queue, and a relay that is still moving bytes at the end of
//! its time slice while others wait goes to the back of it, so every connection gets a thread
//! within a bounded time however long the transfers are.
//!
//! A thread with nothing to run and no room among the waiters goes on an idle stack, from which
//! it is brought back (through its own channel, so it wakes exactly that thread) when fewer
//! threads than `waiters` take events. The stack is LIFO so the warmest threads are reused. A
//! few idle threads are kept for a minute; beyond them, an idle thread exits after a moment.

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

/// Where waiting jobs come from when they are ready: the parking lot.
pub trait Source<J>: Send + Sync {
    /// Add the jobs that are ready to `out`; with `block`, wait until there is one or until
    /// `interrupt`.
    fn collect(&self, block: bool, out: &mut Vec<J>);
    /// Wake one thread blocked in `collect`.
    fn interrupt(&self);
}

pub struct Pool<J: Send + 'static> {
    inner: Arc<Inner<J>>,
}

impl<J: Send + 'static> Clone for Pool<J> {
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
    /// Jobs waiting for a thread, readable without the lock.
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

impl<J: Send + 'static> Pool<J> {
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

    /// Queue `job` for the threads that wait for events, waking one. Only while fewer threads
    /// than `waiters` take events (at start, or with all of them gone idle) is one brought in
    /// for it: an idle thread, or a new one under the bound. Fails only if the OS refuses a
    /// thread while none is alive to take the job later; the job is given back so the caller
    /// can close its connection.
    pub fn submit(&self, job: J) -> Result<(), (J, io::Error)> {
        let inner = &self.inner;
        let mut state = inner.lock();
        // Threads waiting for events or running jobs.
        let events = state.total.saturating_sub(state.idle.len());
        let mut job = job;
        if state.waiting == 0 && events < inner.waiters {
            while let Some(worker) = state.idle.pop() {
                match worker.jobs.send(job) {
                    Ok(()) => return Ok(()),
                    // The worker expired between popping itself and exiting; try the next one.
                    Err(mpsc::SendError(j)) => job = j,
                }
            }
            if state.total < inner.max {
                let id = state.next_id;
                state.next_id += 1;
                state.total += 1;
                drop(state);
                return inner.spawn(id, job);
            }
        }
        inner.enqueue(&mut state, job);
        drop(state);
        inner.source.interrupt();
        Ok(())
    }
}

impl<J: Send + 'static> Inner<J> {
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
        // Even with jobs queued: connections whose peers spoke must get in line too.
        if self.lock().waiting == 0 {
            self.source.collect(false, got);
            self.take(got);
        }
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// Queue what the source gave, waking a thread waiting for events to share a batch.
    fn take(self: &Arc<Self>, got: &mut Vec<J>) {
        if got.is_empty() {
            return;
        }
        let mut state = self.lock();
        for job in got.drain(..) {
            self.enqueue(&mut state, job);
        }
        let share = state.queue.len() > 1 && state.waiting > 0;
        drop(state);
        if share {
            self.source.interrupt();
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
