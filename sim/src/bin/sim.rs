//! `sim --seed S [--verbose]` replays one seed; `sim --seeds N [--start S]`
//! runs many. `--reintroduce N` puts back known defect N (1..=14) in the
//! simulator's copy of the rules, never in production code.

use std::process::ExitCode;

use starblk_sim::rules::{Rules, DEFECTS};
use starblk_sim::summary::{failure_line, run_many, Summary};
use starblk_sim::{run_seed, Options};

const USAGE: &str = "usage: sim --seed S [--verbose] | sim --seeds N [--start S] [--jobs J]
  common: [--reintroduce N] (1..=11, see docs/simulator.md) [--no-drain] [--data-only] [--grow-past-quorum]";

#[derive(Debug, Default)]
struct Args {
    seed: Option<u64>,
    seeds: Option<u64>,
    start: u64,
    jobs: Option<usize>,
    opts: Options,
}

fn parse() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{what} needs a number"))?;
            v.parse().map_err(|_| format!("{what}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--seed" => a.seed = Some(num("--seed")?),
            "--seeds" => a.seeds = Some(num("--seeds")?),
            "--start" => a.start = num("--start")?,
            "--jobs" => a.jobs = Some(num("--jobs")? as usize),
            "--reintroduce" => {
                let n = num("--reintroduce")?;
                if !(1..=DEFECTS.len() as u64).contains(&n) {
                    return Err(format!("--reintroduce takes 1..={}", DEFECTS.len()));
                }
                a.opts.rules = Rules { defect: Some(n as u8), ..a.opts.rules };
            }
            "--no-drain" => a.opts.rules.no_drain = true,
            "--data-only" => a.opts.data_only = true,
            "--grow-past-quorum" => a.opts.grow_past_quorum = true,
            "--verbose" | "-v" => a.opts.verbose = true,
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.seed.is_some() == a.seeds.is_some() {
        return Err("give exactly one of --seed S and --seeds N".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sim: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = a.opts.rules.defect {
        println!("reintroduced defect {n}: {}", DEFECTS[n as usize - 1]);
    }
    if a.opts.rules.no_drain {
        println!("modelling a store whose set_epoch does not drain group commit");
    }
    match a.seed {
        Some(seed) => one(seed, &a.opts),
        None => many(&a),
    }
}

fn one(seed: u64, opts: &Options) -> ExitCode {
    let o = run_seed(seed, opts);
    println!("{}", failure_line(&o));
    println!(
        "seed {seed}: {} steps, {} writes ({} completed), {} reads checked, {} hosts fenced, {} copies finished, {} membership changes, {} replicas checked at the end",
        o.steps, o.writes, o.completed, o.reads, o.fenced, o.copies, o.member_changes, o.final_replicas
    );
    println!("seed {seed}: faults {:?}", o.faults);
    if !o.notes.is_empty() {
        println!("seed {seed}: notes {:?}", o.notes);
    }
    if o.violation.is_some() {
        println!("replay: scripts/simulate --seed {seed} --verbose{}", flags(opts));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn many(a: &Args) -> ExitCode {
    let count = a.seeds.unwrap_or(0);
    let jobs = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("running seeds {}..{} on {jobs} threads", a.start, a.start + count);
    let sum = run_many(a.start, count, jobs, &a.opts, |o| {
        if o.violation.is_some() {
            println!("{}", failure_line(o));
        }
    });
    report(&sum, &a.opts);
    if sum.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(s: &Summary, opts: &Options) {
    println!("seeds run: {}", s.seeds);
    println!("violations: {} seeds", s.failures.len());
    let mut by_prop = std::collections::BTreeMap::new();
    for o in &s.failures {
        if let Some((v, _, _)) = &o.violation {
            *by_prop.entry(v.property.to_string()).or_insert(0u64) += 1;
        }
    }
    for (p, n) in &by_prop {
        println!("  {p}: {n}");
    }
    println!("faults injected: {}", s.faults.values().sum::<u64>());
    for (k, v) in &s.faults {
        println!("  {k}: {v}");
    }
    for (k, (n, seeds)) in &s.notes {
        println!("note: {k}: {n} times in {seeds} seeds");
    }
    println!(
        "work: {} events, {} writes issued, {} completed, {} reads checked, {} hosts fenced, {} copies finished, {} membership changes committed, {} seeds without a checked final state",
        s.steps, s.writes, s.completed, s.reads, s.fenced, s.copies, s.member_changes, s.unchecked
    );
    println!("wall time: {:.2} s", s.wall.as_secs_f64());
    if let Some(o) = s.failures.first() {
        println!("replay the first: scripts/simulate --seed {} --verbose{}", o.seed, flags(opts));
    }
}

fn flags(opts: &Options) -> String {
    let mut f = String::new();
    if let Some(n) = opts.rules.defect {
        f += &format!(" --reintroduce {n}");
    }
    if opts.rules.no_drain {
        f += " --no-drain";
    }
    if opts.data_only {
        f += " --data-only";
    }
    if opts.grow_past_quorum {
        f += " --grow-past-quorum";
    }
    f
}
