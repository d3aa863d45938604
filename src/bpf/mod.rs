//! The eBPF half of "any number of ports on one socket": loads the sk_lookup
//! program in `steer.bpf.c`, puts the proxy's listening sockets into its sockmap,
//! attaches it to the current network namespace, and edits the steered (address prefix,
//! port) bindings.
//!
//! Ownership: [`Steering`] holds the attachment ([`Link`]) and handles to the maps it
//! edits later. The skeleton and libbpf's `Object` only live inside
//! [`Steering::attach`]; the kernel keeps the program and maps alive through the link
//! and our own map file descriptors, so nothing here borrows from anything else.

use std::fmt;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, Link, MapCore, MapFlags, MapHandle, ProgramType};

use crate::config::prefix::Prefix;

/// The generated skeleton (`SteerSkelBuilder`, `SteerSkel`), built by build.rs. Lints are
/// silenced on the generated code alone.
#[allow(unused_imports, clippy::all, clippy::pedantic, clippy::nursery)]
mod steer {
    include!(concat!(env!("OUT_DIR"), "/steer.skel.rs"));
}

use steer::SteerSkelBuilder;

/// The network namespace the program is attached to. `thread-self` rather than
/// `self`: a namespace belongs to a thread, and `/proc/self` names the thread-group
/// leader's. On the proxy's main thread the two are the same; in tests that
/// `unshare(CLONE_NEWNET)` on a worker thread only `thread-self` is right.
const NETNS_PATH: &str = "/proc/thread-self/ns/net";

/// Keys of the `listeners` sockmap (LISTENER_V4/LISTENER_V6 in steer.bpf.c).
const LISTENER_V4: u32 = 0;
const LISTENER_V6: u32 = 1;

/// Indices of the per-CPU `stats` counters (enum stat in steer.bpf.c).
const STAT_STEERED: u32 = 0;
const STAT_DROPPED_NO_LISTENER: u32 = 1;
const STAT_PASSED: u32 = 2;
const STAT_DROPPED_ASSIGN: u32 = 3;

/// A step of [`Steering::attach`], named in errors so a failure says what was
/// being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Parsing the BPF object embedded in the binary.
    Open,
    /// Creating the maps and loading the program into the kernel (verifier included).
    Load,
    /// Putting the IPv4 listener into the sockmap.
    ListenerV4,
    /// Putting the IPv6 listener into the sockmap.
    ListenerV6,
    /// Writing the --bind address into its map.
    Bind,
    /// Attaching the program to the network namespace.
    Attach,
    /// Duplicating the map file descriptors kept by [`Steering`].
    MapHandles,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Open => f.write_str("opening the embedded BPF object"),
            Step::Load => f.write_str("loading the sk_lookup program"),
            Step::ListenerV4 => f.write_str("putting the IPv4 listener into the sockmap"),
            Step::ListenerV6 => f.write_str("putting the IPv6 listener into the sockmap"),
            Step::Bind => f.write_str("writing the --bind address into its map"),
            Step::Attach => write!(f, "attaching the sk_lookup program to {NETNS_PATH}"),
            Step::MapHandles => f.write_str("duplicating the BPF map file descriptors"),
        }
    }
}

/// Why steering could not be set up or changed.
///
/// `Display` is a complete, readable message that already ends with the lower-level
/// cause, so `source()` returns `None` (printing the chain would repeat it).
#[derive(Debug)]
pub enum BpfError {
    /// The kernel refused a step with EPERM/EACCES: the process lacks the
    /// capabilities (CAP_BPF and CAP_NET_ADMIN).
    PermissionDenied {
        /// The step that was refused.
        step: Step,
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// The kernel's verifier rejected the program although the process has the
    /// capabilities (libbpf prints the verifier's log on stderr).
    Rejected {
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// The running kernel has no sk_lookup program type (Linux 5.9 or later is needed).
    KernelUnsupported {
        /// The kernel release, as `uname -r` prints it.
        release: String,
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// The network namespace file could not be opened (is /proc mounted?).
    Netns {
        /// The path that was opened.
        path: &'static str,
        /// Why opening it failed.
        source: io::Error,
    },
    /// A step of [`Steering::attach`] failed for another reason.
    Setup {
        /// The step that failed.
        step: Step,
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// Adding a port to, or removing it from, the `ports` map failed.
    Port {
        /// The port being added or removed.
        port: u16,
        /// `true` when adding, `false` when removing.
        adding: bool,
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// Reading the `stats` map failed.
    Stats {
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
    /// Zeroing a port group's counters (before the group is given to another app) failed.
    ClearGroup {
        /// The group whose counters were being zeroed.
        group: u32,
        /// What libbpf reported.
        source: libbpf_rs::Error,
    },
}

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:#}` on a libbpf_rs::Error prints its whole context chain down to the errno.
        match self {
            BpfError::Rejected { source } => write!(
                f,
                "the kernel's verifier rejected the sk_lookup program (its log is printed \
                 above); libbpf said: {source:#}"
            ),
            BpfError::PermissionDenied { step, source } => write!(
                f,
                "{step} was refused: flyproxy bpf needs CAP_BPF and CAP_NET_ADMIN \
                 (run as root or grant them); libbpf said: {source:#}"
            ),
            BpfError::KernelUnsupported { release, source } => write!(
                f,
                "this kernel ({}) does not support sk_lookup programs: \
                 Linux 5.9 or later is needed; libbpf said: {source:#}",
                major_minor(release)
            ),
            BpfError::Netns { path, source } => write!(
                f,
                "opening the network namespace {path} to attach the sk_lookup program \
                 failed: {source}"
            ),
            BpfError::Setup { step, source } => write!(f, "{step} failed: {source:#}"),
            BpfError::Port {
                port,
                adding: true,
                source,
            } => write!(
                f,
                "adding port {port} to the BPF bindings map failed: {source:#}"
            ),
            BpfError::Port {
                port,
                adding: false,
                source,
            } => write!(
                f,
                "removing port {port} from the BPF bindings map failed: {source:#}"
            ),
            BpfError::Stats { source } => {
                write!(f, "reading the BPF stats map failed: {source:#}")
            }
            BpfError::ClearGroup { group, source } => write!(
                f,
                "zeroing the lookup counters of port group {group} failed: {source:#}"
            ),
        }
    }
}

impl std::error::Error for BpfError {}

/// The sk_lookup program, attached to the network namespace, and the maps it reads.
///
/// Dropping it (or calling [`Steering::detach`]) detaches the program: connections
/// to the steered ports are refused again at once, since nothing listens on them.
/// The listener sockets given to [`Steering::attach`] must stay open for as long as
/// steering should work: closing one removes it from the sockmap.
#[derive(Debug)]
pub struct Steering {
    /// The attachment; `None` after [`Steering::detach`]. Never forgotten or
    /// disconnected: dropping it is what detaches the program.
    link: Option<Link>,
    /// Our own fd of the `bindings` map (the skeleton's copy was closed with it).
    bindings: MapHandle,
    /// Our own fds of the counter maps.
    counters: Counters,
}

/// Reads the program's per-CPU counters. Holds its own map fds, so a copy can live on the
/// metrics thread while the `Steering` stays with the listener loop.
#[derive(Debug)]
pub struct Counters {
    stats: MapHandle,
    group_stats: MapHandle,
}

/// Port groups (apps) counted separately; must match MAX_GROUPS in steer.bpf.c. Groups at or
/// beyond it share the last counter.
pub const MAX_GROUPS: u32 = 4096;

impl Steering {
    /// Load the program, put the listener fds in the sockmap (v4 at key 0, v6 at
    /// key 1; either may be `None`), and attach to the calling thread's network
    /// namespace (`/proc/thread-self/ns/net`, the same as `/proc/self/ns/net` on the
    /// main thread).
    ///
    /// The listeners must already be listening (the sockmap accepts only TCP
    /// sockets in LISTEN or ESTABLISHED state), and should bind an address of
    /// their own family (the v6 one with IPV6_V6ONLY). No port is steered until
    /// [`Steering::add_port`]. Connections of a family given `None` (or whose
    /// listener was closed) to steered ports are refused (the program's SK_DROP
    /// makes the kernel answer the SYN with a RST); they never fall through to
    /// another socket bound to that port.
    ///
    /// With `bind` set, only connections to that address (or, for an unspecified address,
    /// to that family) are steered; others are left to the regular lookup.
    pub fn attach(
        v4: Option<BorrowedFd<'_>>,
        v6: Option<BorrowedFd<'_>>,
        bind: Option<IpAddr>,
    ) -> Result<Steering, BpfError> {
        // The skeleton borrows this storage, so it cannot outlive this function;
        // it does not need to. Everything kept afterwards is owned: the Link (its
        // own fd, which pins the program in the kernel) and duplicated map fds.
        // When the skeleton drops here, libbpf closes only its own fds.
        let mut storage = MaybeUninit::uninit();
        let open = SteerSkelBuilder::default()
            .open(&mut storage)
            .map_err(|source| BpfError::Setup {
                step: Step::Open,
                source,
            })?;
        let skel = open.load().map_err(|e| classify(Step::Load, e))?;

        // Listeners go in before the program is attached (and no port is steered
        // before add_port), so no connection ever meets a half-filled sockmap.
        for (key, fd, step) in [
            (LISTENER_V4, v4, Step::ListenerV4),
            (LISTENER_V6, v6, Step::ListenerV6),
        ] {
            let Some(fd) = fd else { continue };
            // A BorrowedFd is never negative, so the cast does not change the value.
            // The map's value is a __u64, and MapCore::update checks sizes exactly.
            let value = fd.as_raw_fd() as u64;
            skel.maps
                .listeners
                .update(&key.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
                .map_err(|e| classify(step, e))?;
        }

        if let Some(ip) = bind {
            skel.maps
                .bind
                .update(&0u32.to_ne_bytes(), &bind_value(ip), MapFlags::ANY)
                .map_err(|e| classify(Step::Bind, e))?;
        }

        let handle = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(map).map_err(|source| BpfError::Setup {
                step: Step::MapHandles,
                source,
            })
        };
        let bindings = handle(&skel.maps.bindings)?;
        let stats = handle(&skel.maps.stats)?;
        let group_stats = handle(&skel.maps.group_stats)?;

        let netns = fs::File::open(NETNS_PATH).map_err(|source| BpfError::Netns {
            path: NETNS_PATH,
            source,
        })?;
        let link = skel
            .progs
            .steer
            .attach_netns(netns.as_raw_fd())
            .map_err(|e| classify(Step::Attach, e))?;
        // `netns` is closed when it drops: the link holds its own reference.

        Ok(Steering {
            link: Some(link),
            bindings,
            counters: Counters { stats, group_stats },
        })
    }

    /// Steer connections to `prefix` on `port` (insert into the bindings map), counting
    /// their lookups under `group`. A longer prefix on the same port wins over it. Adding a
    /// binding twice overwrites its group.
    pub fn add_binding(&mut self, prefix: Prefix, port: u16, group: u32) -> Result<(), BpfError> {
        let value = binding_value(prefix, group);
        self.bindings
            .update(&binding_key(prefix, port), &value, MapFlags::ANY)
            .map_err(|source| BpfError::Port {
                port,
                adding: true,
                source,
            })
    }

    /// Stop steering `prefix` on `port`: new connections that only it covered take the
    /// kernel's normal lookup. Established connections are not affected. Removing a binding
    /// that is not there is not an error.
    pub fn remove_binding(&mut self, prefix: Prefix, port: u16) -> Result<(), BpfError> {
        match self.bindings.delete(&binding_key(prefix, port)) {
            Err(source) if source.kind() != ErrorKind::NotFound => Err(BpfError::Port {
                port,
                adding: false,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// Steer `port` on every address, IPv4 and IPv6.
    pub fn add_port(&mut self, port: u16, group: u32) -> Result<(), BpfError> {
        self.add_binding(Prefix::ALL_V4, port, group)?;
        self.add_binding(Prefix::ALL_V6, port, group)
    }

    /// Stop steering `port` on every address.
    pub fn remove_port(&mut self, port: u16) -> Result<(), BpfError> {
        self.remove_binding(Prefix::ALL_V4, port)?;
        self.remove_binding(Prefix::ALL_V6, port)
    }

    /// Stop steering every port at once, by dropping the link (used first thing
    /// on SIGTERM so new connections are refused immediately). Connections already
    /// accepted, or waiting in the listener's backlog, are not affected. It cannot
    /// be undone: the ports map can still be edited, but nothing reads it.
    pub fn detach(&mut self) {
        self.link = None;
    }

    /// Read the per-CPU stats counters, summed over CPUs: `(steered, dropped, passed)`.
    #[allow(dead_code)]
    pub fn stats(&self) -> Result<(u64, u64, u64), BpfError> {
        self.counters.totals()
    }

    /// Zero the lookup counters of port `group`, so that an app given a group another app
    /// had starts from nothing.
    pub fn clear_group(&self, group: u32) -> Result<(), BpfError> {
        let fail = |source| BpfError::ClearGroup { group, source };
        let cpus = libbpf_rs::num_possible_cpus().map_err(fail)?;
        let zeros = vec![vec![0u8; 8]; cpus];
        let g = group.min(MAX_GROUPS - 1);
        for index in [g * 2, g * 2 + 1] {
            self.counters
                .group_stats
                .update_percpu(&index.to_ne_bytes(), &zeros, MapFlags::ANY)
                .map_err(fail)?;
        }
        Ok(())
    }

    /// A reader of the counters with fds of its own, for another thread.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let dup = |m: &MapHandle| {
            MapHandle::try_from(m).map_err(|source| BpfError::Setup {
                step: Step::MapHandles,
                source,
            })
        };
        Ok(Counters {
            stats: dup(&self.counters.stats)?,
            group_stats: dup(&self.counters.group_stats)?,
        })
    }
}

impl Counters {
    /// Every lookup for our ports, summed over CPUs: `(steered, dropped, passed)`.
    pub fn totals(&self) -> Result<(u64, u64, u64), BpfError> {
        let steered = sum_percpu(&self.stats, STAT_STEERED)?;
        let dropped = sum_percpu(&self.stats, STAT_DROPPED_NO_LISTENER)?
            .wrapping_add(sum_percpu(&self.stats, STAT_DROPPED_ASSIGN)?);
        let passed = sum_percpu(&self.stats, STAT_PASSED)?;
        Ok((steered, dropped, passed))
    }

    /// `(steered, dropped)` for one port group.
    pub fn group(&self, group: u32) -> Result<(u64, u64), BpfError> {
        let g = group.min(MAX_GROUPS - 1);
        Ok((
            sum_percpu(&self.group_stats, g * 2)?,
            sum_percpu(&self.group_stats, g * 2 + 1)?,
        ))
    }
}

/// The `bind` map's value (struct bind_addr in steer.bpf.c): family, whether to match the
/// address, then the address in network order (IPv4, IPv6).
fn bind_value(ip: IpAddr) -> [u8; 28] {
    let mut v = [0u8; 28];
    let (family, match_addr) = match ip {
        IpAddr::V4(a) => {
            v[8..12].copy_from_slice(&a.octets());
            (AF_INET, !a.is_unspecified())
        }
        IpAddr::V6(a) => {
            v[12..28].copy_from_slice(&a.octets());
            (AF_INET6, !a.is_unspecified())
        }
    };
    v[0..4].copy_from_slice(&family.to_ne_bytes());
    v[4..8].copy_from_slice(&u32::from(match_addr).to_ne_bytes());
    v
}

/// The `bindings` key of (prefix, port), as `struct binding_key` in steer.bpf.c: prefix length
/// in bits of what follows, the port as a host-order u32, then the address in network order,
/// IPv4 v4-mapped.
pub fn binding_key(prefix: Prefix, port: u16) -> [u8; 24] {
    let (addr, bits) = match prefix.addr() {
        IpAddr::V4(a) => (
            a.to_ipv6_mapped().octets(),
            96 + u32::from(prefix.prefix_len()),
        ),
        IpAddr::V6(a) => (a.octets(), u32::from(prefix.prefix_len())),
    };
    let mut k = [0u8; 24];
    k[0..4].copy_from_slice(&(32 + bits).to_ne_bytes());
    k[4..8].copy_from_slice(&u32::from(port).to_ne_bytes());
    k[8..24].copy_from_slice(&addr);
    k
}

/// The `bindings` value, as `struct binding`: the port group and the prefix's family.
fn binding_value(prefix: Prefix, group: u32) -> [u8; 8] {
    let family = if prefix.is_v4() { AF_INET } else { AF_INET6 };
    let mut v = [0u8; 8];
    v[0..4].copy_from_slice(&group.to_ne_bytes());
    v[4..8].copy_from_slice(&family.to_ne_bytes());
    v
}

/// Address families as the program compares them (ctx->family).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// One counter of a per-CPU array map, summed over CPUs.
fn sum_percpu(map: &MapHandle, index: u32) -> Result<u64, BpfError> {
    let per_cpu = map
        .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
        .map_err(|source| BpfError::Stats { source })?
        // An array map has every index below max_entries, so None means the
        // index is out of range: a mismatch with steer.bpf.c.
        .ok_or_else(|| stats_error(format!("no counter at index {index}")))?;
    per_cpu.iter().try_fold(0u64, |sum, value| {
        let bytes = <[u8; 8]>::try_from(value.as_slice())
            .map_err(|_| stats_error(format!("counter value is {} bytes, not 8", value.len())))?;
        Ok(sum.wrapping_add(u64::from_ne_bytes(bytes)))
    })
}

fn stats_error(message: String) -> BpfError {
    BpfError::Stats {
        source: io::Error::new(io::ErrorKind::InvalidData, message).into(),
    }
}

/// Turn a failed step into the error a user can act on: missing capabilities, a
/// kernel too old for sk_lookup, or else the step and libbpf's message.
fn classify(step: Step, source: libbpf_rs::Error) -> BpfError {
    // EPERM and EACCES both map to PermissionDenied. Checked before probing, because
    // an unprivileged probe cannot load anything and would report "unsupported".
    // (The verifier also rejects a program with EACCES; libbpf then prints the
    // verifier log on stderr, and the message still ends with libbpf's error.)
    if source.kind() == ErrorKind::PermissionDenied {
        // A process that holds the capabilities and still gets EACCES at load was refused
        // by the verifier, not for lack of privilege: say so rather than send the operator
        // looking for capabilities they already have.
        if step == Step::Load && has_bpf_capabilities() {
            return BpfError::Rejected { source };
        }
        return BpfError::PermissionDenied { step, source };
    }
    if matches!(step, Step::Load | Step::Attach) && kernel_lacks_sk_lookup(&source) {
        return BpfError::KernelUnsupported {
            release: kernel_release(),
            source,
        };
    }
    BpfError::Setup { step, source }
}

/// Whether this process holds CAP_BPF (or CAP_SYS_ADMIN, which older kernels ask for) in its
/// effective set. Capabilities are per thread: read the calling thread's.
fn has_bpf_capabilities() -> bool {
    use crate::sys::caps::Cap;
    crate::sys::caps::current()
        .is_ok_and(|c| c.effective.contains(Cap::Bpf) || c.effective.contains(Cap::SysAdmin))
}

/// Whether the failure of a load or attach is the kernel not knowing sk_lookup.
fn kernel_lacks_sk_lookup(source: &libbpf_rs::Error) -> bool {
    // libbpf's probe loads a minimal sk_lookup program: a clear answer whatever
    // errno the real load returned (EINVAL for an unknown program type, or ENOTSUPP,
    // which has no io::ErrorKind of its own).
    match ProgramType::SkLookup.is_supported() {
        Ok(supported) => !supported,
        // The probe itself failed; fall back to what the failed call said.
        Err(_) => matches!(
            source.kind(),
            ErrorKind::InvalidInput | ErrorKind::Unsupported
        ),
    }
}

/// The kernel release (`uname -r`), or "unknown".
fn kernel_release() -> String {
    // The same string uname(2) returns in `release`, without the unsafe call.
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// "X.Y" from a release such as "6.18.44-generic"; the whole release if it does
/// not start with a number.
fn major_minor(release: &str) -> &str {
    let numeric = release
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(release.len());
    let version = &release[..numeric];
    let end = version
        .match_indices('.')
        .nth(1)
        .map_or(version.len(), |(second_dot, _)| second_dot);
    if end == 0 {
        release
    } else {
        &release[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_minor_of_releases() {
        assert_eq!(major_minor("6.18.44-fc-v657"), "6.18");
        assert_eq!(major_minor("5.9.0"), "5.9");
        assert_eq!(major_minor("5.10-rc1"), "5.10");
        assert_eq!(major_minor("6"), "6");
        assert_eq!(major_minor("unknown"), "unknown");
    }

    #[test]
    fn errors_name_what_is_missing() {
        let os = libbpf_rs::Error::from_raw_os_error;
        for errno in [libc::EPERM, libc::EACCES] {
            let err = classify(Step::Attach, os(errno));
            assert!(matches!(
                err,
                BpfError::PermissionDenied {
                    step: Step::Attach,
                    ..
                }
            ));
            assert!(err.to_string().starts_with(
                "attaching the sk_lookup program to /proc/thread-self/ns/net was refused: \
                 flyproxy bpf needs CAP_BPF and CAP_NET_ADMIN (run as root or grant them); "
            ));
        }
        let err = BpfError::KernelUnsupported {
            release: "5.4.0-150-generic".to_owned(),
            source: os(libc::EINVAL),
        };
        assert!(err.to_string().starts_with(
            "this kernel (5.4) does not support sk_lookup programs: Linux 5.9 or later is needed"
        ));
        let err = BpfError::Port {
            port: 8080,
            adding: true,
            source: os(libc::ENOMEM),
        };
        assert!(err
            .to_string()
            .starts_with("adding port 8080 to the BPF bindings map failed: "));
    }
}
