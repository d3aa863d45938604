//! Target names resolved off the connection's path (issue 21): a name whose DNS never answers
//! costs only its own app's clients (each fails at the connect timeout, which covers the lookup)
//! and no other app's health; a thousand connects to one name cost one lookup; and a new
//! connection to an address reaches its target without a hand-off between threads (few context
//! switches per connection).
//!
//! Each test runs in a network namespace of its own (`two_modes!`, `netns::run_plain`). A test
//! that needs DNS names it (`ip netns attach`), so that `ip netns exec` runs the proxy there
//! with its own /etc/resolv.conf (bind-mounted from /etc/netns/NAME/resolv.conf, which the test
//! writes and removes): it points at a DNS server in the test, on 127.0.0.1:53 of that
//! namespace, that answers some names, never answers others, and counts every query. Names end
//! in `.test` (RFC 6761), which /etc/hosts does not list. No network is needed, and nothing of
//! the machine's own configuration is touched.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use modes::Env;

/// How a name is answered by the test's DNS server.
#[derive(Clone, Copy)]
enum Answer {
    /// With this IPv4 address (and no IPv6 one), after the delay.
    After(Ipv4Addr, Duration),
    /// Never: the query is counted and dropped.
    Never,
}

/// The system resolver's own patience in the namespace: a lookup that gets no answer fails
/// after 5 s (one try). Shorter than the tests, so that the old, blocking code shows within
/// them what a hanging name did to the health checker.
const RESOLV_CONF: &str = "nameserver 127.0.0.1\noptions timeout:5 attempts:1\n";

const TYPE_A: u16 = 1;

/// A DNS server on 127.0.0.1:53 of the calling thread's network namespace (the test's own),
/// and that namespace named, so that `ip netns exec NAME` runs the proxy there with its own
/// /etc/resolv.conf pointing at the server. Removed on drop (the name and /etc/netns/NAME; the
/// namespace goes with the test's thread).
struct Dns {
    name: String,
    /// Every query: (name, type).
    queries: Arc<Mutex<Vec<(String, u16)>>>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    /// Holds `run-in-netns`, the proxy's command line's first word.
    dir: TempDir,
}

impl Dns {
    /// Answer as `names` says. The calling thread must be in a namespace of the test's own.
    fn start(names: &[(&str, Answer)]) -> Dns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "flyproxy-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // SAFETY: gettid cannot fail.
        let tid = unsafe { libc::gettid() };
        ip(&["netns", "attach", &name, &tid.to_string()]);
        let etc = format!("/etc/netns/{name}");
        fs::create_dir_all(&etc).unwrap();
        fs::write(format!("{etc}/resolv.conf"), RESOLV_CONF).unwrap();
        let dir = TempDir::new("dns");
        let run = dir.write(
            "run-in-netns",
            &format!("#!/bin/sh\nexec ip netns exec {name} {BIN} \"$@\"\n"),
        );
        fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let names: HashMap<String, Answer> =
            names.iter().map(|(n, a)| (n.to_string(), *a)).collect();
        let socket = UdpSocket::bind("127.0.0.1:53").expect("bind the test's DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (queries, stop) = (Arc::clone(&queries), Arc::clone(&stop));
            thread::spawn(move || serve_dns(&socket, &names, &queries, &stop))
        };
        Dns {
            name,
            queries,
            stop,
            server: Some(server),
            dir,
        }
    }

    /// Queries of type A for `name` so far: one per lookup (getaddrinfo asks A and AAAA once
    /// each per try).
    fn lookups(&self, name: &str) -> usize {
        let q = self.queries.lock().unwrap();
        q.iter().filter(|(n, t)| n == name && *t == TYPE_A).count()
    }

    /// The proxy `launch` describes, run through `ip netns exec` with the namespace's
    /// resolv.conf.
    fn proxy<'a>(&self, launch: Launch<'a>) -> Launch<'a> {
        launch.bin(self.dir.path.join("run-in-netns"))
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Answer queries as `names` says until `stop`; count every query.
fn serve_dns(
    socket: &UdpSocket,
    names: &HashMap<String, Answer>,
    queries: &Mutex<Vec<(String, u16)>>,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some((name, qtype, end)) = question(&buf[..n]) else {
            continue;
        };
        queries.lock().unwrap().push((name.clone(), qtype));
        let Some(Answer::After(ip, delay)) = names.get(&name).copied() else {
            continue;
        };
        let reply = reply(&buf[..end], qtype, ip);
        let socket = socket.try_clone().unwrap();
        thread::spawn(move || {
            thread::sleep(delay);
            let _ = socket.send_to(&reply, from);
        });
    }
}

/// The question of a DNS query: its name (lower-case, dotted), its type, and where it ends.
fn question(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*q.get(at)?, *q.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// The reply to `query` (its header and question): `ip` for type A, no record for any other.
fn reply(query: &[u8], qtype: u16, ip: Ipv4Addr) -> Vec<u8> {
    let mut r = query.to_vec();
    // QR, RD, RA, NOERROR; one question; one answer or none; nothing else.
    r[2..4].copy_from_slice(&[0x81, 0x80]);
    r[4..6].copy_from_slice(&1u16.to_be_bytes());
    let answers: u16 = if qtype == TYPE_A { 1 } else { 0 };
    r[6..8].copy_from_slice(&answers.to_be_bytes());
    r[8..12].fill(0);
    if qtype == TYPE_A {
        // The name by pointer to the question, type A, class IN, TTL 60, 4 bytes.
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    r
}

/// `127.0.0.1:port`, in the test's namespace.
fn at(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Context switches of process `pid`'s threads so far, by thread (its name and id): voluntary
/// (it slept: waited for an event, a lock or a hand-off) and involuntary (preempted).
fn context_switches(pid: u32) -> HashMap<String, (u64, u64)> {
    let mut by_thread = HashMap::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map_or("", str::trim)
                .to_owned()
        };
        let name = format!("{}-{}", get("Name:"), task.file_name().to_string_lossy());
        let n = |key: &str| get(key).parse::<u64>().unwrap_or(0);
        let counts = (
            n("voluntary_ctxt_switches:"),
            n("nonvoluntary_ctxt_switches:"),
        );
        by_thread.insert(name, counts);
    }
    by_thread
}

/// App `good` has three healthy targets checked often (down at the first failed check); app
/// `neigh` has a target whose name never gets an answer. For 12 s of checks, `good` stays up
/// and serves every connection; each of `neigh`'s clients ends `connect_failed` at the connect
/// timeout (1 s), the lookup's wait included, with the reason naming the lookup; forty of them
/// waiting at once share one lookup and start no thread each.
///
/// On the blocking code (before issue 21), the checker thread blocked in getaddrinfo for the
/// resolver's 5 s while `good`'s checks in flight were timed from their start, marking its
/// targets down, and each client of `neigh` waited the 5 s of its own lookup, on a thread of
/// its own.
fn never_answers(env: Env) {
    let mode = env.mode;
    let net = Dns::start(&[("slow.test", Answer::Never)]);
    {
        {
            let good: Vec<Backend> = (0..3).map(|i| Backend::tagged(&format!("g{i}"))).collect();
            let fast_checks = serde_json::json!({"IntervalMs": 200, "TimeoutMs": 500, "Fall": 1});
            let mut good_app = app(
                "good",
                &[7000],
                &good.iter().map(|b| b.target()).collect::<Vec<_>>(),
            );
            good_app["HealthCheck"] = fast_checks.clone();
            let mut neigh = app("neigh", &[7001], &["slow.test:80".to_owned()]);
            neigh["HealthCheck"] = fast_checks;
            let p = net
                .proxy(
                    env.proxy()
                        .config_on(&[7000, 7001], &config(&[good_app, neigh])),
                )
                .args(&["--connect-timeout", "1s"])
                .start();
            let timeout = Duration::from_secs(1);
            let began = Instant::now();
            // Forty clients of `neigh` now, and forty more once the first lookup has failed.
            // Each client keeps its socket (closed by the proxy) to the end, so that no later
            // client of `neigh` gets its port; `good`'s clients may, told apart by the app.
            type Wave = Vec<(TcpStream, SocketAddr, Duration)>;
            let waves: Vec<JoinHandle<Wave>> = [0u64, 7]
                .into_iter()
                .map(|after| {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_secs(after));
                        let clients: Vec<_> = (0..40)
                            .map(|_| {
                                thread::spawn(move || {
                                    let mut s = connect(at(7001));
                                    let local = s.local_addr().unwrap();
                                    let t = Instant::now();
                                    expect_closed(&mut s, WAIT);
                                    (s, local, t.elapsed())
                                })
                            })
                            .collect();
                        clients.into_iter().map(|c| c.join().unwrap()).collect()
                    })
                })
                .collect();
            thread::sleep(Duration::from_millis(500));
            let threads = p.threads();
            let mut served = 0;
            while began.elapsed() < Duration::from_secs(12) {
                let t = Instant::now();
                let tag = tag_of(at(7000));
                assert!(tag.starts_with('g'), "{tag}");
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "a client of `good` waited {:?} beside the hanging name",
                    t.elapsed()
                );
                served += 1;
                thread::sleep(Duration::from_millis(100));
            }
            let down = p.lines(|l| l.contains(" of app good is down"));
            assert!(down.is_empty(), "good's targets went down: {down:#?}");
            let waves: Vec<_> = waves.into_iter().map(|w| w.join().unwrap()).collect();
            let mut longest = 0f64;
            for (_, local, waited) in &waves[0] {
                let c = p.wait_conn_of_app(*local, "neigh");
                assert_eq!(c.end, "connect_failed", "{}", c.line);
                let reason = c.reason.clone().unwrap_or_default();
                assert!(
                    reason.contains(
                        "slow.test:80: name lookup: no answer within the connect timeout"
                    ),
                    "{}",
                    c.line
                );
                // The deadline is the connect timeout: not before it, and not much after it
                // (the target is 100 ms; the margin is for a loaded 2-core machine; the old
                // code waited for the resolver's 5 s).
                let took: f64 = c.duration.trim_end_matches('s').parse().unwrap();
                longest = longest.max(took);
                assert!(
                    (0.95..=1.4).contains(&took),
                    "ended after {took} s with --connect-timeout 1s: {}",
                    c.line
                );
                assert!(
                    *waited < timeout + Duration::from_millis(900),
                    "the client waited {waited:?}"
                );
            }
            for (_, local, waited) in &waves[1] {
                // After a failed lookup the name is either being looked up again (a timeout
                // again) or remembered as failed for a second (at once).
                let c = p.wait_conn_of_app(*local, "neigh");
                assert_eq!(c.end, "connect_failed", "{}", c.line);
                assert!(
                    *waited < timeout + Duration::from_millis(900),
                    "the client waited {waited:?}"
                );
            }
            // One lookup at a time for all the clients and the checks: each takes the
            // resolver's 5 s, and a failure is remembered for a second, so at most one starts
            // every 6 s (the old code: one per client and check, 80 and more).
            let lookups = net.lookups("slow.test");
            let most = 1 + (began.elapsed().as_secs_f64() / 6.0) as usize;
            assert!(
                (1..=most).contains(&lookups),
                "{lookups} lookups of slow.test in {:?}",
                began.elapsed()
            );
            // Main, health, relay threads (one per core), a resolver thread or two: not a
            // thread per waiting client.
            assert!(
                threads <= 10,
                "{threads} threads while 40 clients wait for a name"
            );
            eprintln!(
                "{mode:?}: {served} connections to good served, {lookups} lookups of slow.test, {threads} threads with 40 clients waiting, the longest waited {longest} s"
            );
        }
    }
}

two_modes!(netns a_name_that_never_answers_costs_only_its_own_clients, never_answers);

/// A target whose lookup hangs is given up at the connect timeout and the next target is tried
/// in the same connection: the first client reaches the healthy target after the 1 s deadline
/// (not the resolver's 5 s), and the hanging one, marked down then, is skipped by the next
/// client, which is served at once.
#[test]
fn a_hanging_lookup_fails_over_to_the_next_target_at_the_deadline() {
    netns::run_plain(
        "a_hanging_lookup_fails_over_to_the_next_target_at_the_deadline",
        true,
        |_| {
            let net = Dns::start(&[("slow.test", Answer::Never)]);
            let good = Backend::tagged("good");
            let mut both = app("both", &[7000], &["slow.test:80".to_owned(), good.target()]);
            // Round-robin tries the first target first; checks stay out of the way.
            both["Balance"] = "round-robin".into();
            both["HealthCheck"] = serde_json::json!({"IntervalMs": 600_000});
            let p = net
                .proxy(Proxy::simple().config_on(&[7000], &config(&[both])))
                .args(&["--connect-timeout", "1s"])
                .start();
            let t = Instant::now();
            let mut s = connect(at(7000));
            assert_eq!(read_line(&mut s), "good");
            let first = t.elapsed();
            assert!(
                first >= Duration::from_millis(950) && first < Duration::from_millis(1900),
                "the first client was served after {first:?} with --connect-timeout 1s"
            );
            p.wait_log("slow.test marked down", |l| {
                l.contains("target slow.test:80 of app both is down: name lookup: no answer within the connect timeout")
            });
            let t = Instant::now();
            assert_eq!(tag_of(at(7000)), "good");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "the next client waited {:?}",
                t.elapsed()
            );
        },
    );
}

/// A thousand connections to an app whose target is a name cause one lookup: the first fifty,
/// at once while the DNS server takes 300 ms, share it; the others find the answer cached
/// (`--dns-ttl 1m`). Every connection reaches the target, and the metrics count the one lookup.
#[test]
fn a_thousand_connects_to_one_name_cause_one_lookup() {
    netns::run_plain(
        "a_thousand_connects_to_one_name_cause_one_lookup",
        true,
        |_| {
            let net = Dns::start(&[(
                "fast.test",
                Answer::After(Ipv4Addr::LOCALHOST, Duration::from_millis(300)),
            )]);
            let backend = Backend::tagged("named");
            let target = format!("fast.test:{}", backend.addr.port());
            let p = net
                .proxy(
                    Proxy::simple()
                        .config_on(&[7000], &config(&[app("named", &[7000], &[target])])),
                )
                .args(&["--dns-ttl", "1m", "--metrics", "127.0.0.1:9089"])
                .start();
            let clients: Vec<_> = (0..50)
                .map(|_| {
                    thread::spawn(|| {
                        for _ in 0..20 {
                            assert_eq!(tag_of(at(7000)), "named");
                        }
                    })
                })
                .collect();
            for c in clients {
                c.join().unwrap();
            }
            let queries = net.queries.lock().unwrap().len();
            assert_eq!(
                net.lookups("fast.test"),
                1,
                "lookups of fast.test ({queries} queries in all)"
            );
            let m = common::metrics::scrape(SocketAddr::from((Ipv4Addr::LOCALHOST, 9089)));
            assert_eq!(m.get("flyproxy_dns_lookups_total", &[]), 1.0);
            assert_eq!(m.get("flyproxy_dns_lookups_refused_total", &[]), 0.0);
            drop(p);
        },
    );
}

/// New connections to a target that is an address are run by the relay threads that wait for
/// events, with no hand-off to a thread that starts connections: the same relay threads (one per
/// core) before and after 4000 of them, and few context switches each. The old code handed each
/// new connection to a starting thread: it started and ended 100 and more relay threads for
/// these 4000 connections, and its relay threads slept 0.5-0.9 times per connection (more with
/// the threads that ended, whose counts /proc no longer shows).
///
/// 4000 connections from 40 clients at once, each reading the target's line; every proxy
/// thread's switches are read from /proc before and after. The relay threads' voluntary
/// switches (sleeping for work) are what a hand-off costs, and are asserted with a generous
/// bound (0.03-0.15 here on a loaded 2-core machine, 0.33 at worst in 14 runs; the target is
/// 0.1 for the whole process, and `make bench` gives the real figure). Preemptions are not: on
/// 2 cores shared with the test's 80 client and backend threads they measure the machine's
/// load, not the design. The whole process's figure is printed (the listener thread and the log
/// writer wake for connections too; they are not the relay's).
fn few_context_switches(env: Env) {
    let mode = env.mode;
    let backend = Backend::tagged("t");
    let p = env
        .proxy()
        .config_on(
            &[7000],
            &config(&[app("plain", &[7000], &[backend.target()])]),
        )
        .start();
    const CLIENTS: usize = 40;
    let load = |n: usize| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                thread::spawn(move || {
                    for _ in 0..n {
                        let mut s = TcpStream::connect(at(7000)).unwrap();
                        assert_eq!(read_line(&mut s), "t");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    };
    load(10);
    let before = context_switches(p.pid);
    load(100);
    let after = context_switches(p.pid);
    let n = (CLIENTS * 100) as f64;
    let (mut relay, mut all) = (0, 0);
    for (thread, (vol, invol)) in &after {
        let (vol0, invol0) = before.get(thread).copied().unwrap_or((0, 0));
        let (vol, invol) = (vol - vol0, invol - invol0);
        eprintln!("{mode:?}: thread {thread}: {vol} voluntary, {invol} involuntary switches");
        all += vol + invol;
        if thread.starts_with("relay-") {
            relay += vol;
        }
    }
    let per = relay as f64 / n;
    eprintln!(
        "{mode:?}: per new connection: {per:.3} voluntary switches of the relay threads, {:.3} switches of the whole process",
        all as f64 / n
    );
    let relays = |m: &HashMap<String, (u64, u64)>| {
        let mut r: Vec<String> = m
            .keys()
            .filter(|t| t.starts_with("relay-"))
            .cloned()
            .collect();
        r.sort();
        r
    };
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        relays(&before),
        relays(&after),
        "relay threads started or ended for new connections"
    );
    assert!(
        relays(&after).len() <= cores,
        "{:?}: more relay threads than cores",
        relays(&after)
    );
    assert!(
        per <= 0.5,
        "{per:.3} voluntary context switches of the relay threads per new connection"
    );
}

two_modes!(netns new_connections_cost_few_context_switches, few_context_switches);
