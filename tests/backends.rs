//! Backends as a user sees them: passive and active health (a target that dies, one that comes
//! back, ones that never answer), balancing (p2c, round-robin, random), ConnectAttempts, the
//! per-app MaxConnections, the PROXY protocol header, health state across a reload, and the
//! validation of the per-app keys.
//!
//! Everything waits on conditions with deadlines; the only fixed windows are bounded negative
//! checks ("nothing arrives for 500 ms") and a little pacing between client connections. Timing
//! assertions are lower bounds (Rise, Fall) or generous upper ones. Backends that need more
//! than `common` offers (open connection counts, a port that refuses, dies and comes back
//! without ever letting go of it, a PROXY-protocol parser) are here.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Config helpers

/// `target HOST:PORT of app A is down: ` as the proxy logs it.
fn down_msg(target: &str, app: &str) -> String {
    format!("target {target} of app {app} is down: ")
}

/// `target HOST:PORT of app A is up: ` as the proxy logs it.
fn up_msg(target: &str, app: &str) -> String {
    format!("target {target} of app {app} is up: ")
}

// ---------------------------------------------------------------------------------------------
// A tagged echo backend that counts open connections and can refuse, die and come back

#[derive(Default)]
struct Stats {
    /// Connections accepted and not yet closed (health checks included, briefly).
    open: AtomicUsize,
    /// Connections that sent at least one byte: client traffic, not health checks.
    served: AtomicUsize,
    stop: AtomicBool,
}

/// On 127.0.0.1, a port that either refuses (bound, not listening: a SYN gets a reset) or
/// serves `TAG\n` then echoes. It can switch between the two without ever letting go of its
/// port, so no other process can take the port while it is "dead".
struct Server {
    tag: String,
    addr: SocketAddr,
    stats: Arc<Stats>,
    /// Bound but not listening: refusing.
    dormant: Option<OwnedFd>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// A port that refuses until `listen`.
    fn dormant(tag: &str) -> Server {
        let (fd, addr) = bound_v4(0);
        Server {
            tag: tag.to_owned(),
            addr,
            stats: Arc::default(),
            dormant: Some(fd),
            accept: None,
        }
    }

    /// A tagged echo server, serving at once.
    fn tagged(tag: &str) -> Server {
        let mut s = Server::dormant(tag);
        s.listen();
        s
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn open(&self) -> usize {
        self.stats.open.load(Ordering::Acquire)
    }

    fn served(&self) -> usize {
        self.stats.served.load(Ordering::Acquire)
    }

    /// Start listening (and serving) on the port.
    fn listen(&mut self) {
        let fd = self.dormant.take().expect("listen: already listening");
        // SAFETY: listen(2) on a bound stream socket we own.
        let rc = unsafe { libc::listen(fd.as_raw_fd(), 1024) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
        let listener = TcpListener::from(fd);
        self.stats.stop.store(false, Ordering::Release);
        let (stats, tag) = (Arc::clone(&self.stats), self.tag.clone());
        self.accept = Some(thread::spawn(move || {
            for conn in listener.incoming() {
                if stats.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                stats.open.fetch_add(1, Ordering::AcqRel);
                let (stats, tag) = (Arc::clone(&stats), tag.clone());
                thread::spawn(move || {
                    serve_tagged(conn, &tag, &stats.served);
                    stats.open.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }));
    }

    /// Die: stop listening (connections already open go on) and refuse from now on. The port
    /// is taken again at once by a bound, non-listening socket.
    fn kill(&mut self) {
        let t = self.accept.take().expect("kill: not listening");
        self.stats.stop.store(true, Ordering::Release);
        // Wake the blocked accept; its loop then ends and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
        t.join().unwrap();
        let (fd, _) = bound_v4(self.addr.port());
        self.dormant = Some(fd);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.kill();
        }
    }
}

fn serve_tagged(mut s: TcpStream, tag: &str, served: &AtomicUsize) {
    if s.write_all(format!("{tag}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut counted = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !counted {
                    counted = true;
                    served.fetch_add(1, Ordering::AcqRel);
                }
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// A TCP socket bound to 127.0.0.1:`port` (0: any), not listening, with SO_REUSEADDR so that
/// it can take back the port of a listener that just closed (its accepted connections may
/// linger in TIME_WAIT).
fn bound_v4(port: u16) -> (OwnedFd, SocketAddr) {
    // SAFETY: socket(2); checked and owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_REUSEADDR: {}", io::Error::last_os_error());
    // SAFETY: a zeroed sockaddr_in is valid; the fields bind needs are set.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = port.to_be();
    sin.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sin is a valid sockaddr_in of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sin as *const _ as *const libc::sockaddr,
            len,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind 127.0.0.1:{port}: {}",
        io::Error::last_os_error()
    );
    let mut got: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut got_len = len;
    // SAFETY: got is a sockaddr_in buffer of got_len bytes.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut got as *mut _ as *mut libc::sockaddr,
            &mut got_len,
        )
    };
    assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from_be(got.sin_port)));
    (fd, addr)
}

// ---------------------------------------------------------------------------------------------
// Clients that report failure instead of panicking, so that loops can count failures

/// One client connection to a tagged backend through the proxy: connect, read the tag, echo
/// `msg`, close. The tag, or what went wrong.
fn try_tagged(addr: SocketAddr, msg: &[u8]) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let tag = try_read_line(&mut s)?;
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)
        .map_err(|e| format!("read echo (tag {tag}): {e}"))?;
    if got != msg {
        return Err(format!("echo differs (tag {tag})"));
    }
    Ok(tag)
}

fn try_read_line(s: &mut TcpStream) -> Result<String, String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.len() < 256 {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(format!(
                    "EOF before the tag line (got {:?})",
                    String::from_utf8_lossy(&out)
                ))
            }
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(_) => out.push(b[0]),
            Err(e) => return Err(format!("reading the tag line: {e}")),
        }
    }
    Err("tag line too long".into())
}

/// `n` sequential connections; the tag of each, panicking on any failure.
fn tags(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| try_tagged(addr, format!("conn {i}\n").as_bytes()).unwrap())
        .collect()
}

fn count(tags: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in tags {
        *m.entry(t.clone()).or_insert(0) += 1;
    }
    m
}

/// One connection made by a `Traffic` thread.
struct Outcome {
    started: Instant,
    result: Result<String, String>,
}

/// Client threads making connections (`try_tagged`) back to back until stopped. Each holds
/// `gate` for reading while its connection lives, so that a test can take it for writing to
/// act between connections.
struct Traffic {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// At most this many connections per thread, so that the loop is bounded even if a test
    /// forgets to stop it.
    const CAP: usize = 20_000;

    fn start(addr: SocketAddr, nthreads: usize, gate: &Arc<RwLock<()>>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..nthreads)
            .map(|t| {
                let (stop, outcomes, gate) =
                    (Arc::clone(&stop), Arc::clone(&outcomes), Arc::clone(gate));
                thread::spawn(move || {
                    for i in 0..Traffic::CAP {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let open = gate.read().unwrap();
                        let started = Instant::now();
                        let result = try_tagged(addr, format!("thread {t} conn {i}\n").as_bytes());
                        outcomes.lock().unwrap().push(Outcome { started, result });
                        drop(open);
                        // Pacing, not synchronisation: a few hundred connections a second
                        // are plenty, and keep the TIME_WAIT sockets left behind few.
                        thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            outcomes,
            threads,
        }
    }

    /// Wait (up to `WAIT`) until `pred` holds of the outcomes so far.
    fn wait(&self, what: &str, pred: impl Fn(&[Outcome]) -> bool) {
        wait_for(what, WAIT, || {
            pred(&self.outcomes.lock().unwrap()).then_some(())
        });
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

fn failures(outcomes: &[Outcome]) -> Vec<&String> {
    outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Health: passive marking, failover, active checks

/// With connections flowing from several clients, one of three targets dies. Zero client
/// connections fail: the first connect that finds it dead marks it down (passive) and fails
/// over to another target, and from then on new connections go only to the other two; the
/// active check (every 300 ms while down) keeps it down.
///
/// The target dies between client connections (the clients hold a read lock per connection,
/// the kill takes the write lock): a connection that a dying backend had already accepted, or
/// had in its accept queue, is lost whatever the proxy does, since the proxy had connected.
#[test]
fn a_target_killed_while_connections_flow_costs_no_client_connection() {
    const INTERVAL: Duration = Duration::from_millis(300);
    let mut servers = [
        Server::tagged("t1"),
        Server::tagged("t2"),
        Server::tagged("t3"),
    ];
    let targets: Vec<String> = servers.iter().map(Server::target).collect();
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "flow",
                ports,
                &targets,
                json!({"HealthCheck": {"IntervalMs": INTERVAL.as_millis() as u64}}),
            )])
        })
        .start();
    let gate = Arc::new(RwLock::new(()));
    let traffic = Traffic::start(p.v4(0), 3, &gate);
    traffic.wait("traffic to every target", |o| {
        let ok: Vec<&String> = o.iter().filter_map(|o| o.result.as_ref().ok()).collect();
        ok.len() >= 30 && ["t1", "t2", "t3"].iter().all(|t| ok.iter().any(|g| g == t))
    });

    let mark = p.mark();
    let killed_at = {
        let _between_connections = gate.write().unwrap();
        servers[1].kill();
        Instant::now()
    };
    let down = p.wait_log_since(mark, "t2 down", |l| {
        l.contains(&down_msg(&targets[1], "flow"))
    });
    let noticed = killed_at.elapsed();
    // Within one check interval: the first connection that tries it marks it down (passive),
    // long before the active check of an up target (every 5 intervals) would.
    assert!(
        noticed <= INTERVAL,
        "marked down {noticed:?} after the kill (more than one interval)"
    );
    assert!(down.contains(" WARN  "), "{down}");
    assert!(down.contains("connection refused"), "{down}");
    // Keep going for several check intervals past the down line, and a good number of
    // connections, so the active checks of the dead target run meanwhile.
    let down_seen = Instant::now();
    traffic.wait("traffic after the kill", |o| {
        o.iter().filter(|o| o.started > killed_at).count() >= 150
            && down_seen.elapsed() >= INTERVAL * 4
    });
    let outcomes = traffic.finish();

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} client connections failed: {failed:#?}",
        failed.len(),
        outcomes.len()
    );
    let after: Vec<&String> = outcomes
        .iter()
        .filter(|o| o.started > killed_at)
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    assert!(!after.iter().any(|t| *t == "t2"), "a dead target served");
    for t in ["t1", "t3"] {
        assert!(
            after.iter().any(|g| *g == t),
            "{t} got nothing after the kill"
        );
    }
    // Marked down once and kept down by the active checks: no flapping.
    assert_eq!(
        p.lines_since(mark, |l| l.contains(&down_msg(&targets[1], "flow")))
            .len(),
        1
    );
    assert_eq!(
        p.lines_since(mark, |l| l.contains(&up_msg(&targets[1], "flow"))),
        Vec::<String>::new()
    );
    assert_eq!(
        p.lines(|l| l.contains(" end=connect_failed")),
        Vec::<String>::new()
    );
    eprintln!(
        "killed target marked down {noticed:?} after the kill; {} connections after it",
        after.len()
    );
}

/// A target that refuses is marked down; once something listens on its port again, the active
/// check (every 300 ms for a down target) brings it back within two intervals, logged `is up:
/// health check passed`, and it gets connections again.
#[test]
fn a_dead_target_comes_back_after_a_health_check() {
    const INTERVAL: Duration = Duration::from_millis(300);
    let mut back = Server::dormant("back");
    let others = [Server::tagged("o1"), Server::tagged("o2")];
    let targets = vec![back.target(), others[0].target(), others[1].target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "phoenix",
                ports,
                &targets,
                json!({"HealthCheck": {"IntervalMs": INTERVAL.as_millis() as u64}}),
            )])
        })
        .start();

    // Traffic finds it dead; every client connection is still served.
    let down = wait_for("the refusing target marked down", WAIT, || {
        let tag = try_tagged(p.v4(0), b"x").unwrap();
        assert_ne!(tag, "back");
        p.lines(|l| l.contains(&down_msg(&targets[0], "phoenix")))
            .pop()
    });
    assert!(down.contains(" WARN  "), "{down}");
    assert!(down.contains("connection refused"), "{down}");

    let mark = p.mark();
    back.listen();
    let listening = Instant::now();
    let up = p.wait_log_since(mark, "the target back up", |l| {
        l.contains(&up_msg(&targets[0], "phoenix"))
    });
    let took = listening.elapsed();
    assert!(up.contains(" INFO  "), "{up}");
    assert!(up.ends_with("is up: health check passed"), "{up}");
    // Two intervals, plus room for a loaded machine to schedule the checker thread.
    let bound = INTERVAL * 2 + Duration::from_millis(1500);
    assert!(took <= bound, "back up after {took:?} (bound {bound:?})");
    eprintln!("target back up {took:?} after it listened again");

    // It is picked again (p2c among three: bounded, and never-picked is astronomically rare).
    let mut seen = Vec::new();
    for i in 0..300 {
        let tag = try_tagged(p.v4(0), format!("after {i}\n").as_bytes()).unwrap();
        let got_it = tag == "back";
        seen.push(tag);
        if got_it {
            break;
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("back"),
        "{:?}",
        count(&seen)
    );
    assert!(back.served() >= 1);
}

/// `Rise: 3`: a down target that answers again needs three passing checks in a row, so it is
/// back no sooner than two intervals after it listens (the checks are an interval apart), and
/// it gets no connection meanwhile.
#[test]
fn rise_needs_that_many_passing_checks_in_a_row() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let mut back = Server::dormant("back");
    let other = Server::tagged("other");
    let targets = vec![back.target(), other.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "riser",
                ports,
                &targets,
                json!({"Balance": "round-robin",
                   "HealthCheck": {"IntervalMs": INTERVAL.as_millis() as u64, "Rise": 3}}),
            )])
        })
        .start();
    // Round-robin tries it first: refused, marked down, the client served by the other.
    assert_eq!(try_tagged(p.v4(0), b"x"), Ok("other".into()));
    p.wait_log("back down", |l| l.contains(&down_msg(&targets[0], "riser")));

    let mark = p.mark();
    back.listen();
    let listening = Instant::now();
    let up_line = |l: &str| l.contains(&up_msg(&targets[0], "riser"));
    // Until it is back, connections keep off it.
    while p.lines_since(mark, up_line).is_empty() && listening.elapsed() < WAIT {
        assert_eq!(try_tagged(p.v4(0), b"meanwhile"), Ok("other".into()));
        thread::sleep(Duration::from_millis(20)); // pacing only
    }
    let up = p.wait_log_since(mark, "back up", up_line);
    let took = listening.elapsed();
    assert!(up.ends_with("is up: health check passed"), "{up}");
    assert!(
        took >= INTERVAL * 2,
        "up after {took:?}: fewer than 3 checks"
    );
    assert_eq!(back.served(), 0);
    // Round-robin over both again.
    let got = count(&tags(p.v4(0), 4));
    assert_eq!(
        got,
        BTreeMap::from([("back".into(), 2), ("other".into(), 2)])
    );
}

/// Without traffic, only the active check sees a target die: an up target is checked every 5
/// intervals, and with `Fall: 2` it takes two failed checks in a row to mark it down, so the
/// `is down: health check: ...` line comes no sooner than 5 intervals after it died.
#[test]
fn fall_needs_that_many_failed_checks_of_an_idle_up_target() {
    const INTERVAL: Duration = Duration::from_millis(100);
    let mut dying = Server::tagged("dying");
    let other = Server::tagged("other");
    let targets = vec![dying.target(), other.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "idle",
                ports,
                &targets,
                json!({"HealthCheck": {"IntervalMs": INTERVAL.as_millis() as u64, "Fall": 2}}),
            )])
        })
        .start();
    let mark = p.mark();
    dying.kill();
    let killed = Instant::now();
    let down = p.wait_log_since(mark, "the idle target down", |l| {
        l.contains(&down_msg(&targets[0], "idle"))
    });
    let took = killed.elapsed();
    assert!(
        down.ends_with("is down: health check: connection refused"),
        "{down}"
    );
    assert!(
        took >= INTERVAL * 5,
        "down {took:?} after it died: fewer than 2 checks"
    );
    // The other one, alive, was checked all along and never logged.
    assert_eq!(p.lines(|l| l.contains(&targets[1])), Vec::<String>::new());
}

/// A target listed twice (a crude weight: round-robin gives it two turns in three) goes down
/// and comes back: once it is logged up again, it gets its two turns in three again, as before
/// it went down.
#[test]
fn a_target_listed_twice_comes_back_with_both_of_its_turns() {
    let mut twice = Server::tagged("twice");
    let once = Server::tagged("once");
    let targets = vec![twice.target(), twice.target(), once.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "weighted",
                ports,
                &targets,
                json!({"Balance": "round-robin", "HealthCheck": {"IntervalMs": 200}}),
            )])
        })
        .start();
    let before = count(&tags(p.v4(0), 30));
    assert_eq!(
        before,
        BTreeMap::from([("once".into(), 10), ("twice".into(), 20)])
    );

    twice.kill();
    // Traffic finds it dead; a dozen more connections (round-robin) reach every entry of it
    // that might still look up.
    wait_for("the target marked down", WAIT, || {
        assert_eq!(try_tagged(p.v4(0), b"x"), Ok("once".into()));
        p.lines(|l| l.contains(&down_msg(&targets[0], "weighted")))
            .pop()
    });
    assert!(tags(p.v4(0), 12).iter().all(|t| t == "once"));
    let mark = p.mark();
    twice.listen();
    p.wait_log_since(mark, "the target up again", |l| {
        l.contains(&up_msg(&targets[0], "weighted"))
    });
    // Its entries may come back one check apart: look (two rounds at a time) for up to 25
    // intervals, then compare 30 connections with before.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if count(&tags(p.v4(0), 6)).get("twice") == Some(&4) {
            break;
        }
        thread::sleep(Duration::from_millis(100)); // pacing only
    }
    let after = count(&tags(p.v4(0), 30));
    assert_eq!(
        after, before,
        "after coming back, the target listed twice gets a different share"
    );
}

/// Among three targets, one name that does not resolve and one port that refuses: 200
/// connections from 4 clients at once all succeed, all on the working target, and the two
/// broken ones are each logged down with their reason.
#[test]
fn unresolvable_and_refusing_targets_cost_no_client_connection() {
    let good = Server::tagged("good");
    let refusing = Refusing::new();
    let targets = vec![UNRESOLVABLE.to_owned(), refusing.target(), good.target()];
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("mixed", ports, &targets)]))
        .start();
    let addr = p.v4(0);
    let clients: Vec<JoinHandle<Vec<Result<String, String>>>> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                (0..50)
                    .map(|i| try_tagged(addr, format!("client {t} conn {i}\n").as_bytes()))
                    .collect()
            })
        })
        .collect();
    let results: Vec<Result<String, String>> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(results.len(), 200);
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());
    assert!(results.iter().all(|r| r.as_deref() == Ok("good")));

    let unresolvable = p.wait_log("unresolvable target down", |l| {
        l.contains(&down_msg(UNRESOLVABLE, "mixed"))
    });
    assert!(
        unresolvable.contains("name does not resolve"),
        "{unresolvable}"
    );
    let refused = p.wait_log("refusing target down", |l| {
        l.contains(&down_msg(&refusing.target(), "mixed"))
    });
    assert!(refused.contains("connection refused"), "{refused}");
    // Every connection is logged as served by the working target.
    let lines = p.wait_log_count(0, 200, "conn end=closed", |l| {
        l.contains(" conn app=mixed ") && l.contains(" end=closed")
    });
    let want = format!(" target={} ", good.target());
    assert!(lines.iter().all(|l| l.contains(&want)), "{lines:#?}");
    assert_eq!(
        p.lines(|l| l.contains(" end=connect_failed")),
        Vec::<String>::new()
    );
}

/// `ConnectAttempts: 1`: a connection whose one pick refuses is closed at once (logged
/// `end=connect_failed` with the reason), and the refusing target is skipped from then on.
/// Round-robin makes the first pick the first target.
#[test]
fn connect_attempts_bounds_the_targets_tried_per_connection() {
    let refusing = Refusing::new();
    let good = Server::tagged("good");
    let targets = vec![refusing.target(), good.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "once",
                ports,
                &targets,
                json!({"ConnectAttempts": 1, "Balance": "round-robin"}),
            )])
        })
        .start();
    let mut s = connect(p.v4(0));
    let local = s.local_addr().unwrap();
    expect_closed(&mut s, WAIT);
    let c = p.wait_conn(local);
    assert_eq!(c.end, "connect_failed", "{}", c.line);
    assert_eq!(c.level, "WARN", "{}", c.line);
    let reason = c.reason.unwrap_or_default();
    assert!(
        reason.contains(&refusing.target()) && reason.contains("connection refused"),
        "{}",
        c.line
    );
    assert!(!reason.contains(&good.target()), "tried twice: {}", c.line);
    assert_eq!(
        count(&tags(p.v4(0), 10)),
        BTreeMap::from([("good".into(), 10)])
    );
}

/// When every target of an app looks down, they are still tried (fail open); a connection that
/// then succeeds brings its target up at once, logged `is up: a connection succeeded`. The
/// long check interval keeps the active checker out of it.
#[test]
fn targets_all_down_are_still_tried_and_a_connection_brings_one_up() {
    let mut a = Server::dormant("a");
    let b = Server::dormant("b");
    let targets = vec![a.target(), b.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "allDown",
                ports,
                &targets,
                json!({"HealthCheck": {"IntervalMs": 600_000}}),
            )])
        })
        .start();
    let mut s = connect(p.v4(0));
    let local = s.local_addr().unwrap();
    expect_closed(&mut s, WAIT);
    let c = p.wait_conn(local);
    assert_eq!(c.end, "connect_failed", "{}", c.line);
    for t in &targets {
        p.wait_log(&format!("{t} down"), |l| {
            l.contains(&down_msg(t, "allDown"))
        });
    }

    a.listen();
    let mark = p.mark();
    assert_eq!(try_tagged(p.v4(0), b"hello\n"), Ok("a".into()));
    let up = p.wait_log_since(mark, "a up", |l| {
        l.contains(&up_msg(&targets[0], "allDown"))
    });
    assert!(up.ends_with("is up: a connection succeeded"), "{up}");
}

// ---------------------------------------------------------------------------------------------
// Balancing

/// p2c over 3 targets, 1,000 connections of uneven length (10% long-lived, 90% short), opened
/// one after another: sampled after every connection, the largest target's share of the open
/// connections, counted at the backends themselves (and, the same way, from the client's side by
/// the tag each connection got), stays near a third: at most 1.2x its fair share on average, at
/// most 1.4x in 95% of the samples, and never 2x.
///
/// Lengths are counted in connections opened meanwhile, not in time, so that how many are open
/// at once (30 to 40 once the long ones pile up) does not depend on the machine's speed, and
/// the seed is fixed, so the load is the same at every run. Samples count only while 30 or more
/// are open: with a handful open, one connection more is already "more than 1.5x" and says
/// nothing about balancing.
///
/// Why a distribution and not a bound on every sample: p2c's picks are random, so its worst
/// sample of some 1,400 has a tail (1.27-1.60x over 40 runs with the closes synced as below, its
/// 99th percentile 1.24-1.41x), and a bound of 1.5x on the worst one failed at random. The bulk
/// is steady: mean 1.09-1.15x, 95th percentile 1.18-1.30x, quiet or with both cores busy. With
/// the same load "round-robin" gave mean 1.23x and 95th percentile 1.41x every run, and "random"
/// mean 1.16-1.41x and 95th percentile 1.31-1.78x (8 runs each). The mean is the steady figure
/// (p2c: 1.11x give or take 0.015) and tells p2c apart; the 95th percentile moves in steps of
/// about 0.08x (one connection in 35), hence its looser bound.
#[test]
fn p2c_keeps_every_target_near_its_fair_share_of_open_connections() {
    const CONNS: usize = 1000;
    const MEANINGFUL: usize = 30;
    let servers = [
        Server::tagged("p0"),
        Server::tagged("p1"),
        Server::tagged("p2"),
    ];
    let targets: Vec<String> = servers.iter().map(Server::target).collect();
    let p = Proxy::simple()
        .ports(1, |ports| config(&[app("p2c", ports, &targets)]))
        .start();
    let started = Instant::now();
    let mut rng = Rng::new(5);
    // (index of the connection after which it closes, the stream, its target's index)
    let mut open: Vec<(usize, TcpStream, usize)> = Vec::new();
    let mut ratios: Vec<f64> = Vec::new();
    let mut gross = Vec::new();
    for i in 0..CONNS {
        open.retain(|(close_at, _, _)| *close_at > i);
        // p2c picks by the connections the proxy holds open, and the proxy sees a client's close
        // only when a relay thread gets to it: on a loaded machine, closes from the last few
        // steps could still be counted at the next pick, and which ones depends on scheduling.
        // Waiting until the backends have seen every close (the proxy closes the target's side
        // after it stops counting the connection) makes each pick see the load the client made.
        let synced = Instant::now() + Duration::from_secs(10);
        while servers.iter().map(Server::open).sum::<usize>() != open.len() {
            assert!(
                Instant::now() < synced,
                "backends hold {} connections, the client {}, 10 s after the closes",
                servers.iter().map(Server::open).sum::<usize>(),
                open.len()
            );
            thread::sleep(Duration::from_millis(1));
        }
        let mut s = connect(p.v4(0));
        let tag = read_line(&mut s);
        let which = ["p0", "p1", "p2"]
            .iter()
            .position(|t| *t == tag)
            .unwrap_or_else(|| panic!("unexpected tag {tag:?}"));
        let hold = if rng.next() % 10 == 0 {
            200 + (rng.next() % 200) as usize
        } else {
            (rng.next() % 8) as usize
        };
        open.push((i + hold, s, which));

        let at_backends: Vec<usize> = servers.iter().map(Server::open).collect();
        let mut at_client = [0usize; 3];
        for (_, _, w) in &open {
            at_client[*w] += 1;
        }
        for (view, counts) in [("backends", &at_backends[..]), ("client", &at_client[..])] {
            let total: usize = counts.iter().sum();
            if total < MEANINGFUL {
                continue;
            }
            let max = *counts.iter().max().unwrap();
            let ratio = max as f64 / (total as f64 / 3.0);
            ratios.push(ratio);
            if ratio >= 2.0 {
                gross.push(format!("conn {i}: {view} {counts:?}"));
            }
        }
    }
    let took = started.elapsed();
    drop(open);
    let samples = ratios.len();
    assert!(
        samples >= CONNS,
        "only {samples} samples with {MEANINGFUL}+ connections open"
    );
    ratios.sort_by(f64::total_cmp);
    let mean = ratios.iter().sum::<f64>() / samples as f64;
    let p95 = ratios[samples * 95 / 100];
    eprintln!(
        "p2c: {samples} samples, largest share / fair: mean {mean:.3}, p95 {p95:.2}, worst {:.2}; \
         {CONNS} connections in {took:?}",
        ratios[samples - 1]
    );
    assert!(
        gross.is_empty(),
        "a target held 2x its fair share: {gross:#?}"
    );
    assert!(
        p95 <= 1.4,
        "p95 of the largest share: {p95:.2}x its fair share (over 1.4x)"
    );
    assert!(
        mean <= 1.2,
        "the largest share averaged {mean:.3}x its fair share (over 1.2x)"
    );
}

/// Round-robin with every target up and connections one after another: each target gets
/// exactly a third, in turn.
#[test]
fn round_robin_spreads_sequential_connections_exactly_evenly() {
    let servers = [
        Server::tagged("r0"),
        Server::tagged("r1"),
        Server::tagged("r2"),
    ];
    let targets: Vec<String> = servers.iter().map(Server::target).collect();
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "rr",
                ports,
                &targets,
                json!({"Balance": "round-robin"}),
            )])
        })
        .start();
    let got = tags(p.v4(0), 30);
    assert_eq!(
        count(&got),
        BTreeMap::from([("r0".into(), 10), ("r1".into(), 10), ("r2".into(), 10)]),
        "{got:?}"
    );
    for w in got.windows(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, ["r0", "r1", "r2"], "not in turn: {got:?}");
    }
}

/// Random: every target gets some of 90 connections.
#[test]
fn random_balance_reaches_every_target() {
    let servers = [
        Server::tagged("x0"),
        Server::tagged("x1"),
        Server::tagged("x2"),
    ];
    let targets: Vec<String> = servers.iter().map(Server::target).collect();
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "rnd",
                ports,
                &targets,
                json!({"Balance": "random"}),
            )])
        })
        .start();
    let got = count(&tags(p.v4(0), 90));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["x0", "x1", "x2"],
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// MaxConnections

/// An app at its MaxConnections (2): a third connection is accepted but not served while
/// another app is served as usual; when one of the two closes, the waiting one is served.
#[test]
fn max_connections_holds_an_apps_extra_connection_until_one_closes() {
    let echo_a = Backend::echo();
    let echo_b = Backend::echo();
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[
                app_with(
                    "limited",
                    &ports[..1],
                    &[echo_a.target()],
                    json!({"MaxConnections": 2}),
                ),
                app("free", &ports[1..], &[echo_b.target()]),
            ])
        })
        .args(&["--connect-timeout", "20s"])
        .start();
    let mut first = connect(p.v4(0));
    roundtrip(&mut first, b"first");
    let mut second = connect(p.v6(0));
    roundtrip(&mut second, b"second");

    let mut third = connect(p.v4(0));
    third.write_all(b"third").unwrap();
    expect_silent(&mut third, Duration::from_millis(500));
    assert_eq!(
        echo_a.served(),
        2,
        "the backend saw a connection past the limit"
    );

    // The other app is not held up.
    let mut other = connect(p.v4(1));
    roundtrip(&mut other, b"other app");
    drop(other);
    roundtrip(&mut second, b"the two open ones still work");

    // One closes: the waiting connection gets its slot.
    drop(first);
    let mut got = [0u8; 5];
    third
        .read_exact(&mut got)
        .expect("the waiting connection served");
    assert_eq!(&got, b"third");
    roundtrip(&mut third, b"and it relays");
    assert_eq!(echo_a.served(), 3);
}

/// With a short --connect-timeout, a connection that waited that long for a slot of its app is
/// closed, logged `end=limit` (WARN, with the reason); the slots of the open connections are
/// unaffected and the one freed next is usable.
#[test]
fn max_connections_closes_a_waiting_connection_after_the_connect_timeout() {
    let echo = Backend::echo();
    let p = limited_proxy(&echo, 2, "500ms");
    let mut held: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut s = connect(p.v4(0));
            roundtrip(&mut s, format!("held {i}").as_bytes());
            s
        })
        .collect();

    let before = Instant::now();
    let mut over = connect(p.v4(0));
    let local = over.local_addr().unwrap();
    expect_closed(&mut over, WAIT);
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}, before the 500ms connect timeout"
    );
    let c = p.wait_conn(local);
    assert_eq!(c.end, "limit", "{}", c.line);
    assert_eq!(c.app, "limited", "{}", c.line);
    assert_eq!(c.level, "WARN", "{}", c.line);
    assert_eq!(c.target, "-", "{}", c.line);
    assert!(
        c.reason.as_deref().unwrap_or("").contains("MaxConnections"),
        "{}",
        c.line
    );
    assert_eq!(echo.served(), 2);

    for s in &mut held {
        roundtrip(s, b"still relaying");
    }
    drop(held.pop());
    let mut next = wait_for("a freed slot served", WAIT, || {
        let mut s = connect(p.v4(0));
        s.write_all(b"next").ok()?;
        let mut got = [0u8; 4];
        (s.read_exact(&mut got).is_ok() && &got == b"next").then_some(s)
    });
    roundtrip(&mut next, b"relays");
}

/// Raising an app's MaxConnections by a reload lets a connection that waits for a slot in at
/// once, without any of the open ones closing.
#[test]
fn raising_max_connections_by_a_reload_serves_a_waiting_connection() {
    let echo = Backend::echo();
    let cfg = |ports: &[u16], max: u32| {
        config(&[app_with(
            "lim",
            ports,
            &[echo.target()],
            json!({ "MaxConnections": max }),
        )])
    };
    let p = Proxy::simple()
        .ports(1, |ports| cfg(ports, 1))
        .args(&["--connect-timeout", "60s", "--reload-interval", "100ms"])
        .start();
    let mut holder = connect(p.v4(0));
    roundtrip(&mut holder, b"holds the slot");
    let mut waiting = connect(p.v4(0));
    waiting.write_all(b"waiting").unwrap();
    expect_silent(&mut waiting, Duration::from_millis(300));

    let mark = p.mark();
    p.rewrite_config(&cfg(&p.ports, 2));
    p.wait_reload_ok(mark);
    let mut got = [0u8; 7];
    waiting
        .read_exact(&mut got)
        .expect("the waiting connection served");
    assert_eq!(&got, b"waiting");
    roundtrip(&mut holder, b"still relaying");
    // Two now open: a third waits again.
    let mut third = connect(p.v4(0));
    third.write_all(b"third").unwrap();
    expect_silent(&mut third, Duration::from_millis(300));
}

/// A connection waiting for a slot of its app is an open connection of its port like any
/// other: when a reload removes the port, it is closed by the drain timeout (it must not
/// wait on, then be relayed on a port that is gone once a slot frees).
#[test]
fn a_connection_waiting_for_its_apps_slot_is_drained_with_its_removed_port() {
    let echo = Backend::echo();
    let args = [
        "--connect-timeout",
        "60s",
        "--drain-timeout",
        "300ms",
        "--reload-interval",
        "100ms",
    ];
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[app_with(
                "lim",
                ports,
                &[echo.target()],
                json!({"MaxConnections": 1}),
            )])
        })
        .args(&args)
        .start();
    let mut holder = connect(p.v4(0));
    roundtrip(&mut holder, b"holds the slot");
    let mut waiting = connect(p.v4(1));
    waiting.write_all(b"waiting").unwrap();
    expect_silent(&mut waiting, Duration::from_millis(300));

    let mark = p.mark();
    p.rewrite_config(&config(&[app_with(
        "lim",
        &p.ports[..1],
        &[echo.target()],
        json!({"MaxConnections": 1}),
    )]));
    let reload = p.wait_reload_ok(mark);
    assert!(reload.contains("ports_removed=1"), "{reload}");
    // Closed within the drain timeout (with room for a loaded machine), never served.
    expect_closed(&mut waiting, Duration::from_secs(5));
    assert_eq!(echo.served(), 1);
    roundtrip(&mut holder, b"the kept port's connection goes on");
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

/// What a PROXY-protocol backend parsed from the header of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PpHeader {
    src: SocketAddr,
    dst: SocketAddr,
    /// Header length in bytes.
    len: usize,
}

enum Parse {
    More,
    Done(PpHeader),
    Invalid(String),
}

/// A backend that expects the PROXY protocol header of `version` (1 or 2) before anything
/// else, parses it as the spec says, records it, then echoes every byte after it. A connection
/// that closes before sending a byte (a health check) is ignored.
struct PpServer {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<Result<PpHeader, String>>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl PpServer {
    fn new(version: u8) -> PpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (Arc::clone(&records), Arc::clone(&stop));
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let r = Arc::clone(&r);
                thread::spawn(move || serve_pp(conn, version, &r));
            }
        });
        PpServer {
            addr,
            records,
            stop,
            accept: Some(accept),
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    /// How many connections sent something so far (a header or garbage).
    fn seen(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    /// Wait for the `n`th connection (from 0) to send its header; panic if it was not a valid
    /// one.
    fn header(&self, n: usize) -> PpHeader {
        let r = wait_for(&format!("PROXY header #{n}"), WAIT, || {
            self.records.lock().unwrap().get(n).cloned()
        });
        r.unwrap_or_else(|e| panic!("invalid PROXY header: {e}"))
    }

    fn errors(&self) -> Vec<String> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect()
    }
}

impl Drop for PpServer {
    fn drop(&mut self) {
        if let Some(t) = self.accept.take() {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
            let _ = t.join();
        }
    }
}

fn serve_pp(mut s: TcpStream, version: u8, records: &Mutex<Vec<Result<PpHeader, String>>>) {
    let _ = s.set_read_timeout(Some(WAIT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header = loop {
        let parsed = if version == 1 {
            parse_v1(&buf)
        } else {
            parse_v2(&buf)
        };
        match parsed {
            Parse::Done(h) => break Ok(h),
            Parse::Invalid(e) => break Err(e),
            Parse::More => {}
        }
        match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return,
            Ok(0) => break Err(format!("EOF inside the header: {buf:?}")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(format!("reading the header: {e} (got {buf:?})")),
        }
    };
    let used = match &header {
        Ok(h) => h.len,
        Err(_) => 0,
    };
    let ok = header.is_ok();
    records.lock().unwrap().push(header);
    if !ok {
        return;
    }
    if s.write_all(&buf[used..]).is_err() {
        return;
    }
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// v1: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`, at most 107 bytes with the CRLF.
fn parse_v1(buf: &[u8]) -> Parse {
    const MAX: usize = 107;
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Parse::Invalid(format!("does not start with \"PROXY \": {buf:?}"));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX {
            Parse::Invalid(format!("no CRLF in the first {MAX} bytes: {buf:?}"))
        } else {
            Parse::More
        };
    };
    if end + 2 > MAX {
        return Parse::Invalid(format!("header of {} bytes (max {MAX})", end + 2));
    }
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return Parse::Invalid("header is not ASCII".into());
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let [_, proto, src, dst, sport, dport] = parts[..] else {
        return Parse::Invalid(format!("not 6 fields: {line:?}"));
    };
    let ip = |s: &str| -> Option<IpAddr> {
        match proto {
            "TCP4" => s.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            _ => None,
        }
    };
    // Ports: decimal, no sign, no leading zero.
    let port = |s: &str| -> Option<u16> {
        (s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0')))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (ip(src), ip(dst), port(sport), port(dport)) {
        (Some(s), Some(d), Some(sp), Some(dp)) => Parse::Done(PpHeader {
            src: SocketAddr::new(s, sp),
            dst: SocketAddr::new(d, dp),
            len: end + 2,
        }),
        _ => Parse::Invalid(format!("bad fields: {line:?}")),
    }
}

/// v2: the 12-byte signature, version/command 0x21 (v2, PROXY), family 0x11 (TCP over IPv4)
/// or 0x21 (TCP over IPv6), a big-endian length, then addresses and ports.
fn parse_v2(buf: &[u8]) -> Parse {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let n = buf.len().min(12);
    if buf[..n] != SIG[..n] {
        return Parse::Invalid(format!("no v2 signature: {buf:?}"));
    }
    if buf.len() < 16 {
        return Parse::More;
    }
    if buf[12] != 0x21 {
        return Parse::Invalid(format!("version/command {:#04x}, not 0x21", buf[12]));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if buf.len() < 16 + len {
        return Parse::More;
    }
    let body = &buf[16..16 + len];
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (src, dst) = match buf[13] {
        0x11 if len >= 12 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).unwrap());
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            )
        }
        0x21 if len >= 36 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            )
        }
        fam => {
            return Parse::Invalid(format!("family {fam:#04x} with length {len}"));
        }
    };
    Parse::Done(PpHeader {
        src,
        dst,
        len: 16 + len,
    })
}

/// With `ProxyProtocol` v1 and v2, over IPv4 and IPv6 clients: the backend reads a header
/// that parses per the spec, whose source is the client's own address and port and whose
/// destination is the frontend address and port it connected to; the header comes before any
/// client byte (also when the client sends nothing), and the client's bytes follow it intact,
/// including bytes that look like a header themselves.
#[test]
fn proxy_protocol_header_names_the_client_and_frontend_then_relays_intact() {
    let v1 = PpServer::new(1);
    let v2 = PpServer::new(2);
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[
                app_with(
                    "pp1",
                    &ports[..1],
                    &[v1.target()],
                    json!({"ProxyProtocol": "v1"}),
                ),
                app_with(
                    "pp2",
                    &ports[1..],
                    &[v2.target()],
                    json!({"ProxyProtocol": "v2"}),
                ),
            ])
        })
        .start();
    let mut rng = Rng::seeded();
    for (i, server) in [(0, &v1), (1, &v2)] {
        for frontend in [p.v4(i), p.v6(i)] {
            for client_speaks_first in [true, false] {
                let what = format!(
                    "v{} via {frontend}, client speaks first: {client_speaks_first}",
                    i + 1
                );
                let mut payload =
                    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n\r\n\r\n\0\r\nQUIT\n!".to_vec();
                let mut noise = vec![0u8; 48 * 1024];
                rng.fill(&mut noise);
                payload.extend_from_slice(&noise);

                let n = server.seen();
                let mut s = connect(frontend);
                let src = canonical(s.local_addr().unwrap());
                let dst = canonical(s.peer_addr().unwrap());
                if client_speaks_first {
                    s.write_all(&payload).unwrap();
                }
                let h = server.header(n);
                assert_eq!((h.src, h.dst), (src, dst), "{what}: {h:?}");
                assert_eq!(h.src.is_ipv4(), frontend.is_ipv4(), "{what}: {h:?}");
                if !client_speaks_first {
                    s.write_all(&payload).unwrap();
                }
                let mut got = vec![0u8; payload.len()];
                s.read_exact(&mut got).unwrap();
                assert!(got == payload, "{what}: the client's bytes changed");
                s.shutdown(std::net::Shutdown::Write).unwrap();
                expect_closed(&mut s, WAIT);
                let c = p.wait_conn(src);
                assert_eq!(c.end, "closed", "{what}: {}", c.line);
            }
        }
        assert_eq!(server.errors(), Vec::<String>::new(), "v{}", i + 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Reload

/// A target marked down stays down across a reload that keeps it. The target refuses, traffic
/// marks it down, then it listens again; the check interval is long (10 minutes), so only its
/// kept state keeps connections off it. After a reload that adds a port, round-robin over all
/// three would reach it within three connections if its state had been reset, yet it gets none
/// and no `is up` line is logged.
#[test]
fn a_down_target_stays_down_across_a_reload_that_keeps_it() {
    let mut sleeper = Server::dormant("sleeper");
    let others = [Server::tagged("k1"), Server::tagged("k2")];
    let targets = vec![sleeper.target(), others[0].target(), others[1].target()];
    let extra = json!({"Balance": "round-robin", "HealthCheck": {"IntervalMs": 600_000}});
    let p = Proxy::simple()
        .ports(2, |ports| {
            config(&[app_with("keep", &ports[..1], &targets, extra.clone())])
        })
        .args(&["--reload-interval", "100ms"])
        .start();

    let got = tags(p.v4(0), 3);
    assert!(!got.contains(&"sleeper".to_owned()), "{got:?}");
    let down = p.wait_log("sleeper down", |l| {
        l.contains(&down_msg(&targets[0], "keep"))
    });
    assert!(down.contains("connection refused"), "{down}");

    sleeper.listen();
    let before = tags(p.v4(0), 9);
    assert_eq!(sleeper.served(), 0, "a down target got traffic: {before:?}");

    let mark = p.mark();
    p.rewrite_config(&config(&[app_with(
        "keep",
        &p.ports,
        &targets,
        extra.clone(),
    )]));
    let reload = p.wait_reload_ok(mark);
    assert!(reload.contains("ports_added=1"), "{reload}");

    let mut after = tags(p.v4(0), 9);
    after.extend(tags(p.v4(1), 9));
    assert_eq!(
        sleeper.served(),
        0,
        "the down target got traffic after the reload: {after:?}"
    );
    assert_eq!(
        count(&after),
        BTreeMap::from([("k1".into(), 9), ("k2".into(), 9)])
    );
    assert_eq!(
        p.lines(|l| l.contains(&up_msg(&targets[0], "keep"))),
        Vec::<String>::new()
    );
}

// ---------------------------------------------------------------------------------------------
// Validation

/// `flyproxy check` reports each bad value of the per-app keys, naming the file, the app and
/// the field, and exits 1; all the keys with good values pass.
#[test]
fn check_reports_bad_values_of_the_per_app_keys() {
    let dir = TempDir::new("check-backends");
    let bad = json!({"Apps": [
        {"Name": "a", "Ports": [1], "Targets": ["h:1"],
         "Balance": "fastest", "ConnectAttempts": 0, "MaxConnections": 0},
        {"Name": "b", "Ports": [2], "Targets": ["h:2"],
         "ProxyProtocol": "v3", "HealthCheck": {"Fall": 0, "Bogus": 1}},
        {"Name": "c", "Ports": [3], "Targets": ["h:3"],
         "ConnectAttempts": 11, "HealthCheck": {"IntervalMs": 5, "Rise": 0}}
    ]});
    let path = dir.write("bad.json", &bad.to_string());
    let path = path.display().to_string();
    let o = run(&["check", "-c", &path]);
    assert_eq!(o.code, Some(1), "{}{}", o.stdout, o.stderr);
    let want = [
        r#"app "a": Balance: "fastest" is not"#,
        r#"app "a": ConnectAttempts: 0 is not"#,
        r#"app "a": MaxConnections: 0 is not"#,
        r#"app "b": ProxyProtocol: "v3" is not"#,
        r#"app "b": HealthCheck.Fall: 0 is not"#,
        r#"app "b": unknown key "HealthCheck.Bogus""#,
        r#"app "c": ConnectAttempts: 11 is not"#,
        r#"app "c": HealthCheck.IntervalMs: 5 is not"#,
        r#"app "c": HealthCheck.Rise: 0 is not"#,
    ];
    expect_problems(&o.stderr, &path, &want);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some(format!("{path}: {} problems found", want.len()).as_str()),
        "{}",
        o.stderr
    );
    assert_eq!(lines.len(), want.len() + 1, "{}", o.stderr);

    let good = json!({"Apps": [
        {"Name": "a", "Ports": [1], "Targets": ["h:1", "h:2"], "Balance": "round-robin",
         "ConnectAttempts": 10, "MaxConnections": 1, "ProxyProtocol": "v2",
         "HealthCheck": {"IntervalMs": 100, "TimeoutMs": 10, "Fall": 100, "Rise": 100}},
        {"Name": "b", "Ports": [2], "Targets": ["h:3"], "Balance": "random",
         "ProxyProtocol": "v1", "HealthCheck": {}},
        {"Name": "c", "Ports": [3], "Targets": ["h:4"], "Balance": "p2c", "ConnectAttempts": 1}
    ]});
    let path = dir.write("good.json", &good.to_string());
    let o = run(&["check", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("ok: 3 apps, 3 ports, 4 targets"),
        "{}",
        o.stdout
    );
}

/// An unknown key inside `HealthCheck` is reported with the keys HealthCheck takes, not the
/// keys of an app (which would send the user looking in the wrong place).
#[test]
fn check_names_the_keys_health_check_takes_for_an_unknown_one() {
    let dir = TempDir::new("check-hc-key");
    let json = json!({"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"],
                                "HealthCheck": {"Interval": 500}}]});
    let path = dir.write("c.json", &json.to_string());
    let o = run(&["check", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("Interval"))
        .unwrap_or_else(|| panic!("no line about the key:\n{}", o.stderr))
        .to_owned();
    assert!(line.contains(r#"app "a""#), "{line}");
    for key in ["IntervalMs", "TimeoutMs", "Fall", "Rise"] {
        assert!(line.contains(key), "{key} not suggested: {line}");
    }
    assert!(
        !line.contains("Targets"),
        "suggests the app's keys for a HealthCheck key: {line}"
    );
}

/// A client that resets while it waits for a slot of its app leaves at once: logged
/// `end=reset` long before the connect timeout, never connected to the target, and the wait
/// costs no CPU; the slot it would have had goes to the next one.
#[test]
fn max_connections_waiter_that_resets_leaves_at_once() {
    let echo = Backend::echo();
    let p = limited_proxy(&echo, 1, "20s");
    let mut held = connect(p.v4(0));
    roundtrip(&mut held, b"held");
    let waiting = connect(p.v4(0));
    let local = waiting.local_addr().unwrap();
    // Waiting for the slot (queued, woken only when a slot frees or at its deadline): cheap.
    let cpu = p.cpu_during(Duration::from_millis(500));
    assert!(
        cpu < 0.2,
        "one connection waiting for a slot: {cpu:.2} s of CPU"
    );
    let before = Instant::now();
    close_with_reset(waiting);
    let c = p.wait_conn(local);
    let took = before.elapsed();
    assert_eq!(c.end, "reset", "{}", c.line);
    assert_eq!(c.target, "-", "{}", c.line);
    assert!(
        took < Duration::from_secs(5),
        "logged {took:?} after the reset"
    );
    assert_eq!(
        echo.served(),
        1,
        "the backend saw the connection that reset"
    );
    drop(held);
    let mut next = connect(p.v4(0));
    roundtrip(&mut next, b"next gets the slot");
}

// ---------------------------------------------------------------------------------------------
// Target weights, backups and the config's Drain

/// `n` connections (`try_tagged`) made by `threads` client threads at once; the tag of each.
fn tags_from_threads(addr: SocketAddr, n: usize, threads: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<JoinHandle<Vec<String>>> = (0..threads)
        .map(|_| {
            let next = Arc::clone(&next);
            thread::spawn(move || {
                let mut got = Vec::new();
                while next.fetch_add(1, Ordering::AcqRel) < n {
                    got.push(try_tagged(addr, b"weighted\n").unwrap());
                }
                got
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Issue 22: targets weighted 1 and 3 share 2000 connections a quarter / three quarters (within
/// 20-30% / 70-80%), with every balance: p2c (candidates drawn by weight, open connections
/// compared per weight), smooth weighted round robin, weighted random. Four clients at once, so
/// that p2c sees connections open, as it would in use.
#[test]
fn weights_1_and_3_share_connections_a_quarter_and_three_quarters() {
    for balance in ["p2c", "round-robin", "random"] {
        let light = Server::tagged("light");
        let heavy = Server::tagged("heavy");
        let targets = json!([
            {"Address": light.target(), "Weight": 1},
            {"Address": heavy.target(), "Weight": 3},
        ]);
        let p = Proxy::simple()
            .ports(1, |ports| {
                config(&[
                    json!({"Name": "weighted", "Ports": ports, "Targets": targets,
                                "Balance": balance}),
                ])
            })
            .start();
        let got = count(&tags_from_threads(p.v4(0), 2000, 4));
        let light_n = got.get("light").copied().unwrap_or(0);
        let heavy_n = got.get("heavy").copied().unwrap_or(0);
        assert_eq!(light_n + heavy_n, 2000, "{balance}: {got:?}");
        assert!(
            (400..=600).contains(&light_n),
            "{balance}: weight 1 got {light_n} of 2000 (want 20-30%), weight 3 {heavy_n}"
        );
        eprintln!("{balance}: weight 1 got {light_n}, weight 3 got {heavy_n} of 2000");
    }
}

/// Issue 22: a backup gets no connection while a primary is up; all of them once both
/// primaries are down; none again once a primary is back up (its health check brings it back).
#[test]
fn a_backup_serves_only_while_every_primary_is_down() {
    const INTERVAL: u64 = 200;
    let mut p1 = Server::tagged("p1");
    let mut p2 = Server::tagged("p2");
    let backup = Server::tagged("backup");
    let targets = json!([p1.target(), p2.target(), {"Address": backup.target(), "Backup": true}]);
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[json!({"Name": "bk", "Ports": ports, "Targets": targets,
                            "HealthCheck": {"IntervalMs": INTERVAL, "TimeoutMs": 10000}})])
        })
        .start();
    let got = count(&tags(p.v4(0), 100));
    assert_eq!(got.get("backup"), None, "a primary is up: {got:?}");
    assert!(got.contains_key("p1") && got.contains_key("p2"), "{got:?}");
    assert_eq!(backup.served(), 0);

    // Both primaries die: once both are marked down (the first connections find out, each
    // still served through failover), every connection goes to the backup.
    p1.kill();
    p2.kill();
    wait_for("both primaries marked down", WAIT, || {
        try_tagged(p.v4(0), b"x").unwrap();
        let down = |t: &str| !p.lines(|l| l.contains(&down_msg(t, "bk"))).is_empty();
        (down(&p1.target()) && down(&p2.target())).then_some(())
    });
    let got = count(&tags(p.v4(0), 100));
    assert_eq!(got, BTreeMap::from([("backup".into(), 100)]), "{got:?}");

    // One primary back: its check brings it up, and it takes every connection again.
    let mark = p.mark();
    p1.listen();
    p.wait_log_since(mark, "p1 back up", |l| {
        l.contains(&up_msg(&p1.target(), "bk"))
    });
    let before = backup.served();
    let got = count(&tags(p.v4(0), 100));
    assert_eq!(got, BTreeMap::from([("p1".into(), 100)]), "{got:?}");
    assert_eq!(backup.served(), before);
}

/// Issue 22: `Drain` in the file. A reload that drains a target sends the next 300
/// connections elsewhere while its 3 open ones finish their bytes intact; a reload that
/// undrains it brings it back.
#[test]
fn a_drain_in_the_file_keeps_new_connections_off_and_open_ones_going() {
    let a = Server::tagged("a");
    let b = Server::tagged("b");
    let with = |a_drain: bool, b_drain: bool, ports: &[u16]| {
        config(&[json!({"Name": "dr", "Ports": ports, "Targets": [
            {"Address": a.target(), "Drain": a_drain},
            {"Address": b.target(), "Drain": b_drain},
        ]})])
    };
    let p = Proxy::simple()
        .ports(1, |ports| with(false, true, ports))
        .args(&["--reload-interval", "100ms"])
        .start();
    // b starts drained: these go to a, and stay open.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect(p.v4(0));
            assert_eq!(read_line(&mut s), "a");
            s
        })
        .collect();
    wait_for("the 3 open on a", WAIT, || (a.open() >= 3).then_some(()));

    let mark = p.mark();
    p.rewrite_config(&with(true, false, &p.ports));
    p.wait_reload_ok(mark);
    let got = count(&tags(p.v4(0), 300));
    assert_eq!(got, BTreeMap::from([("b".into(), 300)]), "{got:?}");
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("still here {i}\n").repeat(1000);
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes(), "connection {i} on the drained target");
    }
    drop(held);

    let mark = p.mark();
    p.rewrite_config(&with(false, false, &p.ports));
    p.wait_reload_ok(mark);
    let got = count(&tags(p.v4(0), 100));
    assert!(
        got.contains_key("a"),
        "undrained, a is picked again: {got:?}"
    );
}

/// An app whose every target is drained takes no connection: each is closed at once, logged
/// `end=connect_failed` with why, and no target sees it.
#[test]
fn every_target_drained_closes_new_connections_saying_why() {
    let a = Server::tagged("a");
    let targets = json!([{"Address": a.target(), "Drain": true}]);
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[json!({"Name": "none", "Ports": ports, "Targets": targets})])
        })
        .start();
    let mut s = connect(p.v4(0));
    let client = s.local_addr().unwrap();
    expect_closed(&mut s, WAIT);
    let line = p.wait_conn(client);
    assert_eq!(line.end, "connect_failed", "{}", line.line);
    let reason = line.reason.unwrap_or_default();
    assert!(
        reason.contains("no target takes new connections"),
        "{reason:?}"
    );
    assert_eq!(a.served(), 0);
}

/// Issue 22: a reload that changes a Weight in the file applies it (round robin shows it
/// exactly: 1:1, then 1:3), and the targets keep their state (no target is new to the reload).
#[test]
fn a_reload_that_changes_a_weight_applies_it() {
    let a = Server::tagged("a");
    let b = Server::tagged("b");
    let with = |wb: u32, ports: &[u16]| {
        config(&[
            json!({"Name": "rw", "Ports": ports, "Balance": "round-robin", "Targets": [
                a.target(), {"Address": b.target(), "Weight": wb},
            ]}),
        ])
    };
    let p = Proxy::simple()
        .ports(1, |ports| with(1, ports))
        .args(&["--reload-interval", "100ms"])
        .start();
    let got = count(&tags(p.v4(0), 40));
    assert_eq!(
        got,
        BTreeMap::from([("a".into(), 20), ("b".into(), 20)]),
        "{got:?}"
    );
    let mark = p.mark();
    p.rewrite_config(&with(3, &p.ports));
    p.wait_reload_ok(mark);
    let got = count(&tags(p.v4(0), 40));
    assert_eq!(
        got,
        BTreeMap::from([("a".into(), 10), ("b".into(), 30)]),
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Health check kinds: http and tls

/// A tiny HTTP server: answers every request with `status` (settable), and keeps the last
/// request's head.
struct HttpTarget {
    addr: SocketAddr,
    status: Arc<AtomicUsize>,
    last: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
}

impl HttpTarget {
    fn start(status: usize) -> HttpTarget {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = HttpTarget {
            addr,
            status: Arc::new(AtomicUsize::new(status)),
            last: Arc::default(),
            requests: Arc::default(),
        };
        let (status, last, requests) = (
            Arc::clone(&t.status),
            Arc::clone(&t.last),
            Arc::clone(&t.requests),
        );
        // Detached: it ends with the test process. A thread per connection, so that no slow
        // peer holds up a check.
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let (status, last, requests) = (
                    Arc::clone(&status),
                    Arc::clone(&last),
                    Arc::clone(&requests),
                );
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(WAIT));
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        match s.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => break,
                        }
                    }
                    *last.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                    requests.fetch_add(1, Ordering::AcqRel);
                    let code = status.load(Ordering::Acquire);
                    let _ = write!(
                        s,
                        "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                });
            }
        });
        t
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

/// Issue 22: an http check marks a target answering 500 down and 204 up; it asks for its Path
/// with the target as Host, and the reason is logged. Another target of the app, answering 200
/// all along, stays up.
#[test]
fn an_http_check_goes_by_the_status_code() {
    let web = HttpTarget::start(204);
    let steady = HttpTarget::start(200);
    let targets = vec![web.target(), steady.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "web",
                ports,
                &targets,
                // A long TimeoutMs: a loaded machine's slow check would be a down of its own.
                json!({"HealthCheck": {"Kind": "http", "Path": "/healthz", "IntervalMs": 100,
                                       "TimeoutMs": 10000}}),
            )])
        })
        .start();
    wait_for("a first check", WAIT, || {
        (web.requests.load(Ordering::Acquire) > 0).then_some(())
    });
    let head = web.last.lock().unwrap().clone();
    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head:?}");
    assert!(
        head.contains(&format!("\r\nHost: {}\r\n", web.target())),
        "{head:?}"
    );
    assert!(head.contains("\r\nConnection: close\r\n"), "{head:?}");
    assert!(p
        .lines(|l| l.contains(&down_msg(&targets[0], "web")))
        .is_empty());

    let mark = p.mark();
    web.status.store(500, Ordering::Release);
    let down = p.wait_log_since(mark, "the 500 target down", |l| {
        l.contains(&down_msg(&targets[0], "web"))
    });
    assert!(
        down.ends_with("health check: HTTP status 500, expected 200-399"),
        "{down}"
    );

    let mark = p.mark();
    web.status.store(204, Ordering::Release);
    let up = p.wait_log_since(mark, "the 204 target up", |l| {
        l.contains(&up_msg(&targets[0], "web"))
    });
    assert!(up.ends_with("is up: health check passed"), "{up}");
    assert!(steady.requests.load(Ordering::Acquire) >= 2);
    assert!(
        p.lines(|l| l.contains(&down_msg(&targets[1], "web")))
            .is_empty(),
        "{:#?}",
        p.logs()
    );
}

/// Issue 22: a tls check (a ClientHello with the app's first Hostname) is failed by a plain
/// TCP echo (which answers with the ClientHello's own bytes) and passed by `openssl s_server`:
/// its port refuses at first (down), then the server starts there and its check brings it up.
#[test]
fn a_tls_check_wants_a_server_hello() {
    let dir = TempDir::new("tls-check");
    let tls_port = free_port();
    let plain = Backend::echo();
    let targets = vec![format!("127.0.0.1:{tls_port}"), plain.target()];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "tls",
                ports,
                &targets,
                json!({"Hostnames": ["svc.example.com"],
                       "HealthCheck": {"Kind": "tls", "IntervalMs": 100, "TimeoutMs": 10000}}),
            )])
        })
        .start();
    let down = p.wait_log("the echo target down", |l| {
        l.contains(&down_msg(&targets[1], "tls"))
    });
    assert!(
        down.ends_with(
            "health check: TLS handshake message 1 in answer to a ClientHello, not a ServerHello"
        ),
        "{down}"
    );
    p.wait_log("the TLS target down while its port refuses", |l| {
        l.contains(&down_msg(&targets[0], "tls"))
    });

    let mark = p.mark();
    let _tls = common::tls::TlsTarget::start(&dir.path, "svc.example.com", tls_port);
    let up = p.wait_log_since(mark, "the TLS target up", |l| {
        l.contains(&up_msg(&targets[0], "tls"))
    });
    assert!(up.ends_with("is up: health check passed"), "{up}");
    // The echo stays down, check after check.
    wait_for("the echo checked again", WAIT, || {
        (plain.accepted() >= 3).then_some(())
    });
    assert!(
        p.lines_since(mark, |l| l.contains(&up_msg(&targets[1], "tls")))
            .is_empty(),
        "{:#?}",
        p.logs()
    );
}

/// A listener on 127.0.0.1 that does `serve` with each connection on a thread of its own; the
/// connections accepted so far.
fn hostile(serve: fn(TcpStream)) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&n);
    // Detached: it ends with the test's process.
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            seen.fetch_add(1, Ordering::AcqRel);
            thread::spawn(move || serve(c));
        }
    });
    (addr, n)
}

/// Targets hostile to an http check: one floods bytes without end, one connects and never
/// answers, one sends half a status line and stops. Each is marked down with its reason, and
/// checking them (ten times a second) costs the proxy little CPU and no descriptor it keeps.
#[test]
fn http_checks_of_hostile_targets_are_bounded_and_cheap() {
    let (flood, flooded) = hostile(|mut s| {
        let junk = vec![b'x'; 64 * 1024];
        while s.write_all(&junk).is_ok() {}
    });
    let (silent, silenced) = hostile(|mut s| {
        // Reads the request, answers nothing, until the peer closes.
        let _ = s.set_read_timeout(Some(WAIT));
        let _ = s.read_to_end(&mut Vec::new());
    });
    let (half, halved) = hostile(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 2");
        let _ = s.set_read_timeout(Some(WAIT));
        let _ = s.read_to_end(&mut Vec::new());
    });
    let targets = vec![flood, silent, half];
    let p = Proxy::simple()
        .ports(1, |ports| {
            config(&[app_with(
                "hostile",
                ports,
                &targets,
                json!({"HealthCheck": {"Kind": "http", "IntervalMs": 100, "TimeoutMs": 200}}),
            )])
        })
        .start();
    let fds = |p: &Proxy| {
        std::fs::read_dir(format!("/proc/{}/fd", p.pid))
            .unwrap()
            .count()
    };
    let (cpu0, fds0) = (p.cpu_secs(), fds(&p));
    let down = |i: usize, why: &str| {
        let line = p.wait_log(why, |l| l.contains(&down_msg(&targets[i], "hostile")));
        assert!(line.contains(why), "{line}");
    };
    down(0, "health check: not an HTTP/1 answer");
    down(
        1,
        "health check: connected, but no whole http answer within the timeout",
    );
    down(
        2,
        "health check: connected, but no whole http answer within the timeout",
    );
    wait_for("10 checks of each", WAIT, || {
        [&flooded, &silenced, &halved]
            .iter()
            .all(|n| n.load(Ordering::Acquire) >= 10)
            .then_some(())
    });
    let cpu = p.cpu_secs() - cpu0;
    eprintln!("30 hostile http checks: {cpu:.3} CPU-s");
    // Measured 0.04 CPU-s for 60 (a debug build, the proxy's idle work included): a check
    // costs well under a millisecond; the bound is ten times that and more.
    assert!(cpu < 0.5, "{cpu:.3} CPU-s for some 30 checks");
    // Every check's socket is closed once it ends: no more than the checks in flight (three)
    // and a little slack above where it started.
    let now = fds(&p);
    assert!(now <= fds0 + 6, "{fds0} descriptors at first, {now} now");
    assert!(p
        .lines(|l| l.contains(&up_msg(&targets[0], "hostile")))
        .is_empty());
}
