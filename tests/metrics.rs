//! The metrics endpoint (`--metrics ADDR`: `/metrics` in the Prometheus text format 0.0.4 and
//! `/status`), `flyproxy status`, and the access log (`--log-format text|json`).
//!
//! Counters are checked exactly against traffic the test makes itself; every scrape goes
//! through a strict parser of the exposition format written here (so a malformed exposition
//! fails whichever test sees it). Every wait polls a condition up to a deadline.

mod common;
#[allow(dead_code)]
mod netns;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::metrics::*;
use common::{
    app, canonical, config, connect, expect_closed, free_port, read_line, roundtrip, wait_for,
    Backend, Proxy, Refusing, Rng, TempDir, BIN, WAIT,
};
use serde_json::Value;

/// The parser itself refuses what it should (a parser that accepts everything proves nothing).
#[test]
fn the_test_parser_refuses_malformed_expositions() {
    let good = "# HELP a_total Help with \\\\ and \\n.\n# TYPE a_total counter\n\
                a_total{x=\"q\\\"b\\\\s\\nn\",y=\"\"} 3\na_total 1.5e3\n\
                # HELP g G.\n# TYPE g gauge\ng +Inf\ng{z=\"1\",} NaN 1700000000000\n";
    let e = Exposition::parse(good).unwrap();
    assert_eq!(e.get("a_total", &[("x", "q\"b\\s\nn"), ("y", "")]), 3.0);
    assert_eq!(e.get("a_total", &[]), 1500.0);
    assert!(e.get("g", &[("z", "1")]).is_nan());
    assert_eq!(
        e.family("a_total").unwrap().help.as_deref(),
        Some("Help with \\ and \n.")
    );
    let head = "# HELP a A.\n# TYPE a gauge\n";
    for (bad, why) in [
        ("a 1\n".to_owned(), "no HELP/TYPE"),
        (format!("{head}a 1"), "no final newline"),
        (format!("{head}a 1\na 2\n"), "duplicate series"),
        (
            format!("{head}a{{x=\"1\"}} 1\na{{x=\"1\"}} 2\n"),
            "duplicate series",
        ),
        (format!("{head}a{{x=\"\\t\"}} 1\n"), "bad escape"),
        (format!("{head}a{{x=\"1\"\n"), "unterminated"),
        (format!("{head}a{{1x=\"1\"}} 1\n"), "bad label name"),
        (format!("{head}a{{x=\"1\",x=\"2\"}} 1\n"), "label twice"),
        (format!("{head}a one\n"), "value"),
        (format!("{head}a  1\n"), "two spaces"),
        (format!("{head}a 1 2 3\n"), "trailing"),
        (format!("{head}1a 1\n"), "metric name"),
        (format!("{head}b 1\n"), "sample outside its family"),
        (format!("{head}a 1\n# HELP a again\n"), "HELP after samples"),
        (format!("{head}# TYPE a counter\na 1\n"), "second TYPE"),
        (
            format!("{head}a 1\n# HELP b B.\n# TYPE b gauge\nb 1\n# HELP a A.\n"),
            "interleaved",
        ),
        ("# HELP a A.\n# TYPE a flavour\na 1\n".to_owned(), "type"),
        (format!("{head}\na 1\n"), "empty line"),
    ] {
        assert!(
            Exposition::parse(&bad).is_err(),
            "accepted ({why}): {bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Talking through the proxy

/// Connect, send `msg`, read the echo, half-close and wait for the proxy to close.
fn conversation(addr: SocketAddr, msg: &[u8]) -> SocketAddr {
    let mut s = connect(addr);
    roundtrip(&mut s, msg);
    let local = s.local_addr().unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut s, WAIT);
    local
}

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Counters against known traffic

/// Known traffic, then exact counters: 7 echoed connections of K bytes and 2 held ones through
/// app `a`, 3 connections to app `b` whose only target refuses; the held ones close; the
/// connection bound is reached and left; a good reload and a rejected one.
#[test]
fn scrape_counts_known_traffic_exactly() {
    let t = KnownTraffic::start();
    let ts0 = t.everything_starts_at_zero();
    let held = t.traffic_is_counted_exactly();
    t.closing_empties_the_gauges_and_keeps_the_counters(held);
    let total_a = t.the_bound_pauses_accepting();
    let ts1 = t.a_good_reload_is_counted_and_keeps_the_counters(ts0, total_a);
    t.a_rejected_reload_is_counted_and_changes_nothing(ts1);
}

/// Bytes per echoed connection.
const KNOWN_K: usize = 1000;
/// Bytes per held connection.
const KNOWN_H: usize = 333;
/// The connection bound.
const KNOWN_MAX: usize = 4;

/// The proxy of `scrape_counts_known_traffic_exactly`: app `a` on an echo target, app `b` on
/// a refusing one, a third port kept for a reload.
struct KnownTraffic {
    p: Proxy,
    maddr: SocketAddr,
    _echo: Backend,
    _refusing: Refusing,
    e: String,
    r: String,
}

impl KnownTraffic {
    fn start() -> KnownTraffic {
        let echo = Backend::echo();
        let refusing = Refusing::new();
        let (e, r) = (echo.target(), refusing.target());
        let maddr = metrics_addr();
        let m_arg = maddr.to_string();
        let p = Proxy::simple()
            .ports(3, |ports| config(&known_apps(ports, &e, &r)))
            .args(&[
                "--metrics",
                &m_arg,
                "--max-connections",
                "4",
                "--reload-interval",
                "100ms",
            ])
            .start();
        KnownTraffic {
            p,
            maddr,
            _echo: echo,
            _refusing: refusing,
            e,
            r,
        }
    }

    fn ae(&self) -> [(&'static str, &str); 2] {
        [("app", "a"), ("target", self.e.as_str())]
    }

    fn br(&self) -> [(&'static str, &str); 2] {
        [("app", "b"), ("target", self.r.as_str())]
    }

    /// Before any traffic: everything at zero, the bound as given. The start-up load time.
    fn everything_starts_at_zero(&self) -> f64 {
        let m = scrape(self.maddr);
        for app in ["a", "b"] {
            assert_eq!(
                m.get("flyproxy_app_connections_total", &[("app", app)]),
                0.0
            );
            assert_eq!(
                m.get("flyproxy_app_connections_active", &[("app", app)]),
                0.0
            );
        }
        assert_eq!(m.get("flyproxy_connections_limit", &[]), KNOWN_MAX as f64);
        assert_eq!(m.get("flyproxy_connections_open", &[]), 0.0);
        assert_eq!(m.get("flyproxy_accept_paused", &[]), 0.0);
        assert_eq!(m.get("flyproxy_reloads_total", &[("result", "ok")]), 0.0);
        assert_eq!(
            m.get("flyproxy_reloads_total", &[("result", "rejected")]),
            0.0
        );
        let ts0 = m.get("flyproxy_config_last_reload_success_timestamp_seconds", &[]);
        assert!(
            (ts0 - unix_now()).abs() < 120.0,
            "start-up load time {ts0} is not about now ({})",
            unix_now()
        );
        assert_eq!(
            m.get(
                "flyproxy_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
        ts0
    }

    /// 7 echoed connections and 2 held ones through `a`, 3 refused ones through `b`: every
    /// counter exact. The held connections.
    fn traffic_is_counted_exactly(&self) -> Vec<TcpStream> {
        let (a, b) = (self.p.v4(0), self.p.v4(1));
        let (ae, br) = (self.ae(), self.br());
        let mark = self.p.mark();
        for i in 0..7 {
            conversation(a, &bytes(KNOWN_K, i + 1));
        }
        let held: Vec<TcpStream> = (0..2)
            .map(|i| {
                let mut s = connect(a);
                roundtrip(&mut s, &bytes(KNOWN_H, 100 + i));
                s
            })
            .collect();
        for _ in 0..3 {
            let mut s = connect(b);
            expect_closed(&mut s, WAIT);
        }
        self.p
            .wait_log_count(mark, 10, "conn (7 closed, 3 connect_failed)", |l| {
                l.contains(" conn ")
                    && (l.contains(" end=closed") || l.contains(" end=connect_failed"))
            });
        let m = scrape_until(self.maddr, "2 connections open, the rest finished", |m| {
            m.value("flyproxy_app_connections_active", &[("app", "a")]) == Some(2.0)
                && m.value("flyproxy_app_connections_active", &[("app", "b")]) == Some(0.0)
                && m.value("flyproxy_connections_open", &[]) == Some(2.0)
        });
        let up = known_up();
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "a")]),
            9.0
        );
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "b")]),
            3.0
        );
        assert_eq!(m.get("flyproxy_connections_total", &ae), 9.0);
        assert_eq!(m.get("flyproxy_connections_active", &ae), 2.0);
        assert_eq!(m.get("flyproxy_connections_total", &br), 0.0);
        assert_eq!(m.get("flyproxy_connections_active", &br), 0.0);
        assert_eq!(bytes_dir(&m, "client_to_target", &ae), up);
        assert_eq!(bytes_dir(&m, "target_to_client", &ae), up);
        assert_eq!(bytes_dir(&m, "client_to_target", &br), 0.0);
        assert_eq!(bytes_dir(&m, "target_to_client", &br), 0.0);
        // One target, so one attempt per connection whatever ConnectAttempts says.
        for (reason, want) in [
            ("unresolvable", 0.0),
            ("refused", 3.0),
            ("timeout", 0.0),
            ("error", 0.0),
        ] {
            assert_eq!(
                m.get(
                    "flyproxy_connect_failures_total",
                    &[br[0], br[1], ("reason", reason)]
                ),
                want,
                "b, reason {reason}"
            );
            assert_eq!(
                m.get(
                    "flyproxy_connect_failures_total",
                    &[ae[0], ae[1], ("reason", reason)]
                ),
                0.0,
                "a, reason {reason}"
            );
        }
        assert_eq!(refused(&m, "b", "connect_failed"), 3.0);
        assert_eq!(refused(&m, "b", "limit"), 0.0);
        assert_eq!(refused(&m, "a", "connect_failed"), 0.0);
        assert_eq!(refused(&m, "a", "limit"), 0.0);
        assert_eq!(m.get("flyproxy_target_up", &ae), 1.0);
        assert_eq!(m.get("flyproxy_target_up", &br), 0.0);
        assert_eq!(m.get("flyproxy_accept_paused", &[]), 0.0);
        held
    }

    /// The held ones close: the gauges go back to zero, the counters stay.
    fn closing_empties_the_gauges_and_keeps_the_counters(&self, mut held: Vec<TcpStream>) {
        let ae = self.ae();
        drop(held.drain(..));
        let m = scrape_until(self.maddr, "no connection open", |m| {
            m.value("flyproxy_app_connections_active", &[("app", "a")]) == Some(0.0)
                && m.value("flyproxy_connections_active", &ae) == Some(0.0)
                && m.value("flyproxy_connections_open", &[]) == Some(0.0)
        });
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "a")]),
            9.0
        );
        assert_eq!(bytes_dir(&m, "client_to_target", &ae), known_up());
        assert_eq!(bytes_dir(&m, "target_to_client", &ae), known_up());
    }

    /// The bound: KNOWN_MAX held connections pause accepting; one more waits in the backlog.
    /// The connections `a` has counted by then.
    fn the_bound_pauses_accepting(&self) -> usize {
        let a = self.p.v4(0);
        let mut held: Vec<TcpStream> = (0..KNOWN_MAX as u64)
            .map(|i| {
                let mut s = connect(a);
                roundtrip(&mut s, &bytes(10, 200 + i));
                s
            })
            .collect();
        scrape_until(self.maddr, "accept_paused 1 with the bound reached", |m| {
            m.value("flyproxy_accept_paused", &[]) == Some(1.0)
                && m.value("flyproxy_connections_open", &[]) == Some(KNOWN_MAX as f64)
        });
        let mut extra = connect(a);
        extra.write_all(b"extra").unwrap();
        drop(held.remove(0));
        let mut got = [0u8; 5];
        extra
            .read_exact(&mut got)
            .expect("the waiting connection is served once a slot frees");
        assert_eq!(&got, b"extra");
        drop(held);
        drop(extra);
        let m = scrape_until(self.maddr, "accept_paused 0 once below the bound", |m| {
            m.value("flyproxy_accept_paused", &[]) == Some(0.0)
                && m.value("flyproxy_connections_open", &[]) == Some(0.0)
        });
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "a")]),
            (9 + KNOWN_MAX + 1) as f64
        );
        9 + KNOWN_MAX + 1
    }

    /// A good reload (adds app c): counted, timestamped later, and the counters of what stays
    /// are kept. Its time.
    fn a_good_reload_is_counted_and_keeps_the_counters(&self, ts0: f64, total_a: usize) -> f64 {
        let e = &self.e;
        wait_for("the clock to pass the start-up load time", WAIT, || {
            (unix_now() > ts0 + 0.01).then_some(())
        });
        let mut apps = known_apps(&self.p.ports, e, &self.r);
        apps.push(app("c", &self.p.ports[2..3], std::slice::from_ref(e)));
        let mark = self.p.mark();
        self.p.rewrite_config(&config(&apps));
        self.p.wait_reload_ok(mark);
        let m = scrape(self.maddr);
        assert_eq!(m.get("flyproxy_reloads_total", &[("result", "ok")]), 1.0);
        assert_eq!(
            m.get("flyproxy_reloads_total", &[("result", "rejected")]),
            0.0
        );
        let ts1 = m.get("flyproxy_config_last_reload_success_timestamp_seconds", &[]);
        assert!(
            ts1 > ts0,
            "last reload time {ts1} not after the start-up one {ts0}"
        );
        assert!(
            ts1 <= unix_now() + 1.0,
            "last reload time {ts1} in the future"
        );
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "a")]),
            total_a as f64
        );
        assert_eq!(refused(&m, "b", "connect_failed"), 3.0);
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "c")]),
            0.0
        );
        assert_eq!(
            m.get("flyproxy_connections_total", &[("app", "c"), ("target", e)]),
            0.0,
            "app c's target has counters of its own"
        );
        conversation(self.p.v4(2), b"to c");
        ts1
    }

    /// A rejected reload: counted, nothing else changes.
    fn a_rejected_reload_is_counted_and_changes_nothing(&self, ts1: f64) {
        let mark = self.p.mark();
        self.p.rewrite_config("{\"Apps\": [ this is not json");
        self.p.wait_reload_rejected(mark);
        // (The counter moves just after the log lines.)
        let m = scrape_until(self.maddr, "the rejected reload counted", |m| {
            m.value("flyproxy_reloads_total", &[("result", "rejected")]) == Some(1.0)
        });
        assert_eq!(m.get("flyproxy_reloads_total", &[("result", "ok")]), 1.0);
        assert_eq!(
            m.get("flyproxy_config_last_reload_success_timestamp_seconds", &[]),
            ts1
        );
        assert_eq!(
            m.get("flyproxy_app_connections_total", &[("app", "c")]),
            1.0
        );
        assert_eq!(
            m.label_values("flyproxy_app_connections_total", "app"),
            ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
        );
    }
}

/// Apps `a` (first port, target `e`) and `b` (second port, target `r`).
fn known_apps(ports: &[u16], e: &str, r: &str) -> Vec<Value> {
    vec![
        app("a", &ports[..1], &[e.to_owned()]),
        app("b", &ports[1..2], &[r.to_owned()]),
    ]
}

/// Bytes each way through `a`'s target: the echoed connections and the held ones.
fn known_up() -> f64 {
    (7 * KNOWN_K + 2 * KNOWN_H) as f64
}

/// `flyproxy_bytes_total` of target `t` in direction `d`.
fn bytes_dir(m: &Exposition, d: &'static str, t: &[(&'static str, &str); 2]) -> f64 {
    m.get("flyproxy_bytes_total", &[t[0], t[1], ("direction", d)])
}

/// `flyproxy_app_connections_refused_total` of `app` for `reason`.
fn refused(m: &Exposition, app: &str, reason: &str) -> f64 {
    m.get(
        "flyproxy_app_connections_refused_total",
        &[("app", app), ("reason", reason)],
    )
}

// ---------------------------------------------------------------------------------------------
// Format validity

/// Every family the endpoint serves in simple mode, with its type.
const FAMILIES: [(&str, &str); 38] = [
    ("flyproxy_build_info", "gauge"),
    ("flyproxy_app_connections_total", "counter"),
    ("flyproxy_app_connections_active", "gauge"),
    ("flyproxy_app_connections_refused_total", "counter"),
    ("flyproxy_app_queued", "gauge"),
    ("flyproxy_connect_duration_seconds", "histogram"),
    ("flyproxy_connection_duration_seconds", "histogram"),
    ("flyproxy_target_connections_total", "counter"),
    ("flyproxy_target_connections_active", "gauge"),
    ("flyproxy_target_up", "gauge"),
    ("flyproxy_target_bytes_total", "counter"),
    ("flyproxy_target_connect_failures_total", "counter"),
    ("flyproxy_health_checks_total", "counter"),
    ("flyproxy_target_state_changes_total", "counter"),
    ("flyproxy_target_last_change_timestamp_seconds", "gauge"),
    // The per-target families under their names before issue 23, deprecated, for one release.
    ("flyproxy_connections_total", "counter"),
    ("flyproxy_connections_active", "gauge"),
    ("flyproxy_bytes_total", "counter"),
    ("flyproxy_connect_failures_total", "counter"),
    ("flyproxy_target_state", "gauge"),
    ("flyproxy_app_enabled", "gauge"),
    ("flyproxy_app_refused_disabled_total", "counter"),
    ("flyproxy_reloads_total", "counter"),
    (
        "flyproxy_config_last_reload_success_timestamp_seconds",
        "gauge",
    ),
    ("flyproxy_config_info", "gauge"),
    ("flyproxy_connections_limit", "gauge"),
    ("flyproxy_connections_open", "gauge"),
    ("flyproxy_accept_paused", "gauge"),
    ("flyproxy_log_lines_dropped_total", "counter"),
    ("flyproxy_dns_lookups_total", "counter"),
    ("flyproxy_dns_lookups_refused_total", "counter"),
    // The standard process families, last.
    ("process_start_time_seconds", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_threads", "gauge"),
];

/// Checks every exposition must pass beyond the syntax: counters are `_total` and not negative,
/// whole unless they count seconds (`process_cpu_seconds_total`, by Prometheus convention);
/// every value is finite.
fn check_values(m: &Exposition) {
    for f in &m.families {
        for s in &f.samples {
            assert!(
                s.value.is_finite(),
                "{} {:?} = {}",
                s.name,
                s.labels,
                s.value
            );
            if f.kind.as_deref() == Some("counter") {
                assert!(
                    f.name.ends_with("_total"),
                    "counter {} not named _total",
                    f.name
                );
                let whole = s.value.fract() == 0.0 || f.name.ends_with("_seconds_total");
                assert!(
                    s.value >= 0.0 && whole,
                    "counter {} {:?} = {}",
                    s.name,
                    s.labels,
                    s.value
                );
            }
        }
    }
}

/// The exposition parses strictly, with apps whose names need escaping (a double quote, a
/// backslash, a newline, non-ASCII) round-tripping through label values, and an IPv6 target.
#[test]
fn exposition_is_valid_and_escapes_label_values() {
    let echo = Backend::echo();
    let echo6 = Backend::echo_v6();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let m_arg = maddr.to_string();
    let apps = |ports: &[u16], extra: bool| {
        let mut plain = vec![refusing.target()];
        if extra {
            plain.push(echo.target());
        }
        config(&[
            app(WEIRD, &ports[..1], &[echo.target()]),
            app(MULTI, &ports[1..2], &[echo6.target()]),
            app("plain", &ports[2..3], &plain),
        ])
    };
    let p = Proxy::simple()
        .ports(3, |ports| apps(ports, false))
        .args(&["--metrics", &m_arg, "--reload-interval", "100ms"])
        .start();
    let m = scrape(maddr);
    check_values(&m);

    conversation(p.v4(0), b"weird app");
    conversation(p.v6(1), b"multi-line app, over IPv6");
    let mut s = connect(p.v4(2));
    expect_closed(&mut s, WAIT);
    let mark = p.mark();
    p.rewrite_config(&apps(&p.ports, true));
    p.wait_reload_ok(mark);

    let m = scrape_until(maddr, "the failed connection counted", |m| {
        m.value(
            "flyproxy_app_connections_refused_total",
            &[("app", "plain"), ("reason", "connect_failed")],
        ) == Some(1.0)
    });
    check_values(&m);
    every_family_is_there_in_order(&m);
    the_names_round_trip(&m, &echo.target(), &echo6.target());
    assert_eq!(
        m.samples("flyproxy_connections_total").len(),
        4,
        "(app, target) pairs after the reload: {}",
        m.text
    );
    assert_eq!(m.get("flyproxy_reloads_total", &[("result", "ok")]), 1.0);
    assert!(
        m.family("flyproxy_bpf_lookups_total").is_none(),
        "bpf family in simple mode"
    );
}

/// App names with every character a name may have besides letters and digits (`.`, `_`,
/// `-`). Names that would need escaping in a label are refused by the config since issue 11;
/// `metrics::esc` keeps its unit test.
const WEIRD: &str = "We.ird_app-1";
const MULTI: &str = "multi.line-app_2";

/// Every family, in order, with its type, some samples and a HELP.
fn every_family_is_there_in_order(m: &Exposition) {
    let names: Vec<(&str, &str)> = m
        .families
        .iter()
        .map(|f| (f.name.as_str(), f.kind.as_deref().unwrap()))
        .collect();
    assert_eq!(
        names,
        FAMILIES.to_vec(),
        "the families, in order, with their types"
    );
    for f in &m.families {
        assert!(
            !f.samples.is_empty(),
            "family {} has no samples:\n{}",
            f.name,
            m.text
        );
        assert!(
            !f.help.as_deref().unwrap().trim().is_empty(),
            "{} has an empty HELP",
            f.name
        );
    }
}

/// The names round-trip: the parsed label values are the names exactly, escaped in the text,
/// with the bytes of each app's one conversation.
fn the_names_round_trip(m: &Exposition, echo: &str, t6: &str) {
    let want: BTreeSet<String> = [WEIRD, MULTI, "plain"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for fam in [
        "flyproxy_app_connections_total",
        "flyproxy_app_connections_active",
        "flyproxy_app_connections_refused_total",
        "flyproxy_connections_total",
        "flyproxy_connections_active",
        "flyproxy_target_up",
        "flyproxy_bytes_total",
        "flyproxy_connect_failures_total",
        "flyproxy_app_queued",
        "flyproxy_connect_duration_seconds_count",
        "flyproxy_connection_duration_seconds_count",
        "flyproxy_target_connections_total",
        "flyproxy_target_connections_active",
        "flyproxy_target_bytes_total",
        "flyproxy_target_connect_failures_total",
        "flyproxy_health_checks_total",
        "flyproxy_target_state_changes_total",
        "flyproxy_target_last_change_timestamp_seconds",
        "flyproxy_target_state",
        "flyproxy_app_enabled",
        "flyproxy_app_refused_disabled_total",
    ] {
        assert_eq!(m.label_values(fam, "app"), want, "app labels of {fam}");
    }
    assert!(
        m.text
            .contains("flyproxy_app_connections_total{app=\"We.ird_app-1\"} 1\n"),
        "the name, as it is:\n{}",
        m.text
    );
    assert!(t6.starts_with("[::1]:"), "{t6}");
    for (app, target, n) in [(WEIRD, echo, "weird app".len()), (MULTI, t6, 25)] {
        for d in ["client_to_target", "target_to_client"] {
            assert_eq!(
                m.get(
                    "flyproxy_bytes_total",
                    &[("app", app), ("target", target), ("direction", d)]
                ),
                n as f64,
                "{app:?} {d}"
            );
            // The new name reads the same counter.
            assert_eq!(
                m.get(
                    "flyproxy_target_bytes_total",
                    &[("app", app), ("target", target), ("direction", d)]
                ),
                n as f64,
                "{app:?} {d}"
            );
        }
    }
}

/// An app listing the same target twice (literally, or as `host:0port`) must not produce two
/// series with one label set: Prometheus refuses a whole scrape with a duplicate sample. Either
/// the config refuses the duplicate, or the exposition stays valid.
#[test]
fn a_target_listed_twice_does_not_duplicate_series() {
    let echo = Backend::echo();
    let port = echo.addr.port();
    for twice in [
        [echo.target(), echo.target()],
        [echo.target(), format!("127.0.0.1:0{port}")],
    ] {
        let dir = TempDir::new("dup-target");
        let cfg = config(&[app("dup", &[free_port()], &twice)]);
        let path = dir.write("config.json", &cfg);
        let check = common::run(&["check", "-c", path.to_str().unwrap()]);
        if check.code == Some(1) {
            continue; // refused: fine
        }
        let maddr = metrics_addr();
        let m_arg = maddr.to_string();
        let _p = Proxy::simple()
            .ports(1, |ports| config(&[app("dup", ports, &twice)]))
            .args(&["--metrics", &m_arg])
            .start();
        let r = get(maddr, "/metrics");
        assert_eq!(r.status, 200);
        if let Err(e) = Exposition::parse(&r.body) {
            panic!(
                "Targets {twice:?} (accepted by `flyproxy check`) give an invalid exposition: \
                 {e}\n{}",
                r.body
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile scrapers

/// Bad requests get their status codes; oversized and silent ones do not keep the endpoint from
/// answering the next scrape; relaying goes on while the endpoint is stuck with a scraper.
#[test]
fn hostile_scrapers_get_errors_and_do_not_block_scrapes_or_relaying() {
    let echo = Backend::echo();
    let maddr = metrics_addr();
    let m_arg = maddr.to_string();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(&["--metrics", &m_arg])
        .start();
    scrape(maddr);
    bad_requests_get_their_status(maddr);
    oversized_requests_are_refused_promptly(maddr);
    a_silent_scraper_is_closed_at_the_timeout(maddr);
    relaying_goes_on_while_a_scraper_stalls(maddr, p.v4(0));
    scrape(maddr);
}

/// Methods, paths and request lines the endpoint does not serve get 405, 404 or 400.
fn bad_requests_get_their_status(maddr: SocketAddr) {
    for (req, want) in [
        (
            &b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..],
            405,
        ),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", 405),
        (b"DELETE /status HTTP/1.0\r\n\r\n", 405),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 200),
        (b"GET /status HTTP/1.0\r\n\r\n", 200),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2\r\n\r\n", 400),
        (b"\xff\xfe\xfd /metrics HTTP/1.1\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
    ] {
        let r = request(maddr, req);
        assert_eq!(
            r.status,
            want,
            "{:?} -> {r:?}",
            String::from_utf8_lossy(req)
        );
        if want == 200 {
            if req.starts_with(b"GET /status") {
                assert!(r.body.contains("app a "), "{}", r.body);
            } else {
                Exposition::parse(&r.body).unwrap();
            }
        }
    }
}

/// 100 KB of garbage, and a request whose head never ends within the size cap: a 400, or
/// the connection closed (it may be reset, as the rest is never read); and promptly.
fn oversized_requests_are_refused_promptly(maddr: SocketAddr) {
    for (what, req) in [
        ("garbage", vec![b'x'; 100 * 1024]),
        ("an endless head", {
            let mut r = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
            r.extend(std::iter::repeat_n(b'a', 100 * 1024));
            r
        }),
    ] {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&maddr, WAIT).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let _ = w.write_all(&req); // fails once the endpoint gives up on it: fine
        });
        let (got, err) = read_all(&mut s.try_clone().unwrap());
        let text = String::from_utf8_lossy(&got);
        if let Some(e) = &err {
            assert!(
                e.kind() == io::ErrorKind::ConnectionReset,
                "{what}: reading the answer: {e} (got {text:?})"
            );
        }
        assert!(
            got.is_empty() || text.starts_with("HTTP/1.1 400 "),
            "{what}: answered {text:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{what}: took {:?}",
            t.elapsed()
        );
        drop(s);
        writer.join().unwrap();
        scrape(maddr);
    }
}

/// A scraper that connects and sends nothing holds the endpoint until the 2 s timeout
/// frees it, then is closed without an answer; the next scrape is then served.
fn a_silent_scraper_is_closed_at_the_timeout(maddr: SocketAddr) {
    let mut silent = TcpStream::connect_timeout(&maddr, WAIT).unwrap();
    let t = Instant::now();
    let (raw, err) = exchange(
        maddr,
        b"GET /metrics HTTP/1.1\r\n\r\n",
        Duration::from_secs(15),
    );
    let waited = t.elapsed();
    assert!(err.is_none(), "scrape after a silent scraper: {err:?}");
    let r = parse_response(&raw);
    assert_eq!(r.status, 200);
    assert!(
        waited < Duration::from_secs(7),
        "a silent scraper held the endpoint for {waited:?}"
    );
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let (got, err) = read_all(&mut silent);
    assert!(
        got.is_empty(),
        "the silent scraper got an answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        err.is_none() || err.as_ref().unwrap().kind() == io::ErrorKind::ConnectionReset,
        "the silent scraper was not closed: {err:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "the silent scraper was closed after {:?}, before the 2 s timeout",
        t.elapsed()
    );
}

/// While the endpoint is stuck with a silent scraper, a connection through the proxy
/// works. Checked: the stalled scraper is still open after the connection is done (if a
/// loaded machine made the connection take past the 2 s, try again).
fn relaying_goes_on_while_a_scraper_stalls(maddr: SocketAddr, proxied: SocketAddr) {
    let mut proven = false;
    for i in 0..3 {
        let mut stall = TcpStream::connect_timeout(&maddr, WAIT).unwrap();
        conversation(proxied, format!("during stall {i}").as_bytes());
        stall.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        if matches!(stall.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            proven = true;
            break;
        }
    }
    assert!(
        proven,
        "relaying could not be shown to work during a scraper's stall"
    );
}

/// A scraper that sends its request a byte at a time, each byte within the 2 s read timeout,
/// must not hold the one-request-at-a-time endpoint for longer than "a few seconds" (as
/// src/metrics promises): the timeout has to bound the whole request, not each read.
#[test]
fn a_trickling_scraper_cannot_hold_the_endpoint() {
    let maddr = metrics_addr();
    let m_arg = maddr.to_string();
    let echo = Backend::echo();
    let _p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(&["--metrics", &m_arg])
        .start();
    scrape(maddr);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (stop2, started2) = (Arc::clone(&stop), Arc::clone(&started));
    let trickler = thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&maddr, WAIT).unwrap();
        let head = b"GET /metrics HTTP/1.1\r\nX-Slow: ";
        let until = Instant::now() + Duration::from_secs(12);
        for (i, b) in head.iter().chain(std::iter::repeat(&b'z')).enumerate() {
            if stop2.load(Ordering::Acquire) || Instant::now() >= until {
                break;
            }
            if s.write_all(&[*b]).is_err() {
                break; // the endpoint gave up on us: what should happen
            }
            if i == 1 {
                started2.store(true, Ordering::Release);
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    wait_for("the trickler to start", WAIT, || {
        started.load(Ordering::Acquire).then_some(())
    });
    let t = Instant::now();
    let (raw, err) = exchange(
        maddr,
        b"GET /metrics HTTP/1.1\r\n\r\n",
        Duration::from_secs(8),
    );
    let waited = t.elapsed();
    stop.store(true, Ordering::Release);
    trickler.join().unwrap();
    assert!(
        err.is_none() && !raw.is_empty(),
        "no answer to a scrape within {waited:?} while another scraper trickles its request \
         a byte every 300 ms ({err:?}): the 2 s timeout is per read, so the trickler holds the \
         endpoint for as long as it likes"
    );
    assert!(
        waited < Duration::from_secs(7),
        "answered only after {waited:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// bpf mode

/// bpf mode: `flyproxy_bpf_lookups_total{group,verdict="steered"}` counts exactly the
/// connections made to each app's ports, over IPv4 and IPv6; other ports count nowhere; a
/// reload adds the new app's group without touching the others.
#[test]
fn bpf_lookups_count_the_connections_to_each_apps_ports() {
    netns::run(
        "bpf_lookups_count_the_connections_to_each_apps_ports",
        |_ns| {
            let echo = Backend::echo();
            let maddr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9100));
            let two = config(&[
                app("A", &[7001, 7002], &[echo.target()]),
                app("B", &[7101], &[echo.target()]),
            ]);
            let p = Proxy::bpf()
                .config(&two)
                .args(&["--metrics", "127.0.0.1:9100"])
                .start();
            let lookups = |m: &Exposition, g: &str, v: &str| {
                m.get(
                    "flyproxy_bpf_lookups_total",
                    &[("group", g), ("verdict", v)],
                )
            };
            let m = scrape(maddr);
            check_values(&m);
            assert_eq!(
                m.family("flyproxy_bpf_lookups_total")
                    .and_then(|f| f.kind.as_deref()),
                Some("counter"),
                "{}",
                m.text
            );
            for g in ["A", "B"] {
                assert_eq!(lookups(&m, g, "steered"), 0.0);
                assert_eq!(lookups(&m, g, "dropped"), 0.0);
            }

            for i in 0..3 {
                conversation(netns::v4(7001), format!("v4 {i}").as_bytes());
            }
            for i in 0..2 {
                conversation(netns::v6(7002), format!("v6 {i}").as_bytes());
            }
            conversation(netns::v6(7101), b"to B");
            // Not configured: refused, and counted nowhere; the endpoint itself neither.
            common::expect_refused(netns::v4(7003));
            common::expect_refused(netns::v6(7102));

            let m = scrape(maddr);
            check_values(&m);
            assert_eq!(lookups(&m, "A", "steered"), 5.0, "{}", m.text);
            assert_eq!(lookups(&m, "A", "dropped"), 0.0);
            assert_eq!(lookups(&m, "B", "steered"), 1.0, "{}", m.text);
            assert_eq!(lookups(&m, "B", "dropped"), 0.0);
            assert_eq!(
                m.get("flyproxy_app_connections_total", &[("app", "A")]),
                5.0
            );
            assert_eq!(
                m.label_values("flyproxy_bpf_lookups_total", "group"),
                ["A", "B"].iter().map(|s| s.to_string()).collect()
            );

            let three = config(&[
                app("A", &[7001, 7002], &[echo.target()]),
                app("B", &[7101], &[echo.target()]),
                app("C", &[7201], &[echo.target()]),
            ]);
            p.reload(&three);
            conversation(netns::v4(7201), b"to C");
            conversation(netns::v4(7001), b"to A again");
            let m = scrape(maddr);
            assert_eq!(lookups(&m, "A", "steered"), 6.0, "{}", m.text);
            assert_eq!(lookups(&m, "B", "steered"), 1.0, "{}", m.text);
            assert_eq!(lookups(&m, "C", "steered"), 1.0, "{}", m.text);
            assert_eq!(lookups(&m, "C", "dropped"), 0.0);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// flyproxy status

/// `flyproxy status` prints each app with its ports (the first 12, then a count), and each
/// target with its health and its open and total connections; it exits 1 with a message when
/// no flyproxy answers at the address.
#[test]
fn status_command_shows_apps_ports_targets_and_health() {
    let echo = Backend::echo();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let m_arg = maddr.to_string();
    let p = Proxy::simple()
        .ports(14, |ports| {
            config(&[
                app("alpha", &ports[..13], &[echo.target()]),
                app("beta", &ports[13..], &[refusing.target()]),
            ])
        })
        .args(&["--metrics", &m_arg, "--max-connections", "64"])
        .start();
    conversation(p.v4(5), b"closed one");
    let mut held = connect(p.v4(12));
    roundtrip(&mut held, b"held one");
    let mut failed = connect(p.v4(13));
    expect_closed(&mut failed, WAIT);
    status_shows_each_app_and_target(&p, maddr, &echo.target(), &refusing.target());
    drop(held);
    status_without_a_proxy_exits_1();
    status_against_another_server_exits_1();
}

/// The page: the slots in use and the reloads, then each app (its first 12 ports, a count of
/// the rest, open and accepted connections) with its targets (health, open, total); the same
/// page as /status serves.
fn status_shows_each_app_and_target(p: &Proxy, maddr: SocketAddr, target_a: &str, target_b: &str) {
    let m_arg = maddr.to_string();
    let out = wait_for("status to show 1 slot in use", WAIT, || {
        let out = common::run(&["status", "--metrics", &m_arg]);
        assert_eq!(out.code, Some(0), "status: {}", out.stderr);
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains(": 1 of 64 connection slots in use"))
            .then_some(out)
    });
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "flyproxy {}: 1 of 64 connection slots in use, reloads ok=0 rejected=0",
            env!("CARGO_PKG_VERSION")
        ),
        "{}",
        out.stdout
    );
    let shown: Vec<String> = p.ports[..12].iter().map(u16::to_string).collect();
    let want_alpha = format!(
        "app alpha  ports {} (+1 more)  open 1  accepted 2",
        shown.join(",")
    );
    let want_beta = format!("app beta  ports {}  open 0  accepted 1", p.ports[13]);
    let at = |want: &str| {
        lines
            .iter()
            .position(|l| *l == want)
            .unwrap_or_else(|| panic!("no line {want:?} in:\n{}", out.stdout))
    };
    let (ia, ib) = (at(&want_alpha), at(&want_beta));
    let words = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>();
    assert_eq!(
        words(ia + 1),
        [target_a, "up", "open", "1", "total", "2"],
        "{}",
        out.stdout
    );
    assert_eq!(
        words(ib + 1),
        [target_b, "DOWN", "open", "0", "total", "0"],
        "{}",
        out.stdout
    );
    assert!(lines[ia + 1].starts_with("  "), "{:?}", lines[ia + 1]);
    // The page is what /status serves.
    let page = get(maddr, "/status");
    assert_eq!(page.status, 200);
    assert_eq!(page.body, out.stdout);
}

/// Nothing listening: exit 1, saying where it looked.
fn status_without_a_proxy_exits_1() {
    let closed = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let out = common::run(&["status", "--metrics", &closed.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("cannot read the status from {closed}")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--metrics"), "{}", out.stderr);
}

/// Something that is not flyproxy: a 404, and a server that never answers; exit 1 each time,
/// and promptly.
fn status_against_another_server_exits_1() {
    let not_us = TcpListener::bind("127.0.0.1:0").unwrap();
    let not_us_addr = not_us.local_addr().unwrap();
    let server = thread::spawn(move || {
        for (i, c) in not_us.incoming().take(2).enumerate() {
            let Ok(mut c) = c else { continue };
            if i == 0 {
                // Read the request first, so that closing does not reset the connection.
                c.set_read_timeout(Some(WAIT)).unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                    head.push(b[0]);
                }
                let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            } else {
                // Hold it, silent, until the client gives up.
                c.set_read_timeout(Some(WAIT)).unwrap();
                let _ = read_all(&mut c);
            }
        }
    });
    let out = common::run(&["status", "--metrics", &not_us_addr.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("unexpected answer"), "{}", out.stderr);
    let t = Instant::now();
    let out = common::run(&["status", "--metrics", &not_us_addr.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot read the status"),
        "{}",
        out.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "status waited {:?} on a silent server",
        t.elapsed()
    );
    server.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The access log

/// One `conn` record, from either log format.
#[derive(Debug)]
struct Conn {
    level: String,
    app: String,
    client: String,
    port: u64,
    target: String,
    up: u64,
    down: u64,
    duration: f64,
    end: String,
    reason: Option<String>,
    /// The timing fields present (issue 23), in `TIMINGS` order, with `attempts` and `failed`.
    timings: Vec<String>,
    attempts: Option<u64>,
    failed: Option<String>,
    line: String,
}

/// The timing fields a conn record may end with, in this order, each there once the connection
/// got that far: seconds, except `attempts` (a whole number) and `failed` (`TARGET/REASON,...`).
const TIMINGS: [&str; 5] = [
    "queue_wait",
    "connect_time",
    "attempts",
    "failed",
    "first_byte",
];

/// `keys` are a part of `TIMINGS`, in its order.
fn timing_keys(keys: &[&str], line: &str) -> Vec<String> {
    let mut at = 0;
    for k in keys {
        match TIMINGS[at..].iter().position(|t| t == k) {
            Some(i) => at += i + 1,
            None => panic!("{k} is not a timing field, or out of order, in {line:?}"),
        }
    }
    keys.iter().map(|k| k.to_string()).collect()
}

/// `2026-11-26T06:43:26.123Z`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// A text line's level (as written, padded to 5) and message: `<ts> LEVEL message`. None if
/// the line is not of that shape.
fn text_event(line: &str) -> Option<(&str, &str)> {
    if !is_timestamp(line.get(..24)?) || line.as_bytes().get(24) != Some(&b' ') {
        return None;
    }
    let label = line.get(25..30)?;
    if !["ERROR", "WARN ", "INFO ", "DEBUG"].contains(&label) || line.get(30..31)? != " " {
        return None;
    }
    let msg = line.get(31..)?;
    (!msg.is_empty() && !msg.starts_with(' ')).then_some((label.trim_end(), msg))
}

/// `key=value` fields of a text record, in order.
type Fields = Vec<(String, String)>;

/// A text record's level, message word and `key=value` fields (a value in double quotes is a
/// JSON string). None if the line is not of that shape.
fn parse_text_line(line: &str) -> Option<(String, String, Fields)> {
    let (label, rest) = text_event(line)?;
    let (msg, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let (v, used) = if after.starts_with('"') {
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let v = de.next()?.ok()?;
            (v, de.byte_offset())
        } else {
            let v = after.split(' ').next().unwrap();
            (v.to_owned(), v.len())
        };
        fields.push((k.to_owned(), v));
        rest = &after[used..];
        if !rest.is_empty() {
            rest = rest.strip_prefix(' ')?;
        }
    }
    Some((label.trim_end().to_owned(), msg.to_owned(), fields))
}

fn conn_from_text(line: &str) -> Option<Conn> {
    let (level, msg, fields) = parse_text_line(line)?;
    if msg != "conn" {
        return None;
    }
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    let mut want = vec![
        "app", "client", "port", "target", "up", "down", "duration", "end",
    ];
    if keys.get(8) == Some(&"reason") {
        want.push("reason");
    }
    assert_eq!(
        keys[..want.len().min(keys.len())],
        want,
        "fields of {line:?}"
    );
    let timings = timing_keys(&keys[want.len()..], line);
    let f = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let num = |k: &str| -> u64 {
        f(k).and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line:?}"))
    };
    let as_secs = |k: &str| -> f64 {
        let d = f(k).unwrap();
        d.strip_suffix('s')
            .filter(|n| n.split_once('.').is_some_and(|(_, frac)| frac.len() == 3))
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{k} {d:?} is not like 0.123s in {line:?}"))
    };
    let secs = as_secs("duration");
    for t in &timings {
        if !["attempts", "failed"].contains(&t.as_str()) {
            as_secs(t);
        }
    }
    Some(Conn {
        level: level.to_lowercase(),
        app: f("app").unwrap(),
        client: f("client").unwrap(),
        port: num("port"),
        target: f("target").unwrap(),
        up: num("up"),
        down: num("down"),
        duration: secs,
        end: f("end").unwrap(),
        reason: f("reason"),
        attempts: timings
            .iter()
            .any(|t| t == "attempts")
            .then(|| num("attempts")),
        failed: f("failed"),
        timings,
        line: line.to_owned(),
    })
}

fn conn_from_json(line: &str) -> Option<Conn> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["msg"] != "conn" {
        return None;
    }
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "app", "client", "down", "duration", "end", "level", "msg", "port", "target", "ts", "up",
    ];
    if obj.contains_key("reason") {
        want.push("reason");
    }
    let timings: Vec<&str> = TIMINGS
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    want.extend(&timings);
    want.sort_unstable();
    assert_eq!(keys, want, "keys of {line}");
    for t in &timings {
        match *t {
            "attempts" => assert!(v[t].is_u64(), "{t} is not a whole number in {line}"),
            "failed" => assert!(v[t].is_string(), "{t} is not a string in {line}"),
            _ => assert!(v[t].is_number(), "{t} is not a number in {line}"),
        }
    }
    let timings: Vec<String> = timings.iter().map(|t| t.to_string()).collect();
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} is not a string in {line}"))
            .to_owned()
    };
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} is not a whole number in {line}"))
    };
    assert!(is_timestamp(&s("ts")), "ts in {line}");
    Some(Conn {
        level: s("level"),
        app: s("app"),
        client: s("client"),
        port: n("port"),
        target: s("target"),
        up: n("up"),
        down: n("down"),
        duration: v["duration"]
            .as_f64()
            .unwrap_or_else(|| panic!("duration is not a number in {line}")),
        end: s("end"),
        reason: obj.contains_key("reason").then(|| s("reason")),
        attempts: v["attempts"].as_u64(),
        failed: obj.contains_key("failed").then(|| s("failed")),
        timings,
        line: line.to_owned(),
    })
}

/// Every line of the log is an event of the format: for JSON an object with `ts`, `level` and
/// `msg`; for text a timestamp, a padded level and a message.
fn assert_every_line_is_an_event(lines: &[String], json: bool) {
    assert!(!lines.is_empty());
    for l in lines {
        if json {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {l:?}"));
            assert!(v.is_object(), "not an object: {l}");
            assert!(v["ts"].as_str().is_some_and(is_timestamp), "ts of {l}");
            assert!(
                ["error", "warn", "info", "debug"].contains(&v["level"].as_str().unwrap_or("")),
                "level of {l}"
            );
            assert!(
                v["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "msg of {l}"
            );
        } else {
            assert!(text_event(l).is_some(), "not a text log line: {l:?}");
        }
    }
}

fn access_log(format: &str) {
    let log = AccessLog::start(format);
    log.a_relayed_connection_is_logged();
    log.an_idle_connection_is_logged();
    log.a_connection_no_target_takes_warns();
    log.stop_and_check_every_line();
}

/// An app name that needs quoting in the text format and escaping in JSON.
const ACCESS_APP: &str = "We.ird_app-1";
/// Bytes sent up on the known connection.
const ACCESS_K: usize = 1234;

/// The proxy of `access_log`: app ACCESS_APP on a tagged echo, app `b` on a refusing target.
struct AccessLog {
    p: Proxy,
    json: bool,
    tagged: Backend,
    refusing: Refusing,
}

/// The conn records logged so far.
fn conns(p: &Proxy, json: bool) -> Vec<Conn> {
    p.logs()
        .iter()
        .filter_map(|l| {
            if json {
                conn_from_json(l)
            } else {
                conn_from_text(l)
            }
        })
        .collect()
}

impl AccessLog {
    fn start(format: &str) -> AccessLog {
        let tagged = Backend::tagged("tag");
        let refusing = Refusing::new();
        let p = Proxy::simple()
            .ports(2, |ports| {
                config(&[
                    app(ACCESS_APP, &ports[..1], &[tagged.target()]),
                    app("b", &ports[1..], &[refusing.target()]),
                ])
            })
            .args(&["--log-format", format, "--idle-timeout", "1s"])
            .start();
        AccessLog {
            p,
            json: format == "json",
            tagged,
            refusing,
        }
    }

    /// The conn record of `client`, once logged.
    fn wait_conn(&self, client: SocketAddr) -> Conn {
        let want = canonical(client).to_string();
        wait_for(&format!("the conn line of {want}"), WAIT, || {
            conns(&self.p, self.json)
                .into_iter()
                .find(|c| c.client == want)
        })
    }

    /// A known connection: ACCESS_K (1234) bytes up, the tag line and their echo down.
    fn a_relayed_connection_is_logged(&self) {
        let mut s = connect(self.p.v4(0));
        assert_eq!(read_line(&mut s), "tag");
        roundtrip(&mut s, &bytes(ACCESS_K, 7));
        let local = s.local_addr().unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s, WAIT);
        let c = self.wait_conn(local);
        assert_eq!(c.level, "info", "{}", c.line);
        assert_eq!(c.app, ACCESS_APP, "{}", c.line);
        assert_eq!(c.client, local.to_string(), "{}", c.line);
        assert_eq!(c.port, u64::from(self.p.ports[0]), "{}", c.line);
        assert_eq!(c.target, self.tagged.target(), "{}", c.line);
        assert_eq!(
            (c.up, c.down),
            (ACCESS_K as u64, ACCESS_K as u64 + 4),
            "{}",
            c.line
        );
        assert!(c.duration >= 0.0 && c.duration < 10.0, "{}", c.line);
        assert_eq!(c.end, "closed", "{}", c.line);
        assert_eq!(c.reason, None, "{}", c.line);
        assert_eq!(
            c.timings,
            ["queue_wait", "connect_time", "attempts", "first_byte"],
            "{}",
            c.line
        );
        assert_eq!(c.attempts, Some(1), "{}", c.line);
    }

    /// An idle connection, from IPv6: closed by the idle timeout.
    fn an_idle_connection_is_logged(&self) {
        let mut idle = connect(self.p.v6(0));
        assert_eq!(read_line(&mut idle), "tag");
        let local6 = idle.local_addr().unwrap();
        expect_closed(&mut idle, WAIT);
        let c = self.wait_conn(local6);
        assert_eq!(c.level, "info", "{}", c.line);
        assert!(c.client.starts_with("[::1]:"), "{}", c.line);
        assert_eq!(c.port, u64::from(self.p.ports[0]), "{}", c.line);
        assert_eq!((c.up, c.down), (0, 4), "{}", c.line);
        assert_eq!(c.end, "idle_timeout", "{}", c.line);
        assert!(c.duration >= 0.95, "idle for 1s but {}", c.line);
        assert_eq!(c.reason, None, "{}", c.line);
    }

    /// A connection no target takes: a warning with the reason.
    fn a_connection_no_target_takes_warns(&self) {
        let mut failed = connect(self.p.v4(1));
        let local_f = failed.local_addr().unwrap();
        expect_closed(&mut failed, WAIT);
        let c = self.wait_conn(local_f);
        assert_eq!(c.level, "warn", "{}", c.line);
        assert_eq!(c.app, "b", "{}", c.line);
        assert_eq!(c.port, u64::from(self.p.ports[1]), "{}", c.line);
        assert_eq!(c.target, "-", "{}", c.line);
        assert_eq!((c.up, c.down), (0, 0), "{}", c.line);
        assert_eq!(c.end, "connect_failed", "{}", c.line);
        let reason = c
            .reason
            .as_deref()
            .unwrap_or_else(|| panic!("no reason: {}", c.line));
        assert!(
            reason.contains(&self.refusing.target()) && reason.contains("refused"),
            "{}",
            c.line
        );
        assert_eq!(
            c.timings,
            ["queue_wait", "attempts", "failed"],
            "{}",
            c.line
        );
        assert_eq!(c.attempts, Some(1), "{}", c.line);
        assert_eq!(
            c.failed,
            Some(format!("{}/refused", self.refusing.target())),
            "{}",
            c.line
        );
    }

    /// Stop, so the log is complete; one conn record per connection, every line an event.
    fn stop_and_check_every_line(self) {
        let json = self.json;
        let mut p = self.p;
        p.signal(libc::SIGTERM);
        let status = p.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0));
        assert_eq!(conns(&p, json).len(), 3, "{:#?}", conns(&p, json));
        assert_every_line_is_an_event(&p.logs(), json);
        if json {
            let events: Vec<Value> = p
                .logs()
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .filter(|v: &Value| v["msg"] != "conn")
                .collect();
            for v in &events {
                assert_eq!(
                    v.as_object().unwrap().len(),
                    3,
                    "events other than conn have ts, level and msg only: {v}"
                );
            }
            assert!(
                events.iter().any(|v| v["msg"]
                    .as_str()
                    .unwrap()
                    .starts_with("started mode=simple ")),
                "{events:#?}"
            );
        }
    }
}

#[test]
fn access_log_json() {
    access_log("json");
}

#[test]
fn access_log_text() {
    access_log("text");
}

/// An app name with a line break (which would split a log record) is refused since issue 11,
/// with one error line that shows the name escaped; no forged line reaches the log.
#[test]
fn an_app_name_with_a_line_break_is_refused_on_one_line() {
    let echo = Backend::echo();
    let port = free_port();
    let mut p = Proxy::simple()
        .config(&config(&[app("evil\nname", &[port], &[echo.target()])]))
        .spawn();
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "{}", p.logs().join("\n"));
    assert_every_line_is_an_event(&p.logs(), false);
    let refused: Vec<String> = p
        .logs()
        .into_iter()
        .filter(|l| l.contains("app \"evil\\nname\": Name: must be 1-64 characters"))
        .collect();
    assert_eq!(refused.len(), 1, "{:#?}", p.logs());
}

// ---------------------------------------------------------------------------------------------
// A blocked stderr

/// A proxy whose stderr the test reads only when it chooses to; killed on drop.
struct Gated {
    child: Child,
    _dir: TempDir,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Gated {
    /// Start reading stderr (the proxy's writer thread was blocked until now).
    fn read_stderr(&mut self) {
        let err = self.child.stderr.take().expect("stderr read once");
        let lines = Arc::clone(&self.lines);
        thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => lines.lock().unwrap().push(
                        String::from_utf8_lossy(&buf)
                            .trim_end_matches('\n')
                            .to_owned(),
                    ),
                }
            }
        });
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let lines = self.lines();
            eprintln!("---- flyproxy log, {} lines; the last 5 ----", lines.len());
            for l in lines.iter().rev().take(5).rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// With stderr blocked, log lines are dropped and counted (flyproxy_log_lines_dropped_total),
/// relaying and scraping go on, and once stderr drains the drop is reported: in the log's own
/// format, so with --log-format json as a JSON object like every other line.
#[test]
fn dropped_log_lines_are_counted_and_reported_in_the_log_format() {
    let echo = Backend::echo();
    let port = free_port();
    let maddr = metrics_addr();
    let dir = TempDir::new("gated");
    let cfg_path = dir.write(
        "config.json",
        &config(&[app("a", &[port], &[echo.target()])]),
    );
    let child = Command::new(BIN)
        .arg("simple")
        .arg("-c")
        .arg(&cfg_path)
        .args(["--log-format", "json", "--reload-interval", "100ms"])
        .args(["--metrics", &maddr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = Gated {
        child,
        _dir: dir,
        lines: Arc::default(),
    };
    let a = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Serving (so the loop, and its config watch, runs): a connection is relayed.
    wait_for("the proxy to relay", WAIT, || {
        if let Ok(Some(st)) = g.child.try_wait() {
            panic!("flyproxy exited: {st}");
        }
        let mut s = TcpStream::connect(a).ok()?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"up?").ok()?;
        let mut b = [0u8; 3];
        s.read_exact(&mut b).ok()?;
        Some(())
    });

    // A config with 40000 problems: one error line each, far more than the pipe and the
    // writer's queue hold while nobody reads stderr.
    let mut bad = String::from("{\"Apps\": []");
    for i in 0..40_000 {
        bad.push_str(&format!(",\"k{i}\":0"));
    }
    bad.push('}');
    write_atomically(&cfg_path, &bad);
    let m = scrape_until(maddr, "the rejected reload and dropped lines", |m| {
        m.value("flyproxy_reloads_total", &[("result", "rejected")]) == Some(1.0)
            && m.value("flyproxy_log_lines_dropped_total", &[]) > Some(0.0)
    });
    assert_eq!(m.get("flyproxy_reloads_total", &[("result", "ok")]), 0.0);
    // stderr is still blocked: relaying goes on.
    conversation(a, b"while stderr is blocked");

    g.read_stderr();
    let report = wait_for("the report of dropped lines", WAIT, || {
        g.lines()
            .into_iter()
            .find(|l| l.contains("log lines dropped"))
    });
    // Caught up: a new connection is logged.
    let local = conversation(a, b"after");
    let want = canonical(local).to_string();
    wait_for("the last connection's line", WAIT, || {
        g.lines().iter().any(|l| l.contains(&want)).then_some(())
    });
    let dropped = scrape(maddr).get("flyproxy_log_lines_dropped_total", &[]);
    let lines = g.lines();
    let reported: u64 = lines
        .iter()
        .filter_map(|l| {
            let at = l.find(" log lines dropped")?;
            let digits: String = l[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        reported as f64, dropped,
        "the log reports {reported} lines dropped, the metric says {dropped}"
    );
    assert!(
        dropped >= 10_000.0,
        "only {dropped} of 40000+ lines dropped with stderr blocked"
    );
    assert!(
        serde_json::from_str::<Value>(&report).is_ok_and(|v| v.is_object()),
        "with --log-format json the report of dropped lines is not JSON: {report:?} \
         (src/sys/log.rs, writer(), writes it as text)"
    );
    assert_every_line_is_an_event(&lines, true);
}
