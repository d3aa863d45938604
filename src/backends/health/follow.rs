//! How the checker thread follows the backends to check: a whole list (start-up), or a
//! reload's change (the backends of the apps it added, removed and changed), which costs what
//! it names: at 200,000 apps, taking the whole list again on every reload was a third of a
//! second of the checker's time per one-app change.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
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
/// turns) and when it was last checked. A map, so that a reload's backend leaves its target's
/// list without a pass over the list: at 200,000 apps with the same two targets each list held
/// 200,000 backends. When each was last checked lives here, beside it, rather than in a map of
/// its own: a check's result then reaches every backend of the target in one pass over this
/// list, with no look-up per backend. Keyed by the backend itself (compared by address) and
/// with 8-byte times, an entry is 32 bytes, not 48: two per app, 200,000 apps.
#[derive(Default)]
pub(super) struct Listed(HashMap<Held, Entry>);

/// A backend as a key: by the address of its state, as the reload's lists name it.
pub(super) struct Held(pub(super) Arc<Backend>);

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Held {}

impl std::hash::Hash for Held {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        Arc::as_ptr(&self.0).hash(h)
    }
}

pub(super) struct Entry {
    /// How many times it is listed: a check's result is told it once per turn.
    pub(super) turns: u32,
    /// When it was last checked, or first seen.
    pub(super) last: Stamp,
    /// When it joined, as `Run::joined` counts: a check begun before is not its verdict.
    pub(super) joined: u64,
}

/// An `Instant` in 8 bytes (an `Instant` is 16): nanoseconds from a fixed instant of this
/// process, either side of it (292 years each way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp(i64);

impl Stamp {
    fn base() -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    pub(super) fn of(at: Instant) -> Stamp {
        let base = Stamp::base();
        // Saturating: no instant of a running process is 292 years from another.
        let ns = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        match at.checked_duration_since(base) {
            Some(after) => Stamp(ns(after)),
            None => Stamp(-ns(base.duration_since(at))),
        }
    }

    pub(super) fn at(self) -> Instant {
        let base = Stamp::base();
        let d = std::time::Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            base + d
        } else {
            base - d
        }
    }
}

impl Listed {
    fn with_capacity(n: usize) -> Listed {
        Listed(HashMap::with_capacity(n))
    }

    fn push(&mut self, b: Arc<Backend>, last: Stamp, joined: u64) {
        self.0
            .entry(Held(b))
            .or_insert(Entry {
                turns: 0,
                last,
                joined,
            })
            .turns += 1;
    }

    /// Take `b` out, every time it was listed; its entry if it was.
    fn remove(&mut self, b: &Arc<Backend>) -> Option<Entry> {
        self.0.remove(&Held(b.clone()))
    }

    fn get(&self, b: &Arc<Backend>) -> Option<&Entry> {
        self.0.get(&Held(b.clone()))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every backend, once.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<Backend>, &Entry)> {
        self.0.iter().map(|(b, e)| (&b.0, e))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<Backend>, &mut Entry)> {
        self.0.iter_mut().map(|(b, e)| (&b.0, e))
    }

    /// How many listings (a backend listed twice counts twice).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.values().map(|e| e.turns as usize).sum()
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
        let stamp = Stamp::of(now);
        // Those listed before keep when they were last checked.
        let before: HashMap<*const Backend, (Stamp, u64)> = self
            .targets
            .values()
            .flat_map(|l| l.iter())
            .map(|(b, e)| (Arc::as_ptr(b), (e.last, e.joined)))
            .collect();
        self.targets.clear();
        self.due_at.clear();
        // Each target's list made at its size at once: grown one backend at a time, a list of
        // 200,000 left as much again in freed tables behind it, resident while the allocator
        // keeps them (this runs beside the start, after its memory was given back).
        let mut sizes: HashMap<Probe, usize> = HashMap::new();
        for b in &backends {
            *sizes.entry(Probe::of(b)).or_default() += 1;
        }
        for (probe, n) in sizes {
            self.targets.insert(probe, Listed::with_capacity(n));
        }
        for b in backends {
            let (last, joined) = before
                .get(&Arc::as_ptr(&b))
                .copied()
                .unwrap_or_else(|| (stamp, self.join()));
            let probe = Probe::of(&b);
            self.targets.entry(probe).or_default().push(b, last, joined);
        }
        // New targets get their schedule at once.
        self.queue.clear();
        self.next_scan = now;
    }

    /// The next `Entry::joined`.
    fn join(&mut self) -> u64 {
        self.joined += 1;
        self.joined
    }

    /// As `replace` with the list changed by `removed` then `added`: the backends removed
    /// leave their target's list (every time they were listed), those added join theirs
    /// (as often as listed); a backend in both keeps when it was last checked.
    fn change(&mut self, added: Vec<Arc<Backend>>, removed: Vec<Arc<Backend>>) {
        let now = Instant::now();
        let stamp = Stamp::of(now);
        let epoch = HEALTH_EPOCH.load(Ordering::Relaxed);
        let kept: HashSet<*const Backend> = added.iter().map(Arc::as_ptr).collect();
        // A backend both removed and added keeps when it was last checked, and its place in
        // a check under way.
        let mut carried: HashMap<*const Backend, (Stamp, u64)> = HashMap::new();
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
            let entry = self.targets.get(&probe).and_then(|l| l.get(b));
            let listed = entry.is_some();
            let last = entry.map_or(now, |e| e.last.at());
            let lists: Vec<Probe> = if listed {
                vec![probe]
            } else {
                self.targets.keys().cloned().collect()
            };
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
                    if let Some(e) = list.remove(b) {
                        if kept.contains(&ptr) {
                            carried.insert(ptr, (e.last, e.joined));
                        }
                    }
                    if list.is_empty() {
                        self.targets.remove(&probe);
                    }
                }
            }
        }
        let mut new_target = false;
        for b in added {
            let ptr = Arc::as_ptr(&b);
            let probe = Probe::of(&b);
            // Looked at no later than a scan would have it looked at.
            let soonest = interval_of(&b).min(b.check_timing().0);
            self.next_scan = self.next_scan.min(now + soonest);
            // Listed already (a second turn), carried over from `removed`, or new.
            let known = self.targets.get(&probe).and_then(|l| l.get(&b));
            let (last, joined) = match known.map(|e| (e.last, e.joined)) {
                Some(k) => k,
                None => match carried.get(&ptr) {
                    Some(&k) => k,
                    None => (stamp, self.join()),
                },
            };
            match self.due_at.get_mut(&probe) {
                Some(d) if d.epoch == epoch => d.with(&b, last.at()),
                _ => {
                    self.due_at.remove(&probe);
                }
            }
            let list = self.targets.entry(probe).or_default();
            new_target |= list.is_empty();
            list.push(b, last, joined);
        }
        if new_target {
            // A new target gets its schedule at once; one already checked is due as before.
            self.queue.clear();
            self.next_scan = now;
        }
    }
}

#[cfg(test)]
impl Run {
    /// When `b` was last checked (or first seen), if it is listed.
    pub(super) fn last_of(&self, b: &Arc<Backend>) -> Option<Instant> {
        let probe = Probe::of(b);
        Some(self.targets.get(&probe)?.get(b)?.last.at())
    }

    /// Say `b` was last checked at `at`.
    pub(super) fn set_last(&mut self, b: &Arc<Backend>, at: Instant) {
        let probe = Probe::of(b);
        if let Some(e) = self
            .targets
            .get_mut(&probe)
            .and_then(|l| l.0.get_mut(&Held(b.clone())))
        {
            e.last = Stamp::of(at);
        }
    }
}
