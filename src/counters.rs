//! Lock-free counters and histograms that the proxy, the freeze engine and
//! the journal update where events happen, and that `crate::metrics` reads
//! at scrape time. A leaf module: it imports nothing of the crate, so any
//! part may count without depending on the metrics endpoint.
//!
//! `prometheus-client`'s `Histogram::observe` takes a mutex (its buckets,
//! sum and count sit behind one lock): on the request path every session
//! would contend for it. [`Histogram`] is fixed buckets of relaxed atomics
//! instead: an observation is a short search over the bounds and two
//! relaxed increments (its bucket and the sum; the count is the buckets'
//! total, computed at scrape). A scrape may see a bucket and the sum of a
//! concurrent observation out of step by that one observation, which
//! Prometheus tolerates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds of request latencies, in microseconds (100 µs to
/// 10 s, 1-2.5-5 steps); a last bucket (+Inf) holds the rest.
pub const LATENCY_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Bucket upper bounds of freeze-scale durations (drains, freezes, driver
/// steps, journal syncs), in microseconds: 1 ms to 4 h.
pub const PHASE_US: &[u64] = &[
    1_000,
    10_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
    14_400_000_000,
];

/// One more on a counter (relaxed).
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `n` more on a counter (relaxed).
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A counter's value.
#[inline]
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A histogram of durations over fixed buckets (see the module's text).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Per bucket (not cumulative); one more than `bounds` (+Inf).
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// What a histogram held at one moment, as Prometheus encodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations in that bucket alone); the
    /// last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (microseconds, increasing).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Latency buckets ([`LATENCY_US`]).
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_US)
    }

    /// Freeze-scale buckets ([`PHASE_US`]).
    pub fn phase() -> Histogram {
        Histogram::new(PHASE_US)
    }

    /// Records one observation: two relaxed increments.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let us = d.as_secs().saturating_mul(1_000_000) + u64::from(d.subsec_micros());
        // The first bound at or above the value (`le`), else +Inf; searched
        // from the small end, where most operations' latencies fall (a
        // compare or two instead of a binary search's four or five).
        let mut i = 0;
        while i < self.bounds.len() && self.bounds[i] < us {
            i += 1;
        }
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The buckets, sum and count now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.counts.len());
        let mut count = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let le = match self.bounds.get(i) {
                Some(&b) => b as f64 / 1e6,
                None => f64::INFINITY,
            };
            buckets.push((le, n));
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_le_bucket() {
        let h = Histogram::latency();
        h.observe(Duration::from_micros(100)); // le 0.0001 (inclusive)
        h.observe(Duration::from_micros(101)); // le 0.00025
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(11)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_US.len() + 1);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[1], (0.00025, 1));
        assert_eq!(s.buckets[5], (0.005, 1));
        assert_eq!(*s.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert!((s.sum - 11.003201).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn phase_buckets_reach_hours() {
        let h = Histogram::phase();
        h.observe(Duration::from_secs(3_000));
        let s = h.snapshot();
        let (le, n) = s.buckets.iter().copied().find(|b| b.1 > 0).unwrap();
        assert_eq!((le, n), (3600.0, 1));
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = std::sync::Arc::new(Histogram::latency());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros(i % 3_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.snapshot().count, 40_000);
    }
}
