//! The per-app families: client connections accepted, open, refused and waiting for a slot,
//! and the connect-time and connection-life histograms.

use std::sync::atomic::Ordering;

use super::{Apps, Family};
use crate::backends::histogram::{Histogram, BOUNDS};
use crate::backends::routing::AppStats;

/// Client connections by app: accepted, open, refused, waiting for a slot; connect times and
/// connections' lives.
pub(super) fn families(out: &mut String, apps: &Apps) {
    macro_rules! per_app {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(out, $name, $kind, $help);
            for (app, _) in apps {
                f.sample($name, &[("app", app.name.as_str())], $get(&app.stats));
            }
        }};
    }
    per_app!(
        "flyproxy_app_connections_total",
        "counter",
        "Client connections accepted, by app.",
        |s: &AppStats| s.accepted.load(Ordering::Relaxed)
    );
    per_app!(
        "flyproxy_app_connections_active",
        "gauge",
        "Client connections open now (connecting or relaying), by app.",
        |s: &AppStats| s.active.load(Ordering::Relaxed)
    );
    let name = "flyproxy_app_connections_refused_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Client connections closed without a target: reason=\"connect_failed\" (no target answered), \"limit\" (the app's MaxConnections) or \"client_limit\" (the client address had its limit of connections open).",
    );
    for (app, _) in apps {
        let s = &app.stats;
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "connect_failed")],
            s.failed.load(Ordering::Relaxed),
        );
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "limit")],
            s.limited.load(Ordering::Relaxed),
        );
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "client_limit")],
            s.client_limited.load(Ordering::Relaxed),
        );
    }
    let name = "flyproxy_app_queued";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Client connections waiting now for a slot of the app's MaxConnections (0 for an app without it).",
    );
    for (app, _) in apps {
        let queued = app.limit.as_ref().map_or(0, |l| l.queued());
        f.sample(name, &[("app", app.name.as_str())], queued);
    }
    histogram(
        out,
        apps,
        "flyproxy_connect_duration_seconds",
        "Time to connect to the target a client connection was finally relayed to, its name's lookup included (targets that failed before it are not in it), by app.",
        |s| &s.connect_time,
    );
    histogram(
        out,
        apps,
        "flyproxy_connection_duration_seconds",
        "Client connections' whole life, from accept to close, by app (counted as they close; those refused at accept by a per-client limit are not).",
        |s| &s.duration,
    );
}

/// A histogram family with one histogram per app, its buckets cumulative as the format asks.
fn histogram(
    out: &mut String,
    apps: &Apps,
    name: &str,
    help: &str,
    of: impl Fn(&AppStats) -> &Histogram,
) {
    let mut f = Family::head(out, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    let sum = format!("{name}_sum");
    let count = format!("{name}_count");
    let les: Vec<String> = BOUNDS.iter().map(f64::to_string).collect();
    for (app, _) in apps {
        let app_name = app.name.as_str();
        let s = of(&app.stats).snapshot();
        for (le, n) in les.iter().zip(&s.cumulative) {
            f.sample(&bucket, &[("app", app_name), ("le", le.as_str())], n);
        }
        let total = s.cumulative[BOUNDS.len()];
        f.sample(&bucket, &[("app", app_name), ("le", "+Inf")], total);
        f.sample(&sum, &[("app", app_name)], s.sum_seconds);
        f.sample(&count, &[("app", app_name)], total);
    }
}
