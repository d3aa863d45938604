//! The parking lot: connections that wait, without a thread.
//!
//! A relay that moved no byte for a while gives its thread back and leaves its connection here
//! (its sockets, its state, no buffer and no pipe). One thread waits on all of them in a mio
//! `Poll` beside the listener loop, and hands a connection back to the pool as soon as one of
//! its sockets becomes readable, fails or hangs up, or its idle timeout is due; the relay then
//! carries on where it stopped. Drains reach parked connections like any other: cutting one
//! shuts its sockets down, which wakes it here.
//!
//! A socket is registered only for what the relay still wants from it (see
//! `transfer::Wanted`), and removed before the connection is resumed, so the lot never wakes
//! for a connection a relay thread is running.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::relay::transfer::Wanted;

/// Wakes the lot's thread when a connection parks with an earlier deadline than it waits for.
const WAKE: Token = Token(usize::MAX);

pub struct Lot<T> {
    registry: Registry,
    waker: Waker,
    state: Mutex<State<T>>,
    /// Where a connection goes when it wakes: the relay pool.
    resume: OnceLock<Box<dyn Fn(T) + Send + Sync>>,
}

struct State<T> {
    parked: HashMap<usize, Parked<T>>,
    /// Deadlines, earliest first, with the connection they are for.
    timers: BTreeSet<(Instant, usize)>,
    /// Tokens are never reused, so a late event for a connection already resumed is ignored.
    next_token: usize,
    /// When the lot's thread will look at the timers next; None: not before an event.
    wake_at: Option<Instant>,
}

struct Parked<T> {
    item: T,
    fds: [Option<RawFd>; 2],
    deadline: Option<Instant>,
}

impl<T: Send + 'static> Lot<T> {
    /// Start the lot's thread.
    pub fn start() -> io::Result<Arc<Lot<T>>> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        let lot = Arc::new(Lot {
            registry,
            waker,
            state: Mutex::new(State {
                parked: HashMap::new(),
                timers: BTreeSet::new(),
                next_token: 0,
                wake_at: None,
            }),
            resume: OnceLock::new(),
        });
        let run = Arc::clone(&lot);
        std::thread::Builder::new()
            .name("park".into())
            .stack_size(128 * 1024)
            .spawn(move || run.run(poll))?;
        Ok(lot)
    }

    /// Say where woken connections go. Set once, before the first `park`.
    pub fn set_resume(&self, resume: impl Fn(T) + Send + Sync + 'static) {
        let _ = self.resume.set(Box::new(resume));
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Park `item` until one of `sockets` shows what it is wanted for, or `deadline`. The
    /// sockets must stay open while the item is parked (the item owns them). If they cannot be
    /// registered, the item is given back.
    pub fn park(
        &self,
        item: T,
        sockets: [(RawFd, Wanted); 2],
        deadline: Option<Instant>,
    ) -> Result<(), T> {
        // All under the lock, so that the lot's thread cannot resume the connection (and its
        // sockets be closed and their numbers reused) while its sockets are being registered.
        let mut state = self.lock();
        let token = state.next_token;
        state.next_token += 1;
        let mut fds = [None, None];
        for (i, &(fd, wanted)) in sockets.iter().enumerate() {
            let interest = match wanted {
                Wanted::Readable => Interest::READABLE,
                // Nothing is read from it: errors and hang-ups are reported whatever the
                // interest, and urgent data (PRIORITY) never comes on these sockets.
                Wanted::Failure => Interest::PRIORITY,
                Wanted::Nothing => continue,
            };
            if let Err(e) = self
                .registry
                .register(&mut SourceFd(&fd), Token(token), interest)
            {
                self.deregister(&fds);
                crate::debug!("cannot park a connection: {e}");
                return Err(item);
            }
            fds[i] = Some(fd);
        }
        state.parked.insert(
            token,
            Parked {
                item,
                fds,
                deadline,
            },
        );
        if let Some(at) = deadline {
            state.timers.insert((at, token));
            if state.wake_at.is_none_or(|w| at < w) {
                state.wake_at = Some(at);
                if let Err(e) = self.waker.wake() {
                    crate::error!("cannot wake the parking lot: {e}");
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section is a few map operations: a poisoned lock is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deregister(&self, fds: &[Option<RawFd>; 2]) {
        for fd in fds.iter().flatten() {
            // Fails only if it was not registered, which is what we want anyway.
            let _ = self.registry.deregister(&mut SourceFd(fd));
        }
    }

    fn run(self: Arc<Self>, mut poll: Poll) {
        let mut events = Events::with_capacity(1024);
        let mut due = Vec::new();
        loop {
            let timeout = {
                let mut state = self.lock();
                let next = state.timers.first().map(|&(at, _)| at);
                state.wake_at = next;
                next.map(|at| at.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Nothing parked could be woken any more: better to say so loudly.
                    crate::error!("parking lot: waiting for events failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            {
                let mut state = self.lock();
                for event in events.iter() {
                    if event.token() == WAKE {
                        continue;
                    }
                    if let Some(p) = state.remove(event.token().0) {
                        due.push(p);
                    }
                }
                let now = Instant::now();
                while state.timers.first().is_some_and(|&(at, _)| at <= now) {
                    let Some((_, token)) = state.timers.pop_first() else {
                        break;
                    };
                    if let Some(p) = state.remove(token) {
                        due.push(p);
                    }
                }
            }
            for p in due.drain(..) {
                self.deregister(&p.fds);
                match self.resume.get() {
                    Some(resume) => resume(p.item),
                    None => crate::error!("parking lot: nowhere to resume a connection"),
                }
            }
        }
    }
}

impl<T> State<T> {
    /// Take a connection out of the table and its timer.
    fn remove(&mut self, token: usize) -> Option<Parked<T>> {
        let p = self.parked.remove(&token)?;
        if let Some(at) = p.deadline {
            self.timers.remove(&(at, token));
        }
        Some(p)
    }
}
