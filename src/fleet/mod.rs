//! The etcd follower (`flyproxy-etcd-sync`): keeps one instance's config equal to what etcd
//! holds (one key holding the whole file, or one key per app under a prefix), so a fleet of
//! flyproxy instances follows one config. flyproxy's own file watch does the rest.
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
//! stays in place: nothing in one-key mode removes or empties it.
//!
//! One key per app (`--prefix`, `--dir`, in `prefix`): each key under the prefix is one app,
//! written as its own file in the directory the proxy reads, so a change costs one app and no
//! value comes near etcd's request size limit.
//!
//! In both modes a value is validated with the proxy's own code before anything touches the
//! disk (`value`): a bad value is never written, the last good file stays, and the rejection is
//! logged with the key, the revision and every problem, and listed in the `--status-file`
//! (`status`), which also says which revision the files are current as of. Files are read and
//! written as the proxy reads its config (`file`): regular files only, never a FIFO, never
//! through a symlink, size-capped, never blocking.
//!
//! The parts: `args` (the command line and its defaults), `etcdctl` (running it),
//! `output` (parsing what it prints), `value` (what may be written), `file` (reading and
//! replacing files safely), `status` (what monitoring sees), `cycle` (list, watch, back off),
//! `follow` (one key), `prefix` (one key per app), `error` (why a step failed).

mod args;
mod cycle;
mod error;
mod etcdctl;
mod file;
mod follow;
mod output;
mod prefix;
mod status;
mod value;

pub use args::{
    parse_args, Invocation, Settings, Source, DEFAULT_CONFIG, DEFAULT_KEY, DEFAULT_RESYNC, HELP,
};
pub use error::SyncError;
pub use file::{read_regular, write_atomically};
pub use follow::Follower;
pub use output::{decode_base64, parse_get, parse_watch_line, Snapshot, WatchUpdate};
pub use prefix::PrefixFollower;

/// Follow as `settings` say, for ever. Returns only when etcdctl cannot be started at all.
pub fn run(settings: Settings) -> SyncError {
    let Settings {
        source,
        etcdctl,
        resync,
        status_file,
    } = settings;
    let endpoints =
        std::env::var("ETCDCTL_ENDPOINTS").unwrap_or_else(|_| "etcdctl's default".into());
    match source {
        Source::Key { key, config } => {
            crate::info!(
                "flyproxy-etcd-sync {}: following etcd key {key:?} into {} (endpoints: {endpoints})",
                crate::VERSION,
                config.display(),
            );
            cycle::run(&mut Follower::new(
                key,
                config,
                etcdctl,
                resync,
                status_file,
            ))
        }
        Source::Prefix { prefix, dir } => {
            crate::info!(
                "flyproxy-etcd-sync {}: following etcd prefix {prefix:?} into {}, one file per app (endpoints: {endpoints})",
                crate::VERSION,
                dir.display(),
            );
            cycle::run(&mut PrefixFollower::new(
                prefix,
                dir,
                etcdctl,
                resync,
                status_file,
            ))
        }
    }
}
