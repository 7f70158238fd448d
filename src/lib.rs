pub mod bench;
pub mod config;
pub mod control;
pub mod engine;
pub mod frontend;
pub mod nbd;
pub mod plan;
pub mod size;
