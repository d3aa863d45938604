//! A configured target's live state (health, active connections, counters), and why connecting
//! to it failed. Picking one of an app's targets is `balance`'s; connecting to one, with
//! failover, `dial`'s.
//!
//! Names are resolved by `resolver` for every connect and every health check (never in the
//! listener loop, and never on a relay thread), cached for `--dns-ttl`, so a target whose address
//! changes is followed without a reload.
//!
//! Besides its health (up or down, the checks' and connects' verdict) a target has what an
//! operator or the config says of it: a `TargetState` (ready, drain, maint), a weight and
//! whether it is a backup. The pick reads all of them on every connection, so each is an atomic.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, OnceLock};

use crate::backends::resolver::ResolveError;
pub use crate::backends::traffic::Traffic;
use crate::backends::traffic::NO_TRAFFIC;

/// Counts every change of any backend's health (up, down) or state (ready, drain, maint), in
/// the process: the health checker keeps when each target is due while it stays the same,
/// so a scan costs the targets, not a pass over every app's view of them. (A count shared
/// by every proxy in the process only makes it look again more often.)
pub static HEALTH_EPOCH: AtomicU64 = AtomicU64::new(0);
use crate::config::{HealthCheck, Target, TargetSpec};

/// What a target may take, as set by the config (`Drain`) or an operator at run time. Its
/// health (up or down) is apart from this: a ready target that is down gets no connection
/// either, and a drained one that is up gets none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetState {
    /// In the pool: new connections may go to it.
    Ready,
    /// No new connections; open ones go on until they end. Still health checked, so that its
    /// health is known when it comes back.
    Drain,
    /// No new connections and no health checks (the target is being worked on); open ones go
    /// on.
    Maint,
}

impl TargetState {
    /// Every state, in the order of their names in `as_str`.
    pub const ALL: [TargetState; 3] = [TargetState::Ready, TargetState::Drain, TargetState::Maint];

    /// Its name, as commands, logs, status and metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Ready => "ready",
            TargetState::Drain => "drain",
            TargetState::Maint => "maint",
        }
    }

    /// The state named `s` (`as_str`'s names), if it is one.
    pub fn parse(s: &str) -> Option<TargetState> {
        TargetState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    fn from_u8(v: u8) -> TargetState {
        match v {
            0 => TargetState::Ready,
            1 => TargetState::Drain,
            _ => TargetState::Maint,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            TargetState::Ready => 0,
            TargetState::Drain => 1,
            TargetState::Maint => 2,
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest weight (the config's); a target's share of new connections is its weight over
/// the sum of the weights of the targets picked among.
pub use crate::config::MAX_WEIGHT;

/// A target's weight when the config gives none.
pub const DEFAULT_WEIGHT: u32 = 1;

/// A weight as kept: at most `MAX_WEIGHT` (256), which 16 bits hold.
fn weight16(weight: u32) -> u16 {
    const _: () = assert!(MAX_WEIGHT <= u16::MAX as u32);
    weight.min(MAX_WEIGHT) as u16
}

// Two per app (at 200,000 apps, 400,000): see `Backend::weight`.
const _: () = assert!(std::mem::size_of::<Backend>() <= 152);

/// A target of one app and what the proxy knows of it. Kept across reloads while the app keeps
/// the target, so health and load survive a reload.
#[derive(Debug)]
pub struct Backend {
    pub target: Target,
    /// The app it belongs to, for logs (one name shared by the app's targets).
    pub app: Arc<str>,
    /// Connections relaying to this target now.
    pub active: AtomicUsize,
    /// What connections to it did, allocated at the first connect to it (see `Traffic`).
    traffic: OnceLock<Box<Traffic>>,
    up: AtomicBool,
    /// Active checks that passed, and that failed (one that says nothing of the target, this
    /// host's trouble, is neither).
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Times it went down or up, and the Unix time in milliseconds of the last (until the
    /// first, when it was first configured: its state holds since then).
    pub state_changes: AtomicU64,
    pub changed_ms: AtomicU64,
    /// Why the last failed check failed, or the failed connect that marked it down: kept once
    /// it is up again, for whoever asks why it went down. Written on those events only, never
    /// per connection. A `Box<String>`, one pointer where a `Box<str>` is two: 8 bytes less
    /// per backend (see `Backend::weight`) for one more allocation, on a failure.
    #[allow(clippy::box_collection)] // the one pointer is the point, as said above
    last_error: Mutex<Option<Box<String>>>,
    /// Consecutive failed and successful active checks.
    fails: AtomicU32,
    oks: AtomicU32,
    /// The app's check settings (the app's own, shared); replaced on reload.
    check: Mutex<Arc<HealthCheck>>,
    /// A `TargetState` (`TargetState::to_u8`).
    state: AtomicU8,
    /// 0..=MAX_WEIGHT; 0 takes no new connections. 16 bits (as `config_weight`) keep the
    /// struct at 152 bytes: with its `Arc` counts, a 176-byte malloc block rather than 192,
    /// two per app.
    weight: AtomicU16,
    /// Gets connections only when no primary (not backup) target of the app is usable.
    backup: AtomicBool,
    /// What the config said of its Weight and Drain at the last load: a reload applies them
    /// only when they change (see `follow_config`).
    config_weight: AtomicU16,
    config_drain: AtomicBool,
    /// Smooth weighted round robin's running score (see `balance`), per app as a backend is.
    pub(super) rr_score: AtomicI64,
}

impl Backend {
    /// Its traffic counters, to count into (allocated at the first count).
    pub fn traffic(&self) -> &Traffic {
        self.traffic.get_or_init(Box::default)
    }

    /// Its traffic counters, to read: zeros (allocating nothing) if nothing was counted.
    pub fn traffic_seen(&self) -> &Traffic {
        self.traffic.get().map_or(&NO_TRAFFIC, |t| t)
    }

    /// A target of `app` (a name, or the app's shared one) checked as `check` says.
    pub fn new(
        app: impl Into<Arc<str>>,
        target: Target,
        check: impl Into<Arc<HealthCheck>>,
    ) -> Backend {
        Backend {
            target,
            app: app.into(),
            active: AtomicUsize::new(0),
            traffic: OnceLock::new(),
            // Targets start up: the first connection (or check) finds out otherwise, and
            // starting down would refuse traffic to a healthy fleet for a whole interval.
            up: AtomicBool::new(true),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            state_changes: AtomicU64::new(0),
            changed_ms: AtomicU64::new(unix_ms()),
            last_error: Mutex::new(None),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            check: Mutex::new(check.into()),
            state: AtomicU8::new(TargetState::Ready.to_u8()),
            weight: AtomicU16::new(weight16(DEFAULT_WEIGHT)),
            backup: AtomicBool::new(false),
            config_weight: AtomicU16::new(weight16(DEFAULT_WEIGHT)),
            config_drain: AtomicBool::new(false),
            rr_score: AtomicI64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> TargetState {
        TargetState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Set its state; a change is logged. Leaving `Maint` resumes its health checks at their
    /// next scan (the checker skips a target in maint, and finds it due once it is not).
    pub fn set_state(&self, state: TargetState) {
        let was = TargetState::from_u8(self.state.swap(state.to_u8(), Ordering::Relaxed));
        if was != state {
            HEALTH_EPOCH.fetch_add(1, Ordering::Relaxed);
            crate::info!(
                "target {} of app {} is now {state} (was {was})",
                self.target,
                self.app
            );
        }
    }

    pub fn weight(&self) -> u32 {
        u32::from(self.weight.load(Ordering::Relaxed))
    }

    /// Set its weight, at most `MAX_WEIGHT` (a larger one is taken as that: callers check what
    /// they are given and say so; this only keeps the pick's arithmetic in its bounds).
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight16(weight), Ordering::Relaxed);
    }

    pub fn backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    pub fn set_backup(&self, backup: bool) {
        self.backup.store(backup, Ordering::Relaxed);
    }

    /// Whether a new connection may go to it, whatever its health: ready, with a weight.
    pub fn takes_new(&self) -> bool {
        self.state() == TargetState::Ready && self.weight() > 0
    }

    /// The app's check interval and timeout, without copying the rest of its settings (the
    /// checker reads them for every backend at every scan).
    pub fn check_timing(&self) -> (std::time::Duration, std::time::Duration) {
        let check = self.check.lock().unwrap_or_else(|e| e.into_inner());
        (check.interval, check.timeout)
    }

    pub fn check_settings(&self) -> HealthCheck {
        HealthCheck::clone(&self.check.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The app's check settings from now on (a reload).
    pub fn set_check(&self, check: Arc<HealthCheck>) {
        *self.check.lock().unwrap_or_else(|e| e.into_inner()) = check;
    }

    /// Apply what the config says of this target, at the first load and every reload. Backup
    /// is the config's alone. Weight and Drain apply when the config's value changes (for a
    /// new target: differs from the defaults, weight 1 and not drained), so a reload that
    /// leaves them as they were keeps what an operator set at run time, and one that changes
    /// them is the operator's word too. Maintenance is stronger than drain and only an
    /// operator ends it: the config's Drain moves a ready target to drain and a drained one
    /// back to ready, and leaves one in maintenance there.
    pub fn follow_config(&self, spec: &TargetSpec) {
        self.set_backup(spec.backup);
        let w = weight16(spec.weight);
        if self.config_weight.swap(w, Ordering::Relaxed) != w {
            self.set_weight(spec.weight);
        }
        if self.config_drain.swap(spec.drain, Ordering::Relaxed) != spec.drain {
            match (spec.drain, self.state()) {
                (true, TargetState::Ready) => self.set_state(TargetState::Drain),
                (false, TargetState::Drain) => self.set_state(TargetState::Ready),
                _ => {}
            }
        }
    }

    /// Why the last failed check (or the connect that marked it down) failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .cloned()
    }

    fn failed_because(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(why));
    }

    /// It just went up or down.
    fn changed(&self) {
        HEALTH_EPOCH.fetch_add(1, Ordering::Relaxed);
        self.state_changes.fetch_add(1, Ordering::Relaxed);
        self.changed_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Passive health: a failed connect marks the target down at once, so the next
    /// connections skip it; the active check brings it back.
    /// Out of descriptors, memory or local ports is this host's trouble, not the target's:
    /// counted, but it marks nothing down.
    pub(super) fn connect_failed(&self, e: &ConnectError) {
        self.traffic().failures[e.index()].fetch_add(1, Ordering::Relaxed);
        if e.is_local() {
            return;
        }
        self.oks.store(0, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            self.changed();
            self.failed_because(format!("connect: {e}"));
            crate::warn!("target {} of app {} is down: {e}", self.target, self.app);
        }
    }

    /// A successful connect is proof the target is up.
    pub(super) fn connect_succeeded(&self) {
        self.traffic().connections.fetch_add(1, Ordering::Relaxed);
        self.fails.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            self.changed();
            crate::info!(
                "target {} of app {} is up: a connection succeeded",
                self.target,
                self.app
            );
        }
    }

    /// Record an active check's result, applying the app's Fall and Rise.
    pub fn checked(&self, result: Result<(), ConnectError>) {
        if let Err(e) = &result {
            if e.is_local() {
                // Says nothing about the target (see connect_failed).
                crate::debug!("health check of {} skipped: {e}", self.target);
                return;
            }
        }
        let (fall, rise) = {
            let check = self.check.lock().unwrap_or_else(|e| e.into_inner());
            (check.fall, check.rise)
        };
        match result {
            Ok(()) => {
                self.checks_ok.fetch_add(1, Ordering::Relaxed);
                self.fails.store(0, Ordering::Relaxed);
                let oks = self.oks.fetch_add(1, Ordering::Relaxed) + 1;
                if oks >= rise && !self.up.swap(true, Ordering::Relaxed) {
                    self.changed();
                    crate::info!(
                        "target {} of app {} is up: health check passed",
                        self.target,
                        self.app
                    );
                }
            }
            Err(e) => {
                self.checks_failed.fetch_add(1, Ordering::Relaxed);
                self.failed_because(format!("health check: {e}"));
                self.oks.store(0, Ordering::Relaxed);
                let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
                if fails >= fall && self.up.swap(false, Ordering::Relaxed) {
                    self.changed();
                    crate::warn!(
                        "target {} of app {} is down: health check: {e}",
                        self.target,
                        self.app
                    );
                }
            }
        }
    }
}

/// Now as Unix time in milliseconds (0 before 1970: a clock that wrong shows as such).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why one target could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    /// The name did not resolve (or resolved to nothing).
    Unresolvable(io::Error),
    /// The name was not looked up: the resolver's queue was full (this host's trouble).
    ResolverBusy,
    /// Every address refused the connection.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// The name's lookup gave no answer within the connect timeout.
    LookupTimeout,
    /// Anything else (unreachable network, no route, ...).
    Other(io::Error),
    /// Every address the target resolved to is this proxy's own frontend (see `loops`).
    Loop(SocketAddr),
    /// Connected, but the target's answer to an http or tls health check failed it (why).
    Unhealthy(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Unresolvable(e) => write!(f, "name does not resolve ({e})"),
            ConnectError::ResolverBusy => write!(f, "name {}", ResolveError::Busy),
            ConnectError::Refused => write!(f, "connection refused"),
            ConnectError::Timeout => write!(f, "no answer within the connect timeout"),
            ConnectError::LookupTimeout => {
                write!(f, "name lookup: no answer within the connect timeout")
            }
            ConnectError::Other(e) => write!(f, "{e}"),
            ConnectError::Loop(a) => write!(
                f,
                "resolves to {a}, this proxy's own frontend: not connected, it would loop"
            ),
            ConnectError::Unhealthy(why) => f.write_str(why),
        }
    }
}

impl ConnectError {
    /// How many kinds there are, and their labels by `index`.
    pub const KINDS: usize = crate::backends::traffic::FAILURE_KINDS;
    pub const REASONS: [&'static str; ConnectError::KINDS] =
        ["unresolvable", "refused", "timeout", "error", "loop"];

    /// Its label (`REASONS`).
    pub fn reason(&self) -> &'static str {
        ConnectError::REASONS[self.index()]
    }

    pub fn index(&self) -> usize {
        match self {
            ConnectError::Unresolvable(_) | ConnectError::ResolverBusy => 0,
            ConnectError::Refused => 1,
            ConnectError::Timeout | ConnectError::LookupTimeout => 2,
            // Never a connect's failure (only a check's), so never counted by reason; "error"
            // should it ever be.
            ConnectError::Other(_) | ConnectError::Unhealthy(_) => 3,
            ConnectError::Loop(_) => 4,
        }
    }

    /// A failure of this host (descriptors, memory, local ports), not of the target.
    pub fn is_local(&self) -> bool {
        match self {
            ConnectError::ResolverBusy => true,
            ConnectError::Other(e) => matches!(
                e.raw_os_error(),
                Some(
                    libc::EMFILE
                        | libc::ENFILE
                        | libc::ENOBUFS
                        | libc::ENOMEM
                        | libc::EADDRNOTAVAIL
                )
            ),
            _ => false,
        }
    }

    /// The same error again, for another receiver of one result (`io::Error` is not `Clone`;
    /// the errno, or else the kind and message, are kept).
    pub fn clone_kind(&self) -> ConnectError {
        let copy = |e: &io::Error| match e.raw_os_error() {
            Some(n) => io::Error::from_raw_os_error(n),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match self {
            ConnectError::Unresolvable(e) => ConnectError::Unresolvable(copy(e)),
            ConnectError::ResolverBusy => ConnectError::ResolverBusy,
            ConnectError::Refused => ConnectError::Refused,
            ConnectError::Timeout => ConnectError::Timeout,
            ConnectError::LookupTimeout => ConnectError::LookupTimeout,
            ConnectError::Other(e) => ConnectError::Other(copy(e)),
            ConnectError::Loop(a) => ConnectError::Loop(*a),
            ConnectError::Unhealthy(why) => ConnectError::Unhealthy(why.clone()),
        }
    }

    /// A lookup that gave no address.
    pub fn from_resolve(e: ResolveError) -> ConnectError {
        match e {
            ResolveError::Failed(why) => ConnectError::Unresolvable(io::Error::other(why.as_ref())),
            ResolveError::Busy => ConnectError::ResolverBusy,
        }
    }

    pub fn from_io(e: io::Error) -> ConnectError {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectError::Timeout,
            _ => ConnectError::Other(e),
        }
    }
}

/// Every target tried for one client connection failed; each failure, in order.
#[derive(Debug)]
pub struct AllFailed(pub Vec<(Arc<Backend>, ConnectError)>);

impl fmt::Display for AllFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            // Nothing was tried: the pick found no target taking new connections.
            return f.write_str(
                "no target takes new connections (each is drained, in maintenance or weighted 0)",
            );
        }
        for (i, (b, e)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {e}", b.target)?;
        }
        Ok(())
    }
}

impl AllFailed {
    /// The first target tried, if every failure was a loop (the target is this proxy).
    pub fn only_loops(&self) -> Option<&Target> {
        let all = !self.0.is_empty()
            && self
                .0
                .iter()
                .all(|(_, e)| matches!(e, ConnectError::Loop(_)));
        all.then(|| &self.0[0].0.target)
    }
}

/// Counts a connection on a backend for as long as it lives.
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn new(backend: Arc<Backend>) -> ActiveGuard {
        backend.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_target;

    fn spec(weight: u32, drain: bool, backup: bool) -> TargetSpec {
        TargetSpec {
            target: parse_target("h:1").unwrap(),
            weight,
            backup,
            drain,
        }
    }

    /// The config's Weight and Drain apply when they change; an operator's setting holds
    /// across reloads that leave them alone; maintenance is the operator's to end.
    #[test]
    fn the_config_applies_what_it_changes() {
        let b = Backend::new("a", parse_target("h:1").unwrap(), HealthCheck::default());
        b.follow_config(&spec(3, true, true));
        assert_eq!(
            (b.weight(), b.state(), b.backup()),
            (3, TargetState::Drain, true)
        );
        // An operator steps in; a reload with the same file keeps their word.
        b.set_weight(7);
        b.set_state(TargetState::Ready);
        b.follow_config(&spec(3, true, false));
        assert_eq!(
            (b.weight(), b.state(), b.backup()),
            (7, TargetState::Ready, false)
        );
        // The file changes: its new values apply.
        b.follow_config(&spec(5, false, false));
        assert_eq!((b.weight(), b.state()), (5, TargetState::Ready));
        b.follow_config(&spec(5, true, false));
        assert_eq!(b.state(), TargetState::Drain);
        b.follow_config(&spec(5, false, false));
        assert_eq!(b.state(), TargetState::Ready);
        // Maintenance stays through the file's Drain either way.
        b.set_state(TargetState::Maint);
        b.follow_config(&spec(5, true, false));
        b.follow_config(&spec(5, false, false));
        assert_eq!(b.state(), TargetState::Maint);
    }
}
