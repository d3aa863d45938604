//! Moving bytes between a client and its backend, both ways, until both sides are done.
//!
//! One relay thread runs one connection with `poll(2)` on the two non-blocking sockets, so a
//! connection costs one pooled thread and no extra threads per direction. Bulk bytes go
//! through a pooled kernel pipe with `splice(2)`, held only while bytes are in flight; small
//! exchanges are copied through a pooled user-space buffer instead, which costs fewer system
//! calls than a splice in and out (splice-auto, as HAProxy calls it). Half-close is carried
//! through: when one side shuts down its write side, the other side's write side is shut down
//! once every byte before it has been delivered, and the reply keeps flowing the other way.
//! A reset on one side is passed on as a reset on the other, so neither peer hangs.
//! A socket is polled only for what is still wanted from it, and an error or hang-up reported
//! on a socket nothing is wanted from is acted on at once (a reset is passed on; a socket closed
//! both ways is left out of the poll), so no close sequence leaves the thread spinning.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes moved per splice (the pipe is sized to hold them).
const PIPE_SIZE: usize = 1024 * 1024;
/// Spare pipes kept for reuse; beyond this, a freed pipe is closed.
const PIPE_POOL_MAX: usize = 64;
/// Buffer for copying through user space: small exchanges (requests, replies) are cheaper to
/// copy than to splice, and it is the fallback when no pipe can be had.
const BUF_SIZE: usize = 16 * 1024;
/// Spare buffers kept for reuse.
const BUF_POOL_MAX: usize = 256;

static BUFS: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A buffer from the pool, or a new one. Buffers, like pipes, are held only while bytes are in
/// flight, so an idle connection holds none.
fn take_buf() -> Box<[u8]> {
    BUFS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    let mut pool = BUFS.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < BUF_POOL_MAX {
        pool.push(buf);
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their write side and every byte was delivered.
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// One side reset the connection or a socket error occurred; the other side was reset.
    Reset,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::IdleTimeout => "idle_timeout",
            End::Reset => "reset",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Bytes from the client delivered to the backend.
    pub up: u64,
    /// Bytes from the backend delivered to the client.
    pub down: u64,
    pub end: End,
}

/// A kernel pipe that bytes are spliced through: socket to pipe to socket, without being
/// copied into user space (as HAProxy does). Pipes are shared by all connections through a
/// pool and held only while bytes are in flight, so an idle connection costs its two sockets
/// and nothing more, and the descriptor count stays near two per connection.
struct KernelPipe {
    r: OwnedFd,
    w: OwnedFd,
}

static PIPES: Mutex<Vec<KernelPipe>> = Mutex::new(Vec::new());
/// Pipes that may exist at once (pooled or in use), so that pipes never take the descriptors
/// the connection bound counts on; set at start from the open-file limit.
static PIPE_BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static PIPES_LIVE: AtomicUsize = AtomicUsize::new(0);

/// Allow at most `pipes` kernel pipes; beyond, relaying falls back to a buffer.
pub fn set_pipe_budget(pipes: u64) {
    PIPE_BUDGET.store(
        usize::try_from(pipes).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
}

impl KernelPipe {
    fn take() -> io::Result<KernelPipe> {
        if let Some(p) = PIPES.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        // Reserve a place in the budget first, so concurrent takers cannot overshoot it.
        if PIPES_LIVE.fetch_add(1, Ordering::Relaxed) >= PIPE_BUDGET.load(Ordering::Relaxed) {
            PIPES_LIVE.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other("pipe budget spent"));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills `fds` with two new descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            PIPES_LIVE.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let p = unsafe {
            KernelPipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe means fewer splices per megabyte. Failure (a lowered pipe-max-size)
        // only costs speed, so it is ignored.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                p.w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(p)
    }

    /// Return an empty pipe to the pool.
    fn give(self) {
        let mut pool = PIPES.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < PIPE_POOL_MAX {
            pool.push(self);
        }
    }
}

impl Drop for KernelPipe {
    fn drop(&mut self) {
        PIPES_LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What holds a direction's bytes in flight.
enum Carrier {
    None,
    /// For bulk: zero-copy.
    Pipe(KernelPipe),
    /// For small exchanges, and when no pipe can be had or splice is refused.
    Buf {
        buf: Box<[u8]>,
        lo: usize,
    },
}

/// One direction of the relay: bytes from `src` to `dst`.
struct Direction<'a> {
    /// A live counter (the target's, for metrics) that every delivered byte is added to.
    counter: &'a AtomicU64,
    carrier: Carrier,
    /// Bytes read from `src` and not yet written to `dst`.
    pending: usize,
    /// splice was refused for this pair of sockets: use the buffer from now on.
    no_splice: bool,
    /// The last read filled its carrier: a bulk transfer, worth splicing (as HAProxy's
    /// splice-auto decides). Cleared by a short read.
    bulk: bool,
    /// `src` has no more bytes (read returned 0).
    eof: bool,
    /// `dst`'s write side has been shut down after the last byte.
    shut: bool,
    moved: u64,
}

enum Step {
    /// Nothing more can be done until poll says so.
    Blocked,
    /// Bytes moved.
    Progress,
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice(2) between descriptors that stay open for the call.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl<'a> Direction<'a> {
    fn new(counter: &'a AtomicU64) -> Direction<'a> {
        Direction {
            counter,
            carrier: Carrier::None,
            pending: 0,
            no_splice: false,
            bulk: false,
            eof: false,
            shut: false,
            moved: 0,
        }
    }

    fn done(&self) -> bool {
        self.shut
    }

    fn wants_read(&self) -> bool {
        !self.eof && self.pending == 0
    }

    fn wants_write(&self) -> bool {
        self.pending > 0
    }

    /// Give the carrier back once it is empty, so an idle direction holds nothing.
    fn release(&mut self) {
        if self.pending == 0 {
            match std::mem::replace(&mut self.carrier, Carrier::None) {
                Carrier::Pipe(p) => p.give(),
                Carrier::Buf { buf, .. } => give_buf(buf),
                Carrier::None => {}
            }
        }
    }

    /// Write out what is pending; Ok(true) if all of it went.
    fn flush(&mut self, dst: &TcpStream) -> io::Result<bool> {
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
                    self.counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Read what `src` has into the carrier; Ok(None) if nothing is there yet.
    fn fill(&mut self, src: &TcpStream) -> io::Result<Option<usize>> {
        if matches!(self.carrier, Carrier::None) {
            let pipe = if self.bulk && !self.no_splice {
                KernelPipe::take().ok()
            } else {
                None
            };
            self.carrier = match pipe {
                Some(p) => Carrier::Pipe(p),
                None => Carrier::Buf {
                    buf: take_buf(),
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
            return match n {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !self.no_splice => {
                    // This socket pair cannot be spliced: carry on through a buffer.
                    self.no_splice = true;
                    self.release();
                    self.carrier = Carrier::Buf {
                        buf: take_buf(),
                        lo: 0,
                    };
                    continue;
                }
                Err(e) => Err(e),
            };
        }
    }

    /// Move as much as possible from `src` to `dst` without blocking.
    fn pump(&mut self, src: &TcpStream, dst: &TcpStream) -> io::Result<Step> {
        let mut step = Step::Blocked;
        loop {
            let before = self.moved;
            let flushed = self.flush(dst)?;
            if self.moved != before {
                step = Step::Progress;
            }
            if !flushed {
                return Ok(step);
            }
            // Switch carriers between fills when the kind of traffic changed.
            let wrong_carrier = match self.carrier {
                Carrier::Buf { .. } => self.bulk && !self.no_splice,
                Carrier::Pipe(_) => !self.bulk,
                Carrier::None => false,
            };
            if wrong_carrier {
                self.release();
            }
            if self.eof {
                self.release();
                if !self.shut {
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
            match self.fill(src)? {
                Some(0) => {
                    self.eof = true;
                    step = Step::Progress;
                }
                Some(n) => {
                    self.pending = n;
                    step = Step::Progress;
                    let capacity = match &self.carrier {
                        Carrier::Buf { buf, .. } => buf.len(),
                        _ => PIPE_SIZE,
                    };
                    self.bulk = n == capacity || (self.bulk && n >= BUF_SIZE);
                    if !self.bulk && matches!(self.carrier, Carrier::Buf { .. }) {
                        // A short read drained the socket (as far as it had bytes): deliver
                        // them, then wait in poll rather than pay for a read that would only
                        // say EAGAIN. Poll is level-triggered, so nothing is missed.
                        let before = self.moved;
                        let flushed = self.flush(dst)?;
                        if flushed {
                            self.release();
                        }
                        if self.moved != before {
                            step = Step::Progress;
                        }
                        return Ok(step);
                    }
                    // A full carrier moving to a pipe: hand back the buffer once written, so
                    // the next fill picks the pipe.
                }
                None => {
                    self.release();
                    return Ok(step);
                }
            }
        }
    }
}

/// Relay between `client` and `backend` until both directions are closed, one fails, or
/// nothing moves for `idle`. Both sockets must be non-blocking. The caller closes them.
/// Delivered bytes are also added to `up_counter` and `down_counter` as they move.
pub fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Option<Duration>,
    up_counter: &AtomicU64,
    down_counter: &AtomicU64,
) -> Outcome {
    let mut up = Direction::new(up_counter);
    let mut down = Direction::new(down_counter);
    let mut last_activity = Instant::now();
    // A hang-up without error was seen on the socket while nothing was wanted from it.
    let (mut client_hup, mut backend_hup) = (false, false);
    let end = loop {
        let stepped = (up.pump(client, backend), down.pump(backend, client));
        match stepped {
            (Err(e), _) | (_, Err(e)) => {
                crate::debug!("relay error: {e}");
                reset(client);
                reset(backend);
                break End::Reset;
            }
            (Ok(a), Ok(b)) => {
                if matches!(a, Step::Progress) || matches!(b, Step::Progress) {
                    last_activity = Instant::now();
                }
            }
        }
        if up.done() && down.done() {
            break End::Closed;
        }
        // A socket is polled only for what is still wanted from it. One that nothing is wanted
        // from is still polled with no events, so that an error (a reset) or hang-up there is
        // seen while the connection waits on the other side; once a hang-up without error has
        // been seen there it is left out altogether, as poll would report it again at once.
        let client_events = events(up.wants_read(), down.wants_write());
        let backend_events = events(down.wants_read(), up.wants_write());
        let mut fds = [
            pollfd(client, client_events, client_hup),
            pollfd(backend, backend_events, backend_hup),
        ];
        let timeout_ms = match idle {
            None => -1,
            Some(idle) => {
                let left = idle.saturating_sub(last_activity.elapsed());
                if left.is_zero() {
                    break End::IdleTimeout;
                }
                // Round up so we do not wake a millisecond early and spin.
                left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
            }
        };
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                crate::error!("relay poll failed: {e}");
                reset(client);
                reset(backend);
                break End::Reset;
            }
            continue;
        }
        // Where something was wanted, the next pump's read or write meets whatever happened
        // (bytes, end of stream, or the error) in order, so nothing already received is lost.
        // Where nothing was wanted, poll's error and hang-up flags are acted on here, or they
        // would wake every poll without a pump ever clearing them.
        match hangup(client, &fds[0], "client") {
            Hangup::None => {}
            Hangup::Closed => client_hup = true,
            Hangup::Failed => {
                reset(client);
                reset(backend);
                break End::Reset;
            }
        }
        match hangup(backend, &fds[1], "target") {
            Hangup::None => {}
            Hangup::Closed => backend_hup = true,
            Hangup::Failed => {
                reset(client);
                reset(backend);
                break End::Reset;
            }
        }
    };
    Outcome {
        up: up.moved,
        down: down.moved,
        end,
    }
}

fn events(read: bool, write: bool) -> libc::c_short {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    events
}

/// The poll entry of `s` for `events`; a negative descriptor (which poll skips) if nothing is
/// wanted from it and it has already hung up.
fn pollfd(s: &TcpStream, events: libc::c_short, hung_up: bool) -> libc::pollfd {
    libc::pollfd {
        fd: if events == 0 && hung_up {
            -1
        } else {
            s.as_raw_fd()
        },
        events,
        revents: 0,
    }
}

enum Hangup {
    /// Nothing to act on here.
    None,
    /// Both ways of this socket are closed without an error (its peer's FIN arrived and ours
    /// went, or the proxy cut it): whatever is still to do waits on the other socket.
    Closed,
    /// The socket failed (a reset, a timeout): the connection cannot complete.
    Failed,
}

/// What poll's error and hang-up flags on a socket from which nothing was wanted mean.
fn hangup(s: &TcpStream, fd: &libc::pollfd, side: &str) -> Hangup {
    if fd.fd < 0 || fd.events != 0 {
        return Hangup::None;
    }
    if fd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        // Read (and so clear) the pending error, for the log.
        match s.take_error() {
            Ok(Some(e)) => crate::debug!("relay: {side} socket failed: {e}"),
            Ok(None) => crate::debug!("relay: {side} socket reported an error"),
            Err(e) => crate::debug!("relay: {side} socket: {e}"),
        }
        return Hangup::Failed;
    }
    if fd.revents & libc::POLLHUP != 0 {
        return Hangup::Closed;
    }
    Hangup::None
}

/// Make the coming close send a RST instead of a FIN, so the peer learns the connection failed
/// rather than seeing an orderly end of stream.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, and the option value is a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
