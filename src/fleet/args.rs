//! `flyproxy-etcd-sync`'s command line: arguments over the environment over the defaults.

use std::path::PathBuf;
use std::time::Duration;

/// The defaults, also named in `--help` and the packaged environment file.
pub const DEFAULT_KEY: &str = "/flyproxy/config";
pub const DEFAULT_CONFIG: &str = "/etc/flyproxy/config.json";
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

pub const HELP: &str = "\
flyproxy-etcd-sync: keep a flyproxy config file equal to an etcd key

usage: flyproxy-etcd-sync [--key KEY] [--config PATH] [--etcdctl PATH] [--resync DUR]

  --key KEY        the etcd key holding the config   (env FLYPROXY_ETCD_KEY, default /flyproxy/config)
  --config PATH    the file flyproxy reads            (env FLYPROXY_CONFIG, default /etc/flyproxy/config.json)
  --etcdctl PATH   the etcdctl binary                 (env FLYPROXY_ETCDCTL, default etcdctl)
  --resync DUR     re-read the key this often besides watching (env FLYPROXY_ETCD_RESYNC, default 30s)

etcd's endpoints, TLS and authentication are etcdctl's own settings, read from its environment:
ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER, ETCDCTL_PASSWORD,
ETCDCTL_DIAL_TIMEOUT, ETCDCTL_COMMAND_TIMEOUT, ... (see etcdctl --help).

The file is replaced atomically (a temporary file in its directory, then rename) at start and on
every change; a deleted key or an unreachable etcd leaves it as it is.
";

/// What the follower was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub key: String,
    pub config: PathBuf,
    pub etcdctl: PathBuf,
    pub resync: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Settings),
    Help,
    Version,
}

/// Arguments override the environment, which overrides the defaults. `Err` is a message for
/// the user (exit status 2).
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, String> {
    let mut key = env("FLYPROXY_ETCD_KEY").unwrap_or_else(|| DEFAULT_KEY.to_string());
    let mut config = env("FLYPROXY_CONFIG").unwrap_or_else(|| DEFAULT_CONFIG.to_string());
    let mut etcdctl = env("FLYPROXY_ETCDCTL").unwrap_or_else(|| "etcdctl".to_string());
    let mut resync = env("FLYPROXY_ETCD_RESYNC");
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--key" => &mut key,
            "--config" => &mut config,
            "--etcdctl" => &mut etcdctl,
            "--resync" => resync.get_or_insert_with(String::new),
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        };
        *slot = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{name} needs a value")),
        };
    }
    // A key starting with '-' would reach etcdctl as a flag; etcdctl's watch gives `--` another
    // meaning (a command to run), so such keys are refused rather than escaped.
    if key.is_empty() || key.starts_with('-') {
        return Err(format!(
            "--key {key:?}: an etcd key must be non-empty and must not start with '-'"
        ));
    }
    if config.is_empty() || config.ends_with('/') {
        return Err(format!("--config {config:?}: must name a file"));
    }
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
        key,
        config: PathBuf::from(config),
        etcdctl: PathBuf::from(etcdctl),
        resync,
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
                key: DEFAULT_KEY.into(),
                config: DEFAULT_CONFIG.into(),
                etcdctl: "etcdctl".into(),
                resync: DEFAULT_RESYNC,
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
            (s.key.as_str(), s.config.to_str().unwrap()),
            ("/fleet/a", "/tmp/c.json")
        );
        assert_eq!(s.resync, Duration::from_secs(5));
        assert!(run(&["--key", "-x"])
            .unwrap_err()
            .contains("must not start with '-'"));
        assert!(run(&["--resync", "0"]).unwrap_err().contains("at least 1s"));
        assert!(run(&["--key"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--bogus"]).unwrap_err().contains("unknown argument"));
        assert_eq!(run(&["--help"]).unwrap(), Invocation::Help);
    }
}
