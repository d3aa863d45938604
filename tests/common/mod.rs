//! Shared helpers for the integration tests: a running proxy (`Proxy`, started in either mode
//! through the one builder, `Launch`), waits for the log lines tests care about
//! (`wait_reload_ok`, ...), in-test backends (`Backend`), free ports, client helpers and
//! waiting on conditions with deadlines.
//!
//! Every wait here polls a condition up to a deadline; nothing sleeps to synchronise. Each test
//! gets its own temporary directory and its own ports, so tests run in parallel (nextest runs
//! each in its own process; `cargo test` runs them as threads of one process).
//!
//! Beside it: `tests/netns` (a network namespace of the test's own, and what bpftool says is
//! attached there) and `tests/modes` (a test written once for both modes, each in a namespace
//! of its own: `two_modes!`).

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod launch;
pub mod metrics;
pub mod tls;

#[allow(unused_imports)] // each test crate uses some of them
pub use launch::{Launch, Mode, BPF_LISTENER_PORT};

pub const BIN: &str = env!("CARGO_BIN_EXE_flyproxy");

/// How long to wait for something that should happen. Generous: a loaded 2-core machine running
/// other tests in parallel must not fail a correct proxy.
pub const WAIT: Duration = Duration::from_secs(20);

/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(10);

/// The tests run as root (what switching user, namespaces and bpf need).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Poll `f` every 10 ms until it returns `Some`, or panic after `timeout` saying `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories

/// A directory of its own under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!(
            "flyproxy-test-{label}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// Write `contents` to `name` in this directory and return its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Free ports

/// A port nobody listens on, on IPv4 and IPv6, reserved for this test process.
///
/// Ports are picked below the kernel's ephemeral range, so that the many client connections of
/// the tests (which take ephemeral ports) never hold a port the proxy is about to bind. Tests
/// running in parallel processes keep off each other's ports through an flock'ed file per port,
/// held until the process exits; within one process a set does the same.
pub fn free_port() -> u16 {
    static TAKEN: OnceLock<Mutex<(HashSet<u16>, Vec<File>)>> = OnceLock::new();
    let taken = TAKEN.get_or_init(|| Mutex::new((HashSet::new(), Vec::new())));
    let lock_dir = std::env::temp_dir().join("flyproxy-test-ports");
    let _ = fs::create_dir_all(&lock_dir);
    let (lo, hi) = candidate_range();
    let mut rng = Rng::seeded();
    for _ in 0..10_000 {
        let port = lo + (rng.next() % u64::from(hi - lo)) as u16;
        let mut t = taken.lock().unwrap();
        if t.0.contains(&port) {
            continue;
        }
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_dir.join(port.to_string()))
        else {
            continue;
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // another test process has it
        }
        // Free on both families: a dual-stack listener like the proxy's binds only then.
        if TcpListener::bind(("::", port)).is_err() {
            continue;
        }
        t.0.insert(port);
        t.1.push(file);
        return port;
    }
    panic!("no free port found in {lo}..{hi}");
}

pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// Ports below the ephemeral range (from 10000), or above it if that leaves too few.
fn candidate_range() -> (u16, u16) {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .filter_map(|s| s.parse::<u32>().ok());
    let (elo, ehi) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
    if elo >= 12_000 {
        (10_000, elo.min(65_535) as u16)
    } else if ehi < 63_000 {
        (ehi as u16 + 1, 65_535)
    } else {
        (10_000, 32_000)
    }
}

// ---------------------------------------------------------------------------------------------
// Pseudo-random numbers (no crate needed)

/// xorshift64*: fast, deterministic for a seed, good enough for test data and port picks.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn seeded() -> Rng {
        static N: AtomicU64 = AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut r = Rng::new(
            t ^ (u64::from(std::process::id()) << 32)
                ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
        );
        r.next();
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config files

/// One app of a config, as JSON.
pub fn app(name: &str, ports: &[u16], targets: &[String]) -> serde_json::Value {
    serde_json::json!({ "Name": name, "Ports": ports, "Targets": targets })
}

/// `app(..)` with extra per-app keys merged in.
pub fn app_with(
    name: &str,
    ports: &[u16],
    targets: &[String],
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut a = app(name, ports, targets);
    let (serde_json::Value::Object(a_map), serde_json::Value::Object(extra)) = (&mut a, extra)
    else {
        panic!("app and extra keys must be JSON objects");
    };
    a_map.extend(extra);
    a
}

/// A whole config file from its apps.
pub fn config(apps: &[serde_json::Value]) -> String {
    serde_json::to_string_pretty(&serde_json::json!({ "Apps": apps })).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// stderr lines of a child, collected by a background thread.
#[derive(Default)]
struct LogBuf {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

/// A running proxy (or another of our programs: [`Proxy::spawn_cmd`]), killed on drop. Its
/// stderr (the log) is collected line by line.
pub struct Proxy {
    child: Child,
    /// The mode it was started in (by [`Launch`]; `spawn_cmd` says simple).
    pub mode: Mode,
    pub pid: u32,
    pub dir: TempDir,
    pub config: PathBuf,
    /// The ports the config serves (as [`Launch::ports`] or [`Launch::config_on`] said).
    pub ports: Vec<u16>,
    log: Arc<LogBuf>,
    /// The `conn` lines `wait_conn` and `wait_conn_of_app` have returned, by index: the kernel
    /// may give a later connection the client port of an earlier one (to another port of the
    /// proxy), and each call must find its own connection's line, not the earlier one's.
    conns_taken: Mutex<HashSet<usize>>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proxy {
    /// Spawn a command line [`Launch`] does not make (another of our programs, the config flag
    /// spelled otherwise, ...), its stderr collected like the proxy's.
    pub fn spawn_cmd(mut cmd: Command, dir: TempDir, config: PathBuf) -> Proxy {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flyproxy");
        let log = Arc::new(LogBuf::default());
        let reader = collect_lines(child.stderr.take().unwrap(), Arc::clone(&log));
        Proxy {
            pid: child.id(),
            mode: Mode::Simple,
            child,
            dir,
            config,
            ports: Vec::new(),
            log,
            conns_taken: Mutex::default(),
            reader: Some(reader),
            status: None,
        }
    }

    /// Wait for the `started mode=MODE` line (text or `--log-format json`); on exit before it,
    /// the log so far.
    pub fn wait_started(&mut self) -> Result<(), String> {
        self.wait_started_within(WAIT)
    }

    /// `wait_started`, waiting up to `within`.
    pub fn wait_started_within(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self.logs().iter().any(|l| self.is_started(l)) {
                return Ok(());
            }
            if self.log_closed() || Instant::now() >= deadline {
                let status = self.wait_exit(WAIT);
                return Err(format!("exit {status:?}\n{}", self.logs().join("\n")));
            }
            self.wait_log_change(deadline);
        }
    }

    /// `127.0.0.1:port` of the `i`th port.
    pub fn v4(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports[i]))
    }

    /// `[::1]:port` of the `i`th port.
    pub fn v6(&self, i: usize) -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.ports[i]))
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().0.clone()
    }

    /// Number of log lines so far: pass it to `wait_log_since` to see only later lines.
    pub fn mark(&self) -> usize {
        self.log.lines.lock().unwrap().0.len()
    }

    /// Log lines from `mark` on that satisfy `pred`.
    pub fn lines_since(&self, mark: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let g = self.log.lines.lock().unwrap();
        g.0.iter().skip(mark).filter(|l| pred(l)).cloned().collect()
    }

    /// Log lines that satisfy `pred`.
    pub fn lines(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines_since(0, pred)
    }

    fn log_closed(&self) -> bool {
        self.log.lines.lock().unwrap().1
    }

    fn wait_log_change(&self, deadline: Instant) {
        let g = self.log.lines.lock().unwrap();
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        let _ = self.log.changed.wait_timeout(g, left).unwrap();
    }

    /// The first log line from `mark` on that satisfies `pred`, waiting up to `WAIT` for it.
    /// Panics (with the log) if it does not come, or the proxy's log ends without it.
    pub fn wait_log_since(&self, mark: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line(what, WAIT, |i, l| i >= mark && pred(l))
    }

    /// The first log line that `pick` (given its index and text) takes, waiting up to `within`
    /// for it. Panics (with the log) if it does not come, or the proxy's log ends without it.
    fn wait_line(
        &self,
        what: &str,
        within: Duration,
        mut pick: impl FnMut(usize, &str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let closed;
            {
                let g = self.log.lines.lock().unwrap();
                if let Some((_, l)) = g.0.iter().enumerate().find(|(i, l)| pick(*i, l)) {
                    return l.clone();
                }
                closed = g.1;
            }
            if closed || Instant::now() >= deadline {
                panic!(
                    "no log line {what} ({}):\n{}",
                    if closed {
                        "the proxy's log ended"
                    } else {
                        "timed out"
                    },
                    self.logs().join("\n")
                );
            }
            self.wait_log_change(deadline);
        }
    }

    /// `wait_log_since(0, ..)`.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_log_since(0, what, pred)
    }

    /// Wait until `n` lines from `mark` on satisfy `pred`; return them.
    pub fn wait_log_count(
        &self,
        mark: usize,
        n: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        wait_for(&format!("{n} log lines {what}"), WAIT, || {
            let l = self.lines_since(mark, &pred);
            (l.len() >= n).then_some(l)
        })
    }

    // The log lines tests wait for. The proxy's wording of them lives here, once.

    /// The first `reload ok` line from `mark` on; panics (with the log) if a reload is rejected
    /// first or none comes.
    pub fn wait_reload_ok(&self, mark: usize) -> String {
        self.wait_reload_ok_within(mark, WAIT)
    }

    /// `wait_reload_ok` for a reload of tens of thousands of apps, with a deadline of its own:
    /// the debug build's reload of 20,000 apps took 20.7 s of wall clock with the load average
    /// at 17 on 2 cores (the suite at 4 test threads beside builds).
    pub fn wait_big_reload_ok(&self, mark: usize) -> String {
        self.wait_reload_ok_within(mark, WAIT * 4)
    }

    fn wait_reload_ok_within(&self, mark: usize, within: Duration) -> String {
        let line = self.wait_line("reload ok", within, |i, l| {
            i >= mark && (is_reload_ok(l) || is_reload_rejected(l))
        });
        assert!(
            is_reload_ok(&line),
            "reload rejected:\n{}",
            self.logs().join("\n")
        );
        line
    }

    /// The first `reload rejected` line from `mark` on; panics (with the log) if a reload
    /// succeeds first or none comes.
    pub fn wait_reload_rejected(&self, mark: usize) -> String {
        let line = self.wait_log_since(mark, "reload rejected", |l| {
            is_reload_ok(l) || is_reload_rejected(l)
        });
        assert!(
            is_reload_rejected(&line),
            "the reload was not rejected:\n{}",
            self.logs().join("\n")
        );
        line
    }

    /// The first `reload rejected` line from `mark` on that names `what` (a problem, a path).
    pub fn wait_reload_rejected_for(&self, mark: usize, what: &str) -> String {
        self.wait_log_since(mark, &format!("reload rejected ... {what}"), |l| {
            is_reload_rejected(l) && l.contains(what)
        })
    }

    /// The `reload rejected: keeping the running config` line that ends a rejection whose
    /// problems were logged on lines of their own, from `mark` on.
    pub fn wait_reload_kept(&self, mark: usize) -> String {
        self.wait_log_since(mark, "reload rejected: keeping the running config", |l| {
            l.contains(" reload rejected: keeping the running config")
        })
    }

    /// Replace the config and wait for the `reload ok` line that follows; return it.
    pub fn reload(&self, json: &str) -> String {
        let mark = self.mark();
        self.rewrite_config(json);
        self.wait_reload_ok(mark)
    }

    /// Replace the config and wait for the `reload rejected` line that follows; return it.
    pub fn reload_rejected(&self, json: &str) -> String {
        let mark = self.mark();
        self.rewrite_config(json);
        self.wait_reload_rejected(mark)
    }

    /// The `started mode=MODE ...` line (what it started with: limits, descriptors, hash).
    pub fn started_line(&self) -> String {
        self.wait_log("started", |l| self.is_started(l))
    }

    /// Whether `l` is this proxy's `started mode=MODE ...` line, in the text or JSON format.
    fn is_started(&self, l: &str) -> bool {
        let msg = format!("started mode={} ", self.mode.name());
        l.contains(&format!(" INFO  {msg}"))
            || (l.starts_with('{')
                && l.contains(r#""level":"info""#)
                && l.contains(&format!(r#""msg":"{msg}"#)))
    }

    /// The `stopping:` line (listeners closed, draining) from `mark` on.
    pub fn wait_stopping(&self, mark: usize) -> String {
        self.wait_log_since(mark, "stopping", is_stopping)
    }

    /// The `stopped: every connection finished` line from `mark` on.
    pub fn wait_stopped_clean(&self, mark: usize) -> String {
        self.wait_log_since(mark, "stopped: every connection finished", |l| {
            l.contains(" INFO  stopped: every connection finished")
        })
    }

    /// The first `upgrade failed` line from `mark` on.
    pub fn wait_upgrade_failed(&self, mark: usize) -> String {
        self.wait_log_since(mark, "upgrade failed", is_upgrade_failed)
    }

    /// Wait for the `conn` log line of the connection from `client` (its local address): the
    /// first such line no earlier `wait_conn*` call returned.
    pub fn wait_conn(&self, client: SocketAddr) -> ConnLine {
        let want = canonical(client).to_string();
        self.wait_conn_where(&format!("conn client={want}"), |c| c.client == want)
    }

    /// The `conn` line of the connection from `client` to `app`. Where other connections to
    /// other apps run beside it, the kernel may have given one of them the same client port
    /// earlier: the app tells the lines apart.
    pub fn wait_conn_of_app(&self, client: SocketAddr, app: &str) -> ConnLine {
        let want = canonical(client).to_string();
        self.wait_conn_where(&format!("conn client={want} app={app}"), |c| {
            c.client == want && c.app == app
        })
    }

    /// The first `conn` line no earlier call has returned that satisfies `pred`.
    fn wait_conn_where(&self, what: &str, pred: impl Fn(&ConnLine) -> bool) -> ConnLine {
        let line = self.wait_line(what, WAIT, |i, l| {
            ConnLine::parse(l).is_some_and(|c| pred(&c))
                && self.conns_taken.lock().unwrap().insert(i)
        });
        ConnLine::parse(&line).unwrap()
    }

    /// Every `conn` line so far, parsed.
    pub fn conns(&self) -> Vec<ConnLine> {
        self.logs()
            .iter()
            .filter_map(|l| ConnLine::parse(l))
            .collect()
    }

    /// Replace the config file atomically (write a sibling, rename over), so that the proxy
    /// never reads a half-written file.
    pub fn rewrite_config(&self, json: &str) {
        static N: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.path.join(format!(
            "config.json.tmp{}",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&tmp, json).expect("write config");
        fs::rename(&tmp, &self.config).expect("rename config");
    }

    /// Send `sig` (libc::SIGHUP, SIGTERM, ...) to the proxy.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid,
            io::Error::last_os_error()
        );
    }

    /// The exit status if the proxy has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Wait for the proxy to exit (and its log to be complete); panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_for("flyproxy to exit", timeout, || self.try_status());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }

    /// The proxy's thread count, from /proc/PID/status.
    pub fn threads(&self) -> usize {
        threads_of(self.pid) as usize
    }

    /// CPU time (user + system) the proxy has used so far, in seconds, from /proc/PID/stat.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid)
    }

    /// CPU seconds the proxy uses during the next `window` (a measurement, not a wait).
    pub fn cpu_during(&self, window: Duration) -> f64 {
        cpu_during(self.pid, window)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers several test files share

/// Start `flyproxy simple` on one fresh port for an echo backend.
pub fn serving(args: &[&str], backend: &Backend) -> Proxy {
    let target = backend.target();
    Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("echo", ports, std::slice::from_ref(&target))])
        })
        .args(args)
        .start()
}

/// The proxy answers on its first port, and stops with status 0 on SIGTERM.
pub fn assert_serves_then_stops(mut p: Proxy) {
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"still serving\n");
    drop(s);
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", p.logs().join("\n"));
}

/// The exit status of a proxy expected to refuse to start, with its whole log.
pub fn refused_start(p: &mut Proxy) -> (Option<i32>, String) {
    let status = p.wait_exit(WAIT);
    (status.code(), p.logs().join("\n"))
}

/// Signal `sig` has a handler in process `pid` (the SigCgt mask of /proc/PID/status).
pub fn catches(pid: u32, sig: libc::c_int) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// A config that takes measurable time to load (2-3 CPU-s in a debug build): one app with
/// 700,000 targets (about 13 MB, under the 16 MiB cap), a size a generated config can reach.
pub fn large_config(port: u16, target: &str) -> String {
    let targets = vec![target.to_owned(); 700_000];
    serde_json::to_string(&serde_json::json!({"Apps": [app("big", &[port], &targets)]})).unwrap()
}

/// An app on every port (1-65535) of `n` addresses: `n` * 65,535 (address, port) pairs from
/// a file of one line. (One app rather than `n`: the same pairs, at a 16th of the parsing, which
/// matters to a debug build on a loaded machine.)
pub fn full_range_apps(n: usize) -> Vec<serde_json::Value> {
    let addresses: Vec<String> = (0..n)
        .map(|i| format!("10.9.{}.{}", i / 256, i % 256))
        .collect();
    vec![
        serde_json::json!({"Name": "wide", "Ports": ["1-65535"], "Addresses": addresses,
                "Targets": ["127.0.0.1:9"]}),
    ]
}

// ---------------------------------------------------------------------------------------------
// /proc figures of a process

/// The number after `key` in /proc/PID/status (a `kB` unit dropped).
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {path}"))
}

/// Resident memory, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

pub fn threads_of(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // Fields after the parenthesised name, from field 3 (state): utime is field 14, stime 15.
    let rest = stat.rsplit_once(") ").expect("a stat line").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// CPU seconds the process uses during the next `window` (a measurement, not a wait).
pub fn cpu_during(pid: u32, window: Duration) -> f64 {
    let before = cpu_secs(pid);
    thread::sleep(window);
    cpu_secs(pid) - before
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if thread::panicking() {
            eprintln!("---- flyproxy log (pid {}) ----", self.pid);
            for l in self.logs() {
                eprintln!("{l}");
            }
            eprintln!("---- end of flyproxy log ----");
        }
    }
}

fn collect_lines(stderr: ChildStderr, log: Arc<LogBuf>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches('\n')
                        .to_owned();
                    log.lines.lock().unwrap().0.push(line);
                    log.changed.notify_all();
                }
            }
        }
        log.lines.lock().unwrap().1 = true;
        log.changed.notify_all();
    })
}

/// A `reload ok: ...` line.
pub fn is_reload_ok(l: &str) -> bool {
    l.contains(" INFO  reload ok: ")
}

/// A `reload rejected: ...` line (bad file, or a config that cannot be applied).
pub fn is_reload_rejected(l: &str) -> bool {
    l.contains(" reload rejected: ")
}

/// The `stopping: listeners closed, ...` line of a graceful stop.
pub fn is_stopping(l: &str) -> bool {
    l.contains(" INFO  stopping: ")
}

/// An `upgrade failed: ...` line.
pub fn is_upgrade_failed(l: &str) -> bool {
    l.contains(" upgrade failed")
}

/// An IPv4 address the way the proxy logs it (plain, not IPv4-mapped IPv6).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// One `conn` log line, parsed.
#[derive(Debug, Clone)]
pub struct ConnLine {
    pub level: String,
    pub app: String,
    pub client: String,
    pub port: u16,
    pub target: String,
    pub up: u64,
    pub down: u64,
    pub duration: String,
    pub end: String,
    pub reason: Option<String>,
    pub line: String,
}

impl ConnLine {
    pub fn parse(line: &str) -> Option<ConnLine> {
        let mut words = line.split_whitespace();
        let _time = words.next()?;
        let level = words.next()?.to_owned();
        if words.next()? != "conn" {
            return None;
        }
        let get = |k: &str| field(line, k);
        Some(ConnLine {
            level,
            app: get("app")?,
            client: get("client")?,
            port: get("port")?.parse().ok()?,
            target: get("target")?,
            up: get("up")?.parse().ok()?,
            down: get("down")?.parse().ok()?,
            duration: get("duration")?,
            end: get("end")?,
            reason: get("reason"),
            line: line.to_owned(),
        })
    }
}

/// The value of ` key=value` in a log line; a value in double quotes is returned unquoted.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    if let Some(q) = rest.strip_prefix('"') {
        let end = q.find('"')?;
        Some(q[..end].to_owned())
    } else {
        Some(rest.split(' ').next().unwrap_or("").to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Running the binary to completion

/// A problem on a line of `check`'s report (its stderr) naming `path`, for each of `want`.
pub fn expect_problems(output: &str, path: &str, want: &[&str]) {
    let lines: Vec<&str> = output.lines().collect();
    for w in want {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{path}: ")) && l.contains(w)),
            "{w:?} missing:\n{output}"
        );
    }
}

/// Make `cmd`'s process start with an open-file limit of `n` (soft and hard, so the proxy
/// cannot raise it).
pub fn with_fd_limit(cmd: &mut Command, n: u64) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The CPU time (user and system) the command used: what a cost bound should assert on,
    /// since other tests' load stretches its wall-clock time but not this.
    pub cpu_seconds: f64,
}

/// Run the binary with `args` to completion (killed and failed after `WAIT`).
pub fn run(args: &[&str]) -> Output {
    run_path(Path::new(BIN), args)
}

/// Run the binary at `bin` (a copy of it, say) with `args`, as `run` does.
pub fn run_path(bin: &Path, args: &[&str]) -> Output {
    // Reaped by wait4 below, which gives its CPU time too (Child::wait does not).
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flyproxy");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // A safety net, not a bound a test asserts on (that is `cpu_seconds`): long enough for a
    // loaded machine.
    let limit = 3 * WAIT;
    let deadline = Instant::now() + limit;
    let pid = child.id() as libc::pid_t;
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: polls our own child, writing into the two locals; reaping it here (rather
        // than through `Child`) is what gives its rusage.
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if got == pid {
            break (status, usage);
        }
        assert!(got == 0, "wait4: {}", io::Error::last_os_error());
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flyproxy {args:?} did not exit within {limit:?}");
        }
        thread::sleep(POLL);
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Output {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
    }
}

/// A proxy on one port for one app, `limited`, relaying to `backend` with `MaxConnections`
/// set to `max` and the given `--connect-timeout`: the set-up of every test of waiting for
/// an app's slot.
pub fn limited_proxy(backend: &Backend, max: u32, connect_timeout: &str) -> Proxy {
    let target = backend.target();
    Proxy::simple()
        .ports(1, move |ports| {
            config(&[app_with(
                "limited",
                ports,
                std::slice::from_ref(&target),
                serde_json::json!({ "MaxConnections": max }),
            )])
        })
        .args(&["--connect-timeout", connect_timeout])
        .start()
}

// ---------------------------------------------------------------------------------------------
// Backends

/// Give `listener` a deep accept queue. std listens with a backlog of 128; the proxy connects
/// as fast as its clients come (non-blocking connects, no thread each), and a burst of them
/// overflows that while the accepting test thread competes for the CPU: the dropped
/// handshakes then wait for SYN-ACK retransmissions (1, 2, 4, 8 s ...). Listening again only
/// resizes the queue (capped by net.core.somaxconn).
pub fn listen_deep(listener: &TcpListener) {
    // SAFETY: listen(2) on a socket the caller owns.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
}

#[derive(Clone)]
enum Kind {
    /// Echo every byte; at EOF, close the write side.
    Echo,
    /// Write `name\n` first, then echo.
    Tagged(String),
    /// Read until EOF, then reply `got N bytes\n` and close: only works if the half-close
    /// reaches it.
    ReplyAtEof,
}

/// An in-test backend server on a loopback address; stops accepting on drop.
///
/// `accepted` counts every connection, the proxy's health checks included; `served` only those
/// that sent at least one byte, i.e. client traffic relayed by the proxy.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn echo() -> Backend {
        Backend::start("127.0.0.1:0", Kind::Echo)
    }

    /// An echo server on `[::1]`.
    pub fn echo_v6() -> Backend {
        Backend::start("[::1]:0", Kind::Echo)
    }

    pub fn tagged(name: &str) -> Backend {
        Backend::start("127.0.0.1:0", Kind::Tagged(name.to_owned()))
    }

    pub fn tagged_v6(name: &str) -> Backend {
        Backend::start("[::1]:0", Kind::Tagged(name.to_owned()))
    }

    /// A tagged server on a fixed address (`127.0.0.1:7001`), for a test in a network
    /// namespace of its own where every namespace has the same target.
    pub fn tagged_at(bind: &str, name: &str) -> Backend {
        Backend::start(bind, Kind::Tagged(name.to_owned()))
    }

    pub fn reply_at_eof() -> Backend {
        Backend::start("127.0.0.1:0", Kind::ReplyAtEof)
    }

    fn start(bind: &str, kind: Kind) -> Backend {
        let listener = TcpListener::bind(bind).expect("bind backend");
        listen_deep(&listener);
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, sv, s) = (
            Arc::clone(&accepted),
            Arc::clone(&served),
            Arc::clone(&stop),
        );
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::AcqRel);
                let kind = kind.clone();
                let sv = Arc::clone(&sv);
                thread::spawn(move || serve(conn, kind, &sv));
            }
        });
        Backend {
            addr,
            accepted,
            served,
            stop,
            thread: Some(thread),
        }
    }

    /// The target as the config writes it.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }

    /// Connections that sent at least one byte so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Acquire)
    }

    /// Stop accepting and close the listener (open connections go on).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut s: TcpStream, kind: Kind, served: &AtomicUsize) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut counted = false;
    let mut count = |n: usize| {
        if n > 0 && !counted {
            counted = true;
            served.fetch_add(1, Ordering::AcqRel);
        }
    };
    match kind {
        Kind::Tagged(name) => {
            if s.write_all(format!("{name}\n").as_bytes()).is_err() {
                return;
            }
        }
        Kind::ReplyAtEof => {
            let mut n = 0usize;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        count(k);
                        n += k
                    }
                    Err(_) => return,
                }
            }
            let _ = s.write_all(format!("got {n} bytes\n").as_bytes());
            let _ = s.shutdown(Shutdown::Write);
            return;
        }
        Kind::Echo => {}
    }
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count(n);
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// A loopback port that refuses connections: bound (so no one else takes it) but not
/// listening, so a SYN to it is answered with a reset. Closed on drop.
pub struct Refusing {
    _fd: OwnedFd,
    pub addr: SocketAddr,
}

impl Refusing {
    pub fn new() -> Refusing {
        // SAFETY: socket(2); the result is checked and owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh socket nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = bind_loopback_v4(fd.as_raw_fd(), 0);
        Refusing { _fd: fd, addr }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Default for Refusing {
    fn default() -> Self {
        Refusing::new()
    }
}

/// A loopback port whose accept queue is full, so new SYNs are dropped and a connect to it
/// hangs until the connector's timeout. Closed on drop.
pub struct Blackhole {
    _fd: OwnedFd,
    _filler: Vec<TcpStream>,
    pub addr: SocketAddr,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        Blackhole::bound(Ipv4Addr::LOCALHOST)
    }

    /// A blackhole bound to 0.0.0.0, so that its port on every loopback address
    /// (127.0.0.0/8) hangs: as many distinct unreachable targets as needed, `127.a.b.c:port`,
    /// from one socket. `addr` is its 127.0.0.1 address.
    pub fn every_loopback_address() -> Blackhole {
        Blackhole::bound(Ipv4Addr::UNSPECIFIED)
    }

    fn bound(ip: Ipv4Addr) -> Blackhole {
        // SAFETY: as in Refusing::new.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fresh socket.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = bind_v4(fd.as_raw_fd(), ip, 0);
        // SAFETY: a bound stream socket; backlog 0 queues one connection at most.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 0) }, 0);
        let mut filler = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => filler.push(s),
                Err(e)
                    if e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    return Blackhole {
                        _fd: fd,
                        _filler: filler,
                        addr,
                    };
                }
                Err(e) => panic!("filling the blackhole's queue: {e}"),
            }
        }
        panic!("the accept queue of a backlog-0 listener never filled up");
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Blackhole::new()
    }
}

/// bind(2) `fd` to 127.0.0.1:`port`; the address it got.
fn bind_loopback_v4(fd: libc::c_int, port: u16) -> SocketAddr {
    bind_v4(fd, Ipv4Addr::LOCALHOST, port)
}

/// bind(2) `fd` to `ip`:`port`; the address it got, as 127.0.0.1:port for 0.0.0.0.
fn bind_v4(fd: libc::c_int, ip: Ipv4Addr, port: u16) -> SocketAddr {
    // SAFETY: a zeroed sockaddr_in is valid; we fill the fields bind needs.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = port.to_be();
    sin.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(ip.octets()),
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sin is a valid sockaddr_in of `len` bytes.
    let rc = unsafe { libc::bind(fd, &sin as *const _ as *const libc::sockaddr, len) };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    let mut got: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut got_len = len;
    // SAFETY: got is a sockaddr_in buffer of got_len bytes.
    let rc =
        unsafe { libc::getsockname(fd, &mut got as *mut _ as *mut libc::sockaddr, &mut got_len) };
    assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
    SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from_be(got.sin_port)))
}

/// A target name that never resolves (`.invalid` is reserved for that).
pub const UNRESOLVABLE: &str = "nothing.invalid:1";

// ---------------------------------------------------------------------------------------------
// Clients

/// Connect to `addr` (panicking on failure), with read and write timeouts of `WAIT` so that a
/// broken proxy fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Write `msg` and read back exactly as many bytes; panic unless they are `msg`.
pub fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write to proxy");
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).expect("read echo from proxy");
    assert_eq!(got, msg, "echo differs");
}

/// Read one `\n`-terminated line (without the newline), byte by byte so nothing after it is
/// consumed.
pub fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => panic!(
                "EOF before end of line (got {:?})",
                String::from_utf8_lossy(&out)
            ),
            Ok(_) if b[0] == b'\n' => return String::from_utf8(out).unwrap(),
            Ok(_) => out.push(b[0]),
            Err(e) => panic!(
                "reading a line: {e} (got {:?})",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Connect and read the backend's tag line.
pub fn tag_of(addr: SocketAddr) -> String {
    let mut s = connect(addr);
    read_line(&mut s)
}

/// Read until the proxy closes the connection; panic if it sends anything or does not close
/// within `within`. A reset counts as closed.
pub fn expect_closed(s: &mut TcpStream, within: Duration) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected the connection closed, got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection closed within {within:?}, got {e}"),
    }
}

/// Panic unless nothing arrives on `s` for `window` (a bounded negative check).
pub fn expect_silent(s: &mut TcpStream, window: Duration) {
    s.set_read_timeout(Some(window)).unwrap();
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {}
        Ok(0) => panic!("expected no answer yet, got EOF"),
        Ok(n) => panic!(
            "expected no answer yet, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("expected no answer yet, got {e}"),
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
}

/// Panic unless a connection to `addr` is refused.
pub fn expect_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, WAIT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("connect {addr}: expected refused, got {e}"),
        Ok(_) => panic!("connect {addr}: expected refused, but it connected"),
    }
}

/// SO_LINGER 0: the coming close of `s` sends a reset (RST) instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, and the option value is a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Close `s` with a reset (SO_LINGER 0) instead of a FIN.
pub fn close_with_reset(s: TcpStream) {
    set_linger_zero(&s);
    drop(s);
}

/// Read exactly `want` from `s` (within `WAIT`) and check it is what came.
pub fn expect_reply(s: &mut TcpStream, want: &[u8]) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("waiting for {:?}: {e}", String::from_utf8_lossy(want)));
    assert_eq!(
        got,
        want,
        "reply differs: got {:?}, want {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want)
    );
}

/// Whether this runs in CI (`CI` set, and not empty, "0" or "false"): a test that cannot run
/// here is then a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// TCP states as the kernel numbers them (include/net/tcp_states.h; libc does not export them).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;

/// The kernel's TCP state of `s` (`TCP_ESTABLISHED`, `TCP_CLOSE_WAIT`, ...), from TCP_INFO.
pub fn tcp_state(s: &TcpStream) -> u8 {
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; `info` and `len` describe a writable buffer of that size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_state
}

/// Wait until the peer of `s` has reset the connection: the socket is closed (TCP_CLOSE)
/// although this side never closed it, and a write now fails.
pub fn expect_reset(s: &mut TcpStream, what: &str) {
    wait_for(&format!("{what} to be reset"), WAIT, || {
        (tcp_state(s) == TCP_CLOSE).then_some(())
    });
    let wrote = s.write(b"x");
    assert!(wrote.is_err(), "{what}: a write after the reset succeeded");
}

/// Read until end of stream and return every byte; panics on an error or after `WAIT`.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to end of stream");
    out
}

/// The first bytes a `Relayed` client sends, so the target side can tell the relayed connection
/// from the proxy's health checks (which connect and close).
pub const HELLO: &[u8] = b"hello\n";

/// A proxy in front of a target socket the test holds: both ends of one relayed connection.
pub struct Relayed {
    pub proxy: Proxy,
    pub client: TcpStream,
    pub target: TcpStream,
    /// Kept open so the proxy's health checks keep finding the target up.
    pub listener: TcpListener,
}

impl Relayed {
    /// Start a proxy (with `args`) whose one app's target is a listener of the test, connect a
    /// client through it, send `HELLO`, and accept the relayed connection at the target.
    pub fn start(args: &[&str]) -> Relayed {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target_addr = listener.local_addr().unwrap().to_string();
        let proxy = Proxy::simple()
            .args(args)
            .ports(1, |ports| {
                config(&[app("app", ports, std::slice::from_ref(&target_addr))])
            })
            .start();
        let mut client = connect(proxy.v4(0));
        client.write_all(HELLO).unwrap();
        let target = accept_relayed(&listener, HELLO);
        Relayed {
            proxy,
            client,
            target,
            listener,
        }
    }

    /// Another client through the same proxy, sending `hello` first; both ends.
    pub fn another(&self, hello: &[u8]) -> (TcpStream, TcpStream) {
        let mut client = connect(self.proxy.v4(0));
        client.write_all(hello).unwrap();
        let target = accept_relayed(&self.listener, hello);
        (client, target)
    }
}

/// Accept at `listener` the connection that starts with `hello` (health checks, which send
/// nothing, are dropped), with `hello` read; timeouts of `WAIT` set.
pub fn accept_relayed(listener: &TcpListener, hello: &[u8]) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let s = wait_for("the relayed connection at the target", WAIT, || {
        let (mut s, _) = match listener.accept() {
            Ok(ok) => ok,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        let mut got = vec![0; hello.len()];
        // A health check closes without sending anything.
        s.read_exact(&mut got).ok()?;
        assert_eq!(got, hello);
        Some(s)
    });
    listener.set_nonblocking(false).unwrap();
    s
}

/// A throwaway stream to put in place of a socket a test closed (so a struct stays whole).
pub fn placeholder() -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    TcpStream::connect(l.local_addr().unwrap()).unwrap()
}

/// Raise this process's open-file soft limit to its hard limit; returns the limit.
pub fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "setrlimit: {}",
            io::Error::last_os_error()
        );
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A ClientHello written by the test (independent of the proxy's parser): TLS 1.2-style, with
/// the given server name, split into records of `record` bytes.
pub fn client_hello(name: Option<&str>, record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    // supported_groups, a harmless extension before the name.
    exts.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    if let Some(n) = name {
        let n = n.as_bytes();
        exts.extend([0x00, 0x00]);
        exts.extend(((n.len() + 5) as u16).to_be_bytes());
        exts.extend(((n.len() + 3) as u16).to_be_bytes());
        exts.push(0);
        exts.extend((n.len() as u16).to_be_bytes());
        exts.extend(n);
    }
    let mut body = vec![0x03, 0x03];
    body.extend([0x5a; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0xc0, 0x2f, 0x01, 0x00]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut msg = vec![0x01];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    let mut wire = Vec::new();
    for chunk in msg.chunks(record) {
        wire.extend([0x16, 0x03, 0x01]);
        wire.extend((chunk.len() as u16).to_be_bytes());
        wire.extend(chunk);
    }
    wire
}

/// What the proxy says of an app whose Ports take the --metrics address `metrics` (start-up
/// and reloads alike).
pub fn metrics_clash_words(metrics: SocketAddr, app: &str) -> String {
    let port = metrics.port();
    format!(
        "--metrics {metrics}: port {port} is also app {app:?}'s (in its Ports): give --metrics a \
         port no app uses (the default is 9089), or take {port} out of the app's Ports"
    )
}
