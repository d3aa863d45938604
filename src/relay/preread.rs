//! Reading the start of a connection until its TLS ClientHello is whole, to route by the server
//! name (SNI) without terminating TLS. Used only on bindings where some app has Hostnames: on
//! every other port the proxy never waits for the client, so server-first protocols work.
//!
//! Bounded in bytes (`client_hello::MAX_PREREAD`) and in time (`--preread-timeout`). The bytes
//! read are returned unchanged, to be sent to the target first. Re-parsing starts from the
//! first byte each time, but only once the buffer has grown past what the last parse said it
//! needs, so a client trickling one byte at a time costs a parse per field, not per byte.

use std::io::{self, Read};
use std::net::TcpStream;

use crate::config::hostname;
use crate::relay::client_hello::{self, Parsed, MAX_PREREAD};

/// What the start of the connection said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A whole ClientHello; the server name as sent (lossy UTF-8) and normalised (lower-case,
    /// no trailing dot; None if it is not a DNS name). `None` if it carried no server name.
    Name {
        sent: String,
        name: Option<String>,
    },
    NoName,
    /// Not a TLS ClientHello (plain text, another protocol, or a malformed hello).
    NotTls,
    /// A ClientHello larger than the preread bound.
    TooLarge,
    /// No whole ClientHello within the timeout.
    Timeout,
    /// The client closed (or reset, or the proxy cut it) before its ClientHello was whole.
    Closed,
}

/// A ClientHello being read: the bytes so far, kept between reads so that the wait for more is
/// done without a thread (the connection waits in the parking lot meanwhile).
pub struct HelloReader {
    buf: Vec<u8>,
    /// The buffer length below which parsing again cannot tell more.
    need: usize,
}

impl Default for HelloReader {
    fn default() -> HelloReader {
        HelloReader::new()
    }
}

impl HelloReader {
    pub fn new() -> HelloReader {
        HelloReader {
            buf: Vec::new(),
            need: 1,
        }
    }

    /// Read what `client` (non-blocking) has: the verdict once the bytes tell it, or None if
    /// more must be waited for (the caller waits for `client` to be readable, within its
    /// preread timeout).
    pub fn step(&mut self, client: &TcpStream) -> Option<Hello> {
        let mut chunk = [0u8; 4096];
        loop {
            while self.buf.len() < self.need {
                let room = (MAX_PREREAD - self.buf.len()).min(chunk.len());
                match (&*client).read(&mut chunk[..room]) {
                    Ok(0) => return Some(Hello::Closed),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(_) => return Some(Hello::Closed),
                }
            }
            match client_hello::parse(&self.buf) {
                Ok(Parsed::Complete(None)) => return Some(Hello::NoName),
                Ok(Parsed::Complete(Some(n))) => {
                    let sent = String::from_utf8_lossy(n.as_bytes()).into_owned();
                    let name = hostname::normalize(n.as_bytes());
                    return Some(Hello::Name { sent, name });
                }
                Ok(Parsed::Incomplete { needed }) => {
                    self.need = needed.clamp(self.buf.len() + 1, MAX_PREREAD)
                }
                Err(client_hello::Error::TooLarge) => return Some(Hello::TooLarge),
                Err(_) => return Some(Hello::NotTls),
            }
        }
    }

    /// Every byte read, to be sent to the target first.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}
