//! A connection's access-log line (`conn`), written once as it ends, however it ends: relayed to
//! its end, refused at accept by a per-client limit, routed nowhere, or failed before relaying.
//! Every field is named here, in one order, so that both log formats and everything that reads
//! them see one shape.

use std::net::SocketAddr;
use std::time::Instant;

use crate::sys::log::{self, Field, Level};

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
        log::access(level, "conn", &fields);
    }
}
