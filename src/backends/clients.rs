//! Per-client connection counts, for `--max-connections-per-client` and an app's
//! `MaxConnectionsPerClient`: how many connections each client address has open, so that one
//! address cannot take every slot of the bound with idle connections.
//!
//! A count is taken by the listener loop at accept (before a slot or a relay thread is spent)
//! and given back when the connection's [`ClientSlot`] drops, which happens on every way a
//! connection ends: its relay thread finishing, a panic unwinding it, a job the pool could not
//! take. The accept path is hot, so the table is split into shards by address, each behind its
//! own mutex: the loop and a relay thread releasing a slot only meet on the same shard, and a
//! lock is held for one map operation. Without a limit in force nothing is counted at all.
//!
//! IPv6 clients are counted by their /64 prefix: a single host is routinely given a whole /64,
//! so counting single addresses would let one host open a limit's worth from each of them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of the table; a power of two.
const SHARDS: usize = 16;

/// What a client is counted by: an IPv4 address, or the first 64 bits of an IPv6 one (IPv4
/// clients of a dual-stack listener, seen as IPv4-mapped IPv6, count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Net(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(a) => ClientKey::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6Net((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// Open connections per client, under one limit.
#[derive(Debug)]
pub struct ClientCounts {
    /// Changed in place by a reload, so that connections open across it still count.
    limit: AtomicUsize,
    shards: [Mutex<HashMap<ClientKey, usize>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl ClientCounts {
    /// Counts limited to `limit` connections per client (at least 1).
    pub fn new(limit: usize) -> Arc<ClientCounts> {
        Arc::new(ClientCounts {
            limit: AtomicUsize::new(limit.max(1)),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: Default::default(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A new limit (a reload): connections open over it stay, new ones wait for the count to
    /// fall under it.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, HashMap<ClientKey, usize>> {
        // Every critical section is one map operation: a poisoned shard is still whole.
        self.shards[self.hasher.hash_one(key) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Count one more connection of `key`, or None if it already has `limit` open.
    pub fn acquire(self: &Arc<Self>, key: ClientKey) -> Option<ClientSlot> {
        let mut shard = self.shard(&key);
        let n = shard.entry(key).or_insert(0);
        if *n >= self.limit() {
            return None;
        }
        *n += 1;
        drop(shard);
        Some(ClientSlot {
            counts: Arc::clone(self),
            key,
        })
    }

    /// Connections `key` has open now.
    pub fn open(&self, key: ClientKey) -> usize {
        self.shard(&key).get(&key).copied().unwrap_or(0)
    }

    /// Clients with a connection open (for tests and status).
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// One counted connection; dropping it gives the count back (and forgets a client whose count
/// reaches zero, so the table holds only clients with something open).
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    key: ClientKey,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut shard = self.counts.shard(&self.key);
        if let Some(n) = shard.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_per_client_and_release() {
        let c = ClientCounts::new(2);
        let a = ClientKey::of("10.0.0.1".parse().unwrap());
        let b = ClientKey::of("10.0.0.2".parse().unwrap());
        let s1 = c.acquire(a).unwrap();
        let s2 = c.acquire(a).unwrap();
        assert!(c.acquire(a).is_none());
        let _other = c.acquire(b).unwrap();
        drop(s1);
        let s3 = c.acquire(a).unwrap();
        drop((s2, s3));
        assert_eq!(c.open(a), 0);
        assert_eq!(c.clients(), 1);
    }

    #[test]
    fn keys() {
        let mapped = ClientKey::of("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, ClientKey::of("10.0.0.1".parse().unwrap()));
        assert_eq!(
            ClientKey::of("2001:db8::1".parse().unwrap()),
            ClientKey::of("2001:db8::ffff:2".parse().unwrap())
        );
        assert_ne!(
            ClientKey::of("2001:db8::1".parse().unwrap()),
            ClientKey::of("2001:db8:0:1::1".parse().unwrap())
        );
    }
}
