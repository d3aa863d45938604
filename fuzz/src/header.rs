//! The PROXY protocol writer, checked by parsing its output back with a small parser written
//! from HAProxy's spec (proxy-protocol.txt), independent of src/proxy_protocol.rs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use arbitrary::Arbitrary;
use flyproxy::backends::proxy_protocol::header;
use flyproxy::config::ProxyProtocol;
use flyproxy::sys::net::canonical;

/// v1: "the maximum line lengths the receiver must support including the CRLF are [...] 107
/// characters" (the worst case, TCP6 with both ports 65535, is 104).
pub const V1_MAX: usize = 107;
/// v2: the 12-byte signature.
pub const V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// What a header says about the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    Tcp4(SocketAddrV4, SocketAddrV4),
    Tcp6(SocketAddrV6, SocketAddrV6),
    /// v1 UNKNOWN, v2 AF_UNSPEC: the receiver uses the real connection endpoints.
    Unknown,
}

fn port(s: &str) -> Result<u16, String> {
    // Decimal digits, no sign, no leading zero (but "0" itself).
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(format!("bad port {s:?}"));
    }
    s.parse().map_err(|_| format!("port out of range {s:?}"))
}

/// Parse a whole v1 header (the writer returns exactly one header, nothing after it).
pub fn parse_v1(h: &[u8]) -> Result<Said, String> {
    if h.len() > V1_MAX {
        return Err(format!(
            "v1 header is {} bytes, more than {V1_MAX}",
            h.len()
        ));
    }
    let line = h
        .strip_suffix(b"\r\n")
        .ok_or("v1 header does not end in CRLF")?;
    if line
        .iter()
        .any(|&b| b == b'\r' || b == b'\n' || !b.is_ascii() || b.is_ascii_control())
    {
        return Err("v1 header has a control or non-ASCII byte before its CRLF".into());
    }
    let line = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let rest = line.strip_prefix("PROXY ").ok_or("no \"PROXY \" prefix")?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Ok(Said::Unknown);
    }
    let f: Vec<&str> = rest.split(' ').collect();
    let [proto, src, dst, sport, dport] = f.as_slice() else {
        return Err(format!("expected 5 fields after PROXY, got {f:?}"));
    };
    let (sport, dport) = (port(sport)?, port(dport)?);
    match *proto {
        "TCP4" => {
            let s: Ipv4Addr = src.parse().map_err(|_| format!("bad IPv4 {src:?}"))?;
            let d: Ipv4Addr = dst.parse().map_err(|_| format!("bad IPv4 {dst:?}"))?;
            Ok(Said::Tcp4(
                SocketAddrV4::new(s, sport),
                SocketAddrV4::new(d, dport),
            ))
        }
        "TCP6" => {
            let s: Ipv6Addr = src.parse().map_err(|_| format!("bad IPv6 {src:?}"))?;
            let d: Ipv6Addr = dst.parse().map_err(|_| format!("bad IPv6 {dst:?}"))?;
            Ok(Said::Tcp6(
                SocketAddrV6::new(s, sport, 0, 0),
                SocketAddrV6::new(d, dport, 0, 0),
            ))
        }
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// Parse a whole v2 header.
pub fn parse_v2(h: &[u8]) -> Result<Said, String> {
    if h.len() < 16 {
        return Err(format!("v2 header is only {} bytes", h.len()));
    }
    if h[..12] != V2_SIG {
        return Err("bad v2 signature".into());
    }
    if h[12] >> 4 != 2 {
        return Err(format!("version nibble {} is not 2", h[12] >> 4));
    }
    if h[12] & 0x0F != 1 {
        return Err(format!("command {} is not PROXY (1)", h[12] & 0x0F));
    }
    let len = u16::from_be_bytes([h[14], h[15]]) as usize;
    if h.len() != 16 + len {
        return Err(format!(
            "length field {len} but {} bytes follow",
            h.len() - 16
        ));
    }
    let body = &h[16..];
    let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    match h[13] {
        0x00 => Ok(Said::Unknown),
        0x11 => {
            if len < 12 {
                return Err(format!("TCP4 block of {len} bytes, less than 12"));
            }
            let ip = |i: usize| Ipv4Addr::new(body[i], body[i + 1], body[i + 2], body[i + 3]);
            Ok(Said::Tcp4(
                SocketAddrV4::new(ip(0), p(8)),
                SocketAddrV4::new(ip(4), p(10)),
            ))
        }
        0x21 => {
            if len < 36 {
                return Err(format!("TCP6 block of {len} bytes, less than 36"));
            }
            let ip = |i: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&body[i..i + 16]).unwrap());
            Ok(Said::Tcp6(
                SocketAddrV6::new(ip(0), p(32), 0, 0),
                SocketAddrV6::new(ip(16), p(34), 0, 0),
            ))
        }
        other => Err(format!(
            "address family/protocol byte {other:#04x} is not TCP4, TCP6 or UNSPEC"
        )),
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum AddrGen {
    V4([u8; 4], u16),
    V6([u8; 16], u16, u32, u32),
    /// An IPv4 client seen on a dual-stack socket: `::ffff:a.b.c.d`.
    Mapped([u8; 4], u16),
    Edge(u8, u16),
}

impl AddrGen {
    pub fn addr(self) -> SocketAddr {
        match self {
            AddrGen::V4(o, p) => SocketAddr::new(IpAddr::V4(o.into()), p),
            AddrGen::V6(o, p, flow, scope) => {
                SocketAddr::V6(SocketAddrV6::new(o.into(), p, flow, scope))
            }
            AddrGen::Mapped(o, p) => {
                SocketAddr::new(IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped()), p)
            }
            AddrGen::Edge(k, p) => {
                let ip: IpAddr = match k % 8 {
                    0 => Ipv4Addr::UNSPECIFIED.into(),
                    1 => Ipv4Addr::BROADCAST.into(),
                    2 => Ipv6Addr::UNSPECIFIED.into(),
                    3 => Ipv6Addr::LOCALHOST.into(),
                    4 => Ipv6Addr::from([0xffff; 8]).into(),
                    // IPv4-compatible (deprecated), not mapped: stays IPv6.
                    5 => Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x7f00, 1).into(),
                    6 => "64:ff9b::1.2.3.4".parse::<Ipv6Addr>().unwrap().into(),
                    _ => Ipv4Addr::LOCALHOST.into(),
                };
                SocketAddr::new(ip, [0, 1, 65535, p][usize::from(k / 8 % 4)])
            }
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct HeaderInput {
    pub v2: bool,
    pub client: AddrGen,
    pub frontend: AddrGen,
}

/// What the spec says a header for these two addresses carries.
fn expected(client: SocketAddr, frontend: SocketAddr) -> Said {
    match (client, frontend) {
        (SocketAddr::V4(c), SocketAddr::V4(f)) => Said::Tcp4(c, f),
        (SocketAddr::V6(c), SocketAddr::V6(f)) => Said::Tcp6(
            SocketAddrV6::new(*c.ip(), c.port(), 0, 0),
            SocketAddrV6::new(*f.ip(), f.port(), 0, 0),
        ),
        _ => Said::Unknown,
    }
}

fn one(v2: bool, client: SocketAddr, frontend: SocketAddr) {
    let version = if v2 {
        ProxyProtocol::V2
    } else {
        ProxyProtocol::V1
    };
    let h = header(version, client, frontend);
    let said = if v2 { parse_v2(&h) } else { parse_v1(&h) };
    match said {
        Ok(said) => assert_eq!(
            said,
            expected(client, frontend),
            "{version:?} header for {client} -> {frontend}: {h:?}"
        ),
        Err(e) => panic!("{version:?} header for {client} -> {frontend} is malformed: {e}: {h:?}"),
    }
}

/// The header for the addresses as given, and for them made canonical as the proxy does
/// before writing one (an IPv4 client on a dual-stack socket is written as TCP4).
pub fn check(input: &HeaderInput) {
    let (c, f) = (input.client.addr(), input.frontend.addr());
    one(input.v2, c, f);
    let (cc, cf) = (canonical(c), canonical(f));
    one(input.v2, cc, cf);
    if let (Some(_), Some(_)) = (mapped(c), mapped(f)) {
        // Both IPv4 underneath: the canonical header must name them as IPv4, never UNKNOWN.
        assert!(matches!(expected(cc, cf), Said::Tcp4(..)));
    }
}

fn mapped(a: SocketAddr) -> Option<Ipv4Addr> {
    match a.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}
