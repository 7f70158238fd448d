//! The HE's metrics: the volume, each replica as the HE sees it, each
//! network-sync link, and the I/O latency histograms. Everything comes
//! from one `status` snapshot and one latency snapshot, so a scrape costs
//! what `starblk status` costs and never touches the I/O path.

use super::{labels, Exposition, Labels, Value};
use crate::engine::latency::LatencySnapshot;
use crate::engine::status::{NetsyncStatus, ReplicaStatus, VolumeStatus};
use crate::engine::LinkState;

/// Every replica state, so each gets a series (1 for the current one).
const STATES: [LinkState; 5] =
    [LinkState::UpToDate, LinkState::Recovering, LinkState::Lagging, LinkState::Failed, LinkState::Removed];

/// The HE's `/metrics` page.
pub fn render(st: &VolumeStatus, lat: &LatencySnapshot) -> String {
    let mut x = Exposition::new();
    volume(&mut x, st);
    replicas(&mut x, st);
    links(&mut x, st);
    let vol = |op: &str| labels(&[("volume", &st.name), ("op", op)]);
    x.histogram_seconds(
        "starblk_io_latency_seconds",
        "Time from submit to completion of I/O requests (write: durable on Q replicas; flush: every earlier \
         write durable on Q replicas).",
        [(vol("read"), &lat.read), (vol("write"), &lat.write), (vol("flush"), &lat.flush)],
    );
    x.finish()
}

fn volume(x: &mut Exposition, st: &VolumeStatus) {
    let v = || labels(&[("volume", &st.name)]);
    let one = |val: Value| [(v(), val)];
    let info = labels(&[("volume", &st.name), ("uuid", &st.uuid), ("on_quorum_loss", &st.on_quorum_loss)]);
    x.gauge(
        "starblk_volume_info",
        "Constant 1, labelled with the volume's UUID and quorum-loss behaviour.",
        [(info, 1u64)],
    );
    x.gauge("starblk_volume_epoch", "Fencing epoch of this host.", one(st.epoch.into()));
    x.gauge("starblk_volume_size_bytes", "Size of the volume.", one(st.size_bytes.into()));
    x.gauge(
        "starblk_volume_quorum",
        "Replicas that must have a write durable before it completes (Q).",
        one(st.quorum.into()),
    );
    x.gauge("starblk_volume_quorum_ok", "1 while Q replicas are up to date, else 0.", one(st.quorum_ok.into()));
    x.gauge("starblk_volume_last_seq", "Last sequence number given to a write.", one(st.last_seq.into()));
    x.gauge(
        "starblk_volume_completed_seq",
        "Every write up to this seq is durable on Q replicas.",
        one(st.completed_seq.into()),
    );
    x.gauge("starblk_volume_write_queue_bytes", "Write-queue bytes in use.", one(st.write_queue_bytes.into()));
    x.gauge("starblk_volume_write_queue_max_bytes", "Write-queue capacity.", one(st.write_queue_max_bytes.into()));
    x.gauge(
        "starblk_volume_recovery_rate_limit_bytes_per_second",
        "Cap on recovery traffic per recovering replica (0 = unlimited).",
        one(st.recovery_rate_bytes_per_s.into()),
    );
}

/// One sample per replica, labelled volume and replica.
fn per_replica<V: Into<Value>>(st: &VolumeStatus, f: impl Fn(&ReplicaStatus) -> V) -> Vec<(Labels, Value)> {
    st.replicas.iter().map(|r| (replica_labels(st, r), f(r).into())).collect()
}

/// One sample per replica where `f` has a value.
fn per_replica_opt<V: Into<Value>>(st: &VolumeStatus, f: impl Fn(&ReplicaStatus) -> Option<V>) -> Vec<(Labels, Value)> {
    st.replicas.iter().filter_map(|r| f(r).map(|v| (replica_labels(st, r), v.into()))).collect()
}

/// One sample per network-sync link.
fn per_link<V: Into<Value>>(st: &VolumeStatus, f: impl Fn(&NetsyncStatus) -> V) -> Vec<(Labels, Value)> {
    per_replica_opt(st, |r| r.link.as_ref().map(&f))
}

/// One sample per replica and reason, from a per-replica counter map.
fn per_reason<'a>(
    st: &'a VolumeStatus,
    f: impl Fn(&'a ReplicaStatus) -> Option<&'a std::collections::BTreeMap<String, u64>>,
) -> Vec<(Labels, Value)> {
    let mut out = Vec::new();
    for r in &st.replicas {
        for (reason, n) in f(r).into_iter().flatten() {
            let mut l = replica_labels(st, r);
            l.push(("reason", reason.clone()));
            out.push((l, Value::Int(*n)));
        }
    }
    out
}

fn replica_labels(st: &VolumeStatus, r: &ReplicaStatus) -> Labels {
    labels(&[("volume", &st.name), ("replica", &r.name)])
}

fn replicas(x: &mut Exposition, st: &VolumeStatus) {
    let info: Vec<_> = st
        .replicas
        .iter()
        .map(|r| {
            let mut l = replica_labels(st, r);
            l.extend([("role", r.role.clone()), ("addr", r.addr.clone()), ("network_sync", r.network_sync.clone())]);
            (l, 1u64)
        })
        .collect();
    x.gauge(
        "starblk_replica_info",
        "Constant 1, labelled with the replica's role, address and network-sync mode.",
        info,
    );
    let states: Vec<_> = st
        .replicas
        .iter()
        .flat_map(|r| {
            STATES.iter().map(move |s| {
                let mut l = replica_labels(st, r);
                l.push(("state", s.to_string()));
                (l, r.state == *s)
            })
        })
        .collect();
    x.gauge("starblk_replica_state", "1 for the replica's current state, 0 for the others.", states);
    x.gauge(
        "starblk_replica_durable_seq",
        "Highest seq the replica reported durable.",
        per_replica(st, |r| r.durable_seq),
    );
    x.gauge("starblk_replica_lag_writes", "Writes the replica is missing.", per_replica(st, |r| r.lag_writes));
    x.gauge(
        "starblk_replica_lag_bytes",
        "Data bytes the replica is missing, of those still in the write queue.",
        per_replica(st, |r| r.lag_bytes),
    );
    x.gauge(
        "starblk_replica_rtt_seconds",
        "Smoothed heartbeat round trip (0 before the first).",
        per_replica(st, |r| r.rtt_us as f64 / 1e6),
    );
    x.counter("starblk_replica_writes_sent_total", "Writes sent to the replica.", per_replica(st, |r| r.writes_sent));
    x.counter(
        "starblk_replica_reads_sent_total",
        "Reads sent to the replica over its link.",
        per_replica(st, |r| r.reads_sent),
    );
    x.counter(
        "starblk_replica_reads_local_total",
        "Reads served from the replica's data file on this machine.",
        per_replica(st, |r| r.reads_local),
    );
    x.counter("starblk_replica_sessions_total", "Sessions opened with the replica.", per_replica(st, |r| r.sessions));
    x.counter(
        "starblk_replica_refusals_total",
        "Error frames the replica answered with, by reason (its refusals of this host).",
        per_reason(st, |r| Some(&r.refusals)),
    );
    x.gauge(
        "starblk_replica_recovery_progress_ratio",
        "Recovery progress in [0, 1]; only while the replica recovers.",
        per_replica_opt(st, |r| r.recovery_progress),
    );
    let copy = |f: fn(&starblk_recovery::ProgressView) -> Value| {
        per_replica_opt(st, move |r| r.recovery.as_ref().map(|c| f(&c.progress)))
    };
    x.gauge(
        "starblk_replica_recovery_copied_bytes",
        "Bytes a recovery copy has copied; only during a copy.",
        copy(|p| p.done_bytes.into()),
    );
    x.gauge(
        "starblk_replica_recovery_copy_size_bytes",
        "Bytes a recovery copy copies in all; only during a copy.",
        copy(|p| p.total_bytes.into()),
    );
    x.gauge(
        "starblk_replica_recovery_rate_bytes_per_second",
        "Recent rate of a recovery copy; only during a copy.",
        copy(|p| p.rate_bytes_per_s.into()),
    );
    x.gauge(
        "starblk_replica_recovery_eta_seconds",
        "Time a recovery copy needs at its recent rate; only once it has a rate.",
        per_replica_opt(st, |r| r.recovery.as_ref().and_then(|c| c.progress.eta_s)),
    );
}

fn links(x: &mut Exposition, st: &VolumeStatus) {
    let secs = |ms: f64| ms / 1e3;
    x.counter(
        "starblk_netsync_data_packets_total",
        "Data datagrams sent (first transmissions).",
        per_link(st, |l| l.data_packets),
    );
    x.counter("starblk_netsync_repair_packets_total", "FEC repair datagrams sent.", per_link(st, |l| l.repair_packets));
    x.counter(
        "starblk_netsync_repaired_packets_total",
        "Datagrams the far replica rebuilt from repair packets.",
        per_link(st, |l| l.repaired),
    );
    x.counter(
        "starblk_netsync_nacked_packets_total",
        "Datagrams the far replica asked for again.",
        per_link(st, |l| l.nacked),
    );
    x.counter("starblk_netsync_resent_packets_total", "Datagrams sent again.", per_link(st, |l| l.retransmitted));
    x.counter(
        "starblk_netsync_rto_probes_total",
        "Datagrams sent again after a retransmission timeout (tail-loss probes).",
        per_link(st, |l| l.rto_probes),
    );
    x.counter(
        "starblk_netsync_rejected_datagrams_total",
        "Datagrams from the far replica this host dropped, by reason (current session).",
        per_reason(st, |r| r.link.as_ref().map(|l| &l.rejected)),
    );
    x.gauge(
        "starblk_netsync_wire_latency_p50_seconds",
        "Median time from handing a datagram to the kernel to its transmit timestamp.",
        per_link(st, |l| l.wire_latency_p50_us as f64 / 1e6),
    );
    x.gauge("starblk_netsync_loss_ratio", "Loss on the link over the health window.", per_link(st, |l| l.loss_window));
    x.gauge(
        "starblk_netsync_fec_capacity_ratio",
        "Loss the link's FEC code repairs; above it the link is degraded.",
        per_link(st, |l| l.fec_capacity),
    );
    x.gauge(
        "starblk_netsync_degraded",
        "1 while the link is degraded, else 0.",
        per_link(st, |l| l.health == "degraded"),
    );
    x.counter(
        "starblk_netsync_degradations_total",
        "Times the link turned degraded.",
        per_link(st, |l| l.degradations),
    );
    x.gauge(
        "starblk_netsync_window_used_bytes",
        "Bytes in flight to the far replica.",
        per_link(st, |l| l.window_used_bytes),
    );
    x.gauge("starblk_netsync_window_max_bytes", "The in-flight window's limit.", per_link(st, |l| l.window_max_bytes));
    x.gauge(
        "starblk_netsync_pacing_rate_bytes_per_second",
        "Pacing rate, IP and UDP headers included (0 = unpaced).",
        per_link(st, |l| l.pacing_rate_bits_per_s as f64 / 8.0),
    );
    x.gauge(
        "starblk_netsync_exposure_bytes",
        "Acknowledged bytes the far replica has not confirmed receiving.",
        per_link(st, |l| l.exposure_bytes),
    );
    x.gauge(
        "starblk_netsync_max_exposure_bytes",
        "The bound on the exposure now.",
        per_link(st, |l| l.max_exposure_bytes),
    );
    x.counter(
        "starblk_netsync_exposure_waits_total",
        "Times completions waited for the far ack because the exposure reached its bound.",
        per_link(st, |l| l.exposure_waits.count),
    );
    x.counter(
        "starblk_netsync_exposure_wait_seconds_total",
        "Time completions waited for the far ack at the exposure bound.",
        per_link(st, |l| secs(l.exposure_waits.total_ms)),
    );
    x.counter(
        "starblk_netsync_degraded_waits_total",
        "Times completions waited for the far ack because the link was degraded.",
        per_link(st, |l| l.degraded_waits.count),
    );
    x.counter(
        "starblk_netsync_degraded_wait_seconds_total",
        "Time completions waited for the far ack while the link was degraded.",
        per_link(st, |l| secs(l.degraded_waits.total_ms)),
    );
}
