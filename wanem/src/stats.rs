//! Per-direction counters, updated lock-free by the relay threads.

use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// A snapshot of one direction's counters (UDP relay).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DirStats {
    /// Datagrams read from the socket, whatever their fate.
    pub received: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Lost to independent or Gilbert-Elliott loss.
    pub dropped_loss: u64,
    /// Tail-dropped at the serialisation queue or at the in-flight bound.
    pub dropped_queue: u64,
    /// Dropped because the link was cut when they arrived.
    pub dropped_cut: u64,
    /// Dropped by the kernel because the relay's receive buffer was full
    /// (SO_RXQ_OVFL); these never reached the link model.
    pub dropped_rcvbuf: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Packets picked for reordering (held back by `reorder_delay_ms`).
    pub reordered: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Payload bytes forwarded.
    pub bytes_forwarded: u64,
    /// Sends that failed (no client address yet, or an OS error).
    pub send_errors: u64,
    /// Datagrams accepted by the link and not yet delivered.
    pub in_flight: u64,
    /// Their payload bytes.
    pub in_flight_bytes: u64,
    /// Mean lateness of departures versus their due time, in µs: the
    /// relay's own timing precision.
    pub late_mean_us: u64,
    /// Worst lateness seen, in µs.
    pub late_max_us: u64,
}

/// Live counters behind [`DirStats`].
#[derive(Default)]
pub(crate) struct DirCounters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
    pub dropped_cut: AtomicU64,
    pub dropped_rcvbuf: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub send_errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub in_flight_bytes: AtomicU64,
    late_sum_ns: AtomicU64,
    late_max_ns: AtomicU64,
}

impl DirCounters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Records one departure's lateness.
    pub(crate) fn record_late(&self, late: Duration) {
        let ns = late.as_nanos().min(u64::MAX as u128) as u64;
        self.late_sum_ns.fetch_add(ns, Relaxed);
        self.late_max_ns.fetch_max(ns, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> DirStats {
        // Acquire pairs with the receiver's Release: every fate recorded
        // before `received` moved is visible below.
        let received = self.received.load(Acquire);
        let forwarded = self.forwarded.load(Relaxed);
        let late_sum_ns = self.late_sum_ns.load(Relaxed);
        DirStats {
            received,
            forwarded,
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            dropped_cut: self.dropped_cut.load(Relaxed),
            dropped_rcvbuf: self.dropped_rcvbuf.load(Relaxed),
            duplicated: self.duplicated.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_forwarded: self.bytes_forwarded.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
            late_mean_us: late_sum_ns.checked_div(forwarded).unwrap_or(0) / 1000,
            late_max_us: self.late_max_ns.load(Relaxed) / 1000,
        }
    }
}

/// Both directions of a UDP relay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Client → upstream.
    pub up: DirStats,
    /// Upstream → client.
    pub down: DirStats,
}
