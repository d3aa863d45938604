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
use std::fmt;
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

/// The descriptors the environment says were handed over, before any of them is looked at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HandedFds {
    pub ready: Option<RawFd>,
    /// Each listener with the address the old process said it is bound to.
    pub listeners: Vec<(SocketAddr, RawFd)>,
    pub metrics: Option<RawFd>,
}

/// A hand-over variable that cannot be used: start-up stops with this (exit 1), closing nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvError {
    pub var: &'static str,
    pub value: String,
    pub why: String,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?}: {} (this variable is set only by a flyproxy upgrade; unset it)",
            self.var, self.value, self.why
        )
    }
}

impl std::error::Error for EnvError {}

/// Parse the hand-over variables' values (None: unset). Pure, so that fuzzing reaches it: a
/// descriptor is a decimal number above 2 (0-2 are stdin, stdout and stderr, never handed
/// over), no descriptor appears twice, and `FLYPROXY_LISTEN_FDS` is `addr=fd,...`.
pub fn parse_env(
    ready: Option<&str>,
    listen: Option<&str>,
    metrics: Option<&str>,
) -> Result<HandedFds, EnvError> {
    let mut seen = Vec::new();
    let mut fd_of = |var: &'static str, whole: &str, v: &str| -> Result<RawFd, EnvError> {
        let err = |why: String| EnvError {
            var,
            value: whole.to_owned(),
            why,
        };
        let fd = parse_fd(v).ok_or_else(|| {
            err(format!(
                "{v:?} is not a descriptor number above 2 (0-2 are stdin, stdout and stderr)"
            ))
        })?;
        if seen.contains(&fd) {
            return Err(err(format!("descriptor {fd} is handed over twice")));
        }
        seen.push(fd);
        Ok(fd)
    };
    let mut out = HandedFds::default();
    if let Some(v) = ready {
        out.ready = Some(fd_of(READY_FD, v, v)?);
    }
    if let Some(v) = metrics {
        out.metrics = Some(fd_of(METRICS_FD, v, v)?);
    }
    if let Some(v) = listen {
        for item in v.split(',').filter(|_| !v.is_empty()) {
            let (addr, fd) = item.rsplit_once('=').ok_or_else(|| EnvError {
                var: LISTEN_FDS,
                value: v.to_owned(),
                why: format!("{item:?} is not address=descriptor"),
            })?;
            let addr = addr.parse::<SocketAddr>().map_err(|_| EnvError {
                var: LISTEN_FDS,
                value: v.to_owned(),
                why: format!("{addr:?} is not a socket address"),
            })?;
            out.listeners.push((addr, fd_of(LISTEN_FDS, v, fd)?));
        }
    }
    Ok(out)
}

/// A descriptor number as the hand-over writes it: decimal digits, above 2.
fn parse_fd(v: &str) -> Option<RawFd> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<RawFd>().ok().filter(|fd| *fd > 2)
}

impl Inherited {
    /// Take what the environment hands over (and clear it, so it is not handed on by
    /// accident). Every descriptor is checked before any is taken: each listener must be a
    /// listening TCP socket bound to the address it is listed with (`getsockname`), the
    /// metrics one a listening TCP socket, the ready one a pipe or a unix socket. Anything else
    /// is an error, and no descriptor is closed: none of them is known to be ours.
    pub fn from_env() -> Result<Inherited, EnvError> {
        let var = |name: &'static str| -> Result<Option<String>, EnvError> {
            match std::env::var_os(name) {
                None => Ok(None),
                Some(v) => v.into_string().map(Some).map_err(|v| EnvError {
                    var: name,
                    value: v.to_string_lossy().into_owned(),
                    why: "not text".into(),
                }),
            }
        };
        let (ready, listen, metrics) = (var(READY_FD)?, var(LISTEN_FDS)?, var(METRICS_FD)?);
        // Called at start-up on the main thread, before any other thread exists.
        std::env::remove_var(LISTEN_FDS);
        std::env::remove_var(READY_FD);
        std::env::remove_var(METRICS_FD);
        let fds = parse_env(ready.as_deref(), listen.as_deref(), metrics.as_deref())?;
        let bad = |var, fd: RawFd, why: String| EnvError {
            var,
            value: fd.to_string(),
            why: format!("descriptor {fd} {why}"),
        };
        if let Some(fd) = fds.ready {
            check_ready(fd).map_err(|why| bad(READY_FD, fd, why))?;
        }
        if let Some(fd) = fds.metrics {
            check_listener(fd).map_err(|why| bad(METRICS_FD, fd, why))?;
        }
        for &(addr, fd) in &fds.listeners {
            let bound = check_listener(fd).map_err(|why| bad(LISTEN_FDS, fd, why))?;
            if crate::sys::net::canonical(bound) != crate::sys::net::canonical(addr) {
                return Err(bad(
                    LISTEN_FDS,
                    fd,
                    format!("is bound to {bound}, not to {addr} as listed"),
                ));
            }
        }
        if fds.ready.is_some() {
            name_after_argv0();
        }
        // Every one checked: take them.
        let mut inherited = Inherited::default();
        if let Some(fd) = fds.ready {
            set_cloexec(fd);
            // SAFETY: checked above to be an open pipe or socket that our parent created for
            // us; nothing else in this process knows its number.
            inherited.ready = Some(ReadyPipe(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        if let Some(fd) = fds.metrics {
            set_cloexec(fd);
            // SAFETY: as above, a listening TCP socket handed to us.
            inherited.metrics = Some(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        }
        for (addr, fd) in fds.listeners {
            set_cloexec(fd);
            // SAFETY: as above.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            inherited.listeners.insert(addr, listener);
        }
        Ok(inherited)
    }
}

/// Give the process the name of the binary again. A process started by an upgrade was executed
/// through `/proc/self/fd/N` (see `spawn`), and the kernel names a process after the last part
/// of the path executed: it would be called `N`, and `ps -C flyproxy`, `pgrep` or `killall`
/// would not find it. argv[0] is the path as given (`spawn` sets it), so its last part is
/// the name it had. fexecve(3) would not help: it executes `/dev/fd/N` (or `execveat` with an
/// empty path), which names the process `N` just the same; executing by path instead would
/// run whatever was renamed over it after `check_binary` looked.
///
/// Called on the main thread before any other starts: PR_SET_NAME names the calling thread,
/// and the main thread's name is the process's (`/proc/PID/comm`), which later threads inherit.
fn name_after_argv0() {
    use std::os::unix::ffi::OsStrExt;
    let Some(argv0) = std::env::args_os().next() else {
        return;
    };
    let Some(base) = std::path::Path::new(&argv0).file_name() else {
        return;
    };
    // The kernel keeps 15 bytes and a NUL; a name with a NUL in it cannot be given.
    let bytes: Vec<u8> = base.as_bytes().iter().copied().take(15).collect();
    let Ok(name) = std::ffi::CString::new(bytes) else {
        return;
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the pointer,
    // which `name` keeps alive for the call. A failure only leaves the old name.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// The mode bits of what `fd` is, or why it is not open.
fn fstat_mode(fd: RawFd) -> Result<libc::mode_t, String> {
    // SAFETY: all-zero is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct we pass; an unopened fd is EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("is not open ({})", io::Error::last_os_error()));
    }
    Ok(st.st_mode & libc::S_IFMT)
}

fn sockopt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// `fd` is a listening TCP socket (IPv4 or IPv6); its bound address.
fn check_listener(fd: RawFd) -> Result<SocketAddr, String> {
    if fstat_mode(fd)? != libc::S_IFSOCK {
        return Err("is not a socket".into());
    }
    let domain = sockopt(fd, libc::SO_DOMAIN);
    if !matches!(domain, Some(libc::AF_INET | libc::AF_INET6))
        || sockopt(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
    {
        return Err("is not a TCP socket".into());
    }
    if sockopt(fd, libc::SO_ACCEPTCONN) != Some(1) {
        return Err("is not a listening socket".into());
    }
    // Borrowed only to read its address; ManuallyDrop so the descriptor is not closed here.
    // SAFETY: fd is an open TCP socket (checked above).
    let l = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    l.local_addr().map_err(|e| format!("has no address ({e})"))
}

/// `fd` is a pipe or a unix socket: what a ready notice can be written to.
fn check_ready(fd: RawFd) -> Result<(), String> {
    match fstat_mode(fd)? {
        libc::S_IFIFO => Ok(()),
        libc::S_IFSOCK if sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX) => Ok(()),
        _ => Err("is not a pipe or a unix socket".into()),
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
    // Opened once and executed through that descriptor, so what runs is the very file that
    // was checked, whatever is renamed over the path meanwhile.
    let binary = std::fs::File::open(&exec.exe)?;
    check_binary(&exec.exe, &binary.metadata()?).map_err(io::Error::other)?;
    let mut cmd = Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
    // The new process records its path from argv[0] (see `Exec::current`): the path as given.
    cmd.arg0(&exec.exe)
        .args(&exec.args)
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
    drop(binary);
    // Our copy of the write end must go, so that the read end sees EOF if the child dies.
    drop(write);
    Ok(Upgrade {
        child,
        ready: mio::net::UnixStream::from_std(read),
    })
}

/// An upgrade executes the binary at our path with our privileges (root, or capabilities): only
/// one that nobody but root or our own user could have put there. Owned by root or by the
/// running user, and not writable by group or others.
pub fn check_binary(path: &std::path::Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, neither root nor this process's user (uid {me}): refusing to execute it",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}): refusing to execute it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor number; harmless if it is not open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}
