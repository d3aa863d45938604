//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules; they are a library so that
//! fuzz targets and benchmarks can reach the parsers and formatters directly.

pub mod backend;
pub mod bpf;
pub mod caps;
pub mod cli;
pub mod config;
pub mod conns;
pub mod frontend;
pub mod health;
pub mod log;
pub mod loops;
pub mod metrics;
pub mod pidfile;
pub mod pool;
pub mod ports;
pub mod proxy_protocol;
pub mod relay;
pub mod routing;
pub mod session;
pub mod systemd;
pub mod upgrade;
pub mod user;
