//! The link model: decides each packet's fate when it enters the link.
//!
//! Pure logic over `Instant`s and a seeded RNG, no I/O, so that it can be
//! tested exactly and so that the same seed gives the same loss pattern.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::params::{JitterDist, LinkParams};

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Lost to independent or burst loss.
    Lost,
    /// Tail-dropped because the serialisation queue is full.
    QueueFull,
    /// Delivered at `due`; a second copy too if `duplicate`.
    Deliver { due: Instant, duplicate: bool, reordered: bool },
}

/// State of one direction of the link.
pub(crate) struct LinkModel {
    params: LinkParams,
    /// Loss decisions get their own stream and a fixed number of draws per
    /// packet, so the loss pattern depends only on the seed and the packet
    /// index, not on jitter, duplication or queue settings.
    loss_rng: ChaCha8Rng,
    /// Jitter, duplication and reordering draws.
    effects_rng: ChaCha8Rng,
    ge_bad: bool,
    /// When the serialiser will have sent everything accepted so far.
    serial_free_at: Option<Instant>,
    /// Arrival time of the last in-order packet: the FIFO floor.
    last_due: Option<Instant>,
}

impl LinkModel {
    /// A model for direction `stream` (0 or 1) of a relay seeded with `seed`.
    pub(crate) fn new(params: LinkParams, seed: u64, stream: u64) -> Self {
        let rng = |s: u64| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(s);
            r
        };
        LinkModel {
            params,
            loss_rng: rng(2 * stream),
            effects_rng: rng(2 * stream + 1),
            ge_bad: false,
            serial_free_at: None,
            last_due: None,
        }
    }

    pub(crate) fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Replaces the parameters from now on. Packets already accepted keep
    /// their fate; the RNG streams and the burst state carry on.
    pub(crate) fn set_params(&mut self, params: LinkParams) {
        if params.gilbert_elliott.is_none() {
            self.ge_bad = false;
        }
        self.params = params;
    }

    /// Decides the fate of a packet of `size_bytes` entering at `entry`.
    pub(crate) fn admit(&mut self, entry: Instant, size_bytes: usize) -> Fate {
        if self.lose() {
            return Fate::Lost;
        }
        let Some(depart) = self.serialise(entry, size_bytes) else {
            return Fate::QueueFull;
        };
        self.propagate(depart)
    }

    /// Exactly three draws per packet, whatever the parameters.
    fn lose(&mut self) -> bool {
        let (u_indep, u_step, u_ge): (f64, f64, f64) = (self.loss_rng.gen(), self.loss_rng.gen(), self.loss_rng.gen());
        let indep = u_indep < self.params.loss_prob;
        let Some(ge) = self.params.gilbert_elliott else {
            return indep;
        };
        let flip = if self.ge_bad { ge.p_bad_to_good } else { ge.p_good_to_bad };
        if u_step < flip {
            self.ge_bad = !self.ge_bad;
        }
        let p = if self.ge_bad { ge.loss_in_bad } else { ge.loss_in_good };
        indep || u_ge < p
    }

    /// Returns when the packet has been serialised onto the wire, or `None`
    /// if the queue in front of the serialiser is full.
    fn serialise(&mut self, entry: Instant, size_bytes: usize) -> Option<Instant> {
        let rate = self.params.rate_bits_per_s;
        if rate == 0 {
            return Some(entry);
        }
        let start = self.serial_free_at.map_or(entry, |free| free.max(entry));
        let backlog = start - entry;
        // Bytes still waiting to be serialised, the part of the current
        // packet not yet sent included.
        let backlog_bytes = (backlog.as_secs_f64() * rate as f64 / 8.0) as u64;
        if backlog_bytes > 0 && backlog_bytes + size_bytes as u64 > self.params.queue_bytes {
            return None;
        }
        let depart = start + Duration::from_secs_f64(size_bytes as f64 * 8.0 / rate as f64);
        self.serial_free_at = Some(depart);
        Some(depart)
    }

    /// Propagation delay, jitter, FIFO, reordering and duplication.
    fn propagate(&mut self, depart: Instant) -> Fate {
        // Fixed draws per packet, as in `lose`.
        let (jitter_ms, u_dup, u_reorder) =
            (self.jitter_sample_ms(), self.effects_rng.gen::<f64>(), self.effects_rng.gen::<f64>());
        let p = &self.params;
        let delay_ms = (p.delay_ms + jitter_ms).max(0.0);
        let mut due = depart + Duration::from_secs_f64(delay_ms / 1e3);
        let duplicate = u_dup < p.dup_prob;
        let reordered = u_reorder < p.reorder_prob;
        if reordered {
            // Held back and outside the FIFO: later packets may overtake it.
            due += Duration::from_secs_f64(p.reorder_delay_ms / 1e3);
        } else {
            if let Some(floor) = self.last_due {
                due = due.max(floor);
            }
            self.last_due = Some(due);
        }
        Fate::Deliver { due, duplicate, reordered }
    }

    /// One jitter sample in ms; always consumes two draws (Box-Muller needs
    /// two, uniform uses one and discards one) to keep streams aligned.
    fn jitter_sample_ms(&mut self) -> f64 {
        let (u1, u2): (f64, f64) = (self.effects_rng.gen(), self.effects_rng.gen());
        let j = self.params.jitter_ms;
        if j == 0.0 {
            return 0.0;
        }
        match self.params.jitter_dist {
            JitterDist::Uniform => (2.0 * u1 - 1.0) * j,
            JitterDist::Normal => {
                // Box-Muller; 1 - u1 is in (0, 1] so ln is finite.
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                z.clamp(-4.0, 4.0) * j
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::GilbertElliott;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1e3)
    }

    #[test]
    fn plain_delay() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(LinkParams { delay_ms: 20.0, ..Default::default() }, 1, 0);
        assert_eq!(m.admit(t0, 100), Fate::Deliver { due: t0 + ms(20.0), duplicate: false, reordered: false });
    }

    #[test]
    fn serialisation_and_tail_drop() {
        let t0 = Instant::now();
        // 8000 bit/s = 1000 bytes/s: a 100-byte packet takes 100 ms.
        let p = LinkParams { rate_bits_per_s: 8000, queue_bytes: 250, ..Default::default() };
        let mut m = LinkModel::new(p, 1, 0);
        let due = |f| match f {
            Fate::Deliver { due, .. } => due - t0,
            other => panic!("{other:?}"),
        };
        assert_eq!(due(m.admit(t0, 100)), ms(100.0));
        assert_eq!(due(m.admit(t0, 100)), ms(200.0)); // backlog 100 + 100 <= 250
        assert_eq!(m.admit(t0, 100), Fate::QueueFull); // backlog 200 + 100 > 250
        assert_eq!(due(m.admit(t0 + ms(150.0), 100)), ms(300.0)); // backlog 50
    }

    #[test]
    fn fifo_under_jitter() {
        let t0 = Instant::now();
        let p = LinkParams { delay_ms: 10.0, jitter_ms: 5.0, ..Default::default() };
        let mut m = LinkModel::new(p, 7, 0);
        let mut last = t0;
        for i in 0..1000 {
            let Fate::Deliver { due, .. } = m.admit(t0 + Duration::from_micros(i * 10), 10) else { panic!() };
            assert!(due >= last);
            assert!(due >= t0 + ms(5.0));
            last = due;
        }
    }

    #[test]
    fn loss_pattern_depends_only_on_seed() {
        let pattern = |p: LinkParams, seed| {
            let t0 = Instant::now();
            let mut m = LinkModel::new(p, seed, 0);
            (0..2000).map(|_| m.admit(t0, 10) == Fate::Lost).collect::<Vec<_>>()
        };
        let a = LinkParams { loss_prob: 0.1, ..Default::default() };
        let b = LinkParams { jitter_ms: 3.0, dup_prob: 0.5, reorder_prob: 0.2, ..a.clone() };
        assert_eq!(pattern(a.clone(), 42), pattern(b, 42));
        assert_ne!(pattern(a.clone(), 42), pattern(a, 43));
    }

    #[test]
    fn ge_bursts() {
        let ge = GilbertElliott { p_good_to_bad: 0.01, p_bad_to_good: 0.25, loss_in_good: 0.0, loss_in_bad: 1.0 };
        let mut m = LinkModel::new(LinkParams { gilbert_elliott: Some(ge), ..Default::default() }, 3, 0);
        let t0 = Instant::now();
        let lost: Vec<bool> = (0..200_000).map(|_| m.admit(t0, 10) == Fate::Lost).collect();
        let n_lost = lost.iter().filter(|&&l| l).count();
        let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count();
        let rate = n_lost as f64 / lost.len() as f64;
        let mean_burst = n_lost as f64 / bursts as f64;
        assert!((rate - ge.mean_loss()).abs() < 0.005, "rate {rate}");
        assert!((mean_burst - 4.0).abs() < 0.3, "mean burst {mean_burst}");
    }
}
