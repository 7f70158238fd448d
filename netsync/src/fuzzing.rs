//! Entry points for `fuzz/fuzz_targets/netsync_datagram.rs`: the receiver
//! state machine driven by arbitrary datagrams, without sockets or threads.
//! Not part of the supported API.

use std::time::{Duration, Instant};

use crate::rx::{Inbox, Rx, RxLimits};
use crate::wire::{self, HelloPayload, Kind};

/// A receiver with small bounds, fed datagrams one by one.
#[derive(Debug)]
pub struct Receiver {
    rx: Rx,
    inbox: Inbox,
    link_id: u32,
    limits: RxLimits,
    start: Instant,
    last_cum_ack: u64,
}

impl Receiver {
    /// A receiver on link `link_id` whose peer sent `hello`.
    pub fn new(link_id: u32, hello: &HelloPayload) -> Receiver {
        let limits = RxLimits {
            window_seqs: 256,
            buffer_bytes: 256 << 10,
            max_message_bytes: 64 << 10,
            nack_min_delay: Duration::from_millis(2),
        };
        let start = Instant::now();
        let mut rx = Rx::new(link_id, limits, start);
        rx.set_peer(hello);
        Receiver { rx, inbox: Inbox::default(), link_id, limits, start, last_cum_ack: 1 }
    }

    /// Feeds one datagram at `at_ms` after the start; returns messages
    /// delivered so far (the inbox is drained). Panics if an invariant
    /// breaks.
    pub fn feed(&mut self, bytes: &[u8], at_ms: u64) -> Vec<Vec<u8>> {
        let now = self.start + Duration::from_millis(at_ms);
        if let Ok(d) = wire::decode(bytes) {
            if d.header.link_id == self.link_id {
                let _ = match d.header.kind {
                    Kind::Data => self.rx.on_data(d.header, bytes, now),
                    Kind::Repair => self.rx.on_repair(d.payload, now),
                    _ => Ok(()),
                };
            }
        }
        while self.rx.consume(&mut self.inbox).is_err() {}
        self.check(now);
        self.inbox.bytes = 0;
        self.inbox.msgs.drain(..).collect()
    }

    fn check(&mut self, now: Instant) {
        let cum = self.rx.cum_ack();
        assert!(cum >= self.last_cum_ack, "the cumulative ack went back");
        self.last_cum_ack = cum;
        assert!(self.rx.held_upto() >= cum);
        assert!(self.rx.window_end() >= cum);
        assert!(self.rx.store_bytes() <= self.limits.buffer_bytes + wire::MAX_DATAGRAM_BYTES);
        for m in &self.inbox.msgs {
            assert!(m.len() <= self.limits.max_message_bytes);
        }
        if let Some(nack) = self.rx.build_nack(now, Duration::ZERO) {
            assert!(!nack.ranges.is_empty() && nack.ranges.len() <= wire::MAX_NACK_RANGES);
            assert!(nack.ranges.iter().all(|r| r.first >= cum));
            let mut b = Vec::new();
            nack.encode_into(&mut b);
            assert_eq!(wire::NackPayload::decode(&b).as_ref(), Ok(&nack));
        }
    }
}

/// The sending half without a socket: messages in, datagrams out.
#[derive(Debug)]
pub struct Sender {
    tx: crate::tx::Tx,
    queue: std::collections::VecDeque<crate::tx::OutMsg>,
    next_id: u64,
}

impl Sender {
    /// A sender on link `link_id` with `payload_bytes` per datagram.
    pub fn new(link_id: u32, payload_bytes: usize, fec: Option<starblk_fec::FecScheme>) -> Sender {
        let mut tx = crate::tx::Tx::new(link_id, payload_bytes, fec, Instant::now());
        tx.set_inflight_limit(1 << 16);
        Sender { tx, queue: Default::default(), next_id: 1 }
    }

    /// Queues a message.
    pub fn push(&mut self, data: Vec<u8>) {
        let charge_bytes = data.len() as u64;
        self.queue.push_back(crate::tx::OutMsg { id: self.next_id, data, charge_bytes });
        self.next_id += 1;
    }

    /// The next datagram to send: data (built on demand) or repair.
    pub fn next_datagram(&mut self) -> Option<Vec<u8>> {
        if self.tx.pending.is_empty() {
            let queue = &mut self.queue;
            self.tx.build_next(|| queue.pop_front())?;
        }
        match self.tx.pending.pop_front()? {
            crate::tx::Pending::Data(seq) => self.tx.datagram(seq).map(<[u8]>::to_vec),
            crate::tx::Pending::Repair(bytes, _) => Some(bytes),
        }
    }

    /// Closes the open FEC groups (the link went idle).
    pub fn flush(&mut self) {
        self.tx.flush_fec();
    }

    /// The bytes of unacknowledged data seq `seq`, for a retransmission.
    pub fn resend(&self, seq: u64) -> Option<Vec<u8>> {
        self.tx.datagram(seq).map(<[u8]>::to_vec)
    }

    /// A cumulative ack from the receiver.
    pub fn ack(&mut self, cum_ack: u64) {
        let _ = self.tx.on_ack(cum_ack, Instant::now());
    }

    /// Data seqs sent so far (the next seq is this + 1).
    pub fn sent_seqs(&self) -> u64 {
        self.tx.inflight() + self.acked()
    }

    fn acked(&self) -> u64 {
        // inflight = next_seq - acked_seq; next_seq starts at 1.
        self.tx.acked_seq() - 1
    }
}
