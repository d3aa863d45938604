//! The first steering, at start-up: every (port, prefix) of the first table into a map nothing
//! is steered into yet. What `change` does with each pair, laid out for 800,000 of them (a
//! start at 200,000 apps, each on 1-3 ports with an address of each family): the pairs taken
//! straight from the port tables and sorted on a thread per core, each app's group looked up
//! once rather than once per pair, and past MAX_GROUPS apps (where every further app shares the
//! overflow group and handing out groups changes nothing any more) the rest looked up on a
//! thread per core. Through `change`, naming the pairs and their groups took 0.6 s on one
//! thread, the kernel's inserts 0.4 s on two.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{write_batches, Pair, Steered};
use crate::backends::routing::{Binding, Routes};
use crate::bpf::MAX_GROUPS;
use crate::sys::hash::FastMap;

/// Below this many pairs one thread sorts them and names their groups: starting threads
/// would cost more.
const PARALLEL_FROM: usize = 1 << 14;

impl Steered {
    /// Steer every (port, prefix) of `routes` into the map, which holds none of ours yet (no
    /// write made, none pending), handing out groups in the order `change` would (the pairs
    /// sorted), so that the same apps get counters of their own.
    pub(super) fn steer_first(&mut self, routes: &Routes) {
        let mut pairs: Vec<(Pair, &Arc<Binding>)> = Vec::new();
        for (port, table) in routes.ports() {
            pairs.extend(table.bindings().map(|(prefix, b)| ((port, *prefix), b)));
        }
        let threads = if pairs.len() >= PARALLEL_FROM {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            1
        };
        let pairs = sorted(pairs, threads);
        let adds = self.groups_of(&pairs, threads);
        let written = write_batches(self.steering.bindings(), &adds);
        let mut failed = None;
        let mut failures = BTreeSet::new();
        self.settle_written(&adds, &written, &mut failed, &mut failures);
        self.report(failed, &failures);
    }

    /// Each of `pairs` with its group (see `GroupNames`), each use counted: one thread hands
    /// out groups in order until every further app gets the overflow group (`frozen`), then
    /// `threads` look the rest up.
    fn groups_of(&mut self, pairs: &[(Pair, &Arc<Binding>)], threads: usize) -> Vec<(Pair, u32)> {
        let groups = Arc::clone(&self.groups);
        let mut names = groups.lock().unwrap_or_else(|e| e.into_inner());
        let mut adds: Vec<(Pair, u32)> = Vec::with_capacity(pairs.len());
        // Each binding's group by its address: an app alone where it answers has one binding
        // for all its pairs, and its name is three pointers away.
        let mut seen: FastMap<usize, u32> = FastMap::default();
        let mut frozen = None;
        for &(key, b) in pairs {
            frozen = names.frozen();
            if frozen.is_some() {
                break;
            }
            let g = *seen.entry(address(b)).or_insert_with(|| {
                let (g, zero) = names.id(b.group());
                if zero {
                    // Not fatal: the app's counters would start from the last app's counts.
                    if let Err(e) = self.steering.clear_group(g) {
                        crate::error!("bpf: {e}");
                    }
                }
                g
            });
            self.uses[g as usize] += 1;
            adds.push((key, g));
        }
        let Some(overflow) = frozen else {
            return adds;
        };
        // From here `id` gives a name its group or the overflow group, and changes nothing.
        let named: FastMap<&str, u32> = names.by_name.iter().map(|(n, &g)| (&**n, g)).collect();
        let rest = &pairs[adds.len()..];
        let look_up = |part: &[(Pair, &Arc<Binding>)]| -> (Vec<u32>, Vec<u32>) {
            let mut uses = vec![0u32; MAX_GROUPS as usize];
            let found = part
                .iter()
                .map(|(_, b)| {
                    let g = seen
                        .get(&address(b))
                        .copied()
                        .unwrap_or_else(|| named.get(b.group()).copied().unwrap_or(overflow));
                    uses[g as usize] += 1;
                    g
                })
                .collect();
            (found, uses)
        };
        let per = rest.len().div_ceil(threads.max(1)).max(1);
        let found: Vec<(Vec<u32>, Vec<u32>)> = std::thread::scope(|s| {
            let mut parts = rest.chunks(per);
            let first = parts.next().unwrap_or_default();
            let others: Vec<_> = parts.map(|part| s.spawn(move || look_up(part))).collect();
            let mut found = vec![look_up(first)];
            // A panic in a looking-up thread (a bug) is passed on, as on one thread.
            found.extend(
                others
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            found
        });
        let mut groups_found = Vec::with_capacity(rest.len());
        for (part, uses) in found {
            groups_found.extend(part);
            for (n, u) in self.uses.iter_mut().zip(uses) {
                *n += u;
            }
        }
        adds.extend(rest.iter().zip(groups_found).map(|(&(key, _), g)| (key, g)));
        adds
    }
}

/// A binding's address, to know it again (the tables hold it for as long as `pairs` lives).
fn address(b: &Arc<Binding>) -> usize {
    Arc::as_ptr(b) as usize
}

/// `pairs` sorted by (port, prefix), each of `threads` sorting a part, the parts then merged.
fn sorted<T: Send>(mut pairs: Vec<(Pair, T)>, threads: usize) -> Vec<(Pair, T)> {
    if threads < 2 {
        pairs.sort_unstable_by_key(|&(key, _)| key);
        return pairs;
    }
    let per = pairs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in pairs.chunks_mut(per) {
            s.spawn(move || part.sort_unstable_by_key(|&(key, _)| key));
        }
    });
    // Each part sorted: merged two at a time, the last two first.
    let mut runs: Vec<Vec<(Pair, T)>> = Vec::new();
    let mut rest = pairs;
    while rest.len() > per {
        let tail = rest.split_off(per);
        runs.push(rest);
        rest = tail;
    }
    runs.push(rest);
    while runs.len() > 1 {
        let b = runs.pop().unwrap_or_default();
        let a = runs.pop().unwrap_or_default();
        runs.push(merge(a, b));
    }
    runs.pop().unwrap_or_default()
}

/// Two runs sorted by key, merged (every key is in one of them once).
fn merge<T>(a: Vec<(Pair, T)>, b: Vec<(Pair, T)>) -> Vec<(Pair, T)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 <= y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::prefix::Prefix;

    /// Sorted on several threads and merged, the pairs come out as one sort makes them, each
    /// with what it carried.
    #[test]
    fn sorted_in_parts_is_sorted_whole() {
        let pairs: Vec<(Pair, usize)> = (0..10_007u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761);
                let addr = std::net::Ipv4Addr::from(x);
                (
                    (80 + (x % 3) as u16, Prefix::new(addr.into(), 32)),
                    i as usize,
                )
            })
            .collect();
        let mut want = pairs.clone();
        want.sort_unstable_by_key(|&(key, _)| key);
        for threads in 1..=5 {
            assert_eq!(sorted(pairs.clone(), threads), want, "{threads} threads");
        }
        assert!(sorted(Vec::<(Pair, usize)>::new(), 2).is_empty());
    }
}
