//! The `--pid-file`: written so that it can never be used to overwrite someone else's file, and
//! read back by `flyproxy upgrade` so that it can never be used to signal someone else's process.
//!
//! Writing: the pid goes to a fresh file created with `O_CREAT|O_EXCL|O_NOFOLLOW` beside the
//! target, which is then renamed over it. `rename` replaces a symlink planted at the path
//! instead of following it, and `O_EXCL|O_NOFOLLOW` make sure the temporary file is ours and
//! new. A directory that anyone may write into without the sticky bit is refused: anyone there
//! could replace the file between our write and a reader's read.
//!
//! Reading (`flyproxy upgrade`): the pid must name a running flyproxy (its `comm` or executable
//! says so) run by the same user as the caller, so that a pid file written by someone else
//! cannot turn `upgrade` into "send SIGUSR2 to any process".

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why the pid file could not be written.
#[derive(Debug)]
pub enum PidFileError {
    /// The directory is writable by others and not sticky: anyone could swap the file.
    UnsafeDir { dir: PathBuf, mode: u32 },
    /// A file system call failed; `what` says which step.
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

impl fmt::Display for PidFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PidFileError::UnsafeDir { dir, mode } => write!(
                f,
                "refusing to write in {}: the directory is writable by others without the sticky bit (mode {:o}); use a directory only the proxy's user may write, such as /run/flyproxy",
                dir.display(),
                mode & 0o7777
            ),
            PidFileError::Io { what, path, error } => {
                write!(f, "cannot {what} {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for PidFileError {}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PidFileError {
    let path = path.to_owned();
    move |error| PidFileError::Io { what, path, error }
}

/// The directory `path` is written in, refused if anyone may write into it without the sticky
/// bit. Checked at start, before anything is set up, and again at each write.
pub fn check_dir(path: &Path) -> Result<PathBuf, PidFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let meta = fs::metadata(&dir).map_err(io_error("look at the directory", &dir))?;
    let mode = meta.mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(PidFileError::UnsafeDir { dir, mode });
    }
    Ok(dir)
}

/// Write `pid` to `path` through a temporary file in the same directory renamed over it.
pub fn write(path: &Path, pid: u32) -> Result<(), PidFileError> {
    let dir = check_dir(path)?;
    let io = io_error;
    let name = path.file_name().map_or_else(
        || "flyproxy.pid".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    // A random suffix, so that a name planted in advance (in a sticky shared directory) only
    // makes one attempt fail.
    let mut last = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        let mut file = match created {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            // A directory we may not write in (`/run` once we run as --user): rewrite the
            // file in place if it is ours, as start-up leaves it for the user it switches to.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return rewrite_ours(path, pid).map_err(|_| io("create a file in", &dir)(e))
            }
            Err(e) => return Err(io("create a file in", &dir)(e)),
        };
        let written = file
            .write_all(format!("{pid}\n").as_bytes())
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io("write", path)(e));
        }
        return Ok(());
    }
    Err(io("create a file in", &dir)(last.unwrap_or_else(|| {
        io::Error::from(io::ErrorKind::AlreadyExists)
    })))
}

/// Rewrite `path` in place with `pid`, if it is a regular file of one link owned by us. Used
/// only in a directory we cannot write in: there nobody but its owner (root) can swap the
/// file, `O_NOFOLLOW` refuses a symlink, and the owner and link count checks refuse a file
/// that is someone else's or a hard link to one of ours elsewhere.
fn rewrite_ours(path: &Path, pid: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != euid || meta.nlink() != 1 {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    file.set_len(0)?;
    file.write_all(format!("{pid}\n").as_bytes())
}

/// Give the pid file to the user the proxy is about to switch to, so that the process an
/// upgrade starts (as that user) can rewrite it in place in a directory only root may write
/// (see `rewrite_ours`). Not following a symlink: `write` just put a regular file there.
pub fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), PidFileError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(io_error("give to the --user", path))
}

/// Remove `path` if it still names `pid` (after an upgrade it names the new process). Read
/// without following a symlink: a link planted there is not ours and is left alone.
pub fn remove_if_ours(path: &Path, pid: u32) {
    if read_nofollow(path).is_ok_and(|c| c == format!("{pid}\n")) {
        let _ = fs::remove_file(path);
    }
}

fn read_nofollow(path: &Path) -> io::Result<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(&mut file, 64), &mut text)?;
    Ok(text)
}

/// The pid in `path`, checked to be a flyproxy process of the calling user: what `flyproxy
/// upgrade` may signal. The error says what is wrong, for the user to read.
pub fn read_checked(path: &Path) -> Result<i32, String> {
    let text = read_nofollow(path).map_err(|e| format!("cannot read: {e}"))?;
    let pid =
        parse_pid(&text).ok_or_else(|| format!("does not hold a pid (found {:?})", text.trim()))?;
    check_process(pid)?;
    Ok(pid)
}

/// A pid as a pid file holds it: decimal digits, above 0, an optional line end.
pub fn parse_pid(text: &str) -> Option<i32> {
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i32>().ok().filter(|p| *p > 0)
}

/// `pid` is running, is flyproxy, and runs as the calling user (real uid).
pub fn check_process(pid: i32) -> Result<(), String> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status =
        fs::read_to_string(proc.join("status")).map_err(|_| format!("pid {pid} is not running"))?;
    let comm = fs::read_to_string(proc.join("comm")).unwrap_or_default();
    let comm = comm.trim_end_matches('\n');
    let exe_name = |p: &Path| {
        p.file_name().map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
    };
    let theirs = fs::read_link(proc.join("exe")).ok();
    let ours = std::env::current_exe().ok();
    let same_exe = match (&theirs, &ours) {
        (Some(t), Some(o)) => exe_name(t).is_some() && exe_name(t) == exe_name(o),
        _ => false,
    };
    if comm != "flyproxy" && !same_exe {
        return Err(format!(
            "pid {pid} is not flyproxy (it runs {:?}); refusing to signal it",
            theirs.map_or_else(|| comm.to_owned(), |t| t.display().to_string())
        ));
    }
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse::<u32>().ok())
        .ok_or_else(|| format!("cannot tell who runs pid {pid}"))?;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if uid != me {
        return Err(format!(
            "pid {pid} runs as uid {uid}, not as the caller (uid {me}); refusing to signal it (run flyproxy upgrade as the proxy's user)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids() {
        assert_eq!(parse_pid("123\n"), Some(123));
        assert_eq!(parse_pid("123"), Some(123));
        for bad in [
            "",
            "\n",
            "0\n",
            "-1\n",
            " 12\n",
            "12 \n",
            "1\n2\n",
            "99999999999",
        ] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_flyproxy_is_signalled() {
        let mut sleep = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let err = check_process(sleep.id() as i32).unwrap_err();
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert!(err.contains("is not flyproxy"), "{err}");
        assert!(check_process(i32::MAX).unwrap_err().contains("not running"));
        // This very binary counts as flyproxy, and runs as us.
        check_process(std::process::id() as i32).unwrap();
    }
}
