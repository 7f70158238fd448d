//! `status`: a snapshot of the volume and its replicas, for humans and JSON.

use std::fmt;
use std::sync::atomic::Ordering;

use serde::Serialize;
use starblk_replica::auth::AuthFailure;
use starblk_replica::client::uuid_string;

use super::exposure::{exposure_bytes, WaitCause};
use super::{LinkState, Shared, Waits};

/// One replica's row.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    /// Replica name.
    pub name: String,
    /// local | near | far.
    pub role: String,
    /// HOST:PORT.
    pub addr: String,
    /// Lifecycle state.
    pub state: LinkState,
    /// Why it is in that state.
    pub reason: String,
    /// Why it is lagging, for machines (`reason` has the same as text).
    #[serde(default)]
    pub lag_reason: Option<starblk_recovery::LagReason>,
    /// Set when the replica holds records past this seq from another
    /// history: it stays lagging until rolled back (`docs/design.md`).
    #[serde(default)]
    pub diverged_after: Option<u64>,
    /// Highest durable seq it reported.
    pub durable_seq: u64,
    /// Writes it is missing.
    pub lag_writes: u64,
    /// Bytes of data it is missing (of those still in the write queue).
    pub lag_bytes: u64,
    /// Smoothed heartbeat RTT in µs.
    pub rtt_us: u64,
    /// Network-sync mode of the link ("off" for TCP links, else how "on
    /// the wire" is established: "tx-timestamp" or "sendmsg-returned").
    pub network_sync: String,
    /// Network-sync link counters (None for TCP links).
    #[serde(default)]
    pub link: Option<NetsyncStatus>,
    /// Recovery progress in [0, 1] while recovering.
    pub recovery_progress: Option<f64>,
    /// A recovery copy (incremental, full, rollback): bytes, rate, ETA.
    #[serde(default)]
    pub recovery: Option<RecoveryStatus>,
    /// Writes sent on this link since start.
    pub writes_sent: u64,
    /// Reads sent to the replica over its link since start.
    #[serde(default)]
    pub reads_sent: u64,
    /// Reads served from the replica's data file on this machine
    /// (`docs/design.md`, "Local reads").
    #[serde(default)]
    pub reads_local: u64,
    /// Local reads that went over a link after all, by reason.
    #[serde(default)]
    pub reads_local_missed: std::collections::BTreeMap<String, u64>,
    /// Sessions opened since start.
    pub sessions: u64,
    /// Error frames the replica answered with since start, by reason
    /// (`stale_epoch`, `disk_error`, ...; zeros included).
    #[serde(default)]
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// How its sessions are protected: "off", "mac" or "encrypted".
    #[serde(default)]
    pub auth: String,
    /// The key id the current (or last) session authenticated with.
    #[serde(default)]
    pub auth_key: String,
    /// Authentication failures by reason (`AuthFailure`).
    #[serde(default)]
    pub auth_failures: std::collections::BTreeMap<String, u64>,
}

/// A replica's recovery copy, as status shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RecoveryStatus {
    /// incremental | full | rollback.
    pub kind: String,
    /// The source replica (empty once done).
    pub peer: String,
    /// Bytes, fraction (never decreasing, 1 at the end), rate and ETA.
    #[serde(flatten)]
    pub progress: starblk_recovery::ProgressView,
}

impl fmt::Display for RecoveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.progress;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(f, "{} copy {:.1}/{:.1} MiB", self.kind, mib(p.done_bytes), mib(p.total_bytes))?;
        if p.fraction < 1.0 {
            write!(f, " at {}", crate::size::format_rate(p.rate_bytes_per_s * 8))?;
            if let Some(eta) = p.eta_s {
                write!(f, ", ETA {eta} s")?;
            }
        }
        Ok(())
    }
}

/// Counters of a network-sync link.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NetsyncStatus {
    /// Data datagrams sent (first transmissions).
    pub data_packets: u64,
    /// FEC repair datagrams sent.
    pub repair_packets: u64,
    /// Datagrams the replica rebuilt from repair packets.
    pub repaired: u64,
    /// Datagrams the replica asked for again.
    pub nacked: u64,
    /// Datagrams sent again.
    pub retransmitted: u64,
    /// Of those, tail-loss probes sent after a retransmission timeout
    /// (the rest answered nacks).
    #[serde(default)]
    pub rto_probes: u64,
    /// Loss rate the replica sees, in [0, 1].
    pub loss_rate: f64,
    /// Median send-to-TX-timestamp latency, µs.
    pub wire_latency_p50_us: u64,
    /// Window in use and its limit, bytes.
    pub window_used_bytes: u64,
    /// The window limit (backpressure beyond it).
    pub window_max_bytes: u64,
    /// Pacing rate (0 = unpaced): the fixed rate, or the current one with
    /// `rate = "auto"`.
    pub pacing_rate_bits_per_s: u64,
    /// Highest seq on the wire.
    pub wire_seq: u64,
    /// `rate = "auto"`: the pacing rate follows the path.
    #[serde(default)]
    pub auto_rate: bool,
    /// `rate = "auto"`: "startup", "drain" or "cruise".
    #[serde(default)]
    pub rate_phase: String,
    /// `rate = "auto"`: the path's measured delivery rate, bits/s.
    #[serde(default)]
    pub delivery_rate_bits_per_s: u64,
    /// `rate = "auto"`: the smallest recent RTT, µs.
    #[serde(default)]
    pub min_rtt_us: u64,
    /// "healthy", or "degraded" while the loss exceeds what the FEC code
    /// repairs (completions then wait for the far replica's ack).
    #[serde(default)]
    pub health: String,
    /// The loss on the link (datagrams that did not arrive the first time)
    /// over the health window, in [0, 1]...
    #[serde(default)]
    pub loss_window: f64,
    /// ...and the loss the FEC code repairs, in [0, 1].
    #[serde(default)]
    pub fec_capacity: f64,
    /// Times the link turned degraded since the HE started.
    #[serde(default)]
    pub degradations: u64,
    /// Highest seq the far replica confirmed receiving.
    #[serde(default)]
    pub received_seq: u64,
    /// Bytes of acknowledged writes the far replica has not confirmed
    /// (data plus 64 bytes per write).
    #[serde(default)]
    pub exposure_bytes: u64,
    /// The bound on it now.
    #[serde(default)]
    pub max_exposure_bytes: u64,
    /// Completions waiting for the far ack now: "exposure", "degraded" or
    /// "" (not waiting).
    #[serde(default)]
    pub waiting_for_ack: String,
    /// Times (and total ms) completions waited for the far ack because the
    /// exposure reached its bound.
    #[serde(default)]
    pub exposure_waits: Waits,
    /// Times (and total ms) completions waited for the far ack because the
    /// link was degraded.
    #[serde(default)]
    pub degraded_waits: Waits,
    /// Datagrams from the far end this end dropped in the current
    /// session, by reason (`bad_crc`, `bad_repair`, ...; zeros included).
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
}

/// The whole volume.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Volume UUID.
    pub uuid: String,
    /// Epoch of this HE.
    pub epoch: u64,
    /// Branch point: the seq this HE's history started from.
    pub start_seq: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Block size.
    pub block_size: u32,
    /// Q.
    pub quorum: usize,
    /// Last seq assigned.
    pub last_seq: u64,
    /// Every write <= this is durable on Q replicas.
    pub completed_seq: u64,
    /// Write-queue bytes in use.
    pub write_queue_bytes: u64,
    /// Write-queue capacity.
    pub write_queue_max_bytes: u64,
    /// Whether Q up-to-date replicas are available.
    pub quorum_ok: bool,
    /// Behaviour on quorum loss.
    pub on_quorum_loss: String,
    /// Replay recovery rate limit, data bytes/s (0 = unlimited).
    #[serde(default)]
    pub recovery_rate_bytes_per_s: u64,
    /// Version of the replica set in effect (`docs/design.md`, "Membership").
    #[serde(default)]
    pub replica_set_version: u64,
    /// `recovery_rate = "auto"`: the controller's state (its chosen rate
    /// is `recovery_rate_bytes_per_s`); None with a fixed rate.
    #[serde(default)]
    pub recovery_rate_auto: Option<starblk_recovery::AutoRateView>,
    /// Replicas.
    pub replicas: Vec<ReplicaStatus>,
}

pub(crate) fn snapshot(s: &Shared) -> VolumeStatus {
    let g = s.lock();
    let last = g.next_seq - 1;
    let replicas = s
        .links
        .iter()
        .zip(&g.links)
        .map(|(l, c)| {
            let lag_bytes: u64 = g.queue.iter().filter(|e| e.seq > c.durable_seq).map(|e| e.data.len() as u64).sum();
            let recovery = match &c.copy_meter {
                Some(m) if c.state != LinkState::UpToDate => Some(RecoveryStatus {
                    kind: c.copy.as_ref().map_or("copy".into(), |j| j.kind.to_string()),
                    peer: c.copy.as_ref().map_or(String::new(), |j| j.peer.clone()),
                    progress: m.view(),
                }),
                _ => None,
            };
            let progress = match &recovery {
                Some(r) => Some(r.progress.fraction),
                None => (c.state == LinkState::Recovering).then(|| {
                    let span = last.saturating_sub(c.recovery_from_seq).max(1);
                    (c.durable_seq.saturating_sub(c.recovery_from_seq)) as f64 / span as f64
                }),
            };
            ReplicaStatus {
                name: l.spec.name.clone(),
                role: l.spec.role.to_string(),
                addr: l.spec.addr.clone(),
                state: c.state,
                reason: c.reason.clone(),
                lag_reason: c.lag.clone(),
                diverged_after: c.diverged_after,
                durable_seq: c.durable_seq,
                lag_writes: last.saturating_sub(c.durable_seq),
                lag_bytes,
                rtt_us: c.srtt_us,
                network_sync: match (&l.spec.netsync, l.net_link()) {
                    (None, _) => "off".into(),
                    (Some(_), _) if !l.spec.wire_gate => "ack-local (does not wait for the wire)".into(),
                    (Some(_), None) => "down".into(),
                    (Some(_), Some(nl)) => wire_mode(&nl.stats().wire_mode),
                },
                link: l.net_link().map(|nl| netsync_status(&nl.stats(), &g, c)),
                recovery_progress: progress,
                recovery,
                writes_sent: l.counters.writes_sent.load(Ordering::Relaxed),
                reads_sent: l.counters.reads_sent.load(Ordering::Relaxed),
                reads_local: l.counters.reads_local.load(Ordering::Relaxed),
                reads_local_missed: l.counters.local_misses(),
                sessions: l.counters.reconnects.load(Ordering::Relaxed),
                refusals: l.counters.refusals(),
                auth: match (&s.cfg.keys, l.spec.encrypt) {
                    (None, _) => "off".into(),
                    (Some(_), false) => "mac".into(),
                    (Some(_), true) => "encrypted".into(),
                },
                auth_key: match l.counters.session_key.load(Ordering::Relaxed) {
                    0 => String::new(),
                    id => starblk_replica::auth::KeyId(id).to_string(),
                },
                auth_failures: auth_failures(l),
            }
        })
        .collect();
    VolumeStatus {
        name: s.cfg.name.clone(),
        uuid: uuid_string(&s.cfg.volume),
        epoch: s.cfg.epoch,
        start_seq: s.cfg.start_seq,
        size_bytes: s.cfg.size_bytes,
        block_size: s.cfg.block_size,
        quorum: s.cfg.quorum,
        last_seq: last,
        completed_seq: g.completed_seq,
        write_queue_bytes: g.queue_bytes,
        write_queue_max_bytes: s.cfg.write_queue_bytes,
        quorum_ok: g.quorum_lost_since.is_none(),
        on_quorum_loss: s.cfg.on_quorum_loss.to_string(),
        recovery_rate_bytes_per_s: s.recovery_rate_bytes_per_s.load(std::sync::atomic::Ordering::Acquire),
        replica_set_version: s.members.current.lock().expect("members lock poisoned").version,
        recovery_rate_auto: s.autorate.view(),
        replicas,
    }
}

impl fmt::Display for NetsyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pace = match self.pacing_rate_bits_per_s {
            _ if self.auto_rate => format!(
                "paced auto {} ({}, delivery {}, min rtt {} us)",
                crate::size::format_rate(self.pacing_rate_bits_per_s),
                self.rate_phase,
                crate::size::format_rate(self.delivery_rate_bits_per_s),
                self.min_rtt_us
            ),
            0 => "unpaced".to_string(),
            r => format!("paced {}", crate::size::format_rate(r)),
        };
        write!(
            f,
            "link: sent {} data + {} repair, repaired {}, nacked {}, retransmitted {} ({} on timeout), loss {:.2}%, \
             wire p50 {} us, window {}/{} B, {pace}",
            self.data_packets,
            self.repair_packets,
            self.repaired,
            self.nacked,
            self.retransmitted,
            self.rto_probes,
            self.loss_rate * 100.0,
            self.wire_latency_p50_us,
            self.window_used_bytes,
            self.window_max_bytes
        )?;
        let size = crate::size::format_size;
        let waiting = match self.waiting_for_ack.as_str() {
            "" => String::new(),
            why => format!(" (waiting now: {why})"),
        };
        write!(
            f,
            "\n  {}: loss {:.2}% (FEC repairs {:.2}%), degraded {} times; exposure {} of {}, \
             completions waited for the far ack {} times {:.0} ms at the bound, {} times {:.0} ms degraded{waiting}",
            self.health,
            self.loss_window * 100.0,
            self.fec_capacity * 100.0,
            self.degradations,
            size(self.exposure_bytes),
            size(self.max_exposure_bytes),
            self.exposure_waits.count,
            self.exposure_waits.total_ms,
            self.degraded_waits.count,
            self.degraded_waits.total_ms
        )
    }
}

impl fmt::Display for VolumeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "volume {} ({})  epoch {}  size {} B  block {} B  Q={}  replica set v{}",
            self.name, self.uuid, self.epoch, self.size_bytes, self.block_size, self.quorum, self.replica_set_version
        )?;
        let q = if self.quorum_ok { "ok".to_string() } else { format!("LOST ({})", self.on_quorum_loss) };
        let mut rate = match self.recovery_rate_bytes_per_s {
            0 => "unlimited".to_string(),
            b => crate::size::format_rate(b * 8),
        };
        if let Some(a) = &self.recovery_rate_auto {
            let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} us"));
            rate = format!(
                "auto {rate} ({}, write p99 {} against {} without recovery)",
                a.phase,
                us(a.last_p99_us),
                us(a.baseline_p99_us)
            );
        }
        writeln!(
            f,
            "seq {} (completed {})  write queue {}/{} B  quorum {}  recovery rate {rate}",
            self.last_seq, self.completed_seq, self.write_queue_bytes, self.write_queue_max_bytes, q
        )?;
        writeln!(
            f,
            "{:<10} {:<5} {:<22} {:<11} {:>10} {:>9} {:>11} {:>9} {:<8} DETAIL",
            "NAME", "ROLE", "ADDR", "STATE", "DURABLE", "LAG", "LAG_BYTES", "RTT_US", "NETSYNC"
        )?;
        for r in &self.replicas {
            let detail = match (r.recovery_progress, &r.recovery) {
                (Some(p), Some(rec)) => format!("{} {rec}; {}", progress_bar(p), r.reason),
                (Some(p), None) => format!("{} {}", progress_bar(p), r.reason),
                _ => r.reason.clone(),
            };
            writeln!(
                f,
                "{:<10} {:<5} {:<22} {:<11} {:>10} {:>9} {:>11} {:>9} {:<8} {}",
                r.name,
                r.role,
                r.addr,
                r.state.to_string(),
                r.durable_seq,
                r.lag_writes,
                r.lag_bytes,
                r.rtt_us,
                r.network_sync,
                detail
            )?;
            if let Some(l) = &r.link {
                writeln!(f, "  {l}")?;
            }
            let missed: u64 = r.reads_local_missed.values().sum();
            if r.reads_local + missed > 0 {
                let why = nonzero_counts(&r.reads_local_missed).map_or(String::new(), |w| format!(" ({w})"));
                writeln!(f, "  local reads: {} from its data file, {missed} over the link{why}", r.reads_local)?;
            }
            if r.auth != "off" && !r.auth.is_empty() {
                let failures = nonzero_counts(&r.auth_failures).unwrap_or_else(|| "none".to_string());
                writeln!(f, "  auth: {} with key {}; auth_failures: {failures}", r.auth, r.auth_key)?;
            }
        }
        Ok(())
    }
}

/// `"reason n, reason n"` for the counters above zero; None if all are.
fn nonzero_counts(counts: &std::collections::BTreeMap<String, u64>) -> Option<String> {
    let parts: Vec<String> = counts.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn wire_mode(m: &starblk_netsync::WireMode) -> String {
    match m {
        starblk_netsync::WireMode::TxTimestamp => "tx-timestamp".into(),
        starblk_netsync::WireMode::Probing => "probing".into(),
        _ => "sendmsg-returned".into(),
    }
}

fn netsync_status(st: &starblk_netsync::LinkStats, g: &super::Core, c: &super::link::LinkCore) -> NetsyncStatus {
    let confirmed = c.far.confirmed(c.durable_seq);
    let (exposure_waits, degraded_waits) = c.far.waits(std::time::Instant::now());
    NetsyncStatus {
        data_packets: st.tx.data_packets,
        repair_packets: st.tx.repair_packets,
        repaired: st.peer_rx.recovered_packets,
        nacked: st.peer_rx.nacked_packets,
        retransmitted: st.tx.retransmitted_packets,
        rto_probes: st.tx.rto_probes,
        // Datagrams the replica missed on first arrival (rebuilt or nacked).
        loss_rate: (st.peer_rx.recovered_packets + st.peer_rx.nacked_packets) as f64 / st.tx.data_packets.max(1) as f64,
        wire_latency_p50_us: st.tx.wire_latency_p50_us,
        window_used_bytes: st.tx.window_used_bytes,
        window_max_bytes: st.tx.window_max_bytes,
        pacing_rate_bits_per_s: st.tx.pacing_rate_bits_per_s,
        wire_seq: c.wire_seq,
        auto_rate: st.tx.auto_rate,
        rate_phase: st.tx.rate_phase.to_string(),
        delivery_rate_bits_per_s: st.tx.delivery_rate_bits_per_s,
        min_rtt_us: st.tx.min_rtt_us,
        health: st.health.as_str().to_string(),
        loss_window: st.loss,
        fec_capacity: st.fec_capacity,
        degradations: c.far.degradations,
        received_seq: confirmed,
        exposure_bytes: exposure_bytes(g, confirmed),
        max_exposure_bytes: c.far.bound_bytes,
        waiting_for_ack: match c.far.waiting() {
            Some(WaitCause::Exposure) => "exposure".into(),
            Some(WaitCause::Degraded) => "degraded".into(),
            None => String::new(),
        },
        exposure_waits,
        degraded_waits,
        rejected: st.rejected.by_reason().iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

/// A link's authentication failures by reason: the session's, and on a
/// network-sync link its current link's datagrams whose MAC failed
/// (`bad_datagram_mac`) or whose control counter did not rise
/// (`replayed_datagram`).
fn auth_failures(l: &super::link::Link) -> std::collections::BTreeMap<String, u64> {
    let mut m: std::collections::BTreeMap<String, u64> = AuthFailure::ALL
        .iter()
        .zip(&l.counters.auth_failures)
        .map(|(a, n)| (a.reason().to_string(), n.load(Ordering::Relaxed)))
        .collect();
    if let Some(nl) = l.net_link() {
        let r = nl.stats().rejected;
        m.insert("bad_datagram_mac".into(), r.bad_mac);
        m.insert("replayed_datagram".into(), r.replayed);
    }
    m
}

/// A 20-cell text progress bar.
pub fn progress_bar(p: f64) -> String {
    let filled = (p.clamp(0.0, 1.0) * 20.0).round() as usize;
    format!("[{}{}] {:>3.0}%", "#".repeat(filled), "-".repeat(20 - filled), p * 100.0)
}
