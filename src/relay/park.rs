//! The parking lot: connections that wait, without a thread.
//!
//! A connection whose sockets have nothing for it right now (every read and write it wants said
//! "would block") gives its thread back at once and waits here: its sockets, its state, and a
//! buffer or pipe only if bytes are still in flight. The relay threads themselves wait on the
//! lot (each one with nothing to run, see `pool`), in one epoll set holding every connection's
//! sockets, and take up whichever connections become ready, several per wake-up when traffic is
//! heavy: a busy proxy then moves from connection to connection without a context switch for
//! each, as HAProxy's and nginx's event loops do, while an idle connection costs no thread at
//! all.
//!
//! Each socket is registered once (`EPOLL_CTL_ADD` at its first wait) for only what its
//! connection wants from it (`Ticket::arm`): reading, writing, or nothing but an error, so one
//! side's traffic wakes nobody while nothing is wanted from it (a peer trickling bytes into a
//! connection stuck on a slow reader). It is armed in one of two ways, which the connection
//! picks at each wait:
//! - one-shot: a socket that reported an event is disarmed by the kernel until its connection
//!   waits again and re-arms it (`EPOLL_CTL_MOD`), so a connection that a thread is running
//!   never wakes another thread. That suits a bulk transfer, which runs long and whose socket
//!   has news all the time; a re-arm per wait is nothing beside the bytes it moves.
//! - edge-triggered (`EDGE`): the socket stays armed, and reports each time something new comes
//!   (bytes, room, the end, an error). That suits a request and its reply, where a wait comes
//!   every few hundred bytes: a one-shot socket would cost a re-arm for every request and every
//!   reply (two `epoll_ctl` per request on a kept-alive connection, a fifth of the relay's
//!   system calls), and an edge-triggered one costs none once the interest stops changing. Its
//!   rule: the connection waits only once every read and write it wants has said "would block"
//!   or a short read has drained the socket (what comes after that reports anew), which is
//!   what each phase's step does anyway. An event that comes while a thread runs the
//!   connection is recorded by whichever thread takes it (below).
//!
//! Either way, arming anew (a change of what is wanted, or a one-shot socket after it fired)
//! looks at the socket's state then and reports at once what is already there, so nothing that
//! came while the connection ran is lost. A socket armed as it already is costs no system call.
//! An event that comes while its connection runs (or is queued to run) is recorded by the
//! thread that takes it from the kernel, and the connection's next `wait` gives it back to run
//! again at once instead of sleeping. A connection is run by one thread at a time: only the
//! thread that takes it out of the lot (or the one it was never given up by) has it.
//!
//! Deadlines (idle timeout, preread timeout, the end of a wait for a slot) are kept here too: a
//! connection whose deadline comes is handed back as if a socket had woken it. And another
//! thread may wake a connection that waits for something other than its sockets (a slot of its
//! app given to it, the answer to its target's name lookup) through its ticket's `Waker`.
//! Drains reach waiting connections like any other: cutting one shuts its sockets down, which
//! wakes it here.
//!
//! The listening sockets are in the same epoll set (`Listeners`), armed one-shot too: the thread
//! that is told of waiting connections has the listener to itself, accepts a batch, re-arms the
//! listener and starts the first connection on itself, the others queued for whichever thread is
//! free first (see `relay::accept`; the pool wakes a waiting thread for them only when more than
//! a few are queued).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The epoll data of the lot's own eventfd, which `interrupt` writes to wake a waiting thread.
const INTERRUPT: u64 = u64::MAX;
/// Set in the epoll data of a listening socket (`Listeners`), beside its key; a connection's
/// data (its id, shifted) never reaches it.
const LISTENER: u64 = 1 << 62;
/// Events taken per wake-up: enough for a batch under load, small enough that one thread does
/// not take all the work of a burst while another thread could share it.
const BATCH: usize = 32;

/// Which of a connection's sockets an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

/// The epoll events seen on a connection's two sockets since it last ran (client, backend):
/// `EPOLLIN`, `EPOLLOUT`, `EPOLLRDHUP`, `EPOLLERR`, `EPOLLHUP` bits; 0 for a socket with no news.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Woke(pub [u32; 2]);

impl Woke {
    fn any(&self) -> bool {
        self.0 != [0, 0]
    }

    /// Add what `other` saw.
    pub fn merge(&mut self, other: Woke) {
        for i in 0..2 {
            self.0[i] |= other.0[i];
        }
    }

    /// The socket of `side` failed or was closed both ways (a reset, or the proxy cut it).
    pub fn gone(&self, side: Side) -> bool {
        self.0[side as usize] & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
    }
}

/// What a socket is armed for (`Ticket::arm`): bytes or the end of stream (`EPOLLRDHUP` too, so
/// that a relay knows an end of stream waits behind the bytes it read), room to write, or, with
/// neither, only an error or hang-up (which epoll always reports).
pub const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
pub const WRITE: u32 = libc::EPOLLOUT as u32;
pub const FAILURE: u32 = 0;
/// Added to what a socket is armed for: keep it armed, edge-triggered, instead of one-shot
/// (see the module's notes for when each suits).
pub const EDGE: u32 = libc::EPOLLET as u32;

/// What the lot hands back: told what woke it before it runs (see `Ticket::fired`).
pub trait Wakeable: Send + 'static {
    fn woke(&mut self, woke: Woke);
}

/// A connection's place in the lot, from its first wait to its end: dropping it (with the
/// connection) forgets the connection there.
pub struct Ticket {
    id: u64,
    /// Registered in the epoll set.
    added: [bool; 2],
    /// What each socket is armed for now; None once it fired (one-shot) or before it is added.
    armed: [Option<u32>; 2],
    lot: Arc<dyn LotRef>,
}

/// The lot as its tickets and wakers see it, whatever it holds.
trait LotRef: Send + Sync {
    fn forget(&self, id: u64);
    fn epoll(&self) -> RawFd;
    fn wake(&self, id: u64);
}

/// Wakes one connection from another thread (`Ticket::waker`): handed back as if a socket had
/// woken it, or, if a thread runs it now, given back at its next `wait` to run again. Nothing
/// happens once the connection has ended.
pub struct Waker {
    id: u64,
    lot: Arc<dyn LotRef>,
}

impl Waker {
    pub fn wake(&self) {
        self.lot.wake(self.id);
    }
}

impl Ticket {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What wakes this connection from another thread.
    pub fn waker(&self) -> Waker {
        Waker {
            id: self.id,
            lot: Arc::clone(&self.lot),
        }
    }

    /// Arm `fd`, the connection's `side`, for `events` (`READ`, `WRITE`, both, or `FAILURE`,
    /// with `EDGE` to keep it armed) until it next fires; None leaves it as it is (a socket that
    /// hung up, from which nothing more can come: armed, it would report its hang-up again at
    /// every wait). A socket already armed for the same is left alone: no system call. The
    /// socket must stay open as long as the ticket lives (closing it is what takes it out of the
    /// epoll set).
    pub fn arm(&mut self, side: Side, fd: RawFd, events: Option<u32>) -> io::Result<()> {
        let i = side as usize;
        let Some(events) = events else {
            return Ok(());
        };
        if self.armed[i] == Some(events) {
            return Ok(());
        }
        let op = if self.added[i] {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        let flags = if events & EDGE != 0 {
            events
        } else {
            events | libc::EPOLLONESHOT as u32
        };
        epoll_ctl(self.lot.epoll(), op, fd, flags, self.id << 1 | i as u64)?;
        self.added[i] = true;
        self.armed[i] = Some(events);
        Ok(())
    }

    /// The socket of `side` was closed and another may take its place (a connect failing over
    /// to the next address): closing it took it out of the epoll set, so the next `arm`
    /// registers anew.
    pub fn replaced(&mut self, side: Side) {
        self.added[side as usize] = false;
        self.armed[side as usize] = None;
    }

    /// The one-shot sockets that reported `woke` are disarmed: the next `arm` re-arms them. An
    /// edge-triggered one stays armed.
    pub fn fired(&mut self, woke: Woke) {
        for i in 0..2 {
            if woke.0[i] != 0 && self.armed[i].is_some_and(|e| e & EDGE == 0) {
                self.armed[i] = None;
            }
        }
    }
}

/// A listening socket that has connections waiting (`Listeners::add`): the key it was added
/// with. The thread given it has it alone until it re-arms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening(pub u64);

/// Where listening sockets are watched: the lot's epoll set, shared with the connections.
#[derive(Clone)]
pub struct Listeners {
    lot: Arc<dyn LotRef>,
}

impl Listeners {
    /// Watch `fd`, a non-blocking listening socket, as `key` (below 2^62), armed for one event.
    pub fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, key)
    }

    /// Arm `fd` (added as `key`) again for one event; connections already waiting fire it at
    /// once. The caller must know `fd` is still that listener (not closed and reused).
    pub fn rearm(&self, fd: RawFd, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, key)
    }

    /// Stop watching `fd`, before it is closed (a thread that holds it may still re-arm it
    /// until then, so closing alone would not do).
    pub fn remove(&self, fd: RawFd) {
        let _ = epoll_ctl(self.lot.epoll(), libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
        debug_assert!(key < LISTENER);
        let events = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        epoll_ctl(self.lot.epoll(), op, fd, events, LISTENER | key)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lot.forget(self.id);
    }
}

pub struct Lot<T> {
    epoll: OwnedFd,
    interrupt: OwnedFd,
    state: Mutex<State<T>>,
}

struct State<T> {
    entries: HashMap<u64, Place<T>>,
    /// Deadlines of waiting connections, earliest first.
    timers: BTreeSet<(Instant, u64)>,
    /// Ids are never reused, so a late event for a connection that ended is ignored.
    next_id: u64,
    /// When each thread now blocked in `collect` will wake at the latest (None: only for an
    /// event), so that a new earlier deadline interrupts one of them.
    sleepers: Vec<(u64, Option<Instant>)>,
    next_sleeper: u64,
    /// Waiting connections woken by a `Waker`, for the next `collect`.
    woken: Vec<u64>,
}

impl<T> State<T> {
    /// Some sleeping thread will wake by `at`.
    fn covered(&self, at: Instant) -> bool {
        self.sleepers
            .iter()
            .any(|(_, wake)| wake.is_some_and(|w| w <= at))
    }
}

/// A connection's place in the lot (its `Ticket` is the handle to it).
struct Place<T> {
    /// Some while the connection waits here; None while a thread has it.
    item: Option<T>,
    /// Events seen since it last ran.
    woke: Woke,
    /// A `Waker` woke it since it last ran.
    nudged: bool,
    deadline: Option<Instant>,
}

impl<T: Wakeable> Lot<T> {
    pub fn new() -> io::Result<Arc<Lot<T>>> {
        // SAFETY: plain system calls; each returns a new descriptor we own, or -1.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epoll` is a new descriptor owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: as above.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a new descriptor owned by nobody else.
        let interrupt = unsafe { OwnedFd::from_raw_fd(efd) };
        // Edge-triggered: each write wakes one waiting thread once, and nobody needs to read
        // the counter back (it cannot overflow in practice: 2^64 interrupts).
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            efd,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            INTERRUPT,
        )?;
        Ok(Arc::new(Lot {
            epoll,
            interrupt,
            state: Mutex::new(State {
                entries: HashMap::new(),
                timers: BTreeSet::new(),
                next_id: 0,
                sleepers: Vec::new(),
                next_sleeper: 0,
                woken: Vec::new(),
            }),
        }))
    }

    /// Where listening sockets are added to this lot's epoll set.
    pub fn listeners(self: &Arc<Self>) -> Listeners {
        Listeners {
            lot: Arc::clone(self) as Arc<dyn LotRef>,
        }
    }

    /// A place for a new connection, held by the thread that runs it.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.entries.insert(
            id,
            Place {
                item: None,
                woke: Woke::default(),
                nudged: false,
                deadline: None,
            },
        );
        drop(state);
        Ticket {
            id,
            added: [false; 2],
            armed: [None; 2],
            lot: Arc::clone(self) as Arc<dyn LotRef>,
        }
    }

    /// Leave `item` (the connection of `ticket`) here until one of its armed sockets shows an
    /// event, or `deadline`. If an event came while it ran, it is given back at once with what
    /// woke it: run it again (and tell its ticket, `Ticket::fired`).
    pub fn wait(&self, ticket: u64, item: T, deadline: Option<Instant>) -> Result<(), (T, Woke)> {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(&ticket) else {
            // Its ticket is gone, which cannot be while the item (which holds it) lives.
            return Err((item, Woke::default()));
        };
        if entry.woke.any() || entry.nudged {
            entry.nudged = false;
            return Err((item, std::mem::take(&mut entry.woke)));
        }
        entry.item = Some(item);
        entry.deadline = deadline;
        let Some(at) = deadline else {
            return Ok(());
        };
        state.timers.insert((at, ticket));
        // Interrupt a sleeping thread if none would wake by then, so it counts the deadline in.
        let late = !state.sleepers.is_empty() && !state.covered(at);
        drop(state);
        if late {
            self.interrupt();
        }
        Ok(())
    }

    /// Wake one thread blocked in `collect`.
    pub fn interrupt(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a valid u64 to our eventfd. It fails only if the
        // counter is full, which would take 2^64 interrupts.
        unsafe {
            libc::write(
                self.interrupt.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }

    /// The connections that are ready: woken by an event or due, and the listeners that have
    /// connections waiting. With `block`, wait for at least one (or an interrupt); without,
    /// only look. Each connection comes with what woke it.
    pub fn collect<J: From<T> + From<Listening>>(&self, block: bool, out: &mut Vec<J>) {
        let mut me = None;
        let timeout = if block {
            let mut state = self.lock();
            let next = state.timers.first().map(|&(at, _)| at);
            let id = state.next_sleeper;
            state.next_sleeper += 1;
            state.sleepers.push((id, next));
            me = Some(id);
            next.map_or(-1, |at| {
                crate::sys::net::poll_ms(at.saturating_duration_since(Instant::now()))
            })
        } else {
            0
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: `events` is a valid array of BATCH entries for the call.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                BATCH as i32,
                timeout,
            )
        };
        let failed = (n < 0).then(io::Error::last_os_error);
        let mut state = self.lock();
        if let Some(i) = me.and_then(|me| state.sleepers.iter().position(|&(id, _)| id == me)) {
            state.sleepers.swap_remove(i);
        }
        let mut ready = Vec::new();
        let mut interrupted = false;
        for ev in &events[..usize::try_from(n).unwrap_or(0)] {
            let data = ev.u64;
            if data == INTERRUPT {
                interrupted = true;
                continue;
            }
            if data & LISTENER != 0 {
                out.push(J::from(Listening(data & !LISTENER)));
                continue;
            }
            let (id, side) = (data >> 1, (data & 1) as usize);
            if let Some(entry) = state.entries.get_mut(&id) {
                entry.woke.0[side] |= ev.events;
                if entry.item.is_some() {
                    ready.push(id);
                }
            }
        }
        ready.append(&mut state.woken);
        let now = Instant::now();
        while let Some(&(at, id)) = state.timers.first() {
            if at > now {
                break;
            }
            state.timers.pop_first();
            ready.push(id);
        }
        for id in ready {
            let Some(entry) = state.entries.get_mut(&id) else {
                continue;
            };
            // A connection woken by both of its sockets, or by a socket and its deadline, is
            // listed twice: the first takes it.
            let Some(mut item) = entry.item.take() else {
                continue;
            };
            let woke = std::mem::take(&mut entry.woke);
            entry.nudged = false;
            if let Some(at) = entry.deadline.take() {
                state.timers.remove(&(at, id));
            }
            item.woke(woke);
            out.push(J::from(item));
        }
        // Keep a sleeping thread on the next deadline: the one that was may be this one, now
        // leaving to run what it took; and an interrupt taken by a thread only looking was
        // meant for one that sleeps (to take a queued job, or to count a new deadline in).
        let next = state.timers.first().map(|&(at, _)| at);
        let uncovered = next.is_some_and(|at| !state.covered(at));
        let pass_on = !state.sleepers.is_empty() && (uncovered || (interrupted && !block));
        drop(state);
        if pass_on {
            self.interrupt();
        }
        if let Some(e) = failed {
            if e.kind() != io::ErrorKind::Interrupted && block {
                // Nothing waiting could be woken any more: better to say so loudly, and not
                // spin on it.
                crate::error!("parking lot: waiting for events failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section is a few map operations: a poisoned lock is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Wakeable> LotRef for Lot<T> {
    fn epoll(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn wake(&self, id: u64) {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(&id) else {
            // It ended: nothing to wake.
            return;
        };
        entry.nudged = true;
        if entry.item.is_none() {
            // A thread runs it: its next `wait` gives it back.
            return;
        }
        state.woken.push(id);
        drop(state);
        self.interrupt();
    }

    fn forget(&self, id: u64) {
        let mut state = self.lock();
        let entry = state.entries.remove(&id);
        if let Some(at) = entry.as_ref().and_then(|e| e.deadline) {
            state.timers.remove(&(at, id));
        }
        drop(state);
        // Dropped without the lock: an item holds its own ticket.
        drop(entry);
    }
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl with a valid event struct; both descriptors are open.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pool's jobs are what the lot holds, or made from it (`J::from`).
impl<T: Wakeable, J: From<T> + From<Listening>> crate::relay::pool::Source<J> for Lot<T> {
    fn collect(&self, block: bool, out: &mut Vec<J>) {
        Lot::collect(self, block, out)
    }

    fn interrupt(&self) {
        Lot::interrupt(self)
    }
}

mod here;
#[cfg(test)]
mod tests;

pub use here::wait_here;
