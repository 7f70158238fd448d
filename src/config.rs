//! The volume config file (TOML): parsing and validation.
//!
//! See docs/operations.md for the keys. Every rejection names the file, the
//! line and the key, and says what was expected, e.g.
//! `vol.toml:5: [volume] quorum = 4: must be between 1 and the number of replicas (3)`.
//!
//! # Decisions
//! - **Sizes** (`size`, `write_queue`) are a size string (`"8GiB"`, see
//!   [`crate::size`]: all units are powers of 1024) or an integer byte count.
//! - **`fec` without `network_sync = true` is rejected**, not warned about:
//!   FEC only runs on network-sync links, so the setting would be silently
//!   ignored and the operator would believe the far link is protected.
//!   `network_sync = true` without `fec` is accepted (`fec` is `None`); what
//!   the link then sends is the network-sync layer's decision.
//! - **`role` is required** on every replica: it decides read preference, and
//!   a guessed default would misroute reads.
//! - **Replica names** follow the volume-name rule (`[a-zA-Z0-9_.-]`, 1–64
//!   characters) because they are typed on the command line and shown in
//!   `status`.
//! - **Addresses** are `HOST:PORT` with a port in 1..=65535; IPv6 hosts must
//!   be bracketed (`[2001:db8::1]:7701`). Duplicates are detected after
//!   lower-casing the host; different spellings of one host (`localhost` vs
//!   `127.0.0.1`) are not resolved.
//! - **Relative `key_file` and `control_socket` paths** are resolved against
//!   the config file's directory, so a config works from any working
//!   directory.
//! - The first problem found is reported (volume keys in file order, then the
//!   replicas in file order, then cross-checks such as quorum ≤ replicas).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::size::parse_size;

/// Default `block_size`: the common page and filesystem block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default `write_queue`: 256 MiB of recent writes kept for quick recovery.
pub const DEFAULT_WRITE_QUEUE_BYTES: u64 = 256 << 20;
/// Smallest `write_queue` accepted; anything less cannot hold a burst of writes.
pub const MIN_WRITE_QUEUE_BYTES: u64 = 1 << 20;
/// Longest volume or replica name (volume names become socket file names).
pub const MAX_NAME_LEN: usize = 64;
/// Directory of the default control socket, `/run/starblk/NAME.sock`.
pub const SOCKET_DIR: &str = "/run/starblk";
/// Valid range of FEC `r` (data packets per repair packet).
pub const FEC_R_RANGE: std::ops::RangeInclusive<u32> = 1..=64;
/// Valid range of FEC `c` (layers, or repair packets per group), over both
/// schemes; [`FecScheme::c_range`] is the bound for one.
pub const FEC_C_RANGE: std::ops::RangeInclusive<u32> = 1..=16;

/// A validated volume config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file the config was read from (as given; used in messages).
    pub path: PathBuf,
    /// The `[volume]` table.
    pub volume: VolumeConfig,
    /// The `[[replica]]` tables, in file order. Never empty.
    pub replicas: Vec<ReplicaConfig>,
}

/// The `[volume]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeConfig {
    /// `name`: `[a-zA-Z0-9_.-]+`, at most 64 characters (used in the socket path).
    pub name: String,
    /// `size`: a size string or integer; positive and a multiple of `block_size`.
    pub size_bytes: u64,
    /// `block_size`: a power of two in 512..=65536; default 4096.
    pub block_size: u32,
    /// `quorum`: durable acks needed per write, in 1..=number of replicas.
    pub quorum: usize,
    /// `write_queue`: at least 1 MiB and a multiple of `block_size`; default 256 MiB.
    pub write_queue_bytes: u64,
    /// `on_quorum_loss`: what to do with fewer than `quorum` replicas; default suspend.
    pub on_quorum_loss: OnQuorumLoss,
    /// `recovery_rate` (e.g. `"200Mbit"`): cap on replay recovery traffic
    /// per recovering replica, in bytes of data per second; 0 (the
    /// default) is unlimited.
    pub recovery_rate_bytes_per_s: u64,
    /// `recovery_rate = "auto"`: a controller chooses the cap, keeping the
    /// foreground p99 write latency within +20 % of its level without
    /// recovery (`docs/design.md`); `recovery_rate_bytes_per_s` is then 0.
    pub recovery_rate_auto: bool,
    /// `key_file`: shared secret authenticating replica traffic (resolved path).
    pub key_file: Option<PathBuf>,
    /// `encrypt`: encrypt the traffic of every replica (a replica's own
    /// `encrypt` overrides it); needs `key_file`. Default false.
    pub encrypt: bool,
    /// `control_socket`: overrides the default `/run/starblk/NAME.sock`
    /// (resolved path). The default is applied by the caller; see
    /// [`Config::socket_path`].
    pub control_socket: Option<PathBuf>,
    /// `metrics_listen` (`"127.0.0.1:9400"`): where the HE serves its
    /// Prometheus metrics at `/metrics`; none when absent.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `local_reads` (default true): a replica with `role = "local"` whose
    /// directory is on this machine serves reads by `pread` of its data
    /// file instead of over TCP (`docs/design.md`, "Local reads").
    pub local_reads: bool,
}

/// `on_quorum_loss`: the volume's behaviour with fewer than Q replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnQuorumLoss {
    /// `"suspend"`: hold I/O until quorum returns (the default).
    #[default]
    Suspend,
    /// `"read-only"`: fail writes, keep serving reads.
    ReadOnly,
}

/// One `[[replica]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaConfig {
    /// `name`: unique within the volume, `[a-zA-Z0-9_.-]+`, ≤ 64 characters.
    pub name: String,
    /// `addr`: `HOST:PORT`, unique within the volume.
    pub addr: String,
    /// `role`: read preference and failure-domain label.
    pub role: Role,
    /// `network_sync`: replicate over UDP + FEC; default false.
    pub network_sync: bool,
    /// `fec`: the link's FEC code; only allowed with `network_sync = true`.
    pub fec: Option<FecConfig>,
    /// `rate`, `window`, `mtu`, `ack`, `max_exposure`: network-sync link
    /// settings; only allowed with `network_sync = true`.
    pub link: LinkTuning,
    /// `encrypt`: encrypt this replica's traffic (default: the volume's
    /// `encrypt`); needs `key_file`.
    pub encrypt: bool,
}

/// A network-sync link's pacing, window, MTU and exposure bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinkTuning {
    /// `rate`: `"auto"` (the default) paces to the path's measured delivery
    /// rate (`netsync/README.md`, "Automatic pacing"); a fixed rate such as
    /// `"40Mbit"` paces data, repair and retransmitted datagrams at it, IP
    /// and UDP headers included.
    pub rate: LinkRate,
    /// `window` (a size, 4 MiB to 1 GiB; default 16 MiB): bytes sent and
    /// not yet acknowledged by the far end. A full window is backpressure.
    pub window_bytes: u64,
    /// `mtu` (576 to 65535; default 1500): the path MTU. Datagrams, repair
    /// included, are sized to fit it.
    pub mtu_bytes: u32,
    /// `ack` (`"wire"`, the default, or `"local"`): whether completions
    /// wait until this link has a write and its repair packets on the wire
    /// (docs/semantics.md §1b). `"local"` gives that guarantee up; it exists for the
    /// rolling-disaster contrast ("local-sync + FEC"), and `status` shows
    /// it as the link's network-sync mode.
    pub ack_on_wire: bool,
    /// `max_exposure` (a size such as `"4MiB"`, the default, or a time
    /// such as `"500ms"`): how much acknowledged data the far replica may
    /// not yet have confirmed receiving. At the bound, completions wait for
    /// its ack (`docs/architecture.md`, "Network-sync replicas").
    pub max_exposure: MaxExposure,
}

impl Default for LinkTuning {
    fn default() -> Self {
        LinkTuning {
            rate: LinkRate::Auto,
            window_bytes: starblk_netsync::LinkConfig::default().window_bytes,
            mtu_bytes: starblk_netsync::DEFAULT_MTU_BYTES as u32,
            ack_on_wire: true,
            max_exposure: MaxExposure::Bytes(DEFAULT_MAX_EXPOSURE_BYTES),
        }
    }
}

/// A network-sync link's `rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkRate {
    /// `"auto"`: the measured delivery rate of the path.
    Auto,
    /// A fixed rate, bits/s.
    Fixed(u64),
}

/// A network-sync link's `max_exposure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaxExposure {
    /// Bytes of acknowledged writes (data plus 64 bytes per write, so
    /// discards count too).
    Bytes(u64),
    /// What the link carries in this many milliseconds at its current
    /// pacing rate.
    Millis(u64),
}

/// Default `max_exposure`: 4 MiB.
pub const DEFAULT_MAX_EXPOSURE_BYTES: u64 = 4 << 20;
/// `max_exposure` as a size: 0 (every write waits for the far replica's
/// ack) to 1 GiB.
pub const MAX_EXPOSURE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 0..=(1 << 30);
/// `max_exposure` as a time: 1 ms to 60 s.
pub const MAX_EXPOSURE_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;

/// `window` bounds: at least two largest messages, at most 1 GiB.
pub const LINK_WINDOW_RANGE: std::ops::RangeInclusive<u64> = (4 << 20)..=(1 << 30);
/// `mtu` bounds: IPv4's minimum to the largest IP packet.
pub const LINK_MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65_535;

/// A replica's role: read preference and failure-domain label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Co-located with the host element.
    Local,
    /// Nearby (metro distance, low latency).
    Near,
    /// Remote; survives a regional disaster.
    Far,
}

/// A network-sync link's FEC code: `{ scheme, r, c }` in the config,
/// `SCHEME:R:C` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct FecConfig {
    /// Which code.
    pub scheme: FecScheme,
    /// Data packets per repair packet (layered XOR) or per group (Reed-Solomon); 1..=64.
    pub r: u32,
    /// Interleaving layers (layered XOR, 1..=5) or repair packets per group (Reed-Solomon, 1..=16).
    pub c: u32,
}

/// The FEC code family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FecScheme {
    /// `"layered-xor"`: Maelstrom layered interleaving with XOR.
    LayeredXor,
    /// `"reed-solomon"`: Reed-Solomon (r data, c repair).
    ReedSolomon,
}

/// A value that is not one of the accepted spellings (roles, schemes,
/// `on_quorum_loss`, `--fec`). The message names the value and the
/// accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: expected {expected}")]
pub struct ParseValueError {
    /// What was being parsed (`role`, `fec`, ...).
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

/// Why a config file was rejected. Messages name the file and, except for
/// [`ConfigError::Io`], the line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, or a key is unknown, missing, duplicated or
    /// of the wrong type (reported by the TOML parser).
    #[error("{}:{line}: {context}: {message}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// Where: the table, and the key when it can be told (`[volume] quorum`).
        context: String,
        /// The parser's description, with "field" said as "key".
        message: String,
    },
    /// A key has a well-formed but impossible value (Q > N, a bad size, a
    /// duplicate name, ...).
    #[error("{}:{line}: {key} = {value}: {expected}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key, with its table (`[volume] quorum`, `[[replica]] #2 addr`).
        key: String,
        /// The value as written (TOML syntax).
        value: String,
        /// What is wrong and what was expected.
        expected: String,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }
}

// ---------------------------------------------------------------------------
// Raw (as-written) structures. Every value is `Spanned` so semantic errors
// can point at the exact line; enums and sizes are strings/values parsed by
// hand so that their errors say what was expected.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    volume: Spanned<RawVolume>,
    #[serde(default)]
    replica: Vec<Spanned<RawReplica>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    size: Spanned<toml::Value>,
    block_size: Option<Spanned<i64>>,
    quorum: Spanned<i64>,
    write_queue: Option<Spanned<toml::Value>>,
    on_quorum_loss: Option<Spanned<String>>,
    recovery_rate: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    encrypt: Option<Spanned<bool>>,
    control_socket: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    local_reads: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    name: Spanned<String>,
    addr: Spanned<String>,
    role: Spanned<String>,
    network_sync: Option<Spanned<bool>>,
    fec: Option<Spanned<RawFec>>,
    rate: Option<Spanned<String>>,
    window: Option<Spanned<toml::Value>>,
    mtu: Option<Spanned<i64>>,
    ack: Option<Spanned<String>>,
    max_exposure: Option<Spanned<toml::Value>>,
    encrypt: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFec {
    scheme: Spanned<String>,
    r: Spanned<i64>,
    c: Spanned<i64>,
}

/// The text being parsed and its file name, for turning spans into errors.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let end = floor_char_boundary(self.text, offset);
        self.text[..end].matches('\n').count() + 1
    }

    /// An [`ConfigError::Invalid`] pointing at `at`'s line.
    fn invalid<T>(
        &self,
        at: &Spanned<T>,
        key: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(at.span().start),
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    /// Converts a TOML parser error, adding the table (and key) it occurred in.
    fn syntax(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        // toml says "field" (serde's word); config files have keys. Its
        // messages can span lines; keep the error on one line.
        let message = err
            .message()
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing required key")
            .replace("expected i64", "expected an integer")
            .trim_end()
            .replace('\n', "; ");
        ConfigError::Syntax {
            path: self.path.to_path_buf(),
            line: self.line(span.start),
            context: self.context_at(span),
            message,
        }
    }

    /// Describes where `span` is: its table header and, when the span is a
    /// value, the key it belongs to. Best effort: it reads the raw lines, so
    /// a `[` at the start of a line inside a multi-line string can mislead
    /// it; it only decorates the parser's own message.
    fn context_at(&self, span: Range<usize>) -> String {
        let start = floor_char_boundary(self.text, span.start);
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        // Include the span's own line: a missing-key error points at the
        // table's header line.
        let line_end = self.text[start..].find('\n').map_or(self.text.len(), |i| start + i);
        let mut table = "top level".to_string();
        let mut replicas = 0;
        for line in self.text[..line_end].split('\n').map(str::trim) {
            if line.starts_with("[[") {
                let header = line.split("]]").next().unwrap_or(line);
                if header.trim_start_matches('[').trim() == "replica" {
                    replicas += 1;
                    table = format!("[[replica]] #{replicas}");
                } else {
                    table = format!("{header}]]");
                }
            } else if line.starts_with('[') {
                table = format!("{}]", line.split(']').next().unwrap_or(line));
            }
        }
        let before = &self.text[line_start..start];
        // Inside an inline table (`fec = { ... }`), name the table's key too.
        let parent = before
            .rfind('{')
            .filter(|&brace| !before[brace..].contains('}'))
            .and_then(|brace| key_before_eq(&before[..brace]));
        match (parent, key_before_eq(before)) {
            (Some(p), Some(k)) => format!("{table} {p}.{k}"),
            (Some(k), None) | (None, Some(k)) => format!("{table} {k}"),
            (None, None) => table,
        }
    }
}

/// When `before` ends in `KEY =` (the text preceding a value), returns KEY.
/// Keys inside an inline table are delimited by `{` or `,`.
fn key_before_eq(before: &str) -> Option<&str> {
    let lhs = before.trim_end().strip_suffix('=')?;
    let key = lhs.rsplit([',', '{']).next()?.trim();
    (!key.is_empty() && !key.starts_with('[')).then_some(key)
}

/// The largest char boundary ≤ `offset` (spans are byte offsets).
fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut i = offset.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if the file cannot be read, otherwise as
    /// [`Config::parse`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is used in messages and to
    /// resolve relative `key_file`/`control_socket` paths.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for malformed TOML and unknown, missing,
    /// duplicated or mistyped keys; [`ConfigError::Invalid`] for impossible
    /// values. Both name the file, line and key.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let src = Source { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.syntax(&e))?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        let mut volume = build_volume(&src, raw.volume.get_ref(), base_dir)?;
        let replicas = build_replicas(&src, &raw.replica, &volume, raw.volume.get_ref())?;
        volume.quorum = check_quorum(&src, &raw, replicas.len())?;
        Ok(Config { path: path.to_path_buf(), volume, replicas })
    }

    /// The default control socket, `/run/starblk/NAME.sock`, ignoring any
    /// `control_socket` override.
    pub fn default_socket_path(&self) -> PathBuf {
        Path::new(SOCKET_DIR).join(format!("{}.sock", self.volume.name))
    }

    /// The control socket to use: `control_socket` if set, else
    /// [`Config::default_socket_path`].
    pub fn socket_path(&self) -> PathBuf {
        self.volume.control_socket.clone().unwrap_or_else(|| self.default_socket_path())
    }
}

/// Validates the `[volume]` table (all but the quorum-vs-replicas check).
fn build_volume(src: &Source, v: &RawVolume, base: &Path) -> Result<VolumeConfig, ConfigError> {
    let name = v.name.get_ref();
    check_name(name).map_err(|e| src.invalid(&v.name, "[volume] name", quoted(name), e))?;
    let block_size = match &v.block_size {
        None => DEFAULT_BLOCK_SIZE,
        Some(b) => check_block_size(*b.get_ref())
            .map_err(|e| src.invalid(b, "[volume] block_size", b.get_ref().to_string(), e))?,
    };
    let size_bytes = size_value(src, &v.size, "[volume] size", block_size)?;
    if size_bytes == 0 {
        let e = "must be greater than 0";
        return Err(src.invalid(&v.size, "[volume] size", v.size.get_ref().to_string(), e));
    }
    let write_queue_bytes = match &v.write_queue {
        None => DEFAULT_WRITE_QUEUE_BYTES,
        Some(w) => {
            let bytes = size_value(src, w, "[volume] write_queue", block_size)?;
            if bytes < MIN_WRITE_QUEUE_BYTES {
                let e = "must be at least 1MiB, to hold a burst of writes for quick recovery";
                return Err(src.invalid(w, "[volume] write_queue", w.get_ref().to_string(), e));
            }
            bytes
        }
    };
    let on_quorum_loss = match &v.on_quorum_loss {
        None => OnQuorumLoss::default(),
        Some(s) => s.get_ref().parse().map_err(|e: ParseValueError| {
            src.invalid(s, "[volume] on_quorum_loss", quoted(s.get_ref()), format!("expected {}", e.expected))
        })?,
    };
    let recovery_rate_auto = v.recovery_rate.as_ref().is_some_and(|r| r.get_ref() == "auto");
    let recovery_rate_bytes_per_s = match &v.recovery_rate {
        None => 0,
        Some(_) if recovery_rate_auto => 0,
        Some(r) => crate::size::parse_rate(r.get_ref())
            .map_err(|e| src.invalid(r, "[volume] recovery_rate", quoted(r.get_ref()), format!("{e}, or \"auto\"")))?
            .div_ceil(8),
    };
    Ok(VolumeConfig {
        name: name.clone(),
        size_bytes,
        block_size,
        quorum: 0, // set by Config::parse once the replica count is known
        write_queue_bytes,
        on_quorum_loss,
        recovery_rate_bytes_per_s,
        recovery_rate_auto,
        key_file: path_value(src, v.key_file.as_ref(), "[volume] key_file", base)?,
        encrypt: encrypt_value(src, v.encrypt.as_ref(), "[volume] encrypt", v.key_file.is_some())?.unwrap_or(false),
        control_socket: path_value(src, v.control_socket.as_ref(), "[volume] control_socket", base)?,
        metrics_listen: match &v.metrics_listen {
            None => None,
            Some(m) => Some(
                parse_listen(m.get_ref())
                    .map_err(|e| src.invalid(m, "[volume] metrics_listen", quoted(m.get_ref()), e))?,
            ),
        },
        local_reads: v.local_reads.unwrap_or(true),
    })
}

/// Parses a listen address: an IP literal and a port from 1 to 65535 (no
/// host names: what a name resolves to is not the config's to guess).
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => Err("expected IP:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9400 or [::1]:9400".to_string()),
    }
}

/// Parses a size key (string or integer) and checks it is a multiple of
/// `block_size`.
fn size_value(src: &Source, value: &Spanned<toml::Value>, key: &str, block_size: u32) -> Result<u64, ConfigError> {
    let shown = value.get_ref().to_string();
    let bytes = match value.get_ref() {
        toml::Value::String(s) => parse_size(s).map_err(|e| src.invalid(value, key, &shown, e.reason()))?,
        toml::Value::Integer(i) => {
            u64::try_from(*i).map_err(|_| src.invalid(value, key, &shown, "must not be negative"))?
        }
        _ => {
            let e = "expected a size string such as \"8GiB\" or a whole number of bytes";
            return Err(src.invalid(value, key, &shown, e));
        }
    };
    if !bytes.is_multiple_of(u64::from(block_size)) {
        let e = format!("must be a multiple of block_size ({block_size} bytes)");
        return Err(src.invalid(value, key, &shown, e));
    }
    Ok(bytes)
}

/// Resolves an optional path key against the config file's directory.
fn path_value(
    src: &Source,
    value: Option<&Spanned<String>>,
    key: &str,
    base: &Path,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    if v.get_ref().trim().is_empty() {
        let e = "expected a file path (relative paths are taken from the config file's directory)";
        return Err(src.invalid(v, key, quoted(v.get_ref()), e));
    }
    Ok(Some(base.join(v.get_ref())))
}

/// Validates the `[[replica]]` tables, including duplicate names and addresses.
/// An `encrypt` key: true needs a key file (the session keys come from
/// the authentication handshake).
fn encrypt_value(
    src: &Source,
    v: Option<&Spanned<bool>>,
    key: &str,
    has_key_file: bool,
) -> Result<Option<bool>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    if *v.get_ref() && !has_key_file {
        let e = "encryption needs [volume] key_file: its keys come from the authentication handshake";
        return Err(src.invalid(v, key, "true", e));
    }
    Ok(Some(*v.get_ref()))
}

fn build_replicas(
    src: &Source,
    raw: &[Spanned<RawReplica>],
    volume: &VolumeConfig,
    raw_volume: &RawVolume,
) -> Result<Vec<ReplicaConfig>, ConfigError> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addrs: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().map(Spanned::get_ref).enumerate() {
        let key = |k: &str| format!("[[replica]] #{} {k}", i + 1);
        let name = r.name.get_ref();
        check_name(name).map_err(|e| src.invalid(&r.name, key("name"), quoted(name), e))?;
        if let Some(first) = names.insert(name, src.line(r.name.span().start)) {
            let e = format!("duplicate replica name (first used at line {first}); expected a unique name per replica");
            return Err(src.invalid(&r.name, key("name"), quoted(name), e));
        }
        let addr = r.addr.get_ref();
        let normal = check_addr(addr).map_err(|e| src.invalid(&r.addr, key("addr"), quoted(addr), e))?;
        if let Some(first) = addrs.insert(normal, src.line(r.addr.span().start)) {
            let e = format!(
                "duplicate replica address (first used at line {first}); expected a unique address per replica"
            );
            return Err(src.invalid(&r.addr, key("addr"), quoted(addr), e));
        }
        let role = r.role.get_ref().parse().map_err(|e: ParseValueError| {
            src.invalid(&r.role, key("role"), quoted(r.role.get_ref()), format!("expected {}", e.expected))
        })?;
        let network_sync = r.network_sync.as_ref().is_some_and(|s| *s.get_ref());
        let fec = match &r.fec {
            None => None,
            Some(f) => Some(build_fec(src, f, network_sync, &key)?),
        };
        let link = build_link(src, r, network_sync, &key)?;
        let has_key_file = raw_volume.key_file.is_some();
        let encrypt = encrypt_value(src, r.encrypt.as_ref(), &key("encrypt"), has_key_file)?.unwrap_or(volume.encrypt);
        out.push(ReplicaConfig { name: name.clone(), addr: addr.clone(), role, network_sync, fec, link, encrypt });
    }
    Ok(out)
}

/// Validates one replica's `fec` table.
fn build_fec(
    src: &Source,
    fec: &Spanned<RawFec>,
    network_sync: bool,
    key: &dyn Fn(&str) -> String,
) -> Result<FecConfig, ConfigError> {
    let f = fec.get_ref();
    let scheme: FecScheme = f.scheme.get_ref().parse().map_err(|e: ParseValueError| {
        src.invalid(&f.scheme, key("fec.scheme"), quoted(f.scheme.get_ref()), format!("expected {}", e.expected))
    })?;
    let r = check_fec_param(*f.r.get_ref(), FEC_R_RANGE, "data packets per repair group")
        .map_err(|e| src.invalid(&f.r, key("fec.r"), f.r.get_ref().to_string(), e))?;
    let c = check_fec_param(*f.c.get_ref(), scheme.c_range(), "repair layers/packets")
        .map_err(|e| src.invalid(&f.c, key("fec.c"), f.c.get_ref().to_string(), e))?;
    if !network_sync {
        let shown = format!("{{ scheme = \"{scheme}\", r = {r}, c = {c} }}");
        return Err(only_for_network_sync(src, fec.span(), key, "fec", shown));
    }
    Ok(FecConfig { scheme, r, c })
}

/// The rejection of a network-sync-only key on a TCP replica.
fn only_for_network_sync(
    src: &Source,
    span: Range<usize>,
    key: &dyn Fn(&str) -> String,
    name: &str,
    shown: String,
) -> ConfigError {
    let e =
        format!("{name} only applies to network-sync links; set network_sync = true on this replica or remove {name}");
    src.invalid(&Spanned::new(span, ()), key(name), shown, e)
}

/// Validates one replica's `rate`, `window`, `mtu`, `max_exposure` and `ack`.
fn build_link(
    src: &Source,
    r: &RawReplica,
    network_sync: bool,
    key: &dyn Fn(&str) -> String,
) -> Result<LinkTuning, ConfigError> {
    let mut link = LinkTuning::default();
    let only_netsync =
        |name: &str, span: Range<usize>, shown: String| only_for_network_sync(src, span, key, name, shown);
    if let Some(v) = &r.rate {
        if !network_sync {
            return Err(only_netsync("rate", v.span(), quoted(v.get_ref())));
        }
        link.rate = match v.get_ref().trim() {
            "auto" => LinkRate::Auto,
            fixed => LinkRate::Fixed(crate::size::parse_rate(fixed).map_err(|e| {
                let e = format!("{e}; or \"auto\" to pace to the path's measured delivery rate");
                src.invalid(v, key("rate"), quoted(v.get_ref()), e)
            })?),
        };
    }
    if let Some(v) = &r.window {
        let shown = v.get_ref().to_string();
        if !network_sync {
            return Err(only_netsync("window", v.span(), shown));
        }
        let bytes = match v.get_ref() {
            toml::Value::String(s) => parse_size(s).map_err(|e| src.invalid(v, key("window"), &shown, e.reason()))?,
            toml::Value::Integer(i) => u64::try_from(*i).unwrap_or(0),
            _ => 0,
        };
        if !LINK_WINDOW_RANGE.contains(&bytes) {
            let e = "expected a size from 4MiB to 1GiB, e.g. \"16MiB\"";
            return Err(src.invalid(v, key("window"), shown, e));
        }
        link.window_bytes = bytes;
    }
    if let Some(v) = &r.mtu {
        if !network_sync {
            return Err(only_netsync("mtu", v.span(), v.get_ref().to_string()));
        }
        link.mtu_bytes = u32::try_from(*v.get_ref()).ok().filter(|m| LINK_MTU_RANGE.contains(m)).ok_or_else(|| {
            src.invalid(v, key("mtu"), v.get_ref().to_string(), "expected a path MTU from 576 to 65535, e.g. 1500")
        })?;
    }
    if let Some(v) = &r.max_exposure {
        let shown = v.get_ref().to_string();
        if !network_sync {
            return Err(only_netsync("max_exposure", v.span(), shown));
        }
        link.max_exposure =
            parse_max_exposure(v.get_ref()).map_err(|e| src.invalid(v, key("max_exposure"), shown, e))?;
    }
    if let Some(v) = &r.ack {
        if !network_sync {
            return Err(only_netsync("ack", v.span(), quoted(v.get_ref())));
        }
        link.ack_on_wire = match v.get_ref().as_str() {
            "wire" => true,
            "local" => false,
            other => return Err(src.invalid(v, key("ack"), quoted(other), "expected \"wire\" or \"local\"")),
        };
    }
    Ok(link)
}

/// Parses `max_exposure`: a size (string or integer bytes) or a time
/// (`"500ms"`, `"2s"`).
fn parse_max_exposure(v: &toml::Value) -> Result<MaxExposure, String> {
    const EXPECTED: &str =
        "expected a size from 0 to 1GiB such as \"4MiB\", or a time from 1ms to 60s such as \"500ms\"";
    let bytes = |b: u64| {
        if MAX_EXPOSURE_BYTES_RANGE.contains(&b) {
            Ok(MaxExposure::Bytes(b))
        } else {
            Err(EXPECTED.to_string())
        }
    };
    let s = match v {
        toml::Value::Integer(i) => return u64::try_from(*i).map_err(|_| EXPECTED.to_string()).and_then(bytes),
        toml::Value::String(s) => s.trim().to_ascii_lowercase(),
        _ => return Err(EXPECTED.to_string()),
    };
    let time = s.strip_suffix("ms").map(|n| (n, 1.0)).or_else(|| s.strip_suffix('s').map(|n| (n, 1000.0)));
    if let Some((number, ms_per_unit)) = time {
        let ms = number.trim().parse::<f64>().map(|n| (n * ms_per_unit).round()).map_err(|_| EXPECTED.to_string())?;
        return match ms {
            ms if ms.is_finite() && (1.0..=60_000.0).contains(&ms) => Ok(MaxExposure::Millis(ms as u64)),
            _ => Err(EXPECTED.to_string()),
        };
    }
    parse_size(&s).map_err(|e| format!("{}; {EXPECTED}", e.reason())).and_then(bytes)
}

/// Checks `N ≥ 1` and `1 ≤ quorum ≤ N`, and returns the quorum.
fn check_quorum(src: &Source, raw: &RawConfig, replicas: usize) -> Result<usize, ConfigError> {
    if replicas == 0 {
        // Point at the last line: that is where the missing tables belong.
        let last = src.text.trim_end().len();
        let end = Spanned::new(last..last, ());
        let e = "no replicas; expected at least one [[replica]] table with name, addr and role";
        return Err(src.invalid(&end, "[[replica]]", "(none)", e));
    }
    let q = &raw.volume.get_ref().quorum;
    match usize::try_from(*q.get_ref()) {
        Ok(quorum) if (1..=replicas).contains(&quorum) => Ok(quorum),
        _ => {
            let e = format!("must be between 1 and the number of replicas ({replicas})");
            Err(src.invalid(q, "[volume] quorum", q.get_ref().to_string(), e))
        }
    }
}

/// Renders a string value the way it is written in TOML (close enough for messages).
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Checks a volume or replica name: `[a-zA-Z0-9_.-]+`, at most 64 characters.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
        return Err(format!("expected 1 to {MAX_NAME_LEN} characters from a-z, A-Z, 0-9, '_', '.', '-'"));
    }
    Ok(())
}

/// Checks `block_size`: a power of two in 512..=65536.
fn check_block_size(b: i64) -> Result<u32, String> {
    match u32::try_from(b) {
        Ok(b) if (512..=65536).contains(&b) && b.is_power_of_two() => Ok(b),
        _ => Err("expected a power of two from 512 to 65536, e.g. 4096".to_string()),
    }
}

/// Checks an FEC parameter against its range.
fn check_fec_param(v: i64, range: std::ops::RangeInclusive<u32>, what: &str) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!("expected {what} between {} and {}", range.start(), range.end())),
    }
}

/// Checks `HOST:PORT` and returns a normalised form for duplicate
/// detection: equal for spellings of one address (`07701`, `HOST.`,
/// `[::ffff:192.0.2.10]`), which would otherwise name one replica twice.
pub fn check_addr(addr: &str) -> Result<String, String> {
    let expected = "expected HOST:PORT with a port from 1 to 65535, e.g. 192.0.2.10:7701 \
                    or [2001:db8::1]:7701";
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| expected.to_string())?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| expected.to_string())?;
    let host = normal_host(host).ok_or_else(|| expected.to_string())?;
    Ok(format!("{host}:{port}"))
}

/// The host part in one spelling per address: an IP in its canonical form
/// (an IPv4-mapped IPv6 address as the IPv4 one), a name in lower case
/// without the root's trailing dot. None if it is no host.
fn normal_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[') {
        let ip: std::net::Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        return Some(ip.to_ipv4_mapped().map_or_else(|| format!("[{ip}]"), |v4| v4.to_string()));
    }
    // A bare IPv6 address would make the port ambiguous.
    if host.contains(':') || host.contains(char::is_whitespace) {
        return None;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return None;
    }
    Some(name.parse::<std::net::Ipv4Addr>().map_or_else(|_| name.to_ascii_lowercase(), |ip| ip.to_string()))
}

/// Parses one of a fixed set of spellings.
fn parse_choice<T: Copy>(what: &'static str, s: &str, choices: &[(&str, T)]) -> Result<T, ParseValueError> {
    choices.iter().find(|(name, _)| *name == s).map(|(_, v)| *v).ok_or_else(|| ParseValueError {
        what,
        value: s.to_string(),
        expected: format!("one of {}", choices.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
    })
}

const ROLES: [(&str, Role); 3] = [("local", Role::Local), ("near", Role::Near), ("far", Role::Far)];
const SCHEMES: [(&str, FecScheme); 2] =
    [("layered-xor", FecScheme::LayeredXor), ("reed-solomon", FecScheme::ReedSolomon)];
const QUORUM_LOSS: [(&str, OnQuorumLoss); 2] =
    [("suspend", OnQuorumLoss::Suspend), ("read-only", OnQuorumLoss::ReadOnly)];

/// The spelling of `v` in `choices`.
fn spelling<T: PartialEq>(v: &T, choices: &[(&'static str, T)]) -> &'static str {
    choices.iter().find(|(_, c)| c == v).map_or("?", |(n, _)| n)
}

impl FromStr for Role {
    type Err = ParseValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_choice("role", s, &ROLES)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(spelling(self, &ROLES))
    }
}

impl FromStr for FecScheme {
    type Err = ParseValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_choice("fec scheme", s, &SCHEMES)
    }
}

impl fmt::Display for FecScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(spelling(self, &SCHEMES))
    }
}

impl FecScheme {
    /// Valid `c` for this scheme: layered XOR's default strides 1, 10,
    /// 100, ... allow fewer layers than Reed-Solomon has parity shards.
    pub fn c_range(self) -> std::ops::RangeInclusive<u32> {
        let max = match self {
            FecScheme::LayeredXor => starblk_netsync::FecScheme::LAYERED_XOR_MAX_LAYERS as u32,
            FecScheme::ReedSolomon => *FEC_C_RANGE.end(),
        };
        *FEC_C_RANGE.start()..=max
    }
}

impl FromStr for OnQuorumLoss {
    type Err = ParseValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_choice("on_quorum_loss", s, &QUORUM_LOSS)
    }
}

impl fmt::Display for OnQuorumLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(spelling(self, &QUORUM_LOSS))
    }
}

impl FromStr for FecConfig {
    type Err = ParseValueError;

    /// Parses the CLI form `SCHEME:R:C`, e.g. `layered-xor:8:3`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |expected: String| ParseValueError { what: "fec", value: s.to_string(), expected };
        let parts: Vec<&str> = s.split(':').collect();
        let [scheme, r, c] = parts[..] else {
            return Err(err("SCHEME:R:C, e.g. layered-xor:8:3 or reed-solomon:8:3".to_string()));
        };
        let scheme: FecScheme =
            scheme.parse().map_err(|e: ParseValueError| err(format!("SCHEME:R:C with SCHEME {}", e.expected)))?;
        let number = |v: &str| v.trim().parse::<i64>().unwrap_or(-1);
        let r = check_fec_param(number(r), FEC_R_RANGE, "R").map_err(err)?;
        let c = check_fec_param(number(c), scheme.c_range(), "C").map_err(err)?;
        Ok(FecConfig { scheme, r, c })
    }
}

impl fmt::Display for FecConfig {
    /// The CLI form `SCHEME:R:C`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.scheme, self.r, self.c)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_addr_normalises_equivalent_spellings() {
        let same = |a: &str, b: &str| {
            assert_eq!(check_addr(a).unwrap(), check_addr(b).unwrap(), "{a} vs {b}");
        };
        same("127.0.0.1:7701", "127.0.0.1:07701");
        same("Host.Example:7701", "host.example.:7701");
        same("[2001:db8::1]:7701", "[2001:0DB8:0:0:0:0:0:1]:7701");
        same("[::ffff:192.0.2.10]:7701", "192.0.2.10:7701");
        assert_ne!(check_addr("127.0.0.1:7701").unwrap(), check_addr("127.0.0.2:7701").unwrap());
        assert_ne!(check_addr("[::1]:7701").unwrap(), check_addr("127.0.0.1:7701").unwrap());
        assert!(check_addr("host.:7701").is_ok());
        assert!(check_addr(".:7701").is_err(), "a lone dot is no host name");
    }

    use super::*;

    /// The product specification's example config, verbatim.
    const EXAMPLE: &str = r#"[volume]
name = "vol0"
size = "8GiB"
block_size = 4096            # logical block size exposed to the kernel
quorum = 2                   # Q: durable acks needed before a write completes
write_queue = "256MiB"       # HE in-memory window of recent writes (quick recovery)
on_quorum_loss = "suspend"   # "suspend": hold I/O until quorum returns; "read-only": fail writes, keep serving reads
key_file = "/etc/starblk/vol0.key"   # optional shared secret; authenticates all replica traffic

[[replica]]
name = "local"
addr = "127.0.0.1:7701"
role = "local"               # local | near | far: read preference and failure-domain label

[[replica]]
name = "near"
addr = "192.0.2.10:7701"
role = "near"

[[replica]]
name = "far"
addr = "198.51.100.7:7701"
role = "far"
network_sync = true          # this link uses UDP + FEC and reports when data and repair are on the wire
fec = { scheme = "layered-xor", r = 8, c = 3 }   # or { scheme = "reed-solomon", r = 8, c = 3 }
"#;

    const MINIMAL: &str = "[volume]\nname = \"v\"\nsize = 1048576\nquorum = 1\n\n\
                           [[replica]]\nname = \"a\"\naddr = \"h:1\"\nrole = \"far\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("vol.toml"))
    }

    /// The example with the first occurrence of `from` replaced by `to`.
    fn edit(from: &str, to: &str) -> String {
        assert!(EXAMPLE.contains(from), "{from:?} not in the example");
        EXAMPLE.replacen(from, to, 1)
    }

    /// Parses `text`, expecting a rejection at `line` that names `key`;
    /// returns the message for further checks.
    fn rejects(text: &str, line: usize, key: &str) -> String {
        let err = parse(text).expect_err("config should be rejected");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("vol.toml:{line}: ")), "{msg}");
        assert!(msg.contains(key), "{msg:?} does not name {key:?}");
        assert_eq!(err.line(), Some(line));
        msg
    }

    #[test]
    fn encrypt_per_volume_or_replica_needs_a_key_file() {
        let far = "fec = { scheme = \"layered-xor\", r = 8, c = 3 }   # or";
        let c = parse(&edit(far, &format!("encrypt = true\n{far}"))).unwrap();
        let enc: Vec<bool> = c.replicas.iter().map(|r| r.encrypt).collect();
        assert_eq!((c.volume.encrypt, enc), (false, vec![false, false, true]));
        let vol = "key_file = \"/etc/starblk/vol0.key\"";
        let c = parse(&edit(vol, &format!("{vol}\nencrypt = true"))).unwrap();
        assert!(c.volume.encrypt && c.replicas.iter().all(|r| r.encrypt));
        let text = edit(vol, &format!("{vol}\nencrypt = true")).replacen(far, &format!("encrypt = false\n{far}"), 1);
        let enc: Vec<bool> = parse(&text).unwrap().replicas.iter().map(|r| r.encrypt).collect();
        assert_eq!(enc, [true, true, false], "a replica's encrypt overrides the volume's");
        let no_key = EXAMPLE.lines().filter(|l| !l.starts_with("key_file")).collect::<Vec<_>>().join("\n");
        let msg = rejects(&no_key.replacen(far, &format!("encrypt = true\n{far}"), 1), 24, "[[replica]] #3 encrypt");
        assert!(msg.contains("key_file"), "{msg}");
        rejects(&no_key.replacen("[volume]\n", "[volume]\nencrypt = true\n", 1), 2, "[volume] encrypt");
    }

    #[test]
    fn design_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.path, Path::new("vol.toml"));
        let v = &c.volume;
        assert_eq!(v.name, "vol0");
        assert_eq!(v.size_bytes, 8 << 30);
        assert_eq!(v.block_size, 4096);
        assert_eq!(v.quorum, 2);
        assert_eq!(v.write_queue_bytes, 256 << 20);
        assert_eq!(v.on_quorum_loss, OnQuorumLoss::Suspend);
        assert_eq!(v.key_file.as_deref(), Some(Path::new("/etc/starblk/vol0.key")));
        assert_eq!(v.control_socket, None);
        let names: Vec<_> = c.replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["local", "near", "far"]);
        let roles: Vec<_> = c.replicas.iter().map(|r| r.role).collect();
        assert_eq!(roles, [Role::Local, Role::Near, Role::Far]);
        assert!(!c.replicas[0].network_sync && c.replicas[0].fec.is_none());
        assert!(c.replicas[2].network_sync);
        let fec = FecConfig { scheme: FecScheme::LayeredXor, r: 8, c: 3 };
        assert_eq!(c.replicas[2].fec, Some(fec));
        assert_eq!(c.socket_path(), Path::new("/run/starblk/vol0.sock"));
    }

    #[test]
    fn defaults_apply() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.volume.size_bytes, 1 << 20);
        assert_eq!(c.volume.block_size, DEFAULT_BLOCK_SIZE);
        assert_eq!(c.volume.write_queue_bytes, DEFAULT_WRITE_QUEUE_BYTES);
        assert_eq!(c.volume.on_quorum_loss, OnQuorumLoss::Suspend);
        assert_eq!(c.volume.key_file, None);
        assert!(!c.replicas[0].network_sync);
    }

    #[test]
    fn optional_values_parse() {
        let text = edit("on_quorum_loss = \"suspend\"", "on_quorum_loss = \"read-only\"")
            .replacen("fec = { scheme = \"layered-xor\"", "fec = { scheme = \"reed-solomon\"", 1)
            .replacen("[volume]\n", "[volume]\ncontrol_socket = \"ctl.sock\"\n", 1)
            .replacen("/etc/starblk/vol0.key", "keys/vol0.key", 1);
        let c = Config::parse(&text, Path::new("/etc/starblk/vol.toml")).unwrap();
        assert_eq!(c.volume.on_quorum_loss, OnQuorumLoss::ReadOnly);
        assert_eq!(c.replicas[2].fec.unwrap().scheme, FecScheme::ReedSolomon);
        // Relative paths are taken from the config file's directory.
        let key = c.volume.key_file.as_deref();
        assert_eq!(key, Some(Path::new("/etc/starblk/keys/vol0.key")));
        assert_eq!(c.socket_path(), Path::new("/etc/starblk/ctl.sock"));
        assert_eq!(c.default_socket_path(), Path::new("/run/starblk/vol0.sock"));
    }

    #[test]
    fn recovery_rate_auto_or_fixed() {
        let auto = parse(&MINIMAL.replacen("quorum = 1", "quorum = 1\nrecovery_rate = \"auto\"", 1)).unwrap();
        assert!(auto.volume.recovery_rate_auto);
        assert_eq!(auto.volume.recovery_rate_bytes_per_s, 0);
        let fixed = parse(&MINIMAL.replacen("quorum = 1", "quorum = 1\nrecovery_rate = \"80Mbit\"", 1)).unwrap();
        assert!(!fixed.volume.recovery_rate_auto);
        assert_eq!(fixed.volume.recovery_rate_bytes_per_s, 10_000_000);
        let msg =
            rejects(&MINIMAL.replacen("quorum = 1", "quorum = 1\nrecovery_rate = \"fast\"", 1), 5, "recovery_rate");
        assert!(msg.contains("or \"auto\""), "{msg}");
    }

    #[test]
    fn unknown_key_in_volume() {
        let text = edit("quorum = 2", "quorum = 2\nquorom = 3");
        let msg = rejects(&text, 6, "quorom");
        assert!(msg.contains("[volume]") && msg.contains("unknown key"), "{msg}");
    }

    #[test]
    fn unknown_key_in_replica_fec_and_top_level() {
        let msg = rejects(&edit("role = \"near\"", "role = \"near\"\nweight = 2"), 19, "weight");
        assert!(msg.contains("[[replica]] #2"), "{msg}");
        let msg = rejects(&edit("r = 8, c = 3", "r = 8, c = 3, d = 1"), 25, "`d`");
        assert!(msg.contains("[[replica]] #3"), "{msg}");
        let msg = rejects(&format!("replicas = 3\n{EXAMPLE}"), 1, "replicas");
        assert!(msg.contains("top level"), "{msg}");
    }

    #[test]
    fn missing_required_keys() {
        let msg = rejects(&edit("quorum = 2 ", "# no quorum "), 1, "quorum");
        assert!(msg.contains("[volume]") && msg.contains("missing required key"), "{msg}");
        let msg = rejects(&edit("addr = \"192.0.2.10:7701\"\n", ""), 15, "addr");
        assert!(msg.contains("[[replica]] #2"), "{msg}");
        rejects(&edit("role = \"far\"\n", ""), 20, "role");
        rejects(&edit("name = \"vol0\"\n", ""), 1, "name");
        rejects("[[replica]]\nname = \"a\"\naddr = \"h:1\"\nrole = \"far\"\n", 1, "volume");
    }

    #[test]
    fn quorum_above_replica_count() {
        let msg = rejects(&edit("quorum = 2", "quorum = 4"), 5, "[volume] quorum");
        assert_eq!(msg, "vol.toml:5: [volume] quorum = 4: must be between 1 and the number of replicas (3)");
    }

    #[test]
    fn quorum_zero_or_negative() {
        rejects(&edit("quorum = 2", "quorum = 0"), 5, "[volume] quorum = 0");
        rejects(&edit("quorum = 2", "quorum = -1"), 5, "[volume] quorum = -1");
    }

    #[test]
    fn no_replicas() {
        let text = "[volume]\nname = \"v\"\nsize = \"1M\"\nquorum = 1\n\n";
        let msg = rejects(text, 4, "[[replica]]");
        assert!(msg.contains("at least one"), "{msg}");
    }

    #[test]
    fn duplicate_replica_names() {
        let msg = rejects(&edit("name = \"far\"", "name = \"near\""), 21, "[[replica]] #3 name");
        assert!(msg.contains("duplicate") && msg.contains("line 16"), "{msg}");
    }

    #[test]
    fn duplicate_addresses() {
        let text = edit("addr = \"198.51.100.7:7701\"", "addr = \"192.0.2.10:7701\"");
        let msg = rejects(&text, 22, "[[replica]] #3 addr");
        assert!(msg.contains("duplicate") && msg.contains("line 17"), "{msg}");
        // Host names compare case-insensitively.
        let text = edit("addr = \"127.0.0.1:7701\"", "addr = \"Store-A:7701\"").replacen(
            "addr = \"192.0.2.10:7701\"",
            "addr = \"store-a:7701\"",
            1,
        );
        rejects(&text, 17, "[[replica]] #2 addr");
    }

    #[test]
    fn size_not_a_multiple_of_block_size() {
        let msg = rejects(&edit("8GiB", "1000"), 3, "[volume] size = \"1000\"");
        assert!(msg.contains("multiple of block_size (4096"), "{msg}");
        let text = edit("size = \"8GiB\"", "size = 6144");
        rejects(&text, 3, "[volume] size = 6144");
        // The same size is fine with a smaller block size.
        let ok = text.replacen("block_size = 4096", "block_size = 512", 1);
        assert_eq!(parse(&ok).unwrap().volume.size_bytes, 6144);
    }

    #[test]
    fn size_zero_or_negative() {
        rejects(&edit("size = \"8GiB\"", "size = 0"), 3, "[volume] size = 0");
        let msg = rejects(&edit("size = \"8GiB\"", "size = -4096"), 3, "[volume] size");
        assert!(msg.contains("negative"), "{msg}");
    }

    #[test]
    fn block_size_not_a_power_of_two_or_out_of_range() {
        for bad in ["4000", "256", "131072", "-4096", "0"] {
            let text = edit("block_size = 4096", &format!("block_size = {bad}"));
            let msg = rejects(&text, 4, "[volume] block_size");
            assert!(msg.contains("power of two from 512 to 65536"), "{msg}");
        }
    }

    #[test]
    fn bad_size_strings() {
        let msg = rejects(&edit("8GiB", "8X"), 3, "[volume] size = \"8X\"");
        assert!(msg.contains("unknown unit \"X\""), "{msg}");
        rejects(&edit("8GiB", "lots"), 3, "[volume] size");
        let msg = rejects(&edit("size = \"8GiB\"", "size = 8.5"), 3, "[volume] size");
        assert!(msg.contains("size string"), "{msg}");
        let msg = rejects(&edit("256MiB", "256QB"), 6, "[volume] write_queue");
        assert!(msg.contains("unknown unit"), "{msg}");
    }

    #[test]
    fn write_queue_limits() {
        let msg = rejects(&edit("256MiB", "512k"), 6, "[volume] write_queue");
        assert!(msg.contains("at least 1MiB"), "{msg}");
        let text = edit("256MiB", "1049600"); // 1 MiB + 1 KiB: not a multiple of 4096
        rejects(&text, 6, "[volume] write_queue");
    }

    #[test]
    fn bad_role() {
        let msg = rejects(&edit("role = \"near\"", "role = \"mid\""), 18, "[[replica]] #2 role");
        assert!(msg.contains("\"mid\": expected one of local, near, far"), "{msg}");
        rejects(&edit("role = \"near\"", "role = \"Near\""), 18, "role");
    }

    #[test]
    fn fec_without_network_sync() {
        let text = edit("network_sync = true", "network_sync = false");
        let msg = rejects(&text, 25, "[[replica]] #3 fec");
        assert!(msg.contains("network_sync = true"), "{msg}");
        let text = edit("network_sync = true          ", "# no network_sync ");
        rejects(&text, 25, "[[replica]] #3 fec");
    }

    #[test]
    fn fec_parameters_out_of_range() {
        for (from, to, key) in [
            ("r = 8, c = 3 }", "r = 0, c = 3 }", "fec.r = 0"),
            ("r = 8, c = 3 }", "r = 65, c = 3 }", "fec.r = 65"),
            ("r = 8, c = 3 }", "r = 8, c = 0 }", "fec.c = 0"),
            ("r = 8, c = 3 }", "r = 8, c = 17 }", "fec.c = 17"),
        ] {
            let msg = rejects(&edit(from, to), 25, key);
            assert!(msg.contains("between 1 and"), "{msg}");
        }
        let msg = rejects(&edit("layered-xor\", r", "xor\", r"), 25, "fec.scheme");
        assert!(msg.contains("layered-xor, reed-solomon"), "{msg}");
        // The limits themselves are accepted: layered XOR's default strides
        // 1, 10, ..., 10000 allow 5 layers, Reed-Solomon 16 parity shards.
        assert!(parse(&edit("r = 8, c = 3 }", "r = 64, c = 5 }")).is_ok());
        let rs = edit("layered-xor\", r", "reed-solomon\", r");
        assert!(parse(&rs.replacen("r = 8, c = 3 }", "r = 64, c = 16 }", 1)).is_ok());
        // One layer more would need a stride past the encoder's limit; it
        // is refused here rather than leaving the link without FEC.
        let msg = rejects(&edit("r = 8, c = 3 }", "r = 8, c = 6 }"), 25, "fec.c = 6");
        assert!(msg.contains("between 1 and 5"), "{msg}");
    }

    #[test]
    fn link_settings() {
        let fec = "fec = { scheme = \"layered-xor\", r = 8, c = 3 }";
        let with = |extra: &str| edit(fec, &format!("{fec}\n{extra}"));
        let cfg = parse(&with("rate = \"40Mbit\"\nwindow = \"8MiB\"\nmtu = 9000")).unwrap();
        let link = cfg.replicas[2].link;
        assert_eq!((link.rate, link.window_bytes, link.mtu_bytes), (LinkRate::Fixed(40_000_000), 8 << 20, 9000));
        assert_eq!(parse(EXAMPLE).unwrap().replicas[2].link, LinkTuning::default());
        for (extra, key, expected) in [
            ("rate = \"40MB\"", "rate", "e.g. \"40Mbit\""),
            ("rate = \"0Mbit\"", "rate", "out of range"),
            ("window = \"1MiB\"", "window", "from 4MiB to 1GiB"),
            ("window = \"2GiB\"", "window", "from 4MiB to 1GiB"),
            ("mtu = 500", "mtu", "from 576 to 65535"),
            ("mtu = 70000", "mtu", "from 576 to 65535"),
        ] {
            let msg = rejects(&with(extra), 26, &format!("[[replica]] #3 {key}"));
            assert!(msg.contains(expected), "{msg}");
        }
        // Only network-sync links take them.
        let near = "role = \"near\"";
        for extra in ["rate = \"1Gbit\"", "window = \"16MiB\"", "mtu = 1500"] {
            let msg = rejects(&edit(near, &format!("{near}\n{extra}")), 19, "[[replica]] #2");
            assert!(msg.contains("network_sync = true"), "{msg}");
        }
    }

    #[test]
    fn rate_auto_is_the_default_and_max_exposure_takes_a_size_or_a_time() {
        let fec = "fec = { scheme = \"layered-xor\", r = 8, c = 3 }";
        let with = |extra: &str| edit(fec, &format!("{fec}\n{extra}"));
        let link = parse(EXAMPLE).unwrap().replicas[2].link;
        assert_eq!((link.rate, link.max_exposure), (LinkRate::Auto, MaxExposure::Bytes(4 << 20)));
        // The spelling of the specification's example.
        let link = parse(&with("rate = \"auto\"\nmax_exposure = \"4MiB\"")).unwrap().replicas[2].link;
        assert_eq!((link.rate, link.max_exposure), (LinkRate::Auto, MaxExposure::Bytes(4 << 20)));
        for (value, want) in [
            ("\"1MiB\"", MaxExposure::Bytes(1 << 20)),
            ("65536", MaxExposure::Bytes(65536)),
            ("0", MaxExposure::Bytes(0)),
            ("\"1GiB\"", MaxExposure::Bytes(1 << 30)),
            ("\"500ms\"", MaxExposure::Millis(500)),
            ("\"2s\"", MaxExposure::Millis(2000)),
            ("\"1.5 s\"", MaxExposure::Millis(1500)),
        ] {
            let cfg = parse(&with(&format!("max_exposure = {value}"))).unwrap();
            assert_eq!(cfg.replicas[2].link.max_exposure, want, "{value}");
        }
        for bad in ["\"2GiB\"", "-1", "\"0ms\"", "\"61s\"", "\"lots\"", "\"4MB/s\"", "1.5", "\"ms\""] {
            let msg = rejects(&with(&format!("max_exposure = {bad}")), 26, "[[replica]] #3 max_exposure");
            assert!(
                msg.contains("expected a size from 0 to 1GiB such as \"4MiB\", or a time from 1ms to 60s"),
                "{msg}"
            );
        }
        for bad in ["\"AUTO\"", "\"fast\""] {
            let msg = rejects(&with(&format!("rate = {bad}")), 26, "[[replica]] #3 rate");
            assert!(msg.contains("e.g. \"40Mbit\"") && msg.contains("or \"auto\""), "{msg}");
        }
        // Only network-sync links take them.
        let near = "role = \"near\"";
        for extra in ["rate = \"auto\"", "max_exposure = \"4MiB\"", "max_exposure = \"500ms\""] {
            let msg = rejects(&edit(near, &format!("{near}\n{extra}")), 19, "[[replica]] #2");
            assert!(msg.contains("only applies to network-sync links; set network_sync = true"), "{msg}");
        }
    }

    #[test]
    fn bad_names() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "vol 0", "vol/0", "völ", long.as_str()] {
            let text = edit("name = \"vol0\"", &format!("name = \"{bad}\""));
            rejects(&text, 2, "[volume] name");
        }
        let ok = edit("name = \"vol0\"", &format!("name = \"{}\"", "x".repeat(64)));
        assert!(parse(&ok).is_ok());
        rejects(&edit("name = \"near\"", "name = \"near one\""), 16, "[[replica]] #2 name");
    }

    #[test]
    fn bad_addresses() {
        for bad in ["192.0.2.10", "192.0.2.10:", "192.0.2.10:0", "192.0.2.10:70000", ":7701", "::1:7701", "[zz]:7701"] {
            let text = edit("addr = \"192.0.2.10:7701\"", &format!("addr = \"{bad}\""));
            let msg = rejects(&text, 17, "[[replica]] #2 addr");
            assert!(msg.contains("HOST:PORT"), "{msg}");
        }
        let v6 = edit("addr = \"192.0.2.10:7701\"", "addr = \"[2001:db8::1]:7701\"");
        assert_eq!(parse(&v6).unwrap().replicas[1].addr, "[2001:db8::1]:7701");
    }

    #[test]
    fn bad_on_quorum_loss() {
        let msg = rejects(&edit("\"suspend\"", "\"readonly\""), 7, "[volume] on_quorum_loss");
        assert!(msg.contains("suspend, read-only"), "{msg}");
    }

    #[test]
    fn metrics_listen_takes_an_ip_and_port() {
        assert_eq!(parse(MINIMAL).unwrap().volume.metrics_listen, None);
        let with = |v: &str| MINIMAL.replacen("[volume]\n", &format!("[volume]\nmetrics_listen = {v}\n"), 1);
        let c = parse(&with("\"127.0.0.1:9400\"")).unwrap();
        assert_eq!(c.volume.metrics_listen, Some("127.0.0.1:9400".parse().unwrap()));
        let c = parse(&with("\"[::1]:9400\"")).unwrap();
        assert_eq!(c.volume.metrics_listen, Some("[::1]:9400".parse().unwrap()));
        for bad in ["\"localhost:9400\"", "\"127.0.0.1\"", "\"127.0.0.1:0\"", "\"127.0.0.1:70000\"", "\"\""] {
            let msg = rejects(&with(bad), 2, "[volume] metrics_listen");
            assert!(msg.contains("expected IP:PORT"), "{msg}");
        }
        let msg = rejects(&with("9400"), 2, "[volume] metrics_listen");
        assert!(msg.contains("string"), "{msg}");
    }

    #[test]
    fn empty_key_file_path() {
        rejects(&edit("\"/etc/starblk/vol0.key\"", "\"\""), 8, "[volume] key_file");
    }

    #[test]
    fn wrong_types_and_syntax_errors_name_the_line() {
        let msg = rejects(&edit("quorum = 2", "quorum = \"two\""), 5, "[volume] quorum");
        assert!(msg.contains("invalid type"), "{msg}");
        rejects(&edit("network_sync = true", "network_sync = \"yes\""), 24, "network_sync");
        rejects(&edit("role = \"near\"", "role = near"), 18, "role");
        rejects(&edit("quorum = 2", "quorum = 2\nquorum = 3"), 6, "quorum");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let path = Path::new("/nonexistent/starblk/vol.toml");
        let err = Config::load(path).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/starblk/vol.toml"), "{err}");
        assert_eq!(err.line(), None);
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(Config::load(&path).unwrap().path, path);
    }

    #[test]
    fn fec_flag_parses() {
        let fec: FecConfig = "reed-solomon:8:3".parse().unwrap();
        assert_eq!(fec, FecConfig { scheme: FecScheme::ReedSolomon, r: 8, c: 3 });
        assert_eq!(fec.to_string(), "reed-solomon:8:3");
        assert_eq!("layered-xor:64:5".parse::<FecConfig>().unwrap().r, 64);
        assert_eq!("reed-solomon:64:16".parse::<FecConfig>().unwrap().c, 16);
        for (bad, hint) in [
            ("layered-xor:8", "SCHEME:R:C"),
            ("xor:8:3", "layered-xor, reed-solomon"),
            ("layered-xor:0:3", "R between 1 and 64"),
            ("reed-solomon:8:17", "C between 1 and 16"),
            ("layered-xor:8:6", "C between 1 and 5"),
            ("layered-xor:x:3", "R between"),
            ("layered-xor:8:3:1", "SCHEME:R:C"),
        ] {
            let err = bad.parse::<FecConfig>().unwrap_err().to_string();
            assert!(err.starts_with(&format!("fec {bad:?}: expected")), "{err}");
            assert!(err.contains(hint), "{err:?} lacks {hint:?}");
        }
    }

    #[test]
    fn enum_spellings_round_trip() {
        for role in [Role::Local, Role::Near, Role::Far] {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        for s in [FecScheme::LayeredXor, FecScheme::ReedSolomon] {
            assert_eq!(s.to_string().parse::<FecScheme>(), Ok(s));
        }
        for q in [OnQuorumLoss::Suspend, OnQuorumLoss::ReadOnly] {
            assert_eq!(q.to_string().parse::<OnQuorumLoss>(), Ok(q));
        }
        let err = "middle".parse::<Role>().unwrap_err().to_string();
        assert_eq!(err, "role \"middle\": expected one of local, near, far");
    }

    #[test]
    fn ack_key_is_wire_by_default_and_only_for_network_sync() {
        let c = parse(EXAMPLE).unwrap();
        assert!(c.replicas.iter().all(|r| r.link.ack_on_wire));
        let local = EXAMPLE.replace("network_sync = true", "network_sync = true\nack = \"local\"");
        assert!(!parse(&local).unwrap().replicas[2].link.ack_on_wire);
        let bad = EXAMPLE.replace("network_sync = true", "network_sync = true\nack = \"sometimes\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("ack") && err.contains("expected \"wire\" or \"local\""), "{err}");
        let tcp = EXAMPLE.replacen("role = \"local\"", "role = \"local\"\nack = \"local\"", 1);
        let err = parse(&tcp).unwrap_err().to_string();
        assert!(err.contains("only applies to network-sync links"), "{err}");
    }

    #[test]
    fn serializes_with_config_spellings() {
        let json = serde_json::to_value(parse(EXAMPLE).unwrap()).unwrap();
        assert_eq!(json["volume"]["on_quorum_loss"], "suspend");
        assert_eq!(json["replicas"][2]["role"], "far");
        assert_eq!(json["replicas"][2]["fec"]["scheme"], "layered-xor");
        assert_eq!(json["volume"]["size_bytes"], 8u64 << 30);
    }
}
