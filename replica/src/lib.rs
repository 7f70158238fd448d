//! starblk replica: the replica server (store, replica log, superblock),
//! the TCP wire protocol, and the client side the host element uses.
//!
//! Nothing here knows about ublk; the host engine and the recovery crate
//! build on these types.

pub mod auth;
pub mod changes;
pub mod client;
pub mod copy;
pub mod disk;
pub mod history;
pub mod log;
pub mod members;
pub mod netlink;
pub mod proto;
pub mod readview;
pub mod replay;
pub mod server;
pub mod store;
pub mod sum;
pub mod superblock;

/// The panic message for a poisoned lock. Fail fast: a thread that
/// panicked while holding a lock left its state half-changed, and nothing
/// may go on from there (in the binary the panic hook aborts first).
pub const POISONED: &str = "lock poisoned: a thread panicked while holding it";
