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
pub mod superblock;
