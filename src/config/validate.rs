//! From the raw file to a `Config`: every problem found at once, each naming the app and the
//! field, or a config the proxy can run on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::time::Duration;

use serde_json::Value;

use crate::config::hostname::Pattern;
use crate::config::prefix::Prefix;
use crate::config::raw::{RawApp, RawConfig, RawHealthCheck};
use crate::config::{
    app_prefixes, App, Balance, Config, HealthCheck, Problem, ProxyProtocol, Target,
    DEFAULT_CONNECT_ATTEMPTS, MAX_BINDINGS,
};

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

/// An app's `Ports`: numbers and `"A-B"` ranges, expanded, in the order given, each once.
/// Problems for what is not a port, and one problem listing every port given twice.
fn app_ports(app: &str, list: &[Value], problems: &mut Vec<Problem>) -> Vec<u16> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut twice = BTreeSet::new();
    for v in list {
        let range = match v {
            Value::Number(n) if n.as_i64().is_some() => match n.as_i64() {
                Some(p) if (1..=65535).contains(&p) => p as u16..=p as u16,
                _ => {
                    problems.push(Problem::PortOutOfRange {
                        app: app.to_owned(),
                        port: n.as_i64().unwrap_or_default(),
                    });
                    continue;
                }
            },
            Value::String(s) => match parse_port_range(s) {
                Ok(r) => r,
                Err(why) => {
                    problems.push(Problem::BadPortRange {
                        app: app.to_owned(),
                        value: s.clone(),
                        why,
                    });
                    continue;
                }
            },
            other => {
                problems.push(Problem::BadPortRange {
                    app: app.to_owned(),
                    value: other.to_string(),
                    why: "is not a port number or a range \"A-B\"",
                });
                continue;
            }
        };
        for p in range {
            if seen.insert(p) {
                order.push(p);
            } else {
                twice.insert(p);
            }
        }
    }
    if !twice.is_empty() {
        problems.push(Problem::DuplicatePort {
            ports: port_ranges(twice.iter().copied()),
            app: app.to_owned(),
        });
    }
    order
}

/// `"A-B"`: an inclusive range, 1 <= A <= B <= 65535. (A single port is written as a number.)
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, &'static str> {
    const SHAPE: &str =
        "is not a range \"A-B\" (e.g. \"20000-20999\"; write a single port as a number)";
    let num = |t: &str| -> Result<u32, &'static str> {
        if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SHAPE);
        }
        t.parse::<u32>().map_err(|_| SHAPE)
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => return Err(SHAPE),
    };
    if a == 0 || b == 0 || a > 65535 || b > 65535 {
        return Err("has a port outside 1-65535");
    }
    if a > b {
        return Err("runs backwards (write the lower port first)");
    }
    Ok(a as u16..=b as u16)
}

/// Ports written compactly: `80,443,20000-20999`.
pub fn port_ranges(ports: impl IntoIterator<Item = u16>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u16, u16)> = None;
    let flush = |run: Option<(u16, u16)>, out: &mut Vec<String>| match run {
        Some((a, b)) if a == b => out.push(a.to_string()),
        Some((a, b)) => out.push(format!("{a}-{b}")),
        None => {}
    };
    for p in ports {
        run = match run {
            Some((a, b)) if b.checked_add(1) == Some(p) => Some((a, p)),
            other => {
                flush(other, &mut out);
                Some((p, p))
            }
        };
    }
    flush(run, &mut out);
    out.join(",")
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

/// Apps may share an (address prefix, port) only if Hostnames tell them apart: at most one app
/// there without Hostnames, and no hostname on two of them. One problem per pair of apps and
/// conflict, naming every port and address it concerns (a range of 10,000 shared ports is one
/// line, not 10,000).
fn check_sharing(apps: &[App], unusable: &[bool], problems: &mut Vec<Problem>) {
    // Counted before anything is built: the count is cheap, the map below is not.
    let pairs: usize = apps
        .iter()
        .map(|app| app.ports.len() * app_prefixes(app).len())
        .sum();
    if pairs > MAX_BINDINGS {
        return problems.push(Problem::TooManyBindings { pairs });
    }
    // (port, prefix) -> apps there, by index, in config order.
    let mut at: HashMap<(u16, Prefix), Vec<usize>> = HashMap::new();
    for (i, app) in apps.iter().enumerate() {
        if unusable[i] {
            continue;
        }
        for prefix in app_prefixes(app) {
            for &port in &app.ports {
                at.entry((port, prefix)).or_default().push(i);
            }
        }
    }
    // (later app, first app, hostname or None for "both defaults") -> prefixes and ports.
    type Clash = (usize, usize, Option<Pattern>);
    let mut clashes: BTreeMap<Clash, (BTreeSet<Prefix>, BTreeSet<u16>)> = BTreeMap::new();
    for ((port, prefix), list) in &at {
        if list.len() < 2 {
            continue;
        }
        let mut default: Option<usize> = None;
        let mut names: HashMap<&Pattern, usize> = HashMap::new();
        for &i in list {
            let app = &apps[i];
            let mut clash = |key: Clash| {
                let e = clashes.entry(key).or_default();
                e.0.insert(*prefix);
                e.1.insert(*port);
            };
            if app.hostnames.is_empty() {
                match default {
                    Some(first) => clash((i, first, None)),
                    None => default = Some(i),
                }
            }
            for h in &app.hostnames {
                match names.get(h) {
                    Some(&first) if first != i => clash((i, first, Some(h.clone()))),
                    Some(_) => {}
                    None => {
                        names.insert(h, i);
                    }
                }
            }
        }
    }
    for ((i, first, name), (prefixes, ports)) in clashes {
        let addresses = if prefixes.len() == 2
            && prefixes.contains(&Prefix::ALL_V4)
            && prefixes.contains(&Prefix::ALL_V6)
        {
            "every address".to_owned()
        } else {
            prefixes
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ports = port_ranges(ports);
        let (app, first) = (apps[i].name.clone(), apps[first].name.clone());
        problems.push(match name {
            None => Problem::SharedDefault {
                app,
                first,
                ports,
                addresses,
            },
            Some(h) => Problem::SharedHostname {
                app,
                first,
                hostname: h.to_string(),
                ports,
                addresses,
            },
        });
    }
}

/// The targets of app `name` that are well-formed.
fn targets(name: &str, raw: Option<Vec<String>>, problems: &mut Vec<Problem>) -> Vec<Target> {
    let mut targets = Vec::new();
    match raw {
        Some(list) if !list.is_empty() => {
            for t in list {
                match parse_target(&t) {
                    Ok(target) => targets.push(target),
                    Err(why) => problems.push(Problem::BadTarget {
                        app: name.to_owned(),
                        target: t,
                        why,
                    }),
                }
            }
        }
        _ => problems.push(Problem::Missing {
            app: name.to_owned(),
            field: "Targets",
        }),
    }
    targets
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
