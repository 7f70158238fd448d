//! FEC codecs for the network-sync link. Pure functions, no I/O.
