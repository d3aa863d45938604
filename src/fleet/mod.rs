//! The etcd follower (`flyproxy-etcd-sync`): keeps one instance's config file equal to the
//! value of one etcd key, so a fleet of flyproxy instances follows one config. flyproxy's own
//! file watch does the rest (a bad value is rejected there and the running config serves on).
//!
//! Why it drives `etcdctl` rather than speaking etcd's gRPC API: flyproxy takes no new crates,
//! and `etcdctl` (Debian `etcd-client`) already does endpoints, failover between members, TLS
//! and authentication, configured by the operator through its own `ETCDCTL_*` variables, which
//! pass through untouched. Why it is a small binary rather than a shell script: a value may
//! hold any bytes (newlines, NUL), and exactness matters more than brevity. Values are read as
//! `-w json` (one JSON object per response, values in base64), parsed whole with serde_json
//! and decoded strictly; `etcdctl`'s exit status is checked; the file is written with every
//! write's error checked (a full disk never leaves a truncated value) to a temporary file in
//! the same directory, synced and renamed over the config, so flyproxy sees the old file or the
//! new one, never a mix.
//!
//! The cycle: `get` the key (its value and the store revision), write it, then `watch` from
//! the next revision, so nothing between the two is missed. When the watch ends (compacted,
//! cancelled, no leader, `etcdctl` failed) the cycle starts again with a fresh `get`, after a
//! backoff while etcd stays unreachable. A `get` every `--resync` catches anything a watch could
//! have missed and notices an etcd that cannot be reached (a watch would just wait). Events older than what
//! the file already holds are skipped, so a resync racing a watch never writes an older value. A
//! failed resync ends the watch: reconnecting is then on this follower's backoff (at most
//! `BACKOFF_MAX`), not on the client library's, which grows to minutes during a long outage.
//! A deleted or absent key leaves the file as it is, and is logged. The last good file always
//! stays in place: nothing here removes or empties it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::sha256;
use crate::sys::systemd;

/// First wait after a failure; doubled at each failure in a row up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The defaults, also named in `--help` and the packaged environment file.
pub const DEFAULT_KEY: &str = "/flyproxy/config";
pub const DEFAULT_CONFIG: &str = "/etc/flyproxy/config.json";
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
/// Lines of `etcdctl`'s stderr kept to explain a failure.
const STDERR_LINES: usize = 3;

pub const HELP: &str = "\
flyproxy-etcd-sync: keep a flyproxy config file equal to an etcd key

usage: flyproxy-etcd-sync [--key KEY] [--config PATH] [--etcdctl PATH] [--resync DUR]

  --key KEY        the etcd key holding the config   (env FLYPROXY_ETCD_KEY, default /flyproxy/config)
  --config PATH    the file flyproxy reads            (env FLYPROXY_CONFIG, default /etc/flyproxy/config.json)
  --etcdctl PATH   the etcdctl binary                 (env FLYPROXY_ETCDCTL, default etcdctl)
  --resync DUR     re-read the key this often besides watching (env FLYPROXY_ETCD_RESYNC, default 30s)

etcd's endpoints, TLS and authentication are etcdctl's own settings, read from its environment:
ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER, ETCDCTL_PASSWORD,
ETCDCTL_DIAL_TIMEOUT, ETCDCTL_COMMAND_TIMEOUT, ... (see etcdctl --help).

The file is replaced atomically (a temporary file in its directory, then rename) at start and on
every change; a deleted key or an unreachable etcd leaves it as it is.
";

/// What the follower was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub key: String,
    pub config: PathBuf,
    pub etcdctl: PathBuf,
    pub resync: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Settings),
    Help,
    Version,
}

/// Arguments override the environment, which overrides the defaults. `Err` is a message for
/// the user (exit status 2).
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, String> {
    let mut key = env("FLYPROXY_ETCD_KEY").unwrap_or_else(|| DEFAULT_KEY.to_string());
    let mut config = env("FLYPROXY_CONFIG").unwrap_or_else(|| DEFAULT_CONFIG.to_string());
    let mut etcdctl = env("FLYPROXY_ETCDCTL").unwrap_or_else(|| "etcdctl".to_string());
    let mut resync = env("FLYPROXY_ETCD_RESYNC");
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--key" => &mut key,
            "--config" => &mut config,
            "--etcdctl" => &mut etcdctl,
            "--resync" => resync.get_or_insert_with(String::new),
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        };
        *slot = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{name} needs a value")),
        };
    }
    // A key starting with '-' would reach etcdctl as a flag; etcdctl's watch gives `--` another
    // meaning (a command to run), so such keys are refused rather than escaped.
    if key.is_empty() || key.starts_with('-') {
        return Err(format!(
            "--key {key:?}: an etcd key must be non-empty and must not start with '-'"
        ));
    }
    if config.is_empty() || config.ends_with('/') {
        return Err(format!("--config {config:?}: must name a file"));
    }
    let resync = match resync {
        None => DEFAULT_RESYNC,
        Some(v) => match crate::cli::parse_duration(&v) {
            Some(d) if d >= Duration::from_secs(1) => d,
            _ => {
                return Err(format!(
                    "--resync {v:?}: expected a duration of at least 1s, e.g. 30s or 5m"
                ))
            }
        },
    };
    Ok(Invocation::Run(Settings {
        key,
        config: PathBuf::from(config),
        etcdctl: PathBuf::from(etcdctl),
        resync,
    }))
}

/// Why a step failed; each is logged and retried, none ends the follower except `Spawn`.
#[derive(Debug)]
pub enum SyncError {
    /// `etcdctl` could not be started at all (missing, not executable).
    Spawn(io::Error),
    /// `etcdctl` ran and failed: etcd unreachable, no leader, auth refused, ...
    Etcdctl { status: ExitStatus, stderr: String },
    /// `etcdctl` said something this follower does not understand.
    Output(String),
    /// The config file could not be written (the old one is still in place).
    Write(PathBuf, io::Error),
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::Spawn(e) => write!(f, "cannot run etcdctl: {e}"),
            SyncError::Etcdctl { status, stderr } if stderr.is_empty() => {
                write!(f, "etcdctl failed ({status})")
            }
            SyncError::Etcdctl { status, stderr } => {
                write!(f, "etcdctl failed ({status}): {stderr}")
            }
            SyncError::Output(why) => write!(f, "unexpected etcdctl output: {why}"),
            SyncError::Write(path, e) => write!(f, "cannot write {}: {e}", path.display()),
        }
    }
}

// etcdctl's `-w json` shapes (etcd 3.4 and later): a get response has lower-case keys, a watch
// response the Go field names. Byte strings are base64; empty fields are left out.

#[derive(Debug, Deserialize)]
struct Header {
    revision: i64,
}

#[derive(Debug, Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    mod_revision: i64,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Deserialize)]
struct GetResponse {
    header: Header,
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Debug, Deserialize)]
struct WatchResponse {
    #[serde(rename = "Events", default)]
    events: Option<Vec<Event>>,
    #[serde(rename = "CompactRevision", default)]
    compact_revision: i64,
    #[serde(rename = "Canceled", default)]
    canceled: bool,
}

#[derive(Debug, Deserialize)]
struct Event {
    /// 0 (left out) is PUT, 1 is DELETE.
    #[serde(rename = "type", default)]
    kind: i32,
    kv: Kv,
}

/// The key as etcd holds it at some revision.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The revision this value is current as of (a get: the store's; an event: the change's).
    pub revision: i64,
    /// `None`: the key does not exist (never set, or deleted).
    pub value: Option<Vec<u8>>,
}

/// What one watch response asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// The last change to the key in this response (earlier ones are superseded).
    Changed(Snapshot),
    /// Nothing for the key (a progress notification or a created acknowledgement).
    Nothing,
    /// The watch cannot go on (compacted past, or cancelled): get again.
    Ended(String),
}

/// Parse `etcdctl get -w json KEY` output.
pub fn parse_get(out: &[u8], key: &str) -> Result<Snapshot, SyncError> {
    let resp: GetResponse =
        serde_json::from_slice(out).map_err(|e| SyncError::Output(format!("get response: {e}")))?;
    let mut found = None;
    for kv in resp.kvs {
        if decode_base64(&kv.key).as_deref() != Some(key.as_bytes()) {
            return Err(SyncError::Output(format!(
                "get returned a key other than {key:?}"
            )));
        }
        found = Some(
            decode_base64(&kv.value)
                .ok_or_else(|| SyncError::Output("get: value is not base64".to_string()))?,
        );
    }
    Ok(Snapshot {
        revision: resp.header.revision,
        value: found,
    })
}

/// Parse one line of `etcdctl watch -w json KEY` output.
pub fn parse_watch_line(line: &str, key: &str) -> Result<WatchUpdate, SyncError> {
    let resp: WatchResponse = serde_json::from_str(line)
        .map_err(|e| SyncError::Output(format!("watch response: {e}")))?;
    if resp.compact_revision != 0 {
        return Ok(WatchUpdate::Ended(format!(
            "history compacted up to revision {}",
            resp.compact_revision
        )));
    }
    if resp.canceled {
        return Ok(WatchUpdate::Ended("cancelled by etcd".to_string()));
    }
    let mut last = None;
    for ev in resp.events.unwrap_or_default() {
        if decode_base64(&ev.kv.key).as_deref() != Some(key.as_bytes()) {
            return Err(SyncError::Output(format!(
                "watch returned a key other than {key:?}"
            )));
        }
        let value = match ev.kind {
            0 => Some(
                decode_base64(&ev.kv.value)
                    .ok_or_else(|| SyncError::Output("watch: value is not base64".to_string()))?,
            ),
            1 => None,
            other => return Err(SyncError::Output(format!("watch: event type {other}"))),
        };
        last = Some(Snapshot {
            revision: ev.kv.mod_revision,
            value,
        });
    }
    Ok(last.map_or(WatchUpdate::Nothing, WatchUpdate::Changed))
}

/// Standard base64 with padding (Go's `encoding/json` for `[]byte`), strictly: any other
/// character, a bad length or misplaced padding is `None`, never a guess.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, quad) in b.chunks_exact(4).enumerate() {
        let last = i + 1 == b.len() / 4;
        let pad = match quad {
            [_, _, b'=', b'='] if last => 2,
            [_, _, _, b'='] if last => 1,
            _ => 0,
        };
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = n << 6 | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

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

/// The follower's state: what the file holds as of which revision.
pub struct Follower {
    settings: Settings,
    /// The revision the file is known to be current as of; watch events below it are old.
    revision: i64,
    /// The key was absent at the last look (said once, not at every resync).
    absent: bool,
    /// systemd has been told READY=1 (once, after the first attempt).
    ready: bool,
}

impl Follower {
    pub fn new(settings: Settings) -> Follower {
        Follower {
            settings,
            revision: 0,
            absent: false,
            ready: false,
        }
    }

    fn etcdctl(&self) -> Command {
        let mut cmd = Command::new(&self.settings.etcdctl);
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
    pub fn get(&self) -> Result<Snapshot, SyncError> {
        let out = self
            .etcdctl()
            .args(["get", "-w", "json", &self.settings.key])
            .output()
            .map_err(SyncError::Spawn)?;
        if !out.status.success() {
            return Err(SyncError::Etcdctl {
                status: out.status,
                stderr: tail(&out.stderr),
            });
        }
        parse_get(&out.stdout, &self.settings.key)
    }

    /// Bring the file to what a `get` returned: the key as it is now, whatever came before. (A
    /// lower revision than seen so far means another cluster, or one restored from a backup:
    /// it is still the truth now.) `Ok(true)` when the file was written.
    pub fn apply_get(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        Ok(written)
    }

    /// Bring the file to a watched change, unless a `get` already brought it past that (a
    /// resync racing the watch). `Ok(true)` when the file was written.
    pub fn apply_event(&mut self, snap: Snapshot) -> Result<bool, SyncError> {
        if snap.revision < self.revision {
            return Ok(false);
        }
        let written = self.write(snap.value, snap.revision)?;
        self.revision = snap.revision;
        Ok(written)
    }

    /// Write `value` (the key at `revision`) unless the file holds it already; an absent key
    /// leaves the file as it is.
    fn write(&mut self, value: Option<Vec<u8>>, revision: i64) -> Result<bool, SyncError> {
        let path = &self.settings.config;
        Ok(match value {
            None if self.absent => false,
            None => {
                self.absent = true;
                crate::warn!(
                    "etcd key {:?} is absent (revision {revision}): {} left as it is",
                    self.settings.key,
                    path.display()
                );
                false
            }
            Some(value) => {
                self.absent = false;
                if fs::read(path).is_ok_and(|now| now == value) {
                    crate::debug!("{} already holds revision {revision}", path.display());
                    false
                } else {
                    write_atomically(path, &value)
                        .map_err(|e| SyncError::Write(path.clone(), e))?;
                    crate::info!(
                        "wrote {} from etcd key {:?} revision={revision} bytes={} sha256={}",
                        path.display(),
                        self.settings.key,
                        value.len(),
                        sha256::hex(&value)
                    );
                    true
                }
            }
        })
    }

    /// Get, then watch until the watch ends; `Err` is why the cycle stopped early.
    fn cycle(&mut self) -> Result<(), SyncError> {
        let snap = self.get()?;
        let from = snap.revision + 1;
        self.apply_get(snap)?;
        self.notify(&format!("following from revision {from}"));
        let mut child = self
            .etcdctl()
            .args([
                "watch",
                "-w",
                "json",
                &format!("--rev={from}"),
                &self.settings.key,
            ])
            .spawn()
            .map_err(SyncError::Spawn)?;
        let lines = read_lines(&mut child);
        let stderr = collect_stderr(&mut child);
        crate::info!(
            "watching etcd key {:?} from revision {from}",
            self.settings.key
        );
        let result = self.follow(&lines);
        // The watch may still run (a resync or parse failure stopped following): end it.
        let _ = child.kill();
        let status = child.wait();
        let stderr = stderr.join().unwrap_or_default();
        match (result, status) {
            (Err(e), _) => Err(e),
            (Ok(()), Ok(status)) if !status.success() => Err(SyncError::Etcdctl { status, stderr }),
            (Ok(()), _) => Ok(()),
        }
    }

    /// Apply watch responses as they come; get again every `resync`. Returns when the watch
    /// output ends or asks for a fresh get.
    fn follow(&mut self, lines: &Receiver<String>) -> Result<(), SyncError> {
        let mut next_resync = Instant::now() + self.settings.resync;
        loop {
            let wait = next_resync.saturating_duration_since(Instant::now());
            match lines.recv_timeout(wait) {
                Ok(line) => match parse_watch_line(&line, &self.settings.key)? {
                    WatchUpdate::Changed(snap) => {
                        self.apply_event(snap)?;
                    }
                    WatchUpdate::Nothing => {}
                    WatchUpdate::Ended(why) => {
                        crate::warn!("etcd watch ended: {why}; getting the key again");
                        return Ok(());
                    }
                },
                Err(RecvTimeoutError::Timeout) => {
                    next_resync = Instant::now() + self.settings.resync;
                    // A successful resync catches anything the watch could have missed. A
                    // failed one means etcd is unreachable: the watch would wait for it on its
                    // client library's own reconnect backoff (gRPC's grows to two minutes), so
                    // end it and reconnect on ours, with a fresh get when etcd answers.
                    if self.apply_get(self.get()?)? {
                        crate::warn!("resync found a change the watch had not delivered");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Follow for ever: cycles, with a backoff between failed ones. Returns only when etcdctl
    /// cannot be started at all.
    pub fn run(&mut self) -> SyncError {
        crate::info!(
            "flyproxy-etcd-sync {}: following etcd key {:?} into {} (endpoints: {})",
            crate::VERSION,
            self.settings.key,
            self.settings.config.display(),
            std::env::var("ETCDCTL_ENDPOINTS").unwrap_or_else(|_| "etcdctl's default".into())
        );
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match self.cycle() {
                Err(e @ SyncError::Spawn(_)) => return e,
                Err(e) => {
                    crate::warn!(
                        "{e}; {} left as it is; retrying in {:.1}s",
                        self.settings.config.display(),
                        backoff.as_secs_f64()
                    );
                    // The first attempt over without etcd: ready all the same, so the proxy
                    // ordered after this unit starts on the last good file.
                    self.notify(&match e {
                        SyncError::Etcdctl { .. } => {
                            "etcd unreachable; the config file is left as it is".to_string()
                        }
                        other => format!("{other}; the config file is left as it is"),
                    });
                }
                Ok(()) => crate::info!(
                    "etcd watch ended; retrying in {:.1}s",
                    backoff.as_secs_f64()
                ),
            }
            // A cycle that ran long (a watch that held) was a success: start the backoff over.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl Follower {
    /// Tell systemd (a `Type=notify` unit) how it goes, for `systemctl status`; the first time
    /// also READY=1: the first attempt is over, whatever its outcome, so a proxy ordered after
    /// this unit starts on the freshest file there is and never waits for etcd.
    fn notify(&mut self, status: &str) {
        let ready = if self.ready { "" } else { "READY=1\n" };
        self.ready = true;
        if let Err(e) = systemd::notify(&format!("{ready}STATUS={status}")) {
            crate::warn!("cannot notify systemd: {e}");
        }
    }
}

/// The child's stdout, line by line, on a channel that disconnects when it ends.
fn read_lines(child: &mut Child) -> Receiver<String> {
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
fn collect_stderr(child: &mut Child) -> thread::JoinHandle<String> {
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
    fn base64_strict() {
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("YQpiAGMKCg==").unwrap(), b"a\nb\0c\n\n");
        assert_eq!(decode_base64("djI=").unwrap(), b"v2");
        assert_eq!(decode_base64("AAEC/+/+").unwrap(), [0, 1, 2, 255, 239, 254]);
        for bad in [
            "a", "abc", "ab=c", "a===", "====", "YQ==YQ==", "YQ\n=", "Y Q=",
        ] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
        // Every byte value, through the system's base64 for the encoding.
        let all: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for len in [0, 1, 2, 3, 4, 255, 511, 512] {
            let enc = std::process::Command::new("sh")
                .arg("-c")
                .arg("base64 -w0")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(&all[..len])?;
                    c.wait_with_output()
                })
                .unwrap();
            let text = String::from_utf8(enc.stdout).unwrap();
            assert_eq!(
                decode_base64(text.trim()).unwrap(),
                &all[..len],
                "len {len}"
            );
        }
    }

    #[test]
    fn get_output() {
        // Captured from etcdctl 3.4.23.
        let absent = br#"{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":1,"raft_term":2}}"#;
        assert_eq!(
            parse_get(absent, "/k").unwrap(),
            Snapshot {
                revision: 1,
                value: None
            }
        );
        let binary = br#"{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":2,"raft_term":2},"kvs":[{"key":"L2s=","create_revision":2,"mod_revision":2,"version":1,"value":"YQpiAGMKCg=="}],"count":1}"#;
        assert_eq!(
            parse_get(binary, "/k").unwrap(),
            Snapshot {
                revision: 2,
                value: Some(b"a\nb\0c\n\n".to_vec())
            }
        );
        let empty = br#"{"header":{"revision":3},"kvs":[{"key":"L2s=","create_revision":3,"mod_revision":3,"version":1}],"count":1}"#;
        assert_eq!(
            parse_get(empty, "/k").unwrap(),
            Snapshot {
                revision: 3,
                value: Some(Vec::new())
            }
        );
        // A cut-off response, another key, a bad value: errors, never a value.
        assert!(parse_get(&binary[..binary.len() - 1], "/k").is_err());
        assert!(parse_get(binary, "/other").is_err());
        assert!(parse_get(
            br#"{"header":{"revision":3},"kvs":[{"key":"L2s=","value":"YQ"}]}"#,
            "/k"
        )
        .is_err());
        assert!(parse_get(b"", "/k").is_err());
    }

    #[test]
    fn watch_output() {
        let put = r#"{"Header":{"cluster_id":1,"member_id":2,"revision":3,"raft_term":2},"Events":[{"kv":{"key":"L2s=","create_revision":2,"mod_revision":2,"version":1,"value":"YQpiAGMKCg=="}},{"kv":{"key":"L2s=","create_revision":2,"mod_revision":3,"version":2,"value":"djI="}}],"CompactRevision":0,"Canceled":false,"Created":false}"#;
        assert_eq!(
            parse_watch_line(put, "/k").unwrap(),
            WatchUpdate::Changed(Snapshot {
                revision: 3,
                value: Some(b"v2".to_vec())
            })
        );
        let del = r#"{"Header":{"revision":4},"Events":[{"type":1,"kv":{"key":"L2s=","mod_revision":4}}],"CompactRevision":0,"Canceled":false,"Created":false}"#;
        assert_eq!(
            parse_watch_line(del, "/k").unwrap(),
            WatchUpdate::Changed(Snapshot {
                revision: 4,
                value: None
            })
        );
        let created = r#"{"Header":{"revision":4},"Events":null,"CompactRevision":0,"Canceled":false,"Created":true}"#;
        assert_eq!(
            parse_watch_line(created, "/k").unwrap(),
            WatchUpdate::Nothing
        );
        let compacted = r#"{"Header":{"revision":9},"Events":null,"CompactRevision":7,"Canceled":true,"Created":false}"#;
        assert!(matches!(
            parse_watch_line(compacted, "/k").unwrap(),
            WatchUpdate::Ended(_)
        ));
        assert!(parse_watch_line(&put[..40], "/k").is_err());
        assert!(parse_watch_line(put, "/j").is_err());
    }

    #[test]
    fn stderr_tail_names_the_error() {
        let out = b"{\"level\":\"warn\",\"msg\":\"retrying\"}\nError: context deadline exceeded\n";
        assert_eq!(tail(out), "Error: context deadline exceeded");
        assert_eq!(tail(b"a\n\nb\nc\nd\n"), "b / c / d");
    }

    #[test]
    fn args() {
        let none = |_: &str| None;
        let run = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()), none);
        assert_eq!(
            run(&[]).unwrap(),
            Invocation::Run(Settings {
                key: DEFAULT_KEY.into(),
                config: DEFAULT_CONFIG.into(),
                etcdctl: "etcdctl".into(),
                resync: DEFAULT_RESYNC,
            })
        );
        let env = |k: &str| (k == "FLYPROXY_ETCD_KEY").then(|| "/fleet/a".to_string());
        let Ok(Invocation::Run(s)) = parse_args(
            ["--config=/tmp/c.json", "--resync", "5s"].map(String::from),
            env,
        ) else {
            panic!("parses")
        };
        assert_eq!(
            (s.key.as_str(), s.config.to_str().unwrap()),
            ("/fleet/a", "/tmp/c.json")
        );
        assert_eq!(s.resync, Duration::from_secs(5));
        assert!(run(&["--key", "-x"])
            .unwrap_err()
            .contains("must not start with '-'"));
        assert!(run(&["--resync", "0"]).unwrap_err().contains("at least 1s"));
        assert!(run(&["--key"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--bogus"]).unwrap_err().contains("unknown argument"));
        assert_eq!(run(&["--help"]).unwrap(), Invocation::Help);
    }

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

    #[test]
    fn older_changes_and_absent_keys_leave_the_file() {
        let dir = std::env::temp_dir().join(format!("etcd-sync-apply-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let mut f = Follower::new(Settings {
            key: "/k".into(),
            config: path.clone(),
            etcdctl: "etcdctl".into(),
            resync: DEFAULT_RESYNC,
        });
        let snap = |revision: i64, value: Option<&[u8]>| Snapshot {
            revision,
            value: value.map(<[u8]>::to_vec),
        };
        assert!(f.apply_get(snap(5, Some(b"five"))).unwrap());
        // The same bytes again: nothing written.
        assert!(!f.apply_event(snap(5, Some(b"five"))).unwrap());
        // A watch event older than what a get already gave (a resync racing the watch).
        assert!(!f.apply_event(snap(4, Some(b"four"))).unwrap());
        // Deleted: the file stays, said once.
        assert!(!f.apply_event(snap(6, None)).unwrap());
        assert!(!f.apply_get(snap(6, None)).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"five");
        assert!(f.apply_event(snap(7, Some(b""))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"");
        // A get is the truth even at a lower revision (etcd rebuilt or restored from a backup),
        // and later events are compared with it.
        assert!(f.apply_get(snap(2, Some(b"rebuilt"))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"rebuilt");
        assert!(f.apply_event(snap(3, Some(b"three"))).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"three");
        fs::remove_dir_all(&dir).unwrap();
    }
}
