//! Time helpers: the wall clock the kernel stamps packets with, and
//! precise waits.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Waits shorter than this are spun (yielding) instead of slept: a futex
/// wake-up is typically 50–100 µs late on a busy host, a spin is not.
pub(crate) const SPIN_MARGIN: Duration = Duration::from_micros(150);

/// Now on CLOCK_REALTIME in ns since the epoch: the clock SO_TIMESTAMPNS
/// uses, so cut instants and packet arrival stamps compare directly.
pub(crate) fn realtime_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The monotonic instant at which something stamped `stamp_ns` (realtime)
/// happened. Clamped to `now - 1 s` so that a wall-clock step cannot move
/// packets far into the past.
pub(crate) fn instant_of(stamp_ns: u64, now: Instant, now_ns: u64) -> Instant {
    let age = Duration::from_nanos(now_ns.saturating_sub(stamp_ns)).min(Duration::from_secs(1));
    now.checked_sub(age).unwrap_or(now)
}

/// Asks the kernel to wake this thread's timed waits with ~1 ns slack
/// instead of the default 50 µs. Best effort: it only improves precision.
pub(crate) fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only
    // the calling thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("PR_SET_TIMERSLACK failed; timed waits may be ~50 us late");
    }
}

/// Sleeps until `due`: a plain sleep for the bulk, then a yielding spin for
/// the last [`SPIN_MARGIN`].
pub(crate) fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now + SPIN_MARGIN {
        std::thread::sleep(due - now - SPIN_MARGIN);
    }
    spin_until(due);
}

/// Yields until `due`; used only for waits shorter than [`SPIN_MARGIN`].
pub(crate) fn spin_until(due: Instant) {
    while Instant::now() < due {
        std::thread::yield_now();
    }
}
