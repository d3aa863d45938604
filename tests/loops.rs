//! Forwarding loops: a target that is the proxy's own frontend is refused by `check`, at the
//! start and at every reload, naming it; a name that resolves to the proxy only at connect time
//! ends that connection with `reason=loop`, once, while other apps are served (issue 11, item 6).

mod common;
mod modes;
#[allow(dead_code)]
mod netns;

use common::{
    app, assert_serves_then_stops, config, connect, expect_closed, refused_start, run, serving,
    tag_of, Backend, Proxy, TempDir, WAIT,
};
use modes::Env;

/// Issue 11, item 6: `check`, the start and every reload refuse a target that is the proxy's
/// own frontend, naming it; the running config keeps serving.
#[test]
fn a_target_on_the_proxys_own_frontend_is_refused() {
    let backend = Backend::echo();
    let dir = TempDir::new("loop");
    for target in ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "127.0.0.2"] {
        let cfg = dir.write(
            "loop.json",
            &config(&[app(
                "web",
                &[7001, 7002],
                &[backend.target(), format!("{target}:7002")],
            )]),
        );
        let out = run(&["check", "-c", cfg.to_str().unwrap()]);
        assert_eq!(out.code, Some(1), "{target}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!(
                "app \"web\": Targets: \"{target}:7002\" is this proxy's own frontend"
            )),
            "{}",
            out.stderr
        );
    }
    // A local address on a port that is not a frontend is fine.
    let cfg = dir.write(
        "ok.json",
        &config(&[app("web", &[7001], &["127.0.0.1:7002".into()])]),
    );
    assert_eq!(run(&["check", "-c", cfg.to_str().unwrap()]).code, Some(0));

    let port = common::free_port();
    let mut p = Proxy::simple()
        .config(&config(&[app(
            "web",
            &[port],
            &[format!("localhost:{port}")],
        )]))
        .spawn();
    let (code, log) = refused_start(&mut p);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "\"localhost:{port}\" is this proxy's own frontend"
        )),
        "{log}"
    );

    let p = serving(&["--reload-interval", "50ms"], &backend);
    let port = p.ports[0];
    let mark = p.mark();
    p.rewrite_config(&config(&[app(
        "echo",
        &[port],
        &[format!("127.0.0.1:{port}")],
    )]));
    p.wait_reload_rejected_for(
        mark,
        &format!("\"127.0.0.1:{port}\" is this proxy's own frontend"),
    );
    assert_serves_then_stops(p);
}

/// This host's name, resolved: a name (not `localhost`) that the config check cannot know is
/// local, as a DNS name that later points at the proxy would be.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    assert_eq!(
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) },
        0
    );
    let name =
        String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap()]).into_owned();
    let local = std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), 0))
        .map(|mut a| a.any(|a| std::net::UdpSocket::bind((a.ip(), 0)).is_ok()))
        .unwrap_or(false);
    assert!(
        local,
        "this test needs the host name {name:?} to resolve to a local address"
    );
    name
}

two_modes!(
    /// Issue 11, item 6, both modes: a reload naming a local address on one of the proxy's
    /// ports is refused (the running config serves on), and a name that resolves to the proxy
    /// only at connect time ends that connection as `connect_failed` with `reason=loop`, once
    /// (no cascade), while the other app is served.
    loops_are_refused_at_reload_and_cut_at_run_time,
    |env: Env| {
        let host = local_hostname();
        let beta = Backend::tagged("beta");
        let ports = env.ports(2);
        let cfg = |alpha_target: String| {
            config(&[
                app("alpha", &ports[..1], &[alpha_target]),
                app("beta", &ports[1..], &[beta.target()]),
            ])
        };
        let mut p = env.proxy().config_on(&ports, &cfg(beta.target())).args(&["--reload-interval", "100ms"]).start();

        let mark = p.mark();
        let own = format!("127.0.0.1:{}", ports[1]);
        p.rewrite_config(&cfg(own.clone()));
        p.wait_reload_rejected_for(mark, &format!("\"{own}\" is this proxy's own frontend"));
        p.wait_reload_kept(mark);
        assert_eq!(tag_of(p.v4(0)), "beta", "the running config serves on");

        let mark = p.mark();
        p.rewrite_config(&cfg(format!("{host}:{}", ports[1])));
        p.wait_reload_ok(mark);
        let mut s = connect(p.v4(0));
        expect_closed(&mut s, WAIT);
        let line = p.wait_conn(s.local_addr().unwrap());
        assert_eq!(line.end, "connect_failed", "{}", line.line);
        assert_eq!(line.reason.as_deref(), Some("loop"), "{}", line.line);
        assert_eq!(line.target, format!("{host}:{}", ports[1]));
        assert_eq!(tag_of(p.v4(1)), "beta");
        // Cut at the first hop: one loop line, and beta saw no connection from the proxy itself.
        let conns = p.conns();
        let loops = conns.iter().filter(|c| c.reason.as_deref() == Some("loop")).count();
        assert_eq!(loops, 1, "{}", p.logs().join("\n"));
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait_exit(WAIT).code(), Some(0));
    }
);
