//! Reading the config file: never blocking, only a regular file, never more than
//! `MAX_FILE_BYTES`.

use std::path::Path;

use crate::config::limits::MAX_FILE_BYTES;
use crate::config::problem::Problem;

/// Read the config file at `path` without ever blocking: opened with `O_NONBLOCK|O_NOCTTY` (a
/// FIFO or a terminal at the path cannot stall the caller, which is the event loop on reload),
/// checked with `fstat` to be a regular file once open (so what is read is what was checked),
/// and read up to `MAX_FILE_BYTES`.
pub fn read_file(path: &Path) -> Result<Vec<u8>, Problem> {
    read_file_meta(path).map(|(bytes, _)| bytes)
}

/// `read_file`, with the file's metadata as `fstat` gave it on the descriptor read (a
/// directory of 200,000 files needs no second `stat` of each to know what it read).
pub fn read_file_meta(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), Problem> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let open = |noatime| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | noatime)
            .open(path)
    };
    // O_NOATIME: reading a file just written would otherwise dirty its inode (the access
    // time), a journal write per file of a config directory; refused (EPERM) unless the file
    // is ours or we may act as its owner, then opened as before.
    let file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
    .map_err(|e| Problem::Io(e.to_string()))?;
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
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the cap tells a file that grew since the fstat from one that did not.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Problem::Io(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Problem::TooLarge);
    }
    Ok((bytes, meta))
}
