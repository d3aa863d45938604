//! The /metrics text: the Prometheus text exposition format 0.0.4, one family after another.
//! The per-app families are `apps`'s, the per-target ones `targets`'s, the runtime state's
//! (what the admin socket set) `runtime`'s. Per-target series (the runtime state's per-target
//! family with them) are served while the config has at most `--metrics-target-series` targets
//! (see `SeriesCap`); per-app series while it has at most `--metrics-app-series` apps, past
//! that one series of every app's sum in each per-app family (see `apps::Scope`).
//! `render_app` serves one app's series, its targets' always included.

mod apps;
mod runtime;
mod targets;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backends::backend::Backend;
use crate::backends::resolver::Resolver;
use crate::backends::routing::{AppRoute, Unrouted};
use crate::metrics::process::ProcessStats;
use crate::metrics::LookupReader;
use crate::metrics::{Published, Sources};
use crate::relay::slots::Slots;
use apps::Scope;

/// An app's backends, each once: a target listed twice is one backend with two turns, and
/// must be one series (a duplicate series makes Prometheus reject the whole scrape).
pub(super) fn unique_backends(app: &AppRoute) -> Vec<&Arc<Backend>> {
    let mut seen: Vec<&Arc<Backend>> = Vec::with_capacity(app.backends.len());
    for b in &app.backends {
        if !seen.iter().any(|s| Arc::ptr_eq(s, b)) {
            seen.push(b);
        }
    }
    seen
}

/// A label value escaped as the exposition format asks (backslash, double quote, newline),
/// appended to `out`: a scrape writes hundreds of thousands of them, so without a copy.
fn push_esc(out: &mut String, v: &str) {
    if !v.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes one metric family: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.sample_with(name, labels.iter().copied(), value);
    }

    /// A sample labelled `app` first if it has one (None: a sum over every app), then `extra`.
    fn app_sample(
        &mut self,
        name: &str,
        app: Option<&str>,
        extra: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        let labels = app.map(|a| ("app", a)).into_iter();
        self.sample_with(name, labels.chain(extra.iter().copied()), value);
    }

    fn sample_with<'l>(
        &mut self,
        name: &str,
        labels: impl Iterator<Item = (&'l str, &'l str)>,
        value: impl std::fmt::Display,
    ) {
        self.out.push_str(name);
        let mut labels = labels.peekable();
        if labels.peek().is_some() {
            self.out.push('{');
            for (i, (k, v)) in labels.enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                push_esc(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The whole exposition, from the current routing table and counters.
pub fn render(sources: &Sources) -> String {
    let Sources {
        published,
        slots,
        lookups,
        resolver,
        target_series: cap,
        app_series,
    } = sources;
    let routes = published.routes();
    let apps = &routes.apps()[..];
    let mut out = String::with_capacity(4096);
    build_info(&mut out);
    let sum_apps = apps.len() > app_series.max;
    let totals = sum_apps.then(|| apps::Totals::of(apps));
    let scope = match &totals {
        Some(t) => Scope::Summed(t),
        None => Scope::Each(apps),
    };
    apps::families(&mut out, &scope);
    if sum_apps {
        omitted_apps_family(&mut out, apps.len());
    }
    if app_series.started_omitting(sum_apps) {
        crate::info!(
            "metrics: the config has {} apps, more than --metrics-app-series {}: per-app series \
             are left out of /metrics, each per-app family is one series of every app's sum \
             (flyproxy_app_series_omitted says how many apps); /metrics?app=NAME serves one app's",
            apps.len(),
            app_series.max
        );
    }
    let targets = apps.iter().map(|(app, _)| unique_backends(app).len()).sum();
    let omit = targets > cap.max;
    if omit {
        omitted_family(&mut out, targets);
    } else {
        targets::families(&mut out, apps);
        runtime::target_families(&mut out, apps);
    }
    runtime::app_families(&mut out, &scope);
    if cap.started_omitting(omit) {
        crate::info!(
            "metrics: the config has {targets} targets, more than --metrics-target-series {}: \
             per-target series are left out of /metrics (flyproxy_target_series_omitted says \
             how many targets); /metrics?app=NAME serves one app's",
            cap.max
        );
    }
    reload_families(&mut out, published);
    rejected_file_families(&mut out, published);
    bound_families(&mut out, slots, published);
    log_families(&mut out);
    dns_families(&mut out, resolver);
    unrouted_families(&mut out, apps, published);
    if let Some(read) = lookups {
        lookup_families(&mut out, read);
    }
    process_families(&mut out, &crate::metrics::process::read());
    out
}

/// Every series of the app named `name` (its per-target ones whatever the cap); None if no app
/// in force has that name.
pub fn render_app(sources: &Sources, name: &str) -> Option<String> {
    let routes = sources.published.routes();
    let one = &[routes.app(name)?][..];
    let mut out = String::with_capacity(16 * 1024);
    apps::families(&mut out, &Scope::Each(one));
    targets::families(&mut out, one);
    runtime::target_families(&mut out, one);
    runtime::app_families(&mut out, &Scope::Each(one));
    Some(out)
}

/// Apps in force, each with its ports.
type Apps<'a> = [(&'a Arc<AppRoute>, &'a [u16])];

/// In place of the per-target families: how many targets' series were left out.
fn omitted_family(out: &mut String, targets: usize) {
    let name = "flyproxy_target_series_omitted";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Targets whose per-target series this scrape leaves out: the config has more targets than --metrics-target-series (see /metrics?app=NAME). Absent when none is left out.",
    );
    f.sample(name, &[], targets);
}

/// With the per-app families summed: how many apps' series were left out.
fn omitted_apps_family(out: &mut String, apps: usize) {
    let name = "flyproxy_app_series_omitted";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Apps whose per-app series this scrape leaves out, each per-app family holding one series of every app's sum: the config has more apps than --metrics-app-series (see /metrics?app=NAME). Absent when none is left out.",
    );
    f.sample(name, &[], apps);
}

fn build_info(out: &mut String) {
    let mut f = Family::head(out, "flyproxy_build_info", "gauge", "The running version.");
    f.sample("flyproxy_build_info", &[("version", crate::VERSION)], 1);
}

/// How config reloads went.
fn reload_families(out: &mut String, published: &Published) {
    let name = "flyproxy_reloads_total";
    let mut f = Family::head(out, name, "counter", "Config reloads, by result.");
    f.sample(
        name,
        &[("result", "ok")],
        published.reloads_ok.load(Ordering::Relaxed),
    );
    f.sample(
        name,
        &[("result", "rejected")],
        published.reloads_rejected.load(Ordering::Relaxed),
    );
    let name = "flyproxy_config_last_reload_success_timestamp_seconds";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Unix time of the last config load or reload that was applied.",
    );
    f.sample(
        name,
        &[],
        published.last_reload_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0,
    );
    let hashes = published.config_hashes();
    let name = "flyproxy_config_info";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "The config in force, named by the SHA-256 of its file's bytes (compare across a fleet).",
    );
    f.sample(name, &[("sha256", hashes.running.as_str())], 1);
    if let Some(rejected) = &hashes.rejected {
        let name = "flyproxy_config_rejected_info";
        let mut f = Family::head(
            out,
            name,
            "gauge",
            "The last config file rejected since the one in force was loaded, by SHA-256.",
        );
        f.sample(name, &[("sha256", rejected.as_str())], 1);
    }
}

/// Directory mode (`-c DIR`): the config files refused now, and refusals since start.
fn rejected_file_families(out: &mut String, published: &Published) {
    if !published.directory.load(Ordering::Relaxed) {
        return;
    }
    let name = "flyproxy_config_files_rejected";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Files of the config directory refused now (each listed with its problems in /status).",
    );
    f.sample(name, &[], published.rejected_files().len());
    let name = "flyproxy_config_file_rejections_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Times a file of the config directory was refused (a file refused again after a change counts again).",
    );
    f.sample(name, &[], published.file_rejections.load(Ordering::Relaxed));
}

/// The connection bound and how full it is.
fn bound_families(out: &mut String, slots: &Slots, published: &Published) {
    let name = "flyproxy_connections_limit";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "The connection bound in force (--max-connections, lowered to fit the open-file limit).",
    );
    f.sample(name, &[], slots.max());
    let name = "flyproxy_connections_open";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Client connections holding a slot of the bound now.",
    );
    f.sample(name, &[], slots.taken());
    let name = "flyproxy_accept_paused";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "1 while the connection bound holds accepts back, else 0.",
    );
    f.sample(
        name,
        &[],
        u8::from(published.accept_paused.load(Ordering::Relaxed)),
    );
}

fn log_families(out: &mut String) {
    let name = "flyproxy_log_lines_dropped_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Log lines dropped because stderr could not keep up.",
    );
    f.sample(name, &[], crate::sys::log::dropped());
}

/// Target names looked up, and lookups refused because the resolver's queue was full.
fn dns_families(out: &mut String, resolver: &Resolver) {
    let stats = resolver.stats();
    let name = "flyproxy_dns_lookups_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Target names looked up (getaddrinfo calls; an address or a cached name needs none).",
    );
    f.sample(name, &[], stats.lookups);
    let name = "flyproxy_dns_lookups_refused_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Lookups refused at once because 1024 names already waited for the resolver's threads.",
    );
    f.sample(name, &[], stats.rejected);
}

/// Connections no app took, by port and reason. Every (port, reason) the config makes possible
/// is there from the start at 0, so that `increase()` sees the first burst and an alert on it
/// can fire; a count for a port no longer configured stays (counters do not go back).
fn unrouted_families(out: &mut String, apps: &Apps, published: &Published) {
    let mut counts: BTreeMap<(u16, Unrouted), u64> = BTreeMap::new();
    for (app, ports) in apps {
        for why in possible_unrouted(app) {
            for &port in *ports {
                counts.insert((port, *why), 0);
            }
        }
    }
    counts.extend(published.unrouted.snapshot());
    if counts.is_empty() {
        return;
    }
    let name = "flyproxy_unrouted_connections_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Connections no app took, by port and reason: no_app (no app on the dialled address), no_server_name, unknown_server_name, not_tls, too_large (where apps have Hostnames and none is without), preread_timeout, client_closed.",
    );
    for ((port, why), n) in counts {
        let port = port.to_string();
        f.sample(
            name,
            &[("port", port.as_str()), ("reason", why.as_str())],
            n,
        );
    }
}

/// The reasons a connection to one of `app`'s ports can find no app, from the config: only
/// these are born at 0 (a port's `no_server_name` series where no app reads server names would
/// be noise, and a range of 10,000 ports makes every extra reason 10,000 series).
fn possible_unrouted(app: &AppRoute) -> &'static [Unrouted] {
    // Every reason, written so that a new one does not compile until it is placed below.
    const fn exhaustive(u: Unrouted) {
        match u {
            Unrouted::NoApp
            | Unrouted::NoServerName
            | Unrouted::UnknownServerName
            | Unrouted::NotTls
            | Unrouted::TooLarge
            | Unrouted::PrereadTimeout
            | Unrouted::ClientClosed => {}
        }
    }
    const _: () = exhaustive(Unrouted::NoApp);
    // Reading the server name is where all but `no_app` happen.
    const BY_NAME: [Unrouted; 6] = [
        Unrouted::NoServerName,
        Unrouted::UnknownServerName,
        Unrouted::NotTls,
        Unrouted::TooLarge,
        Unrouted::PrereadTimeout,
        Unrouted::ClientClosed,
    ];
    const ALL: [Unrouted; 7] = [
        Unrouted::NoApp,
        Unrouted::NoServerName,
        Unrouted::UnknownServerName,
        Unrouted::NotTls,
        Unrouted::TooLarge,
        Unrouted::PrereadTimeout,
        Unrouted::ClientClosed,
    ];
    // An app on some addresses only leaves the port's other addresses to no app.
    match (app.addresses().is_empty(), app.hostnames().is_empty()) {
        (true, true) => &[],
        (false, true) => &ALL[..1],
        (true, false) => &BY_NAME,
        (false, false) => &ALL,
    }
}

/// The process's resources, named as every Prometheus client library names them.
fn process_families(out: &mut String, p: &ProcessStats) {
    let gauges: [(&str, &str, &str, Option<f64>); 7] = [
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds,
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_bytes.map(|v| v as f64),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            p.threads.map(|v| v as f64),
        ),
    ];
    for (name, kind, help, value) in gauges {
        if let Some(v) = value {
            Family::head(out, name, kind, help).sample(name, &[], v);
        }
    }
}

/// sk_lookup verdicts (bpf mode).
fn lookup_families(out: &mut String, read: &LookupReader) {
    let name = "flyproxy_bpf_lookups_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "sk_lookup verdicts for configured ports, by port group (app): steered to our listener, or dropped (listener missing).",
    );
    for g in read() {
        f.sample(
            name,
            &[("group", g.group.as_str()), ("verdict", "steered")],
            g.steered,
        );
        f.sample(
            name,
            &[("group", g.group.as_str()), ("verdict", "dropped")],
            g.dropped,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_escaping() {
        let esc = |v: &str| {
            let mut out = String::new();
            push_esc(&mut out, v);
            out
        };
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
        assert_eq!(esc("plain"), "plain");
    }
}
