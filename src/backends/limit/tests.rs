//! The queue of an app's waiters: bounded, first come first served, and no slot lost to a
//! waiter that left.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn limit(max: usize) -> Arc<AppLimit> {
    let l = Arc::new(AppLimit::default());
    l.set_max(max);
    l
}

/// A waker that counts its calls in `n`.
fn counting(n: &Arc<AtomicUsize>) -> Waker {
    let n = Arc::clone(n);
    Box::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
    })
}

fn wait(l: &Arc<AppLimit>, woken: &Arc<AtomicUsize>) -> LimitWait {
    match l.acquire_or_wait(counting(woken)) {
        Ok(Acquired::Wait(w)) => w,
        Ok(Acquired::Slot(_)) => panic!("a slot was free"),
        Err(e) => panic!("refused: {e:?}"),
    }
}

fn slot(l: &Arc<AppLimit>) -> LimitGuard {
    match l.acquire_or_wait(Box::new(|| ())) {
        Ok(Acquired::Slot(s)) => s,
        _ => panic!("no slot free"),
    }
}

#[test]
fn waiters_are_bounded_by_the_limit() {
    let limit = limit(1);
    let held = limit.acquire(Duration::ZERO, || false).unwrap();
    // One waiter may wait; a second is refused at once, however long it would wait.
    let l = Arc::clone(&limit);
    let waiter = std::thread::spawn(move || l.acquire(Duration::from_secs(30), || false));
    let until = Instant::now() + Duration::from_secs(20);
    while limit.lock().queue.is_empty() {
        assert!(Instant::now() < until, "the waiter never waited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let began = Instant::now();
    assert_eq!(
        limit.acquire(Duration::from_secs(30), || false).err(),
        Some(LimitDenied::QueueFull)
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    drop(held);
    assert!(waiter.join().unwrap().is_ok());
    assert!(limit.lock().queue.is_empty());
}

#[test]
fn a_released_slot_wakes_exactly_the_first_waiter() {
    let l = limit(2);
    let (a, b) = (slot(&l), slot(&l));
    let woken: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let waiters: Vec<LimitWait> = (0..2).map(|i| wait(&l, &woken[i])).collect();
    // A newcomer while others wait queues behind them (and here, the queue is full).
    assert!(matches!(
        l.acquire_or_wait(counting(&woken[2])),
        Err(LimitDenied::QueueFull)
    ));
    drop(a);
    assert_eq!(woken[0].load(Ordering::SeqCst), 1);
    assert_eq!(
        woken[1].load(Ordering::SeqCst),
        0,
        "only the first is woken"
    );
    assert!(waiters[1].try_take().is_none());
    let first = waiters[0]
        .try_take()
        .expect("the slot is the first waiter's");
    assert!(waiters[0].try_take().is_none(), "taken once");
    drop(b);
    assert_eq!(woken[1].load(Ordering::SeqCst), 1);
    let second = waiters[1].try_take().unwrap();
    drop((first, second, waiters));
    assert_eq!(l.lock().used, 0);
}

#[test]
fn a_slot_given_to_a_waiter_that_left_goes_on() {
    let l = limit(1);
    let held = slot(&l);
    let woken: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let first = wait(&l, &woken[0]);
    drop(held);
    // Given to the first, which leaves (timed out, say) before it took it: the next gets it.
    // The first is out of the queue once granted: the second may queue now.
    let second = wait(&l, &woken[1]);
    drop(first);
    assert_eq!(woken[1].load(Ordering::SeqCst), 1);
    let s = second.try_take().expect("the slot went on");
    drop(s);
    drop(second);
    let st = l.lock();
    assert_eq!((st.used, st.queue.len(), st.granted.len()), (0, 0, 0));
}

#[test]
fn a_waiter_that_left_is_out_of_the_queue() {
    let l = limit(1);
    let held = slot(&l);
    let woken: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let gone = wait(&l, &woken[0]);
    drop(gone);
    let next = wait(&l, &woken[1]);
    drop(held);
    assert_eq!(woken[0].load(Ordering::SeqCst), 0);
    assert!(next.try_take().is_some());
}

#[test]
fn a_lowered_limit_holds_slots_back_and_a_raised_one_lets_waiters_in() {
    let l = limit(2);
    let (a, b) = (slot(&l), slot(&l));
    let woken: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let w = wait(&l, &woken[0]);
    l.set_max(1);
    drop(a);
    assert_eq!(
        woken[0].load(Ordering::SeqCst),
        0,
        "one slot is still held, the limit"
    );
    l.set_max(3);
    assert_eq!(woken[0].load(Ordering::SeqCst), 1);
    assert!(w.try_take().is_some());
    drop(b);
}
