//! The bounded pool of relay threads.
//!
//! A relay thread serves one connection at a time with blocking-style code, so the pool never
//! holds more threads than the connection bound (the listener loop stops accepting at the bound,
//! so it never submits more jobs than that). Threads are reused: a finished worker parks itself
//! on an idle stack and the next job is handed to it directly, through its own channel, so each
//! job wakes exactly one thread and no job ever waits behind a busy one. The stack is LIFO so
//! the warmest threads are reused and the coldest expire after `IDLE_EXPIRY`.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// An idle thread exits after this long without work, giving back its stack.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);

/// Relay threads need little stack: the relay loop keeps its buffers on the heap. Name
/// resolution (getaddrinfo) is the deepest thing they call; 256 KiB leaves it ample room, and
/// only the pages a thread touches count in RSS.
const STACK_SIZE: usize = 256 * 1024;

pub struct Pool<J: Send + 'static> {
    inner: Arc<Inner<J>>,
}

struct Inner<J> {
    max: usize,
    state: Mutex<State<J>>,
    /// Runs each job.
    handler: Box<dyn Fn(J) + Send + Sync>,
    /// Runs after a worker is back on the idle stack, so that the slot it frees can only be
    /// taken by a job that will find an idle worker (or room to spawn one).
    released: Box<dyn Fn() + Send + Sync>,
}

struct State<J> {
    idle: Vec<Worker<J>>,
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
        handler: impl Fn(J) + Send + Sync + 'static,
        released: impl Fn() + Send + Sync + 'static,
    ) -> Pool<J> {
        Pool {
            inner: Arc::new(Inner {
                max,
                state: Mutex::new(State {
                    idle: Vec::new(),
                    total: 0,
                    next_id: 0,
                }),
                handler: Box::new(handler),
                released: Box::new(released),
            }),
        }
    }

    /// Hand `job` to an idle thread, or start one. Fails only if the bound is already reached
    /// (a caller bug: it must not submit more jobs than it has slots) or the OS refuses a thread;
    /// the job is given back so the caller can close its connection.
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
            return Err((job, io::Error::other("relay thread bound reached")));
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
                self.inner.lock().total -= 1;
                Err((job, e))
            }
        }
    }
}

impl<J: Send + 'static> Inner<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        // A panic while holding this lock cannot leave the state inconsistent (every update is
        // a single field write), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work(self: Arc<Self>, id: u64, tx: Sender<J>, rx: Receiver<J>) {
        // The first job comes through the channel like every later one.
        let Ok(mut job) = rx.recv() else {
            self.lock().total -= 1;
            return;
        };
        loop {
            // A panic in one connection's code must not take the thread's slot with it.
            if catch_unwind(AssertUnwindSafe(|| (self.handler)(job))).is_err() {
                crate::error!(
                    "relay thread {id}: a connection handler panicked; connection closed"
                );
            }
            self.lock().idle.push(Worker {
                id,
                jobs: tx.clone(),
            });
            (self.released)();
            job = match rx.recv_timeout(IDLE_EXPIRY) {
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
