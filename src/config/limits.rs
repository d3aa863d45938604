//! The bounds a config is held to, where they are checked and where problems name them.

/// Longest app name accepted.
pub const NAME_MAX: usize = 64;

/// At most this many (address prefix, port) pairs, counted per app (an app without Addresses
/// counts two prefixes per port: every IPv4 and every IPv6 address). It is the size of bpf
/// mode's bindings map (`max_entries` of `bindings` in steer.bpf.c): a config past it could
/// only be applied in part there. It also bounds what validating a small file can cost: a
/// few lines of ranges times addresses would otherwise build millions of entries.
pub const MAX_BINDINGS: usize = 1 << 20;

/// The most of a config file that is read. A 10,000-port config is about 100 KiB; the cap is
/// far above any real file and stops a path that points at something endless (`/dev/zero`,
/// a file still growing) from growing the read without bound.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
