//! Where a connection goes: each target's live state (`backend`), the routing table from a
//! frontend port to its app (`routing`; why a connection found none, `unrouted`), picking a target (`balance`), connecting to one without
//! blocking, with failover (`dial`), resolving target names off the connection's path with a
//! cache (`resolver`), active health checks (`health`) and what they send and expect of a
//! target (`probe`), latency histograms cheap enough for every connection (`histogram`), per-client connection counts for the
//! per-client limits (`clients`), an app's MaxConnections (`limit`), the PROXY protocol header
//! sent to targets (`proxy_protocol`), refusing targets that are the proxy itself (`loops`), and hash maps whose versions share
//! what a reload did not change (`shards`).

pub mod backend;
pub mod balance;
pub mod clients;
pub mod dial;
pub mod health;
pub mod histogram;
pub mod limit;
pub mod loops;
pub mod probe;
pub mod proxy_protocol;
pub mod resolver;
pub mod routing;
pub mod shards;
pub mod traffic;
pub mod unrouted;
