//! Who gets a connection, and what survives a reload.

use super::*;
use crate::config::{Config, Diff};
use std::path::Path;
use std::time::Duration;

/// Longest prefix first, then exact name, then wildcard, then the default.
#[test]
fn who_gets_a_connection() {
    let c = Config::parse(
        Path::new("x"),
        br#"{"Apps":[
          {"Name":"wild","Ports":[443],"Hostnames":["*.example.com"],"Targets":["h:1"]},
          {"Name":"exact","Ports":[443],"Hostnames":["www.example.com"],"Targets":["h:1"]},
          {"Name":"dflt","Ports":[443],"Targets":["h:1"]},
          {"Name":"net","Ports":[443],"Addresses":["10.0.0.0/8"],"Targets":["h:1"]},
          {"Name":"host","Ports":[443],"Addresses":["10.1.2.3","fd00::1"],"Hostnames":["www.example.com"],"Targets":["h:1"]}]}"#,
    )
    .unwrap();
    let r = Routes::new(&c, None);
    let at = |a: &str| r.lookup(a.parse().unwrap()).unwrap();
    let name = |b: &Binding, n: &str| b.for_name(n).map(|a| a.name().to_owned());
    let any = at("127.0.0.1:443");
    assert!(any.needs_server_name());
    assert_eq!(name(any, "www.example.com").as_deref(), Ok("exact"));
    assert_eq!(name(any, "api.example.com").as_deref(), Ok("wild"));
    assert_eq!(name(any, "a.b.example.com").as_deref(), Ok("dflt"));
    assert_eq!(name(any, "example.com").as_deref(), Ok("dflt"));
    assert_eq!(any.group(), "dflt+exact+wild");
    let net = at("10.9.9.9:443");
    assert!(!net.needs_server_name());
    assert_eq!(net.default_app().unwrap().name(), "net");
    let host = at("10.1.2.3:443");
    assert_eq!(name(host, "www.example.com").as_deref(), Ok("host"));
    assert_eq!(
        name(host, "api.example.com"),
        Err(Unrouted::UnknownServerName),
        "no fallback to a shorter prefix"
    );
    assert_eq!(
        host.without_name(Unrouted::NotTls)
            .map(|a| a.name().to_owned()),
        Err(Unrouted::NotTls)
    );
    assert_eq!(at("[fd00::1]:443").group(), "host");
    assert_eq!(at("[::ffff:10.1.2.3]:443").group(), "host");
    assert!(r.lookup("127.0.0.1:80".parse().unwrap()).is_none());
}

/// Many apps of an address each, beside nested prefixes: each address finds its own app,
/// a covered address the longest prefix, IPv6 apart from IPv4.
#[test]
fn longest_prefix_by_hash_among_many() {
    let mut apps: Vec<String> = (0..500)
        .map(|i| {
            format!(
                r#"{{"Name":"h{i}","Ports":[443],"Addresses":["10.1.{}.{}","fd00::{i:x}"],"Targets":["h:1"]}}"#,
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    for (name, addr) in [
        ("n8", "10.0.0.0/8"),
        ("n16", "10.1.0.0/16"),
        ("n24", "10.1.1.0/24"),
        ("v6", "fd00::/64"),
    ] {
        apps.push(format!(
            r#"{{"Name":"{name}","Ports":[443],"Addresses":["{addr}"],"Targets":["h:1"]}}"#
        ));
    }
    let json = format!(r#"{{"Apps":[{}]}}"#, apps.join(","));
    let r = Routes::new(
        &Config::parse(Path::new("x"), json.as_bytes()).unwrap(),
        None,
    );
    let app = |a: &str| {
        r.lookup(a.parse().unwrap())
            .map(|b| b.default_app().unwrap().name().to_owned())
    };
    assert_eq!(app("10.1.0.1:443").as_deref(), Some("h0"));
    assert_eq!(app("10.1.1.250:443").as_deref(), Some("h499"));
    assert_eq!(app("[fd00::1f3]:443").as_deref(), Some("h499"));
    assert_eq!(app("10.1.1.251:443").as_deref(), Some("n24"));
    assert_eq!(app("10.1.2.1:443").as_deref(), Some("n16"));
    assert_eq!(app("10.200.0.1:443").as_deref(), Some("n8"));
    assert_eq!(app("[::ffff:10.1.0.1]:443").as_deref(), Some("h0"));
    assert_eq!(app("[fd00::1:0:0:1]:443").as_deref(), Some("v6"));
    assert_eq!(app("11.0.0.1:443"), None);
    assert_eq!(app("[fd01::1]:443"), None);
}

/// Where every app picked by name has MaxConnectionsPerClient, the largest is counted at
/// accept, kept across a reload; not where one app has none, nor where no name is read.
#[test]
fn per_client_counts_at_accept_where_every_app_has_a_limit() {
    let parse = |json: &str| Config::parse(Path::new("x"), json.as_bytes()).unwrap();
    let c1 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[443],"Hostnames":["a.example"],"Targets":["h:1"],"MaxConnectionsPerClient":2},
          {"Name":"b","Ports":[443],"Hostnames":["b.example"],"Targets":["h:1"],"MaxConnectionsPerClient":5},
          {"Name":"c","Ports":[444],"Hostnames":["c.example"],"Targets":["h:1"],"MaxConnectionsPerClient":5},
          {"Name":"d","Ports":[444],"Targets":["h:1"]},
          {"Name":"e","Ports":[445],"Targets":["h:1"],"MaxConnectionsPerClient":5}]}"#,
    );
    let r1 = Routes::new(&c1, None);
    let at = |r: &Routes, a: &str| r.lookup(a.parse().unwrap()).unwrap().per_client.clone();
    let counts = at(&r1, "127.0.0.1:443").expect("every app has a limit");
    assert_eq!(counts.limit(), 5, "the largest");
    assert!(at(&r1, "127.0.0.1:444").is_none(), "d has no limit");
    assert!(
        at(&r1, "127.0.0.1:445").is_none(),
        "the app is known at accept"
    );
    let c2 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[443],"Hostnames":["a.example"],"Targets":["h:1"],"MaxConnectionsPerClient":7},
          {"Name":"b","Ports":[443],"Hostnames":["b.example"],"Targets":["h:1"],"MaxConnectionsPerClient":5}]}"#,
    );
    let r2 = Routes::new(&c2, Some(&r1));
    let kept = at(&r2, "127.0.0.1:443").unwrap();
    assert!(
        Arc::ptr_eq(&counts, &kept),
        "connections open across a reload still count"
    );
    assert_eq!(kept.limit(), 7);
}

#[test]
fn state_survives_a_reload() {
    let c1 = Config::parse(
        Path::new("x"),
        br#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1","h:2"],"MaxConnections":1}]}"#,
    )
    .unwrap();
    let c2 = Config::parse(
        Path::new("x"),
        br#"{"Apps":[{"Name":"a","Ports":[2],"Targets":["h:2","h:3"],"MaxConnections":1},
                     {"Name":"b","Ports":[3],"Targets":["h:2"]}]}"#,
    )
    .unwrap();
    let r1 = Routes::new(&c1, None);
    let r2 = Routes::new(&c2, Some(&r1));
    let kept = &r1.app_for(1).unwrap().backends[1];
    assert!(Arc::ptr_eq(kept, &r2.app_for(2).unwrap().backends[0]));
    // Another app naming the same target has its own state.
    assert!(!Arc::ptr_eq(kept, &r2.app_for(3).unwrap().backends[0]));
    assert!(r2.app_for(1).is_none());
    // A slot taken before the reload still counts after it.
    let held = r1
        .app_for(1)
        .unwrap()
        .limit
        .as_ref()
        .unwrap()
        .acquire(Duration::ZERO, || false);
    assert!(held.is_ok());
    let l2 = r2.app_for(2).unwrap().limit.as_ref().unwrap();
    assert!(l2.acquire(Duration::from_millis(10), || false).is_err());
    drop(held);
    assert!(l2.acquire(Duration::ZERO, || false).is_ok());
}

/// An update gives the same routing as a table built whole, keeps the routes of unchanged
/// apps (the same Arcs) and state of changed ones, and drops what left.
#[test]
fn an_update_routes_as_a_whole_build_and_keeps_unchanged_routes() {
    let parse = |json: &str| Config::parse(Path::new("x"), json.as_bytes()).unwrap();
    let c1 = parse(
        r#"{"Apps":[
          {"Name":"keep","Ports":[443,8000,8001],"Targets":["h:1"]},
          {"Name":"host","Ports":[443],"Hostnames":["a.example"],"Targets":["h:1"],"MaxConnectionsPerClient":3},
          {"Name":"net","Ports":[443,80],"Addresses":["10.0.0.0/8"],"Targets":["h:1","h:2"]},
          {"Name":"gone","Ports":[80,9000],"Addresses":["10.1.2.3"],"Targets":["h:1"]},
          {"Name":"moves","Ports":[7000],"Targets":["h:9"]}]}"#,
    );
    let c2 = parse(
        r#"{"Apps":[
          {"Name":"keep","Ports":[443,8000,8001],"Targets":["h:1"]},
          {"Name":"host","Ports":[443],"Hostnames":["b.example"],"Targets":["h:1"],"MaxConnectionsPerClient":3},
          {"Name":"net","Ports":[443,80],"Addresses":["10.0.0.0/8"],"Targets":["h:2","h:3"]},
          {"Name":"new","Ports":[80],"Addresses":["10.1.0.0/16","fd00::/8"],"Targets":["h:1"]},
          {"Name":"moves","Ports":[7001],"Targets":["h:9"]}]}"#,
    );
    let r1 = Routes::new(&c1, None);
    let diff = Diff::between(&c1, &c2);
    let up = r1.update(&c2, &diff);
    let whole = Routes::new(&c2, Some(&r1));
    let pick = |r: &Routes, at: &str, name: &str| {
        r.lookup(at.parse().unwrap()).map(|b| {
            let app = if name.is_empty() {
                b.without_name(Unrouted::NotTls)
            } else {
                b.for_name(name)
            };
            (b.group().to_owned(), app.map(|a| a.name().to_owned()).ok())
        })
    };
    for at in [
        "127.0.0.1:443",
        "10.1.2.3:443",
        "10.1.2.3:80",
        "10.9.9.9:80",
        "[fd00::1]:80",
        "127.0.0.1:80",
        "127.0.0.1:8000",
        "127.0.0.1:8001",
        "127.0.0.1:9000",
        "127.0.0.1:7000",
        "127.0.0.1:7001",
    ] {
        for name in ["", "a.example", "b.example"] {
            assert_eq!(pick(&up, at, name), pick(&whole, at, name), "{at} {name}");
        }
    }
    assert_eq!(
        pick(&up, "10.1.2.3:80", "").unwrap().1.as_deref(),
        Some("new")
    );
    assert!(up.port(9000).is_none() && up.port(7000).is_none());
    let names: Vec<&str> = up.apps().iter().map(|(a, _)| a.name()).collect();
    assert_eq!(names, ["keep", "host", "net", "new", "moves"]);
    // Unchanged: the very route; changed: a new route with the old state.
    assert!(Arc::ptr_eq(r1.apps()[0].0, up.apps()[0].0));
    let (old_net, new_net) = (r1.route("net").unwrap(), up.route("net").unwrap());
    assert!(Arc::ptr_eq(&old_net.stats, &new_net.stats));
    assert!(
        Arc::ptr_eq(&old_net.backends[1], &new_net.backends[0]),
        "h:2 kept"
    );
    assert!(Arc::ptr_eq(
        r1.route("host").unwrap().per_client.as_ref().unwrap(),
        up.route("host").unwrap().per_client.as_ref().unwrap()
    ));
    // The binding of 443 on every address has the same apps: its counts at accept are kept.
    let counts = |r: &Routes| {
        r.lookup("127.0.0.1:443".parse().unwrap())
            .unwrap()
            .per_client
            .clone()
    };
    assert!(counts(&r1).is_none(), "keep has no MaxConnectionsPerClient");
    assert_eq!(up.backends().len(), 6);
}

/// The frontends a target is checked against are the table in force's: a new table's once it
/// is in force (a pair two apps share stays while one is left, a port with none left goes),
/// and the table before's until then.
#[test]
fn the_frontends_are_the_table_in_forces() {
    let parse = |json: &str| Config::parse(Path::new("x"), json.as_bytes()).unwrap();
    let c1 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[7001],"Addresses":["127.0.0.2/32"],"Targets":["192.0.2.1:1"]},
          {"Name":"b","Ports":[7001],"Addresses":["127.0.0.2/32"],"Hostnames":["b.example"],"Targets":["192.0.2.1:1"]},
          {"Name":"c","Ports":[7002],"Addresses":["127.0.0.3/32"],"Targets":["192.0.2.1:1"]}]}"#,
    );
    // b and c go; d comes on 7003 on every IPv4 address.
    let c2 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[7001],"Addresses":["127.0.0.2/32"],"Targets":["192.0.2.1:1"]},
          {"Name":"d","Ports":[7003],"Addresses":["0.0.0.0/0"],"Targets":["192.0.2.1:1"]}]}"#,
    );
    let is_own = |r: &Routes, at: &str| r.route("a").unwrap().own.is_own(at.parse().unwrap());
    let r1 = Routes::new(&c1, None);
    assert!(is_own(&r1, "127.0.0.2:7001") && is_own(&r1, "127.0.0.3:7002"));
    let next = r1.update(&c2, &Diff::between(&c1, &c2));
    // Not in force yet: the frontends before are as they were.
    assert!(is_own(&next, "127.0.0.3:7002"));
    assert!(!is_own(&next, "127.0.0.9:7003"));
    next.in_force();
    assert!(is_own(&next, "127.0.0.2:7001"));
    assert!(!is_own(&next, "127.0.0.3:7002"));
    assert!(is_own(&next, "127.0.0.9:7003"));
    assert!(next.port(7002).is_none());
    // The table before is as it was, should it be in force again.
    r1.in_force();
    assert!(is_own(&r1, "127.0.0.3:7002"));
    assert!(!is_own(&r1, "127.0.0.9:7003"));
}

/// An app alone where it answers, without Hostnames, has one binding on all its ports and
/// prefixes, in a table built whole and in one an update made; an app sharing an address
/// gets a binding of its own there.
#[test]
fn an_app_alone_has_one_binding_everywhere() {
    let parse = |json: &str| Config::parse(Path::new("x"), json.as_bytes()).unwrap();
    let c1 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[443,80],"Addresses":["10.0.0.1/32","fd00::1/128"],"Targets":["h:1"]},
          {"Name":"b","Ports":[443],"Addresses":["10.0.0.2/32"],"Targets":["h:1"]},
          {"Name":"c","Ports":[443],"Addresses":["10.0.0.2/32"],"Hostnames":["c.example"],"Targets":["h:1"]}]}"#,
    );
    let c2 = parse(
        r#"{"Apps":[
          {"Name":"a","Ports":[443,80,8080],"Addresses":["10.0.0.1/32","fd00::1/128"],"Targets":["h:1"]},
          {"Name":"b","Ports":[443],"Addresses":["10.0.0.2/32"],"Targets":["h:1"]},
          {"Name":"c","Ports":[443],"Addresses":["10.0.0.2/32"],"Hostnames":["c.example"],"Targets":["h:1"]}]}"#,
    );
    let r1 = Routes::new(&c1, None);
    let r2 = r1.update(&c2, &Diff::between(&c1, &c2));
    for (r, ports) in [(&r1, &[443, 80][..]), (&r2, &[443, 80, 8080][..])] {
        let at = |s: &str| r.lookup(s.parse().unwrap()).unwrap();
        let first = at("10.0.0.1:443");
        for &port in ports {
            assert!(Arc::ptr_eq(first, at(&format!("10.0.0.1:{port}"))));
            assert!(Arc::ptr_eq(first, at(&format!("[fd00::1]:{port}"))));
        }
        assert_eq!(first.default_app().unwrap().name(), "a");
        let shared = at("10.0.0.2:443");
        assert!(shared.needs_server_name() && shared.group() == "b+c");
    }
}
