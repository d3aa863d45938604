//! What can be wrong with a config file, each problem worded for the operator: the app, the
//! field, and what was expected.

use std::fmt;
use std::path::PathBuf;

use crate::config::hostname::HostnameError;
use crate::config::limits::{MAX_BINDINGS, MAX_FILE_BYTES, NAME_MAX};
use crate::config::prefix::PrefixError;

/// One thing wrong with a config file. Each names the app and field it is about, so the
/// message tells the operator exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file could not be read.
    Io(String),
    /// The path names something other than a regular file (a directory, a FIFO, a device).
    NotAFile(&'static str),
    /// The file is larger than `MAX_FILE_BYTES`.
    TooLarge,
    /// The file is not JSON: serde_json's message without its position, the position (line
    /// and column from 1; 0 when serde_json gives none), and a hint for a common slip.
    Syntax(Syntax),
    /// A value of the wrong JSON type. `app` is None at the top level; `found` is the value
    /// as written (cut short), `kind` what it is, `write` what to write instead.
    WrongType {
        app: Option<String>,
        field: String,
        found: String,
        kind: &'static str,
        write: String,
    },
    /// A key given more than once in one object (`app` None: at the top level).
    GivenTwice { app: Option<String>, key: String },
    /// Not a problem of its own: this many more were found past `STORED_MAX` and only
    /// counted. Always the last of a list.
    More(usize),
    /// The top-level `Apps` key is missing.
    MissingApps,
    /// A key that flyproxy does not know; `app` is None at the top level.
    UnknownKey { app: Option<String>, key: String },
    /// A required field of an app is missing or empty.
    Missing { app: String, field: &'static str },
    /// Two apps share a name.
    DuplicateApp { name: String },
    /// A name that is not 1-64 characters of letters, digits, `.`, `_` and `-`.
    BadName { name: String },
    /// A port outside 1..=65535.
    PortOutOfRange { app: String, port: i64 },
    /// A port string that is not a number or an `"A-B"` range within 1-65535.
    BadPortRange {
        app: String,
        value: String,
        why: &'static str,
    },
    /// Ports (written as ranges) listed twice within one app.
    DuplicatePort { ports: String, app: String },
    /// An address or hostname listed twice within one app.
    Duplicate {
        app: String,
        field: &'static str,
        value: String,
    },
    /// An entry of `Addresses` that is not an address or prefix.
    BadAddress {
        app: String,
        value: String,
        why: PrefixError,
    },
    /// An entry of `Hostnames` that is not a hostname pattern.
    BadHostname {
        app: String,
        value: String,
        why: HostnameError,
    },
    /// Two apps on the same address prefix and ports, neither told apart by Hostnames.
    SharedDefault {
        app: String,
        first: String,
        ports: String,
        addresses: String,
    },
    /// Two apps on the same address prefix and ports claiming the same hostname.
    SharedHostname {
        app: String,
        first: String,
        hostname: String,
        ports: String,
        addresses: String,
    },
    /// More (address prefix, port) pairs over all apps than `MAX_BINDINGS`.
    TooManyBindings { pairs: usize },
    /// A target that is not `host:port`.
    BadTarget {
        app: String,
        target: String,
        why: &'static str,
    },
    /// A key a target object does not take. `target` names the target: its Address quoted, or
    /// `#N`, its place in the list.
    TargetUnknownKey {
        app: String,
        target: String,
        key: String,
    },
    /// A key given more than once in a target object.
    TargetGivenTwice {
        app: String,
        target: String,
        key: String,
    },
    /// A target object without an Address.
    TargetNoAddress { app: String, target: String },
    /// A target object's setting outside what it takes.
    TargetValue {
        app: String,
        target: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A HealthCheck key that only a Kind other than the app's takes.
    CheckKeyForKind {
        app: String,
        key: &'static str,
        wants: &'static str,
        kind: &'static str,
    },
    /// A target that is the proxy's own frontend: a local address (or `localhost`) on one of
    /// its ports (see `backends::loops`).
    Loop {
        app: String,
        target: String,
        port: u16,
    },
    /// An optional setting with a value outside what it takes.
    BadValue {
        app: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
}

// Names, keys and targets are printed with `{:?}`: quoted, and escaped, so that no value in a
// config can break a problem across lines or forge another one.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Io(e) => write!(f, "cannot read: {e}"),
            Problem::NotAFile(kind) => write!(f, "cannot read: it is {kind}, not a regular file"),
            Problem::TooLarge => write!(
                f,
                "larger than {} MiB: not read (a config file is at most that)",
                MAX_FILE_BYTES >> 20
            ),
            Problem::Syntax(e) => {
                write!(f, "not a valid config: {}", e.message)?;
                match e.hint {
                    Some(hint) => write!(f, " ({hint})"),
                    None => Ok(()),
                }
            }
            Problem::WrongType {
                app,
                field,
                found,
                kind,
                write,
            } => {
                if let Some(app) = app {
                    write!(f, "app {app:?}: ")?;
                }
                write!(f, "{field}: {found} is {kind}; write {write}")
            }
            Problem::GivenTwice { app: Some(app), key } => {
                write!(f, "app {app:?}: {key} given more than once; keep one")
            }
            Problem::More(n) => write!(f, "{n} more problems found, not kept"),
            Problem::GivenTwice { app: None, key } => {
                write!(f, "{key:?} given more than once at the top level; keep one")
            }
            Problem::MissingApps => write!(f, "missing key \"Apps\" (a list of apps)"),
            Problem::UnknownKey { app: None, key } => {
                write!(
                    f,
                    "unknown key {key:?} at the top level (expected \"Apps\")"
                )
            }
            Problem::UnknownKey {
                app: Some(app),
                key,
            } if key.starts_with("HealthCheck.") => write!(
                f,
                "app {app:?}: unknown key {key:?} (HealthCheck takes {HEALTH_KEYS})"
            ),
            Problem::UnknownKey {
                app: Some(app),
                key,
            } => write!(
                f,
                "app {app:?}: unknown key {key:?} (expected one of {APP_KEYS})"
            ),
            Problem::Missing { app, field } => {
                write!(f, "app {app:?}: {field}: missing or empty")
            }
            Problem::BadName { name } => write!(
                f,
                "app {name:?}: Name: must be 1-{NAME_MAX} characters, each a letter, a digit, '.', '_' or '-'"
            ),
            Problem::Loop { app, target, port } => write!(
                f,
                "app {app:?}: Targets: {target:?} is this proxy's own frontend (port {port} on a local address): connections to it would loop back into the proxy"
            ),
            Problem::DuplicateApp { name } => {
                write!(f, "app {name:?}: Name: used by more than one app")
            }
            Problem::PortOutOfRange { app, port } => {
                write!(f, "app {app:?}: Ports: {port} is not a port (1-65535)")
            }
            Problem::BadPortRange { app, value, why } => {
                write!(f, "app {app:?}: Ports: {value:?} {why}")
            }
            Problem::DuplicatePort { ports, app } => {
                write!(
                    f,
                    "app {app:?}: Ports: {ports} {} listed twice",
                    is_are(ports)
                )
            }
            Problem::Duplicate { app, field, value } => {
                write!(f, "app {app:?}: {field}: {value:?} is listed twice")
            }
            Problem::BadAddress { app, value, why } => {
                write!(f, "app {app:?}: Addresses: {value:?} {why}")
            }
            Problem::BadHostname { app, value, why } => {
                write!(f, "app {app:?}: Hostnames: {value:?} {why}")
            }
            Problem::SharedDefault {
                app,
                first,
                ports,
                addresses,
            } => write!(
                f,
                "app {app:?}: Ports: {ports} {} already used by app {first:?} on {addresses}, \
                 and neither has Hostnames (apps share an address and port only when Hostnames \
                 tell them apart, with at most one app without them)",
                is_are(ports)
            ),
            Problem::SharedHostname {
                app,
                first,
                hostname,
                ports,
                addresses,
            } => write!(
                f,
                "app {app:?}: Hostnames: {hostname:?} is also claimed by app {first:?} on \
                 port {ports} ({addresses}): a name may pick only one app per address and port"
            ),
            Problem::TooManyBindings { pairs } => write!(
                f,
                "Ports and Addresses: the apps have {pairs} (address, port) pairs in all (each \
                 app's ports times its addresses, two for an app without Addresses), more than \
                 the {MAX_BINDINGS} the proxy holds; use fewer ports or wider prefixes"
            ),
            Problem::BadTarget { app, target, why } => {
                write!(f, "app {app:?}: Targets: {target:?} {why}")
            }
            Problem::BadValue {
                app,
                field,
                value,
                expected,
            } => {
                write!(f, "app {app:?}: {field}: {value} is not {expected}")
            }
            Problem::CheckKeyForKind {
                app,
                key,
                wants,
                kind,
            } => write!(
                f,
                "app {app:?}: HealthCheck.{key}: only for Kind {wants:?} (the Kind here is {kind:?})"
            ),
            Problem::TargetUnknownKey { app, target, key } => write!(
                f,
                "app {app:?}: Targets: {target}: unknown key {key:?} (a target takes {TARGET_KEYS})"
            ),
            Problem::TargetGivenTwice { app, target, key } => write!(
                f,
                "app {app:?}: Targets: {target}: {key} given more than once; keep one"
            ),
            Problem::TargetNoAddress { app, target } => write!(
                f,
                "app {app:?}: Targets: {target}: Address: missing (a target object is \
                 {{\"Address\": \"host:port\", \"Weight\": 2}})"
            ),
            Problem::TargetValue {
                app,
                target,
                field,
                value,
                expected,
            } => write!(
                f,
                "app {app:?}: Targets: {target}: {field}: {value} is not {expected}"
            ),
        }
    }
}

const APP_KEYS: &str =
    "Name, Ports, Targets, Addresses, Hostnames, HealthCheck, Balance, ConnectAttempts, \
                        MaxConnections, MaxConnectionsPerClient, ProxyProtocol";

/// "is" for one port, "are" for a list or a range.
fn is_are(ports: &str) -> &'static str {
    if ports.contains([',', '-']) {
        "are"
    } else {
        "is"
    }
}

const HEALTH_KEYS: &str =
    "IntervalMs, TimeoutMs, Fall, Rise, Kind, Path, Host, ExpectStatus, ServerName";

const TARGET_KEYS: &str = "Address, Weight, Backup, Drain";

/// A file that is not JSON: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syntax {
    /// serde_json's message, without the "at line L column C" it ends with.
    pub message: String,
    pub line: usize,
    pub column: usize,
    /// What the operator most likely wrote instead (a comment, single quotes, ...).
    pub hint: Option<&'static str>,
}

/// At most this many problems are kept for one file; the rest are counted. A 16 MiB file can
/// hold eight million bad ports (a 64 MiB one, four times as many): kept, each with its app's name, they took 1.5 GB. (A rejected
/// reload logs every one kept: tens of thousands of lines are how a log that cannot keep up is
/// tested, and a reload is logged once per change of the file.)
pub const STORED_MAX: usize = 100_000;

/// Problems as they are found: the first `STORED_MAX` kept, the rest counted.
#[derive(Debug, Default)]
pub(super) struct Problems {
    list: Vec<Problem>,
    more: usize,
}

impl Problems {
    pub(super) fn push(&mut self, p: Problem) {
        if self.list.len() < STORED_MAX {
            self.list.push(p);
        } else {
            self.more += 1;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The problems kept, and `Problem::More` last if some were only counted.
    pub(super) fn into_vec(mut self) -> Vec<Problem> {
        if self.more > 0 {
            self.list.push(Problem::More(self.more));
        }
        self.list
    }
}

/// At most this many problems are printed by `flyproxy check` (`ConfigError::first`), then how
/// many more: an operator reads the first ones, fixes them and checks again; a generated file
/// with a million bad ports should not scroll a million lines past.
pub const PRINTED_MAX: usize = 100;

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// How many problems were found, those only counted included.
    pub fn count(&self) -> usize {
        self.problems
            .iter()
            .map(|p| match p {
                Problem::More(n) => *n,
                _ => 1,
            })
            .sum()
    }
}

impl ConfigError {
    /// The problems one a line, at most `max` of them, then how many more there are.
    pub fn first(&self, max: usize) -> First<'_> {
        First { error: self, max }
    }
}

/// See `ConfigError::first`.
pub struct First<'a> {
    error: &'a ConfigError,
    max: usize,
}

impl fmt::Display for First<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.error.path.display();
        let shown = self
            .error
            .problems
            .iter()
            .filter(|p| !matches!(p, Problem::More(_)))
            .take(self.max);
        let mut printed = 0;
        for p in shown {
            if printed > 0 {
                writeln!(f)?;
            }
            printed += 1;
            match p {
                // PATH:LINE:COL: is the form editors and terminals jump to.
                Problem::Syntax(s) if s.line > 0 => {
                    write!(f, "{path}:{}:{}: {p}", s.line, s.column.max(1))?
                }
                _ => write!(f, "{path}: {p}")?,
            }
        }
        let more = self.error.count() - printed;
        if more > 0 {
            write!(
                f,
                "\n{path}: ... and {more} more {} not shown (the first {printed} are)",
                if more == 1 { "problem" } else { "problems" }
            )?;
        }
        Ok(())
    }
}

/// Every problem kept, one a line (then how many more were only counted).
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.first(usize::MAX).fmt(f)
    }
}

impl std::error::Error for ConfigError {}
