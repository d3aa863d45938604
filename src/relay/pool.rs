//! The bounded pool of relay threads.
//!
//! A relay thread runs one connection at a time with blocking-style code, for as long as the
//! connection moves bytes; a connection that waits gives its thread back (it is parked, see
//! `park`), so the pool only needs as many threads as connections that are busy at once. The
//! bound (`--max-threads`) may be below the number of open connections: a job that finds every
//! thread busy waits in a FIFO queue, and a busy connection hands its thread on after a time
//! slice while jobs wait (the handler returns it, and it goes to the back of the queue), so a
//! waiting connection gets a thread within a bounded time however long the transfers are.
//!
//! Threads are reused: a finished worker waits on an idle stack and the next job is handed to
//! it directly, through its own channel, so each job wakes exactly one thread. The stack is LIFO
//! so the warmest threads are reused. A few idle threads are kept for a minute; beyond them, an
//! idle thread exits after a moment, so that a burst of connections that then go idle does not
//! leave a thread behind for each.

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
    queued: &'a AtomicUsize,
}

impl Turn<'_> {
    /// Jobs are waiting for a thread: a handler past its time slice should hand its thread on.
    pub fn others_waiting(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > 0
    }
}

struct Inner<J> {
    max: usize,
    state: Mutex<State<J>>,
    /// Length of `State::queue`, readable without the lock.
    queued: AtomicUsize,
    /// Runs a job; Some(job) gives the job back to be continued later, after those waiting.
    handler: Handler<J>,
}

type Handler<J> = Box<dyn Fn(J, &Turn) -> Option<J> + Send + Sync>;

struct State<J> {
    idle: Vec<Worker<J>>,
    /// Jobs waiting for a thread, in arrival order.
    queue: VecDeque<J>,
    /// Threads alive, busy or idle.
    total: usize,
    next_id: u64,
}

struct Worker<J> {
    id: u64,
    jobs: Sender<J>,
}

impl<J: Send + 'static> Pool<J> {
    pub fn new(
        max: usize,
        handler: impl Fn(J, &Turn) -> Option<J> + Send + Sync + 'static,
    ) -> Pool<J> {
        Pool {
            inner: Arc::new(Inner {
                max: max.max(1),
                state: Mutex::new(State {
                    idle: Vec::new(),
                    queue: VecDeque::new(),
                    total: 0,
                    next_id: 0,
                }),
                queued: AtomicUsize::new(0),
                handler: Box::new(handler),
            }),
        }
    }

    /// The thread bound.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Hand `job` to an idle thread, start one, or queue it if the bound is reached. Fails only
    /// if the OS refuses a thread while none is alive to take the job later; the job is given
    /// back so the caller can close its connection.
    pub fn submit(&self, job: J) -> Result<(), (J, io::Error)> {
        let mut state = self.inner.lock();
        let mut job = job;
        while let Some(worker) = state.idle.pop() {
            match worker.jobs.send(job) {
                Ok(()) => return Ok(()),
                // The worker expired between popping itself and exiting; try the next one.
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        if state.total >= self.inner.max {
            self.inner.enqueue(&mut state, job);
            return Ok(());
        }
        let id = state.next_id;
        state.next_id += 1;
        state.total += 1;
        drop(state);
        // The channel exists before the thread so that the job is still ours if spawn fails.
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&self.inner);
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
                let mut state = self.inner.lock();
                state.total -= 1;
                if state.total > 0 {
                    // A live thread takes it when it is done with its own.
                    self.inner.enqueue(&mut state, job);
                    return Ok(());
                }
                Err((job, e))
            }
        }
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

    fn work(self: Arc<Self>, id: u64, tx: Sender<J>, rx: Receiver<J>) {
        // The first job comes through the channel like every later one.
        let Ok(mut job) = rx.recv() else {
            self.lock().total -= 1;
            return;
        };
        let turn = Turn {
            queued: &self.queued,
        };
        loop {
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
            if let Some(j) = self.dequeue(&mut state) {
                job = j;
                continue;
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
