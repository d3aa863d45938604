//! Why steering could not be set up or changed, classified into what an operator can act on:
//! missing capabilities, a kernel without sk_lookup, a program the verifier refused, or else
//! the step that failed and libbpf's message.

use std::fmt;
use std::fs;
use std::io;

use libbpf_rs::{ErrorKind, ProgramType};

use crate::bpf::layout::NETNS_PATH;

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

/// A counter that could not be read as expected.
pub(super) fn stats_error(message: String) -> BpfError {
    BpfError::Stats {
        source: io::Error::new(io::ErrorKind::InvalidData, message).into(),
    }
}

/// Turn a failed step into the error a user can act on: missing capabilities, a
/// kernel too old for sk_lookup, or else the step and libbpf's message.
pub(super) fn classify(step: Step, source: libbpf_rs::Error) -> BpfError {
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
