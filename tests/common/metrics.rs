//! The metrics endpoint as a test sees it: HTTP/1.1 requests and answers checked for what every
//! answer must have, and the text exposition format 0.0.4 parsed strictly, so that a malformed
//! exposition fails whichever test scrapes it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{free_port, WAIT};

// ---------------------------------------------------------------------------------------------
// HTTP against the endpoint

/// A free loopback address for a proxy's `--metrics`.
pub fn metrics_addr() -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, free_port()))
}

/// One answer of the endpoint.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send `req` as is and read until the endpoint closes. The error, if reading ended in one,
/// comes with whatever arrived before it.
pub fn exchange(addr: SocketAddr, req: &[u8], timeout: Duration) -> (Vec<u8>, Option<io::Error>) {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    if let Err(e) = s.write_all(req) {
        return (Vec::new(), Some(e));
    }
    read_all(&mut s)
}

pub fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Parse an HTTP/1.1 answer, checking what every answer of the endpoint must have: a status
/// line, `Connection: close`, and a Content-Length that is the body's length.
pub fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8(raw.to_vec())
        .unwrap_or_else(|_| panic!("answer is not UTF-8: {:?}", String::from_utf8_lossy(raw)));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("answer without an end of head: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut words = status_line.splitn(3, ' ');
    assert_eq!(
        words.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("header line {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let r = Response {
        status,
        headers,
        body: body.to_owned(),
    };
    assert_eq!(
        r.header("Content-Length").and_then(|v| v.parse().ok()),
        Some(r.body.len()),
        "Content-Length of {status_line:?}: {:?}",
        r.headers
    );
    assert_eq!(r.header("Connection"), Some("close"), "{:?}", r.headers);
    r
}

/// Send `req` and parse the answer; panics if there is none.
pub fn request(addr: SocketAddr, req: &[u8]) -> Response {
    let (raw, err) = exchange(addr, req, WAIT);
    if let Some(e) = err {
        panic!(
            "request {:?}: {e} after {:?}",
            String::from_utf8_lossy(req),
            String::from_utf8_lossy(&raw)
        );
    }
    parse_response(&raw)
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
}

/// `GET /metrics`, checked and parsed (a malformed exposition fails the test here).
pub fn scrape(addr: SocketAddr) -> Exposition {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    let ctype = r.header("Content-Type").unwrap_or("");
    assert!(
        ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
        "Content-Type {ctype:?}"
    );
    Exposition::parse(&r.body)
        .unwrap_or_else(|e| panic!("invalid exposition: {e}\n---- exposition ----\n{}", r.body))
}

/// A scrape once `ok` holds for it, polling up to `WAIT`; panics with the last one if never.
pub fn scrape_until(addr: SocketAddr, what: &str, ok: impl Fn(&Exposition) -> bool) -> Exposition {
    let last = Mutex::new(String::new());
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(addr);
        if ok(&m) {
            return m;
        }
        *last.lock().unwrap() = m.text.clone();
        if Instant::now() >= deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {what}; last scrape:\n{}",
                last.lock().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The text exposition format 0.0.4, parsed strictly

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    pub kind: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug)]
pub struct Exposition {
    pub text: String,
    pub families: Vec<Family>,
}

pub fn valid_metric_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

pub fn valid_label_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// A HELP docstring: `\\` and `\n` are its only escapes.
pub fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape \\{other:?} in HELP")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// A sample value: a Go-style float, including NaN and +Inf/-Inf.
pub fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ if s.is_empty() => Err("empty value".into()),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// `name{label="value",...} value [timestamp]`.
pub fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut it = line[end..].chars().peekable();
    let mut labels = BTreeMap::new();
    if it.peek() == Some(&'{') {
        it.next();
        loop {
            match it.peek() {
                Some('}') => {
                    it.next();
                    break;
                }
                None => return Err("unterminated label set".into()),
                _ => {}
            }
            let mut lname = String::new();
            while let Some(&c) = it.peek() {
                if c == '=' {
                    break;
                }
                lname.push(c);
                it.next();
            }
            if !valid_label_name(&lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            if lname.starts_with("__") {
                return Err(format!("label name {lname:?} is reserved"));
            }
            if it.next() != Some('=') || it.next() != Some('"') {
                return Err(format!("label {lname}: expected =\""));
            }
            let mut v = String::new();
            loop {
                match it.next() {
                    None => return Err(format!("label {lname}: unterminated value")),
                    Some('"') => break,
                    Some('\\') => match it.next() {
                        Some('\\') => v.push('\\'),
                        Some('"') => v.push('"'),
                        Some('n') => v.push('\n'),
                        other => return Err(format!("label {lname}: bad escape \\{other:?}")),
                    },
                    Some(c) => v.push(c),
                }
            }
            if labels.insert(lname.clone(), v).is_some() {
                return Err(format!("label {lname} given twice"));
            }
            match it.next() {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("after label {lname}: unexpected {other:?}")),
            }
        }
    }
    let tail: String = it.collect();
    let tail = tail
        .strip_prefix(' ')
        .ok_or_else(|| format!("no single space before the value in {tail:?}"))?;
    let mut parts = tail.split(' ');
    let value = parse_value(parts.next().unwrap_or(""))?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("trailing fields in {tail:?}"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

impl Exposition {
    /// Parse `text`, refusing anything the format (or good practice for it) does not allow:
    /// each family has one HELP and one TYPE, both before its samples; families are not
    /// interleaved; no two samples share name and label set.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let body = text
            .strip_suffix('\n')
            .ok_or("the last line does not end with a newline")?;
        let mut families: Vec<Family> = Vec::new();
        let mut series = HashSet::new();
        for (i, line) in body.split('\n').enumerate() {
            let fail = |m: String| format!("line {} {line:?}: {m}", i + 1);
            if line.is_empty() {
                return Err(fail("empty line".into()));
            }
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim_start_matches([' ', '\t']);
                let (kw, rest) = comment.split_once(' ').unwrap_or((comment, ""));
                if kw != "HELP" && kw != "TYPE" {
                    continue; // a plain comment
                }
                let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                if !valid_metric_name(name) {
                    return Err(fail(format!("bad metric name {name:?}")));
                }
                let fam = open_family(&mut families, name).map_err(fail)?;
                if !fam.samples.is_empty() {
                    return Err(fail(format!("{kw} after samples of {name}")));
                }
                if kw == "HELP" {
                    let help = unescape_help(arg).map_err(fail)?;
                    if fam.help.replace(help).is_some() {
                        return Err(fail(format!("second HELP for {name}")));
                    }
                } else {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                        return Err(fail(format!("unknown type {arg:?}")));
                    }
                    if fam.kind.replace(arg.to_owned()).is_some() {
                        return Err(fail(format!("second TYPE for {name}")));
                    }
                }
                continue;
            }
            let s = parse_sample(line).map_err(fail)?;
            let Some(fam) = families.last_mut() else {
                return Err(fail("a sample before any HELP and TYPE".into()));
            };
            let kind = fam.kind.clone().unwrap_or_default();
            let belongs = s.name == fam.name
                || (kind == "histogram" || kind == "summary")
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suf| s.name == format!("{}{suf}", fam.name));
            if !belongs {
                return Err(fail(format!(
                    "sample of {} inside family {} (families interleaved, or HELP/TYPE missing)",
                    s.name, fam.name
                )));
            }
            if fam.help.is_none() || fam.kind.is_none() {
                return Err(fail(format!("family {} lacks HELP or TYPE", fam.name)));
            }
            let key = (
                s.name.clone(),
                s.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>(),
            );
            if !series.insert(key) {
                return Err(fail(format!("duplicate series {}{:?}", s.name, s.labels)));
            }
            fam.samples.push(s);
        }
        for f in &families {
            if f.help.is_none() || f.kind.is_none() {
                return Err(format!("family {} lacks HELP or TYPE", f.name));
            }
        }
        Ok(Exposition {
            text: text.to_owned(),
            families,
        })
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    pub fn samples(&self, name: &str) -> Vec<&Sample> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == name)
            .collect()
    }

    /// The value of the sample with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples(name)
            .into_iter()
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?} in the exposition:\n{}",
                self.text
            )
        })
    }

    /// The value of the first sample `name` whose labels include `labels`.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples(name)
            .into_iter()
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    pub fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples(name)
            .into_iter()
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

/// The family `name`, continuing the current one or starting a new one; an error if `name`
/// already had a family earlier (families interleaved).
pub fn open_family<'a>(
    families: &'a mut Vec<Family>,
    name: &str,
) -> Result<&'a mut Family, String> {
    let continues = families.last().is_some_and(|f| f.name == name);
    if !continues {
        if families.iter().any(|f| f.name == name) {
            return Err(format!("family {name} resumes after another family"));
        }
        families.push(Family {
            name: name.to_owned(),
            help: None,
            kind: None,
            samples: Vec::new(),
        });
    }
    Ok(families.last_mut().unwrap())
}

impl fmt::Display for Exposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
