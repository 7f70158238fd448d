//! The replica superblock: two checksummed 4 KiB slots in one file.
//!
//! An update writes the slot not holding the newest generation and
//! fdatasyncs it. A torn write damages only that slot; the reader takes the
//! valid slot with the highest generation, so every update is atomic.

use std::fs::File;
use std::io;
use std::path::Path;

use crate::disk::FileIo;
use crate::history::{History, HISTORY_STEPS_MAX};
use crate::proto::Uuid;

/// Bytes per slot.
pub const SLOT_BYTES: usize = 4096;
const SB_MAGIC: u64 = u64::from_le_bytes(*b"SBLKSUPR");
/// Version 5: the slots are laid out as version 4's, but the log's
/// records are checked with XXH3 (`crate::sum`), not crc32c.
const SB_VERSION: u32 = 5;
/// Versions 2 to 4 wrote crc32c log records, which a scan would take for
/// torn ones: such a replica is refused, never opened with an empty log.
const SB_VERSIONS_CRC32C: std::ops::RangeInclusive<u32> = 2..=4;
/// Fixed fields before the history and members blobs.
const FIXED_BYTES: usize = 368;
/// Where the members version and the epoch that made it live.
const MEMBERS_VERSION_AT: usize = 352;
const MEMBERS_EPOCH_AT: usize = 360;
/// Most segments a copy plan keeps.
pub const COPY_SEGMENTS_MAX: usize = 8;
/// Room reserved for the history steps.
const HISTORY_MAX_BYTES: usize = HISTORY_STEPS_MAX * crate::history::STEP_BYTES;
/// Largest members JSON that fits in a slot (the crc takes the last 4 bytes).
pub const MEMBERS_MAX_BYTES: usize = SLOT_BYTES - FIXED_BYTES - HISTORY_MAX_BYTES - 4;

/// One member of the replica set, as stored on every replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Replica name, unique in the volume.
    pub name: String,
    /// HOST:PORT.
    pub addr: String,
    /// local | near | far.
    pub role: String,
    /// Whether the link uses UDP + FEC.
    #[serde(default)]
    pub network_sync: bool,
    /// The link's FEC code as `SCHEME:R:C` (network-sync members only;
    /// `None` takes the default code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fec: Option<String>,
}

/// The persistent state of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every update; picks the newer slot.
    pub generation: u64,
    /// Volume identity; nil until `volume create` stamps it.
    pub volume: Uuid,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Fencing epoch; frames from lower epochs are refused.
    pub epoch: u64,
    /// Size of the circular log file.
    pub log_bytes: u64,
    /// Every write <= this seq is in the data file and fsynced.
    pub checkpoint_seq: u64,
    /// Byte offset in the log where record `checkpoint_seq + 1` starts.
    pub log_tail_offset: u64,
    /// Highest durable seq this replica has reported (lower bound after restart).
    pub durable_seq: u64,
    /// The replica set (authoritative over the config file).
    pub members: Vec<Member>,
    /// Version of `members`: one above the set it replaced
    /// (`crate::members`); 0 before any set was stamped.
    pub members_version: u64,
    /// Epoch of the host that stored `members`.
    pub members_epoch: u64,
    /// The set `members` replaced (`crate::members::Membership::previous`).
    pub members_previous: Vec<Member>,
    /// The history this replica's log follows (`docs/design.md`,
    /// "History"): adopted from the host that admitted it, before that
    /// host's records are appended.
    pub history: History,
    /// log2 of the change map's region size (`changes`).
    pub region_shift: u32,
    /// A recovery copy in progress (`docs/design.md`, "Recovery").
    pub copy: Option<CopyState>,
}

/// Why a replica copies regions from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Regions written since its durable seq.
    Incremental = 1,
    /// Every region ever written (an empty replica).
    Full = 2,
    /// Regions its own diverged tail touched, and those the host's
    /// history wrote since the common prefix.
    Rollback = 3,
}

impl CopyKind {
    /// Decodes the on-disk / on-wire byte.
    pub fn from_u8(v: u8) -> Option<CopyKind> {
        match v {
            1 => Some(CopyKind::Incremental),
            2 => Some(CopyKind::Full),
            3 => Some(CopyKind::Rollback),
            _ => None,
        }
    }
}

impl std::fmt::Display for CopyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyKind::Incremental => "incremental",
            CopyKind::Full => "full",
            CopyKind::Rollback => "rollback",
        })
    }
}

/// One stretch of regions of a copy plan: regions below `end` (and at or
/// above the previous segment's end) are copied if the source's mark is
/// above `since_peer` or this replica's own mark is above `since_local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySegment {
    /// First region past this segment.
    pub end: u64,
    /// Copy regions the source wrote after this seq.
    pub since_peer: u64,
    /// Copy regions this replica wrote after this seq (u64::MAX: none).
    pub since_local: u64,
}

/// A copy in progress, persisted so that it resumes after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyState {
    /// Why it copies.
    pub kind: CopyKind,
    /// The first seq of the live writes this replica's log holds (the
    /// writes before it come from the copy).
    pub live_from: u64,
    /// Every region below this one is done.
    pub cursor: u64,
    /// Bytes copied so far (progress).
    pub done_bytes: u64,
    /// Bytes to copy in all (an estimate from above; progress).
    pub total_bytes: u64,
    /// The plan, in region order; the last one ends at the map's end.
    pub segments: Vec<CopySegment>,
}

/// Bytes 96..352 of a slot: region shift, then the copy state.
const COPY_BYTES: usize = 256;

impl CopyState {
    /// `b`: the 256 bytes at offset 96 of a slot (the region shift is in
    /// its first 4).
    fn encode(&self, b: &mut [u8]) {
        b[4] = self.kind as u8;
        b[5] = self.segments.len() as u8;
        b[8..16].copy_from_slice(&self.live_from.to_le_bytes());
        b[16..24].copy_from_slice(&self.cursor.to_le_bytes());
        b[24..32].copy_from_slice(&self.done_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.total_bytes.to_le_bytes());
        for (i, s) in self.segments.iter().enumerate() {
            let o = 40 + i * 24;
            b[o..o + 8].copy_from_slice(&s.end.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&s.since_peer.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&s.since_local.to_le_bytes());
        }
    }

    /// See [`CopyState::encode`].
    fn decode(b: &[u8]) -> Result<Option<CopyState>, &'static str> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        if b[4] == 0 {
            return if b[5..COPY_BYTES].iter().all(|x| *x == 0) { Ok(None) } else { Err("copy state without a kind") };
        }
        let kind = CopyKind::from_u8(b[4]).ok_or("unknown copy kind")?;
        let n = b[5] as usize;
        if n == 0 || n > COPY_SEGMENTS_MAX {
            return Err("copy segment count out of range");
        }
        let segments: Vec<CopySegment> = (0..n)
            .map(|i| {
                let o = 40 + i * 24;
                CopySegment { end: u64_at(o), since_peer: u64_at(o + 8), since_local: u64_at(o + 16) }
            })
            .collect();
        if segments.windows(2).any(|w| w[1].end <= w[0].end) || segments[0].end == 0 {
            return Err("copy segments out of order");
        }
        let st = CopyState {
            kind,
            live_from: u64_at(8),
            cursor: u64_at(16),
            done_bytes: u64_at(24),
            total_bytes: u64_at(32),
            segments,
        };
        if st.live_from == 0 || st.cursor > st.segments.last().expect("n > 0").end {
            return Err("copy cursor or live seq out of range");
        }
        Ok(Some(st))
    }
}

/// Superblock decode failure.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    /// Reading or writing the file failed.
    #[error("superblock i/o: {0}")]
    Io(#[from] io::Error),
    /// Neither slot holds a valid superblock.
    #[error("no valid superblock slot (slot 0: {0}; slot 1: {1})")]
    NoValidSlot(&'static str, &'static str),
    /// The member list does not fit in a slot.
    #[error("replica set too large for the superblock ({0} bytes, max {MEMBERS_MAX_BYTES})")]
    MembersTooLarge(usize),
}

impl Superblock {
    /// Encodes into one slot image.
    pub fn encode(&self) -> Result<[u8; SLOT_BYTES], SuperblockError> {
        let members = crate::members::encode_blob(&self.members, &self.members_previous);
        if members.len() > MEMBERS_MAX_BYTES {
            return Err(SuperblockError::MembersTooLarge(members.len()));
        }
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(&SB_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&SB_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(&self.volume);
        b[40..48].copy_from_slice(&self.size_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&self.epoch.to_le_bytes());
        b[56..64].copy_from_slice(&self.log_bytes.to_le_bytes());
        b[64..72].copy_from_slice(&self.checkpoint_seq.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_tail_offset.to_le_bytes());
        b[80..88].copy_from_slice(&self.durable_seq.to_le_bytes());
        b[88..92].copy_from_slice(&(members.len() as u32).to_le_bytes());
        let history = self.history.encode();
        debug_assert!(history.len() <= HISTORY_MAX_BYTES, "History bounds its steps");
        b[92..96].copy_from_slice(&(history.len() as u32).to_le_bytes());
        b[96..100].copy_from_slice(&self.region_shift.to_le_bytes());
        if let Some(c) = &self.copy {
            debug_assert!(!c.segments.is_empty() && c.segments.len() <= COPY_SEGMENTS_MAX);
            c.encode(&mut b[96..96 + COPY_BYTES]);
        }
        b[MEMBERS_VERSION_AT..MEMBERS_VERSION_AT + 8].copy_from_slice(&self.members_version.to_le_bytes());
        b[MEMBERS_EPOCH_AT..MEMBERS_EPOCH_AT + 8].copy_from_slice(&self.members_epoch.to_le_bytes());
        b[FIXED_BYTES..FIXED_BYTES + history.len()].copy_from_slice(&history);
        let m = FIXED_BYTES + HISTORY_MAX_BYTES;
        b[m..m + members.len()].copy_from_slice(&members);
        let crc = crc32c::crc32c(&b[..SLOT_BYTES - 4]);
        b[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes one slot image, checking magic, version, crc and every length.
    pub fn decode(b: &[u8]) -> Result<Superblock, &'static str> {
        if b.len() != SLOT_BYTES {
            return Err("short slot");
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        if u64_at(0) == 0 && u64_at(16) == 0 {
            return Err("empty");
        }
        if u64_at(0) != SB_MAGIC {
            return Err("bad magic");
        }
        if u32_at(SLOT_BYTES - 4) != crc32c::crc32c(&b[..SLOT_BYTES - 4]) {
            return Err("bad crc");
        }
        match u32_at(8) {
            SB_VERSION => {}
            v if SB_VERSIONS_CRC32C.contains(&v) => {
                return Err("written by an older starblk (superblock version 2 to 4, crc32c log records, \
                            now XXH3): re-create this replica with `starblk replica init`");
            }
            _ => return Err("unsupported version"),
        }
        let fixed = FIXED_BYTES;
        let region_shift = u32_at(96);
        let copy = CopyState::decode(&b[96..96 + COPY_BYTES])?;
        let members_order = (u64_at(MEMBERS_EPOCH_AT), u64_at(MEMBERS_VERSION_AT));
        let members_len = u32_at(88) as usize;
        if members_len > SLOT_BYTES - fixed - HISTORY_MAX_BYTES - 4 {
            return Err("members length out of range");
        }
        let history_len = u32_at(92) as usize;
        if history_len > HISTORY_MAX_BYTES {
            return Err("history length out of range");
        }
        let history = History::decode(&b[fixed..fixed + history_len]).map_err(|_| "history steps invalid")?;
        let m = fixed + HISTORY_MAX_BYTES;
        let (members, members_previous) =
            crate::members::decode_blob(&b[m..m + members_len]).map_err(|_| "members not valid JSON")?;
        let sb = Superblock {
            block_size: u32_at(12),
            generation: u64_at(16),
            volume: b[24..40].try_into().expect("16"),
            size_bytes: u64_at(40),
            epoch: u64_at(48),
            log_bytes: u64_at(56),
            checkpoint_seq: u64_at(64),
            log_tail_offset: u64_at(72),
            durable_seq: u64_at(80),
            members,
            members_previous,
            members_epoch: members_order.0,
            members_version: members_order.1,
            history,
            region_shift,
            copy,
        };
        sb.check()?;
        Ok(sb)
    }

    /// Range checks that must hold for any superblock we act on.
    fn check(&self) -> Result<(), &'static str> {
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return Err("block size out of range");
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(self.block_size as u64) {
            return Err("size not a positive multiple of block size");
        }
        if self.log_bytes < crate::log::LOG_MIN_BYTES || self.log_tail_offset >= self.log_bytes {
            return Err("log geometry out of range");
        }
        // Recovery scans the log from checkpoint_seq + 1, which must fit
        // (and the copy check below adds 1 to it).
        if self.durable_seq == u64::MAX || self.checkpoint_seq == u64::MAX {
            return Err("durable seq out of range");
        }
        // While a copy runs, the log holds live writes from `live_from`
        // while the durable seq stays at what the replica held before.
        match &self.copy {
            None if self.checkpoint_seq > self.durable_seq => return Err("checkpoint beyond durable seq"),
            Some(c) if self.checkpoint_seq + 1 < c.live_from || self.durable_seq >= c.live_from => {
                return Err("copy state does not match the log")
            }
            _ => {}
        }
        if !(crate::changes::REGION_SHIFT_MIN..=crate::changes::REGION_SHIFT_MAX).contains(&self.region_shift) {
            return Err("region size out of range");
        }
        Ok(())
    }

    /// Reads the newest valid slot of `file`.
    pub fn read<F: FileIo + ?Sized>(file: &F) -> Result<Superblock, SuperblockError> {
        let mut slots = [[0u8; SLOT_BYTES]; 2];
        let mut res: [Result<Superblock, &'static str>; 2] = [Err("unread"), Err("unread")];
        for i in 0..2 {
            match file.read_exact_at(&mut slots[i], (i * SLOT_BYTES) as u64) {
                Ok(()) => res[i] = Superblock::decode(&slots[i]),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => res[i] = Err("short file"),
                Err(e) => return Err(e.into()),
            }
        }
        match (&res[0], &res[1]) {
            (Ok(a), Ok(b)) => Ok(if a.generation >= b.generation { a.clone() } else { b.clone() }),
            (Ok(a), Err(_)) => Ok(a.clone()),
            (Err(_), Ok(b)) => Ok(b.clone()),
            (Err(a), Err(b)) => Err(SuperblockError::NoValidSlot(a, b)),
        }
    }

    /// Applies `change` to a copy, writes it as the next generation, and
    /// only then updates `self`: the cached superblock never runs ahead of
    /// the one on disk, even when the write fails.
    pub fn update<F: FileIo + ?Sized>(
        &mut self,
        file: &F,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<(), SuperblockError> {
        let mut next = self.clone();
        change(&mut next);
        next.write_next(file)?;
        *self = next;
        Ok(())
    }

    /// Writes the next generation into the older slot and fdatasyncs it.
    /// `self` changes only once the write is durable, so a failed update
    /// leaves the in-memory copy equal to what is on disk.
    pub fn write_next<F: FileIo + ?Sized>(&mut self, file: &F) -> Result<(), SuperblockError> {
        let mut next = self.clone();
        next.generation += 1;
        let img = next.encode()?;
        let slot = (next.generation % 2) as usize;
        file.write_all_at(&img, (slot * SLOT_BYTES) as u64)?;
        file.sync_data()?;
        *self = next;
        Ok(())
    }
}

/// Creates a fresh superblock file with both slots written.
pub fn create(path: &Path, sb: &mut Superblock) -> Result<File, SuperblockError> {
    let file = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new().read(true).write(true).create_new(true),
        0o600,
    )
    .open(path)?;
    sb.write_next(&file)?;
    sb.write_next(&file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            generation: 0,
            volume: [7; 16],
            size_bytes: 1 << 30,
            block_size: 4096,
            epoch: 3,
            log_bytes: 1 << 24,
            checkpoint_seq: 10,
            log_tail_offset: 4096,
            durable_seq: 12,
            members: vec![Member {
                name: "a".into(),
                addr: "127.0.0.1:1".into(),
                role: "local".into(),
                network_sync: false,
                fec: None,
            }],
            members_version: 2,
            members_epoch: 3,
            members_previous: Vec::new(),
            history: History::new().branch(2, 0).branch(3, 10),
            region_shift: 16,
            copy: None,
        }
    }

    #[test]
    fn torn_newer_slot_falls_back_to_older() {
        let dir = tempfile::tempdir().unwrap();
        let mut sb = sample();
        let f = create(&dir.path().join("sb"), &mut sb).unwrap();
        sb.epoch = 4;
        sb.write_next(&f).unwrap();
        assert_eq!(Superblock::read(&f).unwrap().epoch, 4);
        // Tear the newest slot: the previous generation must be returned.
        let slot = sb.generation % 2;
        f.write_all_at(&[0xff; 100], slot * SLOT_BYTES as u64 + 30).unwrap();
        let got = Superblock::read(&f).unwrap();
        assert_eq!(got.epoch, 3);
        assert_eq!(got.generation, sb.generation - 1);
    }

    #[test]
    fn copy_state_round_trips_and_crc32c_era_versions_are_refused() {
        let mut sb = sample();
        sb.copy = Some(CopyState {
            kind: CopyKind::Rollback,
            live_from: 13,
            cursor: 5,
            done_bytes: 1 << 20,
            total_bytes: 1 << 22,
            segments: vec![
                CopySegment { end: 5, since_peer: 9, since_local: 9 },
                CopySegment { end: 100, since_peer: 8, since_local: u64::MAX },
            ],
        });
        sb.durable_seq = 9;
        sb.checkpoint_seq = 12;
        let img = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&img), Ok(sb.clone()));
        // A copy state that claims more than its log holds is refused.
        let mut bad = sb.clone();
        bad.durable_seq = 13;
        assert_eq!(Superblock::decode(&bad.encode().unwrap()), Err("copy state does not match the log"));
        // Versions 2 to 4 have crc32c log records: refused, by name.
        for v in SB_VERSIONS_CRC32C {
            let mut old = img;
            old[8..12].copy_from_slice(&v.to_le_bytes());
            let crc = crc32c::crc32c(&old[..SLOT_BYTES - 4]);
            old[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
            let e = Superblock::decode(&old).unwrap_err();
            assert!(e.contains("re-create this replica"), "version {v}: {e}");
        }
    }

    #[test]
    fn a_checkpoint_seq_at_the_top_of_the_range_is_refused_not_overflowed() {
        // Found by fuzz/superblock_decoder: checkpoint_seq + 1 overflowed in
        // the copy-state check.
        let mut sb = sample();
        sb.checkpoint_seq = u64::MAX;
        sb.durable_seq = u64::MAX - 1;
        let img = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&img), Err("durable seq out of range"));
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let mut img = sample().encode().unwrap();
        img[88..92].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&img[..SLOT_BYTES - 4]);
        img[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Superblock::decode(&img), Err("members length out of range"));
    }
}
