//! `flyproxy bpf`, for real: the binary loads its sk_lookup program and steers ports, each test
//! in a network namespace of its own (see `netns::run`), so nothing here touches the host's
//! ports and the tests run in parallel. They need root; without it they are skipped with a
//! message, except in CI (`CI=true`), where that is a failure.
//!
//! Backends are tagged: each answers with its app's name first, then echoes, so a test sees
//! which app served a port. Every wait polls with a deadline; nothing sleeps to synchronise.

mod common;
#[allow(dead_code)]
mod netns;

use std::collections::BTreeSet;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    app, config, connect, expect_closed, read_line, roundtrip, tag_of, wait_for, Backend, ConnLine,
    Proxy, Rng, WAIT,
};
use netns::{ask, assert_reaches, assert_refused, v4, v6};

/// The config of two apps, `alpha` and `beta`, each served by its tagged backend.
fn two_apps(alpha: &Backend, alpha_ports: &[u16], beta: &Backend, beta_ports: &[u16]) -> String {
    config(&[
        app("alpha", alpha_ports, &[alpha.target()]),
        app("beta", beta_ports, &[beta.target()]),
    ])
}

fn set(ports: &[u16]) -> BTreeSet<u16> {
    ports.iter().copied().collect()
}

/// Every configured port of two apps reaches its own app over IPv4 and IPv6 (ports at both ends
/// of the range included), ports not configured are refused, sockets of other programs in the
/// namespace are left alone, and nothing stays attached after SIGTERM.
#[test]
fn every_port_reaches_its_app_over_ipv4_and_ipv6() {
    netns::run("every_port_reaches_its_app_over_ipv4_and_ipv6", |ns| {
        let alpha = Backend::tagged("alpha");
        let beta = Backend::tagged("beta");
        let alpha_ports = [1, 443, 7001, 7002, 7003, 65535];
        let beta_ports = [7101, 7102, 7103, 9090];
        let mut proxy = Proxy::bpf()
            .config(&two_apps(&alpha, &alpha_ports, &beta, &beta_ports))
            .start();
        let started = proxy.started_line();
        assert!(
            started.contains(" 2 apps, 10 ports, 2 targets "),
            "{started}"
        );

        let steering = ns.steering(proxy.pid);
        let all: BTreeSet<u16> = alpha_ports.iter().chain(&beta_ports).copied().collect();
        assert_eq!(
            steering.ports(),
            all,
            "the ports map holds exactly the configured ports"
        );

        for port in alpha_ports {
            assert_reaches(port, "alpha");
        }
        for port in beta_ports {
            assert_reaches(port, "beta");
        }
        for port in [2, 442, 7000, 7004, 7100, 7104, 9091, 65534] {
            assert_refused(port);
        }
        // Every local address is served, not only 127.0.0.1 and ::1.
        assert_eq!(ask(SocketAddr::from(([127, 0, 0, 2], 7001))), "alpha");
        assert_eq!(ask(SocketAddr::from(([127, 1, 2, 3], 7101))), "beta");
        // A port that is not steered keeps the kernel's normal lookup: the backends' own
        // listeners in this namespace are reached directly, not through the proxy.
        assert_eq!(tag_of(alpha.addr), "alpha");
        assert_eq!(tag_of(beta.addr), "beta");

        // One conn line per connection, with the app, the port dialled and both families.
        let lines = proxy.wait_log_count(0, 2 * all.len() + 2, "conn", |l| {
            ConnLine::parse(l).is_some()
        });
        assert_eq!(lines.len(), 2 * all.len() + 2, "{lines:#?}");
        for port in &all {
            let want = if alpha_ports.contains(port) {
                "alpha"
            } else {
                "beta"
            };
            let conns: Vec<ConnLine> = lines
                .iter()
                .filter_map(|l| ConnLine::parse(l))
                .filter(|c| c.port == *port)
                .collect();
            assert!(conns.len() >= 2, "port {port}: {conns:#?}");
            assert!(
                conns.iter().all(|c| c.app == want && c.end == "closed"),
                "port {port}: {conns:#?}"
            );
            assert!(
                conns.iter().any(|c| c.client.starts_with("127.0.0.1:")),
                "{conns:#?}"
            );
            assert!(
                conns.iter().any(|c| c.client.starts_with("[::1]:")),
                "{conns:#?}"
            );
        }

        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
        ns.wait_nothing_attached(&steering);
        assert_refused(7001);
        assert_refused(7101);
    });
}

/// A real map write failure (the `ports` map frozen with bpftool, so the kernel refuses every
/// update from a syscall) is logged once, does not stop the proxy, does not refuse the
/// reload, and the ports steered before keep working.
#[test]
fn failed_map_write_keeps_the_proxy_serving() {
    netns::run("failed_map_write_keeps_the_proxy_serving", |ns| {
        let alpha = Backend::tagged("alpha");
        let beta = Backend::tagged("beta");
        let mut proxy = Proxy::bpf()
            .config(&two_apps(&alpha, &[7001, 7002], &beta, &[7101]))
            .start();
        let steering = ns.steering(proxy.pid);
        assert_reaches(7001, "alpha");
        steering.freeze_ports_map();

        let mark = proxy.mark();
        let ok = proxy.reload(&two_apps(&alpha, &[7001, 7002, 7003], &beta, &[7101]));
        assert!(ok.contains(" ports_added=1 ports_removed=0 "), "{ok}");
        let error = proxy.wait_log_since(mark, "map error", |l| {
            l.contains("bpf: cannot update the port map")
        });
        assert!(
            error.contains(" ERROR ")
                && error.contains(
                    "bpf: cannot update the port map for 1 ports (first: port 7003: \
                     adding port 7003 to the BPF bindings map failed: "
                )
                && error.contains("retrying at every reload tick"),
            "{error}"
        );
        assert!(
            proxy.try_status().is_none(),
            "the proxy exited after a failed map write"
        );
        assert_eq!(steering.ports(), set(&[7001, 7002, 7101]));
        assert_reaches(7001, "alpha");
        assert_reaches(7002, "alpha");
        assert_reaches(7101, "beta");
        assert_refused(7003);

        // Another reload while the map still refuses: applied, retried quietly (the error is
        // not logged again), still serving.
        let ok = proxy.reload(&two_apps(&alpha, &[7001, 7002, 7003, 7004], &beta, &[7101]));
        assert!(ok.contains(" ports_added=1 ports_removed=0 "), "{ok}");
        let errors = proxy.lines_since(mark, |l| l.contains("bpf: cannot update the port map"));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            proxy.try_status().is_none(),
            "the proxy exited after a failed map write"
        );
        assert_reaches(7002, "alpha");
        assert_reaches(7101, "beta");
        assert_refused(7004);

        // Back to the ports the map already holds: nothing left to write, and the proxy says
        // the map is whole again.
        let ok = proxy.reload(&two_apps(&alpha, &[7001, 7002], &beta, &[7101]));
        assert!(ok.contains(" ports_added=0 ports_removed=2 "), "{ok}");
        proxy.wait_log_since(mark, "recovery", |l| {
            l.contains(" INFO  bpf: port map updated after earlier failures; every port steered")
        });
        assert_reaches(7001, "alpha");
        assert_refused(7003);

        proxy.signal(libc::SIGTERM);
        assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
        ns.wait_nothing_attached(&steering);
    });
}

/// A proxy killed with SIGKILL leaves no link and no program behind: the kernel drops both with
/// the process's descriptors, and the ports are refused again.
#[test]
fn sigkill_leaves_nothing_attached() {
    netns::run("sigkill_leaves_nothing_attached", |ns| {
        let alpha = Backend::tagged("alpha");
        let mut proxy = Proxy::bpf()
            .config(&config(&[app("alpha", &[7001, 7002], &[alpha.target()])]))
            .start();
        let steering = ns.steering(proxy.pid);
        assert_reaches(7001, "alpha");
        let mut open = connect(v4(7002));
        assert_eq!(read_line(&mut open), "alpha");

        proxy.signal(libc::SIGKILL);
        let status = proxy.wait_exit(WAIT);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        ns.wait_nothing_attached(&steering);
        assert_refused(7001);
        assert_refused(7002);
        expect_closed(&mut open, WAIT);
    });
}

/// SIGUSR2 upgrades in place: the new process attaches its own program (with the same
/// listening sockets) before the old one detaches, so no connection is refused at any moment;
/// afterwards exactly one program of ours is attached, the new process's. The old process
/// relays its open connection to the end, then exits 0; the new one reloads and stops cleanly.
#[test]
fn upgrade_hands_steering_to_the_new_process_without_refusing() {
    netns::run(
        "upgrade_hands_steering_to_the_new_process_without_refusing",
        upgrade_hands_steering,
    );
}

fn upgrade_hands_steering(ns: netns::Netns) {
    let alpha = Backend::tagged("alpha");
    let beta = Backend::tagged("beta");
    let mut proxy = Proxy::bpf()
        .config(&two_apps(&alpha, &[7001, 7002], &beta, &[7101]))
        .args(&["--drain-timeout", "60s"])
        .start();
    let old = ns.steering(proxy.pid);
    let mut open = connect(v4(7002));
    assert_eq!(read_line(&mut open), "alpha");

    let clients = AlternatingClients::start();
    wait_for("clients under way", WAIT, || {
        (proxy.lines(|l| l.contains(" conn ")).len() >= 20).then_some(())
    });
    let new_pid = upgrade_and_wait_served(&proxy);
    let new = netns::Stray(new_pid);

    // The old program goes once the new one is attached: exactly one link, the new
    // process's, while the old process still drains.
    let links = wait_for("the old program detached", WAIT, || {
        let links = ns.links();
        (links.len() == 1 && links[0].1 != old.prog).then_some(links)
    });
    let steering = ns.steering(new_pid);
    assert_eq!(links, vec![(steering.link, steering.prog)]);
    assert_eq!(steering.ports(), set(&[7001, 7002, 7101]));
    assert!(
        proxy.try_status().is_none(),
        "the old process left its connection"
    );

    // Keep the clients going a little past the switch, then look at what they saw.
    let after = proxy.mark();
    wait_for("clients served by the new process", WAIT, || {
        (proxy.lines_since(after, |l| l.contains(" conn ")).len() >= 20).then_some(())
    });
    clients.stop_and_check();

    // The old process still relays its connection, then exits 0 once it closes.
    roundtrip(&mut open, b"through the old process\n");
    open.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut open, WAIT);
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert_eq!(status.code(), Some(0));

    // The new process serves and reloads.
    assert_reaches(7001, "alpha");
    let ok = proxy.reload(&two_apps(&alpha, &[7001, 7002, 7003], &beta, &[7101]));
    assert!(ok.contains(" ports_added=1 ports_removed=0 "), "{ok}");
    assert_reaches(7003, "alpha");
    assert_eq!(ns.links().len(), 1);

    new.signal(libc::SIGTERM);
    wait_for("the new process to exit", WAIT, || new.gone().then_some(()));
    ns.wait_nothing_attached(&steering);
    ns.wait_nothing_attached(&old);
    assert_refused(7001);
}

/// SIGUSR2 to `proxy`: the pid of the new process, once it says it serves.
fn upgrade_and_wait_served(proxy: &common::Proxy) -> u32 {
    let mark = proxy.mark();
    proxy.signal(libc::SIGUSR2);
    let started = proxy.wait_log_since(mark, "upgrade started", |l| {
        l.contains(" upgrade: started ")
    });
    let new_pid: u32 = started
        .split(" as pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {started:?}"));
    proxy.wait_log_since(mark, "handed over", |l| {
        l.contains(&format!(" upgrade: pid {new_pid} is serving; "))
    });
    new_pid
}

/// Clients connecting all along, over both families (7001 on IPv4 to alpha, 7101 on IPv6 to
/// beta, in turn); stopped however the test ends.
struct AlternatingClients {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(usize, Vec<String>)>>,
}

impl AlternatingClients {
    fn start() -> AlternatingClients {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut ok, mut failed) = (0usize, Vec::new());
                for i in 0..1_000_000usize {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let (addr, want) = if i % 2 == 0 {
                        (v4(7001), "alpha")
                    } else {
                        (v6(7101), "beta")
                    };
                    match netns::try_ask(addr) {
                        Ok(tag) if tag == want => ok += 1,
                        Ok(tag) => failed.push(format!("{addr}: served by {tag}")),
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        };
        AlternatingClients {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop the clients: none failed, and at least 40 were served.
    fn stop_and_check(mut self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("the client thread, once");
        let (ok, failed) = thread.join().expect("client thread");
        assert!(
            failed.is_empty(),
            "{} of {} connections failed during the upgrade: {failed:#?}",
            failed.len(),
            ok + failed.len()
        );
        assert!(ok >= 40, "only {ok} connections");
    }
}

impl Drop for AlternatingClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// `--bind 127.0.0.1` claims nothing on IPv6: an IPv6 connection to a configured port is left
/// to the regular lookup, so another socket listening there gets it, and with none it is
/// refused at once, exactly as if the proxy were a plain listener on 127.0.0.1.
#[test]
fn bind_to_ipv4_leaves_ipv6_alone() {
    netns::run("bind_to_ipv4_leaves_ipv6_alone", |ns| {
        let alpha = Backend::tagged("alpha");
        let proxy = Proxy::bpf()
            .config(&config(&[app("alpha", &[7001, 7002], &[alpha.target()])]))
            .args(&["--bind", "127.0.0.1"])
            .start();
        let steering = ns.steering(proxy.pid);
        assert_eq!(steering.ports(), set(&[7001, 7002]));
        let other = TcpListener::bind(v6(7001)).expect("bind [::1]:7001");
        for port in [7001, 7002] {
            assert_eq!(ask(v4(port)), "alpha");
        }
        let _to_other = std::net::TcpStream::connect_timeout(&v6(7001), WAIT)
            .expect("[::1]:7001 reaches the other listener");
        other.set_nonblocking(false).unwrap();
        let (accepted, _) = other
            .accept()
            .expect("the other listener gets the connection");
        assert_eq!(accepted.local_addr().unwrap().port(), 7001);
        let started = Instant::now();
        common::expect_refused(v6(7002));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusal took {:?}",
            started.elapsed()
        );
    });
}

/// `--bind 127.0.0.1` serves the configured ports on 127.0.0.1 only, as a listener bound to
/// that address would: a connection to another local address (here 127.0.0.2, standing for a
/// host's public address) must not reach the proxy. Otherwise `--bind 127.0.0.1`, the usual way
/// to keep a service off the network, would expose every configured port on every address.
#[test]
fn bind_address_limits_steering_to_that_address() {
    netns::run("bind_address_limits_steering_to_that_address", |_ns| {
        let alpha = Backend::tagged("alpha");
        let _proxy = Proxy::bpf()
            .config(&config(&[app("alpha", &[7001, 7002], &[alpha.target()])]))
            .args(&["--bind", "127.0.0.1"])
            .start();
        assert_eq!(ask(v4(7001)), "alpha");
        for port in [7001, 7002] {
            let other = SocketAddr::from(([127, 0, 0, 2], port));
            match std::net::TcpStream::connect_timeout(&other, WAIT) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => panic!("connect {other}: expected refused, got {e}"),
                Ok(mut s) => {
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let served = read_line(&mut s);
                    panic!(
                        "--bind 127.0.0.1, yet a connection to {other} was steered to the proxy \
                         and served by app {served:?}"
                    );
                }
            }
        }
    });
}

/// Without CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (dropped from the bounding set, so root's
/// exec does not get them back) the proxy exits 1 saying which capabilities it needs, and
/// nothing is attached.
#[test]
fn start_without_bpf_capabilities_fails_with_the_reason() {
    netns::run(
        "start_without_bpf_capabilities_fails_with_the_reason",
        |ns| {
            const CAP_NET_ADMIN: libc::c_ulong = 12;
            const CAP_SYS_ADMIN: libc::c_ulong = 21;
            const CAP_BPF: libc::c_ulong = 39;
            let alpha = Backend::tagged("alpha");
            let mut proxy = Proxy::bpf()
                .config(&config(&[app("alpha", &[7001], &[alpha.target()])]))
                .command(|cmd| {
                    // SAFETY: only prctl(2) between fork and exec.
                    unsafe {
                        cmd.pre_exec(|| {
                            for cap in [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF] {
                                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                                    return Err(io::Error::last_os_error());
                                }
                            }
                            Ok(())
                        });
                    }
                })
                .spawn();
            let status = proxy.wait_exit(WAIT);
            let log = proxy.logs().join("\n");
            assert_eq!(status.code(), Some(1), "{log}");
            assert!(
                log.contains("flyproxy bpf needs CAP_BPF and CAP_NET_ADMIN"),
                "{log}"
            );
            assert!(!log.contains(" started mode=bpf "), "{log}");
            assert_eq!(ns.links(), vec![]);
            assert_refused(7001);
        },
    );
}

/// The listener's port already taken in the namespace: exit 1 naming the address, nothing
/// attached.
#[test]
fn start_with_the_listener_port_taken_fails_with_the_reason() {
    netns::run(
        "start_with_the_listener_port_taken_fails_with_the_reason",
        |ns| {
            let _taken =
                TcpListener::bind(("0.0.0.0", netns::LISTENER_PORT)).expect("bind 0.0.0.0:8000");
            let alpha = Backend::tagged("alpha");
            let mut proxy = Proxy::bpf()
                .config(&config(&[app("alpha", &[7001], &[alpha.target()])]))
                .spawn();
            let status = proxy.wait_exit(WAIT);
            let log = proxy.logs().join("\n");
            assert_eq!(status.code(), Some(1), "{log}");
            assert!(log.contains("cannot listen on 0.0.0.0:8000: "), "{log}");
            assert!(!log.contains(" started mode=bpf "), "{log}");
            assert_eq!(ns.links(), vec![]);
            assert_refused(7001);
        },
    );
}

/// 10,000 ports on one app and a few on another: it starts, the ports map holds all of them,
/// a sample (first, last, random) reaches the app, and a reload that removes 5,000 ports and
/// adds 5,000 others applies. Prints the timings (start to ready, and the reload's `took=`).
#[test]
fn ten_thousand_ports() {
    netns::run("ten_thousand_ports", |ns| {
        // Every port below the ephemeral range (32768..), so that no backend (bound to port 0)
        // or connection of the proxy's ever sits on a steered port.
        let big: Vec<u16> = (20_000..30_000).collect();
        let small = [7001, 7002, 7003];
        let alpha = Backend::tagged("alpha");
        let beta = Backend::tagged("beta");

        let spawned = Instant::now();
        let mut proxy = Proxy::bpf()
            .config(&two_apps(&alpha, &big, &beta, &small))
            .start();
        let start_ms = netns::ms_since(spawned);
        let started = proxy.started_line();
        assert!(
            started.contains(" 2 apps, 10003 ports, 2 targets "),
            "{started}"
        );
        let steering = ns.steering(proxy.pid);
        let mut want: BTreeSet<u16> = big.iter().chain(&small).copied().collect();
        assert_eq!(steering.ports(), want, "the ports map after start");

        let mut rng = Rng::seeded();
        let mut sample = vec![20_000, 29_999];
        sample.extend((0..16).map(|_| 20_000 + (rng.next() % 10_000) as u16));
        for &port in &sample {
            assert_eq!(ask(v4(port)), "alpha", "port {port}");
        }
        assert_reaches(20_000, "alpha");
        assert_reaches(29_999, "alpha");
        for port in small {
            assert_reaches(port, "beta");
        }
        for port in [19_999, 30_000, 7000, 7004] {
            assert_refused(port);
        }

        // Remove 20000..25000, add 10000..15000.
        let new_big: Vec<u16> = (10_000..15_000).chain(25_000..30_000).collect();
        let ok = proxy.reload(&two_apps(&alpha, &new_big, &beta, &small));
        assert!(ok.contains(" ports_added=5000 ports_removed=5000 "), "{ok}");
        let reload_ms = netns::took_ms(&ok);
        want = new_big.iter().chain(&small).copied().collect();
        assert_eq!(steering.ports(), want, "the ports map after the reload");

        let mut sample = vec![10_000, 14_999, 25_000, 29_999];
        sample.extend((0..8).map(|_| 10_000 + (rng.next() % 5_000) as u16));
        sample.extend((0..8).map(|_| 25_000 + (rng.next() % 5_000) as u16));
        for &port in &sample {
            assert_eq!(ask(v4(port)), "alpha", "port {port}");
        }
        assert_reaches(10_000, "alpha");
        assert_reaches(29_999, "alpha");
        assert_reaches(7002, "beta");
        let mut gone = vec![20_000, 24_999];
        gone.extend((0..8).map(|_| 20_000 + (rng.next() % 5_000) as u16));
        for port in gone {
            assert_refused(port);
        }
        for port in [9_999, 15_000, 30_000] {
            assert_refused(port);
        }

        let stop_at = Instant::now();
        proxy.signal(libc::SIGTERM);
        assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
        let stop_ms = netns::ms_since(stop_at);
        ns.wait_nothing_attached(&steering);

        eprintln!(
            "ten_thousand_ports ({}): start with 10003 ports, spawn to ready: {start_ms:.1}ms; \
             reload -5000/+5000: took={reload_ms:.3}ms; SIGTERM to exit: {stop_ms:.1}ms",
            if cfg!(debug_assertions) {
                "debug test build"
            } else {
                "release test build"
            },
        );
        eprintln!("  {started}\n  {ok}");
    });
}
