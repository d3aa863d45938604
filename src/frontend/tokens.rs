//! The listener loop's tokens, each named for what wakes it. (The listening sockets are not
//! among them: the relay threads watch and accept from those.)

use mio::Token;

/// Readable when SIGHUP arrived (signal-hook writes a byte into the pipe from the handler).
pub(super) const SIGHUP_PIPE: Token = Token(0);
/// Readable when SIGTERM, SIGINT or SIGQUIT arrived.
pub(super) const STOP_PIPE: Token = Token(1);
/// Woken by a relay thread that gave back a slot the loop is waiting for.
pub(super) const WAKE: Token = Token(2);
/// Readable when SIGUSR2 (upgrade) arrived.
pub(super) const UPGRADE_PIPE: Token = Token(3);
/// The new process of an upgrade writes here once it serves (or closes it by dying).
pub(super) const UPGRADE_READY: Token = Token(4);
/// Readable when SIGUSR1 (reopen the log files) arrived.
pub(super) const REOPEN_PIPE: Token = Token(5);

/// Readable when the config plane has a new routing table for the loop to apply.
pub(super) const PLANE: Token = Token(6);
