//! Subcommands.

pub mod app;
pub mod bench;
pub mod client;
pub mod ctl;
pub mod demo;
pub mod role;
pub mod token;
pub mod up;
pub mod up_regions;
