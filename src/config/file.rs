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
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
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
    Ok(bytes)
}
