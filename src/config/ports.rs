//! An app's `Ports` (numbers and `"A-B"` ranges, expanded) and ports written back compactly
//! for messages.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::distinct::Distinct;
use crate::config::problem::{Problem, Problems};
use crate::config::raw::Found;
use crate::config::types::wrong;

/// An app's `Ports`: numbers and `"A-B"` ranges, expanded, in the order given, each once.
/// Problems for what is not a port, and one problem listing every port given twice.
pub(super) fn app_ports(app: &str, list: &[Value], problems: &mut Problems) -> Vec<u16> {
    // Sized for a list of numbers, which the app's record then keeps as it is.
    let mut order = Distinct::with_capacity(list.len());
    let mut twice = BTreeSet::new();
    for v in list {
        let range = match v {
            Value::Number(n) if n.as_i64().is_some() => match n.as_i64() {
                Some(p) if (1..=65535).contains(&p) => p as u16..=p as u16,
                _ => {
                    problems.push(Problem::PortOutOfRange {
                        app: app.to_owned(),
                        port: n.as_i64().unwrap_or_default(),
                    });
                    continue;
                }
            },
            Value::String(s) => match parse_port_range(s) {
                Ok(r) => r,
                Err(why) => {
                    problems.push(Problem::BadPortRange {
                        app: app.to_owned(),
                        value: s.clone(),
                        why,
                    });
                    continue;
                }
            },
            other => {
                problems.push(wrong(
                    Some(app),
                    "Ports",
                    &Found::of(other.clone()),
                    r#"a port, as 80, or a range in quotes, as "8000-8010""#.into(),
                ));
                continue;
            }
        };
        for p in range {
            if !order.insert(p) {
                twice.insert(p);
            }
        }
    }
    if !twice.is_empty() {
        problems.push(Problem::DuplicatePort {
            ports: port_ranges(twice.iter().copied()),
            app: app.to_owned(),
        });
    }
    order.into_vec()
}

/// `"A-B"`: an inclusive range, 1 <= A <= B <= 65535. (A single port is written as a number.)
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, &'static str> {
    const SHAPE: &str =
        "is not a range \"A-B\" (e.g. \"20000-20999\"; write a single port as a number)";
    let num = |t: &str| -> Result<u32, &'static str> {
        if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SHAPE);
        }
        t.parse::<u32>().map_err(|_| SHAPE)
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => return Err(SHAPE),
    };
    if a == 0 || b == 0 || a > 65535 || b > 65535 {
        return Err("has a port outside 1-65535");
    }
    if a > b {
        return Err("runs backwards (write the lower port first)");
    }
    Ok(a as u16..=b as u16)
}

/// Ports written compactly: `80,443,20000-20999`.
pub fn port_ranges(ports: impl IntoIterator<Item = u16>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u16, u16)> = None;
    let flush = |run: Option<(u16, u16)>, out: &mut Vec<String>| match run {
        Some((a, b)) if a == b => out.push(a.to_string()),
        Some((a, b)) => out.push(format!("{a}-{b}")),
        None => {}
    };
    for p in ports {
        run = match run {
            Some((a, b)) if b.checked_add(1) == Some(p) => Some((a, p)),
            other => {
                flush(other, &mut out);
                Some((p, p))
            }
        };
    }
    flush(run, &mut out);
    out.join(",")
}
