//! The validated config the proxy runs on: apps with their ports, addresses, hostnames,
//! targets and settings. Only `Config::parse` (through `validate`) makes one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::hostname::Pattern;
use crate::config::prefix::Prefix;
use crate::config::problem::{ConfigError, Problem};
use crate::config::raw::{RawConfig, Shaped};
use crate::config::syntax;

/// Default for `ConnectAttempts`.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;

/// A validated config: app names unique, every port in 1..=65535, apps sharing an (address
/// prefix, port) told apart by Hostnames, every app with at least one port and one well-formed
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Shared, not copied: a directory's file states, the config plane and each reload's
    /// config hold the same apps (at 200,000 apps a copy each was most of a reload's work
    /// and memory). Compare with `Arc::ptr_eq` first: the same app is the same `Arc`.
    pub apps: Vec<Arc<App>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    /// Every port, ranges expanded, in the order given, each once.
    pub ports: Box<[u16]>,
    /// The local addresses the app's ports answer on; empty: every address.
    pub addresses: Box<[Prefix]>,
    /// TLS server names that pick this app among those sharing an address and port; empty:
    /// the app takes what no other app's names claim there (the default).
    pub hostnames: Box<[Pattern]>,
    pub targets: Box<[TargetSpec]>,
    /// Shared: every app with the default checks holds the same one (see
    /// `HealthCheck::shared`), and so do the app's targets' live states.
    pub health: Arc<HealthCheck>,
    pub balance: Balance,
    /// Distinct targets tried for one client connection before it is closed. These three
    /// are 32-bit (their bounds are 10 and 1,000,000): an app's record 24 bytes smaller, a
    /// smaller malloc block per app.
    pub connect_attempts: u32,
    /// Open connections this app may have at once; None: only the global bound applies.
    pub max_connections: Option<u32>,
    /// Open connections one client address may have to this app at once; None: only
    /// `--max-connections-per-client` applies.
    pub max_connections_per_client: Option<u32>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Active health checking of an app's targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// How often a down target is checked; an up one is checked at `UP_CHECK_FACTOR` times this.
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed checks that mark an up target down.
    pub fall: u32,
    /// Consecutive successful checks that bring a down target up.
    pub rise: u32,
    /// What a check does once connected.
    pub kind: CheckKind,
}

/// What a health check asks of a target (`HealthCheck.Kind`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum CheckKind {
    /// The connect alone.
    #[default]
    Tcp,
    /// An HTTP/1.1 request; the status line's code decides.
    Http(HttpCheck),
    /// A TLS ClientHello; a handshake record (a ServerHello) in answer passes.
    Tls {
        /// The server name sent: `ServerName`, else the app's first exact Hostname; None: the
        /// target's host if it is a name (an address is never sent as one), else none.
        server_name: Option<String>,
    },
}

impl CheckKind {
    /// Its name in the config, the logs and the metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http(_) => "http",
            CheckKind::Tls { .. } => "tls",
        }
    }
}

/// `HealthCheck.Kind` "http": `GET Path HTTP/1.1`, up when the status is in `expect`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    /// Starts with `/`, printable ASCII without spaces.
    pub path: String,
    /// The `Host` header; None: the target as written (`host:port`).
    pub host: Option<String>,
    /// The status codes that pass, both ends included.
    pub expect: (u16, u16),
}

/// `ExpectStatus` when none is given: success and redirects.
pub const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);

impl HealthCheck {
    /// `self`, shared: the default settings (almost every app's) are one value for the whole
    /// process instead of a copy per app and per target (at 200,000 apps, tens of MB).
    pub fn shared(self) -> Arc<HealthCheck> {
        static DEFAULT: std::sync::OnceLock<Arc<HealthCheck>> = std::sync::OnceLock::new();
        let default = DEFAULT.get_or_init(|| Arc::new(HealthCheck::default()));
        if self == **default {
            Arc::clone(default)
        } else {
            Arc::new(self)
        }
    }
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(2000),
            timeout: Duration::from_millis(1000),
            fall: 1,
            rise: 1,
            kind: CheckKind::Tcp,
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

/// The largest weight a target takes (the config's 1..=256; an operator may also set 0 at run
/// time, which takes no new connections).
pub const MAX_WEIGHT: u32 = 256;

/// A target as an app lists it: where it is, and how it takes connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub target: Target,
    /// 1..=MAX_WEIGHT; 1 when not given.
    pub weight: u32,
    /// Gets connections only when no other target is usable.
    pub backup: bool,
    /// Starts (or goes, on a reload that sets it) in the drain state.
    pub drain: bool,
}

impl TargetSpec {
    /// A target written as `"host:port"`: weight 1, neither backup nor drained.
    pub fn plain(target: Target) -> TargetSpec {
        TargetSpec {
            target,
            weight: 1,
            backup: false,
            drain: false,
        }
    }
}

/// A backend address as configured. The host stays a name: it is resolved at each connect, so a
/// target whose address changes is followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// A DNS name, an IPv4 address, or an IPv6 address (stored without brackets). Shared:
    /// the target's live state (a `Backend`, kept per app and target) holds the same text.
    pub host: Arc<str>,
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

impl Config {
    /// Validate `bytes` as the contents of `path` (the path only names the file in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::parse_with(bytes, || path.to_owned())
    }

    /// `parse`, the path for messages made only for a config that has problems (a config
    /// directory's file path is a join that start-up would otherwise make 200,000 times).
    pub fn parse_with(bytes: &[u8], path: impl Fn() -> PathBuf) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            path: path(),
            problems,
        };
        if let Some(s) = syntax::precheck(bytes) {
            return Err(fail(vec![Problem::Syntax(s)]));
        }
        let raw: Shaped<RawConfig> = serde_json::from_slice(bytes)
            .map_err(|e| fail(vec![Problem::Syntax(syntax::from_serde(bytes, &e))]))?;
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
                for &p in prefixes {
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

/// Every IPv4 and every IPv6 address: where an app without `Addresses` answers.
static EVERY_ADDRESS: [Prefix; 2] = [Prefix::ALL_V4, Prefix::ALL_V6];

/// The prefixes an app's ports answer on: its `Addresses`, or every IPv4 and IPv6 address.
/// Borrowed, not a new list: a start at 200,000 apps asks this of each app some ten times.
pub fn app_prefixes(app: &App) -> &[Prefix] {
    if app.addresses.is_empty() {
        &EVERY_ADDRESS
    } else {
        &app.addresses
    }
}
