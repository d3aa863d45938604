//! The config file: reading it (`file`), its raw serde shape (`raw`), the validated `Config` the
//! proxy runs on (`model`) and how it is made (`validate`; in files of their own: an app's
//! `ports`, its `target`s, and `sharing`, which apps may share an address and port), what can
//! be wrong with it (`problem`) and the bounds it is held to (`limits`), the diff between two
//! configs that a reload applies (`diff`), and the SHA-256 that names a loaded file (`sha256`).
//!
//! This file only names the parts and re-exports what the rest of the crate uses, so no file
//! here imports from it (and none imports another in a circle).
//!
//! Parse, don't validate: `RawConfig` mirrors the JSON exactly (so the original challenge file
//! loads byte for byte), and `Config::from_raw` turns it into a `Config` or into every problem
//! found at once. Nothing but a `Config` ever reaches the running proxy, so a bad reload cannot
//! touch a live listener.

mod diff;
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
mod target;
mod validate;

pub use diff::Diff;
pub use file::read_file;
pub use limits::{MAX_BINDINGS, MAX_FILE_BYTES, NAME_MAX};
pub use model::{
    app_prefixes, App, Balance, Config, HealthCheck, ProxyProtocol, Target,
    DEFAULT_CONNECT_ATTEMPTS,
};
pub use ports::{parse_port_range, port_ranges};
pub use problem::{ConfigError, Problem};
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
