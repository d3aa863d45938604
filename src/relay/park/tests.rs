//! The lot's arming rules, on real sockets in a real epoll set. Each connection here is the
//! accepted side of a loopback pair (`s`); the test plays its peer (`c`).

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

struct Item {
    woke: Woke,
    /// Set for a listener the lot handed out instead of a connection.
    listening: Option<Listening>,
}

impl From<Listening> for Item {
    fn from(l: Listening) -> Item {
        Item {
            woke: Woke::default(),
            listening: Some(l),
        }
    }
}

impl Wakeable for Item {
    fn woke(&mut self, woke: Woke) {
        self.woke.merge(woke);
    }
}

fn item() -> Item {
    Item {
        woke: Woke::default(),
        listening: None,
    }
}

/// A connected pair: the proxy's side (non-blocking) and its peer.
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    (s, c)
}

/// What the lot hands out within `within`, looking without blocking (a test must fail, not
/// hang, when nothing comes).
fn ready(lot: &Lot<Item>, within: Duration) -> Vec<Item> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    loop {
        lot.collect(false, &mut out);
        if !out.is_empty() || Instant::now() >= until {
            return out;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Long enough for an event to have come if it were coming on loopback.
const QUIET: Duration = Duration::from_millis(150);
const SOON: Duration = Duration::from_secs(5);

fn client_bits(items: &[Item]) -> u32 {
    assert_eq!(items.len(), 1, "one connection woken");
    items[0].woke.0[Side::Client as usize]
}

/// The one connection woken within `SOON`, taken as a relay thread runs it: its ticket told
/// what fired and its news cleared. With what its client socket showed.
fn run_woken(lot: &Lot<Item>, t: &mut Ticket) -> (Item, u32) {
    let mut woken = ready(lot, SOON);
    let bits = client_bits(&woken);
    let mut it = woken.pop().unwrap();
    t.fired(it.woke);
    it.woke = Woke::default();
    (it, bits)
}

const IN: u32 = libc::EPOLLIN as u32;
const OUT: u32 = libc::EPOLLOUT as u32;
const HUP: u32 = libc::EPOLLHUP as u32;

#[test]
fn armed_for_reading_it_wakes_for_bytes_not_for_room() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(READ)).unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    // The socket has room to write, which nobody asked about.
    assert!(ready(&lot, QUIET).is_empty(), "woken for room to write");
    c.write_all(b"x").unwrap();
    let bits = client_bits(&ready(&lot, SOON));
    assert_ne!(bits & IN, 0, "bytes: {bits:#x}");
    assert_eq!(bits & OUT, 0, "room was not asked for: {bits:#x}");
}

#[test]
fn armed_for_writing_it_wakes_for_room_not_for_bytes() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    c.write_all(b"waiting to be read").unwrap();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(WRITE)).unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    let bits = client_bits(&ready(&lot, SOON));
    assert_ne!(bits & OUT, 0, "room: {bits:#x}");
    assert_eq!(bits & IN, 0, "bytes were not asked for: {bits:#x}");
}

#[test]
fn armed_for_failure_only_it_sleeps_through_bytes_and_wakes_on_a_reset() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(FAILURE)).unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    c.write_all(b"not now").unwrap();
    assert!(ready(&lot, QUIET).is_empty(), "woken for bytes");
    crate::sys::net::reset(c);
    let woken = ready(&lot, SOON);
    client_bits(&woken);
    assert!(woken[0].woke.gone(Side::Client), "{:?}", woken[0].woke);
}

#[test]
fn one_shot_then_re_arming_reports_what_came_meanwhile() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(READ)).unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    c.write_all(b"first").unwrap();
    let (it, _) = run_woken(&lot, &mut t);
    // It fired once: more bytes wake nobody while it is not armed again (as while a thread
    // runs it).
    c.write_all(b"second").unwrap();
    assert!(lot.wait(t.id(), it, None).is_ok());
    assert!(
        ready(&lot, QUIET).is_empty(),
        "woken again without re-arming"
    );
    // Re-arming looks at the socket: the bytes already there wake it at once.
    t.arm(Side::Client, s.as_raw_fd(), Some(READ)).unwrap();
    let bits = client_bits(&ready(&lot, SOON));
    assert_ne!(bits & IN, 0, "{bits:#x}");
}

#[test]
fn kept_armed_it_wakes_for_each_new_arrival_without_a_system_call() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(READ | EDGE))
        .unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    let mut buf = [0u8; 64];
    for round in ["request 1", "request 2", "request 3"] {
        c.write_all(round.as_bytes()).unwrap();
        let (it, bits) = run_woken(&lot, &mut t);
        assert_ne!(bits & IN, 0, "{round}: {bits:#x}");
        // Read to "would block", as a relay does before it waits.
        let n = (&s).read(&mut buf).unwrap();
        assert_eq!(&buf[..n], round.as_bytes());
        assert!((&s).read(&mut buf).is_err());
        // Still armed as it was (the one-shot test above needs a re-arm here): `arm` would
        // have nothing to do, and the next round's bytes wake it all the same.
        assert_eq!(t.armed[0], Some(READ | EDGE), "{round}: disarmed");
        assert!(lot.wait(t.id(), it, None).is_ok());
        assert!(
            ready(&lot, QUIET).is_empty(),
            "{round}: woken with nothing new"
        );
    }
}

#[test]
fn a_hung_up_socket_is_left_alone() {
    let lot = Lot::new().unwrap();
    let (s, c) = pair();
    let mut t = lot.ticket();
    t.arm(Side::Client, s.as_raw_fd(), Some(FAILURE)).unwrap();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    // Closed both ways without an error: the peer's FIN came and ours went.
    drop(c);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    let (it, bits) = run_woken(&lot, &mut t);
    assert_ne!(bits & HUP, 0, "{bits:#x}");
    // Nothing wanted from it and nothing more can come: left unarmed, it stays quiet.
    t.arm(Side::Client, s.as_raw_fd(), None).unwrap();
    assert!(lot.wait(t.id(), it, None).is_ok());
    assert!(
        ready(&lot, QUIET).is_empty(),
        "a hung-up socket woke it again"
    );
    // Armed again, it would report the hang-up at once, every time.
    t.arm(Side::Client, s.as_raw_fd(), Some(FAILURE)).unwrap();
    let bits = client_bits(&ready(&lot, SOON));
    assert_ne!(bits & HUP, 0, "{bits:#x}");
}

#[test]
fn events_while_it_runs_are_kept_and_its_next_wait_runs_it_again() {
    let lot = Lot::new().unwrap();
    let (s, mut c) = pair();
    let mut t = lot.ticket();
    // Armed, but a thread has it (it is not waiting in the lot).
    t.arm(Side::Client, s.as_raw_fd(), Some(READ)).unwrap();
    c.write_all(b"meanwhile").unwrap();
    // Another thread takes the event from the kernel: nothing to hand out yet.
    assert!(ready(&lot, QUIET).is_empty());
    // Its wait gives it back at once, with what came.
    let Err((_, woke)) = lot.wait(t.id(), item(), None) else {
        panic!("an event that came while it ran was lost");
    };
    assert_ne!(woke.0[Side::Client as usize] & IN, 0, "{woke:?}");
    // Given back once: the next wait waits.
    t.fired(woke);
    assert!(lot.wait(t.id(), item(), None).is_ok());
}

#[test]
fn a_deadline_wakes_it_and_interrupts_a_thread_sleeping_without_one() {
    let lot = Lot::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let sleeper = Arc::clone(&lot);
    std::thread::spawn(move || {
        let mut out: Vec<Item> = Vec::new();
        while out.is_empty() {
            sleeper.collect(true, &mut out);
        }
        let _ = tx.send((Instant::now(), out.len()));
    });
    // The thread is asleep with no deadline to wake for.
    std::thread::sleep(QUIET);
    let t = lot.ticket();
    let wait = Duration::from_millis(100);
    let asked = Instant::now();
    assert!(lot.wait(t.id(), item(), Some(asked + wait)).is_ok());
    let (at, n) = rx.recv_timeout(SOON).expect("the deadline woke nobody");
    assert_eq!(n, 1);
    assert!(at >= asked + wait, "woken {:?} early", asked + wait - at);
}

#[test]
fn a_waker_wakes_a_sleeping_thread_for_a_connection_waiting_on_nothing_else() {
    let lot = Lot::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let sleeper = Arc::clone(&lot);
    std::thread::spawn(move || {
        let mut out: Vec<Item> = Vec::new();
        while out.is_empty() {
            sleeper.collect(true, &mut out);
        }
        let _ = tx.send(out.len());
    });
    // No socket, no deadline: only its waker can wake it (a slot of its app given to it).
    let t = lot.ticket();
    assert!(lot.wait(t.id(), item(), None).is_ok());
    std::thread::sleep(QUIET);
    let waker = t.waker();
    std::thread::spawn(move || waker.wake());
    assert_eq!(rx.recv_timeout(SOON).expect("the waker woke nobody"), 1);
}

#[test]
fn a_wake_while_it_runs_runs_it_again_at_its_next_wait_and_a_late_one_is_ignored() {
    let lot = Lot::new().unwrap();
    let t = lot.ticket();
    // A thread has it when the wake comes.
    t.waker().wake();
    assert!(lot.wait(t.id(), item(), None).is_err(), "the wake was lost");
    // Given back once: the next wait waits.
    assert!(lot.wait(t.id(), item(), None).is_ok());
    assert!(ready(&lot, QUIET).is_empty());
    // Once its connection ended, a waker does nothing.
    let waker = t.waker();
    drop(t);
    waker.wake();
    assert!(ready(&lot, QUIET).is_empty());
}

#[test]
fn a_listener_is_handed_to_one_thread_until_it_is_re_armed() {
    let lot = Lot::new().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let listeners = lot.listeners();
    listeners.add(l.as_raw_fd(), 7).unwrap();
    let _c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let _c2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let got = ready(&lot, SOON);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].listening, Some(Listening(7)));
    // Two connections wait, but the listener fired once: nobody else is told until it is armed
    // again.
    assert!(ready(&lot, QUIET).is_empty(), "handed out twice");
    l.accept().unwrap();
    // Re-armed with a connection still waiting: handed out again at once.
    listeners.rearm(l.as_raw_fd(), 7).unwrap();
    let got = ready(&lot, SOON);
    assert_eq!(got[0].listening, Some(Listening(7)));
    l.accept().unwrap();
    // Nothing waiting: re-armed, it stays quiet; taken out, a new connection wakes nobody.
    listeners.rearm(l.as_raw_fd(), 7).unwrap();
    assert!(ready(&lot, QUIET).is_empty());
    listeners.remove(l.as_raw_fd());
    let _c3 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    assert!(
        ready(&lot, QUIET).is_empty(),
        "a removed listener woke a thread"
    );
}
