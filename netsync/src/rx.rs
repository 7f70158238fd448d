//! The receiving half: FEC decoding, reordering, reassembly, in-order
//! delivery, and the nack list.
//!
//! Data datagrams (received or rebuilt) wait in `store` until every seq
//! before them is there; then they are consumed in order into the message
//! being reassembled, and whole messages go to the inbox. The cumulative
//! ack is the next seq to consume, so it only moves when the application
//! has room: a receiver that does not read stops acking, and the sender's
//! window fills (backpressure).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use starblk_fec::{Decoder, FecScheme, Recovered, RepairPacket};

use crate::stats::{RejectReason, RxStats};
use crate::wire::{self, Header, HelloPayload, Kind, NackPayload, NackRange, PeerCounters, MAX_NACK_RANGES};

/// The application's side of the receive path.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pub msgs: VecDeque<Vec<u8>>,
    pub bytes: usize,
    /// The I/O thread wants to hear when the application reads (it stopped
    /// for lack of room, or advertised a small window); `recv` wakes it.
    pub wake_on_read: bool,
    pub closed: bool,
}

#[derive(Debug)]
struct Assembly {
    msg_id: u64,
    frag_count: u32,
    msg_len: u32,
    next_frag: u32,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    since: Instant,
    nacked_at: Option<Instant>,
}

/// What the peer told us in its hello.
#[derive(Debug, Clone)]
struct Peer {
    /// Largest data datagram the peer sends (its payload size + header),
    /// to turn free bytes into an advertised window.
    datagram_bytes: usize,
    /// Seqs one FEC group can span: a loss is only nacked once the
    /// receiver has seen this far past it (or the link went quiet).
    span: u64,
    scheme: Option<FecScheme>,
}

/// Receiver bounds, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RxLimits {
    pub window_seqs: u64,
    pub buffer_bytes: usize,
    pub max_message_bytes: usize,
    pub nack_min_delay: Duration,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Rx {
    link_id: u32,
    /// Keyed links: the key of the peer's datagrams (rebuilt ones are
    /// checked with it), and the MAC trailer's size (0 unkeyed).
    key: Option<wire::DatagramKey>,
    trailer_bytes: usize,
    limits: RxLimits,
    peer: Option<Peer>,
    decoder: Option<Decoder>,
    next_seq: u64,
    /// Every seq below this is held (consumed or in `store`).
    held_upto: u64,
    highest_seen: u64,
    store: BTreeMap<u64, (Header, Vec<u8>)>,
    store_bytes: usize,
    missing: BTreeMap<u64, Missing>,
    assembly: Option<Assembly>,
    expect_msg_id: u64,
    last_data_at: Instant,
    /// Consumed datagrams since the last ack.
    pub(crate) unacked_consumed: u32,
    /// Something the peer should hear about (progress, duplicates).
    pub(crate) ack_due: bool,
    recovered: Vec<Recovered>,
    /// Inbox bytes as of the last look (under the inbox lock).
    inbox_bytes: usize,
    pub(crate) stats: RxStats,
}

impl Rx {
    pub(crate) fn new(link_id: u32, limits: RxLimits, now: Instant) -> Rx {
        Rx {
            link_id,
            key: None,
            trailer_bytes: 0,
            limits,
            peer: None,
            decoder: None,
            next_seq: 1,
            held_upto: 1,
            highest_seen: 0,
            store: BTreeMap::new(),
            store_bytes: 0,
            missing: BTreeMap::new(),
            assembly: None,
            expect_msg_id: 1,
            last_data_at: now,
            unacked_consumed: 0,
            ack_due: false,
            recovered: Vec::new(),
            inbox_bytes: 0,
            stats: RxStats::default(),
        }
    }

    /// Keys the link: the peer's datagrams carry MACs under `key`.
    pub(crate) fn set_key(&mut self, key: wire::DatagramKey) {
        self.key = Some(key);
        self.trailer_bytes = wire::MAC_BYTES;
    }

    /// Takes the peer's hello: builds the decoder for its scheme.
    pub(crate) fn set_peer(&mut self, hello: &HelloPayload) {
        let span = hello.fec.as_ref().map_or(1, |s| s.group_span_seqs());
        self.decoder = hello.fec.as_ref().map(Decoder::new);
        let datagram_bytes = hello.payload_bytes as usize + wire::HEADER_BYTES + self.trailer_bytes;
        self.peer = Some(Peer { datagram_bytes, span, scheme: hello.fec.clone() });
    }

    pub(crate) fn has_peer(&self) -> bool {
        self.peer.is_some()
    }

    /// The cumulative ack: every seq below it was consumed.
    pub(crate) fn cum_ack(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn highest_seen(&self) -> u64 {
        self.highest_seen
    }

    pub(crate) fn counters(&self) -> PeerCounters {
        PeerCounters {
            received_packets: self.stats.first_arrivals,
            recovered_packets: self.stats.recovered_packets,
            nacked_packets: self.stats.nacked_seqs,
            delivered_msgs: self.stats.delivered_msgs,
        }
    }

    pub(crate) fn store_bytes(&self) -> usize {
        self.store_bytes
    }

    /// Bytes held for the application: out-of-order datagrams, the message
    /// being reassembled, and the inbox.
    fn held_bytes(&self) -> usize {
        self.store_bytes + self.assembly.as_ref().map_or(0, |a| a.buf.len()) + self.inbox_bytes
    }

    /// Records the inbox size (the application may have read since).
    pub(crate) fn set_inbox_bytes(&mut self, bytes: usize) {
        self.inbox_bytes = bytes;
    }

    /// The most data datagrams the receive buffer holds.
    pub(crate) fn max_window_seqs(&self) -> u64 {
        let dg = self.peer.as_ref().map_or(wire::HEADER_BYTES + 1, |p| p.datagram_bytes);
        (self.limits.buffer_bytes / dg).max(1) as u64
    }

    /// Flow control: the peer may send data seqs below this. Free buffer
    /// bytes, in the peer's largest datagrams, past the cumulative ack.
    pub(crate) fn window_end(&self) -> u64 {
        let dg = self.peer.as_ref().map_or(wire::HEADER_BYTES + 1, |p| p.datagram_bytes);
        let free = self.limits.buffer_bytes.saturating_sub(self.held_bytes()) / dg;
        self.next_seq + (free as u64).min(self.limits.window_seqs)
    }

    /// Every seq below this is held (consumed or buffered).
    pub(crate) fn held_upto(&self) -> u64 {
        self.held_upto
    }

    /// Moves `held_upto` over what the store now holds contiguously.
    fn advance_held(&mut self) {
        self.held_upto = self.held_upto.max(self.next_seq);
        while self.store.contains_key(&self.held_upto) {
            self.held_upto += 1;
        }
    }

    pub(crate) fn has_missing(&self) -> bool {
        !self.missing.is_empty()
    }

    fn check_window(&self, seq: u64) -> Result<(), RejectReason> {
        if seq >= self.next_seq.saturating_add(self.limits.window_seqs) {
            return Err(RejectReason::SeqOutOfWindow);
        }
        Ok(())
    }

    /// A data datagram (`bytes` is the whole datagram, already checked).
    pub(crate) fn on_data(&mut self, header: Header, bytes: &[u8], now: Instant) -> Result<(), RejectReason> {
        if self.peer.is_none() {
            return Err(RejectReason::Protocol);
        }
        let seq = header.seq;
        self.stats.data_packets += 1;
        self.last_data_at = now;
        if seq < self.next_seq || self.store.contains_key(&seq) {
            self.stats.duplicate_packets += 1;
            self.ack_due = true;
            return Ok(());
        }
        self.check_window(seq)?;
        self.store_datagram(header, bytes, now, false);
        if let Some(dec) = &mut self.decoder {
            if let Err(e) = dec.on_data(seq, bytes, &mut self.recovered) {
                tracing::debug!("FEC decoder refused data seq {seq}: {e}");
            }
        }
        self.take_recovered(now);
        Ok(())
    }

    /// A repair datagram's payload.
    pub(crate) fn on_repair(&mut self, payload: &[u8], now: Instant) -> Result<(), RejectReason> {
        if self.peer.is_none() {
            return Err(RejectReason::Protocol);
        }
        self.stats.repair_packets += 1;
        self.last_data_at = now;
        if self.decoder.is_none() {
            return Err(RejectReason::Protocol);
        }
        let repair = RepairPacket::decode(payload).map_err(|_| RejectReason::BadRepair)?;
        let last = repair.seqs().last().copied().unwrap_or(0);
        if last >= self.next_seq.saturating_add(self.limits.window_seqs) {
            return Err(RejectReason::SeqOutOfWindow);
        }
        if last >= self.next_seq {
            // The covered data was sent before this repair.
            self.note_sent_upto(last, now);
        }
        if let Some(dec) = &mut self.decoder {
            dec.on_repair(repair, &mut self.recovered).map_err(|_| RejectReason::BadRepair)?;
        }
        if self.take_recovered(now) {
            Ok(())
        } else {
            Err(RejectReason::BadRepair)
        }
    }

    /// Checks and stores what the decoder rebuilt. A rebuilt datagram is a
    /// whole data datagram with its own crc; one that fails it means the
    /// decoder was fed a forged repair, so the decoder is reset (its window
    /// may hold bad bytes) and false is returned.
    fn take_recovered(&mut self, now: Instant) -> bool {
        let mut ok = true;
        for rec in std::mem::take(&mut self.recovered) {
            let header = match wire::decode_keyed(&rec.payload, self.key.as_ref()) {
                Ok(d) if d.header.kind == Kind::Data && d.header.seq == rec.seq && d.header.link_id == self.link_id => {
                    d.header
                }
                _ => {
                    ok = false;
                    continue;
                }
            };
            // Only a rebuild of something not already held counts (after a
            // decoder reset, repairs can "rebuild" data that did arrive).
            if rec.seq >= self.next_seq && !self.store.contains_key(&rec.seq) && self.check_window(rec.seq).is_ok() {
                self.stats.recovered_packets += 1;
                self.store_datagram(header, &rec.payload, now, true);
            }
        }
        if !ok {
            self.reset_decoder();
        }
        ok
    }

    fn reset_decoder(&mut self) {
        if let Some(scheme) = self.peer.as_ref().and_then(|p| p.scheme.as_ref()) {
            tracing::warn!("FEC rebuilt a datagram that fails its crc: forged repair? resetting the decoder");
            self.decoder = Some(Decoder::new(scheme));
            self.stats.decoder_resets += 1;
        }
    }

    fn store_datagram(&mut self, header: Header, bytes: &[u8], now: Instant, recovered: bool) {
        let seq = header.seq;
        self.note_sent_upto(seq, now);
        let was_nacked = self.missing.remove(&seq).is_some_and(|m| m.nacked_at.is_some());
        if !recovered && !was_nacked {
            self.stats.first_arrivals += 1;
        }
        if self.held_bytes() + bytes.len() > self.limits.buffer_bytes && seq != self.next_seq {
            // No room (the peer overran the advertised window): it will be
            // nacked once there is. The next seq in order is always taken,
            // so the stream can move.
            self.stats.dropped_buffer_full += 1;
            self.missing.insert(seq, Missing { since: now, nacked_at: None });
            return;
        }
        self.store_bytes += bytes.len();
        self.store.insert(seq, (header, bytes.to_vec()));
        self.advance_held();
    }

    /// Every seq up to `seq` was sent: gaps below it are losses.
    fn note_sent_upto(&mut self, seq: u64, now: Instant) {
        if seq <= self.highest_seen {
            return;
        }
        let from = self.highest_seen.max(self.next_seq.saturating_sub(1)) + 1;
        for s in from..=seq {
            if !self.store.contains_key(&s) {
                self.missing.insert(s, Missing { since: now, nacked_at: None });
            }
        }
        self.highest_seen = seq;
        self.stats.highest_seq = seq;
    }

    /// Moves in-order datagrams into messages and whole messages into the
    /// inbox while it has room. Returns messages delivered.
    pub(crate) fn consume(&mut self, inbox: &mut Inbox) -> Result<u64, RejectReason> {
        let mut delivered = 0;
        while let Some(entry) = self.store.first_entry() {
            if *entry.key() != self.next_seq {
                break;
            }
            let (header, bytes) = entry.get();
            let payload_len = bytes.len() - wire::HEADER_BYTES - self.trailer_bytes;
            let assembled = self.assembly.as_ref().map_or(0, |a| a.buf.len());
            if inbox.bytes > 0 && inbox.bytes + assembled + payload_len > self.limits.buffer_bytes {
                inbox.wake_on_read = true;
                break;
            }
            let header = *header;
            let (_, bytes) = entry.remove();
            self.store_bytes -= bytes.len();
            let payload = &bytes[wire::HEADER_BYTES..bytes.len() - self.trailer_bytes];
            if let Err(reason) = self.append(&header, payload, inbox, &mut delivered) {
                // Not the fragment the stream needs: drop it and nack the
                // seq (a forged datagram with a valid crc looks like this).
                self.missing.insert(header.seq, Missing { since: Instant::now(), nacked_at: None });
                self.held_upto = self.next_seq;
                return Err(reason);
            }
            self.next_seq += 1;
            self.unacked_consumed += 1;
            self.ack_due = true;
        }
        self.inbox_bytes = inbox.bytes;
        self.advance_held();
        Ok(delivered)
    }

    fn append(
        &mut self,
        h: &Header,
        payload: &[u8],
        inbox: &mut Inbox,
        delivered: &mut u64,
    ) -> Result<(), RejectReason> {
        let asm = match &mut self.assembly {
            Some(a) => a,
            None => self.assembly.insert(self.start_message(h)?),
        };
        let continues = h.msg_id == asm.msg_id
            && h.frag_index == asm.next_frag
            && h.frag_count == asm.frag_count
            && h.msg_len_bytes == asm.msg_len;
        let room = asm.msg_len as usize - asm.buf.len();
        let last = h.frag_index + 1 == h.frag_count;
        if !continues || payload.len() > room || (last && payload.len() != room) {
            if asm.next_frag == 0 {
                self.assembly = None;
            }
            return Err(RejectReason::Protocol);
        }
        asm.buf.extend_from_slice(payload);
        asm.next_frag += 1;
        if last {
            let msg = std::mem::take(&mut asm.buf);
            self.assembly = None;
            self.expect_msg_id += 1;
            inbox.bytes += msg.len();
            inbox.msgs.push_back(msg);
            self.stats.delivered_msgs += 1;
            *delivered += 1;
        }
        Ok(())
    }

    fn start_message(&self, h: &Header) -> Result<Assembly, RejectReason> {
        if h.msg_id != self.expect_msg_id
            || h.frag_index != 0
            || h.msg_len_bytes as usize > self.limits.max_message_bytes
        {
            return Err(RejectReason::Protocol);
        }
        Ok(Assembly {
            msg_id: h.msg_id,
            frag_count: h.frag_count,
            msg_len: h.msg_len_bytes,
            next_frag: 0,
            buf: Vec::with_capacity(h.msg_len_bytes as usize),
        })
    }

    /// The nack delay: FEC gets this long (at least) before a loss is
    /// nacked; see the README.
    pub(crate) fn nack_delay(&self, srtt: Duration) -> Duration {
        self.limits.nack_min_delay.max(srtt / 4)
    }

    /// Builds a nack of the losses FEC has had its chance at: missing for
    /// at least the nack delay, and either every group covering them has
    /// closed (the receiver saw a seq a group span later, or the decoder
    /// window moved past), the link has been quiet for the delay, or 8
    /// delays have passed. A seq is nacked again after `srtt * 3/2 +
    /// delay`. Seqs at or past the advertised window are not nacked: the
    /// peer must not send them yet.
    pub(crate) fn build_nack(&mut self, now: Instant, srtt: Duration) -> Option<NackPayload> {
        let window_end = self.window_end();
        let delay = self.nack_delay(srtt);
        let retry = srtt * 3 / 2 + delay;
        let span = self.peer.as_ref().map_or(1, |p| p.span);
        let low = self.decoder.as_ref().map_or(u64::MAX, |d| d.low_seq());
        let quiet = now.saturating_duration_since(self.last_data_at) >= delay;
        let mut ranges: Vec<NackRange> = Vec::new();
        for (&seq, m) in self.missing.range_mut(..window_end) {
            let age = now.saturating_duration_since(m.since);
            let fec_done = quiet || seq < low || self.highest_seen >= seq.saturating_add(span) || age >= delay * 8;
            let resend_ok = m.nacked_at.is_none_or(|t| now.saturating_duration_since(t) >= retry);
            if age < delay || !fec_done || !resend_ok {
                continue;
            }
            let full = ranges.len() == MAX_NACK_RANGES;
            match ranges.last_mut() {
                Some(r) if r.first + u64::from(r.count) == seq && r.count < u32::MAX => r.count += 1,
                _ if full => break,
                _ => ranges.push(NackRange { first: seq, count: 1 }),
            }
            m.nacked_at = Some(now);
            self.stats.nacked_seqs += 1;
        }
        (!ranges.is_empty()).then_some(NackPayload { cum_ack: self.next_seq, ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RxLimits {
        RxLimits {
            window_seqs: 64,
            buffer_bytes: 1 << 20,
            max_message_bytes: 1 << 16,
            nack_min_delay: Duration::from_millis(2),
        }
    }

    fn datagram(seq: u64, msg_id: u64, frag: u32, count: u32, payload: &[u8], len: u32) -> (Header, Vec<u8>) {
        let h = Header {
            kind: Kind::Data,
            flags: 0,
            link_id: 1,
            seq,
            msg_id,
            frag_index: frag,
            frag_count: count,
            msg_len_bytes: len,
        };
        let mut b = Vec::new();
        wire::encode_into(&h, payload, &mut b);
        (h, b)
    }

    fn rx() -> Rx {
        let mut rx = Rx::new(1, limits(), Instant::now());
        rx.set_peer(&HelloPayload {
            fec: None,
            payload_bytes: 4,
            max_message_bytes: 1 << 16,
            recv_window_seqs: 64,
            nonce: 1,
            auth_nonce: None,
        });
        rx
    }

    #[test]
    fn reorders_and_reassembles() {
        let mut rx = rx();
        let mut inbox = Inbox::default();
        let now = Instant::now();
        let (h2, b2) = datagram(2, 1, 1, 2, b"ef", 6);
        let (h1, b1) = datagram(1, 1, 0, 2, b"abcd", 6);
        let (h3, b3) = datagram(3, 2, 0, 1, b"z", 1);
        rx.on_data(h3, &b3, now).unwrap();
        rx.on_data(h2, &b2, now).unwrap();
        assert_eq!(rx.consume(&mut inbox), Ok(0));
        assert!(rx.has_missing());
        rx.on_data(h1, &b1, now).unwrap();
        assert_eq!(rx.consume(&mut inbox), Ok(2));
        assert_eq!(inbox.msgs, VecDeque::from([b"abcdef".to_vec(), b"z".to_vec()]));
        assert_eq!(rx.cum_ack(), 4);
        assert!(!rx.has_missing());
    }

    #[test]
    fn nacks_after_the_delay_and_rejects_far_seqs() {
        let mut rx = rx();
        let t0 = Instant::now();
        let (h, b) = datagram(3, 1, 0, 1, b"a", 1);
        rx.on_data(h, &b, t0).unwrap();
        assert!(rx.build_nack(t0, Duration::ZERO).is_none());
        let nack = rx.build_nack(t0 + Duration::from_millis(3), Duration::ZERO).unwrap();
        assert_eq!(nack.ranges, vec![NackRange { first: 1, count: 2 }]);
        let (h, b) = datagram(1000, 1, 0, 1, b"a", 1);
        assert_eq!(rx.on_data(h, &b, t0), Err(RejectReason::SeqOutOfWindow));
    }

    #[test]
    fn a_fragment_out_of_place_is_refused() {
        let mut rx = rx();
        let mut inbox = Inbox::default();
        let (h, b) = datagram(1, 2, 0, 1, b"a", 1); // message 2 before 1
        rx.on_data(h, &b, Instant::now()).unwrap();
        assert_eq!(rx.consume(&mut inbox), Err(RejectReason::Protocol));
        assert_eq!(rx.cum_ack(), 1);
        assert!(rx.has_missing());
    }
}
