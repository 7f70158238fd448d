//! The decoder: one API over both schemes, with bounded state.
//!
//! Every repair packet is an equation over the data packets it covers. A
//! group (one XOR repair, or the c RS parities of one group) whose missing
//! packet count is at most its received parity count is solved at once;
//! otherwise it waits, indexed by the seqs it misses, and is retried each
//! time one of them arrives or is recovered. Recoveries cascade through
//! that index, which is Maelstrom's iterative layer-by-layer decoding.

use std::collections::{BTreeMap, HashMap};

use crate::rs::{reconstruct, CodecCache};
use crate::window::{Reject, Window};
use crate::xor::xor_into;
use crate::{FecError, FecScheme, RepairPacket, SchemeKind, MAX_PACKET_BYTES};

/// Upper limit on [`DecoderConfig::window_seqs`] (memory: one slot each).
pub const MAX_WINDOW_SEQS: u64 = 1 << 18;

/// Bounds on the decoder's state.
///
/// Memory is at most `window_seqs * (MAX_PACKET_BYTES + 40)` for stored
/// data packets plus `max_pending_groups * c * (MAX_PACKET_BYTES + 64 * 10)`
/// for waiting repair packets, whatever the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Data seqs remembered behind the highest seq seen. Older data and
    /// repairs covering anything older are dropped (counted `too_old`).
    /// Must be at least [`FecScheme::group_span_seqs`] plus the reordering
    /// the link may show, or groups expire before they can be solved.
    pub window_seqs: u64,
    /// Repair groups kept waiting for more packets; beyond it the oldest is
    /// dropped (counted `groups_evicted`).
    pub max_pending_groups: usize,
    /// A seq more than this above the highest seen is taken as garbage and
    /// dropped (counted `far_future`) instead of moving the window.
    pub max_advance_seqs: u64,
}

impl DecoderConfig {
    /// Defaults for a scheme: a window of twice the group span (at least
    /// 1024 seqs); room for twice the full groups a window holds (each seq
    /// is in c XOR groups of r, or in one RS group) plus 64 partial ones;
    /// and a 2^32 advance limit, which only a corrupted or foreign seq
    /// exceeds (a real outage that long needs a new decoder anyway).
    pub fn for_scheme(scheme: &FecScheme) -> Self {
        let window_seqs = (2 * scheme.group_span_seqs()).clamp(1024, MAX_WINDOW_SEQS);
        let groups_per_seq = match scheme.kind() {
            SchemeKind::LayeredXor => scheme.c(),
            SchemeKind::ReedSolomon => 1,
        };
        // window_seqs <= MAX_WINDOW_SEQS, so this fits usize.
        let full_groups = window_seqs as usize * groups_per_seq / scheme.r();
        DecoderConfig { window_seqs, max_pending_groups: 2 * full_groups + 64, max_advance_seqs: 1 << 32 }
    }
}

/// A data packet rebuilt from repair packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Its seq.
    pub seq: u64,
    /// Its exact original bytes.
    pub payload: Vec<u8>,
}

/// Counters of what the decoder did with its input, for `status` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Data packets stored.
    pub data_accepted: u64,
    /// Repair packets that were used or kept.
    pub repairs_accepted: u64,
    /// Data packets rebuilt.
    pub recovered: u64,
    /// Data packets already present (received or recovered), ignored.
    pub duplicate_data: u64,
    /// Repair packets already held for the same group and index, ignored.
    pub duplicate_repairs: u64,
    /// Repair packets whose covered packets were all present, ignored.
    pub repairs_without_loss: u64,
    /// Packets ignored because they fall behind the window.
    pub too_old: u64,
    /// Packets ignored because they are too far ahead of the window.
    pub far_future: u64,
    /// Repairs ignored because they disagree with the data present or with
    /// another repair of the same group (lengths, seqs, nonzero padding), or
    /// span more seqs than the window holds.
    pub inconsistent_repairs: u64,
    /// Waiting groups dropped unsolved because the window moved past them.
    pub groups_expired: u64,
    /// Waiting groups dropped unsolved because too many were waiting.
    pub groups_evicted: u64,
}

/// Orders groups by first covered seq, so the oldest is first to expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct GroupKey {
    first_seq: u64,
    /// The XOR layer; 0 for RS, where the c parities share one group.
    layer: u8,
}

/// A group waiting for more packets.
#[derive(Debug)]
struct Pending {
    seqs: Vec<u64>,
    lens: Vec<u16>,
    /// One entry for XOR, c for RS, indexed by the repair's index.
    parities: Vec<Option<Vec<u8>>>,
    have: usize,
}

/// What solving a group came to.
enum Outcome {
    /// Still more packets missing than parities held.
    Waiting,
    /// Solved, useless or inconsistent: the group is gone.
    Done,
}

/// Rebuilds lost data packets from repair packets; see the module docs.
#[derive(Debug)]
pub struct Decoder {
    kind: SchemeKind,
    total: u8,
    config: DecoderConfig,
    window: Window,
    groups: BTreeMap<GroupKey, Pending>,
    /// Seq -> groups waiting for it. Only missing seqs are entered, and a
    /// group's entries are removed with it, so this is bounded by groups.
    waiting: HashMap<u64, Vec<GroupKey>>,
    codecs: Option<CodecCache>,
    stats: DecoderStats,
}

impl Decoder {
    /// A decoder for `scheme` with [`DecoderConfig::for_scheme`] bounds.
    pub fn new(scheme: &FecScheme) -> Self {
        // The default config is always within range.
        match Self::with_config(scheme, DecoderConfig::for_scheme(scheme)) {
            Ok(d) => d,
            Err(_) => unreachable!("default decoder config is valid"),
        }
    }

    /// A decoder with explicit bounds.
    pub fn with_config(scheme: &FecScheme, config: DecoderConfig) -> Result<Self, FecError> {
        if config.window_seqs == 0 || config.window_seqs > MAX_WINDOW_SEQS {
            return Err(FecError::InvalidParams { reason: "window_seqs must be in 1..=MAX_WINDOW_SEQS" });
        }
        if config.max_pending_groups == 0 {
            return Err(FecError::InvalidParams { reason: "max_pending_groups must be at least 1" });
        }
        let codecs = match scheme {
            FecScheme::ReedSolomon { c, .. } => Some(CodecCache::new(usize::from(*c))),
            FecScheme::LayeredXor { .. } => None,
        };
        Ok(Decoder {
            kind: scheme.kind(),
            // c <= MAX_LAYERS / MAX_PARITY, both below 256.
            total: scheme.c() as u8,
            config,
            window: Window::new(config.window_seqs, config.max_advance_seqs),
            groups: BTreeMap::new(),
            waiting: HashMap::new(),
            codecs,
            stats: DecoderStats::default(),
        })
    }

    /// The bounds in force.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// What happened so far.
    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }

    /// Whether data packet `seq` is held (received or recovered) right now.
    /// A seq below [`Decoder::low_seq`] is never held any more.
    pub fn contains(&self, seq: u64) -> bool {
        self.window.get(seq).is_some()
    }

    /// The oldest seq the window still covers; a link NACKs what is missing
    /// at or above it once FEC has had its chance.
    pub fn low_seq(&self) -> u64 {
        self.window.low()
    }

    /// The highest seq seen in data or repair packets.
    pub fn high_seq(&self) -> Option<u64> {
        self.window.high()
    }

    /// Feeds a received data packet; appends to `out` whatever it lets the
    /// decoder rebuild. Out-of-window and duplicate packets are counted and
    /// ignored; only a payload over [`MAX_PACKET_BYTES`] is an error.
    pub fn on_data(&mut self, seq: u64, payload: &[u8], out: &mut Vec<Recovered>) -> Result<(), FecError> {
        if payload.len() > MAX_PACKET_BYTES {
            return Err(FecError::PayloadTooLarge { len_bytes: payload.len(), max_bytes: MAX_PACKET_BYTES });
        }
        if !self.admit(seq, seq) {
            return Ok(());
        }
        if self.window.get(seq).is_some() {
            self.stats.duplicate_data += 1;
            return Ok(());
        }
        self.window.insert(seq, payload);
        self.stats.data_accepted += 1;
        self.cascade(vec![seq], out);
        Ok(())
    }

    /// Feeds a received repair packet; appends to `out` every packet it
    /// lets the decoder rebuild, directly or by cascade. A packet of another
    /// scheme or c is an error (the two ends are configured differently);
    /// anything else unusable is counted and ignored.
    pub fn on_repair(&mut self, repair: RepairPacket, out: &mut Vec<Recovered>) -> Result<(), FecError> {
        repair.debug_check();
        if repair.kind != self.kind || repair.total != self.total {
            return Err(FecError::SchemeMismatch {
                expected: self.kind,
                expected_total: self.total,
                got: repair.kind,
                got_total: repair.total,
            });
        }
        let (first, last) = match (repair.seqs.first(), repair.seqs.last()) {
            (Some(&f), Some(&l)) => (f, l),
            _ => return Ok(()),
        };
        if last - first >= self.config.window_seqs {
            self.stats.inconsistent_repairs += 1;
            return Ok(());
        }
        if !self.admit(first, last) {
            return Ok(());
        }
        let key = GroupKey {
            first_seq: first,
            layer: match self.kind {
                SchemeKind::LayeredXor => repair.index,
                SchemeKind::ReedSolomon => 0,
            },
        };
        if self.groups.contains_key(&key) {
            self.add_parity(key, repair, out);
        } else {
            self.new_group(key, repair, out);
        }
        Ok(())
    }

    /// Admits `first..=last` into the window, counting a rejection and
    /// expiring the groups the window moved past.
    fn admit(&mut self, first: u64, last: u64) -> bool {
        match self.window.admit(first, last) {
            Ok(()) => {
                self.expire();
                true
            }
            Err(Reject::TooOld) => {
                self.stats.too_old += 1;
                false
            }
            Err(Reject::FarFuture) => {
                self.stats.far_future += 1;
                false
            }
        }
    }

    /// Drops waiting groups that reach below the window.
    fn expire(&mut self) {
        let low = self.window.low();
        while let Some(entry) = self.groups.first_entry() {
            if entry.key().first_seq >= low {
                break;
            }
            let (key, group) = entry.remove_entry();
            self.unregister(key, &group);
            self.stats.groups_expired += 1;
        }
    }

    /// A further parity for a waiting group (RS), or a duplicate.
    fn add_parity(&mut self, key: GroupKey, repair: RepairPacket, out: &mut Vec<Recovered>) {
        let Some(group) = self.groups.get_mut(&key) else {
            return;
        };
        if group.seqs != repair.seqs || group.lens != repair.lens {
            self.stats.inconsistent_repairs += 1;
            return;
        }
        let index = match self.kind {
            SchemeKind::LayeredXor => 0,
            SchemeKind::ReedSolomon => usize::from(repair.index),
        };
        match group.parities.get_mut(index) {
            Some(slot @ None) => {
                *slot = Some(repair.payload);
                group.have += 1;
                self.stats.repairs_accepted += 1;
            }
            _ => {
                self.stats.duplicate_repairs += 1;
                return;
            }
        }
        let mut work = Vec::new();
        if let Outcome::Done = self.try_solve(key, &mut work, out) {
            self.cascade(work, out);
        }
    }

    /// The first repair seen for a group: solve it now or let it wait.
    fn new_group(&mut self, key: GroupKey, repair: RepairPacket, out: &mut Vec<Recovered>) {
        let slots = match self.kind {
            SchemeKind::LayeredXor => 1,
            SchemeKind::ReedSolomon => usize::from(self.total),
        };
        let mut parities: Vec<Option<Vec<u8>>> = vec![None; slots];
        let index = if slots == 1 { 0 } else { usize::from(repair.index) };
        parities[index] = Some(repair.payload);
        let group = Pending { seqs: repair.seqs, lens: repair.lens, parities, have: 1 };
        self.groups.insert(key, group);
        self.stats.repairs_accepted += 1;
        let mut work = Vec::new();
        match self.try_solve(key, &mut work, out) {
            Outcome::Done => self.cascade(work, out),
            Outcome::Waiting => {
                self.register(key);
                self.enforce_capacity();
            }
        }
    }

    /// Enters a waiting group under each seq it misses.
    fn register(&mut self, key: GroupKey) {
        let Some(group) = self.groups.get(&key) else {
            return;
        };
        for &seq in &group.seqs {
            if self.window.get(seq).is_none() {
                self.waiting.entry(seq).or_default().push(key);
            }
        }
    }

    /// Removes a group's entries from the waiting index.
    fn unregister(&mut self, key: GroupKey, group: &Pending) {
        for seq in &group.seqs {
            if let Some(keys) = self.waiting.get_mut(seq) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.waiting.remove(seq);
                }
            }
        }
    }

    fn enforce_capacity(&mut self) {
        while self.groups.len() > self.config.max_pending_groups {
            let Some((key, group)) = self.groups.pop_first() else {
                break;
            };
            self.unregister(key, &group);
            self.stats.groups_evicted += 1;
        }
    }

    /// Retries every group waiting on a newly present seq, and on whatever
    /// those recover in turn, until nothing more can be rebuilt.
    fn cascade(&mut self, mut work: Vec<u64>, out: &mut Vec<Recovered>) {
        while let Some(seq) = work.pop() {
            let Some(keys) = self.waiting.remove(&seq) else {
                continue;
            };
            for key in keys {
                if self.groups.contains_key(&key) {
                    self.try_solve(key, &mut work, out);
                }
            }
        }
    }
}

impl Decoder {
    /// Solves group `key` if it has enough parities for what it misses.
    /// Recovered packets are stored, appended to `out` and pushed on `work`
    /// so the caller can cascade.
    fn try_solve(&mut self, key: GroupKey, work: &mut Vec<u64>, out: &mut Vec<Recovered>) -> Outcome {
        let Some(group) = self.groups.get(&key) else {
            return Outcome::Done;
        };
        let mut missing = 0;
        let mut consistent = true;
        for (&seq, &len) in group.seqs.iter().zip(&group.lens) {
            match self.window.get(seq) {
                Some(data) => consistent &= data.len() == usize::from(len),
                None => missing += 1,
            }
        }
        if consistent && missing > group.have {
            return Outcome::Waiting;
        }
        let Some(group) = self.groups.remove(&key) else {
            return Outcome::Done;
        };
        self.unregister(key, &group);
        if !consistent {
            self.stats.inconsistent_repairs += 1;
            return Outcome::Done;
        }
        if missing == 0 {
            self.stats.repairs_without_loss += 1;
            return Outcome::Done;
        }
        let rebuilt = match &mut self.codecs {
            None => solve_xor(&self.window, &group),
            Some(codecs) => solve_rs(&self.window, codecs, group),
        };
        let Some(rebuilt) = rebuilt else {
            self.stats.inconsistent_repairs += 1;
            return Outcome::Done;
        };
        for (seq, payload) in rebuilt {
            debug_assert!(self.window.get(seq).is_none());
            self.window.insert(seq, &payload);
            self.stats.recovered += 1;
            work.push(seq);
            out.push(Recovered { seq, payload });
        }
        Outcome::Done
    }
}

/// Checks that the bytes past a rebuilt packet's length are zero, as the
/// encoder's padding was, and cuts them off. Nonzero padding means the
/// inputs were not what the encoder coded, so nothing is reported.
fn strip_padding(mut padded: Vec<u8>, len: u16) -> Option<Vec<u8>> {
    let len = usize::from(len);
    if padded.get(len..)?.iter().any(|&b| b != 0) {
        return None;
    }
    padded.truncate(len);
    Some(padded)
}

/// XOR group with one missing packet: the parity XOR every present packet.
fn solve_xor(window: &Window, group: &Pending) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut acc = group.parities.first()?.as_ref()?.clone();
    let mut target = None;
    for (i, &seq) in group.seqs.iter().enumerate() {
        match window.get(seq) {
            Some(data) => xor_into(acc.get_mut(..data.len())?, data),
            None if target.is_none() => target = Some(i),
            None => return None,
        }
    }
    let i = target?;
    let payload = strip_padding(acc, *group.lens.get(i)?)?;
    Some(vec![(group.seqs[i], payload)])
}

/// RS group with no more missing packets than parities: rebuild them all.
fn solve_rs(window: &Window, codecs: &mut CodecCache, group: Pending) -> Option<Vec<(u64, Vec<u8>)>> {
    let shard_len = crate::wire::padded_len(&group.lens);
    let mut shards: Vec<Option<Vec<u8>>> = group
        .seqs
        .iter()
        .map(|&seq| {
            window.get(seq).map(|data| {
                let mut shard = Vec::with_capacity(shard_len);
                shard.extend_from_slice(data);
                shard.resize(shard_len, 0);
                shard
            })
        })
        .collect();
    let missing: Vec<usize> = (0..shards.len()).filter(|&i| shards[i].is_none()).collect();
    shards.extend(group.parities);
    reconstruct(codecs, &mut shards).ok()?;
    let mut rebuilt = Vec::with_capacity(missing.len());
    for i in missing {
        let shard = shards.get_mut(i)?.take()?;
        rebuilt.push((group.seqs[i], strip_padding(shard, group.lens[i])?));
    }
    Some(rebuilt)
}
