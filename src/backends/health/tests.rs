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
