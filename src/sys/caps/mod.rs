//! Dropping Linux capabilities once start-up no longer needs them, so a proxy that faces the
//! network holds only what its running life needs.
//!
//! What each mode keeps after start-up ([`keep_only`] is called once the listeners are up):
//!
//! - **bpf mode** keeps `CAP_BPF`, and `CAP_NET_ADMIN` as long as SIGUSR2 upgrades must work.
//!   Loading the sk_lookup program and attaching it to the network namespace need both
//!   (sk_lookup is a networking program type). Once attached, the program lives as long as our
//!   link fd, and this process never needs `CAP_NET_ADMIN` again; but an upgrade's new process
//!   loads and attaches a program of its own, with what the old one passes on through exec (see
//!   below). `CAP_BPF` stays because a reload writes the ports map with the `bpf()` syscall,
//!   and when `kernel.unprivileged_bpf_disabled` is set (Debian's default) older kernels, such
//!   as Debian 12's 6.1, refuse every `bpf()` command without it, map writes on a map fd we
//!   already hold included (newer ones check only program loads and map creation: measured on
//!   6.18). Everything else goes, `CAP_NET_BIND_SERVICE` included unless the listener or the
//!   metrics port is below 1024. Detaching on SIGTERM only closes the link fd, which needs
//!   nothing.
//! - **simple mode** keeps only `CAP_NET_BIND_SERVICE`, when it has it (root, or the unit's
//!   ambient capability): a reload may bind a new port below 1024.
//! - A process that has no capabilities at all (an ordinary user) is left as it is.
//!
//! An upgrade (SIGUSR2) execs the binary anew, and the new process gets what survives exec:
//! run as root, its bounding set; run as another user (the systemd units), its ambient set.
//! Both are narrowed to `keep`, never emptied, so the new process has exactly what the old one
//! kept, and can itself keep the same.
//!
//! Capabilities belong to a thread, not to the process: [`keep_only`] changes the calling
//! thread only, and threads inherit the sets of the thread that spawns them. So it must be
//! called before the other threads are spawned (relay pool, health checker, metrics), and a
//! thread that already exists (the log writer, started by the first log line) must drop its
//! own, for example with `keep_only(&[])` when it starts.
//!
//! The sets touched, in this order:
//! 1. the bounding set (the most the thread can ever regain, even through `execve` of a root or
//!    file-capability binary): every capability but `keep`, with `PR_CAPBSET_DROP`. That needs
//!    `CAP_SETPCAP`, so it is done first, while we may still have it; without it (a non-root
//!    service whose bounding set systemd already narrowed) it is skipped;
//! 2. the effective, permitted and inheritable sets: `keep` only, with `capset`. A capability
//!    in `keep` that the thread does not have is not an error: it cannot be gained here;
//! 3. the ambient set (what an `execve` passes on to a non-root program): every capability but
//!    `keep` is lowered (the kernel already lowers those no longer both permitted and
//!    inheritable; this makes sure).
//!
//! `sets` names the capabilities and their sets; `kernel` makes the system calls; `error`
//! says what failed.

mod error;
mod kernel;
mod sets;

use std::io;

pub use error::CapsError;
pub use kernel::current;
pub use sets::{Cap, CapSet, Caps};

use kernel::{drop_bounding, narrow_ambient, set};

/// Keep only `keep` (those of them the thread has) in the calling thread's effective,
/// permitted, inheritable and ambient sets, and drop everything else from its bounding set if
/// it may (`CAP_SETPCAP`). Threads it spawns afterwards inherit the result; see the module
/// documentation for where to call it. A thread without any capability is left as it is
/// (`Ok`). Calling it again with the same or a smaller `keep` is harmless.
pub fn keep_only(keep: &[Cap]) -> Result<(), CapsError> {
    let now = current()?;
    if now.effective.is_empty() && now.permitted.is_empty() && now.inheritable.is_empty() {
        // An ordinary user: nothing to drop (its ambient set is a subset of permitted, so
        // empty too), and the bounding set cannot be changed without CAP_SETPCAP.
        return Ok(());
    }
    let keep = CapSet::of(keep);

    // First, while CAP_SETPCAP may still be ours.
    drop_bounding(keep, now.effective)?;

    let kept = now.permitted.and(keep);
    let wanted = Caps {
        effective: kept,
        permitted: kept,
        inheritable: now.inheritable.and(keep),
    };
    set(wanted).map_err(|error| CapsError::Set { wanted, error })?;
    narrow_ambient(keep)?;

    let got = current()?;
    if got != wanted {
        return Err(CapsError::Mismatch { wanted, got });
    }
    Ok(())
}

/// Make the effective set the whole permitted set again: after a uid change with
/// `PR_SET_KEEPCAPS` the kernel keeps the permitted set but clears the effective one, and
/// [`keep_only`] needs CAP_SETPCAP effective to narrow the bounding set.
pub fn effective_from_permitted() -> Result<(), CapsError> {
    let now = current()?;
    let wanted = Caps {
        effective: now.permitted,
        ..now
    };
    set(wanted).map_err(|error| CapsError::Set { wanted, error })
}

/// After a switch of user with `PR_SET_KEEPCAPS` (see `user::switch`): the kernel kept the
/// permitted set but cleared the effective one. Make `keep` (those of it still permitted)
/// effective again, and inheritable and ambient, so that an upgrade's new process, exec'd as
/// this non-root user, receives the same capabilities.
pub fn regain(keep: &[Cap]) -> Result<(), CapsError> {
    let now = current()?;
    let kept = now.permitted.and(CapSet::of(keep));
    let wanted = Caps {
        effective: kept,
        permitted: kept,
        inheritable: kept,
    };
    set(wanted).map_err(|error| CapsError::Set { wanted, error })?;
    for cap in keep.iter().filter(|c| kept.contains(**c)) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap.number() as libc::c_ulong,
                0,
                0,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return Err(CapsError::Ambient {
                cap: cap.number(),
                error,
            });
        }
    }
    let got = current()?;
    if got != wanted {
        return Err(CapsError::Mismatch { wanted, got });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kernel::{set, CAP_SETPCAP};
    use super::*;
    use std::io;

    /// `current` agrees with what the kernel shows for this thread in /proc.
    #[test]
    fn current_matches_proc() {
        let caps = current().unwrap();
        assert_eq!(caps.effective, proc_status("CapEff"));
        assert_eq!(caps.permitted, proc_status("CapPrm"));
        assert_eq!(caps.inheritable, proc_status("CapInh"));
    }

    /// A set from the calling thread's `/proc/thread-self/status`.
    fn proc_status(field: &str) -> CapSet {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|l| l.strip_prefix(':')))
            .unwrap_or_else(|| panic!("no {field} in /proc/thread-self/status"));
        CapSet(u64::from_str_radix(line.trim(), 16).unwrap())
    }

    /// Run `body` in a forked child (so this process keeps its capabilities) and fail with its
    /// message if it returns one. The child only makes syscalls, reads /proc and allocates
    /// (glibc's malloc is safe after fork); it leaves with `_exit`, so no destructor runs.
    fn in_child(body: fn() -> Result<(), String>) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child runs `body` (see above) and then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match body() {
                Ok(()) => 0,
                Err(message) => {
                    // SAFETY: writes our own buffer to the pipe's write end.
                    unsafe { libc::write(fds[1], message.as_ptr().cast(), message.len()) };
                    1
                }
            };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: closes our copy of the write end, so the read below ends with the child.
        unsafe { libc::close(fds[1]) };
        let mut message = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: reads into our buffer.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            message.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: closes the read end we own.
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed (status {status:#x}): {}",
            String::from_utf8_lossy(&message)
        );
    }

    fn check(what: &str, got: CapSet, want: CapSet) -> Result<(), String> {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: {got} ({:#x}), expected {want}", got.0))
        }
    }

    fn is_root_with_caps() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let caps = current().unwrap();
        let needed = CapSet::of(&[Cap::Bpf, Cap::NetAdmin]).0 | 1 << CAP_SETPCAP;
        if !root || caps.effective.0 & needed != needed {
            eprintln!("skipping: needs root with CAP_SETPCAP, CAP_BPF and CAP_NET_ADMIN");
            return false;
        }
        true
    }

    /// As root: keep only CAP_BPF, as bpf mode does after start-up, and see every set follow.
    #[test]
    fn keeps_only_what_is_asked() {
        if !is_root_with_caps() {
            return;
        }
        in_child(|| {
            let bpf = CapSet::of(&[Cap::Bpf]);
            keep_only(&[Cap::Bpf]).map_err(|e| e.to_string())?;
            let caps = current().map_err(|e| e.to_string())?;
            check("effective (capget)", caps.effective, bpf)?;
            check("permitted (capget)", caps.permitted, bpf)?;
            check("CapEff", proc_status("CapEff"), bpf)?;
            check("CapPrm", proc_status("CapPrm"), bpf)?;
            check("CapBnd", proc_status("CapBnd"), bpf)?;
            check("CapAmb", proc_status("CapAmb"), CapSet(0))?;
            check("CapInh", proc_status("CapInh"), CapSet(0))?;

            // A capability already dropped cannot come back by asking again.
            keep_only(&[Cap::Bpf, Cap::NetAdmin]).map_err(|e| e.to_string())?;
            check("CapEff after asking for more", proc_status("CapEff"), bpf)?;

            // Down to nothing, after which keep_only has nothing to do and says Ok.
            keep_only(&[]).map_err(|e| e.to_string())?;
            check(
                "CapEff after keep_only(&[])",
                proc_status("CapEff"),
                CapSet(0),
            )?;
            keep_only(&[Cap::Bpf]).map_err(|e| e.to_string())?;
            check(
                "CapEff of a thread without caps",
                proc_status("CapEff"),
                CapSet(0),
            )
        });
    }

    /// The ambient set (what a non-root service hands its upgraded successor through exec) is
    /// narrowed to `keep`, not emptied.
    #[test]
    fn ambient_narrowed_to_what_is_kept() {
        if !is_root_with_caps() {
            return;
        }
        in_child(|| {
            let three = CapSet::of(&[Cap::Bpf, Cap::NetAdmin, Cap::NetBindService]);
            let mut caps = current().map_err(|e| e.to_string())?;
            caps.inheritable = three;
            set(caps).map_err(|e| format!("capset: {e}"))?;
            for cap in [Cap::Bpf, Cap::NetAdmin, Cap::NetBindService] {
                // SAFETY: prctl with integer arguments only.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap.number() as libc::c_ulong,
                        0,
                        0,
                    )
                };
                if rc != 0 {
                    return Err(format!("raise {cap}: {}", io::Error::last_os_error()));
                }
            }
            check("CapAmb before", proc_status("CapAmb"), three)?;
            keep_only(&[Cap::Bpf]).map_err(|e| e.to_string())?;
            let bpf = CapSet::of(&[Cap::Bpf]);
            check("CapAmb", proc_status("CapAmb"), bpf)?;
            check("CapInh", proc_status("CapInh"), bpf)?;
            check("CapEff", proc_status("CapEff"), bpf)?;
            keep_only(&[]).map_err(|e| e.to_string())?;
            check(
                "CapAmb after keep_only(&[])",
                proc_status("CapAmb"),
                CapSet(0),
            )
        });
    }

    /// Without CAP_SETPCAP (a non-root service: systemd narrowed the bounding set already) the
    /// bounding set is left alone and the other sets are still narrowed.
    #[test]
    fn without_setpcap_the_bounding_set_stays() {
        if !is_root_with_caps() {
            return;
        }
        in_child(|| {
            let before = current().map_err(|e| e.to_string())?;
            let bounding = proc_status("CapBnd");
            let mut no_setpcap = before;
            no_setpcap.effective.0 &= !(1 << CAP_SETPCAP);
            no_setpcap.permitted.0 &= !(1 << CAP_SETPCAP);
            set(no_setpcap).map_err(|e| format!("capset: {e}"))?;
            keep_only(&[Cap::Bpf, Cap::NetBindService]).map_err(|e| e.to_string())?;
            let kept = CapSet::of(&[Cap::Bpf, Cap::NetBindService]);
            check("CapEff", proc_status("CapEff"), kept)?;
            check("CapPrm", proc_status("CapPrm"), kept)?;
            check("CapBnd", proc_status("CapBnd"), bounding)
        });
    }
}
