//! The fuzz targets' checks on their seed corpora and on pseudo-random inputs, as plain tests:
//! `cargo test --manifest-path fuzz/Cargo.toml` (`make fuzz` runs it before fuzzing).

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    // Plus a few thousand pseudo-random inputs (xorshift, fixed seed: the same every run).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in 0..3000usize {
        let mut buf = Vec::with_capacity(len % 512);
        for _ in 0..len % 512 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
        }
        out.push(buf);
    }
    out
}

fn each<T: for<'a> Arbitrary<'a>>(target: &str, check: impl Fn(&T)) {
    for data in seeds(target) {
        if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(&data)) {
            check(&input);
        }
    }
}

#[test]
fn config_parse() {
    for data in seeds("config_parse") {
        flyproxy_fuzz::config::check_bytes(&data);
    }
    // The shipped config and the test fixture are valid, and the oracle agrees.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for f in ["config.json", "tests/fixtures/original-config.json"] {
        if let Ok(bytes) = std::fs::read(root.join(f)) {
            assert!(flyproxy_fuzz::config::check_bytes(&bytes).is_some(), "{f}");
        }
    }
}

#[test]
fn config_structured() {
    each("config_structured", flyproxy_fuzz::config::check_structured);
}

#[test]
fn proxy_header() {
    each("proxy_header", flyproxy_fuzz::header::check);
}

#[test]
fn client_hello() {
    for data in seeds("client_hello") {
        flyproxy_fuzz::client_hello::check_bytes(&data);
        // Every cut of a real hello, too.
        for cut in 0..data.len() {
            flyproxy_fuzz::client_hello::check_bytes(&data[..cut]);
        }
    }
}

#[test]
fn client_hello_structured() {
    each(
        "client_hello_structured",
        flyproxy_fuzz::client_hello::check_structured,
    );
}

#[test]
fn cli_args() {
    each("cli_args", flyproxy_fuzz::cli::check);
}

#[test]
fn oracle_targets() {
    use flyproxy_fuzz::config::expected_target;
    assert!(expected_target("[::1]:7001").is_some());
    assert!(expected_target("10.0.0.1:80").is_some());
    assert!(expected_target("a_b.c-d:80").is_some());
    for bad in [
        "host:0",
        "host:+80",
        "host:65536",
        "[zz]:80",
        "bad host:80",
        ":80",
        "::1:80",
        "-a:1",
        "a..b:1",
        "host:080",
        "host:041901",
    ] {
        assert!(expected_target(bad).is_none(), "{bad}");
    }
}

/// Issue 23: values of the wrong type and repeated keys are problems among others, judged by
/// the oracle and counted alike by both.
#[test]
fn oracle_judges_wrong_types_and_repeated_keys() {
    use flyproxy_fuzz::config::{check_bytes, oracle, Verdict};
    let docs: &[(&str, usize)] = &[
        (
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"MaxConnections":"100"}]}"#,
            1,
        ),
        (
            r#"{"Apps":[{"Name":7,"Ports":80,"Targets":"h:1","HealthCheck":[]}]}"#,
            4,
        ),
        (
            r#"{"Apps":[5,null,{"Name":"a","Ports":[1,true],"Targets":["h:1",2]}]}"#,
            4,
        ),
        (r#"{"Apps":{"Name":"a"},"Apps":[]}"#, 1),
        (
            r#"{"Apps":[{"Name":"a","Name":"b","Ports":[1],"Targets":["h:1"],"X":1,"X":2}]}"#,
            2,
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"HealthCheck":{"Fall":1,"Fall":2,"Rise":"x"}}]}"#,
            2,
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"Addresses":"10.0.0.1","Hostnames":[3]}]}"#,
            2,
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"Balance":1,"ProxyProtocol":false,"ConnectAttempts":1.5}]}"#,
            3,
        ),
        (r#"[1]"#, 1),
        (r#"null"#, 1),
    ];
    for (doc, want) in docs {
        match oracle(doc.as_bytes()) {
            Some(Verdict::Checked { problems, .. }) => assert_eq!(problems, *want, "{doc}"),
            other => panic!("{doc}: {other:?}"),
        }
        check_bytes(doc.as_bytes());
    }
}

#[test]
fn handover_env() {
    each("handover_env", flyproxy_fuzz::handover::check);
}

#[test]
fn names() {
    for data in seeds("names") {
        flyproxy_fuzz::names::check(&String::from_utf8_lossy(&data));
    }
}
