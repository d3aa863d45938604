//! An app's `Targets`: `host:port` with a DNS name, an IPv4 address or a bracketed IPv6
//! address, nothing a resolver would read another way.

use std::net::Ipv6Addr;

use crate::config::model::Target;
use crate::config::problem::{Problem, Problems};

/// The targets of app `name` that are well-formed (an empty or missing list is the caller's
/// to report).
pub(super) fn targets(name: &str, raw: Vec<String>, problems: &mut Problems) -> Vec<Target> {
    let mut targets = Vec::new();
    for t in raw {
        match parse_target(&t) {
            Ok(target) => targets.push(target),
            Err(why) => problems.push(Problem::BadTarget {
                app: name.to_owned(),
                target: t,
                why,
            }),
        }
    }
    targets
}

/// Parse `host:port`. The host is a DNS name, an IPv4 address, or a bracketed IPv6 address.
pub fn parse_target(s: &str) -> Result<Target, &'static str> {
    const SHAPE: &str = "is not host:port (e.g. \"backend.internal:7001\" or \"[::1]:7001\")";
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once("]:") else {
            return Err(SHAPE);
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address between the brackets");
        }
        (v6, port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(SHAPE);
        };
        if host.contains(':') {
            return Err("looks like an IPv6 address: write it in brackets, as \"[::1]:7001\"");
        }
        if host.is_empty() {
            return Err(SHAPE);
        }
        // A host whose last label is a number is not a DNS name but an IPv4 address; the
        // resolver would also take legacy forms ("127.1", "0x7f.1", octal "010.0.0.5" as
        // 8.0.0.5), so only the plain dotted form is accepted.
        let last = host.rsplit('.').next().unwrap_or(host);
        let numeric = !last.is_empty()
            && (last.bytes().all(|b| b.is_ascii_digit())
                || last.starts_with("0x")
                || last.starts_with("0X"));
        if numeric && host.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(
                "has an IPv4 address that is not four decimal numbers 0-255 without leading zeros",
            );
        }
        let name_ok = host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !name_ok {
            return Err("has a host that is not a DNS name or IP address");
        }
        (host, port)
    };
    // A leading zero is refused rather than read as decimal: `041901` is 41901 to us but
    // reads as octal to some tools, and a port written two ways hides typos.
    if port.len() > 1 && port.starts_with('0') {
        return Err("has a port with a leading zero (write the plain number, 1-65535)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(Target {
            host: host.to_owned(),
            port: p,
        }),
        _ => Err("has a port that is not a number in 1-65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("[::1]:7001").unwrap().to_string(),
            "[::1]:7001"
        );
        assert_eq!(parse_target("10.0.0.1:80").unwrap().host, "10.0.0.1");
        assert!(parse_target("host:0").is_err());
        assert!(parse_target("host:+80").is_err());
        assert!(parse_target("host:65536").is_err());
        assert!(parse_target("[zz]:80").is_err());
        assert!(parse_target("bad host:80").is_err());
        assert!(parse_target(":80").is_err());
        for legacy in [
            "127.1:80",
            "0x7f.1:80",
            "010.000.000.005:5432",
            "1.2.3.256:80",
        ] {
            assert!(parse_target(legacy).is_err(), "{legacy}");
        }
        assert!(parse_target("10.0.0.5:5432").is_ok());
    }
}
