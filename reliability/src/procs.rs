//! Processes: spawning children that die with us, reading /proc, fetching /metrics; and small
//! shared helpers (a PRNG, a connect with retry).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// xorshift64*: fast, seedable, good enough to pick ports and sizes.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..hi (hi exclusive, hi > lo).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next() as usize % v.len()]
    }
}

/// Spawns every child from one long-lived thread: PR_SET_PDEATHSIG fires when the thread that
/// forked dies, so children started from short-lived threads would be killed with them. With
/// it, every child is killed if this process dies in any way.
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<(Command, mpsc::Sender<io::Result<Child>>)>,
}

impl Spawner {
    pub fn new() -> Spawner {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<io::Result<Child>>)>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_tied(&mut cmd));
                }
                // Keep this thread (the children's parent thread) alive until the process ends.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawner thread");
        Spawner { tx }
    }

    pub fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send((cmd, tx))
            .map_err(|_| io::Error::other("spawner gone"))?;
        rx.recv().map_err(|_| io::Error::other("spawner gone"))?
    }
}

/// Spawn `cmd` so that it gets SIGKILL when the calling thread dies.
pub fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

pub fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// What /proc says about a process: descriptors by kind, threads, resident memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sockets: usize,
    pub pipes: usize,
    /// anon_inode (epoll, eventfd, signalfd, bpf maps, programs and links) and files.
    pub other: usize,
    pub threads: usize,
    /// Of `threads`, those of the relay pool (named `relay-N`), which expire when idle.
    pub relay_threads: usize,
    /// The names of the other threads, sorted.
    pub named: Vec<String>,
    pub rss_kib: u64,
}

impl Snapshot {
    pub fn fds(&self) -> usize {
        self.sockets + self.pipes + self.other
    }
}

pub fn snapshot(pid: u32) -> io::Result<Snapshot> {
    let mut s = Snapshot::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(e) = e else { continue };
        match std::fs::read_link(e.path()) {
            Ok(t) => {
                let t = t.to_string_lossy();
                if t.starts_with("socket:") {
                    s.sockets += 1;
                } else if t.starts_with("pipe:") {
                    s.pipes += 1;
                } else {
                    s.other += 1;
                }
            }
            // Closed between the listing and the readlink.
            Err(_) => continue,
        }
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            match std::fs::read_to_string(t.path().join("comm")) {
                Ok(c) if c.starts_with("relay-") => s.relay_threads += 1,
                Ok(c) => s.named.push(c.trim().to_owned()),
                Err(_) => {}
            }
        }
    }
    s.named.sort();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Threads:") {
            s.threads = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("VmRSS:") {
            s.rss_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    Ok(s)
}

/// The proxy's /metrics, parsed: sample (name with labels, as written) to value.
#[derive(Debug, Default, Clone)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn fetch(addr: SocketAddr) -> io::Result<Metrics> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, body) = body
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other("no HTTP head"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("metrics: {head}")));
        }
        let mut m = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            if let Some((k, v)) = line.rsplit_once(' ') {
                if let Ok(v) = v.parse() {
                    m.insert(k.to_owned(), v);
                }
            }
        }
        Ok(Metrics(m))
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` pieces).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                let base = k.split('{').next().unwrap_or("");
                base == name && labels.iter().all(|l| k.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The values of label `label` over the samples of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .0
            .keys()
            .filter(|k| k.split('{').next() == Some(name))
            .filter_map(|k| {
                let pat = format!("{label}=\"");
                let start = k.find(&pat)? + pat.len();
                let end = start + k[start..].find('"')?;
                Some(k[start..end].to_owned())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Wait until `addr` accepts a connection.
pub fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Set SO_LINGER to {on, 0}: close() then sends a reset.
pub fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Raise the open-file soft limit to the hard limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}
