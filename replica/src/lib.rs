//! Replica server, store, and wire protocol.
