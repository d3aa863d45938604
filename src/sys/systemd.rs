//! Telling systemd how the service is doing (`sd_notify`), written by hand: one datagram to a
//! unix socket, so there is no need to link libsystemd.
//!
//! Why: the shipped units (`dist/flyproxy.service`, `dist/flyproxy-bpf.service`) are
//! `Type=notify`. systemd then counts the service as started only when it receives `READY=1`,
//! which the proxy sends once its listeners are up (simple mode: every port bound; bpf mode:
//! the sk_lookup program attached and the ports map written). So `systemctl start` returns, and
//! units ordered `After=flyproxy.service` start, only when connections are actually accepted,
//! and a config or port that prevents start-up fails `systemctl start` instead of being
//! reported as a running service that then exits. `STATUS=` lines show in `systemctl status`;
//! `STOPPING=1` tells systemd that a drain has begun; after an upgrade the old process names
//! the new one with `MAINPID=`.
//!
//! The protocol (see sd_notify(3)): systemd puts the path of a datagram socket in
//! `NOTIFY_SOCKET`, either a file system path or, when it starts with `@`, a name in the
//! abstract namespace; the service sends newline-separated `KEY=VALUE` assignments to it. Outside
//! systemd the variable is unset and nothing is sent.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A datagram to a listening notify socket is queued at once; this only bounds a stuck one.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Send `state` (for example `"READY=1\nSTATUS=serving 3 apps"`) to the service manager as one
/// datagram. `Ok(false)` when `NOTIFY_SOCKET` is unset or empty (not started by systemd, or a
/// unit that is not `Type=notify`), `Ok(true)` when it was sent.
///
/// An error means systemd asked for notifications and did not get this one; with `READY=1`
/// that leaves `systemctl start` waiting until its timeout, so the caller should log it.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(socket.as_bytes(), state).map(|()| true),
        _ => Ok(false),
    }
}

/// Send `state` to the notify socket named `path` (a `NOTIFY_SOCKET` value).
fn notify_to(path: &[u8], state: &str) -> io::Result<()> {
    let addr = match path.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if path.starts_with(b"/") => {
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?
        }
        // systemd 254+ may also hand out `vsock:` addresses, which only VMs use.
        None => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "NOTIFY_SOCKET={}: only a path or an @abstract name is supported",
                    String::from_utf8_lossy(path)
                ),
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = socket.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flyproxy-notify-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unset_sends_nothing() {
        // The test process is not a Type=notify service (nextest and cargo leave the variable
        // alone; systemd sets it only for the service's own process).
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notify("READY=1").unwrap());
        }
    }

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = temp_dir("path");
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let state = "READY=1\nSTATUS=serving 1 app\nMAINPID=123";
        notify_to(path.as_os_str().as_bytes(), state).unwrap();
        assert_eq!(receive(&socket), state);
        drop(socket);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_name() {
        let name = format!("flyproxy-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(format!("@{name}").as_bytes(), "STOPPING=1").unwrap();
        assert_eq!(receive(&socket), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_or_odd_address_is_an_error() {
        let dir = temp_dir("missing");
        let missing = dir.join("nobody-listens");
        let err = notify_to(missing.as_os_str().as_bytes(), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let err = notify_to(b"vsock:2:1234", "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
