//! The link's error type.

use std::io;

/// Everything the public API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `try_send`: the send window is full (backpressure). Retry after an
    /// `Acked` event or use the blocking `send`.
    #[error("send window full")]
    WouldBlock,
    /// A blocking call's timeout passed.
    #[error("timed out")]
    Timeout,
    /// `send` got a message over `max_message_bytes`.
    #[error("message of {len_bytes} bytes exceeds max_message_bytes = {max_bytes}")]
    MessageTooLarge {
        /// The message's length.
        len_bytes: usize,
        /// The configured limit.
        max_bytes: usize,
    },
    /// The link was closed (by `close`, by drop, or after a fatal error,
    /// which `Link::last_error` tells).
    #[error("link closed")]
    Closed,
    /// A configuration value is out of range.
    #[error("invalid link config: {reason}")]
    InvalidConfig {
        /// Which field and its allowed range.
        reason: &'static str,
    },
    /// The peer's hello asked for something this end cannot do (an FEC
    /// scheme, a size over our limits).
    #[error("incompatible peer: {reason}")]
    Incompatible {
        /// What did not fit.
        reason: String,
    },
    /// A socket or thread call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl LinkError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> LinkError {
        move |source| LinkError::Io { context, source }
    }
}
