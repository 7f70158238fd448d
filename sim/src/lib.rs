//! A deterministic fault simulator for starblk's history model, in the
//! spirit of TigerBeetle's VOPR. Simulated replicas and hosts run the
//! decision core of `starblk_replica::history` over a simulated network,
//! disk and clock, from one seeded event queue: a seed replays exactly.
//! See `docs/simulator.md`.

mod chaos;
pub mod checker;
mod fence;
pub mod host;
pub mod members;
pub mod model;
pub mod net;
pub mod replica;
pub mod rng;
pub mod rules;
pub mod summary;
mod world;

pub use world::{run_seed, Options, Outcome};
