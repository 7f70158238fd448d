//! `rate = "auto"`: pacing to the measured delivery rate of the path, after
//! BBR (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM
//! Queue 2016), cut down to what a pacer-only sender needs. A pure state
//! machine: fed delivery-rate samples, RTT samples and loss counts, it
//! outputs a pacing rate. See README.md, "Automatic pacing".
//!
//! - **Estimates.** `btlbw`: the largest delivery rate measured over the
//!   last [`BW_WINDOW_ROUNDS`] round trips (at least [`BW_WINDOW_MIN`]);
//!   samples taken while the sender had nothing to send (app-limited) only
//!   count when they raise it. `min_rtt`: the smallest RTT over
//!   [`MIN_RTT_WINDOW`]. A *queue* is an RTT above `min_rtt` by more than
//!   `max(min_rtt / 4, 5 ms)`.
//! - **Startup** paces at [`STARTUP_GAIN`] × `btlbw` from a conservative
//!   [`INITIAL_RATE_BITS_PER_S`], so the rate grows by that factor per
//!   round trip, until an RTT sample shows a queue, a round trip loses
//!   more than [`LOSS_BACKOFF`], or three rounds in a row grow `btlbw` by
//!   less than 25 % (the pipe is full).
//! - **Drain** paces at 1 / [`STARTUP_GAIN`] × `btlbw` until no more than
//!   a bandwidth-delay product (`btlbw` × `min_rtt`) is in flight: the
//!   queue startup built is gone (at most four rounds). Startup keeps at
//!   most [`STARTUP_INFLIGHT_GAIN`] BDPs in flight, which bounds that
//!   queue.
//! - **Cruise** cycles the gain per round trip through [`CRUISE_GAINS`]:
//!   one round probes for more bandwidth at 1.25, the next drains what the
//!   probe queued at 0.75 until what is in flight fits the pipe (at once,
//!   for an application-limited sender, which never pays for the drain),
//!   then six rounds at 1.
//! - **Backing off.** A busy round (outside the probe: the sender was not
//!   short of data) whose smallest RTT still shows a queue means `btlbw`
//!   is too high: it drops to the round's
//!   highest delivery rate (what the bottleneck delivered) and the
//!   controller drains again. A round losing more than [`LOSS_BACKOFF`] of its
//!   datagrams (congestion loss, beyond what random loss looks like)
//!   multiplies `btlbw` by [`LOSS_BACKOFF_FACTOR`] and drains.
//!
//! A round trip ends when a delivery sample arrives for a datagram sent
//! after the round began, or two min RTTs after it began (a long queue
//! must not slow the reaction to it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The rate a link starts at: below what a WAN replication link carries,
/// so a new link does not flood a slow path; startup doubles it (×2.89)
/// per round trip.
pub const INITIAL_RATE_BITS_PER_S: u64 = 10_000_000;
/// Never pace below this (a link must keep moving to measure anything).
pub const MIN_RATE_BITS_PER_S: u64 = 500_000;
/// Never pace above this.
pub const MAX_RATE_BITS_PER_S: u64 = 40_000_000_000;
/// Startup gain: 2 / ln 2, the smallest gain that doubles what is
/// delivered per round trip (BBR's).
pub const STARTUP_GAIN: f64 = 2.885;
/// Startup keeps at most this many bandwidth-delay products in flight.
pub const STARTUP_INFLIGHT_GAIN: f64 = 2.0;
/// Cruise gains, one per round trip.
pub const CRUISE_GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// `btlbw` is the max over this many round trips...
pub const BW_WINDOW_ROUNDS: u32 = 10;
/// ...and at least this long.
pub const BW_WINDOW_MIN: Duration = Duration::from_millis(500);
/// `min_rtt` is the min over this long.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// A round losing more than this share of its datagrams backs off.
pub const LOSS_BACKOFF: f64 = 0.05;
/// ...by this factor.
pub const LOSS_BACKOFF_FACTOR: f64 = 0.85;
/// A round needs this many datagrams for its loss to count.
const LOSS_MIN_DATAGRAMS: u64 = 20;
/// Smallest RTT excess taken as a queue.
const QUEUE_MIN: Duration = Duration::from_millis(5);
/// Startup ends after this many rounds without 25 % growth.
const FULL_PIPE_ROUNDS: u32 = 3;
/// Drain ends after this many rounds even if the RTT says otherwise.
const DRAIN_MAX_ROUNDS: u32 = 4;

/// One delivery-rate sample (see `Tx::on_delivered`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSample {
    /// Wire bits delivered per second over the sample's interval.
    pub bits_per_s: f64,
    /// The sender was idle for lack of data during the interval: the
    /// sample may understate what the path delivers.
    pub app_limited: bool,
    /// When the datagram that completed the sample was sent.
    pub sent_at: Instant,
    /// Wire bits sent and not yet delivered, as of the sample.
    pub inflight_bits: f64,
}

/// The controller's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Growing the rate by [`STARTUP_GAIN`] per round trip.
    Startup,
    /// Draining the queue startup built.
    Drain,
    /// Cycling through [`CRUISE_GAINS`].
    Cruise,
}

impl Phase {
    /// The name `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Drain => "drain",
            Phase::Cruise => "cruise",
        }
    }
}

/// A sliding-window maximum over time (monotone deque).
#[derive(Debug, Clone, Default)]
struct WindowedMax {
    q: VecDeque<(Instant, f64)>,
}

impl WindowedMax {
    fn push(&mut self, now: Instant, v: f64) {
        while self.q.back().is_some_and(|&(_, b)| b <= v) {
            self.q.pop_back();
        }
        self.q.push_back((now, v));
    }

    fn expire(&mut self, now: Instant, window: Duration) {
        // The newest value always stays: an estimate never vanishes.
        while self.q.len() > 1 && self.q.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) > window) {
            self.q.pop_front();
        }
    }

    fn max(&self) -> f64 {
        self.q.front().map_or(0.0, |&(_, v)| v)
    }

    fn reset(&mut self, now: Instant, v: f64) {
        self.q.clear();
        self.q.push_back((now, v));
    }
}

/// What one round trip saw.
#[derive(Debug, Clone, Copy)]
struct Round {
    start: Instant,
    min_rtt: Option<Duration>,
    /// Highest delivery rate not limited by the application.
    max_rate: f64,
    /// Some sample was not app-limited.
    busy: bool,
    seen: u64,
    lost: u64,
}

impl Round {
    fn new(start: Instant) -> Round {
        Round { start, min_rtt: None, max_rate: 0.0, busy: false, seen: 0, lost: 0 }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct AutoRate {
    phase: Phase,
    btlbw: WindowedMax,
    min_rtt: Option<(Duration, Instant)>,
    latest_rtt: Option<Duration>,
    inflight_bits: f64,
    round: Round,
    rounds: u64,
    /// Cruise: index into CRUISE_GAINS.
    cycle: usize,
    /// Startup: the best btlbw so far and the rounds since it grew 25 %.
    full_bw: f64,
    full_bw_rounds: u32,
    drain_rounds: u32,
    backoffs: u64,
}

impl AutoRate {
    /// A controller starting at [`INITIAL_RATE_BITS_PER_S`].
    pub fn new(now: Instant) -> AutoRate {
        AutoRate {
            phase: Phase::Startup,
            btlbw: WindowedMax::default(),
            min_rtt: None,
            latest_rtt: None,
            inflight_bits: 0.0,
            round: Round::new(now),
            rounds: 0,
            cycle: 2,
            full_bw: 0.0,
            full_bw_rounds: 0,
            drain_rounds: 0,
            backoffs: 0,
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The bottleneck bandwidth estimate, bits/s (before the first sample,
    /// what makes startup pace at [`INITIAL_RATE_BITS_PER_S`]).
    pub fn delivery_rate(&self) -> u64 {
        self.bw() as u64
    }

    fn bw(&self) -> f64 {
        match self.btlbw.max() {
            0.0 => INITIAL_RATE_BITS_PER_S as f64 / STARTUP_GAIN,
            bw => bw,
        }
    }

    /// The smallest recent RTT, if any was measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(r, _)| r)
    }

    /// Round trips counted so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Back-offs (queue or loss) so far.
    pub fn backoffs(&self) -> u64 {
        self.backoffs
    }

    /// The pacing rate, bits/s (IP and UDP headers included).
    pub fn pacing_rate(&self) -> u64 {
        let rate = self.gain() * self.bw();
        (rate as u64).clamp(MIN_RATE_BITS_PER_S, MAX_RATE_BITS_PER_S)
    }

    fn gain(&self) -> f64 {
        match self.phase {
            // Like BBR's congestion window in startup: no more than
            // STARTUP_INFLIGHT_GAIN x BDP in flight, which bounds the queue
            // the last round of startup builds before its RTT samples
            // (a round trip late) show it.
            Phase::Startup if self.inflight_bits > STARTUP_INFLIGHT_GAIN * self.bdp_bits() => 1.0,
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 1.0 / STARTUP_GAIN,
            Phase::Cruise => CRUISE_GAINS[self.cycle],
        }
    }

    /// The bandwidth-delay product, bits (infinite before an RTT sample).
    fn bdp_bits(&self) -> f64 {
        self.min_rtt.map_or(f64::INFINITY, |(m, _)| self.bw() * m.as_secs_f64())
    }

    fn queue_threshold(min_rtt: Duration) -> Duration {
        (min_rtt / 4).max(QUEUE_MIN)
    }

    /// Whether `rtt` shows a queue over the min RTT.
    fn is_queue(&self, rtt: Duration) -> bool {
        self.min_rtt.is_some_and(|(m, _)| rtt > m + Self::queue_threshold(m))
    }

    /// Whether the latest RTT sample shows a queue.
    fn queue_now(&self) -> bool {
        self.latest_rtt.is_some_and(|r| self.is_queue(r))
    }

    /// An RTT sample.
    pub fn on_rtt(&mut self, now: Instant, rtt: Duration) {
        let expired = self.min_rtt.is_none_or(|(_, at)| now.saturating_duration_since(at) > MIN_RTT_WINDOW);
        if expired || self.min_rtt.is_some_and(|(m, _)| rtt <= m) {
            self.min_rtt = Some((rtt, now));
        }
        self.latest_rtt = Some(rtt);
        self.round.min_rtt = Some(self.round.min_rtt.map_or(rtt, |m| m.min(rtt)));
        // The pipe is full: what is delivered now is the bottleneck's rate
        // (btlbw already holds it). Waiting for the round to end would add
        // up to a round trip of overshoot to the queue. Only a sender that
        // kept the path busy built that queue: for an application-limited
        // one it is noise or someone else's, and draining would only delay
        // its writes.
        if self.phase == Phase::Startup && self.round.busy && self.queue_now() {
            self.enter_drain();
        }
    }

    /// Datagrams the far end knows were sent, and of those, lost (deltas).
    pub fn on_loss(&mut self, seen: u64, lost: u64) {
        self.round.seen += seen;
        self.round.lost += lost.min(seen);
    }

    /// A delivery-rate sample; may end a round trip.
    pub fn on_rate_sample(&mut self, now: Instant, s: RateSample) {
        let window = self.min_rtt.map_or(BW_WINDOW_MIN, |(m, _)| (m * BW_WINDOW_ROUNDS).max(BW_WINDOW_MIN));
        self.btlbw.expire(now, window);
        if !s.app_limited || s.bits_per_s >= self.bw() {
            self.btlbw.push(now, s.bits_per_s);
        }
        if !s.app_limited {
            self.round.busy = true;
            self.round.max_rate = self.round.max_rate.max(s.bits_per_s);
        }
        self.inflight_bits = s.inflight_bits;
        // Drain (and cruise's drain slot) end once what is in flight fits
        // the pipe: the queue is gone; or once the sender runs short of
        // data: then it is not what fills a queue.
        let drained = self.inflight_bits <= self.bdp_bits() || s.app_limited;
        match self.phase {
            Phase::Drain if drained => self.enter_cruise(),
            Phase::Cruise if self.cycle == 1 && drained => self.cycle = 2,
            _ => {}
        }
        // A round trip is over when a datagram sent after it began is
        // delivered, or after two min RTTs: a long queue must not slow the
        // reaction to it.
        let long = self.min_rtt.is_some_and(|(m, _)| now.saturating_duration_since(self.round.start) >= 2 * m);
        if s.sent_at >= self.round.start || long {
            self.end_round(now);
        }
    }

    fn end_round(&mut self, now: Instant) {
        let r = std::mem::replace(&mut self.round, Round::new(now));
        self.rounds += 1;
        // A queue only counts when this sender kept the path busy: an
        // application-limited one did not build it (and RTT noise on an
        // idle path must not slow it down).
        let queued = r.busy && r.min_rtt.is_some_and(|rtt| self.is_queue(rtt));
        let lossy = r.seen >= LOSS_MIN_DATAGRAMS && r.lost as f64 > LOSS_BACKOFF * r.seen as f64;
        match self.phase {
            Phase::Startup => {
                let bw = self.bw();
                if r.busy {
                    if bw >= self.full_bw * 1.25 {
                        (self.full_bw, self.full_bw_rounds) = (bw, 0);
                    } else {
                        self.full_bw_rounds += 1;
                    }
                }
                if lossy {
                    self.back_off(now, &r, true);
                }
                if queued || lossy || self.full_bw_rounds >= FULL_PIPE_ROUNDS {
                    self.enter_drain();
                }
            }
            Phase::Drain => {
                self.drain_rounds += 1;
                if self.drain_rounds >= DRAIN_MAX_ROUNDS {
                    self.enter_cruise();
                }
            }
            Phase::Cruise => {
                let probing = CRUISE_GAINS[self.cycle] > 1.0;
                if lossy || (queued && !probing) {
                    self.back_off(now, &r, lossy);
                    self.enter_drain();
                } else {
                    self.cycle = (self.cycle + 1) % CRUISE_GAINS.len();
                    // A probe the application did not fill, or one whose
                    // extra data the path took, queued nothing to drain.
                    if self.cycle == 1 && (!r.busy || self.inflight_bits <= self.bdp_bits()) {
                        self.cycle = 2;
                    }
                }
            }
        }
    }

    fn back_off(&mut self, now: Instant, r: &Round, lossy: bool) {
        let bw = self.bw();
        // What the bottleneck delivered while this sender kept it busy.
        let delivered = if r.busy { r.max_rate.min(bw) } else { bw };
        let to = if lossy { delivered.min(bw * LOSS_BACKOFF_FACTOR) } else { delivered };
        self.btlbw.reset(now, to.max(MIN_RATE_BITS_PER_S as f64));
        self.backoffs += 1;
    }

    fn enter_drain(&mut self) {
        self.phase = Phase::Drain;
        self.drain_rounds = 0;
    }

    fn enter_cruise(&mut self) {
        self.phase = Phase::Cruise;
        self.cycle = 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MBIT: f64 = 1e6;

    /// A fluid model of one bottleneck: a FIFO queue drained at `capacity`
    /// behind a fixed RTT, fed at the controller's pacing rate (or less,
    /// when the application offers less). Every `tick` it hands the
    /// controller one delivery sample (what left the bottleneck in the
    /// tick, seen one RTT later) and one RTT sample (base RTT plus the
    /// queueing delay then). Returns what was sent and delivered, and the
    /// largest queue.
    struct Path {
        capacity: f64,
        base_rtt: Duration,
        queue_bits: f64,
        max_queue_bits: f64,
        /// Queue limit: beyond it bits are dropped (tail drop).
        limit_bits: f64,
        t: Instant,
        sent_bits: f64,
        delivered_bits: f64,
        dropped_bits: f64,
        /// Delivered bits the sender has heard of.
        acked_bits: f64,
        /// (due, rate, sent_at, app_limited, rtt, bits) in flight back to the sender.
        echo: VecDeque<(Instant, f64, Instant, bool, Duration, f64)>,
    }

    const TICK: Duration = Duration::from_millis(5);

    impl Path {
        fn new(capacity_mbit: f64, rtt_ms: u64, limit_bytes: f64) -> Path {
            Path {
                capacity: capacity_mbit * MBIT,
                base_rtt: Duration::from_millis(rtt_ms),
                queue_bits: 0.0,
                max_queue_bits: 0.0,
                limit_bits: limit_bytes * 8.0,
                t: Instant::now(),
                sent_bits: 0.0,
                delivered_bits: 0.0,
                dropped_bits: 0.0,
                acked_bits: 0.0,
                echo: VecDeque::new(),
            }
        }

        /// Runs for `dur` with the application offering `offered` bits/s
        /// (None: always something to send).
        fn run(&mut self, c: &mut AutoRate, dur: Duration, offered: Option<f64>) {
            let end = self.t + dur;
            let dt = TICK.as_secs_f64();
            while self.t < end {
                self.t += TICK;
                let pace = c.pacing_rate() as f64;
                let send = offered.map_or(pace, |o| o.min(pace));
                let app_limited = offered.is_some_and(|o| o < pace);
                let mut arriving = send * dt;
                self.sent_bits += arriving;
                let room = (self.limit_bits - self.queue_bits).max(0.0);
                // 1500-byte datagrams.
                let datagrams = (arriving / 12_000.0).ceil() as u64;
                if arriving > room {
                    self.dropped_bits += arriving - room;
                    c.on_loss(datagrams, ((arriving - room) / 12_000.0).ceil() as u64);
                    arriving = room;
                } else {
                    c.on_loss(datagrams, 0);
                }
                self.queue_bits += arriving;
                let out = self.queue_bits.min(self.capacity * dt);
                self.queue_bits -= out;
                self.delivered_bits += out;
                self.max_queue_bits = self.max_queue_bits.max(self.queue_bits);
                let qdelay = Duration::from_secs_f64(self.queue_bits / self.capacity);
                let rtt = self.base_rtt + qdelay;
                self.echo.push_back((self.t + rtt, out / dt, self.t, app_limited, rtt, out));
                while self.echo.front().is_some_and(|e| e.0 <= self.t) {
                    let (_, rate, sent_at, app_limited, rtt, bits) = self.echo.pop_front().unwrap();
                    self.acked_bits += bits;
                    let inflight_bits = self.sent_bits - self.dropped_bits - self.acked_bits;
                    c.on_rtt(self.t, rtt);
                    c.on_rate_sample(self.t, RateSample { bits_per_s: rate, app_limited, sent_at, inflight_bits });
                }
            }
        }
    }

    #[test]
    fn finds_the_bottleneck_and_keeps_the_queue_small() {
        for (capacity, rtt_ms) in [(8.0, 100), (40.0, 100), (200.0, 20), (2.0, 200)] {
            let mut c = AutoRate::new(Instant::now());
            let mut p = Path::new(capacity, rtt_ms, 1e6);
            p.run(&mut c, Duration::from_secs(2), None);
            // Steady state: measure from here.
            let (sent0, delivered0) = (p.sent_bits, p.delivered_bits);
            p.max_queue_bits = 0.0;
            p.run(&mut c, Duration::from_secs(20), None);
            let goodput = (p.delivered_bits - delivered0) / 20.0 / (capacity * MBIT);
            let sent = (p.sent_bits - sent0) / 20.0 / (capacity * MBIT);
            let est = c.delivery_rate() as f64 / (capacity * MBIT);
            let bdp_bits = capacity * MBIT * rtt_ms as f64 / 1e3;
            assert!(goodput >= 0.97, "{capacity} Mbit {rtt_ms} ms: goodput {goodput:.3}");
            assert!(sent <= 1.01, "{capacity} Mbit {rtt_ms} ms: sent {sent:.3}");
            assert!((0.9..=1.1).contains(&est), "{capacity} Mbit {rtt_ms} ms: estimate {est:.3}");
            assert!(
                p.max_queue_bits <= 0.6 * bdp_bits.max(capacity * MBIT * 0.02),
                "{capacity}: queue {}",
                p.max_queue_bits
            );
            assert_eq!(c.phase(), Phase::Cruise);
            assert_eq!(p.dropped_bits, 0.0, "{capacity} Mbit {rtt_ms} ms");
        }
    }

    #[test]
    fn startup_is_conservative_then_fast() {
        let mut c = AutoRate::new(Instant::now());
        assert_eq!(c.pacing_rate(), INITIAL_RATE_BITS_PER_S);
        let mut p = Path::new(40.0, 100, 1e6);
        // Within a second (about 7 round trips) it paces near the path's
        // rate, and startup's overshoot stayed within the 1 MB queue.
        p.run(&mut c, Duration::from_secs(1), None);
        let r = c.pacing_rate() as f64 / (40.0 * MBIT);
        assert!((0.3..=1.3).contains(&r), "{r}");
        assert_eq!(p.dropped_bits, 0.0);
        assert_ne!(c.phase(), Phase::Startup);
    }

    #[test]
    fn follows_a_drop_in_capacity() {
        let mut c = AutoRate::new(Instant::now());
        let mut p = Path::new(40.0, 100, 1e6);
        p.run(&mut c, Duration::from_secs(5), None);
        p.capacity = 10.0 * MBIT;
        p.run(&mut c, Duration::from_secs(5), None);
        let est = c.delivery_rate() as f64 / (10.0 * MBIT);
        assert!((0.85..=1.15).contains(&est), "{est}");
        assert!(c.backoffs() > 0);
        // The queue left by the drop drained.
        assert!(p.queue_bits < 10.0 * MBIT * 0.05, "{}", p.queue_bits);
    }

    #[test]
    fn an_application_limited_sender_is_never_held_back() {
        // The application offers 30 Mbit/s on a 1 Gbit/s path: the pacing
        // rate stays above what it offers, so pacing adds no delay.
        let mut c = AutoRate::new(Instant::now());
        let mut p = Path::new(1000.0, 20, 1e6);
        p.run(&mut c, Duration::from_secs(1), Some(30.0 * MBIT));
        let mut min_pace = f64::MAX;
        for _ in 0..200 {
            p.run(&mut c, Duration::from_millis(50), Some(30.0 * MBIT));
            min_pace = min_pace.min(c.pacing_rate() as f64);
        }
        assert!(min_pace >= 30.0 * MBIT, "paced at {:.1} Mbit/s", min_pace / MBIT);
    }

    #[test]
    fn rtt_noise_does_not_drain_an_application_limited_sender() {
        let t0 = Instant::now();
        let mut c = AutoRate::new(t0);
        let mut p = Path::new(1000.0, 50, 1e6);
        p.run(&mut c, Duration::from_secs(1), Some(70.0 * MBIT));
        assert_eq!(c.phase(), Phase::Startup, "application-limited: the pipe never filled");
        let pace = c.pacing_rate();
        // A 30 ms spike (scheduling, someone else's queue).
        c.on_rtt(p.t, Duration::from_millis(80));
        assert_eq!((c.phase(), c.pacing_rate()), (Phase::Startup, pace));
        assert!(pace as f64 >= 70.0 * MBIT);
    }

    #[test]
    fn backs_off_on_loss_beyond_random_loss() {
        let t0 = Instant::now();
        let mut c = AutoRate::new(t0);
        let mut p = Path::new(40.0, 50, 1e6);
        p.run(&mut c, Duration::from_secs(3), None);
        let backoffs = c.backoffs();
        // A round with 1 % loss: nothing; one with 30 %: back off.
        c.on_loss(100, 1);
        p.run(&mut c, Duration::from_millis(60), None);
        assert_eq!(c.backoffs(), backoffs);
        c.on_loss(100, 100);
        p.run(&mut c, Duration::from_millis(60), None);
        assert_eq!(c.backoffs(), backoffs + 1);
    }

    #[test]
    fn windowed_max() {
        let t0 = Instant::now();
        let mut w = WindowedMax::default();
        let s = Duration::from_secs(1);
        w.push(t0, 5.0);
        w.push(t0 + s, 3.0);
        w.push(t0 + 2 * s, 4.0);
        assert_eq!(w.max(), 5.0);
        w.expire(t0 + 2 * s, Duration::from_millis(1500));
        assert_eq!(w.max(), 4.0);
        w.expire(t0 + 10 * s, Duration::from_millis(1500));
        assert_eq!(w.max(), 4.0, "the newest value stays");
    }
}
