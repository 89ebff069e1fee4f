//! Subcommands.

pub mod role;
pub mod token;
pub mod up;
