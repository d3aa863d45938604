//! Reliability attacks, in short versions that run with every `make test`: hostile clients (an
//! idle flood past the connection bound, a client that never reads, clients that reset
//! mid-transfer, clients that never send), faulty backends (mute, resetting, half-closing),
//! resource exhaustion (a low open-file limit, EMFILE at accept, local ports running out) and
//! config chaos (hundreds of rewrites, valid and invalid, under load).
//!
//! Each attack runs in simple mode and, where the mode could matter, in bpf mode in a network
//! namespace of the test's own (`netns::run`: skipped without root, a failure in CI). Every
//! assertion is on what a user sees: bytes, closed or refused connections, log lines, metrics,
//! and /proc figures of the proxy (threads, RSS, CPU time, descriptors). Waits poll a
//! condition up to a deadline; the few sleeps are the attack's own pacing or a bounded window
//! in which something must *not* happen (or CPU time is measured).
//!
//! The idle flood (5,000 connections) runs alone under nextest (see `.config/nextest.toml`).

mod common;
#[macro_use]
mod modes;
#[allow(dead_code)]
mod netns;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::metrics::{scrape, Exposition};
use common::*;
use modes::{Env, Mode};
use serde_json::json;

/// An app whose targets are never health-checked while a test runs (an up target is checked
/// every 5 intervals: 5 hours here), so every connection a test backend sees is a client's.
fn quiet_app(name: &str, ports: &[u16], targets: &[String]) -> serde_json::Value {
    json!({ "Name": name, "Ports": ports, "Targets": targets,
            "HealthCheck": { "IntervalMs": 3_600_000 } })
}

// ---------------------------------------------------------------------------------------------
// /proc figures of the proxy

/// The ports of the TCP sockets in LISTEN state the process holds.
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
            // timeout inode ...
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit_once(':').map(|(_, p)| p).unwrap_or("");
                ports.insert(u16::from_str_radix(port, 16).expect("a hex port"));
            }
        }
    }
    ports
}

/// The descriptor numbers the process has open.
fn fds_of(pid: u32) -> BTreeSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// The descriptor number the process's next open would get.
fn lowest_free_fd(pid: u32) -> u64 {
    let open = fds_of(pid);
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// Set the open-file soft limit of a running process (prlimit(2)); the previous limits.
fn set_fd_limit(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads nothing and fills `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit(get): {}", io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    restore_fd_limit(pid, new);
    old
}

fn restore_fd_limit(pid: u32, lim: libc::rlimit) {
    // SAFETY: prlimit reads `lim` and writes nothing.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit(set): {}", io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Scrape until `name{labels}` satisfies `ok`, up to `within`; its value.
fn wait_metric_within(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    within: Duration,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(addr);
        let v = text.sample(name, labels);
        if let Some(v) = v.filter(|v| ok(*v)) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {within:?} waiting for {name}{labels:?} {what}: last value {v:?}"
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    wait_metric_within(addr, name, labels, WAIT, what, ok)
}

/// Wait until no connection holds a slot of the bound: nothing leaked.
fn wait_no_open_connections(addr: SocketAddr) {
    wait_metric(addr, "flyproxy_connections_open", &[], "to be 0", |v| {
        v == 0.0
    });
}

// ---------------------------------------------------------------------------------------------
// Test backends with faults

/// How a connection ended, as one side saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum How {
    Eof,
    /// Reset by the peer (ECONNRESET, or EPIPE on a write after the peer's reset).
    Reset,
    Error(String),
}

fn how_of(e: &io::Error) -> How {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => How::Reset,
        _ => How::Error(e.to_string()),
    }
}

/// What a test server saw of one connection.
#[derive(Debug)]
struct Ended {
    /// The first bytes it received (up to 4 KiB).
    data: Vec<u8>,
    /// Every byte it received.
    bytes: u64,
    how: How,
    /// When it ended (for the resetter: when it sent its reset).
    at: Instant,
}

/// An in-test server on 127.0.0.1 running `handler` on a thread per connection; stops
/// accepting on drop.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let h = Arc::clone(&handler);
                thread::spawn(move || h(conn));
            }
        });
        Server {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// A server whose handler reports each connection's end on the returned channel.
    fn reporting(
        handler: impl Fn(TcpStream, &mpsc::Sender<Ended>) + Send + Sync + 'static,
    ) -> (Server, mpsc::Receiver<Ended>) {
        let (tx, rx) = mpsc::channel();
        (Server::start(move |s| handler(s, &tx)), rx)
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
            let _ = t.join();
        }
    }
}

/// Read until EOF or an error: (first bytes, byte count, how it ended).
fn drain(s: &mut TcpStream) -> (Vec<u8>, u64, How) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut data = Vec::new();
    let mut bytes = 0u64;
    let how = loop {
        match s.read(&mut buf) {
            Ok(0) => break How::Eof,
            Ok(n) => {
                if data.len() < 4096 {
                    data.extend_from_slice(&buf[..n.min(4096 - data.len())]);
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break how_of(&e),
        }
    };
    (data, bytes, how)
}

/// Echo every byte; at EOF close the write side; report how the connection ended.
fn recording_echo(mut s: TcpStream, tx: &mpsc::Sender<Ended>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let how = loop {
        match s.read(&mut buf) {
            Ok(0) => break How::Eof,
            Ok(n) => {
                bytes += n as u64;
                if let Err(e) = s.write_all(&buf[..n]) {
                    break how_of(&e);
                }
            }
            Err(e) => break how_of(&e),
        }
    };
    let _ = s.shutdown(Shutdown::Write);
    let _ = tx.send(Ended {
        data: Vec::new(),
        bytes,
        how,
        at: Instant::now(),
    });
}

/// Accept and never answer: read (and drop) whatever comes until the connection ends.
fn mute(mut s: TcpStream, tx: &mpsc::Sender<Ended>) {
    let (data, bytes, how) = drain(&mut s);
    let _ = tx.send(Ended {
        data,
        bytes,
        how,
        at: Instant::now(),
    });
}

/// The bytes the resetting backend sends before its reset.
fn reset_payload() -> Vec<u8> {
    (0..64 * 1024).map(|i| (i % 251) as u8).collect()
}

/// Wait for a line from the client, send 64 KiB, then reset the connection mid-stream.
fn resetter(mut s: TcpStream, tx: &mpsc::Sender<Ended>) {
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.contains(&b'\n') {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    if s.write_all(&reset_payload()).is_err() {
        return;
    }
    set_linger_zero(&s);
    let at = Instant::now();
    drop(s);
    let _ = tx.send(Ended {
        bytes: got.len() as u64,
        data: got,
        how: How::Reset,
        at,
    });
}

/// Say `bye`, close the write side at once, and keep reading what the client sends after.
fn half_closer(mut s: TcpStream, tx: &mpsc::Sender<Ended>) {
    if s.write_all(b"bye\n").is_err() || s.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let (data, bytes, how) = drain(&mut s);
    let _ = tx.send(Ended {
        data,
        bytes,
        how,
        at: Instant::now(),
    });
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Read until the connection ends (EOF or reset): the bytes before the end and how it ended.
/// Panics if it has not ended within `within`.
fn read_until_end(s: &mut TcpStream, within: Duration) -> (Vec<u8>, How) {
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the connection did not end within {within:?} ({} bytes read)",
            data.len()
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (data, How::Eof),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (data, how_of(&e)),
        }
    }
}

/// One short echo round trip on a new connection; how long it took, or what went wrong.
fn try_echo(addr: SocketAddr, msg: &[u8]) -> Result<Duration, String> {
    let t = Instant::now();
    let err = |what: &str, e: io::Error| format!("{addr}: {what}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| err("connect", e))?;
    s.set_read_timeout(Some(WAIT))
        .map_err(|e| err("timeout", e))?;
    s.write_all(msg).map_err(|e| err("write", e))?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| err("read", e))?;
    if got != msg {
        return Err(format!("{addr}: echo {got:?}"));
    }
    Ok(t.elapsed())
}

/// A `conn` line's duration, in seconds.
fn secs(c: &ConnLine) -> f64 {
    netns::duration_s(c)
}

// =============================================================================================
// Hostile clients: an idle flood past the connection bound

const FLOOD: usize = 5000;
const FLOOD_BOUND: usize = 1000;
/// Threads besides the relay threads: the listener loop (main), health checker, log writer,
/// metrics, and slack.
const OTHER_THREADS: u64 = 8;

/// 5,000 connections opened at once and left idle, against `--max-connections 1000`: the
/// proxy accepts exactly 1,000 (the rest wait in the kernel backlog), its threads and memory
/// stay bounded, a waiting client is served as soon as a slot frees (in arrival order), and a
/// new client is served once the crowd is gone.
fn idle_flood(env: Env) {
    flood_fits_this_machine();
    let echo = Backend::echo();
    let ports = env.ports(1);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let p = env
        .proxy()
        .config_on(&ports, &config(&[app("flood", &ports, &[echo.target()])]))
        .args(&["--max-connections", "1000", "--metrics", &m])
        .start();
    let addr = p.v4(0);

    // Warm up (one relay thread, the pipe pool), then the baseline figures.
    roundtrip(&mut connect(addr), b"warm-up");
    wait_no_open_connections(metrics);
    let (rss0, threads0) = (rss_kib(p.pid), threads_of(p.pid));

    let t0 = Instant::now();
    let mut clients: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            TcpStream::connect_timeout(&addr, WAIT)
                .unwrap_or_else(|e| panic!("client {i} of {FLOOD}: connect: {e}"))
        })
        .collect();
    let opened = t0.elapsed();
    let settled = exactly_the_bound_is_accepted(&p, metrics, &echo, &mut clients, t0);

    let threads = threads_of(p.pid);
    let rss = rss_kib(p.pid);
    let per_conn = rss.saturating_sub(rss0) as f64 / FLOOD_BOUND as f64;
    eprintln!(
        "idle flood ({:?}): {FLOOD} connects in {opened:?}, bound reached after {settled:?}; \
         threads {threads0} -> {threads}; RSS {rss0} KiB -> {rss} KiB \
         ({per_conn:.1} KiB per open connection)",
        env.mode
    );
    assert!(
        threads <= FLOOD_BOUND as u64 + OTHER_THREADS,
        "{threads} threads with a bound of {FLOOD_BOUND}"
    );
    let rss_limit = 64 * 1024 + 32 * FLOOD_BOUND as u64;
    assert!(
        rss < rss_limit,
        "RSS {rss} KiB with {FLOOD_BOUND} open connections (limit {rss_limit} KiB)"
    );

    let still_waiting = waiting_clients_are_served_in_order(&p, metrics, &mut clients);
    let drained = the_crowd_leaves(metrics, addr, clients);
    eprintln!(
        "idle flood ({:?}): the remaining {} queued connections were taken and closed in \
         {drained:?}; RSS at the end {} KiB, threads {}",
        env.mode,
        FLOOD - still_waiting - 100,
        rss_kib(p.pid),
        threads_of(p.pid)
    );
}

/// The flood needs descriptors for both ends and a listen backlog for the clients past the
/// bound (which the kernel caps).
fn flood_fits_this_machine() {
    let own = raise_own_fd_limit();
    assert!(
        own >= (FLOOD + FLOOD_BOUND + 500) as u64,
        "this test needs {} descriptors; the open-file limit is {own}",
        FLOOD + FLOOD_BOUND + 500
    );
    let somaxconn: usize = fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        somaxconn >= FLOOD - FLOOD_BOUND,
        "net.core.somaxconn is {somaxconn}: a backlog of {} is needed",
        FLOOD - FLOOD_BOUND
    );
}

/// `flyproxy_app_connections_total` of the flood's app.
fn flood_total(text: &Exposition) -> Option<f64> {
    text.sample("flyproxy_app_connections_total", &[("app", "flood")])
}

/// Exactly the bound is accepted; the rest wait, and the first waiting client (in arrival
/// order) speaks and is not answered: not accepted. How long after `t0` the bound was reached.
fn exactly_the_bound_is_accepted(
    p: &Proxy,
    metrics: SocketAddr,
    echo: &Backend,
    clients: &mut [TcpStream],
    t0: Instant,
) -> Duration {
    wait_metric(
        metrics,
        "flyproxy_connections_open",
        &[],
        "at the bound",
        |v| v == FLOOD_BOUND as f64,
    );
    wait_metric(metrics, "flyproxy_accept_paused", &[], "to be 1", |v| {
        v == 1.0
    });
    p.wait_log("connection limit reached", |l| {
        l.contains(" WARN  connection limit reached (1000)")
    });
    let settled = t0.elapsed();
    wait_metric(
        metrics,
        "flyproxy_connections_active",
        &[("app", "flood"), ("target", &echo.target())],
        "to be the bound",
        |v| v == FLOOD_BOUND as f64,
    );
    clients[FLOOD_BOUND].write_all(b"early").unwrap();
    clients[FLOOD_BOUND + 100].write_all(b"later").unwrap();
    expect_silent(&mut clients[FLOOD_BOUND], Duration::from_millis(300));
    let text = scrape(metrics);
    assert_eq!(flood_total(&text), Some((FLOOD_BOUND + 1) as f64), "{text}");
    assert_eq!(
        text.sample("flyproxy_connections_open", &[]),
        Some(FLOOD_BOUND as f64)
    );
    settled
}

/// 100 served clients leave: the next 100 in line are served, and no more; then every served
/// client leaves, and the one that spoke later is served in its turn. The index (before the
/// last leave) of the first client still waiting.
fn waiting_clients_are_served_in_order(
    p: &Proxy,
    metrics: SocketAddr,
    clients: &mut Vec<TcpStream>,
) -> usize {
    drop(clients.drain(..100).collect::<Vec<_>>());
    // Indexes from here on are shifted by the 100 gone.
    let first_waiting = FLOOD_BOUND - 100;
    expect_reply(&mut clients[first_waiting], b"early");
    for (i, c) in clients[first_waiting..first_waiting + 100]
        .iter_mut()
        .enumerate()
    {
        c.set_write_timeout(Some(WAIT)).unwrap();
        roundtrip(c, format!("served after the wait {i}").as_bytes());
    }
    let still_waiting = first_waiting + 100;
    expect_silent(&mut clients[still_waiting], Duration::from_millis(300));
    let text = scrape(metrics);
    assert_eq!(
        flood_total(&text),
        Some((FLOOD_BOUND + 101) as f64),
        "{text}"
    );
    assert_eq!(
        text.sample("flyproxy_connections_open", &[]),
        Some(FLOOD_BOUND as f64)
    );
    assert!(threads_of(p.pid) <= FLOOD_BOUND as u64 + OTHER_THREADS);

    drop(clients.drain(..still_waiting).collect::<Vec<_>>());
    expect_reply(&mut clients[0], b"later");
    still_waiting
}

/// The whole crowd leaves: every queued connection is accepted and closed, the proxy comes
/// back to zero, and a new client is served at once. How long the queue took to drain.
fn the_crowd_leaves(metrics: SocketAddr, addr: SocketAddr, clients: Vec<TcpStream>) -> Duration {
    let t1 = Instant::now();
    drop(clients);
    wait_metric_within(
        metrics,
        "flyproxy_app_connections_total",
        &[("app", "flood")],
        Duration::from_secs(90),
        "to count every client",
        |v| v == (FLOOD + 1) as f64,
    );
    wait_no_open_connections(metrics);
    wait_metric(metrics, "flyproxy_accept_paused", &[], "to be 0", |v| {
        v == 0.0
    });
    let drained = t1.elapsed();
    let mut s = connect(addr);
    roundtrip(&mut s, b"a new client");
    drop(s);
    wait_no_open_connections(metrics);
    drained
}

two_modes!(idle_flood_is_held_at_the_bound, idle_flood);

// =============================================================================================
// Hostile clients: a client that sends a lot and never reads

const PUSH: u64 = 256 * 1024 * 1024;

/// A backend that reads at a bounded pace (about 250 MiB/s at most) and at the same time tries
/// to send as much back; both counts are kept.
struct PacedSink {
    server: Server,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl PacedSink {
    fn start() -> PacedSink {
        let received = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let (r, w) = (Arc::clone(&received), Arc::clone(&sent));
        let server = Server::start(move |mut s| {
            let mut out = s.try_clone().expect("clone a socket");
            let w = Arc::clone(&w);
            let writer = thread::spawn(move || {
                let chunk = vec![0xa5u8; 1 << 20];
                while w.load(Ordering::Relaxed) < PUSH {
                    match out.write(&chunk) {
                        Ok(n) => w.fetch_add(n as u64, Ordering::Relaxed),
                        Err(_) => break,
                    };
                }
            });
            let mut buf = vec![0u8; 256 * 1024];
            let mut since_pause = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        since_pause += n;
                        if since_pause >= 1 << 20 {
                            since_pause = 0;
                            thread::sleep(Duration::from_millis(4)); // the pace
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Both);
            let _ = writer.join();
        });
        PacedSink {
            server,
            received,
            sent,
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A client pushes 256 MiB and never reads the backend's answer: the proxy's memory stays
/// within a few MiB of its baseline (bytes wait in kernel buffers, and the relay stops reading
/// a side whose peer cannot take more), the backend's answer stalls, and other clients are
/// served meanwhile. When the client goes away, it is logged and nothing stays open.
fn slow_reader(env: Env) {
    let sink = PacedSink::start();
    let echo = Backend::echo();
    let ports = env.ports(2);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let p = env
        .proxy()
        .config_on(
            &ports,
            &config(&[
                quiet_app("sink", &ports[..1], &[sink.server.target()]),
                quiet_app("other", &ports[1..], &[echo.target()]),
            ]),
        )
        .args(&["--metrics", &m])
        .start();
    // Warm up, then the baseline.
    roundtrip(&mut connect(p.v4(1)), &[7u8; 64 * 1024]);
    wait_no_open_connections(metrics);
    let rss0 = rss_kib(p.pid);

    let meanwhile = Meanwhile::start(p.pid, p.v4(1));
    let t0 = Instant::now();
    let mut c = connect(p.v4(0));
    let local = c.local_addr().unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for mib in 0..PUSH >> 20 {
        c.write_all(&chunk)
            .unwrap_or_else(|e| panic!("pushing, after {mib} MiB: {e}"));
    }
    wait_for("the backend to receive every byte pushed", WAIT, || {
        (sink.received() == PUSH).then_some(())
    });
    let pushed_in = t0.elapsed();
    let stalled_at = the_answer_stalls(&sink);

    let (max_rss, n, worst, failures) = meanwhile.finish();
    eprintln!(
        "slow reader ({:?}): 256 MiB pushed in {pushed_in:?}; backend's answer stalled at {} KiB; \
         proxy RSS {rss0} KiB, at most {max_rss} KiB (+{} KiB); other clients: {n} round trips, \
         slowest {worst:?}",
        env.mode,
        stalled_at / 1024,
        max_rss.saturating_sub(rss0)
    );
    assert!(failures.is_empty(), "other clients failed: {failures:?}");
    assert!(n >= 5, "only {n} round trips of other clients meanwhile");
    assert!(
        worst < Duration::from_secs(2),
        "another client waited {worst:?}"
    );
    assert!(
        max_rss <= rss0 + 8 * 1024,
        "proxy RSS grew from {rss0} KiB to {max_rss} KiB while a client pushed 256 MiB"
    );

    // The client leaves with unread bytes (its close is a reset).
    drop(c);
    let line = p.wait_conn_of_app(local, "sink");
    assert!(line.end == "reset" || line.end == "closed", "{}", line.line);
    assert_eq!(line.up, PUSH, "{}", line.line);
    assert!(line.down <= stalled_at, "{}", line.line);
    wait_no_open_connections(metrics);
    wait_metric(
        metrics,
        "flyproxy_connections_active",
        &[("app", "sink")],
        "to be 0",
        |v| v == 0.0,
    );
}

/// The backend's answer found nowhere to go: its writes stalled, far short of what it tried
/// to send (bytes wait in kernel buffers, not in the proxy). Where it stalled.
fn the_answer_stalls(sink: &PacedSink) -> u64 {
    let stalled_at = sink.sent();
    thread::sleep(Duration::from_millis(300)); // a window in which nothing may move
    assert_eq!(
        sink.sent(),
        stalled_at,
        "the backend could still send to a client that never reads"
    );
    assert!(stalled_at < PUSH / 4, "the backend sent {stalled_at} bytes");
    stalled_at
}

/// What goes on while the slow reader pushes: the proxy's RSS sampled, and another client
/// asking the echo app at its own pace.
struct Meanwhile {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
    others: JoinHandle<(usize, Duration, Vec<String>)>,
}

impl Meanwhile {
    fn start(pid: u32, other: SocketAddr) -> Meanwhile {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut max = 0;
                while !stop.load(Ordering::Relaxed) {
                    max = max.max(rss_kib(pid));
                    thread::sleep(Duration::from_millis(5));
                }
                max
            })
        };
        let others = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut n, mut worst, mut failures) = (0, Duration::ZERO, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match try_echo(other, b"are you there?\n") {
                        Ok(t) => {
                            n += 1;
                            worst = worst.max(t);
                        }
                        Err(e) => failures.push(e),
                    }
                    thread::sleep(Duration::from_millis(20)); // the other client's pace
                }
                (n, worst, failures)
            })
        };
        Meanwhile {
            stop,
            sampler,
            others,
        }
    }

    /// The highest RSS seen, and the other client's round trips, slowest one and failures.
    fn finish(self) -> (u64, usize, Duration, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let max_rss = self.sampler.join().unwrap();
        let (n, worst, failures) = self.others.join().unwrap();
        (max_rss, n, worst, failures)
    }
}

two_modes!(slow_reader_is_paced_by_the_kernel, slow_reader);

// =============================================================================================
// Hostile clients: resets mid-transfer

/// Clients that reset (SO_LINGER 0, then close) while bytes flow both ways: each is logged
/// as ended by a reset, its backend connection ends too (the backend sees the end, not a
/// hang), and no connection is left open.
fn client_resets(env: Env) {
    const CLIENTS: usize = 8;
    const BEFORE_RESET: usize = 256 * 1024;
    let (echo, ends) = Server::reporting(recording_echo);
    let ports = env.ports(1);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let p = env
        .proxy()
        .config_on(
            &ports,
            &config(&[quiet_app("resets", &ports, &[echo.target()])]),
        )
        .args(&["--metrics", &m])
        .start();
    let addr = p.v4(0);
    let clients: Vec<JoinHandle<(SocketAddr, usize, usize)>> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let mut s = connect(addr);
                s.set_nonblocking(true).unwrap();
                let chunk = vec![i as u8; 16 * 1024];
                let mut buf = vec![0u8; 64 * 1024];
                let (mut sent, mut got) = (0, 0);
                let deadline = Instant::now() + WAIT;
                while got < BEFORE_RESET {
                    assert!(
                        Instant::now() < deadline,
                        "client {i}: echo stalled at {got}"
                    );
                    let mut moved = false;
                    match s.write(&chunk) {
                        Ok(n) => (sent, moved) = (sent + n, true),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("client {i}: write: {e}"),
                    }
                    match s.read(&mut buf) {
                        Ok(0) => panic!("client {i}: EOF mid-transfer"),
                        Ok(n) => (got, moved) = (got + n, true),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("client {i}: read: {e}"),
                    }
                    if !moved {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                let local = s.local_addr().unwrap();
                set_linger_zero(&s);
                drop(s); // a reset, with bytes still in flight both ways
                (local, sent, got)
            })
        })
        .collect();
    for c in clients {
        let (local, sent, got) = c.join().unwrap();
        let line = p.wait_conn(local);
        assert!(line.end == "reset" || line.end == "closed", "{}", line.line);
        assert!(
            line.up > 0 && line.up <= sent as u64,
            "{} (sent {sent})",
            line.line
        );
        assert!(line.down >= got as u64, "{} (got {got})", line.line);
    }
    // The backend saw every one of its connections end.
    for i in 0..CLIENTS {
        let e = ends
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("the backend saw only {i} of {CLIENTS} connections end"));
        assert!(e.bytes > 0, "{e:?}");
        assert!(matches!(e.how, How::Eof | How::Reset), "{e:?}");
    }
    wait_no_open_connections(metrics);
    wait_metric(
        metrics,
        "flyproxy_connections_active",
        &[("app", "resets")],
        "to be 0",
        |v| v == 0.0,
    );
    let ends_seen: Vec<String> = p.conns().iter().map(|c| c.end.clone()).collect();
    eprintln!("client resets ({:?}): conn ends {ends_seen:?}", env.mode);
    // And the proxy serves on.
    roundtrip(&mut connect(addr), b"after the resets");
}

two_modes!(
    clients_resetting_mid_transfer_leave_nothing_open,
    client_resets
);

// =============================================================================================
// Hostile clients: connections that never send a byte

/// With `--idle-timeout 500ms`, connections that never send a byte are closed after half a
/// second (logged `end=idle_timeout`, their backend connections closed too), while a client
/// that keeps talking stays up for longer than that.
fn silent_clients(env: Env) {
    const SILENT: usize = 10;
    let (echo, ends) = Server::reporting(recording_echo);
    let ports = env.ports(1);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let p = env
        .proxy()
        .config_on(
            &ports,
            &config(&[quiet_app("idle", &ports, &[echo.target()])]),
        )
        // 1.5 s: the chatty client pauses 100 ms between bytes, and on a machine loaded far past its
        // cores (load average 27 seen) a pause of 500 ms was once long enough to cut it.
        .args(&["--idle-timeout", "1500ms", "--metrics", &m])
        .start();
    let addr = p.v4(0);
    let chatty = thread::spawn(move || {
        let mut s = connect(addr);
        let began = Instant::now();
        for _ in 0..20 {
            thread::sleep(Duration::from_millis(100)); // the chatty client's pace
            roundtrip(&mut s, b"x");
        }
        let alive_for = began.elapsed();
        let last = Instant::now();
        let (data, how) = read_until_end(&mut s, WAIT);
        (
            s.local_addr().unwrap(),
            alive_for,
            last.elapsed(),
            data,
            how,
        )
    });
    let silent: Vec<(TcpStream, Instant)> = (0..SILENT)
        .map(|_| (connect(addr), Instant::now()))
        .collect();
    for (mut s, opened) in silent {
        let (data, how) = read_until_end(&mut s, WAIT);
        let after = opened.elapsed();
        assert!(data.is_empty() && how == How::Eof, "{data:?} {how:?}");
        assert!(
            after >= Duration::from_millis(1490) && after < Duration::from_secs(6),
            "a silent connection was closed after {after:?}"
        );
        let line = p.wait_conn(s.local_addr().unwrap());
        assert_eq!(line.end, "idle_timeout", "{}", line.line);
        assert_eq!((line.up, line.down), (0, 0), "{}", line.line);
        assert!(secs(&line) >= 1.5, "{}", line.line);
    }
    let (local, alive_for, closed_after, data, how) = chatty.join().unwrap();
    assert!(data.is_empty() && how == How::Eof, "{data:?} {how:?}");
    assert!(alive_for >= Duration::from_millis(2000), "{alive_for:?}");
    assert!(
        closed_after >= Duration::from_millis(1450) && closed_after < Duration::from_secs(6),
        "the chatty client was closed {closed_after:?} after its last byte"
    );
    let line = p.wait_conn(local);
    assert_eq!(line.end, "idle_timeout", "{}", line.line);
    assert_eq!((line.up, line.down), (20, 20), "{}", line.line);
    // The backend saw all of them end.
    for i in 0..=SILENT {
        let e = ends.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!("the backend saw only {i} of {} connections end", SILENT + 1)
        });
        assert_eq!(e.how, How::Eof, "{e:?}");
    }
    wait_no_open_connections(metrics);
}

two_modes!(
    silent_clients_are_closed_by_the_idle_timeout,
    silent_clients
);

// =============================================================================================
// Backend faults

/// Three faulty targets, each behind its own app:
/// - one that accepts and never answers: the client's connection stays up (silent) until the
///   idle timeout closes it, `end=idle_timeout`, and the target's connection is closed too.
///   With the default `--idle-timeout` (1h) it would stay up that long: by design.
/// - one that resets mid-stream: the client sees the connection end (reset or EOF) at once,
///   after at most the bytes sent before the reset, and it is logged `end=reset`.
/// - one that closes its write side first: the client reads EOF for that direction but can
///   still send, and the target receives those later bytes; logged `end=closed`.
fn backend_faults(env: Env) {
    let (silent, silent_ends) = Server::reporting(mute);
    let (resets, reset_ends) = Server::reporting(resetter);
    let (half, half_ends) = Server::reporting(half_closer);
    let ports = env.ports(3);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let p = env
        .proxy()
        .config_on(
            &ports,
            &config(&[
                quiet_app("mute", &ports[..1], &[silent.target()]),
                quiet_app("resetting", &ports[1..2], &[resets.target()]),
                quiet_app("halfclosing", &ports[2..], &[half.target()]),
            ]),
        )
        .args(&["--idle-timeout", "1s", "--metrics", &m])
        .start();

    // A target that never answers.
    let mut c = connect(p.v4(0));
    c.write_all(b"hello?\n").unwrap();
    let spoke = Instant::now();
    expect_silent(&mut c, Duration::from_millis(600));
    let (data, how) = read_until_end(&mut c, WAIT);
    let closed_after = spoke.elapsed();
    assert!(data.is_empty() && how == How::Eof, "{data:?} {how:?}");
    assert!(
        closed_after >= Duration::from_millis(990) && closed_after < Duration::from_secs(6),
        "closed {closed_after:?} after the last byte (idle timeout 1s)"
    );
    let line = p.wait_conn(c.local_addr().unwrap());
    assert_eq!(line.end, "idle_timeout", "{}", line.line);
    assert_eq!((line.up, line.down), (7, 0), "{}", line.line);
    let e = silent_ends
        .recv_timeout(WAIT)
        .expect("the mute target's end");
    assert_eq!((e.data.as_slice(), &e.how), (&b"hello?\n"[..], &How::Eof));

    // A target that resets mid-stream.
    let mut c = connect(p.v4(1));
    c.write_all(b"go\n").unwrap();
    let (data, how) = read_until_end(&mut c, WAIT);
    let ended = Instant::now();
    let e = reset_ends
        .recv_timeout(WAIT)
        .expect("the resetting target's end");
    let late = ended.saturating_duration_since(e.at);
    let payload = reset_payload();
    assert!(
        payload.starts_with(&data),
        "the client got {} bytes that are not what the target sent",
        data.len()
    );
    assert!(matches!(how, How::Reset | How::Eof), "{how:?}");
    assert!(
        late < Duration::from_secs(2),
        "the client saw the end {late:?} after the target's reset"
    );
    let line = p.wait_conn(c.local_addr().unwrap());
    assert_eq!(line.end, "reset", "{}", line.line);
    assert_eq!(line.up, 3, "{}", line.line);
    eprintln!(
        "backend faults ({:?}): after a target's reset the client got {} of 64 KiB and then \
         {how:?}, {late:?} after the reset",
        env.mode,
        data.len()
    );

    // A target that closes its write side first.
    let mut c = connect(p.v4(2));
    assert_eq!(read_line(&mut c), "bye");
    let (data, how) = read_until_end(&mut c, WAIT);
    assert!(data.is_empty() && how == How::Eof, "{data:?} {how:?}");
    c.write_all(b"later\n")
        .expect("the client can still send after the target's half-close");
    c.shutdown(Shutdown::Write).unwrap();
    let e = half_ends
        .recv_timeout(WAIT)
        .expect("the half-closing target's end");
    assert_eq!(
        (String::from_utf8_lossy(&e.data).as_ref(), &e.how),
        ("later\n", &How::Eof)
    );
    let line = p.wait_conn(c.local_addr().unwrap());
    assert_eq!(line.end, "closed", "{}", line.line);
    assert_eq!((line.up, line.down), (6, 4), "{}", line.line);

    wait_no_open_connections(metrics);
}

two_modes!(backend_faults_reach_the_client, backend_faults);

// =============================================================================================
// Resource exhaustion: a low open-file limit

/// Started with an open-file limit of 128 and `--max-connections 4096`, the proxy lowers its
/// bound to what fits and says so. Past that bound (clients keep coming, some leaving at
/// once) it never spins and never exits; the clients beyond the bound wait and are all served
/// once slots free.
fn low_fd_limit(env: Env) {
    const NOFILE: u64 = 128;
    let echo = Backend::echo();
    let ports = env.ports(1);
    let metrics = env.metrics_addr();
    let m = metrics.to_string();
    let mut p = env
        .proxy()
        .config_on(
            &ports,
            &config(&[quiet_app("fd", &ports, &[echo.target()])]),
        )
        .args(&["--max-connections", "4096", "--metrics", &m])
        .command(|cmd| with_fd_limit(cmd, NOFILE))
        .start();
    let addr = p.v4(0);
    let bound = the_bound_is_lowered_to_128_descriptors(&p, metrics);

    let total = bound + 60;
    let msg = |i: usize| format!("client {i:04}\n");
    let mut clients: Vec<TcpStream> = (0..total)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(msg(i).as_bytes()).unwrap();
            s
        })
        .collect();
    wait_for("the backend to serve the bound", WAIT, || {
        (echo.served() >= bound).then_some(())
    });
    assert_eq!(echo.served(), bound, "served past the bound");
    wait_metric(metrics, "flyproxy_accept_paused", &[], "to be 1", |v| {
        v == 1.0
    });
    assert_eq!(
        scrape(metrics).sample("flyproxy_connections_open", &[]),
        Some(bound as f64)
    );

    let (cpu, churned) = no_spin_under_arrivals_at_the_bound(&mut p, addr);
    assert_eq!(echo.served(), bound, "served past the bound");
    // The served ones still relay.
    for (i, c) in clients.iter_mut().take(3).enumerate() {
        expect_reply(c, msg(i).as_bytes());
        roundtrip(c, &[b'z'; 100_000]);
    }

    // Slots free: every waiting client is served in its turn.
    let waiting = clients.split_off(bound);
    drop(clients);
    for (i, mut c) in waiting.into_iter().enumerate() {
        expect_reply(&mut c, msg(bound + i).as_bytes());
    }
    wait_no_open_connections(metrics);
    wait_metric(metrics, "flyproxy_accept_paused", &[], "to be 0", |v| {
        v == 0.0
    });
    assert_eq!(echo.served(), total);
    assert!(p.try_status().is_none(), "the proxy exited");
    roundtrip(&mut connect(addr), b"and a new one");
    let failed = p.lines(|l| l.contains(" end=connect_failed"));
    assert!(failed.is_empty(), "{failed:?}");
    let accept_errors = p.lines(|l| l.contains("accept failed"));
    eprintln!(
        "low fd limit ({:?}): bound lowered to {bound}; {total} clients + {churned} arriving and \
         leaving; proxy CPU {cpu:.3} s in 2 s at the bound; {} accept errors logged",
        env.mode,
        accept_errors.len()
    );
}

/// With 128 descriptors the proxy starts with a lower bound, warns with the numbers, and
/// reports the bound in force. The bound.
fn the_bound_is_lowered_to_128_descriptors(p: &Proxy, metrics: SocketAddr) -> usize {
    let started = p.started_line();
    let bound: usize = field(&started, "max_connections")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no max_connections in {started}"));
    let warning = p.wait_log("the bound lowered", |l| l.contains("lowering the bound to"));
    assert!(
        warning.contains(" WARN ")
            && warning.contains("--max-connections 4096 needs")
            && warning.contains("the open-file limit is 128")
            && warning.ends_with(&format!("lowering the bound to {bound}")),
        "{warning}"
    );
    assert!(
        (8..64).contains(&bound),
        "bound {bound} with 128 descriptors"
    );
    let limit = scrape(metrics).sample("flyproxy_connections_limit", &[]);
    assert_eq!(limit, Some(bound as f64));
    bound
}

/// Pressure: more clients keep arriving (and leaving at once) while the bound holds; the proxy
/// neither spins nor exits. Its CPU time over 2 s, and the clients that came and went.
fn no_spin_under_arrivals_at_the_bound(p: &mut Proxy, addr: SocketAddr) -> (f64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (stop, churned) = (Arc::clone(&stop), Arc::clone(&churned));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && churned.load(Ordering::Relaxed) < 400 {
                if TcpStream::connect_timeout(&addr, WAIT).is_ok() {
                    churned.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(5)); // the arrivals' pace
            }
        })
    };
    let cpu = cpu_during(p.pid, Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert!(p.try_status().is_none(), "the proxy exited");
    assert!(
        cpu < 0.5,
        "the proxy used {cpu:.2} s of CPU in 2 s while at its bound"
    );
    (cpu, churned.load(Ordering::Relaxed))
}

two_modes!(low_fd_limit_lowers_the_bound_and_recovers, low_fd_limit);

// =============================================================================================
// Resource exhaustion: no descriptor left at all (EMFILE)

/// The open-file limit of the running proxy is lowered under its feet (prlimit) below what
/// its bound assumed. With no descriptor left, accept fails with EMFILE: the proxy backs off
/// instead of spinning, new clients wait in the backlog, open connections keep relaying, and
/// once descriptors are back every waiting client is served. With exactly one descriptor
/// left, accepting works but connecting to the target does not: the client is closed
/// (`end=connect_failed`, the reason naming EMFILE) and the target is not marked down for an
/// error of this host.
#[test]
fn emfile_backs_off_and_recovers() {
    let echo = Backend::echo();
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let m = metrics.to_string();
    let mut p = Proxy::simple()
        .ports(1, |ports| {
            config(&[quiet_app("fd", ports, &[echo.target()])])
        })
        .args(&["--metrics", &m])
        .start();
    let addr = p.v4(0);
    let target = echo.target();
    let mut held: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = connect(addr);
            roundtrip(&mut s, format!("held {i}\n").as_bytes());
            s
        })
        .collect();
    wait_metric(metrics, "flyproxy_connections_open", &[], "to be 5", |v| {
        v == 5.0
    });
    let waiting = no_descriptor_left_backs_off(&mut p, addr, &mut held);
    with_one_descriptor_connects_fail_not_the_target(&p, addr);
    let text = scrape(metrics);
    assert_eq!(
        text.sample("flyproxy_target_up", &[("target", &target)]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        text.sample(
            "flyproxy_app_connections_refused_total",
            &[("app", "fd"), ("reason", "connect_failed")]
        ),
        Some(5.0),
        "{text}"
    );
    roundtrip(&mut connect(addr), b"served again\n");
    drop(held);
    drop(waiting);
    wait_no_open_connections(metrics);
    assert!(p.try_status().is_none(), "the proxy exited");
}

/// No descriptor left: accept fails with EMFILE and the proxy backs off instead of spinning,
/// new clients wait, `held` keep relaying; with descriptors back every waiting client is
/// served promptly. The waiting clients.
fn no_descriptor_left_backs_off(
    p: &mut Proxy,
    addr: SocketAddr,
    held: &mut [TcpStream],
) -> Vec<TcpStream> {
    let mark = p.mark();
    let original = set_fd_limit(p.pid, lowest_free_fd(p.pid));
    let msg = |i: usize| format!("waiting {i:02}\n");
    let mut waiting: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(msg(i).as_bytes()).unwrap();
            s
        })
        .collect();
    let first = p.wait_log_since(mark, "accept failed with EMFILE", |l| {
        l.contains("accept failed: ")
    });
    assert!(first.contains("(os error 24)"), "{first}");
    let cpu = cpu_during(p.pid, Duration::from_secs(2));
    assert!(p.try_status().is_none(), "the proxy exited");
    let errors = p.lines_since(mark, |l| l.contains("accept failed: ")).len();
    assert!(
        cpu < 0.5,
        "the proxy used {cpu:.2} s of CPU in 2 s of EMFILE ({errors} accept errors logged)"
    );
    // Backing off: a retry now and then (10 ms doubling to 1 s), not thousands.
    assert!(errors <= 20, "{errors} accept errors logged in about 2 s");
    for (i, s) in held.iter_mut().enumerate() {
        roundtrip(s, format!("still relaying {i}\n").as_bytes());
    }
    expect_silent(&mut waiting[0], Duration::from_millis(200));

    // Descriptors are back: every waiting client is served.
    restore_fd_limit(p.pid, original);
    let t = Instant::now();
    for (i, c) in waiting.iter_mut().enumerate() {
        expect_reply(c, msg(i).as_bytes());
    }
    let recovered = t.elapsed();
    assert!(
        recovered < Duration::from_secs(5),
        "served {recovered:?} after descriptors came back"
    );
    eprintln!(
        "EMFILE: proxy CPU {cpu:.3} s in 2 s, {errors} accept errors logged; waiting clients \
         served {recovered:?} after the limit was restored"
    );
    waiting
}

/// One descriptor left: accept works, the connect to the target does not. Each client is
/// closed with the reason, and the target is not marked down for an error of this host.
fn with_one_descriptor_connects_fail_not_the_target(p: &Proxy, addr: SocketAddr) {
    let original = set_fd_limit(p.pid, lowest_free_fd(p.pid) + 1);
    for i in 0..5 {
        let mut s = connect(addr);
        s.write_all(format!("doomed {i}\n").as_bytes()).unwrap();
        let (data, how) = read_until_end(&mut s, WAIT);
        assert!(data.is_empty(), "{data:?}");
        assert!(matches!(how, How::Eof | How::Reset), "{how:?}");
        let line = p.wait_conn(s.local_addr().unwrap());
        assert_eq!(line.end, "connect_failed", "{}", line.line);
        assert_eq!(line.level, "WARN", "{}", line.line);
        let reason = line.reason.clone().unwrap_or_default();
        assert!(reason.contains("(os error 24)"), "{}", line.line);
    }
    restore_fd_limit(p.pid, original);
    let down = p.lines(|l| l.contains(" is down"));
    assert!(
        down.is_empty(),
        "a local error marked the target down: {down:?}"
    );
}

// =============================================================================================
// Resource exhaustion: local ports running out

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// In a namespace of its own whose ephemeral port range is cut to 51 ports, 200 clients at
/// once to one target: the proxy's connections to the target run out of local ports. Those
/// clients are closed (`end=connect_failed`, the reason naming the error), the target is not
/// marked down (neither by the failed connects nor by health checks failing for the same
/// local reason), and once ports free up the proxy serves again. Runs in bpf mode, since it
/// needs the namespace anyway; the host's range is left alone.
#[test]
fn local_ports_running_out_fail_clients_not_the_target() {
    let host_range = fs::read_to_string(PORT_RANGE).expect("read the port range");
    netns::run(
        "local_ports_running_out_fail_clients_not_the_target",
        |_ns| local_ports_run_out(),
    );
    assert_eq!(
        fs::read_to_string(PORT_RANGE).unwrap(),
        host_range,
        "the host's port range changed"
    );
}

/// Clients of `local_ports_running_out_fail_clients_not_the_target`.
const EPH_CLIENTS: usize = 200;

/// The body of `local_ports_running_out_fail_clients_not_the_target`, in its namespace.
fn local_ports_run_out() {
    // Bound before the range shrinks (a listener's port comes from the range too).
    let echo = Backend::echo();
    let _restore = shrink_the_port_range();
    // Any port: the namespace is the test's own.
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, 9100));
    let m = metrics.to_string();
    let target = echo.target();
    let cfg = config(&[json!({
        "Name": "eph", "Ports": [6000], "Targets": [target],
        // Checked often (an up target every 500 ms), so checks run while ports are out.
        "HealthCheck": { "IntervalMs": 100 }
    })]);
    let p = Proxy::bpf()
        .config(&cfg)
        .args(&["--metrics", &m, "--connect-timeout", "2s"])
        .start();
    let (mut served, refused) = clients_past_the_port_range();
    for &local in &refused {
        let line = p.wait_conn(local);
        assert_eq!(line.end, "connect_failed", "{}", line.line);
        let reason = line.reason.clone().unwrap_or_default();
        assert!(reason.contains("(os error 99)"), "{}", line.line);
    }
    // Hold the ports a while (three up-checks of the target), then look at the target.
    let held_from = Instant::now();
    while held_from.elapsed() < Duration::from_millis(1600) {
        for s in &mut served {
            roundtrip(s, b"still here\n");
        }
        thread::sleep(Duration::from_millis(100)); // the clients' pace
    }
    let text = scrape(metrics);
    let down = p.lines(|l| l.contains(" is down"));
    let target_up = text.sample("flyproxy_target_up", &[("target", &target)]);
    assert_eq!(
        text.sample(
            "flyproxy_app_connections_refused_total",
            &[("app", "eph"), ("reason", "connect_failed")]
        ),
        Some(refused.len() as f64)
    );
    let figures = format!("{} served, {} closed", served.len(), refused.len());
    drop(served);
    let (recovered, rounds) = served_again_once_ports_free_up();
    eprintln!(
        "local ports: {figures} of {EPH_CLIENTS}; 20 in a row served again {recovered:?} \
         after the others left ({rounds} tries); target marked down {} times",
        down.len()
    );
    // The target was never marked down for this host's own trouble.
    assert!(
        down.is_empty(),
        "a local error (no local port) marked the target down:\n{}",
        down.join("\n")
    );
    assert_eq!(
        target_up,
        Some(1.0),
        "flyproxy_target_up while ports were out"
    );
    wait_no_open_connections(metrics);
}

/// Cut this namespace's ephemeral port range to 51 ports; it is put back when the result is
/// dropped.
fn shrink_the_port_range() -> Restore<impl FnMut()> {
    let netns_range = fs::read_to_string(PORT_RANGE).unwrap();
    fs::write(PORT_RANGE, "40000 40050").expect("set this namespace's port range");
    // Put the range back before anything is dropped (even on a failure): the backend's
    // stop connects to its own listener, which needs a free port.
    let restore = Restore(move || {
        let _ = fs::write(PORT_RANGE, &netns_range);
    });
    let range = fs::read_to_string(PORT_RANGE).unwrap();
    assert_eq!(
        range.split_whitespace().collect::<Vec<_>>(),
        ["40000", "40050"]
    );
    restore
}

/// Where client `i` connects: 127.0.0.1-8, so that their own ports come from the same small
/// range, and a port can be reused towards each destination.
fn eph_dest(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + (i % 8) as u8], 6000))
}

/// EPH_CLIENTS clients at once, each sending a line: the served ones (still open) and the
/// local addresses of those closed without an answer; the ports must have run out.
fn clients_past_the_port_range() -> (Vec<TcpStream>, Vec<SocketAddr>) {
    let msg = |i: usize| format!("c{i:03}\n");
    let mut clients: Vec<TcpStream> = (0..EPH_CLIENTS)
        .map(|i| {
            let mut s = connect(eph_dest(i));
            s.write_all(msg(i).as_bytes()).unwrap();
            s
        })
        .collect();
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for (i, mut s) in clients.drain(..).enumerate() {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let want = msg(i);
        let mut got = vec![0u8; want.len()];
        match s.read_exact(&mut got) {
            Ok(()) => {
                assert_eq!(got, want.as_bytes());
                served.push(s);
            }
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.kind() == io::ErrorKind::ConnectionReset =>
            {
                refused.push(s.local_addr().unwrap())
            }
            Err(e) => panic!("client {i}: {e}"),
        }
    }
    assert!(
        served.len() >= 10 && refused.len() >= 100,
        "{} served, {} closed: the ports did not run out as planned",
        served.len(),
        refused.len()
    );
    (served, refused)
}

/// Ports free up (the proxy's TIME_WAIT ones become reusable a second or so after the served
/// clients left): served again, 20 clients in a row. How long that took, and the tries.
fn served_again_once_ports_free_up() -> (Duration, usize) {
    let t = Instant::now();
    let mut rounds = 0;
    wait_for(
        "20 clients in a row served once ports free up",
        WAIT,
        || {
            rounds += 1;
            (0..20)
                .all(|i| try_echo(eph_dest(i), format!("again {i}\n").as_bytes()).is_ok())
                .then_some(())
        },
    );
    (t.elapsed(), rounds)
}

/// Runs a closure when dropped.
struct Restore<F: FnMut()>(F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

// =============================================================================================
// Config chaos

/// How one version of the config file is made and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Valid, written to a sibling and renamed over.
    ValidRename,
    /// Valid, written in place in two steps with a pause in between (a reader may see half).
    ValidInPlace,
    /// A valid version cut short (never completed), in place.
    Broken,
    /// Well-formed JSON that fails validation.
    Invalid,
    /// Truncated to nothing.
    Empty,
    /// Asks for a port another socket holds (simple mode: cannot be bound).
    Unbindable,
}

/// The config file rewritten 200 times under a steady load, valid and invalid versions
/// mixed, written in place (in two steps: the proxy may read a half-written file), by rename,
/// and truncated. Every valid version has a marker port of its own (and every invalid one a
/// port that must never be served). No client connection to the ports every version keeps
/// fails; every `reload ok` applies exactly one valid version, in order; the proxy ends on
/// the last version, serving exactly its ports.
fn config_chaos(env: Env) {
    let chaos = Chaos::new(&env);
    let p = env
        .proxy()
        .config_on(&chaos.stable_ports, &chaos.valid(0))
        .args(&["--reload-interval", "10ms"])
        .start();
    let load = SteadyLoad::start(&p);
    let seed = chaos_seed();
    let run = chaos.write_versions(&p, seed);
    let last = chaos.markers[CHAOS_WRITES];
    p.wait_log("the last version applied", |l| {
        l.contains(" reload ok: ") && ports_in(l, "added") == [last]
    });
    // A little more load on the final config, then stop it.
    thread::sleep(Duration::from_millis(200)); // load keeps running on the final config
    let ok_before = load.stop_and_check();
    let reloads = chaos.assert_valid_versions_applied_in_order(&p, &run);
    let rejected = p
        .lines(|l| l.contains(" reload rejected: keeping the running config"))
        .len();
    let unbindable = p
        .lines(|l| l.contains(" reload rejected: cannot listen on "))
        .len();
    assert!(rejected > 0, "no version was rejected");
    chaos.assert_serves_exactly_the_last_version(&env, &p);
    eprintln!(
        "config chaos ({:?}, seed {seed}): {CHAOS_WRITES} writes in {:?} ({} valid, {} \
         SIGHUPs); {reloads} reloads applied, {rejected} rejected ({unbindable} for a port that \
         could not be bound); {ok_before} client connections, none failed",
        env.mode,
        run.written_in,
        run.valid_versions.len() - 1,
        run.hups,
    );
}

/// Rewrites of the config file in `config_chaos`.
const CHAOS_WRITES: usize = 200;

/// The apps and ports of `config_chaos`, and how each version of its config reads.
struct Chaos {
    stable: Backend,
    marker: Backend,
    stable_ports: Vec<u16>,
    /// One marker port per version.
    markers: Vec<u16>,
    /// Simple mode: a port this test holds, so a version asking for it cannot be bound.
    busy: Option<(TcpListener, u16)>,
}

/// What `Chaos::write_versions` wrote.
struct ChaosRun {
    valid_versions: BTreeSet<usize>,
    /// The kind of each version after the first.
    kinds: Vec<Version>,
    hups: usize,
    written_in: Duration,
}

impl Chaos {
    fn new(env: &Env) -> Chaos {
        let busy = (env.mode == Mode::Simple).then(|| {
            let port = free_port();
            let l = TcpListener::bind(("::", port)).expect("hold a port");
            (l, port)
        });
        Chaos {
            stable: Backend::tagged("stable"),
            marker: Backend::tagged("marker"),
            stable_ports: env.ports(2),
            markers: env.ports(CHAOS_WRITES + 1),
            busy,
        }
    }

    /// Version `k`, valid.
    fn valid(&self, k: usize) -> String {
        config(&[
            json!({ "Name": "stable", "Ports": self.stable_ports, "Targets": [self.stable.target()],
                    "ConnectAttempts": 1 + k % 3 }),
            app("marker", &[self.markers[k]], &[self.marker.target()]),
        ])
    }

    /// Version `k`, well-formed but invalid in one of four ways.
    fn invalid(&self, k: usize, variant: u64) -> String {
        let (stable_ports, markers) = (&self.stable_ports, &self.markers);
        let stable_app = json!({ "Name": "stable", "Ports": stable_ports,
                                 "Targets": [self.stable.target()] });
        let marker_app = match variant % 4 {
            0 => json!({ "Name": "marker", "Ports": [markers[k], 70000],
                         "Targets": [self.marker.target()] }),
            1 => json!({ "Name": "marker", "Ports": [markers[k]],
                         "Targets": [self.marker.target()], "Weight": 3 }),
            2 => json!({ "Name": "marker", "Ports": [markers[k]], "Targets": [] }),
            // The stable app's port claimed by a second app.
            _ => json!({ "Name": "marker", "Ports": [markers[k], stable_ports[0]],
                         "Targets": [self.marker.target()] }),
        };
        config(&[stable_app, marker_app])
    }

    /// The kind of version `k`, from a roll of 0..100.
    fn kind(&self, k: usize, roll: u64) -> Version {
        match roll {
            _ if k == CHAOS_WRITES => Version::ValidRename,
            0..=24 => Version::ValidRename,
            25..=44 => Version::ValidInPlace,
            45..=64 => Version::Broken,
            65..=84 => Version::Invalid,
            85..=91 => Version::Empty,
            _ if self.busy.is_some() => Version::Unbindable,
            _ => Version::Invalid,
        }
    }

    /// Write every version after the first, each of a random kind, at a random pace, with a
    /// SIGHUP now and then.
    fn write_versions(&self, p: &Proxy, seed: u64) -> ChaosRun {
        let (path, dir) = (&p.config, &p.dir.path);
        let mut rng = Rng::new(seed);
        let mut run = ChaosRun {
            valid_versions: BTreeSet::from([0usize]),
            kinds: Vec::new(),
            hups: 0,
            written_in: Duration::ZERO,
        };
        let t0 = Instant::now();
        for (k, &marker_port) in self.markers.iter().enumerate().skip(1) {
            let kind = self.kind(k, rng.next() % 100);
            run.kinds.push(kind);
            let pause = Duration::from_millis(rng.next() % 25);
            match kind {
                Version::ValidRename => {
                    run.valid_versions.insert(k);
                    write_by_rename(dir, path, self.valid(k).as_bytes());
                }
                Version::ValidInPlace => {
                    run.valid_versions.insert(k);
                    let text = self.valid(k);
                    let split = 1 + (rng.next() as usize) % (text.len() - 1);
                    write_in_place(path, text.as_bytes(), split, pause);
                }
                Version::Broken => {
                    let text = self.valid(k);
                    let cut = 1 + (rng.next() as usize) % (text.len() - 1);
                    if rng.next() % 2 == 0 {
                        write_by_rename(dir, path, &text.as_bytes()[..cut]);
                    } else {
                        write_in_place(path, &text.as_bytes()[..cut], cut / 2, pause);
                    }
                }
                Version::Invalid => {
                    write_by_rename(dir, path, self.invalid(k, rng.next()).as_bytes())
                }
                Version::Empty => {
                    OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(path)
                        .expect("truncate the config");
                }
                Version::Unbindable => {
                    let (_, busy_port) = self.busy.as_ref().unwrap();
                    let text = config(&[
                        json!({ "Name": "stable", "Ports": self.stable_ports,
                                "Targets": [self.stable.target()] }),
                        app(
                            "marker",
                            &[marker_port, *busy_port],
                            &[self.marker.target()],
                        ),
                    ]);
                    write_by_rename(dir, path, text.as_bytes());
                }
            }
            if rng.next() % 10 == 0 {
                run.hups += 1;
                // SAFETY: kill(2) on our child.
                unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGHUP) };
            }
            thread::sleep(Duration::from_millis(2 + rng.next() % 20)); // the writer's pace
        }
        run.written_in = t0.elapsed();
        run
    }

    /// Every reload that applied anything applied one valid version, newer than the last,
    /// and the last applied is the last written. How many applied.
    fn assert_valid_versions_applied_in_order(&self, p: &Proxy, run: &ChaosRun) -> usize {
        let markers = &self.markers;
        let mut current = 0usize;
        let reloads = p.lines(|l| l.contains(" reload ok: "));
        for l in &reloads {
            let added = ports_in(l, "added");
            let removed = ports_in(l, "removed");
            let k = match added.as_slice() {
                [port] => markers
                    .iter()
                    .position(|m| m == port)
                    .unwrap_or_else(|| panic!("a reload added port {port}, of no version: {l}")),
                _ => panic!("a reload that does not add exactly one marker port: {l}"),
            };
            assert!(
                run.valid_versions.contains(&k),
                "version {k} ({:?}) was applied: {l}",
                run.kinds[k - 1]
            );
            assert!(
                k > current,
                "version {k} applied after version {current}: {l}"
            );
            assert_eq!(removed, [markers[current]], "{l}");
            current = k;
        }
        assert_eq!(current, CHAOS_WRITES);
        reloads.len()
    }

    /// The proxy serves exactly the last version's ports.
    fn assert_serves_exactly_the_last_version(&self, env: &Env, p: &Proxy) {
        let last = self.markers[CHAOS_WRITES];
        assert_eq!(
            netns::try_ask(SocketAddr::from((Ipv4Addr::LOCALHOST, last))),
            Ok("marker".into())
        );
        for &port in &self.stable_ports {
            assert_eq!(
                netns::try_ask(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
                Ok("stable".into())
            );
        }
        for &port in &self.markers[..CHAOS_WRITES] {
            expect_refused(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        let want: BTreeSet<u16> = self.stable_ports.iter().copied().chain([last]).collect();
        match &env.ns {
            // Simple mode: exactly these listening sockets.
            None => assert_eq!(listening_ports(p.pid), want),
            // bpf mode: exactly these ports steered.
            Some(ns) => assert_eq!(ns.steering(p.pid).ports(), want),
        }
    }
}

/// The steady load of `config_chaos`: two clients asking the stable ports in turn, all along.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    clients: Vec<JoinHandle<usize>>,
}

impl SteadyLoad {
    fn start(p: &Proxy) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..2)
            .map(|i| {
                let addr = p.v4(i);
                let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
                thread::spawn(move || {
                    let mut ok = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match netns::try_ask(addr) {
                            Ok(tag) if tag == "stable" => ok += 1,
                            Ok(tag) => failures.lock().unwrap().push(format!("{addr}: tag {tag}")),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                    ok
                })
            })
            .collect();
        SteadyLoad {
            stop,
            failures,
            clients,
        }
    }

    /// Stop the clients; none may have failed. How many connections succeeded.
    fn stop_and_check(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let ok_before = self
            .clients
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum::<usize>();
        let failures = self.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} of {} client connections to the stable ports failed: {:?}",
            failures.len(),
            failures.len() + ok_before,
            &failures[..failures.len().min(10)]
        );
        ok_before
    }
}

/// A seed from the clock and the pid; FLYPROXY_CHAOS_SEED replays a run (the seed is printed).
fn chaos_seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    std::env::var("FLYPROXY_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(seed)
}

/// The ports listed as `key=[a,b]` in a reload line.
fn ports_in(line: &str, key: &str) -> Vec<u16> {
    let pat = format!(" {key}=[");
    let Some(i) = line.find(&pat) else {
        return Vec::new();
    };
    let rest = &line[i + pat.len()..];
    rest[..rest.find(']').expect("a closing bracket")]
        .split(',')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("a port in {line}")))
        .collect()
}

/// Replace the file at once: write a sibling, rename it over.
fn write_by_rename(dir: &Path, path: &Path, bytes: &[u8]) {
    let tmp = dir.join("config.json.next");
    fs::write(&tmp, bytes).expect("write the next config");
    fs::rename(&tmp, path).expect("rename the config over");
}

/// Rewrite the file in place in two steps, `pause` apart: truncate and write the first
/// `split` bytes, then the rest.
fn write_in_place(path: &Path, bytes: &[u8], split: usize, pause: Duration) {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open the config");
    f.write_all(&bytes[..split]).expect("write the first part");
    thread::sleep(pause); // the attack: the file stays half-written for a moment
    f.write_all(&bytes[split..]).expect("write the rest");
}

two_modes!(config_chaos_never_applies_a_partial_config, config_chaos);
