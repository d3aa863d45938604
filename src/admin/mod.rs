//! The admin socket: a unix stream socket (`--admin-socket`) through which an operator steers
//! one running proxy now, without editing its config: drain or weight a target, disable an
//! app, list and end connections, reload and see the outcome (`flyproxy ctl`, or `socat`).
//!
//! One text command per line, one answer per command ending in an empty line; an answer that
//! is an error starts with `error:`. Served by one thread of its own with non-blocking sockets
//! and deadlines, a few clients at once (`server`); every command answers from what the levels
//! below share (the routing table's `Arc`s and their atomics, the table of open connections),
//! each lock held for a copy, so nothing here can stall accepting or relaying.
//!
//! - `server`: the thread, its clients, their bounds and deadlines.
//! - `commands`: what each command does; `show`: the `show` commands' answers.
//! - `state`: runtime state (target states and weights, disabled apps): kept over a restart
//!   with `--state-file`, handed to the new process of an upgrade.
//! - `reload`: the `reload` command's way to whoever reloads (one function), and its outcome.
//! - `socket`: creating the socket file; `client`: `flyproxy ctl`'s side.

mod client;
mod commands;
mod reload;
mod server;
mod show;
mod socket;
mod state;

pub use client::{ask, AskError, CTL_DEADLINE};
pub use commands::Shared;
pub use reload::{ReloadNow, ReloadOutcome, Reloader};
pub use server::{start, FDS, MAX_CLIENTS};
pub use socket::{bind, SocketError};
pub use state::{Applied, RuntimeState, StateError};
