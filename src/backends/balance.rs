//! Balancing: picking one of an app's targets (connecting to it, with failover, is `dial`'s).

use std::sync::atomic::Ordering;

use rand::Rng;

use crate::backends::routing::AppRoute;
use crate::config::Balance;

/// Pick the next target to try for `app`, skipping those in `tried` (indexes into
/// `app.backends`). Healthy targets first; when none is left, the down ones: an app whose
/// targets all look down is still tried (fail open) rather than refused outright.
pub fn pick(app: &AppRoute, tried: &[usize]) -> Option<usize> {
    let n = app.backends.len();
    let untried = |i: &usize| !tried.contains(i);
    let mut pool: Vec<usize> = (0..n)
        .filter(untried)
        .filter(|&i| app.backends[i].is_up())
        .collect();
    if pool.is_empty() {
        pool = (0..n).filter(untried).collect();
    }
    let mut rng = rand::rng();
    match (pool.len(), app.balance) {
        (0, _) => None,
        (1, _) => Some(pool[0]),
        (len, Balance::Random) => Some(pool[rng.random_range(0..len)]),
        (len, Balance::RoundRobin) => Some(pool[app.next.fetch_add(1, Ordering::Relaxed) % len]),
        (len, Balance::P2c) => {
            let a = rng.random_range(0..len);
            // A second pick distinct from the first.
            let b = (a + rng.random_range(1..len)) % len;
            let load = |i: usize| app.backends[pool[i]].active.load(Ordering::Relaxed);
            Some(pool[if load(b) < load(a) { b } else { a }])
        }
    }
}
