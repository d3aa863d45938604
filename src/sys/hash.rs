//! `Fast`: a quick hasher for the proxy's own maps, those whose keys come from the config
//! (app names, file names, address prefixes, ports) and never from a peer.
//!
//! The standard `RandomState` (SipHash-1-3 with a random key) resists HashDoS: a peer who
//! chooses keys cannot make them collide. Nobody but the operator chooses these keys, and the
//! operator can already make the proxy do any amount of work, so that protection buys nothing
//! here, while SipHash was a large part of a start with 200,000 apps (every app's name, file
//! and prefix hashed into several maps). Maps keyed by what a peer sends (client addresses,
//! server names) keep `RandomState`.
//!
//! The mixing is rustc-hash's (multiply-rotate over 8-byte words, as rustc hashes its own
//! tables), with a final avalanche so that the top bits, which hashbrown's control bytes use,
//! depend on every input bit.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` hashed with [`Fast`] (keys from the config only: see the module doc).
pub type FastMap<K, V> = HashMap<K, V, BuildFast>;

/// A `HashSet` hashed with [`Fast`] (keys from the config only: see the module doc).
pub type FastSet<K> = HashSet<K, BuildFast>;

/// Builds [`Fast`] hashers; every map gets the same function (no random key).
pub type BuildFast = BuildHasherDefault<Fast>;

/// The hasher (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct Fast {
    hash: u64,
}

/// An odd constant with bits spread evenly (rustc-hash 2's).
const K: u64 = 0xf135_7aea_2e62_a9c5;

impl Fast {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(26) ^ word).wrapping_mul(K);
    }
}

impl Hasher for Fast {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.add(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            // The length in the top byte: "a" and "a\0" differ.
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // murmur3's fmix64: every output bit depends on every input bit.
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn close_keys_hash_apart() {
        let b = BuildFast::default();
        let names: FastSet<u64> = (0..100_000)
            .map(|i| b.hash_one(format!("app-{i:06}")))
            .collect();
        assert_eq!(names.len(), 100_000);
        assert_ne!(
            b.hash_one([0u8; 1].as_slice()),
            b.hash_one([0u8; 2].as_slice())
        );
        // The top 7 bits (hashbrown's control bytes) take many values over neighbouring keys.
        let tops: FastSet<u64> = (0u32..1000).map(|i| b.hash_one(i) >> 57).collect();
        assert!(tops.len() > 100, "{}", tops.len());
    }
}
