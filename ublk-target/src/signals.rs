//! SIGTERM and SIGINT for a ublk daemon: they mean "stop cleanly" (delete
//! the device), unlike `kill -9`, which leaves the device quiesced for user
//! recovery. Block them before any thread exists, so every thread inherits
//! the mask and only the waiter thread sees them.

/// SIGTERM and SIGINT, blocked in the thread that made this and in every
/// thread it spawns afterwards.
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread.
    pub fn block() -> StopSignals {
        // SAFETY: sigset_t is plain data that sigemptyset/sigaddset
        // initialise; pthread_sigmask only reads it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            StopSignals(set)
        }
    }

    /// Calls `f` with the signal number, on a thread of its own, when the
    /// first SIGTERM or SIGINT arrives.
    pub fn on_signal<F: FnOnce(i32) + Send + 'static>(self, f: F) {
        let set = self.0;
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a live int.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                f(sig);
            }
        });
    }
}
