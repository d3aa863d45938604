//! Helpers over the operating system, the bottom level: they know nothing of the proxy and
//! import nothing from the folders above.
//!
//! - `alloc`: the allocator's settings (how many glibc arenas).
//! - `net`: socket options, addresses, a listener's setup, the reset on close, poll timeouts.
//! - `log`: text and JSON log lines through a non-blocking writer, the level macros.
//! - `caps`: keeping only the capabilities a mode needs, and regaining them for an upgrade.
//! - `user`: `--user`/`--group`, switching to them.
//! - `pidfile`: writing and checking the pid file.
//! - `systemd`: readiness and status notifications.
//! - `upgrade`: handing listening descriptors to a new binary and taking them over.
//! - `inotify`: watching a directory for files that change, without blocking.
//! - `hash`: a fast hasher for maps whose keys come from the config, not from a peer (no OS
//!   here, but a leaf that every level uses).

pub mod alloc;
pub mod caps;
pub mod hash;
pub mod inotify;
pub mod log;
pub mod net;
pub mod pidfile;
pub mod systemd;
pub mod upgrade;
pub mod user;
