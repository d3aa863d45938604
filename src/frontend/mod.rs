//! The frontend: how connections reach the proxy, and the process around them.
//!
//! - `ports`: the seam between the modes (`PortSource`); `simple` is the simple mode's source,
//!   `bpf` the bpf mode's (it drives the program in the top-level `bpf` folder).
//! - `start`: start-up, from a validated config to a serving loop, and why it can fail.
//! - `event_loop`: the listener loop (accepting within the bound, signals, reload ticks, drain
//!   deadlines) and the reload.
//! - `lifecycle`: the process's phases (serving, upgrading, draining) and every transition
//!   between them.
//! - `watch`: noticing that the config file changed.
//! - `tokens`: the loop's reserved tokens.
//!
//! Within the folder, imports go one way: `start` → `event_loop` → `lifecycle`, `watch` →
//! `tokens` → `ports`.

pub mod bpf;
mod event_loop;
mod lifecycle;
pub mod ports;
pub mod simple;
mod start;
mod tokens;
mod watch;

pub use start::{run, Handed, RunError, StartError};
