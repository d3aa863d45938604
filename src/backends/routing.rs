//! Routing: which app a frontend port belongs to, and what that app routes to (its backends,
//! balancing, limit, PROXY protocol).
//!
//! A `Routes` is built whole from a validated `Config` and replaced whole on reload; it is owned
//! by the listener loop, which looks the port up at accept and hands the app (an `Arc`) to the
//! relay thread. A connection keeps the app it was accepted with, so a reload never changes the
//! target of a connection already open; the next connection sees the new targets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::loops::Frontends;
use crate::backends::backend::Backend;
use crate::config::{Balance, Config, ProxyProtocol, Target};

#[derive(Debug)]
pub struct AppRoute {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub balance: Balance,
    pub connect_attempts: usize,
    pub limit: Option<Arc<AppLimit>>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Round-robin position.
    pub next: AtomicUsize,
    /// This proxy's own frontends in the config of this route: a target resolving to one of
    /// them is a loop.
    pub own: Arc<Frontends>,
    pub stats: Arc<AppStats>,
}

/// Per-app counters, kept across reloads while the app stays.
#[derive(Debug, Default)]
pub struct AppStats {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now (connecting or relaying).
    pub active: AtomicUsize,
    /// Closed because the app's MaxConnections stayed reached.
    pub limited: AtomicU64,
    /// Closed because no target could be connected.
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub struct Routes {
    by_port: HashMap<u16, Arc<AppRoute>>,
    /// Per (app, target), reused by the next `Routes` so that health and load survive a reload.
    backends: HashMap<(String, Target), Arc<Backend>>,
    /// Per app, reused likewise so connections open across a reload still count.
    limits: HashMap<String, Arc<AppLimit>>,
    stats: HashMap<String, Arc<AppStats>>,
    /// Every app with its ports, in config order, for metrics and status.
    apps: Vec<(Arc<AppRoute>, Vec<u16>)>,
}

impl Routes {
    /// Build the table for `config`, keeping the state of `previous` for what remains.
    pub fn new(config: &Config, previous: Option<&Routes>) -> Routes {
        let mut backends = HashMap::new();
        let mut limits = HashMap::new();
        let mut stats = HashMap::new();
        let mut apps = Vec::with_capacity(config.apps.len());
        let mut by_port = HashMap::with_capacity(config.ports().count());
        let own = Arc::new(Frontends::new(config));
        for app in &config.apps {
            let app_backends = app
                .targets
                .iter()
                .map(|t| {
                    let key = (app.name.clone(), t.clone());
                    // A target listed twice in one app is one backend with two turns.
                    if let Some(b) = backends.get(&key) {
                        return Arc::clone(b);
                    }
                    let b = match previous.and_then(|p| p.backends.get(&key)) {
                        Some(b) => {
                            *b.check.lock().unwrap_or_else(|e| e.into_inner()) = app.health;
                            Arc::clone(b)
                        }
                        None => Arc::new(Backend::new(&app.name, t.clone(), app.health)),
                    };
                    backends.insert(key, Arc::clone(&b));
                    b
                })
                .collect();
            let limit = app.max_connections.map(|max| {
                let l = match previous.and_then(|p| p.limits.get(&app.name)) {
                    Some(l) => Arc::clone(l),
                    None => Arc::new(AppLimit::default()),
                };
                l.set_max(max);
                limits.insert(app.name.clone(), Arc::clone(&l));
                l
            });
            let app_stats = previous
                .and_then(|p| p.stats.get(&app.name).cloned())
                .unwrap_or_default();
            stats.insert(app.name.clone(), Arc::clone(&app_stats));
            let route = Arc::new(AppRoute {
                name: app.name.clone(),
                backends: app_backends,
                balance: app.balance,
                connect_attempts: app.connect_attempts,
                limit,
                proxy_protocol: app.proxy_protocol,
                next: AtomicUsize::new(0),
                own: Arc::clone(&own),
                stats: app_stats,
            });
            for &port in &app.ports {
                by_port.insert(port, Arc::clone(&route));
            }
            apps.push((route, app.ports.clone()));
        }
        Routes {
            by_port,
            backends,
            limits,
            stats,
            apps,
        }
    }

    pub fn app_for(&self, port: u16) -> Option<&Arc<AppRoute>> {
        self.by_port.get(&port)
    }

    /// Every app with its ports, in config order.
    pub fn apps(&self) -> &[(Arc<AppRoute>, Vec<u16>)] {
        &self.apps
    }

    /// Every backend, for the health checker.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.values().cloned().collect()
    }
}

/// An app's `MaxConnections`: a counting semaphore. A connection over the limit waits for a
/// slot (its relay thread blocks, holding one of the global slots, so the global bound still
/// holds) and gives up after the connect timeout; other apps are served meanwhile.
#[derive(Debug, Default)]
pub struct AppLimit {
    state: Mutex<LimitState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct LimitState {
    max: usize,
    used: usize,
}

impl AppLimit {
    fn set_max(&self, max: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).max = max;
        // A raised limit may let waiters in.
        self.freed.notify_all();
    }

    /// Take a slot, waiting up to `timeout`; None if none came free in time, or if
    /// `cancelled` says the connection was cut meanwhile (checked every `CANCEL_CHECK`).
    pub fn acquire(
        self: &Arc<Self>,
        timeout: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Option<LimitGuard> {
        const CANCEL_CHECK: Duration = Duration::from_millis(50);
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.used >= st.max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || cancelled() {
                return None;
            }
            st = self
                .freed
                .wait_timeout(st, left.min(CANCEL_CHECK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.used += 1;
        Some(LimitGuard(Arc::clone(self)))
    }
}

/// Holds one of an app's slots until dropped.
pub struct LimitGuard(Arc<AppLimit>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).used -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn state_survives_a_reload() {
        let c1 = Config::parse(
            Path::new("x"),
            br#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1","h:2"],"MaxConnections":1}]}"#,
        )
        .unwrap();
        let c2 = Config::parse(
            Path::new("x"),
            br#"{"Apps":[{"Name":"a","Ports":[2],"Targets":["h:2","h:3"],"MaxConnections":1},
                         {"Name":"b","Ports":[3],"Targets":["h:2"]}]}"#,
        )
        .unwrap();
        let r1 = Routes::new(&c1, None);
        let r2 = Routes::new(&c2, Some(&r1));
        let kept = &r1.app_for(1).unwrap().backends[1];
        assert!(Arc::ptr_eq(kept, &r2.app_for(2).unwrap().backends[0]));
        // Another app naming the same target has its own state.
        assert!(!Arc::ptr_eq(kept, &r2.app_for(3).unwrap().backends[0]));
        assert!(r2.app_for(1).is_none());
        // A slot taken before the reload still counts after it.
        let held = r1
            .app_for(1)
            .unwrap()
            .limit
            .as_ref()
            .unwrap()
            .acquire(Duration::ZERO, || false);
        assert!(held.is_some());
        let l2 = r2.app_for(2).unwrap().limit.as_ref().unwrap();
        assert!(l2.acquire(Duration::from_millis(10), || false).is_none());
        drop(held);
        assert!(l2.acquire(Duration::ZERO, || false).is_some());
    }
}
