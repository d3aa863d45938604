//! Config reloads: by the file changing (checked every --reload-interval) and by SIGHUP.
//! A reload is applied as a diff; a bad file, or a port that cannot be bound, changes nothing.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use modes::Env;
use netns::{assert_reaches, assert_refused};

/// Short reload interval so that file changes are seen quickly.
const FAST: &[&str] = &["--reload-interval", "100ms"];

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn reload_ok(l: &str) -> bool {
    l.contains(" INFO  reload ok: ")
}

#[test]
fn an_added_port_serves_after_reload_ok() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(FAST)
        .start();
    let new = free_port();
    expect_refused(v4(new));

    let mark = p.mark();
    p.rewrite_config(&config(&[app("a", &[p.ports[0], new], &[echo.target()])]));
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("ports_added=1 ports_removed=0"), "{line}");
    assert!(line.contains(&format!("added=[{new}]")), "{line}");

    for addr in [
        v4(new),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, new)),
        p.v4(0),
    ] {
        let mut s = connect(addr);
        roundtrip(&mut s, b"new port");
    }
}

/// A removed port refuses new connections at once; a connection already open on it goes on
/// working (the drain timeout is long here) and ends normally.
#[test]
fn a_removed_port_refuses_new_connections_and_keeps_open_ones() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(2, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(FAST)
        .start();
    let mut live = connect(p.v4(1));
    roundtrip(&mut live, b"before");
    let local = live.local_addr().unwrap();

    let mark = p.mark();
    p.rewrite_config(&config(&[app("a", &p.ports[..1], &[echo.target()])]));
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("ports_added=0 ports_removed=1"), "{line}");
    p.wait_log_since(mark, "draining", |l| {
        l.contains("reload: 1 connections on removed ports draining")
    });

    expect_refused(p.v4(1));
    expect_refused(p.v6(1));
    for i in 0..5 {
        roundtrip(&mut live, format!("after {i}").as_bytes());
    }
    let mut other = connect(p.v4(0));
    roundtrip(&mut other, b"the kept port still works");

    live.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut live, WAIT);
    let c = p.wait_conn(local);
    assert_eq!(c.end, "closed", "{}", c.line);
    assert_eq!(c.port, p.ports[1], "{}", c.line);
}

two_modes!(
    /// A port removed by a reload refuses new connections at once, while the connection already
    /// open on it keeps working until --drain-timeout, then is closed and logged `end=drained`
    /// (bpf mode: the port leaves the ports map). Connections on ports that stay are not touched.
    removed_port_drains_its_open_connection,
    removed_port_drains
);

fn removed_port_drains(env: Env) {
    const DRAIN_S: f64 = 4.0;
    let (alpha, beta) = (Backend::tagged("alpha"), Backend::tagged("beta"));
    let ports = env.ports(3);
    let (kept_port, removed_port, other_port) = (ports[0], ports[1], ports[2]);
    let two_apps = |alpha_ports: &[u16]| {
        config(&[
            app("alpha", alpha_ports, &[alpha.target()]),
            app("beta", &[other_port], &[beta.target()]),
        ])
    };
    let proxy = env
        .proxy()
        .config_on(&ports, &two_apps(&[kept_port, removed_port]))
        .fast_reload()
        .args(&["--drain-timeout", "4s"])
        .start();
    let steering = env.ns.as_ref().map(|ns| ns.steering(proxy.pid));

    let mut removed = connect(v4(removed_port));
    assert_eq!(read_line(&mut removed), "alpha");
    roundtrip(&mut removed, b"before the reload\n");
    let mut kept = connect(netns::v6(kept_port));
    assert_eq!(read_line(&mut kept), "alpha");
    let mut other = connect(v4(other_port));
    assert_eq!(read_line(&mut other), "beta");

    let mark = proxy.mark();
    let ok = proxy.reload(&two_apps(&[kept_port]));
    let since = std::time::Instant::now();
    assert!(ok.contains(" ports_added=0 ports_removed=1 "), "{ok}");
    proxy.wait_log_since(mark, "draining", |l| {
        l.contains("reload: 1 connections on removed ports draining for up to 4s")
    });
    if let Some(steering) = &steering {
        assert_eq!(
            steering.ports(),
            [kept_port, other_port].into_iter().collect()
        );
    }

    // New connections to the removed port: refused. The open one: still relayed.
    netns::assert_refused(removed_port);
    roundtrip(&mut removed, b"after the reload\n");

    // Cut at the drain deadline, and logged so.
    let line = proxy.wait_conn(removed.local_addr().unwrap());
    assert_eq!(
        (line.app.as_str(), line.port, line.end.as_str()),
        ("alpha", removed_port, "drained"),
        "{line:?}"
    );
    assert!(
        netns::duration_s(&line) >= DRAIN_S,
        "drained before the --drain-timeout had passed: {}",
        line.line
    );
    expect_closed(&mut removed, WAIT);
    assert!(since.elapsed() <= Duration::from_secs(15));
    proxy.wait_log_since(mark, "drain timeout", |l| {
        l.contains("drain timeout: closed 1 connections")
    });

    // The others were not drained.
    for (mut s, port) in [(kept, kept_port), (other, other_port)] {
        roundtrip(&mut s, b"still here\n");
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s, WAIT);
        let line = proxy.wait_conn(s.local_addr().unwrap());
        assert_eq!((line.port, line.end.as_str()), (port, "closed"), "{line:?}");
    }
    netns::assert_reaches(kept_port, "alpha");
}

two_modes!(
    /// A reload adds ports (they reach their app at once), removes ports (refused at once), moves
    /// a port to another app, and removes a whole app; in bpf mode the ports map follows each
    /// diff exactly. A rejected config changes nothing.
    reload_adds_and_removes_ports,
    adds_and_removes_ports
);

fn adds_and_removes_ports(env: Env) {
    let (alpha, beta) = (Backend::tagged("alpha"), Backend::tagged("beta"));
    let two_apps = |alpha_ports: &[u16], beta_ports: &[u16]| {
        config(&[
            app("alpha", alpha_ports, &[alpha.target()]),
            app("beta", beta_ports, &[beta.target()]),
        ])
    };
    // Alpha's 1-5 (4 and 5 come later) and beta's 1-3 (3 comes later).
    let p = env.ports(8);
    let (a1, a2, a3, a4, a5) = (p[0], p[1], p[2], p[3], p[4]);
    let (b1, b2, b3) = (p[5], p[6], p[7]);
    let set = |ports: &[u16]| {
        ports
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<u16>>()
    };
    let proxy = env
        .proxy()
        .config_on(&p, &two_apps(&[a1, a2, a3], &[b1, b2]))
        .fast_reload()
        .start();
    let steering = env.ns.as_ref().map(|ns| ns.steering(proxy.pid));
    assert_reaches(a2, "alpha");
    assert_reaches(b2, "beta");

    // a3 and b2 go, a4, a5 and b3 come, a2 moves from alpha to beta.
    let ok = proxy.reload(&two_apps(&[a1, a4, a5], &[b1, a2, b3]));
    assert!(ok.contains(" ports_added=3 ports_removed=2 "), "{ok}");
    if let Some(steering) = &steering {
        assert_eq!(steering.ports(), set(&[a1, a4, a5, b1, a2, b3]));
    }
    for port in [a1, a4, a5] {
        assert_reaches(port, "alpha");
    }
    for port in [b1, a2, b3] {
        assert_reaches(port, "beta");
    }
    assert_refused(a3);
    assert_refused(b2);

    // Beta goes altogether.
    let ok = proxy.reload(&config(&[app("alpha", &[a1, a4, a5], &[alpha.target()])]));
    assert!(
        ok.contains(" ports_added=0 ports_removed=3 apps_added=0 apps_removed=1 "),
        "{ok}"
    );
    if let Some(steering) = &steering {
        assert_eq!(steering.ports(), set(&[a1, a4, a5]));
    }
    for port in [b1, a2, b3] {
        assert_refused(port);
    }
    assert_reaches(a4, "alpha");

    // A config that fails validation is rejected whole: every port stays as it was.
    let mark = proxy.mark();
    proxy.rewrite_config(&format!(
        r#"{{"Apps": [{{"Name": "alpha", "Ports": [{a1}, 70000], "Targets": ["{}"]}}]}}"#,
        alpha.target()
    ));
    proxy.wait_reload_kept(mark);
    if let Some(steering) = &steering {
        assert_eq!(steering.ports(), set(&[a1, a4, a5]));
    }
    assert_reaches(a1, "alpha");
    assert_refused(a2);
}

/// New connections go to the new targets; a connection opened before stays on the old one.
#[test]
fn changed_targets_apply_to_new_connections_only() {
    let old = Backend::tagged("old");
    let new = Backend::tagged("new");
    let p = Proxy::simple()
        .ports(2, |ports| config(&[app("a", ports, &[old.target()])]))
        .args(FAST)
        .start();
    let mut before = connect(p.v4(0));
    assert_eq!(read_line(&mut before), "old");
    let local = before.local_addr().unwrap();

    let mark = p.mark();
    p.rewrite_config(&config(&[app("a", &p.ports, &[new.target()])]));
    let line = p.wait_reload_ok(mark);
    assert!(
        line.contains("ports_added=0 ports_removed=0 apps_added=0 apps_removed=0 apps_changed=1"),
        "{line}"
    );

    for i in 0..10 {
        assert_eq!(tag_of(p.v4(i % 2)), "new");
    }
    roundtrip(&mut before, b"still on the old backend");
    drop(before);
    let c = p.wait_conn(local);
    assert_eq!(c.target, old.target(), "{}", c.line);
}

/// A port can move from one app to another without its listener going away.
#[test]
fn a_port_moved_to_another_app_routes_to_it() {
    let a = Backend::tagged("a");
    let b = Backend::tagged("b");
    let p = Proxy::simple()
        .ports(3, |ports| {
            config(&[
                app("a", &ports[..2], &[a.target()]),
                app("b", &ports[2..], &[b.target()]),
            ])
        })
        .args(FAST)
        .start();
    assert_eq!(tag_of(p.v4(1)), "a");
    let mark = p.mark();
    p.rewrite_config(&config(&[
        app("a", &p.ports[..1], &[a.target()]),
        app("b", &p.ports[1..], &[b.target()]),
    ]));
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("ports_added=0 ports_removed=0"), "{line}");
    assert_eq!(tag_of(p.v4(0)), "a");
    assert_eq!(tag_of(p.v4(1)), "b");
    assert_eq!(tag_of(p.v6(2)), "b");
}

/// A file that does not parse, or that fails validation, is refused with its reasons; the
/// running config keeps serving; a fixed file is then picked up.
#[test]
fn an_invalid_file_is_rejected_and_the_old_config_kept() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(FAST)
        .start();
    let extra = free_port();

    // Not JSON at all.
    let mark = p.mark();
    p.rewrite_config("{\"Apps\": [ this is not json");
    let l = p.wait_reload_rejected(mark);
    assert!(
        l.contains(" ERROR ") && l.contains("not a valid config"),
        "{l}"
    );
    p.wait_reload_kept(mark);
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still served");

    // Valid JSON, invalid config: a port 0 next to a new port; neither is applied.
    let mark = p.mark();
    p.rewrite_config(&config(&[app(
        "a",
        &[p.ports[0], extra, 0],
        &[echo.target()],
    )]));
    let l = p.wait_reload_rejected(mark);
    assert!(l.contains("app \"a\": Ports: 0 is not a port"), "{l}");
    p.wait_reload_kept(mark);
    expect_refused(v4(extra));
    roundtrip(&mut s, b"still served");

    // An unknown key and a bad target: every problem is logged.
    let mark = p.mark();
    p.rewrite_config(r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["nope"],"Weight":1}]}"#);
    p.wait_reload_kept(mark);
    let rejected = p.lines_since(mark, |l| l.contains("reload rejected: "));
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("unknown key \"Weight\"")),
        "{rejected:#?}"
    );
    assert!(
        rejected.iter().any(|l| l.contains("Targets: \"nope\"")),
        "{rejected:#?}"
    );
    assert!(p.lines(reload_ok).is_empty(), "a rejected file was applied");
    roundtrip(&mut s, b"still served");

    // Fixed: applied.
    let mark = p.mark();
    p.rewrite_config(&config(&[app("a", &[p.ports[0], extra], &[echo.target()])]));
    p.wait_reload_ok(mark);
    let mut s2 = connect(v4(extra));
    roundtrip(&mut s2, b"extra");
}

/// A port that cannot be bound (another socket listens on it) refuses the whole reload: the
/// other new port is not opened and the targets are not changed. Once the port is free, a
/// SIGHUP applies the same file.
#[test]
fn a_port_that_cannot_be_bound_rejects_the_whole_reload() {
    let old = Backend::tagged("old");
    let new = Backend::tagged("new");
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[old.target()])]))
        .args(FAST)
        .start();
    let (free, busy) = (free_port(), free_port());
    let squatter = TcpListener::bind(("::", busy)).expect("occupy a port");

    let mark = p.mark();
    p.rewrite_config(&config(&[
        app("a", &p.ports, &[new.target()]),
        app("b", &[free, busy], &[new.target()]),
    ]));
    let l = p.wait_reload_rejected(mark);
    assert!(l.contains(&format!("cannot listen on port {busy}")), "{l}");
    assert!(l.contains("keeping the running config"), "{l}");
    expect_refused(v4(free));
    assert_eq!(tag_of(p.v4(0)), "old");
    assert!(p.lines(reload_ok).is_empty());

    // The port is freed; the unchanged file is applied on SIGHUP.
    drop(squatter);
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    p.wait_log_since(mark, "SIGHUP", |l| l.contains("SIGHUP: reloading"));
    let l = p.wait_reload_ok(mark);
    assert!(
        l.contains("ports_added=2") && l.contains("apps_added=1") && l.contains("apps_changed=1"),
        "{l}"
    );
    assert_eq!(tag_of(v4(free)), "new");
    assert_eq!(tag_of(v4(busy)), "new");
    assert_eq!(tag_of(p.v4(0)), "new");
}

/// With a reload interval of an hour only SIGHUP reloads; a SIGHUP with nothing changed says
/// so.
#[test]
fn sighup_forces_a_reload() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(&["--reload-interval", "1h"])
        .start();

    let mark = p.mark();
    p.signal(libc::SIGHUP);
    p.wait_log_since(mark, "config unchanged", |l| {
        l.contains(" INFO  reload: config unchanged")
    });

    let new = free_port();
    p.rewrite_config(&config(&[app("a", &[p.ports[0], new], &[echo.target()])]));
    expect_refused(v4(new));
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    let hup = p.wait_log_since(mark, "SIGHUP", |l| l.contains(" INFO  SIGHUP: reloading "));
    assert!(hup.contains(&p.config.display().to_string()), "{hup}");
    let l = p.wait_reload_ok(mark);
    assert!(l.contains("ports_added=1"), "{l}");
    let mut s = connect(v4(new));
    roundtrip(&mut s, b"after SIGHUP");
    assert_eq!(p.lines(reload_ok).len(), 1);
}

/// Twenty reloads, by file change and by SIGHUP, while a client connects continuously to ports
/// that stay: not one of its connections fails. The reloads add and remove another port and
/// change the streamed app's targets.
#[test]
fn reloads_under_a_steady_stream_of_connections_lose_nothing() {
    let e1 = Backend::echo();
    let e2 = Backend::echo_v6();
    let other = Backend::echo();
    let p = Proxy::simple()
        .ports(3, |ports| {
            config(&[
                app("stream", &ports[..2], &[e1.target()]),
                app("other", &ports[2..], &[other.target()]),
            ])
        })
        .args(FAST)
        .start();
    let (s0, s1, o0) = (p.ports[0], p.ports[1], p.ports[2]);
    let toggled = free_port();
    let client = StreamingClient::start(s0, s1);

    for i in 0..20 {
        let with_toggled = i % 2 == 0;
        let stream_targets = if i % 4 < 2 {
            vec![e1.target(), e2.target()]
        } else {
            vec![e2.target()]
        };
        let other_ports = if with_toggled {
            vec![o0, toggled]
        } else {
            vec![o0]
        };
        let mark = p.mark();
        p.rewrite_config(&config(&[
            app("stream", &[s0, s1], &stream_targets),
            app("other", &other_ports, &[other.target()]),
        ]));
        if i % 3 == 0 {
            p.signal(libc::SIGHUP);
        }
        p.wait_reload_ok(mark);
        if with_toggled {
            let mut s = connect(v4(toggled));
            roundtrip(&mut s, b"toggled on");
        } else {
            expect_refused(v4(toggled));
        }
    }
    let ok = client.run_on_then_stop();
    assert!(ok >= 40, "only {ok} connections in 20 reloads");
    assert_eq!(p.lines(reload_ok).len(), 20);
    assert!(p.lines(|l| l.contains("reload rejected")).is_empty());
    let bad: Vec<String> = p
        .conns()
        .into_iter()
        .filter(|c| c.end != "closed")
        .map(|c| c.line)
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(e1.served() > 0 && e2.served() > 0);
}

/// A client connecting continuously to two ports in turn, each connection one echoed line.
struct StreamingClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: thread::JoinHandle<()>,
}

impl StreamingClient {
    fn start(s0: u16, s1: u16) -> StreamingClient {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let thread = {
            let (stop, ok, failures) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failures));
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let port = if n % 2 == 0 { s0 } else { s1 };
                    match echo_one_line(port, n) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("port {port} conn {n}: {e}")),
                    }
                }
            })
        };
        StreamingClient {
            stop,
            ok,
            failures,
            thread,
        }
    }

    /// Let the client run a little past the last reload, then stop it: not one connection
    /// failed. How many succeeded.
    fn run_on_then_stop(self) -> usize {
        let at_end = self.ok.load(Ordering::Acquire);
        wait_for("a few more client connections", WAIT, || {
            (self.ok.load(Ordering::Acquire) >= at_end + 5).then_some(())
        });
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap();
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed connections, e.g. {:#?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        self.ok.load(Ordering::Acquire)
    }
}

/// Connection `n` to `port`: one line, echoed back in full before the end of stream.
fn echo_one_line(port: u16, n: u64) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(v4(port))?;
    s.set_read_timeout(Some(WAIT))?;
    let msg = format!("conn {n}\n");
    s.write_all(msg.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    if got != msg {
        return Err(std::io::Error::other(format!("echo {got:?} for {msg:?}")));
    }
    Ok(())
}

/// A change made to the file while the proxy is starting (after it read the file, before it
/// started watching it) is still picked up. The file is padded with whitespace so that parsing
/// it takes a while, and it is replaced as soon as the proxy has read it (its read-byte count
/// in /proc says so).
#[test]
fn a_change_made_while_starting_is_not_lost() {
    let echo = Backend::echo();
    let ports = free_ports(2);
    // Slow to load, under the 16 MiB cap: 700,000 copies of one target (about a second to
    // validate in a debug build).
    let padded = serde_json::to_string(&serde_json::json!({
        "Apps": [app("a", &ports[..1], &vec![echo.target(); 700_000])]
    }))
    .unwrap();
    let mut p = Proxy::simple().config(&padded).args(FAST).spawn();
    p.ports = ports.clone();
    let rchar = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    wait_for("the proxy to read its config", WAIT, || {
        (rchar(p.pid) >= padded.len() as u64).then_some(())
    });
    p.rewrite_config(&config(&[app("a", &ports, &[echo.target()])]));
    let started = p.logs().iter().any(|l| l.contains(" started "));
    p.wait_started().expect("started");
    assert!(
        !started,
        "the proxy started before the file was replaced: the test did not hit the window"
    );

    let line = p.wait_reload_ok(0);
    assert!(line.contains(&format!("added=[{}]", ports[1])), "{line}");
    let mut s = connect(v4(ports[1]));
    roundtrip(&mut s, b"changed while starting");
}

/// A config file that disappears is not a config change: the running config goes on serving,
/// a SIGHUP says it cannot read the file, and the file coming back is picked up.
#[test]
fn a_missing_config_file_keeps_the_running_config() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(FAST)
        .start();
    std::fs::remove_file(&p.config).unwrap();
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    let l = p.wait_reload_rejected(mark);
    assert!(l.contains("cannot read"), "{l}");
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still served");

    let extra = free_port();
    let mark = p.mark();
    p.rewrite_config(&config(&[app("a", &[p.ports[0], extra], &[echo.target()])]));
    let l = p.wait_reload_ok(mark);
    assert!(l.contains(&format!("added=[{extra}]")), "{l}");
    let mut s = connect(v4(extra));
    roundtrip(&mut s, b"back");
    assert!(p.lines(reload_ok).len() == 1);
}

/// Issue 20: a reload that gives an app the --metrics port is refused as start-up refuses
/// such a config, in the same words, and the running config serves on, the metrics endpoint
/// too. Before, simple mode failed the reload with "another process listens" (it tried to bind
/// the port), and bpf mode would have steered the metrics port's connections to the app.
fn metrics_port_reload_is_rejected(env: Env) {
    let echo = Backend::echo();
    let ports = env.ports(1);
    let maddr = env.metrics_addr();
    let served = app("served", &ports, &[echo.target()]);
    let p = env
        .proxy()
        .config_on(&ports, &config(std::slice::from_ref(&served)))
        .fast_reload()
        .args(&["--metrics", &maddr.to_string()])
        .start();
    let mark = p.mark();
    let greedy = app("greedy", &[maddr.port()], &[echo.target()]);
    p.rewrite_config(&config(&[served, greedy]));
    p.wait_reload_rejected_for(mark, &metrics_clash_words(maddr, "greedy"));
    assert!(
        p.lines_since(mark, is_reload_ok).is_empty(),
        "{:#?}",
        p.logs()
    );
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still served");
    let r = common::metrics::get(maddr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
}

two_modes!(metrics_port_reload, metrics_port_reload_is_rejected);

/// A reload past the bound is rejected whole and the running config keeps serving with no CPU
/// spent. Before, bpf mode logged `reload ok`, wrote the map until it was full (the old port
/// among those removed or not, as it happened) and retried the rest at every reload tick,
/// using about 90% of a core for as long as that config stayed.
fn too_many_pairs_reload_is_rejected(env: Env) {
    let echo = Backend::echo();
    let ports = env.ports(1);
    let served = app("served", &ports, &[echo.target()]);
    let p = env
        .proxy()
        .config_on(&ports, &config(std::slice::from_ref(&served)))
        .start();
    let mark = p.mark();
    let mut apps = full_range_apps(17);
    apps.push(served);
    p.rewrite_config(&config(&apps));
    p.wait_reload_rejected_for(mark, "(address, port) pairs in all");
    assert!(
        p.lines_since(mark, |l| l.contains("reload ok")
            || l.contains("bpf: cannot update"))
            .is_empty(),
        "{:#?}",
        p.logs()
    );
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still served");
    let cpu = p.cpu_during(Duration::from_secs(3));
    assert!(
        cpu < 1.0,
        "the proxy used {cpu:.2} CPU-s in 3 s after the rejected reload"
    );
}

two_modes!(too_many_pairs_reload, too_many_pairs_reload_is_rejected);

/// A reload that adds more listeners than the open-file limit leaves room for beside the
/// connection bound is refused before anything is bound, naming the numbers; one that fits is
/// applied. Before, simple mode bound until EMFILE (a range of 50,000 ports took every
/// descriptor for half a second, failing the connects and accepts of live traffic, before the
/// reload was rejected), and a range that happened to bind left too few descriptors for the
/// connection bound fitted at start.
#[test]
fn reload_past_the_descriptor_budget_is_refused() {
    const NOFILE: u64 = 400;
    let echo = Backend::echo();
    let ports = common::free_ports(1 + 150);
    let p = Proxy::simple()
        .config_on(
            &ports,
            &config(&[app("served", &ports[..1], &[echo.target()])]),
        )
        .args(&["--max-connections", "100"])
        .command(|cmd| with_fd_limit(cmd, NOFILE))
        .start();
    // 400 - (32 other + 66 health checks) - 2 * 100 connections: room for 102 listeners.
    let mark = p.mark();
    p.rewrite_config(&config(&[
        app("served", &ports[..1], &[echo.target()]),
        app("wide", &ports[1..], &[echo.target()]),
    ]));
    let rejected = p.wait_reload_rejected(mark);
    assert!(
        rejected.contains("the config needs 151 listening sockets")
            && rejected.contains("room for 102"),
        "{rejected}"
    );
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still served");
    // Nothing of the refused reload is listened on.
    common::expect_refused(p.v4(1));
    // Within the room: applied.
    let mark = p.mark();
    p.rewrite_config(&config(&[
        app("served", &ports[..1], &[echo.target()]),
        app("wide", &ports[1..61], &[echo.target()]),
    ]));
    p.wait_reload_ok(mark);
    let mut s = connect(p.v4(60));
    roundtrip(&mut s, b"new port served");
}

/// Issue 11, item 4: a SIGHUP while a large config is still being loaded does not kill the
/// proxy: it starts, then reloads.
#[test]
fn sighup_during_start_up_is_a_reload_once_serving() {
    let backend = Backend::echo();
    let port = common::free_port();
    let p = Proxy::simple()
        .config(&large_config(port, &backend.target()))
        .spawn();
    wait_for("the SIGHUP handler", WAIT, || {
        catches(p.pid, libc::SIGHUP).then_some(())
    });
    p.signal(libc::SIGHUP);
    p.wait_log("the start-up SIGHUP taken as a reload", |l| {
        l.contains("SIGHUP during start-up: reloading")
    });
    let started = p
        .logs()
        .iter()
        .position(|l| l.contains(" started mode=simple "));
    let reload = p
        .logs()
        .iter()
        .position(|l| l.contains("SIGHUP during start-up"));
    assert!(started < reload, "{}", p.logs().join("\n"));
    let mut p = p;
    p.ports = vec![port];
    assert_serves_then_stops(p);
}
