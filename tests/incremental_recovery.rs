//! Incremental and full recovery (docs/semantics.md §9) with real replica processes:
//! a replica that neither the write queue nor a peer's log can bring up to
//! date copies the regions written since its durable seq from an
//! up-to-date peer, replica to replica, while I/O goes on; the copy
//! resumes where it stopped when the source or the recovering replica is
//! killed (kill -9); an empty replica copies only the regions ever
//! written. Every test ends with byte-identical replicas and prints the
//! bytes copied against what was written.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use starblk::engine::blocking::BlockingVolume;
use starblk::engine::LinkState;
use starblk_recovery::{RateParams, RatePhase};
use starblk_replica::client;

const REGION: u64 = 64 << 10;
/// The replicas' logs (`Replica::init` makes them 32 MiB).
const LOG_BYTES: u64 = 32 << 20;

fn stats(addr: &str) -> serde_json::Value {
    client::stats(addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("stats of {addr}: {e}"))
}

fn counter(addr: &str, name: &str) -> u64 {
    stats(addr)[name].as_u64().unwrap_or(0)
}

/// Writes one 64 KiB region per entry of `regions` (stamped with
/// `version`), from `threads` threads.
fn write_regions(v: &BlockingVolume, regions: &[u64], version: u64, threads: usize) {
    let chunks: Vec<Vec<u64>> = regions.chunks(regions.len().div_ceil(threads).max(1)).map(|c| c.to_vec()).collect();
    let hs: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let v = v.clone();
            std::thread::spawn(move || {
                for r in chunk {
                    let off = r * REGION;
                    v.write(off, &block(off, version, REGION as usize))
                        .unwrap_or_else(|e| panic!("write of region {r}: {e}"));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

/// Samples r2's recovery progress every 20 ms until stopped; checks that
/// the fraction and the bytes done never go down, and returns the samples
/// (fraction, done, total).
struct ProgressWatch {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, u64, u64)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ProgressWatch {
    fn start(v: &BlockingVolume, name: &'static str) -> ProgressWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (v, s2, st2) = (v.clone(), samples.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                if let Some(r) = replica_status(&v, name).recovery {
                    let p = r.progress;
                    s2.lock().unwrap().push((p.fraction, p.done_bytes, p.total_bytes));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ProgressWatch { stop, samples, handle: Some(handle) }
    }

    fn finish(mut self) -> Vec<(f64, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        let s = self.samples.lock().unwrap().clone();
        for w in s.windows(2) {
            assert!(w[1].0 >= w[0].0 && w[1].1 >= w[0].1, "progress went backwards: {:?} then {:?}", w[0], w[1]);
        }
        s
    }
}

/// What r2's status says while it recovers, once it says something.
fn recovery_fraction(v: &BlockingVolume) -> Option<f64> {
    replica_status(v, "r2").recovery.map(|r| r.progress.fraction)
}

/// Like `wait_until`, but a timeout shows the volume's status and the
/// tail of every replica's log.
fn wait_or_dump(c: &Cluster, v: &BlockingVolume, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dump = format!("{}\n", v.volume.status());
    for r in &c.replicas {
        let log = r.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        dump += &format!(
            "--- {} log (last 30 lines):\n{}\n",
            r.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    panic!("timed out after {timeout:?} waiting for {what}\n{dump}");
}

fn wait_up_to_date(v: &BlockingVolume, names: &[&str], timeout: Duration) {
    wait_until(timeout, "replicas up to date", || {
        names.iter().all(|n| replica_status(v, n).state == LinkState::UpToDate)
    });
}

#[test]
fn replica_away_for_20x_its_log_comes_back_by_incremental_recovery() {
    let mut c = Cluster::new(3, 2, "512MiB", "write_queue = \"4MiB\"");
    let v = c.engine();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Data everywhere first: r2 keeps it while away.
    let before: Vec<u64> = (0..256).map(|_| rng.gen_range(0..8192)).collect();
    write_regions(&v, &before, 1, 4);
    assert!(v.volume.drain(Duration::from_secs(20)));
    wait_up_to_date(&v, &["r2"], Duration::from_secs(10));
    c.replicas[2].kill();
    // 20 times its log, as 64 KiB writes into a hot set of 2048 regions:
    // far more written than distinct.
    let writes = 20 * LOG_BYTES / REGION;
    let hot: Vec<u64> = (0..writes).map(|_| 1024 + rng.gen_range(0..2048)).collect();
    let t0 = Instant::now();
    write_regions(&v, &hot, 2, 4);
    let away: BTreeSet<u64> = hot.iter().copied().collect();
    let distinct_bytes = away.len() as u64 * REGION;
    println!(
        "while r2 was away: {} MiB written ({writes} writes, {:.1} s), {} distinct regions ({} MiB); log {} MiB",
        (writes * REGION) >> 20,
        t0.elapsed().as_secs_f64(),
        away.len(),
        distinct_bytes >> 20,
        LOG_BYTES >> 20
    );
    c.replicas[2].start();
    let watch = ProgressWatch::start(&v, "r2");
    // Writes go on while it recovers (into regions already written while
    // it was away, so the copy bound below stays exact).
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (v, stop, hot) = (v.clone(), stop.clone(), away.iter().copied().collect::<Vec<u64>>());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = hot[rng.gen_range(0..hot.len())];
                v.write(r * REGION, &block(r * REGION, 3 + n, REGION as usize)).expect("write during recovery");
                n += 1;
                // About 30 MB/s: I/O goes on, below what the copy moves.
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    let t1 = Instant::now();
    wait_or_dump(&c, &v, Duration::from_secs(120), "r2 up to date after incremental recovery", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let recovery_secs = t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let during_writes = during.join().unwrap();
    let samples = watch.finish();
    let received = counter(&c.replicas[2].addr, "copy_received_bytes");
    let served: u64 = c.replicas[..2].iter().map(|r| counter(&r.addr, "copy_served_bytes")).sum();
    let ratio = received as f64 / distinct_bytes as f64;
    println!(
        "r2 recovered in {recovery_secs:.1} s by incremental copy: {} MiB copied ({received} B received, {served} B served) \
         for {} MiB of distinct regions written while away: {ratio:.3}x; {during_writes} writes went on meanwhile; \
         {} progress samples, last {:?}",
        received >> 20,
        distinct_bytes >> 20,
        samples.len(),
        samples.last()
    );
    let log = c.replicas[2].log();
    assert!(log.contains("recovery copy complete"), "r2 did not recover by copy (seed {seed}):\n{log}");
    assert!(
        received > 0 && ratio <= 1.1,
        "copied {received} B for {distinct_bytes} B of distinct regions (seed {seed})"
    );
    assert!(!samples.is_empty(), "status never showed r2's copy progress");
    write_regions(&v, &before[..32], 9, 2);
    assert!(v.volume.shutdown(Duration::from_secs(30)), "replicas did not catch up (seed {seed})");
    c.kill_all_and_assert_identical(&format!("seed {seed}"));
}

/// Three replicas; r2 is away while `regions` distinct 64 KiB regions are
/// written (far past its peers' logs and the write queue); then it comes
/// back and copies at `rate`. Returns the cluster, the engine and the
/// bytes an uninterrupted copy moves.
fn away_then_back(regions: u64, rate: &str) -> (Cluster, BlockingVolume, u64) {
    let extra = format!("write_queue = \"1MiB\"\nrecovery_rate = \"{rate}\"");
    let mut c = Cluster::new(3, 2, "512MiB", &extra);
    let v = c.engine();
    write_regions(&v, &(0..64).collect::<Vec<u64>>(), 1, 4);
    assert!(v.volume.drain(Duration::from_secs(20)));
    wait_up_to_date(&v, &["r2"], Duration::from_secs(10));
    c.replicas[2].kill();
    let list: Vec<u64> = (0..regions).map(|i| 100 + i * 2).collect();
    write_regions(&v, &list, 2, 4);
    assert!(v.volume.drain(Duration::from_secs(20)));
    c.replicas[2].start();
    (c, v, regions * REGION)
}

/// Waits until r2's copy is between `lo` and `hi` done; returns the total
/// status shows.
fn wait_mid_copy(v: &BlockingVolume, lo: f64, hi: f64) -> u64 {
    wait_until(Duration::from_secs(60), "r2 copying", || recovery_fraction(v).is_some_and(|f| f >= lo));
    let r = replica_status(v, "r2").recovery.expect("r2 copies");
    assert!(r.progress.fraction < hi, "r2's copy went too fast to interrupt: {:?}", r.progress);
    r.progress.total_bytes
}

#[test]
fn copy_resumes_after_kill_of_the_source_peer() {
    // 192 MiB at 20 MB/s: about 10 s of copying.
    let (mut c, v, uninterrupted) = away_then_back(3072, "160Mbit");
    let watch = ProgressWatch::start(&v, "r2");
    let total = wait_mid_copy(&v, 0.3, 0.8);
    let source = replica_status(&v, "r2").recovery.expect("r2 copies").peer;
    let idx = c.replicas.iter().position(|r| r.name == source).expect("the source is a replica");
    println!("r2 copies from {source}; kill -9 of it at {:?}", recovery_fraction(&v));
    c.replicas[idx].kill();
    // A recovering replica does not count toward Q: with the source gone
    // only one replica is up to date, and Q = 2 is lost until r2 is done.
    wait_until(Duration::from_secs(10), "the source seen gone", || !replica_status(&v, &source).state.is_connected());
    let st = v.volume.status();
    let r2 = replica_status(&v, "r2");
    if r2.state != LinkState::UpToDate {
        assert!(!st.quorum_ok, "quorum counted r2 while it was still copying ({})", r2.reason);
    }
    wait_or_dump(&c, &v, Duration::from_secs(60), "r2 up to date after resuming from the other peer", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let samples = watch.finish();
    let received = counter(&c.replicas[2].addr, "copy_received_bytes");
    let ratio = received as f64 / uninterrupted as f64;
    println!(
        "source {source} killed mid-copy: r2 copied {received} B in all against {uninterrupted} B for an \
         uninterrupted copy (status total {total} B): {ratio:.3}x; {} progress samples, last {:?}",
        samples.len(),
        samples.last()
    );
    assert!(ratio <= 1.05, "resuming after the source's death copied {ratio:.3}x");
    let log = c.replicas[2].log();
    assert!(log.contains("recovery copy resumed"), "r2 did not resume its copy:\n{log}");
    c.replicas[idx].start();
    wait_up_to_date(&v, &["r0", "r1", "r2"], Duration::from_secs(60));
    assert!(v.volume.shutdown(Duration::from_secs(30)));
    c.kill_all_and_assert_identical("source killed mid-copy");
}

#[test]
fn copy_resumes_after_kill_of_the_recovering_replica() {
    let (mut c, v, uninterrupted) = away_then_back(3072, "160Mbit");
    let watch = ProgressWatch::start(&v, "r2");
    let total = wait_mid_copy(&v, 0.3, 0.8);
    let at = recovery_fraction(&v);
    c.replicas[2].kill();
    c.replicas[2].start();
    println!("kill -9 of r2 at {at:?}, restarted");
    wait_or_dump(&c, &v, Duration::from_secs(60), "r2 up to date after resuming its copy", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let samples = watch.finish();
    // r2's own counter restarted with it: count at the sources.
    let served: u64 = c.replicas[..2].iter().map(|r| counter(&r.addr, "copy_served_bytes")).sum();
    let ratio = served as f64 / uninterrupted as f64;
    println!(
        "r2 killed mid-copy: the sources served {served} B in all against {uninterrupted} B for an uninterrupted \
         copy (status total {total} B): {ratio:.3}x; {} progress samples, last {:?}",
        samples.len(),
        samples.last()
    );
    assert!(ratio <= 1.05, "resuming after the recovering replica's death copied {ratio:.3}x");
    assert!(c.replicas[2].log().contains("recovery copy resumed"), "r2 did not resume its copy");
    assert!(v.volume.shutdown(Duration::from_secs(30)));
    c.kill_all_and_assert_identical("recovering replica killed mid-copy");
}

#[test]
fn copy_resumes_after_the_host_dies() {
    let (mut c, v, uninterrupted) = away_then_back(3072, "160Mbit");
    let total = wait_mid_copy(&v, 0.3, 0.8);
    let at = recovery_fraction(&v);
    // The host goes away at once (its sessions close, as on kill -9);
    // a new host fences the volume and finds r2 half copied.
    v.volume.shutdown(Duration::ZERO);
    drop(v);
    println!("host gone at {at:?}");
    let v = c.engine();
    let epoch = v.volume.status().epoch;
    let watch = ProgressWatch::start(&v, "r2");
    wait_or_dump(&c, &v, Duration::from_secs(60), "r2 up to date under the new host", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let samples = watch.finish();
    let served: u64 = c.replicas[..2].iter().map(|r| counter(&r.addr, "copy_served_bytes")).sum();
    let ratio = served as f64 / uninterrupted as f64;
    println!(
        "host died mid-copy; under the new host (epoch {epoch}) the sources served {served} B in all against \
         {uninterrupted} B for an uninterrupted copy (status total {total} B): {ratio:.3}x; {} progress samples \
         under the new host, last {:?}",
        samples.len(),
        samples.last()
    );
    assert!(ratio <= 1.05, "resuming under a new host copied {ratio:.3}x");
    assert!(c.replicas[2].log().contains("recovery copy resumed"), "r2 did not resume its copy");
    assert!(v.volume.shutdown(Duration::from_secs(30)));
    c.kill_all_and_assert_identical("host died mid-copy");
}

#[test]
fn empty_replica_gets_a_full_copy_of_the_written_regions_only() {
    let mut c = Cluster::new(3, 2, "512MiB", "write_queue = \"1MiB\"");
    let v = c.engine();
    // A sparse volume: 1000 regions written (some twice), the rest never.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let list: Vec<u64> = (0..1400).map(|_| rng.gen_range(0..1000) * 8).collect();
    write_regions(&v, &list, 1, 4);
    let written: BTreeSet<u64> = list.iter().copied().collect();
    assert!(v.volume.drain(Duration::from_secs(20)));
    // r2's disk is replaced: a fresh replica directory, stamped with the
    // volume's identity (what `replica add` will do).
    c.replicas[2].kill();
    std::fs::remove_dir_all(&c.replicas[2].dir).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["replica", "init", "--dir"])
        .arg(&c.replicas[2].dir)
        .args(["--size", "512MiB", "--log-size", "32M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.replicas[2].start();
    let sb = starblk_replica::superblock::Superblock::read(
        &std::fs::File::open(c.replicas[0].dir.join("superblock")).unwrap(),
    )
    .unwrap();
    let st = starblk_replica::proto::Stamp {
        volume: v.volume.config().volume,
        size_bytes: sb.size_bytes,
        block_size: sb.block_size,
        epoch: 1,
        members: starblk_replica::members::Membership {
            epoch: sb.members_epoch,
            version: sb.members_version,
            members: sb.members.clone(),
            previous: sb.members_previous.clone(),
        },
    };
    client::stamp(&c.replicas[2].addr, &st, Duration::from_secs(5)).unwrap();
    // Writes go on before and during its copy.
    write_regions(&v, &list[..100], 2, 2);
    wait_or_dump(&c, &v, Duration::from_secs(60), "r2 up to date after a full copy", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let received = counter(&c.replicas[2].addr, "copy_received_bytes");
    let written_bytes = written.len() as u64 * REGION;
    println!(
        "empty r2: full copy of {received} B for {} written regions ({written_bytes} B) of a {} MiB volume",
        written.len(),
        512
    );
    assert!(c.replicas[2].log().contains("kind=full"), "r2 did not get a full copy");
    assert!(received <= written_bytes + written_bytes / 10, "a full copy must skip regions never written");
    assert!(v.volume.shutdown(Duration::from_secs(30)));
    c.kill_all_and_assert_identical("full copy");
}

#[test]
fn auto_rate_steers_an_incremental_recovery_and_status_shows_it() {
    let (mut c, v, _) = away_then_back(1024, "auto");
    // Foreground writes go on during the copy: the controller guards
    // their latency.
    let stop = Arc::new(AtomicBool::new(false));
    let fg = {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i % 64) * REGION;
                v.write(off, &block(off, 10 + i, 4096)).unwrap_or_else(|e| panic!("foreground write {i}: {e}"));
                i += 1;
            }
        })
    };
    let (min, max) = (RateParams::default().min_bytes_per_s, RateParams::default().max_bytes_per_s);
    let mut seen = Vec::new();
    wait_or_dump(&c, &v, Duration::from_secs(60), "r2 up to date under recovery_rate = \"auto\"", || {
        let st = v.volume.status();
        let auto = st.recovery_rate_auto.expect("status shows the auto mode");
        let r2 = st.replicas.iter().find(|r| r.name == "r2").unwrap();
        if r2.recovery.is_some() && r2.state != LinkState::UpToDate {
            seen.push((auto.phase, st.recovery_rate_bytes_per_s));
        }
        r2.state == LinkState::UpToDate
    });
    println!(
        "auto rate while r2 copied (phase, bytes/s), {} samples: {:?}",
        seen.len(),
        seen.iter().step_by(10).collect::<Vec<_>>()
    );
    assert!(!seen.is_empty(), "status never showed r2 copying");
    assert!(seen.iter().all(|&(_, r)| (min..=max).contains(&r)), "a chosen rate out of bounds: {seen:?}");
    assert!(seen.iter().any(|&(p, _)| p != RatePhase::Idle), "the controller never saw the recovery: {seen:?}");
    assert!(c.replicas[2].log().contains("recovery copy complete"), "r2 did not recover by copy");
    // Once the copy is done the controller goes idle; status says auto.
    wait_until(Duration::from_secs(5), "the controller idle after the copy", || {
        v.volume.status().recovery_rate_auto.is_some_and(|a| a.phase == RatePhase::Idle)
    });
    let text = v.volume.status().to_string();
    assert!(text.contains("recovery rate auto"), "status text does not show the auto mode:\n{text}");
    // A fixed rate turns the mode off; auto turns it back on.
    v.volume.set_recovery_rate(1 << 20);
    let st = v.volume.status();
    assert_eq!((st.recovery_rate_auto, st.recovery_rate_bytes_per_s), (None, 1 << 20));
    v.volume.set_recovery_rate_auto();
    assert!(v.volume.status().recovery_rate_auto.is_some());
    stop.store(true, Ordering::Relaxed);
    fg.join().unwrap();
    assert!(v.volume.shutdown(Duration::from_secs(30)));
    c.kill_all_and_assert_identical("auto rate");
}
