//! Recovery copies, replica side (incremental, full and rollback recovery;
//! `docs/design.md`, "Recovery"): a replica that neither the host's write
//! queue nor a peer's log can bring up to date copies, from an up-to-date
//! peer, the regions the plan names, replica to replica, while it takes
//! the host's live writes on its session.
//!
//! The HE sends a `Copy` frame as the first frame of the session; the
//! store persists the plan ([`Store::begin_copy`]) and this module runs it
//! on its own thread: it asks the source which regions changed
//! (`Changes`), adds those this replica's own change map names (a
//! rollback), and pulls each region (`RegionRead` → `RegionData`), a
//! window of requests in flight. Each region comes with the seq the
//! source had applied when it read it; [`Store::apply_copy_region`] keeps
//! copies from ever overwriting newer live writes. Progress is persisted
//! now and then (a cursor: every region below it is done), so a copy cut
//! by a crash of any process resumes there. `CopyProgress` frames tell
//! the HE; `CopyDone` ends it with the durable seq the replica reached.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::client::{self, ClientError};
use crate::proto::{Changes, ChangesReply, ErrorCode, Hello, RegionHeader, RegionRead, Uuid, CHANGES_MAX};
use crate::replay::Pace;
use crate::store::{CopyApplied, Store, StoreError};
use crate::superblock::CopyState;

/// How long dialling the source may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Region reads in flight.
const WINDOW: usize = 32;
/// Regions whose marks are made durable with one fdatasync before their
/// data is written.
const BATCH: usize = 16;
/// Regions listed per `Changes` request.
const CHUNK: u32 = 4096;
/// How long the source may stay silent (it may wait for its own writes to
/// catch up, up to 30 s, before it answers).
const PEER_SILENCE: Duration = Duration::from_secs(45);
/// How often the HE hears of progress.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source could not be reached, refused, or broke off.
    #[error("copy from peer {addr}: {source}")]
    Peer {
        /// The source's address.
        addr: String,
        /// What went wrong.
        source: ClientError,
    },
    /// The source sent something that does not fit the request.
    #[error("copy from peer {addr}: {what}")]
    Protocol {
        /// The source's address.
        addr: String,
        /// What did not fit.
        what: String,
    },
    /// This replica's store refused.
    #[error("copy: {0}")]
    Store(#[from] StoreError),
    /// The session that asked for the copy ended; progress is saved.
    #[error("copy interrupted: the host's session ended")]
    Cancelled,
}

impl CopyError {
    /// The Error frame code the HE sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            CopyError::Store(StoreError::Failed(_) | StoreError::Io { .. } | StoreError::Superblock { .. }) => {
                ErrorCode::DiskError
            }
            _ => ErrorCode::BadState,
        }
    }
}

/// One copy at a time per replica, and byte counters for stats.
#[derive(Debug, Default)]
pub struct CopyControl {
    busy: Mutex<bool>,
    idle: Condvar,
    /// Region bytes this replica sent to recovering peers.
    pub served_bytes: AtomicU64,
    /// Region bytes this replica received in its own copies (applied,
    /// read again, or lost to an interruption).
    pub received_bytes: AtomicU64,
}

impl CopyControl {
    /// Takes the copy slot, waiting up to `timeout` for a copy of an
    /// earlier session to wind down.
    pub fn acquire(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut busy = self.busy.lock().expect(crate::POISONED);
        while *busy {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            busy = self.idle.wait_timeout(busy, deadline - now).expect(crate::POISONED).0;
        }
        *busy = true;
        true
    }

    /// Gives the slot back.
    pub fn release(&self) {
        *self.busy.lock().expect(crate::POISONED) = false;
        self.idle.notify_all();
    }
}

/// Where a copy reads from: a source replica's change map and regions.
/// [`client::Session`] is one, over the network; tests use a store.
pub trait CopySource {
    /// Which regions changed (`Changes`).
    fn changes(&mut self, req: &Changes) -> Result<ChangesReply, ClientError>;
    /// Asks for one region; answers come in order from `recv_region`.
    fn send_region_read(&mut self, r: RegionRead) -> Result<(), ClientError>;
    /// The next region asked for.
    fn recv_region(&mut self) -> Result<(RegionHeader, Vec<u8>), ClientError>;
}

impl CopySource for client::Session {
    fn changes(&mut self, req: &Changes) -> Result<ChangesReply, ClientError> {
        client::Session::changes(self, req)
    }
    fn send_region_read(&mut self, r: RegionRead) -> Result<(), ClientError> {
        client::Session::send_region_read(self, r)
    }
    fn recv_region(&mut self) -> Result<(RegionHeader, Vec<u8>), ClientError> {
        client::Session::recv_region(self)
    }
}

/// Where a copy reports: progress (done, total bytes).
pub trait CopyReport {
    /// Bytes copied so far and in all.
    fn progress(&self, done: u64, total: u64);
}

/// Runs the copy the store has set up, from the source at `addr`, to the
/// end; returns the durable seq the replica then holds.
#[allow(clippy::too_many_arguments)]
pub fn run(
    store: &Arc<Store>,
    volume: Uuid,
    epoch: u64,
    addr: &str,
    rate: &AtomicU64,
    ctl: &CopyControl,
    cancel: &AtomicBool,
    report: &dyn CopyReport,
    creds: Option<&crate::auth::Credentials>,
) -> Result<u64, CopyError> {
    let peer = |source| CopyError::Peer { addr: addr.to_string(), source };
    let hello = Hello { volume, epoch, flags: 0 };
    let session = client::connect_with(addr, hello, CONNECT_TIMEOUT, creds).map_err(peer)?;
    // A source that stops answering must not stall the copy for ever: the
    // error ends this session's copy and the host resumes it elsewhere.
    session
        .writer
        .set_read_timeout(Some(PEER_SILENCE))
        .map_err(|e| peer(ClientError::Io { addr: addr.to_string(), source: e }))?;
    // The session that asked for the copy may end while a read from the
    // source blocks: cut the source's socket then, so the copy stops (and
    // saves its progress) at once, not when the source's silence times out.
    let (sock, done) = (session.writer.try_clone(), AtomicBool::new(false));
    let mut session = session;
    std::thread::scope(|s| {
        if let Ok(sock) = sock {
            let done = &done;
            s.spawn(move || {
                while !done.load(Ordering::Acquire) {
                    if cancel.load(Ordering::Acquire) {
                        let _ = sock.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let res = run_with(store, &mut session, addr, rate, ctl, cancel, report);
        done.store(true, Ordering::Release);
        match res {
            Err(CopyError::Peer { .. }) if cancel.load(Ordering::Acquire) => Err(CopyError::Cancelled),
            res => res,
        }
    })
}

/// [`run`] from any source (`addr` names it in errors).
pub fn run_with(
    store: &Arc<Store>,
    source: &mut dyn CopySource,
    addr: &str,
    rate: &AtomicU64,
    ctl: &CopyControl,
    cancel: &AtomicBool,
    report: &dyn CopyReport,
) -> Result<u64, CopyError> {
    let st = store.copy_state().ok_or_else(|| StoreError::Copy("no copy in progress".into()))?;
    let mut c = Copier {
        store,
        addr,
        session: source,
        cancel,
        report,
        ctl,
        pace: Pace::new(rate),
        region_bytes: store.changes().region_bytes(),
        min_seq: st.live_from - 1,
        cursor: st.cursor,
        done: st.done_bytes,
        total: st.total_bytes,
        persisted_at: st.done_bytes,
        persist_every: 1 << 20,
        reported: Instant::now(),
    };
    let res = c.all(&st);
    if res.is_err() {
        // Whatever was applied stays done: a resume starts here.
        let _ = store.persist_copy(c.cursor, c.done, c.total);
    }
    res?;
    let durable = store.finish_copy()?;
    report.progress(c.total.max(c.done), c.total.max(c.done));
    Ok(durable)
}

struct Copier<'a> {
    store: &'a Arc<Store>,
    addr: &'a str,
    session: &'a mut dyn CopySource,
    cancel: &'a AtomicBool,
    report: &'a dyn CopyReport,
    ctl: &'a CopyControl,
    pace: Pace<'a>,
    region_bytes: u64,
    /// Every region is read as of this seq or later (the writes before the
    /// first live one must all be in it).
    min_seq: u64,
    /// Every region below it is done.
    cursor: u64,
    done: u64,
    total: u64,
    persisted_at: u64,
    persist_every: u64,
    reported: Instant,
}

impl Copier<'_> {
    fn peer(&self, source: ClientError) -> CopyError {
        CopyError::Peer { addr: self.addr.to_string(), source }
    }

    fn protocol(&self, what: String) -> CopyError {
        CopyError::Protocol { addr: self.addr.to_string(), what }
    }

    fn check_cancel(&self) -> Result<(), CopyError> {
        if self.cancel.load(Ordering::Acquire) {
            Err(CopyError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Every segment of the plan from the cursor on.
    fn all(&mut self, st: &CopyState) -> Result<(), CopyError> {
        // What is left, counted from both maps (an estimate from above: a
        // region both name is counted twice until its chunk is listed).
        let mut left = 0u64;
        let mut start = 0;
        for seg in &st.segments {
            let from = start.max(self.cursor);
            if from < seg.end {
                left += self.count_peer(from, seg.end, seg.since_peer)?;
                left += self.count_local(from, seg.end, seg.since_local)?;
            }
            start = seg.end;
        }
        self.total = self.done + left * self.region_bytes;
        self.persist_every = (self.total / 100).clamp(1 << 20, 64 << 20);
        self.store.persist_copy(self.cursor, self.done, self.total)?;
        self.report.progress(self.done, self.total);
        tracing::info!(peer = self.addr, kind = %st.kind, cursor = self.cursor, done = self.done, total = self.total, "recovery copy running");
        let mut start = 0;
        for seg in &st.segments {
            let mut at = start.max(self.cursor);
            while at < seg.end {
                self.check_cancel()?;
                let req = Changes {
                    from: at,
                    to: seg.end,
                    since: seg.since_peer,
                    min_seq: self.min_seq,
                    max: CHUNK,
                    count_only: false,
                };
                let reply = self.session.changes(&req).map_err(|e| self.peer(e))?;
                if reply.next <= at || reply.next > seg.end {
                    return Err(self.protocol(format!("changes from {at}: next {} is out of range", reply.next)));
                }
                let local = self.local(at, reply.next, seg.since_local)?;
                let mut merged: Vec<u64> = reply.regions.iter().chain(&local).copied().collect();
                merged.sort_unstable();
                merged.dedup();
                let twice = (reply.regions.len() + local.len() - merged.len()) as u64;
                self.total = self.total.saturating_sub(twice * self.region_bytes).max(self.done);
                self.copy(&merged)?;
                self.cursor = reply.next;
                at = reply.next;
                self.maybe_persist(false)?;
            }
            start = seg.end;
        }
        self.maybe_persist(true)?;
        Ok(())
    }

    fn count_peer(&mut self, from: u64, to: u64, since: u64) -> Result<u64, CopyError> {
        let req = Changes { from, to, since, min_seq: self.min_seq, max: CHANGES_MAX, count_only: true };
        let r = self.session.changes(&req).map_err(|e| self.peer(e))?;
        Ok(r.count)
    }

    fn count_local(&self, from: u64, to: u64, since: u64) -> Result<u64, CopyError> {
        if since == u64::MAX {
            return Ok(0);
        }
        let map = self.store.changes();
        map.count(from, to, since).map_err(|e| {
            CopyError::Store(StoreError::Io {
                what: "read change map",
                path: self.store.dir().to_path_buf(),
                source: e,
            })
        })
    }

    /// Regions in `from..to` this replica itself wrote after `since`.
    fn local(&self, from: u64, to: u64, since: u64) -> Result<Vec<u64>, CopyError> {
        if since == u64::MAX {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let (v, next) = self.store.changes().changed(at, to, since, 1 << 16).map_err(|e| {
                CopyError::Store(StoreError::Io {
                    what: "read change map",
                    path: self.store.dir().to_path_buf(),
                    source: e,
                })
            })?;
            out.extend(v);
            if next <= at {
                break;
            }
            at = next;
        }
        Ok(out)
    }

    /// Copies `regions` (ascending) with a window of reads in flight.
    fn copy(&mut self, regions: &[u64]) -> Result<(), CopyError> {
        let mut to_send: VecDeque<(u64, u64)> = regions.iter().map(|r| (*r, self.min_seq)).collect();
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut unfinished: BTreeSet<u64> = BTreeSet::new();
        let mut batch: Vec<(RegionHeader, Vec<u8>)> = Vec::with_capacity(BATCH);
        while !to_send.is_empty() || !in_flight.is_empty() {
            self.check_cancel()?;
            while in_flight.len() < WINDOW {
                let Some((region, min_seq)) = to_send.pop_front() else { break };
                self.session.send_region_read(RegionRead { region, min_seq }).map_err(|e| self.peer(e))?;
                in_flight.push_back(region);
                unfinished.insert(region);
            }
            let (h, data) = self.session.recv_region().map_err(|e| self.peer(e))?;
            self.ctl.received_bytes.fetch_add(u64::from(h.len), Ordering::Relaxed);
            let want = in_flight.pop_front().expect("a read is in flight");
            if h.region != want {
                return Err(self.protocol(format!("asked for region {want}, got {}", h.region)));
            }
            batch.push((h, data));
            if batch.len() >= BATCH || in_flight.is_empty() {
                for (region, min_seq) in self.apply(&mut batch, &mut unfinished)? {
                    to_send.push_front((region, min_seq));
                }
                // Every listed region below the first unfinished one (or
                // the next one to send) is done.
                let low = unfinished.first().copied().into_iter().chain(to_send.front().map(|x| x.0)).min();
                if let Some(low) = low {
                    self.cursor = self.cursor.max(low);
                }
                self.maybe_persist(false)?;
            }
        }
        Ok(())
    }

    /// Applies a batch of copied regions: their marks first (durably),
    /// then their data. Returns the regions to read again.
    fn apply(
        &mut self,
        batch: &mut Vec<(RegionHeader, Vec<u8>)>,
        unfinished: &mut BTreeSet<u64>,
    ) -> Result<Vec<(u64, u64)>, CopyError> {
        let marks: Vec<(u64, u64)> = batch.iter().map(|(h, _)| (h.region, h.mark)).collect();
        self.store.premark_copy(&marks)?;
        let mut again = Vec::new();
        for (h, data) in batch.drain(..) {
            match self.store.apply_copy_region(&h, &data, self.cancel) {
                Ok(CopyApplied::Done) => {
                    unfinished.remove(&h.region);
                    self.done += u64::from(h.len);
                    self.total = self.total.max(self.done);
                    self.pace.charge(u64::from(h.len));
                }
                Ok(CopyApplied::Retry { min_seq }) => again.push((h.region, min_seq)),
                Err(StoreError::Timeout { .. }) if self.cancel.load(Ordering::Acquire) => {
                    return Err(CopyError::Cancelled)
                }
                Err(e) => return Err(e.into()),
            }
        }
        // In region order when pushed to the front one by one.
        again.reverse();
        Ok(again)
    }

    fn maybe_persist(&mut self, force: bool) -> Result<(), CopyError> {
        if force || self.done - self.persisted_at >= self.persist_every {
            self.store.persist_copy(self.cursor, self.done, self.total)?;
            self.persisted_at = self.done;
        }
        if force || self.reported.elapsed() >= REPORT_EVERY {
            self.report.progress(self.done, self.total);
            self.reported = Instant::now();
        }
        Ok(())
    }
}
