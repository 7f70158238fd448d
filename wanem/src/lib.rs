//! WAN emulator: UDP and TCP relays with delay, loss and a cut switch.
