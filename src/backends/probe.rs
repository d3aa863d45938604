//! What an active health check sends once its connect succeeded, and how the answer is judged
//! (`health` runs the checks; this file only knows the bytes).
//!
//! - `tcp`: nothing: the connect was the check.
//! - `http`: `GET Path HTTP/1.1` with `Host` and `Connection: close`; the status code of the
//!   status line decides (`ExpectStatus`, 200-399 by default). Only the status line is read,
//!   at most `READ_MAX` bytes of it: a target streaming a body forever, or a line that never
//!   ends, costs no more.
//! - `tls`: a ClientHello (server name as configured; common TLS 1.2 and 1.3 suites, an X25519
//!   key share of random bytes: the check never finishes the handshake, so the key is never
//!   used); a handshake record holding a ServerHello (or TLS 1.3's HelloRetryRequest, also a
//!   ServerHello) passes; an alert or anything else fails.
//!
//! The answer is judged as soon as it can be (`judge` says `More` until then); `health` holds
//! the whole exchange to the check's `TimeoutMs`.

use std::io::{self, Read, Write};
use std::net::IpAddr;

use rand::RngCore;

use crate::config::{CheckKind, HttpCheck, Target};

/// At most this many bytes of an answer are read: a status line longer than this is not one.
pub const READ_MAX: usize = 1024;

/// What the answer so far says.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Failed, and why (for the log and `last_error`).
    Fail(String),
    /// Not enough bytes yet.
    More,
}

/// What a check of `kind` sends to `target` once connected; empty for `tcp`.
pub fn request(kind: &CheckKind, target: &Target) -> Vec<u8> {
    match kind {
        CheckKind::Tcp => Vec::new(),
        CheckKind::Http(http) => http_request(http, target),
        CheckKind::Tls { server_name } => {
            // An address is never sent as a server name (RFC 6066 3): a name target's host is.
            let name = server_name.as_deref().or_else(|| {
                target
                    .host
                    .parse::<IpAddr>()
                    .is_err()
                    .then_some(&*target.host)
            });
            client_hello(name)
        }
    }
}

/// Judge the answer `got` (all of it so far; `closed`: the target closed its side, no more is
/// coming).
pub fn judge(kind: &CheckKind, got: &[u8], closed: bool) -> Verdict {
    let verdict = match kind {
        CheckKind::Tcp => Verdict::Pass,
        CheckKind::Http(http) => judge_http(http, got),
        CheckKind::Tls { .. } => judge_tls(got),
    };
    match verdict {
        Verdict::More if closed => Verdict::Fail(format!(
            "the target closed after {} bytes, before a whole answer",
            got.len()
        )),
        Verdict::More if got.len() >= READ_MAX => {
            Verdict::Fail(format!("no answer in the first {READ_MAX} bytes"))
        }
        v => v,
    }
}

/// A request being written and its answer read, on a non-blocking stream.
pub struct Exchange {
    request: Vec<u8>,
    sent: usize,
    /// The answer so far, at most `READ_MAX` bytes.
    answer: Vec<u8>,
}

impl Exchange {
    pub fn new(request: Vec<u8>) -> Exchange {
        Exchange {
            request,
            sent: 0,
            answer: Vec::with_capacity(256),
        }
    }

    pub fn answer(&self) -> &[u8] {
        &self.answer
    }

    /// Write the rest of the request and read the answer up to `READ_MAX`, each until it
    /// would block (the caller's poll is edge-triggered); whether the target closed its side.
    pub fn step<S: Read + Write>(&mut self, stream: &mut S) -> io::Result<bool> {
        while self.sent < self.request.len() {
            match stream.write(&self.request[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = [0u8; 512];
        while self.answer.len() < READ_MAX {
            let room = (READ_MAX - self.answer.len()).min(buf.len());
            match stream.read(&mut buf[..room]) {
                Ok(0) => return Ok(true),
                Ok(n) => self.answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset once some answer came is the target closing: what came is judged.
                Err(e) if !self.answer.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(true)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

fn http_request(http: &HttpCheck, target: &Target) -> Vec<u8> {
    // Path and Host were held to visible ASCII by the config's validation: nothing in them
    // can end the line or add a header.
    let host = match &http.host {
        Some(h) => h.clone(),
        None => target.to_string(),
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: flyproxy-health-check\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        http.path
    )
    .into_bytes()
}

/// `HTTP/1.x NNN` then a space or the line's end.
fn judge_http(http: &HttpCheck, got: &[u8]) -> Verdict {
    const PREFIX: &[u8] = b"HTTP/1.";
    let shown = || {
        String::from_utf8_lossy(&got[..got.len().min(40)])
            .escape_debug()
            .to_string()
    };
    let n = got.len().min(PREFIX.len());
    if got[..n] != PREFIX[..n] {
        return Verdict::Fail(format!("not an HTTP/1 answer: \"{}\"", shown()));
    }
    // "HTTP/1.1 200" and one byte after it.
    if got.len() < 13 {
        return Verdict::More;
    }
    let code = &got[9..12];
    let well_formed = got[7].is_ascii_digit()
        && got[8] == b' '
        && code.iter().all(u8::is_ascii_digit)
        && matches!(got[12], b' ' | b'\r' | b'\n');
    if !well_formed {
        return Verdict::Fail(format!("not an HTTP/1 status line: \"{}\"", shown()));
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let (lo, hi) = http.expect;
    if (lo..=hi).contains(&status) {
        Verdict::Pass
    } else if lo == hi {
        Verdict::Fail(format!("HTTP status {status}, expected {lo}"))
    } else {
        Verdict::Fail(format!("HTTP status {status}, expected {lo}-{hi}"))
    }
}

const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

/// A handshake record (type 22, version 3.x) whose first message is a ServerHello (type 2).
fn judge_tls(got: &[u8]) -> Verdict {
    match got {
        [] => Verdict::More,
        [RECORD_HANDSHAKE, rest @ ..] => match rest {
            [] | [_] | [_, _] | [_, _, _] | [_, _, _, _] => Verdict::More,
            [3, _, _, _, HANDSHAKE_SERVER_HELLO, ..] => Verdict::Pass,
            [3, _, _, _, t, ..] => Verdict::Fail(format!(
                "TLS handshake message {t} in answer to a ClientHello, not a ServerHello"
            )),
            _ => Verdict::Fail("not a TLS record".into()),
        },
        [RECORD_ALERT, rest @ ..] => match rest {
            [3, _, _, _, level, description, ..] => Verdict::Fail(format!(
                "TLS alert {description} (level {level}) in answer to a ClientHello"
            )),
            [3, ..] | [] => Verdict::More,
            _ => Verdict::Fail("not a TLS record".into()),
        },
        _ => Verdict::Fail(format!(
            "not a TLS answer (first byte {:#04x}, a handshake record is 0x16)",
            got[0]
        )),
    }
}

/// A ClientHello (RFC 8446 4.1.2) in one record, with `name` as its server name.
pub fn client_hello(name: Option<&str>) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut random = [0u8; 32];
    rng.fill_bytes(&mut random);
    let mut session = [0u8; 32];
    rng.fill_bytes(&mut session);
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);

    let mut ext = Vec::new();
    if let Some(name) = name {
        let name = name.as_bytes();
        let mut list = vec![0u8]; // host_name
        push_u16(&mut list, name.len());
        list.extend_from_slice(name);
        let mut data = Vec::new();
        push_u16(&mut data, list.len());
        data.extend_from_slice(&list);
        extension(&mut ext, 0x0000, &data);
    }
    // supported_groups: x25519, secp256r1, secp384r1.
    extension(
        &mut ext,
        0x000a,
        &[0, 6, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18],
    );
    // ec_point_formats: uncompressed.
    extension(&mut ext, 0x000b, &[1, 0]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256,
    // ecdsa_secp384r1_sha384, rsa_pss_rsae_sha384, rsa_pkcs1_sha384, rsa_pss_rsae_sha512,
    // rsa_pkcs1_sha512, ed25519.
    extension(
        &mut ext,
        0x000d,
        &[
            0, 18, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03, 0x08, 0x05, 0x05, 0x01, 0x08,
            0x06, 0x06, 0x01, 0x08, 0x07,
        ],
    );
    // supported_versions: TLS 1.3, TLS 1.2.
    extension(&mut ext, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    // key_share: one X25519 share.
    let mut share = Vec::new();
    push_u16(&mut share, 36);
    share.extend_from_slice(&[0x00, 0x1d, 0, 32]);
    share.extend_from_slice(&key);
    extension(&mut ext, 0x0033, &share);

    // TLS 1.3's three, then ECDHE with AES-GCM and ChaCha20 for TLS 1.2, then plain RSA.
    const SUITES: [u16; 11] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0x009c, 0x009d,
    ];
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&random);
    body.push(32);
    body.extend_from_slice(&session);
    push_u16(&mut body, SUITES.len() * 2);
    for s in SUITES {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
    push_u16(&mut body, ext.len());
    body.extend_from_slice(&ext);

    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![RECORD_HANDSHAKE, 0x03, 0x01];
    push_u16(&mut record, handshake.len());
    record.extend_from_slice(&handshake);
    record
}

/// A length that fits in two bytes (every length here is far below 2^16: a server name is at
/// most 253 bytes, the rest is fixed).
fn push_u16(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u16).to_be_bytes());
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    push_u16(out, data.len());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_target;

    fn http(expect: (u16, u16)) -> CheckKind {
        CheckKind::Http(HttpCheck {
            path: "/healthz".into(),
            host: None,
            expect,
        })
    }

    #[test]
    fn http_request_names_the_target() {
        let t = parse_target("[::1]:8080").unwrap();
        let req = String::from_utf8(request(&http((200, 399)), &t)).unwrap();
        assert!(
            req.starts_with("GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\n"),
            "{req}"
        );
        assert!(req.ends_with("Connection: close\r\n\r\n"), "{req}");
    }

    #[test]
    fn http_status_decides() {
        let k = http((200, 399));
        assert_eq!(
            judge(&k, b"HTTP/1.1 204 No Content\r\n", false),
            Verdict::Pass
        );
        assert_eq!(judge(&k, b"HTTP/1.0 302\r\n", false), Verdict::Pass);
        assert_eq!(judge(&k, b"HTTP/1.1 20", false), Verdict::More);
        assert_eq!(judge(&k, b"HTT", false), Verdict::More);
        assert_eq!(
            judge(&k, b"HTTP/1.1 500 Oops\r\n", false),
            Verdict::Fail("HTTP status 500, expected 200-399".into())
        );
        assert_eq!(
            judge(&http((204, 204)), b"HTTP/1.1 200 OK\r\n", false),
            Verdict::Fail("HTTP status 200, expected 204".into())
        );
        assert!(matches!(judge(&k, b"SSH-2.0-x", false), Verdict::Fail(_)));
        assert!(matches!(
            judge(&k, b"HTTP/1.1 2x0 OK", false),
            Verdict::Fail(_)
        ));
        assert!(matches!(judge(&k, b"HTTP/1.1 20", true), Verdict::Fail(_)));
    }

    #[test]
    fn tls_wants_a_server_hello() {
        let k = CheckKind::Tls { server_name: None };
        assert_eq!(judge(&k, &[22, 3, 3, 0, 90, 2, 0], false), Verdict::Pass);
        assert_eq!(judge(&k, &[22, 3, 3], false), Verdict::More);
        assert!(matches!(
            judge(&k, &[21, 3, 3, 0, 2, 2, 40], false),
            Verdict::Fail(_)
        ));
        assert!(matches!(judge(&k, b"hello", false), Verdict::Fail(_)));
        assert!(matches!(judge(&k, &[22, 3], true), Verdict::Fail(_)));
    }

    #[test]
    fn client_hello_lengths_add_up() {
        for name in [None, Some("www.example.com")] {
            let hello = client_hello(name);
            assert_eq!(&hello[..3], &[22, 3, 1]);
            let record = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
            assert_eq!(record, hello.len() - 5);
            let handshake =
                usize::from(hello[6]) << 16 | usize::from(hello[7]) << 8 | usize::from(hello[8]);
            assert_eq!(handshake, record - 4);
            let has_name = hello.windows(15).any(|w| w == b"www.example.com");
            assert_eq!(has_name, name.is_some());
        }
    }

    /// A peer that takes any request and answers without end.
    struct Endless;
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(b'x');
            Ok(buf.len())
        }
    }
    impl Write for Endless {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_endless_answer_is_read_only_to_the_bound() {
        let mut ex = Exchange::new(b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert!(!ex.step(&mut Endless).unwrap(), "not closed");
        assert_eq!(ex.answer().len(), READ_MAX);
        assert!(!ex.step(&mut Endless).unwrap(), "nothing more is read");
        assert_eq!(ex.answer().len(), READ_MAX);
        let k = CheckKind::Tls { server_name: None };
        assert!(matches!(judge(&k, ex.answer(), false), Verdict::Fail(_)));
    }

    #[test]
    fn tls_server_name_is_never_an_address() {
        let k = CheckKind::Tls { server_name: None };
        let by_name = request(&k, &parse_target("svc.internal:443").unwrap());
        assert!(by_name.windows(12).any(|w| w == b"svc.internal"));
        let by_ip = request(&k, &parse_target("127.0.0.1:443").unwrap());
        assert!(!by_ip.windows(9).any(|w| w == b"127.0.0.1"));
    }
}
