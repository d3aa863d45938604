//! The options that tune a running proxy (both modes), bpf mode's own options, and the
//! value parsers they share (durations).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{usage, Mode, Settings, UsageError, Value};
use crate::sys::log::{AccessLog, Format, Level};

/// The options of both modes that only tune the proxy; false if `flag` is none of them.
pub(super) fn run_option(
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
        "--metrics-target-series" => {
            let v = value("a number")?;
            s.metrics_target_series = v.parse::<usize>().map_err(|_| {
                usage(
                    cmd,
                    &format!("--metrics-target-series: '{v}' is not a whole number (0: none)"),
                )
            })?;
        }
        "--metrics-app-series" => {
            let v = value("a number")?;
            s.metrics_app_series = v.parse::<usize>().map_err(|_| {
                usage(
                    cmd,
                    &format!("--metrics-app-series: '{v}' is not a whole number (0: none)"),
                )
            })?;
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
        "--admin-socket" => s.admin_socket = Some(path_value(cmd, flag, value("a socket path")?)?),
        "--state-file" => s.state_file = Some(path_value(cmd, flag, value("a file path")?)?),
        "--log-format" => {
            let v = value("text or json")?;
            s.log_format = Format::parse(&v)
                .ok_or_else(|| usage(cmd, &format!("--log-format: '{v}' is not text or json")))?;
        }
        "--log-file" => {
            let v = value("a file path")?;
            if v.is_empty() {
                return Err(usage(cmd, "--log-file: needs a file path"));
            }
            s.log_file = Some(PathBuf::from(v));
        }
        "--access-log" => {
            let v = value("off, stderr or a file path")?;
            s.access_log = AccessLog::parse(&v)
                .ok_or_else(|| usage(cmd, "--access-log: needs off, stderr or a file path"))?;
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
pub(super) fn bpf_option(
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

fn path_value(cmd: Option<&'static str>, flag: &str, v: String) -> Result<PathBuf, UsageError> {
    if v.is_empty() {
        return Err(usage(cmd, &format!("{flag}: needs a path")));
    }
    Ok(PathBuf::from(v))
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
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "1.5s", "-1s", "10d", "1 s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
