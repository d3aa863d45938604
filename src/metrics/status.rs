//! The /status page: for people, one line per app and per target.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::metrics::exposition::unique_backends;
use crate::metrics::Sources;

/// A page for people: each app, its ports, its targets with health and open connections.
pub fn status(sources: &Sources) -> String {
    let Sources {
        published, slots, ..
    } = sources;
    let routes = published.routes();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flyproxy {}: {} of {} connection slots in use{}, reloads ok={} rejected={}",
        crate::VERSION,
        slots.taken(),
        slots.max(),
        if published.accept_paused.load(Ordering::Relaxed) {
            " (accepts paused)"
        } else {
            ""
        },
        published.reloads_ok.load(Ordering::Relaxed),
        published.reloads_rejected.load(Ordering::Relaxed),
    );
    let hashes = published.config_hashes();
    let _ = writeln!(
        out,
        "config sha256 {}{}",
        hashes.running,
        hashes
            .rejected
            .map(|r| format!(" (last rejected: {r})"))
            .unwrap_or_default()
    );
    for (app, ports) in routes.apps() {
        let shown: Vec<String> = ports.iter().take(12).map(u16::to_string).collect();
        let more = ports.len().saturating_sub(12);
        let _ = writeln!(
            out,
            "\napp {}  ports {}{}  open {}  accepted {}",
            app.name,
            shown.join(","),
            if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            },
            app.stats.active.load(Ordering::Relaxed),
            app.stats.accepted.load(Ordering::Relaxed),
        );
        // Where the app answers, when it is more specific than every address of its ports.
        let show = |items: Vec<String>| {
            let n = items.len();
            let mut s = items.into_iter().take(8).collect::<Vec<_>>().join(",");
            if n > 8 {
                s.push_str(&format!(" (+{} more)", n - 8));
            }
            s
        };
        if !app.addresses.is_empty() {
            let shown = show(app.addresses.iter().map(|a| a.to_string()).collect());
            let _ = writeln!(out, "  addresses {shown}");
        }
        if !app.hostnames.is_empty() {
            let shown = show(app.hostnames.iter().map(|h| h.to_string()).collect());
            let _ = writeln!(out, "  hostnames {shown}");
        }
        for b in unique_backends(app) {
            let _ = writeln!(
                out,
                "  {:<40} {:<4} open {:<6} total {}",
                b.target.to_string(),
                if b.is_up() { "up" } else { "DOWN" },
                b.active.load(Ordering::Relaxed),
                b.connections.load(Ordering::Relaxed),
            );
        }
    }
    out
}
