//! An app's `MaxConnections`: the slots its connections hold, and the bounded queue of those
//! waiting for one. The routing table gives each app with a limit one `AppLimit`, kept across
//! reloads while the app stays.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An app's `MaxConnections`: a counting semaphore. A connection over the limit waits for a
/// slot (in the parking lot, without a thread, through `acquire_or_wait`; holding one of the
/// global slots, so the global bound still holds) and gives up after the connect timeout;
/// other apps are served meanwhile. No more connections wait than the limit itself: past that
/// they are refused at once, so a flood at one app holds at most twice its limit of the global
/// slots and cannot take the others'.
#[derive(Debug, Default)]
pub struct AppLimit {
    state: Mutex<LimitState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct LimitState {
    max: usize,
    used: usize,
    /// Connections waiting for a slot now.
    waiting: usize,
}

impl AppLimit {
    /// Set from the app's `MaxConnections` when the routing table is built.
    pub(super) fn set_max(&self, max: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).max = max;
        // A raised limit may let waiters in.
        self.freed.notify_all();
    }

    /// Take a slot, waiting up to `timeout`; Err if as many connections wait already as the
    /// limit allows, if none came free in time, or if `cancelled` says the connection was cut
    /// meanwhile (checked every `CANCEL_CHECK`).
    pub fn acquire(
        self: &Arc<Self>,
        timeout: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Result<LimitGuard, LimitDenied> {
        const CANCEL_CHECK: Duration = Duration::from_millis(50);
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.used < st.max {
            st.used += 1;
            return Ok(LimitGuard(Arc::clone(self)));
        }
        if st.waiting >= st.max {
            return Err(LimitDenied::QueueFull);
        }
        st.waiting += 1;
        let got = loop {
            if st.used < st.max {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || cancelled() {
                break false;
            }
            st = self
                .freed
                .wait_timeout(st, left.min(CANCEL_CHECK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        st.waiting -= 1;
        if !got {
            return Err(LimitDenied::TimedOut);
        }
        st.used += 1;
        Ok(LimitGuard(Arc::clone(self)))
    }
}

impl AppLimit {
    /// Take a slot now, or a place among the connections waiting for one (the wait itself is
    /// the caller's, e.g. in the parking lot, retrying with `LimitWait::try_take`); Err if as
    /// many connections wait already as the limit allows.
    pub fn acquire_or_wait(self: &Arc<Self>) -> Result<Acquired, LimitDenied> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.used < st.max {
            st.used += 1;
            return Ok(Acquired::Slot(LimitGuard(Arc::clone(self))));
        }
        if st.waiting >= st.max {
            return Err(LimitDenied::QueueFull);
        }
        st.waiting += 1;
        Ok(Acquired::Wait(LimitWait(Arc::clone(self))))
    }
}

/// What `AppLimit::acquire_or_wait` gave.
pub enum Acquired {
    Slot(LimitGuard),
    Wait(LimitWait),
}

/// A place among the connections waiting for one of an app's slots, until dropped.
pub struct LimitWait(Arc<AppLimit>);

impl LimitWait {
    /// A slot if one is free now (the place is given back when `self` drops).
    pub fn try_take(&self) -> Option<LimitGuard> {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.used < st.max {
            st.used += 1;
            return Some(LimitGuard(Arc::clone(&self.0)));
        }
        None
    }
}

impl Drop for LimitWait {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting -= 1;
    }
}

/// Why no slot of an app's limit was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitDenied {
    /// As many connections wait already as the limit: refused without waiting.
    QueueFull,
    /// No slot came free within the wait (or the wait was cancelled).
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
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).used -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_bounded_by_the_limit() {
        let limit = Arc::new(AppLimit::default());
        limit.set_max(1);
        let held = limit.acquire(Duration::ZERO, || false).unwrap();
        // One waiter may wait; a second is refused at once, however long it would wait.
        let l = Arc::clone(&limit);
        let waiter = std::thread::spawn(move || l.acquire(Duration::from_secs(30), || false));
        let until = Instant::now() + Duration::from_secs(20);
        while limit.state.lock().unwrap().waiting == 0 {
            assert!(Instant::now() < until, "the waiter never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let began = Instant::now();
        assert_eq!(
            limit.acquire(Duration::from_secs(30), || false).err(),
            Some(LimitDenied::QueueFull)
        );
        assert!(began.elapsed() < Duration::from_secs(5));
        drop(held);
        assert!(waiter.join().unwrap().is_ok());
        assert_eq!(limit.state.lock().unwrap().waiting, 0);
    }
}
