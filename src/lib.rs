//! `outbox`: durable, exactly-once delivery of user actions from a browser extension to a backend.
//!
//! The crate has two halves. [`core`] makes every delivery decision and is plain Rust, tested
//! natively. `web` (compiled for `wasm32` only) drives the core in the browser: IndexedDB,
//! `fetch`, timers, and the JavaScript API.
#![deny(missing_docs)]

pub mod core;
#[cfg(target_arch = "wasm32")]
pub mod web;
