//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; they are a library so that
//! fuzz targets and benchmarks can reach the parsers and formatters directly.
//!
//! The layout follows a connection's way through the proxy, bottom to top; a module imports
//! only from its own level or below:
//! - `net`, `cli`, `config`: socket helpers, the command line, the config file and its diff.
//! - `backends`: targets' live state, routing from a port to an app, balancing, health checks,
//!   the PROXY protocol header.
//! - `relay`: one connection's life (session), moving its bytes, the bounded thread pool, the
//!   table of open connections that drains use.
//! - `frontend` and `bpf`: how ports reach the process (one listener per port, or an sk_lookup
//!   program steering every port to one socket), the listener loop, start-up and the lifecycle.
//! - `ops`: what operators see and use: logging, metrics and status, systemd notification,
//!   capabilities, the upgrade hand-over.

pub mod backends;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod frontend;
pub mod net;
pub mod ops;
pub mod relay;
