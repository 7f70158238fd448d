//! Replay recovery, replica side (docs/semantics.md §9): a lagging replica copies the
//! writes it misses from an up-to-date peer's log, replica to replica, so
//! the data never passes through the HE.
//!
//! The HE sends a [`Replay`] frame on its session; the replica dials the
//! peer, asks for the log range (`LogRead`) and appends each record to its
//! own store in seq order. The store's committer makes them durable and
//! the usual `Ack` frames report progress on the HE's session. At the end
//! the replica answers `ReplayDone` with the first seq it did not apply;
//! the HE then sends the rest from its write queue (quick recovery). A
//! failure is an `Error` frame: `OutOfRange` when the peer's log no longer
//! holds the range (incremental recovery is then needed), `BadState` when
//! the peer cannot be reached or refuses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{self, ClientError};
use crate::log::RecordHeader;
use crate::proto::{ErrorCode, Hello, Replay, Uuid};
use crate::store::{Store, StoreError};

/// How long dialling the peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The peer could not be reached, refused the session, or does not
    /// hold the range in its log.
    #[error("replay from peer {addr}: {source}")]
    Peer {
        /// The peer's address.
        addr: String,
        /// What went wrong.
        source: ClientError,
    },
    /// This replica's store refused a record.
    #[error("replay seq {seq}: {source}")]
    Store {
        /// The record's seq.
        seq: u64,
        /// The store's error.
        source: StoreError,
    },
    /// Another replay is still running on this replica.
    #[error("a replay is already running on this replica")]
    Busy,
}

impl ReplayError {
    /// The Error frame code the HE sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplayError::Peer { source: ClientError::Rejected { frame, .. }, .. }
                if frame.code == ErrorCode::OutOfRange =>
            {
                ErrorCode::OutOfRange
            }
            ReplayError::Peer { .. } | ReplayError::Busy => ErrorCode::BadState,
            ReplayError::Store { source: StoreError::SeqGap { .. }, .. } => ErrorCode::SeqGap,
            ReplayError::Store { .. } => ErrorCode::DiskError,
        }
    }
}

/// Paces replay traffic to the rate in `rate` (bytes/s, 0 = unpaced),
/// which the HE may change while the replay runs (RecoveryRate frames).
pub(crate) struct Pace<'a> {
    rate: &'a AtomicU64,
    /// The rate the current period runs at.
    period_rate: u64,
    started: Instant,
    bytes: u64,
}

impl Pace<'_> {
    /// A pace at the rate `rate` holds now (and follows its changes).
    pub(crate) fn new(rate: &AtomicU64) -> Pace<'_> {
        Pace { rate, period_rate: rate.load(Ordering::Relaxed), started: Instant::now(), bytes: 0 }
    }

    /// Accounts `bytes` and sleeps as long as the rate asks.
    pub(crate) fn charge(&mut self, bytes: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate != self.period_rate {
            // A new rate starts a new period, so the old one's debt or
            // credit does not carry over.
            (self.period_rate, self.started, self.bytes) = (rate, Instant::now(), 0);
        }
        self.bytes += bytes;
        if rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            // Short naps, so a raised rate takes effect at once.
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
    }
}

/// The replica-wide replay state: whether one runs, and its rate limit.
#[derive(Debug, Default)]
pub struct ReplayControl {
    busy: AtomicBool,
    /// Data bytes per second, 0 = unlimited; set by Replay and
    /// RecoveryRate frames.
    pub rate_bytes_per_s: AtomicU64,
}

impl ReplayControl {
    /// Whether a replay runs now.
    pub fn running(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

/// Runs one replay to completion on the calling thread; returns the first
/// seq not applied.
pub fn run(
    store: &Arc<Store>,
    volume: Uuid,
    epoch: u64,
    req: &Replay,
    ctl: &ReplayControl,
    creds: Option<&crate::auth::Credentials>,
) -> Result<u64, ReplayError> {
    if ctl.busy.swap(true, Ordering::AcqRel) {
        return Err(ReplayError::Busy);
    }
    ctl.rate_bytes_per_s.store(req.rate_bytes_per_s, Ordering::Relaxed);
    let res = copy(store, volume, epoch, req, &ctl.rate_bytes_per_s, creds);
    ctl.busy.store(false, Ordering::Release);
    res
}

fn copy(
    store: &Arc<Store>,
    volume: Uuid,
    epoch: u64,
    req: &Replay,
    rate: &AtomicU64,
    creds: Option<&crate::auth::Credentials>,
) -> Result<u64, ReplayError> {
    let peer = |source| ReplayError::Peer { addr: req.addr.clone(), source };
    let hello = Hello { volume, epoch, flags: 0 };
    let mut session = client::connect_with(&req.addr, hello, CONNECT_TIMEOUT, creds).map_err(peer)?;
    // Records this replica already has are skipped by the store.
    let from = req.from.max(store.durable_seq() + 1);
    if from > req.to {
        return Ok(from);
    }
    let mut failed = None;
    let mut pace = Pace::new(rate);
    let next = session
        .stream_log(from, req.to, |wh, data| {
            let rec = RecordHeader { seq: wh.seq, offset: wh.offset, len: wh.len, op: wh.op, epoch: wh.epoch };
            match store.append(epoch, &rec, data) {
                Ok(()) => {
                    pace.charge(data.len() as u64);
                    true
                }
                Err(source) => {
                    failed = Some(ReplayError::Store { seq: wh.seq, source });
                    false
                }
            }
        })
        .map_err(peer)?;
    match failed {
        Some(e) => Err(e),
        None => Ok(next),
    }
}
