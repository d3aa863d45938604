//! Socket helpers shared by the listeners (both modes) and the backend connects: raw socket
//! creation with the flags every socket here wants, listening sockets, socket addresses for
//! libc calls, and address canonicalisation. They sit below every other module, so that
//! backends and frontends can both use them without importing each other.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mio::net::TcpListener;

/// Listen backlog: how many completed connections the kernel queues for us while we are
/// paused at the connection bound or busy. The kernel caps it at net.core.somaxconn.
const BACKLOG: libc::c_int = 4096;

/// A poll(2) or epoll_wait(2) timeout for `left`: rounded up to the millisecond, so that a
/// deadline a fraction of a millisecond away is not a busy loop of 0 ms waits (nor a wake-up a
/// millisecond early), and capped at what the calls take. Zero stays zero.
pub fn poll_ms(left: std::time::Duration) -> libc::c_int {
    left.as_micros()
        .div_ceil(1000)
        .min(libc::c_int::MAX as u128) as libc::c_int
}

/// Wait until `fd` shows one of the poll(2) `events` (or an error or hang-up), at most `left`.
/// False on timeout; an error of poll itself is left to the caller's next read or write to
/// report.
pub fn poll_one(fd: std::os::fd::RawFd, events: libc::c_short, left: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = poll_ms(left);
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return rc != 0;
    }
}

/// Write all of `buf` to the non-blocking `s`, waiting for room at most `timeout` in all: for
/// the few bytes that go before relaying starts (a PROXY header, the bytes read for the server
/// name), which a working peer takes at once.
pub fn write_all_within(
    s: &std::net::TcpStream,
    mut buf: &[u8],
    timeout: std::time::Duration,
) -> io::Result<()> {
    use std::io::Write;
    let deadline = std::time::Instant::now() + timeout;
    while !buf.is_empty() {
        match (&*s).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                poll_one(s.as_raw_fd(), libc::POLLOUT, left);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `::ffff:a.b.c.d` (an IPv4 client on a dual-stack socket) written as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Listen on `port` on every local address, IPv4 and IPv6, with one dual-stack socket; on a
/// host without IPv6, IPv4 only.
pub fn listen_any(port: u16) -> io::Result<TcpListener> {
    match listen(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        false,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => listen(
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
            false,
        ),
        other => other,
    }
}

/// A new non-blocking, close-on-exec TCP socket of `addr`'s family.
pub fn tcp_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking listening socket on `addr`. `v6only` is set explicitly either way rather than
/// left to the net.ipv6.bindv6only sysctl, so behaviour does not depend on the host.
pub fn listen(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    let listener = TcpListener::from_std(std::net::TcpListener::from(tcp_socket(addr)?));
    let fd = listener.as_raw_fd();
    let one: libc::c_int = 1;
    // SO_REUSEADDR: a restarted proxy can bind while old connections sit in TIME_WAIT.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, one)?;
    set_nodelay(fd)?;
    if addr.is_ipv6() {
        setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(v6only),
        )?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    if unsafe { libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a bound stream socket.
    if unsafe { libc::listen(fd, BACKLOG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// TCP_NODELAY on a listening socket: every connection accepted from it inherits the option,
/// which saves a system call per connection. We forward whatever arrives at once; Nagle would
/// only add latency.
pub fn set_nodelay(fd: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

fn setsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a c_int, as these options expect.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Close `stream` with a reset (SO_LINGER 0) rather than a FIN: a connection the proxy will not
/// serve ends at once for the client, as a refused one would, and leaves no TIME_WAIT.
pub fn reset(stream: std::net::TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// Make the coming close of `stream` send a RST instead of a FIN (SO_LINGER 0), so the peer
/// learns the connection failed rather than seeing an orderly end of stream.
pub fn reset_on_close(stream: &std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct of the size given, on a socket open for the call. Failure only
    // leaves the close an orderly one.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
