pub mod config;
pub mod plan;
pub mod size;
pub mod engine;
pub mod control;
pub mod bench;
