//! The replica store against an in-memory model of the volume, with crashes.
//!
//! A case is a random sequence of steps: batches of block-aligned writes
//! (4 KiB..256 KiB, data, discard or write-zeroes, heavily overlapping on a
//! 2 MiB volume), committed by the committer thread or inline by the
//! appending thread, and crashes. The log is `LOG_MIN_BYTES` (4 MiB), so a case
//! wraps it and takes checkpoints several times.
//!
//! # What a crash is
//!
//! `Store` has no way to stop without draining, so a crash is a copy of the
//! replica's files taken while the committer may still be writing: after a
//! batch is appended, the test waits until `durable_seq()` reaches some seq
//! S of the batch (S is acknowledged), then copies the superblock, then the
//! log, then the data file, and appends nothing until the copy is done.
//!
//! Why that order is a state a real crash could leave:
//! - the superblock copy names a checkpoint C and log tail T; every write
//!   <= C was applied to the data file before that superblock was written,
//!   so the later data copy holds them;
//! - the log from T holds records C+1..S intact: they were written before S
//!   was published, and the log only reuses space behind the in-memory tail,
//!   which never passes the persisted one; with no appends during the copy
//!   nothing newer can claim that space;
//! - the data copy may hold any writes up to the last appended seq L, torn
//!   mid-copy even, exactly like unsynced pages after a power cut.
//!
//! On top of that a crash may lose data-file pages written since the
//! checkpoint (they are put back to the model at C, as if never written
//! back) and may tear the log tail (random bytes overwritten anywhere after
//! record S, up to the tail).
//!
//! # What must hold after reopening the crash image
//! - durable seq D with S <= D <= L;
//! - every byte equals the model at D, or else the value some write in
//!   D+1..=L put there (a later write that reached the data file; the host
//!   retransmits D+1..=L, and the test does the same before going on).
//!
//! At the end of a case the store shuts down cleanly and reopens, and must
//! then hold exactly the model at L.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use starblk_replica::history::History as HostHistory;
use starblk_replica::log::{self, Decoded, RecordHeader, LOG_MIN_BYTES, REC_HEADER_BYTES};
use starblk_replica::proto::WriteOp;
use starblk_replica::store::{self, Paths, Store};
use starblk_replica::superblock::Superblock;

const BLOCK: u64 = 4096;
const VOLUME_BLOCKS: u64 = 512;
const VOLUME: u64 = VOLUME_BLOCKS * BLOCK;
/// Largest write: 64 blocks (256 KiB).
const MAX_WRITE_BLOCKS: u64 = 64;

// ---- the generated program ---------------------------------------------

#[derive(Debug, Clone)]
struct WriteSpec {
    offset_blocks: u64,
    len_blocks: u64,
    op: WriteOp,
}

#[derive(Debug, Clone)]
enum Step {
    /// Append these writes in seq order. With `inline`, the test thread
    /// commits after each append (`Store::commit_pending`, as a session does
    /// when its input runs dry), racing the committer thread's checkpoints;
    /// otherwise the committer thread groups them.
    Writes { writes: Vec<WriteSpec>, inline: bool },
    /// Wait until `ack_permille` of the writes since the last crash are
    /// durable, then take a crash image and continue from it.
    Crash {
        ack_permille: u16,
        /// Data-file blocks that lose their writes since the checkpoint.
        lost_blocks: Vec<u64>,
        /// Log bytes after the last acknowledged record to overwrite:
        /// (distance from the record's end, length, byte).
        torn: Vec<(u64, u16, u8)>,
    },
}

fn write_spec() -> impl Strategy<Value = WriteSpec> {
    let op = prop_oneof![6 => Just(WriteOp::Data), 1 => Just(WriteOp::Discard), 1 => Just(WriteOp::WriteZeroes)];
    (1..=MAX_WRITE_BLOCKS, 0..VOLUME_BLOCKS, op).prop_map(|(len_blocks, off, op)| WriteSpec {
        offset_blocks: off % (VOLUME_BLOCKS - len_blocks + 1),
        len_blocks,
        op,
    })
}

fn step() -> impl Strategy<Value = Step> {
    let crash = (
        0u16..=1000,
        prop::collection::vec(0..VOLUME_BLOCKS, 0..24),
        prop::option::weighted(
            0.5,
            prop::collection::vec(
                // Mostly just past the last acknowledged record.
                (prop_oneof![3 => 0u64..8192, 1 => 0u64..LOG_MIN_BYTES], 1u16..=4096, any::<u8>()),
                1..4,
            ),
        ),
    )
        .prop_map(|(ack_permille, lost_blocks, torn)| Step::Crash {
            ack_permille,
            lost_blocks,
            torn: torn.unwrap_or_default(),
        });
    let writes = (prop::collection::vec(write_spec(), 1..16), any::<bool>())
        .prop_map(|(writes, inline)| Step::Writes { writes, inline });
    prop_oneof![3 => writes, 1 => crash]
}

// ---- the model -----------------------------------------------------------

/// One write as appended: its record and data (empty unless `Data`).
struct Applied {
    h: RecordHeader,
    data: Vec<u8>,
}

impl Applied {
    fn range(&self) -> std::ops::Range<usize> {
        self.h.offset as usize..(self.h.offset + u64::from(self.h.len)) as usize
    }
    /// The byte this write leaves at volume offset `at` (inside its range).
    fn byte_at(&self, at: usize) -> u8 {
        match self.h.op {
            WriteOp::Data => self.data[at - self.h.offset as usize],
            WriteOp::Discard | WriteOp::WriteZeroes => 0,
        }
    }
}

/// Every write so far; `history[i]` has seq `i + 1`.
#[derive(Default)]
struct History(Vec<Applied>);

impl History {
    fn last_seq(&self) -> u64 {
        self.0.len() as u64
    }

    fn push(&mut self, w: &WriteSpec) -> &Applied {
        let seq = self.last_seq() + 1;
        let len = w.len_blocks * BLOCK;
        let data = if w.op == WriteOp::Data { pattern(seq, len as usize) } else { Vec::new() };
        let h = RecordHeader { seq, offset: w.offset_blocks * BLOCK, len: len as u32, op: w.op, epoch: 1 };
        self.0.push(Applied { h, data });
        self.0.last().expect("just pushed")
    }

    /// The volume after writes 1..=seq.
    fn model_at(&self, seq: u64) -> Vec<u8> {
        let mut v = vec![0u8; VOLUME as usize];
        for w in &self.0[..seq as usize] {
            let r = w.range();
            match w.h.op {
                WriteOp::Data => v[r].copy_from_slice(&w.data),
                WriteOp::Discard | WriteOp::WriteZeroes => v[r].fill(0),
            }
        }
        v
    }

    /// Checks the change map: every 64 KiB region's mark is at least the
    /// seq of the last write <= `d` that touched it (a lower mark would
    /// let an incremental recovery skip a written region), and no mark is
    /// above `last` (nothing past what was appended).
    fn check_marks(&self, store: &Store, d: u64, last: u64) -> Result<(), String> {
        let mut want = vec![0u64; (VOLUME >> 16) as usize];
        for w in &self.0[..d as usize] {
            for r in w.h.offset >> 16..=(w.h.offset + u64::from(w.h.len) - 1) >> 16 {
                want[r as usize] = w.h.seq;
            }
        }
        for (r, want) in want.iter().enumerate() {
            let got = store.changes().get(r as u64).map_err(|e| e.to_string())?;
            if got < *want || got > last {
                return Err(format!("region {r} has mark {got}; its last write <= {d} is seq {want} (last {last})"));
            }
        }
        Ok(())
    }

    /// Checks a crash-recovered volume: each byte is the model's at `d`, or
    /// what a write in d+1..=last put there. Returns the first violation.
    fn check_recovered(&self, got: &[u8], d: u64) -> Result<(), String> {
        let want = self.model_at(d);
        let later = &self.0[d as usize..];
        for b in 0..VOLUME_BLOCKS as usize {
            let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
            if got[r.clone()] == want[r.clone()] {
                continue;
            }
            let touching: Vec<&Applied> =
                later.iter().filter(|w| w.range().start < r.end && r.start < w.range().end).collect();
            for at in r {
                if got[at] == want[at] || touching.iter().any(|w| w.range().contains(&at) && w.byte_at(at) == got[at]) {
                    continue;
                }
                return Err(format!(
                    "byte {at} (block {b}) is {:#04x}; the model at durable seq {d} has {:#04x} and no write in {}..={} \
                     put {:#04x} there",
                    got[at],
                    want[at],
                    d + 1,
                    self.last_seq(),
                    got[at]
                ));
            }
        }
        Ok(())
    }
}

/// Data for write `seq`: pseudo-random, so bytes from different writes
/// differ and a byte from the wrong write is noticed.
fn pattern(seq: u64, len: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---- store plumbing ------------------------------------------------------

struct Open {
    store: Arc<Store>,
    committer: JoinHandle<()>,
}

impl Open {
    fn start(dir: &Path) -> Open {
        let (store, committer) = Store::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
        // The records carry epoch 1: follow the history of that host.
        store.adopt(1, &HostHistory::new().branch(1, 0), u64::MAX).unwrap();
        Open { store, committer }
    }

    /// Drains and stops the committer (a clean shutdown).
    fn close(self) {
        self.store.shutdown();
        self.committer.join().expect("committer thread panicked");
        assert!(self.store.failure().is_none(), "store failed: {:?}", self.store.failure());
    }

    fn wait_durable(&self, seq: u64) {
        let start = Instant::now();
        while self.store.durable_seq() < seq {
            assert!(self.store.failure().is_none(), "store failed: {:?}", self.store.failure());
            assert!(start.elapsed() < Duration::from_secs(30), "seq {seq} never became durable");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn volume(&self) -> Vec<u8> {
        let mut v = vec![0u8; VOLUME as usize];
        self.store.read(0, &mut v).expect("read volume");
        v
    }
}

fn append(o: &Open, w: &Applied) {
    o.store.append(1, &w.h, &w.data).unwrap_or_else(|e| panic!("append seq {}: {e}", w.h.seq));
}

/// Whole-file copy with plain reads, so a write racing with it may be seen
/// half done, as after a power cut.
fn copy_file(from: &Path, to: &Path) {
    let bytes = std::fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    std::fs::write(to, bytes).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
}

/// Where record `seq` ends in a log image, walking from the superblock's
/// tail; also proves that every record up to `seq` is in the image.
fn record_end(log_img: &[u8], sb: &Superblock, seq: u64) -> Result<u64, String> {
    let size = log_img.len() as u64;
    let (mut pos, mut expect) = (sb.log_tail_offset, sb.checkpoint_seq + 1);
    while expect <= seq {
        if size - pos < REC_HEADER_BYTES as u64 {
            pos = 0;
            continue;
        }
        let hb = &log_img[pos as usize..pos as usize + REC_HEADER_BYTES];
        match log::decode_header(hb) {
            Ok(Decoded::Wrap(s, _)) if s == expect => pos = 0,
            Ok(Decoded::Record(h, crc)) if h.seq == expect => {
                let end = pos + (REC_HEADER_BYTES + h.data_bytes()) as u64;
                let data = &log_img[(pos as usize + REC_HEADER_BYTES)..end as usize];
                log::verify(hb, crc, data).map_err(|e| format!("acknowledged record {expect}: {e}"))?;
                pos = end % size;
                expect += 1;
            }
            other => return Err(format!("acknowledged record {expect} missing at log offset {pos}: {other:?}")),
        }
    }
    Ok(pos)
}

/// Counters a run reports, so a test can see it exercised what it meant to.
#[derive(Debug, Default)]
struct Stats {
    crashes: usize,
    /// Crashes copied while the committer still had unacknowledged writes.
    racing_copies: usize,
    torn_tails: usize,
    lost_pages: usize,
    inline_commits: usize,
    /// Log bytes appended; divided by the log size, the number of laps.
    log_bytes: u64,
    checkpoints_seen: usize,
    max_replayed: u64,
}

/// Runs one program; panics with a description on any violation.
fn run(steps: &[Step]) -> Stats {
    let root = tempfile::tempdir().expect("temp dir");
    let mut stats = Stats::default();
    let mut generation = 0;
    let mut dir = root.path().join("r0");
    store::init(&dir, VOLUME, LOG_MIN_BYTES).expect("init");
    let mut o = Open::start(&dir);
    let mut hist = History::default();
    let mut since_crash = 0;
    let mut last_checkpoint = 0;

    for step in steps {
        match step {
            Step::Writes { writes, inline } => {
                for w in writes {
                    let a = hist.push(w);
                    stats.log_bytes += (REC_HEADER_BYTES + a.data.len()) as u64;
                    append(&o, a);
                    if *inline {
                        o.store.commit_pending();
                        stats.inline_commits += 1;
                    }
                }
                let cp = o.store.superblock().checkpoint_seq;
                if cp != last_checkpoint {
                    stats.checkpoints_seen += 1;
                    last_checkpoint = cp;
                }
            }
            Step::Crash { ack_permille, lost_blocks, torn } => {
                let last = hist.last_seq();
                let s = since_crash + (last - since_crash) * u64::from(*ack_permille) / 1000;
                o.wait_durable(s);
                // The crash image: superblock, log, data, in that order.
                generation += 1;
                let copy = root.path().join(format!("r{generation}"));
                std::fs::create_dir(&copy).expect("mkdir");
                let (src, dst) = (Paths::new(&dir), Paths::new(&copy));
                copy_file(&src.superblock, &dst.superblock);
                // Marks up to the superblock's checkpoint were synced before
                // it was written; later ones may or may not be there.
                copy_file(&src.changes, &dst.changes);
                copy_file(&src.log, &dst.log);
                copy_file(&src.data, &dst.data);
                if o.store.durable_seq() < last {
                    stats.racing_copies += 1;
                }
                stats.crashes += 1;
                // The original may drain now; it is never looked at again.
                o.close();
                std::fs::remove_dir_all(&dir).expect("remove old replica");

                let sb = Superblock::read(&std::fs::File::open(&dst.superblock).expect("open sb copy"))
                    .expect("crash image superblock");
                let mut log_img = std::fs::read(&dst.log).expect("read log copy");
                let end_s = record_end(&log_img, &sb, s).unwrap_or_else(|e| panic!("crash image after ack {s}: {e}"));

                if !torn.is_empty() {
                    // Only bytes between record S's end and the tail may be
                    // hit: before S they are acknowledged, after the tail
                    // they are checkpointed and no longer read.
                    let size = log_img.len() as u64;
                    let tail = sb.log_tail_offset;
                    let free = if s <= sb.checkpoint_seq { size } else { (tail + size - end_s) % size };
                    let free = if free == 0 { size } else { free };
                    for &(dist, len, byte) in torn {
                        let dist = dist % free;
                        let len = u64::from(len).min(free - dist);
                        for i in 0..len {
                            let at = ((end_s + dist + i) % size) as usize;
                            log_img[at] = byte;
                        }
                    }
                    std::fs::write(&dst.log, &log_img).expect("write torn log");
                    stats.torn_tails += 1;
                }
                if !lost_blocks.is_empty() {
                    // Pages written since the checkpoint never reached the disk.
                    let at_checkpoint = hist.model_at(sb.checkpoint_seq);
                    let data = std::fs::OpenOptions::new().write(true).open(&dst.data).expect("open data copy");
                    for &b in lost_blocks {
                        let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                        data.write_all_at(&at_checkpoint[r], b * BLOCK).expect("roll back block");
                    }
                    stats.lost_pages += lost_blocks.len();
                }

                dir = copy;
                o = Open::start(&dir);
                let d = o.store.durable_seq();
                assert!(d >= s, "crash after seq {s} was acknowledged, but the replica reopened at {d}");
                assert!(d <= last, "replica reopened at {d}, past the last write {last}");
                assert_eq!(o.store.superblock().durable_seq, d, "reopen must record its durable seq");
                stats.max_replayed = stats.max_replayed.max(d - sb.checkpoint_seq);
                if let Err(e) = hist.check_recovered(&o.volume(), d) {
                    panic!("after a crash at ack {s} (checkpoint {}, reopened at {d}): {e}", sb.checkpoint_seq);
                }
                if let Err(e) = hist.check_marks(&o.store, d, last) {
                    panic!("after a crash at ack {s} (checkpoint {}, reopened at {d}): {e}", sb.checkpoint_seq);
                }
                // The host retransmits what the replica lost.
                for w in &hist.0[d as usize..] {
                    append(&o, w);
                }
                since_crash = last;
            }
        }
    }

    let last = hist.last_seq();
    o.wait_durable(last);
    o.close();
    let o = Open::start(&dir);
    assert_eq!(o.store.durable_seq(), last, "clean restart lost writes");
    if let Err(e) = hist.check_marks(&o.store, last, last) {
        panic!("after a clean restart: {e}");
    }
    let got = o.volume();
    let want = hist.model_at(last);
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("after a clean restart byte {at} is {:#04x}, the model has {:#04x}", got[at], want[at]);
    }
    o.close();
    stats
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

proptest! {
    // 48 cases keep the run near 20 s; PROPTEST_CASES=500 for a longer hunt.
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Random writes with crash images, torn log tails and lost pages.
    #[test]
    fn store_matches_model_across_crashes(steps in prop::collection::vec(step(), 1..24)) {
        run(&steps);
    }
}

/// A fixed program long enough to wrap the log several times, with every
/// kind of crash: checks that the random test's machinery really reaches
/// wraps, checkpoints, torn tails and lost pages.
#[test]
fn long_run_wraps_the_log_and_survives_every_crash_kind() {
    let mut steps = Vec::new();
    for round in 0..12u64 {
        let ws = (0..10)
            .map(|i| WriteSpec {
                offset_blocks: (round * 37 + i * 53) % (VOLUME_BLOCKS - MAX_WRITE_BLOCKS),
                len_blocks: 1 + (round * 7 + i * 13) % MAX_WRITE_BLOCKS,
                op: match (round + i) % 8 {
                    6 => WriteOp::Discard,
                    7 => WriteOp::WriteZeroes,
                    _ => WriteOp::Data,
                },
            })
            .collect();
        steps.push(Step::Writes { writes: ws, inline: round % 3 == 2 });
        steps.push(Step::Crash {
            ack_permille: [0, 300, 700, 1000][round as usize % 4],
            lost_blocks: if round % 3 == 1 { (0..VOLUME_BLOCKS).step_by(5).collect() } else { Vec::new() },
            torn: if round % 2 == 0 { vec![(0, 4096, 0xa5), (9000, 100, 0)] } else { Vec::new() },
        });
    }
    let stats = run(&steps);
    eprintln!("{stats:?}");
    assert_eq!(stats.crashes, 12);
    assert!(stats.log_bytes > 2 * LOG_MIN_BYTES, "the log never wrapped twice: {stats:?}");
    assert!(stats.checkpoints_seen > 0, "no checkpoint seen: {stats:?}");
    assert!(stats.torn_tails > 0 && stats.lost_pages > 0 && stats.inline_commits > 0);
}
