//! The simulator over many seeds: production's rules keep every property,
//! runs are deterministic, and the checker does catch defects that are put
//! back (so a clean run means something).

use starblk_sim::rules::Rules;
use starblk_sim::summary::{failure_line, run_many};
use starblk_sim::{run_seed, Options};

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn a_thousand_seeds_keep_every_property() {
    let sum = run_many(0, 1_000, jobs(), &Options::default(), |_| {});
    let lines: Vec<String> = sum.failures.iter().map(failure_line).collect();
    assert!(lines.is_empty(), "{} of {} seeds failed:\n{}", lines.len(), sum.seeds, lines.join("\n"));
    assert_eq!(sum.seeds, 1_000);
    // The runs did real work: writes completed, reads checked, takeovers.
    assert!(sum.completed > 10_000 && sum.reads > 10_000 && sum.fenced > 2_000, "{sum:?}");
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77, 1234] {
        let (a, b) = (run_seed(seed, &Options::default()), run_seed(seed, &Options::default()));
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "seed {seed}");
    }
}

/// The cheapest defects to find: 1,000 seeds find them many times over.
#[test]
fn reintroduced_defects_are_found() {
    for defect in [1, 2, 4] {
        let opts = Options { rules: Rules { defect: Some(defect), no_drain: false }, ..Options::default() };
        let sum = run_many(0, 1_000, jobs(), &opts, |_| {});
        assert!(!sum.failures.is_empty(), "defect {defect} went unnoticed over 1,000 seeds");
    }
}
