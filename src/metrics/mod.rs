//! The metrics and status endpoint: `GET /metrics` in the Prometheus text exposition format
//! (0.0.4); the status as text (`/status`), JSON (`/status.json`) and a page for people
//! (`/status.html`, or `/` and `/status` from a browser); `flyproxy status`'s client.
//!
//! Served by one thread of its own, off the relay path, a few connections at once (see
//! `endpoint`), each with deadlines and a small request size cap: idle clients, slow ones and
//! ones that never read their answer cannot delay a scrape, and nothing here touches accepting
//! or relaying. Values are read from the atomics the relay threads update, so a scrape takes no
//! lock on the hot path.
//!
//! - `published`: what the listener loop publishes for the endpoint, and everything it reads.
//! - `endpoint`: the HTTP side: the thread, its connections, which path serves what;
//!   `query`: the query string (`?app=NAME`).
//! - `exposition`: the /metrics text; `process`: its `process_*` families from /proc.
//! - `status`: the status (its JSON shape and its text); `page`: its HTML.
//! - `client`: `flyproxy status`, reading /status.json.

mod client;
mod endpoint;
mod exposition;
mod page;
mod process;
mod published;
mod query;
mod status;

pub use client::{fetch_status, FetchError};
pub use endpoint::{start, Endpoint, FDS};
pub use exposition::render;
pub use published::{
    ConfigHashes, LookupReader, LookupStats, Published, RejectedFile, SeriesCap, Sources,
};
pub use status::{snapshot, text, Status};
