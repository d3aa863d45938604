//! A connection's greeting (reading its ClientHello) and admission (waiting for a slot of its
//! app's MaxConnections) are steps run by the relay's event threads, as relaying is (issue 21):
//! a client trickling its ClientHello takes no thread of its own and costs about what the same
//! bytes cost relayed; waiters for a slot cost nothing while they wait and are served in
//! arrival order. (Per-client limits taken at accept on a Hostnames port: tests/limits.rs.)
//!
//! Everything runs through the real binary on real sockets, with the proxy's threads and CPU
//! time read from /proc. The greeting and admission are after `accept()`, on the code path both
//! modes share: simple mode only. Both tests hold thousands of connections (descriptors in the
//! test process and the proxy, CPU time measured): .config/nextest.toml runs them alone.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::metrics::scrape;
use common::*;
use serde_json::json;

/// Threads besides the relay threads: the listener loop (main), the health checker, the log
/// writer, the metrics endpoint, and slack.
const OTHER_THREADS: usize = 6;

/// A target that accepts every connection and keeps it open, unread, by the 4-byte index its
/// client sent first (0 for a connection that sent fewer), recording the order they came in.
struct Holder {
    addr: String,
    held: Arc<Mutex<HashMap<u32, TcpStream>>>,
    order: Arc<Mutex<Vec<u32>>>,
}

impl Holder {
    /// `indexed`: read a 4-byte index from every connection (else keep each unread).
    fn start(indexed: bool) -> Holder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // 2000 connects at once: see listen_deep.
        listen_deep(&listener);
        let addr = listener.local_addr().unwrap().to_string();
        let held: Arc<Mutex<HashMap<u32, TcpStream>>> = Arc::default();
        let order: Arc<Mutex<Vec<u32>>> = Arc::default();
        let (h, o) = (Arc::clone(&held), Arc::clone(&order));
        thread::spawn(move || {
            let mut unindexed = u32::MAX;
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                if !indexed {
                    unindexed -= 1;
                    h.lock().unwrap().insert(unindexed, s);
                    continue;
                }
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut idx = [0u8; 4];
                // Health checks close without sending anything.
                if s.read_exact(&mut idx).is_ok() {
                    let i = u32::from_be_bytes(idx);
                    o.lock().unwrap().push(i);
                    h.lock().unwrap().insert(i, s);
                }
            }
        });
        Holder { addr, held, order }
    }

    fn count(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// Writes one byte to each of its clients every 50 ms, from `data` in turn, counting the
/// bytes written; stops when dropped.
struct Trickle {
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<TcpStream>>>,
}

impl Trickle {
    fn start(clients: Vec<TcpStream>, data: Vec<u8>) -> Trickle {
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (Arc::clone(&written), Arc::clone(&stop));
        for c in &clients {
            // Each byte its own segment, so that each is one wake-up of the proxy.
            c.set_nodelay(true).unwrap();
        }
        let thread = thread::spawn(move || {
            let mut clients = clients;
            let tick = Duration::from_millis(50);
            let mut next = Instant::now();
            for &b in data.iter().cycle() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                for c in &mut clients {
                    c.write_all(&[b]).expect("a trickling client's write");
                }
                w.fetch_add(clients.len() as u64, Ordering::Relaxed);
                next += tick;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            clients
        });
        Trickle {
            written,
            stop,
            thread: Some(thread),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stop, and give the clients back with how many bytes each was sent.
    fn stop(mut self) -> (Vec<TcpStream>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let clients = self.thread.take().unwrap().join().unwrap();
        let each = self.written() as usize / clients.len().max(1);
        (clients, each)
    }
}

/// What trickling cost the proxy over some windows: its CPU seconds, the bytes written, and
/// the most threads it had (sampled every 100 ms).
#[derive(Default)]
struct Cost {
    cpu: f64,
    bytes: u64,
    threads: usize,
}

impl Cost {
    /// Add what `t` costs `p` over the next `window`.
    fn measure(&mut self, p: &Proxy, t: &Trickle, window: Duration) {
        let (cpu0, bytes0) = (p.cpu_secs(), t.written());
        let began = Instant::now();
        while began.elapsed() < window {
            self.threads = self.threads.max(p.threads());
            thread::sleep(Duration::from_millis(100));
        }
        self.cpu += p.cpu_secs() - cpu0;
        self.bytes += t.written() - bytes0;
    }

    fn per_mb(&self) -> f64 {
        self.cpu / (self.bytes as f64 / 1e6)
    }
}

/// 2000 clients on a Hostnames port each send their ClientHello one byte every 50 ms (issue
/// 21: the old relay handed every byte's wake-up to a thread of its own and made 643-1019
/// threads, at about twice the CPU of the same bytes relayed). The proxy keeps to a few threads,
/// and its CPU time per byte is about what the same trickle costs on 2000 relaying
/// connections, measured in the same run.
#[test]
fn trickled_client_hellos_take_few_threads_and_cost_about_what_relaying_does() {
    const N: usize = 2000;
    // The two are measured in alternate windows, so that a change in the machine's load
    // (other tests, builds) weighs on both alike: measured one after the other, 4 s each, a
    // busy spell in one of them made the ratio 1.72 on a loaded machine.
    const ROUNDS: usize = 4;
    let own = raise_own_fd_limit();
    assert!(
        own >= (3 * N + 500) as u64,
        "this test needs {} descriptors; the open-file limit is {own}",
        3 * N + 500
    );
    let holder = Holder::start(false);
    let target = holder.addr.clone();
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[
                json!({"Name": "tls", "Ports": [ports[0]], "Hostnames": ["x.example"],
                       "Targets": [target], "HealthCheck": {"IntervalMs": 3_600_000}}),
                json!({"Name": "plain", "Ports": [ports[1]], "Targets": [target],
                       "HealthCheck": {"IntervalMs": 3_600_000}}),
            ])
        })
        .args(&["--max-connections", "4500", "--preread-timeout", "120s"])
        .start();
    // Records of 2 bytes: a hello of about 260 bytes; the greeting clients send a byte every
    // 50 ms for ROUNDS x 1.25 s, about 100 bytes, so that no hello is whole while it is measured.
    let hello = client_hello(Some("x.example"), 2);
    assert!(hello.len() > 200, "{}", hello.len());
    let (warm, window) = (Duration::from_millis(250), Duration::from_secs(1));

    let mut greeting: Vec<TcpStream> = (0..N).map(|_| connect(p.v4(0))).collect();
    let mut relaying: Vec<TcpStream> = (0..N).map(|_| connect(p.v4(1))).collect();
    wait_for("every plain connection relayed to the target", WAIT, || {
        (holder.count() >= N).then_some(())
    });
    let (mut greet, mut relay) = (Cost::default(), Cost::default());
    let mut greeted = 0;
    for _ in 0..ROUNDS {
        // The greeting clients go on with their hellos where they stopped.
        let t = Trickle::start(greeting, hello[greeted..].to_vec());
        thread::sleep(warm);
        greet.measure(&p, &t, window);
        let sent;
        (greeting, sent) = t.stop();
        greeted += sent;
        // The same bytes, on connections that relay them.
        let t = Trickle::start(relaying, hello.clone());
        thread::sleep(warm);
        relay.measure(&p, &t, window);
        relaying = t.stop().0;
    }
    assert!(
        greeted < hello.len(),
        "a hello was sent whole ({greeted} bytes)"
    );

    let ratio = greet.per_mb() / relay.per_mb();
    eprintln!(
        "{N} clients trickling hellos: {} threads, {:.2} CPU-s in {ROUNDS} x {window:?} ({:.1} \
         CPU-s/MB); the same bytes relayed: {} threads, {:.2} CPU-s ({:.1} CPU-s/MB); ratio \
         {ratio:.2}",
        greet.threads,
        greet.cpu,
        greet.per_mb(),
        relay.threads,
        relay.cpu,
        relay.per_mb()
    );
    assert!(
        greet.threads <= 16,
        "{} proxy threads while {N} clients trickle their ClientHellos",
        greet.threads
    );
    // Issue 21's target is 1.5x; the old relay was at about 2x. The margin is for a loaded
    // machine, where both figures are noisy.
    assert!(
        ratio < 1.6,
        "reading trickled ClientHellos costs {ratio:.2}x relaying the same bytes \
         ({:.2} vs {:.2} CPU-s in {ROUNDS} x {window:?})",
        greet.cpu,
        relay.cpu
    );
}

/// An app with `MaxConnections 1500`, 1500 connections holding its slots and 1500 more waiting
/// for one (issue 21: the old admission looked again every 50 ms, 0.6-1.3 CPU-s per 3 s). The
/// waiters cost (next to) nothing while they wait, and slots given back go to them in the order
/// they came, as the target sees them arrive.
#[test]
fn fifteen_hundred_waiters_for_a_slot_cost_nothing_and_are_served_in_arrival_order() {
    const N: u32 = 1500;
    /// Waiters that come one by one (so their order is known) and are served one by one.
    const ORDERED: u32 = 20;
    let own = raise_own_fd_limit();
    assert!(
        own >= (3 * N + 500) as u64,
        "this test needs {} descriptors; the open-file limit is {own}",
        3 * N + 500
    );
    let holder = Holder::start(true);
    let target = holder.addr.clone();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[
                json!({"Name": "limited", "Ports": ports, "Targets": [target],
                            "MaxConnections": N, "HealthCheck": {"IntervalMs": 3_600_000}}),
            ])
        })
        .args(&["--max-connections", "4000", "--connect-timeout", "120s"])
        .args(&["--metrics", &metrics.to_string()])
        .start();
    let open = |i: u32| {
        let mut c = connect(p.v4(0));
        c.write_all(&i.to_be_bytes()).unwrap();
        c
    };
    let mut holders: Vec<TcpStream> = (0..N).map(open).collect();
    wait_for("every slot taken", WAIT * 3, || {
        (holder.count() == N as usize).then_some(())
    });
    // Each ordered waiter is taken by its app (counted, so its place in the queue is taken a
    // moment later on the same thread) before the next comes: their order is the test's.
    let mut waiters = Vec::new();
    for i in N..N + ORDERED {
        waiters.push(open(i));
        wait_for("the waiter taken by its app", WAIT, || {
            let m = scrape(metrics);
            let taken = m.get("flyproxy_app_connections_total", &[("app", "limited")]);
            (taken as u32 == i + 1).then_some(())
        });
        thread::sleep(Duration::from_millis(20));
    }
    waiters.extend((N + ORDERED..2 * N).map(open));
    // Let every waiter reach its place in the queue and the threads that took them go idle.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(holder.count(), N as usize, "a waiter got past the limit");
    let threads = p.threads();
    let cpu = p.cpu_during(Duration::from_secs(3));
    eprintln!("{N} holding and {N} waiting for a slot: {threads} threads, {cpu:.3} CPU-s in 3 s");
    // Issue 21's target is 0.05 CPU-s per 3 s; the old admission spent 0.6-1.3. The bound is
    // for a loaded machine.
    assert!(cpu < 0.3, "{N} waiters for a slot: {cpu:.3} CPU-s in 3 s");
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        threads <= OTHER_THREADS + cores,
        "{threads} threads while {N} connections wait for a slot"
    );

    // Slots given back one at a time: each goes to the first waiter still waiting.
    for k in 0..ORDERED {
        let seen = holder.order.lock().unwrap().len();
        drop(holders.remove(0));
        drop(holder.held.lock().unwrap().remove(&k));
        let next = wait_for("the next waiter served", WAIT, || {
            holder.order.lock().unwrap().get(seen).copied()
        });
        assert_eq!(
            next,
            N + k,
            "a slot given back went to waiter {} instead of {} (in arrival order)",
            next - N,
            k
        );
    }
    drop(waiters);
}

/// An app with `MaxConnections 2`: two connections wait behind the two holding its slots. The
/// first waiter resets, and leaves the queue as it goes; when a slot is given back it goes to
/// the second at once (not lost to the one that left, nor after the connect timeout).
#[test]
fn a_waiter_that_resets_leaves_the_queue_and_loses_no_slot() {
    let echo = Backend::echo();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[
                json!({"Name": "limited", "Ports": ports, "Targets": [echo.target()],
                            "MaxConnections": 2}),
            ])
        })
        .args(&[
            "--connect-timeout",
            "60s",
            "--metrics",
            &metrics.to_string(),
        ])
        .start();
    let taken = |n: u32| {
        wait_for("the connection taken by its app", WAIT, || {
            let m = scrape(metrics);
            let got = m.get("flyproxy_app_connections_total", &[("app", "limited")]);
            (got as u32 == n).then_some(())
        })
    };
    let mut holders: Vec<TcpStream> = (0..2).map(|_| connect(p.v4(0))).collect();
    for h in &mut holders {
        roundtrip(h, b"holder\n");
    }
    let mut first = connect(p.v4(0));
    first.write_all(b"first\n").unwrap();
    taken(3);
    let mut second = connect(p.v4(0));
    second.write_all(b"second\n").unwrap();
    taken(4);
    let gone = first.local_addr().unwrap();
    close_with_reset(std::mem::replace(&mut first, placeholder()));
    let line = p.wait_conn(gone);
    assert_eq!(line.end, "reset", "{}", line.line);
    drop(holders.pop());
    let began = Instant::now();
    expect_reply(&mut second, b"second\n");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the slot reached the second waiter after {:?}",
        began.elapsed()
    );
}
