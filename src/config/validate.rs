//! From the raw file to a `Config`: every problem found at once, each naming the app and the
//! field, or a config the proxy can run on.

use std::collections::BTreeSet;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::check::check_kind;
use crate::config::distinct::Distinct;
use crate::config::hostname::Pattern;
use crate::config::limits::NAME_MAX;
use crate::config::model::{
    App, Balance, Config, HealthCheck, ProxyProtocol, DEFAULT_CONNECT_ATTEMPTS,
};
use crate::config::ports::app_ports;
use crate::config::prefix::Prefix;
use crate::config::problem::{Problem, Problems};
use crate::config::raw::{Found, RawApp, RawConfig, RawHealthCheck, Shaped};
use crate::config::sharing::check_sharing;
use crate::config::target::{targets, TARGET_EXAMPLE};
use crate::config::types::{present, wrong, Typed};

/// What to write for the whole file, for `Apps`, and for one app, when it is something else.
const FILE_EXAMPLE: &str = r#"an object, as {"Apps": [...]}"#;
const APPS_EXAMPLE: &str =
    r#"a list of apps, as [{"Name": "web", "Ports": [80], "Targets": ["backend:80"]}]"#;
const APP_EXAMPLE: &str = r#"an app, as {"Name": "web", "Ports": [80], "Targets": ["backend:80"]}"#;

impl Config {
    pub(super) fn from_raw(raw: Shaped<RawConfig>) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems::default();
        let raw = match raw {
            Shaped::Is(raw) => raw,
            Shaped::Null => {
                let null = Found::Scalar(serde_json::Value::Null);
                return Err(vec![wrong(None, "the file", &null, FILE_EXAMPLE.into())]);
            }
            Shaped::Wrong(found) => {
                return Err(vec![wrong(None, "the file", &found, FILE_EXAMPLE.into())])
            }
        };
        for key in raw.keys.unknown {
            problems.push(Problem::UnknownKey { app: None, key });
        }
        for key in raw.keys.twice {
            problems.push(Problem::GivenTwice { app: None, key });
        }
        let raw_apps = match raw.apps {
            None | Some(Shaped::Null) => {
                problems.push(Problem::MissingApps);
                return Err(problems.into_vec());
            }
            Some(Shaped::Wrong(found)) => {
                problems.push(wrong(None, "Apps", &found, APPS_EXAMPLE.into()));
                return Err(problems.into_vec());
            }
            Some(Shaped::Is(list)) => list,
        };
        let mut earlier = Earlier {
            // A file of one app (a config directory's typical file) has no name to repeat.
            names: (raw_apps.len() > 1).then(BTreeSet::new),
            unusable: Vec::with_capacity(raw_apps.len()),
        };
        let mut apps: Vec<App> = Vec::with_capacity(raw_apps.len());
        for (i, entry) in raw_apps.into_iter().enumerate() {
            // An entry that is not an object has no name to go by: its position names it.
            let found = match entry {
                Shaped::Is(raw_app) => {
                    apps.push(earlier.app(i, *raw_app, &mut problems));
                    continue;
                }
                Shaped::Null => Found::Scalar(serde_json::Value::Null),
                Shaped::Wrong(found) => found,
            };
            problems.push(wrong(
                None,
                &format!("Apps[{i}]"),
                &found,
                APP_EXAMPLE.into(),
            ));
        }
        check_sharing(&apps, &earlier.unusable, &mut problems);
        if problems.is_empty() {
            // A new vector, not `collect`'s in-place reuse of the `App`s' buffer: that keeps
            // its whole size (176 bytes an app) under 8-byte `Arc`s for as long as the config
            // lives (a directory keeps each file's).
            let mut shared = Vec::with_capacity(apps.len());
            shared.extend(apps.into_iter().map(Arc::new));
            Ok(Config { apps: shared })
        } else {
            Err(problems.into_vec())
        }
    }
}

/// What checking an app needs to know of the apps before it in the file.
struct Earlier {
    /// The names so far; None when the file lists one app (or none).
    names: Option<BTreeSet<String>>,
    /// By position: the app's Addresses were given but none is usable. Such an app is left
    /// out of the sharing checks (its addresses are already a problem) rather than taken for
    /// "every address" there.
    unusable: Vec<bool>,
}

impl Earlier {
    /// Check the app at position `i`, recording what is wrong; the app as far as it is valid.
    fn app(&mut self, i: usize, raw_app: RawApp, problems: &mut Problems) -> App {
        let name = self.name(i, raw_app.name, problems);
        for key in raw_app.keys.unknown {
            problems.push(Problem::UnknownKey {
                app: Some(name.clone()),
                key,
            });
        }
        for key in raw_app.keys.twice {
            problems.push(Problem::GivenTwice {
                app: Some(name.clone()),
                key,
            });
        }
        let mut typed = Typed {
            app: Some(&name),
            problems,
        };
        let ports = match present(raw_app.ports) {
            None => {
                typed.missing("Ports");
                Vec::new()
            }
            Some(v) => match typed.list("Ports", v, r#"a list of ports, as [80, "8000-8010"]"#) {
                Some(list) if list.is_empty() => {
                    typed.missing("Ports");
                    Vec::new()
                }
                Some(list) => app_ports(&name, &list, typed.problems),
                None => Vec::new(),
            },
        };
        let addresses_given = present(raw_app.addresses);
        let given = addresses_given.is_some();
        let addresses = addresses_given.map_or_else(Vec::new, |v| {
            let list = typed.nonempty_strings(
                "Addresses",
                v,
                r#"an address or prefix in quotes, as "192.0.2.10" or "10.0.0.0/8""#,
            );
            app_addresses(&name, list, typed.problems)
        });
        self.unusable.push(given && addresses.is_empty());
        let hostnames = present(raw_app.hostnames).map_or_else(Vec::new, |v| {
            let list = typed.nonempty_strings(
                "Hostnames",
                v,
                r#"a hostname in quotes, as "example.com" or "*.example.com""#,
            );
            app_hostnames(&name, list, typed.problems)
        });
        let targets = match raw_app.targets {
            None | Some(Shaped::Null) => {
                typed.missing("Targets");
                Vec::new()
            }
            Some(Shaped::Is(list)) if list.is_empty() => {
                typed.missing("Targets");
                Vec::new()
            }
            Some(Shaped::Is(list)) => targets(&name, list, typed.problems),
            Some(Shaped::Wrong(found)) => {
                let write = match &found {
                    Found::Scalar(Value::String(s)) => format!("[{s:?}]"),
                    _ => format!("a list, each entry {TARGET_EXAMPLE}"),
                };
                typed
                    .problems
                    .push(wrong(Some(&name), "Targets", &found, write));
                Vec::new()
            }
        };
        let mut opts = Options { typed };
        let health = opts.health(raw_app.health_check, &hostnames).shared();
        let balance = opts.balance(raw_app.balance);
        let connect_attempts = opts
            .int(
                "ConnectAttempts",
                raw_app.connect_attempts,
                1,
                10,
                "a number from 1 to 10",
            )
            .map_or(DEFAULT_CONNECT_ATTEMPTS, |n| n as u32);
        let max_connections = opts
            .int(
                "MaxConnections",
                raw_app.max_connections,
                1,
                1_000_000,
                "a number from 1 to 1000000",
            )
            .map(|n| n as u32);
        let max_connections_per_client = opts
            .int(
                "MaxConnectionsPerClient",
                raw_app.max_connections_per_client,
                1,
                1_000_000,
                "a number from 1 to 1000000",
            )
            .map(|n| n as u32);
        let proxy_protocol = opts.proxy_protocol(raw_app.proxy_protocol);
        App {
            name,
            // Boxed slices, not vectors: 8 bytes less each, an app's record kept per app.
            ports: ports.into(),
            addresses: addresses.into(),
            hostnames: hostnames.into(),
            targets: targets.into(),
            health,
            balance,
            connect_attempts,
            max_connections,
            max_connections_per_client,
            proxy_protocol,
        }
    }

    /// The app's name. An app without a usable one is still checked, under a name that says
    /// where it is.
    fn name(&mut self, i: usize, raw: Option<Value>, problems: &mut Problems) -> String {
        let placeholder = || format!("#{}", i + 1);
        let name = match present(raw) {
            Some(Value::String(n)) if !n.trim().is_empty() => {
                if !is_valid_name(&n) {
                    problems.push(Problem::BadName { name: n.clone() });
                }
                n
            }
            None | Some(Value::String(_)) => {
                problems.push(Problem::Missing {
                    app: placeholder(),
                    field: "Name",
                });
                placeholder()
            }
            Some(other) => {
                let placeholder = placeholder();
                let mut typed = Typed {
                    app: Some(&placeholder),
                    problems,
                };
                typed.string("Name", Some(other), r#"a name in quotes, as "web""#);
                placeholder
            }
        };
        if let Some(names) = &mut self.names {
            if !names.insert(name.clone()) {
                problems.push(Problem::DuplicateApp { name: name.clone() });
            }
        }
        name
    }
}

fn app_addresses(app: &str, list: Vec<String>, problems: &mut Problems) -> Vec<Prefix> {
    each_once(
        app,
        "Addresses",
        list,
        problems,
        Prefix::parse,
        |value, why| Problem::BadAddress {
            app: app.to_owned(),
            value,
            why,
        },
    )
}

fn app_hostnames(app: &str, list: Vec<String>, problems: &mut Problems) -> Vec<Pattern> {
    each_once(
        app,
        "Hostnames",
        list,
        problems,
        Pattern::parse,
        |value, why| Problem::BadHostname {
            app: app.to_owned(),
            value,
            why,
        },
    )
}

/// The strings of `list` (the app's `field`) parsed, each value once in the order given: a
/// problem for each string that does not parse (`bad`) and for each that parses to a value
/// given before.
fn each_once<T: Eq + Hash + Clone, E>(
    app: &str,
    field: &'static str,
    list: Vec<String>,
    problems: &mut Problems,
    parse: impl Fn(&str) -> Result<T, E>,
    bad: impl Fn(String, E) -> Problem,
) -> Vec<T> {
    let mut out = Distinct::with_capacity(list.len());
    for s in list {
        match parse(&s) {
            Ok(v) => {
                if !out.insert(v) {
                    problems.push(Problem::Duplicate {
                        app: app.to_owned(),
                        field,
                        value: s,
                    });
                }
            }
            Err(why) => problems.push(bad(s, why)),
        }
    }
    out.into_vec()
}

/// Checks an app's optional settings, recording what is wrong.
struct Options<'a> {
    typed: Typed<'a>,
}

impl Options<'_> {
    fn bad(&mut self, field: &'static str, value: String, expected: &'static str) {
        let app = self.typed.app.unwrap_or_default().to_owned();
        self.typed.problems.push(Problem::BadValue {
            app,
            field,
            value,
            expected,
        });
    }

    /// `value` if it is a whole number within `min..=max`; None (and a problem) if not, None
    /// if absent.
    fn int(
        &mut self,
        field: &'static str,
        value: Option<Value>,
        min: i64,
        max: i64,
        expected: &'static str,
    ) -> Option<i64> {
        match self.typed.int(field, value, min..=max, expected)? {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            Ok(v) => {
                self.bad(field, v.to_string(), expected);
                None
            }
            Err(text) => {
                self.bad(field, text, expected);
                None
            }
        }
    }

    fn balance(&mut self, raw: Option<Value>) -> Balance {
        const CHOICES: &str = "\"random\", \"p2c\" or \"round-robin\"";
        match self.typed.string("Balance", raw, CHOICES).as_deref() {
            None | Some("p2c") => Balance::P2c,
            Some("random") => Balance::Random,
            Some("round-robin") => Balance::RoundRobin,
            Some(other) => {
                self.bad(
                    "Balance",
                    format!("\"{other}\""),
                    "\"random\", \"p2c\" or \"round-robin\"",
                );
                Balance::P2c
            }
        }
    }

    fn proxy_protocol(&mut self, raw: Option<Value>) -> Option<ProxyProtocol> {
        match self
            .typed
            .string("ProxyProtocol", raw, "\"v1\" or \"v2\"")
            .as_deref()
        {
            None => None,
            Some("v1") => Some(ProxyProtocol::V1),
            Some("v2") => Some(ProxyProtocol::V2),
            Some(other) => {
                self.bad("ProxyProtocol", format!("\"{other}\""), "\"v1\" or \"v2\"");
                None
            }
        }
    }

    fn health(
        &mut self,
        raw: Option<Shaped<RawHealthCheck>>,
        hostnames: &[Pattern],
    ) -> HealthCheck {
        let mut h = HealthCheck::default();
        let raw = match raw {
            None | Some(Shaped::Null) => return h,
            Some(Shaped::Wrong(found)) => {
                let p = wrong(
                    self.typed.app,
                    "HealthCheck",
                    &found,
                    r#"an object, as {"IntervalMs": 2000, "Fall": 3}"#.into(),
                );
                self.typed.problems.push(p);
                return h;
            }
            Some(Shaped::Is(raw)) => raw,
        };
        let mut raw = raw;
        let app = self.typed.app.map(str::to_owned);
        for key in std::mem::take(&mut raw.keys.unknown) {
            self.typed.problems.push(Problem::UnknownKey {
                app: app.clone(),
                key: format!("HealthCheck.{key}"),
            });
        }
        for key in std::mem::take(&mut raw.keys.twice) {
            self.typed.problems.push(Problem::GivenTwice {
                app: app.clone(),
                key: format!("HealthCheck.{key}"),
            });
        }
        let ms = |n: i64| Duration::from_millis(n as u64);
        if let Some(n) = self.int(
            "HealthCheck.IntervalMs",
            raw.interval_ms.take(),
            100,
            3_600_000,
            "a number of milliseconds from 100 to 3600000",
        ) {
            h.interval = ms(n);
        }
        if let Some(n) = self.int(
            "HealthCheck.TimeoutMs",
            raw.timeout_ms.take(),
            10,
            600_000,
            "a number of milliseconds from 10 to 600000",
        ) {
            h.timeout = ms(n);
        }
        if let Some(n) = self.int(
            "HealthCheck.Fall",
            raw.fall.take(),
            1,
            100,
            "a number from 1 to 100",
        ) {
            h.fall = n as u32;
        }
        if let Some(n) = self.int(
            "HealthCheck.Rise",
            raw.rise.take(),
            1,
            100,
            "a number from 1 to 100",
        ) {
            h.rise = n as u32;
        }
        h.kind = check_kind(&mut self.typed, &mut raw, hostnames);
        h
    }
}

/// An app name: 1-64 characters, each an ASCII letter, digit, `.`, `_` or `-`. Names go into
/// log lines, the status page and metric labels as they are; this keeps them one token that
/// cannot forge a line, a field or a label.
pub fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
