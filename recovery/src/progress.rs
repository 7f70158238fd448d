//! Progress of a recovery copy as status shows it: bytes done and total,
//! fraction, rate and ETA. The replica reports (done, total) now and then;
//! the meter turns that into numbers that never go backwards (a replica
//! that restarts mid-copy may report less done than before, having lost
//! what it copied since it last persisted its progress) and end at 100%.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The rate is an exponentially weighted average over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// What status shows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    /// Bytes copied (the highest reported).
    pub done_bytes: u64,
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// In [0, 1]; never decreases; 1 once finished.
    pub fraction: f64,
    /// Recent copy rate, bytes/s.
    pub rate_bytes_per_s: u64,
    /// Seconds left at that rate (None until there is a rate).
    pub eta_s: Option<u64>,
}

/// Tracks one copy's progress reports.
#[derive(Debug, Clone)]
pub struct Meter {
    done: u64,
    total: u64,
    fraction: f64,
    rate: f64,
    /// The last report: when, and the done bytes it said.
    last: Option<(Instant, u64)>,
    finished: bool,
}

impl Default for Meter {
    fn default() -> Meter {
        Meter::new()
    }
}

impl Meter {
    /// A meter at 0%.
    pub fn new() -> Meter {
        Meter { done: 0, total: 0, fraction: 0.0, rate: 0.0, last: None, finished: false }
    }

    /// A report from the replica at `now`.
    pub fn update(&mut self, done: u64, total: u64, now: Instant) {
        if self.finished {
            return;
        }
        match self.last {
            Some((t, prev)) if done >= prev => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    let inst = (done - prev) as f64 / dt;
                    let w = (dt / RATE_WINDOW.as_secs_f64()).min(1.0);
                    self.rate = if self.rate == 0.0 { inst } else { self.rate + w * (inst - self.rate) };
                }
            }
            // Less than before: the replica restarted and lost some of its
            // progress. Measure the rate from here on.
            _ => {}
        }
        self.last = Some((now, done));
        self.done = self.done.max(done);
        self.total = total.max(self.done);
        if self.total > 0 {
            self.fraction = self.fraction.max(self.done as f64 / self.total as f64).min(1.0);
        }
    }

    /// The copy is complete: 100%.
    pub fn finish(&mut self) {
        self.finished = true;
        self.total = self.total.max(self.done);
        self.done = self.total;
        self.fraction = 1.0;
    }

    /// What status shows now.
    pub fn view(&self) -> ProgressView {
        let left = self.total.saturating_sub(self.done);
        let eta_s = (self.rate >= 1.0).then(|| (left as f64 / self.rate).ceil() as u64);
        ProgressView {
            done_bytes: self.done,
            total_bytes: self.total,
            fraction: self.fraction,
            rate_bytes_per_s: self.rate as u64,
            eta_s: if self.finished { Some(0) } else { eta_s },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rate_and_eta() {
        let t0 = Instant::now();
        let mut m = Meter::new();
        m.update(0, 100 << 20, t0);
        m.update(10 << 20, 100 << 20, t0 + Duration::from_secs(1));
        let v = m.view();
        assert_eq!(v.rate_bytes_per_s, 10 << 20);
        assert_eq!(v.eta_s, Some(9));
        assert!((v.fraction - 0.1).abs() < 1e-9);
        m.finish();
        assert_eq!(m.view().fraction, 1.0);
        assert_eq!(m.view().done_bytes, 100 << 20);
    }

    proptest! {
        /// Whatever the replica reports (restarts included), the fraction
        /// and the done bytes never go down, stay in range, and end at 1.
        #[test]
        fn never_backwards(reports in proptest::collection::vec((0u64..1000, 0u64..1000, 0u64..2000), 1..40)) {
            let t0 = Instant::now();
            let mut m = Meter::new();
            let mut prev = m.view();
            for (done, total, ms) in reports {
                m.update(done, total, t0 + Duration::from_millis(ms));
                let v = m.view();
                prop_assert!(v.fraction >= prev.fraction && v.fraction <= 1.0);
                prop_assert!(v.done_bytes >= prev.done_bytes && v.done_bytes <= v.total_bytes);
                prev = v;
            }
            m.finish();
            prop_assert_eq!(m.view().fraction, 1.0);
        }
    }
}
