//! Running `etcdctl`: the command with the environment every use needs, a get, the lines a
//! watch prints, and what it says on stderr when it fails.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;

use crate::fleet::error::SyncError;
use crate::fleet::output::{parse_get, parse_get_prefix, KeyValue, Listing, Snapshot};

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
    // It kills etcdctl if the follower dies (the main thread, which spawns every child, lives
    // as long as the process), so no orphaned watch outlives a stopped follower. A follower
    // that died between the fork and the prctl is not signalled: the child checks that its
    // parent is still the follower after it (an orphan of a suite run held a watch for 20
    // minutes before this check).
    let follower = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and touch only the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != follower {
                return Err(std::io::Error::other("the follower is gone"));
            }
            Ok(())
        });
    }
    cmd
}

/// `etcdctl get`: the key's value now. etcdctl's own dial and command timeouts bound it.
pub(super) fn get(etcdctl: &Path, key: &str) -> Result<Snapshot, SyncError> {
    let out = stdout_of(command(etcdctl).args(["get", "-w", "json", key]))?;
    parse_get(&out, key)
}

/// `etcdctl get --prefix --keys-only --limit=1`: the store's revision, the cluster and how
/// many keys the prefix holds, which costs etcd next to nothing (etcdctl 3.4 has no
/// `--count-only`).
pub(super) fn probe_prefix(etcdctl: &Path, prefix: &str) -> Result<Listing, SyncError> {
    let out = stdout_of(command(etcdctl).args([
        "get",
        "-w",
        "json",
        "--prefix",
        "--keys-only",
        "--limit=1",
        prefix,
    ]))?;
    parse_get_prefix(&out, prefix)
}

/// Keys per `etcdctl get` of a listing: a listing of 200,000 apps is about 55 MB of output, too
/// much for one call's `ETCDCTL_COMMAND_TIMEOUT` on a slow link and for etcd to build at once
/// for many nodes starting together.
const PAGE: usize = 5_000;

/// What a listing was: its revision, the cluster that answered, and how many keys it held.
pub(super) struct Listed {
    pub revision: i64,
    pub cluster_id: u64,
    pub keys: usize,
}

/// Every key under `prefix` at one revision, in pages of `PAGE` keys, each handed to `page` as
/// it comes (so no more than a page of values is held at once, not all 200,000): the first page
/// says the revision, the others are read at it (`--rev`), each starting at the last key of the
/// one before (so that key comes twice and is dropped once). A revision compacted meanwhile
/// fails the listing, which is then started over. `page` failing stops the listing.
pub(super) fn list_prefix(
    etcdctl: &Path,
    prefix: &str,
    mut page: impl FnMut(Vec<KeyValue>) -> Result<(), SyncError>,
) -> Result<Listed, SyncError> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let end = prefix_end(prefix);
    let mut listed: Option<Listed> = None;
    let mut start = prefix.as_bytes().to_vec();
    loop {
        let mut cmd = command(etcdctl);
        cmd.args(["get", "-w", "json", &format!("--limit={PAGE}")]);
        if let Some(l) = &listed {
            cmd.arg(format!("--rev={}", l.revision));
        }
        // A key is an argument: it cannot hold a NUL byte (checked below), and it starts
        // with the prefix, which does not start with '-'.
        cmd.arg(OsStr::from_bytes(&start))
            .arg(OsStr::from_bytes(&end));
        let got = parse_get_prefix(&stdout_of(&mut cmd)?, prefix)?;
        let mut kvs = got.kvs;
        let all = match &mut listed {
            None => listed.insert(Listed {
                revision: got.revision,
                cluster_id: got.cluster_id,
                keys: 0,
            }),
            Some(l) => {
                if kvs.first().is_some_and(|kv| kv.key == start) {
                    kvs.remove(0);
                }
                l
            }
        };
        all.keys += kvs.len();
        let last = kvs.last().map(|kv| kv.key.clone());
        page(kvs)?;
        match last {
            Some(key) if got.more && key != start => {
                if key.contains(&0) {
                    return Err(SyncError::Output(format!(
                        "cannot list past key {:?}: it holds a NUL byte",
                        String::from_utf8_lossy(&key)
                    )));
                }
                start = key;
            }
            // Done, or no progress (which a limit above one cannot give).
            _ => break,
        }
    }
    // Set by the first page: the loop runs at least once.
    listed.ok_or_else(|| SyncError::Output("empty listing".to_string()))
}

/// The end of the range of keys starting with `prefix` (etcdctl's own `--prefix` range): the
/// prefix with its last byte below 0xff incremented and what follows dropped.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (not a UTF-8 string's): every key from the prefix on. etcd spells it
    // "\0", which an argument cannot hold; never reached from a `&str`.
    vec![0]
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
/// Run `cmd` to its end: its output, or why it failed (with the end of what it said).
fn stdout_of(cmd: &mut Command) -> Result<Vec<u8>, SyncError> {
    let out = cmd.output().map_err(SyncError::Spawn)?;
    if !out.status.success() {
        return Err(SyncError::Etcdctl {
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    Ok(out.stdout)
}

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
    fn prefix_ends() {
        assert_eq!(prefix_end("/flyproxy/apps/"), b"/flyproxy/apps0");
        assert_eq!(prefix_end("a"), b"b");
        assert_eq!(prefix_end("\u{7f}"), [0x80]);
    }

    #[test]
    fn stderr_tail_names_the_error() {
        let out = b"{\"level\":\"warn\",\"msg\":\"retrying\"}\nError: context deadline exceeded\n";
        assert_eq!(tail(out), "Error: context deadline exceeded");
        assert_eq!(tail(b"a\n\nb\nc\nd\n"), "b / c / d");
    }
}
