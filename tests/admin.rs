//! Runtime control through the admin socket (issue 22): `--admin-socket`, `flyproxy ctl`, the
//! commands, runtime state kept over a reload, an upgrade and a restart (`--state-file`), and
//! clients of the socket that are broken or hostile. (Weights and backups in the pick are
//! tested with the targets, in tests/backends.rs.)

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use modes::Env;
use serde_json::json;

/// The admin socket's name in the proxy's own directory.
const SOCKET: &str = "admin.sock";

fn socket_of(p: &Proxy) -> PathBuf {
    p.dir.path.join(SOCKET)
}

/// Send `command` on a connection of its own; the answer, without its ending empty line.
fn ask(socket: &Path, command: &str) -> String {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    read_answer(&mut s)
}

/// Read one answer (up to its empty line) from `s`.
fn read_answer(s: &mut UnixStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if got == b"\n" {
            return String::new();
        }
        if let Some(i) = got.windows(2).position(|w| w == b"\n\n") {
            got.truncate(i + 1);
            return String::from_utf8(got).unwrap();
        }
        match s.read(&mut b) {
            Ok(0) => panic!("answer cut short: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => panic!(
                "reading an answer: {e} (so far {:?})",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// `command` must succeed: its answer.
fn ok(socket: &Path, command: &str) -> String {
    let answer = ask(socket, command);
    assert!(!answer.starts_with("error:"), "{command}: {answer}");
    answer
}

/// The `show targets` line of `target`.
fn target_line(socket: &Path, app: &str, target: &str) -> String {
    let all = ok(socket, &format!("show targets {app}"));
    all.lines()
        .find(|l| l.contains(&format!(" target={target} ")))
        .unwrap_or_else(|| panic!("no line for {target} in:\n{all}"))
        .to_owned()
}

/// The value of `key=` in a `show` line.
fn value(line: &str, key: &str) -> String {
    field(&format!(" {line}"), key).unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Connect through the proxy to a tagged backend: the stream and the tag.
fn tagged_conn(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = connect(addr);
    let tag = read_line(&mut s);
    (s, tag)
}

// ---------------------------------------------------------------------------------------------
// Drain, maint, disable, kill

/// With 3 long connections open on a target, `drain` sends the next 300 elsewhere while the 3
/// carry on to the end, their bytes intact; `ready` brings the target back.
fn drain_moves_new_connections_and_keeps_open_ones(env: Env) {
    let a = Backend::tagged("a");
    let b = Backend::tagged("b");
    let (ta, tb) = (a.target(), b.target());
    let p = env
        .proxy()
        .ports(1, move |ports| {
            config(&[app("web", ports, &[ta.clone(), tb.clone()])])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    // Those to b are held too: the pick balances by open connections.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    wait_for("3 connections on target a", WAIT, || {
        let (s, tag) = tagged_conn(p.v4(0));
        if tag == "a" {
            on_a.push(s);
        } else {
            on_b.push(s);
        }
        (on_a.len() == 3).then_some(())
    });
    drop(on_b);
    assert_eq!(
        ok(&sock, &format!("set target web {} state drain", a.target())),
        "ok\n"
    );
    assert_eq!(
        value(&target_line(&sock, "web", &a.target()), "state"),
        "drain"
    );
    for i in 0..300 {
        let (s, tag) = tagged_conn(p.v4(0));
        assert_eq!(tag, "b", "connection {i} after the drain went to a");
        drop(s);
    }
    // The 3 open ones carry on, every byte both ways.
    let mut rng = Rng::seeded();
    for s in &mut on_a {
        let mut msg = vec![0u8; 256 * 1024];
        rng.fill(&mut msg);
        let reader = {
            let mut r = s.try_clone().unwrap();
            let len = msg.len();
            std::thread::spawn(move || {
                let mut got = vec![0u8; len];
                r.read_exact(&mut got).map(|()| got)
            })
        };
        s.write_all(&msg).unwrap();
        let got = reader
            .join()
            .unwrap()
            .expect("the echo of a drained target's connection");
        assert!(
            got == msg,
            "bytes differ on a connection of the drained target"
        );
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    ok(&sock, &format!("set target web {} state ready", a.target()));
    wait_for("a connection to target a again", WAIT, || {
        (tagged_conn(p.v4(0)).1 == "a").then_some(())
    });
}

two_modes!(
    drain_moves_new_connections_and_keeps_open_ones,
    drain_moves_new_connections_and_keeps_open_ones
);

/// `maint` stops a target's health checks: its backend sees no connection at all.
#[test]
fn maint_stops_health_checks() {
    let a = Backend::echo();
    let b = Backend::echo();
    let targets = [a.target(), b.target()];
    let p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app_with(
                "web",
                ports,
                &targets,
                json!({"HealthCheck": {"IntervalMs": 100}}),
            )])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    // Checked (an up target every 5 intervals): the checks reach it.
    let before = a.accepted();
    wait_for("two health checks of target a", WAIT, || {
        (a.accepted() >= before + 2).then_some(())
    });
    ok(&sock, &format!("set target web {} state maint", a.target()));
    // A check started just before may still land: let one interval pass, then watch.
    let settled = wait_for("a quiet interval", WAIT, || {
        let n = a.accepted();
        std::thread::sleep(Duration::from_millis(600));
        (a.accepted() == n).then_some(n)
    });
    let b_before = b.accepted();
    wait_for("target b checked three times meanwhile", WAIT, || {
        (b.accepted() >= b_before + 3).then_some(())
    });
    assert_eq!(a.accepted(), settled, "a target in maint was checked");
    assert_eq!(
        value(&target_line(&sock, "web", &a.target()), "state"),
        "maint"
    );
}

/// `disable app` refuses new connections at accept (a reset, `end=disabled`) and keeps the open
/// ones; `enable app` takes them again.
fn disable_refuses_new_and_keeps_open(env: Env) {
    let echo = Backend::echo();
    let target = echo.target();
    let p = env
        .proxy()
        .ports(1, move |ports| {
            config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let mut open = connect(p.v4(0));
    roundtrip(&mut open, b"before\n");
    assert_eq!(ok(&sock, "disable app web"), "ok\n");
    assert!(
        ok(&sock, "show apps").contains("app=web ")
            && ok(&sock, "show apps").contains(" state=disabled ")
    );
    let mark = p.mark();
    // Reset at once: so soon that the connect itself may report it.
    match TcpStream::connect(p.v4(0)) {
        Ok(mut refused) => {
            let _ = refused.write_all(b"x");
            expect_reset(&mut refused, "a connection to a disabled app");
        }
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    let line = p.wait_log_since(mark, "the refused connection's line", |l| {
        ConnLine::parse(l).is_some()
    });
    let line = ConnLine::parse(&line).unwrap();
    assert_eq!(line.end, "disabled", "{}", line.line);
    assert_eq!(line.app, "web");
    roundtrip(&mut open, b"the open one goes on\n");
    let apps = ok(&sock, "show apps");
    assert_eq!(
        value(apps.lines().next().unwrap(), "refused_disabled"),
        "1",
        "{apps}"
    );
    ok(&sock, "enable app web");
    let mut again = connect(p.v4(0));
    roundtrip(&mut again, b"after\n");
}

two_modes!(
    disable_refuses_new_and_keeps_open,
    disable_refuses_new_and_keeps_open
);

/// `show conns` tells a connection waiting for its ClientHello (greeting), one waiting for its
/// app's slot (queued), one connecting to a target that does not answer, and one relaying;
/// `kill conn` ends the one named, alone, logged `end=killed`; `kill conns APP` ends the rest
/// of the app's.
#[test]
fn show_conns_phases_and_kill() {
    let echo = Backend::echo();
    let target = echo.target();
    let hole = Blackhole::new();
    let hole_target = hole.target();
    let p = Proxy::simple()
        .ports(3, move |ports| {
            config(&[
                app_with(
                    "tls",
                    &ports[..1],
                    std::slice::from_ref(&target),
                    json!({"Hostnames": ["a.example"]}),
                ),
                app_with(
                    "limited",
                    &ports[1..2],
                    std::slice::from_ref(&target),
                    json!({"MaxConnections": 1}),
                ),
                app("hole", &ports[2..], std::slice::from_ref(&hole_target)),
            ])
        })
        .args(&["--preread-timeout", "60s", "--connect-timeout", "60s"])
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let greeting = connect(p.v4(0));
    let mut relaying = connect(p.v4(1));
    roundtrip(&mut relaying, b"relayed\n");
    let queued = connect(p.v4(1));
    let connecting = connect(p.v4(2));
    let line_of = |s: &TcpStream, conns: &str| -> Option<String> {
        let client = format!("client={}", s.local_addr().unwrap());
        conns
            .lines()
            .find(|l| l.contains(&client))
            .map(str::to_owned)
    };
    // The relaying one's counts too: the relay thread counts the bytes once its write has
    // returned, and on a loaded machine the client can read its echo before that (a whole-suite
    // run at 4 test threads beside builds saw down=0).
    let conns = wait_for(
        "the queued, connecting and relayed ones in show conns",
        WAIT,
        || {
            let conns = ok(&sock, "show conns");
            let phase = |s: &TcpStream| line_of(s, &conns).map(|l| value(&l, "phase"));
            let counted = line_of(&relaying, &conns)
                .is_some_and(|l| value(&l, "up") == "8" && value(&l, "down") == "8");
            (phase(&queued).as_deref() == Some("queued")
                && phase(&connecting).as_deref() == Some("connecting")
                && counted)
                .then_some(conns)
        },
    );
    let c = line_of(&connecting, &conns).unwrap();
    assert_eq!(value(&c, "app"), "hole", "{conns}");
    assert_eq!(value(&c, "target"), "-", "not connected yet: {conns}");
    let g = line_of(&greeting, &conns).expect("the greeting connection is listed");
    assert_eq!(value(&g, "phase"), "greeting", "{conns}");
    assert_eq!(
        value(&g, "app"),
        "-",
        "no app before the ClientHello: {conns}"
    );
    let r = line_of(&relaying, &conns).expect("the relaying connection is listed");
    assert_eq!(value(&r, "phase"), "relaying", "{conns}");
    assert_eq!(value(&r, "app"), "limited");
    assert_eq!(value(&r, "target"), echo.target());
    assert_eq!(value(&r, "up"), "8", "{r}");
    assert_eq!(value(&r, "down"), "8", "{r}");
    let q = line_of(&queued, &conns).unwrap();
    assert_eq!(value(&q, "app"), "limited");
    // Only the app's: the greeting connection has no app yet.
    let limited = ok(&sock, &format!("show conns limited {}", echo.target()));
    assert_eq!(limited.lines().count(), 1, "{limited}");

    // Kill the relaying one: it alone ends, both sides, at once.
    let id = value(&r, "id");
    let began = Instant::now();
    assert_eq!(
        ok(&sock, &format!("kill conn {id}")),
        "ok: killed 1 connection\n"
    );
    expect_closed(&mut relaying, WAIT);
    let took = began.elapsed();
    assert!(took < Duration::from_secs(2), "killed after {took:?}");
    let line = p.wait_conn(relaying.local_addr().unwrap());
    assert_eq!(line.end, "killed", "{}", line.line);
    // Its slot went to the queued one, which now relays.
    let mut queued = queued;
    roundtrip(&mut queued, b"my turn\n");
    let mut greeting = greeting;
    expect_silent(&mut greeting, Duration::from_millis(200));

    assert_eq!(ok(&sock, "kill conns limited"), "ok: killed 1 connection\n");
    expect_closed(&mut queued, WAIT);
    assert_eq!(p.wait_conn(queued.local_addr().unwrap()).end, "killed");
    assert!(ask(&sock, &format!("kill conn {id}")).starts_with("error: no open connection with id"));
}

/// A target a reload removed keeps its open connections (the port stays): they are still
/// listed and killed by its name; once none is open, the name is an error again.
#[test]
fn connections_of_a_removed_target_are_still_reached() {
    let (a, b) = (Backend::echo(), Backend::echo());
    let (ta, tb) = (a.target(), b.target());
    let p = Proxy::simple()
        .ports(1, {
            let ta = ta.clone();
            move |ports| config(&[app("web", ports, std::slice::from_ref(&ta))])
        })
        .fast_reload()
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let mut on_a = connect(p.v4(0));
    roundtrip(&mut on_a, b"to a\n");
    p.reload(&config(&[app("web", &p.ports, std::slice::from_ref(&tb))]));
    let listed = ok(&sock, &format!("show conns web {ta}"));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert_eq!(
        ok(&sock, &format!("kill conns web {ta}")),
        "ok: killed 1 connection\n"
    );
    expect_closed(&mut on_a, WAIT);
    assert_eq!(p.wait_conn(on_a.local_addr().unwrap()).end, "killed");
    let gone = wait_for("the killed connection out of the table", WAIT, || {
        let answer = ask(&sock, &format!("kill conns web {ta}"));
        answer.starts_with("error:").then_some(answer)
    });
    assert!(gone.contains(&format!("has no target \"{ta}\"")), "{gone}");
}

// ---------------------------------------------------------------------------------------------
// Runtime state over reloads, upgrades and restarts

/// State set on a target survives a reload that keeps it, and is dropped for a target the
/// reload removes (one added back starts as the config says).
#[test]
fn state_survives_a_reload_and_goes_with_a_removed_target() {
    let (a, b, c) = (Backend::echo(), Backend::echo(), Backend::echo());
    let (ta, tb, tc) = (a.target(), b.target(), c.target());
    let p = Proxy::simple()
        .ports(2, {
            let (ta, tb) = (ta.clone(), tb.clone());
            move |ports| {
                config(&[
                    app("web", &ports[..1], &[ta.clone(), tb.clone()]),
                    app("api", &ports[1..], std::slice::from_ref(&ta)),
                ])
            }
        })
        .fast_reload()
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let ports = p.ports.clone();
    ok(&sock, &format!("set target web {ta} state drain"));
    ok(&sock, &format!("set target web {tb} weight 5"));
    ok(&sock, "disable app api");
    // Kept: a target added beside them.
    p.reload(&config(&[
        app("web", &ports[..1], &[ta.clone(), tb.clone(), tc.clone()]),
        app("api", &ports[1..], std::slice::from_ref(&ta)),
    ]));
    assert_eq!(value(&target_line(&sock, "web", &ta), "state"), "drain");
    assert_eq!(value(&target_line(&sock, "web", &tb), "weight"), "5");
    assert_eq!(value(&target_line(&sock, "web", &tc), "state"), "ready");
    assert!(ok(&sock, "show apps").contains(" state=disabled "));
    // The same address in another app is another target: not drained.
    assert_eq!(value(&target_line(&sock, "api", &ta), "state"), "ready");
    // Removed, then added back: as the config says.
    p.reload(&config(&[
        app("web", &ports[..1], &[tb.clone(), tc.clone()]),
        app("api", &ports[1..], std::slice::from_ref(&ta)),
    ]));
    let state = ok(&sock, "show state");
    assert!(
        !state.contains(&format!("\"App\":\"web\",\"Target\":\"{ta}\"")),
        "{state}"
    );
    p.reload(&config(&[
        app("web", &ports[..1], &[ta.clone(), tb.clone()]),
        app("api", &ports[1..], std::slice::from_ref(&ta)),
    ]));
    assert_eq!(value(&target_line(&sock, "web", &ta), "state"), "ready");
    assert_eq!(value(&target_line(&sock, "web", &tb), "weight"), "5");
}

/// With --state-file, state survives a restart; a corrupt file is a warning, and the proxy
/// starts as the config says.
#[test]
fn state_file_survives_a_restart_and_a_corrupt_one_is_a_warning() {
    let (a, b) = (Backend::echo(), Backend::echo());
    let (ta, tb) = (a.target(), b.target());
    let keep = TempDir::new("admin-state");
    let state_file = keep.path.join("state.json");
    let launch = |ta: String, tb: String| {
        Proxy::simple()
            .ports(1, move |ports| {
                config(&[app("web", ports, &[ta.clone(), tb.clone()])])
            })
            .file_arg("--admin-socket", SOCKET)
            .arg("--state-file")
            .arg(&state_file)
    };
    let mut p = launch(ta.clone(), tb.clone()).start();
    let sock = socket_of(&p);
    ok(&sock, &format!("set target web {ta} state maint"));
    ok(&sock, &format!("set target web {tb} weight 0"));
    ok(&sock, "disable app web");
    let saved = std::fs::read_to_string(&state_file).expect("the state file is written");
    assert!(saved.contains("\"maint\""), "{saved}");
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(WAIT).success());

    let p = launch(ta.clone(), tb.clone()).start();
    let sock = socket_of(&p);
    assert_eq!(value(&target_line(&sock, "web", &ta), "state"), "maint");
    assert_eq!(value(&target_line(&sock, "web", &tb), "weight"), "0");
    assert!(ok(&sock, "show apps").contains(" state=disabled "));
    p.wait_log("the state restored", |l| {
        l.contains("runtime state from --state-file") && l.contains("2 targets, 1 disabled apps")
    });
    drop(p);

    std::fs::write(&state_file, "{\"Targets\": [ nonsense").unwrap();
    let p = launch(ta.clone(), tb.clone()).start();
    let warning = p.wait_log("a warning about the state file", |l| {
        l.contains(" WARN ") && l.contains("not a flyproxy runtime state")
    });
    assert!(warning.contains("starting as the config says"), "{warning}");
    let sock = socket_of(&p);
    assert_eq!(value(&target_line(&sock, "web", &ta), "state"), "ready");
    drop(p);

    // A FIFO put there cannot stall the start (nothing would ever write to it).
    std::fs::remove_file(&state_file).unwrap();
    let c = std::ffi::CString::new(state_file.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let p = launch(ta.clone(), tb.clone()).start();
    p.wait_log("a warning about the FIFO", |l| {
        l.contains(" WARN ") && l.contains("--state-file") && l.contains("FIFO")
    });
}

/// `flyproxy upgrade` hands the runtime state to the new process, which then answers on the
/// socket.
#[test]
fn state_survives_an_upgrade() {
    let (a, b) = (Backend::echo(), Backend::echo());
    let (ta, tb) = (a.target(), b.target());
    let tb2 = tb.clone();
    let mut p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("web", ports, &[ta.clone(), tb2.clone()])])
        })
        .file_arg("--admin-socket", SOCKET)
        .file_arg("--pid-file", "flyproxy.pid")
        .start();
    let sock = socket_of(&p);
    let pid_file = p.dir.path.join("flyproxy.pid");
    ok(&sock, &format!("set target web {tb} state drain"));
    ok(&sock, "disable app web");
    let out = run(&["upgrade", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let serving = p.wait_log("the new process serving", |l| {
        l.contains(" upgrade: pid ") && l.contains(" is serving")
    });
    let new: u32 = serving
        .split_once(" upgrade: pid ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {serving}"));
    let stop_new = StopOnDrop(new);
    // The old one leaves (nothing open to drain); then only the new one can answer.
    let status = wait_for("the old process to exit", WAIT, || p.try_status());
    assert!(status.success());
    assert_eq!(value(&target_line(&sock, "web", &tb), "state"), "drain");
    assert!(ok(&sock, "show apps").contains(" state=disabled "));
    drop(stop_new);
}

/// SIGTERM to a process that is not our child (an upgrade's new one) on the way out.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the flyproxy this test's upgrade started.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGTERM) };
        wait_for("the new process to exit", WAIT, || {
            // SAFETY: signal 0 only checks that it exists.
            let gone = unsafe { libc::kill(self.0 as libc::pid_t, 0) } != 0;
            let zombie = std::fs::read_to_string(format!("/proc/{}/stat", self.0))
                .map_or(true, |s| s.contains(") Z "));
            (gone || zombie).then_some(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The socket, its commands' errors, and flyproxy ctl

/// The socket is mode 0660; `reload` answers with the outcome; unknown commands, apps and
/// targets are one clear error line naming them; `flyproxy ctl` exits 0 on success and 1 with
/// the error on stderr.
#[test]
fn commands_errors_and_ctl_exit_codes() {
    let echo = Backend::echo();
    let target = echo.target();
    let p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    for (command, says) in [
        ("frob", "error: unknown command \"frob\""),
        ("show frob", "error: show \"frob\": not apps"),
        ("show targets nope", "error: no app named \"nope\""),
        (
            "set target web 10.0.0.9:1 state drain",
            "error: app \"web\" has no target \"10.0.0.9:1\"",
        ),
        (
            &format!("set target web {} state sleepy", echo.target()),
            "error: state \"sleepy\": must be ready, drain or maint",
        ),
        (
            &format!("set target web {} weight 257", echo.target()),
            "error: weight \"257\": must be a whole number from 0 to 256",
        ),
        ("disable app nope", "error: no app named \"nope\""),
        ("kill conn 99999", "error: no open connection with id 99999"),
        ("kill conns nope", "error: no app named \"nope\""),
    ] {
        let answer = ask(&sock, command);
        assert!(answer.starts_with(says), "{command}: {answer}");
        assert_eq!(answer.lines().count(), 1, "{command}: one line: {answer}");
    }
    assert!(ok(&sock, "help").contains("set target APP TARGET state ready|drain|maint"));
    let config_line = ok(&sock, "show config");
    assert!(
        config_line.contains(&format!("path={}", p.config.display())),
        "{config_line}"
    );
    assert!(
        config_line.contains(" apps=1 ports=1 targets=1 "),
        "{config_line}"
    );

    // reload: the outcome, or every problem.
    let sha = value(&config_line, "sha256");
    assert_eq!(
        ok(&sock, "reload"),
        format!("ok sha256={sha} (unchanged)\n")
    );
    std::fs::write(
        &p.config,
        r#"{"Apps": [{"Name": "web", "Ports": [], "Targets": ["x"]}]}"#,
    )
    .unwrap();
    let rejected = ask(&sock, "reload");
    assert!(rejected.starts_with("error: reload rejected"), "{rejected}");
    assert!(
        rejected.lines().count() >= 2,
        "every problem on its own line: {rejected}"
    );

    // flyproxy ctl
    let s = sock.to_str().unwrap();
    let shown = run(&["ctl", "-s", s, "show", "apps"]);
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    assert!(shown.stdout.starts_with("app=web "), "{}", shown.stdout);
    let refused = run(&["ctl", "-s", s, "show", "targets", "nope"]);
    assert_eq!(refused.code, Some(1));
    assert!(refused.stdout.is_empty());
    assert!(
        refused.stderr.contains("no app named \"nope\""),
        "{}",
        refused.stderr
    );
    let nobody = run(&[
        "ctl",
        "-s",
        p.dir.path.join("none.sock").to_str().unwrap(),
        "help",
    ]);
    assert_eq!(nobody.code, Some(1));
    assert!(
        nobody.stderr.contains("cannot connect to"),
        "{}",
        nobody.stderr
    );
    assert_eq!(run(&["ctl", "-s", s]).code, Some(2));
}

/// With `--user nobody`, the socket (created as root, before the switch) is nobody's and its
/// group's, mode 0660, and the proxy (now nobody) serves it.
#[test]
fn the_socket_belongs_to_the_user_and_group_it_runs_as() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        eprintln!("skipping: switching user needs root");
        return;
    }
    let echo = Backend::echo();
    let target = echo.target();
    let p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .args(&["--user", "nobody"])
        .file_arg("--admin-socket", SOCKET)
        .start();
    p.wait_log("running as", |l| l.contains("running as user nobody"));
    let sock = socket_of(&p);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert!(ok(&sock, "show apps").starts_with("app=web "));
}

/// A second proxy on a socket path a live one answers on refuses to start; a stale socket file
/// (nobody answers) is replaced.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let echo = Backend::echo();
    let target = echo.target();
    let p = Proxy::simple()
        .ports(1, {
            let target = target.clone();
            move |ports| config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let mut second = Proxy::simple()
        .ports(1, {
            let target = target.clone();
            move |ports| config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .arg("--admin-socket")
        .arg(&sock)
        .spawn();
    let (code, log) = refused_start(&mut second);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("another process answers on this socket"),
        "{log}"
    );
    ok(&sock, "show apps");

    let dir = TempDir::new("admin-stale");
    let stale = dir.path.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let third = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .arg("--admin-socket")
        .arg(&stale)
        .start();
    ok(&stale, "show apps");
    drop(third);
}

/// Clients of the socket that are broken or hostile: 1000 connections held open, a 1 MiB line,
/// one that never reads its answers. The proxy stays within a bounded CPU time and descriptor
/// count, relays on, and `show apps` from another client answers.
#[test]
fn hostile_admin_clients_cost_little_and_others_are_served() {
    raise_own_fd_limit();
    let echo = Backend::echo();
    let target = echo.target();
    let p = Proxy::simple()
        .ports(1, move |ports| {
            config(&[app("web", ports, std::slice::from_ref(&target))])
        })
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    ok(&sock, "show apps");
    let fds_before = fds_of(p.pid);
    let cpu_before = p.cpu_secs();

    // One that never reads: asks for the same answer many times over.
    let mut never_reads = UnixStream::connect(&sock).unwrap();
    never_reads.set_nonblocking(true).unwrap();
    let lots = "help\n".repeat(20_000);
    let mut sent = 0;
    while sent < lots.len() {
        match never_reads.write(&lots.as_bytes()[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => break,
        }
    }
    // A line of 1 MiB: refused, closed.
    let mut huge = UnixStream::connect(&sock).unwrap();
    huge.set_read_timeout(Some(WAIT)).unwrap();
    let big = vec![b'a'; 1 << 20];
    let writer = {
        let mut w = huge.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&big);
        })
    };
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(
        answer.starts_with("error: a line is 4096 bytes at most"),
        "{answer:?}"
    );
    let _ = writer.join();
    // 1000 held open.
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(UnixStream::connect(&sock).unwrap());
    }
    // Another client is served, promptly.
    let began = Instant::now();
    let apps = ok(&sock, "show apps");
    let took = began.elapsed();
    assert!(apps.starts_with("app=web "), "{apps}");
    assert!(took < Duration::from_secs(2), "show apps took {took:?}");
    let mut s = connect(p.v4(0));
    roundtrip(&mut s, b"relaying on\n");

    let fds = fds_of(p.pid);
    assert!(
        fds <= fds_before + 16 + 4,
        "{fds} descriptors with 1000 admin clients (before: {fds_before})"
    );
    let cpu = p.cpu_secs() - cpu_before;
    assert!(cpu < 3.0, "{cpu:.2} CPU seconds for the hostile clients");
    drop(held);
    drop(never_reads);
}

/// Open descriptors of process `pid`.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------------
// Runtime state in metrics and the status

/// What was set shows in /metrics (`flyproxy_target_state`, `flyproxy_app_enabled`), in
/// /status.json and in `flyproxy status`.
#[test]
fn runtime_state_shows_in_metrics_and_status() {
    let (a, b) = (Backend::echo(), Backend::echo());
    let (ta, tb) = (a.target(), b.target());
    let metrics = common::metrics::metrics_addr();
    let targets = [ta.clone(), tb.clone()];
    let p = Proxy::simple()
        .ports(1, move |ports| config(&[app("web", ports, &targets)]))
        .args(&["--metrics", &metrics.to_string()])
        .file_arg("--admin-socket", SOCKET)
        .start();
    let sock = socket_of(&p);
    let m = common::metrics::scrape(metrics);
    let state = |m: &common::metrics::Exposition, t: &str, s: &str| {
        m.get(
            "flyproxy_target_state",
            &[("app", "web"), ("target", t), ("state", s)],
        )
    };
    assert_eq!(state(&m, &ta, "ready"), 1.0);
    assert_eq!(state(&m, &ta, "drain"), 0.0);
    assert_eq!(m.get("flyproxy_app_enabled", &[("app", "web")]), 1.0);

    ok(&sock, &format!("set target web {ta} state drain"));
    ok(&sock, &format!("set target web {tb} weight 3"));
    ok(&sock, "disable app web");
    let m = common::metrics::scrape(metrics);
    assert_eq!(state(&m, &ta, "ready"), 0.0);
    assert_eq!(state(&m, &ta, "drain"), 1.0);
    assert_eq!(state(&m, &ta, "maint"), 0.0);
    assert_eq!(state(&m, &tb, "ready"), 1.0);
    assert_eq!(m.get("flyproxy_app_enabled", &[("app", "web")]), 0.0);

    let json = common::metrics::get(metrics, "/status.json");
    let st: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    let web = &st["apps"][0];
    assert_eq!(web["enabled"], json!(false), "{web}");
    let of = |t: &str| {
        web["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == json!(t))
            .cloned()
            .unwrap()
    };
    assert_eq!(of(&ta)["admin_state"], json!("drain"));
    assert_eq!(of(&tb)["weight"], json!(3));

    let out = run(&["status", "--metrics", &metrics.to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("DISABLED"), "{}", out.stdout);
    let line_a = out.stdout.lines().find(|l| l.contains(&ta)).unwrap();
    assert!(line_a.trim_end().ends_with(" drain"), "{line_a}");
    let line_b = out.stdout.lines().find(|l| l.contains(&tb)).unwrap();
    assert!(line_b.trim_end().ends_with(" weight 3"), "{line_b}");
}
