//! From the raw file to a `Config`: every problem found at once, each naming the app and the
//! field, or a config the proxy can run on.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::config::hostname::Pattern;
use crate::config::limits::NAME_MAX;
use crate::config::model::{
    App, Balance, Config, HealthCheck, ProxyProtocol, DEFAULT_CONNECT_ATTEMPTS,
};
use crate::config::ports::app_ports;
use crate::config::prefix::Prefix;
use crate::config::problem::Problem;
use crate::config::raw::{RawApp, RawConfig, RawHealthCheck};
use crate::config::sharing::check_sharing;
use crate::config::target::targets;

impl Config {
    pub(super) fn from_raw(raw: RawConfig) -> Result<Config, Vec<Problem>> {
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
        let mut earlier = Earlier::default();
        let apps: Vec<App> = raw_apps
            .into_iter()
            .enumerate()
            .map(|(i, raw_app)| earlier.app(i, raw_app, &mut problems))
            .collect();
        check_sharing(&apps, &earlier.unusable, &mut problems);
        if problems.is_empty() {
            Ok(Config { apps })
        } else {
            Err(problems)
        }
    }
}

/// What checking an app needs to know of the apps before it in the file.
#[derive(Default)]
struct Earlier {
    names: BTreeSet<String>,
    /// By position: the app's Addresses were given but none is usable. Such an app is left
    /// out of the sharing checks (its addresses are already a problem) rather than taken for
    /// "every address" there.
    unusable: Vec<bool>,
}

impl Earlier {
    /// Check the app at position `i`, recording what is wrong; the app as far as it is valid.
    fn app(&mut self, i: usize, raw_app: RawApp, problems: &mut Vec<Problem>) -> App {
        let name = self.name(i, raw_app.name, problems);
        for key in raw_app.unknown.keys() {
            problems.push(Problem::UnknownKey {
                app: Some(name.clone()),
                key: key.clone(),
            });
        }
        let ports = match raw_app.ports {
            Some(list) if !list.is_empty() => app_ports(&name, &list, problems),
            _ => {
                problems.push(Problem::Missing {
                    app: name.clone(),
                    field: "Ports",
                });
                Vec::new()
            }
        };
        let addresses_given = raw_app.addresses.is_some();
        let addresses = app_addresses(&name, raw_app.addresses, problems);
        self.unusable.push(addresses_given && addresses.is_empty());
        let hostnames = app_hostnames(&name, raw_app.hostnames, problems);
        let targets = targets(&name, raw_app.targets, problems);
        let mut opts = Options {
            app: &name,
            problems,
        };
        let health = opts.health(raw_app.health_check);
        let balance = opts.balance(raw_app.balance.as_deref());
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
        let max_connections_per_client = opts
            .int(
                "MaxConnectionsPerClient",
                raw_app.max_connections_per_client,
                1,
                1_000_000,
                "a number from 1 to 1000000",
            )
            .map(|n| n as usize);
        let proxy_protocol = opts.proxy_protocol(raw_app.proxy_protocol.as_deref());
        App {
            name,
            ports,
            addresses,
            hostnames,
            targets,
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
    fn name(&mut self, i: usize, raw: Option<String>, problems: &mut Vec<Problem>) -> String {
        let name = match raw {
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
        if !self.names.insert(name.clone()) {
            problems.push(Problem::DuplicateApp { name: name.clone() });
        }
        name
    }
}

fn app_addresses(app: &str, raw: Option<Vec<String>>, problems: &mut Vec<Problem>) -> Vec<Prefix> {
    let Some(list) = raw else { return Vec::new() };
    if list.is_empty() {
        problems.push(Problem::Missing {
            app: app.to_owned(),
            field: "Addresses",
        });
    }
    let mut out: Vec<Prefix> = Vec::new();
    for s in list {
        match Prefix::parse(&s) {
            Ok(p) if out.contains(&p) => problems.push(Problem::Duplicate {
                app: app.to_owned(),
                field: "Addresses",
                value: s,
            }),
            Ok(p) => out.push(p),
            Err(why) => problems.push(Problem::BadAddress {
                app: app.to_owned(),
                value: s,
                why,
            }),
        }
    }
    out
}

fn app_hostnames(app: &str, raw: Option<Vec<String>>, problems: &mut Vec<Problem>) -> Vec<Pattern> {
    let Some(list) = raw else { return Vec::new() };
    if list.is_empty() {
        problems.push(Problem::Missing {
            app: app.to_owned(),
            field: "Hostnames",
        });
    }
    let mut out: Vec<Pattern> = Vec::new();
    for s in list {
        match Pattern::parse(&s) {
            Ok(p) if out.contains(&p) => problems.push(Problem::Duplicate {
                app: app.to_owned(),
                field: "Hostnames",
                value: s,
            }),
            Ok(p) => out.push(p),
            Err(why) => problems.push(Problem::BadHostname {
                app: app.to_owned(),
                value: s,
                why,
            }),
        }
    }
    out
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

    fn balance(&mut self, raw: Option<&str>) -> Balance {
        match raw {
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

    fn proxy_protocol(&mut self, raw: Option<&str>) -> Option<ProxyProtocol> {
        match raw {
            None => None,
            Some("v1") => Some(ProxyProtocol::V1),
            Some("v2") => Some(ProxyProtocol::V2),
            Some(other) => {
                self.bad("ProxyProtocol", format!("\"{other}\""), "\"v1\" or \"v2\"");
                None
            }
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

/// An app name: 1-64 characters, each an ASCII letter, digit, `.`, `_` or `-`. Names go into
/// log lines, the status page and metric labels as they are; this keeps them one token that
/// cannot forge a line, a field or a label.
pub fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
