//! Where the log goes (issue 23): `--log-file` (reopened on SIGUSR1, so that logrotate's
//! `postrotate kill -USR1` works), `--access-log off|stderr|PATH` for the per-connection `conn`
//! lines, and journald's `<N>` priority prefixes when stderr is the journal's stream.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

/// The file's lines, once one matches `pred` (panics after WAIT with what the file holds).
fn wait_file_line(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_for(&format!("{what} in {}", path.display()), WAIT, || {
        let text = fs::read_to_string(path).ok()?;
        text.lines().find(|l| pred(l)).map(str::to_owned)
    })
}

/// The `conn` line of `client` in `path`.
fn wait_conn_in(path: &Path, client: SocketAddr) -> String {
    let client = format!(" client={client} ");
    wait_file_line(path, "the conn line", |l| {
        l.contains(" conn ") && l.contains(&client)
    })
}

/// A proxy on one port to `backend`, with `args`; its `started` line is waited for in `log`
/// (the file it logs to), not on stderr.
fn spawn_logging_to(log: &str, backend: &Backend, args: &[&str]) -> Proxy {
    let target = backend.target();
    let p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("echo", ports, std::slice::from_ref(&target))])
        })
        .file_arg("--log-file", log)
        .args(args)
        .spawn();
    wait_file_line(&p.dir.path.join(log), "the started line", |l| {
        l.contains(" INFO  started mode=simple ")
    });
    p
}

/// SIGUSR1 after logrotate renamed the log file: new lines go to a new file at the path, the
/// lines before it stay in the renamed one, and nothing is cut: the open connection relays on
/// and the proxy later stops with status 0.
#[test]
fn sigusr1_reopens_a_rotated_log_file_and_kills_nothing() {
    let backend = Backend::echo();
    let mut proxy = spawn_logging_to("flyproxy.log", &backend, &[]);
    let path = proxy.dir.path.join("flyproxy.log");
    let rotated = proxy.dir.path.join("flyproxy.log.1");

    let mut open = connect(proxy.v4(0));
    roundtrip(&mut open, b"before the rotation\n");
    let mut first = connect(proxy.v4(0));
    roundtrip(&mut first, b"closed before the rotation\n");
    let first_client = first.local_addr().unwrap();
    drop(first);
    wait_conn_in(&path, first_client);

    fs::rename(&path, &rotated).unwrap();
    proxy.signal(libc::SIGUSR1);
    wait_file_line(&path, "the writer's own line", |l| {
        l.contains(" INFO  reopened log file ") && l.ends_with("flyproxy.log")
    });
    assert!(proxy.try_status().is_none(), "SIGUSR1 ended the proxy");
    wait_file_line(&rotated, "the loop's line, before the reopen", |l| {
        l.contains(" INFO  SIGUSR1: reopening the log files")
    });

    roundtrip(&mut open, b"after the rotation\n");
    let mut second = connect(proxy.v4(0));
    roundtrip(&mut second, b"opened after the rotation\n");
    let second_client = second.local_addr().unwrap();
    drop(second);
    wait_conn_in(&path, second_client);
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(old.contains(&format!(" client={first_client} ")), "{old}");
    assert!(!old.contains(&format!(" client={second_client} ")), "{old}");

    drop(open);
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        fs::read_to_string(&path).unwrap()
    );
    // Everything went to the file: stderr stayed empty.
    assert_eq!(proxy.logs(), Vec::<String>::new());
}

/// A reopen that fails (a directory now stands at the path) keeps the file open before, says
/// why in it, and the proxy serves on; the next SIGUSR1 after the path is usable reopens.
#[test]
fn a_failed_reopen_keeps_the_old_file_and_says_why() {
    let backend = Backend::echo();
    let mut proxy = spawn_logging_to("flyproxy.log", &backend, &[]);
    let path = proxy.dir.path.join("flyproxy.log");
    let rotated = proxy.dir.path.join("flyproxy.log.1");
    fs::rename(&path, &rotated).unwrap();
    fs::create_dir(&path).unwrap();
    proxy.signal(libc::SIGUSR1);
    let line = wait_file_line(&rotated, "the failed reopen", |l| {
        l.contains(" ERROR cannot reopen log file ")
    });
    assert!(
        line.contains("flyproxy.log: Is a directory") && line.contains("still writing to"),
        "{line}"
    );
    let mut s = connect(proxy.v4(0));
    roundtrip(
        &mut s,
        b"logged to the old file
",
    );
    let client = s.local_addr().unwrap();
    drop(s);
    wait_conn_in(&rotated, client);

    fs::remove_dir(&path).unwrap();
    proxy.signal(libc::SIGUSR1);
    wait_file_line(&path, "the second reopen", |l| {
        l.contains(" INFO  reopened log file ")
    });
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}

/// `--access-log PATH`: the conn lines go there alone, whatever --log-level says (an access
/// log is not a diagnostic); `off` drops them and only them. The other lines stay in the log.
#[test]
fn access_log_goes_apart_or_nowhere() {
    let backend = Backend::echo();
    let dir = TempDir::new("access-log");
    let access = dir.path.join("access.log");
    let proxy = spawn_logging_to(
        "flyproxy.log",
        &backend,
        &["--access-log", access.to_str().unwrap()],
    );
    let log = proxy.dir.path.join("flyproxy.log");
    let mut s = connect(proxy.v4(0));
    roundtrip(&mut s, b"logged apart\n");
    let client = s.local_addr().unwrap();
    drop(s);
    let line = wait_conn_in(&access, client);
    assert!(line.contains(" INFO  conn app=echo "), "{line}");
    let main = fs::read_to_string(&log).unwrap();
    assert!(!main.contains(" conn "), "{main}");
    assert!(!fs::read_to_string(&access).unwrap().contains(" started "));
    drop(proxy);

    // At --log-level warn the info conn lines still reach their own file. (No `started` line
    // to wait for at that level: wait until the port answers.)
    let access_warn = dir.path.join("access-warn.log");
    let target = backend.target();
    let proxy = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("echo", ports, std::slice::from_ref(&target))])
        })
        .args(&["--log-level", "warn", "--access-log"])
        .arg(&access_warn)
        .spawn();
    let addr = proxy.v4(0);
    let mut s = wait_for("the proxy to serve", WAIT, || TcpStream::connect(addr).ok());
    roundtrip(&mut s, b"logged at warn\n");
    let client = s.local_addr().unwrap();
    drop(s);
    wait_conn_in(&access_warn, client);
    drop(proxy);

    // off: no conn line anywhere, `started` and `reload ok` still logged.
    let proxy = Proxy::simple()
        .ports(1, |ports| {
            config(&[app("echo", ports, std::slice::from_ref(&backend.target()))])
        })
        .args(&["--access-log", "off"])
        .fast_reload()
        .start();
    let mut s = connect(proxy.v4(0));
    roundtrip(&mut s, b"not logged\n");
    drop(s);
    let mark = proxy.mark();
    proxy.rewrite_config(&config(&[app("echo2", &proxy.ports, &[backend.target()])]));
    proxy.wait_reload_ok(mark);
    assert!(
        proxy.lines(|l| l.contains(" conn ")).is_empty(),
        "{:#?}",
        proxy.logs()
    );
}

/// A log file that cannot be opened is a start-up error naming it (exit 1), not a proxy that
/// serves with its log lost.
#[test]
fn a_log_file_that_cannot_be_opened_stops_the_start() {
    for flag in ["--log-file", "--access-log"] {
        let mut p = Proxy::simple()
            .args(&[flag, "/nonexistent-dir/flyproxy.log"])
            .spawn();
        let (code, log) = refused_start(&mut p);
        assert_eq!(code, Some(1), "{flag}: {log}");
        assert!(
            log.contains("cannot open log file /nonexistent-dir/flyproxy.log: No such file"),
            "{flag}: {log}"
        );
    }
}

/// The proxy with stderr to `stderr` and JOURNAL_STREAM set to `journal_stream`.
fn spawn_with_stderr_file(dir: &TempDir, stderr: &Path, journal_stream: &str) -> Child {
    let config = dir.write("config.json", &config(&[]));
    Command::new(BIN)
        .args(["simple", "-c"])
        .arg(&config)
        .env("JOURNAL_STREAM", journal_stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap()
}

/// Under systemd, stderr is the journal's stream and JOURNAL_STREAM names its `DEV:INODE`:
/// each line then starts with its syslog priority (`<6>` info, `<4>` warning, `<3>` error),
/// which journald records. With the variable naming something else (stderr redirected since),
/// no prefix: it would be written into a file as it is.
#[test]
fn journald_priority_prefixes_only_when_stderr_is_the_journal_stream() {
    let dir = TempDir::new("journal");
    for matching in [true, false] {
        let stderr = dir.path.join(format!("stderr-{matching}"));
        fs::File::create(&stderr).unwrap();
        let meta = fs::metadata(&stderr).unwrap();
        let stream = if matching {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut child = spawn_with_stderr_file(&dir, &stderr, &stream);
        let started = wait_file_line(&stderr, "the started line", |l| l.contains(" started "));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = wait_for("flyproxy to exit", WAIT, || child.try_wait().unwrap());
        assert_eq!(status.code(), Some(0));
        let text = fs::read_to_string(&stderr).unwrap();
        if matching {
            assert!(started.starts_with("<6>"), "{started}");
            for line in text.lines() {
                let level = line.split_whitespace().nth(1).unwrap_or("");
                let want = match level {
                    "INFO" => "<6>",
                    "WARN" => "<4>",
                    "ERROR" => "<3>",
                    _ => "<7>",
                };
                assert!(line.starts_with(want), "{line}");
            }
        } else {
            assert!(!text.contains('<'), "{text}");
            assert!(started.contains(" INFO  started "), "{started}");
        }
    }

    // Errors: a config that cannot be read stops the start, each line at priority 3.
    let stderr = dir.path.join("stderr-error");
    fs::File::create(&stderr).unwrap();
    let meta = fs::metadata(&stderr).unwrap();
    let mut child = Command::new(BIN)
        .args(["simple", "-c", "/nonexistent-dir/config.json"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for("flyproxy to exit", WAIT, || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(1));
    let text = fs::read_to_string(&stderr).unwrap();
    assert!(text.contains("<3>"), "{text}");
    for line in text.lines() {
        assert!(
            line.starts_with("<3>") && line.contains(" ERROR "),
            "{line}"
        );
    }
}

/// Regression: with `--user`, a log file opened at start (as root, before the switch) is
/// written by the same writer after it. Found when the log files' opening started the writer
/// thread before the switch: that thread drops its capabilities as it starts, so glibc's
/// setgroups, applied to every thread, failed in it and aborted the process (exit by SIGABRT,
/// no line anywhere). The file sits in a directory only root may write to.
#[test]
fn a_log_file_opened_as_root_is_written_after_the_user_switch() {
    if !is_root() {
        eprintln!("skipping: switching user needs root");
        return;
    }
    let backend = Backend::echo();
    let mut proxy = spawn_logging_to("flyproxy.log", &backend, &["--user", "nobody"]);
    let path = proxy.dir.path.join("flyproxy.log");
    wait_file_line(&path, "the switch", |l| {
        l.contains("running as user nobody (uid 65534)")
    });
    let mut s = connect(proxy.v4(0));
    roundtrip(&mut s, b"as nobody, logged to a root's file\n");
    let client = s.local_addr().unwrap();
    drop(s);
    wait_conn_in(&path, client);
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}
