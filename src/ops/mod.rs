//! What operators see and use around the proxy: logging (`log`), the metrics and status
//! endpoint (`metrics`), systemd readiness (`systemd`), dropping capabilities (`caps`), the
//! binary upgrade hand-over (`upgrade`), the pid file (`pidfile`) and switching user (`user`).

pub mod caps;
pub mod log;
pub mod metrics;
pub mod pidfile;
pub mod systemd;
pub mod upgrade;
pub mod user;
