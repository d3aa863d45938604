//! A client connection's life after `accept()`, the same in both modes.
//!
//! - `session`: one connection from accept to its log line, as phases (greeting, admission,
//!   connecting, relaying), each in a file of its own, moved between in one place.
//! - `preread`, `client_hello`: reading the start of a connection until its TLS ClientHello is
//!   whole, and parsing the server name out of it (the greeting's work).
//! - `transfer`: moving bytes both ways (splice or a buffer, half-close, resets, idle timeout).
//! - `per_client`: a connection's place under the per-client limits, and the refusal at accept.
//! - `access_log`: the `conn` line every connection ends with.
//! - `doors`: the listening sockets, watched in the lot. `accept`: accepting from them on the
//!   relay threads, with the accept-time work (binding, per-client limits, the bound).
//! - `pool`: the relay threads, one per core. `park`: the lot where connections wait for their sockets
//!   or a deadline without a thread, in any phase. Neither knows what a session is.
//! - `slots`: the connection bound. `conns`: the table of open connections that drains close.
//!
//! A relay thread told of connections waiting on a door accepts them, starts the first on itself
//! and queues the others for whichever thread is free first.
//! A session runs on a pool thread while it can go on without waiting; when its phase has to
//! wait (for the client's hello, a slot of its app, or its sockets while relaying) it leaves the
//! thread at once and waits in the lot, and a thread takes it up again, in the same phase, when
//! a socket or its deadline wakes it.

pub mod accept;
pub mod access_log;
pub mod client_hello;
pub mod conns;
pub mod doors;
pub mod park;
pub mod per_client;
pub mod pool;
pub mod preread;
pub mod session;
pub mod slots;
pub mod transfer;
