//! Running `etcdctl`: the command with the environment every use needs, a get, the lines a
//! watch prints, and what it says on stderr when it fails.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;

use crate::fleet::error::SyncError;
use crate::fleet::output::{parse_get, parse_get_prefix, Listing, Snapshot};

/// Lines of `etcdctl`'s stderr kept to explain a failure.
const STDERR_LINES: usize = 3;

/// `etcdctl` with the environment and pipes every use of it needs.
pub(super) fn command(etcdctl: &Path) -> Command {
    let mut cmd = Command::new(etcdctl);
    // The v3 API (the default from etcd 3.4; older etcdctl needs it said). The output shape
    // is ours to choose: operator settings that would change it, or clash with our flags
    // (etcdctl refuses a flag also set in its environment), are removed.
    cmd.env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_WRITE_OUT")
        .env_remove("ETCDCTL_HEX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches only the child. It kills etcdctl if
    // the follower dies (the main thread, which spawns every child, lives as long as the
    // process), so no orphaned watch outlives a stopped follower.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// `etcdctl get`: the key's value now. etcdctl's own dial and command timeouts bound it.
pub(super) fn get(etcdctl: &Path, key: &str) -> Result<Snapshot, SyncError> {
    let out = command(etcdctl)
        .args(["get", "-w", "json", key])
        .output()
        .map_err(SyncError::Spawn)?;
    if !out.status.success() {
        return Err(SyncError::Etcdctl {
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    parse_get(&out.stdout, key)
}

/// `etcdctl get --prefix`: every key under `prefix` at one revision, or (`probe`) only that
/// revision, how many keys there are and one key, which costs etcd next to nothing (etcdctl 3.4
/// has no `--count-only`).
pub(super) fn get_prefix(etcdctl: &Path, prefix: &str, probe: bool) -> Result<Listing, SyncError> {
    let mut cmd = command(etcdctl);
    cmd.args(["get", "-w", "json", "--prefix"]);
    if probe {
        cmd.args(["--keys-only", "--limit=1"]);
    }
    let out = cmd.arg(prefix).output().map_err(SyncError::Spawn)?;
    if !out.status.success() {
        return Err(SyncError::Etcdctl {
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    parse_get_prefix(&out.stdout, prefix)
}

/// The child's stdout, line by line, on a channel that disconnects when it ends.
pub(super) fn read_lines(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) if l.trim().is_empty() => {}
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    rx
}

/// The child's stderr, read to its end on a thread (so a chatty etcdctl never blocks on a full
/// pipe), reduced to its last lines.
pub(super) fn collect_stderr(child: &mut Child) -> thread::JoinHandle<String> {
    let err = child.stderr.take();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut e) = err {
            let _ = e.read_to_end(&mut buf);
        }
        tail(&buf)
    })
}

/// What etcdctl said on stderr, for a log line: its `Error:` lines when there are any (the
/// client library's JSON warnings before them only repeat the cause), else the last few lines.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("Error:"))
        .collect();
    let picked = if errors.is_empty() {
        &lines[..]
    } else {
        &errors[..]
    };
    picked[picked.len().saturating_sub(STDERR_LINES)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_names_the_error() {
        let out = b"{\"level\":\"warn\",\"msg\":\"retrying\"}\nError: context deadline exceeded\n";
        assert_eq!(tail(out), "Error: context deadline exceeded");
        assert_eq!(tail(b"a\n\nb\nc\nd\n"), "b / c / d");
    }
}
