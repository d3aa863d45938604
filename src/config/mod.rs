//! The config file: reading it (`file`), what is wrong when it is not JSON (`syntax`), its raw
//! shape read key by key (`raw`), the validated `Config` the proxy runs on (`model`) and how it
//! is made (`validate`; in files of their own: each value's JSON type (`types`), an app's
//! `ports`, its `target`s, its health `check`'s kind, and `sharing`, which apps may share an address and port), what can
//! be wrong with it (`problem`) and the bounds it is held to (`limits`), the diff between two
//! configs that a reload applies (`diff`), and the SHA-256 that names a loaded file (`sha256`).
//!
//! This file only names the parts and re-exports what the rest of the crate uses, so no file
//! here imports from it (and none imports another in a circle).
//!
//! Parse, don't validate: `RawConfig` mirrors the JSON exactly (so the original challenge file
//! loads byte for byte), keeping values of any type and noting keys given twice, and
//! `Config::from_raw` turns it into a `Config` or into every problem found at once, a value of
//! the wrong type being one problem among others. Nothing but a `Config` ever reaches the running proxy, so a bad reload cannot
//! touch a live listener.

mod check;
mod diff;
mod distinct;
mod file;
pub mod hostname;
mod limits;
mod model;
mod ports;
pub mod prefix;
mod problem;
mod raw;
pub mod sha256;
mod sharing;
mod syntax;
mod target;
mod types;
mod validate;

pub use diff::Diff;
pub use file::{read_file, read_file_meta, ConfigDir};
pub use limits::{MAX_BINDINGS, MAX_FILE_BYTES, NAME_MAX};
pub use model::{
    app_prefixes, App, Balance, CheckKind, Config, HealthCheck, HttpCheck, ProxyProtocol, Target,
    TargetSpec, DEFAULT_CONNECT_ATTEMPTS, DEFAULT_EXPECT_STATUS, MAX_WEIGHT,
};
pub use ports::{parse_port_range, port_ranges};
pub use problem::{ConfigError, First, Problem, Syntax, PRINTED_MAX, STORED_MAX};
pub use target::parse_target;
pub use validate::is_valid_name;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        assert_eq!(c.apps[0].ports[..], [6001, 6200, 6300, 6400]);
        assert_eq!(&*c.apps[0].targets[2].target.host, "bad.target.for.testing");
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

    /// A key written with escapes is the key it spells (read as a copy, where every other key
    /// is read in place), known or not, given once or twice.
    #[test]
    fn keys_with_escapes_are_the_keys_they_spell() {
        let c = parse(
            r#"{"\u0041pps":[{"N\u0061me":"a","Ports":[1],"Targets":["h:1"],"Max\u0043onnections":3}]}"#,
        )
        .unwrap();
        assert_eq!(
            (c.apps[0].name.as_str(), c.apps[0].max_connections),
            ("a", Some(3))
        );
        let errs = parse(
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"W\u0065ight":3,"Ports":[2]}]}"#,
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("app \"a\": unknown key \"Weight\" ("),
            "{errs:?}"
        );
        assert_eq!(errs[1], "app \"a\": Ports given more than once; keep one");
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

#[cfg(test)]
mod type_tests {
    use super::tests::parse;

    /// Issue 23: a value of the wrong type names the app (or its place in Apps) and the field,
    /// says what to write, and checking goes on to every other problem.
    #[test]
    fn wrong_types_name_the_app_and_field_and_checking_goes_on() {
        let s = r#"{"Apps": [
            {"Name": "web", "Ports": 80, "Targets": "h:1", "MaxConnections": "100",
             "Balance": 3, "HealthCheck": {"Fall": "2", "Rise": true}, "ConnectAttempts": 1.5},
            {"Name": 7, "Ports": [1, true], "Targets": ["h:1", 5], "Addresses": "10.0.0.1",
             "Hostnames": [null], "ProxyProtocol": ["v1"], "HealthCheck": [],
             "MaxConnectionsPerClient": "0"},
            5,
            {"Name": "c", "Ports": [2], "Targets": ["h:1"], "MaxConnections": 1, "MaxConnections": 2,
             "HealthCheck": {"Fall": 1, "Fall": 2}, "Nope": 1, "Nope": 2}
          ], "Apps": []}"#;
        let errs = parse(s).unwrap_err();
        let want = [r#""Apps" given more than once at the top level; keep one"#];
        // The last "Apps" is the one kept, as serde_json keeps the last of a repeated key.
        assert_eq!(errs, want);

        let errs = parse(&s.replace(r#", "Apps": []}"#, "}")).unwrap_err();
        let want = [
            r#"app "web": Ports: 80 is a number; write [80]"#,
            r#"app "web": Targets: "h:1" is a string; write ["h:1"]"#,
            r#"app "web": HealthCheck.Fall: "2" is a string; write 2"#,
            r#"app "web": HealthCheck.Rise: true is a boolean; write a number from 1 to 100"#,
            r#"app "web": Balance: 3 is a number; write "3""#,
            r#"app "web": ConnectAttempts: 1.5 is not a number from 1 to 10"#,
            r#"app "web": MaxConnections: "100" is a string; write 100"#,
            r##"app "#2": MaxConnectionsPerClient: "0" is a string; write a number from 1 to 1000000"##,
            r##"app "#2": Name: 7 is a number; write "7""##,
            r##"app "#2": Ports: true is a boolean; write a port, as 80"##,
            r##"app "#2": Addresses: "10.0.0.1" is a string; write ["10.0.0.1"]"##,
            r##"app "#2": Hostnames: null is null; write a hostname in quotes"##,
            r##"app "#2": Targets: 5 is a number; write "5""##,
            r##"app "#2": HealthCheck: [...] is a list; write an object"##,
            r##"app "#2": ProxyProtocol: [...] is a list; write "v1" or "v2""##,
            r#"Apps[2]: 5 is a number; write an app, as {"Name": "web""#,
            r#"app "c": unknown key "Nope""#,
            r#"app "c": MaxConnections given more than once; keep one"#,
            r#"app "c": HealthCheck.Fall given more than once; keep one"#,
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.contains(w)),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    /// A wrong value is quoted short: a huge string cannot make a huge line.
    #[test]
    fn a_long_wrong_value_is_cut_short() {
        let long = "9".repeat(10_000);
        let errs = parse(&format!(
            r#"{{"Apps":[{{"Name":"a","Ports":[1],"Targets":["h:1"],"MaxConnections":"{long}"}}]}}"#
        ))
        .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].len() < 200, "{}", errs[0]);
    }

    /// A million problems: all counted, `STORED_MAX` kept, the first `PRINTED_MAX` printed, then
    /// how many more.
    #[test]
    fn a_million_problems_are_counted_and_a_hundred_printed() {
        let zeros = vec!["0"; 1_000_000].join(",");
        let s = format!(r#"{{"Apps":[{{"Name":"a","Ports":[{zeros}],"Targets":["h:1"]}}]}}"#);
        let e = super::Config::parse(std::path::Path::new("c.json"), s.as_bytes()).unwrap_err();
        assert_eq!(e.count(), 1_000_000);
        // Only so many are kept: the rest cost a count, not memory.
        assert_eq!(e.problems.len(), super::STORED_MAX + 1);
        let text = e.first(super::PRINTED_MAX).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), super::PRINTED_MAX + 1);
        assert_eq!(
            lines.last().unwrap(),
            &"c.json: ... and 999900 more problems not shown (the first 100 are)"
        );
    }
}
