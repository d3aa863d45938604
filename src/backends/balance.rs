//! Balancing: picking one of an app's targets, and connecting to one with failover.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::backends::backend::{connect_one, ActiveGuard, AllFailed};
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

/// Connect to one of `app`'s targets, trying at most `app.connect_attempts` distinct ones, each
/// given the whole `timeout`. The connection is counted on its target until the guard drops.
pub fn connect(app: &AppRoute, timeout: Duration) -> Result<(TcpStream, ActiveGuard), AllFailed> {
    let mut tried = Vec::with_capacity(app.connect_attempts);
    let mut failures = Vec::new();
    while tried.len() < app.connect_attempts {
        let Some(i) = pick(app, &tried) else { break };
        tried.push(i);
        let backend = &app.backends[i];
        // Count it before connecting, so concurrent picks (p2c) see the load it is about to add.
        let guard = ActiveGuard::new(Arc::clone(backend));
        match connect_one(&backend.target, timeout, &app.own) {
            Ok(stream) => {
                backend.connect_succeeded();
                return Ok((stream, guard));
            }
            Err(e) => {
                backend.connect_failed(&e);
                failures.push((Arc::clone(backend), e));
            }
        }
    }
    Err(AllFailed(failures))
}
