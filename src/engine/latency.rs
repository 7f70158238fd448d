//! I/O latency histograms of the engine: the time from `Volume::submit` to
//! the completion, per request kind.
//!
//! Buckets are log-linear: one per µs below 16 µs, then eight per power of
//! two, so a bucket is at most 12.5 % wide. That is fine enough for the
//! recovery rate controller, which steers p99 within +20 % of a baseline,
//! and the powers of two are exact bucket edges, which the Prometheus
//! exposition uses as its `le` bounds. Recording is one relaxed atomic add
//! per counter: no lock on the I/O path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Linear buckets below this many µs.
const LINEAR_US: u64 = 16;
/// Buckets per power of two above [`LINEAR_US`].
const SUB_BUCKETS: usize = 8;
/// Powers of two covered above [`LINEAR_US`]: up to 2^35 µs (about 9.5 h).
const OCTAVES: usize = 31;
/// Number of buckets; the last one also takes everything larger.
pub const BUCKETS: usize = LINEAR_US as usize + OCTAVES * SUB_BUCKETS;

/// The bucket holding `us`.
fn bucket_of(us: u64) -> usize {
    if us < LINEAR_US {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros() as usize; // >= 4
    let sub = ((us >> (msb - 3)) & 7) as usize;
    (LINEAR_US as usize + (msb - 4) * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

/// The smallest µs value bucket `i` holds.
pub fn bucket_lower_us(i: usize) -> u64 {
    if i < LINEAR_US as usize {
        return i as u64;
    }
    let (octave, sub) = ((i - LINEAR_US as usize) / SUB_BUCKETS, (i - LINEAR_US as usize) % SUB_BUCKETS);
    (8 + sub as u64) << (octave + 1)
}

/// One histogram, shared by the threads that complete requests.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_us: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Records one request submitted at `since`.
    pub fn record_since(&self, since: Instant) {
        self.record_us(since.elapsed().as_micros() as u64);
    }

    /// Records one request that took `us` microseconds.
    pub fn record_us(&self, us: u64) {
        self.counts[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Counts of a [`Histogram`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Requests per bucket (see [`bucket_lower_us`]).
    pub counts: Vec<u64>,
    /// Sum of all recorded latencies.
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().zip(&earlier.counts).map(|(a, b)| a.saturating_sub(*b)).collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }

    /// The `q` quantile (0 < q <= 1) in µs: the upper edge of the bucket
    /// that holds it, so it never understates. `None` when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_lower_us(i + 1).max(1) - 1);
            }
        }
        unreachable!("rank <= count")
    }

    /// Cumulative counts at the powers of two from 16 µs up, as
    /// (upper bound in µs, requests at or below it): the `le` buckets of a
    /// Prometheus histogram. Each bound is an exact bucket edge.
    pub fn cumulative_at_powers_of_two(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(OCTAVES);
        let mut seen = 0;
        let mut next_edge = LINEAR_US as usize;
        for (i, c) in self.counts.iter().enumerate() {
            if i == next_edge {
                out.push((bucket_lower_us(i), seen));
                next_edge += SUB_BUCKETS;
            }
            seen += c;
        }
        out
    }
}

/// The engine's histograms, one per request kind.
#[derive(Debug, Default)]
pub struct Latency {
    /// Reads, submit to data returned.
    pub read: Histogram,
    /// Writes (data, discard, write-zeroes), submit to quorum completion.
    pub write: Histogram,
    /// Flushes, submit to every earlier write durable on Q replicas.
    pub flush: Histogram,
}

/// A snapshot of [`Latency`].
#[derive(Debug, Clone)]
pub struct LatencySnapshot {
    /// Reads.
    pub read: HistogramSnapshot,
    /// Writes.
    pub write: HistogramSnapshot,
    /// Flushes.
    pub flush: HistogramSnapshot,
}

impl Latency {
    /// Counts so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot { read: self.read.snapshot(), write: self.write.snapshot(), flush: self.flush.snapshot() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_at_most_an_eighth_wide() {
        for i in 0..BUCKETS - 1 {
            let (lo, hi) = (bucket_lower_us(i), bucket_lower_us(i + 1));
            assert!(hi > lo, "bucket {i}");
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi - 1), i);
            if lo >= LINEAR_US {
                assert!((hi - lo) * 8 <= lo, "bucket {i} [{lo}, {hi}) wider than 12.5 %");
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_never_understate_and_stay_within_a_bucket() {
        let h = Histogram::default();
        for us in 1..=1000 {
            h.record_us(us);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 1000);
        assert_eq!(s.sum_us, 500_500);
        for (q, exact) in [(0.5, 500), (0.99, 990), (1.0, 1000)] {
            let got = s.quantile_us(q).unwrap();
            assert!(got >= exact && got * 8 <= exact * 9 + 8, "q {q}: {got} vs {exact}");
        }
        assert_eq!(HistogramSnapshot { counts: vec![0; BUCKETS], sum_us: 0 }.quantile_us(0.99), None);
    }

    #[test]
    fn deltas_and_power_of_two_edges() {
        let h = Histogram::default();
        h.record_us(20);
        let before = h.snapshot();
        h.record_us(40);
        h.record_us(5000);
        let d = h.snapshot().since(&before);
        assert_eq!(d.count(), 2);
        let cum = d.cumulative_at_powers_of_two();
        assert_eq!(cum[0], (16, 0));
        assert_eq!(cum[1], (32, 0));
        assert_eq!(cum[2], (64, 1));
        assert_eq!(cum.iter().find(|(le, _)| *le == 8192).unwrap().1, 2);
    }
}
