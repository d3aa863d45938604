//! The program as seen from here: the network namespace it attaches to, and the byte layouts
//! of its maps as `steer.bpf.c` declares them (keys and values written from here must match
//! the C structs field for field).

use std::net::IpAddr;

use crate::config::prefix::Prefix;

/// The network namespace the program is attached to. `thread-self` rather than
/// `self`: a namespace belongs to a thread, and `/proc/self` names the thread-group
/// leader's. On the proxy's main thread the two are the same; in tests that
/// `unshare(CLONE_NEWNET)` on a worker thread only `thread-self` is right.
pub(super) const NETNS_PATH: &str = "/proc/thread-self/ns/net";

/// Keys of the `listeners` sockmap (LISTENER_V4/LISTENER_V6 in steer.bpf.c).
pub(super) const LISTENER_V4: u32 = 0;
pub(super) const LISTENER_V6: u32 = 1;

/// Indices of the per-CPU `stats` counters (enum stat in steer.bpf.c).
pub(super) const STAT_STEERED: u32 = 0;
pub(super) const STAT_DROPPED_NO_LISTENER: u32 = 1;
pub(super) const STAT_PASSED: u32 = 2;
pub(super) const STAT_DROPPED_ASSIGN: u32 = 3;

/// The `bind` map's value (struct bind_addr in steer.bpf.c): family, whether to match the
/// address, then the address in network order (IPv4, IPv6).
pub(super) fn bind_value(ip: IpAddr) -> [u8; 28] {
    let mut v = [0u8; 28];
    let (family, match_addr) = match ip {
        IpAddr::V4(a) => {
            v[8..12].copy_from_slice(&a.octets());
            (AF_INET, !a.is_unspecified())
        }
        IpAddr::V6(a) => {
            v[12..28].copy_from_slice(&a.octets());
            (AF_INET6, !a.is_unspecified())
        }
    };
    v[0..4].copy_from_slice(&family.to_ne_bytes());
    v[4..8].copy_from_slice(&u32::from(match_addr).to_ne_bytes());
    v
}

/// The `bindings` key of (prefix, port), as `struct binding_key` in steer.bpf.c: prefix length
/// in bits of what follows, the port as a host-order u32, then the address in network order,
/// IPv4 v4-mapped.
pub fn binding_key(prefix: Prefix, port: u16) -> [u8; 24] {
    let (addr, bits) = match prefix.addr() {
        IpAddr::V4(a) => (
            a.to_ipv6_mapped().octets(),
            96 + u32::from(prefix.prefix_len()),
        ),
        IpAddr::V6(a) => (a.octets(), u32::from(prefix.prefix_len())),
    };
    let mut k = [0u8; 24];
    k[0..4].copy_from_slice(&(32 + bits).to_ne_bytes());
    k[4..8].copy_from_slice(&u32::from(port).to_ne_bytes());
    k[8..24].copy_from_slice(&addr);
    k
}

/// The `hosts` key of (prefix, port), as `struct host_key` in steer.bpf.c, if `prefix` is one
/// address exactly (an IPv4 /32, an IPv6 /128): `binding_key` without its prefix length. None:
/// a shorter prefix, which goes in the `bindings` trie.
pub fn host_key(prefix: Prefix, port: u16) -> Option<[u8; 20]> {
    let full = if prefix.is_v4() { 32 } else { 128 };
    if prefix.prefix_len() != full {
        return None;
    }
    let mut k = [0u8; 20];
    k.copy_from_slice(&binding_key(prefix, port)[4..]);
    Some(k)
}

/// The `bindings` (and `hosts`) value, as `struct binding`: the port group and the prefix's family.
pub(super) fn binding_value(prefix: Prefix, group: u32) -> [u8; 8] {
    let family = if prefix.is_v4() { AF_INET } else { AF_INET6 };
    let mut v = [0u8; 8];
    v[0..4].copy_from_slice(&group.to_ne_bytes());
    v[4..8].copy_from_slice(&family.to_ne_bytes());
    v
}

/// Address families as the program compares them (ctx->family).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
