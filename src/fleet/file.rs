//! Replacing the config file so that flyproxy sees the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replace `path` with `bytes`, atomically: a new file in the same directory (so the rename
/// cannot cross file systems), every write checked, synced, then renamed over `path`, and the
/// directory synced so the rename survives a crash. On any error the temporary file is
/// removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".etcd-sync.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A leftover from an earlier process with the same pid (a crash mid-write) is ours to clear.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        // 0644: the proxy's unit runs as another (dynamic) user and must read the file.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_and_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("etcd-sync-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        fs::write(&path, b"old").unwrap();
        write_atomically(&path, b"new\0bytes\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new\0bytes\n");
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
}
