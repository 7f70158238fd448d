//! A failing disk under the store (docs/semantics.md §3, §12), with the fault
//! injection of `starblk_replica::disk`.
//!
//! Once a group commit fails, no later batch may commit or publish a
//! durable seq: the failed batch is a hole in the log and in the data file,
//! and a durable seq past it would claim writes the replica does not hold
//! (and, after a restart, one it could not reach again). A batch is durable
//! (and acked) once it is in the log, before it is applied: if its apply
//! fails, it stays durable, and the failed store refuses reads rather than
//! return the data file's older data; a restart replays it. The server then
//! refuses every frame that needs a working store with a `DiskError` that
//! carries the reason, and still answers Stats.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starblk_replica::client;
use starblk_replica::disk::{Effect, Fault, FaultOp, FaultPlan, FileKind, Trigger};
use starblk_replica::history::History;
use starblk_replica::log::{RecordHeader, LOG_MIN_BYTES};
use starblk_replica::proto::{self, ErrorCode, FrameType, Hello, WriteHeader, WriteOp};
use starblk_replica::store::{self, AckSink, Store, StoreError};

/// Bytes per record: 16 KiB, at its own offset (record `seq` covers block
/// `seq - 1`), so the data file shows exactly which seqs were applied.
const REC: usize = 16 * 1024;
/// Volume size: room for every record of the stream test.
const VOLUME: u64 = 16 << 20;
/// How long an injected fault stalls the failing commit, so that the
/// appends of the next batch land while it runs (as on a real disk, where
/// EIO comes after the drive's retries).
const STALL: Duration = Duration::from_millis(300);

fn rec(seq: u64) -> (RecordHeader, Vec<u8>) {
    let h = RecordHeader { seq, offset: (seq - 1) * REC as u64, len: REC as u32, op: WriteOp::Data, epoch: 1 };
    (h, payload(seq))
}

fn payload(seq: u64) -> Vec<u8> {
    let mut d = vec![seq as u8; REC];
    d[..8].copy_from_slice(&seq.to_le_bytes());
    d
}

/// Every durable seq the store reported through its ack sink.
#[derive(Default)]
struct Acks(Mutex<Vec<u64>>);

impl AckSink for Acks {
    fn durable(&self, seq: u64) {
        self.0.lock().unwrap().push(seq);
    }
    fn epoch(&self) -> u64 {
        1
    }
}

impl Acks {
    fn max(&self) -> u64 {
        self.0.lock().unwrap().iter().copied().max().unwrap_or(0)
    }
}

/// Seqs `1..=upto` whose block a read returns without their data. A read
/// may be refused only by a failed store that has not applied everything
/// it reported durable (`Store::read` waits for that, and fails with it).
fn holes(s: &Store, upto: u64) -> Vec<u64> {
    let mut buf = vec![0u8; REC];
    (1..=upto)
        .filter(|&seq| match s.read((seq - 1) * REC as u64, &mut buf) {
            Ok(()) => buf != payload(seq),
            Err(StoreError::Failed(_)) if s.applied_through() < s.durable_seq() => false,
            Err(e) => panic!("read of seq {seq}: {e}"),
        })
        .collect()
}

/// Waits (up to 10 s) for the store to fail.
fn wait_failed(s: &Store) {
    let t0 = Instant::now();
    while s.failure().is_none() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `seq` to be durable (the committer may have taken the batch,
/// and then `commit_pending` does not wait for it).
fn wait_durable(s: &Store, seq: u64) {
    let t0 = Instant::now();
    while s.durable_seq() < seq {
        assert!(t0.elapsed() < Duration::from_secs(10), "seq {seq} never became durable");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn open(dir: &std::path::Path) -> (Arc<Store>, std::thread::JoinHandle<()>, Arc<Acks>) {
    let (s, h) = Store::open_with_faults(dir, FaultPlan::new()).unwrap();
    // The records carry epoch 1: follow the history of that host.
    s.adopt(1, &History::new().branch(1, 0), u64::MAX).unwrap();
    let acks = Arc::new(Acks::default());
    s.set_ack_sink(Some(acks.clone()));
    (s, h, acks)
}

/// Checks what must hold once the store failed, with `reported` the
/// highest durable seq it ever reported, then reopens it without faults
/// and checks the restart. Returns every violation.
fn check_failed_store(
    dir: &std::path::Path,
    s: Arc<Store>,
    h: std::thread::JoinHandle<()>,
    acks: &Acks,
    next: u64,
) -> Vec<String> {
    let mut bad = Vec::new();
    // Whatever the committer would still do, let it.
    std::thread::sleep(Duration::from_millis(100));
    let durable = s.durable_seq();
    let reported = acks.max().max(durable);
    if s.failure().is_none() {
        bad.push("the store did not fail".to_string());
    }
    match s.append(1, &rec(next).0, &rec(next).1) {
        Err(StoreError::Failed(_)) => {}
        other => bad.push(format!("append after the failure returned {other:?}, not Failed")),
    }
    let h1 = holes(&s, durable);
    if !h1.is_empty() {
        bad.push(format!("durable seq {durable} published past a hole: seqs {h1:?} are not in the data file"));
    }
    s.shutdown();
    h.join().unwrap();
    drop(s);
    let (s, _h, _) = open(dir);
    let after = s.durable_seq();
    if after < reported {
        bad.push(format!("after reopening, durable seq {after} is below the {reported} reported before"));
    }
    let h2 = holes(&s, after);
    if !h2.is_empty() {
        bad.push(format!("after reopening, durable seq {after} has holes: seqs {h2:?}"));
    }
    bad
}

/// Seqs 1..=8 commit; then `fault` (with a stall) hits the commit of
/// 9..=16 while 17..=24 are appended; then the appending session ends its
/// burst with `commit_pending`, as the server does (the committer thread
/// may run the commits, so the test waits for the failure). Nothing past
/// `durable` may become durable before the restart: 8 when the log write
/// fails, 16 when the batch reached the log and its apply failed.
fn failed_commit_with_next_batch_waiting(fault: Fault, durable: u64) {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), VOLUME, LOG_MIN_BYTES).unwrap();
    let (s, h, acks) = open(dir.path());
    for seq in 1..=8 {
        let (hd, d) = rec(seq);
        s.append_deferred(1, &hd, &d, None).unwrap();
    }
    s.commit_pending();
    wait_durable(&s, 8);
    // Acked before applied: a data-file fault must hit the next batch.
    s.wait_applied(8, Duration::from_secs(10), None).unwrap();

    s.faults().arm(fault.delay(STALL));
    let s2 = s.clone();
    let failing = std::thread::spawn(move || {
        for seq in 9..=16 {
            let (hd, d) = rec(seq);
            s2.append_deferred(1, &hd, &d, None).unwrap();
        }
        s2.commit_pending();
    });
    let t0 = Instant::now();
    while s.faults().hits() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "fault {fault} never fired");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The failing commit is stalled in the fault: these go into the next batch.
    for seq in 17..=24 {
        let (hd, d) = rec(seq);
        s.append_deferred(1, &hd, &d, None).unwrap();
    }
    failing.join().unwrap();
    s.commit_pending();
    wait_failed(&s);

    let mut bad = Vec::new();
    if s.durable_seq() != durable {
        bad.push(format!("durable seq is {} after the failed commit of 9..=16, not {durable}", s.durable_seq()));
    }
    if acks.max() > durable {
        bad.push(format!("acked seq {} past {durable} (the failed batch 9..=16)", acks.max()));
    }
    bad.extend(check_failed_store(dir.path(), s, h, &acks, 25));
    assert!(bad.is_empty(), "fault {fault}:\n  {}", bad.join("\n  "));
}

#[test]
fn log_write_eio_stops_later_batches() {
    failed_commit_with_next_batch_waiting(Fault::new(FileKind::Log, FaultOp::Write, Trigger::Nth(1), Effect::Eio), 8);
}

#[test]
fn torn_log_write_stops_later_batches() {
    failed_commit_with_next_batch_waiting(Fault::new(FileKind::Log, FaultOp::Write, Trigger::Nth(1), Effect::Torn), 8);
}

#[test]
fn log_fdatasync_eio_stops_later_batches() {
    failed_commit_with_next_batch_waiting(Fault::new(FileKind::Log, FaultOp::Sync, Trigger::Nth(1), Effect::Eio), 8);
}

#[test]
fn data_file_enospc_during_apply_stops_later_batches() {
    let fault = Fault::new(FileKind::Data, FaultOp::Write, Trigger::Nth(3), Effect::Enospc);
    failed_commit_with_next_batch_waiting(fault, 16);
}

/// A session-like stream: one thread appends (waking the committer, which
/// commits batches meanwhile) until the store refuses, then ends the
/// session with `commit_pending`, as the server does. The log write that
/// crosses 1 MiB fails, on the committer thread.
#[test]
fn stream_of_appends_never_passes_a_failed_log_write() {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), VOLUME, LOG_MIN_BYTES).unwrap();
    let (s, h, acks) = open(dir.path());
    s.faults().arm("log:write:after=1MiB:eio:delay=300".parse().unwrap());
    let mut next = 1;
    let refused = loop {
        assert!(next <= VOLUME / REC as u64, "the store never failed");
        let (hd, d) = rec(next);
        match s.append(1, &hd, &d) {
            Ok(()) => next += 1,
            Err(e) => break e,
        }
        // Paced like a client at a modest rate, so the committer takes
        // many small batches rather than one.
        std::thread::sleep(Duration::from_micros(200));
    };
    assert!(matches!(refused, StoreError::Failed(_)), "{refused}");
    // The session ends: it commits what it appended, as the server does.
    s.commit_pending();
    let mut bad = Vec::new();
    // The fault hit the log write crossing 1 MiB: that batch started at or
    // before the record holding byte 1 MiB.
    let limit = (1 << 20) / (REC as u64 + 40) + 1;
    if s.durable_seq() > limit || acks.max() > limit {
        bad.push(format!(
            "durable seq {} / acked {} past the failed batch (which starts at or before seq {limit})",
            s.durable_seq(),
            acks.max()
        ));
    }
    bad.extend(check_failed_store(dir.path(), s, h, &acks, next));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The server refuses Hello (plain and probe), Write, SetEpoch and Replay
/// once the store failed, with `DiskError` and the failure reason; Stats
/// still answers and shows the failure.
#[test]
fn server_refuses_sessions_on_a_failed_store_but_answers_stats() {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), VOLUME, LOG_MIN_BYTES).unwrap();
    let handle = starblk_replica::server::spawn(dir.path(), "127.0.0.1:0").unwrap();
    let addr = handle.addr.to_string();
    let volume = [9u8; 16];
    let st = proto::Stamp { volume, size_bytes: VOLUME, block_size: 4096, epoch: 1, members: Default::default() };
    client::stamp(&addr, &st, Duration::from_secs(5)).unwrap();
    let store = handle.server.store().clone();
    store.faults().arm(Fault::new(FileKind::Log, FaultOp::Write, Trigger::Nth(2), Effect::Eio));

    let timeout = Duration::from_secs(5);
    let mut sess = client::connect(&addr, Hello { volume, epoch: 1, flags: 0 }, timeout).unwrap();
    let adopt = proto::Adopt { last_seq: 0, history: History::new().branch(1, 0) };
    sess.call(FrameType::Adopt, &[&adopt.encode()], FrameType::Ack).unwrap();
    // A write per frame burst; the second commit fails and the session is
    // refused at its next write (or earlier, at a heartbeat).
    let mut refusal = None;
    for seq in 1..=50u64 {
        let wh = WriteHeader { seq, offset: 0, len: 4096, op: WriteOp::Data, epoch: 1 };
        if sess.send(FrameType::Write, &[&wh.encode(), &[seq as u8; 4096]]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        if store.failure().is_some() {
            let _ = sess.send(FrameType::Heartbeat, &[&proto::encode_u64(1)]);
            let wh = WriteHeader { seq: seq + 1, offset: 0, len: 4096, op: WriteOp::Data, epoch: 1 };
            let _ = sess.send(FrameType::Write, &[&wh.encode(), &[0; 4096]]);
            refusal = Some(loop {
                match client::expect(&mut sess.reader, &addr, FrameType::Error) {
                    Ok(p) => break proto::ErrorFrame::decode(&p).unwrap(),
                    Err(client::ClientError::Unexpected { .. }) => continue,
                    Err(e) => panic!("no Error frame on the failed store: {e}"),
                }
            });
            break;
        }
    }
    let failure = store.failure().expect("the store did not fail");
    let refusal = refusal.expect("session not refused");
    assert_eq!(refusal.code, ErrorCode::DiskError, "{refusal:?}");
    assert!(refusal.message.contains(&failure), "{refusal:?} lacks the reason {failure:?}");

    for (flags, what) in [(0, "hello"), (proto::HELLO_PROBE, "probe hello")] {
        match client::connect(&addr, Hello { volume, epoch: 1, flags }, timeout) {
            Err(client::ClientError::Rejected { frame, .. }) => {
                assert_eq!(frame.code, ErrorCode::DiskError, "{what}: {frame:?}");
                assert!(frame.message.contains(&failure), "{what}: {frame:?} lacks {failure:?}");
                assert!(frame.message.contains("injected fault log:write:nth=2:eio"), "{what}: {frame:?}");
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what} accepted by a failed store"),
        }
    }
    let stats = client::stats(&addr, timeout).unwrap();
    assert_eq!(stats["failure"].as_str(), Some(failure.as_str()), "{stats}");
    handle.stop();
}

/// An injected read error fails that read only; the store goes on.
#[test]
fn read_error_fails_the_read_not_the_store() {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), VOLUME, LOG_MIN_BYTES).unwrap();
    let (s, _h, _) = open(dir.path());
    let (hd, d) = rec(1);
    s.append(1, &hd, &d).unwrap();
    s.commit_pending();
    wait_durable(&s, 1);
    s.faults().arm("data:read:nth=1:eio".parse().unwrap());
    let mut buf = vec![0u8; REC];
    assert!(matches!(s.read(0, &mut buf), Err(StoreError::Io { .. })));
    s.read(0, &mut buf).unwrap();
    assert_eq!(buf, d);
    assert!(s.failure().is_none());
    let (hd, d) = rec(2);
    s.append(1, &hd, &d).unwrap();
}

/// A log read that fails is an error, not the end of the log: replaying
/// only the records before it would restart the replica below the durable
/// seq it reported (§3), and a peer's replay would stop short silently.
#[test]
fn log_read_error_is_an_error_not_the_end_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), VOLUME, LOG_MIN_BYTES).unwrap();
    let (s, h, _) = open(dir.path());
    for seq in 1..=8 {
        let (hd, d) = rec(seq);
        s.append(1, &hd, &d).unwrap();
    }
    wait_durable(&s, 8);
    s.faults().arm("log:read:nth=3:eio".parse().unwrap());
    match s.read_log(1, 8, |_, _| true) {
        Err(StoreError::Io { source, .. }) => assert!(source.to_string().contains("injected"), "{source}"),
        other => panic!("read_log over a failing log returned {other:?}"),
    }
    s.shutdown();
    h.join().unwrap();
    drop(s);

    let plan = FaultPlan::new();
    plan.arm("log:read:nth=3:eio".parse().unwrap());
    match Store::open_with_faults(dir.path(), plan) {
        Err(e) => assert!(e.to_string().contains("log replay") && e.to_string().contains("injected"), "{e}"),
        Ok((s, _)) => panic!("opened over a failing log at durable seq {} (8 were durable)", s.durable_seq()),
    }
    let (s, _h, _) = open(dir.path());
    assert_eq!(s.durable_seq(), 8);
    assert!(holes(&s, 8).is_empty());
}
