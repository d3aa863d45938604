//! An app's `Targets`: each `"host:port"` (a DNS name, an IPv4 address or a bracketed IPv6
//! address, nothing a resolver would read another way), or an object with that `Address` and
//! its settings: `{"Address": "host:port", "Weight": 1-256, "Backup": true, "Drain": true}`.
//!
//! A problem in an object names the app, the target (its Address as written, or `#N`, its
//! place in the list, when the Address is missing or not a string) and the key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;

use serde_json::Value;

use crate::config::distinct::SET_FROM;
use crate::config::model::{Target, TargetSpec, MAX_WEIGHT};
use crate::config::problem::{Problem, Problems};
use crate::config::raw::{Found, RawTarget, RawTargetEntry};
use crate::config::types::{present, wrong, Typed};
use crate::sys::hash::FastSet;

/// The longest Address quoted whole in the messages about its object's keys.
const LABEL_MAX: usize = 80;

/// What one entry of `Targets` is, for the messages.
pub(super) const TARGET_EXAMPLE: &str = r#""host:port", as "backend.internal:7001""#;

/// The targets of app `name` that are well-formed (an empty or missing list is the caller's
/// to report). A target listed twice is one target with two turns (as it always was), so both
/// entries must say the same of it.
pub(super) fn targets(
    name: &str,
    raw: Vec<RawTargetEntry>,
    problems: &mut Problems,
) -> Vec<TargetSpec> {
    let mut out: Vec<TargetSpec> = Vec::with_capacity(raw.len());
    // Each target's first entry, by address, to compare the settings of a repeat: found by a
    // look through `out` while it is short (most apps list a few targets, and a map in each of
    // 200,000 apps was an allocation per app), in a map once it holds SET_FROM entries (an app
    // may list thousands, and a hostile one millions).
    let mut first: Option<HashMap<Target, usize>> = None;
    for (i, entry) in raw.into_iter().enumerate() {
        let (written, spec) = match entry {
            RawTargetEntry::Address(t) => {
                let spec = address(name, &t, problems).map(TargetSpec::plain);
                (t, spec)
            }
            RawTargetEntry::Object(raw) => match object(name, i, *raw, problems) {
                Some((written, spec)) => (written, spec),
                None => continue,
            },
            RawTargetEntry::Wrong(found) => {
                let write = match as_text(&found) {
                    Some(t) => format!("{t:?}"),
                    None => TARGET_EXAMPLE.to_owned(),
                };
                problems.push(wrong(Some(name), "Targets", &found, write));
                continue;
            }
        };
        let Some(spec) = spec else { continue };
        let earlier = match &first {
            Some(map) => map.get(&spec.target).copied(),
            None => out.iter().position(|s| s.target == spec.target),
        };
        match earlier {
            Some(j) if out[j] != spec => problems.push(Problem::BadTarget {
                app: name.to_owned(),
                target: written,
                why: "is listed twice with different Weight, Backup or Drain; a target listed \
                      twice is one target with two turns: give both entries the same settings",
            }),
            Some(_) => out.push(spec),
            None => {
                if let Some(map) = &mut first {
                    map.insert(spec.target.clone(), out.len());
                }
                out.push(spec);
            }
        }
        if first.is_none() && out.len() >= SET_FROM {
            // Sized by what it holds, the distinct targets, not by the entries (repeats too).
            let mut map = HashMap::new();
            for (j, s) in out.iter().enumerate() {
                map.entry(s.target.clone()).or_insert(j);
            }
            first = Some(map);
        }
    }
    out
}

/// A target's address, or None (and the problem).
fn address(app: &str, written: &str, problems: &mut Problems) -> Option<Target> {
    match parse_target(written) {
        Ok(t) => Some(t),
        Err(why) => {
            problems.push(Problem::BadTarget {
                app: app.to_owned(),
                target: written.to_owned(),
                why,
            });
            None
        }
    }
}

/// A target written as an object, at place `i` of the list: the Address as written (for a
/// repeat's message) and the target if it is well-formed; None when it has no usable Address
/// (a problem of its own).
fn object(
    app: &str,
    i: usize,
    raw: RawTarget,
    problems: &mut Problems,
) -> Option<(String, Option<TargetSpec>)> {
    let written = match present(raw.address.clone()) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    // How messages name this target: quoted, and cut short, since every problem of the
    // object carries it (a megabyte Address and many unknown keys must not make a gigabyte
    // of messages).
    let label = match &written {
        Some(s) if s.chars().count() > LABEL_MAX => {
            let cut: String = s.chars().take(LABEL_MAX).collect();
            format!("{cut:?}...")
        }
        Some(s) => format!("{s:?}"),
        None => format!("#{}", i + 1),
    };
    for key in raw.keys.unknown {
        problems.push(Problem::TargetUnknownKey {
            app: app.to_owned(),
            target: label.clone(),
            key,
        });
    }
    for key in raw.keys.twice {
        problems.push(Problem::TargetGivenTwice {
            app: app.to_owned(),
            target: label.clone(),
            key,
        });
    }
    let field = |key: &str| format!("Targets: {label}: {key}");
    let target = match present(raw.address) {
        None => {
            problems.push(Problem::TargetNoAddress {
                app: app.to_owned(),
                target: label.clone(),
            });
            None
        }
        Some(Value::String(s)) => address(app, &s, problems),
        Some(other) => {
            let found = Found::of(other);
            problems.push(wrong(
                Some(app),
                &field("Address"),
                &found,
                TARGET_EXAMPLE.into(),
            ));
            None
        }
    };
    let mut typed = Typed {
        app: Some(app),
        problems,
    };
    const WEIGHT: &str = "a number from 1 to 256";
    let weight = match typed.int(
        &field("Weight"),
        raw.weight,
        1..=i64::from(MAX_WEIGHT),
        WEIGHT,
    ) {
        None => Some(1),
        Some(Ok(w)) if (1..=i64::from(MAX_WEIGHT)).contains(&w) => Some(w as u32),
        Some(Ok(w)) => {
            bad_weight(app, &label, w.to_string(), typed.problems);
            None
        }
        Some(Err(text)) => {
            bad_weight(app, &label, text, typed.problems);
            None
        }
    };
    let backup = boolean(app, &field("Backup"), raw.backup, typed.problems);
    let drain = boolean(app, &field("Drain"), raw.drain, typed.problems);
    let spec = match (target, weight, backup, drain) {
        (Some(target), Some(weight), Ok(backup), Ok(drain)) => Some(TargetSpec {
            target,
            weight,
            backup,
            drain,
        }),
        _ => None,
    };
    Some((written.unwrap_or(label), spec))
}

fn bad_weight(app: &str, target: &str, value: String, problems: &mut Problems) {
    problems.push(Problem::TargetValue {
        app: app.to_owned(),
        target: target.to_owned(),
        field: "Weight",
        value,
        expected: "a number from 1 to 256",
    });
}

/// A `true` or `false` (false when not given); Err (and the problem) for anything else.
fn boolean(app: &str, field: &str, v: Option<Value>, problems: &mut Problems) -> Result<bool, ()> {
    match present(v) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => {
            let found = Found::of(other);
            let write = match &found {
                Found::Scalar(Value::String(s)) if s == "true" || s == "false" => s.clone(),
                _ => "true or false".to_owned(),
            };
            problems.push(wrong(Some(app), field, &found, write));
            Err(())
        }
    }
}

/// A scalar as it would read inside a string (a number or true/false), if it is one.
fn as_text(found: &Found) -> Option<String> {
    match found {
        Found::Scalar(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
        _ => None,
    }
}

/// Hosts this thread parsed lately, kept to share their text: at the edge, many apps list
/// the same few target hosts, and a copy a target was 48 bytes with glibc's header, about 100
/// bytes an app. Bounded (emptied when full), since any config's hosts pass through it.
const HOSTS_KEPT: usize = 4096;

/// `host` as an `Arc<str>` shared with the targets this thread parsed lately with the same
/// host (compared by text: sharing changes nothing but where the bytes are).
fn shared_host(host: &str) -> Arc<str> {
    thread_local! {
        // Keyed by hosts from the config, never a peer's: the fast hasher is enough.
        static HOSTS: RefCell<FastSet<Arc<str>>> = RefCell::default();
    }
    HOSTS.with(|hosts| {
        let mut hosts = hosts.borrow_mut();
        if let Some(h) = hosts.get(host) {
            return Arc::clone(h);
        }
        if hosts.len() >= HOSTS_KEPT {
            hosts.clear();
        }
        let h: Arc<str> = Arc::from(host);
        hosts.insert(Arc::clone(&h));
        h
    })
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
            host: shared_host(host),
            port: p,
        }),
        _ => Err("has a port that is not a number in 1-65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    /// The problems of one app `a` on port 1 whose Targets are `targets` (JSON).
    fn problems(targets: &str) -> Vec<String> {
        parse(&format!(
            r#"{{"Apps":[{{"Name":"a","Ports":[1],"Targets":{targets}}}]}}"#
        ))
        .unwrap_err()
    }

    /// A repeat with other settings is found wherever it is, in a short list (looked through)
    /// and in a long one (a map from SET_FROM entries on), before and after the map is
    /// built; a repeat with the same settings is two turns of one target.
    #[test]
    fn repeats_found_in_short_and_long_lists() {
        for len in [2, SET_FROM - 1, SET_FROM, SET_FROM + 5] {
            let list: Vec<String> = (1..=len).map(|p| format!(r#""h:{p}""#)).collect();
            for again in [1, len] {
                let same = format!("[{},\"h:{again}\"]", list.join(","));
                let c = parse(&format!(
                    r#"{{"Apps":[{{"Name":"a","Ports":[1],"Targets":{same}}}]}}"#
                ))
                .unwrap();
                assert_eq!(
                    c.apps[0].targets.len(),
                    len + 1,
                    "{len} targets, h:{again} again"
                );
                let other = format!(
                    r#"[{},{{"Address":"h:{again}","Weight":2}}]"#,
                    list.join(",")
                );
                let found = problems(&other);
                let want = format!(
                    r#"app "a": Targets: "h:{again}" is listed twice with different Weight, Backup or Drain;"#
                );
                assert!(
                    found.len() == 1 && found[0].starts_with(&want),
                    "{len} targets, h:{again} again: {found:?}"
                );
            }
        }
    }

    #[test]
    fn objects_and_strings_mix() {
        let c = parse(
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1",
                {"Address":"h:2","Weight":3},
                {"Address":"[::1]:3","Backup":true,"Drain":false},
                {"Address":"h:4","Drain":true,"Weight":256},
                {"Address":"h:1"}]}]}"#,
        )
        .unwrap();
        let t = &c.apps[0].targets;
        let plain = |s: &str| TargetSpec::plain(parse_target(s).unwrap());
        assert_eq!(t[0], plain("h:1"));
        assert_eq!(
            t[1],
            TargetSpec {
                weight: 3,
                ..plain("h:2")
            }
        );
        assert_eq!(
            t[2],
            TargetSpec {
                backup: true,
                ..plain("[::1]:3")
            }
        );
        assert_eq!(
            t[3],
            TargetSpec {
                weight: 256,
                drain: true,
                ..plain("h:4")
            }
        );
        assert_eq!(t[4], plain("h:1"), "the same settings: two turns");
        assert_eq!(c.summary(), "1 apps, 1 ports, 5 targets");
    }

    #[test]
    fn each_problem_names_the_app_the_target_and_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"[{"Address":"h:1","Wieght":2}]"#,
                r#"app "a": Targets: "h:1": unknown key "Wieght" (a target takes Address, Weight, Backup, Drain)"#,
            ),
            (
                r#"[{"Address":"h:1","Weight":2,"Weight":3}]"#,
                r#"app "a": Targets: "h:1": Weight given more than once; keep one"#,
            ),
            (
                r#"["h:1",{"Weight":2}]"#,
                r#"app "a": Targets: #2: Address: missing (a target object is {"Address": "host:port", "Weight": 2})"#,
            ),
            (
                r#"[{"Address":7}]"#,
                r#"app "a": Targets: #1: Address: 7 is a number; write "host:port", as "backend.internal:7001""#,
            ),
            (
                r#"[{"Address":"h"}]"#,
                r#"app "a": Targets: "h" is not host:port"#,
            ),
            (
                r#"[{"Address":"h:1","Weight":0}]"#,
                r#"app "a": Targets: "h:1": Weight: 0 is not a number from 1 to 256"#,
            ),
            (
                r#"[{"Address":"h:1","Weight":257}]"#,
                r#"app "a": Targets: "h:1": Weight: 257 is not a number from 1 to 256"#,
            ),
            (
                r#"[{"Address":"h:1","Weight":1.5}]"#,
                r#"app "a": Targets: "h:1": Weight: 1.5 is not a number from 1 to 256"#,
            ),
            (
                r#"[{"Address":"h:1","Weight":"3"}]"#,
                r#"app "a": Targets: "h:1": Weight: "3" is a string; write 3"#,
            ),
            (
                r#"[{"Address":"h:1","Backup":"yes"}]"#,
                r#"app "a": Targets: "h:1": Backup: "yes" is a string; write true or false"#,
            ),
            (
                r#"[{"Address":"h:1","Drain":"true"}]"#,
                r#"app "a": Targets: "h:1": Drain: "true" is a string; write true"#,
            ),
            (
                r#"[{"Address":"h:1","Drain":1}]"#,
                r#"app "a": Targets: "h:1": Drain: 1 is a number; write true or false"#,
            ),
            (
                r#"["h:1",{"Address":"h:1","Weight":2}]"#,
                r#"app "a": Targets: "h:1" is listed twice with different Weight, Backup or Drain"#,
            ),
            (
                r#"[["h:1"]]"#,
                r#"app "a": Targets: [...] is a list; write "host:port", as "backend.internal:7001""#,
            ),
            (
                r#"[{"Address":"h:1","Backup":true,"Drain":true},null]"#,
                r#"app "a": Targets: null is null; write "host:port""#,
            ),
            (
                r#"{"Address":"h:1"}"#,
                r#"app "a": Targets: {...} is an object; write a list, each entry "host:port""#,
            ),
        ];
        for (targets, want) in cases {
            let got = problems(targets);
            assert!(
                got.len() == 1 && got[0].starts_with(want),
                "{targets}: want {want:?}, got {got:#?}"
            );
        }
        // A long Address is cut short where it names its object.
        let long = "h".repeat(300);
        let got = problems(&format!(r#"[{{"Address":"{long}:1","X":1}}]"#));
        let unknown = got.iter().find(|p| p.contains("unknown key")).unwrap();
        assert!(unknown.len() < 250, "{unknown}");
        // Every problem of one object at once.
        let got = problems(r#"[{"Address":"h","Weight":-1,"Backup":0,"X":1}]"#);
        assert_eq!(got.len(), 4, "{got:#?}");
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("[::1]:7001").unwrap().to_string(),
            "[::1]:7001"
        );
        assert_eq!(&*parse_target("10.0.0.1:80").unwrap().host, "10.0.0.1");
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
