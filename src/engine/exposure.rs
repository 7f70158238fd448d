//! Network-sync completions (`docs/architecture.md`, "Network-sync
//! replicas"): a write completes only once every connected network-sync
//! link has it, and the repair packets covering it, on the wire; and,
//! beyond that,
//!
//! - **exposure is bounded**: the bytes of writes acknowledged to the
//!   application that the far replica has not confirmed receiving stay
//!   within the link's `max_exposure`: at the bound, completions wait for
//!   the far replica's ack, as remote-sync does;
//! - **a degraded link is remote-sync**: while the loss on the path exceeds
//!   what the FEC code repairs (`starblk_netsync::health`), completions
//!   wait for the far replica's ack.
//!
//! So at any instant, the acknowledged writes a disaster at the HE's site
//! could lose at the far site are bounded by `max_exposure` — for every
//! connected network-sync link. (A link that is not connected does not
//! hold completions back, by §6; what it misses is recovered when it
//! returns.)
//!
//! Exposure counts each write as its data plus 64 bytes, as the write queue
//! does, so discards and write-zeroes count too.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

use super::{Core, Entry, ReplicaSpec, Shared};
use crate::config::MaxExposure;

/// Why completions wait for a far replica's ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitCause {
    /// The exposure reached `max_exposure`.
    Exposure,
    /// The link is degraded.
    Degraded,
}

/// How often, and how long in all, completions waited for one cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Waits {
    /// Times completions started waiting.
    pub count: u64,
    /// Time spent waiting, ms (the current wait included).
    pub total_ms: f64,
}

/// One network-sync link's far-end state (kept under the engine lock).
#[derive(Debug, Clone)]
pub(crate) struct FarGate {
    /// `max_exposure` as configured.
    pub max: MaxExposure,
    /// The bound in bytes now (a time bound follows the link's pacing
    /// rate).
    pub bound_bytes: u64,
    /// Highest seq the far replica confirmed receiving in this session.
    ///
    /// This is the network-sync link's cumulative ack (`Acked`): every
    /// message up to it is in the far replica process's inbox, whole and in
    /// order; the replica applies its inbox whatever happens to the HE's
    /// site, so a disaster there can no longer lose those writes. The
    /// replica's own Ack frames (its durable seq) mean more — on its
    /// stable storage — and come a group commit later; they count as well
    /// (durable implies received). Not the datagram-level marks: a datagram
    /// the receiver holds (`held_upto`) may belong to a message still
    /// missing fragments, which no one applies.
    pub received_seq: u64,
    /// The path's loss exceeds what the FEC code repairs.
    pub degraded: bool,
    /// Completions wait for the far ack: since when, and why.
    wait: Option<(Instant, WaitCause)>,
    /// Times the link turned degraded since the HE started.
    pub degradations: u64,
    pub exposure_waits: Waits,
    pub degraded_waits: Waits,
}

impl FarGate {
    pub fn new(max: MaxExposure, rate_bits_per_s: u64) -> FarGate {
        let mut g = FarGate {
            max,
            bound_bytes: 0,
            received_seq: 0,
            degraded: false,
            wait: None,
            degradations: 0,
            exposure_waits: Waits::default(),
            degraded_waits: Waits::default(),
        };
        g.set_rate(rate_bits_per_s);
        g
    }

    /// A replica's gate before its link reports a pacing rate.
    pub fn for_spec(spec: &ReplicaSpec) -> FarGate {
        let rate = spec.netsync.as_ref().map_or(0, |c| {
            if c.auto_rate {
                starblk_netsync::auto_rate::INITIAL_RATE_BITS_PER_S
            } else {
                c.rate_bits_per_s
            }
        });
        FarGate::new(spec.max_exposure, rate)
    }

    /// The link's pacing rate changed: a time bound follows it.
    pub fn set_rate(&mut self, rate_bits_per_s: u64) {
        self.bound_bytes = match self.max {
            MaxExposure::Bytes(b) => b,
            // An unpaced link has no rate to go by: the default bound.
            MaxExposure::Millis(_) if rate_bits_per_s == 0 => crate::config::DEFAULT_MAX_EXPOSURE_BYTES,
            MaxExposure::Millis(ms) => rate_bits_per_s.saturating_mul(ms) / 8000,
        };
    }

    /// Every seq up to this is confirmed by the far replica.
    pub fn confirmed(&self, durable_seq: u64) -> u64 {
        self.received_seq.max(durable_seq)
    }

    /// A new session: nothing it received before counts (the replica may
    /// have restarted and lost its inbox; it resends from its durable seq).
    pub fn new_session(&mut self, durable_seq: u64, now: Instant) {
        self.received_seq = durable_seq;
        self.degraded = false;
        self.set_wait(None, now);
    }

    fn set_wait(&mut self, cause: Option<WaitCause>, now: Instant) {
        if self.wait.map(|(_, c)| c) == cause {
            return;
        }
        if let Some((since, c)) = self.wait.take() {
            self.waits_mut(c).total_ms += now.saturating_duration_since(since).as_secs_f64() * 1e3;
        }
        if let Some(c) = cause {
            self.waits_mut(c).count += 1;
            self.wait = Some((now, c));
        }
    }

    fn waits_mut(&mut self, c: WaitCause) -> &mut Waits {
        match c {
            WaitCause::Exposure => &mut self.exposure_waits,
            WaitCause::Degraded => &mut self.degraded_waits,
        }
    }

    /// (exposure waits, degraded waits), the current wait's time included.
    pub fn waits(&self, now: Instant) -> (Waits, Waits) {
        let (mut e, mut d) = (self.exposure_waits, self.degraded_waits);
        if let Some((since, c)) = self.wait {
            let ms = now.saturating_duration_since(since).as_secs_f64() * 1e3;
            match c {
                WaitCause::Exposure => e.total_ms += ms,
                WaitCause::Degraded => d.total_ms += ms,
            }
        }
        (e, d)
    }

    /// Whether completions are waiting for this link's far ack now.
    pub fn waiting(&self) -> Option<WaitCause> {
        self.wait.map(|(_, c)| c)
    }
}

/// Bytes of all writes up to and including `seq` since the HE started,
/// if the write queue still knows (`seq` is at most one before its front).
fn cum_through(queue: &VecDeque<Entry>, seq: u64) -> Option<u64> {
    let front = queue.front()?;
    if seq + 1 == front.seq {
        return Some(front.cum_bytes - front.bytes());
    }
    queue.get(usize::try_from(seq.checked_sub(front.seq)?).ok()?).map(|e| e.cum_bytes)
}

/// The highest seq that may complete with `confirmed` confirmed and at
/// most `bound` bytes of writes in (confirmed, seq]. When the write queue
/// no longer knows the bytes after `confirmed` (it evicted them), only
/// `confirmed`: waiting for the far ack is always safe.
fn exposure_limit(queue: &VecDeque<Entry>, last_seq: u64, confirmed: u64, bound: u64) -> u64 {
    if confirmed >= last_seq {
        return last_seq;
    }
    let (Some(front), Some(base)) = (queue.front(), cum_through(queue, confirmed)) else {
        return confirmed;
    };
    // cum_bytes grows with seq, so the entries within the bound come first.
    let within = queue.partition_point(|e| e.cum_bytes <= base.saturating_add(bound));
    let limit = match within {
        0 => front.seq - 1,
        n if n == queue.len() => last_seq,
        n => queue[n - 1].seq,
    };
    limit.max(confirmed)
}

/// Bytes of completed writes the far end has not confirmed (a lower bound
/// if the write queue evicted some of them).
pub(crate) fn exposure_bytes(g: &Core, confirmed: u64) -> u64 {
    if confirmed >= g.completed_seq {
        return 0;
    }
    let Some(front) = g.queue.front() else { return 0 };
    let base = cum_through(&g.queue, confirmed).unwrap_or(front.cum_bytes - front.bytes());
    cum_through(&g.queue, g.completed_seq).map_or(0, |c| c.saturating_sub(base))
}

impl Shared {
    /// §1(b) and the far gates: the highest seq up to `upto` that every
    /// connected network-sync link lets complete. Records when and why
    /// completions wait for a far ack.
    pub(super) fn netsync_gate(&self, g: &mut Core, upto: u64) -> u64 {
        let now = Instant::now();
        let last_seq = g.next_seq - 1;
        let mut limit = upto;
        for l in g.links.iter_mut() {
            if !l.netsync {
                continue;
            }
            // A link running a replay is sent no writes until the replay
            // is done, so its wire seq stands still: gating on it would
            // stall every completion for the whole replay. Like a replica
            // that is not connected, it does not count until it receives
            // the live stream again (from the queue, or by replaying).
            if !l.state.is_connected() || l.replay.is_some() {
                l.far.set_wait(None, now);
                continue;
            }
            let confirmed = l.far.confirmed(l.durable_seq);
            // §1(b): the write and its repairs on the wire (received or
            // durable imply it).
            let wire = upto.min(l.wire_seq.max(confirmed));
            let (far, cause) = if l.far.degraded {
                (confirmed, WaitCause::Degraded)
            } else {
                (exposure_limit(&g.queue, last_seq, confirmed, l.far.bound_bytes), WaitCause::Exposure)
            };
            l.far.set_wait((far < wire).then_some(cause), now);
            limit = limit.min(wire).min(far);
        }
        limit
    }

    /// The far replica of network-sync link `idx` has every write up to
    /// `seq` (the link acknowledged the message that carries it).
    pub(super) fn on_far_received(&self, idx: usize, seq: u64) {
        let mut g = self.lock();
        let l = &mut g.links[idx];
        if seq <= l.far.received_seq {
            return;
        }
        l.far.received_seq = seq;
        // Received implies it was on the wire (its report may still come).
        l.wire_seq = l.wire_seq.max(seq);
        self.advance(&mut g);
    }

    /// Network-sync link `idx` turned degraded or healthy.
    pub(super) fn on_far_health(&self, idx: usize, degraded: bool) {
        let mut g = self.lock();
        let l = &mut g.links[idx];
        if l.far.degraded == degraded {
            return;
        }
        l.far.degraded = degraded;
        l.far.degradations += u64::from(degraded);
        if degraded {
            tracing::warn!(replica = %self.links[idx].spec.name, "network-sync link degraded: completions wait for the far replica's ack");
        } else {
            tracing::info!(replica = %self.links[idx].spec.name, "network-sync link healthy: completions wait for the wire again");
        }
        self.advance(&mut g);
    }

    /// Network-sync link `idx` paces at this rate now.
    pub(super) fn on_far_rate(&self, idx: usize, rate_bits_per_s: u64) {
        let mut g = self.lock();
        let l = &mut g.links[idx];
        let before = l.far.bound_bytes;
        l.far.set_rate(rate_bits_per_s);
        if l.far.bound_bytes > before {
            self.advance(&mut g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use starblk_replica::proto::WriteOp;

    fn queue(first: u64, lens: &[usize]) -> VecDeque<Entry> {
        let mut cum = 1000; // bytes before `first`
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                cum += len as u64 + 64;
                Entry {
                    seq: first + i as u64,
                    offset: 0,
                    len: len as u32,
                    op: WriteOp::Data,
                    epoch: 1,
                    data: Arc::new(vec![0; len]),
                    data_sum: starblk_replica::sum::data_sum(&vec![0; len]),
                    token: None,
                    cum_bytes: cum,
                    submitted: Instant::now(),
                }
            })
            .collect()
    }

    /// Records completed tokens.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<u64>>);

    impl crate::engine::Completer for Recorder {
        fn complete(&self, token: u64, result: crate::engine::IoResult<'_>) {
            assert!(result.is_ok());
            self.0.lock().unwrap().push(token);
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<u64> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// An engine with a local TCP replica (0) and a far network-sync one
    /// (1), Q = 1, both up to date; no threads: the test plays the links.
    fn engine(max: MaxExposure) -> (Shared, Arc<Recorder>) {
        use crate::engine::{link, EngineConfig, LinkState, ReplicaSpec};
        let cfg = EngineConfig {
            name: "t".into(),
            volume: [0; 16],
            size_bytes: 1 << 30,
            block_size: 4096,
            quorum: 1,
            write_queue_bytes: 64 << 20,
            on_quorum_loss: crate::config::OnQuorumLoss::Suspend,
            epoch: 1,
            start_seq: 0,
            history: starblk_replica::history::History::new(),
            recovery_rate_bytes_per_s: 0,
            members: Default::default(),
            encrypt: false,
            keys: None,
            recovery_rate_auto: false,
            local_reads: false,
        };
        let spec = |name: &str, netsync| ReplicaSpec {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
            role: crate::config::Role::Far,
            initial_durable_seq: 0,
            netsync,
            wire_gate: true,
            max_exposure: max,
            encrypt: false,
        };
        let specs = [spec("local", None), spec("far", Some(starblk_netsync::LinkConfig::default()))];
        let mut cores: Vec<link::LinkCore> = specs.iter().map(|_| link::LinkCore::new(0)).collect();
        for c in &mut cores {
            c.set_state(LinkState::UpToDate, String::new());
        }
        cores[1].netsync = true;
        cores[1].far = FarGate::new(max, 0);
        let core = Core {
            next_seq: 1,
            queue: VecDeque::new(),
            queue_bytes: 0,
            cum_bytes: 0,
            completed_seq: 0,
            region_seq: vec![0; 1025],
            flush_waiters: VecDeque::new(),
            deferred_reads: Vec::new(),
            links: cores,
            accepting: true,
            quorum_lost_since: None,
            space_waiters: 0,
        };
        let recorder = Arc::new(Recorder::default());
        let shared = Shared {
            cfg,
            core: std::sync::Mutex::new(core),
            space: std::sync::Condvar::new(),
            completer: recorder.clone(),
            links: crate::engine::links::LinkTable::new(
                specs.into_iter().enumerate().map(|(i, s)| Arc::new(link::Link::new(i, s))).collect(),
            ),
            started: Instant::now(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            recovery_rate_bytes_per_s: std::sync::atomic::AtomicU64::new(0),
            latency: crate::engine::latency::Latency::default(),
            pool: crossbeam::queue::ArrayQueue::new(16),
            members: crate::engine::membership::Members::new(Default::default()),
            autorate: Default::default(),
        };
        (shared, recorder)
    }

    fn write(s: &Shared, token: u64) {
        s.write(token, token * 4096, 4096, WriteOp::Data, &[7; 4096]);
    }

    #[test]
    fn completions_wait_for_the_far_ack_beyond_the_exposure_bound_and_while_degraded() {
        // Three writes' worth (4096 + 64 bytes each).
        let (s, done) = engine(MaxExposure::Bytes(3 * 4160));
        for t in 1..=5 {
            write(&s, t);
        }
        s.on_durable(0, 5);
        s.on_wire(1, 5);
        // Durable locally and on the wire, but only three may be exposed.
        assert_eq!(done.take(), vec![1, 2, 3]);
        let far = |s: &Shared| s.lock().links[1].far.clone();
        assert_eq!(far(&s).waiting(), Some(WaitCause::Exposure));
        assert_eq!(exposure_bytes(&s.lock(), 0), 3 * 4160);
        // The far replica has 1 and 2: 4 and 5 fit the bound.
        s.on_far_received(1, 2);
        assert_eq!(done.take(), vec![4, 5]);
        assert_eq!(far(&s).waiting(), None);
        assert_eq!(far(&s).waits(Instant::now()).0.count, 1);
        assert_eq!(exposure_bytes(&s.lock(), 2), 3 * 4160);
        // Degraded: remote-sync, whatever the bound.
        s.on_far_health(1, true);
        for t in 6..=7 {
            write(&s, t);
        }
        s.on_durable(0, 7);
        s.on_wire(1, 7);
        assert!(done.take().is_empty());
        assert_eq!(far(&s).waiting(), Some(WaitCause::Degraded));
        s.on_far_received(1, 6);
        assert_eq!(done.take(), vec![6]);
        s.on_far_health(1, false);
        assert_eq!(done.take(), vec![7]);
        let (e, d) = far(&s).waits(Instant::now());
        assert_eq!((e.count, d.count, far(&s).waiting()), (1, 1, None));
        assert_eq!(far(&s).degradations, 1);
        // Not on the wire yet: §1(b) still holds back, and that is no
        // wait for the far ack.
        write(&s, 8);
        s.on_durable(0, 8);
        assert!(done.take().is_empty());
        assert_eq!(far(&s).waiting(), None);
        s.on_wire(1, 8);
        assert_eq!(done.take(), vec![8]);
        // A far link that is not connected holds nothing back (§6).
        s.lock().links[1].set_state(crate::engine::LinkState::Failed, "cut".into());
        for t in 9..=20 {
            write(&s, t);
        }
        s.on_durable(0, 20);
        assert_eq!(done.take(), (9..=20).collect::<Vec<_>>());
    }

    #[test]
    fn exposure_limit_counts_bytes_after_the_confirmed_seq() {
        // Seqs 10..=14, 4096 + 64 bytes each.
        let q = queue(10, &[4096; 5]);
        let w = 4160;
        // Confirmed 9 (just before the front): 2 writes fit 2 x 4160.
        assert_eq!(exposure_limit(&q, 14, 9, 2 * w), 11);
        assert_eq!(exposure_limit(&q, 14, 9, 2 * w - 1), 10);
        assert_eq!(exposure_limit(&q, 14, 11, 2 * w), 13);
        assert_eq!(exposure_limit(&q, 14, 11, 100 * w), 14);
        // A bound below one write: nothing past the confirmed seq.
        assert_eq!(exposure_limit(&q, 14, 12, 10), 12);
        assert_eq!(exposure_limit(&q, 14, 9, 0), 9);
        // All confirmed.
        assert_eq!(exposure_limit(&q, 14, 14, 0), 14);
        // Bytes after a seq the queue evicted are unknown: wait.
        assert_eq!(exposure_limit(&q, 14, 5, u64::MAX / 2), 5);
        // An empty queue (nothing written yet).
        assert_eq!(exposure_limit(&VecDeque::new(), 0, 0, 0), 0);
    }

    #[test]
    fn discards_count_their_record() {
        let q = queue(1, &[0, 0, 4096]);
        assert_eq!(exposure_limit(&q, 3, 0, 128), 2);
        assert_eq!(cum_through(&q, 0), Some(1000));
        assert_eq!(cum_through(&q, 3), Some(1000 + 64 + 64 + 4160));
        assert_eq!(cum_through(&q, 4), None);
    }

    #[test]
    fn a_time_bound_follows_the_rate() {
        let mut f = FarGate::new(MaxExposure::Millis(500), 8_000_000);
        assert_eq!(f.bound_bytes, 500_000);
        f.set_rate(40_000_000);
        assert_eq!(f.bound_bytes, 2_500_000);
        f.set_rate(0);
        assert_eq!(f.bound_bytes, crate::config::DEFAULT_MAX_EXPOSURE_BYTES);
        let f = FarGate::new(MaxExposure::Bytes(4 << 20), 1);
        assert_eq!(f.bound_bytes, 4 << 20);
    }

    #[test]
    fn waits_are_counted_and_timed_by_cause() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = FarGate::new(MaxExposure::Bytes(1), 0);
        f.set_wait(Some(WaitCause::Exposure), t0);
        f.set_wait(Some(WaitCause::Exposure), t0 + ms(5));
        assert_eq!(f.waiting(), Some(WaitCause::Exposure));
        f.set_wait(Some(WaitCause::Degraded), t0 + ms(10));
        f.set_wait(None, t0 + ms(30));
        f.set_wait(Some(WaitCause::Exposure), t0 + ms(40));
        let (e, d) = f.waits(t0 + ms(41));
        assert_eq!((e.count, d.count), (2, 1));
        assert!((e.total_ms - 11.0).abs() < 1e-6 && (d.total_ms - 20.0).abs() < 1e-6, "{e:?} {d:?}");
        f.new_session(7, t0 + ms(50));
        assert_eq!((f.waiting(), f.received_seq, f.waits(t0 + ms(60)).0.total_ms), (None, 7, 20.0));
    }
}
