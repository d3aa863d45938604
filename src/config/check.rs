//! `HealthCheck.Kind` and the keys that go with it: "tcp" (a connect, the default), "http"
//! (`Path`, `Host`, `ExpectStatus`) and "tls" (`ServerName`). A key given for another Kind
//! than the app's is a problem rather than silently unused.
//!
//! What is sent is checked here, where the operator can be told: a Path or Host that could
//! end the request line or add a header (a space, CR, LF) never reaches a socket.

use serde_json::Value;

use crate::config::hostname::Pattern;
use crate::config::model::{CheckKind, HttpCheck, DEFAULT_EXPECT_STATUS};
use crate::config::problem::Problem;
use crate::config::raw::RawHealthCheck;
use crate::config::types::{present, Typed};

const KINDS: &str = "\"tcp\", \"http\" or \"tls\"";
const PATH: &str = "a path starting with /, of visible ASCII characters (no spaces), at most 1024";
const HOST: &str = "a host (and :port) of visible ASCII characters, at most 255";
const STATUS: &str = "a status code from 100 to 599, or a range as [200, 399]";
const SERVER_NAME: &str = "a DNS name, as \"www.example.com\"";

/// The app's check kind from `raw`'s Kind and its keys (taken out of `raw`); `hostnames` are
/// the app's, whose first exact name is the default server name of a "tls" check.
pub(super) fn check_kind(
    typed: &mut Typed<'_>,
    raw: &mut RawHealthCheck,
    hostnames: &[Pattern],
) -> CheckKind {
    let given = present(raw.kind.take());
    let is_given = given.is_some();
    let kind = match typed.string("HealthCheck.Kind", given, KINDS).as_deref() {
        // Given, but not a string (a problem already): its keys are not judged by it.
        None if is_given => "unknown",
        None | Some("tcp") => "tcp",
        Some("http") => "http",
        Some("tls") => "tls",
        Some(other) => {
            bad(typed, "HealthCheck.Kind", format!("{other:?}"), KINDS);
            // Its keys are checked for their values, not for their kind.
            "unknown"
        }
    };
    let only = |typed: &mut Typed<'_>, key: &'static str, v: &Option<Value>, wants| {
        if v.as_ref().is_some_and(|v| !v.is_null()) && kind != wants && kind != "unknown" {
            let app = typed.app.unwrap_or_default().to_owned();
            typed.problems.push(Problem::CheckKeyForKind {
                app,
                key,
                wants,
                kind,
            });
        }
    };
    only(typed, "Path", &raw.path, "http");
    only(typed, "Host", &raw.host, "http");
    only(typed, "ExpectStatus", &raw.expect_status, "http");
    only(typed, "ServerName", &raw.server_name, "tls");
    let path = visible(typed, "HealthCheck.Path", raw.path.take(), 1024, PATH)
        .filter(|p| p.starts_with('/') || bad(typed, "HealthCheck.Path", format!("{p:?}"), PATH));
    let host = visible(typed, "HealthCheck.Host", raw.host.take(), 255, HOST);
    let expect = expect_status(typed, raw.expect_status.take());
    // Held to the Hostnames rule (a DNS name, not an address, no wildcard), lower-cased.
    let server_name = typed
        .string(
            "HealthCheck.ServerName",
            raw.server_name.take(),
            SERVER_NAME,
        )
        .and_then(|n| match Pattern::parse(&n) {
            Ok(Pattern::Exact(name)) => Some(name),
            _ => {
                bad(
                    typed,
                    "HealthCheck.ServerName",
                    format!("{n:?}"),
                    SERVER_NAME,
                );
                None
            }
        });
    match kind {
        "http" => CheckKind::Http(HttpCheck {
            path: path.unwrap_or_else(|| "/".to_owned()),
            host,
            expect: expect.unwrap_or(DEFAULT_EXPECT_STATUS),
        }),
        "tls" => CheckKind::Tls {
            server_name: server_name.or_else(|| {
                hostnames.iter().find_map(|h| match h {
                    Pattern::Exact(n) => Some(n.clone()),
                    Pattern::Wildcard(_) => None,
                })
            }),
        },
        _ => CheckKind::Tcp,
    }
}

/// Record that `field` is `value`, not `expected`; false, for `filter`.
fn bad(typed: &mut Typed<'_>, field: &'static str, value: String, expected: &'static str) -> bool {
    let app = typed.app.unwrap_or_default().to_owned();
    typed.problems.push(Problem::BadValue {
        app,
        field,
        value,
        expected,
    });
    false
}

/// A string of 1 to `max` visible ASCII characters (no space, no control character: nothing
/// that could end the request line or start a header).
fn visible(
    typed: &mut Typed<'_>,
    field: &'static str,
    v: Option<Value>,
    max: usize,
    expected: &'static str,
) -> Option<String> {
    let s = typed.string(field, v, expected)?;
    let ok = (1..=max).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if ok {
        Some(s)
    } else {
        // Quoted and escaped ({:?}): a CR or LF in it shows as such, and is cut to a length
        // a message can carry.
        let shown: String = s.chars().take(60).collect();
        bad(typed, field, format!("{shown:?}"), expected);
        None
    }
}

/// `ExpectStatus`: a number or [lo, hi], each 100..=599, lo <= hi.
fn expect_status(typed: &mut Typed<'_>, v: Option<Value>) -> Option<(u16, u16)> {
    let code = |v: &Value| {
        v.as_u64()
            .filter(|n| (100..=599).contains(n))
            .map(|n| n as u16)
    };
    let v = present(v)?;
    let range = match &v {
        Value::Number(_) => code(&v).map(|c| (c, c)),
        Value::Array(pair) if pair.len() == 2 => match (code(&pair[0]), code(&pair[1])) {
            (Some(lo), Some(hi)) if lo <= hi => Some((lo, hi)),
            _ => None,
        },
        _ => None,
    };
    if range.is_none() {
        let mut shown = v.to_string();
        if shown.len() > 60 {
            shown = format!("{}...", shown.chars().take(60).collect::<String>());
        }
        bad(typed, "HealthCheck.ExpectStatus", shown, STATUS);
    }
    range
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    /// The kind of app `a`'s check given `health` (JSON) and `hostnames`.
    fn kind(health: &str, hostnames: &str) -> Result<CheckKind, Vec<String>> {
        parse(&format!(
            r#"{{"Apps":[{{"Name":"a","Ports":[1],"Targets":["h:1"],"Hostnames":{hostnames},"HealthCheck":{health}}}]}}"#
        ))
        .map(|c| c.apps[0].health.kind.clone())
    }

    #[test]
    fn kinds_and_their_defaults() {
        assert_eq!(kind("{}", "null"), Ok(CheckKind::Tcp));
        assert_eq!(kind(r#"{"Kind":"tcp"}"#, "null"), Ok(CheckKind::Tcp));
        assert_eq!(
            kind(r#"{"Kind":"http"}"#, "null"),
            Ok(CheckKind::Http(HttpCheck {
                path: "/".into(),
                host: None,
                expect: (200, 399)
            }))
        );
        assert_eq!(
            kind(
                r#"{"Kind":"http","Path":"/healthz?x=1","Host":"svc.internal:8080","ExpectStatus":204}"#,
                "null"
            ),
            Ok(CheckKind::Http(HttpCheck {
                path: "/healthz?x=1".into(),
                host: Some("svc.internal:8080".into()),
                expect: (204, 204)
            }))
        );
        let range = kind(r#"{"Kind":"http","ExpectStatus":[200,204]}"#, "null").unwrap();
        assert!(matches!(
            range,
            CheckKind::Http(HttpCheck {
                expect: (200, 204),
                ..
            })
        ));
        assert_eq!(
            kind(
                r#"{"Kind":"tls"}"#,
                r#"["*.example.com","www.example.com"]"#
            ),
            Ok(CheckKind::Tls {
                server_name: Some("www.example.com".into())
            }),
            "the first exact hostname"
        );
        assert_eq!(
            kind(r#"{"Kind":"tls"}"#, "null"),
            Ok(CheckKind::Tls { server_name: None })
        );
        assert_eq!(
            kind(
                r#"{"Kind":"tls","ServerName":"check.example"}"#,
                r#"["www.example.com"]"#
            ),
            Ok(CheckKind::Tls {
                server_name: Some("check.example".into())
            })
        );
    }

    #[test]
    fn bad_keys_are_named() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"Kind":"icmp"}"#,
                r#"app "a": HealthCheck.Kind: "icmp" is not "tcp", "http" or "tls""#,
            ),
            (
                r#"{"Kind":7}"#,
                r#"app "a": HealthCheck.Kind: 7 is a number; write "7""#,
            ),
            (
                r#"{"Path":"/x"}"#,
                r#"app "a": HealthCheck.Path: only for Kind "http" (the Kind here is "tcp")"#,
            ),
            (
                r#"{"Kind":"tls","ExpectStatus":200}"#,
                r#"app "a": HealthCheck.ExpectStatus: only for Kind "http" (the Kind here is "tls")"#,
            ),
            (
                r#"{"Kind":"http","ServerName":"x.example"}"#,
                r#"app "a": HealthCheck.ServerName: only for Kind "tls" (the Kind here is "http")"#,
            ),
            (
                r#"{"Kind":"http","Path":"healthz"}"#,
                r#"app "a": HealthCheck.Path: "healthz" is not a path starting with /"#,
            ),
            (
                r#"{"Kind":"http","Path":"/a b"}"#,
                r#"app "a": HealthCheck.Path: "/a b" is not a path"#,
            ),
            (
                r#"{"Kind":"http","Host":"x\r\nEvil: 1"}"#,
                r#"app "a": HealthCheck.Host: "x\r\nEvil: 1" is not a host"#,
            ),
            (
                r#"{"Kind":"http","ExpectStatus":99}"#,
                r#"app "a": HealthCheck.ExpectStatus: 99 is not a status code from 100 to 599, or a range as [200, 399]"#,
            ),
            (
                r#"{"Kind":"http","ExpectStatus":[300,200]}"#,
                r#"app "a": HealthCheck.ExpectStatus: [300,200] is not a status code"#,
            ),
            (
                r#"{"Kind":"http","ExpectStatus":"200"}"#,
                r#"app "a": HealthCheck.ExpectStatus: "200" is not a status code"#,
            ),
            (
                r#"{"Kind":"tls","ServerName":"1.2.3.4:5"}"#,
                r#"app "a": HealthCheck.ServerName: "1.2.3.4:5" is not a DNS name"#,
            ),
            (
                r#"{"Kind":"http","Method":"HEAD"}"#,
                r#"app "a": unknown key "HealthCheck.Method" (HealthCheck takes IntervalMs, TimeoutMs, Fall, Rise, Kind, Path, Host, ExpectStatus, ServerName)"#,
            ),
        ];
        for (health, want) in cases {
            let got = kind(health, "null").unwrap_err();
            assert!(
                got.len() == 1 && got[0].starts_with(want),
                "{health}: want {want:?}, got {got:#?}"
            );
        }
    }
}
