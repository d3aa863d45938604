//! Helpers for the `flyproxy bpf` tests: a network namespace of the test's own, the proxy
//! started in it, and what `bpftool` says about the sk_lookup program attached there.
//!
//! A network namespace belongs to a thread. [`run`] creates a fresh thread, moves that thread
//! into a new namespace with `unshare(CLONE_NEWNET)`, brings `lo` up and runs the test body
//! there; every thread spawned from it and every process it starts (backends, the proxy)
//! inherit the namespace. So a test never steers the host's ports, tests run in parallel
//! (nextest's processes or `cargo test`'s threads alike), and fixed port numbers are fine.
//!
//! A test that cannot run (not root, no namespaces, a kernel without sk_lookup) is skipped with
//! a message, except in CI (`CI` set to anything but empty, `0` or `false`), where it fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::thread;
use std::time::Instant;

use serde_json::Value;

use crate::common::{self, connect, expect_closed, read_line, roundtrip, wait_for, WAIT};

/// Whether a bpf test that cannot run is a failure (defined in `common`).
pub use crate::common::in_ci;

/// The port of the proxy's own listener. Any port works: the namespace is the test's own.
pub const LISTENER_PORT: u16 = common::BPF_LISTENER_PORT;

/// `127.0.0.1:port`.
pub fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `[::1]:port`.
pub fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

/// Run `body` on a thread of its own, in a network namespace of its own with `lo` up, ready for
/// bpf mode. Skips (prints why and returns) when that is impossible here, or fails in CI.
pub fn run(test: &'static str, body: impl FnOnce(Netns) + Send + 'static) {
    on_thread(test, move || match Netns::enter() {
        Ok(ns) => body(ns),
        Err(why) => skip(test, &why),
    });
}

/// Run `body` on a thread of its own, in a network namespace of its own with `lo` up (`Some`;
/// no bpf needed). Where none can be made (not root): with `required`, skip or fail in CI as
/// [`run`] does; without, run `body` on the host (`None`).
#[allow(dead_code)] // used by tests/modes; not every crate that includes this module has it
pub fn run_plain(
    test: &'static str,
    required: bool,
    body: impl FnOnce(Option<Netns>) + Send + 'static,
) {
    on_thread(test, move || match Netns::enter_plain() {
        Ok(ns) => body(Some(ns)),
        Err(why) if required => skip(test, &why),
        Err(_) => body(None),
    });
}

/// A test that cannot run here: skipped with a message, or a failure in CI.
fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: cannot run in CI (CI is set, so this is a failure): {why}");
    }
    eprintln!("skipping {test}: {why}");
}

/// Run `f` on a new thread named `test` (a namespace entered there stays there) and pass on
/// its panic.
fn on_thread(test: &'static str, f: impl FnOnce() + Send + 'static) {
    let outcome = thread::Builder::new()
        .name(test.to_owned())
        .spawn(f)
        .expect("spawn the test's thread");
    if let Err(panic) = outcome.join() {
        std::panic::resume_unwind(panic);
    }
}

/// The calling thread's own network namespace (see [`run`]).
pub struct Netns {
    /// Inode of `/proc/thread-self/ns/net`: what bpftool shows as a link's `netns_ino`.
    pub ino: u64,
}

impl Netns {
    /// Move the calling thread into a new network namespace and bring `lo` up there, for bpf
    /// mode (root, a kernel with sk_lookup, bpftool). `Err` says why the bpf tests cannot run
    /// on this machine.
    fn enter() -> Result<Netns, String> {
        check_kernel()?;
        let ns = Netns::enter_plain()?;
        assert!(
            Command::new("bpftool")
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "bpftool is needed to check what the proxy attached (install it: make deps)"
        );
        Ok(ns)
    }

    /// Move the calling thread into a new network namespace and bring `lo` up there (root).
    /// `Err` says why it cannot be done here.
    pub fn enter_plain() -> Result<Netns, String> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "needs root (CAP_SYS_ADMIN for a network namespace, CAP_BPF and \
                        CAP_NET_ADMIN for the sk_lookup program)"
                    .to_owned(),
            );
        }
        // SAFETY: unshare affects only the calling thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        loopback_up();
        let ino = fs::metadata("/proc/thread-self/ns/net")
            .expect("stat /proc/thread-self/ns/net")
            .ino();
        Ok(Netns { ino })
    }

    /// The sk_lookup links attached to this namespace, as `(link id, program id)`.
    pub fn links(&self) -> Vec<(u64, u64)> {
        bpftool(&["link", "show"])
            .as_array()
            .expect("bpftool link show: an array")
            .iter()
            .filter(|l| {
                l["type"] == "netns"
                    && l["attach_type"] == "sk_lookup"
                    && l["netns_ino"].as_u64() == Some(self.ino)
            })
            .map(|l| (l["id"].as_u64().unwrap(), l["prog_id"].as_u64().unwrap()))
            .collect()
    }

    /// The proxy's attachment: exactly one sk_lookup link in this namespace, its program named
    /// `steer`, and the program's `bindings` and `hosts` maps, whose descriptors process `pid`
    /// holds.
    pub fn steering(&self, pid: u32) -> Steering {
        let links = self.links();
        assert_eq!(
            links.len(),
            1,
            "sk_lookup links in this netns (ino {}): {links:?}",
            self.ino
        );
        let (link, prog) = links[0];
        let p =
            prog_by_id(prog).unwrap_or_else(|| panic!("program {prog} of link {link} not listed"));
        assert_eq!(p["type"], "sk_lookup", "{p}");
        assert_eq!(p["name"], "steer", "{p}");
        let map_named = |name: &str| {
            p["map_ids"]
                .as_array()
                .expect("map_ids")
                .iter()
                .map(|m| m.as_u64().unwrap())
                .find(|&m| bpftool(&["map", "show", "id", &m.to_string()])["name"] == name)
                .unwrap_or_else(|| panic!("program {prog} has no map named {name}: {p}"))
        };
        let (ports_map, hosts_map) = (map_named("bindings"), map_named("hosts"));
        // This bpftool may be built without pid support (no `pids` in its JSON): ownership is
        // checked through the proxy's own descriptors instead.
        let held = bpf_map_ids_of(pid);
        for map in [ports_map, hosts_map] {
            assert!(
                held.contains(&map),
                "the proxy (pid {pid}) holds no fd of map {map} (it holds maps {held:?})",
            );
        }
        Steering {
            link,
            prog,
            ports_map,
            hosts_map,
        }
    }

    /// Wait until nothing of `steering` is left: no sk_lookup link in this namespace and its
    /// program unloaded.
    pub fn wait_nothing_attached(&self, steering: &Steering) {
        wait_for(
            &format!(
                "no sk_lookup link left in netns {} (ours was link {}) and program {} unloaded",
                self.ino, steering.link, steering.prog
            ),
            WAIT,
            || (self.links().is_empty() && prog_by_id(steering.prog).is_none()).then_some(()),
        );
    }
}

/// What the proxy attached, by bpftool ids.
#[derive(Debug, Clone, Copy)]
pub struct Steering {
    pub link: u64,
    pub prog: u64,
    /// The `bindings` trie (prefixes shorter than one address).
    pub ports_map: u64,
    /// The `hosts` hash map (IPv4 /32 and IPv6 /128 bindings).
    pub hosts_map: u64,
}

impl Steering {
    /// The ports in the `bindings` map (on any address).
    pub fn ports(&self) -> BTreeSet<u16> {
        self.bindings().into_iter().map(|(_, port)| port).collect()
    }

    /// The bindings as (prefix, port): `198.51.100.0/24`, `::/0`, `127.0.0.2/32`: the
    /// `bindings` trie's and the `hosts` map's (whose keys are a trie key without its prefix
    /// length: one address exactly).
    pub fn bindings(&self) -> BTreeSet<(String, u16)> {
        let hosts = bpftool(&["map", "dump", "id", &self.hosts_map.to_string()]);
        let hosts = hosts.as_array().expect("bpftool map dump: an array");
        bpftool(&["map", "dump", "id", &self.ports_map.to_string()])
            .as_array()
            .expect("bpftool map dump: an array")
            .iter()
            .map(|e| (e, false))
            .chain(hosts.iter().map(|e| (e, true)))
            .map(|(e, host)| {
                let bytes: Vec<u8> = e["key"]
                    .as_array()
                    .expect("raw key bytes")
                    .iter()
                    .map(|b| {
                        u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16)
                            .unwrap()
                    })
                    .collect();
                // struct host_key: struct binding_key without its prefix length (160 bits: the
                // port and a whole address).
                let bytes = if host {
                    assert_eq!(bytes.len(), 20, "a hosts key is 20 bytes");
                    [(32u32 + 128).to_ne_bytes().to_vec(), bytes].concat()
                } else {
                    bytes
                };
                // struct binding_key: prefixlen (u32, host order) counting the 32 port bits
                // and the address bits; the port (u32, host order); the address, IPv4 mapped.
                assert_eq!(bytes.len(), 24, "a binding key is 24 bytes");
                let word = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap());
                let (bits, port) = (word(0) - 32, word(4) as u16);
                let addr = Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[8..24]).unwrap());
                let prefix = match addr.to_ipv4_mapped() {
                    Some(v4) if bits >= 96 => format!("{v4}/{}", bits - 96),
                    _ => format!("{addr}/{bits}"),
                };
                (prefix, port)
            })
            .collect()
    }

    /// Freeze the `bindings` and `hosts` maps: from now on every update from a syscall fails
    /// with EPERM.
    pub fn freeze_ports_map(&self) {
        for map in [self.ports_map, self.hosts_map] {
            run_bpftool(&["map", "freeze", "id", &map.to_string()]);
            let m = bpftool(&["map", "show", "id", &map.to_string()]);
            assert_eq!(m["frozen"], 1, "{m}");
        }
    }
}

/// `bpftool -j ARGS`, parsed; panics with bpftool's stderr if it fails.
fn bpftool(args: &[&str]) -> Value {
    let out = run_bpftool(args);
    if out.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool -j {args:?}: {e}: {out}"))
}

fn run_bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool {args:?}: {e}"));
    assert!(
        out.status.success(),
        "bpftool -j {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("bpftool output is UTF-8")
}

/// The loaded program with this id, if any (listing all rather than `show id`, whose failure
/// for a missing id would look like any other).
fn prog_by_id(id: u64) -> Option<Value> {
    bpftool(&["prog", "show"])
        .as_array()
        .expect("bpftool prog show: an array")
        .iter()
        .find(|p| p["id"].as_u64() == Some(id))
        .cloned()
}

/// Ids of the BPF maps `pid` holds a descriptor of (from /proc/PID/fdinfo).
fn bpf_map_ids_of(pid: u32) -> BTreeSet<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
    {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("map_id:"))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    ids
}

/// Linux 5.9 or later (sk_lookup); `Err` says what this kernel is.
fn check_kernel() -> Result<(), String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) < (5, 9) => Err(format!(
            "kernel {} has no sk_lookup programs (5.9 or later needed)",
            release.trim()
        )),
        _ => Ok(()),
    }
}

/// A network namespace kept by its descriptor, for tests that need several at once (a fleet of
/// proxies on the same ports, each with its own `lo`). Threads enter it with [`Namespace::spawn`]
/// and processes they start live in it; it ends when the descriptor and those processes are gone.
/// Things that must be dropped inside it (an in-test `Backend` connects to itself to stop) are
/// dropped through [`Namespace::run`].
#[derive(Clone)]
#[allow(dead_code)] // used by tests/fleet.rs; tests/bpf.rs includes this module too
pub struct Namespace {
    fd: std::sync::Arc<OwnedFd>,
}

#[allow(dead_code)]
impl Namespace {
    /// A new namespace with `lo` up. `Err` says why it cannot be made here (not root).
    pub fn new() -> Result<Namespace, String> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (CAP_SYS_ADMIN for network namespaces)".to_owned());
        }
        thread::spawn(|| {
            // SAFETY: unshare affects only this short-lived thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                ));
            }
            loopback_up();
            let file = fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
            Ok(Namespace {
                fd: std::sync::Arc::new(OwnedFd::from(file)),
            })
        })
        .join()
        .expect("the namespace thread")
    }

    /// Run `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let fd = std::sync::Arc::clone(&self.fd);
        thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor we own; it moves only this new thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
    }

    /// [`Namespace::spawn`] and wait for the result (a panic inside goes on here).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// `ip link set lo up` in the calling thread's namespace, by ioctl.
fn loopback_up() {
    // SAFETY: socket(2); the result is checked and owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(sock >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: a zeroed ifreq is valid; the name is NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        let rc = libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr);
        assert_eq!(rc, 0, "SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        let rc = libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr);
        assert_eq!(rc, 0, "SIOCSIFFLAGS lo: {}", io::Error::last_os_error());
    }
}

/// Add the IPv6 address `addr` to `lo` in the calling thread's namespace, and wait until a TCP
/// connection to it works. `ip addr add` returns with the address listed and its prefix route
/// (main table) in place, but the kernel installs the address's *local* route (table local,
/// which makes packets to it delivered here) later, from the DAD workqueue, even with `nodad`;
/// until then a connect fails with "network is unreachable" (seen 1 run in 4 under the whole
/// suite's load). A route lookup (a UDP connect) already succeeds on the prefix route, so the
/// probe is what the tests do: a TCP connect to a listener on the address.
#[allow(dead_code)] // used by tests/shared_ports.rs and tests/limits.rs
pub fn add_v6(addr: Ipv6Addr) {
    let out = Command::new("ip")
        .args([
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "lo",
            "nodad",
        ])
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip -6 addr add {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A listener on the address (bind may fail while the address is still tentative) and a
    // connection to it (which needs the local route).
    common::wait_for(&format!("a TCP connection to {addr}"), common::WAIT, || {
        let probe = std::net::TcpListener::bind((addr, 0)).ok()?;
        let at = probe.local_addr().ok()?;
        TcpStream::connect_timeout(&at, std::time::Duration::from_millis(200)).ok()
    });
}

/// Connect to `addr`, read the tag of the backend that answered, check that bytes go both
/// ways, then close cleanly (half-close, then EOF from the proxy). The tag names the app.
pub fn ask(addr: SocketAddr) -> String {
    let mut s = connect(addr);
    let tag = read_line(&mut s);
    roundtrip(&mut s, format!("hello via {addr}\n").as_bytes());
    s.shutdown(Shutdown::Write).expect("shutdown write");
    expect_closed(&mut s, WAIT);
    tag
}

/// [`ask`] without panicking: `Err` says what went wrong.
pub fn try_ask(addr: SocketAddr) -> Result<String, String> {
    let err = |what: &str, e: io::Error| format!("{addr}: {what}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| err("connect", e))?;
    s.set_read_timeout(Some(WAIT))
        .map_err(|e| err("timeout", e))?;
    let mut tag = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("{addr}: EOF before the tag (got {tag:?})")),
            Ok(_) => tag.push(b[0]),
            Err(e) => return Err(err("read", e)),
        }
    }
    tag.pop();
    s.write_all(b"ping\n").map_err(|e| err("write", e))?;
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo).map_err(|e| err("read echo", e))?;
    if &echo != b"ping\n" {
        return Err(format!("{addr}: echo {echo:?}"));
    }
    Ok(String::from_utf8_lossy(&tag).into_owned())
}

/// A process that is not our child (the one an upgrade starts), SIGKILLed on drop unless it
/// is gone already, so that a failing test leaves nothing running in its namespace.
pub struct Stray(pub u32);

impl Stray {
    /// Whether the process is gone (or a zombie waiting for its parent).
    pub fn gone(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.0)) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on a pid we were told about.
        let rc = unsafe { libc::kill(self.0 as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.0,
            io::Error::last_os_error()
        );
    }
}

impl Drop for Stray {
    fn drop(&mut self) {
        if !self.gone() {
            // SAFETY: as in signal.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
            // Bounded, and never a panic: this may run while a failed test unwinds.
            for _ in 0..2000 {
                if self.gone() {
                    break;
                }
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Assert that `port` reaches app `app` over IPv4 and IPv6.
pub fn assert_reaches(port: u16, app: &str) {
    for addr in [v4(port), v6(port)] {
        assert_eq!(ask(addr), app, "{addr} should reach app {app}");
    }
}

/// Assert that connections to `port` are refused over IPv4 and IPv6.
pub fn assert_refused(port: u16) {
    for addr in [v4(port), v6(port)] {
        common::expect_refused(addr);
    }
}

/// Milliseconds of `took=1.234ms` in a log line.
pub fn took_ms(line: &str) -> f64 {
    common::field(line, "took")
        .and_then(|v| v.strip_suffix("ms").and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no took=...ms in {line:?}"))
}

/// Seconds of `duration=1.234s` in a conn line.
pub fn duration_s(c: &common::ConnLine) -> f64 {
    c.duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad duration in {:?}", c.line))
}

/// Time since `t`, in milliseconds.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
