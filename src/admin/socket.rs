//! Creating the admin socket's file: before privileges drop (so that it may live in a
//! directory only root writes to, such as /run/flyproxy), mode 0660 from the start, owned by
//! the user and group the proxy runs as, so that the group is who may steer it. A socket file
//! left by a process that is gone is replaced; one a live process answers on is not (two
//! proxies must not fight over one path), except by the process an upgrade started, whose
//! parent is the one answering and is about to leave.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the admin socket could not be created.
#[derive(Debug)]
pub enum SocketError {
    /// A live process answers on the path already.
    InUse(PathBuf),
    /// Something other than a socket is at the path: it is left alone.
    NotASocket(PathBuf),
    /// Removing a stale socket, binding, or setting its mode or owner failed.
    Io(PathBuf, &'static str, io::Error),
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketError::InUse(p) => write!(
                f,
                "{}: another process answers on this socket (is another flyproxy running with \
                 the same --admin-socket?)",
                p.display()
            ),
            SocketError::NotASocket(p) => write!(
                f,
                "{}: exists and is not a socket; remove it or give another path",
                p.display()
            ),
            SocketError::Io(p, what, e) => write!(f, "{}: cannot {what}: {e}", p.display()),
        }
    }
}

impl std::error::Error for SocketError {}

/// Create the socket at `path`, owned by `owner` (uid, gid) if given, mode 0660. `replace_live`:
/// this process was started by an upgrade, and the process answering on the path is its parent.
pub fn bind(
    path: &Path,
    owner: Option<(u32, u32)>,
    replace_live: bool,
) -> Result<UnixListener, SocketError> {
    let err = |what| move |e| SocketError::Io(path.to_owned(), what, e);
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_owned()))
        }
        Ok(_) => {
            if !replace_live && UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_owned()));
            }
            let what = if replace_live {
                "take the path over from the old process (its directory must be writable by \
                 the user flyproxy runs as, as systemd's RuntimeDirectory= makes it)"
            } else {
                "remove the stale socket"
            };
            std::fs::remove_file(path).map_err(err(what))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("look at the path")(e)),
    }
    // Created 0600 at most (the umask is the process's, and nothing else creates files at
    // this point of start-up), so that nobody can connect before the mode and owner are set.
    // SAFETY: umask cannot fail; it is restored at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(err("bind"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(err("give the socket to the --user and --group"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(err("set the socket's mode to 0660"))?;
    listener
        .set_nonblocking(true)
        .map_err(err("make the socket non-blocking"))?;
    Ok(listener)
}
