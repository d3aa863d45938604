//! What operators see and use around the proxy: logging (`log`), the metrics and status
//! endpoint (`metrics`), systemd readiness (`systemd`), dropping capabilities (`caps`), the
//! binary upgrade hand-over (`upgrade`), the pid file (`pidfile`), switching user (`user`), and
//! the etcd follower that keeps a fleet's config files equal to one etcd key (`etcd_sync`, run
//! as the `flyproxy-etcd-sync` binary).

pub mod caps;
pub mod etcd_sync;
pub mod log;
pub mod metrics;
pub mod pidfile;
pub mod systemd;
pub mod upgrade;
pub mod user;
