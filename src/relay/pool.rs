//! The relay threads: a fixed few (one per core, at most `--max-threads`), started with the
//! proxy, each waiting on the parking lot for whatever becomes ready there: a listener with
//! connections waiting (the thread accepts them and starts them, see `accept`), or a
//! connection whose sockets or deadline woke it. No step of a connection blocks its thread
//! (greeting, admission and relaying wait in the lot, a connect is non-blocking and names are
//! looked up on the resolver's threads), so these threads are all the relay needs: under load a
//! thread goes from connection to connection without sleeping in between, and an idle
//! connection holds no thread.
//!
//! Every thread with nothing to run waits on the lot (epoll wakes one waiter per event), so
//! each core takes up what becomes ready while the others run what they took, as HAProxy's
//! threads do, and no core sits idle while events wait for the one thread that watches. A
//! thread that takes several ready connections at once queues the rest (FIFO) and runs them in
//! turn; when more than `SHARE` are queued, or a job used up its time slice (CPU-bound work,
//! which a second core speeds up), it interrupts a waiting thread to share them. A relay that
//! is still moving bytes at the end of its time slice while others wait goes to the back of the
//! queue, so every connection gets its turn within a bounded time however long the transfers
//! are. Connections are armed one-shot (see `park`), so an event goes to one thread and a
//! connection a thread runs never wakes another.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Relay threads need little stack: the relay loop keeps its buffers on the heap, and nothing
/// deep runs on them (names are looked up on the resolver's threads). Only the pages a thread
/// touches count in RSS.
const STACK_SIZE: usize = 256 * 1024;

/// Queued jobs past which the thread that queued them interrupts a waiting one to share them.
/// Fewer are run by the thread that took them, one after another: a job is a few system calls,
/// far less than waking another thread (a context switch on each side), and the other thread
/// takes whatever else becomes ready meanwhile anyway.
const SHARE: usize = 4;

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

/// What a handler can ask of the pool while it runs a job.
pub struct Turn<'a, J> {
    others_waiting: &'a dyn Fn() -> bool,
    queue: &'a dyn Fn(J),
}

impl<J> Turn<'_, J> {
    /// Jobs are waiting for a thread (ready connections included): a handler past its time slice
    /// should hand its thread on.
    pub fn others_waiting(&self) -> bool {
        (self.others_waiting)()
    }

    /// Queue `job` for whichever thread is free first (this one once its job is done), as a
    /// job the source gave would be: past `SHARE` queued, a waiting thread is brought in.
    pub fn queue(&self, job: J) {
        (self.queue)(job)
    }
}

struct Inner<J> {
    threads: usize,
    state: Mutex<State<J>>,
    /// Jobs waiting for a thread, readable without the lock.
    queued: AtomicUsize,
    /// Runs a job; Some(job) gives the job back to be continued later, after those waiting.
    handler: Handler<J>,
    source: Arc<dyn Source<J>>,
}

type Handler<J> = Box<dyn Fn(J, &Turn<J>) -> Option<J> + Send + Sync>;

struct State<J> {
    /// Jobs waiting for a thread, in arrival order.
    queue: VecDeque<J>,
    /// Threads blocked in `Source::collect`.
    waiting: usize,
}

impl<J: Send + 'static> Pool<J> {
    /// A pool of `threads` threads (at least one) that wait on `source` and run what it gives
    /// with `handler`; none runs before `start`.
    pub fn new(
        threads: usize,
        source: Arc<dyn Source<J>>,
        handler: impl Fn(J, &Turn<J>) -> Option<J> + Send + Sync + 'static,
    ) -> Pool<J> {
        Pool {
            inner: Arc::new(Inner {
                threads: threads.max(1),
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    waiting: 0,
                }),
                queued: AtomicUsize::new(0),
                handler: Box::new(handler),
                source,
            }),
        }
    }

    /// How many threads the pool runs.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Start the threads; they run as long as the process. Fails if the OS refuses the first
    /// one (with some started, the pool runs with those, and says so).
    pub fn start(&self) -> io::Result<()> {
        for id in 0..self.inner.threads {
            let inner = Arc::clone(&self.inner);
            let spawned = std::thread::Builder::new()
                .name(format!("relay-{id}"))
                .stack_size(STACK_SIZE)
                .spawn(move || inner.work());
            if let Err(e) = spawned {
                if id == 0 {
                    return Err(e);
                }
                crate::error!("cannot start relay thread {id}: {e}; running with {id}");
                break;
            }
        }
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

    /// Take ready connections from the source without waiting, into the queue: a thread that
    /// has been busy for a time slice looks whether others wait, even if no thread was free to
    /// wait for events meanwhile.
    fn others_waiting(&self, got: &mut Vec<J>) -> bool {
        // Even with jobs queued: connections whose peers spoke must get in line too.
        if self.lock().waiting == 0 {
            self.source.collect(false, got);
            self.take(got);
        }
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// Queue what the source gave, interrupting a thread waiting for events if there is enough
    /// to share.
    fn take(&self, got: &mut Vec<J>) {
        if got.is_empty() {
            return;
        }
        let mut state = self.lock();
        self.queue_all(&mut state, got);
    }

    /// `take` with the lock held (and kept).
    fn queue_all(&self, state: &mut State<J>, got: &mut Vec<J>) {
        for job in got.drain(..) {
            self.enqueue(state, job);
        }
        if state.queue.len() > SHARE {
            self.share(state);
        }
    }

    /// Bring in a thread waiting for events to share the queue, if one waits.
    fn share(&self, state: &State<J>) {
        if state.waiting > 0 {
            self.source.interrupt();
        }
    }

    fn work(self: Arc<Self>) {
        let mut got = Vec::new();
        let mut harvest = Vec::new();
        let me = Arc::clone(&self);
        let others = move || me.others_waiting(&mut harvest);
        // The closure needs its own buffer and a shared borrow of the pool only.
        let others = std::cell::RefCell::new(others);
        let others_waiting = || (others.borrow_mut())();
        let queue = |job: J| {
            let mut state = self.lock();
            self.enqueue(&mut state, job);
            if state.queue.len() > SHARE {
                self.share(&state);
            }
        };
        let turn = Turn {
            others_waiting: &others_waiting,
            queue: &queue,
        };
        let mut state = self.lock();
        loop {
            let Some(job) = self.dequeue(&mut state) else {
                state.waiting += 1;
                drop(state);
                self.source.collect(true, &mut got);
                state = self.lock();
                state.waiting -= 1;
                self.queue_all(&mut state, &mut got);
                continue;
            };
            drop(state);
            // A panic in one connection's code must not take the thread with it.
            let back = match catch_unwind(AssertUnwindSafe(|| (self.handler)(job, &turn))) {
                Ok(back) => back,
                Err(_) => {
                    crate::error!("relay thread: a connection handler panicked; connection closed");
                    None
                }
            };
            state = self.lock();
            if let Some(j) = back {
                // It used up its time slice while others wait: work enough for another core.
                self.enqueue(&mut state, j);
                self.share(&state);
            }
        }
    }
}
