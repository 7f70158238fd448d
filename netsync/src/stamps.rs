//! On-the-wire tracking: which data datagrams, and which repair datagrams
//! covering them, the kernel has reported transmitted.
//!
//! Every data datagram needs `1 + c` stamps before its message can be on
//! the wire: its own, and one per repair datagram covering it (XOR: one per
//! layer; RS: the c parities of its group). Each stamped send gets an id
//! (SO_TIMESTAMPING OPT_ID); a [`Record`] remembers what the id covered.
//! When a stamp comes back, the counts of the seqs it covers go down; when
//! every seq of the oldest waiting message is at zero, that message is on
//! the wire. Messages are reported in order (cumulatively).
//!
//! Ids: on Linux 6.13+ each send names its id (SCM_TS_OPT_ID), so the
//! mapping is exact. Older kernels number stamped sends with a per-socket
//! counter; if a stamped send fails there we cannot know whether the
//! kernel counted it, so stamped sends pause until every outstanding stamp
//! is in, then the counter is reset to 0 ([`WireTracker::needs_rearm`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::stats::{Histogram, WireMode};
use crate::sys::{self, Stamp, TxStamp};

/// Consecutive missing stamps after which the link stops asking for them
/// and falls back to [`WireMode::SendReturned`].
const MISSING_STREAK_FALLBACK: u32 = 64;
/// Most records kept; past it the oldest is taken as stamped (counted
/// missing). The error queue would have overflowed long before.
const MAX_RECORDS: usize = 1 << 20;

/// What a stamped send carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Covers {
    /// The timestamp probe (a hello).
    Probe,
    /// The first transmission of a data datagram.
    Data(u64),
    /// A repair datagram over these data seqs.
    Repair(Vec<u64>),
}

#[derive(Debug)]
struct Record {
    covers: Covers,
    sent_at: Instant,
    sent_realtime_ns: u64,
    done: bool,
}

/// How send ids are assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdMode {
    Explicit,
    Counter,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct WireTracker {
    mode: WireMode,
    id_mode: IdMode,
    /// Id of `records[0]`; ids are consecutive from there.
    base_id: u64,
    records: VecDeque<Record>,
    /// Counter mode: a stamped send failed, stop stamping until re-armed.
    rearm: bool,
    probe_started: Option<Instant>,
    /// Lowest data seq whose stamps are not all in.
    base_seq: u64,
    /// Stamps still needed per seq from `base_seq`.
    pending: VecDeque<u8>,
    /// Messages not yet on the wire: (id, last seq).
    msgs: VecDeque<(u64, u64)>,
    need_per_seq: u8,
    wire_upto: u64,
    missing_streak: u32,
    latency: Histogram,
    pub(crate) stamps_missing: u64,
    pub(crate) implied_by_ack: u64,
}

impl WireTracker {
    /// `fec_c` is the number of repair datagrams covering each data
    /// datagram (0 without FEC). `timestamps` is false when SO_TIMESTAMPING
    /// is off or could not be enabled.
    pub(crate) fn new(fec_c: usize, timestamps: bool, explicit_ids: bool) -> WireTracker {
        WireTracker {
            mode: if timestamps { WireMode::Probing } else { WireMode::SendReturned },
            id_mode: if explicit_ids { IdMode::Explicit } else { IdMode::Counter },
            base_id: 0,
            records: VecDeque::new(),
            rearm: false,
            probe_started: None,
            base_seq: 1,
            pending: VecDeque::new(),
            msgs: VecDeque::new(),
            // c <= 16 (starblk-fec), so this fits.
            need_per_seq: 1 + fec_c as u8,
            wire_upto: 0,
            missing_streak: 0,
            latency: Histogram::default(),
            stamps_missing: 0,
            implied_by_ack: 0,
        }
    }

    pub(crate) fn mode(&self) -> WireMode {
        self.mode
    }

    pub(crate) fn latency(&self) -> &Histogram {
        &self.latency
    }

    fn next_id(&self) -> u64 {
        self.base_id + self.records.len() as u64
    }

    /// How the next stamped send must ask for its stamp; `Stamp::None` when
    /// stamps are off or paused for a counter re-arm.
    pub(crate) fn stamp_request(&self) -> Stamp {
        match (self.mode, self.id_mode) {
            (WireMode::SendReturned, _) => Stamp::None,
            _ if self.rearm => Stamp::None,
            // Ids travel as u32; records never span 2^32 ids (MAX_RECORDS).
            (_, IdMode::Explicit) => Stamp::Explicit(self.next_id() as u32),
            (_, IdMode::Counter) => Stamp::Counter,
        }
    }

    /// Whether stamped sends must wait (counter re-arm in progress).
    pub(crate) fn paused(&self) -> bool {
        self.rearm
    }

    /// Whether data may flow: the probe has decided the mode.
    pub(crate) fn decided(&self) -> bool {
        self.mode != WireMode::Probing
    }

    /// Whether timestamp ids are named per send (false: socket counter).
    pub(crate) fn explicit_ids(&self) -> bool {
        self.id_mode == IdMode::Explicit
    }

    /// The kernel refused SCM_TS_OPT_ID (EINVAL): number by counter.
    pub(crate) fn explicit_refused(&mut self) {
        tracing::info!("SCM_TS_OPT_ID not supported by this kernel; TX timestamp ids from the socket counter");
        self.id_mode = IdMode::Counter;
    }

    /// Timestamps cannot be requested at all.
    pub(crate) fn stamps_refused(&mut self) {
        self.fall_back("SO_TIMESTAMPING refused on send");
    }

    /// A send that asked for `stamp` failed.
    pub(crate) fn on_send_failed(&mut self, stamp: Stamp) {
        // The kernel may or may not have counted it: re-number from 0 once
        // the stamps already owed are in.
        if stamp == Stamp::Counter {
            self.rearm = true;
        }
    }

    /// Counter mode after a failed stamped send: true once every
    /// outstanding stamp is in, when the caller resets the kernel counter
    /// (`sys::enable_timestamping`) and calls [`WireTracker::rearmed`].
    pub(crate) fn needs_rearm(&self) -> bool {
        self.rearm && self.records.is_empty()
    }

    pub(crate) fn rearmed(&mut self) {
        self.rearm = false;
        self.base_id = 0;
    }

    /// A send that asked for `stamp` (not `None`) succeeded.
    pub(crate) fn on_sent(&mut self, covers: Covers, stamp: Stamp, now: Instant, realtime_ns: u64) {
        if stamp == Stamp::None {
            self.apply(&covers);
            return;
        }
        if covers == Covers::Probe && self.probe_started.is_none() {
            self.probe_started = Some(now);
        }
        if self.records.len() >= MAX_RECORDS {
            self.expire_front();
        }
        self.records.push_back(Record { covers, sent_at: now, sent_realtime_ns: realtime_ns, done: false });
    }

    /// A new data seq (consecutive) that needs its stamps.
    pub(crate) fn add_seq(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.base_seq + self.pending.len() as u64);
        self.pending.push_back(self.need_per_seq);
    }

    /// Message `id` ends at data seq `last_seq`.
    pub(crate) fn add_msg(&mut self, id: u64, last_seq: u64) {
        self.msgs.push_back((id, last_seq));
    }

    /// A timestamp from the error queue.
    pub(crate) fn on_stamp(&mut self, stamp: TxStamp) {
        if stamp.kind != sys::SCM_TSTAMP_SND {
            return;
        }
        let offset = stamp.id.wrapping_sub(self.base_id as u32) as usize;
        let Some(rec) = self.records.get_mut(offset) else {
            return; // a stamp from before a re-arm, or already expired
        };
        if rec.done {
            return;
        }
        rec.done = true;
        let covers = std::mem::replace(&mut rec.covers, Covers::Probe);
        if stamp.realtime_ns != 0 {
            let us = stamp.realtime_ns.saturating_sub(rec.sent_realtime_ns) / 1000;
            self.latency.record(us);
        }
        self.missing_streak = 0;
        if covers == Covers::Probe && self.mode == WireMode::Probing {
            tracing::info!("TX timestamps work: on-the-wire means kernel-stamped");
            self.mode = WireMode::TxTimestamp;
        }
        self.apply(&covers);
        self.pop_done();
    }

    /// Handles timeouts: an unanswered probe, stamps that never came.
    pub(crate) fn expire(&mut self, now: Instant, probe_timeout: Duration, stamp_timeout: Duration) {
        if self.mode == WireMode::Probing {
            if let Some(t) = self.probe_started {
                if now.saturating_duration_since(t) >= probe_timeout {
                    self.fall_back("no TX timestamp for the probe");
                }
            }
            return;
        }
        while let Some(rec) = self.records.front() {
            if now.saturating_duration_since(rec.sent_at) < stamp_timeout {
                break;
            }
            self.expire_front();
            self.missing_streak += 1;
            if self.missing_streak >= MISSING_STREAK_FALLBACK {
                self.fall_back("TX timestamps stopped arriving");
                return;
            }
        }
    }

    /// When [`WireTracker::expire`] next has something to do.
    pub(crate) fn deadline(&self, probe_timeout: Duration, stamp_timeout: Duration) -> Option<Instant> {
        if self.mode == WireMode::Probing {
            return self.probe_started.map(|t| t + probe_timeout);
        }
        self.records.front().map(|r| r.sent_at + stamp_timeout)
    }

    fn expire_front(&mut self) {
        if let Some(rec) = self.records.pop_front() {
            self.base_id += 1;
            if !rec.done {
                self.stamps_missing += 1;
                self.apply(&rec.covers);
            }
        }
        self.pop_done();
    }

    fn fall_back(&mut self, why: &str) {
        tracing::warn!("{why}: on-the-wire now means sendmsg returned (weaker)");
        self.mode = WireMode::SendReturned;
        while let Some(rec) = self.records.pop_front() {
            self.base_id += 1;
            if !rec.done {
                self.apply(&rec.covers);
            }
        }
        self.rearm = false;
    }

    fn pop_done(&mut self) {
        while self.records.front().is_some_and(|r| r.done) {
            self.records.pop_front();
            self.base_id += 1;
        }
    }

    fn apply(&mut self, covers: &Covers) {
        match covers {
            Covers::Probe => {}
            Covers::Data(seq) => self.dec(*seq),
            Covers::Repair(seqs) => {
                for &s in seqs {
                    self.dec(s);
                }
            }
        }
    }

    fn dec(&mut self, seq: u64) {
        if seq < self.base_seq {
            return;
        }
        if let Some(n) = self.pending.get_mut((seq - self.base_seq) as usize) {
            *n = n.saturating_sub(1);
        }
    }

    /// Moves past fully stamped seqs; returns the new cumulative on-wire
    /// message id if it moved.
    pub(crate) fn advance(&mut self) -> Option<u64> {
        while self.pending.front() == Some(&0) {
            self.pending.pop_front();
            self.base_seq += 1;
        }
        self.pop_msgs()
    }

    fn pop_msgs(&mut self) -> Option<u64> {
        let before = self.wire_upto;
        while let Some(&(id, last)) = self.msgs.front() {
            if last >= self.base_seq {
                break;
            }
            self.wire_upto = id;
            self.msgs.pop_front();
        }
        (self.wire_upto != before).then_some(self.wire_upto)
    }

    /// Every data seq below `cum_ack` was received: whatever stamps they
    /// still wait for no longer matter. Returns the new on-wire id if it
    /// moved (to be reported before the ack).
    pub(crate) fn on_acked(&mut self, cum_ack: u64) -> Option<u64> {
        self.implied_by_ack += self.msgs.iter().take_while(|&&(_, last)| last < cum_ack).count() as u64;
        while self.base_seq < cum_ack && self.pending.pop_front().is_some() {
            self.base_seq += 1;
        }
        let moved = self.advance();
        debug_assert!(self.msgs.front().is_none_or(|&(_, last)| last >= cum_ack));
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(id: u32) -> TxStamp {
        TxStamp { id, kind: sys::SCM_TSTAMP_SND, realtime_ns: 5_000 }
    }

    #[test]
    fn message_waits_for_data_and_every_repair() {
        let now = Instant::now();
        let mut t = WireTracker::new(2, true, true);
        t.on_sent(Covers::Probe, Stamp::Explicit(0), now, 0);
        t.on_stamp(stamp(0));
        assert_eq!(t.mode(), WireMode::TxTimestamp);
        for seq in 1..=2 {
            t.add_seq(seq);
            t.on_sent(Covers::Data(seq), t.stamp_request(), now, 0);
        }
        t.add_msg(1, 2);
        t.on_sent(Covers::Repair(vec![1, 2]), Stamp::Explicit(3), now, 0);
        t.on_sent(Covers::Repair(vec![1, 2]), Stamp::Explicit(4), now, 0);
        for id in [1, 2, 4] {
            t.on_stamp(stamp(id));
            assert_eq!(t.advance(), None);
        }
        t.on_stamp(stamp(3));
        assert_eq!(t.advance(), Some(1));
    }

    #[test]
    fn ack_implies_wire_and_missing_stamps_expire() {
        let now = Instant::now();
        let mut t = WireTracker::new(1, true, true);
        t.on_sent(Covers::Probe, Stamp::Explicit(0), now, 0);
        t.on_stamp(stamp(0));
        t.add_seq(1);
        t.on_sent(Covers::Data(1), Stamp::Explicit(1), now, 0);
        t.add_msg(1, 1);
        t.add_seq(2);
        t.on_sent(Covers::Data(2), Stamp::Explicit(2), now, 0);
        t.add_msg(2, 2);
        assert_eq!(t.on_acked(2), Some(1));
        assert_eq!(t.implied_by_ack, 1);
        t.expire(now + Duration::from_secs(1), Duration::from_secs(1), Duration::from_millis(10));
        // Both data stamps expired; seq 2 still lacks its repair's.
        assert_eq!(t.stamps_missing, 2);
        assert_eq!(t.advance(), None);
    }

    #[test]
    fn counter_mode_rearms_after_a_failed_send() {
        let now = Instant::now();
        let mut t = WireTracker::new(0, true, false);
        t.on_sent(Covers::Probe, Stamp::Counter, now, 0);
        t.on_stamp(stamp(0));
        t.add_seq(1);
        t.on_sent(Covers::Data(1), t.stamp_request(), now, 0); // id 1
        t.add_msg(1, 1);
        // A stamped send fails: the kernel may or may not have counted it.
        t.on_send_failed(Stamp::Counter);
        assert!(t.paused());
        assert_eq!(t.stamp_request(), Stamp::None);
        assert!(!t.needs_rearm(), "id 1 is still owed");
        t.on_stamp(stamp(1));
        assert_eq!(t.advance(), Some(1));
        assert!(t.needs_rearm());
        t.rearmed();
        assert!(!t.paused());
        // Numbering restarts at 0 after the re-arm.
        t.add_seq(2);
        t.on_sent(Covers::Data(2), t.stamp_request(), now, 0);
        t.add_msg(2, 2);
        t.on_stamp(stamp(0));
        assert_eq!(t.advance(), Some(2));
    }

    #[test]
    fn probe_timeout_falls_back() {
        let now = Instant::now();
        let mut t = WireTracker::new(0, true, false);
        t.on_sent(Covers::Probe, Stamp::Counter, now, 0);
        t.expire(now + Duration::from_millis(300), Duration::from_millis(200), Duration::from_millis(10));
        assert_eq!(t.mode(), WireMode::SendReturned);
        assert_eq!(t.stamp_request(), Stamp::None);
    }
}
