//! Counters for `status` and tests.

use crate::wire::PeerCounters;

/// How "on the wire" is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireMode {
    /// Not decided yet: the timestamp probe is still running.
    #[default]
    Probing,
    /// The kernel reported each datagram transmitted (SO_TIMESTAMPING TX
    /// software timestamp).
    TxTimestamp,
    /// Weaker: `sendmsg` returned. Used when timestamps are off, refused,
    /// or never arrive.
    SendReturned,
}

impl WireMode {
    /// The name `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            WireMode::Probing => "probing",
            WireMode::TxTimestamp => "tx-timestamp",
            WireMode::SendReturned => "send-returned",
        }
    }
}

/// Why a received datagram was dropped. Each has a counter in
/// [`Rejected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Shorter than its header or its declared payload, or longer.
    Truncated,
    /// Bad magic, version, kind, flags, reserved bytes or field ranges.
    BadHeader,
    /// crc32c mismatch.
    BadCrc,
    /// A MAC that does not verify (forged, corrupted, another link
    /// instance's or the other direction's), a MAC where no key is
    /// configured, or none on a keyed link.
    BadMac,
    /// Keyed links: an ack or nack whose control counter did not rise
    /// (replayed or reordered).
    Replayed,
    /// Another link's id.
    WrongLinkId,
    /// A seq (or ack) far outside the window.
    SeqOutOfWindow,
    /// A repair packet that does not parse, does not match the scheme, or
    /// rebuilt a datagram that fails its crc.
    BadRepair,
    /// A nack over the rate limit.
    NackFlood,
    /// Well-formed but wrong here: a fragment that does not continue the
    /// stream, a payload that does not fit its kind, data before hello.
    Protocol,
}

/// Rejected datagrams by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rejected {
    /// See [`RejectReason::Truncated`].
    pub truncated: u64,
    /// See [`RejectReason::BadHeader`].
    pub bad_header: u64,
    /// See [`RejectReason::BadCrc`].
    pub bad_crc: u64,
    /// See [`RejectReason::BadMac`].
    pub bad_mac: u64,
    /// See [`RejectReason::WrongLinkId`].
    pub wrong_link_id: u64,
    /// See [`RejectReason::SeqOutOfWindow`].
    pub seq_out_of_window: u64,
    /// See [`RejectReason::BadRepair`].
    pub bad_repair: u64,
    /// See [`RejectReason::NackFlood`].
    pub nack_flood: u64,
    /// See [`RejectReason::Protocol`].
    pub protocol: u64,
    /// See [`RejectReason::Replayed`].
    pub replayed: u64,
}

impl Rejected {
    pub(crate) fn count(&mut self, reason: RejectReason) {
        let c = match reason {
            RejectReason::Truncated => &mut self.truncated,
            RejectReason::BadHeader => &mut self.bad_header,
            RejectReason::BadCrc => &mut self.bad_crc,
            RejectReason::BadMac => &mut self.bad_mac,
            RejectReason::WrongLinkId => &mut self.wrong_link_id,
            RejectReason::SeqOutOfWindow => &mut self.seq_out_of_window,
            RejectReason::BadRepair => &mut self.bad_repair,
            RejectReason::NackFlood => &mut self.nack_flood,
            RejectReason::Protocol => &mut self.protocol,
            RejectReason::Replayed => &mut self.replayed,
        };
        *c += 1;
    }

    /// Adds `other`'s counters to these (a listener's and its links').
    pub fn add(&mut self, other: &Rejected) {
        let Rejected {
            truncated,
            bad_header,
            bad_crc,
            bad_mac,
            wrong_link_id,
            seq_out_of_window,
            bad_repair,
            nack_flood,
            protocol,
            replayed,
        } = *other;
        self.truncated += truncated;
        self.bad_header += bad_header;
        self.bad_crc += bad_crc;
        self.bad_mac += bad_mac;
        self.wrong_link_id += wrong_link_id;
        self.seq_out_of_window += seq_out_of_window;
        self.bad_repair += bad_repair;
        self.nack_flood += nack_flood;
        self.protocol += protocol;
        self.replayed += replayed;
    }

    /// Every counter with its reason's snake_case name (metrics labels).
    pub fn by_reason(&self) -> [(&'static str, u64); 10] {
        [
            ("truncated", self.truncated),
            ("bad_header", self.bad_header),
            ("bad_crc", self.bad_crc),
            ("bad_mac", self.bad_mac),
            ("wrong_link_id", self.wrong_link_id),
            ("seq_out_of_window", self.seq_out_of_window),
            ("bad_repair", self.bad_repair),
            ("nack_flood", self.nack_flood),
            ("protocol", self.protocol),
            ("replayed", self.replayed),
        ]
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.truncated
            + self.bad_header
            + self.bad_crc
            + self.bad_mac
            + self.wrong_link_id
            + self.seq_out_of_window
            + self.bad_repair
            + self.nack_flood
            + self.protocol
            + self.replayed
    }
}

/// Sender-side counters: the stream this end sends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TxStats {
    /// Messages accepted by `send`.
    pub msgs_sent: u64,
    /// Highest message id reported on the wire (cumulative).
    pub msgs_on_wire: u64,
    /// Highest message id acknowledged (cumulative).
    pub msgs_acked: u64,
    /// Data datagrams sent the first time.
    pub data_packets: u64,
    /// Repair datagrams sent.
    pub repair_packets: u64,
    /// Data datagrams sent again (nack or tail probe).
    pub retransmitted_packets: u64,
    /// Nack datagrams received (accepted).
    pub nacks_received: u64,
    /// Seqs those nacks asked for.
    pub nacked_seqs_received: u64,
    /// Bytes handed to the kernel, all kinds, without IP/UDP headers.
    pub bytes_sent: u64,
    /// Sends that failed and were retried.
    pub send_errors: u64,
    /// Window bytes in use (queued plus unacknowledged).
    pub window_used_bytes: u64,
    /// The window limit.
    pub window_max_bytes: u64,
    /// Data datagrams sent and not yet acknowledged.
    pub inflight_datagrams: u64,
    /// Pacing rate in use (0 = unpaced): the configured one, or with
    /// `auto_rate` the controller's current one.
    pub pacing_rate_bits_per_s: u64,
    /// The pacing rate follows the path (`rate = "auto"`).
    pub auto_rate: bool,
    /// `auto_rate`: the controller's phase ("startup", "drain", "cruise"),
    /// "" otherwise.
    pub rate_phase: &'static str,
    /// `auto_rate`: the path's delivery rate as measured (the bottleneck
    /// estimate the pacing rate follows), bits/s.
    pub delivery_rate_bits_per_s: u64,
    /// `auto_rate`: the smallest recent RTT, µs (0 before a sample).
    pub min_rtt_us: u64,
    /// `auto_rate`: times the controller backed off (queue or loss).
    pub rate_backoffs: u64,
    /// Median time from handing a datagram to the kernel to its TX
    /// timestamp, µs (0 in `SendReturned` mode).
    pub wire_latency_p50_us: u64,
    /// Mean of the same.
    pub wire_latency_avg_us: u64,
    /// Datagrams whose timestamp never came (taken as sent after
    /// `stamp_timeout_ms`).
    pub tx_stamps_missing: u64,
    /// Messages reported on the wire because the ack came before the
    /// timestamps of every repair covering them.
    pub wire_implied_by_ack: u64,
    /// Tail-loss probes sent after a retransmission timeout.
    pub rto_probes: u64,
}

/// Receiver-side counters: the stream the peer sends to this end.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RxStats {
    /// Data datagrams received, duplicates included.
    pub data_packets: u64,
    /// Repair datagrams received.
    pub repair_packets: u64,
    /// Data datagrams rebuilt by FEC.
    pub recovered_packets: u64,
    /// Seqs nacked (each time).
    pub nacked_seqs: u64,
    /// Nack datagrams sent.
    pub nacks_sent: u64,
    /// Data datagrams already held or delivered.
    pub duplicate_packets: u64,
    /// Distinct seqs that arrived before being nacked.
    pub first_arrivals: u64,
    /// Highest data seq known to be sent.
    pub highest_seq: u64,
    /// 1 − first_arrivals / highest_seq: the loss the link showed, before
    /// FEC and retransmission.
    pub loss_rate: f64,
    /// Messages delivered to the application.
    pub delivered_msgs: u64,
    /// Datagrams dropped because the reorder buffer or window was full
    /// (not bad input; they are nacked later).
    pub dropped_buffer_full: u64,
    /// Times the FEC decoder was reset after it rebuilt a bad datagram.
    pub decoder_resets: u64,
    /// Ack datagrams sent.
    pub acks_sent: u64,
    /// Bytes delivered and not yet read by the application.
    pub inbox_bytes: u64,
    /// Bytes of datagrams held out of order, waiting for a gap to fill.
    pub reorder_bytes: u64,
}

/// A snapshot of one link end, for `status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkStats {
    /// The link id.
    pub link_id: u32,
    /// Handshake done and the peer heard from within `peer_timeout_ms`.
    pub connected: bool,
    /// How "on the wire" is established.
    pub wire_mode: WireMode,
    /// TX timestamp ids named per send (SCM_TS_OPT_ID) rather than taken
    /// from the socket counter.
    pub explicit_stamp_ids: bool,
    /// Smoothed RTT, µs (0 before the first sample).
    pub srtt_us: u64,
    /// What this end sent.
    pub tx: TxStats,
    /// What this end received.
    pub rx: RxStats,
    /// What the peer reports about receiving this end's stream (from its
    /// acks): received, rebuilt by FEC, nacked, delivered.
    pub peer_rx: PeerCounters,
    /// Dropped input datagrams by reason.
    pub rejected: Rejected,
    /// Whether the loss on this end's stream is within what its FEC code
    /// repairs ([`crate::health`]).
    pub health: crate::Health,
    /// The loss the peer reports on this end's stream (data datagrams that
    /// did not arrive the first time), over the health window.
    pub loss: f64,
    /// What the FEC code repairs ([`crate::fec_capacity`]).
    pub fec_capacity: f64,
    /// Times the link turned `Degraded`.
    pub degradations: u64,
}

/// Latency samples in log-spaced buckets (4 per octave of µs), for p50
/// without keeping samples.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    buckets: [u64; 128],
    count: u64,
    sum_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: [0; 128], count: 0, sum_us: 0 }
    }
}

impl Histogram {
    fn bucket(us: u64) -> usize {
        if us < 4 {
            return us as usize;
        }
        let octave = 63 - us.leading_zeros() as usize; // >= 2
        let quarter = ((us >> (octave - 2)) & 3) as usize;
        (octave * 4 + quarter - 4).min(127)
    }

    fn bucket_low(b: usize) -> u64 {
        if b < 4 {
            return b as u64;
        }
        let octave = (b + 4) / 4;
        let quarter = (b + 4) % 4;
        (4 + quarter as u64) << (octave - 2)
    }

    pub(crate) fn record(&mut self, us: u64) {
        self.buckets[Self::bucket(us)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub(crate) fn p50_us(&self) -> u64 {
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen * 2 >= self.count && self.count > 0 {
                return Self::bucket_low(b);
            }
        }
        0
    }

    pub(crate) fn avg_us(&self) -> u64 {
        self.sum_us.checked_div(self.count).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn buckets_are_monotone_and_close() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = Histogram::bucket(us);
            assert!(b >= last);
            last = b;
            let low = Histogram::bucket_low(b);
            assert!(low <= us && us < low + low / 4 + 2, "{us} -> {b} -> {low}");
        }
    }

    #[test]
    fn rejected_by_reason_lists_every_counter_once() {
        use super::{RejectReason as R, Rejected};
        let all = [
            R::Truncated,
            R::BadHeader,
            R::BadCrc,
            R::BadMac,
            R::WrongLinkId,
            R::SeqOutOfWindow,
            R::BadRepair,
            R::NackFlood,
            R::Protocol,
            R::Replayed,
        ];
        for (i, reason) in all.iter().enumerate() {
            let mut r = Rejected::default();
            r.count(*reason);
            let hits: Vec<_> = r.by_reason().iter().filter(|(_, n)| *n == 1).map(|(name, _)| *name).collect();
            assert_eq!(hits.len(), 1, "{reason:?}");
            assert_eq!(r.by_reason()[i].1, 1, "{reason:?} is at position {i}");
            let mut sum = r;
            sum.add(&r);
            assert_eq!(sum.by_reason()[i].1, 2, "add sums {reason:?}");
            assert_eq!(sum.total(), 2, "add touches only {reason:?}");
        }
    }

    #[test]
    fn median() {
        let mut h = Histogram::default();
        for us in [10, 20, 30, 1000, 2000] {
            h.record(us);
        }
        assert!((28..=30).contains(&h.p50_us()), "{}", h.p50_us());
        assert_eq!(h.avg_us(), 612);
    }
}
