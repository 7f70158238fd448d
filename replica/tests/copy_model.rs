//! Recovery copies against a reference, in process: a source store P that
//! holds the host's history, and a store A that recovers from it through
//! `copy::run_with` (P as the source, each region read only when the copy
//! asks for its answer, so P runs ahead of what A has applied).
//!
//! A case is a random program: writes both take, then either A stops while
//! P goes on (incremental), or A takes an old host's tail that P never
//! sees while P takes a new host's writes (rollback); then the copy, with
//! live writes going to P and then to A all along, overlapping the regions
//! being copied (sub-region writes, discards); and maybe an interruption:
//! the copy is cancelled, A is closed and reopened, and the copy resumed,
//! possibly after writes A missed (the host's write queue moved on).
//!
//! Must hold: while A copies it claims no more than the common prefix
//! (its durable seq and history); at the end A's data equals P's byte for
//! byte and its durable seq is P's.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use proptest::prelude::*;
use starblk_replica::client::ClientError;
use starblk_replica::copy::{self, CopyControl, CopyError, CopyReport, CopySource};
use starblk_replica::history::History;
use starblk_replica::log::{RecordHeader, LOG_MIN_BYTES};
use starblk_replica::proto::{Changes, ChangesReply, RegionHeader, RegionRead, WriteOp};
use starblk_replica::store::{self, Store, StoreError};
use starblk_replica::superblock::CopyKind;

const BS: u64 = 4096;
const VOLUME: u64 = 2 << 20;
/// 16 KiB regions: live writes of one to eight blocks cover parts of them.
const SHIFT: u32 = 14;

#[derive(Debug, Clone)]
struct W {
    block: u64,
    blocks: u64,
    op: WriteOp,
}

fn w() -> impl Strategy<Value = W> {
    (0..VOLUME / BS, 1u64..9, 0u8..10).prop_map(|(block, blocks, op)| W {
        block: block.min(VOLUME / BS - blocks),
        blocks,
        op: match op {
            8 => WriteOp::Discard,
            9 => WriteOp::WriteZeroes,
            _ => WriteOp::Data,
        },
    })
}

fn record(seq: u64, epoch: u64, w: &W) -> (RecordHeader, Vec<u8>) {
    let len = w.blocks * BS;
    let h = RecordHeader { seq, offset: w.block * BS, len: len as u32, op: w.op, epoch };
    let data = if w.op == WriteOp::Data {
        (0..len).map(|i| (seq as u8).wrapping_mul(31) ^ (i as u8).wrapping_add(epoch as u8)).collect()
    } else {
        Vec::new()
    };
    (h, data)
}

fn open(dir: &Path) -> (Arc<Store>, JoinHandle<()>) {
    Store::open(dir).expect("open store")
}

fn close(s: Arc<Store>, h: JoinHandle<()>) {
    s.shutdown();
    h.join().unwrap();
    drop(s);
}

fn wait_durable(s: &Store, seq: u64) {
    for _ in 0..10_000 {
        if s.durable_seq() >= seq {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("seq {seq} never became durable (at {})", s.durable_seq());
}

fn wait_applied(s: &Store, seq: u64) {
    s.wait_applied(seq, Duration::from_secs(10), None).expect("applied");
}

/// P as a copy source: a region is read when its answer is taken.
struct Local {
    p: Arc<Store>,
    asked: VecDeque<RegionRead>,
    n: u64,
}

fn io(e: StoreError) -> ClientError {
    ClientError::Io { addr: "local".into(), source: std::io::Error::other(e.to_string()) }
}

impl CopySource for Local {
    fn changes(&mut self, req: &Changes) -> Result<ChangesReply, ClientError> {
        let t = Duration::from_secs(10);
        if req.count_only {
            let count = self.p.count_changed(req.from, req.to, req.since, req.min_seq, t).map_err(io)?;
            return Ok(ChangesReply { next: req.to, count, regions: Vec::new() });
        }
        let (regions, next) =
            self.p.changed_regions(req.from, req.to, req.since, req.max as usize, req.min_seq, t).map_err(io)?;
        Ok(ChangesReply { next, count: regions.len() as u64, regions })
    }
    fn send_region_read(&mut self, r: RegionRead) -> Result<(), ClientError> {
        self.asked.push_back(r);
        Ok(())
    }
    fn recv_region(&mut self) -> Result<(RegionHeader, Vec<u8>), ClientError> {
        let r = self.asked.pop_front().expect("a region was asked for");
        self.n += 1;
        if self.n.is_multiple_of(3) {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.p.read_region(r.region, r.min_seq, Duration::from_secs(10)).map_err(io)
    }
}

struct NoReport;
impl CopyReport for NoReport {
    fn progress(&self, _: u64, _: u64) {}
}

/// Starts A's copy from P on a thread.
fn start_copy(a: &Arc<Store>, p: &Arc<Store>, cancel: &Arc<AtomicBool>) -> JoinHandle<Result<u64, CopyError>> {
    let (a, p, cancel) = (a.clone(), p.clone(), cancel.clone());
    std::thread::spawn(move || {
        let mut src = Local { p, asked: VecDeque::new(), n: 0 };
        let rate = AtomicU64::new(0);
        copy::run_with(&a, &mut src, "local", &rate, &CopyControl::default(), &cancel, &NoReport)
    })
}

#[derive(Debug, Clone)]
struct Case {
    common: Vec<W>,
    diverge: bool,
    a_tail: Vec<W>,
    host_more: Vec<W>,
    live: Vec<W>,
    /// Cancel and reopen A after this many live writes, then let it miss
    /// `skip` writes before it resumes.
    interrupt: Option<(usize, usize)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(w(), 1..40),
        any::<bool>(),
        prop::collection::vec(w(), 1..12),
        prop::collection::vec(w(), 0..40),
        prop::collection::vec(w(), 0..60),
        prop::option::of((0usize..60, 0usize..4)),
    )
        .prop_map(|(common, diverge, a_tail, host_more, live, interrupt)| Case {
            common,
            diverge,
            a_tail,
            host_more,
            live,
            interrupt,
        })
}

fn run(c: &Case) {
    let root = tempfile::tempdir().unwrap();
    let (pd, ad) = (root.path().join("p"), root.path().join("a"));
    for d in [&pd, &ad] {
        store::init_with_regions(d, VOLUME, LOG_MIN_BYTES, SHIFT).unwrap();
    }
    let (p, ph) = open(&pd);
    let (mut a, mut ah) = open(&ad);
    let h1 = History::new().branch(1, 0);
    p.adopt(1, &h1, u64::MAX).unwrap();
    a.adopt(1, &h1, u64::MAX).unwrap();
    let mut seq = 0;
    for x in &c.common {
        seq += 1;
        let (h, d) = record(seq, 1, x);
        p.append(1, &h, &d).unwrap();
        a.append(1, &h, &d).unwrap();
    }
    let common = seq;
    wait_durable(&a, common);
    let (host, epoch) = if c.diverge {
        // An old host's tail on A alone.
        for (i, x) in c.a_tail.iter().enumerate() {
            let (h, d) = record(common + 1 + i as u64, 1, x);
            a.append(1, &h, &d).unwrap();
        }
        wait_durable(&a, common + c.a_tail.len() as u64);
        let host = h1.branch(2, common);
        p.set_epoch(2).unwrap();
        p.adopt(2, &host, common).unwrap();
        a.set_epoch(2).unwrap();
        (host, 2)
    } else {
        (h1.clone(), 1)
    };
    for x in &c.host_more {
        seq += 1;
        let (h, d) = record(seq, epoch, x);
        p.append(epoch, &h, &d).unwrap();
    }
    wait_durable(&p, seq);
    let live_from = seq + 1;
    let st = a.begin_copy(epoch, &host, seq, live_from, CopyKind::Incremental).unwrap();
    assert_eq!(st.kind == CopyKind::Rollback, c.diverge);
    // A claims only what it shares with the host's history.
    assert_eq!(a.durable_seq(), common.min(a.durable_seq()));
    assert!(a.durable_seq() <= common);
    assert_eq!(a.follows(), host);
    let mut cancel = Arc::new(AtomicBool::new(false));
    let mut copier = Some(start_copy(&a, &p, &cancel));
    let mut host_log = std::collections::HashMap::new();
    for (i, x) in c.live.iter().enumerate() {
        if let Some((at, skip)) = c.interrupt.filter(|(at, _)| *at == i) {
            cancel.store(true, std::sync::atomic::Ordering::Release);
            let res = copier.take().unwrap().join().unwrap();
            assert!(matches!(res, Ok(_) | Err(CopyError::Cancelled)), "copy before the interruption: {res:?}");
            close(a, ah);
            // The host's write queue moves on without A.
            for _ in 0..skip {
                seq += 1;
                let (h, d) = record(seq, epoch, x);
                p.append(epoch, &h, &d).unwrap();
                host_log.insert(seq, (h, d));
            }
            (a, ah) = open(&ad);
            cancel = Arc::new(AtomicBool::new(false));
            match a.copy_next() {
                Some(_) => {
                    let next = seq + 1;
                    wait_durable(&p, seq);
                    a.begin_copy(epoch, &host, seq, next, CopyKind::Incremental).unwrap();
                    assert!(a.copying(), "resumed at {at}");
                    // A claims no more than it did before the copy.
                    assert!(a.durable_seq() <= common);
                    copier = Some(start_copy(&a, &p, &cancel));
                }
                None => {
                    // Done before the interruption: the host catches it
                    // up from its queue (quick recovery).
                    for s in a.durable_seq() + 1..=seq {
                        let (h, d) = &host_log[&s];
                        a.append(epoch, h, d).unwrap();
                    }
                }
            }
        }
        seq += 1;
        let (h, d) = record(seq, epoch, x);
        p.append(epoch, &h, &d).unwrap();
        a.append(epoch, &h, &d).unwrap();
        host_log.insert(seq, (h, d));
    }
    if let Some(cp) = copier.take() {
        let durable = cp.join().unwrap().expect("copy");
        assert!(durable >= live_from - 1);
    }
    wait_durable(&p, seq);
    wait_durable(&a, seq);
    wait_applied(&a, seq);
    assert!(!a.copying());
    assert_eq!(a.durable_seq(), seq);
    let mut pv = vec![0u8; VOLUME as usize];
    let mut av = vec![0u8; VOLUME as usize];
    p.read(0, &mut pv).unwrap();
    a.read(0, &mut av).unwrap();
    if let Some(at) = pv.iter().zip(&av).position(|(x, y)| x != y) {
        panic!("A differs from P at byte {at} (block {}, region {}): {c:?}", at as u64 / BS, at >> SHIFT);
    }
    close(a, ah);
    close(p, ph);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn copy_leaves_the_replica_equal_to_its_source(c in case()) {
        run(&c);
    }
}
