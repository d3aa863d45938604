//! A target's counters of the connections made to it, kept apart from its `Backend` (see
//! `Traffic`).

use std::sync::atomic::AtomicU64;

/// How many kinds of failed connect are counted apart (`FAILURE_KINDS`, defined here
/// so that this file needs nothing of `backend`).
pub const FAILURE_KINDS: usize = 5;

/// A target's counters of the connections made to it. Apart from `Backend`, and allocated
/// at the first connect: an edge holds hundreds of thousands of apps, two targets each, and
/// most see few connections (72 bytes a target unused; an unused box costs 16).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections made to this target.
    pub connections: AtomicU64,
    /// Bytes delivered client to target, and target to client, counted as they move.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Failed connects by `ConnectError::index` (`crate::backends::backend::ConnectError`).
    pub failures: [AtomicU64; FAILURE_KINDS],
    /// Microseconds the connects to it that were used took, in all (with `connections`, their
    /// average, as the admin socket's `show targets` says).
    pub connect_us: AtomicU64,
}

/// What a target no connection was tried to has counted: nothing.
pub(super) static NO_TRAFFIC: Traffic = Traffic {
    connections: AtomicU64::new(0),
    bytes_up: AtomicU64::new(0),
    bytes_down: AtomicU64::new(0),
    failures: [const { AtomicU64::new(0) }; FAILURE_KINDS],
    connect_us: AtomicU64::new(0),
};
