//! The bounds a config is held to, where they are checked and where problems name them.

/// Longest app name accepted.
pub const NAME_MAX: usize = 64;

/// At most this many (address prefix, port) pairs, counted per app (an app without Addresses
/// counts two prefixes per port: every IPv4 and every IPv6 address). It is the size of bpf
/// mode's bindings map (`max_entries` of `bindings` in steer.bpf.c): a config past it could
/// only be applied in part there. It also bounds what validating a small file can cost: a
/// few lines of ranges times addresses would otherwise build millions of entries.
pub const MAX_BINDINGS: usize = 1 << 20;

/// The most of a config file that is read: it stops a path that points at something endless
/// (`/dev/zero`, a file still growing) from growing the read without bound. 200,000 apps of
/// `make scale` (each with two addresses, 1-3 ports and two targets) are 29.8 MB in one file:
/// the cap was 16 MiB (about 122,000 such apps) and is 64 MiB, about 450,000 of them, past
/// what `MAX_BINDINGS` admits (about 260,000: an app's addresses times its ports), so that
/// bound, not the file's size, is what a large single file meets first. The proxy, the
/// follower and `flyproxy check` read through this one bound, so they agree. What it costs:
/// the bytes while they are parsed, and what the parse builds from them (see
/// `raw::RawConfig`); a file of nothing but empty entries (`[],[],...`) is the worst, see the
/// README's figures.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
