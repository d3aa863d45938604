//! Stopping: SIGTERM (or SIGINT) closes the listeners, lets open connections finish within
//! --drain-timeout, and exits 0; a second signal exits at once.

mod common;

use std::net::Shutdown;
use std::time::Duration;

use common::*;

#[test]
fn sigterm_drains_open_connections_then_exits_0() {
    let echo = Backend::echo();
    let mut p = Proxy::simple()
        .ports(2, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    let mut open = connect(p.v4(0));
    roundtrip(&mut open, b"before");
    let local = open.local_addr().unwrap();

    p.signal(libc::SIGTERM);
    let l = p.wait_log("stopping", |l| l.contains(" INFO  stopping: "));
    assert!(l.contains("1 connections draining"), "{l}");

    // Listeners are closed: new connections are refused, on every port and family.
    expect_refused(p.v4(0));
    expect_refused(p.v6(0));
    expect_refused(p.v4(1));
    // The open connection goes on working, and the proxy waits for it.
    for i in 0..5 {
        roundtrip(&mut open, format!("during drain {i}").as_bytes());
    }
    assert!(
        p.try_status().is_none(),
        "exited with a connection still open"
    );

    open.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut open, WAIT);
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
    p.wait_log("stopped", |l| {
        l.contains(" INFO  stopped: every connection finished")
    });
    let c = p.wait_conn(local);
    assert_eq!(c.end, "closed", "{}", c.line);
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
    p.wait_log("stopping", |l| l.contains(" INFO  stopping: "));
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
    p.wait_log("stopped", |l| {
        l.contains(" INFO  stopped: every connection finished")
    });
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
    p.wait_log("stopping", |l| l.contains(" INFO  stopping: "));
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
    p.wait_log("stopping", |l| l.contains(" INFO  stopping: "));
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
    p.wait_log("stopping", |l| l.contains(" INFO  stopping: "));

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
