//! A check's end: its verdict told to every backend of the target, in one pass that also
//! finds when the target is next due.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::due::Due;
use super::{checked, follow, Probe, Run};
use crate::backends::backend::{ConnectError, HEALTH_EPOCH};

impl Run {
    /// End `target`'s check: close its connects, tell every backend naming it; and when the
    /// target is next due, found in the same pass (at 200,000 apps listing one target, every
    /// further pass over its backends per check was a share of the checker's time at rest).
    pub(super) fn finish(&mut self, target: &Probe, result: Result<(), ConnectError>) {
        let Some(check) = self.checks.remove(target) else {
            return;
        };
        // Its backends' last check moves: when it is next due, too.
        self.due_at.remove(target);
        if check.open > 0 {
            self.sockets.retain(|_, c| c.probe != *target);
        }
        // Only backends still configured: one a reload removed meanwhile is not in the list.
        let Some(list) = self.targets.get_mut(target) else {
            return;
        };
        let done = Instant::now();
        let took = done.duration_since(check.began);
        // Read before the pass: a change of any backend's health or state meanwhile (this
        // verdict's own included) leaves the time found here stale, to be found again.
        let epoch = HEALTH_EPOCH.load(Ordering::Relaxed);
        let mut due = Due::none(epoch);
        let done_at = follow::Stamp::of(done);
        for (b, e) in list.iter_mut() {
            // One that joined since the check began: not its verdict.
            if e.joined <= check.joined {
                e.last = done_at;
                // In maintenance (went there while the check was under way): not its verdict.
                if checked(b) {
                    for _ in 0..e.turns {
                        let own = match &result {
                            // Connected, but later than this app allows.
                            Ok(()) if took > b.check_timing().1 => Err(ConnectError::Timeout),
                            Ok(()) => Ok(()),
                            Err(e) => Err(e.clone_kind()),
                        };
                        b.checked(own);
                    }
                }
            }
            due.with(b, e.last.at());
        }
        self.due_at.insert(target.clone(), due);
    }
}
