//! `flyproxy-etcd-sync`'s command line: arguments over the environment over the defaults.

use std::path::PathBuf;
use std::time::Duration;

/// The defaults, also named in `--help` and the packaged environment file.
pub const DEFAULT_KEY: &str = "/flyproxy/config";
pub const DEFAULT_CONFIG: &str = "/etc/flyproxy/config.json";
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

pub const HELP: &str = "\
flyproxy-etcd-sync: keep flyproxy's config equal to what etcd holds

usage: flyproxy-etcd-sync [--key KEY] [--config PATH] [options]         one key, one file
       flyproxy-etcd-sync --prefix PREFIX --dir DIR [options]           one key per app

  --key KEY          the etcd key holding the config   (env FLYPROXY_ETCD_KEY, default /flyproxy/config)
  --config PATH      the file flyproxy reads            (env FLYPROXY_CONFIG, default /etc/flyproxy/config.json)
  --prefix PREFIX    one key per app under PREFIX (ending in '/'), each the app's JSON object,
                     written as DIR/NAME.json holding {\"Apps\": [VALUE]}  (env FLYPROXY_ETCD_PREFIX)
  --dir DIR          the directory flyproxy reads (-c DIR); every *.json in it is the follower's
                     (env FLYPROXY_APPS_DIR)
  --status-file PATH where the follower says how it goes (JSON: revisions, rejected keys), replaced
                     atomically at every change  (env FLYPROXY_ETCD_STATUS_FILE, default none)
  --etcdctl PATH     the etcdctl binary                 (env FLYPROXY_ETCDCTL, default etcdctl)
  --resync DUR       check etcd this often besides watching (env FLYPROXY_ETCD_RESYNC, default 30s)

Every value is validated as flyproxy validates its config before anything is written: a bad
value is logged (key, revision, every problem), listed in the status file and never written;
the last good file stays.

etcd's endpoints, TLS and authentication are etcdctl's own settings, read from its environment:
ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER, ETCDCTL_PASSWORD,
ETCDCTL_DIAL_TIMEOUT, ETCDCTL_COMMAND_TIMEOUT, ... (see etcdctl --help).

Files are replaced atomically (a temporary file in their directory, synced, then renamed),
keeping an existing file's mode and group; a deleted key (one key) or an unreachable etcd
leaves them as they are.
";

/// Where the config comes from and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One key holds the whole config file.
    Key { key: String, config: PathBuf },
    /// One key per app under `prefix`, one file per app in `dir`.
    Prefix { prefix: String, dir: PathBuf },
}

/// What the follower was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub source: Source,
    pub etcdctl: PathBuf,
    pub resync: Duration,
    pub status_file: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Settings),
    Help,
    Version,
}

/// A key or prefix starting with '-' would reach etcdctl as a flag; etcdctl's watch gives `--`
/// another meaning (a command to run), so such keys are refused rather than escaped.
fn check_key(option: &str, key: &str) -> Result<(), String> {
    if key.is_empty() || key.starts_with('-') {
        return Err(format!(
            "{option} {key:?}: an etcd key must be non-empty and must not start with '-'"
        ));
    }
    Ok(())
}

/// Arguments override the environment, which overrides the defaults. `Err` is a message for
/// the user (exit status 2).
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, String> {
    let mut key = env("FLYPROXY_ETCD_KEY").unwrap_or_else(|| DEFAULT_KEY.to_string());
    let mut config = env("FLYPROXY_CONFIG").unwrap_or_else(|| DEFAULT_CONFIG.to_string());
    let mut prefix = env("FLYPROXY_ETCD_PREFIX");
    let mut dir = env("FLYPROXY_APPS_DIR");
    let mut status_file = env("FLYPROXY_ETCD_STATUS_FILE");
    let mut etcdctl = env("FLYPROXY_ETCDCTL").unwrap_or_else(|| "etcdctl".to_string());
    let mut resync = env("FLYPROXY_ETCD_RESYNC");
    // --key or --config given as arguments: one-key mode asked for on the command line.
    let mut key_args = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--key" => {
                key_args = true;
                &mut key
            }
            "--config" => {
                key_args = true;
                &mut config
            }
            "--prefix" => prefix.get_or_insert_with(String::new),
            "--dir" => dir.get_or_insert_with(String::new),
            "--status-file" => status_file.get_or_insert_with(String::new),
            "--etcdctl" => &mut etcdctl,
            "--resync" => resync.get_or_insert_with(String::new),
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        };
        *slot = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{name} needs a value")),
        };
    }
    let source = match (prefix, dir) {
        (None, None) => {
            check_key("--key", &key)?;
            if config.is_empty() || config.ends_with('/') {
                return Err(format!("--config {config:?}: must name a file"));
            }
            Source::Key {
                key,
                config: PathBuf::from(config),
            }
        }
        (Some(prefix), Some(dir)) => {
            if key_args {
                return Err(
                    "--key/--config (one key) and --prefix/--dir (one key per app) \
                            cannot be used together"
                        .to_string(),
                );
            }
            check_key("--prefix", &prefix)?;
            // Without the '/', "/apps" would also take "/apps2/x" and "/appsx".
            if !prefix.ends_with('/') {
                return Err(format!("--prefix {prefix:?}: must end with '/'"));
            }
            if dir.is_empty() {
                return Err("--dir: must name a directory".to_string());
            }
            Source::Prefix {
                prefix,
                dir: PathBuf::from(dir),
            }
        }
        (Some(_), None) => return Err("--prefix needs --dir (the directory to write)".into()),
        (None, Some(_)) => return Err("--dir needs --prefix (the etcd keys to follow)".into()),
    };
    let status_file = match status_file {
        Some(s) if s.is_empty() || s.ends_with('/') => {
            return Err(format!("--status-file {s:?}: must name a file"))
        }
        s => s.map(PathBuf::from),
    };
    let resync = match resync {
        None => DEFAULT_RESYNC,
        Some(v) => match crate::cli::parse_duration(&v) {
            Some(d) if d >= Duration::from_secs(1) => d,
            _ => {
                return Err(format!(
                    "--resync {v:?}: expected a duration of at least 1s, e.g. 30s or 5m"
                ))
            }
        },
    };
    Ok(Invocation::Run(Settings {
        source,
        etcdctl: PathBuf::from(etcdctl),
        resync,
        status_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let none = |_: &str| None;
        let run = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()), none);
        assert_eq!(
            run(&[]).unwrap(),
            Invocation::Run(Settings {
                source: Source::Key {
                    key: DEFAULT_KEY.into(),
                    config: DEFAULT_CONFIG.into(),
                },
                etcdctl: "etcdctl".into(),
                resync: DEFAULT_RESYNC,
                status_file: None,
            })
        );
        let env = |k: &str| (k == "FLYPROXY_ETCD_KEY").then(|| "/fleet/a".to_string());
        let Ok(Invocation::Run(s)) = parse_args(
            ["--config=/tmp/c.json", "--resync", "5s"].map(String::from),
            env,
        ) else {
            panic!("parses")
        };
        assert_eq!(
            s.source,
            Source::Key {
                key: "/fleet/a".into(),
                config: "/tmp/c.json".into()
            }
        );
        assert_eq!(s.resync, Duration::from_secs(5));
        assert!(run(&["--key", "-x"])
            .unwrap_err()
            .contains("must not start with '-'"));
        assert!(run(&["--resync", "0"]).unwrap_err().contains("at least 1s"));
        assert!(run(&["--key"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--bogus"]).unwrap_err().contains("unknown argument"));
        assert_eq!(run(&["--help"]).unwrap(), Invocation::Help);
        let Ok(Invocation::Run(s)) = run(&["--prefix=/a/", "--dir", "/d", "--status-file=/s"])
        else {
            panic!("parses")
        };
        assert_eq!(
            s.source,
            Source::Prefix {
                prefix: "/a/".into(),
                dir: "/d".into()
            }
        );
        assert_eq!(s.status_file, Some("/s".into()));
        assert!(run(&["--prefix", "/a"])
            .unwrap_err()
            .contains("needs --dir"));
        assert!(run(&["--prefix", "/a", "--dir", "/d"])
            .unwrap_err()
            .contains("must end with '/'"));
        assert!(run(&["--prefix", "/a/", "--dir", "/d", "--key", "/k"])
            .unwrap_err()
            .contains("cannot be used together"));
    }
}
