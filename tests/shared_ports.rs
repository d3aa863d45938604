//! Many apps on one port: routing by the address the client dialled (longest prefix first) and
//! by the TLS server name, port ranges, and the validation of it all, through the real binary
//! in both modes.
//!
//! Every two-mode test runs in a network namespace of its own (`two_modes!(netns ...)`), simple
//! mode too: there it can use extra IPv6 addresses on `lo` (added with `ip`) and fixed ports
//! such as 443. The TLS
//! tests use the `openssl` tool (an `s_server` per target with its own self-signed certificate,
//! made in the test) and `curl`; the client checks which certificate it reached.

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    client_hello, connect, cpu_secs, expect_closed, expect_refused, field, metrics, read_line,
    roundtrip, run, tls::TlsTarget, wait_for, Backend, Launch, Proxy, TempDir, WAIT,
};
use modes::{Env, Mode};
use serde_json::{json, Value};

/// Start the proxy in `mode` on `config` (in the calling thread's namespace), with `args`; both
/// modes reread the config every 100 ms (bpf mode's tests do so anyway).
fn start(mode: Mode, config: &Value, args: &[&str]) -> Proxy {
    let json = serde_json::to_string_pretty(config).unwrap();
    let fast = match mode {
        Mode::Simple => &["--reload-interval", "100ms"][..],
        Mode::Bpf => &[],
    };
    Launch::new(mode)
        .config(&json)
        .args(fast)
        .args(args)
        .start()
}

/// Add `addr` (IPv6) to `lo` in the calling thread's namespace, usable once this returns.
fn add_v6(addr: &str) {
    netns::add_v6(addr.parse().expect("an IPv6 address"));
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// Connect, read the tag line of the backend that answered, check an echo both ways.
fn ask(addr: SocketAddr) -> String {
    netns::ask(addr)
}

/// A connection to `addr` is not served: refused, or accepted and closed (reset) at once
/// without a byte from any backend.
fn expect_unserved(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, WAIT) {
        // Refused, or reset so soon that the connect itself reports it.
        Err(e)
            if e.kind() == std::io::ErrorKind::ConnectionRefused
                || e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect {addr}: {e}"),
        Ok(mut s) => expect_closed(&mut s, WAIT),
    }
}

/// Send `hello` to `addr`, read the tag of the (tagged echo) backend that answered, and check
/// that the hello came back unchanged: the proxy forwarded exactly what it read.
fn hello_reaches(addr: SocketAddr, hello: &[u8]) -> (String, TcpStream) {
    let mut s = connect(addr);
    s.write_all(hello).unwrap();
    let tag = read_line(&mut s);
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, hello, "the ClientHello reached the target changed");
    (tag, s)
}

/// A whole TLS handshake with `openssl s_client` to `addr`, sending `name` as the server name
/// (None: `-noservername`). The CN of the certificate the client was shown, or None if the
/// handshake did not happen.
fn tls_subject(addr: SocketAddr, name: Option<&str>) -> Option<String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string()]);
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    // stdin at EOF: s_client ends once the handshake is done.
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("subject=CN = ")
                .or(l.strip_prefix("subject=CN="))
        })
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// By address

two_modes!(netns two_apps_one_port_by_address_v4_and_v6, |env: Env| {
    add_v6("fd00:fe::2");
    add_v6("fd00:fe::3");
    let (a, b) = (Backend::tagged("a"), Backend::tagged("b"));
    let config = json!({"Apps": [
        {"Name": "a", "Ports": [5432], "Addresses": ["127.0.0.2", "fd00:fe::2"], "Targets": [a.target()]},
        {"Name": "b", "Ports": [5432], "Addresses": ["127.0.0.3", "fd00:fe::3"], "Targets": [b.target()]},
    ]});
    let _p = start(env.mode, &config, &["--metrics", "127.0.0.1:9100"]);
    assert_eq!(ask(sa("127.0.0.2", 5432)), "a");
    assert_eq!(ask(sa("127.0.0.3", 5432)), "b");
    assert_eq!(ask(sa("fd00:fe::2", 5432)), "a");
    assert_eq!(ask(sa("fd00:fe::3", 5432)), "b");
    // Addresses no app names: nothing listens there (simple) or nothing is steered (bpf).
    expect_refused(sa("127.0.0.4", 5432));
    expect_refused(sa("::1", 5432));
    // The status page says where each app answers.
    let status = metrics::get(sa("127.0.0.1", 9100), "/status").body;
    assert!(
        status.contains("\napp a  ports 5432 ")
            && status.contains("\n  addresses 127.0.0.2,fd00:fe::2\n"),
        "{status}"
    );
});

two_modes!(netns longest_prefix_wins, |env: Env| {
    add_v6("fd00:fe::5");
    add_v6("fd00:fe::9");
    let (wide, narrow) = (Backend::tagged("wide"), Backend::tagged("narrow"));
    let config = json!({"Apps": [
        {"Name": "wide", "Ports": [7000], "Addresses": ["127.0.0.0/8", "fd00:fe::/64"], "Targets": [wide.target()]},
        {"Name": "narrow", "Ports": [7000], "Addresses": ["127.0.0.5", "fd00:fe::5"], "Targets": [narrow.target()]},
    ]});
    let p = start(env.mode, &config, &["--metrics", "127.0.0.1:9100"]);
    assert_eq!(ask(sa("127.0.0.9", 7000)), "wide");
    assert_eq!(ask(sa("127.0.0.5", 7000)), "narrow");
    assert_eq!(ask(sa("127.0.0.1", 7000)), "wide");
    assert_eq!(ask(sa("fd00:fe::9", 7000)), "wide");
    assert_eq!(ask(sa("fd00:fe::5", 7000)), "narrow");
    // ::1 is outside both IPv6 prefixes. bpf: not steered, refused. simple: the IPv6 wildcard
    // listener takes it and resets it at once, counted as no_app.
    expect_unserved(sa("::1", 7000));
    if env.mode == Mode::Simple {
        let m = metrics::scrape(sa("127.0.0.1", 9100));
        assert_eq!(
            m.value(
                "flyproxy_unrouted_connections_total",
                &[("port", "7000"), ("reason", "no_app")],
            ),
            Some(1.0),
            "{}",
            m.text
        );
    }
    let log = p.logs().join("\n");
    assert!(log.contains("started mode="), "{log}");
});

two_modes!(
    /// A server-first protocol (the target speaks before the client) works on a port shared by
    /// address, with no Hostnames: the proxy never waits for the client there.
    netns server_first_target_on_a_port_without_hostnames, |env: Env| {
    let (db, other, tls) = (
        Backend::tagged("db"),
        Backend::tagged("other"),
        Backend::tagged("tls"),
    );
    let config = json!({"Apps": [
        {"Name": "db", "Ports": [3306], "Addresses": ["127.0.0.2"], "Targets": [db.target()]},
        {"Name": "other", "Ports": [3306], "Addresses": ["127.0.0.3"], "Targets": [other.target()]},
        // Another port of the same config waits for a ClientHello; this one must not.
        {"Name": "tls", "Ports": [443], "Hostnames": ["x.example"], "Targets": [tls.target()]},
    ]});
    let _p = start(env.mode, &config, &["--preread-timeout", "30s"]);
    let began = Instant::now();
    let mut s = connect(sa("127.0.0.2", 3306));
    // Nothing sent: the target's greeting arrives anyway, long before any preread timeout.
    assert_eq!(read_line(&mut s), "db");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the greeting took {:?}",
        began.elapsed()
    );
    roundtrip(&mut s, b"QUIT\n");
});

// ---------------------------------------------------------------------------------------------
// By server name, with real TLS handshakes

two_modes!(
    /// Three apps on one port told apart by SNI; each target presents its own certificate and the
    /// client checks which one it reached.
    netns three_apps_by_server_name_with_tls, |env: Env| {
    let dir = TempDir::new("sni");
    let shop = TlsTarget::start(&dir.path, "shop.example.com", 9441);
    let blog = TlsTarget::start(&dir.path, "blog.example.com", 9442);
    let fallback = TlsTarget::start(&dir.path, "default.example.com", 9443);
    let config = json!({"Apps": [
        {"Name": "shop", "Ports": [443], "Hostnames": ["shop.example.com", "*.shop.example.com"], "Targets": [shop.target()]},
        {"Name": "blog", "Ports": [443], "Hostnames": ["Blog.Example.com."], "Targets": [blog.target()]},
        {"Name": "default", "Ports": [443, 80], "Targets": [fallback.target()]},
    ]});
    let p = start(env.mode, &config, &[]);
    let at = sa("127.0.0.1", 443);
    let cases = [
        (Some("shop.example.com"), "shop.example.com", "shop"),
        (Some("WWW.Shop.Example.COM"), "shop.example.com", "shop"),
        (Some("blog.example.com"), "blog.example.com", "blog"),
        // A wildcard covers one label only.
        (
            Some("a.b.shop.example.com"),
            "default.example.com",
            "default",
        ),
        (
            Some("unknown.example.org"),
            "default.example.com",
            "default",
        ),
        (None, "default.example.com", "default"),
    ];
    for (i, (name, cn, app)) in cases.iter().enumerate() {
        let mark = p.mark();
        assert_eq!(
            tls_subject(at, *name).as_deref(),
            Some(*cn),
            "server name {name:?}"
        );
        let line = p.wait_log_since(mark, "the conn line", |l| l.contains(" conn app="));
        assert_eq!(
            field(&line, "app").as_deref(),
            Some(*app),
            "case {i}: {line}"
        );
        assert_eq!(
            field(&line, "sni"),
            name.map(str::to_owned),
            "case {i}: the access log's sni= ({line})"
        );
    }
    // The IPv6 side of the same port.
    assert_eq!(
        tls_subject(sa("::1", 443), Some("blog.example.com")).as_deref(),
        Some("blog.example.com")
    );
});

two_modes!(
    /// Without a default app, a connection no name picks is closed and logged `end=no_route` with
    /// the reason, and counted; plain text and a silent client too; the ClientHello may come one
    /// byte per write.
    netns no_route_reasons_and_a_trickled_hello, |env: Env| {
    let (shop, blog) = (Backend::tagged("shop"), Backend::tagged("blog"));
    let config = json!({"Apps": [
        {"Name": "shop", "Ports": [8443], "Hostnames": ["shop.example.com"], "Targets": [shop.target()]},
        {"Name": "blog", "Ports": [8443], "Hostnames": ["*.blog.example.com"], "Targets": [blog.target()]},
    ]});
    let p = start(
        env.mode,
        &config,
        &["--preread-timeout", "2s", "--metrics", "127.0.0.1:9100"],
    );
    let at = sa("127.0.0.1", 8443);

    // A real hello, in records of 7 bytes, written one byte at a time (each write its own
    // segment: TCP_NODELAY). No sleeps between them: on a loaded machine sleeps would stretch
    // the hello past the preread timeout.
    let hello = client_hello(Some("www.blog.example.com"), 7);
    let mut s = connect(at);
    s.set_nodelay(true).unwrap();
    for b in &hello {
        s.write_all(std::slice::from_ref(b)).unwrap();
        thread::yield_now();
    }
    assert_eq!(read_line(&mut s), "blog");
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, hello, "the trickled hello reached the target changed");
    roundtrip(&mut s, b"after the hello\n");
    drop(s);

    let expect_no_route = |send: &[u8], reason: &str| {
        let mark = p.mark();
        let began = Instant::now();
        let mut s = connect(at);
        s.write_all(send).unwrap();
        expect_closed(&mut s, WAIT);
        let line = p.wait_log_since(mark, &format!("no_route {reason}"), |l| {
            l.contains(" end=no_route ")
        });
        assert!(line.contains(" WARN "), "{line}");
        assert_eq!(field(&line, "reason").as_deref(), Some(reason), "{line}");
        assert_eq!(field(&line, "app").as_deref(), Some("-"), "{line}");
        (line, began.elapsed())
    };
    let (line, _) = expect_no_route(
        &client_hello(Some("nobody.example.net"), 1000),
        "unknown_server_name",
    );
    assert_eq!(field(&line, "sni").as_deref(), Some("nobody.example.net"));
    // The wildcard does not cover the bare name.
    expect_no_route(
        &client_hello(Some("blog.example.com"), 1000),
        "unknown_server_name",
    );
    expect_no_route(&client_hello(None, 1000), "no_server_name");
    expect_no_route(
        b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n",
        "not_tls",
    );
    // A client that sends nothing: closed at the preread timeout (2s), not before.
    let (_, took) = expect_no_route(b"", "preread_timeout");
    assert!(
        took >= Duration::from_millis(1900),
        "closed after {took:?}, before the preread timeout"
    );
    // Half a hello, then silence: the same.
    expect_no_route(
        &client_hello(Some("shop.example.com"), 1000)[..20],
        "preread_timeout",
    );

    let m = metrics::scrape(sa("127.0.0.1", 9100));
    for (reason, n) in [
        ("unknown_server_name", 2.0),
        ("no_server_name", 1.0),
        ("not_tls", 1.0),
        ("preread_timeout", 2.0),
    ] {
        assert_eq!(
            m.value(
                "flyproxy_unrouted_connections_total",
                &[("port", "8443"), ("reason", reason)]
            ),
            Some(n),
            "{reason}:\n{}", m.text
        );
    }
    assert_eq!(shop.served(), 0, "nothing reached shop");
});

two_modes!(
    /// The PROXY header's destination is what the client dialled, and the ClientHello follows it
    /// unchanged.
    netns proxy_header_then_the_hello, |env: Env| {
    let echo = Backend::echo();
    let config = json!({"Apps": [
        {"Name": "shop", "Ports": [8443], "Addresses": ["127.0.0.7"], "Hostnames": ["shop.example.com"],
         "ProxyProtocol": "v1", "Targets": [echo.target()]},
    ]});
    let _p = start(env.mode, &config, &[]);
    let hello = client_hello(Some("shop.example.com"), 50);
    let mut s = connect(sa("127.0.0.7", 8443));
    s.write_all(&hello).unwrap();
    let header = read_line(&mut s);
    let me = s.local_addr().unwrap();
    assert_eq!(
        header,
        format!("PROXY TCP4 {} 127.0.0.7 {} 8443\r", me.ip(), me.port()),
        "the PROXY header names the dialled address and port"
    );
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, hello);
});

two_modes!(
    /// A reload moves a hostname to another app: a connection open before it stays on its target,
    /// the next one goes to the new app.
    netns reload_moves_a_hostname_live_connection_stays, |env: Env| {
    let (shop, blog) = (Backend::tagged("shop"), Backend::tagged("blog"));
    let config = |shop_names: &[&str], blog_names: &[&str]| {
        json!({"Apps": [
            {"Name": "shop", "Ports": [8443], "Hostnames": shop_names, "Targets": [shop.target()]},
            {"Name": "blog", "Ports": [8443], "Hostnames": blog_names, "Targets": [blog.target()]},
        ]})
    };
    let p = start(
        env.mode,
        &config(
            &["shop.example.com", "www.example.com"],
            &["blog.example.com"],
        ),
        &["--reload-interval", "100ms"],
    );
    let at = sa("127.0.0.1", 8443);
    let hello = client_hello(Some("www.example.com"), 1000);
    let (tag, mut live) = hello_reaches(at, &hello);
    assert_eq!(tag, "shop");

    let mark = p.mark();
    p.rewrite_config(
        &serde_json::to_string(&config(
            &["shop.example.com"],
            &["blog.example.com", "www.example.com"],
        ))
        .unwrap(),
    );
    let ok = p.wait_log_since(mark, "reload ok", |l| {
        l.contains(" reload ok: ") || l.contains(" reload rejected")
    });
    assert!(
        ok.contains(" reload ok: ") && ok.contains("changed=[blog,shop]"),
        "{ok}"
    );

    let (tag, _) = hello_reaches(at, &hello);
    assert_eq!(tag, "blog", "a new connection for the moved name");
    roundtrip(&mut live, b"still on shop\n");
    live.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut live, WAIT);
    let line = p.wait_log(
        &format!("conn of the live connection to {}", shop.target()),
        |l| l.contains(" app=shop ") && l.contains(" end=closed"),
    );
    assert_eq!(field(&line, "target"), Some(shop.target()), "{line}");
});

two_modes!(
    /// `curl --resolve` to two HTTPS sites on one port, as a user would try it: curl checks each
    /// site's certificate against that site's own CA file.
    netns curl_to_two_https_backends_on_one_port, |env: Env| {
    let dir = TempDir::new("curl");
    let shop = TlsTarget::start(&dir.path, "shop.example.com", 9441);
    let blog = TlsTarget::start(&dir.path, "blog.example.com", 9442);
    let config = json!({"Apps": [
        {"Name": "shop", "Ports": [443], "Hostnames": ["shop.example.com"], "Targets": [shop.target()]},
        {"Name": "blog", "Ports": [443], "Hostnames": ["blog.example.com"], "Targets": [blog.target()]},
    ]});
    let _p = start(env.mode, &config, &[]);
    let curl = |name: &str, ca: &Path| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--resolve")
            .arg(format!("{name}:443:127.0.0.1"))
            .arg("--cacert")
            .arg(ca)
            .arg(format!("https://{name}/"))
            .output()
            .expect("curl is needed for this test (make deps installs it)")
    };
    for (name, ca) in [
        ("shop.example.com", &shop.cert),
        ("blog.example.com", &blog.cert),
    ] {
        let out = curl(name, ca);
        assert!(
            out.status.success(),
            "curl https://{name}/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{name}");
    }
    // Each name reached its own site: with the other site's CA, verification fails.
    let out = curl("shop.example.com", &blog.cert);
    assert!(
        !out.status.success(),
        "shop answered with blog's certificate"
    );
});

// ---------------------------------------------------------------------------------------------
// bpf: ranges, bindings, counters, --bind

#[test]
fn bpf_ten_thousand_port_range_with_a_more_specific_app() {
    netns::run(
        "bpf_ten_thousand_port_range_with_a_more_specific_app",
        |ns| {
            let (games, lobby) = (Backend::tagged("games"), Backend::tagged("lobby"));
            let config = json!({"Apps": [
                {"Name": "games", "Ports": ["20000-29999"], "Addresses": ["127.0.0.0/8"], "Targets": [games.target()]},
                {"Name": "lobby", "Ports": [25000, "26000-26001"], "Addresses": ["127.0.0.9"], "Targets": [lobby.target()]},
            ]});
            let began = Instant::now();
            let p = Proxy::bpf()
                .config(&serde_json::to_string(&config).unwrap())
                .args(&["--metrics", "127.0.0.1:9100"])
                .start();
            let started = began.elapsed();
            let steering = ns.steering(p.pid);
            let bindings = steering.bindings();
            assert_eq!(bindings.len(), 10_003, "one binding per (prefix, port)");
            assert!(bindings.contains(&("127.0.0.0/8".to_owned(), 20000)));
            assert!(bindings.contains(&("127.0.0.0/8".to_owned(), 29999)));
            assert!(bindings.contains(&("127.0.0.9/32".to_owned(), 25000)));
            assert!(!bindings
                .iter()
                .any(|(_, port)| *port == 30000 || *port == 19999));
            for port in [20000, 23456, 25000, 29999] {
                assert_eq!(ask(sa("127.0.0.1", port)), "games", "127.0.0.1:{port}");
            }
            assert_eq!(ask(sa("127.0.0.9", 25000)), "lobby");
            assert_eq!(ask(sa("127.0.0.9", 26001)), "lobby");
            assert_eq!(ask(sa("127.0.0.9", 25001)), "games");
            // IPv4 only, and only the range.
            expect_refused(sa("::1", 20000));
            expect_refused(sa("127.0.0.1", 30000));
            expect_refused(sa("127.0.0.1", 19999));
            // The per-app lookup counters: 5 steered to games' bindings, 2 to lobby's.
            let m = metrics::scrape(sa("127.0.0.1", 9100));
            assert_eq!(
                m.value(
                    "flyproxy_bpf_lookups_total",
                    &[("group", "games"), ("verdict", "steered")],
                ),
                Some(5.0),
                "{}",
                m.text
            );
            assert_eq!(
                m.value(
                    "flyproxy_bpf_lookups_total",
                    &[("group", "lobby"), ("verdict", "steered")],
                ),
                Some(2.0),
                "{}",
                m.text
            );
            eprintln!("10,003 bindings: started in {started:?}");

            // A reload is a diff: lobby leaves 25000, games shrinks by 1,000 ports.
            let config = json!({"Apps": [
                {"Name": "games", "Ports": ["20000-28999"], "Addresses": ["127.0.0.0/8"], "Targets": [games.target()]},
                {"Name": "lobby", "Ports": ["26000-26001"], "Addresses": ["127.0.0.9"], "Targets": [lobby.target()]},
            ]});
            let line = p.reload(&serde_json::to_string(&config).unwrap());
            eprintln!("reload: {line}");
            assert_eq!(steering.bindings().len(), 9_002);
            assert_eq!(ask(sa("127.0.0.9", 25000)), "games");
            expect_refused(sa("127.0.0.1", 29500));
        },
    );
}

/// Apps sharing a binding by SNI share one lookup counter group, named for all of them.
#[test]
fn bpf_shared_binding_counts_under_the_apps_together() {
    netns::run("bpf_shared_binding_counts_under_the_apps_together", |_| {
        let (a, b) = (Backend::tagged("a"), Backend::tagged("b"));
        let config = json!({"Apps": [
            {"Name": "b", "Ports": [8443], "Hostnames": ["b.example"], "Targets": [b.target()]},
            {"Name": "a", "Ports": [8443, 8444], "Targets": [a.target()]},
        ]});
        let _p = Proxy::bpf()
            .config(&serde_json::to_string(&config).unwrap())
            .args(&["--metrics", "127.0.0.1:9100"])
            .start();
        assert_eq!(
            hello_reaches(sa("127.0.0.1", 8443), &client_hello(Some("b.example"), 100)).0,
            "b"
        );
        assert_eq!(
            hello_reaches(sa("127.0.0.1", 8443), &client_hello(None, 100)).0,
            "a"
        );
        assert_eq!(ask(sa("127.0.0.1", 8444)), "a");
        let m = metrics::scrape(sa("127.0.0.1", 9100));
        assert_eq!(
            m.value(
                "flyproxy_bpf_lookups_total",
                &[("group", "a+b"), ("verdict", "steered")],
            ),
            Some(2.0),
            "{}",
            m.text
        );
        assert_eq!(
            m.value(
                "flyproxy_bpf_lookups_total",
                &[("group", "a"), ("verdict", "steered")],
            ),
            Some(1.0),
            "{}",
            m.text
        );
    });
}

/// `--bind` still limits what is steered to the proxy's own address.
#[test]
fn bpf_bind_with_addresses() {
    netns::run("bpf_bind_with_addresses", |_| {
        let (a, b) = (Backend::tagged("a"), Backend::tagged("b"));
        let config = json!({"Apps": [
            {"Name": "a", "Ports": [7000], "Addresses": ["127.0.0.2"], "Targets": [a.target()]},
            {"Name": "b", "Ports": [7000], "Addresses": ["127.0.0.0/8"], "Targets": [b.target()]},
        ]});
        let _p = Proxy::bpf()
            .config(&serde_json::to_string(&config).unwrap())
            .args(&["--bind", "127.0.0.2"])
            .start();
        assert_eq!(ask(sa("127.0.0.2", 7000)), "a");
        expect_refused(sa("127.0.0.3", 7000));
    });
}

// ---------------------------------------------------------------------------------------------
// Validation

fn check(dir: &TempDir, config: &Value) -> (Option<i32>, String) {
    let path = dir.write("c.json", &serde_json::to_string(config).unwrap());
    let o = run(&["check", "-c", path.to_str().unwrap()]);
    // The verdict "ok" is on stdout, problems on stderr.
    (
        o.code,
        if o.code == Some(0) {
            o.stdout
        } else {
            o.stderr
        },
    )
}

#[test]
fn every_validation_error_names_apps_ports_and_addresses() {
    let dir = TempDir::new("shared-check");
    let t = json!(["127.0.0.1:1"]);
    for (what, apps, want) in &sharing_problems(&t) {
        let (code, out) = check(&dir, &json!({ "Apps": apps }));
        assert_eq!(code, Some(1), "{what}: {out}");
        let problems: Vec<&str> = out
            .lines()
            .filter(|l| !l.ends_with("problems found") && !l.ends_with("problem found"))
            .collect();
        assert_eq!(problems.len(), 1, "{what}: exactly one problem: {out}");
        assert!(
            problems[0].contains(want),
            "{what}:\n  want {want}\n  got  {}",
            problems[0]
        );
    }

    for apps in sharing_configs_that_are_fine(&t) {
        let (code, out) = check(&dir, &json!({ "Apps": apps }));
        assert_eq!(code, Some(0), "{apps}: {out}");
    }
    let (_, out) = check(
        &dir,
        &json!({"Apps": [{"Name": "g", "Ports": ["20000-29999"], "Targets": t}]}),
    );
    assert!(out.contains("1 apps, 10000 ports, 1 targets"), "{out}");
}

/// Each kind of problem with ports, addresses, hostnames and sharing: what it is, the apps
/// (each target `t`), and what the report must say.
fn sharing_problems(t: &Value) -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "range backwards",
            json!([{"Name": "a", "Ports": ["30-20"], "Targets": t}]),
            r#"app "a": Ports: "30-20" runs backwards (write the lower port first)"#,
        ),
        (
            "range from 0",
            json!([{"Name": "a", "Ports": ["0-5"], "Targets": t}]),
            r#"app "a": Ports: "0-5" has a port outside 1-65535"#,
        ),
        (
            "range past 65535",
            json!([{"Name": "a", "Ports": ["65000-70000"], "Targets": t}]),
            r#"app "a": Ports: "65000-70000" has a port outside 1-65535"#,
        ),
        (
            "not a range",
            json!([{"Name": "a", "Ports": ["http"], "Targets": t}]),
            r#"app "a": Ports: "http" is not a range "A-B""#,
        ),
        (
            "a port as a string",
            json!([{"Name": "a", "Ports": ["443"], "Targets": t}]),
            r#"app "a": Ports: "443" is not a range "A-B" (e.g. "20000-20999"; write a single port as a number)"#,
        ),
        (
            "overlapping ranges",
            json!([{"Name": "a", "Ports": ["100-200", "150-300", 80, 80], "Targets": t}]),
            r#"app "a": Ports: 80,150-200 are listed twice"#,
        ),
        (
            "bad address",
            json!([{"Name": "a", "Ports": [1], "Addresses": ["300.1.1.1"], "Targets": t}]),
            r#"app "a": Addresses: "300.1.1.1" is not an IP address or prefix"#,
        ),
        (
            "prefix too long",
            json!([{"Name": "a", "Ports": [1], "Addresses": ["10.0.0.0/33"], "Targets": t}]),
            r#"app "a": Addresses: "10.0.0.0/33" has a prefix length that is not a number from 0 to 32"#,
        ),
        (
            "host bits",
            json!([{"Name": "a", "Ports": [1], "Addresses": ["198.51.100.7/24"], "Targets": t}]),
            r#"app "a": Addresses: "198.51.100.7/24" has bits set past its prefix length (did you mean "198.51.100.0/24"?)"#,
        ),
        (
            "v4-mapped",
            json!([{"Name": "a", "Ports": [1], "Addresses": ["::ffff:192.0.2.1"], "Targets": t}]),
            r#"app "a": Addresses: "::ffff:192.0.2.1" is an IPv4-mapped IPv6 address: write it as IPv4 ("192.0.2.1")"#,
        ),
        (
            "address twice",
            json!([{"Name": "a", "Ports": [1], "Addresses": ["2001:db8::1", "2001:DB8::1"], "Targets": t}]),
            r#"app "a": Addresses: "2001:DB8::1" is listed twice"#,
        ),
        (
            "empty addresses",
            json!([{"Name": "a", "Ports": [1], "Addresses": [], "Targets": t}]),
            r#"app "a": Addresses: missing or empty"#,
        ),
        (
            "wildcard inside",
            json!([{"Name": "a", "Ports": [1], "Hostnames": ["a.*.example.com"], "Targets": t}]),
            r#"app "a": Hostnames: "a.*.example.com" has a wildcard other than a whole leftmost label (write "*.example.com")"#,
        ),
        (
            "bare wildcard",
            json!([{"Name": "a", "Ports": [1], "Hostnames": ["*"], "Targets": t}]),
            r#"app "a": Hostnames: "*" has a wildcard other than a whole leftmost label"#,
        ),
        (
            "IP as hostname",
            json!([{"Name": "a", "Ports": [1], "Hostnames": ["192.0.2.1"], "Targets": t}]),
            r#"app "a": Hostnames: "192.0.2.1" is an IP address: a TLS client never sends one as its server name (use Addresses)"#,
        ),
        (
            "bad hostname",
            json!([{"Name": "a", "Ports": [1], "Hostnames": ["shop_.ex ample.com"], "Targets": t}]),
            r#"app "a": Hostnames: "shop_.ex ample.com" is not a DNS name"#,
        ),
        (
            "hostname twice in an app",
            json!([{"Name": "a", "Ports": [1], "Hostnames": ["x.example", "X.Example."], "Targets": t}]),
            r#"app "a": Hostnames: "X.Example." is listed twice"#,
        ),
        (
            "two defaults on every address",
            json!([
            {"Name": "a", "Ports": [443], "Targets": t},
            {"Name": "b", "Ports": [443, 80], "Targets": t}]),
            r#"app "b": Ports: 443 is already used by app "a" on every address, and neither has Hostnames (apps share an address and port only when Hostnames tell them apart, with at most one app without them)"#,
        ),
        (
            "two defaults on one address",
            json!([
            {"Name": "db-a", "Ports": [5432], "Addresses": ["192.0.2.10"], "Targets": t},
            {"Name": "db-b", "Ports": [5432], "Addresses": ["192.0.2.10", "192.0.2.11"], "Targets": t}]),
            r#"app "db-b": Ports: 5432 is already used by app "db-a" on 192.0.2.10, and neither has Hostnames"#,
        ),
        (
            "a shared range is one problem",
            json!([
            {"Name": "g1", "Ports": ["20000-29999"], "Addresses": ["198.51.100.0/24"], "Targets": t},
            {"Name": "g2", "Ports": ["25000-34999"], "Addresses": ["198.51.100.0/24"], "Targets": t}]),
            r#"app "g2": Ports: 25000-29999 are already used by app "g1" on 198.51.100.0/24, and neither has Hostnames"#,
        ),
        (
            "hostname on two apps",
            json!([
            {"Name": "shop", "Ports": [443], "Hostnames": ["shop.example.com"], "Targets": t},
            {"Name": "shop2", "Ports": [443, 8443], "Hostnames": ["SHOP.example.com"], "Targets": t}]),
            r#"app "shop2": Hostnames: "shop.example.com" is also claimed by app "shop" on port 443 (every address): a name may pick only one app per address and port"#,
        ),
    ]
}

/// What is fine: a 10,000-port range; the same name, or two defaults, on different
/// addresses; a prefix beside an address in it; the issue's example.
fn sharing_configs_that_are_fine(t: &Value) -> [Value; 3] {
    [
        json!([{"Name": "g", "Ports": ["20000-29999", 31500, 80], "Targets": t}]),
        json!([
            {"Name": "a", "Ports": [443], "Addresses": ["192.0.2.10"], "Hostnames": ["x.example"], "Targets": t},
            {"Name": "b", "Ports": [443], "Addresses": ["192.0.2.11"], "Hostnames": ["x.example"], "Targets": t},
            {"Name": "c", "Ports": [443], "Addresses": ["192.0.2.0/24"], "Targets": t},
            {"Name": "d", "Ports": [443], "Addresses": ["192.0.2.11"], "Targets": t}]),
        json!([
            {"Name": "shop", "Ports": [443], "Hostnames": ["shop.example.com", "*.shop.example.com"], "Targets": ["10.0.0.5:8443"]},
            {"Name": "blog", "Ports": [443], "Hostnames": ["blog.example.com"], "Targets": ["10.0.0.6:8443"]},
            {"Name": "default", "Ports": [443, 80], "Targets": ["10.0.0.7:8443"]},
            {"Name": "db-a", "Ports": [5432], "Addresses": ["192.0.2.10"], "Targets": ["10.0.1.5:5432"]},
            {"Name": "db-b", "Ports": [5432], "Addresses": ["192.0.2.11", "2001:db8::11"], "Targets": ["10.0.1.6:5432"]},
            {"Name": "games", "Ports": ["20000-20999", 21500], "Addresses": ["198.51.100.0/24"], "Targets": ["10.0.2.5:7000"]}]),
    ]
}

/// A reload that breaks a sharing rule is refused whole, and the running config keeps serving.
#[test]
fn a_refused_reload_keeps_the_shared_port_serving() {
    netns::run("a_refused_reload_keeps_the_shared_port_serving", |_| {
        let (a, b) = (Backend::tagged("a"), Backend::tagged("b"));
        let good = json!({"Apps": [
            {"Name": "a", "Ports": [7000], "Addresses": ["127.0.0.2"], "Targets": [a.target()]},
            {"Name": "b", "Ports": [7000], "Addresses": ["127.0.0.3"], "Targets": [b.target()]},
        ]});
        let p = start(Mode::Simple, &good, &[]);
        let bad = json!({"Apps": [
            {"Name": "a", "Ports": [7000], "Addresses": ["127.0.0.2"], "Targets": [a.target()]},
            {"Name": "b", "Ports": [7000], "Addresses": ["127.0.0.2"], "Targets": [b.target()]},
        ]});
        let mark = p.mark();
        p.rewrite_config(&serde_json::to_string(&bad).unwrap());
        let line = p.wait_reload_rejected(mark);
        assert!(
            line.contains(r#"app "b": Ports: 7000 is already used by app "a" on 127.0.0.2"#),
            "{line}"
        );
        assert_eq!(ask(sa("127.0.0.2", 7000)), "a");
        assert_eq!(ask(sa("127.0.0.3", 7000)), "b");
    });
}

// ---------------------------------------------------------------------------------------------
// The cost of waiting for ClientHellos

/// Attackers on a port where apps have Hostnames: 300 clients that send nothing, 100 that
/// trickle a hello a byte at a time and never finish, and one that announces a 20 KB hello.
/// The silent and the trickling ones are closed at the preread timeout, the oversized one at
/// once; waiting costs the proxy next to no CPU (it sleeps in poll, and parses a trickled hello
/// only when a whole field may have arrived); a real client is served throughout.
#[test]
fn waiting_for_hellos_is_bounded_and_cheap() {
    netns::run("waiting_for_hellos_is_bounded_and_cheap", |_| {
        let shop = Backend::tagged("shop");
        let config = json!({"Apps": [
            {"Name": "shop", "Ports": [8443], "Hostnames": ["shop.example.com"], "Targets": [shop.target()]},
        ]});
        let p = start(
            Mode::Simple,
            &config,
            &["--preread-timeout", "3s", "--metrics", "127.0.0.1:9100"],
        );
        let at = sa("127.0.0.1", 8443);
        let cpu_before = cpu_secs(p.pid);
        let began = Instant::now();
        let silent: Vec<TcpStream> = (0..300).map(|_| connect(at)).collect();
        let hello = client_hello(Some("shop.example.com"), 1000);
        let trickle = thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..100).map(|_| connect(at)).collect();
            for s in &conns {
                s.set_nodelay(true).unwrap();
            }
            // One byte per connection every 50 ms, never the last one: until the proxy closes
            // them (writes then fail) or 10 s pass.
            let until = Instant::now() + Duration::from_secs(10);
            let mut i = 0;
            while Instant::now() < until && i < hello.len() - 1 {
                conns.retain_mut(|s| s.write_all(&hello[i..i + 1]).is_ok());
                i += 1;
                thread::sleep(Duration::from_millis(50));
            }
            conns
        });
        // A 20 KB ClientHello announced: refused at once, not at the timeout.
        let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x50, 0x00];
        big.extend([0u8; 100]);
        let mut s = connect(at);
        s.write_all(&big).unwrap();
        let t = Instant::now();
        expect_closed(&mut s, WAIT);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "too_large took {:?}",
            t.elapsed()
        );

        // A real client meanwhile.
        let (tag, _) = hello_reaches(at, &client_hello(Some("shop.example.com"), 100));
        assert_eq!(tag, "shop");

        for mut s in silent {
            expect_closed(&mut s, WAIT);
        }
        let closed_after = began.elapsed();
        assert!(
            closed_after >= Duration::from_millis(2900),
            "silent clients closed after {closed_after:?}, before the timeout"
        );
        let _ = trickle.join().unwrap();
        let m = wait_for("401 unrouted connections counted", WAIT, || {
            let m = metrics::scrape(sa("127.0.0.1", 9100));
            let n = m.value(
                "flyproxy_unrouted_connections_total",
                &[("port", "8443"), ("reason", "preread_timeout")],
            );
            (n == Some(400.0)).then_some(m)
        });
        assert_eq!(
            m.value(
                "flyproxy_unrouted_connections_total",
                &[("port", "8443"), ("reason", "too_large")],
            ),
            Some(1.0),
            "{}",
            m.text
        );
        let cpu = cpu_secs(p.pid) - cpu_before;
        eprintln!("401 waiting clients over {closed_after:?}: {cpu:.2} CPU seconds");
        // A proxy that spun while waiting would use seconds of CPU over 3 s with 400 waiters.
        assert!(cpu < 1.0, "the proxy used {cpu:.2} CPU seconds");
        // Still serving.
        let (tag, _) = hello_reaches(at, &client_hello(Some("shop.example.com"), 100));
        assert_eq!(tag, "shop");
    });
}

/// An upgrade hands the per-address listeners of simple mode to the new process, which adopts
/// them all and binds nothing.
#[test]
fn upgrade_hands_over_per_address_listeners() {
    netns::run("upgrade_hands_over_per_address_listeners", |_| {
        let (a, b) = (Backend::tagged("a"), Backend::tagged("b"));
        let config = json!({"Apps": [
            {"Name": "a", "Ports": [7000], "Addresses": ["127.0.0.2", "::1"], "Targets": [a.target()]},
            {"Name": "b", "Ports": [7000], "Addresses": ["127.0.0.3"], "Targets": [b.target()]},
        ]});
        let p = start(Mode::Simple, &config, &[]);
        let mark = p.mark();
        p.signal(libc::SIGUSR2);
        let line = p.wait_log_since(mark, "upgrade: pid N is serving", |l| {
            l.contains(" is serving; this process stops accepting") || l.contains("upgrade failed")
        });
        let new_pid: u32 = line
            .split("upgrade: pid ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        let _successor = netns::Stray(new_pid);
        p.wait_log_since(mark, "3 listeners taken over", |l| {
            l.contains("upgrade: serving with 3 listeners taken over from the previous process")
        });
        assert_eq!(ask(sa("127.0.0.2", 7000)), "a");
        assert_eq!(ask(sa("::1", 7000)), "a");
        assert_eq!(ask(sa("127.0.0.3", 7000)), "b");
        expect_refused(sa("127.0.0.4", 7000));
    });
}

/// Simple mode listens only on local addresses: an app on an address this host does not have
/// stops the start with a message that says so (bpf mode steers whatever arrives instead).
#[test]
fn simple_mode_names_an_address_it_cannot_listen_on() {
    let dir = TempDir::new("nonlocal");
    let config = json!({"Apps": [
        {"Name": "a", "Ports": [7000], "Addresses": ["192.0.2.10"], "Targets": ["127.0.0.1:1"]},
    ]});
    let path = dir.write("c.json", &serde_json::to_string(&config).unwrap());
    let o = run(&["simple", "-c", path.to_str().unwrap()]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains(
            "cannot listen on port 7000 on 192.0.2.10: Cannot assign requested address (os error 99) \
             (the address is not on this host: simple mode listens only on local addresses; "
        ),
        "{}",
        o.stderr
    );
    // Issue 23: and what to do, with the exact sysctl for the address's family.
    assert!(
        o.stderr
            .contains("run `sysctl -w net.ipv4.ip_nonlocal_bind=1`")
            && o.stderr.contains("or use bpf mode"),
        "{}",
        o.stderr
    );
}

/// An app picked by server name still has its `MaxConnectionsPerClient`: counted once the name
/// is read, and logged with the app and the name.
#[test]
fn per_client_limit_of_an_app_picked_by_name() {
    netns::run("per_client_limit_of_an_app_picked_by_name", |_| {
        let (shop, other) = (Backend::tagged("shop"), Backend::tagged("other"));
        let config = json!({"Apps": [
            {"Name": "shop", "Ports": [8443], "Hostnames": ["shop.example.com"],
             "MaxConnectionsPerClient": 1, "Targets": [shop.target()]},
            {"Name": "other", "Ports": [8443], "Targets": [other.target()]},
        ]});
        let p = start(Mode::Simple, &config, &[]);
        let at = sa("127.0.0.1", 8443);
        let hello = client_hello(Some("shop.example.com"), 1000);
        let (tag, _held) = hello_reaches(at, &hello);
        assert_eq!(tag, "shop");
        let mark = p.mark();
        let mut s = connect(at);
        s.write_all(&hello).unwrap();
        expect_closed(&mut s, WAIT);
        let line = p.wait_log_since(mark, "end=client_limit", |l| {
            l.contains(" end=client_limit")
        });
        assert_eq!(field(&line, "app").as_deref(), Some("shop"), "{line}");
        assert_eq!(
            field(&line, "sni").as_deref(),
            Some("shop.example.com"),
            "{line}"
        );
        // The other app on the same port is not limited for this client.
        let (tag, _) = hello_reaches(at, &client_hello(Some("x.example"), 1000));
        assert_eq!(tag, "other");
    });
}
