//! The command line's parsing: durations, modes and options.

use super::*;

fn run(args: &[&str]) -> Result<Command, UsageError> {
    parse(args.iter().map(|s| s.to_string()))
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("0"), Some(Duration::ZERO));
    for bad in ["", "5", "s", "1.5s", "-1s", "10d", "1 s"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn modes_and_options() {
    let Ok(Command::Run(Mode::Bpf { port, bind }, s)) = run(&[
        "bpf",
        "-p",
        "9000",
        "--bind=127.0.0.1",
        "--idle-timeout",
        "0",
    ]) else {
        panic!()
    };
    assert_eq!((port, bind), (9000, Some("127.0.0.1".parse().unwrap())));
    assert_eq!(s.idle_timeout, None);
    let Ok(Command::Run(Mode::Simple, s)) = run(&["simple", "-c", "x.json"]) else {
        panic!()
    };
    assert_eq!(s.config, PathBuf::from("x.json"));
    assert_eq!(s.max_connections, 4096);
    assert_eq!(s.max_connections_per_client, 0);
    assert_eq!(s.dns_ttl, Duration::from_secs(10));
    let Ok(Command::Run(_, s)) = run(&["simple", "--dns-ttl", "0"]) else {
        panic!()
    };
    assert_eq!(s.dns_ttl, Duration::ZERO);
    let Ok(Command::Run(_, s)) = run(&["simple", "--max-connections-per-client=10"]) else {
        panic!()
    };
    assert_eq!(s.max_connections_per_client, 10);
    assert!(run(&["simple", "--max-connections-per-client", "-1"]).is_err());
    assert!(run(&["simple", "-p", "80"]).is_err());
    assert!(run(&["check", "--max-connections", "5"]).is_err());
    assert!(run(&["simple", "--connect-timeout", "0"]).is_err());
    assert!(run(&["frob"]).is_err());
    assert!(run(&[]).is_err());
}
