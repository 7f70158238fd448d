//! WAN emulator: UDP and TCP relays with delay, jitter, rate, loss and a cut
//! switch, for starblk's network-sync tests and for users trying settings.
//!
//! ```no_run
//! use starblk_wanem::{Direction, LinkParams, UdpRelayConfig};
//!
//! let link = LinkParams { delay_ms: 50.0, loss_prob: 0.01, ..Default::default() };
//! let relay = UdpRelayConfig::new("127.0.0.1:0".parse()?, "127.0.0.1:7701".parse()?)
//!     .symmetric(link)
//!     .seed(42)
//!     .start()?;
//! println!("send to {}", relay.local_addr());
//! relay.set(Direction::Up, "loss", "0.05")?;
//! relay.cut_both(); // nothing more enters; packets in flight still arrive
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod clock;
mod control;
mod error;
mod model;
mod params;
mod rx;
mod stats;
mod tcp;
mod udp;

pub use control::{reply, Command, ControlServer, Controlled, RelayPair, HELP};
pub use error::{Error, Result};
pub use params::{
    mbit_to_bits, Direction, GilbertElliott, JitterDist, LinkParams, DEFAULT_QUEUE_BYTES, DEFAULT_REORDER_DELAY_MS,
    SETTING_NAMES,
};
pub use stats::{DirStats, RelayStats};
pub use tcp::{TcpDirStats, TcpParams, TcpRelayConfig, TcpRelayHandle, TcpStats, TCP_SETTING_NAMES};
pub use udp::{RelayHandle, UdpRelayConfig};
