//! Zero-downtime binary upgrades: SIGUSR2 (or `flyproxy upgrade --pid-file PATH`) makes the
//! running process start the binary at its path anew with its listening sockets; once the new
//! process serves, the old one stops accepting, drains its open connections and exits 0. If the
//! new process fails before it serves, the old one carries on.
//!
//! Each test runs its own copy of the binary (a hard link or copy in its temp dir), so every
//! generation it starts is found by its `/proc/PID/exe`; the test process is made a child
//! subreaper, so the generations orphaned by their exiting parents are reaped (and their exit
//! status checked) here. Every generation writes to the same stderr pipe: log lines of several
//! processes interleave, and the `started ... pid=N` line names each.
//!
//! Every wait polls a condition with a deadline; the only sleeps pace the load generators.

mod common;
#[macro_use]
mod modes;
#[allow(dead_code)]
mod netns;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{app, config, field, wait_for, Backend, ConnLine, Launch, Proxy, Rng, TempDir};
use common::{assert_serves_then_stops, run, BIN, WAIT};
use modes::{Env, Mode};

/// Upgrades performed in a row by the load tests.
const UPGRADES: usize = 20;

/// Long-lived connections kept open (and carrying data) across all the upgrades.
const LONG_LIVED: usize = 5;

/// Options of every proxy here (beside a 100 ms reload interval): open connections may outlive
/// the whole test while draining.
const RUN_ARGS: [&str; 2] = ["--drain-timeout", "120s"];

// ---------------------------------------------------------------------------------------------
// The binary, and every process running it

/// The test's own copy of the binary, in a directory of its own: what the proxy execs on
/// upgrade is then a path there, and every generation can be told from other tests' proxies by
/// its `/proc/PID/exe`.
struct Binary {
    /// What the test runs.
    path: PathBuf,
    /// Every executable of this test lives here.
    dir: PathBuf,
    _tmp: TempDir,
}

impl Binary {
    fn new() -> Binary {
        let tmp = TempDir::new("upgrade-bin");
        let dir = fs::canonicalize(&tmp.path).expect("canonicalize the temp dir");
        let path = dir.join("flyproxy");
        install(&path, true);
        Binary {
            path,
            dir,
            _tmp: tmp,
        }
    }

    /// Family guard for the processes running any executable of this binary's directory;
    /// `first` is the `Proxy`'s own child.
    fn family(&self, first: u32) -> Family {
        Family {
            dir: self.dir.clone(),
            first,
        }
    }
}

/// Put the flyproxy binary at `path` (a hard link if `link` and possible, else a copy: a file
/// of its own), and wait until it can be executed.
fn install(path: &Path, link: bool) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create the binary's directory");
    }
    if !link || fs::hard_link(BIN, path).is_err() {
        fs::copy(BIN, path).expect("copy the flyproxy binary");
    }
    // A file just written cannot be executed while a process forked meanwhile by another
    // thread still holds the write descriptor (ETXTBSY); that passes within moments.
    wait_for("the copied binary to run", WAIT, || {
        match Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) => {
                assert!(s.success(), "{} --version: {s}", path.display());
                Some(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => None,
            Err(e) => panic!("running {}: {e}", path.display()),
        }
    });
}

/// The inode of the file a process runs (even if it was deleted or replaced since).
fn exe_inode(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e}"))
        .ino()
}

/// Make this process the reaper of its orphaned descendants: a generation whose parent (the
/// previous generation) exited becomes our child, so we can wait for it and see its status.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        io::Error::last_os_error()
    );
}

/// Pids of the live processes running an executable under `dir`.
fn running(dir: &Path) -> Vec<u32> {
    let Ok(proc) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.starts_with(dir)))
        .collect()
}

/// Kills every process still running the test's binary when dropped, however the test ended,
/// so that no generation outlives it (and the log reader of `Proxy`, which waits for every
/// holder of the stderr pipe to exit, is not left waiting). Declare it after the `Proxy`, so
/// that it is dropped first.
struct Family {
    /// The directory of the test's executables.
    dir: PathBuf,
    /// The first generation, the `Proxy`'s own child: reaped by it, never here.
    first: u32,
}

impl Drop for Family {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = running(&self.dir);
            if pids.is_empty() {
                return;
            }
            for &pid in &pids {
                eprintln!("killing leftover flyproxy pid {pid}");
                // SAFETY: kill(2) of a process running the test's own binary copy.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
            for &pid in pids.iter().filter(|&&p| p != self.first) {
                let mut st = 0;
                // SAFETY: waitpid on one pid, without blocking.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut st, libc::WNOHANG) };
            }
        }
    }
}

/// Exit statuses of the generations this process reaped (all but the first, which is the
/// `Proxy`'s child).
#[derive(Default)]
struct Reaped(HashMap<u32, libc::c_int>);

impl Reaped {
    /// Whether `pid` has exited: reaped here if it is our child, else no longer there at all.
    fn gone(&mut self, pid: u32) -> bool {
        if self.0.contains_key(&pid) {
            return true;
        }
        let mut st = 0;
        // SAFETY: waitpid on one pid, without blocking.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut st, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            self.0.insert(pid, st);
            return true;
        }
        if rc == 0 {
            return false;
        }
        // Not our child (ECHILD): gone once kill(pid, 0) says ESRCH, or a zombie of someone
        // else's.
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
            || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        !alive || is_zombie(pid)
    }

    /// Panic unless every reaped generation exited with status 0.
    fn assert_all_exited_0(&self) {
        for (pid, &st) in &self.0 {
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "generation pid {pid} did not exit 0 (wait status {st:#x})"
            );
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// kill(pid, 0) says ESRCH (or it is a zombie nobody reaped yet: also exited).
fn no_such_process(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    (rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)) || is_zombie(pid)
}

/// SIGTERM to the new process of an upgrade (not our child, or our child: either way), then
/// wait for it to exit and panic unless it exited 0.
fn stop_new_process(pid: u32) {
    signal(pid, libc::SIGTERM);
    let mut reaped = Reaped::default();
    wait_for("the new process to exit", WAIT, || {
        reaped.gone(pid).then_some(())
    });
    reaped.assert_all_exited_0();
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) of a flyproxy generation this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Starting the proxy from the copy, and reading what its generations log

/// `flyproxy simple` from `bin` on `nports` fresh ports (all to `backend`), with a pid file;
/// waits until it serves. Starts again on other ports if one was taken meanwhile.
fn start_simple(
    bin: &Binary,
    nports: usize,
    backend: &Backend,
    extra: &[&str],
) -> (Proxy, PathBuf) {
    start_in(Mode::Simple, bin, nports, backend, extra)
}

/// The proxy from `bin` in `mode` (bpf: in the calling thread's namespace, the test's own) on
/// `nports` fresh ports (all to `backend`), with a pid file; waits until it serves and has
/// written the pid file. Simple mode starts again on other ports if one was taken meanwhile.
fn start_in(
    mode: Mode,
    bin: &Binary,
    nports: usize,
    backend: &Backend,
    extra: &[&str],
) -> (Proxy, PathBuf) {
    let p = Launch::new(mode)
        .bin(&bin.path)
        .ports(nports, |ports| {
            config(&[app("echo", ports, &[backend.target()])])
        })
        .file_arg("--pid-file", "flyproxy.pid")
        .args(&RUN_ARGS)
        .fast_reload()
        .args(extra)
        .start();
    let pid_file = p.dir.path.join("flyproxy.pid");
    wait_pid_file(&pid_file, p.pid);
    (p, pid_file)
}

/// The pid in the pid file, if it holds one.
fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_pid_file(path: &Path, pid: u32) {
    wait_for(
        &format!("{} to name pid {pid}", path.display()),
        WAIT,
        || (read_pid(path) == Some(pid)).then_some(()),
    );
}

/// The pid of a `started mode=... pid=N` line.
fn started_pid(line: &str) -> Option<u32> {
    if !line.contains(" INFO  started mode=") {
        return None;
    }
    field(line, "pid")?.parse().ok()
}

/// N of an `upgrade: pid N is serving; ...` line (logged by the old process).
fn serving_pid(line: &str) -> Option<u32> {
    line.split_once(" upgrade: pid ")?
        .1
        .split_once(" is serving; this process stops accepting and drains")?
        .0
        .parse()
        .ok()
}

/// What `ps -C` matches: /proc/PID/comm.
fn process_name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_owned()
}

/// Every pid named by a `started` line so far: all the generations.
fn generations(proxy: &Proxy) -> Vec<u32> {
    proxy.logs().iter().filter_map(|l| started_pid(l)).collect()
}

/// Send SIGUSR2 to the process named in the pid file and wait until its successor serves:
/// the old one says so, the new one logged `started` and that it took over `listeners`
/// listeners, and the pid file names it. Returns the new pid.
fn upgrade(proxy: &Proxy, pid_file: &Path, exe: &Path, listeners: usize) -> u32 {
    let old =
        read_pid(pid_file).unwrap_or_else(|| panic!("{} names no process", pid_file.display()));
    let mark = proxy.mark();
    signal(old, libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "`upgrade: pid N is serving` (or a failure)", |l| {
        serving_pid(l).is_some() || l.contains(" upgrade failed") || l.contains(" SIGUSR2 ")
    });
    let new = serving_pid(&line).unwrap_or_else(|| {
        // What both processes said (the failed one's reason included), short connections aside.
        let said = proxy.lines_since(mark, |l| !l.contains(" INFO  conn "));
        panic!("upgrade of pid {old} did not succeed: {line}\nlog since SIGUSR2: {said:#?}")
    });
    assert_ne!(new, old, "{line}");
    // The old process's line, then the new one's own (its log is written by a thread of its
    // own, so it may come after the old one's `is serving`).
    let spawned = proxy.wait_log_since(mark, "`upgrade: started ... as pid N`", |l| {
        l.contains(" upgrade: started ") && l.contains(&format!(" as pid {new} "))
    });
    assert!(
        spawned.contains(&format!(
            " INFO  upgrade: started {} as pid {new} with {listeners} listeners; waiting for it to serve",
            exe.display()
        )),
        "{spawned}"
    );
    proxy.wait_log_since(mark, &format!("started ... pid={new}"), |l| {
        started_pid(l) == Some(new)
    });
    let taken = proxy.wait_log_since(mark, "`upgrade: serving with N listeners`", |l| {
        l.contains(" upgrade: serving with ")
    });
    assert!(
        taken.contains(&format!(
            " INFO  upgrade: serving with {listeners} listeners taken over from the previous process"
        )),
        "{taken}"
    );
    wait_pid_file(pid_file, new);
    new
}

// ---------------------------------------------------------------------------------------------
// Load: a stream of short connections, and long-lived ones carrying data

/// What happened to the short connections of a [`Churn`].
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    /// Reset, aborted, or broken pipe.
    reset: AtomicU64,
    /// EOF before the whole echo came back.
    cut: AtomicU64,
    corrupted: AtomicU64,
    /// Timeouts and anything else.
    other: AtomicU64,
    slowest_ms: AtomicU64,
    /// The first few failures, described.
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self) -> u64 {
        [
            &self.refused,
            &self.reset,
            &self.cut,
            &self.corrupted,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Ordering::Acquire))
        .sum()
    }

    fn fail(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::AcqRel);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn io_error(&self, addr: SocketAddr, step: &str, e: &io::Error) {
        let counter = match e.kind() {
            io::ErrorKind::ConnectionRefused => &self.refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => &self.reset,
            io::ErrorKind::UnexpectedEof => &self.cut,
            _ => &self.other,
        };
        self.fail(counter, format!("{addr}: {step}: {e}"));
    }

    fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Acquire);
        format!(
            "{} ok, {} refused, {} reset, {} cut short, {} corrupted, {} other failures; slowest {} ms; first failures: {:?}",
            g(&self.ok),
            g(&self.refused),
            g(&self.reset),
            g(&self.cut),
            g(&self.corrupted),
            g(&self.other),
            g(&self.slowest_ms),
            self.failures.lock().unwrap()
        )
    }
}

/// One thread making short connections, one after another, to `addrs` in turn: connect, send
/// a line, read its echo, half-close, read EOF, close.
struct Churn {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    thread: Option<JoinHandle<()>>,
}

impl Churn {
    fn start(addrs: Vec<SocketAddr>) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let (s, t) = (Arc::clone(&stop), Arc::clone(&tally));
        let thread = thread::spawn(move || {
            for n in 0..10_000_000u64 {
                if s.load(Ordering::Acquire) {
                    break;
                }
                churn_once(addrs[n as usize % addrs.len()], n, &t);
                // Pacing, not synchronisation: a few hundred connections a second are plenty
                // to meet every hand-over, without running the ephemeral ports dry.
                thread::sleep(Duration::from_millis(2));
            }
        });
        Churn {
            stop,
            tally,
            thread: Some(thread),
        }
    }

    fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::Acquire)
    }

    /// Wait until `n` more connections succeeded (panicking early if any failed).
    fn wait_progress(&self, n: u64) {
        let target = self.ok() + n;
        wait_for(&format!("{n} more short connections"), WAIT, || {
            assert_eq!(self.tally.failed(), 0, "{}", self.tally.summary());
            (self.ok() >= target).then_some(())
        });
    }

    fn finish(mut self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("churn thread");
        }
        Arc::clone(&self.tally)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn churn_once(addr: SocketAddr, n: u64, t: &Tally) {
    let began = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, WAIT) {
        Ok(s) => s,
        Err(e) => return t.io_error(addr, "connect", &e),
    };
    let _ = s.set_read_timeout(Some(WAIT));
    let _ = s.set_write_timeout(Some(WAIT));
    let msg = format!("short connection {n} to {addr}\n");
    if let Err(e) = s.write_all(msg.as_bytes()) {
        return t.io_error(addr, "write", &e);
    }
    let mut got = vec![0u8; msg.len()];
    if let Err(e) = s.read_exact(&mut got) {
        return t.io_error(addr, "read the echo", &e);
    }
    if got != msg.as_bytes() {
        return t.fail(
            &t.corrupted,
            format!(
                "{addr}: echo {:?} of {msg:?}",
                String::from_utf8_lossy(&got)
            ),
        );
    }
    if let Err(e) = s.shutdown(Shutdown::Write) {
        return t.io_error(addr, "half-close", &e);
    }
    let mut rest = [0u8; 64];
    match s.read(&mut rest) {
        Ok(0) => {}
        Ok(k) => {
            return t.fail(
                &t.corrupted,
                format!("{addr}: {k} bytes after the echo of {msg:?}"),
            )
        }
        Err(e) => return t.io_error(addr, "read EOF", &e),
    }
    t.slowest_ms
        .fetch_max(began.elapsed().as_millis() as u64, Ordering::AcqRel);
    t.ok.fetch_add(1, Ordering::AcqRel);
}

/// One long-lived connection: its client and proxy ends, and the thread exchanging data on it.
struct Long {
    local: SocketAddr,
    remote: SocketAddr,
    thread: JoinHandle<Result<u64, String>>,
}

/// Connections that send a chunk of pseudo-random bytes and check its echo every 50 ms until
/// told to stop, then half-close and expect EOF.
struct LongLived {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    conns: Vec<Long>,
}

impl LongLived {
    fn start(addrs: &[SocketAddr], n: usize) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let conns = (0..n)
            .map(|i| {
                let remote = addrs[i % addrs.len()];
                let mut s = common::connect(remote);
                // Served end to end before anything else happens.
                common::roundtrip(&mut s, format!("long-lived {i}\n").as_bytes());
                let local = s.local_addr().unwrap();
                let (st, r) = (Arc::clone(&stop), Arc::clone(&rounds));
                let first = format!("long-lived {i}\n").len() as u64;
                let thread = thread::spawn(move || exchange(s, i as u64, first, &st, &r));
                Long {
                    local,
                    remote,
                    thread,
                }
            })
            .collect();
        LongLived {
            stop,
            rounds,
            conns,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }

    /// Stop, close every connection, and return (client address, proxy address, bytes sent
    /// and echoed) of each; panics on any loss, corruption or error.
    fn finish(mut self) -> Vec<(SocketAddr, SocketAddr, u64)> {
        self.stop.store(true, Ordering::Release);
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for c in self.conns.drain(..) {
            match c.thread.join().expect("long-lived thread") {
                Ok(bytes) => out.push((c.local, c.remote, bytes)),
                Err(e) => errors.push(format!("{} -> {}: {e}", c.local, c.remote)),
            }
        }
        assert!(
            errors.is_empty(),
            "long-lived connections failed: {errors:#?}"
        );
        out
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for c in self.conns.drain(..) {
            let _ = c.thread.join();
        }
    }
}

/// The body of a long-lived connection's thread: bytes sent (all echoed back intact).
fn exchange(
    mut s: TcpStream,
    seed: u64,
    mut sent: u64,
    stop: &AtomicBool,
    rounds: &AtomicU64,
) -> Result<u64, String> {
    let mut rng = Rng::new(0x5EED_0000 + seed);
    let mut out = vec![0u8; 8192];
    let mut back = vec![0u8; 8192];
    for _ in 0..1_000_000 {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let len = 1 + (rng.next() % 8192) as usize;
        rng.fill(&mut out[..len]);
        s.write_all(&out[..len])
            .map_err(|e| format!("after {sent} bytes: write: {e}"))?;
        s.read_exact(&mut back[..len])
            .map_err(|e| format!("after {sent} bytes: read the echo of {len}: {e}"))?;
        if let Some(at) = (0..len).find(|&i| out[i] != back[i]) {
            return Err(format!(
                "after {sent} bytes: echo differs at byte {at} of {len}"
            ));
        }
        sent += len as u64;
        rounds.fetch_add(1, Ordering::AcqRel);
        thread::sleep(Duration::from_millis(50));
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("after {sent} bytes: half-close: {e}"))?;
    let mut rest = [0u8; 64];
    match s.read(&mut rest) {
        Ok(0) => Ok(sent),
        Ok(k) => Err(format!(
            "after {sent} bytes: {k} unexpected bytes before EOF"
        )),
        Err(e) => Err(format!("after {sent} bytes: reading EOF: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Who holds a connection

/// The inode of the established socket with local port `local` and peer port `peer`, from
/// this thread's network namespace's /proc/net/tcp{,6}.
fn socket_inode(local: u16, peer: u16) -> Option<u64> {
    let port = |a: &str| {
        a.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    ["tcp", "tcp6"].iter().find_map(|f| {
        let table = fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok()?;
        table.lines().skip(1).find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 9 && w[3] == "01" && port(w[1]) == Some(local) && port(w[2]) == Some(peer))
                .then(|| w[9].parse().ok())
                .flatten()
        })
    })
}

/// Whether `pid` has a descriptor of socket `inode`.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want))
    })
}

// ---------------------------------------------------------------------------------------------
// The load test, for both modes

/// What the mode-specific part of a load test gets to check once the upgrades are done (the
/// first generation still draining its long-lived connections): the last generation's pid.
type AfterUpgrades<'a> = &'a dyn Fn(u32);

/// Under a stream of short connections and [`LONG_LIVED`] connections carrying data, upgrade
/// [`UPGRADES`] times in a row; then stop the load and check that nothing was refused, reset,
/// lost or corrupted, that the long-lived connections stayed with the first generation until
/// they closed, and that every generation exits 0 (the last on SIGTERM).
fn upgrades_under_load(
    test: &str,
    proxy: &mut Proxy,
    pid_file: &Path,
    exe: &Path,
    listeners: usize,
    addrs: &[SocketAddr],
    after_upgrades: AfterUpgrades<'_>,
) {
    let began = Instant::now();
    let long = LongLived::start(addrs, LONG_LIVED);
    let churn = Churn::start(addrs.to_vec());
    churn.wait_progress(20);

    let (pids, slowest) = upgrade_each_under_load(proxy, pid_file, exe, listeners, &long, &churn);
    let last = *pids.last().unwrap();
    let upgrades_took = began.elapsed();
    churn.wait_progress(20);

    let mut reaped = Reaped::default();
    only_the_first_generation_holds_the_long_lived(proxy, &pids, &long, &mut reaped);
    after_upgrades(last);

    // Stop the load: nothing refused, reset, cut short or corrupted.
    let tally = churn.finish();
    assert_eq!(tally.failed(), 0, "{}", tally.summary());

    let closed = long_lived_close_and_the_first_generation_ends(proxy, long);
    every_generation_exits_0(&pids, pid_file, exe, &mut reaped);
    the_logs_tell_each_generation(proxy, &pids);

    let bytes: u64 = closed.iter().map(|c| c.2).sum();
    eprintln!(
        "{test}: {UPGRADES} upgrades in {:.1}s (slowest {:.0} ms), whole test {:.1}s; short connections: {}; long-lived: {} connections, {bytes} bytes echoed",
        upgrades_took.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0,
        began.elapsed().as_secs_f64(),
        tally.summary(),
        closed.len(),
    );
}

/// [`UPGRADES`] upgrades in a row, each once the load has made progress since the previous
/// one. The pids of every generation, first to last, and the slowest upgrade.
fn upgrade_each_under_load(
    proxy: &Proxy,
    pid_file: &Path,
    exe: &Path,
    listeners: usize,
    long: &LongLived,
    churn: &Churn,
) -> (Vec<u32>, Duration) {
    let mut pids = vec![proxy.pid];
    let mut slowest = Duration::ZERO;
    for i in 0..UPGRADES {
        // Load meets every hand-over: short connections and long-lived exchanges made progress
        // since the previous one.
        churn.wait_progress(3);
        let r = long.rounds();
        wait_for("the long-lived connections to exchange data", WAIT, || {
            (long.rounds() >= r + LONG_LIVED as u64).then_some(())
        });
        let t = Instant::now();
        let new = upgrade(proxy, pid_file, exe, listeners);
        slowest = slowest.max(t.elapsed());
        assert!(!pids.contains(&new), "upgrade {i}: pid {new} seen before");
        pids.push(new);
    }
    (pids, slowest)
}

/// Every generation in between drained its short connections and exited; the first one
/// still holds the long-lived connections, and only it does.
fn only_the_first_generation_holds_the_long_lived(
    proxy: &mut Proxy,
    pids: &[u32],
    long: &LongLived,
    reaped: &mut Reaped,
) {
    let first = pids[0];
    wait_for(
        "the generations between the first and the last to exit",
        WAIT,
        || {
            pids[1..pids.len() - 1]
                .iter()
                .all(|&p| reaped.gone(p))
                .then_some(())
        },
    );
    assert!(
        proxy.try_status().is_none(),
        "the first generation (pid {first}) exited while its long-lived connections were open"
    );
    for c in &long.conns {
        let inode = socket_inode(c.remote.port(), c.local.port()).unwrap_or_else(|| {
            panic!(
                "no established proxy-side socket for {} -> {}",
                c.local, c.remote
            )
        });
        assert!(
            holds_socket(first, inode),
            "the long-lived connection {} -> {} (socket {inode}) is not held by the first generation (pid {first})",
            c.local,
            c.remote
        );
    }
}

/// Close the long-lived connections: every byte came back, and only now does the first
/// generation finish, each connection logged (after the upgrades) with its byte counts.
fn long_lived_close_and_the_first_generation_ends(
    proxy: &mut Proxy,
    long: LongLived,
) -> Vec<(SocketAddr, SocketAddr, u64)> {
    let first = proxy.pid;
    let mark = proxy.mark();
    let closed = long.finish();
    for (local, remote, bytes) in &closed {
        let want = common::canonical(*local).to_string();
        let line = proxy.wait_log_since(mark, &format!("conn client={want}"), |l| {
            ConnLine::parse(l).is_some_and(|c| c.client == want)
        });
        let c = ConnLine::parse(&line).unwrap();
        assert_eq!(c.port, remote.port(), "{line}");
        assert_eq!((c.up, c.down), (*bytes, *bytes), "{line}");
        assert_eq!(c.end, "closed", "{line}");
        assert!(c.reason.is_none(), "{line}");
    }
    let status = wait_for("the first generation to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "first generation (pid {first}): {status}");
    closed
}

/// The last generation stops on SIGTERM; then nothing of this test is left.
fn every_generation_exits_0(pids: &[u32], pid_file: &Path, exe: &Path, reaped: &mut Reaped) {
    signal(*pids.last().unwrap(), libc::SIGTERM);
    wait_for("every generation to exit", WAIT, || {
        pids[1..].iter().all(|&p| reaped.gone(p)).then_some(())
    });
    reaped.assert_all_exited_0();
    for &p in pids {
        assert!(no_such_process(p), "pid {p} is still there");
    }
    wait_for("the pid file to be removed", WAIT, || {
        (!pid_file.exists()).then_some(())
    });
    let left = running(exe.parent().unwrap());
    assert!(
        left.is_empty(),
        "processes of this test still running: {left:?}"
    );
}

/// Each generation said it started and that it stopped with its connections finished, and
/// none logged an error or a warning.
fn the_logs_tell_each_generation(proxy: &Proxy, pids: &[u32]) {
    let logs = proxy.logs();
    let mut started = generations(proxy);
    started.sort_unstable();
    let mut expected = pids.to_vec();
    expected.sort_unstable();
    assert_eq!(started, expected, "`started` lines vs. the generations");
    let stopped = logs
        .iter()
        .filter(|l| l.contains(" INFO  stopped: every connection finished"))
        .count();
    assert_eq!(
        stopped,
        pids.len(),
        "every generation stops with its connections finished"
    );
    let bad: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(bad.is_empty(), "errors or warnings logged: {bad:#?}");
}

// ---------------------------------------------------------------------------------------------
// The tests

two_modes!(
    /// 20 upgrades in a row under load lose nothing. In bpf mode (in a network namespace of
    /// the test's own), once the old processes have stopped exactly one sk_lookup link is
    /// attached, the last generation's.
    twenty_upgrades_under_load_lose_nothing,
    twenty_upgrades
);

fn twenty_upgrades(env: Env) {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_in(env.mode, &bin, 2, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let addrs = [proxy.v4(0), proxy.v6(1), proxy.v6(0), proxy.v4(1)];
    let Some(ns) = &env.ns else {
        upgrades_under_load(
            "simple",
            &mut proxy,
            &pid_file,
            &bin.path,
            2,
            &addrs,
            &|_| {},
        );
        return;
    };
    assert_eq!(ns.links().len(), 1, "{:?}", ns.links());
    let check_links = |last: u32| {
        let deadline = Instant::now() + WAIT;
        let links = loop {
            let l = ns.links();
            if l.len() == 1 {
                break l;
            }
            assert!(
                Instant::now() < deadline,
                "{WAIT:?} after the last hand-over, {} sk_lookup links (link, program) are \
                 attached in the test's netns (ino {}), not one: {l:?}",
                l.len(),
                ns.ino
            );
            thread::sleep(Duration::from_millis(20));
        };
        let prog = links[0].1;
        let maps = prog_map_ids(prog);
        let held = map_ids_held(last);
        assert!(
            maps.iter().any(|m| held.contains(m)),
            "the one sk_lookup link (program {prog}, maps {maps:?}) is not the last generation's (pid {last} holds maps {held:?})"
        );
    };
    upgrades_under_load(
        "bpf",
        &mut proxy,
        &pid_file,
        &bin.path,
        2,
        &addrs,
        &check_links,
    );
    wait_for(
        "no sk_lookup link left after the last generation stopped",
        WAIT,
        || ns.links().is_empty().then_some(()),
    );
}

/// A new process that fails before it serves (here: the config became invalid) changes
/// nothing: the old one says so, keeps serving without failing a connection and keeps the pid
/// file; with the config fixed, the next upgrade succeeds.
#[test]
fn failed_upgrade_leaves_the_old_process_serving() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let good = fs::read_to_string(&proxy.config).unwrap();
    let churn = Churn::start(vec![proxy.v4(0), proxy.v6(0)]);
    churn.wait_progress(10);

    proxy.rewrite_config("{ \"Apps\": [ this is not JSON\n");
    let mark = proxy.mark();
    signal(first, libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "`upgrade failed`", |l| {
        l.contains(" upgrade failed") || serving_pid(l).is_some()
    });
    let failed: u32 = line
        .split_once(" upgrade failed: new process ")
        .and_then(|(_, r)| r.split_once(' '))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("expected `upgrade failed: new process N ...`, got {line}"));
    assert!(
        line.contains(&format!(
            " ERROR upgrade failed: new process {failed} exited before it was serving (exit status: 1); this process carries on serving"
        )),
        "{line}"
    );
    assert_ne!(failed, first);
    // The new process said why, as any start with a bad config does.
    proxy.wait_log_since(mark, "the new process's `exiting with status 1`", |l| {
        l.contains(" ERROR exiting with status 1")
    });

    // The old process carries on: it serves, keeps the pid file, and reaped the failed one.
    churn.wait_progress(30);
    assert!(proxy.try_status().is_none(), "the old process exited");
    assert_eq!(read_pid(&pid_file), Some(first));
    wait_for(
        &format!("the failed process {failed} to be gone"),
        WAIT,
        || no_such_process(failed).then_some(()),
    );
    let after = proxy.lines_since(mark, |l| {
        serving_pid(l).is_some() || l.contains(" stopping: ") || started_pid(l).is_some()
    });
    assert!(after.is_empty(), "{after:#?}");

    // Config fixed: the next upgrade succeeds, under the same load.
    proxy.rewrite_config(&good);
    let new = upgrade(&proxy, &pid_file, &bin.path, 1);
    churn.wait_progress(30);
    let tally = churn.finish();
    assert_eq!(tally.failed(), 0, "{}", tally.summary());

    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    stop_new_process(new);
    assert!(running(&bin.dir).is_empty(), "{:?}", running(&bin.dir));
    eprintln!("failed upgrade: short connections: {}", tally.summary());
}

/// Connections parked on the old process (idle, holding no thread: issue 14) stay with it
/// through an upgrade: after the hand-over each carries on both ways when used again, the new
/// process serves new connections meanwhile, and the old one exits 0 once the parked ones
/// closed, logging each as `closed` with every byte counted.
#[test]
fn parked_connections_on_the_old_process_carry_on_after_an_upgrade() {
    const PARKED: usize = 20;
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let mut parked: Vec<TcpStream> = (0..PARKED)
        .map(|i| {
            let mut s = common::connect(proxy.v4(0));
            common::roundtrip(&mut s, format!("hello {i}\n").as_bytes());
            s
        })
        .collect();
    // Parked: the relay threads that served them are gone (a thread each would be 20 more).
    wait_for("the connections to park", WAIT, || {
        (common::threads_of(first) < PARKED as u64).then_some(())
    });

    let new = upgrade(&proxy, &pid_file, &bin.path, 1);
    let mut fresh = common::connect(proxy.v4(0));
    common::roundtrip(&mut fresh, b"served after the upgrade\n");
    for (i, s) in parked.iter_mut().enumerate() {
        common::roundtrip(s, format!("after the upgrade {i}\n").as_bytes());
    }
    assert!(
        proxy.try_status().is_none(),
        "the old process exited with its parked connections open"
    );
    let locals: Vec<SocketAddr> = parked.iter().map(|s| s.local_addr().unwrap()).collect();
    drop(parked);
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    for (i, local) in locals.into_iter().enumerate() {
        let c = proxy.wait_conn(local);
        let bytes = format!("hello {i}\nafter the upgrade {i}\n").len() as u64;
        assert_eq!(
            (c.end.as_str(), c.up, c.down),
            ("closed", bytes, bytes),
            "{}",
            c.line
        );
    }

    drop(fresh);
    stop_new_process(new);
}

/// `flyproxy upgrade --pid-file PATH` signals the process named there, which upgrades.
#[test]
fn upgrade_command_signals_the_pid_in_the_pid_file() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let mut before = common::connect(proxy.v4(0));
    common::roundtrip(&mut before, b"before the upgrade\n");

    let mark = proxy.mark();
    let out = run_bin(&bin, &["upgrade", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout,
        format!(
            "sent SIGUSR2 to flyproxy pid {first}: it upgrades to the binary now at its path\n"
        )
    );
    let line = proxy.wait_log_since(mark, "`upgrade: pid N is serving`", |l| {
        serving_pid(l).is_some() || l.contains(" upgrade failed")
    });
    let new = serving_pid(&line).unwrap_or_else(|| panic!("{line}"));
    wait_pid_file(&pid_file, new);
    // Issue 23: the new process was named `N` after the /proc/self/fd/N it was executed
    // through, and `ps -C flyproxy` (which matches /proc/PID/comm) no longer found it.
    assert_eq!(process_name(new), "flyproxy", "/proc/{new}/comm");
    let argv0 = fs::read(format!("/proc/{new}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(argv0.split(|&b| b == 0).next().unwrap()).into_owned();
    assert_eq!(Path::new(&argv0), bin.path, "argv[0] of pid {new}");
    // Once the old process has closed its copies of the listeners, new connections reach the
    // new process; the open one stays with the old one.
    proxy.wait_log_since(mark, "the old process's `stopping`", |l| {
        l.contains(" INFO  stopping: listeners closed, 1 connections draining")
    });
    let mut after = common::connect(proxy.v4(0));
    common::roundtrip(&mut after, b"after the upgrade\n");
    let inode = socket_inode(proxy.ports[0], after.local_addr().unwrap().port()).unwrap();
    assert!(
        holds_socket(new, inode),
        "the new connection is not the new process's"
    );
    common::roundtrip(&mut before, b"still through the old process\n");
    assert!(proxy.try_status().is_none());
    drop(before);
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    drop(after);

    stop_new_process(new);
    wait_for("the pid file to be removed", WAIT, || {
        (!pid_file.exists()).then_some(())
    });
}

/// A proxy serving `--metrics` upgrades like any other: the new process must not fail on the
/// metrics address the old one still listens on, and serves it once the old one is gone.
#[test]
fn upgrade_with_metrics_succeeds_and_the_new_process_serves_metrics() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let metrics = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let metrics_arg = metrics.to_string();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &["--metrics", &metrics_arg]);
    let _family = bin.family(proxy.pid);
    assert!(http_get(metrics, "/metrics").contains("flyproxy_build_info"));
    let churn = Churn::start(vec![proxy.v4(0), proxy.v6(0)]);
    churn.wait_progress(10);

    let new = upgrade(&proxy, &pid_file, &bin.path, 1);
    churn.wait_progress(10);
    let tally = churn.finish();
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    // Only the new process is left: it answers on the metrics address.
    let page = wait_for("the new process to serve /metrics", WAIT, || {
        try_http_get(metrics, "/metrics").ok()
    });
    assert!(page.contains("flyproxy_build_info"), "{page}");

    stop_new_process(new);
}

/// `GET path` over HTTP/1.0; the whole response, which must be a 200.
fn http_get(addr: SocketAddr, path: &str) -> String {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `GET path` over HTTP/1.0: the whole response if it is a 200.
fn try_http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send the request: {e}"))?;
    let mut page = String::new();
    s.read_to_string(&mut page)
        .map_err(|e| format!("read the response: {e}"))?;
    if page.starts_with("HTTP/1.") && page.contains(" 200 ") {
        Ok(page)
    } else {
        Err(format!("not a 200: {page}"))
    }
}

/// An upgrade runs the binary now at the path, not the one the old process runs: a package
/// upgrade replaces the file (a new file renamed over the old one), then signals.
#[test]
fn upgrade_runs_the_binary_now_at_the_path() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let old_ino = exe_inode(first);

    // The new build: a file of its own, renamed over the running one.
    let staged = bin.dir.join("flyproxy.new");
    install(&staged, false);
    let new_ino = fs::metadata(&staged).unwrap().ino();
    assert_ne!(new_ino, old_ino);
    fs::rename(&staged, &bin.path).expect("rename the new build into place");

    let second = upgrade(&proxy, &pid_file, &bin.path, 1);
    assert_eq!(
        exe_inode(second),
        new_ino,
        "pid {second} does not run the binary now at {}",
        bin.path.display()
    );
    assert_eq!(
        fs::read_link(format!("/proc/{second}/exe")).unwrap(),
        bin.path
    );
    common::roundtrip(
        &mut common::connect(proxy.v4(0)),
        b"served by the new build\n",
    );
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");

    // The process that runs the new build upgrades in turn, from the same path.
    let third = upgrade(&proxy, &pid_file, &bin.path, 1);
    assert_eq!(exe_inode(third), new_ino);
    signal(third, libc::SIGTERM);
    let mut reaped = Reaped::default();
    wait_for("every generation to exit", WAIT, || {
        (reaped.gone(second) && reaped.gone(third)).then_some(())
    });
    reaped.assert_all_exited_0();
}

/// Started through a symlink (a `flyproxy -> releases/1.0/flyproxy` layout, switched to the
/// next release by repointing the link), an upgrade runs the binary the symlink names now:
/// "the binary now at the path it was started from", as the README and `flyproxy upgrade
/// --help` put it, not the file the old process happens to run.
#[test]
fn upgrade_through_a_symlink_runs_the_binary_it_names_now() {
    become_subreaper();
    let tmp = TempDir::new("upgrade-bin");
    let dir = fs::canonicalize(&tmp.path).expect("canonicalize the temp dir");
    let (v1, v2) = (dir.join("v1/flyproxy"), dir.join("v2/flyproxy"));
    install(&v1, true);
    install(&v2, false);
    let current = dir.join("flyproxy");
    std::os::unix::fs::symlink(&v1, &current).expect("symlink to v1");
    let bin = Binary {
        path: current.clone(),
        dir: dir.clone(),
        _tmp: tmp,
    };
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &[]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let v1_ino = fs::metadata(&v1).unwrap().ino();
    let v2_ino = fs::metadata(&v2).unwrap().ino();
    assert_eq!(exe_inode(first), v1_ino);

    // Switch the link to v2 atomically, then upgrade.
    let next = dir.join("flyproxy.next");
    std::os::unix::fs::symlink(&v2, &next).expect("symlink to v2");
    fs::rename(&next, &current).expect("repoint the symlink");
    let mark = proxy.mark();
    signal(first, libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "`upgrade: pid N is serving`", |l| {
        serving_pid(l).is_some() || l.contains(" upgrade failed")
    });
    let new = serving_pid(&line).unwrap_or_else(|| panic!("{line}"));
    let spawned = proxy.wait_log_since(mark, "`upgrade: started ...`", |l| {
        l.contains(" upgrade: started ")
    });
    wait_pid_file(&pid_file, new);
    let runs = fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert_eq!(
        exe_inode(new),
        v2_ino,
        "started as {} (then -> {}), the upgrade ran {} instead of what {} names now ({}); the old process logged: {spawned}",
        current.display(),
        v1.display(),
        runs.display(),
        current.display(),
        v2.display()
    );

    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    stop_new_process(new);
}

/// Make a process started now slow to start, so that a test can catch it before it serves
/// ([`Held::hold`]): the config gets 700,000 more copies of its app's target (13 MB, under the
/// 16 MiB cap; about a second to validate in a debug build). The proxy must run with a long
/// --reload-interval, so that it never reads the file itself meanwhile. (A FIFO config used to
/// block the new process for as long as a test liked; reading the config never blocks now.)
fn config_slow(proxy: &Proxy) {
    let text = fs::read_to_string(&proxy.config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let targets = json["Apps"][0]["Targets"].as_array_mut().unwrap();
    let first = targets[0].clone();
    targets.extend(std::iter::repeat_n(first, 700_000));
    proxy.rewrite_config(&serde_json::to_string(&json).unwrap());
}

/// A process stopped (SIGSTOP) while it starts, continued (SIGCONT) on `release` or drop.
struct Held(u32);

impl Held {
    /// Stop `pid` and wait until the kernel says it is stopped.
    fn hold(pid: u32) -> Held {
        signal(pid, libc::SIGSTOP);
        wait_for("the new process to be stopped", WAIT, || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            matches!(state, 'T' | 't' | 'Z').then_some(())
        });
        Held(pid)
    }

    fn release(self) {}
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: kill(2) of a process of this test (it may be gone: ESRCH is fine).
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

/// N of an `upgrade: started PATH as pid N with ...` line (logged by the old process).
fn spawned_pid(line: &str) -> Option<u32> {
    if !line.contains(" upgrade: started ") {
        return None;
    }
    line.split_once(" as pid ")?
        .1
        .split_once(' ')?
        .0
        .parse()
        .ok()
}

/// SIGUSR2 while the new process of an upgrade is still starting is ignored (one new process
/// at a time); the old one serves meanwhile, and the pending upgrade completes.
#[test]
fn sigusr2_during_an_upgrade_is_ignored() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &["--reload-interval", "1h"]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;
    let churn = Churn::start(vec![proxy.v4(0), proxy.v6(0)]);
    churn.wait_progress(10);

    config_slow(&proxy);
    let mark = proxy.mark();
    signal(first, libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "`upgrade: started ... as pid N`", |l| {
        spawned_pid(l).is_some()
    });
    let pending = spawned_pid(&line).unwrap();
    // The new process is held before it serves: the upgrade is in progress.
    let held = Held::hold(pending);
    let again = proxy.mark();
    signal(first, libc::SIGUSR2);
    proxy.wait_log_since(again, "`SIGUSR2 ignored`", |l| {
        l.contains(" WARN  SIGUSR2 ignored: an upgrade is already in progress")
    });
    churn.wait_progress(20);
    assert_eq!(read_pid(&pid_file), Some(first));
    assert!(proxy.try_status().is_none());

    held.release();
    let line = proxy.wait_log_since(mark, "`upgrade: pid N is serving`", |l| {
        serving_pid(l).is_some() || l.contains(" upgrade failed")
    });
    assert_eq!(serving_pid(&line), Some(pending), "{line}");
    wait_pid_file(&pid_file, pending);
    churn.wait_progress(10);
    let tally = churn.finish();
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    let spawned = proxy.lines_since(mark, |l| spawned_pid(l).is_some());
    assert_eq!(spawned.len(), 1, "{spawned:#?}");

    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");
    stop_new_process(pending);
}

/// SIGTERM while the new process of an upgrade is still starting stops the proxy: once the old
/// process has said `stopped` and exited, no process of it may go on to serve. (The new one
/// is held before it serves with SIGSTOP, then let go.)
#[test]
fn sigterm_during_an_upgrade_leaves_no_process_serving() {
    become_subreaper();
    let bin = Binary::new();
    let backend = Backend::echo();
    let (mut proxy, pid_file) = start_simple(&bin, 1, &backend, &["--reload-interval", "1h"]);
    let _family = bin.family(proxy.pid);
    let first = proxy.pid;

    config_slow(&proxy);
    let mark = proxy.mark();
    signal(first, libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "`upgrade: started ... as pid N`", |l| {
        spawned_pid(l).is_some()
    });
    let pending = spawned_pid(&line).unwrap();
    let held = Held::hold(pending);
    signal(first, libc::SIGTERM);
    let status = wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "{status}");

    // Let the new process go on, if it is still there: it must not serve.
    held.release();
    let mut reaped = Reaped::default();
    let deadline = Instant::now() + WAIT;
    while !reaped.gone(pending) {
        let serving = proxy.lines_since(mark, |l| {
            started_pid(l) == Some(pending) || l.contains(" upgrade: serving with ")
        });
        assert!(
            serving.is_empty(),
            "told to stop while upgrading, pid {first} exited ({status}) but left pid {pending} \
             starting, which then served the ports: {serving:#?}\n\
             pid file: {:?}",
            read_pid(&pid_file)
        );
        assert!(
            Instant::now() < deadline,
            "pid {pending} still there {WAIT:?} after pid {first} stopped"
        );
        thread::sleep(Duration::from_millis(10));
    }
    common::expect_refused(proxy.v4(0));
    assert_eq!(read_pid(&pid_file), None, "the pid file outlived the proxy");
}

/// `flyproxy upgrade` with a pid file that is missing or holds no usable pid exits 1 saying
/// why, and signals nothing.
#[test]
fn upgrade_command_without_a_usable_pid_file_exits_1() {
    let bin = Binary::new();
    let dir = TempDir::new("upgrade-cli");
    let missing = dir.path.join("missing.pid");
    let out = run_bin(&bin, &["upgrade", "--pid-file", missing.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.starts_with(&format!(
            "flyproxy: upgrade: {}: cannot read: ",
            missing.display()
        )),
        "{}",
        out.stderr
    );

    // 0 and negative numbers would signal a process group, or every process: refused.
    for content in ["", "not a pid\n", "0\n", "-1\n", "12x\n"] {
        let path = dir.write("bad.pid", content);
        let out = run_bin(&bin, &["upgrade", "--pid-file", path.to_str().unwrap()]);
        assert_eq!(out.code, Some(1), "{content:?}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{content:?}");
        assert!(
            out.stderr.starts_with(&format!(
                "flyproxy: upgrade: {}: does not hold a pid (found {:?})",
                path.display(),
                content.trim()
            )),
            "{content:?}: {}",
            out.stderr
        );
    }
}

/// Run the test's binary with `args` to completion (killed and failed after `WAIT`).
fn run_bin(bin: &Binary, args: &[&str]) -> common::Output {
    common::run_path(&bin.path, args)
}

// ---------------------------------------------------------------------------------------------
// bpftool

/// The map ids of BPF program `prog`.
fn prog_map_ids(prog: u64) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &prog.to_string()])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool prog show id {prog}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["map_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m.as_u64()).collect())
        .unwrap_or_default()
}

/// Ids of the BPF maps `pid` holds a descriptor of.
fn map_ids_held(pid: u32) -> Vec<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Issue 11, item 2: `flyproxy upgrade` signals only a flyproxy: a pid file naming another
/// process is refused, and that process gets no SIGUSR2 (which would have killed it).
#[test]
fn upgrade_refuses_to_signal_a_process_that_is_not_flyproxy() {
    let dir = TempDir::new("upgrade-pid");
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid_file = dir.write("flyproxy.pid", &format!("{}\n", sleeper.id()));
    let out = run(&["upgrade", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("is not flyproxy"), "{}", out.stderr);
    thread::sleep(Duration::from_millis(200));
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the process was signalled"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Issue 11, item 11: an upgrade does not execute a binary that group or others may write;
/// the log says why and the running proxy carries on.
#[test]
fn upgrade_refuses_a_binary_others_may_write() {
    let bin_dir = TempDir::new("bin");
    let bin = bin_dir.path.join("flyproxy");
    fs::copy(BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o777)).unwrap();
    let backend = Backend::echo();
    let port = common::free_port();
    let p = Proxy::simple()
        .bin(&bin)
        .config_on(
            &[port],
            &config(&[app("echo", &[port], &[backend.target()])]),
        )
        .start();
    p.signal(libc::SIGUSR2);
    let line = p.wait_upgrade_failed(0);
    assert!(
        line.contains("is writable by group or others (mode 777): refusing to execute it"),
        "{line}"
    );
    assert_serves_then_stops(p);
}
