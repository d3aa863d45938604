//! `Shards`: a hash map whose versions share what they did not change. The routing table and
//! the loop check's index are replaced whole on every reload, and at 200,000 apps copying a
//! map of every app (or of every address on a port) per reload was most of a one-app change.
//! Here a map is split into shards by the hash of the key, each behind an `Arc`: a clone
//! copies only the list of shards, and a change copies the one shard it touches (about 200
//! entries however big the map), so the next version costs what changed.
//!
//! A map starts as one shard and adds shards as it grows, about 1.4 times as many each time (a
//! rehash of every entry, as a `Vec` copies itself when it grows: rare, and paid by the change
//! that crosses the size), so a small map costs what a `HashMap` does.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

// The keys are app names and address prefixes from the config, never a peer's: the fast
// hasher's module says why that needs no random key.
use crate::sys::hash::{BuildFast, FastMap};

/// Entries per shard (on average) past which the shards grow.
const PER_SHARD: usize = 256;

/// Entries per shard (on average) a map starts at when built whole or grown: each shard's
/// table is made for `SHARD_CAP`, which fills 256 buckets to 7/8 (a hash table's buckets are a
/// power of two), with room for the shards a little fuller than the average. The number of
/// shards is not a power of two (see `pick_of`): with one, the average fell anywhere between
/// half and all of `PER_SHARD`, and a table sized for the fuller end took 512 buckets, 40% full
/// (the routing port tables at 20,000 apps, a fifth of their memory).
const FILL: usize = 180;

/// The capacity each shard's table is made with (see `FILL`).
const SHARD_CAP: usize = 224;

/// A hash map of `K` to `V` whose clones share their unchanged shards (see the module doc).
#[derive(Debug, Clone)]
pub struct Shards<K, V> {
    /// Any number of them (at least one).
    shards: Vec<Arc<FastMap<K, V>>>,
    len: usize,
    /// Picks the shard of a key; the same in every version of the map.
    pick: BuildFast,
}

impl<K, V> Default for Shards<K, V> {
    fn default() -> Self {
        Shards {
            shards: vec![Arc::default()],
            len: 0,
            pick: BuildFast::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shards<K, V> {
    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        self.pick_of(key, self.shards.len())
    }

    /// The shard of `key` among `n`: bits 16 to 47 of its hash, scaled to `n` (a multiply
    /// and a shift, for any `n`). The shards' own maps hash with the same function and place
    /// an entry by the low bits (and tag it with the top 7), so these bits say nothing of
    /// where an entry sits in its shard.
    fn pick_of<Q: Hash + ?Sized>(&self, key: &Q, n: usize) -> usize {
        let bits = (self.pick.hash_one(key) >> 16) as u32;
        ((u64::from(bits) * n as u64) >> 32) as usize
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    /// The entry of `key` as the map stores it (its key too).
    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get_key_value(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Put `value` under `key`, replacing the key stored too (a key may carry more than what
    /// it is compared by); the value there before.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.shard_of(&key);
        let shard = Arc::make_mut(&mut self.shards[i]);
        let old = shard.remove(&key);
        shard.insert(key, value);
        if old.is_none() {
            self.len += 1;
            if self.len > self.shards.len() * PER_SHARD {
                self.grow();
            }
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let old = self.shard_holding(key)?.remove(key);
        self.len -= 1;
        old
    }

    /// The value under `key`, to change in place (the shard is copied if it is shared).
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard_holding(key)?.get_mut(key)
    }

    /// The shard holding `key`, made this version's own (copied if shared) to change; None,
    /// with nothing copied, when `key` is not there: looked up before copying, so removing or
    /// changing what is not there copies no shard.
    fn shard_holding<Q>(&mut self, key: &Q) -> Option<&mut FastMap<K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard_of(key);
        if !self.shards[i].contains_key(key) {
            return None;
        }
        Some(Arc::make_mut(&mut self.shards[i]))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// More shards (`FILL` entries each on average, about 1.4 times as many), every entry
    /// placed again.
    fn grow(&mut self) {
        let n = self.len.div_ceil(FILL).max(self.shards.len() + 1);
        let mut next: Vec<FastMap<K, V>> = (0..n)
            .map(|_| FastMap::with_capacity_and_hasher(SHARD_CAP, BuildFast::default()))
            .collect();
        for shard in std::mem::take(&mut self.shards) {
            let entries: Box<dyn Iterator<Item = (K, V)>> = match Arc::try_unwrap(shard) {
                Ok(map) => Box::new(map.into_iter()),
                Err(shared) => Box::new(
                    shared
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Vec<_>>()
                        .into_iter(),
                ),
            };
            for (k, v) in entries {
                next[self.pick_of(&k, n)].insert(k, v);
            }
        }
        self.shards = next.into_iter().map(Arc::new).collect();
    }
}

impl<K: Hash + Eq + Clone, V: Clone> FromIterator<(K, V)> for Shards<K, V> {
    /// The shards made at their final number and size up front: at 200,000 entries, growing
    /// one insert at a time placed every entry again at each of ten doublings.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let items: Vec<(K, V)> = iter.into_iter().collect();
        let n = items.len().div_ceil(FILL).max(1);
        let mut m = Shards::default();
        // A small map in one shard of its own size; a large one in shards of `SHARD_CAP`.
        let each = items.len().min(SHARD_CAP);
        let mut shards: Vec<FastMap<K, V>> = (0..n)
            .map(|_| FastMap::with_capacity_and_hasher(each, BuildFast::default()))
            .collect();
        for (k, v) in items {
            let shard = &mut shards[m.pick_of(&k, n)];
            // As `insert`: a key given twice keeps the later key and value.
            if shard.remove(&k).is_none() {
                m.len += 1;
            }
            shard.insert(k, v);
        }
        m.shards = shards.into_iter().map(Arc::new).collect();
        m
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shards<K, V> {
    /// How many shards two versions of a map share (tests: a change copies one).
    pub fn shared_with(&self, other: &Shards<K, V>) -> usize {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }

    /// How many shards the map has.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_one_shard_and_the_old_version_stays() {
        let mut a: Shards<u32, u32> = (0..100_000).map(|i| (i, i)).collect();
        assert_eq!(a.len(), 100_000);
        assert!(a.shard_count() >= 256);
        let before = a.clone();
        a.insert(7, 70);
        a.remove(&8);
        *a.get_mut(&9).unwrap() = 90;
        // Only the shards of 7, 8 and 9 were copied.
        let mut touched = [7u32, 8, 9].map(|k| a.shard_of(&k)).to_vec();
        touched.sort_unstable();
        touched.dedup();
        assert_eq!(a.shared_with(&before), a.shard_count() - touched.len());
        assert_eq!(before.get(&7), Some(&7));
        assert_eq!(before.get(&8), Some(&8));
        assert_eq!(a.get(&7), Some(&70));
        assert_eq!(a.get(&8), None);
        assert_eq!(a.get(&9), Some(&90));
        assert_eq!(a.len(), 99_999);
        assert_eq!(a.iter().count(), 99_999);
        assert!(a.remove(&8).is_none());
    }

    #[test]
    fn grows_while_shared() {
        let mut a: Shards<u32, u32> = Shards::default();
        let mut versions = Vec::new();
        for i in 0..5000 {
            a.insert(i, i);
            versions.push(a.clone());
        }
        assert_eq!(versions[10].len(), 11);
        assert_eq!(versions[10].get(&10), Some(&10));
        assert_eq!(versions[10].get(&11), None);
        assert!((0..5000).all(|i| a.get(&i) == Some(&i)));
    }
}
