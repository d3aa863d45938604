//! The `show` commands' answers: one line per app, target or connection, as `key=value` words
//! (values never hold a space, except `why`, which is quoted), so that they read at a glance
//! and split with `grep` and `awk`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::routing::Routes;
use crate::metrics::Published;
use crate::relay::conns::{Conns, OpenConn};
use crate::sys::log::Timestamp;

/// `show conns` lists at most this many (each line is about 150 bytes): past it, the answer
/// says how many more there are and how to narrow the list.
pub(super) const MAX_CONNS_LISTED: usize = 10_000;

/// `show apps`: name, ports, enabled or disabled, open, queued, total, refused while disabled.
pub(super) fn apps(routes: &Routes) -> String {
    let mut out = String::new();
    for (app, ports) in routes.apps() {
        let s = &app.stats;
        let state = if s.disabled.load(Ordering::Relaxed) {
            "disabled"
        } else {
            "enabled"
        };
        let _ = writeln!(
            out,
            "app={} ports={} state={state} open={} queued={} total={} refused_disabled={}",
            app.name(),
            port_ranges(ports),
            s.active.load(Ordering::Relaxed),
            app.limit.as_ref().map_or(0, |l| l.queued()),
            s.accepted.load(Ordering::Relaxed),
            s.refused_disabled.load(Ordering::Relaxed),
        );
    }
    out
}

/// `show targets [APP]`: each target's state, health (since when, and the last error), weight,
/// backup, open and total connections, failed connects and the average connect time.
pub(super) fn targets(routes: &Routes, only: Option<&str>) -> String {
    let mut out = String::new();
    for (app, _) in routes.apps() {
        if only.is_some_and(|n| n != app.name()) {
            continue;
        }
        let mut seen: Vec<*const crate::backends::backend::Backend> = Vec::new();
        for b in &app.backends {
            // A target listed twice is one backend with two turns: shown once.
            if seen.contains(&Arc::as_ptr(b)) {
                continue;
            }
            seen.push(Arc::as_ptr(b));
            let total = b.traffic_seen().connections.load(Ordering::Relaxed);
            let failures: u64 = b
                .traffic_seen()
                .failures
                .iter()
                .map(|f| f.load(Ordering::Relaxed))
                .sum();
            let avg_ms = match total {
                0 => 0.0,
                n => b.traffic_seen().connect_us.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0,
            };
            let _ = write!(
                out,
                "app={} target={} state={} health={} since={}",
                app.name(),
                b.target,
                b.state().as_str(),
                if b.is_up() { "up" } else { "down" },
                Timestamp::from_unix_ms(b.changed_ms.load(Ordering::Relaxed)),
            );
            if let Some(why) = b.last_error() {
                let _ = write!(out, " why={why:?}");
            }
            let _ = writeln!(
                out,
                " weight={} backup={} open={} total={total} failures={failures} connect_avg_ms={avg_ms:.3}",
                b.weight(),
                if b.backup() { "yes" } else { "no" },
                b.active.load(Ordering::Relaxed),
            );
        }
    }
    out
}

/// The connections `show conns`, `kill conns` and the like mean: of app `app` (all if None),
/// to target `target` (any if None).
pub(super) fn select(conns: &Conns, app: Option<&str>, target: Option<&str>) -> Vec<Arc<OpenConn>> {
    // The app first: comparing a target means writing it out.
    conns.select(|c| {
        app.is_none_or(|n| c.app.get().is_some_and(|a| a.name() == n))
            && target.is_none_or(|t| c.target.get().is_some_and(|b| b.target.to_string() == t))
    })
}

/// `show conns [APP [TARGET]]`: id, app, client, port, target, phase, age, idle time and the
/// bytes moved each way, oldest first.
pub(super) fn conns(open: &[Arc<OpenConn>]) -> String {
    let now = Instant::now();
    let mut out = String::new();
    for c in open.iter().take(MAX_CONNS_LISTED) {
        let (up, down) = c.bytes();
        let _ = writeln!(
            out,
            "id={} app={} client={} port={} target={} phase={} age={} idle={} up={up} down={down}",
            c.id,
            c.app.get().map_or("-", |a| a.name()),
            c.peer,
            c.port,
            c.target
                .get()
                .map_or_else(|| "-".to_owned(), |b| b.target.to_string()),
            c.phase().as_str(),
            secs(now.saturating_duration_since(c.accepted)),
            secs(c.idle(now)),
        );
    }
    if open.len() > MAX_CONNS_LISTED {
        let _ = writeln!(
            out,
            "... {} more not listed: narrow with show conns APP [TARGET]",
            open.len() - MAX_CONNS_LISTED
        );
    }
    out
}

/// `show config`: the file, its hash, when it was loaded, and what it holds.
pub(super) fn config(published: &Published, path: &std::path::Path) -> String {
    let routes = published.routes();
    let hashes = published.config_hashes();
    let apps = routes.apps();
    let mut ports: Vec<u16> = apps.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    ports.sort_unstable();
    ports.dedup();
    let targets: usize = apps.iter().map(|(a, _)| a.backends.len()).sum();
    let mut out = format!(
        "path={} sha256={} loaded={} apps={} ports={} targets={targets} reloads_ok={} reloads_rejected={}",
        path.display(),
        hashes.running,
        Timestamp::from_unix_ms(published.last_reload_ok_ms.load(Ordering::Relaxed)),
        apps.len(),
        ports.len(),
        published.reloads_ok.load(Ordering::Relaxed),
        published.reloads_rejected.load(Ordering::Relaxed),
    );
    if let Some(r) = hashes.rejected {
        let _ = write!(out, " rejected_sha256={r}");
    }
    out.push('\n');
    out
}

/// Seconds with a tenth, as `12.3s`.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Ports as `80,443,8000-8099`.
fn port_ranges(ports: &[u16]) -> String {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_as_ranges() {
        assert_eq!(
            port_ranges(&[443, 80, 8001, 8000, 8002, 80]),
            "80,443,8000-8002"
        );
        assert_eq!(port_ranges(&[]), "");
        assert_eq!(port_ranges(&[65534, 65535]), "65534-65535");
    }
}
