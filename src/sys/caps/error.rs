//! Why the capabilities could not be set as asked, naming the capability and the call.

use std::fmt;
use std::io;

use crate::sys::caps::sets::{CapSet, Caps};

/// Why the capabilities could not be set as asked.
#[derive(Debug)]
pub enum CapsError {
    /// `capget` failed.
    Read(io::Error),
    /// `prctl(PR_CAPBSET_DROP)` failed for a capability, for a reason other than lacking
    /// `CAP_SETPCAP`.
    Bounding { cap: u32, error: io::Error },
    /// `prctl(PR_CAP_AMBIENT_LOWER)` failed for a capability.
    Ambient { cap: u32, error: io::Error },
    /// `capset` refused the new sets.
    Set { wanted: Caps, error: io::Error },
    /// `capset` succeeded but the sets read back are not the ones asked for.
    Mismatch { wanted: Caps, got: Caps },
}

impl fmt::Display for CapsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapsError::Read(e) => write!(f, "cannot read the capabilities (capget): {e}"),
            CapsError::Bounding { cap, error } => write!(
                f,
                "cannot drop {} from the capability bounding set: {error}",
                CapSet(1 << cap)
            ),
            CapsError::Ambient { cap, error } => write!(
                f,
                "cannot drop {} from the ambient capabilities: {error}",
                CapSet(1 << cap)
            ),
            CapsError::Set { wanted, error } => {
                write!(
                    f,
                    "cannot set the capabilities to {wanted} (capset): {error}"
                )
            }
            CapsError::Mismatch { wanted, got } => write!(
                f,
                "capabilities were set to {wanted} but read back as {got}"
            ),
        }
    }
}

impl std::error::Error for CapsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CapsError::Read(e)
            | CapsError::Bounding { error: e, .. }
            | CapsError::Ambient { error: e, .. }
            | CapsError::Set { error: e, .. } => Some(e),
            CapsError::Mismatch { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_capability() {
        let err = CapsError::Bounding {
            cap: 21,
            error: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(err
            .to_string()
            .starts_with("cannot drop cap_sys_admin from the capability bounding set: "));
    }
}
