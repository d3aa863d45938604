//! The per-app families: client connections accepted, open, refused and waiting for a slot,
//! and the connect-time and connection-life histograms. Written for each app (labelled `app`)
//! or, past `--metrics-app-series`, once for all of them: the same families, one series each
//! without the `app` label holding the sum over every app (see `Scope`).

use std::sync::atomic::Ordering;

use super::{Apps, Family};
use crate::backends::histogram::{Histogram, BOUNDS};
use crate::backends::routing::AppStats;

/// Whose series the per-app families hold: each app's, labelled by its name; or every app's
/// summed into one series without the label. The sums keep the families' names, so that a
/// query that sums over apps (`sum(rate(flyproxy_app_connections_total[5m]))`, a histogram's
/// quantile `by (le)`) reads the same on either side of the bound.
pub(super) enum Scope<'a> {
    Each(&'a Apps<'a>),
    Summed(&'a Totals),
}

/// Every app's counters added up, read once per scrape: a few dozen atomic loads an app, no
/// formatting per app.
pub(super) struct Totals {
    /// The sums, in the shape of one app's counters.
    stats: AppStats,
    queued: usize,
    /// Apps that take new connections (not disabled through the admin socket).
    pub(super) enabled: usize,
}

impl Totals {
    pub(super) fn of(apps: &Apps) -> Totals {
        let t = AppStats::default();
        let (mut queued, mut enabled) = (0, 0);
        let add = |into: &std::sync::atomic::AtomicU64, from: &std::sync::atomic::AtomicU64| {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (app, _) in apps {
            let s = &app.stats;
            add(&t.accepted, &s.accepted);
            t.active
                .fetch_add(s.active.load(Ordering::Relaxed), Ordering::Relaxed);
            add(&t.limited, &s.limited);
            add(&t.failed, &s.failed);
            add(&t.client_limited, &s.client_limited);
            add(&t.refused_disabled, &s.refused_disabled);
            t.connect_time.add(&s.connect_time);
            t.duration.add(&s.duration);
            queued += app.limit.as_ref().map_or(0, |l| l.queued());
            enabled += usize::from(!s.disabled.load(Ordering::Relaxed));
        }
        Totals {
            stats: t,
            queued,
            enabled,
        }
    }
}

impl Scope<'_> {
    /// Calls `f` with each series' app (None for the sums), counters and queued connections.
    pub(super) fn each(&self, mut f: impl FnMut(Option<&str>, &AppStats, usize)) {
        match self {
            Scope::Each(apps) => {
                for (app, _) in *apps {
                    let queued = app.limit.as_ref().map_or(0, |l| l.queued());
                    f(Some(app.name()), &app.stats, queued);
                }
            }
            Scope::Summed(t) => f(None, &t.stats, t.queued),
        }
    }

    /// A family's help: as it is for each app, or saying that its one series is the sum.
    pub(super) fn help(&self, help: &str) -> String {
        match self {
            Scope::Each(_) => help.to_owned(),
            Scope::Summed(_) => format!(
                "{help} Here one series without the app label, the sum over every app: the config has more apps than --metrics-app-series (see flyproxy_app_series_omitted and /metrics?app=NAME)."
            ),
        }
    }
}

/// Client connections by app: accepted, open, refused, waiting for a slot; connect times and
/// connections' lives.
pub(super) fn families(out: &mut String, scope: &Scope<'_>) {
    macro_rules! per_app {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(out, $name, $kind, &scope.help($help));
            scope.each(|app, s, queued| {
                f.app_sample($name, app, &[], $get(s, queued));
            });
        }};
    }
    per_app!(
        "flyproxy_app_connections_total",
        "counter",
        "Client connections accepted, by app.",
        |s: &AppStats, _| s.accepted.load(Ordering::Relaxed)
    );
    per_app!(
        "flyproxy_app_connections_active",
        "gauge",
        "Client connections open now (connecting or relaying), by app.",
        |s: &AppStats, _| s.active.load(Ordering::Relaxed)
    );
    let name = "flyproxy_app_connections_refused_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        &scope.help("Client connections closed without a target: reason=\"connect_failed\" (no target answered), \"limit\" (the app's MaxConnections) or \"client_limit\" (the client address had its limit of connections open)."),
    );
    scope.each(|app, s, _| {
        for (reason, n) in [
            ("connect_failed", &s.failed),
            ("limit", &s.limited),
            ("client_limit", &s.client_limited),
        ] {
            f.app_sample(name, app, &[("reason", reason)], n.load(Ordering::Relaxed));
        }
    });
    per_app!(
        "flyproxy_app_queued",
        "gauge",
        "Client connections waiting now for a slot of the app's MaxConnections (0 for an app without it).",
        |_, queued: usize| queued
    );
    histogram(
        out,
        scope,
        "flyproxy_connect_duration_seconds",
        "Time to connect to the target a client connection was finally relayed to, its name's lookup included (targets that failed before it are not in it), by app.",
        |s| &s.connect_time,
    );
    histogram(
        out,
        scope,
        "flyproxy_connection_duration_seconds",
        "Client connections' whole life, from accept to close, by app (counted as they close; those refused at accept by a per-client limit are not).",
        |s| &s.duration,
    );
}

/// A histogram family with one histogram per app (or one of them all), its buckets cumulative
/// as the format asks.
fn histogram(
    out: &mut String,
    scope: &Scope<'_>,
    name: &str,
    help: &str,
    of: impl Fn(&AppStats) -> &Histogram,
) {
    let mut f = Family::head(out, name, "histogram", &scope.help(help));
    let bucket = format!("{name}_bucket");
    let sum = format!("{name}_sum");
    let count = format!("{name}_count");
    let les: Vec<String> = BOUNDS.iter().map(f64::to_string).collect();
    scope.each(|app, stats, _| {
        let s = of(stats).snapshot();
        for (le, n) in les.iter().zip(&s.cumulative) {
            f.app_sample(&bucket, app, &[("le", le.as_str())], n);
        }
        let total = s.cumulative[BOUNDS.len()];
        f.app_sample(&bucket, app, &[("le", "+Inf")], total);
        f.app_sample(&sum, app, &[], s.sum_seconds);
        f.app_sample(&count, app, &[], total);
    });
}
