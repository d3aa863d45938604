//! A connection's access-log line (`conn`), written once as it ends, however it ends: relayed to
//! its end, refused at accept by a per-client limit, routed nowhere, or failed before relaying.
//! Every field is named here, in one order, so that both log formats and everything that reads
//! them see one shape.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::sys::log::{self, Field, Level};

/// Where a connection's time went on its way to a target, filled in as it goes (what HAProxy
/// logs as `Tw`, `Tc` and its retries): each field stays unset (and out of the line) until the
/// connection got that far.
#[derive(Debug, Default)]
pub struct Timings {
    /// Waited for a slot of the app's MaxConnections (zero if one was free or the app has no
    /// bound): set once admitted.
    pub queue: Option<Duration>,
    /// The connect to the target finally used, its name's lookup included (not the time spent
    /// on targets that failed before it: `failed` names them, `duration` holds everything).
    pub connect: Option<Duration>,
    /// Targets tried (the one connected to included).
    pub attempts: usize,
    /// Each target that failed, with the reason as the metrics name it (`timeout`, `refused`,
    /// ...), in order: `target/reason` joined with `,`.
    pub failed: String,
    /// When the target was connected, and how long after that its first byte came.
    pub connected: Option<Instant>,
    pub first_byte: Option<Duration>,
}

impl Timings {
    /// A target that failed, with its reason.
    pub fn failed(&mut self, target: &str, reason: &str) {
        if !self.failed.is_empty() {
            self.failed.push(',');
        }
        self.failed.push_str(target);
        self.failed.push('/');
        self.failed.push_str(reason);
    }
}

/// What a connection's line says. A line with a `reason` (it was refused or failed) is a
/// warning; others are information.
pub struct ConnLine<'a> {
    /// The app that took it; None: no app did (or it was not known yet).
    pub app: Option<&'a str>,
    pub client: SocketAddr,
    /// The port the client dialled.
    pub port: u16,
    /// The target it was connected to, if it got that far.
    pub target: Option<&'a str>,
    /// Bytes delivered: client to target, target to client.
    pub up: u64,
    pub down: u64,
    /// Counted from here to the line.
    pub accepted: Instant,
    /// How it ended, one word (`closed`, `reset`, `no_route`, ...).
    pub end: &'a str,
    /// Why it was refused or failed.
    pub reason: Option<&'a str>,
    /// A longer explanation of `reason`, where one helps (why no app took it).
    pub detail: Option<&'a str>,
    /// The server name the client asked for, as sent.
    pub sni: Option<&'a str>,
    pub timings: &'a Timings,
}

impl ConnLine<'_> {
    pub fn write(&self) {
        let level = if self.reason.is_some() {
            Level::Warn
        } else {
            Level::Info
        };
        let client = self.client.to_string();
        let mut fields = vec![
            ("app", Field::Str(self.app.unwrap_or("-"))),
            ("client", Field::Str(&client)),
            ("port", Field::Num(u64::from(self.port))),
            ("target", Field::Str(self.target.unwrap_or("-"))),
            ("up", Field::Num(self.up)),
            ("down", Field::Num(self.down)),
            (
                "duration",
                Field::Secs(self.accepted.elapsed().as_secs_f64()),
            ),
            ("end", Field::Str(self.end)),
        ];
        let optional = [
            ("reason", self.reason),
            ("detail", self.detail),
            ("sni", self.sni),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                fields.push((name, Field::Str(v)));
            }
        }
        // After the fields lines always had, so that readers of those see them where they were.
        let t = self.timings;
        let secs = |d: Option<Duration>| d.map(|d| Field::Secs(d.as_secs_f64()));
        let timings = [
            ("queue_wait", secs(t.queue)),
            ("connect_time", secs(t.connect)),
            (
                "attempts",
                (self.app.is_some()).then_some(Field::Num(t.attempts as u64)),
            ),
            (
                "failed",
                (!t.failed.is_empty()).then_some(Field::Str(&t.failed)),
            ),
            ("first_byte", secs(t.first_byte)),
        ];
        for (name, value) in timings {
            if let Some(v) = value {
                fields.push((name, v));
            }
        }
        log::access(level, "conn", &fields);
    }
}
