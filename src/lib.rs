pub mod bench;
pub mod config;
pub mod control;
pub mod engine;
pub mod plan;
pub mod size;
pub mod frontend;
