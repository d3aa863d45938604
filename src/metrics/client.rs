//! `flyproxy status`'s side: read `/status.json` from a running proxy and print its text.
//! Whatever listens at the address given (a wrong one, node_exporter on its usual port) must
//! not pass for a proxy, make the command grow without bound, or make it wait for ever.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::metrics::status::{text, Status};

/// The largest answer taken (100,000 apps make a status of about 14 MB), and how long the
/// whole answer may take.
const MAX_BYTES: usize = 64 << 20;
const DEADLINE: Duration = Duration::from_secs(10);
/// Connecting, and each read, within this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the status could not be read.
#[derive(Debug)]
pub enum FetchError {
    /// Connecting, sending or receiving failed.
    Io(io::Error),
    /// No whole answer within `DEADLINE`.
    TooSlow(SocketAddr),
    /// The answer grew past `MAX_BYTES`.
    TooLarge(SocketAddr),
    /// Something answered, but not flyproxy's status: what was wrong with it.
    NotOurs(SocketAddr, String),
    /// The proxy has no app of the name asked for (`--app`).
    NoApp(SocketAddr, String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Io(e) => write!(f, "{e}"),
            FetchError::TooSlow(a) => write!(f, "no whole answer from {a} within {DEADLINE:?}"),
            FetchError::TooLarge(a) => {
                write!(
                    f,
                    "the answer from {a} is larger than {} MiB",
                    MAX_BYTES >> 20
                )
            }
            FetchError::NoApp(a, name) => {
                write!(f, "the proxy at {a} has no app named {name:?}")
            }
            FetchError::NotOurs(a, why) => {
                write!(
                    f,
                    "unexpected answer from {a}: not a flyproxy status ({why})"
                )
            }
        }
    }
}

impl From<io::Error> for FetchError {
    fn from(e: io::Error) -> FetchError {
        FetchError::Io(e)
    }
}

/// `flyproxy status`: the text of the running proxy's status, as its `/status` serves it (of
/// the app named `app` only, if given).
pub fn fetch_status(addr: SocketAddr, app: Option<&str>) -> Result<String, FetchError> {
    let path = match app {
        Some(name) => format!("/status.json?app={}", encode(name)),
        None => "/status.json".to_owned(),
    };
    let raw = get(addr, &path)?;
    let not_ours = |why: String| FetchError::NotOurs(addr, why);
    let (head, body) = split_answer(&raw).ok_or_else(|| not_ours("not HTTP".into()))?;
    let status_line = head.lines().next().unwrap_or("");
    // Our endpoint's answer for a name it does not have; another server's 404 says otherwise.
    if let Some(name) = app {
        if status_line.starts_with("HTTP/1.1 404") && body.starts_with(b"no app named") {
            return Err(FetchError::NoApp(addr, name.to_owned()));
        }
    }
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(not_ours(format!("{status_line:?}")));
    }
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim())
        })
        .unwrap_or("");
    if !ctype.starts_with("application/json") {
        return Err(not_ours(format!("Content-Type {ctype:?}")));
    }
    let status: Status =
        serde_json::from_slice(body).map_err(|e| not_ours(format!("its JSON: {e}")))?;
    Ok(text(&status))
}

/// `name` percent-encoded for a query: every byte but letters, digits, `.`, `_`, `-`.
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The head (as text) and the body of an HTTP answer.
fn split_answer(raw: &[u8]) -> Option<(&str, &[u8])> {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((std::str::from_utf8(&raw[..at]).ok()?, &raw[at + 4..]))
}

/// The whole answer to `GET path`, read until the server closes (the endpoint always closes).
fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, FetchError> {
    let deadline = Instant::now() + DEADLINE;
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: flyproxy\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::TooSlow(addr));
        }
        s.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) if buf.len() + n > MAX_BYTES => return Err(FetchError::TooLarge(addr)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // This read's timeout was what was left of the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && left < IO_TIMEOUT =>
            {
                return Err(FetchError::TooSlow(addr))
            }
            Err(e) => return Err(e.into()),
        }
    }
}
