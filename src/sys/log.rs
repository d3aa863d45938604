//! Logging, one line per event, as text (`2026-11-26T06:43:26.123Z INFO  message
//! key=value ...`) or as JSON objects (`--log-format json`), to stderr or `--log-file`; the
//! access lines (`conn`, one per connection) with them or apart (`--access-log`).
//!
//! Lines are formatted by the thread that logs them and handed to one writer thread through a
//! bounded queue, so a slow or blocked stderr or disk never stalls relaying or accepting: when
//! the queue is full the line is dropped and counted, and the writer reports the count once it
//! catches up. The writer alone owns the destinations (`output`); reopening them on SIGUSR1 is
//! a request it carries out between two batches. The level and format are globals set once at
//! start; the macros check the level before formatting anything.

mod output;

use output::Outputs;
pub use output::{AccessLog, OpenError};

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines queued for the writer at most; beyond this they are dropped (and counted).
const QUEUE: usize = 16 * 1024;

/// After writing a batch the writer rests this long before it waits for lines again. A line
/// queued while it rests wakes no one (the channel wakes a receiver only if one is blocked in
/// `recv`): without the rest, every `conn` line of a busy proxy woke the writer, a context switch
/// per connection. Lines reach the log at most this much later; `flush` still waits for them.
const REST: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Where access lines go, as `ACCESS_*`: whether they are written, and at which levels.
static ACCESS: AtomicU8 = AtomicU8::new(ACCESS_WITH_LOG);
const ACCESS_WITH_LOG: u8 = 0;
const ACCESS_OFF: u8 = 1;
const ACCESS_OWN: u8 = 2;
/// Set by `reopen`, taken by the writer after its batch: a request that survives a full queue.
static REOPEN: AtomicBool = AtomicBool::new(false);

enum Msg {
    Line {
        text: String,
        level: Level,
        /// An access line: written where those go.
        access: bool,
    },
    /// Acknowledged once every line before it is written.
    Flush(SyncSender<()>),
    /// Write to these from now on.
    Use(Box<Outputs>),
    /// Wakes the writer to look at `REOPEN`.
    Reopen,
}

static QUEUE_TX: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn set_format(format: Format) {
    JSON.store(format == Format::Json, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Open the log file and the access log's file, if any, and write there from now on; until
/// then everything goes to stderr. Call once at start, before privileges are dropped.
pub fn init(log_file: Option<&std::path::Path>, access: &AccessLog) -> Result<(), OpenError> {
    let outputs = Outputs::open(log_file, access)?;
    let mode = match access {
        AccessLog::WithLog => ACCESS_WITH_LOG,
        AccessLog::Off => ACCESS_OFF,
        AccessLog::Stderr | AccessLog::File(_) => ACCESS_OWN,
    };
    ACCESS.store(mode, Ordering::Relaxed);
    // The writer thread is not started here but by the first line, as it always was: it drops
    // its capabilities as it starts, and glibc aborts the process when a `--user` switch
    // (setgroups/setuid, applied to every thread) fails in one thread. The outputs wait for
    // it; a writer already running is handed them through its queue.
    *lock_pending() = Some(outputs);
    if let Some(Some(tx)) = QUEUE_TX.get() {
        if let Some(outputs) = lock_pending().take() {
            // Blocking: the queue is all but empty at start, and no line may pass the switch.
            let _ = tx.send(Msg::Use(Box::new(outputs)));
        }
    }
    Ok(())
}

/// Outputs opened by `init` before the writer thread exists; it takes them as it starts.
static PENDING: Mutex<Option<Outputs>> = Mutex::new(None);

fn lock_pending() -> std::sync::MutexGuard<'static, Option<Outputs>> {
    // A panic while holding it leaves a plain Option: still usable.
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ask the writer to reopen the log files at their paths (after a rotation renamed them). It
/// does so after the lines already queued, which still go to the old files.
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
    if let Some(tx) = queue() {
        // A full queue already has the writer busy: it sees the flag after that batch.
        let _ = tx.try_send(Msg::Reopen);
    }
}

/// Lines dropped because the writer could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Write one event line. Use the macros, which skip formatting when the level is off.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let mut line = String::with_capacity(160);
    use fmt::Write as _;
    if JSON.load(Ordering::Relaxed) {
        let _ = writeln!(
            line,
            "{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":{}}}",
            Timestamp::now(),
            level.name(),
            serde_json::Value::String(args.to_string())
        );
    } else {
        let _ = write!(line, "{} {:<5} ", Timestamp::now(), level.label());
        // A message may carry text from outside (an error, a path, a resolver's answer): its
        // control characters are escaped so that it cannot end the line and forge another.
        push_escaped(&mut line, &args.to_string());
        line.push('\n');
    }
    send(line, level, false);
}

/// Append `text` with line breaks, tabs and other control characters written as escapes.
pub fn push_escaped(out: &mut String, text: &str) {
    use fmt::Write as _;
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Write one structured record: `msg` and its fields, as `msg k=v ...` in text or as JSON
/// members. String values are quoted in text only when they need it.
pub fn record(level: Level, msg: &str, fields: &[(&str, Field<'_>)]) {
    if enabled(level) {
        send(format_record(level, msg, fields), level, false);
    }
}

/// Write one access record (a connection's line): as `record`, but where `--access-log` says,
/// and, when that is a destination of its own, whatever the log level.
pub fn access(level: Level, msg: &str, fields: &[(&str, Field<'_>)]) {
    let write = match ACCESS.load(Ordering::Relaxed) {
        ACCESS_OFF => false,
        ACCESS_OWN => true,
        _ => enabled(level),
    };
    if write {
        send(format_record(level, msg, fields), level, true);
    }
}

fn format_record(level: Level, msg: &str, fields: &[(&str, Field<'_>)]) -> String {
    let mut line = String::with_capacity(256);
    use fmt::Write as _;
    if JSON.load(Ordering::Relaxed) {
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), Timestamp::now().to_string().into());
        obj.insert("level".into(), level.name().into());
        obj.insert("msg".into(), msg.into());
        for (k, v) in fields {
            let v = match v {
                Field::Str(s) => serde_json::Value::from(*s),
                Field::Num(n) => serde_json::Value::from(*n),
                Field::Secs(s) => serde_json::Value::from((s * 1000.0).round() / 1000.0),
            };
            obj.insert((*k).into(), v);
        }
        let _ = writeln!(line, "{}", serde_json::Value::Object(obj));
    } else {
        let _ = write!(line, "{} {:<5} {msg}", Timestamp::now(), level.label());
        for (k, v) in fields {
            match v {
                // Quoted (JSON string escapes) when it could break the key=value shape or the
                // line: spaces, quotes, '=', line breaks and other control characters.
                Field::Str(s)
                    if s.is_empty()
                        || s.contains(|c: char| {
                            c.is_whitespace() || c.is_control() || c == '"' || c == '='
                        }) =>
                {
                    let _ = write!(line, " {k}={}", serde_json::Value::from(*s));
                }
                Field::Str(s) => {
                    let _ = write!(line, " {k}={s}");
                }
                Field::Num(n) => {
                    let _ = write!(line, " {k}={n}");
                }
                Field::Secs(s) => {
                    let _ = write!(line, " {k}={s:.3}s");
                }
            }
        }
        line.push('\n');
    }
    line
}

/// A value in a structured record.
pub enum Field<'a> {
    Str(&'a str),
    Num(u64),
    /// A duration in seconds: `1.234s` in text, a number in JSON.
    Secs(f64),
}

fn queue() -> Option<&'static SyncSender<Msg>> {
    QUEUE_TX
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            std::thread::Builder::new()
                .name("log".into())
                .stack_size(128 * 1024)
                .spawn(move || writer(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn send(text: String, level: Level, access: bool) {
    match queue() {
        Some(tx) => match tx.try_send(Msg::Line {
            text,
            level,
            access,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        },
        // No writer thread could be started: write in place rather than lose the line.
        None => {
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    }
}

/// Wait (up to a second) until every line logged so far is written; call before exiting.
pub fn flush() {
    if let Some(tx) = queue() {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if tx.send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

fn writer(rx: Receiver<Msg>) {
    // Capabilities belong to each thread: this one, started by the first log line, may
    // predate the main thread dropping them, and needs none.
    let _ = crate::sys::caps::keep_only(&[]);
    let mut out = lock_pending().take().unwrap_or_else(Outputs::stderr);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write everything queued, then flush once.
        while let Some(msg) = next {
            match msg {
                Msg::Line {
                    text,
                    level,
                    access,
                } => out.write(level, access, &text),
                Msg::Flush(ack) => {
                    out.flush();
                    let _ = ack.try_send(());
                }
                Msg::Use(outputs) => {
                    out.flush();
                    out = *outputs;
                }
                Msg::Reopen => {}
            }
            next = rx.try_recv().ok();
        }
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped != reported {
            let msg = format!(
                "{} log lines dropped: the log could not keep up",
                dropped - reported
            );
            out.write(Level::Warn, false, &plain_line(Level::Warn, &msg));
            reported = dropped;
        }
        if REOPEN.swap(false, Ordering::Relaxed) {
            for (level, msg) in out.reopen() {
                if enabled(level) {
                    out.write(level, false, &plain_line(level, &msg));
                }
            }
        }
        out.flush();
        std::thread::sleep(REST);
    }
}

/// A line of the writer's own (it has no `fmt::Arguments` to hand to `write`).
fn plain_line(level: Level, msg: &str) -> String {
    if JSON.load(Ordering::Relaxed) {
        format!(
            "{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":{}}}\n",
            Timestamp::now(),
            level.name(),
            serde_json::Value::String(msg.to_owned())
        )
    } else {
        let mut line = format!("{} {:<5} ", Timestamp::now(), level.label());
        push_escaped(&mut line, msg);
        line.push('\n');
        line
    }
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::sys::log::enabled($lvl) {
            $crate::sys::log::write($lvl, format_args!($($arg)*));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::sys::log::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::sys::log::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::sys::log::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::sys::log::Level::Debug, $($arg)*) }; }

/// UTC wall-clock time in RFC 3339 with milliseconds, without a date crate.
pub struct Timestamp(u64, u32);

impl Timestamp {
    /// The time `ms` milliseconds after the Unix epoch.
    pub fn from_unix_ms(ms: u64) -> Timestamp {
        Timestamp(ms / 1000, (ms % 1000) as u32)
    }

    fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_secs(), d.subsec_millis())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = (self.0 / 86_400) as i64;
        let secs = self.0 % 86_400;
        // Howard Hinnant's days-to-civil algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            self.1
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(Timestamp(0, 0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_795_675_406, 123).to_string(),
            "2026-11-26T06:43:26.123Z"
        );
        assert_eq!(
            Timestamp(951_782_400, 5).to_string(),
            "2000-02-29T00:00:00.005Z"
        );
    }
}
