//! The connection bound: past --max-connections, new connections wait in the kernel backlog
//! (connected, but not served) until a slot frees; the relay threads stay bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Threads besides the relay threads: the main (listener) thread, the health checker, the log
/// writer, and slack for a helper or two. A thread per connection (16 connections below) would
/// not fit.
const OTHER_THREADS: usize = 5;

#[test]
fn connections_past_the_limit_wait_until_a_slot_frees() {
    const MAX: usize = 5;
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("lim", ports, &[echo.target()])]))
        .args(&["--max-connections", "5"])
        .start();
    assert!(p
        .wait_log("started", |l| l.contains(" started "))
        .contains(" max_connections=5 "));

    let mut active: Vec<TcpStream> = (0..MAX)
        .map(|i| {
            let mut s = connect(p.v4(0));
            roundtrip(&mut s, format!("active {i}").as_bytes());
            s
        })
        .collect();
    assert_eq!(echo.served(), MAX);

    // The 6th connects (the kernel completes the handshake) but is not served.
    let mut sixth = connect(p.v4(0));
    sixth.write_all(b"sixth").unwrap();
    p.wait_log("connection limit reached", |l| {
        l.contains(" WARN  connection limit reached (5)")
    });
    expect_silent(&mut sixth, Duration::from_millis(500));
    assert_eq!(
        echo.served(),
        MAX,
        "the backend saw a connection past the limit"
    );

    // More waiting connections: still no more relay threads.
    let mut waiting: Vec<TcpStream> = (0..10)
        .map(|i| {
            let mut s = connect(p.v6(0));
            s.write_all(format!("waiting {i:02}").as_bytes()).unwrap();
            s
        })
        .collect();
    let threads = p.threads();
    assert!(
        threads <= MAX + OTHER_THREADS,
        "{threads} threads with {MAX} connections allowed"
    );
    assert_eq!(echo.served(), MAX);

    // One of the five closes: the 6th is served.
    let mark = p.mark();
    drop(active.remove(0));
    expect_reply(&mut sixth, b"sixth");
    p.wait_log_since(mark, "below the limit", |l| {
        l.contains("below the connection limit again")
    });
    roundtrip(&mut sixth, b" and more");

    // Close everything served so far: the waiting ones are served in turn, never more than
    // five at a time.
    drop(active);
    drop(sixth);
    for (i, mut w) in waiting.drain(..).enumerate() {
        expect_reply(&mut w, format!("waiting {i:02}").as_bytes());
        let threads = p.threads();
        assert!(
            threads <= MAX + OTHER_THREADS,
            "{threads} threads with {MAX} connections allowed"
        );
        drop(w); // its slot goes to the next one
    }
    assert_eq!(echo.served(), 16);
    // Every connection logged, none failed.
    let conns = p.wait_log_count(0, 16, "conn", |l| ConnLine::parse(l).is_some());
    for l in conns {
        assert!(l.contains(" end=closed"), "{l}");
    }
}

/// With a bound of one, connections one after another all get the one slot.
#[test]
fn a_limit_of_one_serves_connections_in_turn() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("one", ports, &[echo.target()])]))
        .args(&["--max-connections", "1"])
        .start();
    for i in 0..40 {
        let mut s = connect(p.v4(0));
        roundtrip(&mut s, format!("turn {i}").as_bytes());
    }
    assert_eq!(echo.served(), 40);
    assert!(p.threads() <= 1 + OTHER_THREADS);
}

/// Under a low open-file limit the proxy lowers its bound to what fits (saying so), and then
/// serves every connection within that bound, also after a burst of bulk traffic.
#[test]
fn a_low_fd_limit_lowers_the_bound_and_connections_within_it_are_served() {
    let echo = Backend::echo();
    let p = start_with_nofile(&echo);
    let bound = the_bound_is_lowered_to_fit(&p);
    let (base, after_burst) = a_stalled_bulk_burst_is_relayed(&p, bound);
    // Then as many connections as the bound allows, all open at once: each is served.
    let mut open = Vec::new();
    for i in 0..bound {
        let mut s = connect(p.v4(0));
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(format!("{i:04}").as_bytes()).unwrap();
        open.push(s);
    }
    for (i, s) in open.iter_mut().enumerate() {
        let mut got = [0u8; 4];
        if let Err(e) = s.read_exact(&mut got) {
            panic!(
                "connection {i} of {bound} (within the bound) not served: {e}\n\
                 ({base} descriptors open at start, {after_burst} after the burst)\n{}",
                p.lines(|l| l.contains("WARN") || l.contains("ERROR"))
                    .join("\n")
            );
        }
        assert_eq!(&got, format!("{i:04}").as_bytes());
    }
    let failed: Vec<String> =
        p.lines(|l| l.contains("end=connect_failed") || l.contains("accept failed"));
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The open-file limit the proxy gets.
const NOFILE: u64 = 256;
/// Bytes each way on each connection of the burst.
const BULK: usize = 8 << 20;

/// The proxy in simple mode on one port of `echo`, under an open-file limit of NOFILE.
fn start_with_nofile(echo: &Backend) -> Proxy {
    use std::process::Command;

    let ports = free_ports(1);
    let dir = TempDir::new("fdlimit");
    let cfg = dir.write(
        "config.json",
        &config(&[app("fd", &ports, &[echo.target()])]),
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("simple").arg("-c").arg(&cfg);
    with_fd_limit(&mut cmd, NOFILE);
    let mut p = Proxy::spawn_cmd(cmd, dir, cfg);
    p.ports = ports;
    p.wait_started().expect("started");
    p
}

/// The proxy says it lowers its bound, and starts with it: the bound.
fn the_bound_is_lowered_to_fit(p: &Proxy) -> usize {
    let warn = p.wait_log("the bound lowered", |l| l.contains("lowering the bound to"));
    let bound: usize = warn
        .rsplit("lowering the bound to ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{warn}"));
    let started = p.wait_log("started", |l| l.contains(" started "));
    assert!(
        started.contains(&format!(" max_connections={bound} ")),
        "{started}"
    );
    assert!(bound >= 10 && (bound as u64) * 2 < NOFILE, "bound {bound}");
    bound
}

/// A burst of bulk traffic whose readers stall for a moment, so that many connections have
/// bytes in flight both ways at once; then everything is read and closed. The proxy's
/// descriptors before and after.
fn a_stalled_bulk_burst_is_relayed(p: &Proxy, bound: usize) -> (usize, usize) {
    use std::thread;

    let stalled = bound.min(36);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", p.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let base = fds();
    let go = std::sync::Arc::new(std::sync::Barrier::new(stalled + 1));
    let bulk: Vec<_> = (0..stalled)
        .map(|i| {
            let s = connect(p.v4(0));
            let go = std::sync::Arc::clone(&go);
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    w.write_all(&vec![i as u8; BULK]).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                go.wait(); // start reading only once every connection is stalled
                let mut got = Vec::new();
                let mut s = s;
                s.read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                assert!(
                    got.len() == BULK && got.iter().all(|&b| b == i as u8),
                    "bulk {i}"
                );
            })
        })
        .collect();
    wait_for("the bulk connections to stall", WAIT, || {
        // Two sockets per connection. The relay would like a kernel pipe (two more
        // descriptors) per stalled direction, but at this limit the bound leaves it none, and
        // it must copy through a buffer instead rather than starve the sockets.
        (fds() >= base + stalled * 2).then_some(())
    });
    go.wait();
    for t in bulk {
        t.join().unwrap();
    }
    wait_for("the bulk connections to close", WAIT, || {
        (p.conns().len() >= stalled).then_some(())
    });
    (base, fds())
}
