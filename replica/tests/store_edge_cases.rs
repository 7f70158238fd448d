//! Store edge cases found while fuzzing and model-testing the replica.
//!
//! A full minimum-size log must never stall the store. The committer checkpoints once the log is half full. With a log of
//! `LOG_MIN_BYTES` a single 1 MiB record, plus the bytes it wastes when it
//! has to wrap, can need more than the free half: the append then waits for
//! space while the committer, seeing the log less than half full, waits for
//! work. This test walks the store into exactly that state (found by reading
//! `Log::append` against `Store::needs_checkpoint`) and requires the append
//! to finish.

use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

use starblk_replica::history::History;
use starblk_replica::log::{LogIo, RecordHeader, LOG_BLOCK_BYTES, LOG_MIN_BYTES};
use starblk_replica::proto::{WriteOp, MAX_IO_BYTES};
use starblk_replica::store::{self, Paths, Store};
use starblk_replica::superblock::{Superblock, SLOT_BYTES};

const BLOCK: u32 = 4096;
const MIB: u64 = 1 << 20;

fn wait_durable(s: &Store, seq: u64) {
    for _ in 0..10_000 {
        if s.durable_seq() >= seq {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("seq {seq} never became durable (durable {})", s.durable_seq());
}

/// Appends `discards` one-block discards, then one data write per entry of
/// `data_blocks`; returns the next seq.
fn append_run(s: &Store, mut seq: u64, discards: usize, data_blocks: &[u32]) -> u64 {
    for _ in 0..discards {
        let h = RecordHeader { seq, offset: 0, len: BLOCK, op: WriteOp::Discard, epoch: 1 };
        s.append(1, &h, &[]).unwrap();
        seq += 1;
    }
    for &blocks in data_blocks {
        let len = blocks * BLOCK;
        let h = RecordHeader { seq, offset: 0, len, op: WriteOp::Data, epoch: 1 };
        s.append(1, &h, &vec![seq as u8; len as usize]).unwrap();
        seq += 1;
    }
    seq
}

#[test]
fn max_size_write_into_a_log_just_under_half_full_completes() {
    // The arithmetic below assumes the geometry of this build.
    assert_eq!(MAX_IO_BYTES as u64, MIB);
    assert_eq!(LOG_MIN_BYTES, 4 * MIB + LOG_BLOCK_BYTES as u64);
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), 4 * MIB, LOG_MIN_BYTES).unwrap();

    // An empty log whose tail is at 1 MiB + 4096. A checkpoint can leave
    // the tail there; writing the superblock directly gets there without
    // depending on when checkpoints run.
    let tail = MIB + LOG_BLOCK_BYTES as u64;
    let sb_path = Paths::new(dir.path()).superblock;
    let sb_file = std::fs::OpenOptions::new().read(true).write(true).open(&sb_path).unwrap();
    let mut sb = Superblock::read(&sb_file).unwrap();
    sb.log_tail_offset = tail;
    sb.write_next(&sb_file).unwrap();
    drop(sb_file);
    let (s, h) = Store::open(dir.path()).unwrap();
    if s.log_io() != LogIo::Direct {
        // Through the page cache an append keeps 40 bytes free, not a
        // block, and in a log of this size no 1 MiB write can then need
        // more than the free half.
        eprintln!("SKIP: the log is written through the page cache here; the stall needs a direct log");
        return;
    }
    s.adopt(1, &History::new().branch(1, 0), u64::MAX).unwrap();
    assert_eq!(s.superblock().log_tail_offset, tail);

    // 104 records holding 511 blocks: 2 MiB + 64 bytes in use, 1984 bytes
    // short of the half-full checkpoint threshold; the head is at
    // 3 MiB + 4160.
    let seq = append_run(&s, 1, 102, &[256, 255]);
    wait_durable(&s, seq - 1);

    // A 1 MiB write must wrap, wasting 1 MiB - 64 bytes, and so needs,
    // with the block a direct log keeps free, 2 MiB + 4072 bytes: more
    // than the free 2 MiB + 4032 until a checkpoint runs.
    let (tx, rx) = mpsc::channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        let r = append_run(&s2, seq, 0, &[256]);
        tx.send(r).ok();
    });
    let done = rx.recv_timeout(Duration::from_secs(20));
    assert!(done.is_ok(), "append of seq {seq} stalled: the log is full and no checkpoint runs");
    wait_durable(&s, seq);
    s.shutdown();
    h.join().unwrap();
}

/// A superblock whose checksum is right but whose seqs are at the top of
/// the range must be refused, not overflow `checkpoint_seq + 1` in replay.
#[test]
fn superblock_with_max_seq_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), 4 * MIB, LOG_MIN_BYTES).unwrap();
    let path = Paths::new(dir.path()).superblock;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut sb = Superblock::read(&file).unwrap();
    sb.checkpoint_seq = u64::MAX;
    sb.durable_seq = u64::MAX;
    sb.generation += 1;
    let img = sb.encode().unwrap();
    assert!(Superblock::decode(&img).is_err());
    for slot in 0..2u64 {
        file.write_all_at(&img, slot * SLOT_BYTES as u64).unwrap();
    }
    drop(file);
    let err = Store::open(dir.path()).err().expect("open must refuse the superblock");
    assert!(err.to_string().contains("durable seq out of range"), "{err}");
}
