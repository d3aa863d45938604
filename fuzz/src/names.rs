//! App names, against the README's rule (1-64 characters, each a letter, digit, `.`, `_` or
//! `-`): `config::is_valid_name` agrees with it; a config naming an app so is accepted exactly
//! when the name is valid, and refused with one problem line; and the log's escaping leaves no
//! control character in a line, whatever the text.

use std::path::Path;

use flyproxy::config::{is_valid_name, Config};

fn oracle(name: &str) -> bool {
    let n = name.chars().count();
    (1..=64).contains(&n)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

pub fn check(name: &str) {
    let valid = oracle(name);
    assert_eq!(is_valid_name(name), valid, "{name:?}");
    let json = serde_json::json!({"Apps": [{"Name": name, "Ports": [7001], "Targets": ["h:1"]}]});
    let parsed = Config::parse(Path::new("n.json"), json.to_string().as_bytes());
    match parsed {
        Ok(c) => {
            assert!(valid, "invalid name accepted: {name:?}");
            assert_eq!(c.apps[0].name, name);
        }
        Err(e) => {
            assert!(!valid, "valid name refused: {name:?}: {e}");
            assert_eq!(e.problems.len(), 1, "{e}");
            assert!(!e.to_string().contains('\n'), "{e:?}");
        }
    }
    let mut line = String::new();
    flyproxy::sys::log::push_escaped(&mut line, name);
    assert!(!line.chars().any(char::is_control), "{line:?}");
}
