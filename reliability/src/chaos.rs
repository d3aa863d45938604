//! The config file under chaos: 1,000 rewrites while traffic flows, valid and invalid versions
//! mixed, written in place, by rename, or cut mid-write, with or without a SIGHUP.
//!
//! Every valid version keeps the stable apps' ports (bulk, short, pp, failover, resetter), so
//! no connection to them may ever fail; it changes their targets, balancing and PROXY protocol
//! version, and adds churn apps on ports 7500-7599 whose names carry the version number, so
//! the applied version can be read off /metrics.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::procs::{signal, Rng};

pub const BULK_PORTS: [u16; 4] = [7100, 7101, 7102, 7103];
pub const SHORT_PORTS: [u16; 16] = [
    7200, 7201, 7202, 7203, 7204, 7205, 7206, 7207, 7208, 7209, 7210, 7211, 7212, 7213, 7214, 7215,
];
pub const PP_PORTS: [u16; 2] = [7600, 7601];
pub const FAILOVER_PORTS: [u16; 4] = [7300, 7301, 7302, 7303];
pub const RESET_PORT: u16 = 7400;
pub const CHURN: std::ops::Range<u16> = 7500..7600;
/// Stable echo backends (never faulted), one of them IPv6.
pub const STABLE: [&str; 3] = ["127.0.0.1:9001", "127.0.0.1:9002", "[::1]:9003"];
/// Echo backends of the failover app, killed and restarted while traffic flows.
pub const FAILOVER: [&str; 3] = ["127.0.0.1:9011", "127.0.0.1:9012", "127.0.0.1:9013"];
/// A backend that resets every connection.
pub const RESETTER: &str = "127.0.0.1:9021";
pub const METRICS: &str = "127.0.0.1:9100";
pub const BPF_PORT: u16 = 8000;

/// What a valid version contains, to check the applied one against.
#[derive(Debug, Clone, Default)]
pub struct Version {
    pub number: u64,
    pub apps: BTreeSet<String>,
    pub churn_ports: Vec<u16>,
    pub ports: usize,
}

fn quoted(v: &[&str]) -> String {
    v.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nums(v: &[u16]) -> String {
    v.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

/// Valid version `n`: the stable apps with some settings varied, plus 0-3 churn apps.
pub fn valid(n: u64, rng: &mut Rng) -> (String, Version) {
    let mut stable: Vec<&str> = STABLE.to_vec();
    // A non-empty subset of the stable targets, in some order, for the short app.
    for i in (1..stable.len()).rev() {
        stable.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    let short_targets = &stable[..rng.range(1, 4) as usize];
    let balance = rng.pick(&["p2c", "random", "round-robin"]);
    let pp = rng.pick(&["v1", "v2"]);
    let mut apps = vec![
        format!(
            r#"{{"Name": "bulk", "Ports": [{}], "Targets": [{}]}}"#,
            nums(&BULK_PORTS),
            quoted(&STABLE)
        ),
        format!(
            r#"{{"Name": "short", "Ports": [{}], "Targets": [{}], "Balance": "{balance}"}}"#,
            nums(&SHORT_PORTS),
            quoted(short_targets)
        ),
        format!(
            r#"{{"Name": "pp", "Ports": [{}], "Targets": [{}], "ProxyProtocol": "{pp}"}}"#,
            nums(&PP_PORTS),
            quoted(&STABLE[..2])
        ),
        format!(
            r#"{{"Name": "failover", "Ports": [{}], "Targets": [{}], "ConnectAttempts": 3,
     "HealthCheck": {{"IntervalMs": 300, "TimeoutMs": 200, "Fall": 1, "Rise": 1}}}}"#,
            nums(&FAILOVER_PORTS),
            quoted(&FAILOVER)
        ),
        format!(r#"{{"Name": "resetter", "Ports": [{RESET_PORT}], "Targets": ["{RESETTER}"]}}"#),
    ];
    let mut names: BTreeSet<String> = ["bulk", "short", "pp", "failover", "resetter"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut churn_ports = Vec::new();
    let mut taken = BTreeSet::new();
    for j in 0..rng.range(0, 4) {
        let name = format!("churn-{n}-{j}");
        let mut ports = Vec::new();
        for _ in 0..rng.range(1, 5) {
            let p = rng.range(CHURN.start as u64, CHURN.end as u64) as u16;
            if taken.insert(p) {
                ports.push(p);
            }
        }
        if ports.is_empty() {
            continue;
        }
        apps.push(format!(
            r#"{{"Name": "{name}", "Ports": [{}], "Targets": [{}]}}"#,
            nums(&ports),
            quoted(&STABLE[..rng.range(1, 4) as usize])
        ));
        churn_ports.extend(&ports);
        names.insert(name);
    }
    let ports = BULK_PORTS.len()
        + SHORT_PORTS.len()
        + PP_PORTS.len()
        + FAILOVER_PORTS.len()
        + 1
        + churn_ports.len();
    let text = format!("{{\"Apps\": [\n  {}\n]}}\n", apps.join(",\n  "));
    (
        text,
        Version {
            number: n,
            apps: names,
            churn_ports,
            ports,
        },
    )
}

/// An invalid version: broken JSON, or JSON that fails validation.
pub fn invalid(n: u64, rng: &mut Rng) -> (String, &'static str) {
    let (text, _) = valid(n, rng);
    let bad_app = |body: &str| {
        let cut = text.rfind(']').unwrap();
        format!("{},\n  {body}\n]}}\n", text[..cut].trim_end())
    };
    match rng.range(0, 9) {
        0 => {
            let cut = rng.range(0, text.len() as u64 - 4) as usize;
            (text[..cut].to_owned(), "syntax")
        }
        1 => (format!("{text} trailing"), "syntax"),
        2 => (String::new(), "syntax"),
        3 => (text.replacen("\"Ports\"", "\"Ports\" 1", 1), "syntax"),
        // A churn app taking a stable app's port.
        4 => (
            bad_app(&format!(
                r#"{{"Name": "thief-{n}", "Ports": [{}], "Targets": ["{}"]}}"#,
                SHORT_PORTS[0], STABLE[0]
            )),
            "semantic",
        ),
        5 => (
            bad_app(&format!(
                r#"{{"Name": "zero-{n}", "Ports": [0], "Targets": ["{}"]}}"#,
                STABLE[0]
            )),
            "semantic",
        ),
        6 => (
            bad_app(&format!(
                r#"{{"Name": "badtarget-{n}", "Ports": [7599], "Targets": ["no port here"]}}"#
            )),
            "semantic",
        ),
        7 => (
            text.replacen("\"Balance\"", "\"Weight\": 3, \"Balance\"", 1),
            "semantic",
        ),
        _ => (
            text.replacen("\"ProxyProtocol\": \"v", "\"ProxyProtocol\": \"x", 1),
            "semantic",
        ),
    }
}

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub writes: u64,
    pub valid: u64,
    pub invalid_syntax: u64,
    pub invalid_semantic: u64,
    /// Valid versions written in place in two parts with a SIGHUP between (a reload sees half).
    pub cut_mid_write: u64,
    pub by_rename: u64,
    pub in_place: u64,
    pub hups: u64,
    pub last_valid: Version,
    /// Every churn port any valid version had.
    pub churn_ports_seen: BTreeSet<u16>,
    pub last_written_valid: bool,
}

fn write_in_place(path: &Path, parts: &[&[u8]], mut between: impl FnMut()) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            f.flush()?;
            between();
        }
        f.write_all(p)?;
    }
    Ok(())
}

fn write_by_rename(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `rewrites` rewrites of `path`, each followed (usually) by a SIGHUP to `pid`. The last valid
/// version is always followed by one invalid one, so that "applied" and "last written" differ.
pub fn run(path: &Path, pid: u32, rewrites: u64, first: u64, stop: &AtomicBool) -> Outcome {
    let mut rng = Rng::new(0xC0FFEE ^ u64::from(pid));
    let mut out = Outcome::default();
    let hup = |out: &mut Outcome| {
        if signal(pid, libc::SIGHUP) {
            out.hups += 1;
        }
    };
    for i in 0..rewrites {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = first + i;
        let last = i + 1 == rewrites;
        let second_last = i + 2 == rewrites;
        let want_valid = second_last || (!last && rng.chance(55));
        let res = if want_valid {
            let (text, version) = valid(n, &mut rng);
            out.valid += 1;
            out.churn_ports_seen.extend(&version.churn_ports);
            out.last_valid = version;
            out.last_written_valid = true;
            match rng.range(0, 10) {
                0..=3 => {
                    out.by_rename += 1;
                    write_by_rename(path, text.as_bytes())
                }
                4..=6 => {
                    out.in_place += 1;
                    write_in_place(path, &[text.as_bytes()], || {})
                }
                _ => {
                    // Cut mid-write: half, a SIGHUP so that a reload reads the half, the rest.
                    out.in_place += 1;
                    out.cut_mid_write += 1;
                    let cut = rng.range(1, text.len() as u64) as usize;
                    let (a, b) = text.as_bytes().split_at(cut);
                    let pause = Duration::from_millis(rng.range(5, 40));
                    let mut sent = false;
                    let r = write_in_place(path, &[a, b], || {
                        sent = signal(pid, libc::SIGHUP);
                        std::thread::sleep(pause);
                    });
                    if sent {
                        out.hups += 1;
                    }
                    r
                }
            }
        } else {
            let (text, kind) = invalid(n, &mut rng);
            if kind == "syntax" {
                out.invalid_syntax += 1;
            } else {
                out.invalid_semantic += 1;
            }
            out.last_written_valid = false;
            if rng.chance(50) {
                out.by_rename += 1;
                write_by_rename(path, text.as_bytes())
            } else {
                out.in_place += 1;
                write_in_place(path, &[text.as_bytes()], || {})
            }
        };
        if let Err(e) = res {
            eprintln!("chaos: writing {}: {e}", path.display());
        }
        out.writes += 1;
        if second_last {
            // The last valid version must be read before the invalid one replaces it, or the
            // check afterwards ("the applied config is the last valid version") fails for want
            // of a reload that had no chance to happen: announced, and left for 3 ticks of the
            // file watch (--reload-interval 200ms), which a loaded machine needs.
            hup(&mut out);
            std::thread::sleep(Duration::from_millis(600));
            continue;
        }
        // Most writes are announced; the others must be noticed by the file watch.
        if rng.chance(70) {
            hup(&mut out);
        }
        std::thread::sleep(Duration::from_millis(rng.range(15, 60)));
    }
    out
}
