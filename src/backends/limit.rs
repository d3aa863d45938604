//! An app's `MaxConnections`: the slots its connections hold, and the queue of those waiting for
//! one. The routing table gives each app with a limit one `AppLimit`, kept across reloads while
//! the app stays.
//!
//! Waiters queue in arrival order, and a slot given back goes to the first of them directly
//! (it is never free in between, so a newcomer cannot take it past them), whose waker is then
//! called, once, from the thread that gave the slot back: a waiter wakes only when a slot is
//! its own, never on a timer to look again. A waiter that leaves (its client reset, a drain,
//! its deadline) leaves the queue at once, and a slot given to it that it did not take goes on
//! to the next: no slot is lost to a waiter that is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// What wakes a waiter once a slot is its own (for the relay: its connection, out of the
/// parking lot). Called without the limit's lock held, from whichever thread gave the slot.
pub type Waker = Box<dyn FnOnce() + Send>;

/// An app's `MaxConnections`: a counting semaphore with a FIFO queue. A connection over the
/// limit waits for a slot (in the parking lot, without a thread, through `acquire_or_wait`;
/// holding one of the global slots, so the global bound still holds) and gives up after the
/// connect timeout; other apps are served meanwhile. No more connections wait than the limit
/// itself: past that they are refused at once, so a flood at one app holds at most twice its
/// limit of the global slots and cannot take the others'.
#[derive(Default)]
pub struct AppLimit {
    state: Mutex<LimitState>,
}

impl std::fmt::Debug for AppLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("AppLimit")
            .field("max", &st.max)
            .field("used", &st.used)
            .field("waiting", &st.queue.len())
            .finish()
    }
}

#[derive(Default)]
struct LimitState {
    max: usize,
    /// Slots held, including those given to a waiter that has not taken its own yet.
    used: usize,
    /// Waiters by their place in arrival order, with what wakes each.
    queue: BTreeMap<u64, Waker>,
    /// Waiters given a slot that they have not taken yet (`LimitWait::try_take`).
    granted: BTreeSet<u64>,
    next: u64,
}

impl LimitState {
    /// Give free slots to the first waiters; what wakes them, to be called once the lock is
    /// released.
    fn grant(&mut self) -> Vec<Waker> {
        let mut wake = Vec::new();
        while self.used < self.max {
            let Some((id, waker)) = self.queue.pop_first() else {
                break;
            };
            self.used += 1;
            self.granted.insert(id);
            wake.push(waker);
        }
        wake
    }
}

/// Wake those `grant` gave a slot to (without the lock: a waker takes the parking lot's).
fn wake_all(wake: Vec<Waker>) {
    for w in wake {
        w();
    }
}

impl AppLimit {
    fn lock(&self) -> MutexGuard<'_, LimitState> {
        // Every critical section is a few map operations: a poisoned lock is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set from the app's `MaxConnections` when the routing table is built.
    pub(super) fn set_max(&self, max: usize) {
        let mut st = self.lock();
        st.max = max;
        // A raised limit lets waiters in.
        let wake = st.grant();
        drop(st);
        wake_all(wake);
    }

    /// Take a slot now, or a place at the back of the queue of connections waiting for one
    /// (`waker` is called once a slot is its own: take it with `LimitWait::try_take`); Err if
    /// as many connections wait already as the limit allows.
    pub fn acquire_or_wait(self: &Arc<Self>, waker: Waker) -> Result<Acquired, LimitDenied> {
        let mut st = self.lock();
        // Behind waiters, even if a slot is free: it is theirs (given, not taken yet).
        if st.used < st.max && st.queue.is_empty() {
            st.used += 1;
            return Ok(Acquired::Slot(LimitGuard(Arc::clone(self))));
        }
        if st.queue.len() >= st.max {
            return Err(LimitDenied::QueueFull);
        }
        let id = st.next;
        st.next += 1;
        st.queue.insert(id, waker);
        Ok(Acquired::Wait(LimitWait {
            limit: Arc::clone(self),
            id,
        }))
    }

    /// Connections waiting for a slot now (one given a slot it has not taken yet no longer
    /// waits). For metrics and status: taken under the lock, off the relay path.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Give a slot back: to the first waiter if there is one (and the limit, maybe lowered
    /// by a reload, allows it).
    fn release(&self) {
        let mut st = self.lock();
        st.used -= 1;
        let wake = st.grant();
        drop(st);
        wake_all(wake);
    }
}

/// What `AppLimit::acquire_or_wait` gave.
pub enum Acquired {
    Slot(LimitGuard),
    Wait(LimitWait),
}

/// A place among the connections waiting for one of an app's slots, until dropped.
pub struct LimitWait {
    limit: Arc<AppLimit>,
    /// Its place in arrival order.
    id: u64,
}

impl LimitWait {
    /// The slot given to this waiter, if one was (its waker was called, or is about to be).
    pub fn try_take(&self) -> Option<LimitGuard> {
        let mut st = self.limit.lock();
        st.granted
            .remove(&self.id)
            .then(|| LimitGuard(Arc::clone(&self.limit)))
    }
}

impl Drop for LimitWait {
    /// Leave the queue; a slot given to it and not taken goes on to the next waiter.
    fn drop(&mut self) {
        let mut st = self.limit.lock();
        if st.queue.remove(&self.id).is_some() {
            return;
        }
        if st.granted.remove(&self.id) {
            st.used -= 1;
            let wake = st.grant();
            drop(st);
            wake_all(wake);
        }
    }
}

/// Why no slot of an app's limit was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitDenied {
    /// As many connections wait already as the limit: refused without waiting.
    QueueFull,
    /// No slot came free within the wait.
    TimedOut,
}

impl LimitDenied {
    pub fn reason(self) -> &'static str {
        match self {
            LimitDenied::QueueFull => {
                "the app's MaxConnections is reached and as many connections wait already"
            }
            LimitDenied::TimedOut => {
                "the app's MaxConnections stayed reached for the connect timeout"
            }
        }
    }
}

/// Holds one of an app's slots until dropped.
pub struct LimitGuard(Arc<AppLimit>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
impl AppLimit {
    /// Take a slot, waiting on this thread up to `timeout` (`cancelled` is looked at once the
    /// wait is over): for tests, where the relay waits in the parking lot instead.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        timeout: std::time::Duration,
        cancelled: impl Fn() -> bool,
    ) -> Result<LimitGuard, LimitDenied> {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = match self.acquire_or_wait(Box::new(move || {
            let _ = tx.send(());
        }))? {
            Acquired::Slot(slot) => return Ok(slot),
            Acquired::Wait(w) => w,
        };
        let _ = rx.recv_timeout(timeout);
        match waiting.try_take() {
            Some(slot) if !cancelled() => Ok(slot),
            _ => Err(LimitDenied::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests;
