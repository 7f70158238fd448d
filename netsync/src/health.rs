//! Link health: is the loss the path shows within what the FEC code
//! repairs? When it is not, an on-the-wire report no longer means the far
//! end will get the data if the link is cut now, and the link is
//! `Degraded` (README.md, "Health").
//!
//! A pure state machine, fed the far end's cumulative counters from its
//! acks (data seqs it knows were sent, and those that arrived the first
//! time: the rest were lost on the path and rebuilt by FEC or nacked and
//! retransmitted) and the time. It measures the loss over a sliding window
//! and compares it with the code's capacity ([`fec_capacity`]):
//!
//! - `Healthy` → `Degraded` as soon as the measured loss exceeds the
//!   capacity;
//! - `Degraded` → `Healthy` only once the measured loss has stayed within
//!   the capacity for the hold time (hysteresis: one good window does not
//!   end it).
//!
//! The window is `window` long, stretched back (up to [`MAX_HISTORY`]) to
//! cover at least `min_datagrams` datagrams, so a few losses on a quiet
//! link are not a verdict. Without that many datagrams in the history the
//! state does not change.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use starblk_fec::{FecScheme, SchemeKind};

/// Whether the path's loss is within what the FEC code repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// Loss within the code's capacity: an on-the-wire report is as good
    /// as the far end receiving the data (the repairs rebuild losses).
    #[default]
    Healthy,
    /// Loss beyond the code's capacity: repairs on the wire no longer
    /// guarantee delivery; completions should wait for the far end's ack.
    Degraded,
}

impl Health {
    /// The name `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
        }
    }
}

/// The share of lost datagrams that FEC may leave unrepaired at the loss
/// rate called the code's capacity.
pub const RESIDUAL_AT_CAPACITY: f64 = 0.01;

/// The code's capacity: the independent (random) datagram loss rate at
/// which the code still rebuilds 99 % of the lost datagrams
/// ([`RESIDUAL_AT_CAPACITY`]) without a retransmission. Beyond it, losses
/// that need a retransmission — which a disaster at the sending site
/// prevents — grow quickly.
///
/// - Reed-Solomon (r, c): a lost datagram is rebuilt unless c or more of
///   the other r + c − 1 datagrams of its group are lost too.
/// - Layered XOR (r, c layers): each layer rebuilds it unless another of
///   the r − 1 data datagrams or the repair of its group in that layer is
///   lost; the layers' groups share only this datagram, so it stays lost
///   with probability (1 − (1 − p)^r)^c. (Rebuilding across layers only
///   helps, so this is conservative.) Bursts are what the interleaving is
///   for: a burst shorter than a layer's stride costs that layer one
///   datagram per group.
/// - No FEC: every loss needs a retransmission, so the capacity is 0.
///
/// (8, 3): layered XOR 2.99 %, Reed-Solomon 4.75 %.
pub fn fec_capacity(fec: Option<&FecScheme>) -> f64 {
    let Some(fec) = fec else { return 0.0 };
    let (r, c) = (fec.r() as i32, fec.c() as i32);
    let unrepaired = |p: f64| match fec.kind() {
        SchemeKind::LayeredXor => (1.0 - (1.0 - p).powi(r)).powi(c),
        SchemeKind::ReedSolomon => binomial_tail(r + c - 1, c, p),
    };
    // unrepaired(p) grows with p: bisect for RESIDUAL_AT_CAPACITY.
    let (mut lo, mut hi) = (0.0f64, 0.5f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if unrepaired(mid) < RESIDUAL_AT_CAPACITY {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// P(X >= k) for X ~ Binomial(n, p).
fn binomial_tail(n: i32, k: i32, p: f64) -> f64 {
    let mut below = 0.0;
    let mut choose = 1.0; // C(n, i)
    for i in 0..k.min(n + 1) {
        below += choose * p.powi(i) * (1.0 - p).powi(n - i);
        choose = choose * f64::from(n - i) / f64::from(i + 1);
    }
    (1.0 - below).max(0.0)
}

/// How the monitor judges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// The loss rate the code repairs ([`fec_capacity`]).
    pub capacity: f64,
    /// Loss is measured over this much recent history...
    pub window: Duration,
    /// ...stretched back to cover at least this many datagrams.
    pub min_datagrams: u64,
    /// Degraded ends once the loss stayed within capacity this long.
    pub hold: Duration,
}

/// Longest history kept: a window never stretches back further.
pub const MAX_HISTORY: Duration = Duration::from_secs(10);
/// Samples closer together than this are merged, and judged once.
const SAMPLE_SPACING: Duration = Duration::from_millis(10);

/// A state change: the new state and the loss that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// The new state.
    pub to: Health,
    /// The measured loss at the change.
    pub loss: f64,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    cfg: HealthConfig,
    /// (time, datagrams seen, datagrams lost), cumulative, oldest first.
    history: VecDeque<(Instant, u64, u64)>,
    state: Health,
    /// Degraded, and the loss has been within capacity since then.
    within_since: Option<Instant>,
    loss: f64,
    transitions: u64,
}

impl HealthMonitor {
    /// A healthy monitor.
    pub fn new(cfg: HealthConfig) -> HealthMonitor {
        HealthMonitor {
            cfg,
            history: VecDeque::new(),
            state: Health::Healthy,
            within_since: None,
            loss: 0.0,
            transitions: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// The loss measured at the last verdict.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The capacity it compares with.
    pub fn capacity(&self) -> f64 {
        self.cfg.capacity
    }

    /// Transitions into `Degraded` so far.
    pub fn degradations(&self) -> u64 {
        self.transitions
    }

    /// Feeds the far end's cumulative counters: data datagrams it knows
    /// were sent (`seen`) and those of them that did not arrive the first
    /// time (`lost`). Returns the transition, if the state changed.
    pub fn on_sample(&mut self, now: Instant, seen: u64, lost: u64) -> Option<Transition> {
        match self.history.back_mut() {
            // Counters that went back (a new peer) start a new history.
            Some(&mut (_, s, l)) if seen < s || lost < l => self.history.clear(),
            // Acks come every millisecond or so: one verdict per spacing.
            Some(last) if now.saturating_duration_since(last.0) < SAMPLE_SPACING => {
                (last.1, last.2) = (seen, lost);
                return None;
            }
            _ => {}
        }
        self.history.push_back((now, seen, lost));
        while self.history.front().is_some_and(|f| now.saturating_duration_since(f.0) > MAX_HISTORY) {
            self.history.pop_front();
        }
        self.judge(now)
    }

    /// The loss over the window, if it holds enough datagrams.
    fn measure(&self, now: Instant) -> Option<f64> {
        let &(_, seen, lost) = self.history.back()?;
        for &(t, s, l) in self.history.iter().rev().skip(1) {
            let n = seen - s;
            if now.saturating_duration_since(t) >= self.cfg.window && n >= self.cfg.min_datagrams {
                return Some((lost - l) as f64 / n as f64);
            }
        }
        // The whole history, if it is enough.
        let &(_, s, l) = self.history.front()?;
        let n = seen - s;
        (n >= self.cfg.min_datagrams).then(|| (lost - l) as f64 / n as f64)
    }

    fn judge(&mut self, now: Instant) -> Option<Transition> {
        let loss = self.measure(now)?;
        self.loss = loss;
        let within = loss <= self.cfg.capacity;
        match self.state {
            Health::Healthy if !within => {
                self.state = Health::Degraded;
                self.within_since = None;
                self.transitions += 1;
                Some(Transition { to: Health::Degraded, loss })
            }
            Health::Degraded if within => {
                let since = *self.within_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.cfg.hold {
                    self.state = Health::Healthy;
                    self.within_since = None;
                    return Some(Transition { to: Health::Healthy, loss });
                }
                None
            }
            Health::Degraded => {
                self.within_since = None;
                None
            }
            Health::Healthy => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xor83() -> FecScheme {
        FecScheme::layered_xor(8, 3).unwrap()
    }

    #[test]
    fn capacity_of_the_codes() {
        let xor = fec_capacity(Some(&xor83()));
        let rs = fec_capacity(Some(&FecScheme::reed_solomon(8, 3).unwrap()));
        assert!((xor - 0.0299).abs() < 0.0005, "{xor}");
        assert!((rs - 0.0475).abs() < 0.0005, "{rs}");
        // More repair, more capacity; none without FEC.
        assert!(fec_capacity(Some(&FecScheme::layered_xor(8, 4).unwrap())) > xor);
        assert!(fec_capacity(Some(&FecScheme::reed_solomon(8, 4).unwrap())) > rs);
        assert_eq!(fec_capacity(None), 0.0);
        // The definition: at capacity, 1 % of the losses stay unrepaired.
        let p = xor;
        assert!(((1.0 - (1.0 - p).powi(8)).powi(3) - RESIDUAL_AT_CAPACITY).abs() < 1e-6);
        assert!((binomial_tail(10, 3, rs) - RESIDUAL_AT_CAPACITY).abs() < 1e-6);
        assert!((binomial_tail(4, 0, 0.3) - 1.0).abs() < 1e-12);
        assert!((binomial_tail(2, 2, 0.5) - 0.25).abs() < 1e-12);
    }

    /// A scripted stream: `rate` datagrams per 10 ms, of which a share
    /// `loss` is lost (spread evenly, so the window sees exactly it).
    struct Script {
        t: Instant,
        seen: u64,
        lost_milli: u64,
    }

    impl Script {
        fn run(&mut self, m: &mut HealthMonitor, dur: Duration, loss: f64) -> Vec<(Duration, Transition)> {
            let t0 = self.t;
            let mut out = Vec::new();
            let end = self.t + dur;
            while self.t < end {
                self.t += Duration::from_millis(10);
                self.seen += 100;
                self.lost_milli += (loss * 100_000.0).round() as u64;
                if let Some(tr) = m.on_sample(self.t, self.seen, self.lost_milli / 1000) {
                    out.push((self.t - t0, tr));
                }
            }
            out
        }
    }

    fn monitor(capacity: f64) -> HealthMonitor {
        HealthMonitor::new(HealthConfig {
            capacity,
            window: Duration::from_secs(1),
            // The script's whole-datagram counts quantise the loss by
            // 1/min_datagrams at the start.
            min_datagrams: 1000,
            hold: Duration::from_secs(2),
        })
    }

    #[test]
    fn loss_just_inside_capacity_stays_healthy() {
        let cap = fec_capacity(Some(&xor83()));
        let mut m = monitor(cap);
        let mut s = Script { t: Instant::now(), seen: 0, lost_milli: 0 };
        assert_eq!(s.run(&mut m, Duration::from_secs(10), cap * 0.95), vec![]);
        assert_eq!(m.state(), Health::Healthy);
        assert!((m.loss() - cap * 0.95).abs() < 0.001, "{}", m.loss());
    }

    #[test]
    fn loss_just_beyond_capacity_degrades_then_recovers_after_the_hold() {
        let cap = fec_capacity(Some(&xor83()));
        let mut m = monitor(cap);
        let mut s = Script { t: Instant::now(), seen: 0, lost_milli: 0 };
        assert_eq!(s.run(&mut m, Duration::from_secs(3), 0.0), vec![]);
        // Just beyond: degraded within the window.
        let tr = s.run(&mut m, Duration::from_secs(3), cap * 1.1);
        assert_eq!(tr.len(), 1, "{tr:?}");
        assert_eq!(tr[0].1.to, Health::Degraded);
        assert!(tr[0].0 <= Duration::from_secs(1), "{tr:?}");
        assert_eq!((m.state(), m.degradations()), (Health::Degraded, 1));
        // Back just inside: healthy only after the window has forgotten
        // the loss and the hold has passed, not before.
        let tr = s.run(&mut m, Duration::from_secs(6), cap * 0.9);
        assert_eq!(tr.len(), 1, "{tr:?}");
        assert_eq!(tr[0].1.to, Health::Healthy);
        let at = tr[0].0;
        assert!(at >= Duration::from_secs(2) && at <= Duration::from_secs(3) + Duration::from_millis(50), "{at:?}");
    }

    #[test]
    fn a_relapse_during_the_hold_restarts_it() {
        let mut m = monitor(0.03);
        let mut s = Script { t: Instant::now(), seen: 0, lost_milli: 0 };
        assert_eq!(s.run(&mut m, Duration::from_secs(2), 0.05).len(), 1);
        // 1.5 s good (within capacity after 0.4 s: 1.1 s of the 2 s hold),
        // then loss again: still degraded, and the hold starts over.
        assert_eq!(s.run(&mut m, Duration::from_millis(1500), 0.0), vec![]);
        assert_eq!(s.run(&mut m, Duration::from_secs(1), 0.2), vec![]);
        let tr = s.run(&mut m, Duration::from_secs(5), 0.0);
        assert_eq!(tr.len(), 1);
        assert!(tr[0].0 >= Duration::from_millis(2500), "{tr:?}");
        assert_eq!(m.degradations(), 1);
    }

    #[test]
    fn too_few_datagrams_is_no_verdict() {
        let mut m = monitor(0.03);
        let t0 = Instant::now();
        // 5 of 50 lost: 10 %, but only 50 datagrams in 10 s of history.
        for i in 1..=10u64 {
            assert_eq!(m.on_sample(t0 + Duration::from_secs(i), i * 5, i / 2), None);
        }
        assert_eq!(m.state(), Health::Healthy);
        // Counters that go back (a new peer) start over.
        assert_eq!(m.on_sample(t0 + Duration::from_secs(11), 0, 0), None);
        assert_eq!(m.on_sample(t0 + Duration::from_secs(12), 1000, 500).map(|t| t.to), Some(Health::Degraded));
    }
}
