//! The connection bound: how many accepted connections may be in the relay at once.
//!
//! A relay thread takes a slot before every accept (`accept`); the session gives it back once
//! the connection has ended and its sockets are closed (or the accept gives it back at once if
//! nothing came or the connection was refused). Accepting pauses while every slot is taken, and
//! the listener loop is woken when one comes back at the bound, to resume it, or, while it
//! drains for a stop, at every slot given back.

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

    /// Take a slot for a connection about to be accepted, if one is free: threads accepting
    /// at once never pass the bound together.
    pub fn try_take(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Give a slot back, waking the listener loop if accepting may be paused for one (at the
    /// bound), or it drains for shutdown. Waking only then keeps the common path free of
    /// cross-thread wake-ups.
    pub fn release(&self) {
        let before = self.taken.fetch_sub(1, Ordering::AcqRel);
        if before == self.max || self.stopping.load(Ordering::Acquire) {
            if let Err(e) = self.waker.wake() {
                crate::error!("cannot wake the listener loop: {e}");
            }
        }
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
