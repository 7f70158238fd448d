//! Prometheus metrics: the text exposition format, the HE's and a
//! replica's metric families, and a small HTTP server for `/metrics`
//! (`docs/operations.md`, "Metrics").
//!
//! [`Exposition`] writes the text format (version 0.0.4): each family gets
//! its HELP and TYPE lines once, followed by all its samples, which is what
//! the format and `promtool check metrics` require. Adding a family is one
//! call, e.g. in [`volume`]:
//! `x.counter("starblk_replica_sessions_total", "...", per_replica(st, |r| r.sessions));`

pub mod http;
pub mod replica;
pub mod request;
pub mod volume;

use std::fmt::Write as _;

use crate::engine::latency::HistogramSnapshot;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts); name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative `le` buckets plus `_sum` and `_count`.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample value: integers print exactly, floats in Prometheus' syntax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count, seq or byte size.
    Int(u64),
    /// A ratio, or a time in seconds.
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(u64::from(v))
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Label pairs of one sample, owned (values come from status snapshots).
pub type Labels = Vec<(&'static str, String)>;

/// One sample of a family: its labels and its value.
pub type Sample = (Labels, Value);

/// A metrics page being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    families: Vec<&'static str>,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// The page's text.
    pub fn finish(self) -> String {
        self.out
    }

    /// A counter family (`name` ends in `_total`) with its samples.
    pub fn counter<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) {
        debug_assert!(name.ends_with("_total"), "counter {name} must end in _total");
        self.family(name, Kind::Counter, help, samples);
    }

    /// A gauge family with its samples.
    pub fn gauge<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) {
        debug_assert!(!name.ends_with("_total"), "gauge {name} must not end in _total");
        self.family(name, Kind::Gauge, help, samples);
    }

    /// A histogram family in seconds from µs histograms: one series per
    /// label set, with the power-of-two bucket edges of
    /// [`HistogramSnapshot::cumulative_at_powers_of_two`] as `le` bounds.
    pub fn histogram_seconds<'h>(
        &mut self,
        name: &'static str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, &'h HistogramSnapshot)>,
    ) {
        self.header(name, Kind::Histogram, help);
        for (labels, h) in series {
            let mut le_labels = labels.clone();
            le_labels.push(("le", String::new()));
            for (le_us, count) in h.cumulative_at_powers_of_two() {
                le_labels.last_mut().expect("le pushed").1 = Value::Float(le_us as f64 / 1e6).to_string();
                self.line(name, "_bucket", &le_labels, Value::Int(count));
            }
            le_labels.last_mut().expect("le pushed").1 = "+Inf".into();
            self.line(name, "_bucket", &le_labels, Value::Int(h.count()));
            self.line(name, "_sum", &labels, Value::Float(h.sum_us as f64 / 1e6));
            self.line(name, "_count", &labels, Value::Int(h.count()));
        }
    }

    fn family<V: Into<Value>>(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) {
        self.header(name, kind, help);
        for (labels, v) in samples {
            self.line(name, "", &labels, v.into());
        }
    }

    /// HELP and TYPE, once per family (the format forbids a second block).
    fn header(&mut self, name: &'static str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "bad metric name {name}");
        debug_assert!(!self.families.contains(&name), "family {name} written twice");
        self.families.push(name);
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    fn line(&mut self, name: &str, suffix: &str, labels: &[(&'static str, String)], v: Value) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                debug_assert!(valid_name(k) && !k.contains(':'), "bad label name {k}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// HELP text escapes backslash and newline.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and newline.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Builds a label set: `labels(&[("volume", "vol0")])`.
pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::latency::Histogram;

    #[test]
    fn families_have_one_header_and_escaped_labels() {
        let mut x = Exposition::new();
        x.gauge("starblk_test_bytes", "Bytes.\nSecond line \\ here.", [(labels(&[("a", "x\"y\\z\nw")]), 5u64)]);
        x.counter("starblk_test_total", "Events.", [(labels(&[]), 3u64), (labels(&[("r", "b")]), 4u64)]);
        let text = x.finish();
        assert_eq!(
            text,
            "# HELP starblk_test_bytes Bytes.\\nSecond line \\\\ here.\n# TYPE starblk_test_bytes gauge\n\
             starblk_test_bytes{a=\"x\\\"y\\\\z\\nw\"} 5\n\
             # HELP starblk_test_total Events.\n# TYPE starblk_test_total counter\n\
             starblk_test_total 3\nstarblk_test_total{r=\"b\"} 4\n"
        );
    }

    #[test]
    fn values_print_in_prometheus_syntax() {
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
        assert_eq!(Value::Float(0.25).to_string(), "0.25");
        assert_eq!(Value::Float(16.0 / 1e6).to_string(), "0.000016");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::from(true).to_string(), "1");
    }

    #[test]
    fn histogram_buckets_are_cumulative_seconds_ending_at_inf() {
        let h = Histogram::default();
        for us in [10, 20, 40, 5000] {
            h.record_us(us);
        }
        let snap = h.snapshot();
        let mut x = Exposition::new();
        x.histogram_seconds("starblk_test_seconds", "Latency.", [(labels(&[("op", "write")]), &snap)]);
        let text = x.finish();
        let buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("starblk_test_seconds_bucket{op=\"write\",le=\""))
            .map(|rest| {
                let (le, v) = rest.split_once("\"} ").unwrap();
                (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, v.parse().unwrap())
            })
            .collect();
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{text}");
        assert_eq!(buckets[0], (0.000016, 1), "10 µs is below the first edge");
        assert!(buckets.contains(&(0.000032, 2)) && buckets.contains(&(0.000064, 3)), "{text}");
        assert!(buckets.contains(&(0.008192, 4)), "{text}");
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 4));
        assert!(text.contains("starblk_test_seconds_sum{op=\"write\"} 0.00507\n"), "{text}");
        assert!(text.contains("starblk_test_seconds_count{op=\"write\"} 4\n"), "{text}");
    }

    #[test]
    fn names() {
        assert!(valid_name("starblk_io_latency_seconds"));
        assert!(!valid_name("9lives") && !valid_name("a-b") && !valid_name(""));
    }
}
