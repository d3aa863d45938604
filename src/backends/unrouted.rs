//! Connections no app took: why (`Unrouted`), and their counts by port and reason for metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Why a connection found no app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unrouted {
    /// No app on the dialled address (simple mode: a wildcard listener of the port took it).
    NoApp,
    /// A ClientHello without a server name, and no default app.
    NoServerName,
    /// A server name no app claims, and no default app.
    UnknownServerName,
    /// The first bytes were not a TLS ClientHello, and no default app.
    NotTls,
    /// The ClientHello did not fit in the preread bound, and no default app.
    TooLarge,
    /// The client sent no whole ClientHello within `--preread-timeout`.
    PrereadTimeout,
    /// The client closed or reset before its ClientHello was whole.
    ClientClosed,
}

impl Unrouted {
    /// The `reason` label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrouted::NoApp => "no_app",
            Unrouted::NoServerName => "no_server_name",
            Unrouted::UnknownServerName => "unknown_server_name",
            Unrouted::NotTls => "not_tls",
            Unrouted::TooLarge => "too_large",
            Unrouted::PrereadTimeout => "preread_timeout",
            Unrouted::ClientClosed => "client_closed",
        }
    }

    /// What happened, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Unrouted::NoApp => "no app on the dialled address",
            Unrouted::NoServerName => {
                "the ClientHello has no server name, and no app here is without Hostnames"
            }
            Unrouted::UnknownServerName => {
                "no app here has the server name in its Hostnames, and none is without Hostnames"
            }
            Unrouted::NotTls => "not a TLS ClientHello, and no app here is without Hostnames",
            Unrouted::TooLarge => {
                "the ClientHello is larger than the preread bound, and no app here is without Hostnames"
            }
            Unrouted::PrereadTimeout => "no whole ClientHello within the preread timeout",
            Unrouted::ClientClosed => "the client closed before its ClientHello was whole",
        }
    }
}

/// Connections no app took, by port and reason, for metrics.
#[derive(Debug, Default)]
pub struct UnroutedCounts(Mutex<BTreeMap<(u16, Unrouted), u64>>);

impl UnroutedCounts {
    pub fn count(&self, port: u16, why: Unrouted) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((port, why))
            .or_insert(0) += 1;
    }

    /// Every count so far, by port then reason.
    pub fn snapshot(&self) -> Vec<((u16, Unrouted), u64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}
