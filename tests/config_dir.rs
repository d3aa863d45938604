//! `-c DIR` (issue 20): the config as a directory of files, each `*.json` holding
//! `{"Apps": [...]}`. A file that is invalid, or clashes with apps serving from the other
//! files, is rejected alone (logged with every problem, counted, listed in /status.json); its
//! last good version keeps serving and every other change applies. `flyproxy check DIR`
//! reports every problem of every file.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::metrics::{get, metrics_addr, scrape};
use common::*;
use modes::Env;
use serde_json::Value;

/// One app's file: `{"Apps": [app]}`.
fn app_file(name: &str, ports: &[u16], targets: &[String]) -> String {
    config(&[app(name, ports, targets)])
}

/// Write `contents` as `name` in `dir` atomically (a dotfile renamed over it), as a
/// follower writes them.
fn put(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A proxy in `env`'s mode serving the directory `apps` (inside `home`), with `args`.
fn start_dir(env: &Env, home: TempDir, apps: &Path, args: &[&str]) -> Proxy {
    let mut cmd = Command::new(BIN);
    cmd.arg(env.mode.name());
    if env.mode == Mode::Bpf {
        cmd.args(["-p", &BPF_LISTENER_PORT.to_string()]);
    }
    cmd.arg("-c")
        .arg(apps)
        .args(["--reload-interval", "100ms"])
        .args(args);
    let mut p = Proxy::spawn_cmd(cmd, home, apps.to_owned());
    p.mode = env.mode;
    p.wait_started()
        .unwrap_or_else(|log| panic!("did not start:\n{log}"));
    p
}

fn status_json(maddr: std::net::SocketAddr) -> Value {
    let r = get(maddr, "/status.json");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("/status.json: {e}: {}", r.body))
}

/// The files /status.json lists as rejected, each with its problems.
fn rejected_files(maddr: std::net::SocketAddr) -> Vec<(String, Vec<String>)> {
    status_json(maddr)["rejected_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let problems = r["problems"].as_array().unwrap();
            (
                r["file"].as_str().unwrap().to_owned(),
                problems
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// At start the valid files serve and the others are reported, and the proxy starts; then a
/// bad file is rejected alone while another file's change in the same tick applies, a broken
/// new version keeps the last good one serving, a newcomer loses a clash to the serving app
/// and serves once the serving app is gone.
fn a_bad_file_is_rejected_alone(env: Env) {
    let (ta, tb, tc) = (
        Backend::tagged("a"),
        Backend::tagged("b"),
        Backend::tagged("c"),
    );
    let ports = env.ports(3);
    let home = TempDir::new("dir");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    put(&apps, "a.json", &app_file("a", &ports[..1], &[ta.target()]));
    put(
        &apps,
        "b.json",
        &app_file("b", &ports[1..2], &[tb.target()]),
    );
    put(
        &apps,
        "broken.json",
        r#"{"Apps": [{"Name": "x", "Ports": [0]"#,
    );
    // Same port as a, neither with Hostnames: the serving app (a) wins.
    put(
        &apps,
        "clash.json",
        &app_file("c", &ports[..1], &[tc.target()]),
    );
    fs::write(apps.join("README.txt"), "not a config file").unwrap();
    let maddr = metrics_addr();
    let p = start_dir(&env, home, &apps, &["--metrics", &maddr.to_string()]);
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    assert_eq!(tag_of(at(0)), "a");
    assert_eq!(tag_of(at(1)), "b");
    for file in ["broken.json", "clash.json"] {
        p.wait_log(file, |l| {
            l.contains(&format!("config file rejected: {file}: "))
        });
    }
    p.wait_log("the count", |l| {
        l.contains("4 files, 2 serving, 2 rejected")
    });
    let rejected = rejected_files(maddr);
    let files: Vec<&str> = rejected.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(files, ["broken.json", "clash.json"]);
    assert!(
        rejected[1].1[0].contains(r#"already used by app "a" (file a.json)"#),
        "{rejected:?}"
    );
    let m = scrape(maddr);
    assert_eq!(m.get("flyproxy_config_files_rejected", &[]), 2.0);
    assert_eq!(m.get("flyproxy_config_file_rejections_total", &[]), 2.0);
    let text = get(maddr, "/status").body;
    assert!(text.contains("config file clash.json REJECTED:"), "{text}");

    // One tick: b moves to the third port, and a new file is broken.
    let mark = p.mark();
    put(
        &apps,
        "b.json",
        &app_file("b", &ports[2..3], &[tb.target()]),
    );
    put(&apps, "worse.json", "{");
    // The file refused is logged first, then what applied.
    let line = p.wait_log_since(mark, "reload ok", is_reload_ok);
    assert!(
        line.contains("apps_added=0 apps_removed=0 apps_changed=1"),
        "{line}"
    );
    p.wait_reload_rejected_for(mark, "config file worse.json");
    assert_eq!(tag_of(at(2)), "b");
    expect_refused(at(1));
    assert_eq!(tag_of(at(0)), "a");

    // A broken new version of a: its last good version serves on.
    let mark = p.mark();
    put(&apps, "a.json", r#"{"Apps": [{"Name": "a"}]}"#);
    // Both problems, each on a line of its own.
    p.wait_reload_rejected_for(mark, "Ports: missing or empty");
    p.wait_reload_rejected_for(mark, "Targets: missing or empty");
    assert_eq!(tag_of(at(0)), "a");
    let files: Vec<String> = rejected_files(maddr).into_iter().map(|r| r.0).collect();
    assert_eq!(files, ["a.json", "broken.json", "clash.json", "worse.json"]);

    // a goes: the newcomer it kept out serves now.
    let mark = p.mark();
    fs::remove_file(apps.join("a.json")).unwrap();
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("new=[c] gone=[a]"), "{line}");
    assert_eq!(tag_of(at(0)), "c");
    let files: Vec<String> = rejected_files(maddr).into_iter().map(|r| r.0).collect();
    assert_eq!(files, ["broken.json", "worse.json"]);
    let out = run(&["status", "--metrics", &maddr.to_string()]);
    assert!(
        out.stdout.contains("config file worse.json REJECTED:"),
        "{}",
        out.stdout
    );
}

two_modes!(bad_file_alone, a_bad_file_is_rejected_alone);

/// Issue 20: a file whose app takes the --metrics port is refused alone, in start-up's words
/// for such an app; the other files serve on, the metrics endpoint too. (Before, simple mode
/// failed the reload with "another process listens", and bpf mode would have steered the
/// metrics port's connections to the app.)
fn metrics_port_file_is_rejected(env: Env) {
    let ta = Backend::tagged("a");
    let ports = env.ports(1);
    let home = TempDir::new("dir-metrics");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    put(&apps, "a.json", &app_file("a", &ports, &[ta.target()]));
    let maddr = metrics_addr();
    let p = start_dir(&env, home, &apps, &["--metrics", &maddr.to_string()]);
    let mark = p.mark();
    put(
        &apps,
        "greedy.json",
        &app_file("greedy", &[maddr.port()], &[ta.target()]),
    );
    let line = p.wait_reload_rejected_for(mark, "config file greedy.json");
    assert!(
        line.contains(&metrics_clash_words(maddr, "greedy")),
        "{line}"
    );
    let rejected = rejected_files(maddr);
    assert_eq!(
        rejected,
        [(
            "greedy.json".to_owned(),
            vec![metrics_clash_words(maddr, "greedy")]
        )]
    );
    assert_eq!(tag_of(SocketAddr::from(([127, 0, 0, 1], ports[0]))), "a");
    assert_eq!(get(maddr, "/metrics").status, 200);
}

two_modes!(metrics_port_file, metrics_port_file_is_rejected);

/// `flyproxy check DIR`: every problem of every file, each line naming its file; exit 1. A
/// directory without a problem: ok, exit 0.
#[test]
fn check_reports_every_problem_of_every_file() {
    let home = TempDir::new("check-dir");
    let dir: PathBuf = home.path.join("apps");
    fs::create_dir(&dir).unwrap();
    put(
        &dir,
        "a.json",
        &app_file("a", &[7001], &["192.0.2.1:80".into()]),
    );
    put(
        &dir,
        "b.json",
        &app_file("b", &[7002], &["192.0.2.1:80".into()]),
    );
    let out = run(&["check", "-c", dir.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains(": ok: 2 apps, 2 ports, 2 targets"),
        "{}",
        out.stdout
    );

    put(
        &dir,
        "bad.json",
        r#"{"Apps": [{"Name": "bad", "Ports": [0], "Targets": ["x"]}]}"#,
    );
    put(
        &dir,
        "dup.json",
        &app_file("a", &[7003], &["192.0.2.1:80".into()]),
    );
    put(
        &dir,
        "loop.json",
        &app_file("l", &[7004], &["127.0.0.1:7002".into()]),
    );
    let out = run(&["check", "-c", dir.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    for want in [
        "bad.json: ",
        "Ports: 0 is not a port",
        "Targets: \"x\" is not host:port",
        r#"dup.json: app "a": Name: already served from a.json"#,
        r#"loop.json: app "l": Targets: "127.0.0.1:7002" is this proxy's own frontend"#,
        "4 problems found in 3 files (the others would serve: 2 apps, 2 ports, 2 targets)",
    ] {
        assert!(
            out.stderr.contains(want),
            "missing {want:?} in:\n{}",
            out.stderr
        );
    }
}

/// 10,000 apps, a file each (CI-sized: a debug build on a loaded machine starts them well
/// within the waits), on one port told apart by Hostnames: changing one file reloads
/// that app alone, a rewrite of a file with the same size (within the same mtime tick) is
/// seen, and SIGHUP rescans every file and finds nothing changed.
fn one_file_among_ten_thousand(env: Env) {
    const APPS: usize = 10_000;
    let echo = Backend::echo();
    let ports = env.ports(1);
    let home = TempDir::new("dir-many");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    let file = |i: usize, target: &str| {
        let mut a = app(&format!("app{i:05}"), &ports, &[target.to_owned()]);
        if i > 0 {
            a["Hostnames"] = serde_json::json!([format!("a{i}.example")]);
        }
        config(&[a])
    };
    for i in 0..APPS {
        fs::write(
            apps.join(format!("app{i:05}.json")),
            file(i, "192.0.2.1:1000"),
        )
        .unwrap();
    }
    put(&apps, "app00000.json", &file(0, &echo.target()));
    let p = start_dir(&env, home, &apps, &[]);
    p.wait_log("the count", |l| {
        l.contains("10000 files, 10000 serving, 0 rejected")
    });
    let mut s = connect(SocketAddr::from(([127, 0, 0, 1], ports[0])));
    roundtrip(&mut s, b"default app");

    let mark = p.mark();
    put(&apps, "app02345.json", &file(2345, "192.0.2.1:1001"));
    let line = p.wait_reload_ok(mark);
    assert!(
        line.contains("apps_added=0 apps_removed=0 apps_changed=1 changed=[app02345]"),
        "{line}"
    );
    // In place, same size, at once: only inotify can tell.
    let mark = p.mark();
    fs::write(apps.join("app02345.json"), file(2345, "192.0.2.1:1002")).unwrap();
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("changed=[app02345]"), "{line}");

    let mark = p.mark();
    p.signal(libc::SIGHUP);
    p.wait_log_since(mark, "config unchanged", |l| {
        l.contains("reload: config unchanged")
    });
    assert!(p.lines_since(mark, |l| l.contains("reload ok")).is_empty());
    let mut s = connect(SocketAddr::from(([127, 0, 0, 1], ports[0])));
    roundtrip(&mut s, b"still the default app");
}

two_modes!(ten_thousand_files, one_file_among_ten_thousand);

/// What a hostile or careless writer can leave in the directory: a FIFO (opened without
/// blocking, never read), a symlink to a character device (never read from: `/dev/zero` would
/// never end), a directory named like a file, a dangling symlink (a file that is not there) and a
/// symlink to a good file elsewhere (followed, as a Kubernetes ConfigMap mount needs). The
/// proxy starts, serves the good files, reports the bad ones, and a reload with them still
/// there takes as little as one without them: no thread waits on a FIFO and nothing spins.
#[test]
fn odd_entries_are_rejected_without_hanging() {
    let env = Env {
        mode: Mode::Simple,
        ns: None,
    };
    let (ta, tb, tc) = (
        Backend::tagged("a"),
        Backend::tagged("b"),
        Backend::tagged("c"),
    );
    let ports = env.ports(3);
    let home = TempDir::new("dir-odd");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    put(&apps, "a.json", &app_file("a", &ports[..1], &[ta.target()]));
    let elsewhere = home.path.join("b-real.json");
    fs::write(&elsewhere, app_file("b", &ports[1..2], &[tb.target()])).unwrap();
    std::os::unix::fs::symlink(&elsewhere, apps.join("b.json")).unwrap();
    let fifo = std::ffi::CString::new(apps.join("fifo.json").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    std::os::unix::fs::symlink("/dev/zero", apps.join("zero.json")).unwrap();
    fs::create_dir(apps.join("dir.json")).unwrap();
    std::os::unix::fs::symlink(apps.join("nowhere"), apps.join("dangling.json")).unwrap();

    let maddr = metrics_addr();
    let p = start_dir(&env, home, &apps, &["--metrics", &maddr.to_string()]);
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    assert_eq!(tag_of(at(0)), "a");
    assert_eq!(tag_of(at(1)), "b");
    let rejected = rejected_files(maddr);
    let reasons: Vec<(&str, &str)> = rejected
        .iter()
        .map(|(f, problems)| (f.as_str(), problems[0].as_str()))
        .collect();
    let names: Vec<&str> = reasons.iter().map(|r| r.0).collect();
    // The dangling symlink names no file: it is as absent as a deleted one.
    assert_eq!(names, ["dir.json", "fifo.json", "zero.json"], "{reasons:?}");
    for (file, kind) in [
        ("dir.json", "a directory"),
        ("fifo.json", "a FIFO"),
        ("zero.json", "a character device"),
    ] {
        let problem = reasons.iter().find(|r| r.0 == file).unwrap().1;
        assert!(problem.contains(kind), "{file}: {problem}");
    }

    // A change beside them applies, and rescanning them (SIGHUP reads every file) costs little.
    let mark = p.mark();
    put(
        &apps,
        "c.json",
        &app_file("c", &ports[2..3], &[tc.target()]),
    );
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("new=[c]"), "{line}");
    assert_eq!(tag_of(at(2)), "c");
    let (cpu, threads) = (p.cpu_secs(), p.threads());
    for _ in 0..5 {
        let mark = p.mark();
        p.signal(libc::SIGHUP);
        p.wait_log_since(mark, "config unchanged", |l| {
            l.contains("reload: config unchanged")
        });
    }
    let used = p.cpu_secs() - cpu;
    assert!(
        used < 2.0,
        "5 rescans with the odd entries took {used:.2} CPU-s"
    );
    assert!(
        p.threads() <= threads + 2,
        "threads {threads} -> {}",
        p.threads()
    );
    assert_eq!(tag_of(at(0)), "a");
}

/// A file whose port cannot be bound (simple mode: another process listens on it) is refused
/// with the change it came in, the running config serving on; once the port is free, SIGHUP
/// applies it.
#[test]
fn a_port_that_cannot_be_bound_is_retried_at_sighup() {
    let env = Env {
        mode: Mode::Simple,
        ns: None,
    };
    let (ta, tb) = (Backend::tagged("a"), Backend::tagged("b"));
    let ports = env.ports(2);
    let home = TempDir::new("dir-bind");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    put(&apps, "a.json", &app_file("a", &ports[..1], &[ta.target()]));
    let p = start_dir(&env, home, &apps, &[]);
    let taken = std::net::TcpListener::bind(("0.0.0.0", ports[1])).unwrap();
    let mark = p.mark();
    put(&apps, "b.json", &app_file("b", &ports[1..], &[tb.target()]));
    p.wait_reload_rejected_for(mark, "cannot listen on port");
    assert_eq!(tag_of(SocketAddr::from(([127, 0, 0, 1], ports[0]))), "a");
    drop(taken);
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    let line = p.wait_reload_ok(mark);
    assert!(line.contains("new=[b]"), "{line}");
    assert_eq!(tag_of(SocketAddr::from(([127, 0, 0, 1], ports[1]))), "b");
}

/// The digest that names the directory's config (README, "A directory of files"): the sum,
/// modulo 2^256, of the SHA-256 of each file's `sha256sum` line, computed here with coreutils'
/// `sha256sum` alone, independent of flyproxy's own code. It changes with a file's bytes and
/// only then (not with a file rewritten alike, nor with a file rejected).
fn documented_digest(dir: &Path, files: &[&str]) -> String {
    let sha256sum = |input: Option<&[u8]>, args: &[&str]| -> String {
        let mut cmd = Command::new("sha256sum");
        cmd.current_dir(dir).args(args);
        let out = match input {
            None => cmd.output().expect("sha256sum"),
            Some(bytes) => {
                use std::io::Write;
                let mut child = cmd
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("sha256sum");
                child.stdin.take().unwrap().write_all(bytes).unwrap();
                child.wait_with_output().unwrap()
            }
        };
        assert!(out.status.success(), "sha256sum {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let mut sum = [0u64; 4];
    let listing = sha256sum(None, files);
    for line in listing.lines() {
        let hex = sha256sum(Some(format!("{line}\n").as_bytes()), &[]);
        // Big-endian hex into little-endian limbs, added with carry.
        let mut carry = 0u128;
        for (i, limb) in sum.iter_mut().enumerate() {
            let at = 64 - 16 * (i + 1);
            let add = u64::from_str_radix(&hex[at..at + 16], 16).unwrap();
            let s = *limb as u128 + add as u128 + carry;
            *limb = s as u64;
            carry = s >> 64;
        }
    }
    sum.iter().rev().map(|l| format!("{l:016x}")).collect()
}

#[test]
fn the_directory_digest_is_the_documented_sum_of_sha256sum_lines() {
    let env = Env {
        mode: Mode::Simple,
        ns: None,
    };
    let echo = Backend::echo();
    let ports = env.ports(2);
    let home = TempDir::new("dir-digest");
    let apps = home.path.join("apps");
    fs::create_dir(&apps).unwrap();
    put(
        &apps,
        "a.json",
        &app_file("a", &ports[..1], &[echo.target()]),
    );
    put(
        &apps,
        "b.json",
        &app_file("b", &ports[1..], &[echo.target()]),
    );
    let p = start_dir(&env, home, &apps, &[]);
    let started = p.wait_log("started", |l| l.contains(" started "));
    let first = field(&started, "sha256").unwrap();
    assert_eq!(first, documented_digest(&apps, &["a.json", "b.json"]));

    // One file's bytes change: the digest follows.
    let mark = p.mark();
    put(
        &apps,
        "b.json",
        &app_file("b", &ports[1..], &[echo.target(), echo.target()]),
    );
    let line = p.wait_reload_ok(mark);
    let second = field(&line, "sha256").unwrap();
    assert_ne!(second, first);
    assert_eq!(second, documented_digest(&apps, &["a.json", "b.json"]));

    // Rewritten alike, and a file rejected: the digest stays, and still matches the recipe
    // over the files in force.
    let mark = p.mark();
    put(
        &apps,
        "a.json",
        &app_file("a", &ports[..1], &[echo.target()]),
    );
    put(&apps, "c.json", r#"{"Apps":[{"Name":"c"}]}"#);
    p.wait_log_since(mark, "c.json rejected", |l| {
        l.contains("reload rejected: config file c.json")
    });
    let mark = p.mark();
    p.signal(libc::SIGHUP);
    let line = p.wait_log_since(mark, "config unchanged", |l| {
        l.contains("reload: config unchanged")
    });
    assert_eq!(field(&line, "sha256").unwrap(), second, "{line}");
    assert!(p.lines_since(mark, |l| l.contains("reload ok")).is_empty());
    assert_eq!(second, documented_digest(&apps, &["a.json", "b.json"]));

    // A file removed: its line leaves the sum.
    let mark = p.mark();
    fs::remove_file(apps.join("b.json")).unwrap();
    let line = p.wait_reload_ok(mark);
    assert_eq!(
        field(&line, "sha256").unwrap(),
        documented_digest(&apps, &["a.json"])
    );
}
