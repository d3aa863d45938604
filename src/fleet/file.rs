//! The follower's files, handled as the proxy handles its config: only regular files, read
//! without ever blocking (a FIFO planted at a path cannot stall the follower), never through a
//! symlink, never more than `MAX_FILE_BYTES`; replaced atomically so the proxy sees the old
//! file or the new one, never a mix, keeping the old file's mode and group.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::MAX_FILE_BYTES;

/// What kind of thing `meta` is, for an error message ("it is a FIFO, not a regular file").
fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "of an unknown kind"
    }
}

fn not_regular(meta: &fs::Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "it is {}, not a regular file (not followed, not replaced: remove it)",
            kind(meta)
        ),
    )
}

/// Read `path` if it is a regular file: `Ok(None)` when nothing is there. Opened with
/// `O_NONBLOCK|O_NOFOLLOW|O_NOCTTY` (a FIFO, a terminal or a symlink at the path is refused
/// at once, never waited on or followed), checked with `fstat` once open (what is read is what
/// was checked) and read up to `MAX_FILE_BYTES`.
pub fn read_regular(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // ELOOP: O_NOFOLLOW met a symlink; say what it is rather than "too many levels".
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_regular(&fs::symlink_metadata(path)?))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_regular(&meta));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the cap tells a file that grew since the fstat from one that did not.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Replace `path` with `bytes`, atomically: a new file in the same directory (so the rename
/// cannot cross file systems), every write checked, synced, then renamed over `path`, and the
/// directory synced so the rename survives a crash. A regular file already at `path` gives the
/// new one its mode and group (an operator who made the file group-readable for the proxy's
/// user keeps it so); anything else there (a FIFO, a symlink, a directory) is refused and left
/// alone. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut staged = Staged::write(path, bytes)?;
    let synced = match &staged.file {
        Some(file) => file.sync_all(),
        None => Ok(()),
    };
    if let Err(e) = synced {
        return Err(staged.abandon(e));
    }
    staged.file = None;
    staged.rename()?;
    sync_dir(parent(path))
}

/// Replace `path` with `bytes` as `write_atomically` does, but without waiting for the disk:
/// for a report rewritten at every change (the status file), which a crash may lose but never
/// shows half written.
pub fn replace_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut staged = Staged::write(path, bytes)?;
    staged.file = None;
    staged.rename()
}

/// Replace every `(path, bytes)` of `files`, all in one directory `dir`, each atomically as
/// `write_atomically` does, but with fewer syncs than two per file. Up to `OWN_SYNCS` files (a
/// put, a small transaction) each new file is synced by itself; a larger batch (a listing, the
/// changes replayed after an outage) is synced with one `syncfs` of the file system. Then each
/// is renamed over its path and the directory synced once. (Two syncs per file made a cold
/// start of 20,000 apps take 107 s on ext4, nearly all of it waiting for the journal; but
/// `syncfs` writes back whatever else is dirty on the file system too, logs and other
/// programs' files, so a one-app put would cost what the machine wrote lately, not what the
/// put wrote.) One result per file, in order; a file that fails leaves its path untouched and
/// the others go on.
pub fn write_all_atomically(dir: &Path, files: &[(PathBuf, Vec<u8>)]) -> Vec<io::Result<()>> {
    let own_syncs = files.len() <= OWN_SYNCS;
    // A large batch's files are closed once written: it must not hold a descriptor per file.
    let mut staged: Vec<io::Result<Staged>> = files
        .iter()
        .map(|(path, bytes)| {
            Staged::write(path, bytes).and_then(|mut s| {
                let synced = match s.file.take() {
                    Some(file) if own_syncs => file.sync_all(),
                    _ => Ok(()),
                };
                match synced {
                    Ok(()) => Ok(s),
                    Err(e) => Err(s.abandon(e)),
                }
            })
        })
        .collect();
    if !own_syncs && staged.iter().any(|s| s.is_ok()) {
        if let Err(e) = syncfs(dir) {
            for s in &mut staged {
                if let Ok(st) = std::mem::replace(s, Err(io::Error::other("abandoned"))) {
                    *s = Err(st.abandon(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
    let results: Vec<io::Result<()>> = staged
        .into_iter()
        .map(|s| s.and_then(Staged::rename))
        .collect();
    if results.iter().any(|r| r.is_ok()) {
        if let Err(e) = sync_dir(dir) {
            crate::warn!("cannot sync {}: {e}", dir.display());
        }
    }
    results
}

/// Files of a batch synced one by one (`fsync` each) rather than with the whole file system.
const OWN_SYNCS: usize = 16;

/// Sync the whole file system `dir` is on: every file written since reaches the disk.
fn syncfs(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new file written beside `path`, not yet in its place.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    /// Open until synced (or closed unsynced, for a batch synced at once).
    file: Option<File>,
}

impl Staged {
    /// Write `bytes` to a temporary file beside `path`, with the mode and group of the regular
    /// file at `path` if there is one (anything else there is refused).
    fn write(path: &Path, bytes: &[u8]) -> io::Result<Staged> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
        let old = match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => Some(m),
            Ok(m) => return Err(not_regular(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".etcd-sync.{}", std::process::id()));
        let tmp = parent(path).join(tmp_name);
        // A leftover from an earlier process with the same pid (a crash mid-write) is ours to
        // clear.
        let _ = fs::remove_file(&tmp);
        // 0644 for a new file: the proxy's unit runs as another (dynamic) user and must read it.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let filled = (|| {
            if let Some(old) = &old {
                keep_group(&file, old.gid())?;
                // After the chown, which may clear set-id bits.
                file.set_permissions(fs::Permissions::from_mode(old.mode() & 0o7777))?;
            }
            file.write_all(bytes)
        })();
        let staged = Staged {
            tmp,
            path: path.to_path_buf(),
            file: Some(file),
        };
        match filled {
            Ok(()) => Ok(staged),
            Err(e) => Err(staged.abandon(e)),
        }
    }

    /// Put the new file in its place.
    fn rename(self) -> io::Result<()> {
        match fs::rename(&self.tmp, &self.path) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abandon(e)),
        }
    }

    /// Give up: the temporary file removed, `e` passed on.
    fn abandon(self, e: io::Error) -> io::Error {
        let _ = fs::remove_file(&self.tmp);
        e
    }
}

/// Give `file` the group `gid` unless it has it already (the usual case: then no privilege is
/// needed). Failing, the write fails: a file the proxy's user could read must not become one
/// it cannot.
fn keep_group(file: &File, gid: u32) -> io::Result<()> {
    if file.metadata()?.gid() == gid {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, None, Some(gid)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot give the new file the old one's group {gid}: {e}"),
        )
    })
}

/// Remove `path` if it is a regular file (`Ok(false)` when nothing was there), and sync its
/// directory so the removal survives a crash.
pub fn remove_regular(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => return Err(not_regular(&m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    fs::remove_file(path)?;
    sync_dir(parent(path))?;
    Ok(true)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("etcd-sync-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_write_replaces_whole_and_leaves_nothing_behind() {
        let dir = temp("write");
        let path = dir.join("config.json");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&path, b"new\0bytes\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new\0bytes\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.json"]);
        // A directory that cannot be written: an error, and the old file stays.
        let missing = dir.join("no-such-dir").join("config.json");
        assert!(write_atomically(&missing, b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_at_once_each_replaced_or_refused_alone() {
        let dir = temp("many");
        fs::write(dir.join("a.json"), b"old a").unwrap();
        fs::set_permissions(dir.join("a.json"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(dir.join("d.json")).unwrap();
        let files = vec![
            (dir.join("a.json"), b"new a".to_vec()),
            (dir.join("b.json"), b"new b".to_vec()),
            (dir.join("d.json"), b"refused".to_vec()),
        ];
        let results = write_all_atomically(&dir, &files);
        assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("a directory"));
        assert_eq!(fs::read(dir.join("a.json")).unwrap(), b"new a");
        assert_eq!(
            fs::metadata(dir.join("a.json")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(fs::read(dir.join("b.json")).unwrap(), b"new b");
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "b.json", "d.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_large_batch_synced_at_once_is_replaced_as_a_small_one() {
        // Past OWN_SYNCS: one syncfs for all, rather than a sync per file.
        let dir = temp("large");
        fs::create_dir(dir.join("d.json")).unwrap();
        let mut files: Vec<(PathBuf, Vec<u8>)> = (0..OWN_SYNCS + 4)
            .map(|i| {
                (
                    dir.join(format!("{i}.json")),
                    format!("app {i}").into_bytes(),
                )
            })
            .collect();
        files.push((dir.join("d.json"), b"refused".to_vec()));
        let results = write_all_atomically(&dir, &files);
        let (last, written) = results.split_last().unwrap();
        assert!(written.iter().all(|r| r.is_ok()), "{results:?}");
        assert!(last.is_err());
        for (path, bytes) in &files[..files.len() - 1] {
            assert_eq!(&fs::read(path).unwrap(), bytes);
        }
        let count = fs::read_dir(&dir).unwrap().count();
        assert_eq!(count, OWN_SYNCS + 5, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fifos_and_symlinks_are_refused_without_waiting() {
        let dir = temp("fifo");
        let fifo = dir.join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("it is a FIFO, not a regular file"), "{e}");
        let e = write_atomically(&fifo, b"x").unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(remove_regular(&fifo).is_err());
        let target = dir.join("target");
        fs::write(&target, b"secret").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read_regular(&link).unwrap_err().to_string();
        assert!(e.contains("a symbolic link"), "{e}");
        assert!(write_atomically(&link, b"x").is_err());
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        assert_eq!(read_regular(&dir.join("none")).unwrap(), None);
        assert!(!remove_regular(&dir.join("none")).unwrap());
        assert!(remove_regular(&target).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
