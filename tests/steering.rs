//! The sk_lookup steering itself (`flyproxy::bpf::Steering`), without the proxy around it: in
//! a network namespace of the test's own, real connections to a steered port reach our
//! listener, unsteered ports are left alone, a closed listener's port is dropped with a reset,
//! detaching stops steering at once, and attaching without the capabilities says which are
//! missing. (Runs through `netns::run`: skipped without root, a failure in CI.)

mod common;
#[allow(dead_code)]
mod netns;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use flyproxy::bpf::{BpfError, Steering};
use flyproxy::sys::caps::{self, Cap};

const PORT: u16 = 4242;
const UNSTEERED: u16 = 4243;

/// Steers real connections in a private network namespace, then checks the capability error.
#[test]
fn steers_ports_in_own_netns() {
    netns::run("steers_ports_in_own_netns", |_ns| {
        steer_in_current_netns();
        permission_error_without_caps();
    });
}

fn steer_in_current_netns() {
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = v6only_listener();
    let mut steering = Steering::attach(Some(v4.as_fd()), Some(v6.as_fd()), None).unwrap();

    // Attached but no port added: the program passes, nothing listens, refused.
    assert_refused(("127.0.0.1", PORT));

    steering.add_port(PORT, 0).unwrap();
    steering.add_port(PORT, 0).unwrap(); // idempotent
    assert_steered(("127.0.0.1", PORT), &v4);
    assert_steered(("::1", PORT), &v6);
    assert_refused(("127.0.0.1", UNSTEERED));
    assert_refused(("::1", UNSTEERED));
    let (steered, dropped, passed) = steering.stats().unwrap();
    assert_eq!((steered, dropped), (2, 0));
    assert!(passed >= 2, "passed = {passed}");

    steering.remove_port(PORT).unwrap();
    steering.remove_port(PORT).unwrap(); // idempotent
    assert_refused(("127.0.0.1", PORT));
    assert_refused(("::1", PORT));

    // Another socket bound to the port: untouched while the port is not
    // steered (SK_PASS without assigning), bypassed once it is.
    let squatter = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
    squatter.set_nonblocking(true).unwrap();
    assert_steered(("127.0.0.1", PORT), &squatter);
    steering.add_port(PORT, 0).unwrap();
    assert_steered(("127.0.0.1", PORT), &v4);

    // Closing the v4 listener empties its sockmap slot: SK_DROP. The kernel
    // answers with a RST at once (not a silent drop, which would time out), and
    // the connection does not fall through to the squatter.
    drop(v4);
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(
        squatter.accept().unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    let (steered, dropped, _) = steering.stats().unwrap();
    assert_eq!((steered, dropped), (3, 1));
    assert_steered(("::1", PORT), &v6);

    // Detaching stops steering at once, even for ports still in the map.
    steering.detach();
    assert_refused(("::1", PORT));
    assert_steered(("127.0.0.1", PORT), &squatter);
}

/// With the BPF capabilities dropped from this thread, attach must say which
/// capabilities are missing rather than show a bare errno.
fn permission_error_without_caps() {
    // Capabilities are per thread: this one (the test's own, in its namespace) gives up all
    // but two harmless ones, and the other tests keep theirs.
    caps::keep_only(&[Cap::NetBindService, Cap::Perfmon]).expect("drop capabilities");
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = Steering::attach(Some(v4.as_fd()), None, None).unwrap_err();
    assert!(matches!(err, BpfError::PermissionDenied { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("CAP_BPF and CAP_NET_ADMIN"), "{message}");
    eprintln!("attach without capabilities: {message}");
}

/// Connect to `addr` and check that `listener` (blocking, or non-blocking with
/// the connection already queued) accepts it, with `addr` as its local address.
fn assert_steered(addr: (&str, u16), listener: &TcpListener) {
    let client = TcpStream::connect(addr).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    // getsockname on the accepted socket gives the original destination.
    assert_eq!(accepted.local_addr().unwrap().port(), addr.1);
    assert_eq!(accepted.local_addr().unwrap(), client.peer_addr().unwrap());
}

fn assert_refused(addr: (&str, u16)) {
    let err = TcpStream::connect(addr).unwrap_err();
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "{addr:?}: {err}"
    );
}

/// A listener on [::1]:0 with IPV6_V6ONLY, which std cannot set before bind.
fn v6only_listener() -> TcpListener {
    // SAFETY: a fresh socket owned at once; setsockopt, bind and listen get values of the
    // sizes they are told.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
        let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        addr.sin6_addr.s6_addr[15] = 1; // ::1
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind [::1]:0: {}", io::Error::last_os_error());
        assert_eq!(libc::listen(fd.as_raw_fd(), 16), 0);
        TcpListener::from(fd)
    }
}
