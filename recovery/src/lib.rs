//! Recovery planning: which of quick, replay, incremental, full or
//! rollback recovery brings a returning replica up to date, from which
//! peer, and why a replica that none can serve stays lagging
//! (`docs/design.md`, "Recovery"). Pure functions, no I/O: the host
//! engine calls them with what it knows, and the property tests here
//! check the rules.
//!
//! The execution lives with the data: quick recovery in the host's link
//! (it streams its write queue), replay and copies in the replica
//! (`starblk_replica::replay`, `starblk_replica::copy`), which pulls from
//! its peer directly so the data never passes through the host.

pub mod plan;
pub mod progress;
pub mod rate;

pub use plan::{plan, LagReason, Peer, Plan, Queue, Returning};
pub use progress::{Meter, ProgressView};
pub use rate::{
    AutoRateView, Controller as RateController, Params as RateParams, Phase as RatePhase, Sample as RateSample,
};
