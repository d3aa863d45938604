//! The command line: `cli::parse` on argument lists drawn from its own vocabulary and free
//! strings, and `parse_duration` against an oracle written from the README (`250ms`, `30s`,
//! `5m`, `1h`; a bare `0`).

use std::time::Duration;

use arbitrary::Arbitrary;
use flyproxy::cli::{parse, parse_duration, Command};

const WORDS: [&str; 32] = [
    "simple",
    "bpf",
    "check",
    "status",
    "upgrade",
    "help",
    "-h",
    "--help",
    "-V",
    "--version",
    "-c",
    "--config",
    "--max-connections",
    "--connect-timeout",
    "--idle-timeout",
    "--drain-timeout",
    "--reload-interval",
    "--log-level",
    "--log-format",
    "--metrics",
    "--pid-file",
    "-p",
    "--port",
    "--bind",
    "0",
    "250ms",
    "127.0.0.1:9100",
    "[::1]",
    "debug",
    "json",
    "8000",
    "--config=",
];

#[derive(Arbitrary, Debug, Clone)]
pub enum Arg {
    Word(u8),
    /// A vocabulary word with `=value` glued on.
    Glued(u8, String),
    Free(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct CliInput {
    pub args: Vec<Arg>,
    pub duration: String,
}

/// The README's durations, independently.
pub fn expected_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let per: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(per)?))
}

pub fn check(input: &CliInput) {
    assert_eq!(
        parse_duration(&input.duration),
        expected_duration(&input.duration),
        "{:?}",
        input.duration
    );
    let args: Vec<String> = input
        .args
        .iter()
        .map(|a| match a {
            Arg::Word(i) => WORDS[*i as usize % WORDS.len()].to_owned(),
            Arg::Glued(i, v) => format!("{}={v}", WORDS[*i as usize % WORDS.len()]),
            Arg::Free(s) => s.clone(),
        })
        .collect();
    match parse(args.clone()) {
        Ok(Command::Run(_, s)) => {
            assert!(s.max_connections > 0, "{args:?}");
            assert!(!s.connect_timeout.is_zero(), "{args:?}");
            assert!(!s.reload_interval.is_zero(), "{args:?}");
            assert!(s.idle_timeout.is_none_or(|d| !d.is_zero()), "{args:?}");
        }
        Ok(_) => {}
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("--help"), "{text}");
        }
    }
}
