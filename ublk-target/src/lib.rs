//! The ublk frontend of starblk: serves a [`BlockBackend`] as `/dev/ublkbN`
//! through the Linux ublk driver (libublk 0.4, io_uring), with user
//! recovery so a restarted daemon reattaches to the same device.
//!
//! This crate knows nothing about the engine. The engine implements
//! [`BlockBackend`] and calls [`serve`]:
//!
//! ```no_run
//! use starblk_ublk::{serve, DeviceSpec, MemBackend, StartMode, UblkOptions};
//! use std::sync::Arc;
//!
//! let spec = DeviceSpec {
//!     volume: "vol0".into(),
//!     size: 64 << 20,
//!     options: UblkOptions::default(),
//! };
//! let backend = Arc::new(MemBackend::ram(spec.size, 2)?);
//! let exit = serve(&spec, StartMode::Auto, backend, |live| {
//!     println!("{}", live.block_device.display()); // /dev/ublkbN
//!     // keep live.stop to end the device later (what `down` does)
//! })?;
//! # Ok::<(), starblk_ublk::Error>(())
//! ```
//!
//! Threads: [`serve`] blocks the calling thread and runs one thread per
//! queue. Each queue thread waits only in its io_uring; backends complete
//! from any thread through [`Completion`], which wakes the request's task.
//!
//! Crash and restart: devices are created with user recovery. If the
//! daemon dies, the kernel holds I/O on /dev/ublkbN; the next [`serve`]
//! with [`StartMode::Auto`] (or `Recover(id)`) reattaches to it, and refuses
//! with [`Error::DeviceBusy`] while the old daemon still serves it. The
//! recovering run must use the same size, block size, queue count, queue
//! depth and max I/O size ([`Error::Mismatch`] otherwise).
//!
//! Do not run the daemon in a private mount namespace that also mounts its
//! own device: a daemon that exits as the last task of such a namespace
//! deadlocks on its own /dev/ublkbN (libublk-rs#50).

mod backend;
mod completion;
mod device;
mod error;
mod mem;
mod queue;
mod record;
mod request;
mod signals;

pub use backend::BlockBackend;
pub use completion::Completion;
pub use device::{
    delete_device, device_status, down, driver_features, pid_alive, serve, DeviceSpec, DeviceState, DeviceStatus,
    LiveDevice, ServeExit, StartMode, StopHandle, UblkOptions,
};
pub use error::{Error, Result};
pub use mem::MemBackend;
pub use record::{read_record, record_path, remove_record, write_record, DeviceRecord};
pub use request::BlockRequest;
pub use signals::StopSignals;

/// The panic message for a poisoned lock. Fail fast: a thread that
/// panicked while holding a lock left its state half-changed, and nothing
/// may go on from there (in the binary the panic hook aborts first).
pub const POISONED: &str = "lock poisoned: a thread panicked while holding it";
