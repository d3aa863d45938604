//! Whether a value from etcd may reach the disk, judged by the proxy's own validation
//! (`Config::parse`) before anything is written: a value the proxy would reject is never
//! written, so a proxy restarted later still starts on the last good file.
//!
//! Per-key mode: the key is `PREFIX<name>`, its value one app object as it appears in the
//! `Apps` list, and the file `DIR/<name>.json` holds `{"Apps": [<value>]}` (the value's bytes
//! as they are, so the file's digest follows the value's). The name is the file's name, so it
//! must be a safe one: an app name (`config::is_valid_name`: 1-64 of ASCII letters, digits,
//! `.`, `_`, `-`, which excludes `/`) that does not start with `.` (no dotfile, no `..`); and
//! it must equal the app's `Name`, so one key can never write over another app's file.

use std::path::Path;

use crate::config::{is_valid_name, Config, ConfigError, MAX_FILE_BYTES};

/// Every problem of a `ConfigError`, as the proxy prints them.
fn problems(e: &ConfigError) -> Vec<String> {
    e.problems.iter().map(|p| p.to_string()).collect()
}

/// Single-key mode: `value` is a whole config file, as `path` would hold it.
pub fn check_config(path: &Path, value: &[u8]) -> Result<(), Vec<String>> {
    if value.len() as u64 > MAX_FILE_BYTES {
        return Err(vec![format!("larger than {MAX_FILE_BYTES} bytes")]);
    }
    Config::parse(path, value)
        .map(drop)
        .map_err(|e| problems(&e))
}

/// The app name a key under `prefix` names, if it is a safe file name.
pub fn app_name<'k>(prefix: &str, key: &'k [u8]) -> Result<&'k str, String> {
    let suffix = key
        .strip_prefix(prefix.as_bytes())
        .ok_or_else(|| format!("key is not under {prefix:?}"))?;
    let name = std::str::from_utf8(suffix).map_err(|_| "key is not UTF-8".to_string())?;
    if !is_valid_name(name) || name.starts_with('.') {
        return Err(format!(
            "key suffix {name:?} is not an app name usable as a file name (1-64 of A-Z a-z 0-9 . _ -, not starting with '.')"
        ));
    }
    Ok(name)
}

/// Per-key mode: the bytes of `DIR/<name>.json` for `value`, or every problem with it (`path`
/// names the file in the proxy's messages).
pub fn app_file(name: &str, value: &[u8], path: &Path) -> Result<Vec<u8>, Vec<String>> {
    // One JSON object and nothing else: the wrapping below must not let a value close the
    // list and add keys or apps of its own (`{...}], "X": [1`). Syntax is left to the
    // proxy's parser below, which says where the error is.
    let object = serde_json::from_slice::<serde_json::Value>(value).map(|v| v.is_object());
    if let Ok(false) = object {
        return Err(vec![
            "the value must be one app: a JSON object as in the Apps list".to_string(),
        ]);
    }
    let mut file = Vec::with_capacity(value.len() + 16);
    file.extend_from_slice(b"{\"Apps\": [");
    file.extend_from_slice(value);
    file.extend_from_slice(b"]}\n");
    if file.len() as u64 > MAX_FILE_BYTES {
        return Err(vec![format!("larger than {MAX_FILE_BYTES} bytes")]);
    }
    if object.is_err() {
        // Not JSON: the proxy's parser on the value alone says where (a line and column in
        // the value, not in the wrapped file).
        return Err(match Config::parse(path, value) {
            Err(e) => problems(&e),
            Ok(_) => vec!["the value is not JSON".to_string()],
        });
    }
    let config = Config::parse(path, &file).map_err(|e| problems(&e))?;
    match &config.apps[..] {
        [app] if app.name == name => Ok(file),
        [app] => Err(vec![format!(
            "app {:?}: Name must equal the key's last segment {name:?}",
            app.name
        )]),
        _ => Err(vec!["the value must be exactly one app".to_string()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/flyproxy/apps/";

    #[test]
    fn names() {
        assert_eq!(app_name(P, b"/flyproxy/apps/web-1.a_b"), Ok("web-1.a_b"));
        for bad in [
            "/flyproxy/apps/",
            "/flyproxy/apps/.hidden",
            "/flyproxy/apps/..",
            "/flyproxy/apps/a/b",
            "/flyproxy/apps/a b",
            "/flyproxy/apps/é",
            "/flyproxy/other",
        ] {
            assert!(app_name(P, bad.as_bytes()).is_err(), "{bad}");
        }
        let long = format!("{P}{}", "a".repeat(65));
        assert!(app_name(P, long.as_bytes()).is_err());
        assert!(app_name(P, b"/flyproxy/apps/\xff").is_err());
    }

    #[test]
    fn values() {
        let path = Path::new("d/web.json");
        let good = br#"{"Name": "web", "Ports": [443], "Targets": ["10.0.0.1:443"]}"#;
        let file = app_file("web", good, path).unwrap();
        assert_eq!(
            file,
            [&b"{\"Apps\": ["[..], good, b"]}\n"].concat(),
            "the value's bytes as they are"
        );
        let cases: [(&[u8], &str); 6] = [
            (
                br#"{"Name": "web", "Ports": [443], "Tragets": ["10.0.0.1:443"]}"#,
                "unknown key \"Tragets\"",
            ),
            (
                br#"{"Name": "web", "Ports": [443], "Targets": ["nope"]}"#,
                "is not host:port",
            ),
            (
                br#"{"Name": "other", "Ports": [443], "Targets": ["10.0.0.1:443"]}"#,
                "Name must equal the key's last segment \"web\"",
            ),
            (
                br#"{"Name": "web", "Ports": [443], "Targets": ["h:1"]}], "X": [1"#,
                "",
            ),
            (br#"[{"Name": "web"}]"#, "must be one app"),
            (b"{\"Name\": ", ""),
        ];
        for (value, want) in cases {
            let errs = app_file("web", value, path).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{:?}: {errs:?}",
                String::from_utf8_lossy(value)
            );
        }
        assert!(check_config(Path::new("c.json"), b"{\"Apps\": [}").is_err());
    }

    /// Single-key mode reads a value as the proxy reads its file: the same cap (the one
    /// `config::MAX_FILE_BYTES`), so a file the proxy takes the follower writes, and the
    /// other way round.
    #[test]
    fn whole_file_values_are_capped_as_the_proxy_caps_a_file() {
        let path = Path::new("d/config.json");
        let app = r#"{"Apps": [{"Name": "web", "Ports": [443], "Targets": ["10.0.0.1:443"]}]}"#;
        let mut value = app.as_bytes().to_vec();
        value.resize(17 << 20, b' ');
        assert_eq!(check_config(path, &value), Ok(()));
        value.resize(MAX_FILE_BYTES as usize + 1, b' ');
        let errs = check_config(path, &value).unwrap_err();
        assert!(errs[0].contains("larger than"), "{errs:?}");
    }
}
