//! The metrics endpoint: `GET /metrics` in the Prometheus text exposition format (0.0.4) and
//! `GET /status`, a page for people (`flyproxy status` prints it).
//!
//! Served by one thread of its own, off the relay path, a few connections at once (see `serve`),
//! each with a whole-request deadline and a small request size cap: idle or slow clients cannot
//! delay a scrape, and nothing here touches accepting or relaying. Values are read
//! from the atomics the relay threads update, so a scrape takes no lock on the hot path.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::backends::backend::{Backend, ConnectError};
use crate::backends::routing::{AppRoute, Routes, UnroutedCounts};
use crate::frontend::ports::LookupReader;
use crate::relay::slots::Slots;

/// A request must arrive, and the answer leave, within this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 * 1024;

/// What the listener loop publishes for the endpoint: the routing table in force, how reloads
/// went, which config file is in force, and whether accepts are held back. Only the loop writes
/// it.
pub struct Published {
    pub routes: Mutex<Arc<Routes>>,
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// Unix time in milliseconds of the last successful (re)load.
    pub last_reload_ok_ms: AtomicU64,
    /// Which config file is in force, and which was last refused: how an operator tells which
    /// config each instance of a fleet runs.
    config_sha256: Mutex<ConfigHashes>,
    /// Accepting is held back by the connection bound.
    pub accept_paused: AtomicBool,
    /// Connections no app took (counted by the listener loop and the sessions).
    pub unrouted: Arc<UnroutedCounts>,
}

/// SHA-256 (hex, as `sha256sum` prints it) of config files' bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigHashes {
    /// The file in force.
    pub running: String,
    /// The last file rejected since the running one was loaded; cleared by the next success.
    pub rejected: Option<String>,
}

impl Published {
    /// The state at start-up: `routes` just loaded from the file hashing to `sha256`, no reload
    /// yet.
    pub fn new(routes: Arc<Routes>, sha256: String) -> Published {
        Published {
            routes: Mutex::new(routes),
            reloads_ok: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            last_reload_ok_ms: AtomicU64::new(unix_ms()),
            config_sha256: Mutex::new(ConfigHashes {
                running: sha256,
                rejected: None,
            }),
            accept_paused: AtomicBool::new(false),
            unrouted: Arc::default(),
        }
    }

    /// The config hashes now (a copy: the lock is held only for that).
    pub fn config_hashes(&self) -> ConfigHashes {
        self.config_sha256
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The file hashing to `sha256` is in force from now on (any rejection is history).
    /// `false` if it was already.
    pub fn config_file(&self, sha256: &str) -> bool {
        let mut h = self.config_sha256.lock().unwrap_or_else(|e| e.into_inner());
        let changed = h.running != sha256 || h.rejected.is_some();
        h.running = sha256.to_owned();
        h.rejected = None;
        changed
    }

    /// The routing table in force.
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A reload was applied: `routes`, from the file hashing to `sha256`, is in force from
    /// now on.
    pub fn reloaded(&self, routes: Arc<Routes>, sha256: &str) {
        *self.routes.lock().unwrap_or_else(|e| e.into_inner()) = routes;
        self.config_file(sha256);
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.last_reload_ok_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// A reload was refused: the running config stays. `sha256` names the refused file when
    /// it could be read.
    pub fn rejected(&self, sha256: Option<&str>) {
        if let Some(sha) = sha256 {
            let mut h = self.config_sha256.lock().unwrap_or_else(|e| e.into_inner());
            h.rejected = Some(sha.to_owned());
        }
        self.reloads_rejected.fetch_add(1, Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the endpoint reads.
pub struct Sources {
    pub published: Arc<Published>,
    pub slots: Arc<Slots>,
    /// The mode's lookup counters (bpf mode only).
    pub lookups: Option<LookupReader>,
}

/// The running endpoint, as the listener loop holds it.
pub struct Endpoint {
    socket: (SocketAddr, RawFd),
    handed_over: Arc<AtomicBool>,
}

impl Endpoint {
    /// The listening socket's address and descriptor, for handing over on upgrade.
    pub fn socket(&self) -> (SocketAddr, RawFd) {
        self.socket
    }

    /// A new process took the socket over (upgrade): stop serving on it.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }
}

/// Serve `addr` from a thread: on `inherited` (the socket a process we upgrade handed over),
/// or on a socket bound now, so that a bad address fails start-up.
pub fn start(
    addr: SocketAddr,
    inherited: Option<TcpListener>,
    sources: Sources,
) -> io::Result<Endpoint> {
    let listener = match inherited {
        Some(l) => l,
        None => TcpListener::bind(addr)?,
    };
    // Non-blocking: after an upgrade the other process may take a connection between our
    // poll and our accept.
    listener.set_nonblocking(true)?;
    let handed_over = Arc::new(AtomicBool::new(false));
    let endpoint = Endpoint {
        socket: (listener.local_addr()?, listener.as_raw_fd()),
        handed_over: Arc::clone(&handed_over),
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(256 * 1024)
        .spawn(move || serve(listener, &handed_over, &sources))?;
    Ok(endpoint)
}

/// Answer requests until a new process takes the socket over (upgrade). One thread serves up
/// to `MAX_CONNS` connections at once with non-blocking sockets in one `poll`, so a client that
/// connects and says nothing holds one of them for `IO_TIMEOUT` at most and never delays
/// another's answer. At the bound, a new connection takes the place of the oldest one still
/// waiting for its request: idle connections cannot keep a scraper out by filling the bound,
/// since a scraper's request arrives with its first packet and is answered at once.
///
/// Waits in `poll` with a short timeout rather than in `accept`, so that the hand-over is
/// noticed; the socket is shared with the new process, so it must not be shut down, only
/// closed here.
fn serve(listener: TcpListener, handed_over: &AtomicBool, sources: &Sources) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNS);
    while !handed_over.load(Ordering::Acquire) {
        let now = Instant::now();
        // Room for another connection: a free place, or one waiting for its request.
        let room = conns.len() < MAX_CONNS || conns.iter().any(Conn::reading);
        let mut pfds = Vec::with_capacity(conns.len() + 1);
        pfds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: if room { libc::POLLIN } else { 0 },
            revents: 0,
        });
        for c in &conns {
            pfds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: if c.reading() {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            });
        }
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .fold(HANDOVER_CHECK, Duration::min);
        let ms = wait.as_millis().clamp(1, HANDOVER_CHECK.as_millis()) as libc::c_int;
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                crate::debug!("metrics: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // Connections first (their indexes match `pfds[1..]`), then expiry, then accepting.
        for (c, pfd) in conns.iter_mut().zip(&pfds[1..]) {
            if pfd.revents != 0 {
                c.progress(sources);
            }
        }
        let now = Instant::now();
        conns.retain(|c| {
            if c.done {
                return false;
            }
            if now >= c.deadline {
                crate::debug!(
                    "metrics: {} not complete within {IO_TIMEOUT:?}; closed",
                    if c.reading() { "request" } else { "answer" }
                );
                return false;
            }
            true
        });
        if pfds[0].revents != 0 {
            accept_some(&listener, &mut conns, sources);
        }
    }
}

/// Accept what is waiting, within the bound (replacing the oldest connection still waiting
/// for its request when full).
fn accept_some(listener: &TcpListener, conns: &mut Vec<Conn>, sources: &Sources) {
    loop {
        if conns.len() >= MAX_CONNS {
            let oldest = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.reading())
                .min_by_key(|(_, c)| c.accepted)
                .map(|(i, _)| i);
            let Some(i) = oldest else { return };
            // Accept first: if nothing is waiting (another process took it), keep the old one.
            match accept_one(listener) {
                Some(conn) => {
                    crate::debug!(
                        "metrics: at {MAX_CONNS} connections: closed the oldest idle one"
                    );
                    conns[i] = conn;
                    conns[i].progress(sources);
                    conns.retain(|c| !c.done);
                    continue;
                }
                None => return,
            }
        }
        match accept_one(listener) {
            Some(mut conn) => {
                // The request usually came with the handshake's last packet: answer now.
                conn.progress(sources);
                if !conn.done {
                    conns.push(conn);
                }
            }
            None => return,
        }
    }
}

fn accept_one(listener: &TcpListener) -> Option<Conn> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // The socket is shared, and accepted sockets do not inherit O_NONBLOCK anyway:
                // be explicit.
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let now = Instant::now();
                return Some(Conn {
                    stream,
                    accepted: now,
                    deadline: now + IO_TIMEOUT,
                    request: Vec::new(),
                    answer: None,
                    done: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            // The client gave up already: try the next one.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            // Out of descriptors or the like: do not spin; the next poll retries.
            Err(e) => {
                crate::debug!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return None;
            }
        }
    }
}

/// How often the serving loop checks whether a new process took the socket over.
const HANDOVER_CHECK: Duration = Duration::from_millis(250);

/// Connections served at once (see `serve`).
const MAX_CONNS: usize = 4;

/// Descriptors the endpoint may hold at once: its connections and its listener.
pub const FDS: u64 = MAX_CONNS as u64 + 1;

/// One connection to the endpoint: reading its request, then writing its answer.
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    /// The request must be complete by then; once answering, the answer must be sent by then.
    deadline: Instant,
    request: Vec<u8>,
    /// The answer and how much of it is sent.
    answer: Option<(Vec<u8>, usize)>,
    done: bool,
}

impl Conn {
    fn reading(&self) -> bool {
        self.answer.is_none()
    }

    /// Read what has arrived, answer a complete request, write what the socket takes.
    fn progress(&mut self, sources: &Sources) {
        if let Err(e) = self.step(sources) {
            crate::debug!("metrics: request failed: {e}");
            self.done = true;
        }
    }

    fn step(&mut self, sources: &Sources) -> io::Result<()> {
        let mut chunk = [0u8; 1024];
        while self.answer.is_none() {
            let complete = head_end(&self.request).is_some();
            if complete || self.request.len() > MAX_REQUEST {
                self.answer = Some((answer(&self.request, sources), 0));
                self.deadline = Instant::now() + IO_TIMEOUT;
                break;
            }
            match self.stream.read(&mut chunk) {
                // Closed before a whole request: it gets the answer to what it sent.
                Ok(0) => {
                    self.answer = Some((answer(&self.request, sources), 0));
                    self.deadline = Instant::now() + IO_TIMEOUT;
                }
                Ok(n) => self.request.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let Some((out, sent)) = self.answer.as_mut() else {
            return Ok(());
        };
        while *sent < out.len() {
            match self.stream.write(&out[*sent..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.done = true;
        Ok(())
    }
}

/// Where the request head ends (the index of the line break that ends its blank line's
/// predecessor), accepting bare LF line ends as well as CRLF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + nl;
        let next = &buf[at + 1..];
        if next.first() == Some(&b'\n') || next.starts_with(b"\r\n") {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// The whole answer (head and body) to `request`.
fn answer(request: &[u8], sources: &Sources) -> Vec<u8> {
    let line = head_end(request)
        .and_then(|i| std::str::from_utf8(&request[..i]).ok())
        .and_then(|h| h.lines().next())
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (status, ctype, body) = match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => {
            match path.split('?').next().unwrap_or("") {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(sources),
                ),
                "/status" => ("200 OK", "text/plain; charset=utf-8", status(sources)),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics or /status\n".into(),
                ),
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            ("405 Method Not Allowed", "text/plain", "only GET\n".into())
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// An app's backends, each once: a target listed twice is one backend with two turns, and
/// must be one series (a duplicate series makes Prometheus reject the whole scrape).
fn unique_backends(app: &AppRoute) -> Vec<&Arc<Backend>> {
    let mut seen: Vec<&Arc<Backend>> = Vec::with_capacity(app.backends.len());
    for b in &app.backends {
        if !seen.iter().any(|s| Arc::ptr_eq(s, b)) {
            seen.push(b);
        }
    }
    seen
}
/// A label value escaped as the exposition format asks: backslash, double quote, newline.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", esc(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The whole exposition, from the current routing table and counters.
pub fn render(sources: &Sources) -> String {
    let Sources {
        published,
        slots,
        lookups,
    } = sources;
    let routes = published.routes();
    let apps = routes.apps();
    let mut out = String::with_capacity(4096);
    build_info(&mut out);
    app_families(&mut out, apps);
    target_families(&mut out, apps);
    reload_families(&mut out, published);
    bound_families(&mut out, slots, published);
    log_families(&mut out);
    unrouted_families(&mut out, published);
    if let Some(read) = lookups {
        lookup_families(&mut out, read);
    }
    out
}

/// Apps in force, each with its ports.
type Apps = [(Arc<AppRoute>, Vec<u16>)];

fn build_info(out: &mut String) {
    let mut f = Family::head(out, "flyproxy_build_info", "gauge", "The running version.");
    f.sample(
        "flyproxy_build_info",
        &[("version", crate::cli::VERSION)],
        1,
    );
}

/// Client connections by app: accepted, open, refused.
fn app_families(out: &mut String, apps: &Apps) {
    macro_rules! per_app {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(out, $name, $kind, $help);
            for (app, _) in apps {
                f.sample($name, &[("app", app.name.as_str())], $get(&app.stats));
            }
        }};
    }
    per_app!(
        "flyproxy_app_connections_total",
        "counter",
        "Client connections accepted, by app.",
        |s: &crate::backends::routing::AppStats| s.accepted.load(Ordering::Relaxed)
    );
    per_app!(
        "flyproxy_app_connections_active",
        "gauge",
        "Client connections open now (connecting or relaying), by app.",
        |s: &crate::backends::routing::AppStats| s.active.load(Ordering::Relaxed)
    );
    let name = "flyproxy_app_connections_refused_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Client connections closed without a target: reason=\"connect_failed\" (no target answered), \"limit\" (the app's MaxConnections) or \"client_limit\" (the client address had its limit of connections open).",
    );
    for (app, _) in apps {
        let s = &app.stats;
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "connect_failed")],
            s.failed.load(Ordering::Relaxed),
        );
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "limit")],
            s.limited.load(Ordering::Relaxed),
        );
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "client_limit")],
            s.client_limited.load(Ordering::Relaxed),
        );
    }
}

/// Connections to targets by app and target: made, open, health, bytes, failures.
fn target_families(out: &mut String, apps: &Apps) {
    macro_rules! per_target {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(out, $name, $kind, $help);
            for (app, _) in apps {
                for b in unique_backends(app) {
                    let t = b.target.to_string();
                    f.sample(
                        $name,
                        &[("app", app.name.as_str()), ("target", t.as_str())],
                        $get(b),
                    );
                }
            }
        }};
    }
    per_target!(
        "flyproxy_connections_total",
        "counter",
        "Connections made to a target, by app and target.",
        |b: &crate::backends::backend::Backend| b.connections.load(Ordering::Relaxed)
    );
    per_target!(
        "flyproxy_connections_active",
        "gauge",
        "Connections to a target open now, by app and target.",
        |b: &crate::backends::backend::Backend| b.active.load(Ordering::Relaxed)
    );
    per_target!(
        "flyproxy_target_up",
        "gauge",
        "1 if the target is considered up (passive and active health checks), else 0.",
        |b: &crate::backends::backend::Backend| u8::from(b.is_up())
    );
    let name = "flyproxy_bytes_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Bytes relayed, by app, target and direction.",
    );
    for (app, _) in apps {
        for b in unique_backends(app) {
            let t = b.target.to_string();
            for (dir, v) in [
                ("client_to_target", &b.bytes_up),
                ("target_to_client", &b.bytes_down),
            ] {
                f.sample(
                    name,
                    &[
                        ("app", app.name.as_str()),
                        ("target", t.as_str()),
                        ("direction", dir),
                    ],
                    v.load(Ordering::Relaxed),
                );
            }
        }
    }
    let name = "flyproxy_connect_failures_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Failed connects to a target, by app, target and reason.",
    );
    for (app, _) in apps {
        for b in unique_backends(app) {
            let t = b.target.to_string();
            for (i, reason) in ConnectError::REASONS.iter().enumerate() {
                f.sample(
                    name,
                    &[
                        ("app", app.name.as_str()),
                        ("target", t.as_str()),
                        ("reason", reason),
                    ],
                    b.failures[i].load(Ordering::Relaxed),
                );
            }
        }
    }
}

/// How config reloads went.
fn reload_families(out: &mut String, published: &Published) {
    let name = "flyproxy_reloads_total";
    let mut f = Family::head(out, name, "counter", "Config reloads, by result.");
    f.sample(
        name,
        &[("result", "ok")],
        published.reloads_ok.load(Ordering::Relaxed),
    );
    f.sample(
        name,
        &[("result", "rejected")],
        published.reloads_rejected.load(Ordering::Relaxed),
    );
    let name = "flyproxy_config_last_reload_success_timestamp_seconds";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Unix time of the last config load or reload that was applied.",
    );
    f.sample(
        name,
        &[],
        published.last_reload_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0,
    );
    let hashes = published.config_hashes();
    let name = "flyproxy_config_info";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "The config in force, named by the SHA-256 of its file's bytes (compare across a fleet).",
    );
    f.sample(name, &[("sha256", hashes.running.as_str())], 1);
    if let Some(rejected) = &hashes.rejected {
        let name = "flyproxy_config_rejected_info";
        let mut f = Family::head(
            out,
            name,
            "gauge",
            "The last config file rejected since the one in force was loaded, by SHA-256.",
        );
        f.sample(name, &[("sha256", rejected.as_str())], 1);
    }
}

/// The connection bound and how full it is.
fn bound_families(out: &mut String, slots: &Slots, published: &Published) {
    let name = "flyproxy_connections_limit";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "The connection bound in force (--max-connections, lowered to fit the open-file limit).",
    );
    f.sample(name, &[], slots.max());
    let name = "flyproxy_connections_open";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "Client connections holding a slot of the bound now.",
    );
    f.sample(name, &[], slots.taken());
    let name = "flyproxy_accept_paused";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "1 while the connection bound holds accepts back, else 0.",
    );
    f.sample(
        name,
        &[],
        u8::from(published.accept_paused.load(Ordering::Relaxed)),
    );
}

fn log_families(out: &mut String) {
    let name = "flyproxy_log_lines_dropped_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Log lines dropped because stderr could not keep up.",
    );
    f.sample(name, &[], crate::ops::log::dropped());
}

/// Connections no app took, by port and reason; only once there is something to count, as a
/// family without samples is noise (most configs never refuse a connection this way).
fn unrouted_families(out: &mut String, published: &Published) {
    let unrouted = published.unrouted.snapshot();
    if unrouted.is_empty() {
        return;
    }
    let name = "flyproxy_unrouted_connections_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "Connections no app took, by port and reason: no_app (no app on the dialled address), no_server_name, unknown_server_name, not_tls, too_large (where apps have Hostnames and none is without), preread_timeout, client_closed.",
    );
    for ((port, why), n) in unrouted {
        let port = port.to_string();
        f.sample(
            name,
            &[("port", port.as_str()), ("reason", why.as_str())],
            n,
        );
    }
}

/// sk_lookup verdicts (bpf mode).
fn lookup_families(out: &mut String, read: &LookupReader) {
    let name = "flyproxy_bpf_lookups_total";
    let mut f = Family::head(
        out,
        name,
        "counter",
        "sk_lookup verdicts for configured ports, by port group (app): steered to our listener, or dropped (listener missing).",
    );
    for g in read() {
        f.sample(
            name,
            &[("group", g.group.as_str()), ("verdict", "steered")],
            g.steered,
        );
        f.sample(
            name,
            &[("group", g.group.as_str()), ("verdict", "dropped")],
            g.dropped,
        );
    }
}

/// A page for people: each app, its ports, its targets with health and open connections.
pub fn status(sources: &Sources) -> String {
    let Sources {
        published, slots, ..
    } = sources;
    let routes = published.routes();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flyproxy {}: {} of {} connection slots in use{}, reloads ok={} rejected={}",
        crate::cli::VERSION,
        slots.taken(),
        slots.max(),
        if published.accept_paused.load(Ordering::Relaxed) {
            " (accepts paused)"
        } else {
            ""
        },
        published.reloads_ok.load(Ordering::Relaxed),
        published.reloads_rejected.load(Ordering::Relaxed),
    );
    let hashes = published.config_hashes();
    let _ = writeln!(
        out,
        "config sha256 {}{}",
        hashes.running,
        hashes
            .rejected
            .map(|r| format!(" (last rejected: {r})"))
            .unwrap_or_default()
    );
    for (app, ports) in routes.apps() {
        let shown: Vec<String> = ports.iter().take(12).map(u16::to_string).collect();
        let more = ports.len().saturating_sub(12);
        let _ = writeln!(
            out,
            "\napp {}  ports {}{}  open {}  accepted {}",
            app.name,
            shown.join(","),
            if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            },
            app.stats.active.load(Ordering::Relaxed),
            app.stats.accepted.load(Ordering::Relaxed),
        );
        // Where the app answers, when it is more specific than every address of its ports.
        let show = |items: Vec<String>| {
            let n = items.len();
            let mut s = items.into_iter().take(8).collect::<Vec<_>>().join(",");
            if n > 8 {
                s.push_str(&format!(" (+{} more)", n - 8));
            }
            s
        };
        if !app.addresses.is_empty() {
            let shown = show(app.addresses.iter().map(|a| a.to_string()).collect());
            let _ = writeln!(out, "  addresses {shown}");
        }
        if !app.hostnames.is_empty() {
            let shown = show(app.hostnames.iter().map(|h| h.to_string()).collect());
            let _ = writeln!(out, "  hostnames {shown}");
        }
        for b in unique_backends(app) {
            let _ = writeln!(
                out,
                "  {:<40} {:<4} open {:<6} total {}",
                b.target.to_string(),
                if b.is_up() { "up" } else { "DOWN" },
                b.active.load(Ordering::Relaxed),
                b.connections.load(Ordering::Relaxed),
            );
        }
    }
    out
}

/// The largest answer `flyproxy status` takes (100,000 apps make a status page of about
/// 14 MB), and how long the whole answer may take: whatever listens at the address given
/// (a wrong one, or not a flyproxy) must not make the command grow without bound or wait for
/// ever on a trickle.
const STATUS_MAX_BYTES: usize = 64 << 20;
const STATUS_DEADLINE: Duration = Duration::from_secs(10);

/// `flyproxy status`: fetch the /status page from a running proxy.
pub fn fetch_status(addr: SocketAddr) -> io::Result<String> {
    let deadline = Instant::now() + STATUS_DEADLINE;
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: flyproxy\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole answer from {addr} within {STATUS_DEADLINE:?}"),
            ));
        }
        s.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if buf.len() + n > STATUS_MAX_BYTES => {
                return Err(io::Error::other(format!(
                    "the answer from {addr} is larger than {} MiB",
                    STATUS_MAX_BYTES >> 20
                )))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let resp = String::from_utf8(buf)
        .map_err(|_| io::Error::other(format!("unexpected answer from {addr}")))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(io::Error::other(format!("unexpected answer from {addr}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_end_with_crlf_or_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\n"), Some(22));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn label_escaping() {
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
    }
}
