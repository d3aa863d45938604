//! Logging to stderr, one line per event, as text (`2026-11-26T06:43:26.123Z INFO  message
//! key=value ...`) or as JSON objects (`--log-format json`).
//!
//! Lines are formatted by the thread that logs them and handed to one writer thread through a
//! bounded queue, so a slow or blocked stderr never stalls relaying or accepting: when the queue
//! is full the line is dropped and counted, and the writer reports the count once it catches up.
//! The level and format are globals set once at start; the macros check the level before
//! formatting anything.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines queued for the writer at most; beyond this they are dropped (and counted).
const QUEUE: usize = 16 * 1024;

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

enum Msg {
    Line(String),
    /// Acknowledged once every line before it is written.
    Flush(SyncSender<()>),
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
    send(line);
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
    if !enabled(level) {
        return;
    }
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
    send(line);
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

fn send(line: String) {
    match queue() {
        Some(tx) => match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        },
        // No writer thread could be started: write in place rather than lose the line.
        None => {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
    let stderr = std::io::stderr();
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut out = stderr.lock();
        let mut next = Some(first);
        // Write everything queued, then flush once.
        while let Some(msg) = next {
            match msg {
                // A closed or full stderr must not take the proxy down; the line is lost.
                Msg::Line(l) => {
                    let _ = out.write_all(l.as_bytes());
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped != reported {
            let msg = format!(
                "{} log lines dropped: stderr could not keep up",
                dropped - reported
            );
            let _ = if JSON.load(Ordering::Relaxed) {
                writeln!(
                    out,
                    "{{\"ts\":\"{}\",\"level\":\"warn\",\"msg\":{}}}",
                    Timestamp::now(),
                    serde_json::Value::String(msg)
                )
            } else {
                writeln!(out, "{} WARN  {msg}", Timestamp::now())
            };
            reported = dropped;
        }
        let _ = out.flush();
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
struct Timestamp(u64, u32);

impl Timestamp {
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
