//! flyproxy's long runs: `make reliability` (or `flyproxy-reliability run`).
//!
//! For each mode (simple, then bpf) it starts itself in a new network namespace
//! (`unshare -n`, loopback up), where it runs echo backends, the release proxy, and for up to
//! REL_MAX_SECONDS: a million short connections and 100 GB of bulk streams, the config file
//! rewritten 1,000 times (valid and invalid, in place, by rename, cut mid-write), failover
//! targets killed and restarted, backends and clients resetting. Then it checks that nothing
//! failed that should not have, that the applied config is the last valid one, and that the
//! proxy's descriptors, threads and memory are back where they started. It prints a table and
//! writes it to reliability/results.md.
//!
//! Subcommands (the last two are for its own use): `run`, `mode simple|bpf`,
//! `backend ADDR THREADS echo|reset`. Settings are environment variables, see README.md.

mod backend;
mod chaos;
mod load;
mod mode;
mod procs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("backend") => backend::main(&args[1..]),
        Some("mode") => mode::main(&args[1..]),
        None | Some("run") => run(),
        Some(other) => {
            eprintln!("usage: flyproxy-reliability [run | mode simple|bpf | backend ADDR THREADS MODE] (got {other:?})");
            std::process::exit(2);
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn gb(v: &str) -> String {
    format!("{:.1} GB", v.parse::<f64>().unwrap_or(0.0) / 1e9)
}

fn thousands(v: &str) -> String {
    let digits: String = v.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn run() {
    let began = Instant::now();
    let root = unsafe { libc::geteuid() } == 0;
    let modes: Vec<String> = std::env::var("REL_MODES")
        .unwrap_or_else(|_| "simple bpf".into())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let proxy = std::env::var("FLYPROXY").unwrap_or_else(|_| "target/release/flyproxy".into());
    let proxy = std::fs::canonicalize(&proxy).unwrap_or_else(|e| {
        eprintln!("{proxy}: {e} (build it: cargo build --release)");
        std::process::exit(2);
    });
    let out_md =
        PathBuf::from(std::env::var("REL_OUT").unwrap_or_else(|_| "reliability/results.md".into()));
    let exe = std::env::current_exe().expect("own path");
    let mut results: Vec<BTreeMap<String, String>> = Vec::new();
    for m in &modes {
        let result_file = std::env::temp_dir().join(format!(
            "flyproxy-reliability-{m}-{}.result",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&result_file);
        let mut cmd = if root {
            let mut c = Command::new("unshare");
            c.arg("-n")
                .arg("--")
                .arg(&exe)
                .args(["mode", m])
                .env("REL_NETNS", "1");
            c
        } else if m == "simple" {
            eprintln!("not root: simple mode runs in this network namespace, on its ports 7100-7601 and 9001-9100");
            let mut c = Command::new(&exe);
            c.args(["mode", m]);
            c
        } else {
            let mut r = BTreeMap::new();
            r.insert("mode".into(), m.clone());
            r.insert(
                "skipped".into(),
                "needs root (CAP_BPF, CAP_NET_ADMIN, a network namespace)".into(),
            );
            results.push(r);
            continue;
        };
        cmd.env("FLYPROXY", &proxy).env("REL_RESULT", &result_file);
        println!("=== {m} mode ===");
        let status = procs::spawn_tied(&mut cmd).and_then(|mut c| c.wait());
        let mut r: BTreeMap<String, String> = std::fs::read_to_string(&result_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let _ = std::fs::remove_file(&result_file);
        r.insert("mode".into(), m.clone());
        if !r.contains_key("pass") {
            r.insert("pass".into(), "false".into());
            r.insert(
                "skipped".into(),
                format!("the run failed before its checks: {status:?}"),
            );
        }
        results.push(r);
    }

    let header = "| mode | connections relayed | bytes relayed | reloads ok / rejected | faults injected | failed that should not have | leaks: fds, threads, RSS (start → after warm-up → end) | result |\n|---|---|---|---|---|---|---|---|";
    let mut table = String::from(header);
    for r in &results {
        let g = |k: &str| r.get(k).cloned().unwrap_or_default();
        if let Some(why) = r.get("skipped") {
            table.push_str(&format!(
                "\n| {} | – | – | – | – | – | – | not run: {why} |",
                g("mode")
            ));
            continue;
        }
        table.push_str(&format!(
            "\n| {} | {} ({} accepted by the proxy) | {} ({} up, {} down) | {} / {} | {} ({} target kills, {} backend resets, {} client resets) | {} | {}: fds {}, threads {}, RSS {} | {} |",
            g("mode"),
            thousands(&g("conns_ok")),
            thousands(&g("proxy_accepted")),
            gb(&g("proxy_bytes")),
            gb(&g("proxy_bytes_up")),
            gb(&g("proxy_bytes_down")),
            g("reloads_ok"),
            g("reloads_rejected"),
            thousands(&g("faults")),
            g("kills"),
            thousands(&g("be_resets")),
            thousands(&g("cl_resets")),
            g("unexpected"),
            if g("leaks") == "0" { "none".to_owned() } else { format!("{} found", g("leaks")) },
            g("fds"),
            g("threads"),
            g("rss"),
            if g("pass") == "true" { "PASS" } else { "FAIL" },
        ));
    }
    println!("\n{table}\n");

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut md = format!(
        "# flyproxy reliability run\n\n\
         Machine: {} cores ({cpu}), {mem}, Linux {}; {} UTC; the whole run took {:.1} minutes.\n\
         Built and run by `make reliability` (driver: `reliability/`, see reliability/README.md).\n\n\
         Settings: REL_CONNS={} REL_GB={} REL_REWRITES={} REL_MAX_SECONDS={} (per mode).\n\n{table}\n",
        sh("nproc", &[]),
        sh("uname", &["-r"]),
        sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
        began.elapsed().as_secs_f64() / 60.0,
        std::env::var("REL_CONNS").unwrap_or_else(|_| "1000000".into()),
        std::env::var("REL_GB").unwrap_or_else(|_| "100".into()),
        std::env::var("REL_REWRITES").unwrap_or_else(|_| "1000".into()),
        std::env::var("REL_MAX_SECONDS").unwrap_or_else(|_| "900".into()),
    );
    for r in &results {
        let g = |k: &str| r.get(k).cloned().unwrap_or_default();
        if r.contains_key("skipped") && !r.contains_key("conns_ok") {
            continue;
        }
        md.push_str(&format!(
            "\n## {} mode\n\n\
             - ran in its own network namespace: {}; soak {} s, {} s for the whole mode{}\n\
             - connections relayed and checked byte for byte: {} short, {} with a PROXY header (checked: it names the client and the port dialled), {} bulk (streams of up to 4 GiB each), {} to the failover app; the proxy accepted {}\n\
             - bytes: {} relayed by the proxy (`flyproxy_bytes_total`); bulk streams pushed and verified {} each way\n\
             - config chaos: {} rewrites: {} valid, {} broken JSON, {} failing validation; {} valid ones cut mid-write (a SIGHUP between the halves); {} by rename, {} in place; {} SIGHUPs, the rest noticed by the file watch. Proxy: {} reloads applied, {} rejected. The last write was invalid; applied config afterwards is the last valid one (version {}): {} ({})\n\
             - faults: {} kills of a failover target (SIGKILL, restarted 0.3-1.2 s later) while traffic flows; {} connections that a kill cut (expected), the proxy counted {} failed connects (`flyproxy_connect_failures_total`) and refused {} client connections for want of a target (`flyproxy_app_connections_refused_total{{reason=\"connect_failed\"}}`); {} backend resets (each must reach the client as a reset); {} client resets\n\
             - failed that should not have: {} ({})\n\
             - leaks: {} (fds must match the start but for listeners the config gained and the relay's spare pipes; relay threads (one per core, fixed) and the others match the start but for the log writer, which starts at the first log line; RSS within 25% / 16 MiB of the post-warm-up baseline)\n  - start: {}\n  - after warm-up: {}\n  - end of load: {}\n  - end, the relay threads settled: {}\n\
             - proxy exit after SIGTERM: {}\n",
            g("mode"),
            if g("netns") == "1" { "yes" } else { "no" },
            g("soak_seconds"),
            g("total_seconds"),
            if g("timed_out") == "true" { " (hit REL_MAX_SECONDS before the targets)" } else { "" },
            thousands(&g("short_ok")),
            thousands(&g("pp_ok")),
            thousands(&g("bulk_conns")),
            thousands(&g("fo_ok")),
            thousands(&g("proxy_accepted")),
            gb(&g("proxy_bytes")),
            gb(&g("bulk_bytes")),
            g("chaos_writes"),
            g("chaos_valid"),
            g("chaos_invalid_syntax"),
            g("chaos_invalid_semantic"),
            g("chaos_cut_mid_write"),
            g("chaos_by_rename"),
            g("chaos_in_place"),
            g("chaos_hups"),
            g("reloads_ok"),
            g("reloads_rejected"),
            g("chaos_final_version"),
            if g("chaos_final_ok") == "true" { "yes" } else { "NO" },
            g("chaos_final_detail"),
            g("kills"),
            thousands(&g("fo_fail_expected")),
            thousands(&g("connect_failures")),
            g("refused_connect_failed"),
            thousands(&g("be_resets")),
            thousands(&g("cl_resets")),
            g("unexpected"),
            g("unexpected_detail"),
            if g("leaks") == "0" { "none".to_owned() } else { g("leak_detail") },
            g("snap_start"),
            g("snap_base"),
            g("snap_busy_end"),
            g("snap_end"),
            g("proxy_exit"),
        ));
        if !g("failures").is_empty() {
            md.push_str(&format!("- first unexpected failures: {}\n", g("failures")));
        }
    }
    if let Some(dir) = out_md.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out_md, md) {
        Ok(()) => println!("wrote {}", out_md.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out_md.display()),
    }
    let pass = results.iter().all(|r| {
        r.get("pass").map(String::as_str) == Some("true") || (r.contains_key("skipped") && !root)
    });
    std::process::exit(if pass { 0 } else { 1 });
}
