pub mod bench;
pub mod config;
pub mod control;
pub mod engine;
pub mod frontend;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod plan;
pub mod size;

/// The panic message for a poisoned lock. Fail fast: a thread that
/// panicked while holding a lock left its state half-changed, and nothing
/// may go on from there (in the binary the panic hook aborts first).
pub const POISONED: &str = "lock poisoned: a thread panicked while holding it";
