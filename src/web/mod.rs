//! The browser shell: drives the [core](crate::core) with IndexedDB, `fetch`, timers, Web Locks
//! and `BroadcastChannel`, and exposes the JavaScript API ([`api::Outbox`]).
//!
//! It runs in a service worker (Chrome MV3 background), a window (popup, options page, Firefox
//! event page) and a dedicated worker. It never calls `window()`: every global is reached
//! through `globalThis`.

pub mod api;
pub mod backup;
pub mod error;
pub mod idb;
pub mod platform;
pub mod schema;
pub mod session;
pub mod store;
pub mod transport;
pub mod views;

pub use api::Outbox;
pub use error::{Error, JsError};
