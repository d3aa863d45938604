//! Review of parking (issue 14) as an attacker would drive it, through the real binary: a peer
//! that speaks just after every park, a client that never reads, one thread shared by an
//! endless transfer and short connections, and silent TLS clients under `--max-threads`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A peer that sends one byte after every park (a pause longer than the old 250 ms hysteresis:
/// the connection has parked and its thread moved on), alternating
/// directions: every byte arrives, in order, and the proxy's CPU is bounded by the peer's own
/// rate (a handful of system calls per wake-up, not a spin).
#[test]
fn a_byte_after_every_park_arrives_in_order_at_little_cost() {
    let mut r = Relayed::start(&[]);
    let local = r.client.local_addr().unwrap();
    let rounds = 12u8;
    let cpu_before = r.proxy.cpu_secs();
    let began = Instant::now();
    for i in 0..rounds {
        thread::sleep(Duration::from_millis(280));
        let (from, to) = if i % 2 == 0 {
            (&mut r.client, &mut r.target)
        } else {
            (&mut r.target, &mut r.client)
        };
        from.write_all(&[i]).unwrap();
        let mut b = [0u8; 1];
        to.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i, "byte {i} arrived out of order");
    }
    let cpu = r.proxy.cpu_secs() - cpu_before;
    eprintln!(
        "{rounds} park/resume rounds in {:?}: {cpu:.3} s CPU",
        began.elapsed()
    );
    assert!(cpu < 0.5, "{rounds} wake-ups cost {cpu:.2} s of CPU");
    r.client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut r.target), b"");
    r.target.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut r.client), b"");
    let c = r.proxy.wait_conn(local);
    let half = u64::from(rounds) / 2;
    assert_eq!(
        (c.end.as_str(), c.up, c.down),
        ("closed", HELLO.len() as u64 + half, half),
        "{}",
        c.line
    );
}

/// A client that never reads while the target keeps sending: the proxy neither spins nor
/// buffers without bound (its RSS stays near where it was), and the idle timeout still cuts it.
#[test]
fn a_client_that_never_reads_costs_no_cpu_and_bounded_memory() {
    let mut r = Relayed::start(&["--idle-timeout", "4s"]);
    let local = r.client.local_addr().unwrap();
    r.target.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    // Fill every buffer on the way until the target can send no more.
    let full = wait_for("the path to fill up", Duration::from_secs(20), || {
        let mut blocked = 0;
        for _ in 0..200 {
            match r.target.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    blocked += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("target write: {e}"),
            }
        }
        (blocked == 200).then_some(sent)
    });
    let rss_before = rss_kib(r.proxy.pid);
    let cpu = r.proxy.cpu_during(Duration::from_secs(2));
    let rss_after = rss_kib(r.proxy.pid);
    eprintln!(
        "stalled after {full} bytes: {cpu:.3} s CPU in 2 s, RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(cpu < 0.3, "a stalled reader cost {cpu:.2} s of CPU in 2 s");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
    let c = r.proxy.wait_conn(local);
    assert_eq!(c.end, "idle_timeout", "{}", c.line);
}

/// `--max-threads 1`: one endless transfer and twenty short connections one after another;
/// every short one gets the thread within a bound while the transfer carries on.
#[test]
fn one_thread_shared_by_an_endless_transfer_and_short_connections() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("bulk", ports, &[echo.target()])]))
        .args(&["--max-threads", "1"])
        .start();
    let addr = p.v4(0);
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let s = connect(addr);
            let mut rd = s.try_clone().unwrap();
            let reader = thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = rd.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            });
            let chunk = vec![3u8; 256 * 1024];
            let mut w = s;
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.write_all(&chunk).expect("bulk write");
                sent += chunk.len() as u64;
            }
            w.shutdown(Shutdown::Write).unwrap();
            assert_eq!(reader.join().unwrap(), sent, "echoed bytes of the transfer");
            sent
        })
    };
    thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let began = Instant::now();
        let mut s = connect(addr);
        roundtrip(&mut s, format!("short {i}\n").as_bytes());
        worst = worst.max(began.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let moved = bulk.join().unwrap();
    eprintln!("20 short connections beside an endless transfer on 1 thread: worst {worst:?}; transfer moved {moved} bytes");
    assert!(
        worst < Duration::from_secs(2),
        "a connection waited {worst:?}"
    );
    assert!(moved > 0);
}

/// `--max-threads 2` and a hundred clients that connect to a port whose apps have Hostnames
/// and then send nothing (a slowloris on the preread): they wait without a thread, so a client
/// of another port is served at once, not after the preread timeout; a client that sends its
/// ClientHello in two parts with a pause longer than the park delay between them is routed
/// with every byte intact; the silent ones are still cut at the preread timeout.
#[test]
fn silent_tls_clients_do_not_hold_every_thread() {
    let echo = Backend::echo();
    let p = Proxy::simple().ports(2, |ports| {
            config(&[
                serde_json::json!({"Name": "tls", "Ports": [ports[0]], "Hostnames": ["x.example"], "Targets": [echo.target()]}),
                app("plain", &ports[1..], &[echo.target()]),
            ])
        }).args(&["--max-threads", "2", "--preread-timeout", "6s"]).start();
    let silent: Vec<TcpStream> = (0..100).map(|_| connect(p.v4(0))).collect();
    thread::sleep(Duration::from_millis(500));
    let threads = p.threads();
    let began = Instant::now();
    let mut s = connect(p.v4(1));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    roundtrip(&mut s, b"served?\n");
    let took = began.elapsed();
    eprintln!("100 silent TLS clients on 2 threads: proxy threads {threads}; a plain client served in {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "a plain client waited {took:?} behind silent TLS clients"
    );
    assert!(threads <= 12, "{threads} threads with 100 silent clients");

    // A ClientHello in two parts, the pause between them past the park delay.
    let hello = client_hello(Some("x.example"), 16 * 1024);
    let mut t = connect(p.v4(0));
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    t.write_all(&hello[..20]).unwrap();
    thread::sleep(Duration::from_millis(600));
    t.write_all(&hello[20..]).unwrap();
    let mut back = vec![0u8; hello.len()];
    t.read_exact(&mut back)
        .expect("the ClientHello echoed through the tls app");
    assert_eq!(back, hello, "the ClientHello reached the target changed");

    // The silent ones end at the preread timeout, each with its conn line.
    for c in &silent {
        let line = p.wait_conn(c.local_addr().unwrap());
        assert_eq!(
            (line.end.as_str(), line.reason.as_deref()),
            ("no_route", Some("preread_timeout")),
            "{}",
            line.line
        );
    }
    drop(silent);
}

/// `--max-threads 2` and an app with `MaxConnections 2`: two idle connections take its slots
/// (and park), two more wait for a slot. A client of another app must still be served at once;
/// the waiters must not hold every relay thread for the connect timeout.
/// Then the holders close and both waiters are served.
#[test]
fn waiters_for_an_apps_slot_do_not_hold_every_thread() {
    let echo = Backend::echo();
    let p = Proxy::simple()
        .ports(2, |ports| {
            let mut limited = app("limited", &ports[..1], &[echo.target()]);
            limited["MaxConnections"] = serde_json::json!(2);
            config(&[limited, app("free", &ports[1..], &[echo.target()])])
        })
        .args(&["--max-threads", "2", "--connect-timeout", "20s"])
        .start();
    let mut holders: Vec<TcpStream> = (0..2).map(|_| connect(p.v4(0))).collect();
    for (i, h) in holders.iter_mut().enumerate() {
        roundtrip(h, format!("holder {i}\n").as_bytes());
    }
    let mut waiters: Vec<TcpStream> = (0..2).map(|_| connect(p.v4(0))).collect();
    thread::sleep(Duration::from_millis(800));
    let began = Instant::now();
    let mut s = connect(p.v4(1));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    roundtrip(&mut s, b"served?\n");
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "a client of another app waited {took:?} behind two waiters for a slot"
    );
    drop(holders);
    for (i, w) in waiters.iter_mut().enumerate() {
        w.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        roundtrip(w, format!("waiter {i}\n").as_bytes());
    }
}

/// SIGTERM while connections wait without a thread, for their ClientHello and for a slot of
/// their app: the drain deadline cuts them (conn line `drained`) and the proxy exits, long
/// before the preread and connect timeouts.
#[test]
fn sigterm_drains_connections_waiting_for_a_hello_or_a_slot() {
    let echo = Backend::echo();
    let mut p = Proxy::simple().ports(2, |ports| {
            let mut limited = app("limited", &ports[1..], &[echo.target()]);
            limited["MaxConnections"] = serde_json::json!(1);
            config(&[
                serde_json::json!({"Name": "tls", "Ports": [ports[0]], "Hostnames": ["x.example"], "Targets": [echo.target()]}),
                limited,
            ])
        }).args(&[
            "--max-threads",
            "2",
            "--preread-timeout",
            "60s",
            "--connect-timeout",
            "60s",
            "--drain-timeout",
            "2s",
        ]).start();
    let silent: Vec<TcpStream> = (0..20).map(|_| connect(p.v4(0))).collect();
    let mut holder = connect(p.v4(1));
    roundtrip(&mut holder, b"holder\n");
    let waiter = connect(p.v4(1));
    thread::sleep(Duration::from_millis(500));
    let began = Instant::now();
    p.signal(libc::SIGTERM);
    for c in silent.iter().chain([&waiter]) {
        let line = p.wait_conn(c.local_addr().unwrap());
        assert_eq!(line.end, "drained", "{}", line.line);
    }
    let status = p.wait_exit(Duration::from_secs(30));
    let took = began.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_secs(15), "the drain took {took:?}");
}
