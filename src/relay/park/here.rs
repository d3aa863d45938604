//! Waiting on a connection's own thread, for when the lot cannot take it.

use std::os::fd::RawFd;
use std::time::Instant;

use super::Woke;

/// Wait on this thread, with poll(2), for what a ticket would be armed for (`events` on the
/// client and the backend socket, as for `Ticket::arm`: None, not at all) or `until`: only when
/// the lot cannot take a connection (its sockets could not be registered). What the sockets
/// showed comes back as the lot would have reported it. Not past a second, so that the caller
/// tries the lot again now and then.
pub fn wait_here(
    fds: [Option<RawFd>; 2],
    events: [Option<u32>; 2],
    until: Option<Instant>,
) -> Woke {
    // epoll's bits and poll's, for what is waited for and what is reported.
    const BITS: [(libc::c_short, libc::c_int); 5] = [
        (libc::POLLIN, libc::EPOLLIN),
        (libc::POLLRDHUP, libc::EPOLLRDHUP),
        (libc::POLLOUT, libc::EPOLLOUT),
        (libc::POLLERR | libc::POLLNVAL, libc::EPOLLERR),
        (libc::POLLHUP, libc::EPOLLHUP),
    ];
    let mut pfds = [0, 1].map(|i| {
        let (fd, wanted) = match (fds[i], events[i]) {
            (Some(fd), Some(wanted)) => (fd, wanted),
            // No socket, or one that hung up: nothing can come from it (poll would report the
            // hang-up at once, every time).
            _ => (-1, 0),
        };
        let mut events = 0;
        for (p, e) in BITS {
            if wanted & e as u32 != 0 {
                events |= p;
            }
        }
        libc::pollfd {
            fd,
            events,
            revents: 0,
        }
    });
    let second = std::time::Duration::from_secs(1);
    let left = until.map_or(second, |at| {
        at.saturating_duration_since(Instant::now()).min(second)
    });
    let mut woke = Woke::default();
    // SAFETY: `pfds` is a valid array of two pollfd for the duration of the call.
    if unsafe { libc::poll(pfds.as_mut_ptr(), 2, crate::sys::net::poll_ms(left)) } <= 0 {
        return woke;
    }
    for (i, pfd) in pfds.iter().enumerate() {
        for (p, e) in BITS {
            if pfd.revents & p != 0 {
                woke.0[i] |= e as u32;
            }
        }
    }
    woke
}
