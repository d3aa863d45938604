//! The upgrade hand-over variables (`FLYPROXY_READY_FD`, `FLYPROXY_METRICS_FD`,
//! `FLYPROXY_LISTEN_FDS`), parsed by `upgrade::parse_env`, against an oracle written from the
//! README's rules: a descriptor is a decimal number above 2, the list is `addr=fd,...`, no
//! descriptor twice. Any input: never a panic, and an error names its variable on one line.

use std::net::SocketAddr;

use arbitrary::Arbitrary;
use flyproxy::sys::upgrade::{parse_env, HandedFds};

/// A listener entry: built well-formed from parts, or any text.
#[derive(Arbitrary, Debug)]
pub enum Item {
    Parts { v6: bool, port: u16, fd: i64 },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub struct EnvInput {
    pub ready: Option<String>,
    pub metrics: Option<String>,
    pub listen: Option<Vec<Item>>,
    /// Taken as the whole list instead of `listen` when set.
    pub listen_raw: Option<String>,
}

fn fd_oracle(v: &str) -> Option<i32> {
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: i128 = v.trim_start_matches('0').parse().unwrap_or(0);
    (3..=i128::from(i32::MAX)).contains(&n).then_some(n as i32)
}

fn oracle(ready: Option<&str>, listen: Option<&str>, metrics: Option<&str>) -> Option<HandedFds> {
    let mut out = HandedFds::default();
    let mut seen = std::collections::HashSet::new();
    if let Some(r) = ready {
        let fd = fd_oracle(r)?;
        seen.insert(fd).then_some(())?;
        out.ready = Some(fd);
    }
    if let Some(m) = metrics {
        let fd = fd_oracle(m)?;
        seen.insert(fd).then_some(())?;
        out.metrics = Some(fd);
    }
    if let Some(l) = listen.filter(|l| !l.is_empty()) {
        for item in l.split(',') {
            let eq = item.rfind('=')?;
            let addr: SocketAddr = item[..eq].parse().ok()?;
            let fd = fd_oracle(&item[eq + 1..])?;
            seen.insert(fd).then_some(())?;
            out.listeners.push((addr, fd));
        }
    }
    Some(out)
}

pub fn check(input: &EnvInput) {
    let listen = match (&input.listen_raw, &input.listen) {
        (Some(raw), _) => Some(raw.clone()),
        (None, Some(items)) => Some(
            items
                .iter()
                .map(|i| match i {
                    Item::Parts { v6, port, fd } => {
                        let host = if *v6 { "[::]" } else { "0.0.0.0" };
                        format!("{host}:{port}={fd}")
                    }
                    Item::Raw(s) => s.clone(),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        (None, None) => None,
    };
    let (r, l, m) = (
        input.ready.as_deref(),
        listen.as_deref(),
        input.metrics.as_deref(),
    );
    let got = parse_env(r, l, m);
    let want = oracle(r, l, m);
    match (&got, &want) {
        (Ok(g), Some(w)) => assert_eq!(g, w, "{r:?} {l:?} {m:?}"),
        (Err(e), None) => {
            let text = e.to_string();
            assert!(text.starts_with("FLYPROXY_"), "{text}");
            assert!(
                !text.contains('\n'),
                "an error on more than one line: {text:?}"
            );
        }
        _ => panic!("parse_env {got:?}, oracle {want:?} for {r:?} {l:?} {m:?}"),
    }
}
