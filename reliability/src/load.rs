//! The clients: short connections, bulk streams, PROXY-protocol connections, failover traffic,
//! and the two kinds of resets. Every connection's echo is checked byte for byte; every
//! failure is classified as expected (a fault of ours overlapped it) or not.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::chaos::{BULK_PORTS, FAILOVER_PORTS, PP_PORTS, RESET_PORT, SHORT_PORTS};
use crate::procs::{set_linger_zero, Rng};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct Stats {
    pub short_ok: AtomicU64,
    pub short_fail: AtomicU64,
    pub pp_ok: AtomicU64,
    pub pp_fail: AtomicU64,
    pub bulk_conns: AtomicU64,
    pub bulk_fail: AtomicU64,
    /// Payload bytes sent up and verified back down, by bulk streams.
    pub bulk_bytes: AtomicU64,
    /// Payload bytes (each way) of every other connection.
    pub small_bytes: AtomicU64,
    pub fo_ok: AtomicU64,
    pub fo_fail_expected: AtomicU64,
    pub fo_fail_unexpected: AtomicU64,
    pub be_resets: AtomicU64,
    pub be_reset_not_passed: AtomicU64,
    pub cl_resets: AtomicU64,
    pub kills: AtomicU64,
}

impl Stats {
    pub fn ok(&self) -> u64 {
        self.short_ok.load(Ordering::Relaxed)
            + self.pp_ok.load(Ordering::Relaxed)
            + self.bulk_conns.load(Ordering::Relaxed)
            + self.fo_ok.load(Ordering::Relaxed)
    }
    /// Connections that failed and should not have.
    pub fn unexpected(&self) -> u64 {
        self.short_fail.load(Ordering::Relaxed)
            + self.pp_fail.load(Ordering::Relaxed)
            + self.bulk_fail.load(Ordering::Relaxed)
            + self.fo_fail_unexpected.load(Ordering::Relaxed)
            + self.be_reset_not_passed.load(Ordering::Relaxed)
    }
    pub fn faults(&self) -> u64 {
        self.kills.load(Ordering::Relaxed)
            + self.be_resets.load(Ordering::Relaxed)
            + self.cl_resets.load(Ordering::Relaxed)
    }
}

pub struct Ctx {
    pub stop: AtomicBool,
    /// The config chaos has done its rewrites (or there is none).
    pub chaos_done: AtomicBool,
    pub conn_target: u64,
    /// Bulk payload bytes to push (each way).
    pub bulk_target: u64,
    pub deadline: Instant,
    pub stats: Stats,
    /// [kill sent, process reaped] of every backend kill: a failover connection that failed
    /// is expected to if its life overlaps one.
    /// (None: the kill is under way).
    pub kills: Mutex<Vec<(Instant, Option<Instant>)>>,
    /// The first unexpected failures, for the report.
    pub failures: Mutex<Vec<String>>,
    /// Where the proxy listens: 127.0.0.1 on the configured ports (bpf: steered to it).
    pub host: IpAddr,
}

impl Ctx {
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
    pub fn conns_done(&self) -> bool {
        self.stats.ok() >= self.conn_target
    }
    pub fn bulk_done(&self) -> bool {
        self.stats.bulk_bytes.load(Ordering::Relaxed) >= self.bulk_target
    }
    /// Both targets met and the chaos over: the side scenarios stop too.
    pub fn all_done(&self) -> bool {
        self.stopped()
            || (self.conns_done() && self.bulk_done() && self.chaos_done.load(Ordering::Relaxed))
    }
    pub fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 50 {
            eprintln!("UNEXPECTED: {what}");
            f.push(what);
        }
    }
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.host, port)
    }
    fn overlaps_kill(&self, from: Instant, to: Instant) -> bool {
        self.kills
            .lock()
            .unwrap()
            .iter()
            .any(|(a, b)| *a <= to && b.is_none_or(|b| b >= from))
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn fill(rng: &mut Rng, buf: &mut Vec<u8>, len: usize) {
    buf.clear();
    while buf.len() < len {
        buf.extend_from_slice(&rng.next().to_le_bytes());
    }
    buf.truncate(len);
}

fn small_size(rng: &mut Rng) -> usize {
    match rng.range(0, 100) {
        0..=69 => rng.range(1, 256) as usize,
        70..=94 => rng.range(256, 8192) as usize,
        _ => rng.range(8192, 131_072) as usize,
    }
}

/// One echo exchange: send `msg`, half-close, read everything back until EOF.
fn exchange(addr: SocketAddr, msg: &[u8], got: &mut Vec<u8>) -> io::Result<TcpStream> {
    let mut s = connect(addr)?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    got.clear();
    s.read_to_end(got)?;
    Ok(s)
}

/// Short connections to the short app (and one in ten to the PROXY-protocol app), until the
/// connection target is met and the config chaos is over (it must run under load).
pub fn short_loop(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let (mut msg, mut got) = (Vec::new(), Vec::new());
    while !(ctx.stopped() || ctx.conns_done() && ctx.chaos_done.load(Ordering::Relaxed)) {
        let len = small_size(&mut rng);
        fill(&mut rng, &mut msg, len);
        if rng.chance(10) {
            let port = *rng.pick(&PP_PORTS);
            match exchange(ctx.addr(port), &msg, &mut got)
                .and_then(|s| check_pp(&s, port, &msg, &got))
            {
                Ok(()) => {
                    ctx.stats.pp_ok.fetch_add(1, Ordering::Relaxed);
                    ctx.stats
                        .small_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    ctx.stats.pp_fail.fetch_add(1, Ordering::Relaxed);
                    ctx.fail(format!("pp port {port}: {e}"));
                }
            }
            continue;
        }
        let port = *rng.pick(&SHORT_PORTS);
        match exchange(ctx.addr(port), &msg, &mut got) {
            Ok(_) if got == msg => {
                ctx.stats.short_ok.fetch_add(1, Ordering::Relaxed);
                ctx.stats
                    .small_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            Ok(_) => {
                ctx.stats.short_fail.fetch_add(1, Ordering::Relaxed);
                ctx.fail(format!(
                    "short port {port}: sent {len} bytes, got back {} different ones",
                    got.len()
                ));
            }
            Err(e) => {
                ctx.stats.short_fail.fetch_add(1, Ordering::Relaxed);
                ctx.fail(format!("short port {port}: {e} ({len} bytes)"));
            }
        }
    }
}

/// The echo of a PROXY-protocol connection is the header the proxy sent, then the bytes: the
/// header must name this connection's client and the port it dialled.
fn check_pp(s: &TcpStream, port: u16, msg: &[u8], got: &[u8]) -> io::Result<()> {
    let bad = |m: String| Err(io::Error::other(m));
    let local = s.local_addr()?;
    let (src, dst, hlen) = if let Some(rest) = got.strip_prefix(b"PROXY ") {
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return bad("v1 header without CRLF".into());
        };
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        let f: Vec<&str> = line.split(' ').collect();
        let [_, s, d, sp, dp] = f.as_slice() else {
            return bad(format!("v1 header {line:?}"));
        };
        let parse = |a: &str, p: &str| -> Option<SocketAddr> {
            Some(SocketAddr::new(a.parse().ok()?, p.parse().ok()?))
        };
        match (parse(s, sp), parse(d, dp)) {
            (Some(s), Some(d)) => (s, d, 6 + end + 2),
            _ => return bad(format!("v1 header {line:?}")),
        }
    } else if got.len() >= 16 && got[..12] == *b"\r\n\r\n\0\r\nQUIT\n" {
        let len = u16::from_be_bytes([got[14], got[15]]) as usize;
        if got.len() < 16 + len || got[12] != 0x21 {
            return bad(format!("v2 header {:?}", &got[..16]));
        }
        let b = &got[16..16 + len];
        let p = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        match got[13] {
            0x11 if len >= 12 => (
                SocketAddr::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(), p(8)),
                SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(), p(10)),
                16 + len,
            ),
            0x21 if len >= 36 => (
                SocketAddr::new(
                    Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap()).into(),
                    p(32),
                ),
                SocketAddr::new(
                    Ipv6Addr::from(<[u8; 16]>::try_from(&b[16..32]).unwrap()).into(),
                    p(34),
                ),
                16 + len,
            ),
            f => return bad(format!("v2 family {f:#x}")),
        }
    } else {
        return bad(format!("no PROXY header: {:?}", &got[..got.len().min(16)]));
    };
    if src != local {
        return bad(format!("header says client {src}, the client is {local}"));
    }
    if dst != SocketAddr::new(local.ip(), port) {
        return bad(format!("header says frontend {dst}, dialled port {port}"));
    }
    if &got[hlen..] != msg {
        return bad(format!(
            "echo after the header differs ({} vs {} bytes)",
            got.len() - hlen,
            msg.len()
        ));
    }
    Ok(())
}

/// The bulk payload: a pattern whose period does not divide any buffer size, so that a byte
/// lost, doubled or misplaced anywhere shows.
const PERIOD: usize = (1 << 20) + 13;
const CHUNK: usize = 256 * 1024;
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut rng = Rng::new(42);
        let mut v = Vec::with_capacity(2 * PERIOD + 8);
        while v.len() < PERIOD {
            v.extend_from_slice(&rng.next().to_le_bytes());
        }
        v.truncate(PERIOD);
        let copy = v.clone();
        v.extend_from_slice(&copy);
        v
    })
}

/// One long stream: `segment` bytes up, each verified as it comes back, then a clean close;
/// again until the bulk target is met.
pub fn bulk_loop(ctx: &Ctx, stream: usize, segment: u64) {
    let port = BULK_PORTS[stream % BULK_PORTS.len()];
    let pat = pattern();
    let mut failures = 0;
    while !ctx.stopped() && !ctx.bulk_done() && failures < 20 {
        // Near the target, shorter segments, so that the streams do not overshoot it by much.
        let left = ctx
            .bulk_target
            .saturating_sub(ctx.stats.bulk_bytes.load(Ordering::Relaxed));
        let segment = segment.min((left / BULK_PORTS.len() as u64).max(64 << 20));
        let r = (|| -> io::Result<u64> {
            let s = connect(ctx.addr(port))?;
            let mut w = s.try_clone()?;
            let writer = std::thread::spawn(move || -> io::Result<()> {
                let (mut sent, mut off) = (0u64, 0usize);
                while sent < segment {
                    let n = CHUNK.min((segment - sent) as usize);
                    w.write_all(&pat[off..off + n])?;
                    off = (off + n) % PERIOD;
                    sent += n as u64;
                }
                w.shutdown(Shutdown::Write)
            });
            let mut r = s;
            let mut buf = vec![0u8; CHUNK];
            let (mut got, mut off, mut unreported) = (0u64, 0usize, 0u64);
            let res = loop {
                let n = match r.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                };
                if buf[..n] != pat[off..off + n] {
                    break Err(io::Error::other(format!("corrupt bytes at offset {got}")));
                }
                off = (off + n) % PERIOD;
                got += n as u64;
                unreported += n as u64;
                if unreported >= 64 << 20 {
                    ctx.stats
                        .bulk_bytes
                        .fetch_add(unreported, Ordering::Relaxed);
                    unreported = 0;
                }
            };
            ctx.stats
                .bulk_bytes
                .fetch_add(unreported, Ordering::Relaxed);
            let w = writer
                .join()
                .map_err(|_| io::Error::other("writer panicked"))?;
            res?;
            w?;
            if got != segment {
                return Err(io::Error::other(format!("sent {segment}, got back {got}")));
            }
            Ok(got)
        })();
        match r {
            Ok(_) => {
                ctx.stats.bulk_conns.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failures += 1;
                ctx.stats.bulk_fail.fetch_add(1, Ordering::Relaxed);
                ctx.fail(format!("bulk stream {stream} port {port}: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connections to the failover app, each held open for a while, so that kills hit some.
pub fn failover_loop(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let (mut msg, mut got) = (Vec::new(), Vec::new());
    while !ctx.all_done() {
        let len = rng.range(1, 65_536) as usize;
        fill(&mut rng, &mut msg, len);
        let port = *rng.pick(&FAILOVER_PORTS);
        let hold = Duration::from_millis(rng.range(0, 150));
        let t0 = Instant::now();
        let r = (|| -> io::Result<()> {
            let mut s = connect(ctx.addr(port))?;
            let (a, b) = msg.split_at(len / 2);
            s.write_all(a)?;
            std::thread::sleep(hold);
            s.write_all(b)?;
            s.shutdown(Shutdown::Write)?;
            got.clear();
            s.read_to_end(&mut got)?;
            if got != msg {
                return Err(io::Error::other(format!(
                    "sent {len}, got back {} bytes",
                    got.len()
                )));
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                ctx.stats.fo_ok.fetch_add(1, Ordering::Relaxed);
                ctx.stats
                    .small_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if ctx.overlaps_kill(t0, Instant::now()) {
                    ctx.stats.fo_fail_expected.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.stats.fo_fail_unexpected.fetch_add(1, Ordering::Relaxed);
                    ctx.fail(format!("failover port {port}: {e} (no kill during it)"));
                }
            }
        }
    }
}

/// Backend resets: the resetter app's backend resets each connection; the client must see a
/// reset too (README: "A reset on one side is passed on as a reset on the other").
pub fn backend_reset_loop(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut msg = Vec::new();
    while !ctx.all_done() {
        let len = rng.range(1, 2048) as usize;
        fill(&mut rng, &mut msg, len);
        let r = (|| -> io::Result<usize> {
            let mut s = connect(ctx.addr(RESET_PORT))?;
            s.write_all(&msg)?;
            let mut buf = [0u8; 4096];
            let mut total = 0;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(total),
                    n => total += n,
                }
            }
        })();
        ctx.stats.be_resets.fetch_add(1, Ordering::Relaxed);
        match r {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(n) => {
                ctx.stats
                    .be_reset_not_passed
                    .fetch_add(1, Ordering::Relaxed);
                ctx.fail(format!(
                    "backend reset arrived as a clean close after {n} bytes"
                ));
            }
            Err(e) => {
                ctx.stats
                    .be_reset_not_passed
                    .fetch_add(1, Ordering::Relaxed);
                ctx.fail(format!("backend reset: the client saw {e}, not a reset"));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.range(1, 6)));
    }
}

/// Client resets: send up to 256 KiB to the short app, maybe read some of the echo, then reset.
/// Nothing to check here; the leak checks at the end (no connection left open, fds, threads)
/// say whether the proxy cleaned up.
pub fn client_reset_loop(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut msg = Vec::new();
    while !ctx.all_done() {
        let len = rng.range(1, 262_144) as usize;
        fill(&mut rng, &mut msg, len);
        let port = *rng.pick(&SHORT_PORTS);
        if let Ok(mut s) = connect(ctx.addr(port)) {
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
            let cut = rng.range(0, len as u64 + 1) as usize;
            let _ = s.write_all(&msg[..cut]);
            if rng.chance(50) {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
            }
            set_linger_zero(&s);
            ctx.stats.cl_resets.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.stats.short_fail.fetch_add(1, Ordering::Relaxed);
            ctx.fail(format!("client-reset connect to port {port} failed"));
        }
        std::thread::sleep(Duration::from_millis(rng.range(1, 6)));
    }
}
