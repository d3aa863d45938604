//! flyproxy's ClientHello parser (`relay::client_hello`) against an independent one written
//! here from RFC 8446 4.1.2 / RFC 5246 7.4.1.2 / RFC 6066 3, in another style: it first
//! reassembles the handshake bytes from the records into a `Vec`, then walks the message with
//! slice splits. The two must agree on every input:
//! - a whole ClientHello: the same server name (or none);
//! - not TLS, malformed, too large: the same verdict;
//! - cut short: flyproxy says "incomplete" with a `needed` length beyond what it has (or gives
//!   an early malformed/too-large verdict that the whole input then confirms);
//! - and flyproxy's verdict on any prefix is never contradicted by a longer input.

use arbitrary::Arbitrary;
use flyproxy::relay::client_hello::{self, Error, Parsed, MAX_PREREAD};

/// The reference parser's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Complete(Option<Vec<u8>>),
    Incomplete,
    NotTls,
    Malformed(&'static str),
    TooLarge,
}

/// Reassemble the handshake stream from the records, as far as `buf` goes and as far as the
/// first handshake message reaches.
fn reassemble(buf: &[u8]) -> Result<(Vec<u8>, bool), Ref> {
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut first = true;
    loop {
        // Enough for the message? (Known once its 4-byte header is in.)
        if hs.len() >= 4 {
            let len = (hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize;
            if hs.len() >= 4 + len {
                hs.truncate(4 + len);
                return Ok((hs, true));
            }
        }
        if rest.len() < 5 {
            return Ok((hs, false));
        }
        let (head, after) = rest.split_at(5);
        let ok_type = head[0] == 0x16;
        let ok_version = head[1] == 3 && head[2] <= 4;
        if !ok_type || !ok_version {
            return Err(if first {
                Ref::NotTls
            } else {
                Ref::Malformed("record")
            });
        }
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        if len == 0 || len > 16384 {
            return Err(Ref::Malformed("record length"));
        }
        let take = len.min(after.len());
        hs.extend_from_slice(&after[..take]);
        // Check the message header as soon as it is in: not a ClientHello is "not TLS", too
        // long for the bound is "too large", whatever follows.
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(Ref::NotTls);
            }
            let mlen = (hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize;
            if 4 + mlen + 5 > MAX_PREREAD {
                return Err(Ref::TooLarge);
            }
        } else if !hs.is_empty() && hs[0] != 1 {
            return Err(Ref::NotTls);
        }
        first = false;
        if take < len {
            // Cut inside this record.
            let complete = hs.len() >= 4 && {
                let mlen = (hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize;
                hs.len() >= 4 + mlen
            };
            if complete {
                continue;
            }
            return Ok((hs, false));
        }
        rest = &after[len..];
    }
}

/// Take `n` bytes off the front of `s`.
fn take<'a>(s: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], Ref> {
    if s.len() < n {
        return Err(Ref::Malformed(what));
    }
    let (a, b) = s.split_at(n);
    *s = b;
    Ok(a)
}

fn be(b: &[u8]) -> usize {
    b.iter().fold(0, |acc, &x| acc << 8 | x as usize)
}

/// The reference parser.
pub fn reference(buf: &[u8]) -> Ref {
    let (hs, complete) = match reassemble(buf) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !complete {
        return if buf.len() >= MAX_PREREAD {
            Ref::TooLarge
        } else {
            Ref::Incomplete
        };
    }
    match body(&hs[4..]) {
        Ok(name) => Ref::Complete(name),
        Err(r) => r,
    }
}

fn body(mut m: &[u8]) -> Result<Option<Vec<u8>>, Ref> {
    take(&mut m, 34, "version and random")?;
    let sid = be(take(&mut m, 1, "session id length")?);
    if sid > 32 {
        return Err(Ref::Malformed("session id"));
    }
    take(&mut m, sid, "session id")?;
    let cs = be(take(&mut m, 2, "suites length")?);
    if cs < 2 || cs % 2 == 1 {
        return Err(Ref::Malformed("suites length"));
    }
    take(&mut m, cs, "suites")?;
    let cm = be(take(&mut m, 1, "compression length")?);
    if cm == 0 {
        return Err(Ref::Malformed("compression"));
    }
    take(&mut m, cm, "compression")?;
    if m.is_empty() {
        return Ok(None);
    }
    let el = be(take(&mut m, 2, "extensions length")?);
    if el != m.len() {
        return Err(Ref::Malformed("extensions length"));
    }
    let mut name = None;
    let mut sni_seen = false;
    while !m.is_empty() {
        let ty = be(take(&mut m, 2, "extension type")?);
        let len = be(take(&mut m, 2, "extension length")?);
        let mut data = take(&mut m, len, "extension data")?;
        if ty != 0 {
            continue;
        }
        if sni_seen {
            return Err(Ref::Malformed("two server_name"));
        }
        sni_seen = true;
        if data.is_empty() {
            continue;
        }
        let ll = be(take(&mut data, 2, "list length")?);
        if ll != data.len() {
            return Err(Ref::Malformed("list length"));
        }
        while !data.is_empty() {
            let nt = take(&mut data, 1, "name type")?[0];
            let nl = be(take(&mut data, 2, "name length")?);
            let n = take(&mut data, nl, "name")?;
            if nt != 0 {
                continue;
            }
            if name.is_some() {
                return Err(Ref::Malformed("two host names"));
            }
            if n.is_empty() || n.len() > 255 {
                return Err(Ref::Malformed("host name length"));
            }
            name = Some(n.to_vec());
        }
    }
    Ok(name)
}

/// flyproxy's verdict, in the reference's terms (with `needed` for an incomplete one).
fn ours(buf: &[u8]) -> (Ref, Option<usize>) {
    match client_hello::parse(buf) {
        Ok(Parsed::Complete(n)) => (Ref::Complete(n.map(|n| n.as_bytes().to_vec())), None),
        Ok(Parsed::Incomplete { needed }) => (Ref::Incomplete, Some(needed)),
        Err(Error::NotTls) => (Ref::NotTls, None),
        Err(Error::Malformed(w)) => (Ref::Malformed(w), None),
        Err(Error::TooLarge) => (Ref::TooLarge, None),
    }
}

fn same_kind(a: &Ref, b: &Ref) -> bool {
    match (a, b) {
        (Ref::Malformed(_), Ref::Malformed(_)) => true,
        _ => a == b,
    }
}

/// Any bytes: the differential check, plus `needed` and prefix consistency.
pub fn check_bytes(buf: &[u8]) {
    let buf = &buf[..buf.len().min(MAX_PREREAD)];
    let want = reference(buf);
    let (got, needed) = ours(buf);
    match (&want, &got) {
        (Ref::Incomplete, Ref::Incomplete) => {
            let n = needed.expect("incomplete has needed");
            assert!(
                n > buf.len() && n <= MAX_PREREAD,
                "needed {n} with {} bytes",
                buf.len()
            );
        }
        // Cut short, flyproxy may already see that the declared lengths cannot work out.
        (Ref::Incomplete, Ref::Malformed(_) | Ref::TooLarge) => {}
        _ => assert!(
            same_kind(&want, &got),
            "reference {want:?}, flyproxy {got:?} on {buf:02x?}"
        ),
    }
    // A verdict on a prefix stands for the whole; an incomplete prefix's `needed` is honest:
    // nothing shorter than it gives a verdict.
    for cut in [buf.len() / 3, buf.len() / 2, buf.len().saturating_sub(1)] {
        let (early, need) = ours(&buf[..cut]);
        match early {
            Ref::Incomplete => {
                let n = need.expect("incomplete has needed");
                if n - 1 < buf.len() && n - 1 > cut {
                    assert_eq!(
                        ours(&buf[..n - 1]).0,
                        Ref::Incomplete,
                        "a verdict before `needed` {n} (cut {cut})"
                    );
                }
            }
            e => assert!(
                same_kind(&e, &got),
                "prefix of {cut} said {e:?}, the whole says {got:?}"
            ),
        }
    }
}

/// A ClientHello built from structured choices, sent in records of chosen sizes, maybe
/// mutated and cut: reaches the deep states quickly.
#[derive(Debug, Arbitrary)]
pub struct HelloInput {
    pub session_id: u8,
    pub suites: u8,
    pub extensions: Vec<(u16, Vec<u8>)>,
    /// Where among the extensions the server_name goes, and its entries (type, name).
    pub sni: Option<(u8, Vec<(u8, Vec<u8>)>)>,
    pub record_size: u16,
    pub mutation: Option<(u16, u8)>,
    pub cut: Option<u16>,
}

pub fn build(input: &HelloInput) -> Vec<u8> {
    let mut exts: Vec<(u16, Vec<u8>)> = input
        .extensions
        .iter()
        .filter(|(t, _)| *t != 0)
        .take(16)
        .map(|(t, d)| (*t, d.iter().copied().take(300).collect()))
        .collect();
    if let Some((at, entries)) = &input.sni {
        let mut list = Vec::new();
        for (t, n) in entries.iter().take(3) {
            let n: Vec<u8> = n.iter().copied().take(300).collect();
            list.push(*t % 2);
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        let at = (*at as usize).min(exts.len());
        exts.insert(at, (0, data));
    }
    let mut body = vec![3, 3];
    body.extend([0x42; 32]);
    let sid = (input.session_id % 33) as usize;
    body.push(sid as u8);
    body.extend(vec![1; sid]);
    let suites = 2 * (1 + input.suites as usize % 8);
    body.extend((suites as u16).to_be_bytes());
    body.extend(vec![0x13; suites]);
    body.extend([1, 0]);
    let mut e = Vec::new();
    for (t, d) in &exts {
        e.extend(t.to_be_bytes());
        e.extend((d.len() as u16).to_be_bytes());
        e.extend(d);
    }
    body.extend((e.len() as u16).to_be_bytes());
    body.extend(e);
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    let size = 1 + input.record_size as usize % 16384;
    let mut wire = Vec::new();
    for chunk in msg.chunks(size) {
        wire.extend([0x16, 3, 1]);
        wire.extend((chunk.len() as u16).to_be_bytes());
        wire.extend(chunk);
    }
    if let Some((at, b)) = input.mutation {
        if !wire.is_empty() {
            let i = at as usize % wire.len();
            wire[i] ^= b;
        }
    }
    if let Some(c) = input.cut {
        wire.truncate(c as usize % (wire.len() + 1));
    }
    wire
}

pub fn check_structured(input: &HelloInput) {
    let wire = build(input);
    check_bytes(&wire);
    // Unmutated and uncut, a hello with one host name is found exactly.
    if input.mutation.is_none() && input.cut.is_none() && wire.len() < MAX_PREREAD {
        if let Some((_, entries)) = &input.sni {
            let hosts: Vec<Vec<u8>> = entries
                .iter()
                .take(3)
                .filter(|(t, _)| t % 2 == 0)
                .map(|(_, n)| n.iter().copied().take(300).collect())
                .collect();
            if hosts.len() == 1 && (1..=255).contains(&hosts[0].len()) {
                assert_eq!(
                    ours(&wire).0,
                    Ref::Complete(Some(hosts[0].clone())),
                    "the host name of a well-formed hello"
                );
            }
        }
    }
}
