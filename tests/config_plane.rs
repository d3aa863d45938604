//! The config plane (issue 20): a reload is read, validated and built on a thread of its own
//! (`config-plane`), so the listener loop, which accepts every connection, does not pause for
//! it; the loop only swaps the new table in and applies the ports that changed.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::fs;

use common::*;
use modes::Env;

/// CPU seconds (user + system) a thread of `pid` has used, from /proc/PID/task/TID/stat.
fn thread_cpu(pid: u32, tid: u32) -> f64 {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rest = stat.rsplit_once(") ").expect("a stat line").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// The thread of `pid` named `name`.
fn thread_named(pid: u32, name: &str) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == name)
        })
}

/// `n` apps on `port`, told apart by Hostnames (but the first, the default), each with
/// `targets`.
fn many_apps(n: usize, port: u16, targets: &[String]) -> String {
    let apps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut app = serde_json::json!({
                "Name": format!("app{i}"),
                "Ports": [port],
                "Targets": targets,
            });
            if i > 0 {
                app["Hostnames"] = serde_json::json!([format!("a{i}.example")]);
            }
            app
        })
        .collect();
    config(&apps)
}

/// A reload of 20,000 apps that all changed is paid for by the config-plane thread: the
/// listener loop (the main thread) spends a small part of what the plane does, and serves
/// throughout. Before, the loop read, parsed, validated, built and dropped every app itself.
fn a_big_reload_is_built_off_the_listener_loop(env: Env) {
    const APPS: usize = 20_000;
    let echo = Backend::echo();
    let ports = env.ports(1);
    let p = env
        .proxy()
        .config_on(&ports, &many_apps(APPS, ports[0], &[echo.target()]))
        .big()
        .start();
    let plane = wait_for("the config-plane thread", WAIT, || {
        thread_named(p.pid, "config-plane")
    });
    let (loop0, plane0) = (thread_cpu(p.pid, p.pid), thread_cpu(p.pid, plane));
    let mark = p.mark();
    // Every app changes (a second target); no port and no (address, port) pair does.
    p.rewrite_config(&many_apps(
        APPS,
        ports[0],
        &[echo.target(), "192.0.2.1:9".to_owned()],
    ));
    let line = p.wait_big_reload_ok(mark);
    assert!(line.contains("apps_changed=20000"), "{line}");
    let (looped, planed) = (
        thread_cpu(p.pid, p.pid) - loop0,
        thread_cpu(p.pid, plane) - plane0,
    );
    assert!(
        planed >= 0.05,
        "the plane thread did the work: {planed:.2} CPU-s"
    );
    assert!(
        looped * 10.0 <= planed,
        "the loop used {looped:.2} CPU-s of a reload the plane spent {planed:.2} on"
    );
    // Still serving, by the new table (app0 is the port's default).
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"after the reload");
}

two_modes!(
    big_reload_off_the_loop,
    a_big_reload_is_built_off_the_listener_loop
);

/// App 0 on every address of `port`, apps 1..n each on an IPv4 /32 of its own there (as at
/// the edge: an address per app), each with `targets`.
fn apps_with_addresses(n: usize, port: u16, targets: &[String]) -> String {
    let apps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut app = serde_json::json!({
                "Name": format!("app{i}"),
                "Ports": [port],
                "Targets": targets,
            });
            if i > 0 {
                let a = format!("127.16.{}.{}/32", i >> 8, i & 255);
                app["Addresses"] = serde_json::json!([a]);
            }
            app
        })
        .collect();
    config(&apps)
}

/// Rewriting every one of 20,000 apps that each have an address of their own costs the
/// plane about what building them at start-up cost. Before, each rebuilt binding scanned every
/// changed app for the ones on its address: quadratic, and such a reload never finished.
fn a_rewrite_of_every_app_with_its_own_address_is_linear(env: Env) {
    const APPS: usize = 20_000;
    let echo = Backend::echo();
    let ports = env.ports(1);
    let p = env
        .proxy()
        .config_on(
            &ports,
            &apps_with_addresses(APPS, ports[0], &[echo.target()]),
        )
        .big()
        .start();
    let plane = wait_for("the config-plane thread", WAIT, || {
        thread_named(p.pid, "config-plane")
    });
    // Start-up parsed, checked and built all the apps: on threads of its own (the config is
    // loaded off the main thread, the routing table built on a thread per core), so the
    // whole process's CPU so far, not the main thread's.
    let started = p.cpu_secs();
    let plane0 = thread_cpu(p.pid, plane);
    let mark = p.mark();
    p.rewrite_config(&apps_with_addresses(
        APPS,
        ports[0],
        &[echo.target(), "192.0.2.1:9".to_owned()],
    ));
    let line = p.wait_big_reload_ok(mark);
    assert!(line.contains(&format!("apps_changed={APPS}")), "{line}");
    let planed = thread_cpu(p.pid, plane) - plane0;
    assert!(
        planed <= 3.0 * started + 0.5,
        "the rewrite cost the plane {planed:.2} CPU-s, start-up {started:.2}"
    );
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"after the rewrite");
}

two_modes!(
    rewrite_with_addresses_is_linear,
    a_rewrite_of_every_app_with_its_own_address_is_linear
);
