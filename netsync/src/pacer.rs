//! Token buckets: the sender's pacing and the nack rate limit.

use std::time::{Duration, Instant};

/// Per-datagram IP and UDP header bytes are counted against the rate so
/// the configured rate is what the wire carries.
const IP_UDP_OVERHEAD_BYTES: u64 = crate::config::IP_UDP_HEADER_BYTES as u64;

/// A token bucket in bytes. A datagram may leave while the bucket is not
/// empty; it then goes negative by at most one datagram, which the refill
/// pays back. Rate 0 means no limit.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate_bytes_per_s: f64,
    burst_bytes: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    pub(crate) fn new(rate_bits_per_s: u64, burst_bytes: u64, now: Instant) -> Pacer {
        let burst = burst_bytes as f64;
        Pacer { rate_bytes_per_s: rate_bits_per_s as f64 / 8.0, burst_bytes: burst, tokens: burst, last: now }
    }

    /// Changes the rate from now on (`rate = "auto"`); 0 means no limit.
    pub(crate) fn set_rate(&mut self, rate_bits_per_s: u64, now: Instant) {
        let rate = rate_bits_per_s as f64 / 8.0;
        if rate != self.rate_bytes_per_s {
            // Tokens earned so far are at the old rate.
            if self.rate_bytes_per_s != 0.0 {
                self.refill(now);
            }
            self.rate_bytes_per_s = rate;
        }
    }

    /// The rate, bits/s (0: no limit).
    pub(crate) fn rate_bits_per_s(&self) -> u64 {
        (self.rate_bytes_per_s * 8.0) as u64
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate_bytes_per_s).min(self.burst_bytes);
    }

    /// Whether a datagram may leave now.
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        if self.rate_bytes_per_s == 0.0 {
            return true;
        }
        self.refill(now);
        self.tokens > 0.0
    }

    /// Charges a datagram of `len` bytes (IP/UDP headers added here).
    pub(crate) fn spend(&mut self, len: usize) {
        if self.rate_bytes_per_s != 0.0 {
            self.tokens -= (len as u64 + IP_UDP_OVERHEAD_BYTES) as f64;
        }
    }

    /// How long until [`Pacer::ready`] turns true.
    pub(crate) fn wait(&self) -> Duration {
        if self.rate_bytes_per_s == 0.0 || self.tokens > 0.0 {
            return Duration::ZERO;
        }
        // A little past zero so the wake finds a positive balance.
        Duration::from_secs_f64((-self.tokens + 1.0) / self.rate_bytes_per_s)
    }
}

/// Counts events against a per-second budget with a burst of a tenth of a
/// second (at least 10).
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_s: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(per_s: u32, now: Instant) -> RateLimit {
        let burst = (f64::from(per_s) / 10.0).max(10.0);
        RateLimit { per_s: f64::from(per_s), burst, tokens: burst, last: now }
    }

    /// Takes one token; false when over the rate.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_s).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(8_000_000, 2000, t0); // 1 MB/s
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(1) {
            if p.ready(now) {
                p.spend(972);
                sent += 1000;
            } else {
                now += p.wait();
            }
        }
        assert!((990_000..=1_010_000).contains(&sent), "{sent}");
    }

    #[test]
    fn a_new_rate_applies_from_then_on() {
        let t0 = Instant::now();
        let mut p = Pacer::new(8_000_000, 2000, t0);
        p.spend(1972); // 2000 bytes: the bucket is empty
        assert!(!p.ready(t0));
        assert_eq!(p.wait(), Duration::from_secs_f64(1.0 / 1e6));
        p.set_rate(16_000_000, t0);
        assert_eq!(p.rate_bits_per_s(), 16_000_000);
        // 1000 bytes take 0.5 ms at 2 MB/s.
        p.spend(972);
        assert!(!p.ready(t0 + Duration::from_micros(400)));
        assert!(p.ready(t0 + Duration::from_micros(600)));
    }

    #[test]
    fn rate_limit_refuses_a_flood() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(100, t0);
        let allowed = (0..1000).filter(|_| r.allow(t0)).count();
        assert_eq!(allowed, 10);
        assert!(r.allow(t0 + Duration::from_millis(20)));
    }
}
