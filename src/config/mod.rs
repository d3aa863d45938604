//! The config file: its raw serde shape, the validated `Config` the proxy runs on, and the
//! diff between two configs that a reload applies.
//!
//! Parse, don't validate: `RawConfig` mirrors the JSON exactly (so the original challenge file
//! loads byte for byte), and `Config::from_raw` turns it into a `Config` or into every problem
//! found at once. Nothing but a `Config` ever reaches the running proxy, so a bad reload cannot
//! touch a live listener.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The file as written. Unknown keys are captured rather than refused by serde, so that the
/// validator can report all of them, with the app they are in, instead of stopping at the first.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    apps: Option<Vec<RawApp>>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawApp {
    name: Option<String>,
    /// Wider than u16 so that 0 and 70000 get our message, not serde's.
    ports: Option<Vec<i64>>,
    targets: Option<Vec<String>>,
    health_check: Option<RawHealthCheck>,
    balance: Option<String>,
    connect_attempts: Option<i64>,
    max_connections: Option<i64>,
    proxy_protocol: Option<String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHealthCheck {
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    fall: Option<i64>,
    rise: Option<i64>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// A validated config: app names unique, every port in 1..=65535 and used once, every app with
/// at least one port and one well-formed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    pub ports: Vec<u16>,
    pub targets: Vec<Target>,
    pub health: HealthCheck,
    pub balance: Balance,
    /// Distinct targets tried for one client connection before it is closed.
    pub connect_attempts: usize,
    /// Open connections this app may have at once; None: only the global bound applies.
    pub max_connections: Option<usize>,
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
    /// A port listed twice, within one app (`first` is None) or across two.
    DuplicatePort {
        port: u16,
        app: String,
        first: Option<String>,
    },
    /// A target that is not `host:port`.
    BadTarget {
        app: String,
        target: String,
        why: &'static str,
    },
    /// A target that is the proxy's own frontend: a local address (or `localhost`) on one of
    /// its ports (see `loops`).
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
            Problem::NotAFile(kind) => write!(
                f,
                "cannot read: it is {kind}, not a regular file"
            ),
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
            Problem::DuplicateApp { name } => {
                write!(f, "app {name:?}: Name: used by more than one app")
            }
            Problem::BadName { name } => write!(
                f,
                "app {name:?}: Name: must be 1-{NAME_MAX} characters, each a letter, a digit, '.', '_' or '-'"
            ),
            Problem::PortOutOfRange { app, port } => {
                write!(f, "app {app:?}: Ports: {port} is not a port (1-65535)")
            }
            Problem::DuplicatePort {
                port,
                app,
                first: None,
            } => {
                write!(f, "app {app:?}: Ports: {port} is listed twice")
            }
            Problem::DuplicatePort {
                port,
                app,
                first: Some(first),
            } => write!(
                f,
                "app {app:?}: Ports: {port} is already used by app {first:?}"
            ),
            Problem::BadTarget { app, target, why } => {
                write!(f, "app {app:?}: Targets: {target:?} {why}")
            }
            Problem::Loop { app, target, port } => write!(
                f,
                "app {app:?}: Targets: {target:?} is this proxy's own frontend (port {port} on a local address): connections to it would loop back into the proxy"
            ),
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

const APP_KEYS: &str = "Name, Ports, Targets, HealthCheck, Balance, ConnectAttempts, \
                        MaxConnections, ProxyProtocol";

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
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_file(path).map_err(|p| ConfigError {
            path: path.to_owned(),
            problems: vec![p],
        })?;
        Config::parse(path, &bytes)
    }

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

    fn from_raw(raw: RawConfig) -> Result<Config, Vec<Problem>> {
        let mut problems = Vec::new();
        for key in raw.unknown.keys() {
            problems.push(Problem::UnknownKey {
                app: None,
                key: key.clone(),
            });
        }
        let Some(raw_apps) = raw.apps else {
            problems.push(Problem::MissingApps);
            return Err(problems);
        };

        let mut names = BTreeSet::new();
        // Which app (by position, as names may repeat) took each port first.
        let mut port_owner: HashMap<u16, (usize, String)> = HashMap::new();
        let mut apps = Vec::with_capacity(raw_apps.len());
        for (i, raw_app) in raw_apps.into_iter().enumerate() {
            // An app without a usable name is still checked, under a name that says where it is.
            let name = match raw_app.name {
                Some(n) if !n.trim().is_empty() => {
                    if !is_valid_name(&n) {
                        problems.push(Problem::BadName { name: n.clone() });
                    }
                    n
                }
                _ => {
                    let placeholder = format!("#{}", i + 1);
                    problems.push(Problem::Missing {
                        app: placeholder.clone(),
                        field: "Name",
                    });
                    placeholder
                }
            };
            if !names.insert(name.clone()) {
                problems.push(Problem::DuplicateApp { name: name.clone() });
            }
            for key in raw_app.unknown.keys() {
                problems.push(Problem::UnknownKey {
                    app: Some(name.clone()),
                    key: key.clone(),
                });
            }

            let mut ports = Vec::new();
            match raw_app.ports {
                Some(list) if !list.is_empty() => {
                    for p in list {
                        let Ok(port) = u16::try_from(p) else {
                            problems.push(Problem::PortOutOfRange {
                                app: name.clone(),
                                port: p,
                            });
                            continue;
                        };
                        if port == 0 {
                            problems.push(Problem::PortOutOfRange {
                                app: name.clone(),
                                port: p,
                            });
                            continue;
                        }
                        match port_owner.get(&port) {
                            Some((owner, first)) => problems.push(Problem::DuplicatePort {
                                port,
                                app: name.clone(),
                                first: (*owner != i).then(|| first.clone()),
                            }),
                            None => {
                                port_owner.insert(port, (i, name.clone()));
                                ports.push(port);
                            }
                        }
                    }
                }
                _ => problems.push(Problem::Missing {
                    app: name.clone(),
                    field: "Ports",
                }),
            }

            let mut targets = Vec::new();
            match raw_app.targets {
                Some(list) if !list.is_empty() => {
                    for t in list {
                        match parse_target(&t) {
                            Ok(target) => targets.push(target),
                            Err(why) => problems.push(Problem::BadTarget {
                                app: name.clone(),
                                target: t,
                                why,
                            }),
                        }
                    }
                }
                _ => problems.push(Problem::Missing {
                    app: name.clone(),
                    field: "Targets",
                }),
            }
            let mut opts = Options {
                app: &name,
                problems: &mut problems,
            };
            let health = opts.health(raw_app.health_check);
            let balance = match raw_app.balance.as_deref() {
                None | Some("p2c") => Balance::P2c,
                Some("random") => Balance::Random,
                Some("round-robin") => Balance::RoundRobin,
                Some(other) => {
                    opts.bad(
                        "Balance",
                        format!("\"{other}\""),
                        "\"random\", \"p2c\" or \"round-robin\"",
                    );
                    Balance::P2c
                }
            };
            let connect_attempts = opts
                .int(
                    "ConnectAttempts",
                    raw_app.connect_attempts,
                    1,
                    10,
                    "a number from 1 to 10",
                )
                .map_or(DEFAULT_CONNECT_ATTEMPTS, |n| n as usize);
            let max_connections = opts
                .int(
                    "MaxConnections",
                    raw_app.max_connections,
                    1,
                    1_000_000,
                    "a number from 1 to 1000000",
                )
                .map(|n| n as usize);
            let proxy_protocol = match raw_app.proxy_protocol.as_deref() {
                None => None,
                Some("v1") => Some(ProxyProtocol::V1),
                Some("v2") => Some(ProxyProtocol::V2),
                Some(other) => {
                    opts.bad("ProxyProtocol", format!("\"{other}\""), "\"v1\" or \"v2\"");
                    None
                }
            };
            apps.push(App {
                name,
                ports,
                targets,
                health,
                balance,
                connect_attempts,
                max_connections,
                proxy_protocol,
            });
        }

        if problems.is_empty() {
            Ok(Config { apps })
        } else {
            Err(problems)
        }
    }

    /// Every configured port, each exactly once.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.apps.iter().flat_map(|a| a.ports.iter().copied())
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

/// Checks an app's optional settings, recording what is wrong.
struct Options<'a> {
    app: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl Options<'_> {
    fn bad(&mut self, field: &'static str, value: String, expected: &'static str) {
        self.problems.push(Problem::BadValue {
            app: self.app.to_owned(),
            field,
            value,
            expected,
        });
    }

    /// `value` if it is within `min..=max`; None (and a problem) if not, None if absent.
    fn int(
        &mut self,
        field: &'static str,
        value: Option<i64>,
        min: i64,
        max: i64,
        expected: &'static str,
    ) -> Option<i64> {
        let v = value?;
        if (min..=max).contains(&v) {
            Some(v)
        } else {
            self.bad(field, v.to_string(), expected);
            None
        }
    }

    fn health(&mut self, raw: Option<RawHealthCheck>) -> HealthCheck {
        let mut h = HealthCheck::default();
        let Some(raw) = raw else { return h };
        for key in raw.unknown.keys() {
            self.problems.push(Problem::UnknownKey {
                app: Some(self.app.to_owned()),
                key: format!("HealthCheck.{key}"),
            });
        }
        let ms = |n: i64| Duration::from_millis(n as u64);
        if let Some(n) = self.int(
            "HealthCheck.IntervalMs",
            raw.interval_ms,
            100,
            3_600_000,
            "a number of milliseconds from 100 to 3600000",
        ) {
            h.interval = ms(n);
        }
        if let Some(n) = self.int(
            "HealthCheck.TimeoutMs",
            raw.timeout_ms,
            10,
            600_000,
            "a number of milliseconds from 10 to 600000",
        ) {
            h.timeout = ms(n);
        }
        if let Some(n) = self.int(
            "HealthCheck.Fall",
            raw.fall,
            1,
            100,
            "a number from 1 to 100",
        ) {
            h.fall = n as u32;
        }
        if let Some(n) = self.int(
            "HealthCheck.Rise",
            raw.rise,
            1,
            100,
            "a number from 1 to 100",
        ) {
            h.rise = n as u32;
        }
        h
    }
}

/// Longest app name accepted.
pub const NAME_MAX: usize = 64;

/// An app name: 1-64 characters, each an ASCII letter, digit, `.`, `_` or `-`. Names go into
/// log lines, the status page and metric labels as they are; this keeps them one token that
/// cannot forge a line, a field or a label.
pub fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parse `host:port`. The host is a DNS name, an IPv4 address, or a bracketed IPv6 address.
pub fn parse_target(s: &str) -> Result<Target, &'static str> {
    const SHAPE: &str = "is not host:port (e.g. \"backend.internal:7001\" or \"[::1]:7001\")";
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once("]:") else {
            return Err(SHAPE);
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address between the brackets");
        }
        (v6, port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(SHAPE);
        };
        if host.contains(':') {
            return Err("looks like an IPv6 address: write it in brackets, as \"[::1]:7001\"");
        }
        if host.is_empty() {
            return Err(SHAPE);
        }
        // A host whose last label is a number is not a DNS name but an IPv4 address; the
        // resolver would also take legacy forms ("127.1", "0x7f.1", octal "010.0.0.5" as
        // 8.0.0.5), so only the plain dotted form is accepted.
        let last = host.rsplit('.').next().unwrap_or(host);
        let numeric = !last.is_empty()
            && (last.bytes().all(|b| b.is_ascii_digit())
                || last.starts_with("0x")
                || last.starts_with("0X"));
        if numeric && host.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(
                "has an IPv4 address that is not four decimal numbers 0-255 without leading zeros",
            );
        }
        let name_ok = host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !name_ok {
            return Err("has a host that is not a DNS name or IP address");
        }
        (host, port)
    };
    // A leading zero is refused rather than read as decimal: `041901` is 41901 to us but
    // reads as octal to some tools, and a port written two ways hides typos.
    if port.len() > 1 && port.starts_with('0') {
        return Err("has a port with a leading zero (write the plain number, 1-65535)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(Target {
            host: host.to_owned(),
            port: p,
        }),
        _ => Err("has a port that is not a number in 1-65535"),
    }
}

/// What a reload changes, for applying it as a diff and for the log line that says so.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub ports_added: Vec<u16>,
    pub ports_removed: Vec<u16>,
    pub apps_added: Vec<String>,
    pub apps_removed: Vec<String>,
    /// Apps present in both whose ports or targets differ.
    pub apps_changed: Vec<String>,
}

impl Diff {
    pub fn between(old: &Config, new: &Config) -> Diff {
        let old_ports: BTreeSet<u16> = old.ports().collect();
        let new_ports: BTreeSet<u16> = new.ports().collect();
        let old_apps: BTreeMap<&str, &App> =
            old.apps.iter().map(|a| (a.name.as_str(), a)).collect();
        let new_apps: BTreeMap<&str, &App> =
            new.apps.iter().map(|a| (a.name.as_str(), a)).collect();
        Diff {
            ports_added: new_ports.difference(&old_ports).copied().collect(),
            ports_removed: old_ports.difference(&new_ports).copied().collect(),
            apps_added: new_apps
                .keys()
                .filter(|n| !old_apps.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            apps_removed: old_apps
                .keys()
                .filter(|n| !new_apps.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            apps_changed: new_apps
                .iter()
                .filter(|(n, a)| old_apps.get(*n).is_some_and(|old| old != *a))
                .map(|(n, _)| n.to_string())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(items: &[T]) -> String {
            let shown: Vec<String> = items.iter().take(20).map(|i| i.to_string()).collect();
            let more = items.len().saturating_sub(20);
            if more > 0 {
                format!("{} (+{more} more)", shown.join(","))
            } else {
                shown.join(",")
            }
        }
        write!(
            f,
            "ports_added={} ports_removed={} apps_added={} apps_removed={} apps_changed={}",
            self.ports_added.len(),
            self.ports_removed.len(),
            self.apps_added.len(),
            self.apps_removed.len(),
            self.apps_changed.len()
        )?;
        for (label, items) in [
            ("added", list(&self.ports_added)),
            ("removed", list(&self.ports_removed)),
        ] {
            if !items.is_empty() {
                write!(f, " {label}=[{items}]")?;
            }
        }
        for (label, items) in [
            ("new", list(&self.apps_added)),
            ("gone", list(&self.apps_removed)),
            ("changed", list(&self.apps_changed)),
        ] {
            if !items.is_empty() {
                write!(f, " {label}=[{items}]")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, Vec<String>> {
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

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("[::1]:7001").unwrap().to_string(),
            "[::1]:7001"
        );
        assert_eq!(parse_target("10.0.0.1:80").unwrap().host, "10.0.0.1");
        assert!(parse_target("host:0").is_err());
        assert!(parse_target("host:+80").is_err());
        assert!(parse_target("host:65536").is_err());
        assert!(parse_target("host:041901").is_err());
        assert!(parse_target("host:080").is_err());
        assert!(parse_target("[zz]:80").is_err());
        assert!(parse_target("bad host:80").is_err());
        assert!(parse_target(":80").is_err());
        for legacy in [
            "127.1:80",
            "0x7f.1:80",
            "010.000.000.005:5432",
            "1.2.3.256:80",
        ] {
            assert!(parse_target(legacy).is_err(), "{legacy}");
        }
        assert!(parse_target("10.0.0.5:5432").is_ok());
    }

    #[test]
    fn names() {
        for ok in ["a", "six-thousand", "db_1.prod", &"x".repeat(64)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "a\0",
            "tab\there",
            "é",
            "a/b",
            "a=b",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        let errs = parse(r#"{"Apps":[{"Name":"a\nINFO forged","Ports":[1],"Targets":["h:1"]}]}"#)
            .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("Name: must be 1-64 characters"),
            "{errs:?}"
        );
        // Escaped: the problem stays on one line.
        assert!(!errs[0].contains('\n'), "{errs:?}");
    }

    #[test]
    fn diff() {
        let a = parse(r#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1"]}]}"#).unwrap();
        let b = parse(r#"{"Apps":[{"Name":"a","Ports":[2,3],"Targets":["h:1"]},{"Name":"b","Ports":[4],"Targets":["h:2"]}]}"#).unwrap();
        let d = Diff::between(&a, &b);
        assert_eq!(d.ports_added, vec![3, 4]);
        assert_eq!(d.ports_removed, vec![1]);
        assert_eq!(d.apps_added, vec!["b"]);
        assert_eq!(d.apps_changed, vec!["a"]);
        assert!(Diff::between(&a, &a).is_empty());
    }
}
