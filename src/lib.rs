//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; they are a library so that
//! fuzz targets and benchmarks can reach the parsers and formatters directly.
//!
//! The layout follows a connection's way through the proxy, bottom to top; a module imports
//! only from its own level or below:
//! 1. `net`, `ops::log`, `ops::caps`, `ops::systemd`, `ops::upgrade`, `ops::pidfile`,
//!    `ops::user`: helpers over the OS (socket options, logging, capabilities, systemd
//!    notification, handing descriptors to a new process, the pid file, switching user). They
//!    know nothing of the proxy.
//! 2. `cli`, `config`: the command line; the config file, its validation, its diff and its
//!    hash. `ops::etcd_sync`, the etcd follower (a program beside the proxy, the
//!    `flyproxy-etcd-sync` binary), uses only these and level 1.
//! 3. `backends`: targets' live state, routing from a port to an app, balancing, health checks,
//!    connections counted per client address, targets that are the proxy itself, the PROXY
//!    protocol header.
//! 4. `relay`: one connection's life (session), moving its bytes, the bounded thread pool, the
//!    connection bound, the table of open connections that drains use.
//! 5. `frontend::ports` (the seam between the modes), `frontend::simple` and `bpf`: how ports
//!    reach the process: one listener per port, or an sk_lookup program steering every port
//!    to one socket.
//! 6. `ops::metrics`: the metrics and status endpoint, reading what the levels below publish.
//! 7. the rest of `frontend`: start-up, the listener loop and the lifecycle, which put the
//!    levels below together.
//!
//! `ops` is a folder by audience (what operators see and use), not a level: most of it is at
//! the bottom, and metrics near the top.

pub mod backends;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod frontend;
pub mod net;
pub mod ops;
pub mod relay;
