//! TLS server names as apps' `Hostnames` list them: exact (`shop.example.com`) or a wildcard
//! for one leftmost label (`*.shop.example.com`), compared case-insensitively with a trailing
//! dot ignored, as RFC 6066 and RFC 6125 6.4.3 ask.

use std::fmt;

/// A configured hostname, lower-cased and without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// This name only.
    Exact(String),
    /// Any name that is one label followed by this suffix (stored without the `*.`).
    Wildcard(String),
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(n) => f.write_str(n),
            Pattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Why a configured hostname is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostnameError {
    Empty,
    IpLiteral,
    BadWildcard,
    BadName,
}

impl fmt::Display for HostnameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostnameError::Empty => "is empty",
            HostnameError::IpLiteral => {
                "is an IP address: a TLS client never sends one as its server name (use Addresses)"
            }
            HostnameError::BadWildcard => {
                "has a wildcard other than a whole leftmost label (write \"*.example.com\")"
            }
            HostnameError::BadName => {
                "is not a DNS name (labels of letters, digits, '-' or '_', 1-63 bytes each, 253 in all)"
            }
        })
    }
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, HostnameError> {
        let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if s.is_empty() {
            return Err(HostnameError::Empty);
        }
        if s.parse::<std::net::IpAddr>().is_ok() {
            return Err(HostnameError::IpLiteral);
        }
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, s),
        };
        if name.contains('*') || (!wild && name.starts_with('*')) {
            return Err(HostnameError::BadWildcard);
        }
        if !is_dns_name(&name) {
            return Err(HostnameError::BadName);
        }
        Ok(if wild {
            Pattern::Wildcard(name)
        } else {
            Pattern::Exact(name)
        })
    }
}

/// Labels of `[a-z0-9_-]` (already lower-cased), 1-63 bytes, not starting or ending with '-';
/// 253 bytes in all.
pub fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A server name from a ClientHello made comparable: lower-cased, trailing dot dropped. None if
/// it is not a DNS name (then it can match no configured hostname).
pub fn normalize(sent: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(sent).ok()?;
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    is_dns_name(&s).then_some(s)
}

/// The suffix a wildcard would need to match `name` (all but its leftmost label).
pub fn wildcard_suffix(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            Pattern::parse("Shop.Example.COM.").unwrap(),
            Pattern::Exact("shop.example.com".into())
        );
        assert_eq!(
            Pattern::parse("*.shop.example.com").unwrap().to_string(),
            "*.shop.example.com"
        );
        for bad in [
            "",
            ".",
            "*",
            "a.*.com",
            "*x.com",
            "x*.com",
            "**.com",
            "a..b",
            "-a.com",
            "192.0.2.1",
            "::1",
            "a b.com",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            normalize(b"A.Example.com.").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(normalize(b"a\0b"), None);
        assert_eq!(
            wildcard_suffix("a.shop.example.com"),
            Some("shop.example.com")
        );
    }
}
