//! The sending half: fragments messages into data datagrams, codes them
//! with FEC, keeps them until acknowledged, and retransmits on nack.
//!
//! Data seqs start at 1 and have no gaps; they are also the FEC seqs.
//! Repair datagrams have their own counter in the seq field. Datagram bytes
//! never change after they are built, so a retransmission is byte-identical
//! to the original and the receiver's FEC decoder can use either.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use starblk_fec::{Encoder, FecScheme, RepairPacket};

use crate::auto_rate::RateSample;
use crate::config::IP_UDP_HEADER_BYTES;
use crate::wire::{self, Header, Kind, NackRange};

/// A message accepted by `send`, waiting for the I/O thread.
#[derive(Debug)]
pub(crate) struct OutMsg {
    pub id: u64,
    pub data: Vec<u8>,
    /// What it costs in the send window (released on ack).
    pub charge_bytes: u64,
}

/// A datagram built and waiting for its first transmission, in order.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Data seq (its bytes are in the unacked buffer).
    Data(u64),
    /// A repair datagram and the data seqs it covers.
    Repair(Vec<u8>, Vec<u64>),
}

#[derive(Debug)]
struct Fragmenting {
    msg: OutMsg,
    next_frag: u32,
    frag_count: u32,
}

#[derive(Debug)]
struct Sent {
    bytes: Vec<u8>,
    last_tx: Option<Instant>,
    /// Delivery-rate bookkeeping, from the first transmission.
    stamp: Option<RateStamp>,
}

/// What the sender knew when a data datagram first left: BBR's per-packet
/// delivery-rate state ("Delivery Rate Estimation", Cheng et al., IETF
/// draft-cheng-iccrg-delivery-rate-estimation). Bytes are wire bytes of
/// every kind (data, repair, retransmission, IP/UDP headers included):
/// what the path's bottleneck carries.
#[derive(Debug, Clone, Copy)]
struct RateStamp {
    sent_at: Instant,
    /// Wire bytes sent up to and including this datagram.
    wire_mark: u64,
    /// `Tx::delivered`, `delivered_at` and `first_sent_at` then.
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
    /// `Tx::idle_epoch` then.
    idle_epoch: u64,
    /// The sender ran out of data between the newest delivered datagram's
    /// send and this one's: the sample may understate the path.
    app_limited: bool,
}

#[derive(Debug)]
struct Span {
    id: u64,
    last_seq: u64,
    charge_bytes: u64,
}

/// What an ack released.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Released {
    /// Highest message id now fully acknowledged, if it moved.
    pub acked_msg: Option<u64>,
    /// Window bytes to give back.
    pub bytes: u64,
    /// Whether the cumulative ack moved at all.
    pub advanced: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Tx {
    link_id: u32,
    /// Keyed links: the key of the datagrams this end sends.
    key: Option<wire::DatagramKey>,
    payload_bytes: usize,
    next_seq: u64,
    acked_seq: u64,
    unacked: VecDeque<Sent>,
    spans: VecDeque<Span>,
    current: Option<Fragmenting>,
    /// Built, not yet sent once (data then its repairs, in order).
    pub(crate) pending: VecDeque<Pending>,
    retx: BTreeSet<u64>,
    encoder: Option<Encoder>,
    repair_out: Vec<RepairPacket>,
    repair_counter: u64,
    inflight_limit: u64,
    /// Flow control: the peer takes data seqs below this.
    peer_window_end: u64,
    /// The peer holds every seq below this (no retransmission needed).
    peer_held_upto: u64,
    spare: Vec<Vec<u8>>,
    last_progress: Instant,
    rto_backoff: u32,
    /// Wire bytes handed to the kernel, all kinds, IP/UDP headers included.
    wire_sent: u64,
    /// Wire bytes known to have crossed the path (sent up to the newest
    /// data seq the receiver holds), when that last moved, and when the
    /// datagram that moved it was sent.
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
    /// Every data seq below this is delivered (held by the receiver).
    delivered_upto: u64,
    /// Times the sender ran out of data to send, and that count when the
    /// newest delivered datagram was sent.
    idle_epoch: u64,
    first_sent_idle: u64,
}

/// Spare datagram buffers kept for reuse.
const MAX_SPARE: usize = 1024;
/// Most seqs one nack may queue for retransmission.
const MAX_RETX_PER_NACK: u64 = 4096;

impl Tx {
    pub(crate) fn new(link_id: u32, payload_bytes: usize, fec: Option<FecScheme>, now: Instant) -> Tx {
        Tx {
            link_id,
            key: None,
            payload_bytes,
            next_seq: 1,
            acked_seq: 1,
            unacked: VecDeque::new(),
            spans: VecDeque::new(),
            current: None,
            pending: VecDeque::new(),
            retx: BTreeSet::new(),
            encoder: fec.map(Encoder::new),
            repair_out: Vec::new(),
            repair_counter: 0,
            inflight_limit: 1,
            peer_window_end: 1,
            peer_held_upto: 1,
            spare: Vec::new(),
            last_progress: now,
            rto_backoff: 0,
            wire_sent: 0,
            delivered: 0,
            delivered_at: now,
            first_sent_at: now,
            delivered_upto: 1,
            idle_epoch: 0,
            first_sent_idle: 0,
        }
    }

    /// Keys every datagram built from now on (the link's send direction).
    pub(crate) fn set_key(&mut self, key: wire::DatagramKey) {
        self.key = Some(key);
    }

    /// The next data seq to build (every seq below was built).
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Counts a datagram of `len` bytes handed to the kernel (any kind).
    pub(crate) fn count_wire(&mut self, len: usize) {
        self.wire_sent += (len + IP_UDP_HEADER_BYTES) as u64;
    }

    /// The sender had nothing left to send: samples of datagrams sent from
    /// now until then are app-limited.
    pub(crate) fn note_idle(&mut self) {
        self.idle_epoch += 1;
    }

    /// The receiver holds every data seq below `upto` (its cumulative ack
    /// or held-up-to mark): a delivery-rate sample from the newest of them,
    /// unless its interval is shorter than `min_interval` (BBR discards
    /// those: acks bunched up). Call before [`Tx::on_ack`] frees them.
    pub(crate) fn on_delivered(&mut self, upto: u64, now: Instant, min_interval: Duration) -> Option<RateSample> {
        let upto = upto.min(self.next_seq);
        if upto <= self.delivered_upto {
            return None;
        }
        self.delivered_upto = upto;
        let st = self.unacked.get(usize::try_from((upto - 1).checked_sub(self.acked_seq)?).ok()?)?.stamp?;
        self.delivered = self.delivered.max(st.wire_mark);
        self.delivered_at = now;
        self.first_sent_at = st.sent_at;
        self.first_sent_idle = st.idle_epoch;
        let send_elapsed = st.sent_at.saturating_duration_since(st.first_sent_at);
        let ack_elapsed = now.saturating_duration_since(st.delivered_at);
        let interval = send_elapsed.max(ack_elapsed);
        if interval.is_zero() || interval < min_interval {
            return None;
        }
        let bits = (self.delivered - st.delivered) as f64 * 8.0;
        Some(RateSample {
            bits_per_s: bits / interval.as_secs_f64(),
            app_limited: st.app_limited,
            sent_at: st.sent_at,
            inflight_bits: self.wire_sent.saturating_sub(self.delivered) as f64 * 8.0,
        })
    }

    /// Sets the most data datagrams in flight (ours and the peer's limit);
    /// until the first ack the peer's window is that much.
    pub(crate) fn set_inflight_limit(&mut self, datagrams: u64) {
        self.inflight_limit = datagrams.max(1);
        self.peer_window_end = self.peer_window_end.max(self.acked_seq + self.inflight_limit);
    }

    /// The receiver's latest flow-control state (from an ack).
    pub(crate) fn set_peer_window(&mut self, held_upto: u64, window_end: u64) {
        self.peer_held_upto = self.peer_held_upto.max(held_upto.min(self.next_seq));
        self.peer_window_end = window_end;
    }

    /// Every data seq below this is acknowledged.
    pub(crate) fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    pub(crate) fn inflight(&self) -> u64 {
        self.next_seq - self.acked_seq
    }

    /// Whether a new data datagram may go: within our in-flight limit and
    /// the receiver's advertised window.
    pub(crate) fn window_open(&self) -> bool {
        self.inflight() < self.inflight_limit && self.next_seq < self.peer_window_end
    }

    /// Whether a message is half fragmented (more data is ready to go).
    pub(crate) fn mid_message(&self) -> bool {
        self.current.is_some()
    }

    /// Builds the next data datagram from the current message, or from
    /// `take()` when there is none; queues it (and any repairs its FEC group
    /// completes) on `pending`. Returns (seq, message id, last fragment?).
    pub(crate) fn build_next(&mut self, take: impl FnOnce() -> Option<OutMsg>) -> Option<(u64, u64, bool)> {
        if self.current.is_none() {
            let msg = take()?;
            let frag_count = self.frag_count(msg.data.len());
            self.current = Some(Fragmenting { msg, next_frag: 0, frag_count });
        }
        let seq = self.next_seq;
        let (bytes, msg_id, last) = self.build_fragment(seq)?;
        self.next_seq += 1;
        if let Some(enc) = &mut self.encoder {
            // Seqs strictly increase and a datagram is far below 64 KiB,
            // so push cannot fail.
            if let Err(e) = enc.push(seq, &bytes, &mut self.repair_out) {
                tracing::error!("FEC encoder refused seq {seq}: {e}");
            }
        }
        self.unacked.push_back(Sent { bytes, last_tx: None, stamp: None });
        self.pending.push_back(Pending::Data(seq));
        self.queue_repairs();
        if last {
            self.finish_message(seq);
        }
        Some((seq, msg_id, last))
    }

    fn frag_count(&self, len: usize) -> u32 {
        // len <= max_message_bytes (64 MiB max) and payload_bytes >= 64.
        len.div_ceil(self.payload_bytes).max(1) as u32
    }

    fn build_fragment(&mut self, seq: u64) -> Option<(Vec<u8>, u64, bool)> {
        let mut out = self.spare.pop().unwrap_or_default();
        out.clear();
        let f = self.current.as_mut()?;
        let start = f.next_frag as usize * self.payload_bytes;
        let end = (start + self.payload_bytes).min(f.msg.data.len());
        let header = Header {
            kind: Kind::Data,
            flags: 0,
            link_id: self.link_id,
            seq,
            msg_id: f.msg.id,
            frag_index: f.next_frag,
            frag_count: f.frag_count,
            // max_message_bytes <= 64 MiB fits u32.
            msg_len_bytes: f.msg.data.len() as u32,
        };
        wire::encode_keyed(&header, &f.msg.data[start..end], &mut out, self.key.as_ref());
        f.next_frag += 1;
        Some((out, f.msg.id, f.next_frag == f.frag_count))
    }

    fn finish_message(&mut self, last_seq: u64) {
        if let Some(f) = self.current.take() {
            self.spans.push_back(Span { id: f.msg.id, last_seq, charge_bytes: f.msg.charge_bytes });
        }
    }

    /// Whether some sent data waits for its FEC group to close.
    pub(crate) fn has_open_groups(&self) -> bool {
        self.encoder.as_ref().is_some_and(Encoder::has_open_groups)
    }

    /// Closes every open FEC group (the link is idle); returns whether
    /// repairs were queued.
    pub(crate) fn flush_fec(&mut self) -> bool {
        let Some(enc) = &mut self.encoder else {
            return false;
        };
        if !enc.has_open_groups() {
            return false;
        }
        // Packets still unacked can be regrouped (see Encoder::flush_with);
        // the window holds exactly the bytes the encoder was given.
        let (unacked, acked_seq) = (&self.unacked, self.acked_seq);
        let packet = |seq: u64| unacked_datagram(unacked, acked_seq, seq);
        if let Err(e) = enc.flush_with(&mut self.repair_out, packet) {
            tracing::error!("FEC flush failed: {e}");
        }
        self.queue_repairs();
        true
    }

    fn queue_repairs(&mut self) {
        for repair in std::mem::take(&mut self.repair_out) {
            self.repair_counter += 1;
            let mut payload = self.spare.pop().unwrap_or_default();
            payload.clear();
            repair.encode_into(&mut payload);
            let mut bytes = Vec::with_capacity(wire::HEADER_BYTES + payload.len() + wire::MAC_BYTES);
            let header = Header::control(Kind::Repair, self.link_id, self.repair_counter);
            wire::encode_keyed(&header, &payload, &mut bytes, self.key.as_ref());
            self.recycle(payload);
            let seqs = repair.seqs().to_vec();
            if let Some(enc) = &mut self.encoder {
                enc.recycle(repair);
            }
            self.pending.push_back(Pending::Repair(bytes, seqs));
        }
    }

    /// Returns a buffer for reuse.
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(buf);
        }
    }

    /// The bytes of unacknowledged data seq `seq`.
    pub(crate) fn datagram(&self, seq: u64) -> Option<&[u8]> {
        unacked_datagram(&self.unacked, self.acked_seq, seq)
    }

    /// Notes that `seq` went out (first time or again); call after
    /// [`Tx::count_wire`] for it.
    pub(crate) fn mark_sent(&mut self, seq: u64, now: Instant) {
        let stamp = RateStamp {
            sent_at: now,
            wire_mark: self.wire_sent,
            delivered: self.delivered,
            delivered_at: self.delivered_at,
            first_sent_at: self.first_sent_at,
            idle_epoch: self.idle_epoch,
            app_limited: self.idle_epoch != self.first_sent_idle,
        };
        if let Some(i) = seq.checked_sub(self.acked_seq) {
            if let Some(s) = self.unacked.get_mut(i as usize) {
                s.last_tx = Some(now);
                s.stamp.get_or_insert(stamp);
            }
        }
    }

    /// The next seq to retransmit, if any.
    pub(crate) fn next_retx(&mut self) -> Option<u64> {
        while let Some(seq) = self.retx.pop_first() {
            if seq >= self.acked_seq && seq < self.next_seq {
                return Some(seq);
            }
        }
        None
    }

    /// Puts back a retransmission the socket refused.
    pub(crate) fn requeue_retx(&mut self, seq: u64) {
        self.retx.insert(seq);
    }

    /// A cumulative ack: every seq below `cum_ack` was delivered. `Err` if
    /// it acknowledges seqs never sent.
    pub(crate) fn on_ack(&mut self, cum_ack: u64, now: Instant) -> Result<Released, ()> {
        if cum_ack > self.next_seq {
            return Err(());
        }
        let mut released = Released::default();
        if cum_ack <= self.acked_seq {
            return Ok(released);
        }
        for _ in self.acked_seq..cum_ack {
            if let Some(s) = self.unacked.pop_front() {
                self.recycle(s.bytes);
            }
        }
        self.acked_seq = cum_ack;
        self.peer_held_upto = self.peer_held_upto.max(cum_ack);
        released.advanced = true;
        self.retx = self.retx.split_off(&cum_ack);
        while self.spans.front().is_some_and(|s| s.last_seq < cum_ack) {
            if let Some(s) = self.spans.pop_front() {
                released.bytes += s.charge_bytes;
                released.acked_msg = Some(s.id);
            }
        }
        self.last_progress = now;
        self.rto_backoff = 0;
        Ok(released)
    }

    /// A nack's ranges: queues what is unacknowledged and was not sent in
    /// the last `min_gap`. Returns (seqs queued, seqs outside the window).
    pub(crate) fn on_nack(&mut self, ranges: &[NackRange], now: Instant, min_gap: Duration) -> (u64, u64) {
        let (mut queued, mut outside) = (0u64, 0u64);
        for r in ranges {
            let end = r.first.saturating_add(u64::from(r.count));
            let lo = r.first.max(self.acked_seq);
            let hi = end.min(self.next_seq);
            outside += u64::from(r.count).saturating_sub(hi.saturating_sub(lo));
            for seq in lo..hi {
                if queued >= MAX_RETX_PER_NACK {
                    return (queued, outside);
                }
                if self.due_for_retx(seq, now, min_gap) && self.retx.insert(seq) {
                    queued += 1;
                }
            }
        }
        (queued, outside)
    }

    fn due_for_retx(&self, seq: u64, now: Instant, min_gap: Duration) -> bool {
        let i = (seq - self.acked_seq) as usize;
        match self.unacked.get(i).and_then(|s| s.last_tx) {
            Some(t) => now.saturating_duration_since(t) >= min_gap,
            // Not sent yet: it is on its way anyway.
            None => false,
        }
    }

    /// When the tail probe fires, given the current RTO.
    pub(crate) fn rto_deadline(&self, rto: Duration) -> Option<Instant> {
        if self.unacked.is_empty() {
            return None;
        }
        Some(self.last_progress + rto * (1 << self.rto_backoff.min(6)))
    }

    /// Retransmission timeout: no ack progress for an RTO. Queues the
    /// first datagram the receiver does not hold and the newest one, so it
    /// sees the gap and nacks the rest; backs off exponentially. Nothing is
    /// sent when the receiver holds everything (it is only slow to read).
    pub(crate) fn on_rto(&mut self, now: Instant) -> bool {
        self.last_progress = now;
        let first_missing = self.acked_seq.max(self.peer_held_upto);
        if first_missing >= self.next_seq || self.pending.iter().any(|p| matches!(p, Pending::Data(_))) {
            // Not a tail loss: all held, or not everything left once yet.
            return false;
        }
        self.retx.insert(first_missing);
        self.retx.insert(self.next_seq - 1);
        self.rto_backoff += 1;
        true
    }
}

/// The bytes of data seq `seq` in the send window `unacked`, whose first
/// entry is seq `acked_seq` (a free function, so the FEC flush can read the
/// window while the encoder is borrowed).
fn unacked_datagram(unacked: &VecDeque<Sent>, acked_seq: u64, seq: u64) -> Option<&[u8]> {
    let i = seq.checked_sub(acked_seq)?;
    unacked.get(i as usize).map(|s| s.bytes.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, len: usize) -> OutMsg {
        OutMsg { id, data: vec![id as u8; len], charge_bytes: len as u64 + 128 }
    }

    #[test]
    fn fragments_and_acks() {
        let now = Instant::now();
        let mut tx = Tx::new(9, 100, Some(FecScheme::reed_solomon(2, 1).unwrap()), now);
        tx.set_inflight_limit(100);
        let mut q = VecDeque::from([msg(1, 250), msg(2, 0)]);
        let mut built = Vec::new();
        while let Some(b) = tx.build_next(|| q.pop_front()) {
            built.push(b);
        }
        assert_eq!(built, vec![(1, 1, false), (2, 1, false), (3, 1, true), (4, 2, true)]);
        // Data 1, 2, repair(1,2), data 3, data 4, repair(3,4).
        let kinds: Vec<bool> = tx.pending.iter().map(|p| matches!(p, Pending::Data(_))).collect();
        assert_eq!(kinds, vec![true, true, false, true, true, false]);
        let d = wire::decode(tx.datagram(3).unwrap()).unwrap();
        assert_eq!((d.header.frag_index, d.header.frag_count, d.payload.len()), (2, 3, 50));
        assert_eq!(tx.on_ack(4, now), Ok(Released { acked_msg: Some(1), bytes: 378, advanced: true }));
        assert_eq!(tx.on_ack(6, now), Err(()));
        assert_eq!(tx.on_ack(5, now), Ok(Released { acked_msg: Some(2), bytes: 128, advanced: true }));
    }

    #[test]
    fn delivery_rate_samples() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut tx = Tx::new(9, 100, None, t);
        tx.set_inflight_limit(100);
        let mut q = VecDeque::from([msg(1, 400), msg(2, 50)]);
        for seq in 1..=4 {
            assert_eq!(tx.build_next(|| q.pop_front()).map(|b| b.0), Some(seq));
            tx.count_wire(148); // 100 + 48 header; + 28 IP/UDP counted
            tx.mark_sent(seq, t + ms(seq));
        }
        // Seqs 1 and 2 held: 2 x 176 wire bytes over 20 ms since the last
        // delivery (the link's start here).
        let s = tx.on_delivered(3, t + ms(20), Duration::ZERO).unwrap();
        assert_eq!(s.bits_per_s, 352.0 * 8.0 / 0.020);
        assert_eq!(s.sent_at, t + ms(2));
        assert_eq!(s.inflight_bits, 352.0 * 8.0);
        assert!(!s.app_limited);
        assert_eq!(tx.on_delivered(3, t + ms(21), Duration::ZERO), None, "nothing new");
        // The sender runs dry, then sends seq 5: its sample is app-limited.
        tx.note_idle();
        assert_eq!(tx.build_next(|| q.pop_front()).map(|b| b.0), Some(5));
        tx.count_wire(98);
        tx.mark_sent(5, t + ms(30));
        let s = tx.on_delivered(5, t + ms(40), Duration::ZERO).unwrap();
        assert!(!s.app_limited, "seq 4 left before the sender ran dry");
        assert_eq!(s.bits_per_s, 704.0 * 8.0 / 0.040);
        // Seq 5 left after the sender ran dry: app-limited. Its interval
        // runs from the delivery it was sent after (20 ms) to now.
        let s = tx.on_delivered(6, t + ms(60), ms(30)).unwrap();
        assert!(s.app_limited);
        assert_eq!(s.bits_per_s, (830.0 - 352.0) * 8.0 / 0.040);
        // An interval below the min RTT (acks bunched up) is discarded, yet
        // what it delivered counts.
        q.push_back(msg(3, 10));
        assert_eq!(tx.build_next(|| q.pop_front()).map(|b| b.0), Some(6));
        tx.count_wire(58);
        tx.mark_sent(6, t + ms(61));
        assert_eq!(tx.on_delivered(7, t + ms(62), ms(100)), None);
        assert_eq!(tx.delivered, 830 + 86);
        // Datagrams on_ack already freed give no sample.
        assert_eq!(tx.on_ack(7, t + ms(62)).map(|r| r.advanced), Ok(true));
        assert_eq!(tx.on_delivered(8, t + ms(70), Duration::ZERO), None);
    }

    #[test]
    fn nack_queues_only_sent_unacked_seqs() {
        let now = Instant::now();
        let mut tx = Tx::new(9, 100, None, now);
        tx.set_inflight_limit(100);
        let mut q = VecDeque::from([msg(1, 1000)]);
        while tx.build_next(|| q.pop_front()).is_some() {}
        for seq in 1..=5 {
            tx.mark_sent(seq, now);
        }
        let later = now + Duration::from_millis(10);
        let ranges = [NackRange { first: 3, count: 5 }, NackRange { first: 100, count: 1 }];
        assert_eq!(tx.on_nack(&ranges, later, Duration::from_millis(1)), (3, 1));
        assert_eq!((tx.next_retx(), tx.next_retx(), tx.next_retx(), tx.next_retx()), (Some(3), Some(4), Some(5), None));
    }
}
