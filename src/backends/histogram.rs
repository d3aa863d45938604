//! A latency histogram cheap enough for every connection: fixed buckets, each an `AtomicU64`,
//! counted into with one relaxed add (no lock, no allocation), read whole only by a scrape.
//!
//! The bounds go from half a millisecond (a connect on the same host) to 30 s (past any sane
//! connect timeout; a connection's whole life beyond it lands in `+Inf` and still counts in the
//! sum), roughly 1-2.5-5 per decade, as Prometheus client libraries' defaults do.
//!
//! The buckets are allocated at the first observation: an edge holds hundreds of thousands of
//! apps, two histograms each, and most apps see few connections (the buckets are 136 bytes a
//! histogram; an unused one costs a pointer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the `le` label); `+Inf` follows them.
pub const BOUNDS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Observations per bucket (not cumulative: each lands in one), the last being `+Inf`, and
/// their sum in microseconds.
#[derive(Debug, Default)]
pub struct Histogram(OnceLock<Box<Buckets>>);

#[derive(Debug, Default)]
struct Buckets {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram as read at one moment, cumulative as the exposition format wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Observations at or under each of `BOUNDS`, then all of them (`+Inf`, the count).
    pub cumulative: [u64; BOUNDS.len() + 1],
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let h = self.0.get_or_init(Box::default);
        let secs = d.as_secs_f64();
        let i = BOUNDS.partition_point(|&b| b < secs);
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        h.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts `other`'s observations into this one too, bucket by bucket: how a sum over
    /// many histograms (every app's, in /metrics past `--metrics-app-series`) is built.
    /// An unused `other` adds nothing (and allocates nothing here).
    pub fn add(&self, other: &Histogram) {
        let Some(theirs) = other.0.get() else {
            return;
        };
        let mine = self.0.get_or_init(Box::default);
        for (m, t) in mine.buckets.iter().zip(&theirs.buckets) {
            m.fetch_add(t.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let micros = theirs.sum_micros.load(Ordering::Relaxed);
        mine.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The buckets read one by one (an observation landing meanwhile may be in the sum and
    /// not the buckets, or the reverse: the next scrape has it); the count is their total, so
    /// that `+Inf` and `_count` always agree.
    pub fn snapshot(&self) -> Snapshot {
        let mut cumulative = [0; BOUNDS.len() + 1];
        let Some(h) = self.0.get() else {
            return Snapshot {
                cumulative,
                sum_seconds: 0.0,
            };
        };
        let mut total = 0;
        for (c, b) in cumulative.iter_mut().zip(&h.buckets) {
            total += b.load(Ordering::Relaxed);
            *c = total;
        }
        Snapshot {
            cumulative,
            sum_seconds: h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_histogram_reads_as_zero() {
        let s = Histogram::default().snapshot();
        assert_eq!(s.cumulative, [0; BOUNDS.len() + 1]);
        assert_eq!(s.sum_seconds, 0.0);
    }

    #[test]
    fn each_observation_lands_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // exactly on a bound: le="0.0005"
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[2], 1, "2.5 ms holds only the first");
        assert_eq!(s.cumulative[3], 2, "5 ms holds the 3 ms one");
        assert_eq!(s.cumulative[BOUNDS.len() - 1], 2, "30 s");
        assert_eq!(s.cumulative[BOUNDS.len()], 3, "+Inf is the count");
        assert!((s.sum_seconds - 60.0035).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn a_sum_of_histograms_has_every_observation_of_each() {
        let (a, b, sum) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        a.observe(Duration::from_millis(3));
        b.observe(Duration::from_millis(3));
        b.observe(Duration::from_secs(2));
        sum.add(&a);
        sum.add(&b);
        let s = sum.snapshot();
        assert_eq!(s.cumulative[3], 2, "5 ms holds both 3 ms ones");
        assert_eq!(s.cumulative[BOUNDS.len()], 3);
        assert!((s.sum_seconds - 2.006).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
