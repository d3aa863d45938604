//! The checker on real sockets: a target in maintenance is not checked, and its checks resume
//! when it is ready again.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::backends::resolver::Resolver;
use crate::config::{parse_target, HealthCheck};

/// A listener on 127.0.0.1 counting the connections it accepts (the checks).
fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&n);
    // Detached: it ends with the test's process.
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                seen.fetch_add(1, Ordering::AcqRel);
            }
        }
    });
    (addr, n)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn maintenance_stops_the_checks_and_ready_resumes_them() {
    let check = HealthCheck {
        interval: Duration::from_millis(100),
        ..HealthCheck::default()
    };
    let (ready_addr, ready_seen) = counting_listener();
    let (maint_addr, maint_seen) = counting_listener();
    let ready = Arc::new(Backend::new(
        "a",
        parse_target(&ready_addr).unwrap(),
        check.clone(),
    ));
    let maint = Arc::new(Backend::new("a", parse_target(&maint_addr).unwrap(), check));
    maint.set_state(TargetState::Maint);
    // Down, so that both would be checked every interval.
    for b in [&ready, &maint] {
        b.connect_failed(&ConnectError::Refused);
    }
    let checker = Checker::start(Resolver::new(Duration::from_secs(10))).unwrap();
    checker.set(vec![Arc::clone(&ready), Arc::clone(&maint)]);

    wait_until("three checks of the ready target", || {
        ready_seen.load(Ordering::Acquire) >= 3
    });
    assert_eq!(
        maint_seen.load(Ordering::Acquire),
        0,
        "a target in maint was checked"
    );
    assert!(!maint.is_up(), "no check, no verdict");

    maint.set_state(TargetState::Ready);
    wait_until("the checks resumed", || {
        maint_seen.load(Ordering::Acquire) >= 1
    });
    wait_until("its check's verdict", || maint.is_up());
}

/// A reload's change leaves the checker with what the whole new list would: the removed
/// backends gone (a target with none left too), the added ones grouped by target, and a kept
/// backend's last check kept.
#[test]
fn a_change_checks_what_the_whole_list_would() {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
    let mut run = Run::new(poll, Resolver::new(Duration::from_secs(10)), waker);
    let backend = |app: &str, t: &str| {
        Arc::new(Backend::new(
            app,
            parse_target(t).unwrap(),
            HealthCheck::default(),
        ))
    };
    let (a, b, c) = (
        backend("a", "192.0.2.1:80"),
        backend("b", "192.0.2.1:80"),
        backend("c", "192.0.2.2:80"),
    );
    run.follow(follow::Update::Set(vec![a.clone(), b.clone(), c.clone()]));
    let checked_a = Instant::now() - Duration::from_secs(5);
    run.set_last(&a, checked_a);
    // a is changed (kept), c removed, d added on a new target.
    let d = backend("d", "192.0.2.3:80");
    run.follow(follow::Update::Change {
        added: vec![a.clone(), d.clone()],
        removed: vec![a.clone(), c.clone()],
    });
    let mut lists: Vec<(String, usize)> = run
        .targets
        .iter()
        .map(|(p, l)| (p.target.to_string(), l.len()))
        .collect();
    lists.sort();
    assert_eq!(
        lists,
        [
            ("192.0.2.1:80".to_owned(), 2),
            ("192.0.2.3:80".to_owned(), 1)
        ]
    );
    assert_eq!(run.last_of(&a), Some(checked_a));
    assert!(run.last_of(&c).is_none());
}

/// When a target shared by many apps is due stays known across a reload that changes one of
/// them (no pass over the others), and is what a pass over them would find.
#[test]
fn a_change_keeps_when_a_shared_target_is_due() {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
    let mut run = Run::new(poll, Resolver::new(Duration::from_secs(10)), waker);
    let backend = |app: &str| {
        Arc::new(Backend::new(
            app,
            parse_target("192.0.2.1:80").unwrap(),
            HealthCheck::default(),
        ))
    };
    let all: Vec<Arc<Backend>> = (0..100).map(|i| backend(&format!("app{i}"))).collect();
    run.follow(follow::Update::Set(all.clone()));
    let now = Instant::now();
    run.scan(now);
    let probe = Probe::of(&all[0]);
    let whole = |run: &Run| Due::of(&run.targets[&probe], 0);
    let before = run.due_at[&probe];
    // app0 changed, keeping its backend; app1 removed; app100 added.
    let new = backend("app100");
    run.follow(follow::Update::Change {
        added: vec![all[0].clone(), new.clone()],
        removed: vec![all[0].clone(), all[1].clone()],
    });
    let kept = run.due_at.get(&probe).copied();
    let kept = kept.expect("still known after a change of a few of its backends");
    assert_eq!(kept.at, before.at);
    assert_eq!(
        (kept.at, kept.shortest),
        (whole(&run).at, whole(&run).shortest)
    );
    // Every backend giving the earliest time leaves: only a pass can say.
    let rest: Vec<Arc<Backend>> = all[2..].to_vec();
    run.follow(follow::Update::Change {
        added: Vec::new(),
        removed: rest,
    });
    if let Some(d) = run.due_at.get(&probe) {
        assert_eq!((d.at, d.shortest), (whole(&run).at, whole(&run).shortest));
    }
}
