//! Where the writer thread puts lines: stderr, or a file that is reopened on request (so that
//! logrotate's `postrotate kill -USR1` works), for the log and, apart from it if asked, for the
//! access lines. Only the writer thread holds an `Outputs`: a reopen is the writer's own step
//! between two batches, so no line is ever written to a half-swapped file.
//!
//! When stderr is the journal's stream (systemd sets `JOURNAL_STREAM` to its `DEV:INODE`,
//! sd-daemon(3)), each line written there starts with its syslog priority (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug), which journald takes off and records as the
//! priority. The variable alone is not enough: stderr may have been redirected since.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::Level;

/// Where the access lines (`conn`) go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// With the other lines, wherever they go, and only as --log-level lets them.
    #[default]
    WithLog,
    /// Nowhere; every other line is still written.
    Off,
    /// To stderr, whatever --log-file says, and whatever the level.
    Stderr,
    /// To a file of their own (reopened on SIGUSR1), whatever the level.
    File(PathBuf),
}

impl AccessLog {
    /// `off`, `stderr` or a file path; None for an empty value.
    pub fn parse(v: &str) -> Option<AccessLog> {
        match v {
            "" => None,
            "off" => Some(AccessLog::Off),
            "stderr" => Some(AccessLog::Stderr),
            path => Some(AccessLog::File(PathBuf::from(path))),
        }
    }
}

/// A log file that could not be opened.
#[derive(Debug)]
pub struct OpenError {
    pub path: PathBuf,
    pub error: io::Error,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot open log file {}: {}",
            self.path.display(),
            self.error
        )
    }
}

impl std::error::Error for OpenError {}

/// The opened destinations, held by the writer thread.
pub(super) struct Outputs {
    log: Sink,
    access: Access,
}

enum Access {
    WithLog,
    Off,
    Own(Sink),
}

/// One destination and what it needs to be written to and reopened.
struct Sink {
    /// None: stderr.
    path: Option<PathBuf>,
    out: BufWriter<Box<dyn Write + Send>>,
    /// Stderr is the journal's stream: prefix each line with its priority.
    journal: bool,
}

impl Outputs {
    /// Stderr for everything: what the writer uses until told otherwise.
    pub(super) fn stderr() -> Outputs {
        Outputs {
            log: Sink::stderr(),
            access: Access::WithLog,
        }
    }

    /// Open what the command line asks for (before privileges are dropped: the files may be
    /// in a directory only root can write).
    pub(super) fn open(log_file: Option<&Path>, access: &AccessLog) -> Result<Outputs, OpenError> {
        let log = match log_file {
            Some(p) => Sink::file(p)?,
            None => Sink::stderr(),
        };
        let access = match access {
            AccessLog::WithLog => Access::WithLog,
            AccessLog::Off => Access::Off,
            AccessLog::Stderr => Access::Own(Sink::stderr()),
            AccessLog::File(p) => Access::Own(Sink::file(p)?),
        };
        Ok(Outputs { log, access })
    }

    /// Write one line to the log, or (`access`) to where access lines go.
    pub(super) fn write(&mut self, level: Level, access: bool, line: &str) {
        let sink = match (&mut self.access, access) {
            (_, false) | (Access::WithLog, true) => &mut self.log,
            (Access::Own(s), true) => s,
            (Access::Off, true) => return,
        };
        sink.write(level, line);
    }

    pub(super) fn flush(&mut self) {
        // A full disk or a closed stderr must not take the proxy down; the lines are lost.
        let _ = self.log.out.flush();
        if let Access::Own(s) = &mut self.access {
            let _ = s.out.flush();
        }
    }

    /// Reopen every file at its path (a rotation renamed the old one away). A file that cannot
    /// be reopened is kept, and the reason returned for the log; each one reopened is named.
    pub(super) fn reopen(&mut self) -> Vec<(Level, String)> {
        let mut said = Vec::new();
        let mut sinks = vec![&mut self.log];
        if let Access::Own(s) = &mut self.access {
            sinks.push(s);
        }
        for sink in sinks {
            let Some(path) = sink.path.clone() else {
                continue;
            };
            match open_append(&path) {
                Ok(file) => {
                    let _ = sink.out.flush();
                    sink.out = BufWriter::new(Box::new(file));
                    said.push((Level::Info, format!("reopened log file {}", path.display())));
                }
                Err(e) => said.push((
                    Level::Error,
                    format!(
                        "cannot reopen log file {}: {e}; still writing to the file open before",
                        path.display()
                    ),
                )),
            }
        }
        said
    }
}

impl Sink {
    fn stderr() -> Sink {
        Sink {
            path: None,
            out: BufWriter::new(Box::new(io::stderr())),
            journal: stderr_is_journal(),
        }
    }

    fn file(path: &Path) -> Result<Sink, OpenError> {
        let file = open_append(path).map_err(|error| OpenError {
            path: path.to_owned(),
            error,
        })?;
        Ok(Sink {
            path: Some(path.to_owned()),
            out: BufWriter::new(Box::new(file)),
            journal: false,
        })
    }

    fn write(&mut self, level: Level, line: &str) {
        if self.journal {
            let _ = write!(self.out, "<{}>", priority(level));
        }
        let _ = self.out.write_all(line.as_bytes());
    }
}

/// Appending, created if missing; readable by the owner's group only (lines name clients).
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// The syslog priority journald reads from a line's `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug => 7,
    }
}

/// True if `JOURNAL_STREAM` names the device and inode that descriptor 2 is.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(parse_stream) else {
        return false;
    };
    // SAFETY: all-zero is a valid stat; fstat fills it or fails (EBADF if 2 is closed).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into the struct we pass.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// `DEV:INODE`, both decimal.
fn parse_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_values() {
        assert_eq!(parse_stream("8:123"), Some((8, 123)));
        assert_eq!(parse_stream("8"), None);
        assert_eq!(parse_stream("x:1"), None);
        assert_eq!(parse_stream(""), None);
    }

    #[test]
    fn access_log_values() {
        assert_eq!(AccessLog::parse("off"), Some(AccessLog::Off));
        assert_eq!(AccessLog::parse("stderr"), Some(AccessLog::Stderr));
        assert_eq!(
            AccessLog::parse("/var/log/a.log"),
            Some(AccessLog::File("/var/log/a.log".into()))
        );
        assert_eq!(AccessLog::parse(""), None);
    }
}
