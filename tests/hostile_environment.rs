//! What a file, the environment or a user can do to the proxy (issue 11), tried as an attacker
//! would, each asserting what a user observes: files left untouched, the exit status and its
//! message, the proxy still serving and stopping on SIGTERM, the uid in /proc. (Signals during
//! start-up are in tests/shutdown.rs and tests/reload.rs, loops in tests/loops.rs, refused
//! upgrades in tests/upgrade.rs.)

mod common;

use std::ffi::CString;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    app, assert_serves_then_stops, config, connect, expect_refused, is_root, refused_start,
    roundtrip, run, serving, wait_for, Backend, Proxy, TempDir, BIN, WAIT,
};

/// Puts something at a path.
type MakePath<'a> = &'a dyn Fn(&Path);

/// Hand-over variables, descriptors placed in the child (from, to), and the message expected.
type FdCase<'a> = (Vec<(&'a str, String)>, Vec<(i32, i32)>, &'a str);

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// --pid-file

/// Issue 11, item 2: a symlink planted at the pid file's path is replaced, never written
/// through; the file it pointed at is unchanged.
#[test]
fn pid_file_replaces_a_planted_symlink_and_leaves_its_target_alone() {
    let backend = Backend::echo();
    let elsewhere = TempDir::new("victim");
    let victim = elsewhere.write("precious", "do not overwrite\n");
    let run_dir = TempDir::new("run");
    let pid_file = run_dir.path.join("flyproxy.pid");
    symlink(&victim, &pid_file).unwrap();
    let p = serving(&["--pid-file", pid_file.to_str().unwrap()], &backend);
    // Written just after the `started` line.
    wait_for("the pid file to replace the symlink", WAIT, || {
        fs::symlink_metadata(&pid_file)
            .is_ok_and(|m| m.file_type().is_file())
            .then_some(())
    });
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not overwrite\n");
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", p.pid)
    );
    // No temporary file left beside it.
    let names: Vec<_> = fs::read_dir(&run_dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_serves_then_stops(p);
    assert!(!pid_file.exists(), "removed at exit");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not overwrite\n");
}

/// Issue 11, item 2: a pid file in a directory anyone may write without the sticky bit is
/// refused at start (exit 1, nothing bound); with the sticky bit (like /tmp) it is fine.
#[test]
fn pid_file_in_a_world_writable_directory_is_refused() {
    let backend = Backend::echo();
    let dir = TempDir::new("open-dir");
    fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o777)).unwrap();
    let pid_file = dir.path.join("flyproxy.pid");
    let port = common::free_port();
    let mut p = Proxy::simple()
        .config(&config(&[app("echo", &[port], &[backend.target()])]))
        .args(&["--pid-file", pid_file.to_str().unwrap()])
        .spawn();
    let (code, log) = refused_start(&mut p);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("writable by others without the sticky bit"),
        "{log}"
    );
    assert!(!pid_file.exists());
    expect_refused(SocketAddr::from(([127, 0, 0, 1], port)));

    fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o1777)).unwrap();
    let p = serving(&["--pid-file", pid_file.to_str().unwrap()], &backend);
    wait_for("the pid file", WAIT, || {
        fs::read_to_string(&pid_file)
            .is_ok_and(|c| c == format!("{}\n", p.pid))
            .then_some(())
    });
    assert_serves_then_stops(p);
}

// ---------------------------------------------------------------------------------------------
// The config file

/// Issue 11, item 3: the config path turned into a FIFO, a directory, then a symlink to
/// /dev/zero: each is one rejected reload (not one per tick), the running config keeps serving,
/// SIGHUP still reloads and SIGTERM still stops.
#[test]
fn config_path_that_is_not_a_file_never_blocks_or_floods() {
    let backend = Backend::echo();
    let p = serving(&["--reload-interval", "50ms"], &backend);
    let rejected = |what: &str| {
        let what = what.to_owned();
        move |l: &str| l.contains("reload rejected") && l.contains(&what)
    };
    let cases: [(&str, MakePath); 3] = [
        ("it is a FIFO, not a regular file", &|path| mkfifo(path)),
        ("it is a directory, not a regular file", &|path| {
            fs::create_dir(path).unwrap()
        }),
        ("it is a character device, not a regular file", &|path| {
            symlink("/dev/zero", path).unwrap()
        }),
    ];
    for (what, make) in cases {
        let mark = p.mark();
        if p.config.is_dir() {
            fs::remove_dir(&p.config).unwrap();
        } else {
            fs::remove_file(&p.config).unwrap();
        }
        make(&p.config);
        p.wait_log_since(mark, what, rejected(what));
        // 20 ticks more: still one line, and the proxy serves throughout.
        let mut s = connect(p.v4(0));
        roundtrip(&mut s, what.as_bytes());
        thread::sleep(Duration::from_secs(1));
        roundtrip(&mut s, what.as_bytes());
        assert_eq!(
            p.lines_since(mark, rejected(what)).len(),
            1,
            "{}",
            p.logs().join("\n")
        );
        // SIGHUP is handled (and says why it cannot reload).
        let mark = p.mark();
        p.signal(libc::SIGHUP);
        p.wait_log_since(mark, "SIGHUP reload", |l| l.contains("SIGHUP: reloading"));
        p.wait_log_since(mark, what, rejected(what));
    }
    assert_serves_then_stops(p);
}

/// Issue 11, item 3: a config larger than 64 MiB is refused with a message saying so, at
/// start and at reload; a FIFO at start is refused at once instead of blocking. (Issue 20: the
/// cap was 16 MiB, about 122,000 apps of `make scale`; a 17 MiB file is read now.)
#[test]
fn config_too_large_or_a_fifo_is_a_clear_error() {
    let dir = TempDir::new("large");
    let big = dir.path.join("big.json");
    let padding = " ".repeat(65 << 20);
    fs::write(&big, format!("{{\"Apps\": []{padding}}}")).unwrap();
    let out = run(&["check", "-c", big.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("larger than 64 MiB"), "{}", out.stderr);
    let was_too_large = dir.path.join("17mib.json");
    let app = app("a", &[7001], &["192.0.2.1:80".into()]);
    let padding_17 = " ".repeat(17 << 20);
    fs::write(&was_too_large, format!("{}{padding_17}", config(&[app]))).unwrap();
    let out = run(&["check", "-c", was_too_large.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let fifo = dir.path.join("fifo.json");
    mkfifo(&fifo);
    let began = Instant::now();
    let out = run(&["simple", "-c", fifo.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("it is a FIFO, not a regular file"),
        "{}",
        out.stderr
    );
    assert!(began.elapsed() < Duration::from_secs(10));

    let backend = Backend::echo();
    let p = serving(&["--reload-interval", "50ms"], &backend);
    let mark = p.mark();
    p.rewrite_config(&format!("{{\"Apps\": []{padding}}}"));
    p.wait_reload_rejected_for(mark, "larger than 64 MiB");
    assert_serves_then_stops(p);
}

// ---------------------------------------------------------------------------------------------
// Signals during start-up

// ---------------------------------------------------------------------------------------------
// Inherited descriptors

/// Spawn `flyproxy simple` with `env` set and `dup` (from, to) descriptors placed in the child.
fn spawn_with_env(config_json: &str, env: &[(&str, String)], dup: Vec<(i32, i32)>) -> Proxy {
    let dir = TempDir::new("env");
    let config = dir.write("config.json", config_json);
    let mut cmd = Command::new(BIN);
    cmd.arg("simple").arg("-c").arg(&config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &dup {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Proxy::spawn_cmd(cmd, dir, config)
}

/// Issue 11, item 5: every bad hand-over variable is a start-up error naming it (exit 1, no
/// panic, stderr still there to say so), whatever the descriptor is.
#[test]
fn bad_inherited_descriptors_are_start_up_errors() {
    use std::os::fd::AsRawFd;
    let backend = Backend::echo();
    let port = common::free_port();
    let cfg = config(&[app("echo", &[port], &[backend.target()])]);
    let dir = TempDir::new("fds");
    let plain = fs::File::create(dir.path.join("plain")).unwrap();
    let idle = std::net::TcpStream::connect(backend.addr).unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    let cases: Vec<FdCase> = vec![
        (
            vec![("FLYPROXY_READY_FD", "-1".into())],
            vec![],
            "is not a descriptor number above 2",
        ),
        (
            vec![("FLYPROXY_READY_FD", "2".into())],
            vec![],
            "is not a descriptor number above 2",
        ),
        (
            vec![("FLYPROXY_METRICS_FD", "-1".into())],
            vec![],
            "is not a descriptor number above 2",
        ),
        (
            vec![("FLYPROXY_READY_FD", "x7".into())],
            vec![],
            "is not a descriptor number above 2",
        ),
        (
            vec![("FLYPROXY_READY_FD", "57".into())],
            vec![],
            "descriptor 57 is not open",
        ),
        (
            vec![("FLYPROXY_READY_FD", "57".into())],
            vec![(plain.as_raw_fd(), 57)],
            "descriptor 57 is not a pipe or a unix socket",
        ),
        (
            vec![("FLYPROXY_METRICS_FD", "57".into())],
            vec![(plain.as_raw_fd(), 57)],
            "descriptor 57 is not a socket",
        ),
        (
            vec![("FLYPROXY_LISTEN_FDS", format!("[::]:{port}=57"))],
            vec![(idle.as_raw_fd(), 57)],
            "descriptor 57 is not a listening socket",
        ),
        (
            vec![("FLYPROXY_LISTEN_FDS", format!("[::]:{port}=57"))],
            vec![(other.as_raw_fd(), 57)],
            &*Box::leak(
                format!("descriptor 57 is bound to {other_addr}, not to [::]:{port}")
                    .into_boxed_str(),
            ),
        ),
        (
            vec![("FLYPROXY_LISTEN_FDS", "nonsense".into())],
            vec![],
            "is not address=descriptor",
        ),
        (
            vec![
                ("FLYPROXY_LISTEN_FDS", format!("[::]:{port}=57")),
                ("FLYPROXY_METRICS_FD", "57".into()),
            ],
            vec![(other.as_raw_fd(), 57)],
            "descriptor 57 is handed over twice",
        ),
    ];
    for (env, dup, want) in cases {
        let mut p = spawn_with_env(&cfg, &env, dup);
        let (code, log) = refused_start(&mut p);
        assert_eq!(code, Some(1), "{env:?}: {log}");
        assert!(log.contains(want), "{env:?}: want {want:?} in:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    // The descriptors handed in were not ours to close: the test's own still work.
    assert!(other.local_addr().is_ok());
    expect_refused(SocketAddr::from(([127, 0, 0, 1], port)));
}

// ---------------------------------------------------------------------------------------------
// Loops

// ---------------------------------------------------------------------------------------------
// Names and ports

/// Issue 11, items 7 and 12a: app names outside [A-Za-z0-9._-]{1,64} and target ports with
/// leading zeros are validation errors; a rejected reload's line cannot be split by a name.
#[test]
fn bad_names_and_zero_padded_ports_are_refused() {
    let dir = TempDir::new("names");
    let long = "n".repeat(65);
    for name in [
        "a b",
        "tab\there",
        "new\nline",
        "nul\0",
        "sl/ash",
        long.as_str(),
        "é",
    ] {
        let cfg = dir.write("c.json", &config(&[app(name, &[7001], &["h:1".into()])]));
        let out = run(&["check", "-c", cfg.to_str().unwrap()]);
        assert_eq!(out.code, Some(1), "{name:?}: {}", out.stderr);
        assert!(
            out.stderr
                .contains("Name: must be 1-64 characters, each a letter, a digit, '.', '_' or '-'"),
            "{name:?}: {}",
            out.stderr
        );
        // One line per problem and the summary: a newline in the name does not make more.
        assert_eq!(out.stderr.lines().count(), 2, "{}", out.stderr);
    }
    let cfg = dir.write(
        "p.json",
        &config(&[app("a", &[7001], &["host:041901".into()])]),
    );
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("\"host:041901\" has a port with a leading zero"),
        "{}",
        out.stderr
    );

    let backend = Backend::echo();
    let p = serving(&["--reload-interval", "50ms"], &backend);
    let mark = p.mark();
    p.rewrite_config(&config(&[app(
        "x\nINFO  forged",
        &[p.ports[0]],
        &[backend.target()],
    )]));
    p.wait_reload_rejected_for(mark, "Name: must be");
    assert!(
        p.lines_since(mark, |l| l.starts_with("INFO  forged"))
            .is_empty(),
        "{}",
        p.logs().join("\n")
    );
    assert_serves_then_stops(p);
}

// ---------------------------------------------------------------------------------------------
// --user and upgrades

/// Issue 11, item 11: started as root with `--user nobody`, the proxy runs as nobody (uid and
/// gid in /proc), keeps only CAP_NET_BIND_SERVICE, serves, and a root `flyproxy upgrade`
/// refuses to signal it (another user's process); it still stops on SIGTERM.
#[test]
fn user_switch_runs_as_nobody() {
    if !is_root() {
        eprintln!("skipping: switching user needs root");
        return;
    }
    let backend = Backend::echo();
    let run_dir = TempDir::new("user-run");
    // nobody must be able to write its pid file: a directory of its own.
    let c = CString::new(run_dir.path.as_os_str().as_bytes()).unwrap();
    // SAFETY: chown with a valid C string.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let pid_file = run_dir.path.join("flyproxy.pid");
    let p = serving(
        &["--user", "nobody", "--pid-file", pid_file.to_str().unwrap()],
        &backend,
    );
    p.wait_log("running as", |l| {
        l.contains("running as user nobody (uid 65534) group")
    });
    assert_eq!(proc_ids(p.pid, "Uid:"), vec![65534; 4]);
    assert_eq!(proc_ids(p.pid, "Gid:"), vec![65534; 4]);
    assert_eq!(proc_ids(p.pid, "Groups:"), vec![65534]);
    let status = fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap();
    // CAP_NET_BIND_SERVICE (10) only: a reload may add a port below 1024.
    assert_eq!(cap_of(&status, "CapEff:"), 1 << 10, "{status}");
    assert_eq!(cap_of(&status, "CapPrm:"), 1 << 10, "{status}");
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"as nobody\n");
    drop(s);
    wait_for("the pid file", WAIT, || pid_file.exists().then_some(()));
    root_cannot_upgrade_a_process_of_nobody(&p, &pid_file);

    let (new, _stop) = nobody_upgrades_with_the_kept_capability(&p, &pid_file);
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"served by the new process\n");
    drop(s);
    let mut p = p;
    // The old process drains and exits (its log pipe stays open in the new process, which
    // inherited stderr: so wait on the status, not on the end of the log).
    let status = wait_for("the old process to exit", WAIT, || p.try_status());
    assert_eq!(status.code(), Some(0));
    // SAFETY: kill(2) of the new process, which runs as nobody (we are root).
    unsafe { libc::kill(new as libc::pid_t, libc::SIGTERM) };
    wait_for("the new process to exit", WAIT, || {
        let stat = fs::read_to_string(format!("/proc/{new}/stat")).ok();
        stat.is_none_or(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .then_some(())
    });
}

/// Issue 23: a --pid-file in a directory only root may write (as /run is) works with --user:
/// it is written before privileges drop, and given to the user, so that the process an upgrade
/// starts (as that user) rewrites it in place.
#[test]
fn pid_file_in_a_root_only_directory_works_with_user() {
    if !is_root() {
        eprintln!("skipping: switching user needs root");
        return;
    }
    let backend = Backend::echo();
    let run_dir = TempDir::new("user-root-run");
    fs::set_permissions(&run_dir.path, fs::Permissions::from_mode(0o755)).unwrap();
    let pid_file = run_dir.path.join("flyproxy.pid");
    let p = serving(
        &["--user", "nobody", "--pid-file", pid_file.to_str().unwrap()],
        &backend,
    );
    p.wait_log("running as", |l| l.contains("running as user nobody"));
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", p.pid)
    );
    assert_eq!(fs::metadata(&pid_file).unwrap().uid(), 65534);
    let complaints = p.lines(|l| l.contains("--pid-file"));
    assert!(complaints.is_empty(), "{complaints:?}");
    let (new, _stop) = nobody_upgrades_with_the_kept_capability(&p, &pid_file);
    wait_for("the pid file to name the new process", WAIT, || {
        (fs::read_to_string(&pid_file).ok()? == format!("{new}\n")).then_some(())
    });
    // SAFETY: kill(2) of the new process, which runs as nobody (we are root).
    unsafe { libc::kill(new as libc::pid_t, libc::SIGTERM) };
}

/// The capability set `field` (`CapEff:`, `CapPrm:`) of a /proc/PID/status text.
fn cap_of(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap()
}

/// A root `flyproxy upgrade` refuses to signal a proxy that runs as nobody, and says why.
fn root_cannot_upgrade_a_process_of_nobody(p: &Proxy, pid_file: &Path) {
    let out = run(&["upgrade", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("runs as uid 65534, not as the caller (uid 0)"),
        "{}",
        out.stderr
    );
    assert!(
        p.lines(|l| l.contains("upgrade")).is_empty(),
        "{}",
        p.logs().join("\n")
    );
}

/// Kills the process of an upgrade this test started, however the test ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process this test's upgrade started.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

/// Run by nobody, the upgrade goes through: the new process, executed as nobody, has exactly
/// the kept capability (passed on in the ambient set). Its pid, and a guard that kills it.
fn nobody_upgrades_with_the_kept_capability(p: &Proxy, pid_file: &Path) -> (u32, KillOnDrop) {
    let out = Command::new(BIN)
        .args(["upgrade", "--pid-file", pid_file.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = p.wait_log("the new process serving", |l| {
        l.contains("upgrade: pid ") && l.contains(" is serving")
    });
    let new: u32 = line
        .split("upgrade: pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let guard = KillOnDrop(new);
    assert_eq!(proc_ids(new, "Uid:"), vec![65534; 4]);
    let status = fs::read_to_string(format!("/proc/{new}/status")).unwrap();
    assert_eq!(cap_of(&status, "CapEff:"), 1 << 10, "{status}");
    (new, guard)
}

/// Issue 11, item 11: `--user` naming nobody that exists, or --group alone, are clear errors.
#[test]
fn user_errors_are_clear() {
    let out = run(&[
        "simple",
        "--user",
        "no-such-user-here",
        "-c",
        "/nonexistent.json",
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("no user \"no-such-user-here\" in /etc/passwd"),
        "{}",
        out.stderr
    );
    let out = run(&["simple", "--group", "nogroup"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("--group needs --user"),
        "{}",
        out.stderr
    );
}

/// Regression: a file of many unknown (or repeated) keys costs time in proportion to its
/// size. Each new key was looked up in a list of the keys seen, so 40,000 keys took 12 CPU-s
/// (debug build) in `check` and on the listener loop at a reload; 200,000 keys, within the
/// file size cap, would take minutes. Measured as the child's CPU time, not by a clock: the
/// bound holds on a loaded machine.
#[test]
fn a_file_of_many_unknown_keys_costs_linear_time() {
    let dir = TempDir::new("many-keys");
    let mut text = String::from("{\"Apps\": []");
    for i in 0..200_000 {
        text.push_str(&format!(",\"k{i}\":0"));
    }
    text.push('}');
    let path = dir.write("config.json", &text);
    let out = run(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("200000 problems found"),
        "{}",
        out.stderr
    );
    let seconds = out.cpu_seconds;
    assert!(
        seconds < 10.0,
        "check of 200,000 unknown keys took {seconds:.1} CPU-s"
    );
}
