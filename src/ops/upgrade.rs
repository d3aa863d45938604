//! Upgrading the running binary without refusing a connection.
//!
//! On SIGUSR2 the running process starts the binary at the path it was started from, with the
//! same arguments, handing it its listening sockets (descriptors kept open across exec, listed
//! in `FLYPROXY_LISTEN_FDS` as `addr=fd,...`, as systemd socket activation does) and the write
//! end of a pipe (`FLYPROXY_READY_FD`). The new process validates its config, adopts the
//! inherited listeners (binding only what it lacks), and writes one byte to the pipe once it
//! serves. Only then does the old process stop accepting and drain; the listening sockets were
//! never closed, so nothing the kernel queued on them is lost: whichever process accepts next
//! takes it. If the pipe closes without that byte (the new process failed), the old process
//! carries on as if nothing happened.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use mio::net::TcpListener;

const LISTEN_FDS: &str = "FLYPROXY_LISTEN_FDS";
const READY_FD: &str = "FLYPROXY_READY_FD";
const METRICS_FD: &str = "FLYPROXY_METRICS_FD";

/// How this process was started: what to exec for an upgrade. Recorded at start, because
/// `/proc/self/exe` says "(deleted)" once a package upgrade has replaced the file.
#[derive(Debug, Clone)]
pub struct Exec {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Exec {
    /// The path we were started by, as given (made absolute, symlinks kept, so that an
    /// upgrade runs what a symlink such as /usr/bin/flyproxy names by then), else the binary.
    pub fn current() -> io::Result<Exec> {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from);
        let exe = match argv0 {
            Some(p) if p.is_absolute() => p,
            Some(p) if p.components().count() > 1 => std::env::current_dir()?.join(p),
            Some(p) => search_path(&p).map_or_else(std::env::current_exe, Ok)?,
            None => std::env::current_exe()?,
        };
        Ok(Exec {
            exe,
            args: args.collect(),
        })
    }
}

/// Where the shell would have found a bare command name: the first executable in $PATH.
fn search_path(name: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .and_then(|p| {
            if p.is_absolute() {
                Some(p)
            } else {
                std::env::current_dir().ok().map(|d| d.join(p))
            }
        })
}

/// What a process started by an upgrade received from its parent.
#[derive(Default)]
pub struct Inherited {
    /// Listening sockets by the address they are bound to.
    pub listeners: HashMap<SocketAddr, TcpListener>,
    /// Written to once this process serves.
    pub ready: Option<ReadyPipe>,
    /// The --metrics listening socket.
    pub metrics: Option<std::net::TcpListener>,
}

/// The pipe on which a new process tells its parent that it serves.
pub struct ReadyPipe(OwnedFd);

impl ReadyPipe {
    /// Tell the parent we are serving: it stops accepting and drains.
    pub fn signal(self) {
        let mut f = std::fs::File::from(self.0);
        if let Err(e) = f.write_all(b"R") {
            crate::error!("upgrade: cannot tell the old process we are ready: {e}");
        }
    }
}

impl Inherited {
    /// Take what the environment hands over (and clear it, so it is not handed on by
    /// accident). Descriptors that are not listening TCP sockets are ignored and closed.
    pub fn from_env() -> Inherited {
        let mut inherited = Inherited::default();
        if let Some(v) = std::env::var_os(READY_FD) {
            if let Some(fd) = v.to_str().and_then(|s| s.parse::<RawFd>().ok()) {
                set_cloexec(fd);
                // SAFETY: our parent created this descriptor for us and nothing else in this
                // process knows its number.
                inherited.ready = Some(ReadyPipe(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if let Some(v) = std::env::var_os(LISTEN_FDS) {
            for item in v.to_string_lossy().split(',').filter(|s| !s.is_empty()) {
                let Some((addr, fd)) = item.rsplit_once('=') else {
                    continue;
                };
                let (Ok(addr), Ok(fd)) = (addr.parse::<SocketAddr>(), fd.parse::<RawFd>()) else {
                    continue;
                };
                set_cloexec(fd);
                // SAFETY: as above: handed to us, used by nothing else in this process.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                if is_listening(&listener) {
                    inherited.listeners.insert(addr, listener);
                }
            }
        }
        if let Some(fd) = std::env::var_os(METRICS_FD)
            .and_then(|v| v.to_str().and_then(|s| s.parse::<RawFd>().ok()))
        {
            set_cloexec(fd);
            // SAFETY: as above.
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            if is_listening(&l) {
                inherited.metrics = Some(l);
            }
        }
        // Called at start-up on the main thread, before any other thread exists.
        std::env::remove_var(LISTEN_FDS);
        std::env::remove_var(READY_FD);
        std::env::remove_var(METRICS_FD);
        inherited
    }
}

/// The new process of an upgrade in progress, and the pipe it reports readiness on.
pub struct Upgrade {
    pub child: Child,
    pub ready: mio::net::UnixStream,
}

/// Start the new process with `listeners` (address and descriptor) handed over.
/// Start the new process with `listeners` (address and descriptor) and the metrics socket
/// handed over.
pub fn spawn(
    exec: &Exec,
    listeners: &[(SocketAddr, RawFd)],
    metrics: Option<(SocketAddr, RawFd)>,
) -> io::Result<Upgrade> {
    let (read, write) = std::os::unix::net::UnixStream::pair()?;
    read.set_nonblocking(true)?;
    let write_fd = write.as_raw_fd();
    let list: Vec<String> = listeners
        .iter()
        .map(|(a, fd)| format!("{a}={fd}"))
        .collect();
    let mut fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| *fd).collect();
    fds.push(write_fd);
    let mut cmd = Command::new(&exec.exe);
    cmd.args(&exec.args)
        .env(LISTEN_FDS, list.join(","))
        .env(READY_FD, write_fd.to_string());
    if let Some((_, fd)) = metrics {
        fds.push(fd);
        cmd.env(METRICS_FD, fd.to_string());
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe; it clears close-on-exec on exactly the descriptors handed over.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Our copy of the write end must go, so that the read end sees EOF if the child dies.
    drop(write);
    Ok(Upgrade {
        child,
        ready: mio::net::UnixStream::from_std(read),
    })
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor number; harmless if it is not open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn is_listening(l: &impl AsRawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the right size.
    let rc = unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && v == 1
}
