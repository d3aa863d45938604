//! The command line: help, version, bad arguments (exit 2), `flyproxy check` (exit 0 or 1 with
//! every problem), and start-up failures (exit 1 with the reason logged).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn help_and_version_exit_0() {
    let version = format!("flyproxy {}\n", env!("CARGO_PKG_VERSION"));
    for args in [
        &["--version"][..],
        &["-V"],
        &["simple", "--version"],
        &["check", "-V"],
        &["bpf", "--version"],
    ] {
        let o = run(args);
        assert_eq!(o.code, Some(0), "{args:?}: {}", o.stderr);
        assert_eq!(o.stdout, version, "{args:?}");
    }
    let cases: &[(&[&str], &str)] = &[
        (&["--help"], "Usage:"),
        (&["-h"], "Usage:"),
        (&["help"], "Usage:"),
        (&["simple", "--help"], "Usage: flyproxy simple [OPTIONS]"),
        (&["simple", "-h"], "--max-connections N"),
        (&["check", "--help"], "Usage: flyproxy check [-c PATH]"),
        (&["bpf", "--help"], "Usage: flyproxy bpf"),
    ];
    for (args, want) in cases {
        let o = run(args);
        assert_eq!(o.code, Some(0), "{args:?}: {}", o.stderr);
        assert!(
            o.stdout.contains(want),
            "{args:?}: {want:?} not in\n{}",
            o.stdout
        );
        assert!(o.stderr.is_empty(), "{args:?}: {}", o.stderr);
    }
    // Every option of simple is documented.
    let simple = run(&["simple", "--help"]).stdout;
    for opt in [
        "--config",
        "--max-connections",
        "--max-connections-per-client",
        "--connect-timeout",
        "--dns-ttl",
        "--idle-timeout",
        "--drain-timeout",
        "--reload-interval",
        "--log-level",
        "--metrics-target-series",
        "--metrics-app-series",
    ] {
        assert!(simple.contains(opt), "{opt} missing from simple --help");
    }
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: &[&[&str]] = &[
        &[],
        &["frob"],
        &["--frob"],
        &["simple", "--frob"],
        &["simple", "extra"],
        &["simple", "-c"],
        &["simple", "--max-connections", "0"],
        &["simple", "--max-connections", "many"],
        &["simple", "--max-connections", "-1"],
        &["simple", "--max-threads", "0"],
        &["bpf", "--max-threads", "some"],
        &["check", "--max-threads", "4"],
        &["simple", "--connect-timeout", "0"],
        &["simple", "--connect-timeout", "5"],
        &["simple", "--dns-ttl", "10"],
        &["simple", "--idle-timeout", "1.5s"],
        &["simple", "--drain-timeout", "1d"],
        &["simple", "--reload-interval", "0"],
        &["simple", "--reload-interval=soon"],
        &["simple", "--log-level", "loud"],
        &["simple", "--metrics-app-series", "many"],
        &["bpf", "--metrics-app-series", "-1"],
        &["simple", "-p", "80"],
        &["check", "--max-connections", "5"],
        &["check", "--idle-timeout", "1s"],
        &["check", "x.json"],
    ];
    for args in cases {
        let o = run(args);
        assert_eq!(
            o.code,
            Some(2),
            "{args:?}: stdout {:?} stderr {:?}",
            o.stdout,
            o.stderr
        );
        assert!(
            o.stderr.starts_with("flyproxy: "),
            "{args:?}: stderr {:?}",
            o.stderr
        );
        assert!(
            o.stderr.contains("--help"),
            "{args:?}: no hint in {:?}",
            o.stderr
        );
        assert!(o.stdout.is_empty(), "{args:?}: stdout {:?}", o.stdout);
    }
}

/// A malformed option value names the option and the value.
#[test]
fn bad_argument_messages_name_the_problem() {
    let o = run(&["simple", "--idle-timeout", "10x"]);
    assert!(
        o.stderr.contains("--idle-timeout") && o.stderr.contains("10x"),
        "{}",
        o.stderr
    );
    let o = run(&["simple", "--log-level=loud"]);
    assert!(o.stderr.contains("loud"), "{}", o.stderr);
    let o = run(&["simple", "--max-connections", "0"]);
    assert!(o.stderr.contains("--max-connections"), "{}", o.stderr);
    let o = run(&["simple", "--metrics-app-series", "1e5"]);
    assert!(
        o.stderr
            .contains("--metrics-app-series: '1e5' is not a whole number"),
        "{}",
        o.stderr
    );
    let o = run(&["nope"]);
    assert!(o.stderr.contains("unknown command 'nope'"), "{}", o.stderr);
}

fn check(dir: &TempDir, name: &str, json: &str) -> (Output, String) {
    let path = dir.write(name, json);
    let path = path.display().to_string();
    (run(&["check", "-c", &path]), path)
}

#[test]
fn check_accepts_the_original_challenge_config() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/original-config.json");
    let path = fixture.display().to_string();
    let o = run(&["check", "-c", &path]);
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert_eq!(
        o.stdout,
        format!("{path}: ok: 3 apps, 12 ports, 7 targets\n")
    );

    // The copy in shared/, where there is one, is the same file.
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/original-config.json");
    if let Ok(original) = std::fs::read(&shared) {
        assert_eq!(
            original,
            std::fs::read(&fixture).unwrap(),
            "the fixture differs from {}",
            shared.display()
        );
    }

    let dir = TempDir::new("check-ok");
    let (o, path) = check(
        &dir,
        "ok.json",
        r#"{"Apps":[{"Name":"a","Ports":[1,65535],"Targets":["[::1]:4","127.0.0.1:2","some-host.example_x.internal:3"]}]}"#,
    );
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert_eq!(
        o.stdout,
        format!("{path}: ok: 1 apps, 2 ports, 3 targets\n")
    );
}

/// Each kind of problem, alone in a file: exit 1, the problem on a line of its own that names
/// the file (and the app and field), and the count.
#[test]
fn check_reports_each_kind_of_problem() {
    let dir = TempDir::new("check");
    for (i, (what, json, want)) in problem_cases().iter().enumerate() {
        check_reports_one_problem(&dir, &format!("c{i}.json"), what, json, want);
    }
    check_reports_a_missing_file(&dir);
}

/// Each kind of problem: what it is, a file with only it, and what the report must say.
fn problem_cases() -> Vec<(&'static str, String, &'static str)> {
    let ok_app = r#"{"Name":"ok","Ports":[100],"Targets":["h:1"]}"#;
    vec![
        (
            "unknown top-level key",
            format!(r#"{{"Apps":[{ok_app}],"Extra":1}}"#),
            r#"unknown key "Extra" at the top level"#,
        ),
        (
            "unknown app key",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"Weight":3}]}"#.into(),
            r#"app "a": unknown key "Weight""#,
        ),
        (
            "duplicate app",
            format!(r#"{{"Apps":[{ok_app},{{"Name":"ok","Ports":[2],"Targets":["h:1"]}}]}}"#),
            r#"app "ok": Name: used by more than one app"#,
        ),
        (
            "port twice in one app",
            r#"{"Apps":[{"Name":"a","Ports":[5,5],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: 5 is listed twice"#,
        ),
        (
            "port in two apps",
            format!(r#"{{"Apps":[{ok_app},{{"Name":"b","Ports":[100],"Targets":["h:1"]}}]}}"#),
            r#"app "b": Ports: 100 is already used by app "ok""#,
        ),
        (
            "port 0",
            r#"{"Apps":[{"Name":"a","Ports":[0],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: 0 is not a port (1-65535)"#,
        ),
        (
            "port 70000",
            r#"{"Apps":[{"Name":"a","Ports":[70000],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: 70000 is not a port (1-65535)"#,
        ),
        (
            "negative port",
            r#"{"Apps":[{"Name":"a","Ports":[-1],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: -1 is not a port"#,
        ),
        (
            "no ports key",
            r#"{"Apps":[{"Name":"a","Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: missing or empty"#,
        ),
        (
            "empty ports",
            r#"{"Apps":[{"Name":"a","Ports":[],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: missing or empty"#,
        ),
        (
            "no targets key",
            r#"{"Apps":[{"Name":"a","Ports":[1]}]}"#.into(),
            r#"app "a": Targets: missing or empty"#,
        ),
        (
            "empty targets",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":[]}]}"#.into(),
            r#"app "a": Targets: missing or empty"#,
        ),
        (
            "target without port",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["host"]}]}"#.into(),
            r#"app "a": Targets: "host" is not host:port"#,
        ),
        (
            "target port 0",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["host:0"]}]}"#.into(),
            r#"app "a": Targets: "host:0" has a port that is not a number"#,
        ),
        (
            "bare IPv6 target",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["::1:80"]}]}"#.into(),
            r#"app "a": Targets: "::1:80" looks like an IPv6 address"#,
        ),
        (
            "bad host",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["bad host:80"]}]}"#.into(),
            r#"app "a": Targets: "bad host:80" has a host"#,
        ),
        (
            "no name",
            r#"{"Apps":[{"Ports":[1],"Targets":["h:1"]}]}"#.into(),
            r##"app "#1": Name: missing or empty"##,
        ),
        ("no Apps", r#"{}"#.into(), r#"missing key "Apps""#),
        ("not JSON", "{ nope".into(), "not a valid config"),
        (
            "ports a number, not a list (issue 23)",
            r#"{"Apps":[{"Name":"a","Ports":80,"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: 80 is a number; write [80]"#,
        ),
        (
            "ports a string, not a list (issue 23)",
            r#"{"Apps":[{"Name":"a","Ports":"80","Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: "80" is a string; write [80]"#,
        ),
        (
            "targets a string, not a list (issue 23)",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":"h:1"}]}"#.into(),
            r#"app "a": Targets: "h:1" is a string; write ["h:1"]"#,
        ),
        (
            "a target a number (issue 23)",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1", 8080]}]}"#.into(),
            r#"app "a": Targets: 8080 is a number; write "8080""#,
        ),
        (
            "name a number (issue 23)",
            r#"{"Apps":[{"Name":7,"Ports":[1],"Targets":["h:1"]}]}"#.into(),
            r##"app "#1": Name: 7 is a number; write "7""##,
        ),
        (
            "MaxConnections a string (issue 23)",
            r#"{"Apps":[{"Name":"web","Ports":[1],"Targets":["h:1"],"MaxConnections":"100"}]}"#
                .into(),
            r#"app "web": MaxConnections: "100" is a string; write 100"#,
        ),
        (
            "a key twice (issue 23)",
            r#"{"Apps":[{"Name":"web","Ports":[1],"Targets":["h:1"],"MaxConnections":1,"MaxConnections":2}]}"#
                .into(),
            r#"app "web": MaxConnections given more than once; keep one"#,
        ),
        (
            "an app not an object (issue 23)",
            r#"{"Apps":[5]}"#.into(),
            r#"Apps[0]: 5 is a number; write an app, as {"Name": "web""#,
        ),
        (
            "Apps not a list (issue 23)",
            r#"{"Apps":{"Name":"web"}}"#.into(),
            r#"Apps: {...} is an object; write a list of apps"#,
        ),
        (
            "ports not numbers",
            r#"{"Apps":[{"Name":"a","Ports":["80"],"Targets":["h:1"]}]}"#.into(),
            r#"app "a": Ports: "80" is not a range "A-B""#,
        ),
        (
            "unknown key in a target object",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":[{"Address":"h:1","Wieght":2}]}]}"#
                .into(),
            r#"app "a": Targets: "h:1": unknown key "Wieght" (a target takes Address, Weight, Backup, Drain)"#,
        ),
        (
            "target weight out of range",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:2",{"Address":"h:1","Weight":300}]}]}"#
                .into(),
            r#"app "a": Targets: "h:1": Weight: 300 is not a number from 1 to 256"#,
        ),
        (
            "target object without an Address",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":[{"Backup":true}]}]}"#.into(),
            r#"app "a": Targets: #1: Address: missing"#,
        ),
        (
            "target Backup not a boolean",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":[{"Address":"h:1","Backup":"yes"}]}]}"#
                .into(),
            r#"app "a": Targets: "h:1": Backup: "yes" is a string; write true or false"#,
        ),
        (
            "unknown health check kind",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"HealthCheck":{"Kind":"udp"}}]}"#
                .into(),
            r#"app "a": HealthCheck.Kind: "udp" is not "tcp", "http" or "tls""#,
        ),
        (
            "health check key of another kind",
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"HealthCheck":{"Path":"/"}}]}"#
                .into(),
            r#"app "a": HealthCheck.Path: only for Kind "http" (the Kind here is "tcp")"#,
        ),
    ]
}

/// `check` of a file with one problem: exit 1, the problem on a line of its own that names
/// the file and says `want`, and the count.
fn check_reports_one_problem(dir: &TempDir, name: &str, what: &str, json: &str, want: &str) {
    let (o, path) = check(dir, name, json);
    assert_eq!(o.code, Some(1), "{what}: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    let problems: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.ends_with("problems found") && !l.ends_with("problem found"))
        .collect();
    assert_eq!(
        problems.len(),
        1,
        "{what}: expected one problem:\n{}",
        o.stderr
    );
    // A syntax error is placed as PATH:LINE:COL:, the form editors jump to.
    let prefix = match what {
        "not JSON" => format!("{path}:1:3: "),
        _ => format!("{path}: "),
    };
    assert!(
        problems[0].starts_with(&prefix) && problems[0].contains(want),
        "{what}: {want:?} not in {:?}",
        problems[0]
    );
    assert_eq!(
        lines.last(),
        Some(&format!("{path}: 1 problem found").as_str()),
        "{what}"
    );
}

/// A file that is not there.
fn check_reports_a_missing_file(dir: &TempDir) {
    let missing = dir.path.join("missing.json").display().to_string();
    let o = run(&["check", "-c", &missing]);
    assert_eq!(o.code, Some(1));
    assert!(
        o.stderr.contains(&format!("{missing}: cannot read")),
        "{}",
        o.stderr
    );
}

/// All of the problems in one file are reported at once.
#[test]
fn check_reports_every_problem_at_once() {
    let dir = TempDir::new("check-all");
    let json = r#"{"Apps":[
        {"Name":"a","Ports":[0,70000,10,10],"Targets":["x"],"Weight":3},
        {"Name":"a","Ports":[10],"Targets":[]},
        {"Name":"c","Targets":["::1:80","ok:1"]}
      ],"Extra":true}"#;
    let (o, path) = check(&dir, "all.json", json);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    let want = [
        r#"unknown key "Extra" at the top level"#,
        r#"app "a": unknown key "Weight""#,
        r#"app "a": Ports: 0 is not a port"#,
        r#"app "a": Ports: 70000 is not a port"#,
        r#"app "a": Ports: 10 is listed twice"#,
        r#"app "a": Targets: "x" is not host:port"#,
        r#"app "a": Name: used by more than one app"#,
        r#"app "a": Ports: 10 is already used by app "a""#,
        r#"app "a": Targets: missing or empty"#,
        r#"app "c": Ports: missing or empty"#,
        r#"app "c": Targets: "::1:80" looks like an IPv6 address"#,
    ];
    expect_problems(&o.stderr, &path, &want);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), want.len() + 1, "{}", o.stderr);
    assert_eq!(
        lines.last().unwrap(),
        &format!("{path}: {} problems found", want.len())
    );
}

/// Issue 23: a syntax error is placed as PATH:LINE:COL: (editors jump there) with a hint for
/// the usual slips; problems go to stderr and nothing but the verdict to stdout.
#[test]
fn check_places_syntax_errors_and_hints_at_the_slip() {
    let dir = TempDir::new("check-syntax");
    let cases = [
        (
            "empty.json",
            "",
            ":1:1: not a valid config: the file is empty",
        ),
        (
            "comment.json",
            "{\n  // the web app\n  \"Apps\": []\n}",
            ":2:3: not a valid config: key must be a string (JSON has no comments: remove them)",
        ),
        (
            "quotes.json",
            "{'Apps': []}",
            ":1:2: not a valid config: key must be a string (JSON strings take double quotes",
        ),
        (
            "comma.json",
            "{\"Apps\": [\n  {\"Name\": \"a\", \"Ports\": [1], \"Targets\": [\"h:1\"],}\n]}",
            ":2:50: not a valid config: trailing comma (remove the comma after the last entry)",
        ),
    ];
    for (name, text, want) in cases {
        let (o, path) = check(&dir, name, text);
        assert_eq!(o.code, Some(1), "{name}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{name}: stdout {:?}", o.stdout);
        let first = o.stderr.lines().next().unwrap_or_default();
        assert_eq!(
            first.strip_prefix(&path).map(|rest| rest.starts_with(want)),
            Some(true),
            "{name}: {want:?} not at the start of {first:?}"
        );
        assert!(o.stderr.ends_with(&format!("{path}: 1 problem found\n")));
    }
}

/// Issue 23's example: wrong types in two apps and a key given twice, all reported in one run,
/// each naming the app and the field and saying what to write.
#[test]
fn check_reports_every_type_error_at_once() {
    let dir = TempDir::new("check-types");
    let json = r#"{"Apps":[
        {"Name":"web","Ports":[80],"Targets":["h:1"],"MaxConnections":"100"},
        {"Name":"db","Ports":"5432","Targets":"h:5432","HealthCheck":{"Fall":1,"Fall":2}}
      ]}"#;
    let (o, path) = check(&dir, "types.json", json);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    let want = [
        r#"app "web": MaxConnections: "100" is a string; write 100"#,
        r#"app "db": Ports: "5432" is a string; write [5432]"#,
        r#"app "db": Targets: "h:5432" is a string; write ["h:5432"]"#,
        r#"app "db": HealthCheck.Fall given more than once; keep one"#,
    ];
    expect_problems(&o.stderr, &path, &want);
    assert_eq!(o.stderr.lines().count(), want.len() + 1, "{}", o.stderr);
}

/// `check` without -c reads ./config.json.
#[test]
fn check_defaults_to_config_json_in_the_current_directory() {
    let dir = TempDir::new("check-default");
    dir.write(
        "config.json",
        r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"]}]}"#,
    );
    let o = Command::new(BIN)
        .arg("check")
        .current_dir(&dir.path)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "config.json: ok: 1 apps, 1 ports, 1 targets\n"
    );
    // Issue 23: it says which file it read, the default's directory included.
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "flyproxy: checking config.json in {} (the default; -c PATH checks another file)\n",
            dir.path.canonicalize().unwrap().display()
        )
    );
    // Named with -c, even as the default's name, it is the operator's choice: no note.
    let o = Command::new(BIN)
        .args(["check", "-c", "config.json"])
        .current_dir(&dir.path)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
}

#[test]
fn start_with_an_invalid_config_exits_1_with_the_reasons() {
    let echo = Backend::echo();
    let port = free_port();
    let json = config(&[app("a", &[port, 0], &[echo.target(), "nope".into()])]);
    let mut p = Proxy::simple().config(&json).spawn();
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1));
    let logs = p.logs().join("\n");
    let cfg = p.config.display().to_string();
    assert!(
        logs.contains(&format!(" ERROR {cfg}: app \"a\": Ports: 0 is not a port")),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(" ERROR {cfg}: app \"a\": Targets: \"nope\"")),
        "{logs}"
    );
    assert!(!logs.contains(" started mode="), "{logs}");
    // Nothing was left listening.
    expect_refused(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
}

#[test]
fn start_with_a_missing_config_exits_1() {
    let dir = TempDir::new("missing");
    let cfg = dir.path.join("nope.json");
    let mut cmd = Command::new(BIN);
    cmd.arg("simple").arg("--config").arg(&cfg);
    let mut p = Proxy::spawn_cmd(cmd, dir, cfg.clone());
    assert_eq!(p.wait_exit(WAIT).code(), Some(1));
    let logs = p.logs().join("\n");
    assert!(
        logs.contains(&format!("{}: cannot read", cfg.display())),
        "{logs}"
    );
}

/// Issue 23: --metrics on an app's own port names the app and the port and says what to do,
/// rather than only "Address already in use"; nothing is bound.
#[test]
fn metrics_on_an_app_port_names_the_app_and_what_to_do() {
    let echo = Backend::echo();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut p = Proxy::simple()
        .config(&config(&[app("web", &[port], &[echo.target()])]))
        .args(&["--metrics", &metrics])
        .spawn();
    assert_eq!(p.wait_exit(WAIT).code(), Some(1));
    let logs = p.logs().join("\n");
    assert!(
        logs.contains(&format!(
            "--metrics {metrics}: port {port} is also app \"web\"'s (in its Ports): give \
             --metrics a port no app uses (the default is 9089), or take {port} out of the \
             app's Ports"
        )),
        "{logs}"
    );
    expect_refused(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
}

#[test]
fn start_with_a_port_in_use_exits_1_and_names_the_port() {
    let echo = Backend::echo();
    let (free, busy) = (free_port(), free_port());
    let squatter = TcpListener::bind(("::", busy)).expect("occupy a port");
    let mut p = Proxy::simple()
        .config(&config(&[app("a", &[free, busy], &[echo.target()])]))
        .spawn();
    let status = p.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1));
    let logs = p.logs().join("\n");
    assert!(
        logs.contains(&format!(" ERROR cannot listen on port {busy}: ")),
        "{logs}"
    );
    // The port that could be bound was let go again.
    expect_refused(std::net::SocketAddr::from(([127, 0, 0, 1], free)));
    drop(squatter);

    // Two proxies on the same port: the second one cannot start.
    let first = Proxy::simple()
        .ports(1, |ports| config(&[app("a", ports, &[echo.target()])]))
        .start();
    let mut second = Proxy::simple()
        .config(&config(&[app("b", &first.ports, &[echo.target()])]))
        .spawn();
    assert_eq!(second.wait_exit(WAIT).code(), Some(1));
    assert!(second
        .logs()
        .join("\n")
        .contains(&format!("cannot listen on port {}", first.ports[0])));
    let mut s = connect(first.v4(0));
    roundtrip(&mut s, b"the first one is unaffected");
}
