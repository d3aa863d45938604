//! A fleet: flyproxy instances that follow one config held in etcd, each through its own
//! `flyproxy-etcd-sync`, against a real etcd (Debian's `etcd-server`) that the test starts on
//! loopback with its data in a temporary directory.
//!
//! Each proxy runs in a network namespace of its own (tests/netns), so all three serve the same
//! config, with the same ports and the same target address: every namespace has its own tagged
//! backend on 127.0.0.1:7001, so a reply also says which instance relayed it. etcd and the
//! followers run in the test's own namespace; a follower writes the file its proxy reads.
//!
//! The follower-only test needs etcd; the fleet tests also need root (namespaces). A test that
//! cannot run is skipped with a message, except in CI, where it fails.

mod common;
#[allow(dead_code)] // the bpf helpers there
mod netns;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, wait_for, Backend, Proxy, TempDir, BIN, WAIT};
use netns::Namespace;

const SYNC: &str = env!("CARGO_BIN_EXE_flyproxy-etcd-sync");
const KEY: &str = "/flyproxy/config";
const PREFIX: &str = "/flyproxy/apps/";
/// The same in every namespace.
const TARGET: &str = "127.0.0.1:7001";
const METRICS: &str = "127.0.0.1:9100";
/// How long a put may take to be served by every instance. The promise is "a few seconds"
/// (measured: well under one, see the printed figures); this leaves room for a loaded machine.
const CONVERGE: Duration = Duration::from_secs(15);

/// Skip (or, in CI, fail) when `why` says the test cannot run here.
fn cannot_run(test: &str, why: &str) {
    if netns::in_ci() {
        panic!("{test}: cannot run in CI (CI is set, so this is a failure): {why}");
    }
    eprintln!("skipping {test}: {why}");
}

/// Why etcd cannot be used here, if it cannot.
fn etcd_missing() -> Option<String> {
    for (bin, arg) in [("etcd", "--version"), ("etcdctl", "version")] {
        let ok = Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!(
                "`{bin}` not found (Debian packages etcd-server and etcd-client; `make test` installs them)"
            ));
        }
    }
    None
}

/// The standard digest of `bytes`, by coreutils' `sha256sum`: independent of flyproxy's own.
fn sha256sum(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Kill the child with SIGKILL if the test process dies first (the calling thread, which
/// must outlive the child, is the test's own).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// etcd, started by the test

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }
}

/// An etcd cluster of one or more members on loopback, its data under a temporary directory;
/// every member is killed on drop.
struct Etcd {
    dir: TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

impl Etcd {
    fn start(n: usize) -> Etcd {
        let dir = TempDir::new("etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
                log: dir.path.join(format!("m{i}.log")),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            dir,
            members,
            initial_cluster,
        };
        for i in 0..n {
            etcd.start_member(i);
        }
        etcd.wait_healthy();
        etcd
    }

    /// Start member `i` (again: a restart keeps its data directory, so it rejoins).
    fn start_member(&mut self, i: usize) {
        let data = self.dir.path.join(format!("m{i}.etcd"));
        let m = &mut self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-token",
                &format!("fleet-{}", std::process::id()),
            ])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        m.child = Some(die_with_parent(&mut cmd).spawn().expect("start etcd"));
    }

    /// Kill member `i` and remove its data: started again, it is a new cluster (single member),
    /// its revisions counting from 1 again, as after a rebuild.
    fn wipe_member(&mut self, i: usize) {
        self.kill_member(i);
        fs::remove_dir_all(self.dir.path.join(format!("m{i}.etcd"))).unwrap();
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every member's client endpoint, starting with member `first`.
    fn endpoints_from(&self, first: usize) -> String {
        let n = self.members.len();
        (0..n)
            .map(|k| self.members[(first + k) % n].endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The endpoints of the members running now.
    fn live_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ctl(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", self.live_endpoints())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `etcdctl put KEY` with `value` on stdin (binary-safe), retried while the cluster settles.
    fn put(&self, value: &[u8]) {
        wait_for("etcdctl put to succeed", WAIT, || {
            self.ctl(&["put", KEY], value)
                .status
                .success()
                .then_some(())
        });
    }

    fn del(&self) {
        self.del_key(KEY);
    }

    /// `etcdctl put key` with `value` on stdin, retried while the cluster settles.
    fn put_key(&self, key: &str, value: &str) {
        wait_for("etcdctl put to succeed", WAIT, || {
            self.ctl(&["put", key], value.as_bytes())
                .status
                .success()
                .then_some(())
        });
    }

    fn del_key(&self, key: &str) {
        let out = self.ctl(&["del", key], b"");
        assert!(out.status.success(), "etcdctl del: {:?}", out);
    }

    /// Put every (key, value), a hundred to a transaction (etcd allows 128 by default).
    fn put_many(&self, kvs: &[(String, String)]) {
        for chunk in kvs.chunks(100) {
            // etcdctl txn on stdin: compares, a blank line, puts, a blank line, no failure ops.
            let mut script = String::from("\n");
            for (k, v) in chunk {
                script += &format!("put {k} {v:?}\n");
            }
            script += "\n\n";
            let out = self.ctl(&["txn"], script.as_bytes());
            assert!(
                out.status.success() && out.stdout.starts_with(b"SUCCESS"),
                "etcdctl txn: {out:?}"
            );
        }
    }

    /// The store's revision now.
    fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "-w", "json", "/"], b"");
        assert!(out.status.success(), "etcdctl get: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["header"]["revision"].as_i64().expect("a revision")
    }

    fn wait_healthy(&self) {
        wait_for("etcd to serve", WAIT, || {
            self.ctl(&["endpoint", "health"], b"")
                .status
                .success()
                .then_some(())
        });
    }

    /// The index of the member that leads now.
    fn leader(&self) -> usize {
        let out = self.ctl(&["endpoint", "status", "-w", "json"], b"");
        assert!(out.status.success(), "endpoint status: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let statuses = v.as_array().expect("a list of statuses");
        let leader = statuses[0]["Status"]["leader"].as_u64().expect("leader id");
        let endpoint = statuses
            .iter()
            .find(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|s| s["Endpoint"].as_str())
            .expect("the leader among the endpoints")
            .to_owned();
        self.members
            .iter()
            .position(|m| m.endpoint() == endpoint)
            .expect("a member of ours")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        if thread::panicking() {
            for m in &self.members {
                let log = fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("---- etcd {} log (last lines) ----", m.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The follower and the fleet

/// Start `flyproxy-etcd-sync` for `config` on `endpoints`, its log collected like a proxy's,
/// its status file in its own directory (`status_of`).
fn follower(endpoints: &str, config: &std::path::Path) -> Proxy {
    let mut cmd = Command::new(SYNC);
    cmd.args(["--key", KEY, "--config"]).arg(config);
    sync_cmd(cmd, endpoints, config)
}

/// Start `flyproxy-etcd-sync --prefix PREFIX --dir DIR` on `endpoints`.
fn apps_follower(endpoints: &str, dir: &Path) -> Proxy {
    let mut cmd = Command::new(SYNC);
    cmd.args(["--prefix", PREFIX, "--dir"]).arg(dir);
    sync_cmd(cmd, endpoints, dir)
}

fn sync_cmd(mut cmd: Command, endpoints: &str, target: &Path) -> Proxy {
    let own = TempDir::new("sync");
    cmd.args(["--resync", "1s", "--status-file"])
        .arg(own.path.join("status.json"))
        .env("ETCDCTL_ENDPOINTS", endpoints)
        .env("ETCDCTL_DIAL_TIMEOUT", "1s")
        .env("ETCDCTL_COMMAND_TIMEOUT", "2s");
    die_with_parent(&mut cmd);
    Proxy::spawn_cmd(cmd, own, target.to_path_buf())
}

/// A follower's status file, once it has one.
fn status_of(f: &Proxy) -> serde_json::Value {
    let path = f.dir.path.join("status.json");
    wait_for("the status file", WAIT, || fs::read(&path).ok());
    serde_json::from_slice(&fs::read(&path).unwrap()).expect("the status file is JSON")
}

/// The follower's rejection of `key`: its log line (with the revision) and its entry in the
/// status file, waiting for both.
fn wait_rejected(f: &Proxy, mark: usize, key: &str) -> (String, serde_json::Value) {
    let line = f.wait_log_since(mark, &format!("rejected {key}"), |l| {
        l.contains(&format!(" WARN  rejected etcd key {key:?} revision="))
    });
    let revision: i64 = common::field(&line, "revision")
        .and_then(|r| r.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("a revision in {line}"));
    let entry = wait_for("the rejection in the status file", WAIT, || {
        status_of(f)["rejected"]
            .as_array()?
            .iter()
            .find(|r| r["key"] == key && r["revision"] == revision)
            .cloned()
    });
    (line, entry)
}

/// The follower's `wrote` line for `sha`, waiting for it.
fn wait_written(f: &Proxy, mark: usize, sha: &str) {
    f.wait_log_since(mark, &format!("wrote sha256={sha}"), |l| {
        l.contains(" INFO  wrote ") && l.ends_with(&format!(" sha256={sha}"))
    });
}

/// An in-test backend inside a namespace. It stops by connecting to itself, so it must be
/// dropped from inside its namespace (from outside, the connect would miss it and the stop
/// would wait for ever).
struct NsBackend {
    ns: Namespace,
    backend: Option<Backend>,
}

impl NsBackend {
    fn tagged(ns: &Namespace, tag: String) -> NsBackend {
        NsBackend {
            ns: ns.clone(),
            backend: Some(ns.run(move || Backend::tagged_at(TARGET, &tag))),
        }
    }
}

impl Drop for NsBackend {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            let _ = self.ns.spawn(move || drop(b)).join();
        }
    }
}

/// One flyproxy with its follower, its namespace and its backend.
struct Instance {
    name: String,
    ns: Namespace,
    follower: Proxy,
    proxy: Proxy,
    _backend: NsBackend,
}

impl Instance {
    /// The follower first, which writes the file from etcd; then the proxy on it (as the
    /// packaged units are ordered).
    fn start(i: usize, endpoints: &str, expect: &str) -> Result<Instance, String> {
        let ns = Namespace::new()?;
        let name = format!("instance{i}");
        let backend = NsBackend::tagged(&ns, name.clone());
        let dir = TempDir::new("fleet");
        let config = dir.path.join("config.json");
        let follower = follower(endpoints, &config);
        wait_written(&follower, 0, expect);
        // The follower owns nothing in `dir` but the file; keep the directory with the proxy.
        let proxy = ns.run(move || {
            let mut cmd = Command::new(BIN);
            cmd.arg("simple").arg("-c").arg(&config).args([
                "--reload-interval",
                "100ms",
                "--metrics",
                METRICS,
            ]);
            Proxy::spawn_cmd(cmd, dir, config)
        });
        let started = proxy.started_line();
        assert_eq!(
            common::field(&started, "sha256").as_deref(),
            Some(expect),
            "{started}"
        );
        Ok(Instance {
            name,
            ns,
            follower,
            proxy,
            _backend: backend,
        })
    }

    fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// `GET /metrics` inside the namespace: the `sha256` of `flyproxy_config_info`.
    fn metrics_sha256(&self) -> String {
        let text = self.ns.run(|| {
            let mut s = common::connect(METRICS.parse().unwrap());
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("flyproxy_config_info{"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v = lines[0]
            .strip_prefix("flyproxy_config_info{sha256=\"")
            .and_then(|r| r.strip_suffix("\"} 1"))
            .unwrap_or_else(|| panic!("{}", lines[0]));
        v.to_owned()
    }

    /// `flyproxy status` inside the namespace.
    fn status(&self) -> String {
        let out = self
            .ns
            .run(|| common::run(&["status", "--metrics", METRICS]));
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.stdout
    }

    /// A bounded client loop through `port` in this instance's namespace until `stop` (or
    /// `max` connections): each connection reads the backend's tag and echoes a message.
    /// Returns (ok, failures with their reasons).
    fn client_loop(
        &self,
        port: u16,
        stop: Arc<AtomicBool>,
        max: usize,
    ) -> thread::JoinHandle<(usize, Vec<String>)> {
        let tag = self.name.clone();
        self.ns.spawn(move || {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let (mut ok, mut failed) = (0, Vec::new());
            let t0 = Instant::now();
            while ok + failed.len() < max && t0.elapsed() < Duration::from_secs(60) {
                if stop.load(Ordering::Relaxed) && ok > 0 {
                    break;
                }
                match exchange(addr, &tag) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    }
}

/// One connection through the proxy: the tag of the backend it reached, then an echo.
fn exchange(addr: SocketAddr, tag: &str) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let want = format!("{tag}\nping {addr}");
    s.write_all(format!("ping {addr}").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut got = String::new();
    s.read_to_string(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    (got == want)
        .then_some(())
        .ok_or_else(|| format!("got {got:?}, want {want:?}"))
}

/// A config for the fleet serving `ports`, in the bytes etcd will hold (a trailing newline and
/// a tab, so a follower that trimmed or re-encoded the value would change its hash).
fn fleet_config(ports: &[u16]) -> Vec<u8> {
    format!(
        "{{\"Apps\": [{{\"Name\": \"fleet\",\t\"Ports\": {ports:?}, \"Targets\": [\"{TARGET}\"]}}]}}\n"
    )
    .into_bytes()
}

/// Put `value` and wait until every instance has applied it: each follower wrote it, each
/// proxy's `reload ok` names its hash and each serves `port`. Returns how long etcd took to
/// accept the put, and from then until every instance had applied it.
fn roll(etcd: &Etcd, fleet: &[Instance], value: &[u8], port: u16) -> (Duration, Duration) {
    let sha = sha256sum(value);
    let marks: Vec<(usize, usize)> = fleet
        .iter()
        .map(|i| (i.follower.mark(), i.proxy().mark()))
        .collect();
    let t0 = Instant::now();
    etcd.put(value);
    let accepted = Instant::now();
    for (inst, (fmark, pmark)) in fleet.iter().zip(marks) {
        wait_written(&inst.follower, fmark, &sha);
        let line = inst.proxy().wait_reload_ok(pmark);
        assert_eq!(
            common::field(&line, "sha256").as_deref(),
            Some(sha.as_str()),
            "{}: {line}",
            inst.name
        );
    }
    let took = accepted.elapsed();
    assert!(took < CONVERGE, "the fleet took {took:?} to apply a put");
    for inst in fleet {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tag = inst.name.clone();
        inst.ns.run(move || exchange(addr, &tag)).unwrap();
        assert_eq!(inst.metrics_sha256(), sha, "{}", inst.name);
        // `flyproxy status` too, with no rejection left over from before.
        let status = inst.status();
        assert!(
            status.contains(&format!("\nconfig sha256 {sha}\n")),
            "{}: {status}",
            inst.name
        );
        assert_eq!(
            fs::read(&inst.proxy().config).unwrap(),
            value,
            "{}: the file holds the value byte for byte",
            inst.name
        );
    }
    (accepted - t0, took)
}

/// Put a config with an error while clients loop through `port` on every instance: every
/// follower refuses it (log line with key and revision, status file) and never writes it, so no
/// proxy even sees it (issue 20: a proxy restarted after a bad put starts on the last good
/// file); every instance keeps serving `running`, and no connection fails.
fn roll_bad(etcd: &Etcd, fleet: &[Instance], port: u16, running: &str) {
    // Valid JSON, invalid config: a port out of range. Two trailing newlines.
    let bad = format!(
        "{{\"Apps\": [{{\"Name\": \"fleet\", \"Ports\": [{port}, 70000], \"Targets\": [\"{TARGET}\"]}}]}}\n\n"
    )
    .into_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = fleet
        .iter()
        .map(|i| i.client_loop(port, Arc::clone(&stop), 20_000))
        .collect();
    let marks: Vec<(usize, usize)> = fleet
        .iter()
        .map(|i| (i.follower.mark(), i.proxy().mark()))
        .collect();
    let before: Vec<Vec<u8>> = fleet
        .iter()
        .map(|i| fs::read(&i.proxy().config).unwrap())
        .collect();
    etcd.put(&bad);
    for ((inst, (fmark, pmark)), before) in fleet.iter().zip(marks).zip(before) {
        let (line, entry) = wait_rejected(&inst.follower, fmark, KEY);
        assert!(line.contains("Ports: 70000 is not a port"), "{line}");
        assert!(
            entry["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().contains("Ports: 70000 is not a port")),
            "{entry}"
        );
        assert_eq!(
            fs::read(&inst.proxy().config).unwrap(),
            before,
            "{}",
            inst.name
        );
        // The proxy never saw it: no reload at all since the put.
        assert_eq!(
            inst.proxy().lines_since(pmark, |l| l.contains(" reload ")),
            Vec::<String>::new(),
            "{}",
            inst.name
        );
    }
    // Let the loops run on the kept config a little longer (bounded by their count).
    let settle = Instant::now();
    wait_for("a little traffic after the rejections", WAIT, || {
        (settle.elapsed() > Duration::from_millis(300)).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for (inst, l) in fleet.iter().zip(loops) {
        let (ok, failed) = l.join().unwrap();
        assert!(
            failed.is_empty(),
            "{}: {} of {} connections failed: {:?}",
            inst.name,
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 0, "{}: no connection made", inst.name);
        eprintln!(
            "{}: {ok} connections through the rejected put, 0 failed",
            inst.name
        );
        assert_eq!(inst.metrics_sha256(), running, "{}", inst.name);
        let status = inst.status();
        assert!(
            status.contains(&format!("\nconfig sha256 {running}\n")),
            "{}: {status}",
            inst.name
        );
    }
}

fn start_fleet(etcd: &Etcd, first: &[u8]) -> Result<Vec<Instance>, String> {
    etcd.put(first);
    let sha = sha256sum(first);
    (0..3)
        .map(|i| Instance::start(i, &etcd.endpoints_from(i), &sha))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A config the proxy accepts, in bytes a follower must keep exactly: tabs, CR LF, a trailing
/// blank line (a follower that trimmed or re-encoded the value would change its hash).
fn odd_config(port: u16) -> Vec<u8> {
    format!(
        "{{\t\"Apps\":\r\n [{{\"Name\": \"odd\", \"Ports\": [{port}],\t\"Targets\": [\"{TARGET}\"]}}]}}\r\n\n"
    )
    .into_bytes()
}

/// The follower alone, no proxy and no namespaces: a value reaches the file exactly; a bad value
/// never reaches it (issue 20: a proxy restarted after a bad put must start on the last good
/// file); a deleted key leaves it; an etcd that is down at start leaves the file and is retried;
/// a put after etcd returns is written, also when etcd came back rebuilt (revisions from 1
/// again). No temporary file is ever left behind.
#[test]
fn follower_writes_exact_bytes_and_survives_etcd_outages() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "follower_writes_exact_bytes_and_survives_etcd_outages",
            &why,
        );
    }
    let mut etcd = Etcd::start(1);
    let dir = TempDir::new("sync-file");
    let config = dir.path.join("config.json");
    fs::write(&config, b"the last good file\n").unwrap();
    let f = follower(&etcd.endpoints_from(0), &config);
    // An absent key: said once, the file left alone.
    f.wait_log("the key absent", |l| {
        l.contains(" is absent ") && l.contains("left as it is")
    });
    assert_eq!(fs::read(&config).unwrap(), b"the last good file\n");

    // Tabs, CR LF, blank lines at the end: the file equals the value.
    let value = odd_config(6300);
    let mark = f.mark();
    etcd.put(&value);
    wait_written(&f, mark, &sha256sum(&value));
    assert_eq!(fs::read(&config).unwrap(), value);
    // An empty line only, bytes that are no config, an unknown key: never written.
    for bad in [
        &b"\n"[..],
        &[0, 1, 2, 255, b'\n'],
        br#"{"Apps": [{"Name": "odd", "Ports": [6300], "Tragets": ["127.0.0.1:7001"]}]}"#,
    ] {
        let mark = f.mark();
        etcd.put(bad);
        let line = f.wait_log_since(mark, "the rejection", |l| {
            l.contains(" WARN  rejected etcd key \"/flyproxy/config\" revision=")
        });
        assert!(line.contains("left as it is"), "{line}");
        assert_eq!(fs::read(&config).unwrap(), value);
    }

    // Deleted: the file stays as it was.
    let mark = f.mark();
    etcd.del();
    f.wait_log_since(mark, "the deletion", |l| l.contains(" is absent "));
    assert_eq!(fs::read(&config).unwrap(), value);

    // etcd down: the follower says so and leaves the file; back up, a put reaches the file.
    etcd.kill_member(0);
    let mark = f.mark();
    f.wait_log_since(mark, "etcd unreachable", |l| {
        l.contains(" WARN  ") && l.contains("left as it is")
    });
    assert_eq!(fs::read(&config).unwrap(), value);
    etcd.start_member(0);
    etcd.wait_healthy();
    let mark = f.mark();
    etcd.put(b"{\"Apps\": []}");
    wait_written(&f, mark, &sha256sum(b"{\"Apps\": []}"));
    assert_eq!(fs::read(&config).unwrap(), b"{\"Apps\": []}");

    // A follower started while etcd is down leaves its file, retries with a backoff, and
    // writes once etcd is back.
    etcd.kill_member(0);
    drop(f);
    let f = follower(&etcd.endpoints_from(0), &config);
    f.wait_log_count(0, 2, "two failed attempts", |l| {
        l.contains(" WARN  etcdctl failed") && l.contains("retrying in")
    });
    assert_eq!(fs::read(&config).unwrap(), b"{\"Apps\": []}");
    etcd.start_member(0);
    etcd.wait_healthy();
    let mark = f.mark();
    let back = odd_config(6301);
    etcd.put(&back);
    wait_written(&f, mark, &sha256sum(&back));

    // etcd rebuilt empty (revisions start again, far below what the follower saw): the value
    // put into the new cluster is still written.
    for i in 0..5 {
        etcd.put(&odd_config(6310 + i));
    }
    let mark = f.mark();
    etcd.wipe_member(0);
    etcd.start_member(0);
    etcd.wait_healthy();
    let rebuilt = odd_config(6320);
    etcd.put(&rebuilt);
    wait_written(&f, mark, &sha256sum(&rebuilt));
    assert_eq!(fs::read(&config).unwrap(), rebuilt);

    let names: Vec<_> = fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["config.json"], "no temporary file left behind");
}

/// Three instances following one etcd: a put is served by all of them within seconds with the
/// same hash; a bad config is rejected by all while they keep serving (0 failed connections);
/// with etcd stopped they keep serving; a put after etcd returns reaches all of them.
#[test]
fn fleet_follows_one_etcd() {
    if let Some(why) = etcd_missing() {
        return cannot_run("fleet_follows_one_etcd", &why);
    }
    let mut etcd = Etcd::start(1);
    let v0 = fleet_config(&[6300]);
    let fleet = match start_fleet(&etcd, &v0) {
        Ok(f) => f,
        Err(why) => return cannot_run("fleet_follows_one_etcd", &why),
    };

    let v1 = fleet_config(&[6300, 6301]);
    let (put, took) = roll(&etcd, &fleet, &v1, 6301);
    eprintln!("put accepted in {put:?}, then served by all three in {took:?}");
    let sha1 = sha256sum(&v1);

    roll_bad(&etcd, &fleet, 6301, &sha1);

    // etcd stopped: every instance keeps serving, every follower notices and keeps its file.
    etcd.kill_member(0);
    let stop = Arc::new(AtomicBool::new(false));
    let marks: Vec<usize> = fleet.iter().map(|i| i.follower.mark()).collect();
    let loops: Vec<_> = fleet
        .iter()
        .map(|i| i.client_loop(6301, Arc::clone(&stop), 200))
        .collect();
    for (inst, l) in fleet.iter().zip(loops) {
        let (ok, failed) = l.join().unwrap();
        assert_eq!((ok, failed), (200, vec![]), "{}", inst.name);
    }
    for (inst, mark) in fleet.iter().zip(marks) {
        inst.follower.wait_log_since(mark, "etcd unreachable", |l| {
            l.contains(" WARN  etcdctl failed") && l.contains("retrying in")
        });
        assert_eq!(inst.metrics_sha256(), sha1);
    }

    // etcd back: a change reaches every instance.
    etcd.start_member(0);
    etcd.wait_healthy();
    let v2 = fleet_config(&[6300, 6301, 6302]);
    let (put, took) = roll(&etcd, &fleet, &v2, 6302);
    eprintln!("after etcd returned: put accepted in {put:?}, then served by all three in {took:?}");
}

/// The same against a three-member etcd cluster: one member (the leader) killed, a change
/// still reaches every instance. Each follower lists the members starting at a different one.
#[test]
fn fleet_follows_a_cluster_with_a_member_down() {
    if let Some(why) = etcd_missing() {
        return cannot_run("fleet_follows_a_cluster_with_a_member_down", &why);
    }
    let mut etcd = Etcd::start(3);
    let v0 = fleet_config(&[6300]);
    let fleet = match start_fleet(&etcd, &v0) {
        Ok(f) => f,
        Err(why) => return cannot_run("fleet_follows_a_cluster_with_a_member_down", &why),
    };
    let v1 = fleet_config(&[6300, 6301]);
    let (put, took) = roll(&etcd, &fleet, &v1, 6301);
    eprintln!("3 members: put accepted in {put:?}, then served by all three in {took:?}");

    let leader = etcd.leader();
    eprintln!("killing the leader, member m{leader}");
    etcd.kill_member(leader);
    let v2 = fleet_config(&[6300, 6301, 6302]);
    let (put, took) = roll(&etcd, &fleet, &v2, 6302);
    eprintln!("leader down: put accepted in {put:?}, then served by all three in {took:?}");
    roll_bad(&etcd, &fleet, 6302, &sha256sum(&v2));
}

/// Under systemd (`Type=notify`) the follower says READY=1 once its first attempt is over,
/// whether etcd answered (the file written first) or not (the last good file left in place), so
/// a proxy ordered after it starts on the freshest file and never waits for etcd.
#[test]
fn follower_notifies_ready_after_its_first_attempt() {
    if let Some(why) = etcd_missing() {
        return cannot_run("follower_notifies_ready_after_its_first_attempt", &why);
    }
    let etcd = Etcd::start(1);
    let value = fleet_config(&[6300]);
    etcd.put(&value);
    let dir = TempDir::new("sync-notify");
    let config = dir.path.join("config.json");
    let socket_path = dir.path.join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let receive = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let spawn = |endpoints: &str| {
        let mut cmd = Command::new(SYNC);
        cmd.args(["--key", KEY, "--config"])
            .arg(&config)
            .env("ETCDCTL_ENDPOINTS", endpoints)
            .env("ETCDCTL_DIAL_TIMEOUT", "1s")
            .env("NOTIFY_SOCKET", &socket_path);
        die_with_parent(&mut cmd);
        Proxy::spawn_cmd(cmd, TempDir::new("sync"), config.clone())
    };
    let f = spawn(&etcd.endpoints_from(0));
    let first = receive();
    assert!(
        first.starts_with("READY=1\nSTATUS=following from revision "),
        "{first:?}"
    );
    // By then the file was written.
    assert_eq!(fs::read(&config).unwrap(), value);
    drop(f);

    // Nothing listens here: ready once the first attempt failed, the file untouched.
    let nobody = format!("127.0.0.1:{}", free_port());
    let f = spawn(&nobody);
    assert_eq!(
        receive(),
        "READY=1\nSTATUS=etcd unreachable; the config file is left as it is"
    );
    assert_eq!(fs::read(&config).unwrap(), value);
    f.wait_log("the failure logged", |l| {
        l.contains(" WARN  etcdctl failed")
    });
}

// ---------------------------------------------------------------------------------------------
// One key per app

/// An app's value as etcd holds it: the app object as in the Apps list.
fn app_value(name: &str, port: u16) -> String {
    format!(r#"{{"Name": "{name}", "Ports": [{port}], "Targets": ["{TARGET}"]}}"#)
}

/// What `DIR/<name>.json` holds for `value`: the value's bytes in an Apps list.
fn app_file(value: &str) -> Vec<u8> {
    format!("{{\"Apps\": [{value}]}}\n").into_bytes()
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// From empty, every app's file is written (6,000 apps, listed in pages at one revision), each
/// as the proxy's own `check` accepts it; what
/// was in the directory is reconciled (a changed file rewritten keeping its mode, an owned file
/// whose key is gone removed, a dead follower's temporary file removed, files that are not
/// `*.json` or are dotfiles left alone); then a
/// put appears as a file and a delete removes it.
#[test]
fn apps_follower_syncs_a_directory_then_follows_puts_and_deletes() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "apps_follower_syncs_a_directory_then_follows_puts_and_deletes",
            &why,
        );
    }
    // Past the follower's page of 5,000 keys: the listing takes two `etcdctl get`s.
    const APPS: usize = 6_000;
    let etcd = Etcd::start(1);
    let kvs: Vec<(String, String)> = (0..APPS)
        .map(|i| {
            let name = format!("app{i}");
            (
                format!("{PREFIX}{name}"),
                app_value(&name, 10_000 + i as u16),
            )
        })
        .collect();
    etcd.put_many(&kvs);
    let dir = TempDir::new("sync-apps");
    let apps = dir.path.join("apps");
    fs::create_dir(&apps).unwrap();
    fs::write(apps.join("app0.json"), b"{\"Apps\": []}\n").unwrap();
    fs::set_permissions(apps.join("app0.json"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(apps.join("gone.json"), b"{\"Apps\": []}\n").unwrap();
    fs::write(apps.join("notes.txt"), b"mine").unwrap();
    fs::write(apps.join(".draft.json"), b"mine too").unwrap();
    // A follower that died mid-write left its temporary file.
    fs::write(apps.join(".app1.json.etcd-sync.4000000"), b"{\"Apps\"").unwrap();

    let f = apps_follower(&etcd.endpoints_from(0), &apps);
    // A debug build validating 6,000 apps on a loaded machine: more than `WAIT` is allowed.
    let line = wait_for("the reconcile", Duration::from_secs(120), || {
        f.lines(|l| l.contains(" INFO  reconciled ")).pop()
    });
    assert!(
        line.contains(&format!(
            ": {APPS} keys, {APPS} written, 0 unchanged, 1 removed, 0 refused"
        )),
        "{line}"
    );
    let mut want: Vec<String> = (0..APPS).map(|i| format!("app{i}.json")).collect();
    want.extend([".draft.json".into(), "notes.txt".into()]);
    want.sort();
    assert_eq!(names_in(&apps), want);
    for (key, value) in &kvs {
        let name = key.strip_prefix(PREFIX).unwrap();
        assert_eq!(
            fs::read(apps.join(format!("{name}.json"))).unwrap(),
            app_file(value)
        );
    }
    assert_eq!(
        fs::metadata(apps.join("app0.json")).unwrap().mode() & 0o7777,
        0o640,
        "the mode of the file replaced is kept"
    );
    // The proxy's own check takes a written file.
    let check = common::run(&["check", "-c", apps.join("app7.json").to_str().unwrap()]);
    assert_eq!(check.code, Some(0), "{}{}", check.stdout, check.stderr);
    let status = status_of(&f);
    assert_eq!(status["mode"], "prefix");
    assert_eq!(status["files"], APPS);
    assert_eq!(status["rejected_count"], 0);
    let synced = status["revision"].as_i64().unwrap();
    assert!(synced >= 1, "{status}");

    // A put: a new file. A change: the file rewritten. A delete: the file removed.
    let value = app_value("new-app", 6400);
    let mark = f.mark();
    etcd.put_key(&format!("{PREFIX}new-app"), &value);
    wait_written(&f, mark, &sha256sum(&app_file(&value)));
    assert_eq!(
        fs::read(apps.join("new-app.json")).unwrap(),
        app_file(&value)
    );
    let value = app_value("app5", 6401);
    let mark = f.mark();
    etcd.put_key(&format!("{PREFIX}app5"), &value);
    wait_written(&f, mark, &sha256sum(&app_file(&value)));
    assert_eq!(fs::read(apps.join("app5.json")).unwrap(), app_file(&value));
    let mark = f.mark();
    etcd.del_key(&format!("{PREFIX}app6"));
    let line = f.wait_log_since(mark, "the removal", |l| l.contains(" INFO  removed "));
    assert!(line.contains("app6.json"), "{line}");
    assert!(!apps.join("app6.json").exists());
    // The status file follows: the last change and the revision it came with.
    let revision = etcd.revision();
    let status = wait_for("the status at the delete's revision", WAIT, || {
        let s = status_of(&f);
        (s["revision"].as_i64() >= Some(revision)).then_some(s)
    });
    assert_eq!(status["last_applied"]["key"], format!("{PREFIX}app6"));
    assert_eq!(status["last_applied"]["action"], "removed");
    assert_eq!(status["files"], APPS);
    assert!(names_in(&apps).iter().all(|n| !n.contains("etcd-sync")));
}

/// A bad value never reaches the disk: an unknown key, a target that is not host:port, a Name
/// that is not the key's, a value that is no single app, keys that are no safe file name.
/// Each is logged with its key and revision and listed in the status file; the last good file
/// stays, also when the follower starts again with the bad value still in etcd; a good value
/// afterwards clears the rejection.
#[test]
fn apps_follower_never_writes_a_bad_value() {
    if let Some(why) = etcd_missing() {
        return cannot_run("apps_follower_never_writes_a_bad_value", &why);
    }
    let etcd = Etcd::start(1);
    let good = app_value("web", 6300);
    etcd.put_key(&format!("{PREFIX}web"), &good);
    let dir = TempDir::new("sync-bad");
    let f = apps_follower(&etcd.endpoints_from(0), &dir.path);
    let line = f.wait_log("the reconcile", |l| l.contains(" INFO  reconciled "));
    assert!(line.contains(": 1 keys, 1 written,"), "{line}");
    assert_eq!(
        fs::read(dir.path.join("web.json")).unwrap(),
        app_file(&good)
    );
    let web = format!("{PREFIX}web");
    let bad: [(&str, String, &str); 8] = [
        (
            &web,
            format!(r#"{{"Name": "web", "Ports": [6300], "Tragets": ["{TARGET}"]}}"#),
            "unknown key \"Tragets\"",
        ),
        (
            &web,
            r#"{"Name": "web", "Ports": [6300], "Targets": ["no-port"]}"#.into(),
            "is not host:port",
        ),
        (
            &web,
            app_value("other", 6300),
            "Name must equal the key's last segment \"web\"",
        ),
        (&web, format!("[{good}]"), "must be one app"),
        (&web, format!("{good}], \"Extra\": [1"), ""),
        (
            "/flyproxy/apps/..",
            app_value("..", 6300),
            "not an app name usable as a file name",
        ),
        (
            "/flyproxy/apps/x/y",
            app_value("y", 6300),
            "not an app name usable as a file name",
        ),
        (
            "/flyproxy/apps/.hidden",
            app_value(".hidden", 6300),
            "not an app name usable as a file name",
        ),
    ];
    for (key, value, why) in &bad {
        let mark = f.mark();
        etcd.put_key(key, value);
        let (line, entry) = wait_rejected(&f, mark, key);
        assert!(line.contains(why), "{line}");
        let problems = entry["problems"].as_array().unwrap();
        assert!(
            problems.iter().any(|p| p.as_str().unwrap().contains(why)),
            "{entry}"
        );
        assert_eq!(names_in(&dir.path), ["web.json"], "after {key} {value}");
        assert_eq!(
            fs::read(dir.path.join("web.json")).unwrap(),
            app_file(&good)
        );
    }
    let status = status_of(&f);
    assert_eq!(status["rejected_count"], 4, "{status}");

    // Started again with the bad values in etcd: the last good file stays, each is reported.
    drop(f);
    let f = apps_follower(&etcd.endpoints_from(0), &dir.path);
    let line = f.wait_log("the reconcile", |l| l.contains(" INFO  reconciled "));
    assert!(
        line.contains(": 4 keys, 0 written, 0 unchanged, 0 removed, 4 refused"),
        "{line}"
    );
    assert_eq!(names_in(&dir.path), ["web.json"]);
    assert_eq!(
        fs::read(dir.path.join("web.json")).unwrap(),
        app_file(&good)
    );
    assert_eq!(status_of(&f)["rejected_count"], 4);

    // A good value for web: written, and web is no longer listed as rejected.
    let better = app_value("web", 6301);
    let mark = f.mark();
    etcd.put_key(&web, &better);
    wait_written(&f, mark, &sha256sum(&app_file(&better)));
    let status = wait_for("web's rejection cleared", WAIT, || {
        let s = status_of(&f);
        (s["rejected_count"] == 3).then_some(s)
    });
    assert!(
        status["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["key"] != web.as_str()),
        "{status}"
    );
}

/// A FIFO planted where the follower reads or writes does not hang it: the app whose path it
/// is gets a clear error (logged, in the status file) within bounded time, every other app goes
/// on, and once the FIFO is gone the value is written. The same for one-key mode's file.
#[test]
fn a_fifo_at_a_followed_path_does_not_hang_the_follower() {
    if let Some(why) = etcd_missing() {
        return cannot_run("a_fifo_at_a_followed_path_does_not_hang_the_follower", &why);
    }
    let etcd = Etcd::start(1);
    let dir = TempDir::new("sync-fifo");
    mkfifo(&dir.path.join("web.json"));
    let web = app_value("web", 6300);
    etcd.put_key(&format!("{PREFIX}web"), &web);
    let f = apps_follower(&etcd.endpoints_from(0), &dir.path);
    let (line, _) = wait_rejected(&f, 0, &format!("{PREFIX}web"));
    assert!(line.contains("it is a FIFO, not a regular file"), "{line}");
    // Another app is written all the same.
    let other = app_value("other", 6301);
    let mark = f.mark();
    etcd.put_key(&format!("{PREFIX}other"), &other);
    wait_written(&f, mark, &sha256sum(&app_file(&other)));
    // The FIFO removed, the next change to web is written.
    fs::remove_file(dir.path.join("web.json")).unwrap();
    let web = app_value("web", 6302);
    let mark = f.mark();
    etcd.put_key(&format!("{PREFIX}web"), &web);
    wait_written(&f, mark, &sha256sum(&app_file(&web)));
    drop(f);

    // One key: a FIFO at the config path.
    let config = dir.path.join("config.json");
    mkfifo(&config);
    let value = fleet_config(&[6300]);
    etcd.put(&value);
    let f = follower(&etcd.endpoints_from(0), &config);
    let line = f.wait_log("the FIFO refused", |l| {
        l.contains(" WARN  cannot write ") && l.contains("it is a FIFO, not a regular file")
    });
    assert!(line.contains("retrying in"), "{line}");
    fs::remove_file(&config).unwrap();
    wait_written(&f, 0, &sha256sum(&value));
    assert_eq!(fs::read(&config).unwrap(), value);
}

/// A node whose etcd is gone keeps its files and catches up when etcd returns: from the last
/// revision it applied (etcd replays the changes, deletes too, with no new listing), or, when
/// that revision was compacted meanwhile, by listing the prefix again and reconciling. The
/// follower talks to one member of three; the changes are made through the others.
#[test]
fn apps_follower_keeps_its_files_while_etcd_is_gone_and_catches_up() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "apps_follower_keeps_its_files_while_etcd_is_gone_and_catches_up",
            &why,
        );
    }
    let mut etcd = Etcd::start(3);
    for name in ["a", "b", "c"] {
        etcd.put_key(&format!("{PREFIX}{name}"), &app_value(name, 6300));
    }
    let dir = TempDir::new("sync-gone");
    // Member 0 only.
    let f = apps_follower(&etcd.members[0].endpoint(), &dir.path);
    f.wait_log("the reconcile", |l| l.contains(" INFO  reconciled "));
    assert_eq!(names_in(&dir.path), ["a.json", "b.json", "c.json"]);
    let files = |names: &[&str]| -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|n| fs::read(dir.path.join(format!("{n}.json"))).unwrap())
            .collect()
    };
    let before = files(&["a", "b", "c"]);

    // Gone: the files stay, the status says so.
    etcd.kill_member(0);
    let mark = f.mark();
    f.wait_log_since(mark, "etcd unreachable", |l| {
        l.contains(" WARN  etcdctl failed") && l.contains("left as they are")
    });
    wait_for("the status to say etcd is unreachable", WAIT, || {
        (status_of(&f)["etcd_reachable"] == false).then_some(())
    });
    // Changed meanwhile through the other members: a put, a delete, a bad put.
    let d = app_value("d", 6300);
    etcd.put_key(&format!("{PREFIX}d"), &d);
    etcd.del_key(&format!("{PREFIX}a"));
    etcd.put_key(&format!("{PREFIX}b"), "{\"Name\": \"b\"}");
    assert_eq!(files(&["a", "b", "c"]), before);

    // Back: caught up from the last revision applied, no new listing.
    let mark = f.mark();
    etcd.start_member(0);
    wait_written(&f, mark, &sha256sum(&app_file(&d)));
    wait_rejected(&f, mark, &format!("{PREFIX}b"));
    wait_for("a.json removed", WAIT, || {
        (!dir.path.join("a.json").exists()).then_some(())
    });
    assert_eq!(names_in(&dir.path), ["b.json", "c.json", "d.json"]);
    assert_eq!(files(&["b", "c"]), before[1..]);
    assert_eq!(
        f.lines_since(mark, |l| l.contains(" reconciled ")),
        Vec::<String>::new(),
        "a watch from the last revision, not a new listing"
    );

    // Gone again; this time the history it would resume from is compacted away.
    etcd.kill_member(0);
    let mark = f.mark();
    f.wait_log_since(mark, "etcd unreachable", |l| {
        l.contains(" WARN  etcdctl failed")
    });
    let e = app_value("e", 6300);
    etcd.put_key(&format!("{PREFIX}e"), &e);
    etcd.del_key(&format!("{PREFIX}c"));
    let out = etcd.ctl(&["compact", &etcd.revision().to_string()], b"");
    assert!(out.status.success(), "compact: {out:?}");
    let mark = f.mark();
    etcd.start_member(0);
    let line = f.wait_log_since(mark, "a new listing", |l| l.contains(" INFO  reconciled "));
    assert!(line.contains(", 1 removed, 1 refused"), "{line}");
    assert_eq!(names_in(&dir.path), ["b.json", "d.json", "e.json"]);
    assert_eq!(fs::read(dir.path.join("e.json")).unwrap(), app_file(&e));
    let revision = etcd.revision();
    wait_for("the status at etcd's revision", WAIT, || {
        let s = status_of(&f);
        (s["revision"].as_i64() >= Some(revision) && s["etcd_reachable"] == true).then_some(())
    });
}

/// One key: a bad value is never written, so a proxy started after it (a rolling restart)
/// starts on the last good file and serves (issue 20: it used to exit 1 on "unknown key").
#[test]
fn a_proxy_restarted_after_a_bad_put_starts_on_the_last_good_file() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "a_proxy_restarted_after_a_bad_put_starts_on_the_last_good_file",
            &why,
        );
    }
    let etcd = Etcd::start(1);
    let backend = Backend::tagged_at("127.0.0.1:0", "good");
    let port = free_port();
    let good = format!(
        "{{\"Apps\": [{{\"Name\": \"fleet\", \"Ports\": [{port}], \"Targets\": [\"{}\"]}}]}}\n",
        backend.addr
    );
    etcd.put(good.as_bytes());
    let dir = TempDir::new("sync-restart");
    let config = dir.path.join("config.json");
    let f = follower(&etcd.endpoints_from(0), &config);
    wait_written(&f, 0, &sha256sum(good.as_bytes()));
    let start_proxy = || {
        let mut cmd = Command::new(BIN);
        cmd.arg("simple").arg("-c").arg(&config);
        die_with_parent(&mut cmd);
        Proxy::spawn_cmd(cmd, TempDir::new("proxy"), config.clone())
    };
    let proxy = start_proxy();
    assert_eq!(
        common::field(&proxy.started_line(), "sha256").as_deref(),
        Some(sha256sum(good.as_bytes()).as_str())
    );
    let bad = good.replace("Targets", "Tragets");
    let mark = f.mark();
    etcd.put(bad.as_bytes());
    let (line, _) = wait_rejected(&f, mark, KEY);
    assert!(line.contains("unknown key \"Tragets\""), "{line}");
    assert_eq!(fs::read(&config).unwrap(), good.as_bytes());
    drop(proxy);
    let proxy = start_proxy();
    assert_eq!(
        common::field(&proxy.started_line(), "sha256").as_deref(),
        Some(sha256sum(good.as_bytes()).as_str())
    );
    exchange(SocketAddr::from(([127, 0, 0, 1], port)), "good").unwrap();
}

/// etcd rebuilt empty (revisions from 1 again, as after a wipe): the follower notices the lower
/// revision and lists again, but an empty prefix does not take the node's apps down: the files
/// stay (with a warning); what is put into the new etcd is followed.
#[test]
fn apps_follower_keeps_its_files_when_etcd_comes_back_empty() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "apps_follower_keeps_its_files_when_etcd_comes_back_empty",
            &why,
        );
    }
    let mut etcd = Etcd::start(1);
    for i in 0..20 {
        let name = format!("app{i}");
        etcd.put_key(&format!("{PREFIX}{name}"), &app_value(&name, 6300));
    }
    let dir = TempDir::new("sync-empty");
    let f = apps_follower(&etcd.endpoints_from(0), &dir.path);
    f.wait_log("the reconcile", |l| l.contains(" INFO  reconciled "));
    let before = names_in(&dir.path);
    assert_eq!(before.len(), 20);

    let mark = f.mark();
    etcd.wipe_member(0);
    etcd.start_member(0);
    etcd.wait_healthy();
    let line = f.wait_log_since(mark, "the empty prefix noticed", |l| {
        l.contains(" WARN  etcd prefix ") && l.contains(" holds no key ")
    });
    assert!(line.contains("the 20 app files"), "{line}");
    assert_eq!(names_in(&dir.path), before);
    let value = app_value("fresh", 6301);
    let mark = f.mark();
    etcd.put_key(&format!("{PREFIX}fresh"), &value);
    wait_written(&f, mark, &sha256sum(&app_file(&value)));
    assert_eq!(names_in(&dir.path).len(), 21);
}

/// End to end, one key per app: the follower writes the directory and `flyproxy simple -c DIR`
/// serves it; an app put into etcd is served by the proxy, a bad put for it is refused by the
/// follower while the proxy serves on, and a deleted app is served no more.
///
/// Needs the proxy's directory mode (`-c DIR`, issue 20, the plane branch).
#[test]
fn end_to_end_an_app_put_into_etcd_is_served_by_a_proxy_reading_the_directory() {
    if let Some(why) = etcd_missing() {
        return cannot_run(
            "end_to_end_an_app_put_into_etcd_is_served_by_a_proxy_reading_the_directory",
            &why,
        );
    }
    let etcd = Etcd::start(1);
    let backend = Backend::tagged_at("127.0.0.1:0", "e2e");
    let target = backend.addr.to_string();
    let value = |name: &str, port: u16| {
        format!(r#"{{"Name": "{name}", "Ports": [{port}], "Targets": ["{target}"]}}"#)
    };
    let ports = common::free_ports(2);
    etcd.put_key(&format!("{PREFIX}first"), &value("first", ports[0]));
    let dir = TempDir::new("e2e");
    let apps = dir.path.join("apps");
    let f = apps_follower(&etcd.endpoints_from(0), &apps);
    f.wait_log("the reconcile", |l| l.contains(" INFO  reconciled "));
    let mut cmd = Command::new(BIN);
    cmd.arg("simple")
        .arg("-c")
        .arg(&apps)
        .args(["--reload-interval", "100ms"]);
    die_with_parent(&mut cmd);
    let mut proxy = Proxy::spawn_cmd(cmd, TempDir::new("e2e-proxy"), apps.clone());
    proxy
        .wait_started()
        .expect("the proxy starts on the directory");
    let served = |port: u16| exchange(SocketAddr::from(([127, 0, 0, 1], port)), "e2e");
    served(ports[0]).unwrap();

    // A put: served by the proxy.
    let t0 = Instant::now();
    etcd.put_key(&format!("{PREFIX}second"), &value("second", ports[1]));
    wait_for("the new app served", WAIT, || served(ports[1]).ok());
    eprintln!("put served {:?} after etcd accepted it", t0.elapsed());

    // A bad put for it: never written, the proxy serves its last good version.
    let mark = f.mark();
    let bad = format!(
        r#"{{"Name": "second", "Ports": [{}], "Tragets": []}}"#,
        ports[1]
    );
    etcd.put_key(&format!("{PREFIX}second"), &bad);
    wait_rejected(&f, mark, &format!("{PREFIX}second"));
    served(ports[1]).unwrap();

    // Deleted: its file removed, and the proxy stops serving it.
    etcd.del_key(&format!("{PREFIX}second"));
    wait_for("the deleted app no longer served", WAIT, || {
        served(ports[1]).is_err().then_some(())
    });
    served(ports[0]).unwrap();
}
