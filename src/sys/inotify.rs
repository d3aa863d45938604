//! Watching one directory for files written, moved in, moved out or deleted, through inotify
//! (libc; no crate), read without blocking. What a caller cannot trust (the kernel's queue
//! overflowed, the directory itself went away or moved) comes back as `Events::Rescan`: the
//! caller then looks at every file instead.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An inotify watch on one directory.
pub struct DirWatch {
    fd: OwnedFd,
}

/// What changed since the last read.
#[derive(Debug, PartialEq, Eq)]
pub enum Events {
    /// The names of the files written, created, moved in or out, or deleted (each once).
    Names(BTreeSet<String>),
    /// Events were lost: look at every file.
    Rescan,
}

/// What is watched: a file closed after writing, and every way a name comes or goes.
const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_CREATE
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

impl DirWatch {
    /// Watch `dir`. An error (no inotify, out of watches: `fs.inotify.max_user_watches` or
    /// `max_user_instances`) leaves the caller to rescan instead.
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        // SAFETY: inotify_init1 has no preconditions; a negative result is an error.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"))?;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Every event queued since the last call, without blocking.
    pub fn read(&mut self) -> Events {
        let mut names = BTreeSet::new();
        // Aligned for `inotify_event`, and large enough for several events at a time.
        let mut buf = vec![0u64; 8192];
        loop {
            let bytes = buf.len() * 8;
            // SAFETY: reading into a buffer we own, of `bytes` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Events::Names(names),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Events::Rescan,
                }
            }
            if n == 0 {
                return Events::Names(names);
            }
            // SAFETY: the kernel wrote `n` bytes of whole events into `buf`.
            let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let head = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + head <= data.len() {
                // SAFETY: a whole event header lies at `at` (the kernel writes whole events);
                // read unaligned, as names pad the following headers only to 4 bytes.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(data[at..].as_ptr().cast()) };
                let name_end = (at + head + ev.len as usize).min(data.len());
                let raw = &data[at + head..name_end];
                at = name_end;
                if ev.mask
                    & (libc::IN_Q_OVERFLOW
                        | libc::IN_DELETE_SELF
                        | libc::IN_MOVE_SELF
                        | libc::IN_IGNORED)
                    != 0
                {
                    return Events::Rescan;
                }
                let name = raw.split(|&b| b == 0).next().unwrap_or_default();
                if let Ok(name) = std::str::from_utf8(name) {
                    if !name.is_empty() {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_files_written_moved_and_removed() {
        let dir = std::env::temp_dir().join(format!("flyproxy-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatch::new(&dir).unwrap();
        assert_eq!(w.read(), Events::Names(BTreeSet::new()));
        std::fs::write(dir.join("a.json"), "{}").unwrap();
        std::fs::write(dir.join(".tmp"), "{}").unwrap();
        std::fs::rename(dir.join(".tmp"), dir.join("b.json")).unwrap();
        std::fs::remove_file(dir.join("a.json")).unwrap();
        let Events::Names(names) = w.read() else {
            panic!("a rescan")
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(names, [".tmp", "a.json", "b.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(w.read(), Events::Rescan, "the directory itself went");
    }
}
