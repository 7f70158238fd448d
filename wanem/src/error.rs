//! The one error type of this crate.

use std::io;

/// Everything that can go wrong when configuring or starting a relay.
///
/// Runtime I/O errors on the forwarding path are not returned: they are
/// counted in the statistics and logged, because a relay must keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A link parameter is outside its allowed range (for example a
    /// probability above 1 or a negative delay).
    #[error("invalid value {value:?} for {name}: expected {expected}")]
    InvalidParam {
        /// The parameter's name as used in commands and flags.
        name: String,
        /// The rejected value, as given.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A control command or setting name is not known.
    #[error("unknown {what} {name:?}; expected one of: {expected}")]
    Unknown {
        /// What kind of word it was ("command", "setting", "direction").
        what: &'static str,
        /// The word as given.
        name: String,
        /// The accepted words.
        expected: &'static str,
    },
    /// Binding a listening socket failed (address in use, not local, ...).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: String,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A socket option or other setup step failed.
    #[error("{context}: {source}")]
    Io {
        /// Which step failed.
        context: &'static str,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The operating system refused to start a worker thread.
    #[error("cannot spawn thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The operating system's reason.
        source: io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidParam`].
    pub(crate) fn invalid(name: &str, value: impl ToString, expected: &'static str) -> Self {
        Error::InvalidParam { name: name.to_string(), value: value.to_string(), expected }
    }

    /// Shorthand for [`Error::Io`] from a closure-friendly position.
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Error::Io { context, source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
