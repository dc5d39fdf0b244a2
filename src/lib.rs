//! outbox
pub mod core;
