//! Config parser checks: a differential oracle written from the README's description of the
//! file (not from src/config.rs), and a structured generator of configs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use arbitrary::Arbitrary;
use flyproxy::config::hostname::Pattern;
use flyproxy::config::prefix::Prefix;
use flyproxy::config::{
    parse_target, App, Balance, CheckKind, Config, Diff, HealthCheck, HttpCheck, Problem,
    ProxyProtocol, Target, TargetSpec, PRINTED_MAX,
};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

const APP_KEYS: [&str; 11] = [
    "Name",
    "Ports",
    "Targets",
    "Addresses",
    "Hostnames",
    "HealthCheck",
    "Balance",
    "ConnectAttempts",
    "MaxConnections",
    "MaxConnectionsPerClient",
    "ProxyProtocol",
];
const HEALTH_KEYS: [&str; 9] = [
    "IntervalMs",
    "TimeoutMs",
    "Fall",
    "Rise",
    "Kind",
    "Path",
    "Host",
    "ExpectStatus",
    "ServerName",
];
const TARGET_KEYS: [&str; 4] = ["Address", "Weight", "Backup", "Drain"];

/// What the oracle expects `Config::parse` to say.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not JSON (or nested past serde_json's limit): one `Problem::Syntax`.
    Syntax,
    /// JSON: this many problems (a value of the wrong type is one, like any other), and if
    /// none, exactly this config.
    Checked {
        problems: usize,
        config: Option<Config>,
    },
}

/// Any JSON document with every key of every object kept in order, repeats included
/// (serde_json's `Value` keeps only the last of a repeated key).
enum Tree {
    Object(Vec<(String, Tree)>),
    Array(Vec<Tree>),
    Other,
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tree, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut out = Vec::new();
                while let Some(t) = a.next_element()? {
                    out.push(t);
                }
                Ok(Tree::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = a.next_key::<String>()? {
                    out.push((k, a.next_value()?));
                }
                Ok(Tree::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// README: a key of the file, of an app or of a HealthCheck given more than once in its object
/// is a problem (one per key, however often), and the last given is the one used. (Repeats
/// of an unknown key are that key's one "unknown key" problem.)
fn repeated_keys(tree: &Tree) -> usize {
    fn repeated(entries: &[(String, Tree)], known: &[&str]) -> usize {
        known
            .iter()
            .filter(|k| entries.iter().filter(|(e, _)| e == *k).count() > 1)
            .count()
    }
    fn last<'t>(entries: &'t [(String, Tree)], key: &str) -> Option<&'t Tree> {
        entries.iter().rev().find(|(k, _)| k == key).map(|(_, t)| t)
    }
    let Tree::Object(top) = tree else { return 0 };
    let mut n = repeated(top, &["Apps"]);
    if let Some(Tree::Array(apps)) = last(top, "Apps") {
        for app in apps {
            let Tree::Object(a) = app else { continue };
            n += repeated(a, &APP_KEYS);
            if let Some(Tree::Object(h)) = last(a, "HealthCheck") {
                n += repeated(h, &HEALTH_KEYS);
            }
            if let Some(Tree::Array(targets)) = last(a, "Targets") {
                for t in targets {
                    if let Tree::Object(t) = t {
                        n += repeated(t, &TARGET_KEYS);
                    }
                }
            }
        }
    }
    n
}

/// A target as the README describes it: `host:port`, the host a DNS name (labels of letters,
/// digits, `-` and `_`, 1-63 long, not starting or ending with `-`, 253 at most in all) or an
/// IPv4 address (which that rule covers), or a bracketed IPv6 address; the port 1-65535 in
/// decimal digits only.
pub fn expected_target(s: &str) -> Option<Target> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find("]:")?;
        let host = &rest[..close];
        host.parse::<Ipv6Addr>().ok()?;
        (host, &rest[close + 2..])
    } else {
        let colon = s.rfind(':')?;
        let host = &s[..colon];
        if host.is_empty() || host.contains(':') || host.len() > 253 {
            return None;
        }
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return None;
        }
        // README: a host whose last label is numeric (or hex, 0x...) is an IPv4 address and
        // must be the plain dotted form: four decimal numbers 0-255 without leading zeros.
        let last = host.rsplit('.').next().unwrap_or(host);
        if last.bytes().all(|b| b.is_ascii_digit())
            || last.starts_with("0x")
            || last.starts_with("0X")
        {
            let parts: Vec<&str> = host.split('.').collect();
            let dotted = parts.len() == 4
                && parts.iter().all(|p| {
                    !p.is_empty()
                        && p.len() <= 3
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && (p.len() == 1 || !p.starts_with('0'))
                        && p.parse::<u16>().is_ok_and(|n| n <= 255)
                });
            if !dotted {
                return None;
            }
        }
        (host, &s[colon + 1..])
    };
    // README: no leading zeros in a port.
    if port.is_empty()
        || !port.bytes().all(|b| b.is_ascii_digit())
        || (port.len() > 1 && port.starts_with('0'))
    {
        return None;
    }
    let digits = port.trim_start_matches('0');
    if digits.len() > 5 {
        return None;
    }
    let n: u32 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    if !(1..=65535).contains(&n) {
        return None;
    }
    Some(Target {
        host: host.into(),
        port: n as u16,
    })
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// README: a value of the wrong JSON type is a problem of its own (the app and field named),
/// and checking goes on. Entries of a string list that are not strings are each one problem and
/// left out.
fn strings(v: &Value, problems: &mut usize) -> Option<Vec<String>> {
    let Value::Array(l) = v else {
        *problems += 1;
        return None;
    };
    let mut out = Vec::new();
    for e in l {
        match e.as_str() {
            Some(s) => out.push(s.to_owned()),
            None => *problems += 1,
        }
    }
    Some(out)
}

fn present(o: &Map<String, Value>, k: &str) -> Option<Value> {
    match o.get(k) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.clone()),
    }
}

/// README: each target `"host:port"` or `{"Address": "host:port", "Weight": 1-256, "Backup":
/// bool, "Drain": bool}`; each wrong thing in an object one problem (an unknown key, a missing
/// or bad Address, a Weight not a whole number in range, a Backup or Drain not a boolean); any
/// other entry one problem; a target listed again with other settings one problem.
fn expected_targets(list: &[Value], problems: &mut usize) -> Vec<TargetSpec> {
    let mut out: Vec<TargetSpec> = Vec::new();
    for entry in list {
        let spec = match entry {
            Value::String(s) => expected_target(s).map(TargetSpec::plain),
            Value::Object(o) => {
                *problems += o
                    .keys()
                    .filter(|k| !TARGET_KEYS.contains(&k.as_str()))
                    .count();
                let target = match present(o, "Address") {
                    Some(Value::String(s)) => expected_target(&s),
                    _ => None,
                };
                if target.is_none() {
                    *problems += 1;
                }
                let weight = match present(o, "Weight") {
                    None => Some(1),
                    Some(v) => int(&v).filter(|w| (1..=256).contains(w)).map(|w| w as u32),
                };
                if weight.is_none() {
                    *problems += 1;
                }
                let mut flag = |k: &str| match present(o, k) {
                    None => Some(false),
                    Some(Value::Bool(b)) => Some(b),
                    Some(_) => {
                        *problems += 1;
                        None
                    }
                };
                let (backup, drain) = (flag("Backup"), flag("Drain"));
                // Unknown keys alone leave the target itself well-formed.
                match (target, weight, backup, drain) {
                    (Some(target), Some(weight), Some(backup), Some(drain)) => Some(TargetSpec {
                        target,
                        weight,
                        backup,
                        drain,
                    }),
                    _ => None,
                }
            }
            _ => {
                *problems += 1;
                continue;
            }
        };
        let Some(spec) = spec else {
            if entry.is_string() {
                *problems += 1;
            }
            continue;
        };
        match out.iter().find(|t| t.target == spec.target) {
            Some(first) if *first != spec => *problems += 1,
            _ => out.push(spec),
        }
    }
    out
}

/// README: `Kind` "tcp" (the default), "http" with `Path` (from /, visible ASCII, at most
/// 1024), `Host` (visible ASCII, at most 255) and `ExpectStatus` (100-599 or [lo, hi]), "tls"
/// with `ServerName` (a DNS name; default the app's first exact Hostname). A key of another
/// Kind is one problem; a bad value one problem.
fn expected_kind(h: &Map<String, Value>, hostnames: &[Pattern], problems: &mut usize) -> CheckKind {
    let kind = match present(h, "Kind") {
        None => "tcp",
        Some(Value::String(k)) if ["tcp", "http", "tls"].contains(&k.as_str()) => {
            if k == "tcp" {
                "tcp"
            } else if k == "http" {
                "http"
            } else {
                "tls"
            }
        }
        Some(_) => {
            *problems += 1;
            "unknown"
        }
    };
    for (key, wants) in [
        ("Path", "http"),
        ("Host", "http"),
        ("ExpectStatus", "http"),
        ("ServerName", "tls"),
    ] {
        if present(h, key).is_some() && kind != wants && kind != "unknown" {
            *problems += 1;
        }
    }
    let visible = |s: &str, max: usize| {
        (1..=max).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
    };
    let mut text = |key: &str, ok: &dyn Fn(&str) -> bool| match present(h, key) {
        None => None,
        Some(Value::String(s)) if ok(&s) => Some(s),
        Some(_) => {
            *problems += 1;
            None
        }
    };
    let path = text("Path", &|s| s.starts_with('/') && visible(s, 1024));
    let host = text("Host", &|s| visible(s, 255));
    let server_name = text("ServerName", &|s| {
        matches!(expected_hostname(s), Some(Pattern::Exact(_)))
    })
    .and_then(|s| match expected_hostname(&s) {
        Some(Pattern::Exact(n)) => Some(n),
        _ => None,
    });
    let code = |v: &Value| {
        v.as_u64()
            .filter(|n| (100..=599).contains(n))
            .map(|n| n as u16)
    };
    let expect = match present(h, "ExpectStatus") {
        None => None,
        Some(v) => {
            let range = match &v {
                Value::Number(_) => code(&v).map(|c| (c, c)),
                Value::Array(p) if p.len() == 2 => match (code(&p[0]), code(&p[1])) {
                    (Some(lo), Some(hi)) if lo <= hi => Some((lo, hi)),
                    _ => None,
                },
                _ => None,
            };
            if range.is_none() {
                *problems += 1;
            }
            range
        }
    };
    match kind {
        "http" => CheckKind::Http(HttpCheck {
            path: path.unwrap_or_else(|| "/".into()),
            host,
            expect: expect.unwrap_or((200, 399)),
        }),
        "tls" => CheckKind::Tls {
            server_name: server_name.or_else(|| {
                hostnames.iter().find_map(|p| match p {
                    Pattern::Exact(n) => Some(n.clone()),
                    Pattern::Wildcard(_) => None,
                })
            }),
        },
        _ => CheckKind::Tcp,
    }
}

/// The oracle: what `Config::parse` must answer for `bytes`, or None when it does not judge
/// (JSON nested past serde_json's limit).
pub fn oracle(bytes: &[u8]) -> Option<Verdict> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
        return Some(Verdict::Syntax);
    }
    // JSON, but nested past serde_json's limit of 128 for a value it builds: flyproxy skips an
    // unknown key's value unread (no limit) but reads a known key's (limited), so whether this
    // is a syntax error depends on where the depth is. Not judged.
    let (Ok(v), Ok(tree)) = (
        serde_json::from_slice::<Value>(bytes),
        serde_json::from_slice::<Tree>(bytes),
    ) else {
        return None;
    };
    let wrong = Some(Verdict::Checked {
        problems: 1,
        config: None,
    });
    let Some(top) = v.as_object() else {
        return wrong;
    };
    let mut problems = top.keys().filter(|k| *k != "Apps").count() + repeated_keys(&tree);
    let Some(apps) = present(top, "Apps") else {
        return Some(Verdict::Checked {
            problems: problems + 1,
            config: None,
        });
    };
    let Some(apps) = apps.as_array() else {
        return Some(Verdict::Checked {
            problems: problems + 1,
            config: None,
        });
    };
    let mut names = HashSet::new();
    let mut out = Vec::new();
    let mut unusable = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let Some(a) = app.as_object() else {
            problems += 1;
            continue;
        };
        let name = match present(a, "Name") {
            Some(Value::String(n)) if !n.trim().is_empty() => {
                // README: 1-64 letters, digits, '.', '_' or '-'.
                let ok = n.chars().count() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
                if !ok {
                    problems += 1;
                }
                n.to_owned()
            }
            // Missing, empty, or not a string: one problem, and the app goes by its place.
            _ => {
                problems += 1;
                format!("#{}", i + 1)
            }
        };
        if !names.insert(name.clone()) {
            problems += 1;
        }
        problems += a.keys().filter(|k| !APP_KEYS.contains(&k.as_str())).count();
        // README: numbers 1-65535 and "A-B" inclusive ranges; a port given twice in one app
        // is one problem however many there are.
        let mut ports: Vec<u16> = Vec::new();
        match present(a, "Ports") {
            Some(Value::Array(l)) if !l.is_empty() => {
                let mut twice = false;
                for p in &l {
                    let range = match p {
                        Value::Number(_) => match int(p) {
                            Some(n) if (1..=65535).contains(&n) => Some((n, n)),
                            _ => None,
                        },
                        Value::String(r) => expected_range(r),
                        _ => None,
                    };
                    let Some((lo, hi)) = range else {
                        problems += 1;
                        continue;
                    };
                    for n in lo..=hi {
                        if ports.contains(&(n as u16)) {
                            twice = true;
                        } else {
                            ports.push(n as u16);
                        }
                    }
                }
                problems += usize::from(twice);
            }
            // Missing, empty, or not a list: one problem.
            _ => problems += 1,
        }
        // A list given but empty is "missing or empty"; given but not a list is a wrong type;
        // either way no address is usable.
        let nonempty = |v: &Value, problems: &mut usize| match v {
            Value::Array(l) if l.is_empty() => {
                *problems += 1;
                Vec::new()
            }
            v => strings(v, problems).unwrap_or_default(),
        };
        let mut addresses = Vec::new();
        let given = present(a, "Addresses");
        if let Some(v) = &given {
            for t in nonempty(v, &mut problems) {
                match expected_prefix(&t) {
                    Some(p) if addresses.contains(&p) => problems += 1,
                    Some(p) => addresses.push(p),
                    None => problems += 1,
                }
            }
        }
        unusable.push(given.is_some() && addresses.is_empty());
        let mut hostnames = Vec::new();
        if let Some(v) = present(a, "Hostnames") {
            for t in nonempty(&v, &mut problems) {
                match expected_hostname(&t) {
                    Some(h) if hostnames.contains(&h) => problems += 1,
                    Some(h) => hostnames.push(h),
                    None => problems += 1,
                }
            }
        }
        let targets = match present(a, "Targets") {
            Some(Value::Array(l)) if !l.is_empty() => expected_targets(&l, &mut problems),
            // Missing, empty, or not a list: one problem.
            _ => {
                problems += 1;
                Vec::new()
            }
        };
        // Not a whole number (a string, a fraction, true) or out of range: one problem.
        let mut ranged = |_key: &str, v: Option<Value>, lo: i64, hi: i64| -> Option<i64> {
            match int(&v?) {
                Some(n) if (lo..=hi).contains(&n) => Some(n),
                _ => {
                    problems += 1;
                    None
                }
            }
        };
        let mut health = HealthCheck {
            interval: Duration::from_millis(2000),
            timeout: Duration::from_millis(1000),
            fall: 1,
            rise: 1,
            kind: CheckKind::Tcp,
        };
        let mut health_unknown = 0;
        let mut kind_keys = None;
        let health_given = present(a, "HealthCheck");
        if health_given.as_ref().is_some_and(|h| !h.is_object()) {
            health_unknown = 1; // the wrong type, counted with the unknown keys
        }
        if let Some(Value::Object(h)) = health_given {
            health_unknown = h
                .keys()
                .filter(|k| !HEALTH_KEYS.contains(&k.as_str()))
                .count();
            if let Some(n) = ranged("IntervalMs", present(&h, "IntervalMs"), 100, 3_600_000) {
                health.interval = Duration::from_millis(n as u64);
            }
            if let Some(n) = ranged("TimeoutMs", present(&h, "TimeoutMs"), 10, 600_000) {
                health.timeout = Duration::from_millis(n as u64);
            }
            if let Some(n) = ranged("Fall", present(&h, "Fall"), 1, 100) {
                health.fall = n as u32;
            }
            if let Some(n) = ranged("Rise", present(&h, "Rise"), 1, 100) {
                health.rise = n as u32;
            }
            kind_keys = Some(h);
        }
        let connect_attempts =
            ranged("ConnectAttempts", present(a, "ConnectAttempts"), 1, 10).unwrap_or(3) as u32;
        let max_connections = ranged("MaxConnections", present(a, "MaxConnections"), 1, 1_000_000)
            .map(|n| n as u32);
        let max_connections_per_client = ranged(
            "MaxConnectionsPerClient",
            present(a, "MaxConnectionsPerClient"),
            1,
            1_000_000,
        )
        .map(|n| n as u32);
        problems += health_unknown;
        if let Some(h) = kind_keys {
            health.kind = expected_kind(&h, &hostnames, &mut problems);
        }
        let text = |k: &str, problems: &mut usize| match present(a, k) {
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                *problems += 1; // not a string: a wrong type
                None
            }
            None => None,
        };
        let balance = match text("Balance", &mut problems).as_deref() {
            None | Some("p2c") => Balance::P2c,
            Some("random") => Balance::Random,
            Some("round-robin") => Balance::RoundRobin,
            Some(_) => {
                problems += 1;
                Balance::P2c
            }
        };
        let proxy_protocol = match text("ProxyProtocol", &mut problems).as_deref() {
            None => None,
            Some("v1") => Some(ProxyProtocol::V1),
            Some("v2") => Some(ProxyProtocol::V2),
            Some(_) => {
                problems += 1;
                None
            }
        };
        out.push(App {
            name,
            ports: ports.into(),
            addresses: addresses.into(),
            hostnames: hostnames.into(),
            targets: targets.into(),
            health: health.shared(),
            balance,
            connect_attempts,
            max_connections,
            max_connections_per_client,
            proxy_protocol,
        });
    }
    problems += sharing_clashes(&out, &unusable);
    Some(Verdict::Checked {
        problems,
        // The proxy's config shares its apps (`Arc<App>`); the oracle builds them plainly.
        config: (problems == 0).then(|| Config {
            apps: out.into_iter().map(std::sync::Arc::new).collect(),
        }),
    })
}

/// README: `"A-B"`, inclusive, 1 <= A <= B <= 65535 (decimal digits only).
pub fn expected_range(s: &str) -> Option<(i64, i64)> {
    let (a, b) = s.split_once('-')?;
    let num = |t: &str| -> Option<i64> {
        if t.is_empty() || t.len() > 5 || !t.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (a, b) = (num(a)?, num(b)?);
    ((1..=65535).contains(&a) && (1..=65535).contains(&b) && a <= b).then_some((a, b))
}

/// README: an IPv4 or IPv6 address, or one with `/len`; no bits past the length; an
/// IPv4-mapped IPv6 address is refused (write it as IPv4).
pub fn expected_prefix(s: &str) -> Option<Prefix> {
    let (addr, len) = match s.find('/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max: u32 = if ip.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        None => max,
        Some(l) if !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()) => {
            l.parse::<u64>().ok().filter(|n| *n <= u64::from(max))? as u32
        }
        Some(_) => return None,
    };
    let bits: u128 = match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => {
            if a.to_ipv4_mapped().is_some() {
                return None;
            }
            u128::from(a)
        }
    };
    // The address sits in the top bits (IPv4 in the top 32), so the host bits are all below
    // the first `len`.
    let width = len;
    let host_bits = if width >= 128 { 0 } else { u128::MAX >> width };
    if bits & host_bits != 0 {
        return None;
    }
    Some(Prefix::new(ip, len as u8))
}

/// README: a name, or `*.` and a name; case-insensitive, a trailing dot ignored; never an IP
/// address. Names: labels of letters, digits, '-' and '_', 1-63 long, not starting or ending
/// with '-', 253 in all.
pub fn expected_hostname(s: &str) -> Option<Pattern> {
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if s.parse::<IpAddr>().is_ok() {
        return None;
    }
    let (wild, name) = match s.strip_prefix("*.") {
        Some(r) => (true, r.to_string()),
        None => (false, s),
    };
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return None;
    }
    Some(if wild {
        Pattern::Wildcard(name)
    } else {
        Pattern::Exact(name)
    })
}

/// README: apps share an (address, port) only if Hostnames tell them apart (at most one
/// without), and no hostname is on two of them; one problem per pair of apps and conflict.
fn sharing_clashes(apps: &[App], unusable: &[bool]) -> usize {
    let all = [
        Prefix::new(IpAddr::from([0u8; 4]), 0),
        Prefix::new(IpAddr::from([0u16; 8]), 0),
    ];
    let mut clashes: HashSet<(usize, usize, Option<Pattern>)> = HashSet::new();
    let mut first_default: HashMap<(u16, Prefix), usize> = HashMap::new();
    let mut first_name: HashMap<(u16, Prefix, Pattern), usize> = HashMap::new();
    for (i, app) in apps.iter().enumerate() {
        if unusable[i] {
            continue;
        }
        let prefixes: Vec<Prefix> = if app.addresses.is_empty() {
            all.to_vec()
        } else {
            app.addresses.to_vec()
        };
        for &port in &app.ports {
            for &p in &prefixes {
                if app.hostnames.is_empty() {
                    match first_default.get(&(port, p)) {
                        Some(&j) => {
                            clashes.insert((i, j, None));
                        }
                        None => {
                            first_default.insert((port, p), i);
                        }
                    }
                }
                for h in &app.hostnames {
                    match first_name.get(&(port, p, h.clone())) {
                        Some(&j) if j != i => {
                            clashes.insert((i, j, Some(h.clone())));
                        }
                        Some(_) => {}
                        None => {
                            first_name.insert((port, p, h.clone()), i);
                        }
                    }
                }
            }
        }
    }
    clashes.len()
}

/// What must hold of any config that parsed, whatever the input.
fn invariants(c: &Config) {
    let mut names = HashSet::new();
    let mut ports = HashSet::new();
    for a in &c.apps {
        assert!(!a.name.trim().is_empty(), "empty name accepted: {a:?}");
        assert!(
            flyproxy::config::is_valid_name(&a.name),
            "bad name accepted: {a:?}"
        );
        assert!(
            names.insert(&a.name),
            "duplicate name accepted: {:?}",
            a.name
        );
        assert!(!a.ports.is_empty() && !a.targets.is_empty(), "{a:?}");
        let mut own = HashSet::new();
        for p in &a.ports {
            assert!(*p != 0, "port 0 accepted");
            assert!(own.insert(*p), "port {p} twice in one app");
            ports.insert(*p);
        }
        for t in a.targets.iter().map(|spec| &spec.target) {
            assert!(t.port != 0);
            // Display gives back a target that parses to the same thing.
            let shown = t.to_string();
            assert_eq!(parse_target(&shown).as_ref(), Ok(t), "{shown}");
        }
        assert!((1..=10).contains(&a.connect_attempts));
        assert!(a
            .max_connections
            .is_none_or(|m| (1..=1_000_000).contains(&m)));
        let h = &a.health;
        assert!(
            h.interval >= Duration::from_millis(100) && h.interval <= Duration::from_secs(3600)
        );
        assert!(h.timeout >= Duration::from_millis(10) && h.timeout <= Duration::from_secs(600));
        assert!((1..=100).contains(&h.fall) && (1..=100).contains(&h.rise));
    }
    assert!(Diff::between(c, c).is_empty());
    let summary = c.summary();
    assert!(summary.starts_with(&format!("{} apps, {} ports", c.apps.len(), ports.len())));
}

/// Any bytes: never a panic; problems always reported and printable; the answer agrees with
/// the oracle.
pub fn check_bytes(bytes: &[u8]) -> Option<Config> {
    let got = Config::parse(Path::new("fuzz.json"), bytes);
    match &got {
        Ok(c) => invariants(c),
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error with no problem in it");
            // One line per problem, each naming the file (a syntax error with its line and
            // column). (A key or name with a newline in it is printed as it is, so a problem
            // may span lines: compare problem by problem.) `first` stops at its bound and
            // says how many more.
            let text = e.to_string();
            let want: Vec<String> = e
                .problems
                .iter()
                .map(|p| match p {
                    Problem::Syntax(s) if s.line > 0 => {
                        format!("fuzz.json:{}:{}: {p}", s.line, s.column.max(1))
                    }
                    _ => format!("fuzz.json: {p}"),
                })
                .collect();
            assert_eq!(text, want.join("\n"));
            if e.count() > PRINTED_MAX {
                let first = e.first(PRINTED_MAX).to_string();
                assert!(
                    first.starts_with(&want[..PRINTED_MAX].join("\n")),
                    "{first}"
                );
            }
        }
    }
    match oracle(bytes) {
        None => {}
        Some(Verdict::Syntax) => match &got {
            Err(e) if matches!(e.problems.as_slice(), [Problem::Syntax(_)]) => {}
            other => panic!("expected a syntax error, got {other:?}"),
        },
        Some(Verdict::Checked {
            problems: 0,
            config,
        }) => match &got {
            Ok(c) => assert_eq!(Some(c), config.as_ref()),
            Err(e) => panic!("expected a valid config, got {e}"),
        },
        Some(Verdict::Checked { problems, .. }) => match &got {
            Ok(c) => panic!("expected {problems} problems, got a valid config {c:?}"),
            Err(e) => {
                assert!(
                    !e.problems
                        .iter()
                        .any(|p| matches!(p, Problem::Syntax(_) | Problem::Io(_))),
                    "expected {problems} problems, got {e}"
                );
                assert_eq!(e.count(), problems, "{e}");
            }
        },
    }
    got.ok()
}

// ---------------------------------------------------------------------------------------------
// The structured generator.

/// A field as written: absent, null, a value, or a value of the wrong type.
#[derive(Arbitrary, Debug, Clone)]
pub enum Field<T> {
    Absent,
    Null,
    Value(T),
    WrongType(Junk),
}

/// A value of some JSON type; `Field::WrongType` picks one the field does not take.
#[derive(Arbitrary, Debug, Clone)]
pub enum Junk {
    Bool(bool),
    Float(u16),
    Str(String),
    List,
    Object,
    BigNumber,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Name {
    /// From a small set, so that names repeat and blank ones occur.
    Pick(u8),
    Free(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Port {
    /// 1-16: likely to repeat within and across apps.
    Small(u8),
    /// "A-B" of small numbers (maybe backwards), or a free string.
    Range(u8, u8),
    Text(String),
    Any(u16),
    Raw(i64),
    Edge(u8),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum TargetGen {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    Name(u8, u16),
    Free(String),
    /// A valid shape with one thing broken.
    Broken(u8, u16),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Int {
    Edge(u8),
    Raw(i64),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Word {
    Known(u8),
    Free(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct HealthGen {
    interval: Field<Int>,
    timeout: Field<Int>,
    fall: Field<Int>,
    rise: Field<Int>,
    extra: Vec<String>,
}

/// Addresses from a small pool, so that apps share and nest them, or free text.
#[derive(Arbitrary, Debug, Clone)]
pub enum AddrGen {
    Pick(u8),
    Free(String),
}

/// Hostnames from a small pool (case and trailing dots vary), or free text.
#[derive(Arbitrary, Debug, Clone)]
pub enum HostGen {
    Pick(u8),
    Free(String),
}

const ADDRS: [&str; 12] = [
    "127.0.0.2",
    "127.0.0.0/8",
    "127.0.0.1/8",
    "0.0.0.0/0",
    "::1",
    "fd00::/8",
    "::/0",
    "::ffff:127.0.0.2",
    "192.0.2.0/33",
    "2001:db8::11",
    "10.0.0.010",
    "fd00::2/128",
];
const HOSTS_SNI: [&str; 10] = [
    "shop.example.com",
    "SHOP.example.com.",
    "*.shop.example.com",
    "blog.example.com",
    "*.example.com",
    "*",
    "a.*.com",
    "127.0.0.1",
    "",
    "-x.example",
];

#[derive(Arbitrary, Debug, Clone)]
pub struct AppGen {
    name: Field<Name>,
    ports: Field<Vec<Port>>,
    addresses: Field<Vec<AddrGen>>,
    hostnames: Field<Vec<HostGen>>,
    targets: Field<Vec<TargetGen>>,
    health: Field<HealthGen>,
    balance: Field<Word>,
    connect_attempts: Field<Int>,
    max_connections: Field<Int>,
    max_connections_per_client: Field<Int>,
    proxy_protocol: Field<Word>,
    extra: Vec<String>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct ConfigGen {
    apps: Field<Vec<AppGen>>,
    extra: Vec<String>,
    pretty: bool,
}

/// Two configs, for the diff between them too.
#[derive(Arbitrary, Debug, Clone)]
pub struct Structured {
    pub a: ConfigGen,
    pub b: ConfigGen,
}

const NAMES: [&str; 8] = ["a", "b", "six-thousand", "", " ", "#2", "é", "a\"b\\\n"];
const EDGE_INTS: [i64; 16] = [
    i64::MIN,
    -1,
    0,
    1,
    2,
    9,
    10,
    11,
    99,
    100,
    101,
    600_000,
    1_000_000,
    1_000_001,
    3_600_000,
    3_600_001,
];
const EDGE_PORTS: [i64; 6] = [0, 1, 65535, 65536, -1, 70000];
const HOSTS: [&str; 6] = [
    "localhost",
    "tcp-echo.fly.dev",
    "bad.target.for.testing",
    "a_b-c.d",
    "10.0.0.1",
    "x",
];

fn junk(j: &Junk, string_ok: bool) -> Value {
    match j {
        Junk::Bool(b) => json!(b),
        Junk::Float(n) => json!(f64::from(*n) + 0.5),
        Junk::Str(s) if !string_ok => json!(s),
        Junk::Str(_) | Junk::List => json!([1, "x"]),
        Junk::Object => json!({"k": 1}),
        // Beyond i64: serde's i64 refuses it. Only wrong for ints and strings alike.
        Junk::BigNumber => json!(u64::MAX),
    }
}

/// Adds `key` to `m` as the field says; returns false if the value is of the wrong type.
fn put<T>(
    m: &mut Map<String, Value>,
    key: &str,
    f: &Field<T>,
    string_ok: bool,
    v: impl Fn(&T) -> Value,
) -> bool {
    match f {
        Field::Absent => true,
        Field::Null => {
            m.insert(key.into(), Value::Null);
            true
        }
        Field::Value(x) => {
            m.insert(key.into(), v(x));
            true
        }
        Field::WrongType(j) => {
            let val = junk(j, string_ok);
            // A "wrong" value that happens to be of the right type (an object where an object
            // goes) is still fine to send: the oracle judges it; only the flag must be honest.
            // ([1, "x"] is wrong for every list: Ports, Targets and Apps alike.)
            let wrong = match (&val, key) {
                (Value::Object(_), "HealthCheck") => false,
                (Value::String(_), _) => !string_ok,
                _ => true,
            };
            m.insert(key.into(), val);
            !wrong
        }
    }
}

fn int_value(i: &Int) -> i64 {
    match i {
        Int::Edge(n) => EDGE_INTS[*n as usize % EDGE_INTS.len()],
        Int::Raw(n) => *n,
    }
}

fn target_value(t: &TargetGen) -> String {
    match t {
        TargetGen::V4(o, p) => format!("{}.{}.{}.{}:{p}", o[0], o[1], o[2], o[3]),
        TargetGen::V6(o, p) => format!("[{}]:{p}", Ipv6Addr::from(*o)),
        TargetGen::Name(h, p) => format!("{}:{p}", HOSTS[*h as usize % HOSTS.len()]),
        TargetGen::Free(s) => s.clone(),
        TargetGen::Broken(k, p) => match k % 8 {
            0 => format!("::1:{p}"),
            1 => format!("[::1]{p}"),
            2 => format!("host:+{p}"),
            3 => format!("-host:{p}"),
            4 => format!("{}:{p}", "a".repeat(64)),
            5 => format!("h..x:{p}"),
            6 => format!("[::g]:{p}"),
            _ => format!(":{p}"),
        },
    }
}

impl ConfigGen {
    /// The JSON text, and whether every value in it has the type its key takes.
    pub fn render(&self) -> (Vec<u8>, bool) {
        let mut typed = true;
        let mut top = Map::new();
        for k in &self.extra {
            if k != "Apps" {
                top.insert(k.clone(), json!(1));
            }
        }
        typed &= put(&mut top, "Apps", &self.apps, false, |apps: &Vec<AppGen>| {
            Value::Array(apps.iter().map(|a| a.value(&mut true)).collect())
        });
        if let Field::Value(apps) = &self.apps {
            for a in apps {
                a.value(&mut typed);
            }
        }
        let v = Value::Object(top);
        let text = if self.pretty {
            serde_json::to_vec_pretty(&v)
        } else {
            serde_json::to_vec(&v)
        };
        (text.expect("a Value always serializes"), typed)
    }
}

impl HealthGen {
    fn value(&self) -> (Value, bool) {
        let mut hm = Map::new();
        for k in &self.extra {
            if !HEALTH_KEYS.contains(&k.as_str()) {
                hm.insert(k.clone(), json!("x"));
            }
        }
        let mut typed = true;
        for (k, f) in [
            ("IntervalMs", &self.interval),
            ("TimeoutMs", &self.timeout),
            ("Fall", &self.fall),
            ("Rise", &self.rise),
        ] {
            typed &= put(&mut hm, k, f, false, |i| json!(int_value(i)));
        }
        (Value::Object(hm), typed)
    }
}

impl AppGen {
    fn value(&self, typed: &mut bool) -> Value {
        let mut m = Map::new();
        for k in &self.extra {
            if !APP_KEYS.contains(&k.as_str()) {
                m.insert(k.clone(), json!(null));
            }
        }
        let mut t = true;
        t &= put(&mut m, "Name", &self.name, true, |n| match n {
            Name::Pick(i) => json!(NAMES[*i as usize % NAMES.len()]),
            Name::Free(s) => json!(s),
        });
        t &= put(&mut m, "Ports", &self.ports, false, |ps: &Vec<Port>| {
            Value::Array(
                ps.iter()
                    .map(|p| match p {
                        Port::Small(n) => json!(1 + i64::from(*n % 16)),
                        Port::Range(a, b) => json!(format!("{}-{}", a % 20, b % 20)),
                        Port::Text(t) => json!(t),
                        Port::Any(n) => json!(n),
                        Port::Raw(n) => json!(n),
                        Port::Edge(n) => json!(EDGE_PORTS[*n as usize % EDGE_PORTS.len()]),
                    })
                    .collect(),
            )
        });
        t &= put(
            &mut m,
            "Addresses",
            &self.addresses,
            false,
            |xs: &Vec<AddrGen>| {
                Value::Array(
                    xs.iter()
                        .map(|x| match x {
                            AddrGen::Pick(i) => json!(ADDRS[*i as usize % ADDRS.len()]),
                            AddrGen::Free(s) => json!(s),
                        })
                        .collect(),
                )
            },
        );
        t &= put(
            &mut m,
            "Hostnames",
            &self.hostnames,
            false,
            |xs: &Vec<HostGen>| {
                Value::Array(
                    xs.iter()
                        .map(|x| match x {
                            HostGen::Pick(i) => json!(HOSTS_SNI[*i as usize % HOSTS_SNI.len()]),
                            HostGen::Free(s) => json!(s),
                        })
                        .collect(),
                )
            },
        );
        t &= put(
            &mut m,
            "Targets",
            &self.targets,
            false,
            |ts: &Vec<TargetGen>| Value::Array(ts.iter().map(|t| json!(target_value(t))).collect()),
        );
        if let Field::Value(h) = &self.health {
            let (v, health_typed) = h.value();
            m.insert("HealthCheck".into(), v);
            t &= health_typed;
        } else {
            t &= put(
                &mut m,
                "HealthCheck",
                &self.health,
                false,
                |_| unreachable!(),
            );
        }
        let word = |known: &'static [&'static str]| {
            move |w: &Word| match w {
                Word::Known(i) => json!(known[*i as usize % known.len()]),
                Word::Free(s) => json!(s),
            }
        };
        t &= put(
            &mut m,
            "Balance",
            &self.balance,
            true,
            word(&["p2c", "random", "round-robin", "P2C"]),
        );
        t &= put(
            &mut m,
            "ProxyProtocol",
            &self.proxy_protocol,
            true,
            word(&["v1", "v2", "v3", ""]),
        );
        t &= put(
            &mut m,
            "ConnectAttempts",
            &self.connect_attempts,
            false,
            |i| json!(int_value(i)),
        );
        t &= put(
            &mut m,
            "MaxConnections",
            &self.max_connections,
            false,
            |i| json!(int_value(i)),
        );
        t &= put(
            &mut m,
            "MaxConnectionsPerClient",
            &self.max_connections_per_client,
            false,
            |i| json!(int_value(i)),
        );
        *typed &= t;
        Value::Object(m)
    }
}

/// A structured pair: each rendered and checked like any bytes (the oracle judges it); a
/// well-typed one must never be a syntax error; and the diff between two valid ones must be
/// exactly the set differences.
pub fn check_structured(s: &Structured) {
    let mut configs = Vec::new();
    for g in [&s.a, &s.b] {
        let (bytes, typed) = g.render();
        let got = check_bytes(&bytes);
        if typed {
            if let Err(e) = Config::parse(Path::new("fuzz.json"), &bytes) {
                assert!(
                    !e.problems.iter().any(|p| matches!(p, Problem::Syntax(_))),
                    "well-typed config refused as syntax: {e}\n{}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        configs.push(got);
    }
    if let [Some(a), Some(b)] = configs.as_slice() {
        let d = Diff::between(a, b);
        let pa: BTreeSet<u16> = a.ports().collect();
        let pb: BTreeSet<u16> = b.ports().collect();
        assert_eq!(
            d.ports_added,
            pb.difference(&pa).copied().collect::<Vec<_>>()
        );
        assert_eq!(
            d.ports_removed,
            pa.difference(&pb).copied().collect::<Vec<_>>()
        );
        let na: BTreeSet<&str> = a.apps.iter().map(|x| x.name.as_str()).collect();
        let nb: BTreeSet<&str> = b.apps.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            d.apps_added,
            nb.difference(&na)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            d.apps_removed,
            na.difference(&nb)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        let changed: Vec<String> = b
            .apps
            .iter()
            .filter(|x| a.apps.iter().any(|y| y.name == x.name && y != *x))
            .map(|x| x.name.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(d.apps_changed, changed);
        assert_eq!(d.is_empty(), pa == pb && na == nb && changed.is_empty());
        let _ = d.to_string();
    }
}
