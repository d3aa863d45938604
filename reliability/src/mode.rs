//! One mode's run (`flyproxy-reliability mode simple|bpf`), normally inside a network namespace
//! of its own: backends, the proxy, warm-up, the soak with config chaos and faults, then the
//! checks, and a result file for the orchestrator.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::chaos::{
    self, BPF_PORT, BULK_PORTS, FAILOVER, FAILOVER_PORTS, METRICS, PP_PORTS, RESETTER, RESET_PORT,
    SHORT_PORTS, STABLE,
};
use crate::load::{self, Ctx, Stats};
use crate::procs::{
    raise_nofile, signal, snapshot, wait_listening, Metrics, Rng, Snapshot, Spawner,
};

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    conns: u64,
    /// Bytes the proxy must relay, both directions together.
    bytes: u64,
    rewrites: u64,
    max_seconds: u64,
    warmup_seconds: u64,
    short_threads: u64,
    bulk_streams: u64,
    segment: u64,
    idle_wait: u64,
    proxy: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            conns: env_u64("REL_CONNS", 1_000_000),
            bytes: env_u64("REL_GB", 100) * 1_000_000_000,
            rewrites: env_u64("REL_REWRITES", 1000),
            max_seconds: env_u64("REL_MAX_SECONDS", 900),
            warmup_seconds: env_u64("REL_WARMUP_SECONDS", 5),
            short_threads: env_u64("REL_SHORT_THREADS", 3),
            bulk_streams: env_u64("REL_BULK_STREAMS", 4),
            segment: env_u64("REL_SEGMENT_MB", 4096) << 20,
            idle_wait: env_u64("REL_IDLE_WAIT", 80),
            proxy: std::env::var("FLYPROXY")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from("target/release/flyproxy")),
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a literal address")
}

fn backend(spawner: &Spawner, exe: &Path, work: &Path, a: &str, threads: u32, mode: &str) -> Child {
    let name = a.replace(['[', ']', ':'], "_");
    let log = File::create(work.join(format!("backend{name}.log"))).expect("backend log");
    let mut cmd = Command::new(exe);
    cmd.args(["backend", a, &threads.to_string(), mode])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let child = spawner.spawn(cmd).expect("start a backend");
    assert!(
        wait_listening(addr(a), Duration::from_secs(10)),
        "backend {a} did not start"
    );
    child
}

/// Several snapshots a little apart, field by field the least: a health check's socket or a
/// connection closing just then must not count as a leak.
fn settled(pid: u32) -> Snapshot {
    let mut best: Option<Snapshot> = None;
    for _ in 0..5 {
        if let Ok(s) = snapshot(pid) {
            best = Some(match best {
                None => s,
                Some(b) => {
                    // The thread fields from one sample, so that they agree with each other:
                    // the one with the fewest threads other than relay threads (a relay thread
                    // just created, not yet scheduled on a busy machine, still has the main
                    // thread's name). The other fields, field by field.
                    let t = if s.named.len() < b.named.len()
                        || (s.named.len() == b.named.len() && s.threads < b.threads)
                    {
                        &s
                    } else {
                        &b
                    };
                    Snapshot {
                        sockets: b.sockets.min(s.sockets),
                        pipes: b.pipes.min(s.pipes),
                        other: b.other.min(s.other),
                        threads: t.threads,
                        relay_threads: t.relay_threads,
                        named: t.named.clone(),
                        rss_kib: b.rss_kib.min(s.rss_kib),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    best.unwrap_or_default()
}

/// Wait until the proxy has no connection open; false if it still has some after `within`.
fn wait_idle(m: SocketAddr, within: Duration) -> (bool, String) {
    let until = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < until {
        if let Ok(x) = Metrics::fetch(m) {
            let open = x.sum("flyproxy_connections_open", &[]);
            let apps = x.sum("flyproxy_app_connections_active", &[]);
            let targets = x.sum("flyproxy_connections_active", &[]);
            last =
                format!("open slots {open}, app connections {apps}, target connections {targets}");
            if open == 0.0 && apps == 0.0 && targets == 0.0 {
                return (true, last);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (false, last)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn snap_text(s: &Snapshot) -> String {
    format!(
        "fds {} (sockets {}, pipes {}, other {}), threads {} ({} relay; {}), RSS {} MiB",
        s.fds(),
        s.sockets,
        s.pipes,
        s.other,
        s.threads,
        s.relay_threads,
        s.named.join(" "),
        mib(s.rss_kib)
    )
}

/// Run every scenario against `ctx` until it says stop; with `chaos`, also the config chaos
/// and the backend kills. Returns the chaos outcome.
#[allow(clippy::too_many_arguments)]
fn run_load(
    ctx: &Arc<Ctx>,
    st: &Settings,
    segment: u64,
    chaos_run: Option<(&Path, u32, u64)>,
    failover: &Arc<Mutex<Vec<Child>>>,
    spawner: &Spawner,
    exe: &Path,
    work: &Path,
    label: &str,
    proxy_pid: u32,
) -> Option<chaos::Outcome> {
    ctx.chaos_done.store(chaos_run.is_none(), Ordering::Relaxed);
    let mut handles = Vec::new();
    let mut seed = 1u64;
    let mut next_seed = || {
        seed += 1;
        seed * 7919
    };
    for _ in 0..st.short_threads {
        let (c, s) = (Arc::clone(ctx), next_seed());
        handles.push(std::thread::spawn(move || load::short_loop(&c, s)));
    }
    for i in 0..st.bulk_streams as usize {
        let c = Arc::clone(ctx);
        handles.push(std::thread::spawn(move || load::bulk_loop(&c, i, segment)));
    }
    for _ in 0..2 {
        let (c, s) = (Arc::clone(ctx), next_seed());
        handles.push(std::thread::spawn(move || load::failover_loop(&c, s)));
    }
    {
        let (c, s) = (Arc::clone(ctx), next_seed());
        handles.push(std::thread::spawn(move || load::backend_reset_loop(&c, s)));
        let (c, s) = (Arc::clone(ctx), next_seed());
        handles.push(std::thread::spawn(move || load::client_reset_loop(&c, s)));
    }
    // Kills of failover targets while traffic flows: one target at a time, then restarted.
    let killer = chaos_run.is_some().then(|| {
        let (c, fo) = (Arc::clone(ctx), Arc::clone(failover));
        let spawner_exe = exe.to_owned();
        let work = work.to_owned();
        let spawner = spawner.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(99);
            let nap = |c: &Ctx, ms: u64| {
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until && !c.all_done() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            while !c.all_done() && c.stats.kills.load(Ordering::Relaxed) < 400 {
                nap(&c, rng.range(1000, 2500));
                if c.all_done() {
                    break;
                }
                let i = rng.range(0, FAILOVER.len() as u64) as usize;
                {
                    let mut fo = fo.lock().unwrap();
                    // Recorded before the signal, closed once the process is reaped (its
                    // sockets are gone by then).
                    let k = {
                        let mut kills = c.kills.lock().unwrap();
                        kills.push((Instant::now(), None));
                        kills.len() - 1
                    };
                    let _ = fo[i].kill();
                    let _ = fo[i].wait();
                    c.kills.lock().unwrap()[k].1 = Some(Instant::now());
                    c.stats.kills.fetch_add(1, Ordering::Relaxed);
                }
                nap(&c, rng.range(300, 1200));
                let child = backend(&spawner, &spawner_exe, &work, FAILOVER[i], 16, "echo");
                fo.lock().unwrap()[i] = child;
            }
        })
    });
    let chaos = chaos_run.map(|(path, pid, rewrites)| {
        let c = Arc::clone(ctx);
        let path = path.to_owned();
        std::thread::spawn(move || {
            let out = chaos::run(&path, pid, rewrites, 1, &c.stop);
            c.chaos_done.store(true, Ordering::Relaxed);
            out
        })
    });
    // Progress every 10 s until every load thread is done.
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut last_ok = 0u64;
    let m = addr(METRICS);
    while handles.iter().any(|h| !h.is_finished())
        || chaos.as_ref().is_some_and(|h| !h.is_finished())
    {
        std::thread::sleep(Duration::from_millis(200));
        if last_print.elapsed() >= Duration::from_secs(10) {
            let s = &ctx.stats;
            let ok = s.ok();
            let mx = Metrics::fetch(m).unwrap_or_default();
            let snap = snapshot(proxy_pid).unwrap_or_default();
            println!(
                "[{label} {:>4}s] conns {ok} (+{}/s)  bulk {:.1} GB each way  proxy bytes {:.1} GB  reloads ok {} rejected {}  faults {} (kills {})  unexpected {}  proxy: {}",
                started.elapsed().as_secs(),
                (ok - last_ok) / last_print.elapsed().as_secs().max(1),
                s.bulk_bytes.load(Ordering::Relaxed) as f64 / 1e9,
                mx.sum("flyproxy_bytes_total", &[]) / 1e9,
                mx.sum("flyproxy_reloads_total", &["result=\"ok\""]),
                mx.sum("flyproxy_reloads_total", &["result=\"rejected\""]),
                s.faults(),
                s.kills.load(Ordering::Relaxed),
                s.unexpected(),
                snap_text(&snap),
            );
            last_ok = ok;
            last_print = Instant::now();
        }
    }
    for h in handles {
        let _ = h.join();
    }
    if let Some(k) = killer {
        let _ = k.join();
    }
    chaos.map(|h| h.join().expect("chaos thread"))
}

pub fn main(args: &[String]) -> ! {
    let mode = args.first().cloned().unwrap_or_else(|| "simple".into());
    let st = Settings::from_env();
    let began = Instant::now();
    let mut r: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        r.insert(k.to_owned(), v);
    };
    if std::env::var("REL_NETNS").as_deref() == Ok("1") {
        let ok = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set lo up failed");
        // Our own namespace: a wider ephemeral range for a million connections.
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000");
    }
    raise_nofile();
    let exe = std::env::current_exe().expect("own path");
    let work = std::env::temp_dir().join(format!(
        "flyproxy-reliability-{mode}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work).expect("work dir");
    println!(
        "[{mode}] work dir {} (config, proxy and backend logs)",
        work.display()
    );
    let spawner = Spawner::new();

    let stable: Vec<Child> = STABLE
        .iter()
        .map(|a| backend(&spawner, &exe, &work, a, 48, "echo"))
        .collect();
    let failover = Arc::new(Mutex::new(
        FAILOVER
            .iter()
            .map(|a| backend(&spawner, &exe, &work, a, 16, "echo"))
            .collect::<Vec<_>>(),
    ));
    let resetter = backend(&spawner, &exe, &work, RESETTER, 8, "reset");

    let cfg = work.join("config.json");
    let (text, v0) = chaos::valid(0, &mut Rng::new(7));
    std::fs::write(&cfg, text).expect("config");
    let log = File::create(work.join("proxy.log")).expect("proxy log");
    let mut cmd = Command::new(&st.proxy);
    if mode == "bpf" {
        cmd.args(["bpf", "-p", &BPF_PORT.to_string()]);
    } else {
        cmd.arg("simple");
    }
    cmd.arg("-c")
        .arg(&cfg)
        .args([
            "--metrics",
            METRICS,
            "--log-level",
            "warn",
            "--reload-interval",
            "200ms",
        ])
        .args(["--connect-timeout", "2s", "--drain-timeout", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut proxy = spawner.spawn(cmd).expect("start flyproxy");
    let pid = proxy.id();
    let m = addr(METRICS);
    let up = Instant::now();
    while Metrics::fetch(m).is_err() {
        if up.elapsed() > Duration::from_secs(15) || proxy.try_wait().ok().flatten().is_some() {
            eprintln!("[{mode}] the proxy did not come up; its log:");
            eprintln!(
                "{}",
                std::fs::read_to_string(work.join("proxy.log")).unwrap_or_default()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for p in [
        BULK_PORTS[0],
        SHORT_PORTS[0],
        PP_PORTS[0],
        FAILOVER_PORTS[0],
        RESET_PORT,
    ] {
        assert!(
            wait_listening(SocketAddr::new(host, p), Duration::from_secs(10)),
            "port {p}"
        );
    }
    // The probes just made started relay threads: let them settle before the first snapshot.
    let (idle, why) = wait_idle(m, Duration::from_secs(30));
    assert!(idle, "not idle after the start probes: {why}");
    std::thread::sleep(Duration::from_secs(1));
    let s0 = settled(pid);
    println!("[{mode}] proxy pid {pid} up: {}", snap_text(&s0));

    // Warm-up: every scenario for a few seconds, so that the relay pool, the pipe pool and the
    // allocator reach their working size; the baseline is taken after it, once idle.
    let warm = Arc::new(Ctx {
        stop: AtomicBool::new(false),
        chaos_done: AtomicBool::new(true),
        conn_target: u64::MAX,
        bulk_target: u64::MAX,
        deadline: Instant::now() + Duration::from_secs(st.warmup_seconds),
        stats: Stats::default(),
        kills: Mutex::new(Vec::new()),
        failures: Mutex::new(Vec::new()),
        host,
    });
    run_load(
        &warm,
        &st,
        64 << 20,
        None,
        &failover,
        &spawner,
        &exe,
        &work,
        &format!("{mode} warm-up"),
        pid,
    );
    let (idle, why) = wait_idle(m, Duration::from_secs(30));
    assert!(idle, "not idle after the warm-up: {why}");
    let base = settled(pid);
    let warm_unexpected = warm.stats.unexpected();
    println!(
        "[{mode}] warm-up: {} connections, {} unexpected failures; baseline: {}",
        warm.stats.ok(),
        warm_unexpected,
        snap_text(&base)
    );
    let before = Metrics::fetch(m).unwrap_or_default();

    // The soak, with the config chaos and the faults.
    let ctx = Arc::new(Ctx {
        stop: AtomicBool::new(false),
        chaos_done: AtomicBool::new(true),
        conn_target: st.conns,
        bulk_target: st.bytes / 2,
        deadline: Instant::now() + Duration::from_secs(st.max_seconds),
        stats: Stats::default(),
        kills: Mutex::new(Vec::new()),
        failures: Mutex::new(Vec::new()),
        host,
    });
    let soak_began = Instant::now();
    let chaos = run_load(
        &ctx,
        &st,
        st.segment,
        Some((&cfg, pid, st.rewrites)),
        &failover,
        &spawner,
        &exe,
        &work,
        &mode,
        pid,
    )
    .expect("chaos ran");
    let soak_secs = soak_began.elapsed().as_secs_f64();
    let timed_out = Instant::now() >= ctx.deadline;

    // The applied config must be the last valid version: the last write was invalid, so make
    // sure the proxy has read it (a tick and a SIGHUP), then look.
    std::thread::sleep(Duration::from_millis(600));
    signal(pid, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(600));
    let mx = Metrics::fetch(m).unwrap_or_default();
    let applied: Vec<String> = mx.label_values("flyproxy_app_connections_total", "app");
    let want: Vec<String> = chaos.last_valid.apps.iter().cloned().collect();
    let mut final_problems = Vec::new();
    if applied != want {
        final_problems.push(format!(
            "applied apps {applied:?}, last valid version {} has {want:?}",
            chaos.last_valid.number
        ));
    }
    let (mut probe_ok, mut probe_refused) = (0, 0);
    let mut got = Vec::new();
    for &p in &chaos.last_valid.churn_ports {
        let msg = format!("probe {p}");
        match probe(SocketAddr::new(host, p), msg.as_bytes(), &mut got) {
            Ok(()) if got == msg.as_bytes() => probe_ok += 1,
            other => final_problems.push(format!("port {p} of the last valid version: {other:?}")),
        }
    }
    for &p in chaos
        .churn_ports_seen
        .iter()
        .filter(|p| !chaos.last_valid.churn_ports.contains(p))
        .take(40)
    {
        match TcpStream::connect_timeout(&SocketAddr::new(host, p), Duration::from_secs(1)) {
            Err(_) => probe_refused += 1,
            Ok(_) => final_problems.push(format!(
                "port {p} is not in the last valid version but accepts"
            )),
        }
    }
    let final_ok = final_problems.is_empty();
    println!(
        "[{mode}] chaos: {} rewrites ({} valid, {} invalid); applied config is version {}: {}",
        chaos.writes,
        chaos.valid,
        chaos.invalid_syntax + chaos.invalid_semantic,
        chaos.last_valid.number,
        if final_ok {
            "OK".to_owned()
        } else {
            final_problems.join("; ")
        }
    );

    // Leaks: nothing left open, and the relay threads back to those at start. The pool is a
    // fixed thread per core (src/relay/pool.rs), started with the proxy and never grown, so the
    // wait below normally ends at once; it stays so that a pool which did grow under load is
    // given the time to shrink back before it is called a leak. The baseline is the count after
    // the warm-up: the start snapshot may come before the pool's threads (the proxy says
    // "started" just before it starts them).
    let waiting_by_design = base.relay_threads;
    let (idle, idle_why) = wait_idle(m, Duration::from_secs(30));
    let end_busy = settled(pid);
    println!("[{mode}] idle: {idle} ({idle_why}); now {}; waiting up to {} s for the relay threads to be the {waiting_by_design} after the warm-up", snap_text(&end_busy), st.idle_wait);
    let wait_began = Instant::now();
    while wait_began.elapsed() < Duration::from_secs(st.idle_wait) {
        if snapshot(pid).is_ok_and(|s| s.relay_threads <= waiting_by_design) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let end = settled(pid);
    let after = Metrics::fetch(m).unwrap_or_default();
    println!(
        "[{mode}] after {:.0} s: {}",
        wait_began.elapsed().as_secs_f64(),
        snap_text(&end)
    );
    put(
        "relay_expiry_seconds",
        format!("{:.0}", wait_began.elapsed().as_secs_f64()),
    );

    let port_delta = if mode == "bpf" {
        0
    } else {
        chaos.last_valid.ports as i64 - v0.ports as i64
    };
    let mut leaks = Vec::new();
    if !idle {
        leaks.push(format!("connections left open: {idle_why}"));
    }
    if end.sockets as i64 != s0.sockets as i64 + port_delta {
        leaks.push(format!(
            "sockets {} at start (+{port_delta} for the ports the config gained) but {} at the end",
            s0.sockets, end.sockets
        ));
    }
    // The relay keeps up to 64 spare kernel pipes (src/relay.rs PIPE_POOL_MAX): 128 fds.
    if end.pipes > s0.pipes + 128 {
        leaks.push(format!(
            "pipe fds {} at start, {} at the end (pool keeps at most 128)",
            s0.pipes, end.pipes
        ));
    }
    if end.other != s0.other {
        leaks.push(format!(
            "other fds {} at start, {} at the end",
            s0.other, end.other
        ));
    }
    // Threads: the proxy's own exactly as at start, the relay pool's as after the warm-up (one
    // thread per core, fixed): one more is a leak.
    // (The log writer thread starts at the first log line, which may come after the start
    // snapshot: one "log" thread may appear, once.)
    let own =
        |s: &Snapshot| -> Vec<String> { s.named.iter().filter(|n| *n != "log").cloned().collect() };
    if own(&end) != own(&s0) || end.named.iter().filter(|n| *n == "log").count() > 1 {
        leaks.push(format!(
            "threads other than relay threads: [{}] at start, [{}] at the end",
            s0.named.join(" "),
            end.named.join(" ")
        ));
    }
    if end.relay_threads > waiting_by_design {
        leaks.push(format!(
            "{} relay threads {} s after the load, {waiting_by_design} after the warm-up (the pool is \
             one thread per core, fixed)",
            end.relay_threads,
            wait_began.elapsed().as_secs()
        ));
    }
    let rss_allow = base.rss_kib + (base.rss_kib / 4).max(16 * 1024);
    if end.rss_kib > rss_allow {
        leaks.push(format!(
            "RSS {} MiB after warm-up, {} MiB at the end (allowed {} MiB)",
            mib(base.rss_kib),
            mib(end.rss_kib),
            mib(rss_allow)
        ));
    }

    // Stop the proxy as an operator would, and expect a clean exit.
    signal(pid, libc::SIGTERM);
    let stop_began = Instant::now();
    let exit = loop {
        match proxy.try_wait() {
            Ok(Some(s)) => break format!("{s}"),
            Ok(None) if stop_began.elapsed() > Duration::from_secs(40) => {
                let _ = proxy.kill();
                let _ = proxy.wait();
                break "did not exit within 40 s of SIGTERM (killed)".into();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break format!("wait failed: {e}"),
        }
    };
    let exit_ok = exit == "exit status: 0";
    for mut c in stable
        .into_iter()
        .chain(std::mem::take(&mut *failover.lock().unwrap()))
        .chain([resetter])
    {
        let _ = c.kill();
        let _ = c.wait();
    }

    let s = &ctx.stats;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let delta = |name: &str, labels: &[&str]| after.sum(name, labels) - before.sum(name, labels);
    put("mode", mode.clone());
    put("netns", std::env::var("REL_NETNS").unwrap_or_default());
    put("soak_seconds", format!("{soak_secs:.0}"));
    put(
        "total_seconds",
        format!("{:.0}", began.elapsed().as_secs_f64()),
    );
    put("timed_out", timed_out.to_string());
    put("conns_ok", s.ok().to_string());
    put("short_ok", g(&s.short_ok).to_string());
    put("pp_ok", g(&s.pp_ok).to_string());
    put("bulk_conns", g(&s.bulk_conns).to_string());
    put("fo_ok", g(&s.fo_ok).to_string());
    put("fo_fail_expected", g(&s.fo_fail_expected).to_string());
    put(
        "proxy_accepted",
        format!("{:.0}", delta("flyproxy_app_connections_total", &[])),
    );
    put(
        "proxy_bytes",
        format!("{:.0}", delta("flyproxy_bytes_total", &[])),
    );
    put(
        "proxy_bytes_up",
        format!(
            "{:.0}",
            delta("flyproxy_bytes_total", &["client_to_target"])
        ),
    );
    put(
        "proxy_bytes_down",
        format!(
            "{:.0}",
            delta("flyproxy_bytes_total", &["target_to_client"])
        ),
    );
    put("bulk_bytes", g(&s.bulk_bytes).to_string());
    put("small_bytes", g(&s.small_bytes).to_string());
    put(
        "reloads_ok",
        format!("{:.0}", delta("flyproxy_reloads_total", &["result=\"ok\""])),
    );
    put(
        "reloads_rejected",
        format!(
            "{:.0}",
            delta("flyproxy_reloads_total", &["result=\"rejected\""])
        ),
    );
    put(
        "connect_failures",
        format!("{:.0}", delta("flyproxy_connect_failures_total", &[])),
    );
    put(
        "refused_connect_failed",
        format!(
            "{:.0}",
            delta(
                "flyproxy_app_connections_refused_total",
                &["connect_failed"]
            )
        ),
    );
    put("chaos_writes", chaos.writes.to_string());
    put("chaos_valid", chaos.valid.to_string());
    put("chaos_invalid_syntax", chaos.invalid_syntax.to_string());
    put("chaos_invalid_semantic", chaos.invalid_semantic.to_string());
    put("chaos_cut_mid_write", chaos.cut_mid_write.to_string());
    put("chaos_by_rename", chaos.by_rename.to_string());
    put("chaos_in_place", chaos.in_place.to_string());
    put("chaos_hups", chaos.hups.to_string());
    put("chaos_final_version", chaos.last_valid.number.to_string());
    put("chaos_final_ok", final_ok.to_string());
    put(
        "chaos_final_detail",
        if final_ok {
            format!("apps {want:?}; {probe_ok} churn ports answer, {probe_refused} others refused")
        } else {
            final_problems.join("; ")
        },
    );
    put("kills", g(&s.kills).to_string());
    put("be_resets", g(&s.be_resets).to_string());
    put("cl_resets", g(&s.cl_resets).to_string());
    put("faults", s.faults().to_string());
    put("unexpected", (s.unexpected() + warm_unexpected).to_string());
    put("unexpected_detail", format!(
        "short {}, pp {}, bulk {}, failover without a kill {}, backend reset not passed on {}, warm-up {}",
        g(&s.short_fail), g(&s.pp_fail), g(&s.bulk_fail), g(&s.fo_fail_unexpected), g(&s.be_reset_not_passed), warm_unexpected
    ));
    put("failures", ctx.failures.lock().unwrap().join(" | "));
    put("snap_start", snap_text(&s0));
    put("snap_base", snap_text(&base));
    put("snap_busy_end", snap_text(&end_busy));
    put("snap_end", snap_text(&end));
    put(
        "fds",
        format!("{} → {} → {}", s0.fds(), base.fds(), end.fds()),
    );
    put(
        "threads",
        format!(
            "{} ({} relay) → {} ({} relay) → {} ({} relay)",
            s0.threads,
            s0.relay_threads,
            base.threads,
            base.relay_threads,
            end.threads,
            end.relay_threads
        ),
    );
    put(
        "rss",
        format!(
            "{} → {} → {} MiB",
            mib(s0.rss_kib),
            mib(base.rss_kib),
            mib(end.rss_kib)
        ),
    );
    put("leaks", leaks.len().to_string());
    put("leak_detail", leaks.join("; "));
    put("proxy_exit", exit.clone());
    put("work_dir", work.display().to_string());
    let pass = s.unexpected() + warm_unexpected == 0
        && leaks.is_empty()
        && final_ok
        && exit_ok
        && !timed_out;
    put("pass", pass.to_string());

    if let Ok(path) = std::env::var("REL_RESULT") {
        let mut f = File::create(path).expect("result file");
        for (k, v) in &r {
            let _ = writeln!(f, "{k}\t{}", v.replace(['\n', '\t'], " "));
        }
    }
    for (k, v) in &r {
        println!("[{mode}] {k}: {v}");
    }
    if pass && std::env::var("REL_KEEP").is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    std::process::exit(if pass { 0 } else { 1 })
}

fn probe(a: SocketAddr, msg: &[u8], got: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    s.shutdown(std::net::Shutdown::Write)?;
    got.clear();
    s.read_to_end(got)?;
    Ok(())
}
