//! A client connection's life after `accept()`, the same in both modes: the session (connect,
//! relay, log the end), moving bytes both ways (`transfer`), the bounded pool of relay threads
//! (`pool`), and the table of open connections that drains close (`conns`).

pub mod conns;
pub mod pool;
pub mod session;
pub mod transfer;
