//! The endpoint's HTTP side: one thread answering a few connections at once, and the client
//! `flyproxy status` uses.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{render, status, Sources};

/// A request must arrive, and the answer leave, within this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 * 1024;

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
    let too_slow = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no whole answer from {addr} within {STATUS_DEADLINE:?}"),
        )
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
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
            // This read's timeout was what was left of the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && left < IO_TIMEOUT =>
            {
                return Err(too_slow())
            }
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
}
