//! The status page for people (`GET /` or `/status` from a browser, `/status.html`): one
//! self-contained HTML page, no external assets (the endpoint is often reached through an SSH
//! tunnel, with no internet behind it), that reloads itself every `refresh` seconds. The server
//! renders every value; the small inline script only turns two successive loads into rates
//! (connections and bytes per second), keeping the previous totals in `sessionStorage`.

use std::fmt::Write as _;

use crate::metrics::status::{first, more_apps, runtime_note, Status};

/// Reload period when the URL does not ask for one (`?refresh=N`), and the bounds of N.
pub const DEFAULT_REFRESH: u32 = 5;
const REFRESH: std::ops::RangeInclusive<u32> = 1..=3600;

/// The refresh period a request's query asks for (`refresh=N`), within bounds.
pub fn refresh_of(query: &str) -> u32 {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("refresh="))
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(DEFAULT_REFRESH, |n| {
            n.clamp(*REFRESH.start(), *REFRESH.end())
        })
}

/// Text for HTML: every name comes from a config file, which someone else may write.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.3em 0 1.5em}\
th,td{padding:.2em .8em;text-align:right;border-bottom:1px solid #ddd}\
th:first-child,td:first-child{text-align:left}\
.up{color:#070;font-weight:bold}.down{color:#b00;font-weight:bold}\
h2{font-size:1.1em;margin-bottom:.2em}.muted{color:#777}";

/// Rates from this load and the previous one: every element with `data-rate="KEY"` shows the
/// change per second of the total `data-total` held under KEY since the last load.
const SCRIPT: &str = "(function(){var t=+document.body.dataset.time,s=window.sessionStorage,\
p=null;try{p=JSON.parse(s.getItem('flyproxy-status')||'null')}catch(e){}\
var cur={};document.querySelectorAll('[data-rate]').forEach(function(el){\
var k=el.dataset.rate,v=+el.dataset.total;cur[k]=v;\
if(p&&p.v[k]!==undefined&&t>p.t){var r=(v-p.v[k])/(t-p.t);\
el.textContent=r>=100?Math.round(r):r.toFixed(1)}});\
try{s.setItem('flyproxy-status',JSON.stringify({t:t,v:cur}))}catch(e){}})();";

/// The page for `st`, reloading every `refresh` seconds.
pub fn html(st: &Status, refresh: u32) -> String {
    let mut o = String::with_capacity(4096 + st.apps.len() * 512);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{refresh}\">\
<meta name=\"viewport\" content=\"width=device-width\">\
<title>flyproxy status</title><style>{STYLE}</style></head>\n\
<body data-time=\"{}\"><h1>flyproxy {}</h1>\n<p>{} of {} connection slots in use{}; \
reloads ok {}, rejected {}; config sha256 <code>{}</code>{}. \
<span class=\"muted\">Reloads every {refresh} s.</span></p>\n",
        st.time,
        esc(&st.flyproxy),
        st.connections.open,
        st.connections.limit,
        if st.connections.accept_paused {
            " (accepts paused)"
        } else {
            ""
        },
        st.reloads.ok,
        st.reloads.rejected,
        esc(&st.config.sha256),
        st.config
            .rejected_sha256
            .as_ref()
            .map(|r| format!(" (last rejected: <code>{}</code>)", esc(r)))
            .unwrap_or_default(),
    );
    for (i, app) in st.apps.iter().enumerate() {
        let ports: Vec<String> = app.ports.iter().map(u16::to_string).collect();
        let _ = write!(
            o,
            "<h2 class=\"app\" data-app=\"{name}\">app {name}{}</h2>\n<p>ports {}",
            if app.enabled { "" } else { " (disabled)" },
            esc(&first(&ports, 12)),
            name = esc(&app.name),
        );
        if !app.addresses.is_empty() {
            let _ = write!(o, "; addresses {}", esc(&first(&app.addresses, 8)));
        }
        if !app.hostnames.is_empty() {
            let _ = write!(o, "; hostnames {}", esc(&first(&app.hostnames, 8)));
        }
        let r = &app.refused;
        let _ = write!(
            o,
            "<br>open {}, queued <span class=\"queued\">{}</span>, accepted {} \
(<span data-rate=\"a{i}\" data-total=\"{}\">-</span>/s), \
refused: no target {}, limit {}, client limit {}</p>\n\
<table><tr><th>target</th><th>state</th><th>since</th><th>open</th><th>total</th><th>conn/s</th>\
<th>failed connects</th><th>bytes sent</th><th>bytes received</th><th>bytes/s</th>\
<th>last check error</th></tr>\n",
            app.open,
            app.queued,
            app.accepted,
            app.accepted,
            r.connect_failed,
            r.limit,
            r.client_limit,
        );
        for (j, t) in app.targets.iter().enumerate() {
            let state = if t.state == "up" { "up" } else { "down" };
            let bytes = t.bytes_sent + t.bytes_received;
            let _ = writeln!(
                o,
                "<tr class=\"target\" data-app=\"{}\" data-target=\"{}\" data-state=\"{state}\">\
<td>{}{}</td><td class=\"{state}\">{}</td>\
<td class=\"since\" data-since=\"{:.3}\">{} ago</td><td>{}</td><td>{}</td>\
<td data-rate=\"c{i}.{j}\" data-total=\"{}\">-</td><td>{}</td><td>{}</td><td>{}</td>\
<td data-rate=\"b{i}.{j}\" data-total=\"{bytes}\">-</td>\
<td class=\"error\">{}</td></tr>",
                esc(&app.name),
                esc(&t.target),
                esc(&t.target),
                esc(&runtime_note(t)),
                state.to_uppercase(),
                t.since,
                ago(st.time - t.since),
                t.open,
                t.total,
                t.total,
                t.connect_failures,
                t.bytes_sent,
                t.bytes_received,
                esc(t.last_check_error.as_deref().unwrap_or("-")),
            );
        }
        o.push_str("</table>\n");
    }
    if let Some(more) = more_apps(st) {
        let _ = writeln!(o, "<p class=\"more\">{}</p>", esc(&more));
    }
    let _ = write!(
        o,
        "<p class=\"muted\">Also: <a href=\"/status.json\">/status.json</a>, \
<a href=\"/metrics\">/metrics</a>, <a href=\"/status\">/status</a> (text).</p>\n\
<script>{SCRIPT}</script></body></html>\n"
    );
    o
}

/// A time span for people: `42s`, `5m 3s`, `2h 4m`, `3d 2h`.
fn ago(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn spans_for_people() {
        assert_eq!(ago(-1.0), "0s");
        assert_eq!(ago(42.9), "42s");
        assert_eq!(ago(303.0), "5m 3s");
        assert_eq!(ago(7440.0), "2h 4m");
        assert_eq!(ago(266_400.0), "3d 2h");
    }

    #[test]
    fn refresh_from_the_query() {
        assert_eq!(refresh_of(""), DEFAULT_REFRESH);
        assert_eq!(refresh_of("refresh=2"), 2);
        assert_eq!(refresh_of("x=1&refresh=0"), 1);
        assert_eq!(refresh_of("refresh=99999"), 3600);
        assert_eq!(refresh_of("refresh=abc"), DEFAULT_REFRESH);
    }
}
