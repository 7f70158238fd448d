//! The ublk frontend.
