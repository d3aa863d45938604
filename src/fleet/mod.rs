//! The etcd follower (`flyproxy-etcd-sync`): keeps one instance's config file equal to the
//! value of one etcd key, so a fleet of flyproxy instances follows one config. flyproxy's own
//! file watch does the rest (a bad value is rejected there and the running config serves on).
//!
//! Why it drives `etcdctl` rather than speaking etcd's gRPC API: flyproxy takes no new crates,
//! and `etcdctl` (Debian `etcd-client`) already does endpoints, failover between members, TLS
//! and authentication, configured by the operator through its own `ETCDCTL_*` variables, which
//! pass through untouched. Why it is a small binary rather than a shell script: a value may
//! hold any bytes (newlines, NUL), and exactness matters more than brevity. Values are read as
//! `-w json` (one JSON object per response, values in base64), parsed whole with serde_json
//! and decoded strictly; `etcdctl`'s exit status is checked; the file is written with every
//! write's error checked (a full disk never leaves a truncated value) to a temporary file in
//! the same directory, synced and renamed over the config, so flyproxy sees the old file or the
//! new one, never a mix.
//!
//! The cycle: `get` the key (its value and the store revision), write it, then `watch` from
//! the next revision, so nothing between the two is missed. When the watch ends (compacted,
//! cancelled, no leader, `etcdctl` failed) the cycle starts again with a fresh `get`, after a
//! backoff while etcd stays unreachable. A `get` every `--resync` catches anything a watch could
//! have missed and notices an etcd that cannot be reached (a watch would just wait). Events older than what
//! the file already holds are skipped, so a resync racing a watch never writes an older value. A
//! failed resync ends the watch: reconnecting is then on this follower's backoff (at most
//! `BACKOFF_MAX`), not on the client library's, which grows to minutes during a long outage.
//! A deleted or absent key leaves the file as it is, and is logged. The last good file always
//! stays in place: nothing here removes or empties it.
//!
//! The parts: `args` (the command line and its defaults), `etcdctl` (running it),
//! `output` (parsing what it prints), `file` (replacing the config file atomically), `follow`
//! (the cycle above, with its backoff), `error` (why a step failed).

mod args;
mod error;
mod etcdctl;
mod file;
mod follow;
mod output;

pub use args::{
    parse_args, Invocation, Settings, DEFAULT_CONFIG, DEFAULT_KEY, DEFAULT_RESYNC, HELP,
};
pub use error::SyncError;
pub use file::write_atomically;
pub use follow::Follower;
pub use output::{decode_base64, parse_get, parse_watch_line, Snapshot, WatchUpdate};
