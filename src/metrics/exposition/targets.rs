//! The per-target families, all `flyproxy_target_*` and labelled `{app, target}`: connections
//! made and open, health, bytes, failed connects, active checks, state changes. The families
//! of the same counters under their names before issue 23 (`flyproxy_connections_total`, ...)
//! follow, for one release, so that dashboards and alerts can move at their pace: the README
//! marks them deprecated.

use std::fmt::Display;
use std::sync::atomic::Ordering;

use super::{unique_backends, Apps, Family};
use crate::backends::backend::{Backend, ConnectError};

/// Gives a target's samples: its extra labels (besides app and target) and value.
type Emit<'e> = dyn FnMut(&[(&str, &str)], &dyn Display) + 'e;

/// What one per-target family reads from a target.
type Read = fn(&Backend, &mut Emit<'_>);

/// A per-target family: its name, the name it had before (if it had one), type, help, and what
/// it reads.
struct TargetFamily {
    name: &'static str,
    old: Option<&'static str>,
    kind: &'static str,
    help: &'static str,
    read: Read,
}

const FAMILIES: [TargetFamily; 8] = [
    TargetFamily {
        name: "flyproxy_target_connections_total",
        old: Some("flyproxy_connections_total"),
        kind: "counter",
        help: "Connections made to a target, by app and target.",
        read: |b, emit| emit(&[], &b.traffic_seen().connections.load(Ordering::Relaxed)),
    },
    TargetFamily {
        name: "flyproxy_target_connections_active",
        old: Some("flyproxy_connections_active"),
        kind: "gauge",
        help: "Connections to a target open now, by app and target.",
        read: |b, emit| emit(&[], &b.active.load(Ordering::Relaxed)),
    },
    TargetFamily {
        name: "flyproxy_target_up",
        old: None,
        kind: "gauge",
        help: "1 if the target is considered up (passive and active health checks), else 0.",
        read: |b, emit| emit(&[], &u8::from(b.is_up())),
    },
    TargetFamily {
        name: "flyproxy_target_bytes_total",
        old: Some("flyproxy_bytes_total"),
        kind: "counter",
        help: "Bytes relayed, by app, target and direction.",
        read: |b, emit| {
            emit(
                &[("direction", "client_to_target")],
                &b.traffic_seen().bytes_up.load(Ordering::Relaxed),
            );
            emit(
                &[("direction", "target_to_client")],
                &b.traffic_seen().bytes_down.load(Ordering::Relaxed),
            );
        },
    },
    TargetFamily {
        name: "flyproxy_target_connect_failures_total",
        old: Some("flyproxy_connect_failures_total"),
        kind: "counter",
        help: "Failed connects to a target, by app, target and reason: unresolvable, refused, timeout, error (any other), loop (the target resolves to this proxy's own frontend).",
        read: |b, emit| {
            for (i, reason) in ConnectError::REASONS.iter().enumerate() {
                emit(&[("reason", reason)], &b.traffic_seen().failures[i].load(Ordering::Relaxed));
            }
        },
    },
    TargetFamily {
        name: "flyproxy_health_checks_total",
        old: None,
        kind: "counter",
        help: "Active health checks of a target, by app, target and result: ok (connected within TimeoutMs and, for Kind http and tls, answered as expected) or failed.",
        read: |b, emit| {
            emit(&[("result", "ok")], &b.checks_ok.load(Ordering::Relaxed));
            emit(
                &[("result", "failed")],
                &b.checks_failed.load(Ordering::Relaxed),
            );
        },
    },
    TargetFamily {
        name: "flyproxy_target_state_changes_total",
        old: None,
        kind: "counter",
        help: "Times a target went down or up (passive or active health checks), by app and target.",
        read: |b, emit| emit(&[], &b.state_changes.load(Ordering::Relaxed)),
    },
    TargetFamily {
        name: "flyproxy_target_last_change_timestamp_seconds",
        old: None,
        kind: "gauge",
        help: "Unix time a target last went down or up, by app and target; until it first does, when it was configured (its state holds since then).",
        read: |b, emit| {
            let ms = b.changed_ms.load(Ordering::Relaxed);
            emit(&[], &(ms as f64 / 1000.0));
        },
    },
];

/// Every per-target family; then, under their old names, those that had one.
pub(super) fn families(out: &mut String, apps: &Apps) {
    let targets: Targets<'_> = apps
        .iter()
        .map(|(app, _)| {
            let backends = unique_backends(app)
                .into_iter()
                .map(|b| (&**b, b.target.to_string()))
                .collect();
            (app.name(), backends)
        })
        .collect();
    for fam in &FAMILIES {
        family(out, &targets, (fam.name, fam.kind, fam.help), fam.read);
    }
    for fam in &FAMILIES {
        if let Some(old) = fam.old {
            let help = format!(
                "Deprecated: the same as {}, under its old name, kept for one release.",
                fam.name
            );
            family(out, &targets, (old, fam.kind, &help), fam.read);
        }
    }
}

/// Each app's targets, each once, with the target as the config writes it: found once for
/// every family.
type Targets<'a> = Vec<(&'a str, Vec<(&'a Backend, String)>)>;

fn family(out: &mut String, targets: &Targets<'_>, fam: (&str, &str, &str), read: Read) {
    let (name, kind, help) = fam;
    let mut f = Family::head(out, name, kind, help);
    for (app, backends) in targets {
        for (b, t) in backends {
            read(b, &mut |extra, v| {
                // app, target, and at most one label of the family's own.
                let mut labels = [("app", *app), ("target", t.as_str()), ("", "")];
                let n = 2 + extra.len().min(1);
                labels[2..n].copy_from_slice(&extra[..n - 2]);
                f.sample(name, &labels[..n], v);
            });
        }
    }
}
