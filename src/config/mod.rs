//! The config file: its raw serde shape (`raw`), the validated `Config` the proxy runs on (here)
//! and how it is made (`validate`; in files of their own: an app's `ports`, its `target`s, and
//! `sharing`, which apps may share an address and port), the diff between two configs that a
//! reload applies (`diff`), and the SHA-256 that names a loaded file (`sha256`).
//!
//! Parse, don't validate: `RawConfig` mirrors the JSON exactly (so the original challenge file
//! loads byte for byte), and `Config::from_raw` turns it into a `Config` or into every problem
//! found at once. Nothing but a `Config` ever reaches the running proxy, so a bad reload cannot
//! touch a live listener.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod diff;
pub mod hostname;
mod ports;
pub mod prefix;
mod raw;
pub mod sha256;
mod sharing;
mod target;
mod validate;

pub use diff::Diff;
pub use ports::{parse_port_range, port_ranges};
pub use target::parse_target;
pub use validate::{is_valid_name, NAME_MAX};

use hostname::{HostnameError, Pattern};
use prefix::{Prefix, PrefixError};

use raw::RawConfig;

/// A validated config: app names unique, every port in 1..=65535, apps sharing an (address
/// prefix, port) told apart by Hostnames, every app with at least one port and one well-formed
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    /// Every port, ranges expanded, in the order given, each once.
    pub ports: Vec<u16>,
    /// The local addresses the app's ports answer on; empty: every address.
    pub addresses: Vec<Prefix>,
    /// TLS server names that pick this app among those sharing an address and port; empty:
    /// the app takes what no other app's names claim there (the default).
    pub hostnames: Vec<Pattern>,
    pub targets: Vec<Target>,
    pub health: HealthCheck,
    pub balance: Balance,
    /// Distinct targets tried for one client connection before it is closed.
    pub connect_attempts: usize,
    /// Open connections this app may have at once; None: only the global bound applies.
    pub max_connections: Option<usize>,
    /// Open connections one client address may have to this app at once; None: only
    /// `--max-connections-per-client` applies.
    pub max_connections_per_client: Option<usize>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Active health checking of an app's targets (a TCP connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// How often a down target is checked; an up one is checked at `UP_CHECK_FACTOR` times this.
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed checks that mark an up target down.
    pub fall: u32,
    /// Consecutive successful checks that bring a down target up.
    pub rise: u32,
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(2000),
            timeout: Duration::from_millis(1000),
            fall: 1,
            rise: 1,
        }
    }
}

/// How a target is picked among an app's healthy targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Uniformly at random.
    Random,
    /// Power of two random choices: the one with fewer active connections of two picked at
    /// random. Nearly as good as least-connections, without its herd behaviour.
    #[default]
    P2c,
    /// Each target in turn.
    RoundRobin,
}

/// The PROXY protocol header sent to the backend before any client byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// Default for `ConnectAttempts`.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;

/// At most this many (address prefix, port) pairs, counted per app (an app without Addresses
/// counts two prefixes per port: every IPv4 and every IPv6 address). It is the size of bpf
/// mode's bindings map (`max_entries` of `bindings` in steer.bpf.c): a config past it could
/// only be applied in part there. It also bounds what validating a small file can cost: a
/// few lines of ranges times addresses would otherwise build millions of entries.
pub const MAX_BINDINGS: usize = 1 << 20;

/// A backend address as configured. The host stays a name: it is resolved at each connect, so a
/// target whose address changes is followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// A DNS name, an IPv4 address, or an IPv6 address (stored without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

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

/// The most of a config file that is read. A 10,000-port config is about 100 KiB; the cap is
/// far above any real file and stops a path that points at something endless (`/dev/zero`,
/// a file still growing) from growing the read without bound.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Read the config file at `path` without ever blocking: opened with `O_NONBLOCK|O_NOCTTY` (a
/// FIFO or a terminal at the path cannot stall the caller, which is the event loop on reload),
/// checked with `fstat` to be a regular file once open (so what is read is what was checked),
/// and read up to `MAX_FILE_BYTES`.
pub fn read_file(path: &Path) -> Result<Vec<u8>, Problem> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Problem::Io(e.to_string()))?;
    let meta = file.metadata().map_err(|e| Problem::Io(e.to_string()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(Problem::NotAFile(if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "of an unknown kind"
        }));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Problem::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the cap tells a file that grew since the fstat from one that did not.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Problem::Io(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Problem::TooLarge);
    }
    Ok(bytes)
}

impl Config {
    /// Validate `bytes` as the contents of `path` (the path only names the file in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            path: path.to_owned(),
            problems,
        };
        let raw: RawConfig = serde_json::from_slice(bytes)
            .map_err(|e| fail(vec![Problem::Syntax(e.to_string())]))?;
        Config::from_raw(raw).map_err(fail)
    }

    /// Every configured port, each exactly once (apps may share one), ascending.
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        let set: BTreeSet<u16> = self
            .apps
            .iter()
            .flat_map(|a| a.ports.iter().copied())
            .collect();
        set.into_iter()
    }

    /// Every (port, address prefix) some app answers on, with the names of the apps there in
    /// config order.
    pub fn bindings(&self) -> BTreeMap<(u16, Prefix), Vec<&str>> {
        let mut out: BTreeMap<(u16, Prefix), Vec<&str>> = BTreeMap::new();
        for app in &self.apps {
            let prefixes = app_prefixes(app);
            for &port in &app.ports {
                for &p in &prefixes {
                    out.entry((port, p)).or_default().push(&app.name);
                }
            }
        }
        out
    }

    /// A one-line summary, as `flyproxy check` prints it.
    pub fn summary(&self) -> String {
        let targets: usize = self.apps.iter().map(|a| a.targets.len()).sum();
        format!(
            "{} apps, {} ports, {} targets",
            self.apps.len(),
            self.ports().count(),
            targets
        )
    }
}

/// The prefixes an app's ports answer on: its `Addresses`, or every IPv4 and IPv6 address.
pub fn app_prefixes(app: &App) -> Vec<Prefix> {
    if app.addresses.is_empty() {
        vec![Prefix::ALL_V4, Prefix::ALL_V6]
    } else {
        app.addresses.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `s` as a config file: the config, or each problem as it is printed.
    pub(super) fn parse(s: &str) -> Result<Config, Vec<String>> {
        Config::parse(Path::new("c.json"), s.as_bytes())
            .map_err(|e| e.problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn original_challenge_file_loads() {
        let s = r#"{"Apps": [{"Name": "six-thousand", "Ports": [6001, 6200, 6300, 6400],
           "Targets": ["tcp-echo.fly.dev:6001", "tcp-echo.fly.dev:6002", "bad.target.for.testing:6003"]}]}"#;
        let c = parse(s).unwrap();
        assert_eq!(c.apps[0].ports, vec![6001, 6200, 6300, 6400]);
        assert_eq!(c.apps[0].targets[2].host, "bad.target.for.testing");
        assert_eq!(c.summary(), "1 apps, 4 ports, 3 targets");
    }

    #[test]
    fn max_connections_per_client() {
        let c = parse(
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"MaxConnectionsPerClient":10}]}"#,
        )
        .unwrap();
        assert_eq!(c.apps[0].max_connections_per_client, Some(10));
        let c = parse(r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"]}]}"#).unwrap();
        assert_eq!(c.apps[0].max_connections_per_client, None);
        for bad in ["0", "-1", "1000001"] {
            let errs = parse(&format!(
                r#"{{"Apps":[{{"Name":"a","Ports":[1],"Targets":["h:1"],"MaxConnectionsPerClient":{bad}}}]}}"#
            ))
            .unwrap_err();
            assert_eq!(
                errs,
                [format!(
                    "app \"a\": MaxConnectionsPerClient: {bad} is not a number from 1 to 1000000"
                )]
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let s = r#"{"Apps": [
            {"Name": "a", "Ports": [0, 70000, 10], "Targets": ["x"], "Weight": 3},
            {"Name": "a", "Ports": [10], "Targets": []},
            {"Ports": [], "Targets": ["::1:80"]}], "Extra": 1}"#;
        let errs = parse(s).unwrap_err();
        let want = [
            "unknown key \"Extra\" at the top level",
            "app \"a\": unknown key \"Weight\"",
            "app \"a\": Ports: 0 is not a port",
            "app \"a\": Ports: 70000 is not a port",
            "app \"a\": Targets: \"x\" is not host:port",
            "app \"a\": Name: used by more than one app",
            "app \"a\": Ports: 10 is already used by app \"a\"",
            "app \"a\": Targets: missing or empty",
            "app \"#3\": Name: missing or empty",
            "app \"#3\": Ports: missing or empty",
            "app \"#3\": Targets: \"::1:80\" looks like an IPv6 address",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.contains(w)),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }
}
