//! Stopping: SIGTERM (or SIGINT) closes the listeners, lets open connections finish within
//! --drain-timeout, and exits 0; a second signal exits at once.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::*;
use modes::Env;
use netns::{assert_refused, v4, v6};

two_modes!(
    /// SIGTERM closes the listeners first (simple mode) or detaches the program (bpf mode, which
    /// then attaches nothing): new connections to every port are refused at once, on both
    /// families, while the open connections keep working; the proxy exits 0 as soon as the last
    /// one closes (well before --drain-timeout) and says every connection finished.
    sigterm_refuses_new_connections_at_once_and_drains_open_ones,
    sigterm_drains
);

fn sigterm_drains(env: Env) {
    let (alpha, beta) = (Backend::tagged("alpha"), Backend::tagged("beta"));
    let ports = env.ports(3);
    let (a1, a2, b1) = (ports[0], ports[1], ports[2]);
    let mut proxy = env
        .proxy()
        .config_on(
            &ports,
            &config(&[
                app("alpha", &[a1, a2], &[alpha.target()]),
                app("beta", &[b1], &[beta.target()]),
            ]),
        )
        .args(&["--drain-timeout", "60s"])
        .start();
    let steering = env.ns.as_ref().map(|ns| ns.steering(proxy.pid));
    let mut a = connect(v4(a1));
    assert_eq!(read_line(&mut a), "alpha");
    roundtrip(&mut a, b"one\n");
    let mut b = connect(v6(b1));
    assert_eq!(read_line(&mut b), "beta");
    roundtrip(&mut b, b"two\n");

    let mark = proxy.mark();
    proxy.signal(libc::SIGTERM);
    let stopping = proxy.wait_stopping(mark);
    assert!(stopping.contains(" 2 connections draining "), "{stopping}");

    // Listeners closed (bpf: detached) before that line was logged: every port refused, on
    // both families, while the proxy still runs.
    if let Some(ns) = &env.ns {
        assert_eq!(
            ns.links(),
            vec![],
            "sk_lookup link still attached after SIGTERM"
        );
        // The listener's own port too.
        assert_refused(netns::LISTENER_PORT);
    }
    for port in [a1, a2, b1] {
        assert_refused(port);
    }
    assert!(proxy.try_status().is_none(), "exited with connections open");

    // The open connections still relay, and the proxy waits for each.
    for i in 0..5 {
        roundtrip(&mut a, format!("one again {i}\n").as_bytes());
    }
    roundtrip(&mut b, b"two again\n");

    a.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut a, WAIT);
    let line = proxy.wait_conn(a.local_addr().unwrap());
    assert_eq!((line.port, line.end.as_str()), (a1, "closed"), "{line:?}");
    assert!(
        proxy.try_status().is_none(),
        "exited with a connection still open"
    );
    roundtrip(&mut b, b"two, alone\n");

    b.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut b, WAIT);
    // WAIT (20s) is well below the 60s drain timeout: the exit is the last connection's.
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let line = proxy.wait_conn(b.local_addr().unwrap());
    assert_eq!((line.port, line.end.as_str()), (b1, "closed"), "{line:?}");
    proxy.wait_stopped_clean(mark);
    if let (Some(ns), Some(steering)) = (&env.ns, &steering) {
        ns.wait_nothing_attached(steering);
    }
}

#[test]
fn sigterm_cuts_idle_connections_at_the_drain_timeout_and_exits_0() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .args(&["--drain-timeout", "500ms"])
        .start();
    let mut idle = connect(p.v4(0));
    roundtrip(&mut idle, b"hello");
    let local = idle.local_addr().unwrap();

    p.signal(libc::SIGTERM);
    p.wait_stopping(0);
    expect_closed(&mut idle, WAIT);
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let c = p.wait_conn(local);
    assert_eq!(c.end, "drained", "{}", c.line);
    p.wait_log("stopped", |l| l.contains(" stopped: "));
}

#[test]
fn sigterm_without_connections_exits_0_at_once() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    p.wait_stopped_clean(0);
}

#[test]
fn sigint_stops_like_sigterm() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    let mut open = connect(p.v4(0));
    roundtrip(&mut open, b"x");
    p.signal(libc::SIGINT);
    p.wait_stopping(0);
    expect_refused(p.v4(0));
    roundtrip(&mut open, b"still open");
    drop(open);
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A second stop signal while draining exits at once, cutting what is open.
#[test]
fn a_second_sigterm_exits_at_once() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    let mut open = connect(p.v4(0));
    roundtrip(&mut open, b"x");
    p.signal(libc::SIGTERM);
    p.wait_stopping(0);
    assert!(p.try_status().is_none());
    p.signal(libc::SIGTERM);
    // Default drain timeout is 30 s: exiting within a few seconds is "at once".
    let status = p.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "{status:?}");
    p.wait_log("second stop signal", |l| {
        l.contains(" WARN  second stop signal: exiting now, 1 connections cut")
    });
    expect_closed(&mut open, WAIT);
}

/// A SIGHUP that arrives while draining must not open listeners again: the proxy is going
/// away, and a client connecting to such a port would sit in its backlog until the exit.
#[test]
fn sighup_while_draining_opens_no_listener() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    let mut open = connect(p.v4(0));
    roundtrip(&mut open, b"x");
    p.signal(libc::SIGTERM);
    p.wait_stopping(0);

    let extra = free_port();
    p.rewrite_config(&config(&[app("a", &[p.ports[0], extra], &[echo.target()])]));
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    // The proxy may log the SIGHUP or ignore it silently: wait for a line about it, or give
    // it a bounded moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while p.lines_since(mark, |l| l.contains("SIGHUP")).is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    expect_refused(std::net::SocketAddr::from(([127, 0, 0, 1], extra)));
    expect_refused(p.v4(0));
    let applied = p.lines_since(mark, |l| l.contains("reload ok"));
    assert!(
        applied.is_empty(),
        "a reload was applied while stopping: {applied:?}"
    );

    roundtrip(&mut open, b"still draining");
    drop(open);
    assert_eq!(p.wait_exit(WAIT).code(), Some(0));
}

/// Issue 11, item 4: a SIGTERM during start-up exits 0 before serving, leaving nothing bound.
#[test]
fn sigterm_during_start_up_exits_cleanly() {
    let backend = Backend::echo();
    let port = common::free_port();
    let mut p = Proxy::simple()
        .config(&large_config(port, &backend.target()))
        .spawn();
    wait_for("the SIGTERM handler", WAIT, || {
        catches(p.pid, libc::SIGTERM).then_some(())
    });
    p.signal(libc::SIGTERM);
    let (code, log) = refused_start(&mut p);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stop signal during start-up"), "{log}");
    assert!(!log.contains(" started mode="), "{log}");
    expect_refused(SocketAddr::from(([127, 0, 0, 1], port)));
}

/// Issue 11, item 4, bpf mode: a SIGTERM during start-up exits 0 with no program attached and
/// no port steered.
#[test]
fn bpf_sigterm_during_start_up_leaves_nothing_attached() {
    netns::run(
        "bpf_sigterm_during_start_up_leaves_nothing_attached",
        |ns| {
            let backend = Backend::echo();
            let mut p = Proxy::bpf()
                .config(&large_config(7001, &backend.target()))
                .spawn();
            wait_for("the SIGTERM handler", WAIT, || {
                catches(p.pid, libc::SIGTERM).then_some(())
            });
            p.signal(libc::SIGTERM);
            let (code, log) = refused_start(&mut p);
            assert_eq!(code, Some(0), "{log}");
            assert!(log.contains("stop signal during start-up"), "{log}");
            assert!(ns.links().is_empty(), "{:?}", ns.links());
            expect_refused(netns::v4(7001));
            expect_refused(netns::v4(netns::LISTENER_PORT));
        },
    );
}

/// Issue 23: SIGQUIT (nginx's graceful stop) killed the proxy at once (exit 131, connections
/// cut). It now stops as SIGTERM does: listeners closed, the open connection finishes within
/// the drain, exit 0.
#[test]
fn sigquit_drains_like_sigterm() {
    let backend = Backend::echo();
    let mut proxy = serving(&["--drain-timeout", "60s"], &backend);
    let mut open = connect(proxy.v4(0));
    roundtrip(&mut open, b"before SIGQUIT\n");
    let mark = proxy.mark();
    proxy.signal(libc::SIGQUIT);
    let stopping = proxy.wait_stopping(mark);
    assert!(stopping.contains(" 1 connections draining "), "{stopping}");
    netns::assert_refused(proxy.ports[0]);
    roundtrip(&mut open, b"while draining\n");
    assert!(
        proxy.try_status().is_none(),
        "exited with a connection open"
    );
    drop(open);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", proxy.logs().join("\n"));
    proxy.wait_stopped_clean(mark);
}

/// Issue 23: SIGUSR1 killed the proxy (exit 138). No signal an operator may send by habit ends
/// it: SIGUSR1 (reopens the logs), SIGWINCH, SIGPIPE and SIGALRM leave it serving, the open
/// connection included, and it still stops cleanly on SIGTERM.
#[test]
fn habitual_signals_leave_the_proxy_running() {
    let backend = Backend::echo();
    let proxy = serving(&[], &backend);
    let mut open = connect(proxy.v4(0));
    for (sig, name) in [
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
    ] {
        let mark = proxy.mark();
        proxy.signal(sig);
        if sig == libc::SIGUSR1 {
            proxy.wait_log_since(mark, "the SIGUSR1 line", |l| {
                l.contains(" INFO  SIGUSR1: reopening the log files")
            });
        } else {
            // Nothing to wait for: give the kernel time to deliver it, then look.
            std::thread::sleep(Duration::from_millis(200));
        }
        roundtrip(&mut open, format!("after {name}\n").as_bytes());
        let mut fresh = connect(proxy.v4(0));
        roundtrip(&mut fresh, format!("new after {name}\n").as_bytes());
    }
    drop(open);
    assert_serves_then_stops(proxy);
}
