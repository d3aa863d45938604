//! Moving bytes between a client and its backend, both ways, until both sides are done.
//!
//! A relay thread runs a connection with non-blocking reads and writes on its two sockets (no
//! thread per direction) until every one it wants would block; `Relay::run` then returns
//! `Pause::Wait` and the connection waits in the parking lot without a thread (see `park`)
//! until a socket has news for it. Past its `SLICE` while other connections wait for a thread,
//! a relay still moving bytes returns to be continued later. The state kept between runs is
//! `Relay`. Bulk bytes go through a pooled kernel pipe with `splice(2)`, held only while bytes
//! are in flight; small exchanges are copied through a pooled user-space buffer instead, which
//! costs fewer system calls than a splice in and out (splice-auto, as HAProxy calls it).
//! Half-close is carried through: when one side shuts down its write side, the other side's
//! write side is shut down once every byte before it has been delivered, and the reply keeps
//! flowing the other way. A reset on one side is passed on as a reset on the other, so neither
//! peer hangs. An error reported on a socket nothing is wanted from is acted on at once, and a
//! socket that hung up is not armed again once nothing is wanted from it, so no close sequence
//! leaves a thread spinning.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::relay::park::{self, Woke};

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
    /// `src`'s peer has closed its side (the lot saw `EPOLLRDHUP`): a short read does not mean
    /// the end of what is there, as the end of stream waits behind the bytes, and no new event
    /// will come for it.
    closing: bool,
    /// `dst`'s write side has been shut down after the last byte.
    shut: bool,
    moved: u64,
}

/// What a pass of `Direction::pump` did.
#[derive(Default)]
struct Step {
    /// Bytes moved, or the end of stream was met.
    moved: bool,
    /// It stopped at its byte budget, not because a read or write would block: more may move
    /// at once.
    more: bool,
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
            closing: false,
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
            let piped = matches!(self.carrier, Carrier::Pipe(_));
            return match n {
                // splice stops at urgent data (MSG_OOB) and says "would block", or 0 if the
                // peer's FIN came too, there for good, where a read passes it: read once
                // through a buffer before believing that nothing (or nothing more) is there.
                // Otherwise such a byte would stall the direction, or end it early, or spin
                // it (the socket stays readable).
                Ok(0) if piped => {
                    self.use_buffer();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && piped => {
                    self.use_buffer();
                    continue;
                }
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !self.no_splice => {
                    // This socket pair cannot be spliced: carry on through a buffer.
                    self.no_splice = true;
                    self.use_buffer();
                    continue;
                }
                Err(e) => Err(e),
            };
        }
    }

    /// Swap the (empty) pipe for a buffer.
    fn use_buffer(&mut self) {
        self.release();
        self.carrier = Carrier::Buf {
            buf: take_buf(),
            lo: 0,
        };
    }

    /// Move as much as possible from `src` to `dst` without blocking (up to `PASS_BUDGET`).
    /// `other_done`: the other direction is over, so once this one is the connection ends and
    /// both sockets are closed.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        other_done: bool,
    ) -> io::Result<Step> {
        let mut step = Step::default();
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
                            self.release();
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
                    self.release();
                    return Ok(step);
                }
            }
        }
    }
}

/// How long a busy connection keeps its thread while other connections wait for one: short, as
/// the threads that wait for events are few (one per core), and a connection whose peer just
/// spoke should not wait long behind a transfer that never pauses.
pub const SLICE: Duration = Duration::from_millis(5);

/// Bytes one direction moves per pass before the relay looks at the clock: a transfer whose
/// source never runs dry must still come back to check its time slice.
const PASS_BUDGET: u64 = 1024 * 1024;

/// Why `Relay::run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The connection is over (both sockets are to be closed).
    Ended(End),
    /// Every read and write it wants would block: it waits in the parking lot, without a
    /// thread, for an event on its sockets or `Relay::deadline`. It holds a buffer or pipe only
    /// if bytes are in flight.
    Wait,
    /// The time slice ended while other connections wait for a thread, with bytes still
    /// moving: continue later, after them.
    Yield,
}

/// The state of a relayed connection between two runs: both directions' progress, the time of
/// the last byte moved and the events seen on its sockets since it last ran. It holds a buffer
/// or a pipe only while bytes are in flight, so a waiting relay is a few dozen bytes.
pub struct Relay {
    up: Direction,
    down: Direction,
    last_activity: Instant,
    /// Events seen on the client and the backend socket since the last run (epoll bits).
    woke: Woke,
    /// A hang-up without error was seen on the client or backend socket while nothing was
    /// wanted from it: nothing more can come from it, and polled or armed again it would report
    /// the hang-up again at once, every time.
    hup: [bool; 2],
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
            woke: Woke::default(),
            hup: [false; 2],
        }
    }

    /// Bytes delivered so far: client to backend, backend to client.
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// When a waiting relay is to be run even if nothing happens: its idle timeout.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        idle.map(|d| self.last_activity + d)
    }

    /// Note what woke the relay, for its next run.
    pub fn woke(&mut self, woke: Woke) {
        for i in 0..2 {
            self.woke.0[i] |= woke.0[i];
        }
    }

    /// What to arm the client and the backend socket for while the relay waits (see
    /// `park::Ticket::arm`): reading where a direction reads from it, writing where one has bytes
    /// for it, and otherwise only an error, unless it hung up (None: nothing can come from it).
    pub fn interest(&self) -> [Option<u32>; 2] {
        let on = |read: bool, write: bool, hup: bool| {
            let mut events = park::FAILURE;
            if read {
                events |= park::READ;
            }
            if write {
                events |= park::WRITE;
            }
            (events != park::FAILURE || !hup).then_some(events)
        };
        [
            on(self.up.wants_read(), self.down.wants_write(), self.hup[0]),
            on(self.down.wants_read(), self.up.wants_write(), self.hup[1]),
        ]
    }

    /// Whether anything is still wanted from the client and from the backend socket.
    fn wanted(&self) -> [bool; 2] {
        [
            self.up.wants_read() || self.down.wants_write(),
            self.down.wants_read() || self.up.wants_write(),
        ]
    }

    /// Relay between `client` and `backend` (both non-blocking) while bytes can move without
    /// waiting: until both directions are closed, one fails, nothing moved for `idle`, every
    /// read and write it wants would block (`Pause::Wait`), or its time slice ends while
    /// `others_waiting` (`Pause::Yield`). The caller closes the sockets once it has `Ended`.
    pub fn run(
        &mut self,
        client: &TcpStream,
        backend: &TcpStream,
        idle: Option<Duration>,
        counters: &Counters,
        others_waiting: &dyn Fn() -> bool,
    ) -> Pause {
        let mut slice_end = Instant::now() + SLICE;
        loop {
            // Where something is wanted from a socket, the pump's read or write meets whatever
            // happened there (bytes, end of stream, or the error) in order, so nothing already
            // received is lost. Where nothing is wanted, an error is acted on here: it is
            // reported once (one-shot), and a reset must be passed on, not wait.
            let woke = std::mem::take(&mut self.woke);
            let closing = (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32;
            self.up.closing |= woke.0[0] & closing != 0;
            self.down.closing |= woke.0[1] & closing != 0;
            let wanted = self.wanted();
            let sockets = [(client, "client"), (backend, "target")];
            for (i, &(s, side)) in sockets.iter().enumerate() {
                if !wanted[i] && failed(s, woke.0[i], side) {
                    return self.fail(client, backend);
                }
                // Closed both ways without an error: nothing more can come from or go to it
                // (what is still in it is read all the same).
                let bits = woke.0[i];
                if bits & libc::EPOLLHUP as u32 != 0 && bits & libc::EPOLLERR as u32 == 0 {
                    self.hup[i] = true;
                }
            }
            let stepped = (
                self.up.pump(client, backend, counters.up, self.down.done()),
                self.down
                    .pump(backend, client, counters.down, self.up.done()),
            );
            let (a, b) = match stepped {
                (Err(e), _) | (_, Err(e)) => {
                    crate::debug!("relay error: {e}");
                    return self.fail(client, backend);
                }
                (Ok(a), Ok(b)) => (a, b),
            };
            let now = Instant::now();
            if a.moved || b.moved {
                self.last_activity = now;
            }
            if self.up.done() && self.down.done() {
                return Pause::Ended(End::Closed);
            }
            if idle.is_some_and(|d| now >= self.last_activity + d) {
                return Pause::Ended(End::IdleTimeout);
            }
            if !a.more && !b.more {
                return Pause::Wait;
            }
            if now >= slice_end {
                if others_waiting() {
                    return Pause::Yield;
                }
                slice_end = now + SLICE;
            }
        }
    }

    /// Wait on this thread, with poll(2), for what the relay wants or `until`: only when the
    /// parking lot cannot take the connection (its sockets could not be registered). The
    /// relay's next run acts on what was seen.
    pub fn wait_here(&mut self, client: &TcpStream, backend: &TcpStream, until: Option<Instant>) {
        let want = |read: bool, write: bool| {
            let mut events = 0;
            if read {
                events |= libc::POLLIN | libc::POLLRDHUP;
            }
            if write {
                events |= libc::POLLOUT;
            }
            events
        };
        let events = [
            want(self.up.wants_read(), self.down.wants_write()),
            want(self.down.wants_read(), self.up.wants_write()),
        ];
        let sockets = [client, backend];
        // A socket nothing is wanted from is still polled (with no events) for an error, until
        // it has hung up: poll would report that at once every time.
        let mut fds: Vec<libc::pollfd> = (0..2)
            .map(|i| libc::pollfd {
                fd: if events[i] == 0 && self.hup[i] {
                    -1
                } else {
                    sockets[i].as_raw_fd()
                },
                events: events[i],
                revents: 0,
            })
            .collect();
        // Not past a second, so that the caller tries the lot again now and then.
        let left = until.map_or(Duration::from_secs(1), |at| {
            at.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, crate::sys::net::poll_ms(left)) } <= 0 {
            return;
        }
        for (i, fd) in fds.iter().enumerate() {
            let r = fd.revents;
            if events[i] == 0 && r & libc::POLLHUP != 0 && r & libc::POLLERR == 0 {
                self.hup[i] = true;
            }
            let mut bits = 0u32;
            for (p, e) in [
                (libc::POLLIN, libc::EPOLLIN),
                (libc::POLLRDHUP, libc::EPOLLRDHUP),
                (libc::POLLOUT, libc::EPOLLOUT),
                (libc::POLLERR | libc::POLLNVAL, libc::EPOLLERR),
                (libc::POLLHUP, libc::EPOLLHUP),
            ] {
                if r & p != 0 {
                    bits |= e as u32;
                }
            }
            self.woke.0[i] |= bits;
        }
    }

    fn fail(&mut self, client: &TcpStream, backend: &TcpStream) -> Pause {
        reset(client);
        reset(backend);
        Pause::Ended(End::Reset)
    }
}

/// Whether `events` on a socket from which nothing was wanted say it failed (a reset, a
/// timeout): then the connection cannot complete. A hang-up alone (closed both ways without an
/// error: its peer's FIN arrived and ours went, or the proxy cut it) leaves what is still to do
/// to the other socket.
fn failed(s: &TcpStream, events: u32, side: &str) -> bool {
    if events & libc::EPOLLERR as u32 == 0 {
        return false;
    }
    // Read (and so clear) the pending error, for the log.
    match s.take_error() {
        Ok(Some(e)) => crate::debug!("relay: {side} socket failed: {e}"),
        Ok(None) => crate::debug!("relay: {side} socket reported an error"),
        Err(e) => crate::debug!("relay: {side} socket: {e}"),
    }
    true
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
