//! The TLS ClientHello, read for its server name (SNI) without terminating TLS.
//!
//! The input is whatever an untrusted client sent first, possibly cut anywhere. The parser
//! never allocates and never reads past the bytes it is given: every length is checked against
//! its parent before it is used. It walks the record layer lazily (a handshake message may span
//! several records, and a record may be cut between TCP segments), so the bytes are looked at
//! in place; the only copy is the server name, into a fixed array of at most 255 bytes.
//!
//! Layout (RFC 8446 4.1.2, RFC 5246 7.4.1.2, RFC 6066 3):
//! record: type 0x16 | version (2) | length (2, <= 2^14) | fragment
//! handshake: type 0x01 | length (3) | legacy_version (2) | random (32) | session_id (<1>)
//!            | cipher_suites (<2>, even, >= 2) | compression (<1>, >= 1) | extensions (<2>)
//! extension: type (2) | length (2) | data; server_name (0): list (<2>) of
//!            name_type (1) | name (<2>), host_name being type 0.

/// At most this many bytes of the connection's start are read while waiting for a whole
/// ClientHello (records and all). nginx's `preread_buffer_size` default is the same.
pub const MAX_PREREAD: usize = 16 * 1024;

/// The longest server name kept (a DNS name is at most 253 bytes; RFC 6066 allows up to
/// 2^16-1, but no name that long can match a configured hostname).
pub const MAX_NAME: usize = 255;

/// The largest TLS plaintext record fragment (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// What the bytes so far say.
// The name is returned by value, once per parse: boxing it would allocate, which this parser
// never does.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid start of a ClientHello: more bytes are needed, at least `needed` in all
    /// (parsing fewer cannot tell more).
    Incomplete { needed: usize },
    /// A whole ClientHello, with its host_name if it has one.
    Complete(Option<ServerName>),
}

/// Why the bytes are not (the start of) a ClientHello we can route by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not a TLS handshake record, or not a ClientHello (plain text, SSLv2, another protocol).
    NotTls,
    /// Looks like TLS but a length or field is inconsistent.
    Malformed(&'static str),
    /// The ClientHello does not fit in `MAX_PREREAD` bytes.
    TooLarge,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotTls => f.write_str("not a TLS ClientHello"),
            Error::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            Error::TooLarge => write!(f, "ClientHello larger than {MAX_PREREAD} bytes"),
        }
    }
}

/// A server name as sent (not yet lower-cased or checked), in a fixed buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl ServerName {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Parse the start of a connection. `Ok(Incomplete)` means "read more" (unless `buf` already
/// holds `MAX_PREREAD` bytes, which is reported as `TooLarge`).
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    let mut r = Records::new(buf);
    match parse_hello(&mut r) {
        Err(Stop::NeedMore) if buf.len() >= MAX_PREREAD || r.needed > MAX_PREREAD => {
            Err(Error::TooLarge)
        }
        Err(Stop::NeedMore) => Ok(Parsed::Incomplete { needed: r.needed }),
        Err(Stop::Bad(e)) => Err(e),
        Ok(name) => Ok(Parsed::Complete(name)),
    }
}

/// Why parsing stopped early.
enum Stop {
    NeedMore,
    Bad(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Bad(e)
    }
}

fn malformed(what: &'static str) -> Stop {
    Stop::Bad(Error::Malformed(what))
}

/// The handshake byte stream, read through the record layer without copying: when the
/// current record's fragment is used up, the next record header is read and checked.
struct Records<'a> {
    buf: &'a [u8],
    /// Offset in `buf` of the next handshake byte.
    pos: usize,
    /// End offset in `buf` of the current record's fragment (may lie beyond `buf.len()`
    /// when the record is cut).
    end: usize,
    /// Handshake bytes consumed so far.
    consumed: usize,
    /// When more bytes are needed: the length of `buf` that would let parsing go on.
    needed: usize,
}

impl<'a> Records<'a> {
    fn new(buf: &'a [u8]) -> Records<'a> {
        Records {
            buf,
            pos: 0,
            end: 0,
            consumed: 0,
            needed: 0,
        }
    }

    fn need(&mut self, len: usize) -> Stop {
        self.needed = len;
        Stop::NeedMore
    }

    /// Move to the next record if the current one is used up.
    fn next_record(&mut self) -> Result<(), Stop> {
        while self.pos >= self.end {
            let Some(h) = self.buf.get(self.pos..self.pos + 5) else {
                return Err(self.need(self.pos + 5));
            };
            if h[0] != RECORD_HANDSHAKE {
                // Only the very first byte decides "not TLS at all"; a later record of
                // another type inside the hello is a broken hello.
                return Err(if self.pos == 0 {
                    Error::NotTls.into()
                } else {
                    malformed("a record of another type inside the ClientHello")
                });
            }
            // Legacy record versions seen in practice: 0x0300 (SSL 3.0 framing used by some
            // clients for the first record) to 0x0304.
            if h[1] != 0x03 || h[2] > 0x04 {
                return Err(if self.pos == 0 {
                    Error::NotTls.into()
                } else {
                    malformed("record version")
                });
            }
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            if len == 0 {
                // RFC 8446 5.1: zero-length handshake fragments are not allowed.
                return Err(malformed("empty handshake record"));
            }
            if len > MAX_RECORD {
                return Err(malformed("record longer than 2^14 bytes"));
            }
            self.pos += 5;
            self.end = self.pos + len;
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        self.next_record()?;
        let Some(&b) = self.buf.get(self.pos) else {
            return Err(self.need(self.pos + 1));
        };
        self.pos += 1;
        self.consumed += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn u24(&mut self) -> Result<usize, Stop> {
        let (a, b, c) = (self.u8()?, self.u8()?, self.u8()?);
        Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
    }

    /// Skip `n` handshake bytes, record by record.
    fn skip(&mut self, mut n: usize) -> Result<(), Stop> {
        while n > 0 {
            self.next_record()?;
            let here = (self.end - self.pos).min(n);
            if self.pos + here > self.buf.len() {
                return Err(self.need(self.pos + here));
            }
            self.pos += here;
            self.consumed += here;
            n -= here;
        }
        Ok(())
    }
}

/// A length-delimited region of the handshake stream: reads inside it may not pass its end.
struct Region {
    end: usize,
}

impl Region {
    fn open(
        r: &Records<'_>,
        len: usize,
        parent: &Region,
        what: &'static str,
    ) -> Result<Region, Stop> {
        let end = r.consumed + len;
        if end > parent.end {
            return Err(malformed(what));
        }
        Ok(Region { end })
    }

    fn left(&self, r: &Records<'_>) -> usize {
        self.end - r.consumed
    }

    /// Check that `n` more bytes fit before reading them.
    fn need(&self, r: &Records<'_>, n: usize, what: &'static str) -> Result<(), Stop> {
        if self.left(r) < n {
            Err(malformed(what))
        } else {
            Ok(())
        }
    }
}

fn parse_hello(r: &mut Records<'_>) -> Result<Option<ServerName>, Stop> {
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return Err(Error::NotTls.into());
    }
    let len = r.u24()?;
    // The whole message (4-byte header, plus record headers of at least one record per 2^14
    // bytes) must fit in the preread bound; say so before waiting for bytes that cannot come.
    if 4 + len + 5 > MAX_PREREAD {
        return Err(Error::TooLarge.into());
    }
    let body = Region {
        end: r.consumed + len,
    };
    body.need(r, 2 + 32 + 1, "shorter than its fixed fields")?;
    r.skip(2 + 32)?; // legacy_version, random
    let sid = usize::from(r.u8()?);
    if sid > 32 {
        return Err(malformed("session id longer than 32 bytes"));
    }
    body.need(r, sid + 2, "session id beyond the message")?;
    r.skip(sid)?;
    let suites = usize::from(r.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return Err(malformed("cipher suites length not even and at least 2"));
    }
    body.need(r, suites + 1, "cipher suites beyond the message")?;
    r.skip(suites)?;
    let comp = usize::from(r.u8()?);
    if comp < 1 {
        return Err(malformed("no compression method"));
    }
    body.need(r, comp, "compression methods beyond the message")?;
    r.skip(comp)?;
    if body.left(r) == 0 {
        // A ClientHello without extensions (TLS 1.2 and earlier allow it): no server name.
        return Ok(None);
    }
    body.need(r, 2, "extensions length cut")?;
    let ext_len = usize::from(r.u16()?);
    if ext_len != body.left(r) {
        return Err(malformed("extensions length does not match the message"));
    }
    let exts = Region::open(r, ext_len, &body, "extensions beyond the message")?;
    let mut name = None;
    let mut seen_sni = false;
    while exts.left(r) > 0 {
        exts.need(r, 4, "extension header cut")?;
        let ty = r.u16()?;
        let len = usize::from(r.u16()?);
        let ext = Region::open(r, len, &exts, "extension beyond the extensions")?;
        if ty == EXT_SERVER_NAME {
            if seen_sni {
                // RFC 8446 4.2: at most one extension of each type.
                return Err(malformed("two server_name extensions"));
            }
            seen_sni = true;
            name = server_name(r, &ext)?;
        } else {
            r.skip(len)?;
        }
        debug_assert_eq!(ext.left(r), 0);
    }
    Ok(name)
}

/// The server_name extension's data: the host_name, if any.
fn server_name(r: &mut Records<'_>, ext: &Region) -> Result<Option<ServerName>, Stop> {
    if ext.left(r) == 0 {
        // An empty server_name is what a server sends back; from a client it carries nothing.
        return Ok(None);
    }
    ext.need(r, 2, "server name list length cut")?;
    let list_len = usize::from(r.u16()?);
    if list_len != ext.left(r) {
        return Err(malformed(
            "server name list length does not match its extension",
        ));
    }
    let list = Region::open(r, list_len, ext, "server name list beyond its extension")?;
    let mut found: Option<ServerName> = None;
    while list.left(r) > 0 {
        list.need(r, 3, "server name entry cut")?;
        let ty = r.u8()?;
        let len = usize::from(r.u16()?);
        list.need(r, len, "server name beyond its list")?;
        if ty != NAME_TYPE_HOST {
            r.skip(len)?;
            continue;
        }
        if found.is_some() {
            return Err(malformed("two host names"));
        }
        if len == 0 || len > MAX_NAME {
            return Err(malformed("host name empty or longer than 255 bytes"));
        }
        let mut n = ServerName {
            len: len as u8, // len <= MAX_NAME = 255, checked above
            bytes: [0; MAX_NAME],
        };
        for slot in n.bytes.iter_mut().take(len) {
            *slot = r.u8()?;
        }
        found = Some(n);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello (handshake message only) with `exts` as its extensions.
    fn hello_msg(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut m = vec![1];
        m.extend(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend(body);
        m
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut e = vec![0, 0];
        let entry_len = 3 + name.len();
        e.extend(((entry_len + 2) as u16).to_be_bytes());
        e.extend((entry_len as u16).to_be_bytes());
        e.push(0);
        e.extend((name.len() as u16).to_be_bytes());
        e.extend(name);
        e
    }

    /// Split a handshake message into records of at most `size` bytes each.
    fn records(msg: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            out.extend([0x16, 0x03, 0x01]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    fn name(p: Parsed) -> Option<String> {
        match p {
            Parsed::Complete(n) => n.map(|n| String::from_utf8(n.as_bytes().to_vec()).unwrap()),
            Parsed::Incomplete { .. } => panic!("incomplete"),
        }
    }

    #[test]
    fn finds_the_name_in_one_or_many_records_and_every_cut_is_incomplete() {
        let mut exts = vec![0x00, 0x2b, 0, 3, 2, 3, 4]; // supported_versions
        exts.extend(sni_ext(b"Shop.Example.com"));
        let msg = hello_msg(&exts);
        for size in [1, 2, 7, 100, MAX_RECORD] {
            let wire = records(&msg, size);
            assert_eq!(
                name(parse(&wire).unwrap()).as_deref(),
                Some("Shop.Example.com")
            );
            for cut in 0..wire.len() {
                match parse(&wire[..cut]) {
                    Ok(Parsed::Incomplete { needed }) => {
                        assert!(
                            needed > cut && needed <= wire.len(),
                            "size {size} cut {cut}"
                        )
                    }
                    other => panic!("size {size} cut {cut}: {other:?}"),
                }
            }
            // Bytes after the hello (early data, the next record) do not matter.
            let mut more = wire.clone();
            more.extend([0x17, 3, 3, 0, 1, 9]);
            assert_eq!(
                name(parse(&more).unwrap()).as_deref(),
                Some("Shop.Example.com")
            );
        }
    }

    #[test]
    fn no_name_and_not_tls() {
        assert_eq!(name(parse(&records(&hello_msg(&[]), 1000)).unwrap()), None);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Error::NotTls));
        assert_eq!(parse(b"\x80\x2e\x01\x03\x01"), Err(Error::NotTls)); // SSLv2 hello
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0, 4, 2, 0, 0, 0]),
            Err(Error::NotTls)
        );
        assert!(matches!(
            parse(&[0x16, 0x03, 0x01, 0, 0]),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn lengths_that_lie_are_malformed() {
        let msg = hello_msg(&sni_ext(b"a.example"));
        // Extension list length one too long / short.
        for delta in [1i32, -1] {
            let mut m = msg.clone();
            let at = m.len() - sni_ext(b"a.example").len() - 2;
            let v = u16::from_be_bytes([m[at], m[at + 1]]) as i32 + delta;
            m[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            assert!(
                matches!(parse(&records(&m, 50)), Err(Error::Malformed(_))),
                "{delta}"
            );
        }
        // A name longer than its list.
        let mut m = msg.clone();
        let n = m.len();
        m[n - 10] = 0xff;
        assert!(matches!(parse(&records(&m, 50)), Err(Error::Malformed(_))));
    }

    #[test]
    fn too_large() {
        let mut exts = vec![0xff, 0x00];
        exts.extend(20_000u16.to_be_bytes());
        exts.extend(vec![0u8; 20_000]);
        let wire = records(&hello_msg(&exts), MAX_RECORD);
        assert_eq!(parse(&wire[..100]), Err(Error::TooLarge));
    }
}
