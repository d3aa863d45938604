//! Every way a relayed connection can close, in both directions and both orders: the proxy
//! ends the connection or waits for it without using CPU, and each peer observes what the other
//! did (end of stream for a half-close, a reset for a reset).
//!
//! Covers issue 11 item 1: a client that half-closed and then reset (or a target that sent FIN
//! and then RST) while the other side stayed silent used to pin a core, because the finished
//! side's socket stayed in the poll set with no events and its POLLERR/POLLHUP fired forever.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long the proxy's CPU use is measured while a sequence ends or waits.
const WINDOW: Duration = Duration::from_secs(3);
/// CPU seconds allowed in `WINDOW`: far above what an idle proxy uses even on a loaded machine,
/// far below what a spinning relay thread burns (a whole core, so about `WINDOW`).
const CPU_MAX: f64 = 0.3;

/// Panic unless the proxy stays near zero CPU for `WINDOW`.
fn assert_quiet(p: &Proxy, what: &str) {
    let cpu = p.cpu_during(WINDOW);
    assert!(
        cpu < CPU_MAX,
        "{what}: the proxy used {cpu:.2} s of CPU in {WINDOW:?}"
    );
}

/// Panic unless `s` reads exactly `want` and then end of stream.
fn expect_bytes_then_eof(s: &mut TcpStream, want: &[u8], who: &str) {
    let got = read_to_eof(s);
    assert_eq!(got, want, "{who} received other bytes");
}

/// The `conn` line of the pair's connection.
fn conn_line(pair: &Relayed, local: std::net::SocketAddr) -> ConnLine {
    pair.proxy.wait_conn(local)
}

/// The sequence of the report: the client sends, half-closes and then resets while the target
/// stays open and silent. The target sees the bytes, the end of stream, then a reset.
#[test]
fn client_half_close_then_reset_while_target_silent() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.client.write_all(b"more").unwrap();
    pr.client.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.target, b"more", "the target");
    close_with_reset(std::mem::replace(&mut pr.client, placeholder()));
    assert_quiet(&pr.proxy, "client half-closed then reset, target silent");
    expect_reset(&mut pr.target, "the target");
    let c = conn_line(&pr, local);
    assert_eq!(c.end, "reset", "{}", c.line);
    assert_eq!(c.up, (HELLO.len() + 4) as u64, "{}", c.line);
}

/// The mirror: the target sends, half-closes and then resets while the client stays silent.
#[test]
fn target_half_close_then_reset_while_client_silent() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.target.write_all(b"reply").unwrap();
    pr.target.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.client, b"reply", "the client");
    close_with_reset(std::mem::replace(&mut pr.target, placeholder()));
    assert_quiet(&pr.proxy, "target half-closed then reset, client silent");
    expect_reset(&mut pr.client, "the client");
    let c = conn_line(&pr, local);
    assert_eq!(c.end, "reset", "{}", c.line);
    assert_eq!(c.down, 5, "{}", c.line);
}

/// A reset without a half-close first, from the client: the target is reset.
#[test]
fn client_reset_while_target_silent() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    close_with_reset(std::mem::replace(&mut pr.client, placeholder()));
    expect_reset(&mut pr.target, "the target");
    assert_quiet(&pr.proxy, "client reset, target silent");
    assert_eq!(conn_line(&pr, local).end, "reset");
}

/// A reset without a half-close first, from the target: the client is reset.
#[test]
fn target_reset_while_client_silent() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    close_with_reset(std::mem::replace(&mut pr.target, placeholder()));
    expect_reset(&mut pr.client, "the client");
    assert_quiet(&pr.proxy, "target reset, client silent");
    assert_eq!(conn_line(&pr, local).end, "reset");
}

/// The client half-closes and the target takes its time: the proxy waits without CPU, then the
/// late reply and the target's close reach the client.
#[test]
fn client_half_close_waits_for_a_slow_target() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.client.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.target, b"", "the target");
    assert_quiet(&pr.proxy, "client half-closed, target silent");
    pr.target.write_all(b"late reply").unwrap();
    pr.target.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.client, b"late reply", "the client");
    let c = conn_line(&pr, local);
    assert_eq!(
        (c.end.as_str(), c.up, c.down),
        ("closed", HELLO.len() as u64, 10),
        "{}",
        c.line
    );
}

/// The target half-closes and the client takes its time: the proxy waits without CPU, then the
/// client's late bytes and close reach the target.
#[test]
fn target_half_close_waits_for_a_slow_client() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.target.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.client, b"", "the client");
    assert_quiet(&pr.proxy, "target half-closed, client silent");
    pr.client.write_all(b"late request").unwrap();
    pr.client.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.target, b"late request", "the target");
    let c = conn_line(&pr, local);
    assert_eq!(
        (c.end.as_str(), c.up, c.down),
        ("closed", (HELLO.len() + 12) as u64, 0),
        "{}",
        c.line
    );
}

/// The client half-closes, then the target resets: the client is reset.
#[test]
fn client_half_close_then_target_reset() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.client.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.target, b"", "the target");
    close_with_reset(std::mem::replace(&mut pr.target, placeholder()));
    expect_reset(&mut pr.client, "the client");
    assert_quiet(&pr.proxy, "client half-closed, then target reset");
    assert_eq!(conn_line(&pr, local).end, "reset");
}

/// The target half-closes, then the client resets: the target is reset.
#[test]
fn target_half_close_then_client_reset() {
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    pr.target.shutdown(Shutdown::Write).unwrap();
    expect_bytes_then_eof(&mut pr.client, b"", "the client");
    close_with_reset(std::mem::replace(&mut pr.client, placeholder()));
    expect_reset(&mut pr.target, "the target");
    assert_quiet(&pr.proxy, "target half-closed, then client reset");
    assert_eq!(conn_line(&pr, local).end, "reset");
}

/// Both sides half-close, in both orders: each sees the other's end of stream and the
/// connection ends `closed`.
#[test]
fn both_half_close_in_either_order() {
    for client_first in [true, false] {
        let mut pr = Relayed::start(&[]);
        let local = pr.client.local_addr().unwrap();
        if client_first {
            pr.client.shutdown(Shutdown::Write).unwrap();
            expect_bytes_then_eof(&mut pr.target, b"", "the target");
            pr.target.shutdown(Shutdown::Write).unwrap();
        } else {
            pr.target.shutdown(Shutdown::Write).unwrap();
            expect_bytes_then_eof(&mut pr.client, b"", "the client");
            pr.client.shutdown(Shutdown::Write).unwrap();
            expect_bytes_then_eof(&mut pr.target, b"", "the target");
        }
        expect_bytes_then_eof(&mut pr.client, b"", "the client");
        assert_eq!(
            conn_line(&pr, local).end,
            "closed",
            "client first: {client_first}"
        );
        assert_quiet(&pr.proxy, "both half-closed");
    }
}

/// The client half-closes; the target answers with more than the client reads, then closes
/// both ways. The proxy holds the undelivered reply while the target socket has hung up (its
/// FIN in, ours out): waiting on the client must not spin on that hang-up. Then the client
/// reads everything.
#[test]
fn hung_up_target_while_the_client_does_not_read() {
    reply_held_for_a_slow_reader(true);
}

/// The mirror: the target half-closes, the client sends more than the target reads and closes.
#[test]
fn hung_up_client_while_the_target_does_not_read() {
    reply_held_for_a_slow_reader(false);
}

/// With `target_sends`, the target is the sender and the client the slow reader; otherwise the
/// other way round.
fn reply_held_for_a_slow_reader(target_sends: bool) {
    const SIZE: usize = 8 << 20;
    let mut pr = Relayed::start(&[]);
    let local = pr.client.local_addr().unwrap();
    let (mut sender, mut reader) = if target_sends {
        pr.client.shutdown(Shutdown::Write).unwrap();
        expect_bytes_then_eof(&mut pr.target, b"", "the target");
        (
            pr.target.try_clone().unwrap(),
            pr.client.try_clone().unwrap(),
        )
    } else {
        pr.target.shutdown(Shutdown::Write).unwrap();
        expect_bytes_then_eof(&mut pr.client, b"", "the client");
        (
            pr.client.try_clone().unwrap(),
            pr.target.try_clone().unwrap(),
        )
    };
    let mut data = vec![0u8; SIZE];
    Rng::seeded().fill(&mut data);
    let sent = data.clone();
    let sender_probe = sender.try_clone().unwrap();
    let writer = thread::spawn(move || {
        sender.write_all(&sent).expect("send the bulk");
        sender.shutdown(Shutdown::Write).unwrap();
        sender
    });
    // Wait until the proxy has taken in every byte and the sender's FIN (the sender's socket
    // is closed once the proxy acknowledged the FIN). Should the proxy's buffers not hold it
    // all (how far the kernel grew them depends on the machine's load), the reader makes room
    // a little at a time, leaving the proxy still holding most of the bulk.
    let mut got = Vec::with_capacity(SIZE);
    let mut chunk = vec![0u8; 16 * 1024];
    let start = Instant::now();
    wait_for(
        "the proxy to take in the whole bulk and its FIN",
        WAIT,
        || {
            if writer.is_finished() && tcp_state(&sender_probe) == TCP_CLOSE {
                return Some(());
            }
            if start.elapsed() > Duration::from_secs(1) {
                let n = reader
                    .read(&mut chunk)
                    .expect("read from the reader's side");
                got.extend_from_slice(&chunk[..n]);
            }
            None
        },
    );
    assert_quiet(&pr.proxy, "a reply held for a reader that does not read");
    got.extend(read_to_eof(&mut reader));
    assert!(
        got == data,
        "the reader got {} bytes, not the {SIZE} sent",
        got.len()
    );
    let _sender = writer.join().unwrap();
    let c = conn_line(&pr, local);
    let moved = if target_sends {
        c.down
    } else {
        c.up - HELLO.len() as u64
    };
    assert_eq!(
        (c.end.as_str(), moved),
        ("closed", SIZE as u64),
        "{}",
        c.line
    );
}

/// A client that sends an urgent byte (`MSG_OOB`) in the middle of a bulk upload: splice stops
/// at the urgent mark for good, so the relay reads past it through a buffer. The bytes after it
/// arrive at the target (the urgent byte itself is out of band and not relayed), and the proxy
/// then waits at no cost: no stall, no spin.
#[test]
fn urgent_byte_in_a_bulk_upload_neither_stalls_nor_spins() {
    let mut r = Relayed::start(&[]);
    let bulk = vec![b'b'; 1 << 20];
    let mut w = r.client.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&bulk).unwrap();
        let urgent = b'!';
        // SAFETY: a one-byte send from a valid buffer on our own socket.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&w),
                &urgent as *const u8 as *const libc::c_void,
                1,
                libc::MSG_OOB,
            )
        };
        assert_eq!(n, 1, "send MSG_OOB: {}", std::io::Error::last_os_error());
        w.write_all(b"tail").unwrap();
    });
    r.target.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !got.ends_with(b"tail") {
        let n = r
            .target
            .read(&mut buf)
            .expect("the bytes after the urgent byte reach the target");
        assert!(
            n > 0,
            "the target saw the end of stream after {} bytes",
            got.len()
        );
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap();
    assert_eq!(
        got.len(),
        (1 << 20) + 4,
        "bytes relayed besides the urgent one"
    );
    let cpu = r.proxy.cpu_during(Duration::from_secs(2));
    assert!(cpu < 0.3, "after an urgent byte: {cpu:.2} s of CPU in 2 s");
    r.client.write_all(b"still relays").unwrap();
    let mut more = [0u8; 12];
    r.target.read_exact(&mut more).unwrap();
    assert_eq!(&more, b"still relays");
}
