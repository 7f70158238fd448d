//! Link parameters: what one direction of an emulated link does to packets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One direction of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client → upstream (towards the replica).
    Up,
    /// Upstream → client (back towards the sender).
    Down,
}

impl Direction {
    /// Both directions, `Up` first.
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    /// Index into per-direction arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }

    /// The word used in commands and logs.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the jitter is distributed around the one-way delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JitterDist {
    /// Uniform in `[-jitter_ms, +jitter_ms]`.
    #[default]
    Uniform,
    /// Normal with standard deviation `jitter_ms`, truncated at ±4σ so that a
    /// single sample cannot stall a FIFO link for long.
    Normal,
}

impl FromStr for JitterDist {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(JitterDist::Uniform),
            "normal" => Ok(JitterDist::Normal),
            _ => Err(Error::Unknown { what: "jitter distribution", name: s.into(), expected: "uniform, normal" }),
        }
    }
}

/// Gilbert-Elliott two-state burst loss.
///
/// The chain steps once per packet entering the link: first the state may
/// change, then the packet is lost with the new state's loss probability.
/// With `loss_in_bad = 1` and `loss_in_good = 0` the mean burst length is
/// `1 / p_bad_to_good` and the long-run loss rate is
/// `p_good_to_bad / (p_good_to_bad + p_bad_to_good)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state, per packet.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state, per packet.
    pub p_bad_to_good: f64,
    /// Loss probability while in the good state.
    pub loss_in_good: f64,
    /// Loss probability while in the bad state.
    pub loss_in_bad: f64,
}

impl GilbertElliott {
    /// Long-run fraction of packets lost by this chain alone.
    pub fn mean_loss(&self) -> f64 {
        let total = self.p_good_to_bad + self.p_bad_to_good;
        if total == 0.0 {
            return self.loss_in_good; // the chain never leaves the good state
        }
        let bad = self.p_good_to_bad / total;
        bad * self.loss_in_bad + (1.0 - bad) * self.loss_in_good
    }

    fn validate(&self) -> Result<()> {
        check_prob("ge.p_good_to_bad", self.p_good_to_bad)?;
        check_prob("ge.p_bad_to_good", self.p_bad_to_good)?;
        check_prob("ge.loss_in_good", self.loss_in_good)?;
        check_prob("ge.loss_in_bad", self.loss_in_bad)
    }
}

impl FromStr for GilbertElliott {
    type Err = Error;
    /// Parses `p_gb,p_bg,loss_good,loss_bad`.
    fn from_str(s: &str) -> Result<Self> {
        const EXPECTED: &str = "four probabilities p_gb,p_bg,loss_good,loss_bad, e.g. 0.01,0.3,0,1";
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 4 {
            return Err(Error::invalid("ge", s, EXPECTED));
        }
        let mut v = [0.0; 4];
        for (slot, part) in v.iter_mut().zip(&parts) {
            *slot = part.parse().map_err(|_| Error::invalid("ge", s, EXPECTED))?;
        }
        let ge = GilbertElliott { p_good_to_bad: v[0], p_bad_to_good: v[1], loss_in_good: v[2], loss_in_bad: v[3] };
        ge.validate()?;
        Ok(ge)
    }
}

/// What one direction of the link does to each packet.
///
/// Order of effects for a datagram entering the link: cut check, loss
/// (independent, then Gilbert-Elliott), tail drop at the serialisation
/// queue, serialisation at `rate_bits_per_s`, then propagation delay with
/// jitter (and extra delay if picked for reordering). Duplicates leave
/// together with their original.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay_ms: f64,
    /// Jitter amplitude (uniform half-width, or normal σ); see [`JitterDist`].
    /// Packets stay in FIFO order: a packet whose sampled delay would let it
    /// overtake its predecessor leaves right after it instead.
    pub jitter_ms: f64,
    /// Shape of the jitter.
    pub jitter_dist: JitterDist,
    /// Link rate; 0 means unlimited (no serialisation delay, no queue).
    pub rate_bits_per_s: u64,
    /// Bound on the serialisation backlog. A packet that would push the
    /// backlog past it is tail-dropped. An empty queue always takes one
    /// packet, so 0 means "no buffering beyond the packet on the wire".
    pub queue_bytes: u64,
    /// Independent loss probability per packet.
    pub loss_prob: f64,
    /// Optional burst loss, applied in addition to `loss_prob`.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Probability that a packet is delivered twice.
    pub dup_prob: f64,
    /// Probability that a packet is held back by `reorder_delay_ms` extra
    /// and leaves the FIFO, so that later packets can overtake it.
    pub reorder_prob: f64,
    /// Extra delay for a packet picked for reordering.
    pub reorder_delay_ms: f64,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            delay_ms: 0.0,
            jitter_ms: 0.0,
            jitter_dist: JitterDist::Uniform,
            rate_bits_per_s: 0,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            loss_prob: 0.0,
            gilbert_elliott: None,
            dup_prob: 0.0,
            reorder_prob: 0.0,
            reorder_delay_ms: DEFAULT_REORDER_DELAY_MS,
        }
    }
}

/// Default serialisation queue: 1 MiB, about one bandwidth-delay product
/// of a 100 Mbit/s, 40 ms round trip link.
pub const DEFAULT_QUEUE_BYTES: u64 = 1 << 20;

/// Default extra delay of a reordered packet.
pub const DEFAULT_REORDER_DELAY_MS: f64 = 5.0;

/// Largest delay we accept (one hour): beyond it `Instant` arithmetic and
/// memory use stop being sensible.
const MAX_DELAY_MS: f64 = 3_600_000.0;

/// Setting names accepted by [`LinkParams::set`].
pub const SETTING_NAMES: &str = "delay_ms, jitter_ms, jitter_dist, rate_bits_per_s, rate_mbit, queue_bytes, \
     loss, ge, dup, reorder, reorder_delay_ms";

impl LinkParams {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        check_ms("delay_ms", self.delay_ms)?;
        check_ms("jitter_ms", self.jitter_ms)?;
        check_ms("reorder_delay_ms", self.reorder_delay_ms)?;
        check_prob("loss", self.loss_prob)?;
        check_prob("dup", self.dup_prob)?;
        check_prob("reorder", self.reorder_prob)?;
        if let Some(ge) = &self.gilbert_elliott {
            ge.validate()?;
        }
        Ok(())
    }

    /// Changes one setting by name, as the control protocol does
    /// (`set loss 0.01`). Dashes and underscores are interchangeable.
    /// The result is validated; on error `self` is unchanged.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let mut next = self.clone();
        next.set_unchecked(&name.replace('-', "_"), value.trim())?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn set_unchecked(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "delay_ms" | "delay" => self.delay_ms = parse_num(name, value)?,
            "jitter_ms" | "jitter" => self.jitter_ms = parse_num(name, value)?,
            "jitter_dist" => self.jitter_dist = value.parse()?,
            "rate_bits_per_s" => self.rate_bits_per_s = parse_num(name, value)?,
            "rate_mbit" => self.rate_bits_per_s = mbit_to_bits(name, parse_num(name, value)?)?,
            "queue_bytes" => self.queue_bytes = parse_num(name, value)?,
            "loss" | "loss_prob" => self.loss_prob = parse_num(name, value)?,
            "ge" | "gilbert_elliott" => self.gilbert_elliott = if value == "off" { None } else { Some(value.parse()?) },
            "dup" | "dup_prob" => self.dup_prob = parse_num(name, value)?,
            "reorder" | "reorder_prob" => self.reorder_prob = parse_num(name, value)?,
            "reorder_delay_ms" => self.reorder_delay_ms = parse_num(name, value)?,
            _ => return Err(Error::Unknown { what: "setting", name: name.into(), expected: SETTING_NAMES }),
        }
        Ok(())
    }
}

/// Converts a rate in Mbit/s (10^6 bits per second) to bits per second.
pub fn mbit_to_bits(name: &str, mbit: f64) -> Result<u64> {
    if !(mbit.is_finite() && (0.0..=1e7).contains(&mbit)) {
        return Err(Error::invalid(name, mbit, "a rate in Mbit/s between 0 (unlimited) and 10000000"));
    }
    Ok((mbit * 1e6).round() as u64)
}

fn parse_num<T: FromStr>(name: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| Error::invalid(name, value, "a number"))
}

pub(crate) fn check_prob(name: &str, p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::invalid(name, p, "a probability between 0 and 1"))
    }
}

pub(crate) fn check_ms(name: &str, ms: f64) -> Result<()> {
    if ms.is_finite() && (0.0..=MAX_DELAY_MS).contains(&ms) {
        Ok(())
    } else {
        Err(Error::invalid(name, ms, "milliseconds between 0 and 3600000"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_and_validates() {
        let mut p = LinkParams::default();
        p.set("loss", "0.01").unwrap();
        p.set("delay-ms", "20").unwrap();
        p.set("rate_mbit", "8").unwrap();
        p.set("ge", "0.01,0.3,0,1").unwrap();
        assert_eq!(p.loss_prob, 0.01);
        assert_eq!(p.delay_ms, 20.0);
        assert_eq!(p.rate_bits_per_s, 8_000_000);
        assert!(p.gilbert_elliott.is_some());
        p.set("ge", "off").unwrap();
        assert!(p.gilbert_elliott.is_none());
        let before = p.clone();
        assert!(p.set("loss", "1.5").is_err());
        assert!(p.set("delay_ms", "-1").is_err());
        assert!(p.set("delay_ms", "NaN").is_err());
        assert!(p.set("ge", "0.1,0.2").is_err());
        assert!(p.set("bogus", "1").is_err());
        assert_eq!(p, before, "a rejected setting leaves the params unchanged");
    }

    #[test]
    fn ge_mean_loss() {
        let ge: GilbertElliott = "0.01,0.25,0,1".parse().unwrap();
        assert!((ge.mean_loss() - 0.01 / 0.26).abs() < 1e-12);
    }
}
