//! Regressions: each test is the failing case of a defect found by the review of the merged
//! work (attacking the real binary), named after what it guards, its doc comment saying what
//! went wrong before. Regressions that belong to a behaviour with a file of its own live there
//! (tests/reload.rs: `too_many_pairs_reload`, `reload_past_the_descriptor_budget_is_refused`).

mod common;

use std::time::Duration;

use common::{config, full_range_apps, run, TempDir, WAIT};
use serde_json::json;

/// More (address, port) pairs than the proxy can hold (bpf mode's bindings map has 2^20
/// entries) is a validation error naming the count, and cheap to find: before, `check`
/// built every pair (200 such apps: 47 s and 1.5 GB) and then said "ok".
#[test]
fn too_many_address_port_pairs_is_a_problem() {
    let dir = TempDir::new("review");
    let path = dir.write("c.json", &config(&full_range_apps(17)));
    let out = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(1),
        "check said: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr
            .contains("the apps have 1114095 (address, port) pairs in all")
            && out.stderr.contains("more than the 1048576 the proxy holds"),
        "check said: {}",
        out.stderr
    );
    // CPU time, not the clock: under other tests' load the clock stretched past 20 s.
    assert!(
        out.cpu_seconds < 10.0,
        "check took {:.1} CPU-s",
        out.cpu_seconds
    );
    // Within the bound is fine. (Half of it: 16 addresses, just within, are too, but their
    // million pairs take seconds to check in a debug build on a loaded machine.)
    let path = dir.write("ok.json", &config(&full_range_apps(8)));
    let out = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(0),
        "check said: {}{}",
        out.stdout,
        out.stderr
    );
}

/// A target is checked against the prefixes of its port by lookup, not by trying each: with an
/// address per app (an edge's way to tell apps apart), `check`, the start and every reload
/// compared every target with every app's prefix (30,000 apps: about 40 s; 100,000: 5 minutes,
/// with the event loop stalled at a reload). The loop among them is still found.
#[test]
fn loop_check_with_an_address_per_app_is_fast() {
    const APPS: usize = 30_000;
    let mut apps: Vec<serde_json::Value> = (0..APPS)
        .map(|i| {
            json!({"Name": format!("edge{i}"), "Ports": [443],
                   "Addresses": [format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)],
                   "Targets": ["192.0.2.1:443"]})
        })
        .collect();
    apps.push(
        json!({"Name": "local", "Ports": [443], "Addresses": ["127.0.0.1"],
                     "Targets": ["192.0.2.1:443"]}),
    );
    apps.push(
        json!({"Name": "looper", "Ports": [443], "Addresses": ["10.255.0.1"],
                     "Targets": ["127.0.0.1:443"]}),
    );
    let dir = TempDir::new("review");
    let path = dir.write("c.json", &config(&apps));
    let out = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(1),
        "check said: {}{}",
        out.stdout,
        out.stderr
    );
    let problems: Vec<&str> = out.stderr.lines().collect();
    assert!(
        problems.len() == 2
            && problems[0].contains(
                "app \"looper\": Targets: \"127.0.0.1:443\" is this proxy's own frontend"
            ),
        "check said: {}",
        out.stderr
    );
    // CPU time, not the clock, so that other tests' load does not count.
    assert!(
        out.cpu_seconds < 10.0,
        "check of {APPS} apps took {:.1} CPU-s",
        out.cpu_seconds
    );
}

/// An app's long lists are checked for repeats through a set: 100,000 Addresses and 100,000
/// Hostnames in one app (a few MB of file, which the follower also validates before it writes
/// a value) were each looked for among every one before it, quadratic: minutes of CPU. The one
/// repeat in each list is still found, however far from the first.
#[test]
fn long_address_and_hostname_lists_are_checked_in_linear_time() {
    const N: usize = 100_000;
    let mut addresses: Vec<String> = (0..N)
        .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    addresses.push("10.0.0.7".into());
    let mut hostnames: Vec<String> = (0..N).map(|i| format!("h{i}.example.com")).collect();
    hostnames.push("h7.example.com".into());
    let app = json!({"Name": "long", "Ports": [443], "Addresses": addresses,
                     "Hostnames": hostnames, "Targets": ["192.0.2.1:443"]});
    let dir = TempDir::new("review");
    let path = dir.write("c.json", &config(&[app]));
    let out = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(
        (out.code, out.stderr.lines().count()),
        (Some(1), 3),
        "check said: {}{}",
        out.stdout,
        out.stderr
    );
    for want in [
        "2 problems found",
        r#"app "long": Addresses: "10.0.0.7" is listed twice"#,
        r#"app "long": Hostnames: "h7.example.com" is listed twice"#,
    ] {
        assert!(out.stderr.contains(want), "no {want:?} in: {}", out.stderr);
    }
    // CPU time, not the clock, so that other tests' load does not count.
    assert!(
        out.cpu_seconds < 10.0,
        "check of {N} addresses and hostnames took {:.1} CPU-s",
        out.cpu_seconds
    );
}

/// `flyproxy status` pointed at something that is not a flyproxy (a wrong address): an endless
/// answer is cut at a bound, and a trickling one at a deadline, each with a message. Before,
/// the command read whatever came into memory (8 GB in 25 s from `yes | nc -l`) and waited for
/// ever on a trickle (each byte within the 2 s read timeout).
#[test]
fn status_of_a_hostile_server_is_bounded() {
    use std::io::Write;
    use std::net::TcpListener;
    // At most this much is sent, so the test itself stays bounded whatever the command does.
    const SENT: usize = 80 << 20;
    let flood = TcpListener::bind("127.0.0.1:0").unwrap();
    let flood_addr = flood.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = flood.accept().unwrap();
        let chunk = vec![b'y'; 1 << 20];
        let mut sent = 0;
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        while sent < SENT && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
    });
    let out = run(&["status", "--metrics", &flood_addr.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "printed {} bytes", out.stdout.len());
    assert!(
        out.stderr.contains("is larger than 64 MiB"),
        "{}",
        out.stderr
    );

    let trickle = TcpListener::bind("127.0.0.1:0").unwrap();
    let trickle_addr = trickle.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = trickle.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
        // A byte every 100 ms (well within the 2 s read timeout, even on a loaded machine), for
        // at most 30 s: never the whole answer.
        for _ in 0..300 {
            if s.write_all(b".").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let started = std::time::Instant::now();
    let out = run(&["status", "--metrics", &trickle_addr.to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    // The deadline, or (on a machine so loaded that the trickle paused for 2 s) the read
    // timeout: either way it gave up.
    assert!(
        out.stderr.contains("no whole answer")
            || out.stderr.contains("Resource temporarily unavailable"),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}
