//! Human-readable byte sizes: parsing (`4k`, `64KiB`, `8G`, `1.5T`) and display.
//!
//! # Decisions
//! - **All units are powers of 1024**, whether written `k`, `K`, `KB` or `KiB`
//!   (likewise `M`, `G`, `T`, `P`). This is the block-storage convention:
//!   `4k` means a 4096-byte block to every storage operator, and a volume that
//!   is "8GB" by the power-of-1000 reading would not even be a multiple of a
//!   4 KiB block. Units are case-insensitive; a trailing `B` is optional.
//! - A bare number, or a number followed by `B`, is a byte count.
//! - Whitespace is allowed around the number and between number and unit.
//! - A decimal fraction is accepted when the result is a whole number of bytes
//!   (`1.5G`, `0.5k`); `0.3k` (307.2 bytes) is rejected rather than rounded,
//!   because silently rounding a size is how volumes end up misaligned.
//! - Every arithmetic step is overflow-checked; sizes above `u64::MAX` are
//!   errors, never wrapped.

use std::fmt;

/// The text appended to every error to say what a size should look like.
const EXPECTED: &str = "expected a number with an optional unit k, M, G, T, P (powers of 1024), e.g. 4k, 64KiB, 8G";

/// Most fraction digits accepted; 20 digits already exceed any exact
/// fraction of a 1024-power unit that `u64` can hold.
const MAX_FRACTION_DIGITS: usize = 20;

/// Why a size string was rejected. Every variant's message quotes the input
/// and says what a valid size looks like; [`SizeError::reason`] gives the
/// message without the quoted input, for callers that show it themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// The input was empty or only whitespace.
    Empty,
    /// The input did not start with a (non-negative, decimal) number.
    InvalidNumber {
        /// The text as given.
        input: String,
        /// What is wrong with the number part.
        problem: String,
    },
    /// The number was followed by something that is not a known unit.
    UnknownUnit {
        /// The text as given.
        input: String,
        /// The unrecognised unit text.
        unit: String,
    },
    /// The size does not fit in 64 bits.
    Overflow {
        /// The text as given.
        input: String,
    },
    /// A fractional size did not come to a whole number of bytes.
    NotWholeBytes {
        /// The text as given.
        input: String,
    },
}

impl SizeError {
    /// The rejected text, if there was any.
    pub fn input(&self) -> Option<&str> {
        match self {
            SizeError::Empty => None,
            SizeError::InvalidNumber { input, .. }
            | SizeError::UnknownUnit { input, .. }
            | SizeError::Overflow { input }
            | SizeError::NotWholeBytes { input } => Some(input),
        }
    }

    /// What was wrong and what was expected, without repeating the input.
    pub fn reason(&self) -> String {
        match self {
            SizeError::Empty => format!("empty size; {EXPECTED}"),
            SizeError::InvalidNumber { problem, .. } => format!("{problem}; {EXPECTED}"),
            SizeError::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}; {EXPECTED}"),
            SizeError::Overflow { .. } => {
                format!("too large (the maximum is {} bytes); {EXPECTED}", u64::MAX)
            }
            SizeError::NotWholeBytes { .. } => "is not a whole number of bytes; use a smaller \
                 unit or fewer decimals, e.g. 1.5G or 1536M"
                .to_string(),
        }
    }
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(input) = self.input() {
            write!(f, "{input:?}: ")?;
        }
        f.write_str(&self.reason())
    }
}

impl std::error::Error for SizeError {}

/// Parses a size such as `512`, `4k`, `4K`, `64KiB`, `64KB`, `8G`, `8GiB`,
/// `1T` or `1.5 G` into bytes. All units are powers of 1024 (see the module
/// documentation for why).
///
/// # Errors
/// A [`SizeError`] naming the input, what was wrong with it and what a size
/// looks like.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty);
    }
    let number_end = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let unit = unit.trim_start();
    let multiplier = unit_multiplier(unit).ok_or_else(|| {
        // A leading sign or other junk shows up as an "empty number"; say so
        // rather than calling the whole input a unit.
        if number.is_empty() {
            invalid(s, format!("does not start with a number (found {unit:?})"))
        } else {
            SizeError::UnknownUnit { input: s.to_string(), unit: unit.to_string() }
        }
    })?;
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid(s, "does not start with a number".to_string()));
    }
    if fraction.contains('.') {
        return Err(invalid(s, "has more than one decimal point".to_string()));
    }
    if number.ends_with('.') {
        return Err(invalid(s, "has a decimal point with no digits after it".to_string()));
    }
    let overflow = || SizeError::Overflow { input: s.to_string() };
    let whole_value = parse_digits(whole).ok_or_else(overflow)?;
    let whole_bytes = whole_value.checked_mul(multiplier).ok_or_else(overflow)?;
    let fraction_bytes = fraction_bytes(s, fraction, multiplier)?;
    whole_bytes.checked_add(fraction_bytes).ok_or_else(overflow)
}

/// Builds an [`SizeError::InvalidNumber`].
fn invalid(input: &str, problem: String) -> SizeError {
    SizeError::InvalidNumber { input: input.to_string(), problem }
}

/// Maps a unit suffix (already separated from the number) to its multiplier.
fn unit_multiplier(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    // Accept "k", "kb" and "kib" alike (see module docs: all are 1024-based).
    let base = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let shift = match base {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    // "ib" on its own ("4ib") is not a unit.
    if base.is_empty() && lower == "ib" {
        return None;
    }
    Some(1u64 << shift)
}

/// Parses a string of ASCII digits (possibly empty, meaning 0); `None` on overflow.
fn parse_digits(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0u64, |acc, b| acc.checked_mul(10)?.checked_add(u64::from(b - b'0')))
}

/// Converts the digits after the decimal point into a whole number of bytes,
/// rejecting fractions that do not come out exact.
fn fraction_bytes(input: &str, fraction: &str, multiplier: u64) -> Result<u64, SizeError> {
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        return Ok(0);
    }
    let not_whole = || SizeError::NotWholeBytes { input: input.to_string() };
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(not_whole());
    }
    // u128 keeps numerator * multiplier exact: < 10^20 * 2^50 < 2^117.
    let numerator = u128::from(parse_digits(fraction).ok_or_else(not_whole)?);
    let denominator = 10u128.pow(fraction.len() as u32);
    let scaled = numerator * u128::from(multiplier);
    if !scaled.is_multiple_of(denominator) {
        return Err(not_whole());
    }
    // scaled / denominator < multiplier, so it fits in u64.
    u64::try_from(scaled / denominator).map_err(|_| not_whole())
}

/// Parses a link rate: a decimal number and a unit `bit`, `kbit`, `Mbit`
/// or `Gbit` (case-insensitive, an optional `/s`), e.g. `"40Mbit"` or
/// `"2.5 Gbit/s"`. Network rates are powers of 1000, unlike sizes. Returns
/// bits per second; the error says what a rate looks like.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    const EXPECTED_RATE: &str =
        "expected a number and a unit bit, kbit, Mbit or Gbit (powers of 1000), e.g. \"40Mbit\"";
    let trimmed = s.trim();
    let number_end = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let multiplier = match unit {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(format!("unknown or missing unit; {EXPECTED_RATE}")),
    };
    let value: f64 = number.parse().map_err(|_| format!("does not start with a number; {EXPECTED_RATE}"))?;
    let bits = (value * multiplier).round();
    if !bits.is_finite() || !(1.0..=1e12).contains(&bits) {
        return Err(format!("out of range; expected 1 bit/s to 1000 Gbit/s, {EXPECTED_RATE}"));
    }
    // Checked just above: a whole number in 1..=1e12.
    Ok(bits as u64)
}

/// Formats a link rate in bits per second for people: `40.0 Mbit/s`
/// (powers of 1000, like [`parse_rate`]).
pub fn format_rate(bits_per_s: u64) -> String {
    format!("{:.1} Mbit/s", bits_per_s as f64 / 1e6)
}

/// Formats a byte count for people: `512 B`, `1.5 KiB`, `8.0 GiB`.
///
/// One decimal place, 1024-based units, matching what [`parse_size`]
/// accepts. The value is rounded for display; use the byte count where
/// exactness matters.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Pick the largest unit whose value is at least 1.
    let exponent = (bytes.ilog2() / 10).min(UNITS.len() as u32);
    let value = bytes as f64 / (1u64 << (exponent * 10)) as f64;
    format!("{value:.1} {}", UNITS[exponent as usize - 1])
}

/// A byte count that displays via [`format_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_powers_of_1000() {
        assert_eq!(parse_rate("40Mbit"), Ok(40_000_000));
        assert_eq!(parse_rate(" 2.5 Gbit/s "), Ok(2_500_000_000));
        assert_eq!(parse_rate("64kbit"), Ok(64_000));
        assert_eq!(parse_rate("800 bit"), Ok(800));
        for bad in ["", "40", "40MB", "Mbit", "-1Mbit", "0Mbit", "1.2.3Mbit", "2000Gbit"] {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains("e.g. \"40Mbit\""), "{bad}: {e}");
        }
    }

    const KI: u64 = 1024;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("  512 b "), Ok(512));
    }

    #[test]
    fn all_spellings_of_a_unit_are_1024_based() {
        for s in ["4k", "4K", "4kb", "4KB", "4KiB", "4kib", "4 KiB", " 4 k "] {
            assert_eq!(parse_size(s), Ok(4 * KI), "{s}");
        }
        assert_eq!(parse_size("64KiB"), Ok(64 * KI));
        assert_eq!(parse_size("64KB"), Ok(64 * KI));
        assert_eq!(parse_size("256MiB"), Ok(256 * KI * KI));
        assert_eq!(parse_size("8G"), Ok(8 * KI * KI * KI));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
    }

    #[test]
    fn exact_fractions_are_accepted() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("2.0"), Ok(2));
        assert_eq!(parse_size("1.000000000000000000000000k"), Ok(1024));
    }

    #[test]
    fn inexact_fractions_are_rejected() {
        let err = parse_size("0.3k").unwrap_err();
        assert!(matches!(err, SizeError::NotWholeBytes { .. }));
        assert!(err.to_string().contains("\"0.3k\""), "{err}");
        assert!(parse_size("1.5").is_err());
    }

    #[test]
    fn unknown_unit_names_the_unit_and_the_expected_form() {
        let err = parse_size("8X").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"8X\": unknown unit \"X\"; expected a number with an optional unit \
             k, M, G, T, P (powers of 1024), e.g. 4k, 64KiB, 8G"
        );
        for s in ["4ib", "4 kk", "4kibb", "8 GB extra", "4e3"] {
            assert!(matches!(parse_size(s), Err(SizeError::UnknownUnit { .. })), "{s}");
        }
    }

    #[test]
    fn malformed_numbers_are_rejected() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        for s in ["-4k", "k", "abc", ".", "1.2.3k", "4.k", "+4"] {
            let err = parse_size(s).unwrap_err();
            assert!(matches!(err, SizeError::InvalidNumber { .. }), "{s}: {err:?}");
            assert!(err.to_string().contains("expected"), "{err}");
        }
    }

    #[test]
    fn overflow_is_an_error() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for s in ["18446744073709551616", "16777216T", "99999999999999999999999G"] {
            assert!(matches!(parse_size(s), Err(SizeError::Overflow { .. })), "{s}");
        }
        // The largest whole-plus-fraction value still fits exactly.
        assert_eq!(parse_size("16383.9990234375P"), Ok(u64::MAX - (1 << 40) + 1));
        assert!(matches!(parse_size("16384P"), Err(SizeError::Overflow { .. })));
    }

    #[test]
    fn format_picks_the_largest_unit() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(8 << 30), "8.0 GiB");
        assert_eq!(format_size(256 << 20), "256.0 MiB");
        assert_eq!(format_size(1 << 40), "1.0 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
        assert_eq!(ByteSize(4096).to_string(), "4.0 KiB");
    }

    #[test]
    fn format_round_trips_through_parse_for_whole_units() {
        for bytes in [1024, 4096, 64 << 10, 8 << 30, 3 << 40] {
            let shown = format_size(bytes);
            assert_eq!(parse_size(&shown), Ok(bytes), "{shown}");
        }
    }
}
