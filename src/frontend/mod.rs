//! The frontend: how connections reach the proxy, and the process around them.
//!
//! - `ports`: the seam between the modes (`PortSource`); `simple` is the simple mode's source,
//!   `bpf` the bpf mode's (it drives the program in the top-level `bpf` folder).
//! - `start`: start-up, from the command line's settings to a serving loop, and why it can
//!   fail.
//! - `control`: start-up's part for the admin socket and the runtime state it restores.
//! - `candidate`: loading a config file as start-up, every reload and `flyproxy check` do
//!   (read, validate, check for loops, hash).
//! - `event_loop`: the listener loop (resuming accepts paused at the bound, signals, reload
//!   ticks, drain deadlines), which swaps in what the plane built; the relay threads accept.
//! - `plane`: the config plane, the thread that reloads (reads, validates, diffs, builds the
//!   new routing table and port change) so that the loop never pauses for it.
//! - `lifecycle`: the process's phases (serving, upgrading, draining) and every transition
//!   between them.
//! - `signals`: the signals' self-pipes.
//! - `watch`: noticing that the config file changed.
//! - `tokens`: the loop's reserved tokens.
//!
//! Within the folder, a file imports only from files listed after it, never back up:
//! `start` → `control`, `event_loop` → `plane`, `lifecycle`, `signals` → `candidate`, `watch`, `bpf`,
//! `simple`, `tokens` → `ports`. (`start` also uses most of the files below `event_loop` directly.)

pub mod bpf;
pub mod candidate;
mod control;
pub mod directory;
mod event_loop;
mod lifecycle;
pub mod plane;
pub mod ports;
pub mod reserved;
mod signals;
pub mod simple;
mod start;
mod tokens;
mod watch;

pub use start::{run, Handed, RunError, StartError};
