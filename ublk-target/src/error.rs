//! The one error type of the ublk frontend, and its errno mapping.

use std::path::PathBuf;

/// Everything that can go wrong in the ublk frontend, from a single request
/// to device setup. [`Error::to_errno`] is the only place that turns an error
/// into the negative errno the kernel (or a CLI exit path) sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend failed to read or write the data (media, network or
    /// replica failure). The kernel reports an I/O error to the filesystem.
    #[error("I/O error in the backend: {0}")]
    Io(String),

    /// The request addresses bytes past the end of the device, or its
    /// offset/length is not a multiple of the logical block size.
    #[error("request out of range: offset {offset} len {len} on a device of {size} bytes")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Byte length of the request.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },

    /// The kernel sent an operation this target does not implement
    /// (zone commands, WRITE_SAME, anything newer than this code).
    #[error("unsupported ublk operation {op}")]
    Unsupported {
        /// Raw `UBLK_IO_OP_*` value.
        op: u32,
    },

    /// The backend has no space left (for example a full replica disk).
    #[error("no space left in the backend")]
    NoSpace,

    /// The volume only serves reads right now (quorum lost with
    /// `on_quorum_loss = "read-only"`).
    #[error("volume is read-only")]
    ReadOnly,

    /// The backend gave up waiting for the request.
    #[error("backend timed out")]
    TimedOut,

    /// A read completion delivered a different number of bytes than requested.
    #[error("read completion delivered {got} bytes, request wanted {want}")]
    ShortRead {
        /// Bytes the request asked for.
        want: usize,
        /// Bytes the backend delivered.
        got: usize,
    },

    /// The backend dropped a [`crate::Completion`] without completing it.
    #[error("completion dropped by the backend without a result")]
    Dropped,

    /// `/dev/ublk-control` does not exist: the running kernel has no ublk
    /// driver, or `ublk_drv` is not loaded.
    #[error(
        "no ublk driver: /dev/ublk-control is missing (modprobe ublk_drv, or run on a kernel with CONFIG_BLK_DEV_UBLK)"
    )]
    NoDriver,

    /// A setting in [`crate::UblkOptions`] or [`crate::DeviceSpec`] is
    /// impossible; the message says which and what was expected.
    #[error("invalid ublk option: {0}")]
    InvalidOption(String),

    /// The device is still served by a live daemon, so it cannot be
    /// created again or recovered.
    #[error(
        "/dev/ublkb{dev_id} for volume {volume:?} is live, served by pid {pid}; stop that daemon first (or run `down`)"
    )]
    DeviceBusy {
        /// Device id (N of /dev/ublkbN).
        dev_id: u32,
        /// Volume the device serves.
        volume: String,
        /// Pid of the daemon that serves it.
        pid: i32,
    },

    /// The device exists but is in a state user recovery cannot resume
    /// (for example stopped, or created without user recovery).
    #[error("/dev/ublkb{dev_id} cannot be recovered: it is {state}")]
    NotRecoverable {
        /// Device id.
        dev_id: u32,
        /// Its state as the driver reports it.
        state: String,
    },

    /// The driver did not report the device LIVE after START_DEV or
    /// END_USER_RECOVERY; the device was stopped again.
    #[error("/dev/ublkb{dev_id} did not come up LIVE")]
    NotLive {
        /// Device id.
        dev_id: u32,
    },

    /// No ublk device with this id exists.
    #[error("no ublk device with id {dev_id}")]
    NoSuchDevice {
        /// Device id that was asked for.
        dev_id: u32,
    },

    /// The device to recover belongs to another volume, or has another
    /// geometry than the volume; reattaching would serve the wrong data.
    #[error("/dev/ublkb{dev_id} does not match this volume: {reason}")]
    Mismatch {
        /// Device id.
        dev_id: u32,
        /// What differs.
        reason: String,
    },

    /// Reading or writing the run-directory record failed.
    #[error("run-directory record {path}: {source}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A call into libublk failed (control command, queue setup, ...).
    #[error("ublk: {0}")]
    Ublk(#[from] libublk::UblkError),

    /// A plain system call failed.
    #[error("{context}: {source}")]
    Os {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The negative errno for this error. The kernel turns it into a block
    /// status (`-EOPNOTSUPP` → not supported, `-ENOSPC` → no space, anything
    /// unknown → I/O error); setup callers can use it as an exit reason.
    pub fn to_errno(&self) -> i32 {
        -match self {
            Error::Io(_) | Error::ShortRead { .. } | Error::Dropped | Error::NotLive { .. } => libc::EIO,
            Error::OutOfRange { .. } | Error::InvalidOption(_) | Error::Mismatch { .. } => libc::EINVAL,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
            Error::NoSpace => libc::ENOSPC,
            Error::ReadOnly => libc::EROFS,
            Error::TimedOut => libc::ETIMEDOUT,
            Error::NoDriver => libc::ENODEV,
            Error::DeviceBusy { .. } => libc::EBUSY,
            Error::NotRecoverable { .. } => libc::EBUSY,
            Error::NoSuchDevice { .. } => libc::ENOENT,
            Error::Record { source, .. } | Error::Os { source, .. } => io_errno(source),
            Error::Ublk(e) => ublk_errno(e),
        }
    }

    /// Shorthand for an [`Error::Os`] from the current `errno`.
    pub(crate) fn last_os(context: &'static str) -> Error {
        Error::Os { context, source: std::io::Error::last_os_error() }
    }
}

/// Positive errno of an `io::Error`, EIO when it carries none.
fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}

/// Positive errno of a libublk error. libublk stores kernel results as
/// negative numbers in `OtherError`/`UringIOError`.
fn ublk_errno(e: &libublk::UblkError) -> i32 {
    use libublk::UblkError as U;
    match e {
        U::OtherError(n) | U::UringIOError(n) if *n != 0 => n.abs(),
        U::IOError(io) => io_errno(io),
        U::QueueIsDown => libc::ENODEV,
        U::UringTimeout => libc::ETIMEDOUT,
        U::InvalidVal | U::JsonError(_) => libc::EINVAL,
        _ => libc::EIO,
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_map_to_block_layer_errnos() {
        assert_eq!(Error::Io("disk".into()).to_errno(), -libc::EIO);
        assert_eq!(Error::Unsupported { op: 18 }.to_errno(), -libc::EOPNOTSUPP);
        assert_eq!(Error::NoSpace.to_errno(), -libc::ENOSPC);
        assert_eq!(Error::TimedOut.to_errno(), -libc::ETIMEDOUT);
        assert_eq!(Error::Dropped.to_errno(), -libc::EIO);
        assert_eq!(Error::ShortRead { want: 4, got: 2 }.to_errno(), -libc::EIO);
        let oor = Error::OutOfRange { offset: 1, len: 2, size: 3 };
        assert_eq!(oor.to_errno(), -libc::EINVAL);
    }

    #[test]
    fn setup_errors_map_to_meaningful_errnos() {
        assert_eq!(Error::NoDriver.to_errno(), -libc::ENODEV);
        let busy = Error::DeviceBusy { dev_id: 0, volume: "v".into(), pid: 1 };
        assert_eq!(busy.to_errno(), -libc::EBUSY);
        assert!(busy.to_string().contains("/dev/ublkb0"));
        assert_eq!(Error::NoSuchDevice { dev_id: 3 }.to_errno(), -libc::ENOENT);
    }

    #[test]
    fn libublk_errors_keep_the_kernel_errno() {
        let e = Error::from(libublk::UblkError::OtherError(-libc::EBUSY));
        assert_eq!(e.to_errno(), -libc::EBUSY);
        let e = Error::from(libublk::UblkError::OtherError(libc::EPERM));
        assert_eq!(e.to_errno(), -libc::EPERM);
        let e = Error::from(libublk::UblkError::QueueIsDown);
        assert_eq!(e.to_errno(), -libc::ENODEV);
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::from(libublk::UblkError::IOError(io)).to_errno(), -libc::ENOENT);
    }

    #[test]
    fn every_errno_is_negative() {
        let all = [
            Error::Io(String::new()),
            Error::ReadOnly,
            Error::InvalidOption(String::new()),
            Error::NotRecoverable { dev_id: 0, state: "DEAD".into() },
            Error::Ublk(libublk::UblkError::OtherError(0)),
            Error::Os { context: "x", source: std::io::Error::other("no errno") },
        ];
        for e in all {
            assert!(e.to_errno() < 0, "{e:?}");
        }
    }
}
