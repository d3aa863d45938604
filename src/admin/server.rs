//! The admin socket's thread: one mio poll over the listening socket and at most
//! `MAX_CLIENTS` clients, every socket non-blocking, so that no client can hold the thread.
//!
//! Bounds, for clients that are broken or hostile (the socket is 0660: they are the proxy's
//! own operators, but a script can loop):
//! - a line longer than `MAX_LINE` is refused with an error, and the client closed;
//! - a client has `IDLE` to send each whole line, and `WRITE_DEADLINE` to read each answer;
//!   past either it is closed;
//! - a new client while `MAX_CLIENTS` are connected takes the place of the one that has been
//!   waiting longest (it is told `busy` and closed): one that holds a connection open costs
//!   nothing but its place, and whoever connects now is served;
//! - lines are answered one at a time, the next once the answer is written, so a client that
//!   does not read its answers stops being answered, never grows a buffer past one answer.
//!
//! Nothing here is on the path of a connection: the thread reads the routing table through
//! `Published` (one lock, held for an `Arc` clone), the table of open connections (held for a
//! copy), and the atomics of the apps and targets.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener as StdListener;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};

use super::commands::{self, Answer, Shared};
use super::reload::ReloadOutcome;

/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Descriptors the admin socket may hold at once: its clients, the listening socket, the
/// thread's poll, and a client being told `busy` while it takes another's place.
pub const FDS: u64 = MAX_CLIENTS as u64 + 3;
/// The longest command line taken.
const MAX_LINE: usize = 4096;
/// For each whole line, counted from the connect or the last answer.
const IDLE: Duration = Duration::from_secs(60);
/// For each answer to be read whole.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a reload may take before its client is told it is still going.
const RELOAD_DEADLINE: Duration = Duration::from_secs(120);
/// While a reload's outcome is awaited, the poll looks at it this often.
const RELOAD_POLL: Duration = Duration::from_millis(20);

/// How often the thread looks whether a reload replaced the routing table (to forget, and
/// save without, what was set on targets it removed).
const ROUTES_CHECK: Duration = Duration::from_secs(1);

const LISTENER: Token = Token(usize::MAX);

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// When it is closed if nothing changes: its line's or its answer's deadline.
    deadline: Instant,
    /// Since when it waits for a line (or for its answer to be read): who is evicted first.
    since: Instant,
    /// A reload asked for and not answered yet, with its deadline.
    reload: Option<(Receiver<ReloadOutcome>, Instant)>,
    /// Close once the answer is written (its line was refused).
    close_after: bool,
}

/// Start the thread serving `listener` (created by `socket::bind`).
pub fn start(listener: StdListener, shared: Shared) -> io::Result<()> {
    let poll = Poll::new()?;
    let mut listener = UnixListener::from_std(listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    std::thread::Builder::new()
        .name("flyproxy-admin".into())
        .spawn(move || serve(poll, listener, &shared))?;
    Ok(())
}

fn serve(mut poll: Poll, listener: UnixListener, shared: &Shared) {
    let mut events = Events::with_capacity(64);
    let mut clients: Vec<Option<Client>> = (0..MAX_CLIENTS).map(|_| None).collect();
    let mut routes = shared.published.routes();
    // Set while accepting fails (out of descriptors): said once, not at every attempt.
    let mut accept_failing = false;
    loop {
        let now = Instant::now();
        let mut wake = clients
            .iter()
            .flatten()
            .map(|c| c.deadline)
            .min()
            .map_or(ROUTES_CHECK, |d| {
                d.saturating_duration_since(now).min(ROUTES_CHECK)
            });
        if clients.iter().flatten().any(|c| c.reload.is_some()) {
            wake = wake.min(RELOAD_POLL);
        }
        if let Err(e) = poll.poll(&mut events, Some(wake)) {
            if e.kind() != io::ErrorKind::Interrupted {
                crate::error!("admin socket: waiting for events failed: {e}; no longer served");
                return;
            }
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => accept(&poll, &listener, &mut clients, &mut accept_failing),
                Token(i) => {
                    if let Some(Some(c)) = clients.get_mut(i) {
                        if !c.step(shared) {
                            close(&poll, &mut clients[i]);
                        }
                    }
                }
            }
        }
        if accept_failing {
            // Readiness is edge-triggered: those still queued would wait for the next client.
            accept(&poll, &listener, &mut clients, &mut accept_failing);
        }
        let latest = shared.published.routes();
        if !Arc::ptr_eq(&latest, &routes) {
            routes = latest;
            shared.runtime.prune(&routes);
            if let Err(e) = shared.runtime.save(&routes) {
                crate::warn!("admin: {e}");
            }
        }
        let now = Instant::now();
        for slot in clients.iter_mut() {
            let Some(c) = slot else { continue };
            let keep = match c.reload.take() {
                Some((rx, until)) => {
                    let answer = match rx.try_recv() {
                        Ok(outcome) => Some(commands::reload_answer(Some(outcome))),
                        Err(TryRecvError::Disconnected) => Some(commands::reload_answer(None)),
                        Err(TryRecvError::Empty) if now >= until => Some(Answer::Error(
                            "the reload is taking long: see the log for its outcome".into(),
                        )),
                        Err(TryRecvError::Empty) => None,
                    };
                    match answer {
                        // Its answer is written, and its next line (if it sent one) read.
                        Some(a) => c.answer(a) && c.step(shared),
                        None => {
                            c.reload = Some((rx, until));
                            true
                        }
                    }
                }
                None => now < c.deadline,
            };
            if !keep {
                close(&poll, slot);
            }
        }
    }
}

/// Accept every waiting client; past `MAX_CLIENTS`, each takes the place of the one waiting
/// longest.
fn accept(
    poll: &Poll,
    listener: &UnixListener,
    clients: &mut [Option<Client>],
    failing: &mut bool,
) {
    loop {
        let mut stream = match listener.accept() {
            Ok((s, _)) => {
                *failing = false;
                s
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, most likely: the waiting client stays queued; try again
                // at the next event rather than spin.
                if !std::mem::replace(failing, true) {
                    crate::warn!("admin socket: accept failed: {e}");
                }
                return;
            }
        };
        let i = match clients.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let Some(i) =
                    (0..clients.len()).min_by_key(|&i| clients[i].as_ref().map(|c| c.since))
                else {
                    return;
                };
                if let Some(c) = &mut clients[i] {
                    let _ = c
                        .stream
                        .write(b"error: busy: too many admin clients, this one waited longest\n\n");
                }
                close(poll, &mut clients[i]);
                i
            }
        };
        if let Err(e) = poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            crate::warn!("admin socket: cannot watch a client: {e}");
            continue;
        }
        let now = Instant::now();
        clients[i] = Some(Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            deadline: now + IDLE,
            since: now,
            reload: None,
            close_after: false,
        });
    }
}

fn close(poll: &Poll, slot: &mut Option<Client>) {
    if let Some(mut c) = slot.take() {
        let _ = poll.registry().deregister(&mut c.stream);
    }
}

impl Client {
    /// Move what can move without waiting: write the answer under way, read, and answer the
    /// next whole line once nothing is pending. False: close it.
    fn step(&mut self, shared: &Shared) -> bool {
        loop {
            if !self.flush() {
                return false;
            }
            if self.written < self.output.len() || self.reload.is_some() {
                return true;
            }
            if self.close_after {
                return false;
            }
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.input.drain(..=end).collect();
                let answer = match std::str::from_utf8(&line) {
                    Ok(text) => commands::run(text.trim_end_matches(['\n', '\r']), shared),
                    Err(_) => Answer::Error("the line is not UTF-8 text".into()),
                };
                if !self.answer(answer) {
                    return false;
                }
                continue;
            }
            if self.input.len() > MAX_LINE {
                self.input.clear();
                self.close_after = true;
                let refused = format!("a line is {MAX_LINE} bytes at most; closing");
                self.answer(Answer::Error(refused));
                continue;
            }
            match self.read() {
                Ok(true) => continue,
                Ok(false) => return true,
                Err(()) => return false,
            }
        }
    }

    /// Read what has come, up to one byte past the line bound. Ok(true): something came.
    /// Err: the client is gone.
    fn read(&mut self) -> Result<bool, ()> {
        let mut buf = [0u8; 1024];
        let room = (MAX_LINE + 1)
            .saturating_sub(self.input.len())
            .min(buf.len());
        if room == 0 {
            return Ok(false);
        }
        match self.stream.read(&mut buf[..room]) {
            Ok(0) => Err(()),
            Ok(n) => {
                self.input.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(_) => Err(()),
        }
    }

    /// Queue `answer`, ending in an empty line. False: close it. A reload is queued once its
    /// outcome is in.
    fn answer(&mut self, answer: Answer) -> bool {
        let now = Instant::now();
        let text = match answer {
            Answer::Done(text) => text,
            Answer::Error(why) => {
                let mut t = String::from("error: ");
                t.push_str(&why);
                t.push('\n');
                t
            }
            Answer::Reload(rx) => {
                self.reload = Some((rx, now + RELOAD_DEADLINE));
                self.deadline = now + RELOAD_DEADLINE + WRITE_DEADLINE;
                return true;
            }
        };
        self.output.clear();
        self.written = 0;
        self.output.extend_from_slice(text.as_bytes());
        self.output.push(b'\n');
        self.deadline = now + WRITE_DEADLINE;
        self.since = now;
        true
    }

    /// Write what the socket takes. False: the client is gone.
    fn flush(&mut self) -> bool {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return false,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if !self.output.is_empty() {
            // Written whole: the next line has `IDLE` from now.
            self.output.clear();
            self.written = 0;
            let now = Instant::now();
            self.deadline = now + IDLE;
            self.since = now;
        }
        true
    }
}
