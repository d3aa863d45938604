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
    /// The file is not JSON of the expected shape (serde's message carries line and column).
    Syntax(String),
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
            Problem::Syntax(e) => write!(f, "not a valid config: {e}"),
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

const HEALTH_KEYS: &str = "IntervalMs, TimeoutMs, Fall, Rise";

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
