//! The status for people and programs, and the endpoint under clients that do not read
//! (issue 23): the HTML page (also in a real browser, headless Chromium), `/status.json`,
//! `flyproxy status` reading it and refusing what is not flyproxy's, the `process_*` families,
//! series born at 0, `promtool check metrics` on the exposition, and a scrape answered promptly
//! while 40 clients hold answers they never read.
//!
//! Chromium and promtool are Debian's `chromium` and `prometheus` (`make test` installs them).
//! Without them a test says so and passes, except in CI (`CI=true`), where it fails.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::metrics::{get, metrics_addr, request, scrape, scrape_until, Exposition};
use common::{app, config, wait_for, Proxy, Refusing, TempDir, WAIT};
use serde_json::Value;

/// A target that accepts connections and closes them (enough to be up), until `stop`: then its
/// port refuses, as a backend that was shut down.
struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn new() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            // The listener closes here: the port refuses from now on.
        });
        Sink {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Start `flyproxy simple` with `--metrics maddr` on `nports` fresh ports.
fn start(nports: usize, maddr: SocketAddr, make: impl Fn(&[u16]) -> String) -> Proxy {
    Proxy::start(nports, &["--metrics", &maddr.to_string()], make)
}

fn status_json(maddr: SocketAddr) -> Value {
    let r = get(maddr, "/status.json");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("/status.json: {e}: {}", r.body))
}

/// The state /status.json gives `target` of `app`.
fn state_of(st: &Value, app: &str, target: &str) -> Option<String> {
    st["apps"].as_array()?.iter().find(|a| a["name"] == app)?["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == target)
        .and_then(|t| t["state"].as_str().map(str::to_owned))
}

/// Make one connection to `port` (its app tries its target: a refusing one is marked down at
/// once) and wait until the proxy closes it.
fn poke(port: u16) {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let _ = s.read(&mut [0u8; 16]);
}

/// A tool the test needs: its path, or None (with a message) when it is missing outside CI.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!("`{name}` not found (Debian package {package}; `make test` installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The endpoint under clients that never read

/// Issue 23: with 1,500 apps `/metrics` is megabytes; 24 clients that sent `GET /metrics` and
/// never read held every place of the endpoint until their deadlines, one group after another,
/// and a scrape took 11.9 s (40 clients: 17.9 s), past Prometheus's 10 s timeout. Now a scrape
/// is answered within a second while 40 such clients are connected, and the proxy's threads
/// and descriptors stay bounded meanwhile.
#[test]
fn a_scrape_is_prompt_while_40_clients_never_read_a_multi_mb_answer() {
    const APPS: usize = 1500;
    let sinks = [Sink::new(), Sink::new(), Sink::new(), Sink::new()];
    let targets: Vec<String> = sinks.iter().map(Sink::target).collect();
    let maddr = metrics_addr();
    // Every app on one port, told apart by Hostnames: one listener for 1,500 apps. A long
    // check interval keeps 3,000 health checks from loading the machine.
    let p = start(1, maddr, |ports| {
        let apps: Vec<Value> = (0..APPS)
            .map(|i| {
                let mut a = app(&format!("app-{i:04}"), ports, &targets);
                a["Hostnames"] = serde_json::json!([format!("app{i}.example")]);
                a["HealthCheck"] = serde_json::json!({ "IntervalMs": 60000 });
                a
            })
            .collect();
        config(&apps)
    });
    // The answer must not fit whole in the socket buffers (the endpoint's send buffer grows
    // up to tcp_wmem's maximum, the client's receive buffer holds tcp_rmem's default), or a
    // client that never reads would have it all at once and hold nothing.
    // The time a scrape takes here with nobody in the way, before the clients come and after
    // they go: other tests' load stretches every scrape (a 10 MB answer, a debug build), and
    // moves while this test runs. The defect this guards made every scrape wait for groups of
    // stalled clients to time out, 2 s a group: 12-20 s.
    let alone_now = || {
        (0..2)
            .map(|_| {
                let t = Instant::now();
                let _ = get(maddr, "/metrics");
                t.elapsed()
            })
            .max()
            .unwrap_or_default()
    };
    let alone_before = alone_now();
    let size = get(maddr, "/metrics").body.len();
    let buffers = sysctl_max("tcp_wmem", 2) + sysctl_max("tcp_rmem", 1);
    assert!(
        size > buffers + (1 << 20),
        "/metrics is {size} bytes, the buffers hold {buffers}"
    );
    let threads_before = p.threads();
    let fds_before = fds_of(p.pid);

    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(maddr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        idle.push(s);
    }
    // The endpoint takes them in four at a time as each group stalls: wait until every one
    // was taken in and answered (its answer's first bytes wait unread in its socket, or it was
    // reset to make room), as it would be by the time a scraper comes. Peeking consumes
    // nothing: the clients' windows stay shut.
    wait_for("every non-reading client to be answered", WAIT, || {
        idle.iter()
            .all(|s| {
                s.set_nonblocking(true).unwrap();
                !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .then_some(())
    });
    let mut took_each = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let (raw, err) =
            common::metrics::exchange(maddr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", WAIT);
        let took = t.elapsed();
        assert!(
            err.is_none(),
            "scrape {i}: {err:?} after {} bytes",
            raw.len()
        );
        let r = common::metrics::parse_response(&raw);
        assert_eq!(r.status, 200);
        assert!(r.body.len() > buffers, "scrape {i}: {} bytes", r.body.len());
        took_each.push(took);
        // Bounded: no thread per connection, and no more descriptors than its places.
        let (threads, fds) = (p.threads(), fds_of(p.pid));
        assert!(
            threads <= threads_before,
            "threads {threads_before} -> {threads}"
        );
        assert!(
            fds <= fds_before + 4 + 1,
            "descriptors {fds_before} -> {fds}"
        );
    }
    drop(idle);
    let alone = alone_before.max(alone_now());
    // The fastest of the three within a second of a scrape alone (the "within 1 s" on
    // a quiet machine: the defect made every scrape wait), and none near one stalled group's
    // 2 s beyond twice that (a loaded machine stretched one scrape to 2.1x alone).
    let fastest = took_each.iter().min().copied().unwrap_or_default();
    assert!(
        fastest < alone + Duration::from_secs(1),
        "scrapes took {took_each:?} with 40 clients not reading ({alone:?} alone)"
    );
    for (i, took) in took_each.iter().enumerate() {
        assert!(
            *took < alone * 2 + Duration::from_secs(2),
            "scrape {i} took {took:?} with 40 clients not reading ({alone:?} alone)"
        );
    }
}

/// The `i`th number of /proc/sys/net/ipv4/`name`.
fn sysctl_max(name: &str, i: usize) -> usize {
    let v = fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    v.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn fds_of(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

// ---------------------------------------------------------------------------------------------
// /status.json, the page, `flyproxy status`

/// `/status.json`: the version, the bound, each app with its ports and hostnames, each target
/// with its state; a target that refuses shows down once a connection found it so.
#[test]
fn status_json_has_every_app_and_target_with_its_state() {
    let sink = Sink::new();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let p = start(3, maddr, |ports| {
        let shop = app("shop", &ports[1..2], &[refusing.target()]);
        let mut tls = app("tls", &ports[2..3], &[sink.target()]);
        tls["Hostnames"] = serde_json::json!(["a.example"]);
        config(&[app("web", &ports[..1], &[sink.target()]), shop, tls])
    });
    poke(p.ports[1]);
    let st = wait_for("the refusing target to show down", WAIT, || {
        let st = status_json(maddr);
        (state_of(&st, "shop", &refusing.target()).as_deref() == Some("down")).then_some(st)
    });
    assert_eq!(st["flyproxy"], env!("CARGO_PKG_VERSION"));
    assert!(st["time"].as_f64().unwrap() > 1.0e9);
    assert!(st["connections"]["limit"].as_u64().unwrap() > 0);
    assert_eq!(st["connections"]["accept_paused"], false);
    assert_eq!(st["reloads"]["ok"], 0);
    assert_eq!(st["config"]["sha256"].as_str().unwrap().len(), 64);
    let names: Vec<&str> = st["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "shop", "tls"]);
    let web = &st["apps"][0];
    assert_eq!(web["ports"], serde_json::json!([p.ports[0]]));
    assert_eq!(web["targets"][0]["target"], sink.target());
    assert_eq!(web["targets"][0]["state"], "up");
    let shop = &st["apps"][1];
    assert_eq!(shop["accepted"], 1);
    assert!(
        shop["targets"][0]["connect_failures"].as_u64() >= Some(1),
        "{shop}"
    );
    assert_eq!(shop["refused"]["connect_failed"], 1, "{shop}");
    assert_eq!(st["apps"][2]["hostnames"], serde_json::json!(["a.example"]));
    for key in ["open", "total", "bytes_sent", "bytes_received"] {
        assert!(web["targets"][0][key].is_u64(), "{key}: {web}");
    }
    for key in ["connect_failed", "limit", "client_limit"] {
        assert!(web["refused"][key].is_u64(), "{key}: {web}");
    }
}

/// The HTML page: at `/` and `/status` for a browser (Accept: text/html) and at
/// `/status.html`, with every app and target and its state; `/status` stays text and `/` not
/// found for everything else. (Names in a config are letters, digits, `.`, `_` and `-`, so
/// markup cannot reach the page through them today; `page.rs`'s unit test covers escaping.)
#[test]
fn the_html_page_has_every_app_and_target() {
    let sink = Sink::new();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let p = start(2, maddr, |ports| {
        config(&[
            app("web", &ports[..1], &[sink.target()]),
            app("shop", &ports[1..], &[refusing.target()]),
        ])
    });
    poke(p.ports[1]);
    wait_for("shop's target down", WAIT, || {
        (state_of(&status_json(maddr), "shop", &refusing.target()).as_deref() == Some("down"))
            .then_some(())
    });
    let browser = |path: &str| {
        request(
            maddr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\n\r\n")
                .as_bytes(),
        )
    };
    for r in [browser("/"), browser("/status"), get(maddr, "/status.html")] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
        let page = &r.body;
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        // Self-contained: nothing loaded from elsewhere.
        assert!(!page.contains("src=") && !page.contains("<link"), "{page}");
        assert!(page.contains(&format!(
            "data-app=\"web\" data-target=\"{}\" data-state=\"up\"",
            sink.target()
        )));
        assert!(page.contains(&format!(
            "data-app=\"shop\" data-target=\"{}\" data-state=\"down\"",
            refusing.target()
        )));
    }
    let r = get(maddr, "/status.html?refresh=2");
    assert!(r.body.contains("content=\"2\""));
    let text = get(maddr, "/status");
    assert!(text
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(text.body.starts_with("flyproxy "), "{}", text.body);
    assert_eq!(get(maddr, "/").status, 404);
}

/// `flyproxy status` prints what `/status` serves, read from `/status.json`.
#[test]
fn flyproxy_status_prints_the_status_text() {
    let sink = Sink::new();
    let maddr = metrics_addr();
    let _p = start(2, maddr, |ports| {
        config(&[app("web", ports, &[sink.target()])])
    });
    let out = common::run(&["status", "--metrics", &maddr.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, get(maddr, "/status").body);
    assert!(out.stdout.contains("\napp web  ports "), "{}", out.stdout);
}

/// Issue 23: with node_exporter on the address, `flyproxy status` printed its HTML and exited 0.
/// Now an answer that is not flyproxy's (an HTML page, another program's JSON) is refused:
/// exit 1, naming the address, nothing on stdout.
#[test]
fn flyproxy_status_refuses_an_answer_that_is_not_flyproxys() {
    let answers: [(&str, &str); 2] = [
        (
            "text/html",
            "<html><head><title>Node Exporter</title></head><body><a href=\"/metrics\">Metrics</a></body></html>",
        ),
        ("application/json", "{\"status\":\"ok\"}"),
    ];
    for (ctype, body) in answers {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            String::from_utf8(head).unwrap()
        });
        let out = common::run(&["status", "--metrics", &addr.to_string()]);
        let asked = server.join().unwrap();
        assert!(asked.starts_with("GET /status.json "), "{asked}");
        assert_eq!(out.code, Some(1), "{ctype}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(
            out.stderr
                .contains(&format!("unexpected answer from {addr}"))
                && out.stderr.contains("not a flyproxy status"),
            "{}",
            out.stderr
        );
    }
}

/// The default address is off 9100 (node_exporter's), and the help says which port and why.
#[test]
fn flyproxy_status_defaults_off_the_exporter_ports() {
    let out = common::run(&["status", "--help"]);
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains("(default 127.0.0.1:9089)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("9100: node_exporter"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("default 127.0.0.1:9100"),
        "{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The `process_*` families agree with /proc: the thread count, open descriptors, the
/// descriptor limit, resident memory; the start time is this run's.
#[test]
fn process_families_match_proc() {
    let sink = Sink::new();
    let maddr = metrics_addr();
    let started = unix_now();
    let p = start(1, maddr, |ports| {
        config(&[app("web", ports, &[sink.target()])])
    });
    // An idle proxy's threads do not change; retried in case one was on its way out.
    let m = wait_for("process_threads to match /proc", WAIT, || {
        let m = scrape(maddr);
        (m.get("process_threads", &[]) as usize == p.threads()).then_some(m)
    });
    let fds = m.get("process_open_fds", &[]);
    assert!(fds > 0.0);
    // The endpoint's own connection (and the scrape's) come and go: close to /proc's count.
    assert!(
        (fds - fds_of(p.pid) as f64).abs() <= 3.0,
        "{fds} vs {}",
        fds_of(p.pid)
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", p.pid)).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(m.get("process_max_fds", &[]), soft);
    let start = m.get("process_start_time_seconds", &[]);
    assert!(
        start >= started - 2.0 && start <= unix_now() + 1.0,
        "start {start}, test began {started}"
    );
    let rss = m.get("process_resident_memory_bytes", &[]);
    let vm_rss = common::rss_kib(p.pid) as f64 * 1024.0;
    assert!(
        rss > 0.0 && rss < vm_rss * 2.0 && rss > vm_rss / 2.0,
        "{rss} vs {vm_rss}"
    );
    assert!(m.get("process_virtual_memory_bytes", &[]) >= rss);
    let cpu = m.get("process_cpu_seconds_total", &[]);
    assert!((0.0..600.0).contains(&cpu), "{cpu}");
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_threads", "gauge"),
    ] {
        assert_eq!(
            m.family(name).unwrap().kind.as_deref(),
            Some(kind),
            "{name}"
        );
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Issue 23: `flyproxy_unrouted_connections_total` was born at its first event, so
/// `increase()` read 0 for the first burst. Now every (port, reason) the config makes possible
/// is there from the start at 0: on a port where apps have Hostnames, every reason of reading
/// the server name; on a port of an app on some addresses only, `no_app`; on a port of an app
/// on every address without Hostnames, none (nothing can go unrouted there).
#[test]
fn unrouted_series_are_born_at_zero() {
    let sink = Sink::new();
    let maddr = metrics_addr();
    let p = start(3, maddr, |ports| {
        let mut tls = app("tls", &ports[..1], &[sink.target()]);
        tls["Hostnames"] = serde_json::json!(["a.example"]);
        let mut local = app("local", &ports[1..2], &[sink.target()]);
        local["Addresses"] = serde_json::json!(["127.0.0.2"]);
        config(&[tls, local, app("plain", &ports[2..], &[sink.target()])])
    });
    let m = scrape(maddr);
    let name = "flyproxy_unrouted_connections_total";
    let (tls, local, plain) = (
        p.ports[0].to_string(),
        p.ports[1].to_string(),
        p.ports[2].to_string(),
    );
    for reason in [
        "no_server_name",
        "unknown_server_name",
        "not_tls",
        "too_large",
        "preread_timeout",
        "client_closed",
    ] {
        assert_eq!(
            m.value(name, &[("port", &tls), ("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
    assert_eq!(
        m.value(name, &[("port", &local), ("reason", "no_app")]),
        Some(0.0)
    );
    for s in m.samples(name) {
        assert_ne!(s.labels.get("port"), Some(&plain), "{s:?}");
    }
}

/// `promtool check metrics` (Prometheus's own linter) finds nothing in the exposition of a
/// config with apps, Hostnames and a target that is down.
#[test]
fn promtool_finds_nothing_in_the_exposition() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let sink = Sink::new();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let p = start(3, maddr, |ports| {
        let mut tls = app("tls", &ports[..1], &[sink.target()]);
        tls["Hostnames"] = serde_json::json!(["a.example", "*.b.example"]);
        config(&[
            tls,
            app("web", &ports[1..2], &[sink.target(), refusing.target()]),
            app("down", &ports[2..], &[refusing.target()]),
        ])
    });
    poke(p.ports[2]);
    // A connection relayed and closed, so that the histograms have observations.
    poke(p.ports[1]);
    let body = get(maddr, "/metrics").body;
    let m = Exposition::parse(&body).unwrap();
    // The families of issue 23's timings and health, with values, are in what promtool reads.
    for (family, kind) in [
        ("flyproxy_app_queued", "gauge"),
        ("flyproxy_connect_duration_seconds", "histogram"),
        ("flyproxy_connection_duration_seconds", "histogram"),
        ("flyproxy_target_connections_total", "counter"),
        ("flyproxy_target_connections_active", "gauge"),
        ("flyproxy_target_bytes_total", "counter"),
        ("flyproxy_target_connect_failures_total", "counter"),
        ("flyproxy_health_checks_total", "counter"),
        ("flyproxy_target_state_changes_total", "counter"),
        ("flyproxy_target_last_change_timestamp_seconds", "gauge"),
    ] {
        let f = m
            .family(family)
            .unwrap_or_else(|| panic!("{family} missing:\n{body}"));
        assert_eq!(f.kind.as_deref(), Some(kind), "{family}");
        assert!(!f.samples.is_empty(), "{family} has no samples");
    }
    assert!(
        m.get(
            "flyproxy_connection_duration_seconds_count",
            &[("app", "down")]
        ) >= 1.0,
        "{body}"
    );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Bounded at scale (issue 20): per-target series only up to --metrics-target-series targets,
// one app's all with ?app=NAME, the status listing the first 1,000 apps

/// `promtool check metrics` finds nothing in `body` (skipped, as above, without promtool).
fn promtool_clean(body: &str) {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {:?}\nstdout: {}\nstderr: {}\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Families labelled by target (the `flyproxy_target_*` ones, health checks, and the four
/// deprecated names).
fn target_families(m: &Exposition) -> Vec<String> {
    m.families
        .iter()
        .filter(|f| f.samples.iter().any(|s| s.labels.contains_key("target")))
        .map(|f| f.name.clone())
        .collect()
}

/// Every (name, labels) of `m`'s samples whose app is `app`.
fn series_of(m: &Exposition, app: &str) -> BTreeSet<String> {
    m.families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|s| s.labels.get("app").map(String::as_str) == Some(app))
        .map(|s| format!("{}{:?}", s.name, s.labels))
        .collect()
}

const OMITTED: &str = "flyproxy_target_series_omitted";

/// Three apps of two targets each, 6 targets, past a cap of 5: /metrics has every per-app
/// series and no per-target one, says how many targets it left out, and the log says so once;
/// `?app=NAME` has that app's per-target series all the same. A reload down to 4 targets
/// brings them back and the gauge goes.
#[test]
fn past_the_target_series_cap_only_per_app_series_and_the_count_left_out() {
    let sinks = [Sink::new(), Sink::new()];
    let targets: Vec<String> = sinks.iter().map(Sink::target).collect();
    let maddr = metrics_addr();
    let apps = |ports: &[u16], n: usize| {
        let names = ["web", "shop", "blog"];
        config(
            &(0..n)
                .map(|i| app(names[i], &ports[i..i + 1], &targets))
                .collect::<Vec<_>>(),
        )
    };
    let p = Proxy::start(
        3,
        &[
            "--metrics",
            &maddr.to_string(),
            "--metrics-target-series",
            "5",
            "--reload-interval",
            "100ms",
        ],
        |ports| apps(ports, 3),
    );
    for _ in 0..3 {
        let body = get(maddr, "/metrics").body;
        let m = Exposition::parse(&body).unwrap();
        assert_eq!(target_families(&m), Vec::<String>::new(), "{body}");
        assert_eq!(m.get(OMITTED, &[]), 6.0);
        assert_eq!(
            m.label_values("flyproxy_app_connections_total", "app"),
            ["blog", "shop", "web"].map(String::from).into()
        );
        assert!(m.family("flyproxy_connect_duration_seconds").is_some());
        assert!(m.family("flyproxy_reloads_total").is_some());
        promtool_clean(&body);
    }
    let said = p.lines(|l| l.contains("more than --metrics-target-series 5"));
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("6 targets"), "{}", said[0]);

    let one = get(maddr, "/metrics?app=shop");
    assert_eq!(one.status, 200, "{one:?}");
    assert!(one
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = Exposition::parse(&one.body).unwrap();
    let apps_seen: BTreeSet<String> = m
        .families
        .iter()
        .flat_map(|f| &f.samples)
        .filter_map(|s| s.labels.get("app").cloned())
        .collect();
    assert_eq!(apps_seen, ["shop".to_owned()].into(), "{}", one.body);
    assert_eq!(
        m.label_values("flyproxy_target_connections_total", "target"),
        targets.iter().cloned().collect()
    );
    assert_eq!(m.samples("flyproxy_target_up").len(), 2);
    assert!(m.family(OMITTED).is_none());
    promtool_clean(&one.body);

    let mark = p.mark();
    p.rewrite_config(&apps(&p.ports, 2));
    p.wait_reload_ok(mark);
    let m = scrape(maddr);
    assert!(m.family(OMITTED).is_none(), "{}", m.text);
    assert_eq!(m.samples("flyproxy_target_up").len(), 4, "{}", m.text);
}

const APPS_OMITTED: &str = "flyproxy_app_series_omitted";

/// The samples of the per-app families (the runtime state's included), each labelled by app
/// under the bound.
const PER_APP: [&str; 12] = [
    "flyproxy_app_connections_total",
    "flyproxy_app_connections_active",
    "flyproxy_app_connections_refused_total",
    "flyproxy_app_queued",
    "flyproxy_connect_duration_seconds_bucket",
    "flyproxy_connect_duration_seconds_sum",
    "flyproxy_connect_duration_seconds_count",
    "flyproxy_connection_duration_seconds_bucket",
    "flyproxy_connection_duration_seconds_sum",
    "flyproxy_connection_duration_seconds_count",
    "flyproxy_app_enabled",
    "flyproxy_app_refused_disabled_total",
];

/// Three apps past `--metrics-app-series 2`: /metrics has no per-app series; each per-app
/// family is one series without the app label holding every app's sum (checked against the
/// connections made: web 2 relayed, shop 1, blog 1 whose target refuses), the gauge says 3
/// apps were left out, and the log says so once. `?app=NAME` has that app's series all the
/// same. A reload down to 2 apps (at the bound) brings the per-app series back, exactly one an
/// app, and the gauge goes.
#[test]
fn past_the_app_series_cap_each_per_app_family_is_every_apps_sum() {
    let sink = Sink::new();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let apps = |ports: &[u16], n: usize| {
        let all = [
            app("web", &ports[..1], &[sink.target()]),
            app("shop", &ports[1..2], &[sink.target()]),
            app("blog", &ports[2..], &[refusing.target()]),
        ];
        config(&all[..n])
    };
    let p = Proxy::start(
        3,
        &[
            "--metrics",
            &maddr.to_string(),
            "--metrics-app-series",
            "2",
            "--reload-interval",
            "100ms",
        ],
        |ports| apps(ports, 3),
    );
    for port in [p.ports[0], p.ports[0], p.ports[1], p.ports[2]] {
        poke(port);
    }
    let count = "flyproxy_connection_duration_seconds_count";
    let m = scrape_until(maddr, "4 connections closed", |m| {
        m.value(count, &[]) == Some(4.0)
    });
    for _ in 0..3 {
        let body = get(maddr, "/metrics").body;
        let m = Exposition::parse(&body).unwrap();
        for name in PER_APP {
            let family = m.samples(name);
            assert!(!family.is_empty(), "{name} missing:\n{body}");
            assert!(
                family.iter().all(|s| !s.labels.contains_key("app")),
                "{name} has a per-app series:\n{body}"
            );
        }
        assert_eq!(m.get(APPS_OMITTED, &[]), 3.0);
        // Per-target series have their own bound (3 targets are under its default).
        assert_eq!(m.samples("flyproxy_target_up").len(), 3, "{body}");
        promtool_clean(&body);
    }
    assert_eq!(m.get("flyproxy_app_connections_total", &[]), 4.0);
    assert_eq!(m.get("flyproxy_app_connections_active", &[]), 0.0);
    let refused = "flyproxy_app_connections_refused_total";
    assert_eq!(m.get(refused, &[("reason", "connect_failed")]), 1.0);
    assert_eq!(m.get(refused, &[("reason", "limit")]), 0.0);
    assert_eq!(m.get(refused, &[("reason", "client_limit")]), 0.0);
    assert_eq!(m.get("flyproxy_app_queued", &[]), 0.0);
    // Relayed connections were connected: web's 2 and shop's 1.
    let connect = "flyproxy_connect_duration_seconds";
    assert_eq!(m.get(&format!("{connect}_count"), &[]), 3.0);
    assert_eq!(m.get(&format!("{connect}_bucket"), &[("le", "+Inf")]), 3.0);
    assert!(m.get(&format!("{connect}_sum"), &[]) > 0.0);
    assert_eq!(m.get("flyproxy_app_enabled", &[]), 3.0);
    assert_eq!(m.get("flyproxy_app_refused_disabled_total", &[]), 0.0);
    let said = p.lines(|l| l.contains("more than --metrics-app-series 2"));
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("3 apps"), "{}", said[0]);

    let one = get(maddr, "/metrics?app=web");
    assert_eq!(one.status, 200, "{one:?}");
    let m = Exposition::parse(&one.body).unwrap();
    for name in PER_APP {
        assert_eq!(
            m.label_values(name, "app"),
            ["web".to_owned()].into(),
            "{name}: {}",
            one.body
        );
    }
    assert_eq!(
        m.get("flyproxy_app_connections_total", &[("app", "web")]),
        2.0
    );
    assert_eq!(m.get(count, &[("app", "web")]), 2.0);
    assert!(m.family(APPS_OMITTED).is_none());
    promtool_clean(&one.body);

    let mark = p.mark();
    p.rewrite_config(&apps(&p.ports, 2));
    p.wait_reload_ok(mark);
    let body = get(maddr, "/metrics").body;
    let m = Exposition::parse(&body).unwrap();
    assert!(m.family(APPS_OMITTED).is_none(), "{body}");
    for name in PER_APP {
        let family = m.samples(name);
        assert!(
            family.iter().all(|s| s.labels.contains_key("app")),
            "{name}:\n{body}"
        );
        assert_eq!(
            m.label_values(name, "app"),
            ["shop", "web"].map(String::from).into(),
            "{name}"
        );
    }
    assert_eq!(
        m.get("flyproxy_app_connections_total", &[("app", "web")]),
        2.0
    );
    assert_eq!(m.get("flyproxy_app_enabled", &[("app", "shop")]), 1.0);
    promtool_clean(&body);
}

/// Under the default cap a config's /metrics is what it always was: every per-target family,
/// no gauge of omitted series; and `?app=NAME` (percent-encoded or not) serves exactly that
/// app's series of the whole exposition.
#[test]
fn a_small_config_keeps_every_series_and_one_app_is_its_part_of_them() {
    let sink = Sink::new();
    let refusing = Refusing::new();
    let maddr = metrics_addr();
    let _p = start(2, maddr, |ports| {
        config(&[
            app("web-1.x", &ports[..1], &[sink.target(), refusing.target()]),
            app("shop", &ports[1..], &[sink.target()]),
        ])
    });
    let m = scrape(maddr);
    assert!(m.family(OMITTED).is_none(), "{}", m.text);
    let fams = target_families(&m);
    for f in [
        "flyproxy_target_connections_total",
        "flyproxy_target_up",
        "flyproxy_target_bytes_total",
        "flyproxy_health_checks_total",
        "flyproxy_connections_total",
    ] {
        assert!(fams.iter().any(|n| n == f), "{f} missing: {fams:?}");
    }
    assert_eq!(m.samples("flyproxy_target_up").len(), 3);
    for q in ["web-1.x", "web%2D1%2ex", "w%65b-1.x"] {
        let r = get(maddr, &format!("/metrics?app={q}"));
        assert_eq!(r.status, 200, "{q}: {r:?}");
        let one = Exposition::parse(&r.body).unwrap();
        assert_eq!(series_of(&one, "web-1.x"), series_of(&m, "web-1.x"), "{q}");
        assert!(series_of(&one, "shop").is_empty());
    }
}

/// An app the config does not have is a 404 that names it, on every page that takes `app=`;
/// a malformed `app=` is a 400 that says what is wrong; parameters the endpoint does not know
/// are ignored, as they always were. `flyproxy status --app` shows one app, and exits 1 naming
/// an app the proxy does not have.
#[test]
fn one_app_by_name_and_clear_errors_for_unknown_apps_and_bad_queries() {
    let sink = Sink::new();
    let maddr = metrics_addr();
    let _p = start(2, maddr, |ports| {
        config(&[
            app("web", &ports[..1], &[sink.target()]),
            app("shop", &ports[1..], &[sink.target()]),
        ])
    });
    for path in ["/metrics", "/status", "/status.json", "/status.html"] {
        let r = get(maddr, &format!("{path}?app=nope"));
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert_eq!(
            r.body, "no app named \"nope\" in the config in force\n",
            "{path}"
        );
        for (q, why) in [
            ("app=%zz", "bad percent-encoding"),
            ("app=%C3", "bad percent-encoding"),
            ("app=", "needs an app name"),
            ("app=web&app=shop", "more than once"),
        ] {
            let r = get(maddr, &format!("{path}?{q}"));
            assert_eq!(r.status, 400, "{path}?{q}: {r:?}");
            assert!(r.body.contains(why), "{path}?{q}: {}", r.body);
        }
        let r = get(maddr, &format!("{path}?format=x&app=web&z"));
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    let st: Value = serde_json::from_str(&get(maddr, "/status.json?app=shop").body).unwrap();
    assert_eq!(st["apps"].as_array().unwrap().len(), 1);
    assert_eq!(st["apps"][0]["name"], "shop");
    assert_eq!(st["apps_total"], 2);
    let out = common::run(&["status", "--metrics", &maddr.to_string(), "--app", "shop"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, get(maddr, "/status?app=shop").body);
    assert!(out.stdout.contains("\napp shop  ports "), "{}", out.stdout);
    assert!(!out.stdout.contains("\napp web "), "{}", out.stdout);
    let out = common::run(&["status", "--metrics", &maddr.to_string(), "--app", "nope"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr.contains("no app named \"nope\""),
        "{}",
        out.stderr
    );
}

/// 1,001 apps: the status (JSON, text, page and `flyproxy status`) lists the first 1,000,
/// counts all 1,001 and says how to see the others; `?app=` shows the last one.
#[test]
fn the_status_lists_the_first_1000_apps_and_counts_them_all() {
    const APPS: usize = 1001;
    let sink = Sink::new();
    let maddr = metrics_addr();
    // Every app on one port, told apart by Hostnames; a long check interval keeps 1,001
    // health checks from loading the machine.
    let p = start(1, maddr, |ports| {
        let apps: Vec<Value> = (0..APPS)
            .map(|i| {
                let mut a = app(&format!("app-{i:04}"), ports, &[sink.target()]);
                a["Hostnames"] = serde_json::json!([format!("app{i}.example")]);
                a["HealthCheck"] = serde_json::json!({ "IntervalMs": 60000 });
                a
            })
            .collect();
        config(&apps)
    });
    let st = status_json(maddr);
    let listed = st["apps"].as_array().unwrap();
    assert_eq!(listed.len(), 1000);
    assert_eq!(listed[999]["name"], "app-0999");
    assert_eq!(st["apps_total"], APPS);
    let more = "1000 of 1001 apps shown (1 more): ?app=NAME, or flyproxy status --app NAME";
    let text = get(maddr, "/status").body;
    assert!(text.contains(more), "{}", &text[text.len() - 300..]);
    assert!(!text.contains("app app-1000 "));
    assert!(get(maddr, "/status.html").body.contains(more));
    let out = common::run(&["status", "--metrics", &maddr.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains(more));
    let one: Value = serde_json::from_str(&get(maddr, "/status.json?app=app-1000").body).unwrap();
    assert_eq!(one["apps"][0]["name"], "app-1000");
    assert_eq!(
        one["apps"][0]["hostnames"],
        serde_json::json!(["app1000.example"])
    );
    // One app's part costs about that app, not a render of all of them and a filter: 400
    // queries for the last app, on every page that takes `app=`, within a CPU-second (0.05 in
    // a debug build; the same queries each beside a whole page took 11.5).
    let cpu = p.cpu_secs();
    for _ in 0..100 {
        for path in ["/metrics", "/status", "/status.json", "/status.html"] {
            let r = get(maddr, &format!("{path}?app=app-1000"));
            assert_eq!(r.status, 200, "{path}: {r:?}");
        }
    }
    let used = p.cpu_secs() - cpu;
    assert!(used < 1.0, "400 one-app queries took {used:.2} CPU-s");
}

// ---------------------------------------------------------------------------------------------
// In a real browser

/// The page's DOM as headless Chromium builds it (scripts run), from a fresh profile.
fn dump_dom(chromium: &PathBuf, url: &str) -> String {
    let profile = TempDir::new("chromium");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path.display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that a hung browser goes with all its helper processes.
        .process_group(0)
        .spawn()
        .expect("spawn chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the group this test started; no memory is involved.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            panic!("chromium did not finish {url} within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let dom = reader.join().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.success() && !dom.is_empty(),
        "chromium {status:?}: {err}"
    );
    dom
}

/// Issue 23: the page in a real browser shows every app and target with its state, and a
/// target taken down (its backend stopped) shows as down by the next refresh.
#[test]
fn chromium_shows_every_target_and_one_taken_down() {
    let Some(chromium) = tool("chromium", "chromium") else {
        return;
    };
    let mut shop_backend = Sink::new();
    let web = [Sink::new(), Sink::new()];
    let maddr = metrics_addr();
    let p = start(2, maddr, |ports| {
        config(&[
            app("web", &ports[..1], &[web[0].target(), web[1].target()]),
            app("shop", &ports[1..], &[shop_backend.target()]),
        ])
    });
    const REFRESH: u64 = 1;
    let url = format!("http://{maddr}/status.html?refresh={REFRESH}");
    let row = |app: &str, target: &str, state: &str| {
        format!("data-app=\"{app}\" data-target=\"{target}\" data-state=\"{state}\"")
    };
    let dom = dump_dom(&chromium, &url);
    assert!(
        dom.contains(&format!("http-equiv=\"refresh\" content=\"{REFRESH}\"")),
        "{dom}"
    );
    for (app, target) in [
        ("web", web[0].target()),
        ("web", web[1].target()),
        ("shop", shop_backend.target()),
    ] {
        assert!(
            dom.contains(&row(app, &target, "up")),
            "{app} {target}:\n{dom}"
        );
    }
    assert!(dom.contains("app web") && dom.contains("app shop"), "{dom}");
    // The script ran: the rate cells were seen and the totals kept for the next load.
    assert!(dom.contains("data-rate=\"c1.0\""), "{dom}");

    // Take shop's backend down; the next connection finds it so.
    let target = shop_backend.target();
    shop_backend.stop();
    poke(p.ports[1]);
    let t = Instant::now();
    wait_for("shop's target down in /status.json", WAIT, || {
        (state_of(&status_json(maddr), "shop", &target).as_deref() == Some("down")).then_some(())
    });
    // What the next refresh of the page loads.
    thread::sleep(Duration::from_secs(REFRESH).saturating_sub(t.elapsed()));
    let dom = dump_dom(&chromium, &url);
    assert!(dom.contains(&row("shop", &target, "down")), "{dom}");
    assert!(dom.contains(">DOWN<"), "{dom}");
    assert!(dom.contains(&row("web", &web[0].target(), "up")), "{dom}");
}
