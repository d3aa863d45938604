//! The status of a running proxy, once for every reader: `Status` is taken from the sources,
//! served as JSON (`/status.json`, for programs and `flyproxy status`), as text (`/status`, one
//! line per app and per target) and as HTML (`page`). `flyproxy status` prints the text of the
//! JSON it read, so what it prints is exactly what `/status` serves.
//!
//! A status lists at most `STATUS_APPS` apps (the first in the config) and counts them all
//! (`apps_total`): at 100,000 apps the whole list was 14 MB, too much for a page or a terminal.
//! `?app=NAME` (`flyproxy status --app NAME`) gives one app's, whatever its place.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::metrics::exposition::unique_backends;
use crate::metrics::Sources;

/// The whole status (the shape of `/status.json`, documented in the README). Fields may be
/// added; none is renamed or removed without a major version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The running version; its presence is what marks an answer as flyproxy's.
    pub flyproxy: String,
    /// Unix time of the snapshot, in seconds (rates are differences between two snapshots).
    pub time: f64,
    pub connections: Connections,
    pub reloads: Reloads,
    pub config: ConfigFile,
    /// The first `STATUS_APPS` apps, or the one asked for.
    pub apps: Vec<AppStatus>,
    /// Apps in force, listed or not (absent from an older flyproxy's answer, which listed
    /// every app: read as 0, meaning "as many as listed").
    #[serde(default)]
    pub apps_total: usize,
    /// Directory mode: the config files refused now, each with every problem (absent from
    /// an older flyproxy's answer: read as none).
    #[serde(default)]
    pub rejected_files: Vec<RejectedFileStatus>,
}

/// A file of the config directory that is refused (its last good version, if any, serves).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedFileStatus {
    pub file: String,
    pub problems: Vec<String>,
}

/// Apps listed in a status of every app; the others are counted only.
pub const STATUS_APPS: usize = 1000;

/// The connection bound (`--max-connections`) and how full it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    pub open: u64,
    pub limit: u64,
    pub accept_paused: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reloads {
    pub ok: u64,
    pub rejected: u64,
}

/// The config file in force, and the last one refused since (SHA-256 of their bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub sha256: String,
    pub rejected_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub ports: Vec<u16>,
    /// Where it answers when more specific than every address of its ports (empty: every
    /// address), and its Hostnames.
    pub addresses: Vec<String>,
    pub hostnames: Vec<String>,
    /// Client connections open now, and accepted since start.
    pub open: u64,
    pub accepted: u64,
    /// Client connections waiting now for a slot of its MaxConnections (absent from an older
    /// flyproxy's answer: read as 0).
    #[serde(default)]
    pub queued: u64,
    /// Client connections closed without a target, by reason (as the metrics name them).
    pub refused: Refused,
    pub targets: Vec<TargetStatus>,
    /// False while the admin socket has it disabled (absent from an older flyproxy: true).
    #[serde(default = "yes")]
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub connect_failed: u64,
    pub limit: u64,
    pub client_limit: u64,
    /// Refused at accept while the app was disabled.
    #[serde(default)]
    pub disabled: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// The target as the config writes it.
    pub target: String,
    /// `"up"` or `"down"` (passive and active health checks).
    pub state: String,
    /// Connections to it open now, and made since start.
    pub open: u64,
    pub total: u64,
    /// Bytes relayed client to target, and target to client.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Failed connects since start.
    pub connect_failures: u64,
    /// Unix time (seconds) of its last state change (down or up); until the first, when it
    /// was configured: its `state` holds since then.
    #[serde(default)]
    pub since: f64,
    /// Why its last failed health check (or the failed connect that marked it down) failed;
    /// kept once it is up again. None: none failed yet.
    #[serde(default)]
    pub last_check_error: Option<String>,
    /// What the config or the admin socket says it may take: `"ready"`, `"drain"` or
    /// `"maint"` (its health is `state`), its weight and whether it is a backup.
    #[serde(default = "ready")]
    pub admin_state: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
}

fn yes() -> bool {
    true
}

fn ready() -> String {
    "ready".into()
}

fn one() -> u32 {
    1
}

/// What a target's runtime state adds to its line on the text and HTML pages: nothing when it
/// is ready, of weight 1 and no backup.
pub(super) fn runtime_note(t: &TargetStatus) -> String {
    let mut note = String::new();
    if t.admin_state != "ready" {
        let _ = write!(note, " {}", t.admin_state);
    }
    if t.weight != 1 {
        let _ = write!(note, " weight {}", t.weight);
    }
    if t.backup {
        note.push_str(" backup");
    }
    note
}

/// The status now: of the app named `app`, or of the first `STATUS_APPS` apps. None: no app
/// in force has that name.
pub fn snapshot(sources: &Sources, app: Option<&str>) -> Option<Status> {
    let Sources {
        published, slots, ..
    } = sources;
    let routes = published.routes();
    let all;
    let one;
    let listed = match app {
        Some(name) => {
            one = [routes.app(name)?];
            &one[..]
        }
        None => {
            all = routes.apps();
            &all[..all.len().min(STATUS_APPS)]
        }
    };
    let hashes = published.config_hashes();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let apps = listed
        .iter()
        .map(|(app, ports)| AppStatus {
            name: app.name().to_owned(),
            ports: ports.to_vec(),
            addresses: app.addresses().iter().map(|a| a.to_string()).collect(),
            hostnames: app.hostnames().iter().map(|h| h.to_string()).collect(),
            open: app.stats.active.load(Ordering::Relaxed) as u64,
            accepted: load(&app.stats.accepted),
            queued: app.limit.as_ref().map_or(0, |l| l.queued() as u64),
            refused: Refused {
                connect_failed: load(&app.stats.failed),
                limit: load(&app.stats.limited),
                client_limit: load(&app.stats.client_limited),
                disabled: load(&app.stats.refused_disabled),
            },
            enabled: !app.stats.disabled.load(Ordering::Relaxed),
            targets: unique_backends(app)
                .into_iter()
                .map(|b| TargetStatus {
                    target: b.target.to_string(),
                    state: if b.is_up() { "up" } else { "down" }.into(),
                    open: b.active.load(Ordering::Relaxed) as u64,
                    total: load(&b.traffic_seen().connections),
                    bytes_sent: load(&b.traffic_seen().bytes_up),
                    bytes_received: load(&b.traffic_seen().bytes_down),
                    connect_failures: b.traffic_seen().failures.iter().map(load).sum(),
                    since: load(&b.changed_ms) as f64 / 1000.0,
                    last_check_error: b.last_error(),
                    admin_state: b.state().as_str().into(),
                    weight: b.weight(),
                    backup: b.backup(),
                })
                .collect(),
        })
        .collect();
    Some(Status {
        flyproxy: crate::VERSION.to_owned(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        connections: Connections {
            open: slots.taken() as u64,
            limit: slots.max() as u64,
            accept_paused: published.accept_paused.load(Ordering::Relaxed),
        },
        reloads: Reloads {
            ok: load(&published.reloads_ok),
            rejected: load(&published.reloads_rejected),
        },
        config: ConfigFile {
            sha256: hashes.running,
            rejected_sha256: hashes.rejected,
        },
        apps,
        apps_total: routes.app_count(),
        rejected_files: published
            .rejected_files()
            .into_iter()
            .map(|r| RejectedFileStatus {
                file: r.file,
                problems: r.problems,
            })
            .collect(),
    })
}

/// The line that says how many apps a status leaves out, and how to see one; None when it
/// lists them all.
pub(super) fn more_apps(st: &Status) -> Option<String> {
    let left = st.apps_total.saturating_sub(st.apps.len());
    (left > 0).then(|| {
        format!(
            "{} of {} apps shown ({left} more): ?app=NAME, or flyproxy status --app NAME, shows one",
            st.apps.len(),
            st.apps_total
        )
    })
}

/// Up to `n` items joined with `,`, and a count of the rest.
pub(super) fn first(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(",");
    if items.len() > n {
        let _ = write!(s, " (+{} more)", items.len() - n);
    }
    s
}

/// The text page: each app, its ports, its targets with health and open connections.
pub fn text(st: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flyproxy {}: {} of {} connection slots in use{}, reloads ok={} rejected={}",
        st.flyproxy,
        st.connections.open,
        st.connections.limit,
        if st.connections.accept_paused {
            " (accepts paused)"
        } else {
            ""
        },
        st.reloads.ok,
        st.reloads.rejected,
    );
    let _ = writeln!(
        out,
        "config sha256 {}{}",
        st.config.sha256,
        st.config
            .rejected_sha256
            .as_ref()
            .map(|r| format!(" (last rejected: {r})"))
            .unwrap_or_default()
    );
    rejected_files_text(&mut out, st);
    for app in &st.apps {
        let ports: Vec<String> = app.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            out,
            "\napp {}  ports {}  open {}  accepted {}{}",
            app.name,
            first(&ports, 12),
            app.open,
            app.accepted,
            if app.enabled { "" } else { "  DISABLED" },
        );
        if !app.addresses.is_empty() {
            let _ = writeln!(out, "  addresses {}", first(&app.addresses, 8));
        }
        if !app.hostnames.is_empty() {
            let _ = writeln!(out, "  hostnames {}", first(&app.hostnames, 8));
        }
        for t in &app.targets {
            let _ = writeln!(
                out,
                "  {:<40} {:<4} open {:<6} total {}{}",
                t.target,
                if t.state == "up" { "up" } else { "DOWN" },
                t.open,
                t.total,
                runtime_note(t),
            );
        }
    }
    if let Some(more) = more_apps(st) {
        let _ = writeln!(out, "\n{more}");
    }
    out
}

/// Directory mode: the files refused, each with its problems.
fn rejected_files_text(out: &mut String, st: &Status) {
    for r in &st.rejected_files {
        let _ = writeln!(out, "config file {} REJECTED:", r.file);
        for p in &r.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
}
