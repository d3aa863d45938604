//! The endpoint's HTTP side: one thread answering a few connections at once, what each path
//! serves, and which connection gives way when they are all taken.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::exposition::render_app;
use crate::metrics::page::{html, refresh_of};
use crate::metrics::query::{self, Query};
use crate::metrics::status::{snapshot, text, Status};
use crate::metrics::{render, Sources};

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
/// to `MAX_CONNS` connections at once with non-blocking sockets in one `poll`, each with a
/// deadline for its request and then for its answer, so no client holds a place for long and
/// none delays another's answer. When every place is taken, `victim` says which connection
/// gives way to a new one.
///
/// Waits in `poll` with a short timeout rather than in `accept`, so that the hand-over is
/// noticed; the socket is shared with the new process, so it must not be shut down, only
/// closed here.
fn serve(listener: TcpListener, handed_over: &AtomicBool, sources: &Sources) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNS);
    while !handed_over.load(Ordering::Acquire) {
        let now = Instant::now();
        // Room for another connection: a free place, or one that may give way.
        let room = conns.len() < MAX_CONNS || victim(&conns, now).is_some();
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
        // Wake for the next deadline, and (when full) for the moment an answer counts as
        // stalled, since a new connection may be waiting for that place.
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .chain(
                conns
                    .iter()
                    .filter(|_| !room)
                    .map(|c| (c.last_progress + STALL).saturating_duration_since(now)),
            )
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
        let mut answers = Answers::default();
        // Connections first (their indexes match `pfds[1..]`), then expiry, then accepting.
        for (c, pfd) in conns.iter_mut().zip(&pfds[1..]) {
            if pfd.revents != 0 {
                c.progress(sources, &mut answers);
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
                c.abort();
                return false;
            }
            true
        });
        if pfds[0].revents != 0 {
            accept_some(&listener, &mut conns, sources, &mut answers);
        }
    }
}

/// How long an answer may go without its client taking any of it before its place may go to
/// a new connection. Long enough for a scraper that is reading to be woken and read again on
/// a loaded machine; short enough that a scrape waiting in the listen backlog behind
/// connections that never read is still answered well within a second.
const STALL: Duration = Duration::from_millis(100);

/// Which connection gives way to a new one when every place is taken, if any may; thinking of
/// what a client can do with the few places:
/// - A connection still waiting for its request (it says nothing, or trickles its request)
///   goes first, the oldest first: a scraper's request arrives with its first packet and is
///   answered at once, so a scraper is never in this state for long.
/// - Then an answer its client has taken nothing of for `STALL`, the longest stalled first. A
///   client that never reads stalls as soon as the socket buffers are full; one that reads a
///   byte a second stalls as well (the socket reports room only once a good part of its buffer
///   is free, so writes to it are rare). A scraper reading its answer takes some at every turn
///   of the loop, so it is not chosen while it reads. A multi-MB answer (1,500 apps make 4 MB)
///   never fits the buffers, so without this, 40 clients sending `GET /metrics` and never
///   reading held every place until their deadlines, one group after another, and a scrape
///   waited 18 s.
/// - Nothing else: an answer being read is not cut for a newcomer, which waits in the listen
///   backlog until a place frees or a connection stalls (the poll wakes for it).
///
/// Many connections (a thousand, say) only take turns: each takes a place only by pushing out
/// an idle or stalled one, and the descriptors and memory held stay those of `MAX_CONNS`.
fn victim(conns: &[Conn], now: Instant) -> Option<usize> {
    let idle = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.reading())
        .min_by_key(|(_, c)| c.accepted);
    let stalled = || {
        conns
            .iter()
            .enumerate()
            .filter(|(_, c)| now.saturating_duration_since(c.last_progress) >= STALL)
            .min_by_key(|(_, c)| c.last_progress)
    };
    idle.or_else(stalled).map(|(i, _)| i)
}

/// Accept what is waiting, within the bound (making room as `victim` says when full).
fn accept_some(
    listener: &TcpListener,
    conns: &mut Vec<Conn>,
    sources: &Sources,
    answers: &mut Answers,
) {
    loop {
        let out = if conns.len() >= MAX_CONNS {
            match victim(conns, Instant::now()) {
                Some(i) => Some(i),
                None => return,
            }
        } else {
            None
        };
        // Accept first: if nothing is waiting (another process took it), keep the old one.
        let Some(mut conn) = accept_one(listener) else {
            return;
        };
        if let Some(i) = out {
            let old = conns.swap_remove(i);
            crate::debug!(
                "metrics: at {MAX_CONNS} connections: closed one {} to make room",
                if old.reading() {
                    "still waiting for its request"
                } else {
                    "whose client does not read its answer"
                }
            );
            old.abort();
        }
        // The request usually came with the handshake's last packet: answer now.
        conn.progress(sources, answers);
        if !conn.done {
            conns.push(conn);
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
                    last_progress: now,
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
    /// When the client last sent some of its request or took some of its answer.
    last_progress: Instant,
    /// The request must be complete by then; once answering, the answer must be sent by then.
    deadline: Instant,
    request: Vec<u8>,
    /// The answer (shared by the connections that asked for it in one turn of the loop) and
    /// how much of it is sent.
    answer: Option<(Arc<Vec<u8>>, usize)>,
    done: bool,
}

impl Conn {
    fn reading(&self) -> bool {
        self.answer.is_none()
    }

    /// Close a connection whose answer is not all sent with a reset, so that the kernel drops
    /// what is still queued for it at once: closed normally, each would stay an orphan socket
    /// holding up to megabytes for a client that does not read.
    fn abort(&self) {
        let lin = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the descriptor is open (owned by `self.stream`), and `lin` is a valid linger
        // of the size given.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&lin as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Read what has arrived, answer a complete request, write what the socket takes.
    fn progress(&mut self, sources: &Sources, answers: &mut Answers) {
        if let Err(e) = self.step(sources, answers) {
            crate::debug!("metrics: request failed: {e}");
            self.done = true;
        }
    }

    fn step(&mut self, sources: &Sources, answers: &mut Answers) -> io::Result<()> {
        let mut chunk = [0u8; 1024];
        while self.answer.is_none() {
            let complete = head_end(&self.request).is_some();
            // Closed before a whole request (`eof`): it gets the answer to what it sent.
            let mut eof = false;
            if !complete && self.request.len() <= MAX_REQUEST {
                match self.stream.read(&mut chunk) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        self.request.extend_from_slice(&chunk[..n]);
                        self.last_progress = Instant::now();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            debug_assert!(complete || eof || self.request.len() > MAX_REQUEST);
            self.answer = Some((answers.get(route(&self.request), sources), 0));
            self.deadline = Instant::now() + IO_TIMEOUT;
        }
        let Some((out, sent)) = self.answer.as_mut() else {
            return Ok(());
        };
        while *sent < out.len() {
            match self.stream.write(&out[*sent..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    *sent += n;
                    self.last_progress = Instant::now();
                }
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

/// What a request asks for. Each page that lists apps serves one app's part with `?app=NAME`
/// (`Query::app`), else all of it within its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Page {
    Metrics(Query),
    StatusText(Query),
    StatusJson(Query),
    /// The page for people, reloading every N seconds.
    StatusHtml(u32, Query),
    NotFound,
    NotAllowed,
    /// The request, or its query, is malformed: why, for the client.
    BadRequest(String),
}

/// The page `request` asks for. `/` and `/status` serve HTML to a browser (its `Accept` names
/// `text/html`) and stay what they were to everything else: `/status` is text that scripts and
/// older `flyproxy status` read, `/` is not found.
fn route(request: &[u8]) -> Page {
    let Some(head) = head_end(request).and_then(|i| std::str::from_utf8(&request[..i]).ok()) else {
        return Page::BadRequest("bad request\n".into());
    };
    let mut lines = head.lines().map(|l| l.trim_end_matches('\r'));
    let line = lines.next().unwrap_or("");
    let browser = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("text/html")
        })
    });
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(target), Some(v)) if v.starts_with("HTTP/1.") => {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            if !matches!(
                path,
                "/metrics" | "/status.json" | "/status.html" | "/status" | "/"
            ) {
                return Page::NotFound;
            }
            let q = match query::parse(query) {
                Ok(q) => q,
                Err(e) => return Page::BadRequest(format!("{e}\n")),
            };
            match path {
                "/metrics" => Page::Metrics(q),
                "/status.json" => Page::StatusJson(q),
                "/status" if !browser => Page::StatusText(q),
                "/" if !browser => Page::NotFound,
                _ => Page::StatusHtml(refresh_of(query), q),
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => Page::NotAllowed,
        _ => Page::BadRequest("bad request\n".into()),
    }
}

/// The answers rendered in one turn of the serving loop: connections that ask for the same
/// page at the same moment share one rendering (and its memory), so a burst of connections
/// costs one rendering, not one each.
#[derive(Default)]
struct Answers(Vec<(Page, Arc<Vec<u8>>)>);

impl Answers {
    fn get(&mut self, page: Page, sources: &Sources) -> Arc<Vec<u8>> {
        if let Some((_, a)) = self.0.iter().find(|(p, _)| *p == page) {
            return Arc::clone(a);
        }
        let a = Arc::new(answer(&page, sources));
        self.0.push((page, Arc::clone(&a)));
        a
    }
}

/// The whole answer (head and body) for `page`.
fn answer(page: &Page, sources: &Sources) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let status = |q: &Query| snapshot(sources, q.app.as_deref());
    let ok = |ctype, body: Option<String>, q: &Query| match body {
        Some(body) => ("200 OK", ctype, body),
        None => ("404 Not Found", TEXT, no_app(q)),
    };
    let (status, ctype, body) = match page {
        Page::Metrics(q) => {
            let body = match &q.app {
                Some(name) => render_app(sources, name),
                None => Some(render(sources)),
            };
            ok("text/plain; version=0.0.4; charset=utf-8", body, q)
        }
        Page::StatusText(q) => ok(TEXT, status(q).map(|s| text(&s)), q),
        // Serializing plain structs of strings and numbers cannot fail.
        Page::StatusJson(q) => ok(
            "application/json",
            status(q).map(|s: Status| serde_json::to_string(&s).unwrap_or_default()),
            q,
        ),
        Page::StatusHtml(refresh, q) => ok(
            "text/html; charset=utf-8",
            status(q).map(|s| html(&s, *refresh)),
            q,
        ),
        Page::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /status, /status.json or /status.html\n".into(),
        ),
        Page::NotAllowed => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
        Page::BadRequest(why) => ("400 Bad Request", "text/plain", why.clone()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The 404 body for an app no config in force has (the name as asked, shortened: it is the
/// client's text).
fn no_app(q: &Query) -> String {
    let name = q.app.as_deref().unwrap_or("");
    let shown: String = name.chars().take(80).collect();
    let more = if shown.len() < name.len() { "..." } else { "" };
    format!("no app named {shown:?}{more} in the config in force\n")
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
