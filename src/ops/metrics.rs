//! The metrics endpoint: `GET /metrics` in the Prometheus text exposition format (0.0.4) and
//! `GET /status`, a page for people (`flyproxy status` prints it).
//!
//! Served by one thread of its own, off the relay path, one request at a time, each with short
//! read and write timeouts and a small request size cap: a slow or hostile scraper can hold this
//! thread for a few seconds at most and never touches accepting or relaying. Values are read
//! from the atomics the relay threads update, so a scrape takes no lock on the hot path.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::backends::backend::{Backend, ConnectError};
use crate::backends::routing::AppRoute;

/// An app's backends, each once: a target listed twice is one backend with two turns, and
/// must be one series (a duplicate series makes Prometheus reject the whole scrape).
fn unique_backends(app: &AppRoute) -> Vec<&Arc<Backend>> {
    let mut seen: Vec<&Arc<Backend>> = Vec::with_capacity(app.backends.len());
    for b in &app.backends {
        if !seen.iter().any(|s| Arc::ptr_eq(s, b)) {
            seen.push(b);
        }
    }
    seen
}
use crate::frontend::ports::LookupReader;
use crate::relay::session::Shared;

/// A request must arrive, and the answer leave, within this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 * 1024;

/// Serve `addr` from a thread: on `inherited` (the socket a process we upgrade handed over),
/// or on a socket bound now, so that a bad address fails start-up. Returns the socket's
/// address and descriptor, for handing over in turn.
pub fn start(
    addr: SocketAddr,
    inherited: Option<TcpListener>,
    shared: Arc<Shared>,
    lookup_stats: Option<LookupReader>,
) -> io::Result<(SocketAddr, RawFd)> {
    let listener = match inherited {
        Some(l) => l,
        None => TcpListener::bind(addr)?,
    };
    // Non-blocking: after an upgrade the other process may take a connection between our
    // poll and our accept.
    listener.set_nonblocking(true)?;
    let handle = (listener.local_addr()?, listener.as_raw_fd());
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(256 * 1024)
        .spawn(move || serve(listener, &shared, lookup_stats.as_ref()))?;
    Ok(handle)
}

/// Answer requests until a new process takes the socket over (upgrade). Waits in `poll` with
/// a short timeout rather than in `accept`, so that the hand-over is noticed; the socket is
/// shared with the new process, so it must not be shut down, only closed here.
fn serve(listener: TcpListener, shared: &Shared, lookup_stats: Option<&LookupReader>) {
    while !shared.handed_over.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 250) } <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((s, _)) => {
                // The socket is shared, and non-blocking in the other process: be explicit.
                let _ = s.set_nonblocking(false);
                if let Err(e) = answer(s, shared, lookup_stats) {
                    crate::debug!("metrics: request failed: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Out of descriptors or the like: do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn answer(
    mut s: TcpStream,
    shared: &Shared,
    lookup_stats: Option<&LookupReader>,
) -> io::Result<()> {
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // The timeout holds for the whole request, not each read: a client trickling a byte at
    // a time must not keep the endpoint to itself.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request not complete in time",
            ));
        }
        s.set_read_timeout(Some(left))?;
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        if buf.len() > MAX_REQUEST {
            break None;
        }
        match s.read(&mut chunk)? {
            0 => break None,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let line = head_end
        .and_then(|i| std::str::from_utf8(&buf[..i]).ok())
        .and_then(|h| h.lines().next())
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (status, ctype, body) = match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => {
            match path.split('?').next().unwrap_or("") {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(shared, lookup_stats),
                ),
                "/status" => ("200 OK", "text/plain; charset=utf-8", status(shared)),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics or /status\n".into(),
                ),
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            ("405 Method Not Allowed", "text/plain", "only GET\n".into())
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}

/// A label value escaped as the exposition format asks: backslash, double quote, newline.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", esc(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The whole exposition, from the current routing table and counters.
pub fn render(shared: &Shared, lookup_stats: Option<&LookupReader>) -> String {
    let routes = Arc::clone(&shared.routes.lock().unwrap_or_else(|e| e.into_inner()));
    let apps = routes.apps();
    let mut out = String::with_capacity(4096);

    let mut f = Family::head(
        &mut out,
        "flyproxy_build_info",
        "gauge",
        "The running version.",
    );
    f.sample(
        "flyproxy_build_info",
        &[("version", crate::cli::VERSION)],
        1,
    );

    macro_rules! per_app {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(&mut out, $name, $kind, $help);
            for (app, _) in apps {
                f.sample($name, &[("app", app.name.as_str())], $get(&app.stats));
            }
        }};
    }
    per_app!(
        "flyproxy_app_connections_total",
        "counter",
        "Client connections accepted, by app.",
        |s: &crate::backends::routing::AppStats| s.accepted.load(Ordering::Relaxed)
    );
    per_app!(
        "flyproxy_app_connections_active",
        "gauge",
        "Client connections open now (connecting or relaying), by app.",
        |s: &crate::backends::routing::AppStats| s.active.load(Ordering::Relaxed)
    );
    let name = "flyproxy_app_connections_refused_total";
    let mut f = Family::head(
        &mut out,
        name,
        "counter",
        "Client connections closed without a target: reason=\"connect_failed\" (no target answered) or \"limit\" (the app's MaxConnections).",
    );
    for (app, _) in apps {
        let s = &app.stats;
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "connect_failed")],
            s.failed.load(Ordering::Relaxed),
        );
        f.sample(
            name,
            &[("app", app.name.as_str()), ("reason", "limit")],
            s.limited.load(Ordering::Relaxed),
        );
    }

    macro_rules! per_target {
        ($name:expr, $kind:expr, $help:expr, $get:expr) => {{
            let mut f = Family::head(&mut out, $name, $kind, $help);
            for (app, _) in apps {
                for b in unique_backends(app) {
                    let t = b.target.to_string();
                    f.sample(
                        $name,
                        &[("app", app.name.as_str()), ("target", t.as_str())],
                        $get(b),
                    );
                }
            }
        }};
    }
    per_target!(
        "flyproxy_connections_total",
        "counter",
        "Connections made to a target, by app and target.",
        |b: &crate::backends::backend::Backend| b.connections.load(Ordering::Relaxed)
    );
    per_target!(
        "flyproxy_connections_active",
        "gauge",
        "Connections to a target open now, by app and target.",
        |b: &crate::backends::backend::Backend| b.active.load(Ordering::Relaxed)
    );
    per_target!(
        "flyproxy_target_up",
        "gauge",
        "1 if the target is considered up (passive and active health checks), else 0.",
        |b: &crate::backends::backend::Backend| u8::from(b.is_up())
    );
    let name = "flyproxy_bytes_total";
    let mut f = Family::head(
        &mut out,
        name,
        "counter",
        "Bytes relayed, by app, target and direction.",
    );
    for (app, _) in apps {
        for b in unique_backends(app) {
            let t = b.target.to_string();
            for (dir, v) in [
                ("client_to_target", &b.bytes_up),
                ("target_to_client", &b.bytes_down),
            ] {
                f.sample(
                    name,
                    &[
                        ("app", app.name.as_str()),
                        ("target", t.as_str()),
                        ("direction", dir),
                    ],
                    v.load(Ordering::Relaxed),
                );
            }
        }
    }
    let name = "flyproxy_connect_failures_total";
    let mut f = Family::head(
        &mut out,
        name,
        "counter",
        "Failed connects to a target, by app, target and reason.",
    );
    for (app, _) in apps {
        for b in unique_backends(app) {
            let t = b.target.to_string();
            for (i, reason) in ConnectError::REASONS.iter().enumerate() {
                f.sample(
                    name,
                    &[
                        ("app", app.name.as_str()),
                        ("target", t.as_str()),
                        ("reason", reason),
                    ],
                    b.failures[i].load(Ordering::Relaxed),
                );
            }
        }
    }

    let name = "flyproxy_reloads_total";
    let mut f = Family::head(&mut out, name, "counter", "Config reloads, by result.");
    f.sample(
        name,
        &[("result", "ok")],
        shared.reloads_ok.load(Ordering::Relaxed),
    );
    f.sample(
        name,
        &[("result", "rejected")],
        shared.reloads_rejected.load(Ordering::Relaxed),
    );
    let name = "flyproxy_config_last_reload_success_timestamp_seconds";
    let mut f = Family::head(
        &mut out,
        name,
        "gauge",
        "Unix time of the last config load or reload that was applied.",
    );
    f.sample(
        name,
        &[],
        shared.last_reload_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0,
    );
    let name = "flyproxy_connections_limit";
    let mut f = Family::head(
        &mut out,
        name,
        "gauge",
        "The connection bound in force (--max-connections, lowered to fit the open-file limit).",
    );
    f.sample(name, &[], shared.max_connections);
    let name = "flyproxy_connections_open";
    let mut f = Family::head(
        &mut out,
        name,
        "gauge",
        "Client connections holding a slot of the bound now.",
    );
    f.sample(name, &[], shared.active.load(Ordering::Relaxed));
    let name = "flyproxy_accept_paused";
    let mut f = Family::head(
        &mut out,
        name,
        "gauge",
        "1 while the connection bound holds accepts back, else 0.",
    );
    f.sample(
        name,
        &[],
        u8::from(shared.accept_paused.load(Ordering::Relaxed)),
    );
    let name = "flyproxy_log_lines_dropped_total";
    let mut f = Family::head(
        &mut out,
        name,
        "counter",
        "Log lines dropped because stderr could not keep up.",
    );
    f.sample(name, &[], crate::ops::log::dropped());

    if let Some(read) = lookup_stats {
        let name = "flyproxy_bpf_lookups_total";
        let mut f = Family::head(
            &mut out,
            name,
            "counter",
            "sk_lookup verdicts for configured ports, by port group (app): steered to our listener, or dropped (listener missing).",
        );
        for g in read() {
            f.sample(
                name,
                &[("group", g.group.as_str()), ("verdict", "steered")],
                g.steered,
            );
            f.sample(
                name,
                &[("group", g.group.as_str()), ("verdict", "dropped")],
                g.dropped,
            );
        }
    }
    out
}

/// A page for people: each app, its ports, its targets with health and open connections.
pub fn status(shared: &Shared) -> String {
    let routes = Arc::clone(&shared.routes.lock().unwrap_or_else(|e| e.into_inner()));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flyproxy {}: {} of {} connection slots in use{}, reloads ok={} rejected={}",
        crate::cli::VERSION,
        shared.active.load(Ordering::Relaxed),
        shared.max_connections,
        if shared.accept_paused.load(Ordering::Relaxed) {
            " (accepts paused)"
        } else {
            ""
        },
        shared.reloads_ok.load(Ordering::Relaxed),
        shared.reloads_rejected.load(Ordering::Relaxed),
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

/// `flyproxy status`: fetch the /status page from a running proxy.
pub fn fetch_status(addr: SocketAddr) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: flyproxy\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(io::Error::other(format!("unexpected answer from {addr}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_escaping() {
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
    }
}
