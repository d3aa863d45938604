//! `flyproxy simple` serving traffic: routing, spread, failover, byte-exact relaying,
//! half-close, timeouts and the log lines a user reads.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Every port of two apps reaches its own app's backend, from IPv4 and IPv6 clients, and the
/// log names the app, the client (IPv4 written plainly), the port and the target.
#[test]
fn every_port_routes_to_its_app_over_ipv4_and_ipv6() {
    let a = Backend::tagged("alpha");
    let b = Backend::tagged_v6("beta");
    let p = Proxy::simple()
        .ports(5, |ports| {
            config(&[
                app("alpha", &ports[..3], &[a.target()]),
                app("beta", &ports[3..], &[b.target()]),
            ])
        })
        .start();
    assert!(b.target().starts_with("[::1]:"), "{}", b.target());
    for i in 0..5 {
        let (want_app, want_backend) = if i < 3 { ("alpha", &a) } else { ("beta", &b) };
        for addr in [p.v4(i), p.v6(i)] {
            let mut s = connect(addr);
            assert_eq!(
                read_line(&mut s),
                want_app,
                "port {} via {addr}",
                p.ports[i]
            );
            roundtrip(&mut s, format!("hello port {}\n", p.ports[i]).as_bytes());
            let local = s.local_addr().unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            expect_closed(&mut s, WAIT);
            let c = p.wait_conn(local);
            assert_eq!(c.level, "INFO", "{}", c.line);
            assert_eq!(c.app, want_app, "{}", c.line);
            assert_eq!(c.port, p.ports[i], "{}", c.line);
            assert_eq!(c.target, want_backend.target(), "{}", c.line);
            assert_eq!(c.end, "closed", "{}", c.line);
            let hello = format!("hello port {}\n", p.ports[i]).len() as u64;
            assert_eq!(
                (c.up, c.down),
                (hello, hello + want_app.len() as u64 + 1),
                "{}",
                c.line
            );
            match addr {
                SocketAddr::V4(_) => assert!(c.client.starts_with("127.0.0.1:"), "{}", c.line),
                SocketAddr::V6(_) => assert!(c.client.starts_with("[::1]:"), "{}", c.line),
            }
        }
    }
    assert_eq!(a.served(), 6);
    assert_eq!(b.served(), 4);
}

/// Connections to one app are spread over all of its targets.
#[test]
fn connections_spread_over_every_target() {
    let backends = [
        Backend::tagged("t1"),
        Backend::tagged("t2"),
        Backend::tagged("t3"),
    ];
    let targets: Vec<String> = backends.iter().map(|b| b.target()).collect();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("spread", ports, &targets)]))
        .start();
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..60 {
        let mut s = connect(p.v4(0));
        *seen.entry(read_line(&mut s)).or_insert(0) += 1;
        roundtrip(&mut s, format!("{i}").as_bytes());
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["t1", "t2", "t3"],
        "{seen:?}"
    );
    // Each of three should get about 20; fewer than 5 is a one-in-a-million fluke at random.
    for (tag, n) in &seen {
        assert!(*n >= 5, "{tag} got only {n} of 60: {seen:?}");
    }
    assert_eq!(backends.iter().map(|b| b.served()).sum::<usize>(), 60);
}

/// With a refused and an unresolvable target next to a good one, every connection is served
/// (by the good one) and the log shows the failed attempts.
#[test]
fn fails_over_past_refused_and_unresolvable_targets() {
    let good = Backend::echo();
    let refused = Refusing::new();
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app(
                "fo",
                ports,
                &[refused.target(), UNRESOLVABLE.to_owned(), good.target()],
            )])
        })
        .start();
    for i in 0..30 {
        let mut s = connect(p.v4(0));
        roundtrip(&mut s, format!("attempt {i}\n").as_bytes());
    }
    assert_eq!(good.served(), 30);
    let conns = p.wait_log_count(0, 30, "conn", |l| ConnLine::parse(l).is_some());
    for l in &conns {
        let c = ConnLine::parse(l).unwrap();
        assert_eq!(c.target, good.target(), "{l}");
        assert_eq!(c.end, "closed", "{l}");
    }
    // The failed attempts are logged as warnings naming the target and why (the wording is
    // the proxy's: "connect target=X failed: ..." or "target X of app A is down: ...").
    let names = |l: &str, target: &str| {
        l.contains(&format!("target={target} ")) || l.contains(&format!("target {target} "))
    };
    let refused_line = p.wait_log("about the refused target", |l| {
        l.contains(" WARN ") && !l.contains(" conn ") && names(l, &refused.target())
    });
    assert!(refused_line.contains("refused"), "{refused_line}");
    let unresolvable_line = p.wait_log("about the unresolvable target", |l| {
        l.contains(" WARN ") && !l.contains(" conn ") && names(l, UNRESOLVABLE)
    });
    assert!(unresolvable_line.contains("resolve"), "{unresolvable_line}");
}

/// When no target can be reached the client's connection is closed at once (nothing is sent
/// to it), and the failure is logged with every target's reason.
#[test]
fn all_targets_down_closes_the_client_and_logs_connect_failed() {
    let refused = Refusing::new();
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app(
                "down",
                ports,
                &[refused.target(), UNRESOLVABLE.to_owned()],
            )])
        })
        .start();
    for _ in 0..3 {
        let started = Instant::now();
        let mut s = connect(p.v4(0));
        let local = s.local_addr().unwrap();
        expect_closed(&mut s, Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(10));
        let c = p.wait_conn(local);
        assert_eq!(c.level, "WARN", "{}", c.line);
        assert_eq!(c.app, "down", "{}", c.line);
        assert_eq!(c.target, "-", "{}", c.line);
        assert_eq!(c.end, "connect_failed", "{}", c.line);
        assert_eq!((c.up, c.down), (0, 0), "{}", c.line);
        let reason = c
            .reason
            .clone()
            .unwrap_or_else(|| panic!("no reason in {}", c.line));
        assert!(
            reason.contains(&refused.target()) && reason.contains("refused"),
            "{}",
            c.line
        );
        assert!(reason.contains(UNRESOLVABLE), "{}", c.line);
    }
}

/// A target that does not answer is given up after --connect-timeout, and the next target is
/// tried.
#[test]
fn connect_timeout_gives_up_on_a_silent_target() {
    let hole = Blackhole::new();
    let good = Backend::echo();
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[
                app("silent", &ports[..1], &[hole.target()]),
                app("mixed", &ports[1..], &[hole.target(), good.target()]),
            ])
        })
        .args(&["--connect-timeout", "300ms"])
        .start();
    let started = Instant::now();
    let mut s = connect(p.v4(0));
    let local = s.local_addr().unwrap();
    expect_closed(&mut s, WAIT);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "closed after {took:?}, before the connect timeout"
    );
    let c = p.wait_conn(local);
    assert_eq!(c.end, "connect_failed", "{}", c.line);
    assert!(
        c.reason
            .as_deref()
            .is_some_and(|r| r.contains(&hole.target()) && r.contains("timeout")),
        "{}",
        c.line
    );

    // Failover past the silent target: every connection is served.
    for i in 0..6 {
        let mut s = connect(p.v4(1));
        roundtrip(&mut s, format!("mixed {i}\n").as_bytes());
    }
    assert_eq!(good.served(), 6);
}

/// 64 MiB of pseudo-random bytes go up and come back down intact, read concurrently with the
/// writing, and the log counts every byte.
#[test]
fn sixty_four_mib_both_ways_intact() {
    const SIZE: usize = 64 << 20;
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("bulk", ports, &[echo.target()])]))
        .start();
    let mut data = vec![0u8; SIZE];
    Rng::new(0x5EED_F00D).fill(&mut data);
    let data = std::sync::Arc::new(data);

    let s = connect(p.v4(0));
    let local = s.local_addr().unwrap();
    let mut writer = s.try_clone().unwrap();
    let up = std::sync::Arc::clone(&data);
    let w = thread::spawn(move || {
        for chunk in up.chunks(200_000) {
            writer.write_all(chunk)?;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(SIZE);
    let mut reader = s;
    reader
        .read_to_end(&mut got)
        .expect("read the echo to the end");
    w.join().unwrap().expect("write 64 MiB");
    assert_eq!(got.len(), SIZE, "length of what came back");
    if got[..] != data[..] {
        let first = got
            .iter()
            .zip(data.iter())
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("the echo differs from what was sent, first at byte {first}");
    }
    let c = p.wait_conn(local);
    assert_eq!((c.up, c.down), (SIZE as u64, SIZE as u64), "{}", c.line);
    assert_eq!(c.end, "closed", "{}", c.line);
}

/// `echo hello | nc -N`: the client writes, shuts down its write side, and still gets the
/// whole reply; the backend sees the end of the request.
#[test]
fn half_close_still_gets_the_reply() {
    let echo = Backend::echo();
    let eof = Backend::reply_at_eof();
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[
                app("echo", &ports[..1], &[echo.target()]),
                app("eof", &ports[1..], &[eof.target()]),
            ])
        })
        .start();

    let mut s = connect(p.v4(0));
    s.write_all(b"hello\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello\n");

    // This backend answers only once it has seen EOF: the FIN must be carried through while
    // the reply direction stays open.
    let mut s = connect(p.v6(1));
    let local = s.local_addr().unwrap();
    let body = vec![b'x'; 300_000];
    s.write_all(&body).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "got 300000 bytes\n");
    let c = p.wait_conn(local);
    assert_eq!(
        (c.up, c.down, c.end.as_str()),
        (300_000, 17, "closed"),
        "{}",
        c.line
    );
}

/// A connection that moves no byte for --idle-timeout is closed and logged `idle_timeout`;
/// one that keeps moving bytes is not.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("idle", ports, &[echo.target()])]))
        // 1 s: the busy connection pauses 50 ms between bytes; on a machine loaded far past its
        // cores (load average 27 seen) a pause of 400 ms was once long enough to cut it.
        .args(&["--idle-timeout", "1s"])
        .start();

    // Busy for well over the timeout: a byte every 50 ms.
    let mut busy = connect(p.v4(0));
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        roundtrip(&mut busy, b".");
        thread::sleep(Duration::from_millis(50)); // pacing the traffic, not synchronisation
    }
    roundtrip(&mut busy, b"still here");
    let busy_local = busy.local_addr().unwrap();

    let mut idle = connect(p.v4(0));
    let local = idle.local_addr().unwrap();
    let sent = Instant::now();
    roundtrip(&mut idle, b"ping");
    expect_closed(&mut idle, WAIT);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "closed after {took:?}, before the idle timeout"
    );
    let c = p.wait_conn(local);
    assert_eq!(c.end, "idle_timeout", "{}", c.line);
    assert_eq!((c.up, c.down), (4, 4), "{}", c.line);

    // The busy connection was not cut while it moved bytes; idle since, it is cut too.
    expect_closed(&mut busy, WAIT);
    let c = p.wait_conn(busy_local);
    assert_eq!(c.end, "idle_timeout", "{}", c.line);
    assert!(c.up >= 10 && c.up == c.down, "{}", c.line);
    let secs: f64 = c.duration.trim_end_matches('s').parse().unwrap();
    assert!(secs >= 2.5 + 1.0, "{}", c.line);
}

/// The log: every line starts with an RFC 3339 UTC timestamp and a level; `started` gives the
/// mode, config, summary, the connection and thread bounds, the open-file limit and the pid.
#[test]
fn log_lines_have_a_timestamp_and_a_level() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(3, |ports| {
            config(&[
                app("x", &ports[..2], &[echo.target()]),
                app("y", &ports[2..], &[echo.target(), UNRESOLVABLE.into()]),
            ])
        })
        .args(&["--max-connections", "77"])
        .start();
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"x");
    let local = s.local_addr().unwrap();
    drop(s);
    p.wait_conn(local);
    let started = p.wait_log("started", |l| l.contains(" started "));
    // The descriptor budget: the open-file limit in force and what is set aside from it
    // (listeners, health checks, FD_RESERVE); last, the SHA-256 of the file's bytes
    // (tests/fleet.rs checks it against sha256sum).
    let fd_limit = field(&started, "fd_limit").unwrap_or_default();
    assert!(fd_limit.parse::<u64>().is_ok(), "{started}");
    let sha256 = flyproxy::config::sha256::hex(&std::fs::read(&p.config).unwrap());
    let want = format!(
        " INFO  started mode=simple config={} 2 apps, 3 ports, 3 targets max_connections=77 max_threads=77 fd_limit={fd_limit} fd_reserved={} health_checks_in_flight=64 pid={} sha256={sha256}",
        p.config.display(),
        32 + 3 + 66,
        p.pid
    );
    assert!(
        started.ends_with(&want),
        "{started:?} does not end with {want:?}"
    );
    for line in p.logs() {
        let (ts, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(is_rfc3339_utc(ts), "timestamp {ts:?} in {line:?}");
        let level = rest.split_whitespace().next().unwrap_or("");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG"].contains(&level),
            "level in {line:?}"
        );
    }
}

/// `2026-11-26T06:43:26.123Z`
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        r.into_iter()
            .all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
    };
    (ts.len() == 24 || ts.len() == 20)
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && ts.ends_with('Z')
}

/// `--log-level error` hides the info and warn lines (and so the `started` line too).
#[test]
fn log_level_filters_lines() {
    let echo = Backend::echo();
    // At error level there is no `started` line to wait for: wait on the port instead.
    let ports = free_ports(1);
    let p = Proxy::simple()
        .config(&config(&[app("q", &ports, &[echo.target()])]))
        .args(&["--log-level", "error"])
        .spawn();
    let addr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut s = wait_for("the quiet proxy to listen", WAIT, || {
        std::net::TcpStream::connect(addr).ok()
    });
    s.set_read_timeout(Some(WAIT)).unwrap();
    roundtrip(&mut s, b"quiet");
    drop(s);
    p.signal(libc::SIGTERM);
    let mut p = p;
    assert!(p.wait_exit(WAIT).success());
    let noisy: Vec<String> = p.lines(|l| !l.contains(" ERROR "));
    assert!(
        noisy.is_empty(),
        "lines below error at --log-level error: {noisy:#?}"
    );
}

/// Read until the end; how the stream ended: "eof" or the error kind.
fn read_to_end_how(s: &mut std::net::TcpStream) -> String {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return "eof".into(),
            Ok(_) => {}
            Err(e) => return format!("{:?}", e.kind()),
        }
    }
}

/// A reset on one side is passed on as a reset to the other (not an orderly end), both ways,
/// and logged `end=reset`.
#[test]
fn resets_are_passed_on_both_ways() {
    use std::net::TcpListener;
    use std::sync::mpsc;

    // A backend that tells the test how each of its connections ended, and resets the ones
    // that ask it to.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let (tx, ended) = mpsc::channel::<String>();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut buf = [0u8; 64];
                let n = match s.read(&mut buf) {
                    Ok(0) => return, // a health check
                    Ok(n) => n,
                    Err(e) => return drop(tx.send(format!("{:?}", e.kind()))),
                };
                if &buf[..n] == b"reset me" {
                    s.write_all(b"resetting\n").unwrap();
                    return close_with_reset(s);
                }
                s.write_all(&buf[..n]).unwrap();
                let how = read_to_end_how(&mut s);
                let _ = tx.send(how);
            });
        }
    });
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app("rst", ports, std::slice::from_ref(&target))])
        })
        .start();

    // The client resets: the backend sees a reset, not an EOF.
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"hello");
    let local = s.local_addr().unwrap();
    close_with_reset(s);
    let how = ended
        .recv_timeout(WAIT)
        .expect("the backend connection ended");
    assert_eq!(
        how, "ConnectionReset",
        "how the backend saw the client's reset"
    );
    let c = p.wait_conn(local);
    assert_eq!(c.end, "reset", "{}", c.line);

    // The backend resets: the client sees a reset, not an EOF.
    let mut s = connect(p.v4(0));
    let local = s.local_addr().unwrap();
    s.write_all(b"reset me").unwrap();
    let how = read_to_end_how(&mut s);
    assert_eq!(
        how, "ConnectionReset",
        "how the client saw the backend's reset"
    );
    let c = p.wait_conn(local);
    assert_eq!(c.end, "reset", "{}", c.line);
}

/// Many clients at once, each with a few exchanges: every one is served, bytes intact.
#[test]
fn many_concurrent_connections_are_all_served() {
    const CLIENTS: usize = 200;
    let echo = Backend::echo();
    let echo6 = Backend::echo_v6();
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[app("many", ports, &[echo.target(), echo6.target()])])
        })
        .start();
    let go = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = if i % 2 == 0 { p.v4(i % 2) } else { p.v6(i % 2) };
            let go = std::sync::Arc::clone(&go);
            thread::spawn(move || {
                let mut s = connect(addr);
                go.wait(); // all connected before any exchange
                for k in 0..3 {
                    roundtrip(&mut s, format!("client {i} message {k}\n").as_bytes());
                }
                s.shutdown(Shutdown::Write).unwrap();
                expect_closed(&mut s, WAIT);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    let lines = p.wait_log_count(0, CLIENTS, "conn", |l| ConnLine::parse(l).is_some());
    for l in lines {
        assert!(l.contains(" end=closed"), "{l}");
    }
    assert_eq!(echo.served() + echo6.served(), CLIENTS);
}
