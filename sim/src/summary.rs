//! Running many seeds (on every core; each seed stays single-threaded and
//! deterministic) and adding up what they did.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::world::{run_seed, Options, Outcome};

/// What a batch of seeds did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// The failing seeds' outcomes, by seed.
    pub failures: Vec<Outcome>,
    /// Faults injected, by kind, over all seeds.
    pub faults: BTreeMap<&'static str, u64>,
    /// Notes, by kind: (count, seeds that saw it).
    pub notes: BTreeMap<&'static str, (u64, u64)>,
    /// Events, writes issued and completed, reads checked, hosts fenced.
    pub steps: u64,
    pub writes: u64,
    pub completed: u64,
    pub reads: u64,
    pub fenced: u64,
    pub copies: u64,
    pub member_changes: u64,
    /// Seeds whose final state could not be checked (the final host found
    /// no up-to-date replica).
    pub unchecked: u64,
    /// Wall time.
    pub wall: Duration,
}

impl Summary {
    fn add(&mut self, o: Outcome) {
        self.seeds += 1;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_insert(0) += v;
        }
        for (k, v) in &o.notes {
            let e = self.notes.entry(k).or_insert((0, 0));
            *e = (e.0 + v, e.1 + 1);
        }
        self.steps += o.steps;
        self.writes += o.writes;
        self.completed += o.completed;
        self.reads += o.reads;
        self.fenced += o.fenced;
        self.copies += o.copies;
        self.member_changes += o.member_changes;
        self.unchecked += (o.final_replicas == 0 && o.violation.is_none()) as u64;
        if o.violation.is_some() {
            self.failures.push(o);
        }
    }
}

/// Runs seeds `start..start + count` on `jobs` threads; `each` sees every
/// outcome as it ends (in no fixed order).
pub fn run_many(start: u64, count: u64, jobs: usize, opts: &Options, each: impl Fn(&Outcome) + Sync) -> Summary {
    let began = Instant::now();
    let next = AtomicU64::new(start);
    let total = Mutex::new(Summary::default());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start + count {
                    return;
                }
                let o = run_seed(seed, opts);
                each(&o);
                total.lock().unwrap_or_else(|e| e.into_inner()).add(o);
            });
        }
    });
    let mut sum = total.into_inner().unwrap_or_else(|e| e.into_inner());
    sum.failures.sort_by_key(|o| o.seed);
    sum.wall = began.elapsed();
    sum
}

/// One line per failing seed.
pub fn failure_line(o: &Outcome) -> String {
    match &o.violation {
        Some((v, step, t)) => format!("seed {} FAILED {} at step {step} (t={t}us): {}", o.seed, v.property, v.message),
        None => format!("seed {} ok", o.seed),
    }
}
