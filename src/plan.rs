//! `starblk plan`: StarFish's availability model (StarFish, see docs/semantics.md "Sources").
//!
//! With `a` the availability of one replica and `ρ = (1−a)/a` its load:
//!
//! - **Eq. 1** (write quorum): `A(Q,N) = Σ_{i=0}^{N−Q} C(N,i) ρ^i / (1+ρ)^N`.
//! - **Eq. 2** (read-only consistency, with the host element's load `ρ_he`):
//!   `A_RO(Q,N) = Σ_{i=0}^{N−1} C(N,i) ρ^i / ((1+ρ_he)(1+ρ)^N)
//!              + ρ_he Σ_{i=0}^{Q−1} C(Q,i) ρ^i / ((1+ρ_he)(1+ρ)^Q)`.
//!
//! # Decisions (see `/work/shared/notes/starfish-tables.md`)
//! - **Nines come from the unavailability `U`, computed directly**, never as
//!   `1 − A`: for a 12-nines system `1 − A` has lost almost every significant
//!   bit to cancellation. Since `1 + ρ = 1/a`, each term `ρ^i/(1+ρ)^N` equals
//!   `(1−a)^i a^(N−i)`, which is what the code evaluates (it stays finite as
//!   `a → 0`, where `ρ` does not). `1 − a` itself is exact for `a ≥ 0.5`.
//! - **Eq. 2's complement is taken analytically.** The first sum is
//!   `1 − (1−a)^N` and the second `1 − (1−a)^Q`, and `1/(1+ρ_he) = a_he`, so
//!   `U_RO = a_he (1−a)^N + (1 − a_he)(1−a)^Q`, with no subtraction of
//!   nearly equal numbers.
//! - **Nines = ⌊−log₁₀ U + 10⁻⁶⌋.** The epsilon keeps values that sit on a
//!   power of ten (`1 − 0.9999` is not exactly `10⁻⁴` in binary, so `U`
//!   lands a hair above `10⁻¹⁶`) from losing a nine. The report computes
//!   `log₁₀ U` in the log domain, so extreme inputs whose `U` underflows
//!   `f64` still get the right count.
//! - **The HE availability defaults to 1 (`ρ_he = 0`) in read-only mode.**
//!   No single HE availability makes Eq. 2 reproduce the printed Table 2 (the
//!   note found at best 19 of 36 cells); with `ρ_he = 0` the text's headline
//!   (N=3, Q=2, 99 % → 6 nines) holds. The report says when the default was
//!   used. The code implements Eq. 2 as written and is not bent toward
//!   Table 2's printed cells.
//! - `--he-availability` without `--read-only` is rejected: Eq. 1 has no HE
//!   term, and silently ignoring the flag would mislead.
//! - Availabilities are accepted on the closed interval `[0, 1]`; `a = 1`
//!   gives `U = 0`, reported as unbounded nines.

use std::fmt;

/// Largest replica count `plan` accepts. `C(64, 32)` still fits a `u64`, and
/// no real volume has more replicas.
pub const MAX_REPLICAS: usize = 64;

/// Added before flooring `−log₁₀ U`, so that a value a rounding error above
/// an exact power of ten still counts the full number of nines.
const NINES_EPSILON: f64 = 1e-6;

/// `C(n, k)` as `f64`. The multiplicative form keeps every intermediate a
/// (rounded) binomial coefficient, so nothing overflows for `n ≤ 1000`.
fn binomial(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    let k = k.min(n - k);
    (1..=k).fold(1.0, |c, i| c * (n - k + i) as f64 / i as f64)
}

/// Converts an exponent to `i32` for `powi`; counts here are ≤ 64 in practice.
fn exp(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Unavailability of a write quorum, StarFish Eq. 1 complemented directly:
/// `U = Σ_{i=N−Q+1}^{N} C(N,i) ρ^i / (1+ρ)^N`, the probability that more than
/// `N − Q` of the `n` replicas are down at once.
///
/// `a` is one replica's availability in `[0, 1]` (out of range gives NaN).
/// `q > n` gives 1 (a quorum larger than the set is never met) and `q = 0`
/// gives 0; [`plan`] rejects both before calling this.
pub fn quorum_unavailability(q: usize, n: usize, a: f64) -> f64 {
    if !(0.0..=1.0).contains(&a) {
        return f64::NAN;
    }
    let p = 1.0 - a;
    let first = (n + 1).saturating_sub(q);
    // Ascending i: for a > 0.5 the terms shrink with i, so adding from the
    // top down would be marginally better, but with ≤ 64 terms of one sign
    // the sum is accurate either way; no cancellation can occur.
    (first..=n).map(|i| binomial(n, i) * p.powi(exp(i)) * a.powi(exp(n - i))).sum()
}

/// Availability of a write quorum, StarFish Eq. 1: `1 −`
/// [`quorum_unavailability`]. Use the unavailability for counting nines.
pub fn availability(q: usize, n: usize, a: f64) -> f64 {
    1.0 - quorum_unavailability(q, n, a)
}

/// Unavailability with read-only consistency, StarFish Eq. 2 complemented
/// analytically: `U_RO = a_he (1−a)^N + (1 − a_he)(1−a)^Q`.
///
/// `he_a` is the host element's availability (`ρ_he = (1−a_he)/a_he`); with
/// `he_a = 1` this is `(1−a)^N`, independent of `q`, as the paper observes.
/// Inputs outside `[0, 1]` give NaN.
pub fn read_only_unavailability(q: usize, n: usize, a: f64, he_a: f64) -> f64 {
    if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&he_a) {
        return f64::NAN;
    }
    let p = 1.0 - a;
    he_a * p.powi(exp(n)) + (1.0 - he_a) * p.powi(exp(q))
}

/// Number of nines of an unavailability: `⌊−log₁₀ U + ε⌋` with a small `ε`
/// (see the module documentation). `U ≤ 0` (a perfect system) gives
/// `u32::MAX`; `U ≥ 1` or NaN gives 0.
pub fn nines(u: f64) -> u32 {
    if u <= 0.0 {
        return u32::MAX;
    }
    nines_from_log10(u.log10())
}

/// [`nines`] from `log₁₀ U`, for values too small to hold in an `f64`.
fn nines_from_log10(log10_u: f64) -> u32 {
    let n = (-log10_u + NINES_EPSILON).floor();
    if n.is_nan() || n <= 0.0 {
        0
    } else {
        // `as` saturates at u32::MAX, which is the intended meaning for +∞.
        n as u32
    }
}

/// `log₁₀` of a sum of terms given by their natural logs (log-sum-exp).
fn log10_sum_of_exp(ln_terms: &[f64]) -> f64 {
    let max = ln_terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = ln_terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()) / std::f64::consts::LN_10
}

/// `log₁₀` of [`quorum_unavailability`], exact even where `U` underflows.
fn log10_quorum_unavailability(q: usize, n: usize, a: f64) -> f64 {
    let (ln_p, ln_a) = ((1.0 - a).ln(), a.ln());
    let terms: Vec<f64> = ((n + 1).saturating_sub(q)..=n)
        .map(|i| binomial(n, i).ln() + ln_term(i, ln_p) + ln_term(n - i, ln_a))
        .collect();
    log10_sum_of_exp(&terms)
}

/// `log₁₀` of [`read_only_unavailability`], exact even where `U` underflows.
fn log10_read_only_unavailability(q: usize, n: usize, a: f64, he_a: f64) -> f64 {
    let ln_p = (1.0 - a).ln();
    let terms = [he_a.ln() + ln_term(n, ln_p), (1.0 - he_a).ln() + ln_term(q, ln_p)];
    log10_sum_of_exp(&terms)
}

/// `k · ln x`, treating `0 · ln 0` as `ln 1 = 0` (so `0^0 = 1`).
fn ln_term(k: usize, ln_x: f64) -> f64 {
    if k == 0 {
        0.0
    } else {
        k as f64 * ln_x
    }
}

/// Why `plan` refused its inputs. Messages name the flag and the valid range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// `--replicas` was 0 or above [`MAX_REPLICAS`].
    #[error("--replicas {0}: the number of replicas must be between 1 and {MAX_REPLICAS}")]
    Replicas(usize),
    /// `--quorum` was 0 or larger than `--replicas`.
    #[error("--quorum {quorum}: the write quorum must be between 1 and the number of replicas ({replicas})")]
    Quorum {
        /// The quorum given.
        quorum: usize,
        /// The replica count given.
        replicas: usize,
    },
    /// An availability was not a number in `[0, 1]`.
    #[error(
        "{flag} {value}: an availability must be a fraction between 0 and 1 (e.g. 0.99) or a percentage (e.g. 99%)"
    )]
    Availability {
        /// The flag the value came from (`--availability` or `--he-availability`).
        flag: &'static str,
        /// The value as given.
        value: String,
    },
    /// `--he-availability` was given without `--read-only`.
    #[error("--he-availability only applies with --read-only (Eq. 1 has no host-element term)")]
    HeAvailabilityWithoutReadOnly,
}

/// Parses an availability as a fraction (`0.99`) or a percentage (`99%`,
/// `99.9 %`), for the `--availability` and `--he-availability` flags.
///
/// `flag` names the flag in the error. A bare number above 1 is rejected
/// rather than read as a percentage: `99.9` and `0.999` must not be confused.
///
/// # Errors
/// [`PlanError::Availability`] for anything but a number in `[0, 1]` or a
/// percentage in `[0 %, 100 %]`.
pub fn parse_availability(flag: &'static str, s: &str) -> Result<f64, PlanError> {
    let err = || PlanError::Availability { flag, value: s.to_string() };
    let trimmed = s.trim();
    let value = match trimmed.strip_suffix('%') {
        Some(pct) => pct.trim_end().parse::<f64>().map_err(|_| err())? / 100.0,
        None => trimmed.parse::<f64>().map_err(|_| err())?,
    };
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(err())
    }
}

/// Which of StarFish's equations a report evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// Eq. 1: writes need `Q` of `N` replicas up.
    Quorum,
    /// Eq. 2: read-only consistency (reads survive quorum loss).
    ReadOnly,
}

/// The result of [`plan`]: inputs, the availability, the unavailability and
/// the number of nines. Serialisable for `--json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanReport {
    /// Which equation was evaluated.
    pub model: Model,
    /// N, the number of replicas.
    pub replicas: usize,
    /// Q, the write quorum.
    pub quorum: usize,
    /// `a`, the availability of one replica.
    pub replica_availability: f64,
    /// The host element's availability used by Eq. 2; `None` for Eq. 1.
    pub he_availability: Option<f64>,
    /// True when `he_availability` is the default 1 (`ρ_he = 0`), not given.
    pub he_availability_defaulted: bool,
    /// System availability, `1 − unavailability` (rounded; for display).
    pub availability: f64,
    /// System unavailability, computed without cancellation.
    pub unavailability: f64,
    /// Whole nines of availability; `None` when unavailability is exactly 0.
    pub nines: Option<u32>,
    /// True when `Q ≤ ⌊N/2⌋`: losing the HE and `Q` up-to-date replicas can
    /// lose acknowledged writes (StarFish §4.2).
    pub data_loss_possible: bool,
}

/// Evaluates StarFish Eq. 1, or Eq. 2 when `read_only`, after validating the
/// inputs: `1 ≤ replicas ≤ 64`, `1 ≤ quorum ≤ replicas`, availabilities in
/// `[0, 1]`, and `he_availability` only with `read_only` (default 1 there).
///
/// # Errors
/// A [`PlanError`] naming the offending flag and its valid range.
pub fn plan(
    replicas: usize,
    quorum: usize,
    availability: f64,
    he_availability: Option<f64>,
    read_only: bool,
) -> Result<PlanReport, PlanError> {
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(PlanError::Replicas(replicas));
    }
    if quorum == 0 || quorum > replicas {
        return Err(PlanError::Quorum { quorum, replicas });
    }
    check_availability("--availability", availability)?;
    if let Some(he) = he_availability {
        if !read_only {
            return Err(PlanError::HeAvailabilityWithoutReadOnly);
        }
        check_availability("--he-availability", he)?;
    }
    let (n, q, a) = (replicas, quorum, availability);
    let (model, he, unavailability, log10_u) = if read_only {
        let he = he_availability.unwrap_or(1.0);
        let u = read_only_unavailability(q, n, a, he);
        let log10_u = log10_read_only_unavailability(q, n, a, he);
        (Model::ReadOnly, Some(he), u, log10_u)
    } else {
        let u = quorum_unavailability(q, n, a);
        (Model::Quorum, None, u, log10_quorum_unavailability(q, n, a))
    };
    Ok(PlanReport {
        model,
        replicas,
        quorum,
        replica_availability: availability,
        he_availability: he,
        he_availability_defaulted: read_only && he_availability.is_none(),
        availability: 1.0 - unavailability,
        unavailability,
        nines: (log10_u > f64::NEG_INFINITY).then(|| nines_from_log10(log10_u)),
        data_loss_possible: quorum <= replicas / 2,
    })
}

/// Rejects NaN and values outside `[0, 1]`.
fn check_availability(flag: &'static str, value: f64) -> Result<(), PlanError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(PlanError::Availability { flag, value: value.to_string() })
    }
}

/// Formats a fraction as a percentage with `decimals` places, trailing zeros
/// trimmed (`0.99` → `99%`, `0.999702` → `99.9702%`).
fn percent(fraction: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, fraction * 100.0);
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
    format!("{s}%")
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = match self.model {
            Model::Quorum => "StarFish Eq. 1 (write-quorum availability)",
            Model::ReadOnly => "StarFish Eq. 2 (read-only consistency)",
        };
        writeln!(
            f,
            "{title}: N = {} replicas, Q = {}, replica availability {}",
            self.replicas,
            self.quorum,
            percent(self.replica_availability, 12)
        )?;
        if let Some(he) = self.he_availability {
            let note = if self.he_availability_defaulted {
                " (default: the host element is assumed always available, ρ_he = 0; \
                 give --he-availability to model a fallible one)"
            } else {
                ""
            };
            writeln!(f, "  HE availability: {}{note}", percent(he, 12))?;
        }
        // Enough decimals to show every nine plus two significant digits,
        // capped where f64 stops carrying information.
        let decimals = self.nines.map_or(15, |n| (n as usize + 1).min(15));
        writeln!(f, "  availability:    {}", percent(self.availability, decimals))?;
        writeln!(f, "  unavailability:  {:.3e}", self.unavailability)?;
        match self.nines {
            Some(n) => writeln!(f, "  nines:           {n}")?,
            None => writeln!(f, "  nines:           unbounded (unavailability is 0)")?,
        }
        if self.data_loss_possible && self.model == Model::Quorum {
            writeln!(
                f,
                "  note: Q ≤ N/2, so losing the HE and Q up-to-date replicas can lose \
                 acknowledged writes (StarFish §4.2); Q > N/2 rules this out"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One Table 1 cell: (Q, N, nines).
    type Cell = (usize, usize, u32);

    /// Table 1 of the note: (a, the row's nine cells).
    const TABLE_1: [(f64, [Cell; 9]); 4] = [
        (0.9, [(1, 2, 2), (1, 3, 3), (1, 4, 4), (2, 3, 1), (2, 4, 2), (2, 5, 3), (3, 3, 0), (3, 4, 1), (3, 5, 2)]),
        (0.99, [(1, 2, 4), (1, 3, 6), (1, 4, 8), (2, 3, 3), (2, 4, 5), (2, 5, 7), (3, 3, 1), (3, 4, 3), (3, 5, 5)]),
        (0.999, [(1, 2, 6), (1, 3, 9), (1, 4, 12), (2, 3, 5), (2, 4, 8), (2, 5, 11), (3, 3, 2), (3, 4, 5), (3, 5, 8)]),
        (
            0.9999,
            [(1, 2, 8), (1, 3, 12), (1, 4, 16), (2, 3, 7), (2, 4, 11), (2, 5, 15), (3, 3, 3), (3, 4, 7), (3, 5, 11)],
        ),
    ];

    #[test]
    fn every_table_1_cell_reproduces() {
        for (a, cells) in TABLE_1 {
            for (q, n, want) in cells {
                let u = quorum_unavailability(q, n, a);
                assert_eq!(nines(u), want, "a={a} Q={q} N={n} U={u:e}");
                let report = plan(n, q, a, None, false).unwrap();
                assert_eq!(report.nines, Some(want), "report a={a} Q={q} N={n}");
            }
        }
    }

    #[test]
    fn unavailability_matches_eq_1_as_written() {
        // Eq. 1 summed literally in ρ form, at a value where 1 − A is harmless.
        let (q, n, a) = (2usize, 5usize, 0.9f64);
        let rho = (1.0 - a) / a;
        let eq1: f64 = (0..=n - q).map(|i| binomial(n, i) * rho.powi(i as i32) / (1.0 + rho).powi(n as i32)).sum();
        assert!((availability(q, n, a) - eq1).abs() < 1e-15);
        let direct: f64 =
            (n - q + 1..=n).map(|i| binomial(n, i) * rho.powi(i as i32) / (1.0 + rho).powi(n as i32)).sum();
        assert!((quorum_unavailability(q, n, a) - direct).abs() < 1e-17);
    }

    #[test]
    fn direct_unavailability_avoids_cancellation() {
        // Q=1, N=4, a=0.9999: U ≈ 1e-16, which 1 − A cannot represent.
        let u = quorum_unavailability(1, 4, 0.9999);
        assert!((u / 1e-16 - 1.0).abs() < 1e-6, "{u:e}");
        // 1 − A is off by more than 10 % at this level.
        let via_complement = 1.0 - availability(1, 4, 0.9999);
        assert!((via_complement / u - 1.0).abs() > 0.1, "{via_complement:e}");
    }

    #[test]
    fn full_quorum_of_three_is_less_available_than_one_replica() {
        for a in [0.9, 0.99, 0.999, 0.9999] {
            assert!(quorum_unavailability(3, 3, a) > 1.0 - a, "a={a}");
            assert!(availability(3, 3, a) < a);
        }
    }

    #[test]
    fn read_only_headline_is_six_nines() {
        let report = plan(3, 2, 0.99, None, true).unwrap();
        assert_eq!(report.model, Model::ReadOnly);
        assert_eq!(report.nines, Some(6));
        assert_eq!(report.he_availability, Some(1.0));
        assert!(report.he_availability_defaulted);
        let shown = report.to_string();
        assert!(shown.contains("ρ_he = 0"), "{shown}");
        assert!(shown.contains("nines:           6"), "{shown}");
    }

    #[test]
    fn read_only_matches_eq_2_as_written() {
        let (q, n, a, he) = (2usize, 3usize, 0.9f64, 0.95f64);
        let (rho, rho_he) = ((1.0 - a) / a, (1.0 - he) / he);
        let s1: f64 = (0..n).map(|i| binomial(n, i) * rho.powi(i as i32)).sum::<f64>()
            / ((1.0 + rho_he) * (1.0 + rho).powi(n as i32));
        let s2: f64 = rho_he * (0..q).map(|i| binomial(q, i) * rho.powi(i as i32)).sum::<f64>()
            / ((1.0 + rho_he) * (1.0 + rho).powi(q as i32));
        let u = read_only_unavailability(q, n, a, he);
        assert!(((1.0 - (s1 + s2)) - u).abs() < 1e-15, "{u:e}");
        // With a fallible HE, a larger Q helps (paper, Figure 4).
        assert!(read_only_unavailability(3, 3, a, he) < read_only_unavailability(1, 3, a, he));
        // With a perfect HE, Q does not matter and Eq. 2 is 1 − (1−a)^N.
        let perfect = read_only_unavailability(1, 3, a, 1.0);
        assert_eq!(perfect, read_only_unavailability(3, 3, a, 1.0));
        assert!((perfect - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn explicit_he_availability_is_used_and_not_marked_default() {
        let report = plan(3, 2, 0.99, Some(0.99), true).unwrap();
        assert!(!report.he_availability_defaulted);
        // U = 0.99·1e-6 + 0.01·1e-4 ≈ 1.99e-6 → 5 nines.
        assert_eq!(report.nines, Some(5));
        assert!(!report.to_string().contains("default"));
    }

    #[test]
    fn nines_edges() {
        assert_eq!(nines(0.0), u32::MAX);
        assert_eq!(nines(1.0), 0);
        assert_eq!(nines(2.0), 0);
        assert_eq!(nines(f64::NAN), 0);
        assert_eq!(nines(0.5), 0);
        assert_eq!(nines(1e-3), 3);
        assert_eq!(nines(1.0000000001e-3), 3);
        assert_eq!(nines(1.1e-3), 2);
        assert_eq!(nines(9.9e-4), 3);
    }

    #[test]
    fn perfect_and_useless_replicas() {
        let perfect = plan(3, 2, 1.0, None, false).unwrap();
        assert_eq!(perfect.unavailability, 0.0);
        assert_eq!(perfect.nines, None);
        assert!(perfect.to_string().contains("unbounded"));
        let useless = plan(3, 2, 0.0, None, false).unwrap();
        assert_eq!(useless.unavailability, 1.0);
        assert_eq!(useless.nines, Some(0));
    }

    #[test]
    fn underflowing_unavailability_still_counts_nines() {
        // (1e-12)^64 = 1e-768 underflows f64; the log-domain count does not.
        let report = plan(64, 1, 1.0 - 1e-12, None, false).unwrap();
        assert_eq!(report.unavailability, 0.0);
        let n = report.nines.unwrap();
        assert!((767..=768).contains(&n), "{n}");
    }

    #[test]
    fn invalid_inputs_are_rejected_with_the_flag_named() {
        let cases = [
            (plan(0, 1, 0.99, None, false), "--replicas 0"),
            (plan(65, 1, 0.99, None, false), "--replicas 65"),
            (plan(3, 0, 0.99, None, false), "--quorum 0"),
            (plan(3, 4, 0.99, None, false), "--quorum 4"),
            (plan(3, 2, 1.5, None, false), "--availability 1.5"),
            (plan(3, 2, f64::NAN, None, false), "--availability NaN"),
            (plan(3, 2, -0.1, None, false), "--availability -0.1"),
            (plan(3, 2, 0.99, Some(2.0), true), "--he-availability 2"),
            (plan(3, 2, 0.99, Some(0.9), false), "--he-availability only"),
        ];
        for (result, want) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn availability_strings() {
        assert_eq!(parse_availability("--availability", "0.99"), Ok(0.99));
        assert_eq!(parse_availability("--availability", " 1 "), Ok(1.0));
        let pct = parse_availability("--availability", "99.9 %").unwrap();
        assert!((pct - 0.999).abs() < 1e-15);
        for bad in ["99", "1.01", "-0.5", "abc", "", "%", "101%"] {
            let err = parse_availability("--availability", bad).unwrap_err();
            assert!(err.to_string().contains("e.g. 0.99"), "{err}");
        }
    }

    #[test]
    fn report_display_and_json() {
        let report = plan(3, 2, 0.99, None, false).unwrap();
        let shown = report.to_string();
        assert!(shown.starts_with("StarFish Eq. 1"), "{shown}");
        assert!(shown.contains("replica availability 99%"), "{shown}");
        assert!(shown.contains("availability:    99.97"), "{shown}");
        assert!(shown.contains("nines:           3"), "{shown}");
        assert!(!shown.contains("Q ≤ N/2"), "{shown}");
        assert!(plan(3, 1, 0.99, None, false).unwrap().to_string().contains("Q ≤ N/2"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["model"], "quorum");
        assert_eq!(json["nines"], 3);
        assert_eq!(json["he_availability"], serde_json::Value::Null);
    }
}
