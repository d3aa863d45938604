//! The command line: subcommands, options and their defaults, parsed by hand (no argument
//! crate: the grammar is small and the dependency list is part of the design).
//!
//! A parse error is a `UsageError`; `main` prints it with a hint and exits 2.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::sys::log::{Format, Level};

/// Where `flyproxy status` looks when not told: the address the docs suggest for --metrics.
/// 9089: off 9100-9999, the Prometheus exporters' range (9100 is node_exporter's; see README).
pub const DEFAULT_STATUS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9089);

/// Options shared by both modes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
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
    /// Where to serve /metrics and /status; None: not served.
    pub metrics: Option<SocketAddr>,
    /// Where to write our pid once serving (and remove it at exit).
    pub pid_file: Option<PathBuf>,
    /// Run as this user (a name or uid) once set up; None: stay who we were started as.
    pub user: Option<String>,
    /// With `user`: run as this group (default: the user's primary group).
    pub group: Option<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            config: PathBuf::from("config.json"),
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
            metrics: None,
            pid_file: None,
            user: None,
            group: None,
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
    },
    Check {
        config: PathBuf,
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

pub const HELP: &str = "\
flyproxy - a layer-4 TCP proxy and load balancer

Usage:
  flyproxy simple [OPTIONS]           one listener per configured port
  flyproxy bpf [-p PORT] [OPTIONS]    one listener; eBPF sk_lookup steers every port to it
  flyproxy check [-c PATH]            validate a config file and exit
  flyproxy upgrade --pid-file PATH    replace the running binary without refusing a connection
  flyproxy status [--metrics ADDR]    show apps, targets, health and open connections of a
                                      proxy running with --metrics (default 127.0.0.1:9089)

Run 'flyproxy <command> --help' for the options of each command.

  -h, --help       print this help
  -V, --version    print the version
";

/// The options both modes share, as one literal so that each help text can `concat!` it.
macro_rules! run_options {
    () => {
        "  -c, --config PATH          config file (default ./config.json)
      --max-connections N    open client connections at most; beyond it new ones wait
                             in the kernel backlog (default 4096)
      --max-threads N        relay threads at most; idle connections hold none, and
                             busy ones take turns beyond it (default: --max-connections)
      --max-connections-per-client N
                             open connections one client address (IPv6: one /64) may
                             have; past it new ones are closed at once (default 0: no
                             limit)
      --connect-timeout DUR  time to look up and connect to one target (default 5s)
      --dns-ttl DUR          how long a target name's addresses are kept once looked
                             up (default 10s; 0: look up at every connect); failed
                             lookups are kept 1s
      --idle-timeout DUR     close a connection that moved no byte for this long
                             (default 1h; 0 disables)
      --drain-timeout DUR    how long open connections may finish after their port is
                             removed or on SIGTERM (default 30s)
      --preread-timeout DUR  on a port where apps have Hostnames, how long a client may
                             take to send its whole TLS ClientHello (default 5s)
      --reload-interval DUR  how often the config file's mtime is checked (default 1s)
      --log-level LEVEL      error, warn, info or debug (default info)
      --log-format FORMAT    text or json (default text)
      --metrics ADDR         serve Prometheus /metrics and a /status page on ADDR,
                             e.g. 127.0.0.1:9089 (default: off)
      --pid-file PATH        write the pid here once serving; an upgrade rewrites it
      --user USER            once set up, run as USER (a name or uid; needs root)
      --group GROUP          with --user: run as GROUP (default: USER's primary group)
  -h, --help                 print this help
  -V, --version              print the version

DUR is a number with a unit: 250ms, 30s, 5m, 1h.
"
    };
}

pub const SIMPLE_HELP: &str = concat!(
    "flyproxy simple - one listener per configured port\n\n",
    "Usage: flyproxy simple [OPTIONS]\n\nOptions:\n",
    run_options!(),
    "Signals: SIGHUP reloads the config now; SIGTERM or SIGINT drains and exits\n",
    "(a second one exits at once); SIGUSR2 upgrades to the binary now at the same path.\n",
);

pub const BPF_HELP: &str = concat!(
    "flyproxy bpf - one listener; an eBPF sk_lookup program steers every configured port to it\n\n",
    "Usage: flyproxy bpf [-p PORT] [--bind ADDR] [OPTIONS]\n\n",
    "Needs CAP_BPF and CAP_NET_ADMIN (root) and Linux 5.9 or later.\n\nOptions:\n",
    "  -p, --port PORT            port of the listener itself (default 8000)\n",
    "      --bind ADDR            address of the listener (default: all, IPv4 and IPv6)\n",
    run_options!(),
    "Signals: SIGHUP reloads the config now; SIGTERM or SIGINT stops steering, drains and\n",
    "exits (a second one exits at once); SIGUSR2 upgrades to the binary now at the same path.\n",
);

pub const UPGRADE_HELP: &str = "\
flyproxy upgrade - replace a running proxy with the binary now at its path, without
refusing a connection

Usage: flyproxy upgrade --pid-file PATH

Sends SIGUSR2 to the proxy whose pid is in PATH (started with --pid-file PATH). It starts the
binary anew with its listening sockets; once the new process serves, the old one stops
accepting and lets its open connections finish (up to its --drain-timeout). If the new
process fails to start, the old one carries on.

Options:
      --pid-file PATH  the running proxy's pid file
  -h, --help           print this help
  -V, --version        print the version
";

pub const STATUS_HELP: &str = "\
flyproxy status - show a running proxy's apps, ports, targets, health and open connections

Usage: flyproxy status [--metrics ADDR]

Reads /status.json from a proxy run with --metrics ADDR and prints it as /status shows it;
exits 1 if no flyproxy answers. Port 9089 is off 9100-9999, the exporters' (9100: node_exporter).

Options:
      --metrics ADDR  the proxy's --metrics address (default 127.0.0.1:9089)
  -h, --help          print this help
  -V, --version       print the version
";

pub const CHECK_HELP: &str = "\
flyproxy check - validate a config file

Usage: flyproxy check [-c PATH]

Prints a one-line summary and exits 0 if the file is valid; prints every problem
found and exits 1 if not.

Options:
  -c, --config PATH   config file (default ./config.json)
  -h, --help          print this help
  -V, --version       print the version
";

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
            s.config = PathBuf::from(value("a file path")?)
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

/// The options of both modes that only tune the proxy; false if `flag` is none of them.
fn run_option(
    cmd: Option<&'static str>,
    flag: &str,
    value: &mut Value,
    s: &mut Settings,
) -> Result<bool, UsageError> {
    match flag {
        "--max-connections" => {
            let v = value("a number")?;
            s.max_connections = match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(usage(
                        cmd,
                        &format!("--max-connections: '{v}' is not a whole number above 0"),
                    ))
                }
            }
        }
        "--max-threads" => {
            let v = value("a number")?;
            s.max_threads = match v.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(usage(
                        cmd,
                        &format!("--max-threads: '{v}' is not a whole number above 0"),
                    ))
                }
            }
        }
        "--max-connections-per-client" => {
            let v = value("a number")?;
            s.max_connections_per_client = v.parse::<usize>().map_err(|_| {
                usage(
                    cmd,
                    &format!(
                        "--max-connections-per-client: '{v}' is not a whole number (0: no limit)"
                    ),
                )
            })?;
        }
        "--connect-timeout" => {
            s.connect_timeout = nonzero(cmd, flag, duration(cmd, flag, &value("a duration")?)?)?
        }
        "--dns-ttl" => s.dns_ttl = duration(cmd, flag, &value("a duration")?)?,
        "--idle-timeout" => {
            let d = duration(cmd, flag, &value("a duration")?)?;
            s.idle_timeout = (!d.is_zero()).then_some(d);
        }
        "--drain-timeout" => s.drain_timeout = duration(cmd, flag, &value("a duration")?)?,
        "--preread-timeout" => {
            s.preread_timeout = nonzero(cmd, flag, duration(cmd, flag, &value("a duration")?)?)?
        }
        "--reload-interval" => {
            s.reload_interval = nonzero(cmd, flag, duration(cmd, flag, &value("a duration")?)?)?
        }
        "--user" => {
            let v = value("a user name or uid")?;
            if v.is_empty() {
                return Err(usage(cmd, "--user: needs a user name or uid"));
            }
            s.user = Some(v);
        }
        "--group" => {
            let v = value("a group name or gid")?;
            if v.is_empty() {
                return Err(usage(cmd, "--group: needs a group name or gid"));
            }
            s.group = Some(v);
        }
        "--log-format" => {
            let v = value("text or json")?;
            s.log_format = Format::parse(&v)
                .ok_or_else(|| usage(cmd, &format!("--log-format: '{v}' is not text or json")))?;
        }
        "--log-level" => {
            let v = value("error, warn, info or debug")?;
            s.log_level = Level::parse(&v).ok_or_else(|| {
                usage(
                    cmd,
                    &format!("--log-level: '{v}' is not error, warn, info or debug"),
                )
            })?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// bpf mode's own options: the listener's port and address.
fn bpf_option(
    cmd: Option<&'static str>,
    flag: &str,
    value: &mut Value,
    mode: &mut Option<Mode>,
) -> Result<(), UsageError> {
    let Some(Mode::Bpf { port, bind }) = mode.as_mut() else {
        return Ok(());
    };
    if flag == "--bind" {
        let v = value("an IP address")?;
        let ip = v
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| usage(cmd, &format!("--bind: '{v}' is not an IP address")))?;
        *bind = Some(ip);
    } else {
        let v = value("a port")?;
        *port = match v.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(usage(
                    cmd,
                    &format!("{flag}: '{v}' is not a port (1-65535)"),
                ))
            }
        };
    }
    Ok(())
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
        },
        None => Command::Check { config: s.config },
    })
}

fn usage(command: Option<&'static str>, message: &str) -> UsageError {
    UsageError {
        message: message.to_owned(),
        command,
    }
}

fn nonzero(cmd: Option<&'static str>, flag: &str, d: Duration) -> Result<Duration, UsageError> {
    if d.is_zero() {
        Err(usage(cmd, &format!("{flag} must be more than 0")))
    } else {
        Ok(d)
    }
}

fn duration(cmd: Option<&'static str>, flag: &str, v: &str) -> Result<Duration, UsageError> {
    parse_duration(v).ok_or_else(|| {
        usage(
            cmd,
            &format!("{flag}: '{v}' is not a duration (write it like 250ms, 30s, 5m, 1h)"),
        )
    })
}

/// `250ms`, `30s`, `5m`, `1h`; a bare `0` is allowed (it disables what takes it).
pub fn parse_duration(v: &str) -> Option<Duration> {
    if v == "0" {
        return Some(Duration::ZERO);
    }
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests;
