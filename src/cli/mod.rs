//! The command line: subcommands, options and their defaults, parsed by hand (no argument
//! crate: the grammar is small and the dependency list is part of the design).
//!
//! A parse error is a `UsageError`; `main` prints it with a hint and exits 2.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::sys::log::{AccessLog, Format, Level};

mod help;
mod options;

pub use help::{BPF_HELP, CHECK_HELP, CTL_HELP, HELP, SIMPLE_HELP, STATUS_HELP, UPGRADE_HELP};
pub use options::parse_duration;
use options::{bpf_option, run_option};

/// Where `flyproxy status` looks when not told: the address the docs suggest for --metrics.
/// 9089: off 9100-9999, the Prometheus exporters' range (9100 is node_exporter's; see README).
pub const DEFAULT_STATUS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9089);

/// Where `flyproxy ctl` looks when not told: where the packaged service puts the admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/flyproxy/admin.sock";

/// Options shared by both modes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
    /// `config` came from `-c` rather than being the default.
    pub config_given: bool,
    pub max_connections: usize,
    /// Relay threads at most; None: as many as the connection bound.
    pub max_threads: Option<usize>,
    /// Open connections one client address may have at once; 0: no limit.
    pub max_connections_per_client: usize,
    pub connect_timeout: Duration,
    /// How long a target name's addresses are kept once looked up; zero: not kept.
    pub dns_ttl: Duration,
    /// None: never close a connection for being idle.
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    /// How long a connection on a port with Hostnames may take to send its whole ClientHello.
    pub preread_timeout: Duration,
    pub reload_interval: Duration,
    pub log_level: Level,
    pub log_format: Format,
    /// Write the log here instead of stderr (reopened on SIGUSR1).
    pub log_file: Option<PathBuf>,
    /// Where the per-connection lines go.
    pub access_log: AccessLog,
    /// Where to serve /metrics and /status; None: not served.
    pub metrics: Option<SocketAddr>,
    /// Per-target series are in /metrics while the config has at most this many targets.
    pub metrics_target_series: usize,
    /// Per-app series are in /metrics while the config has at most this many apps; past it,
    /// one series of every app's sum in each per-app family.
    pub metrics_app_series: usize,
    /// `flyproxy status --app NAME`: only this app.
    pub status_app: Option<String>,
    /// Where to write our pid once serving (and remove it at exit).
    pub pid_file: Option<PathBuf>,
    /// Run as this user (a name or uid) once set up; None: stay who we were started as.
    pub user: Option<String>,
    /// With `user`: run as this group (default: the user's primary group).
    pub group: Option<String>,
    /// Serve the admin socket (`flyproxy ctl`) here; None: not served.
    pub admin_socket: Option<PathBuf>,
    /// Keep the runtime state (what was set through the admin socket) here across restarts.
    pub state_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            config: PathBuf::from("config.json"),
            config_given: false,
            max_connections: 4096,
            max_threads: None,
            max_connections_per_client: 0,
            connect_timeout: Duration::from_secs(5),
            dns_ttl: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            drain_timeout: Duration::from_secs(30),
            preread_timeout: Duration::from_secs(5),
            reload_interval: Duration::from_secs(1),
            log_level: Level::Info,
            log_format: Format::Text,
            log_file: None,
            access_log: AccessLog::WithLog,
            metrics: None,
            // Small and medium configs keep every series (10,000 targets make /metrics about
            // 20 MB); past it a scrape would grow by 2 KB per target.
            metrics_target_series: 10_000,
            // The same for apps: 10,000 apps' series are about 29 MB; past it each app would
            // add 2.9 KB (590 MB at 200,000 apps), where the sums are a few KB however many.
            metrics_app_series: 10_000,
            status_app: None,
            pid_file: None,
            user: None,
            group: None,
            admin_socket: None,
            state_file: None,
        }
    }
}

/// How configured ports reach the process; the only thing the two modes do differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One listener per configured port.
    Simple,
    /// One listener per address family on `port`; sk_lookup steers every configured port to it.
    Bpf { port: u16, bind: Option<IpAddr> },
}

impl Mode {
    /// The mode's command name, as logs show it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Bpf { .. } => "bpf",
        }
    }
}

// One value per process, parsed once and moved into `run`: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    Run(Mode, Settings),
    /// Send SIGUSR2 to the proxy whose pid is in `pid_file`.
    Upgrade {
        pid_file: PathBuf,
    },
    /// Fetch and print the /status page of a running proxy.
    Status {
        metrics: SocketAddr,
        /// Only this app's status.
        app: Option<String>,
    },
    Check {
        config: PathBuf,
        /// The path came from `-c` (else it is the default, relative one).
        given: bool,
    },
    /// Send `command` to the admin socket at `socket` and print the answer.
    Ctl {
        socket: PathBuf,
        command: String,
    },
    /// Print this text to stdout and exit 0.
    Help(&'static str),
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct UsageError {
    pub message: String,
    /// The subcommand whose `--help` to point at.
    pub command: Option<&'static str>,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.command {
            Some(c) => write!(f, "{}\n(see 'flyproxy {c} --help')", self.message),
            None => write!(f, "{}\n(see 'flyproxy --help')", self.message),
        }
    }
}

/// Parse the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    let Some(first) = args.next() else {
        return Err(usage(
            None,
            "no command given: use 'simple', 'bpf', 'check', 'status' or 'upgrade'",
        ));
    };
    match first.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help(HELP)),
        "-V" | "--version" => return Ok(Command::Version),
        "ctl" => return ctl(args),
        _ => {}
    }
    let (name, mut mode) = command_named(&first)?;
    let cmd = Some(name);
    let mut s = Settings::default();
    let mut rest = args.peekable();
    while let Some(arg) = rest.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, UsageError> {
            inline
                .clone()
                .or_else(|| rest.next())
                .ok_or_else(|| usage(cmd, &format!("{flag} needs a value ({what})")))
        };
        if let Some(now) = option(name, &flag, &mut value, &mut s, &mut mode)? {
            return Ok(now);
        }
    }
    finish(name, mode, s)
}

/// `flyproxy ctl [-s PATH] COMMAND...`: the words after the options are the command line.
fn ctl(mut args: impl Iterator<Item = String>) -> Result<Command, UsageError> {
    let cmd = Some("ctl");
    let mut socket = PathBuf::from(DEFAULT_ADMIN_SOCKET);
    let mut words = Vec::new();
    while let Some(arg) = args.next() {
        if !words.is_empty() {
            words.push(arg);
            continue;
        }
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help(CTL_HELP)),
            "-V" | "--version" => return Ok(Command::Version),
            "-s" | "--socket" => {
                let v = args
                    .next()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| usage(cmd, &format!("{arg} needs a value (a socket path)")))?;
                socket = PathBuf::from(v);
            }
            a if a.starts_with("--socket=") => socket = PathBuf::from(&a["--socket=".len()..]),
            a if a.starts_with('-') => {
                return Err(usage(cmd, &format!("unknown option '{a}' for 'ctl'")))
            }
            _ => words.push(arg),
        }
    }
    if words.is_empty() {
        return Err(usage(
            cmd,
            "ctl needs a command, such as 'show apps' (or 'help')",
        ));
    }
    Ok(Command::Ctl {
        socket,
        command: words.join(" "),
    })
}

/// A value for the option being parsed, asked for with a description of what it should be.
type Value<'a> = dyn FnMut(&str) -> Result<String, UsageError> + 'a;

/// The command named first, and its mode if it runs the proxy.
fn command_named(first: &str) -> Result<(&'static str, Option<Mode>), UsageError> {
    Ok(match first {
        "simple" => ("simple", Some(Mode::Simple)),
        "bpf" => (
            "bpf",
            Some(Mode::Bpf {
                port: 8000,
                bind: None,
            }),
        ),
        "check" => ("check", None),
        "status" => ("status", None),
        "upgrade" => ("upgrade", None),
        other => {
            return Err(usage(
                None,
                &format!(
                "unknown command '{other}': use 'simple', 'bpf', 'check', 'status' or 'upgrade'"
            ),
            ))
        }
    })
}

/// Take one option of command `name` into `s` or `mode`. Some: a command to carry out at
/// once instead (--help, --version).
fn option(
    name: &'static str,
    flag: &str,
    value: &mut Value,
    s: &mut Settings,
    mode: &mut Option<Mode>,
) -> Result<Option<Command>, UsageError> {
    let cmd = Some(name);
    let runs = mode.is_some();
    match flag {
        "-h" | "--help" => return Ok(Some(Command::Help(help_of(name)))),
        "-V" | "--version" => return Ok(Some(Command::Version)),
        "-c" | "--config" if name != "status" && name != "upgrade" => {
            s.config = PathBuf::from(value("a file path")?);
            s.config_given = true;
        }
        "--pid-file" if runs || name == "upgrade" => {
            s.pid_file = Some(PathBuf::from(value("a file path")?));
        }
        "--metrics" if runs || name == "status" => {
            let v = value("an address like 127.0.0.1:9089")?;
            s.metrics = Some(v.parse::<SocketAddr>().map_err(|_| {
                usage(
                    cmd,
                    &format!("--metrics: '{v}' is not an address like 127.0.0.1:9089"),
                )
            })?);
        }
        "--app" if name == "status" => {
            let v = value("an app name")?;
            if v.is_empty() {
                return Err(usage(cmd, "--app: needs an app name"));
            }
            s.status_app = Some(v);
        }
        "-p" | "--port" | "--bind" if name == "bpf" => bpf_option(cmd, flag, value, mode)?,
        _ if runs && run_option(cmd, flag, value, s)? => {}
        other if other.starts_with('-') => {
            return Err(usage(
                cmd,
                &format!("unknown option '{other}' for '{name}'"),
            ))
        }
        other => return Err(usage(cmd, &format!("unexpected argument '{other}'"))),
    }
    Ok(None)
}

/// The help text of command `name`.
fn help_of(name: &str) -> &'static str {
    match name {
        "simple" => SIMPLE_HELP,
        "bpf" => BPF_HELP,
        "status" => STATUS_HELP,
        "upgrade" => UPGRADE_HELP,
        _ => CHECK_HELP,
    }
}

/// The command the options of `name` make up, once all are read.
fn finish(name: &'static str, mode: Option<Mode>, s: Settings) -> Result<Command, UsageError> {
    if s.group.is_some() && s.user.is_none() {
        return Err(usage(
            Some(name),
            "--group needs --user (the user to run as)",
        ));
    }
    Ok(match mode {
        Some(m) => Command::Run(m, s),
        None if name == "upgrade" => match s.pid_file {
            Some(pid_file) => Command::Upgrade { pid_file },
            None => {
                return Err(usage(
                    Some(name),
                    "upgrade needs --pid-file PATH (the running proxy's)",
                ))
            }
        },
        None if name == "status" => Command::Status {
            metrics: s.metrics.unwrap_or(DEFAULT_STATUS_ADDR),
            app: s.status_app,
        },
        None => Command::Check {
            given: s.config_given,
            config: s.config,
        },
    })
}

fn usage(command: Option<&'static str>, message: &str) -> UsageError {
    UsageError {
        message: message.to_owned(),
        command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn modes_and_options() {
        let Ok(Command::Run(Mode::Bpf { port, bind }, s)) = run(&[
            "bpf",
            "-p",
            "9000",
            "--bind=127.0.0.1",
            "--idle-timeout",
            "0",
        ]) else {
            panic!()
        };
        assert_eq!((port, bind), (9000, Some("127.0.0.1".parse().unwrap())));
        assert_eq!(s.idle_timeout, None);
        let Ok(Command::Run(Mode::Simple, s)) = run(&["simple", "-c", "x.json"]) else {
            panic!()
        };
        assert_eq!(s.config, PathBuf::from("x.json"));
        assert_eq!(s.max_connections, 4096);
        assert_eq!(s.max_connections_per_client, 0);
        assert_eq!(s.dns_ttl, Duration::from_secs(10));
        let Ok(Command::Run(_, s)) = run(&["simple", "--dns-ttl", "0"]) else {
            panic!()
        };
        assert_eq!(s.dns_ttl, Duration::ZERO);
        let Ok(Command::Run(_, s)) = run(&["simple", "--max-connections-per-client=10"]) else {
            panic!()
        };
        assert_eq!(s.max_connections_per_client, 10);
        assert!(run(&["simple", "--max-connections-per-client", "-1"]).is_err());
        assert!(run(&["simple", "-p", "80"]).is_err());
        assert!(run(&["check", "--max-connections", "5"]).is_err());
        assert!(run(&["simple", "--connect-timeout", "0"]).is_err());
        assert!(run(&["frob"]).is_err());
        assert!(run(&[]).is_err());
    }

    /// `flyproxy ctl`: options first, then every word is the command, joined by spaces.
    #[test]
    fn ctl_takes_the_words_after_its_options() {
        let Ok(Command::Ctl { socket, command }) = run(&[
            "ctl", "-s", "/x.sock", "set", "target", "web", "a:1", "state", "drain",
        ]) else {
            panic!()
        };
        assert_eq!(socket, PathBuf::from("/x.sock"));
        assert_eq!(command, "set target web a:1 state drain");
        let Ok(Command::Ctl { socket, command }) = run(&["ctl", "show", "conns", "-s"]) else {
            panic!()
        };
        assert_eq!(socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(
            command, "show conns -s",
            "an option after the command is a word of it"
        );
        assert!(run(&["ctl"]).is_err());
        assert!(run(&["ctl", "-s"]).is_err());
        assert!(run(&["ctl", "--frob", "help"]).is_err());
        assert!(matches!(run(&["ctl", "--help"]), Ok(Command::Help(_))));
        let Ok(Command::Run(_, s)) = run(&["simple", "--admin-socket", "/a", "--state-file=/b"])
        else {
            panic!()
        };
        assert_eq!(s.admin_socket, Some(PathBuf::from("/a")));
        assert_eq!(s.state_file, Some(PathBuf::from("/b")));
        assert!(run(&["simple", "--admin-socket", ""]).is_err());
    }
}
