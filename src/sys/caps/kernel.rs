//! The system calls behind the capability sets: `capget`/`capset` for the effective,
//! permitted and inheritable sets, and `prctl` for the bounding and ambient sets, each over
//! every capability the kernel knows.

use std::io;

use crate::sys::caps::error::CapsError;
use crate::sys::caps::sets::{CapSet, Caps};

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit words.
const VERSION_3: u32 = 0x2008_0522;

/// `CAP_SETPCAP`: needed to drop from the bounding set.
pub(super) const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct Header {
    version: u32,
    /// 0: the calling thread.
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets (`capget`).
pub fn current() -> Result<Caps, CapsError> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two Data structs (version 3) into the array we pass.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(CapsError::Read(io::Error::last_os_error()));
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | u64::from(hi) << 32);
    Ok(Caps {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Set the calling thread's effective, permitted and inheritable sets (`capset`).
pub(super) fn set(caps: Caps) -> io::Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let split = |s: CapSet| (s.0 as u32, (s.0 >> 32) as u32);
    let (e0, e1) = split(caps.effective);
    let (p0, p1) = split(caps.permitted);
    let (i0, i1) = split(caps.inheritable);
    let data = [
        Data {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        Data {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: capset reads the header and two Data structs (version 3) that we pass.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`); without
/// that file, 63, and the loop in [`drop_bounding`] stops at the first number the kernel
/// refuses as unknown.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

/// Drop every capability but `keep` from the calling thread's bounding set. Without
/// `CAP_SETPCAP` in `effective` nothing can be dropped, and nothing is.
pub(super) fn drop_bounding(keep: CapSet, effective: CapSet) -> Result<(), CapsError> {
    let may_drop = effective.has(CAP_SETPCAP);
    for cap in 0..=last_cap() {
        if keep.has(cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        match present {
            0 => continue,
            1 => {}
            // EINVAL: a number this kernel does not know; so are all above it.
            _ => break,
        }
        if !may_drop {
            // Leave it: systemd's CapabilityBoundingSet= has narrowed it already, or whoever
            // started us chose to keep it; this process cannot change that.
            return Ok(());
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINVAL) => break,
                // CAP_SETPCAP is in the effective set but a security module (or a user
                // namespace's rules) still refuses: as without it, leave the bounding set.
                Some(libc::EPERM) => return Ok(()),
                _ => return Err(CapsError::Bounding { cap, error }),
            }
        }
    }
    Ok(())
}

/// Lower every capability but `keep` from the calling thread's ambient set.
pub(super) fn narrow_ambient(keep: CapSet) -> Result<(), CapsError> {
    for cap in 0..=last_cap() {
        if keep.has(cap) {
            continue;
        }
        let arg = |op: libc::c_int| op as libc::c_ulong;
        // SAFETY: prctl with integer arguments only.
        let set = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                arg(libc::PR_CAP_AMBIENT_IS_SET),
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        match set {
            0 => continue,
            1 => {}
            // EINVAL: a kernel before 4.3 (no ambient set), or a number it does not know.
            _ => break,
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                arg(libc::PR_CAP_AMBIENT_LOWER),
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return Err(CapsError::Ambient { cap, error });
        }
    }
    Ok(())
}
