//! The PROXY protocol header (HAProxy's spec, versions 1 and 2), sent to a backend before any
//! client byte so that it sees the real client address instead of the proxy's.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` to the frontend address `frontend`. Both should
/// be canonical (an IPv4 client on a dual-stack socket written as IPv4); if the families still
/// differ the header says the addresses are unknown, as the spec asks.
pub fn header(version: ProxyProtocol, client: SocketAddr, frontend: SocketAddr) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => v1(client, frontend),
        ProxyProtocol::V2 => v2(client, frontend),
    }
}

fn v1(client: SocketAddr, frontend: SocketAddr) -> Vec<u8> {
    let family = match (client.ip(), frontend.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        frontend.ip(),
        client.port(),
        frontend.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr, frontend: SocketAddr) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + 36);
    h.extend_from_slice(&V2_SIGNATURE);
    // Version 2, command PROXY.
    h.push(0x21);
    match (client.ip(), frontend.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            h.push(0x11); // AF_INET, STREAM
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            h.push(0x21); // AF_INET6, STREAM
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
        }
        _ => {
            h.push(0x00); // AF_UNSPEC: the receiver ignores the (absent) addresses.
            h.extend_from_slice(&0u16.to_be_bytes());
            return h;
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&frontend.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let c: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let f: SocketAddr = "198.51.100.2:6300".parse().unwrap();
        assert_eq!(v1(c, f), b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 6300\r\n");
        let c6: SocketAddr = "[2001:db8::1]:5555".parse().unwrap();
        let f6: SocketAddr = "[::1]:6300".parse().unwrap();
        assert_eq!(v1(c6, f6), b"PROXY TCP6 2001:db8::1 ::1 5555 6300\r\n");
        assert_eq!(v1(c, f6), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_binary() {
        let c: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let f: SocketAddr = "198.51.100.2:6300".parse().unwrap();
        let h = v2(c, f);
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 5555);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 6300);
        assert_eq!(h.len(), 28);
        let f6: SocketAddr = "[::1]:6300".parse().unwrap();
        assert_eq!(v2("[::2]:1".parse().unwrap(), f6).len(), 16 + 36);
    }
}
