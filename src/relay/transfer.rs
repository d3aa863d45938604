//! Moving bytes between a client and its backend, both ways, until both sides are done.
//!
//! While a connection moves bytes, a relay thread runs it with `poll(2)` on the two
//! non-blocking sockets (no extra thread per direction). Once nothing has moved for
//! `PARK_AFTER`, `Relay::run` returns `Pause::Park` and the state waits in the parking lot
//! without a thread (see `park`); past its `SLICE` while other connections wait for a thread it
//! returns to be continued later. The state kept between runs is `Relay`. Bulk bytes go
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
struct Direction {
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

impl Direction {
    fn new() -> Direction {
        Direction {
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
    /// `other_done`: the other direction is over, so once this one is the connection ends and
    /// both sockets are closed.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        other_done: bool,
    ) -> io::Result<Step> {
        let mut step = Step::Blocked;
        loop {
            let before = self.moved;
            let flushed = self.flush(dst, counter)?;
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
                        let flushed = self.flush(dst, counter)?;
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

/// A connection that moved no byte either way for this long gives its thread back (parks):
/// long enough that a request/response exchange or a bulk transfer never parks between its
/// steps, short enough that idle connections stop holding threads at once. Measured in
/// bench/README.md.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// How long a busy connection keeps its thread while other connections wait for one.
pub const SLICE: Duration = Duration::from_millis(50);

/// Why `Relay::run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The connection is over (both sockets are to be closed).
    Ended(End),
    /// Nothing moved for `PARK_AFTER` (or the slice ended while others wait) and no byte is in
    /// flight: the relay holds no buffer or pipe, and waits for `Relay::wanted` on the sockets
    /// without a thread, until `Relay::deadline`.
    Park,
    /// The time slice ended while other connections wait for a thread, with bytes in flight:
    /// continue later, after them.
    Yield,
}

/// What a parked connection waits for on one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Bytes (or end of stream), or an error or hang-up.
    Readable,
    /// Only an error or hang-up: nothing more is read from it.
    Failure,
    /// Nothing: it is closed both ways, and what is left to do waits on the other socket.
    Nothing,
}

/// The state of a relayed connection between two runs: both directions' progress, the time of
/// the last byte moved and what has been seen of the sockets. It holds a buffer or a pipe only
/// while bytes are in flight, so a parked relay is a few dozen bytes.
pub struct Relay {
    up: Direction,
    down: Direction,
    last_activity: Instant,
    /// A hang-up without error was seen on the socket while nothing was wanted from it.
    client_hup: bool,
    backend_hup: bool,
    /// Parking failed: do not try again before this.
    park_again_at: Option<Instant>,
}

/// The two live counters (the target's, for metrics) that delivered bytes are added to.
pub struct Counters<'a> {
    pub up: &'a AtomicU64,
    pub down: &'a AtomicU64,
}

impl Default for Relay {
    fn default() -> Relay {
        Relay::new()
    }
}

impl Relay {
    pub fn new() -> Relay {
        Relay {
            up: Direction::new(),
            down: Direction::new(),
            last_activity: Instant::now(),
            client_hup: false,
            backend_hup: false,
            park_again_at: None,
        }
    }

    /// Parking failed: carry on with the thread for another `PARK_AFTER` before trying again.
    pub fn hold_thread(&mut self) {
        self.park_again_at = Some(Instant::now() + PARK_AFTER);
    }

    /// Bytes delivered so far: client to backend, backend to client.
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// When a parked relay is to be resumed even if nothing happens: its idle timeout.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        idle.map(|d| self.last_activity + d)
    }

    /// What a parked relay waits for on the client and on the backend socket.
    pub fn wanted(&self) -> (Wanted, Wanted) {
        let on = |read: bool, hup: bool| match (read, hup) {
            (true, _) => Wanted::Readable,
            (false, false) => Wanted::Failure,
            (false, true) => Wanted::Nothing,
        };
        (
            on(self.up.wants_read(), self.client_hup),
            on(self.down.wants_read(), self.backend_hup),
        )
    }

    /// Relay between `client` and `backend` (both non-blocking) until both directions are
    /// closed, one fails, nothing moves for `idle`, or the connection should give its thread
    /// back (see `Pause`). `others_waiting` says whether other connections wait for a thread.
    /// The caller closes the sockets once it has `Ended`.
    pub fn run(
        &mut self,
        client: &TcpStream,
        backend: &TcpStream,
        idle: Option<Duration>,
        counters: &Counters,
        others_waiting: &dyn Fn() -> bool,
    ) -> Pause {
        let mut slice_end = Instant::now() + SLICE;
        // Parking waits for what poll would report, so it is decided only after a poll has
        // looked at the sockets in this run: a relay resumed for an error or a hang-up on a
        // socket nothing is read from must see and act on it here, not park again for it.
        let mut polled = false;
        loop {
            let stepped = (
                self.up.pump(client, backend, counters.up, self.down.done()),
                self.down
                    .pump(backend, client, counters.down, self.up.done()),
            );
            let mut now = None;
            match stepped {
                (Err(e), _) | (_, Err(e)) => {
                    crate::debug!("relay error: {e}");
                    return self.fail(client, backend);
                }
                (Ok(a), Ok(b)) => {
                    if matches!(a, Step::Progress) || matches!(b, Step::Progress) {
                        let t = Instant::now();
                        self.last_activity = t;
                        now = Some(t);
                    }
                }
            }
            if self.up.done() && self.down.done() {
                return Pause::Ended(End::Closed);
            }
            let now = now.unwrap_or_else(Instant::now);
            let in_flight = self.up.wants_write() || self.down.wants_write();
            let idle_at = idle.map(|d| self.last_activity + d);
            if idle_at.is_some_and(|at| now >= at) {
                return Pause::Ended(End::IdleTimeout);
            }
            let quiet = now.saturating_duration_since(self.last_activity);
            let may_park = polled && !in_flight && self.park_again_at.is_none_or(|t| now >= t);
            if may_park && quiet >= PARK_AFTER {
                return self.park();
            }
            if now >= slice_end {
                if others_waiting() {
                    return if may_park { self.park() } else { Pause::Yield };
                }
                slice_end = now + SLICE;
            }
            // A socket is polled only for what is still wanted from it. One that nothing is
            // wanted from is still polled with no events, so that an error (a reset) or hang-up
            // there is seen while the connection waits on the other side; once a hang-up
            // without error has been seen there it is left out altogether, as poll would
            // report it again at once.
            let client_events = events(self.up.wants_read(), self.down.wants_write());
            let backend_events = events(self.down.wants_read(), self.up.wants_write());
            let mut fds = [
                pollfd(client, client_events, self.client_hup),
                pollfd(backend, backend_events, self.backend_hup),
            ];
            let mut wake = slice_end;
            if !in_flight {
                // After a failed park, not before the next try: waking at the (past) park
                // time would make every poll return at once until then.
                let park_at = self.last_activity + PARK_AFTER;
                wake = wake.min(self.park_again_at.map_or(park_at, |t| t.max(park_at)));
            }
            if let Some(at) = idle_at {
                wake = wake.min(at);
            }
            // Round up so we do not wake a millisecond early and spin.
            let left = wake.saturating_duration_since(now);
            let timeout_ms = if left.is_zero() {
                0
            } else {
                left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
            };
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            polled = true;
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::error!("relay poll failed: {e}");
                    return self.fail(client, backend);
                }
                continue;
            }
            // Where something was wanted, the next pump's read or write meets whatever
            // happened (bytes, end of stream, or the error) in order, so nothing already
            // received is lost. Where nothing was wanted, poll's error and hang-up flags are
            // acted on here, or they would wake every poll without a pump ever clearing them.
            match hangup(client, &fds[0], "client") {
                Hangup::None => {}
                Hangup::Closed => self.client_hup = true,
                Hangup::Failed => return self.fail(client, backend),
            }
            match hangup(backend, &fds[1], "target") {
                Hangup::None => {}
                Hangup::Closed => self.backend_hup = true,
                Hangup::Failed => return self.fail(client, backend),
            }
        }
    }

    /// Give back the (empty) carriers, so the parked relay holds nothing.
    fn park(&mut self) -> Pause {
        self.up.release();
        self.down.release();
        Pause::Park
    }

    fn fail(&mut self, client: &TcpStream, backend: &TcpStream) -> Pause {
        reset(client);
        reset(backend);
        Pause::Ended(End::Reset)
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
