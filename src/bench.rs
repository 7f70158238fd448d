//! `starblk bench`: drives the engine in process at a fixed queue depth
//! and reports IOPS, MB/s and latency percentiles. With `--verify` every
//! block carries a stamp (offset and write id) and every read is checked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::engine::{Completer, IoError, IoResult, Request, Volume};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniform random reads.
    Randread,
    /// Uniform random writes.
    Randwrite,
    /// 70% random reads, 30% random writes.
    Mixed,
}

/// Bench parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Access pattern.
    pub pattern: Pattern,
    /// Request size.
    pub bs: u32,
    /// Requests in flight.
    pub qd: usize,
    /// Timed phase length.
    pub seconds: f64,
    /// Stamp and check every block.
    pub verify: bool,
    /// Bytes of the volume the bench touches, from offset 0.
    pub span_bytes: u64,
    /// RNG seed (printed so failures reproduce).
    pub seed: u64,
    /// Issue at most this many requests per second (steady load).
    pub rate_iops: Option<f64>,
    /// Print `ack OFFSET ID` on stdout as each write completes, so a
    /// process outside this one keeps a record that survives a kill -9.
    pub ack_log: bool,
    /// Write every timed request's completion time and latency here, so
    /// that a script can take percentiles over part of the run (e.g.
    /// while a recovery ran: `scripts/bench-recovery`).
    pub latency_log: Option<std::path::PathBuf>,
}

/// Latency percentiles in µs.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// The bench result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Pattern.
    pub pattern: Pattern,
    /// Request size in bytes.
    pub bs: u32,
    /// Queue depth.
    pub qd: usize,
    /// Timed seconds actually run.
    pub seconds: f64,
    /// Requests completed in the timed phase.
    pub ops: u64,
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_s: f64,
    /// Latency percentiles.
    pub latency: Latency,
    /// Blocks verified (0 without --verify).
    pub verified_blocks: u64,
    /// Verification failures.
    pub verify_errors: u64,
    /// Failed requests.
    pub io_errors: u64,
    /// Seed used.
    pub seed: u64,
}

/// Completion events: (slot token, outcome, when it completed). The time
/// is taken in the completer: the bench loop may receive it later (it
/// sleeps to pace requests with `--rate`).
pub type Completions = Receiver<(u64, Result<(), IoError>, Instant)>;

/// Per-slot buffer the completer copies read data into.
struct Slot {
    data: Mutex<Vec<u8>>,
}

/// Completer for the bench: copies read data into the slot and signals.
pub struct BenchCompleter {
    slots: Vec<Slot>,
    tx: Sender<(u64, Result<(), IoError>, Instant)>,
}

impl Completer for BenchCompleter {
    fn complete(&self, token: u64, result: IoResult<'_>) {
        let r = result.map(|data| {
            if let (Some(d), Some(slot)) = (data, self.slots.get(token as usize)) {
                let mut b = slot.data.lock().expect(crate::POISONED);
                b.clear();
                b.extend_from_slice(d);
            }
        });
        let _ = self.tx.send((token, r, Instant::now()));
    }
}

impl BenchCompleter {
    /// A completer for `qd` slots of up to `bs` bytes, and its receiver.
    pub fn new(qd: usize, bs: u32) -> (Arc<BenchCompleter>, Completions) {
        let (tx, rx) = channel::bounded(qd * 2);
        let slots = (0..qd).map(|_| Slot { data: Mutex::new(Vec::with_capacity(bs as usize)) }).collect();
        (Arc::new(BenchCompleter { slots, tx }), rx)
    }
}

/// What a slot has in flight.
#[derive(Clone, Copy)]
struct InFlight {
    read: bool,
    offset: u64,
    /// Write id stamped (writes only).
    id: u64,
    started: Instant,
}

/// Runs the bench on a started volume whose completer is `completer`.
pub struct Bench<'a> {
    vol: &'a Volume,
    completer: Arc<BenchCompleter>,
    rx: Completions,
    opts: BenchOptions,
    block_size: u32,
    /// Last completed write id per block (0 = unknown).
    expected: Vec<u64>,
    /// Blocks with an I/O in flight (to avoid ambiguous overlaps).
    busy: Vec<bool>,
    next_id: AtomicU64,
    verified: u64,
    verify_errors: u64,
    io_errors: u64,
    write_buf: Vec<u8>,
}

impl<'a> Bench<'a> {
    /// Prepares a bench; `completer`/`rx` must be the pair the volume uses.
    pub fn new(vol: &'a Volume, completer: Arc<BenchCompleter>, rx: Completions, opts: BenchOptions) -> Bench<'a> {
        let block_size = vol.config().block_size;
        let blocks = (opts.span_bytes / block_size as u64) as usize;
        Bench {
            vol,
            completer,
            rx,
            block_size,
            expected: vec![0; blocks],
            busy: vec![false; blocks],
            next_id: AtomicU64::new(1),
            verified: 0,
            verify_errors: 0,
            io_errors: 0,
            write_buf: vec![0; opts.bs as usize],
            opts,
        }
    }

    /// Runs prefill (reads with verify), the timed phase, and read-back
    /// verification (writes with verify).
    pub fn run(mut self) -> BenchReport {
        let reads = matches!(self.opts.pattern, Pattern::Read | Pattern::Randread | Pattern::Mixed);
        if self.opts.verify && reads {
            self.sweep(false);
        }
        let (ops, elapsed, lat, started) = self.timed();
        if let Some(path) = &self.opts.latency_log {
            if let Err(e) = write_latency_log(path, started, &lat) {
                tracing::error!(path = %path.display(), "latency log not written: {e}");
                self.io_errors += 1;
            }
        }
        let mut lat: Vec<u32> = lat.into_iter().map(|(_, l)| l).collect();
        if self.opts.verify {
            self.sweep(true);
        }
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0) as f64
        };
        let secs = elapsed.as_secs_f64();
        BenchReport {
            pattern: self.opts.pattern,
            bs: self.opts.bs,
            qd: self.opts.qd,
            seconds: secs,
            ops,
            iops: ops as f64 / secs,
            mb_s: ops as f64 * self.opts.bs as f64 / secs / 1e6,
            latency: Latency { p50_us: pct(0.50), p99_us: pct(0.99), p999_us: pct(0.999) },
            verified_blocks: self.verified,
            verify_errors: self.verify_errors,
            io_errors: self.io_errors,
            seed: self.opts.seed,
        }
    }

    /// The timed phase: keeps `qd` requests in flight for `seconds`.
    /// Returns (ops, elapsed, (completion µs since start, latency µs) per
    /// op, when it started).
    fn timed(&mut self) -> (u64, Duration, Vec<(u32, u32)>, std::time::SystemTime) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.opts.seed);
        let mut slots: Vec<Option<InFlight>> = vec![None; self.opts.qd];
        let mut lat = Vec::with_capacity(1 << 20);
        let mut seq_cursor = 0u64;
        let (start, started) = (Instant::now(), std::time::SystemTime::now());
        let deadline = start + Duration::from_secs_f64(self.opts.seconds);
        let mut issued = 0u64;
        for slot in 0..self.opts.qd {
            self.pace(start, issued);
            self.issue(slot, &mut slots, &mut rng, &mut seq_cursor);
            issued += 1;
        }
        let mut ops = 0u64;
        while slots.iter().any(|s| s.is_some()) {
            let (slot, res, done) = self.rx.recv().expect("completer alive");
            let f = self.finish(slot as usize, &mut slots, res);
            let us = |d: Duration| d.as_micros().min(u32::MAX as u128) as u32;
            lat.push((us(done.saturating_duration_since(start)), us(done.saturating_duration_since(f.started))));
            ops += 1;
            if Instant::now() < deadline {
                self.pace(start, issued);
                self.issue(slot as usize, &mut slots, &mut rng, &mut seq_cursor);
                issued += 1;
            }
        }
        (ops, start.elapsed(), lat, started)
    }

    /// With `--rate`, waits until request number `issued` is due.
    fn pace(&self, start: Instant, issued: u64) {
        if let Some(rate) = self.opts.rate_iops {
            let due = start + Duration::from_secs_f64(issued as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }

    /// Picks the next op and offset for `slot` and submits it.
    fn issue(&mut self, slot: usize, slots: &mut [Option<InFlight>], rng: &mut impl Rng, cursor: &mut u64) {
        let bs = self.opts.bs as u64;
        let ios = (self.opts.span_bytes / bs).max(1);
        let read = match self.opts.pattern {
            Pattern::Read | Pattern::Randread => true,
            Pattern::Write | Pattern::Randwrite => false,
            Pattern::Mixed => rng.gen_bool(0.7),
        };
        let sequential = matches!(self.opts.pattern, Pattern::Read | Pattern::Write);
        let mut offset;
        let mut tries = 0;
        loop {
            offset = if sequential {
                *cursor = (*cursor + 1) % ios;
                *cursor * bs
            } else {
                rng.gen_range(0..ios) * bs
            };
            tries += 1;
            if !self.is_busy(offset) || tries > 64 {
                break;
            }
        }
        self.submit(slot, slots, read, offset);
    }

    fn blocks(&self, offset: u64) -> std::ops::Range<usize> {
        let first = (offset / self.block_size as u64) as usize;
        first..first + (self.opts.bs / self.block_size) as usize
    }

    fn is_busy(&self, offset: u64) -> bool {
        self.blocks(offset).any(|b| self.busy[b])
    }

    fn submit(&mut self, slot: usize, slots: &mut [Option<InFlight>], read: bool, offset: u64) {
        let id = if read { 0 } else { self.next_id.fetch_add(1, Ordering::Relaxed) };
        for b in self.blocks(offset) {
            self.busy[b] = true;
        }
        slots[slot] = Some(InFlight { read, offset, id, started: Instant::now() });
        let req = if read {
            Request::Read { offset, len: self.opts.bs }
        } else {
            stamp(&mut self.write_buf, self.block_size, offset, id);
            Request::Write { offset, data: &self.write_buf, fua: false }
        };
        self.vol.submit(slot as u64, req);
    }

    /// Books a completion: verifies reads, records writes.
    fn finish(&mut self, slot: usize, slots: &mut [Option<InFlight>], res: Result<(), IoError>) -> InFlight {
        let f = slots[slot].take().expect("completion for an idle slot");
        for b in self.blocks(f.offset) {
            self.busy[b] = false;
        }
        if let Err(e) = res {
            self.io_errors += 1;
            tracing::error!(offset = f.offset, read = f.read, "bench I/O failed: {e}");
            return f;
        }
        if !f.read {
            for b in self.blocks(f.offset) {
                self.expected[b] = f.id;
            }
            if self.opts.ack_log {
                // stdout is line-buffered: each ack leaves the process now.
                println!("ack {} {}", f.offset, f.id);
            }
        } else if self.opts.verify {
            self.check(slot, f.offset);
        }
        f
    }

    fn check(&mut self, slot: usize, offset: u64) {
        let data = self.completer.slots[slot].data.lock().expect(crate::POISONED).clone();
        let bsz = self.block_size as usize;
        for (i, b) in self.blocks(offset).enumerate() {
            let want = self.expected[b];
            let block_off = b as u64 * self.block_size as u64;
            let got = &data[i * bsz..(i + 1) * bsz];
            let ok = if want == 0 { true } else { check_stamp(got, block_off, want) };
            self.verified += u64::from(want != 0);
            if !ok {
                self.verify_errors += 1;
                tracing::error!(
                    offset = block_off,
                    expected_id = want,
                    "verify failed: block does not hold the last write"
                );
            }
        }
    }

    /// Writes (prefill) or reads back (verify) the whole span at `qd`.
    fn sweep(&mut self, read: bool) {
        let bs = self.opts.bs as u64;
        let ios = self.opts.span_bytes / bs;
        let mut slots: Vec<Option<InFlight>> = vec![None; self.opts.qd];
        let mut next = 0u64;
        let mut free: Vec<usize> = (0..self.opts.qd).rev().collect();
        while next < ios || free.len() < self.opts.qd {
            while next < ios && !free.is_empty() {
                let skip = read && self.blocks(next * bs).all(|b| self.expected[b] == 0);
                if !skip {
                    let slot = free.pop().expect("non-empty");
                    self.submit(slot, &mut slots, read, next * bs);
                }
                next += 1;
            }
            if free.len() == self.opts.qd {
                continue;
            }
            let (slot, res, _) = self.rx.recv().expect("completer alive");
            self.finish(slot as usize, &mut slots, res);
            free.push(slot as usize);
        }
    }
}

/// The `--latency-log` file: `start_unix_us T`, then `completed_us
/// latency_us` per request (completion time from T).
fn write_latency_log(
    path: &std::path::Path,
    started: std::time::SystemTime,
    lat: &[(u32, u32)],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let t0 = started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    writeln!(w, "start_unix_us {t0}")?;
    for (at, l) in lat {
        writeln!(w, "{at} {l}")?;
    }
    w.flush()
}

/// Fills `buf` with one stamp per block: offset, id, and a derived pattern.
pub fn stamp(buf: &mut [u8], block_size: u32, offset: u64, id: u64) {
    for (i, blk) in buf.chunks_mut(block_size as usize).enumerate() {
        let off = offset + (i * block_size as usize) as u64;
        let word = (off ^ id.rotate_left(32)).to_le_bytes();
        blk[0..8].copy_from_slice(&off.to_le_bytes());
        blk[8..16].copy_from_slice(&id.to_le_bytes());
        for c in blk[16..].chunks_mut(8) {
            c.copy_from_slice(&word[..c.len()]);
        }
    }
}

/// Checks one block's stamp.
pub fn check_stamp(blk: &[u8], offset: u64, id: u64) -> bool {
    if blk.len() < 16 || blk[0..8] != offset.to_le_bytes() || blk[8..16] != id.to_le_bytes() {
        return false;
    }
    let word = (offset ^ id.rotate_left(32)).to_le_bytes();
    blk[16..].chunks(8).all(|c| c == &word[..c.len()])
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pattern {:?} bs {} qd {} seed {}", self.pattern, self.bs, self.qd, self.seed)?;
        writeln!(f, "  {:.0} IOPS  {:.1} MB/s  ({} ops in {:.2} s)", self.iops, self.mb_s, self.ops, self.seconds)?;
        writeln!(
            f,
            "  latency us: p50 {:.0}  p99 {:.0}  p99.9 {:.0}",
            self.latency.p50_us, self.latency.p99_us, self.latency.p999_us
        )?;
        write!(
            f,
            "  verify: {} blocks checked, {} errors; {} I/O errors",
            self.verified_blocks, self.verify_errors, self.io_errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip_and_detects_corruption() {
        let mut buf = vec![0u8; 8192];
        stamp(&mut buf, 4096, 8192, 77);
        assert!(check_stamp(&buf[..4096], 8192, 77));
        assert!(check_stamp(&buf[4096..], 12288, 77));
        assert!(!check_stamp(&buf[..4096], 8192, 78));
        buf[100] ^= 1;
        assert!(!check_stamp(&buf[..4096], 8192, 77));
    }
}
