//! How the checker thread follows the backends to check: a whole list (start-up), or a
//! reload's change (the backends of the apps it added, removed and changed), which costs what
//! it names: at 200,000 apps, taking the whole list again on every reload was a third of a
//! second of the checker's time per one-app change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::{interval_of, Probe, Run};
use crate::backends::backend::Backend;
use crate::backends::backend::HEALTH_EPOCH;
use std::sync::atomic::Ordering;

/// What `Checker::set` and `Checker::change` ask.
pub(super) enum Update {
    Set(Vec<Arc<Backend>>),
    Change {
        added: Vec<Arc<Backend>>,
        removed: Vec<Arc<Backend>>,
    },
}

/// The backends of one target (and kind of check), by the address of their state, each with
/// how many times it is listed (a target listed twice in an app is one backend with two
/// turns). A map, so that a reload's backend leaves its target's list without a pass over the
/// list: at 200,000 apps with the same two targets each list held 200,000 backends.
#[derive(Default)]
pub(super) struct Listed(HashMap<*const Backend, (Arc<Backend>, usize)>);

impl Listed {
    fn push(&mut self, b: Arc<Backend>) {
        self.0.entry(Arc::as_ptr(&b)).or_insert((b, 0)).1 += 1;
    }

    /// Take `b` out, every time it was listed; whether it was.
    fn remove(&mut self, b: *const Backend) -> bool {
        self.0.remove(&b).is_some()
    }

    fn contains(&self, b: *const Backend) -> bool {
        self.0.contains_key(&b)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every backend, once.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.0.values().map(|(b, _)| b)
    }

    /// Every backend, as many times as it is listed.
    pub(super) fn each_turn(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.0
            .values()
            .flat_map(|(b, n)| std::iter::repeat_n(b, *n))
    }

    /// How many listings (a backend listed twice counts twice).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.values().map(|(_, n)| n).sum()
    }
}

impl Probe {
    pub(super) fn of(b: &Backend) -> Probe {
        Probe {
            target: b.target.clone(),
            kind: b.check_settings().kind,
        }
    }
}

impl Run {
    pub(super) fn follow(&mut self, update: Update) {
        match update {
            Update::Set(backends) => self.replace(backends),
            Update::Change { added, removed } => self.change(added, removed),
        }
    }

    /// A reload's backends: group them by target; forget the state of those that left.
    fn replace(&mut self, backends: Vec<Arc<Backend>>) {
        let now = Instant::now();
        self.targets.clear();
        self.due_at.clear();
        for b in backends {
            self.last.entry(Arc::as_ptr(&b)).or_insert(now);
            let probe = Probe::of(&b);
            self.targets.entry(probe).or_default().push(b);
        }
        let current: HashSet<*const Backend> = self
            .targets
            .values()
            .flat_map(|l| l.iter())
            .map(Arc::as_ptr)
            .collect();
        self.last.retain(|k, _| current.contains(k));
        // New targets get their schedule at once.
        self.queue.clear();
        self.next_scan = now;
    }

    /// As `replace` with the list changed by `removed` then `added`: the backends removed
    /// leave their target's list (every time they were listed), those added join theirs
    /// (as often as listed); a backend in both keeps when it was last checked.
    fn change(&mut self, added: Vec<Arc<Backend>>, removed: Vec<Arc<Backend>>) {
        let now = Instant::now();
        let epoch = HEALTH_EPOCH.load(Ordering::Relaxed);
        let kept: HashSet<*const Backend> = added.iter().map(Arc::as_ptr).collect();
        let mut done = HashSet::new();
        for b in &removed {
            let ptr = Arc::as_ptr(b);
            if !done.insert(ptr) {
                continue; // listed twice: gone already
            }
            // Under its target and kind of check as of now; a reload that changed the kind
            // in place (a kept backend of a changed app) left it under the old one: look in
            // every list then (rare: the check's kind changed).
            let probe = Probe::of(b);
            let listed = self.targets.get(&probe).is_some_and(|l| l.contains(ptr));
            let lists: Vec<Probe> = if listed {
                vec![probe]
            } else {
                self.targets.keys().cloned().collect()
            };
            let last = self.last.get(&ptr).copied().unwrap_or(now);
            for probe in lists {
                // When the target is due stays known if another backend gives it too (at
                // 200,000 apps listing one target, a pass over them per reload otherwise).
                let known = listed
                    && self
                        .due_at
                        .get_mut(&probe)
                        .is_some_and(|d| d.epoch == epoch && d.without(b, last));
                if !known {
                    self.due_at.remove(&probe);
                }
                if let Some(list) = self.targets.get_mut(&probe) {
                    list.remove(ptr);
                    if list.is_empty() {
                        self.targets.remove(&probe);
                    }
                }
            }
            if !kept.contains(&ptr) {
                self.last.remove(&ptr);
            }
        }
        let mut new_target = false;
        for b in added {
            let ptr = Arc::as_ptr(&b);
            self.last.entry(ptr).or_insert(now);
            let probe = Probe::of(&b);
            // Looked at no later than a scan would have it looked at.
            let soonest = interval_of(&b).min(b.check_timing().0);
            self.next_scan = self.next_scan.min(now + soonest);
            let last = self.last.get(&ptr).copied().unwrap_or(now);
            match self.due_at.get_mut(&probe) {
                Some(d) if d.epoch == epoch => d.with(&b, last),
                _ => {
                    self.due_at.remove(&probe);
                }
            }
            let list = self.targets.entry(probe).or_default();
            new_target |= list.is_empty();
            list.push(b);
        }
        if new_target {
            // A new target gets its schedule at once; one already checked is due as before.
            self.queue.clear();
            self.next_scan = now;
        }
    }
}
