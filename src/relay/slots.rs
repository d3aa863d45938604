//! The connection bound: how many accepted connections may be in the relay at once.
//!
//! The listener loop takes a slot for every connection it accepts; the session gives it back
//! once the connection has ended and its sockets are closed, whether it ended on a relay thread
//! or woke from the parking lot to end. The loop stops accepting while every slot is taken, and
//! is woken when one comes back, or, while it drains for a stop, at every slot given back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct Slots {
    /// The bound actually in force (the option, lowered to fit the fd limit).
    max: usize,
    taken: AtomicUsize,
    /// Set once the loop drains for a stop: every slot given back wakes it then.
    stopping: AtomicBool,
    waker: mio::Waker,
}

impl Slots {
    pub fn new(max: usize, waker: mio::Waker) -> Slots {
        Slots {
            max,
            taken: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            waker,
        }
    }

    /// The bound in force.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }

    pub fn is_full(&self) -> bool {
        self.taken() >= self.max
    }

    /// Take a slot for a connection just accepted; the listener loop checks `is_full` first.
    pub fn take(&self) {
        self.taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Give a slot back, waking the listener loop if it is waiting for one (paused at the
    /// bound, or draining for shutdown). Waking only then keeps the common path free of
    /// cross-thread wake-ups.
    pub fn release(&self) {
        let before = self.taken.fetch_sub(1, Ordering::AcqRel);
        if before == self.max || self.stopping.load(Ordering::Acquire) {
            if let Err(e) = self.waker.wake() {
                crate::error!("cannot wake the listener loop: {e}");
            }
        }
    }

    /// Give back a slot taken for a connection no relay thread took. The loop itself does
    /// this, so there is nobody to wake.
    pub fn cancel(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wake the listener loop for something else it is asked to do (an admin socket's reload:
    /// its poll has one waker, and it lives here).
    pub fn wake_loop(&self) {
        if let Err(e) = self.waker.wake() {
            crate::error!("cannot wake the listener loop: {e}");
        }
    }

    /// From now on every slot given back wakes the loop, which exits when the last one is.
    pub fn wake_on_every_release(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}
