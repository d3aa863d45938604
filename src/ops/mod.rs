//! What operators see and use around the proxy: logging (`log`), the metrics and status
//! endpoint (`metrics`), systemd readiness (`systemd`), dropping capabilities (`caps`) and the
//! binary upgrade hand-over (`upgrade`).

pub mod caps;
pub mod log;
pub mod metrics;
pub mod systemd;
pub mod upgrade;
