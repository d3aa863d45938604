//! When a target is next due (`Due`), kept between scans and changed by a reload's backends
//! without a pass over every backend listing the target.

use std::time::{Duration, Instant};

use super::{checked, follow, UP_CHECK_FACTOR};
use crate::backends::backend::Backend;

/// When a target is next due, and its backends' shortest interval, as of `epoch`; each with
/// how many backends give it, so that one leaving (a reload) is told apart from the last
/// that did without a pass over the others.
#[derive(Debug, Clone, Copy)]
pub(super) struct Due {
    pub(super) epoch: u64,
    /// When the first of its backends not in maintenance is due (None while every one is).
    pub(super) at: Option<Instant>,
    at_n: usize,
    /// The shortest interval among its backends: a scan comes at least this often.
    pub(super) shortest: Duration,
    shortest_n: usize,
    /// The longest `TimeoutMs` among its backends not in maintenance: a check of the target
    /// ends by then (each backend judges the time it took against its own).
    pub(super) timeout: Duration,
    timeout_n: usize,
}

impl Due {
    pub(super) fn of(backends: &follow::Listed, epoch: u64) -> Due {
        let mut d = Due::none(epoch);
        for (b, e) in backends.iter() {
            d.with(b, e.last.at());
        }
        d
    }

    /// A target with no backends counted yet.
    pub(super) fn none(epoch: u64) -> Due {
        Due {
            epoch,
            at: None,
            at_n: 0,
            // A scan at least every minute: the shortest with none counted.
            shortest: Duration::from_secs(60),
            shortest_n: 0,
            timeout: Duration::ZERO,
            timeout_n: 0,
        }
    }

    /// `b`'s interval, when it is due (None in maintenance), last checked at `last`, and its
    /// timeout (None in maintenance).
    fn of_one(b: &Backend, last: Instant) -> (Duration, Option<Instant>, Option<Duration>) {
        let (interval, timeout) = b.check_timing();
        let every = if b.is_up() {
            interval * UP_CHECK_FACTOR
        } else {
            interval
        };
        let checked = checked(b);
        (
            interval,
            checked.then_some(last + every),
            checked.then_some(timeout),
        )
    }

    /// `b` (last checked at `last`) is among the target's backends.
    pub(super) fn with(&mut self, b: &Backend, last: Instant) {
        let (interval, at, timeout) = Due::of_one(b, last);
        if let Some(t) = timeout {
            match t.cmp(&self.timeout) {
                std::cmp::Ordering::Greater => (self.timeout, self.timeout_n) = (t, 1),
                std::cmp::Ordering::Equal => self.timeout_n += 1,
                std::cmp::Ordering::Less => {}
            }
        }
        match interval.cmp(&self.shortest) {
            std::cmp::Ordering::Less => (self.shortest, self.shortest_n) = (interval, 1),
            std::cmp::Ordering::Equal => self.shortest_n += 1,
            std::cmp::Ordering::Greater => {}
        }
        match (at, self.at) {
            (Some(a), Some(s)) if a == s => self.at_n += 1,
            (Some(a), Some(s)) if a > s => {}
            (Some(a), _) => (self.at, self.at_n) = (Some(a), 1),
            (None, _) => {}
        }
    }

    /// `b` (last checked at `last`) left the target's backends. False if it was the last to
    /// give the earliest time, the shortest interval or the longest timeout: then only a pass
    /// over the others says.
    /// (Its settings may have changed in place since it was counted: it then counts as
    /// giving neither, which at worst keeps a time earlier than needed, or a shorter
    /// interval: a check or a scan sooner.)
    pub(super) fn without(&mut self, b: &Backend, last: Instant) -> bool {
        let (interval, at, timeout) = Due::of_one(b, last);
        if timeout.is_some() && timeout == Some(self.timeout) && self.timeout_n > 0 {
            self.timeout_n -= 1;
            if self.timeout_n == 0 {
                return false;
            }
        }
        if interval == self.shortest && self.shortest_n > 0 {
            self.shortest_n -= 1;
            if self.shortest_n == 0 {
                return false;
            }
        }
        if at.is_some() && at == self.at {
            self.at_n -= 1;
            if self.at_n == 0 {
                return false;
            }
        }
        true
    }
}
