//! The network-sync link: a reliable, ordered, FEC-protected message link
//! over UDP that reports when each message, and the FEC repair packets
//! covering it, are on the wire (netsync/README.md;
//! SMFS/Maelstrom; docs/semantics.md "Sources").
//!
//! ```no_run
//! use starblk_netsync::{Link, LinkConfig, LinkEvent, Listener};
//! use std::time::Duration;
//!
//! let mut listener = Listener::bind("127.0.0.1:7701".parse()?, LinkConfig::default())?;
//! let he = Link::connect("127.0.0.1:0".parse()?, listener.local_addr(), LinkConfig::default())?;
//! let replica = listener.accept()?;
//! let id = he.send(b"a replication frame")?;              // blocks while the window is full
//! he.wait_on_wire(id, Duration::from_secs(1))?;           // data + repairs stamped by the kernel
//! assert_eq!(replica.recv()?, b"a replication frame");  // in order, exactly once
//! he.wait_acked(id, Duration::from_secs(1))?;
//! for ev in he.events().try_iter() {
//!     if let LinkEvent::OnWire(upto) = ev { println!("on the wire up to {upto}"); }
//! }
//! println!("{:?}", he.stats().wire_mode);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See README.md for the design, the datagram format and the knobs.

pub mod auto_rate;
mod config;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
mod io;
pub mod keys;
mod link;
mod pacer;
mod rx;
mod shared;
mod stamps;
mod stats;
mod sys;
mod tx;
pub mod wire;

pub use config::{
    payload_bytes_for_mtu, payload_bytes_for_mtu_keyed, LinkConfig, DEFAULT_MTU_BYTES, IP_UDP_HEADER_BYTES,
    MAX_MESSAGE_BYTES, MAX_PAYLOAD_BYTES, MESSAGE_OVERHEAD_BYTES, MIN_PAYLOAD_BYTES,
};
pub use error::LinkError;
pub use health::{fec_capacity, Health};
pub use keys::LinkKey;
pub use link::{KeysFn, Link, Listener};
pub use shared::{LinkEvent, MsgId};
pub use starblk_fec::FecScheme;
pub use stats::{LinkStats, RejectReason, Rejected, RxStats, TxStats, WireMode};

/// The panic message for a poisoned lock. Fail fast: a thread that
/// panicked while holding a lock left its state half-changed, and nothing
/// may go on from there (in the binary the panic hook aborts first).
pub const POISONED: &str = "lock poisoned: a thread panicked while holding it";
