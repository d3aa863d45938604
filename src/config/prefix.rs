//! An IP address prefix (`192.0.2.0/24`, `2001:db8::11`), as an app's `Addresses` name the
//! local addresses it answers on, and the longest-prefix choice between them.
//!
//! IPv4 and IPv6 are kept apart: an IPv6 prefix never covers an IPv4 address (not even
//! `::/0` the v4-mapped ones), so "every IPv6 address" does not take IPv4 connections.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A network prefix: the address with every bit past `len` zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a string is not a prefix; each says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// Neither an IPv4 nor an IPv6 address.
    NotAnAddress,
    /// The length after `/` is not a number within the family's bits.
    BadLength { max: u8 },
    /// Bits set past the prefix length; `masked` is what was probably meant.
    HostBits { masked: Prefix },
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`); `v4` is the IPv4 way to write it.
    Mapped { v4: String },
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::NotAnAddress => {
                f.write_str("is not an IP address or prefix (e.g. \"192.0.2.10\", \"198.51.100.0/24\", \"2001:db8::/32\")")
            }
            PrefixError::BadLength { max } => {
                write!(f, "has a prefix length that is not a number from 0 to {max}")
            }
            PrefixError::HostBits { masked } => {
                write!(f, "has bits set past its prefix length (did you mean \"{masked}\"?)")
            }
            PrefixError::Mapped { v4 } => {
                write!(f, "is an IPv4-mapped IPv6 address: write it as IPv4 (\"{v4}\")")
            }
        }
    }
}

impl Prefix {
    /// Every IPv4 address.
    pub const ALL_V4: Prefix = Prefix {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// Every IPv6 address.
    pub const ALL_V6: Prefix = Prefix {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// Parse `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or `v6/n`. A bare address is a host
    /// prefix (/32 or /128). Plain dotted IPv4 only (Rust's parser refuses `127.1`, `010.0.0.1`).
    pub fn parse(s: &str) -> Result<Prefix, PrefixError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| PrefixError::NotAnAddress)?;
        let max = bits(addr);
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && l.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(PrefixError::BadLength { max }),
            },
        };
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped() {
                let v4 = match len {
                    128 => v4.to_string(),
                    n if n >= 96 => format!("{v4}/{}", n - 96),
                    _ => return Prefix { addr, len }.checked(),
                };
                return Err(PrefixError::Mapped { v4 });
            }
        }
        Prefix { addr, len }.checked()
    }

    fn checked(self) -> Result<Prefix, PrefixError> {
        let masked = Prefix::new(self.addr, self.len);
        if masked.addr != self.addr {
            return Err(PrefixError::HostBits { masked });
        }
        Ok(masked)
    }

    /// The prefix of `len` bits of `addr` (bits past it cleared; `len` capped at the family's).
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        let len = len.min(bits(addr));
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Prefix { addr, len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// One address (/32 or /128), which a listener can bind.
    pub fn is_host(&self) -> bool {
        self.len == bits(self.addr)
    }

    /// Every address of its family.
    pub fn is_all(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` is inside. An IPv4-mapped IPv6 address is taken as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        Prefix::new(ip, self.len).addr == self.addr
    }

    /// Whether the two have an address in common (one contains the other).
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            match self.addr {
                IpAddr::V4(_) => f.write_str("every IPv4 address"),
                IpAddr::V6(_) => f.write_str("every IPv6 address"),
            }
        } else if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; anything else as it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s).unwrap()
    }

    #[test]
    fn parses_and_contains() {
        assert_eq!(p("192.0.2.10").to_string(), "192.0.2.10");
        assert_eq!(p("198.51.100.0/24").to_string(), "198.51.100.0/24");
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(p("0.0.0.0/0").to_string(), "every IPv4 address");
        assert!(p("198.51.100.0/24").contains("198.51.100.7".parse().unwrap()));
        assert!(!p("198.51.100.0/24").contains("198.51.101.7".parse().unwrap()));
        assert!(p("198.51.100.0/24").contains("::ffff:198.51.100.7".parse().unwrap()));
        assert!(!p("::/0").contains("127.0.0.1".parse().unwrap()));
        assert!(p("::/0").contains("::1".parse().unwrap()));
        assert!(p("fd00::/8").overlaps(&p("fd00::2")));
    }

    #[test]
    fn errors_say_what_to_write() {
        let e = |s: &str| Prefix::parse(s).unwrap_err().to_string();
        assert!(e("192.0.2.1/24").contains("did you mean \"192.0.2.0/24\""));
        assert!(e("192.0.2.0/33").contains("from 0 to 32"));
        assert!(e("192.0.2.0/+3").contains("from 0 to 32"));
        assert!(e("::ffff:1.2.3.4").contains("\"1.2.3.4\""));
        assert!(e("shop").contains("not an IP address"));
        assert!(e("127.1").contains("not an IP address"));
    }
}
