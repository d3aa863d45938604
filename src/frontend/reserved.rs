//! The --metrics address is the proxy's own: an app answering on it would take the metrics
//! endpoint's connections (simple mode: the two cannot both listen; bpf mode: the app's entry
//! would steer them). Start-up refuses such a config, and a reload refuses it the same way
//! (a file: the whole reload; a directory: that app's file), with the same words.

use std::fmt;
use std::net::SocketAddr;

use crate::config::{app_prefixes, App};

/// `app` answers on `addr`: its port, on an address of `addr`'s (any address when `addr` is
/// unspecified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsClash {
    pub addr: SocketAddr,
    pub app: String,
}

impl fmt::Display for MetricsClash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--metrics {addr}: port {port} is also app {app:?}'s (in its Ports): give \
             --metrics a port no app uses (the default is {default}), or take {port} out \
             of the app's Ports",
            addr = self.addr,
            app = self.app,
            port = self.addr.port(),
            default = crate::cli::DEFAULT_STATUS_ADDR.port()
        )
    }
}

/// Whether `app` answers on `addr`.
pub fn answers_on(app: &App, addr: SocketAddr) -> bool {
    let ip = addr.ip();
    app.ports.contains(&addr.port())
        && app_prefixes(app)
            .iter()
            .any(|p| p.contains(ip) || (ip.is_unspecified() && p.is_v4() == ip.is_ipv4()))
}

/// The first of `apps` that answers on `metrics`, if it is set.
pub fn clash<'a>(
    apps: impl IntoIterator<Item = &'a App>,
    metrics: Option<SocketAddr>,
) -> Option<MetricsClash> {
    let addr = metrics?;
    apps.into_iter()
        .find(|app| answers_on(app, addr))
        .map(|app| MetricsClash {
            addr,
            app: app.name.clone(),
        })
}
