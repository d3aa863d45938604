//! One direction of a relay: reading what one socket has into a carrier (a pooled pipe for bulk,
//! a pooled buffer for small exchanges; see `carrier`) and writing it out to the other, and
//! passing the half-close on once every byte before it is delivered.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::carrier::{splice, Carrier, Carriers, BUF_SIZE, PIPE_SIZE};

/// Bytes one direction moves per pass before the relay looks at the clock: a transfer whose
/// source never runs dry must still come back to check its time slice.
const PASS_BUDGET: u64 = 1024 * 1024;

/// One direction of the relay: bytes from `src` to `dst`.
pub(super) struct Direction {
    carrier: Carrier,
    /// Bytes read from `src` and not yet written to `dst`.
    pending: usize,
    /// splice was refused for this pair of sockets: use the buffer from now on.
    no_splice: bool,
    /// The last read filled its carrier: a bulk transfer, worth splicing (as HAProxy's
    /// splice-auto decides). Cleared by a short read.
    pub(super) bulk: bool,
    /// `src` has no more bytes (read returned 0).
    eof: bool,
    /// `src`'s peer has closed its side (the lot saw `EPOLLRDHUP`): a short read does not mean
    /// the end of what is there, as the end of stream waits behind the bytes, and no new event
    /// will come for it.
    pub(super) closing: bool,
    /// `dst`'s write side has been shut down after the last byte.
    shut: bool,
    pub(super) moved: u64,
}

/// What a pass of `Direction::pump` did.
#[derive(Default)]
pub(super) struct Pass {
    /// Bytes moved, or the end of stream was met.
    pub(super) moved: bool,
    /// It stopped at its byte budget, not because a read or write would block: more may move
    /// at once.
    pub(super) more: bool,
}

impl Direction {
    pub(super) fn new() -> Direction {
        Direction {
            carrier: Carrier::None,
            pending: 0,
            no_splice: false,
            bulk: false,
            eof: false,
            closing: false,
            shut: false,
            moved: 0,
        }
    }

    pub(super) fn done(&self) -> bool {
        self.shut
    }

    pub(super) fn wants_read(&self) -> bool {
        !self.eof && self.pending == 0
    }

    pub(super) fn wants_write(&self) -> bool {
        self.pending > 0
    }

    /// Give the carrier back once it is empty, so an idle direction holds nothing.
    fn release(&mut self, carriers: &Carriers) {
        if self.pending == 0 {
            carriers.give(std::mem::replace(&mut self.carrier, Carrier::None));
        }
    }

    /// Write out what is pending; Ok(true) if all of it went. Delivered bytes are added to
    /// `counter` (the target's, for metrics) as they go.
    fn flush(&mut self, dst: &TcpStream, counter: &AtomicU64) -> io::Result<bool> {
        while self.pending > 0 {
            let n = match &mut self.carrier {
                Carrier::Pipe(p) => splice(p.r.as_raw_fd(), dst.as_raw_fd(), self.pending),
                Carrier::Buf { buf, lo } => (&*dst).write(&buf[*lo..*lo + self.pending]),
                Carrier::None => unreachable!("bytes pending without a carrier"),
            };
            match n {
                Ok(n) => {
                    if let Carrier::Buf { lo, .. } = &mut self.carrier {
                        *lo += n;
                    }
                    self.pending -= n;
                    self.moved += n as u64;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Read what `src` has into the carrier; Ok(None) if nothing is there yet.
    fn fill(&mut self, src: &TcpStream, carriers: &Carriers) -> io::Result<Option<usize>> {
        if matches!(self.carrier, Carrier::None) {
            let pipe = if self.bulk && !self.no_splice {
                carriers.take_pipe().ok()
            } else {
                None
            };
            self.carrier = match pipe {
                Some(p) => Carrier::Pipe(p),
                None => Carrier::Buf {
                    buf: carriers.take_buf(),
                    lo: 0,
                },
            };
        }
        loop {
            let n = match &mut self.carrier {
                Carrier::Pipe(p) => splice(src.as_raw_fd(), p.w.as_raw_fd(), PIPE_SIZE),
                Carrier::Buf { buf, lo } => {
                    *lo = 0;
                    (&*src).read(buf)
                }
                Carrier::None => unreachable!("carrier set above"),
            };
            let piped = matches!(self.carrier, Carrier::Pipe(_));
            return match n {
                // splice stops at urgent data (MSG_OOB) and says "would block", or 0 if the
                // peer's FIN came too, there for good, where a read passes it: read once
                // through a buffer before believing that nothing (or nothing more) is there.
                // Otherwise such a byte would stall the direction, or end it early, or spin
                // it (the socket stays readable).
                Ok(0) if piped => {
                    self.use_buffer(carriers);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && piped => {
                    self.use_buffer(carriers);
                    continue;
                }
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !self.no_splice => {
                    // This socket pair cannot be spliced: carry on through a buffer.
                    self.no_splice = true;
                    self.use_buffer(carriers);
                    continue;
                }
                Err(e) => Err(e),
            };
        }
    }

    /// Swap the (empty) pipe for a buffer.
    fn use_buffer(&mut self, carriers: &Carriers) {
        self.release(carriers);
        self.carrier = Carrier::Buf {
            buf: carriers.take_buf(),
            lo: 0,
        };
    }

    /// Move as much as possible from `src` to `dst` without blocking (up to `PASS_BUDGET`).
    /// `other_done`: the other direction is over, so once this one is the connection ends and
    /// both sockets are closed. Without `may_read`, `src` is known to have nothing yet: only
    /// what is pending is written.
    pub(super) fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        other_done: bool,
        may_read: bool,
        carriers: &Carriers,
    ) -> io::Result<Pass> {
        let mut step = Pass::default();
        let start = self.moved;
        loop {
            let before = self.moved;
            let flushed = self.flush(dst, counter)?;
            if self.moved != before {
                step.moved = true;
            }
            if !flushed {
                return Ok(step);
            }
            if self.moved - start >= PASS_BUDGET {
                step.more = true;
                return Ok(step);
            }
            // Switch carriers between fills when the kind of traffic changed.
            let wrong_carrier = match self.carrier {
                Carrier::Buf { .. } => self.bulk && !self.no_splice,
                Carrier::Pipe(_) => !self.bulk,
                Carrier::None => false,
            };
            if wrong_carrier {
                self.release(carriers);
            }
            if self.eof {
                self.release(carriers);
                if !self.shut && other_done {
                    // The connection ends now and closing `dst` sends the FIN after the bytes
                    // still queued (its incoming side is read to its end, so the close cannot
                    // turn into a reset): no shutdown call needed.
                    self.shut = true;
                } else if !self.shut {
                    // Pass the half-close on only now that every byte before it is delivered.
                    // NotConnected means the peer is already fully gone: nothing to tell it.
                    match dst.shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Err(e),
                    }
                    self.shut = true;
                }
                return Ok(step);
            }
            if !may_read {
                self.release(carriers);
                return Ok(step);
            }
            match self.fill(src, carriers)? {
                Some(0) => {
                    self.eof = true;
                    step.moved = true;
                }
                Some(n) => {
                    self.pending = n;
                    step.moved = true;
                    let capacity = match &self.carrier {
                        Carrier::Buf { buf, .. } => buf.len(),
                        _ => PIPE_SIZE,
                    };
                    self.bulk = n == capacity || (self.bulk && n >= BUF_SIZE);
                    if !self.bulk && !self.closing && matches!(self.carrier, Carrier::Buf { .. }) {
                        // A short read drained the socket (as far as it had bytes): deliver
                        // them, then wait rather than pay for a read that would only say
                        // EAGAIN. Re-arming the socket reports at once whatever came after it
                        // (or it was seen while it ran, and runs it again), so nothing is
                        // missed.
                        let before = self.moved;
                        let flushed = self.flush(dst, counter)?;
                        if flushed {
                            self.release(carriers);
                        }
                        if self.moved != before {
                            step.moved = true;
                        }
                        return Ok(step);
                    }
                    // A full carrier moving to a pipe: hand back the buffer once written, so
                    // the next fill picks the pipe.
                }
                None => {
                    self.release(carriers);
                    return Ok(step);
                }
            }
        }
    }
}
