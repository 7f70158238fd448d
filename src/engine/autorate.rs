//! `recovery_rate = "auto"`: a thread that ticks the recovery rate
//! controller (`starblk_recovery::rate`, `docs/design.md`, "Automatic
//! recovery rate") every [`TICK`] with the foreground write latency and
//! the recovery's progress, and sets the cap it chooses on running
//! replays and copies.
//!
//! The mode is on from the config or `starblk recovery-rate auto`; a
//! fixed rate (config or online) turns it off. The controller and the
//! switch share one lock, so a tick never overwrites a fixed rate the
//! operator just set.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use starblk_recovery::{AutoRateView, RateController, RateParams, RateSample};

use super::latency::HistogramSnapshot;
use super::{LinkState, Shared, Volume};

/// Controller period.
const TICK: Duration = Duration::from_millis(250);
/// The achieved recovery rate is measured over this many ticks.
const ACHIEVED_TICKS: usize = 4;

/// The auto mode's state, in [`Shared`].
#[derive(Default)]
pub(crate) struct AutoRate {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The controller while the mode is on.
    controller: Option<RateController>,
    /// Whether the thread runs (it stops with the volume).
    spawned: bool,
}

impl AutoRate {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("auto rate lock poisoned")
    }

    /// What status shows: the controller's state, None in fixed mode.
    pub(crate) fn view(&self) -> Option<AutoRateView> {
        self.lock().controller.as_ref().map(|c| c.view())
    }
}

impl Volume {
    /// Sets a fixed recovery rate limit (data bytes/s, 0 = unlimited),
    /// turning the auto mode off; applies to replays and copies already
    /// running. Returns the previous limit.
    pub fn set_recovery_rate(&self, bytes_per_s: u64) -> u64 {
        let mut g = self.shared.autorate.lock();
        g.controller = None;
        self.shared.apply_recovery_rate(bytes_per_s)
    }

    /// Turns the auto mode on (`recovery_rate = "auto"`); returns the
    /// previous limit.
    pub fn set_recovery_rate_auto(&self) -> u64 {
        enable(&self.shared)
    }
}

impl Shared {
    /// Sets the limit running replays and copies follow.
    fn apply_recovery_rate(&self, bytes_per_s: u64) -> u64 {
        let old = self.recovery_rate_bytes_per_s.swap(bytes_per_s, Ordering::AcqRel);
        if old != bytes_per_s {
            for l in &self.links {
                l.recovery_rate_changed();
            }
        }
        old
    }
}

/// Turns the auto mode on (keeping a controller already running) and
/// starts the thread once; returns the previous limit.
pub(crate) fn enable(shared: &Arc<Shared>) -> u64 {
    let mut g = shared.autorate.lock();
    let c = g.controller.get_or_insert_with(|| RateController::new(RateParams::default()));
    let old = shared.apply_recovery_rate(c.rate_bytes_per_s());
    if !g.spawned {
        g.spawned = true;
        let weak = Arc::downgrade(shared);
        thread::Builder::new().name("autorate".into()).spawn(move || run(weak)).expect("spawn the autorate thread");
    }
    old
}

/// What the thread keeps between ticks.
struct Meter {
    /// Start of the controller's current latency window.
    window_start: HistogramSnapshot,
    /// (when, bytes copied by all running copies) over the last ticks.
    copied: VecDeque<(Instant, u64)>,
}

fn run(weak: Weak<Shared>) {
    let Some(shared) = weak.upgrade() else { return };
    let mut m = Meter { window_start: shared.latency.write.snapshot(), copied: VecDeque::new() };
    drop(shared);
    loop {
        thread::sleep(TICK);
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        tick(&shared, &mut m);
    }
}

fn tick(shared: &Shared, m: &mut Meter) {
    let now = shared.latency.write.snapshot();
    let (sample, copied) = measure(shared, &now, &m.window_start);
    let achieved = achieved(&mut m.copied, copied);
    let sample = RateSample { achieved_bytes_per_s: achieved, ..sample };
    let mut g = shared.autorate.lock();
    let Some(c) = g.controller.as_mut() else {
        // Fixed mode: keep the window fresh for when auto comes back.
        m.window_start = now;
        return;
    };
    let d = c.tick(&sample);
    if d.consume_window {
        m.window_start = now;
    }
    let old = shared.apply_recovery_rate(d.rate_bytes_per_s);
    drop(g);
    if old != d.rate_bytes_per_s {
        tracing::debug!(volume = %shared.cfg.name, rate_bytes_per_s = d.rate_bytes_per_s, ?sample, "auto recovery rate");
    }
}

/// The sample for this tick (without the achieved rate), and the bytes
/// copied by running copies (None when none runs).
fn measure(shared: &Shared, now: &HistogramSnapshot, start: &HistogramSnapshot) -> (RateSample, Option<u64>) {
    let window = now.since(start);
    let g = shared.lock();
    let outstanding_writes = (g.next_seq - 1).saturating_sub(g.completed_seq);
    let running = || g.links.iter().filter(|l| l.state == LinkState::Recovering);
    let recovering = running().any(|l| l.copy.is_some() || l.replay.is_some());
    let copies: Vec<u64> = running()
        .filter(|l| l.copy.is_some())
        .filter_map(|l| l.copy_meter.as_ref())
        .map(|m| m.view().done_bytes)
        .collect();
    let copied = (!copies.is_empty()).then(|| copies.iter().sum());
    let sample = RateSample {
        writes: window.count(),
        p99_us: window.quantile_us(0.99),
        outstanding_writes,
        recovering,
        achieved_bytes_per_s: None,
    };
    (sample, copied)
}

/// Copy bytes/s over the last [`ACHIEVED_TICKS`] ticks; None when no copy
/// runs (replays do not report bytes) or the total went down (a copy
/// ended or restarted).
fn achieved(history: &mut VecDeque<(Instant, u64)>, copied: Option<u64>) -> Option<u64> {
    let Some(bytes) = copied else {
        history.clear();
        return None;
    };
    if history.back().is_some_and(|&(_, b)| b > bytes) {
        history.clear();
    }
    let now = Instant::now();
    history.push_back((now, bytes));
    if history.len() > ACHIEVED_TICKS + 1 {
        history.pop_front();
    }
    let &(t0, b0) = history.front().expect("just pushed");
    let secs = now.duration_since(t0).as_secs_f64();
    (history.len() > 1 && secs > 0.0).then(|| ((bytes - b0) as f64 / secs) as u64)
}
