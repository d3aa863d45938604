//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; they are a library so that
//! fuzz targets and benchmarks can reach the parsers and formatters directly.
//!
//! The folders are the levels, bottom to top; a file imports only from its own folder's level
//! or below (`tests/layout.rs` checks it, and that no two files import each other in a circle):
//! 1. `sys`: helpers over the OS (sockets, logging, capabilities, users, the pid file, systemd,
//!    handing descriptors to a new process). They know nothing of the proxy.
//! 2. `config`, `cli`: the config file, its validation, its diff and its hash; the command line.
//! 3. `backends`: targets' live state, routing from a port to an app, balancing, health checks,
//!    connections counted per client address, targets that are the proxy itself, the PROXY
//!    protocol header.
//! 4. `relay`: one connection's life (the session and its phases), moving its bytes, the bounded
//!    thread pool and the lot where waiting connections wait, the connection bound, the table of
//!    open connections that drains use.
//! 5. `bpf`: the sk_lookup program, its skeleton, maps and link. `metrics`: the metrics and
//!    status endpoint, reading what the levels below publish. `admin`: the admin socket
//!    (`flyproxy ctl`), steering targets, apps and connections at run time. `fleet`: the etcd follower, a
//!    program beside the proxy (the `flyproxy-etcd-sync` binary), using only `config` and `sys`.
//! 6. `frontend`: how ports reach the process (`ports`, the seam between the modes, with
//!    `simple` and `bpf` beside it), start-up, the listener loop and the lifecycle, which put
//!    the levels below together.

/// The version every binary and endpoint reports (Cargo.toml's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod admin;
pub mod backends;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod frontend;
pub mod metrics;
pub mod relay;
pub mod sys;
