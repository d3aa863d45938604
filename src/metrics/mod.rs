//! The metrics endpoint: `GET /metrics` in the Prometheus text exposition format (0.0.4) and
//! `GET /status`, a page for people (`flyproxy status` prints it).
//!
//! Served by one thread of its own, off the relay path, a few connections at once (see
//! `endpoint`), each with a whole-request deadline and a small request size cap: idle or slow
//! clients cannot delay a scrape, and nothing here touches accepting or relaying. Values are
//! read from the atomics the relay threads update, so a scrape takes no lock on the hot path.
//!
//! - `published`: what the listener loop publishes for the endpoint, and everything it reads.
//! - `endpoint`: the HTTP side: the thread, its connections, the answer; `flyproxy status`'s
//!   client.
//! - `exposition`: the /metrics text.
//! - `status`: the /status page.

mod endpoint;
mod exposition;
mod published;
mod status;

pub use endpoint::{fetch_status, start, Endpoint, FDS};
pub use exposition::render;
pub use published::{ConfigHashes, LookupReader, LookupStats, Published, Sources};
pub use status::status;
