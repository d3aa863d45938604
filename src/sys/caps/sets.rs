//! The capabilities flyproxy names, and sets of them as the kernel's 64-bit masks, with the
//! names capabilities(7) uses so that logs and errors are readable.

use std::fmt;

/// The capabilities flyproxy cares about, by their kernel numbers
/// (`include/uapi/linux/capability.h`). Kept after start-up: `Bpf` and `NetAdmin` in bpf
/// mode, `NetBindService` in simple mode or for a metrics port below 1024 (see the module
/// documentation); `SysAdmin` stands in for `Bpf` on kernels before 5.8, and `Perfmon` is
/// named for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cap {
    /// Binding a port below 1024.
    NetBindService = 10,
    /// Network administration; attaching the sk_lookup program.
    NetAdmin = 12,
    /// The catch-all; unshare(CLONE_NEWNET), and `bpf()` on kernels before 5.8.
    SysAdmin = 21,
    /// Performance monitoring; not needed by flyproxy, named for logs and tests.
    Perfmon = 38,
    /// The `bpf()` syscall: loading programs, creating and writing maps.
    Bpf = 39,
}

impl Cap {
    /// Every variant.
    pub const ALL: [Cap; 5] = [
        Cap::NetBindService,
        Cap::NetAdmin,
        Cap::SysAdmin,
        Cap::Perfmon,
        Cap::Bpf,
    ];

    /// The kernel's number for this capability.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The name as capabilities(7) and `/proc` tools spell it: `cap_net_bind_service`.
    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of capabilities 0 to 40, as in capabilities(7), for readable logs and errors.
const NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

/// A set of capabilities, as the kernel's 64-bit mask (bit N is capability N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[Cap]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | 1 << c.number()))
    }

    pub fn contains(self, cap: Cap) -> bool {
        self.has(cap.number())
    }

    pub(super) fn has(self, number: u32) -> bool {
        number < 64 && self.0 & (1 << number) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(super) fn and(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }
}

/// `cap_bpf,cap_net_admin`, or `none`; a capability without a name shows as `cap_N`.
impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for n in (0..64).filter(|&n| self.has(n)) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            match NAMES.get(n as usize) {
                Some(name) => f.write_str(name)?,
                None => write!(f, "cap_{n}")?,
            }
        }
        Ok(())
    }
}

/// The calling thread's effective, permitted and inheritable sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable: CapSet,
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "effective={} permitted={} inheritable={}",
            self.effective, self.permitted, self.inheritable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sets() {
        for cap in Cap::ALL {
            assert_eq!(
                NAMES[cap.number() as usize],
                cap.name(),
                "{cap:?} is capability {}",
                cap.number()
            );
        }
        assert_eq!(Cap::Bpf.name(), "cap_bpf");
        assert_eq!(Cap::NetBindService.to_string(), "cap_net_bind_service");
        let set = CapSet::of(&[Cap::Bpf, Cap::NetAdmin]);
        assert_eq!(set.0, 1 << 39 | 1 << 12);
        assert!(set.contains(Cap::Bpf) && !set.contains(Cap::SysAdmin));
        assert_eq!(set.to_string(), "cap_net_admin,cap_bpf");
        assert_eq!(CapSet(0).to_string(), "none");
        assert_eq!(CapSet(1 << 45 | 1).to_string(), "cap_chown,cap_45");
    }
}
