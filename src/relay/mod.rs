//! A client connection's life after `accept()`, the same in both modes: the session (connect,
//! relay, log the end), moving bytes both ways (`transfer`), the bounded pool of relay threads
//! (`pool`), where waiting connections wait without a thread (`park`), the connection bound
//! (`slots`), and the table of open connections that drains close (`conns`).

pub mod client_hello;
pub mod conns;
pub mod park;
pub mod pool;
pub mod preread;
pub mod session;
pub mod slots;
pub mod transfer;
