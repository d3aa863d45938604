//! `flyproxy ctl`'s side: send one command line to the admin socket and read its answer, up to
//! the empty line that ends it. Whatever answers at the path must not make the command wait
//! for ever or grow without bound.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The largest answer taken (`show conns` lists 10,000 connections at most, about 1.5 MB).
const MAX_BYTES: usize = 64 << 20;
/// How long `flyproxy ctl` waits for a whole answer: a reload of a large config may take a
/// while; anything else answers at once.
pub const CTL_DEADLINE: Duration = Duration::from_secs(150);

/// Why no answer could be read.
#[derive(Debug)]
pub enum AskError {
    Connect(PathBuf, io::Error),
    Io(PathBuf, io::Error),
    /// The connection closed before the empty line that ends an answer.
    Cut(PathBuf),
    TooLarge(PathBuf),
    TooSlow(PathBuf, Duration),
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::Connect(p, e) => write!(
                f,
                "cannot connect to {}: {e} (is flyproxy running with --admin-socket {0}? \
                 are you in its --group?)",
                p.display()
            ),
            AskError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            AskError::Cut(p) => write!(f, "{}: the answer was cut short", p.display()),
            AskError::TooLarge(p) => {
                write!(
                    f,
                    "{}: the answer is larger than {} MiB",
                    p.display(),
                    MAX_BYTES >> 20
                )
            }
            AskError::TooSlow(p, d) => {
                write!(f, "{}: no whole answer within {d:?}", p.display())
            }
        }
    }
}

impl std::error::Error for AskError {}

/// Send `command` (one line) to the socket at `path`; its answer without the empty line that
/// ends it, within `deadline`.
pub fn ask(path: &Path, command: &str, deadline: Duration) -> Result<String, AskError> {
    let io_err = |e| AskError::Io(path.to_owned(), e);
    let mut s = UnixStream::connect(path).map_err(|e| AskError::Connect(path.to_owned(), e))?;
    let began = Instant::now();
    s.set_write_timeout(Some(deadline)).map_err(io_err)?;
    let mut line = command.replace('\n', " ");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io_err)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find_end(&answer) {
            answer.truncate(end);
            return Ok(String::from_utf8_lossy(&answer).into_owned());
        }
        let left = deadline
            .checked_sub(began.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| AskError::TooSlow(path.to_owned(), deadline))?;
        s.set_read_timeout(Some(left)).map_err(io_err)?;
        match s.read(&mut buf) {
            Ok(0) => return Err(AskError::Cut(path.to_owned())),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AskError::TooSlow(path.to_owned(), deadline))
            }
            Err(e) => return Err(io_err(e)),
        }
        if answer.len() > MAX_BYTES {
            return Err(AskError::TooLarge(path.to_owned()));
        }
    }
}

/// Where the answer ends: before the empty line (`\n\n`, or an empty answer's lone `\n`).
fn find_end(answer: &[u8]) -> Option<usize> {
    if answer == b"\n" {
        return Some(0);
    }
    answer.windows(2).position(|w| w == b"\n\n").map(|i| i + 1)
}
