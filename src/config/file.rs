//! Reading the config file: never blocking, only a regular file, never more than
//! `MAX_FILE_BYTES`.

use std::ffi::{CStr, CString};
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::limits::MAX_FILE_BYTES;
use crate::config::problem::Problem;

/// How every config file is opened: `O_NONBLOCK|O_NOCTTY` (a FIFO or a terminal at the path
/// cannot stall the caller, which is the event loop on reload), close-on-exec.
const FLAGS: libc::c_int = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Read the config file at `path` without ever blocking: opened with `O_NONBLOCK|O_NOCTTY` (a
/// FIFO or a terminal at the path cannot stall the caller, which is the event loop on reload),
/// checked with `fstat` to be a regular file once open (so what is read is what was checked),
/// and read up to `MAX_FILE_BYTES`.
pub fn read_file(path: &Path) -> Result<Vec<u8>, Problem> {
    read_file_meta(path).map(|(bytes, _)| bytes)
}

/// `read_file`, with the file's metadata as `fstat` gave it on the descriptor read (a
/// directory of 200,000 files needs no second `stat` of each to know what it read).
pub fn read_file_meta(path: &Path) -> Result<(Vec<u8>, Metadata), Problem> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |noatime| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(FLAGS | noatime)
            .open(path)
    };
    let file = without_atime(open).map_err(|e| Problem::Io(e.to_string()))?;
    read_open(file)
}

/// A directory opened once, its files read by name relative to it (`openat`): at start-up
/// every file of a 200,000-file directory is read, and a path walk from `/` for each was a
/// sizeable part of opening them. A file is read as `read_file` reads one: the same flags,
/// checks and bound; symbolic links are followed, as a path's are.
pub struct ConfigDir {
    fd: OwnedFd,
}

impl ConfigDir {
    /// Open the directory at `path` (a symbolic link to one is followed).
    pub fn open(path: &Path) -> io::Result<ConfigDir> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"))?;
        // SAFETY: a NUL-terminated path and flags; a negative result is an error.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and own alone.
        Ok(ConfigDir {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// `read_file_meta` of the file `name` in the directory (a name, not a path).
    pub fn read_file_meta(&self, name: &str) -> Result<(Vec<u8>, Metadata), Problem> {
        // NUL-terminated on the stack for any file name (255 bytes at most): one allocation
        // less for each of 200,000 files at start. A longer name gets a CString (and the
        // kernel's ENAMETOOLONG).
        let mut inline = [0u8; 256];
        let owned;
        let name: &CStr = match inline.get_mut(..=name.len()) {
            Some(buf) if !name.as_bytes().contains(&0) => {
                buf[..name.len()].copy_from_slice(name.as_bytes());
                CStr::from_bytes_with_nul(buf)
                    .map_err(|_| Problem::Io("NUL in the file name".into()))?
            }
            _ => {
                owned =
                    CString::new(name).map_err(|_| Problem::Io("NUL in the file name".into()))?;
                &owned
            }
        };
        let open = |noatime| {
            // SAFETY: a directory descriptor we hold open, a NUL-terminated name, flags; a
            // negative result is an error.
            let raw = unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), FLAGS | noatime) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a descriptor we just opened and own alone.
            Ok(unsafe { File::from_raw_fd(raw) })
        };
        let file = without_atime(open).map_err(|e| Problem::Io(e.to_string()))?;
        read_open(file)
    }
}

/// `open(O_NOATIME)`, else `open(0)`. O_NOATIME: reading a file just written would otherwise
/// dirty its inode (the access time), a journal write per file of a config directory; refused
/// (EPERM) unless the file is ours or we may act as its owner, then opened as before.
fn without_atime(open: impl Fn(libc::c_int) -> io::Result<File>) -> io::Result<File> {
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
}

/// The contents of `file`, just opened, if it is a regular file within the bound, with its
/// metadata as `fstat` gave it (so what is read is what was checked).
fn read_open(mut file: File) -> Result<(Vec<u8>, Metadata), Problem> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata().map_err(|e| Problem::Io(e.to_string()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(Problem::NotAFile(if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "of an unknown kind"
        }));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Problem::TooLarge);
    }
    // One read of the size `fstat` gave, and a byte more: a regular file's read that returns
    // less than it was asked for has reached the end, so a file as long as it was is read
    // in one call (read_to_end needed a second, to see the end). One byte past the cap tells
    // a file that grew since the fstat from one that did not.
    let want = meta.len() as usize + 1;
    let mut bytes = vec![0u8; want];
    let mut got = 0;
    loop {
        match file.read(&mut bytes[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Problem::Io(e.to_string())),
        }
        if got == meta.len() as usize {
            // As long as `fstat` said, with room left over: the end.
            break;
        }
        if got == bytes.len() {
            // It grew since the fstat: on, up to the cap.
            if got as u64 > MAX_FILE_BYTES {
                return Err(Problem::TooLarge);
            }
            let more = (bytes.len() * 2).min(MAX_FILE_BYTES as usize + 1);
            bytes.resize(more, 0);
        }
    }
    bytes.truncate(got);
    Ok((bytes, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary directory.
    fn temp(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "flyproxy-config-file-{what}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Read by name in an opened directory, a file is what `read_file` makes of its path: the
    /// bytes of a regular file (a symbolic link to one followed, an empty one empty), every
    /// other kind refused at once without a read (a FIFO would block, `/dev/zero` never
    /// end), past the cap refused, a missing one an error.
    #[test]
    fn a_file_read_by_name_is_read_as_by_path() {
        let dir = temp("by-name");
        std::fs::write(dir.join("a.json"), b"{\"Apps\": []}").unwrap();
        std::fs::write(dir.join("empty.json"), b"").unwrap();
        std::os::unix::fs::symlink(dir.join("a.json"), dir.join("link.json")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero.json")).unwrap();
        std::fs::create_dir(dir.join("d.json")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo.json").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        // Sparse: one byte past the cap costs no disk.
        File::create(dir.join("big.json"))
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .unwrap();
        let at = ConfigDir::open(&dir).unwrap();
        for name in [
            "a.json",
            "empty.json",
            "link.json",
            "zero.json",
            "d.json",
            "fifo.json",
            "big.json",
            "none.json",
        ] {
            let by_name = at.read_file_meta(name).map(|(bytes, _)| bytes);
            let by_path = read_file(&dir.join(name));
            assert_eq!(
                format!("{by_name:?}"),
                format!("{by_path:?}"),
                "{name} read by name and by path"
            );
        }
        assert_eq!(at.read_file_meta("a.json").unwrap().0, b"{\"Apps\": []}");
        assert!(at.read_file_meta("empty.json").unwrap().0.is_empty());
        assert!(matches!(
            at.read_file_meta("fifo.json"),
            Err(Problem::NotAFile("a FIFO"))
        ));
        assert!(matches!(
            at.read_file_meta("zero.json"),
            Err(Problem::NotAFile("a character device"))
        ));
        assert!(matches!(
            at.read_file_meta("big.json"),
            Err(Problem::TooLarge)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
