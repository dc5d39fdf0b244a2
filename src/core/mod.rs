//! The sans-IO delivery core: every decision, no browser, no clock, no randomness of its own.
//!
//! # Contract
//!
//! - **Time comes in.** Every call that needs the time takes `now` ([`Millis`] since the epoch).
//! - **Randomness comes in.** Op ids are made by the caller from random bytes
//!   ([`OpId::from_random_bytes`]); jitter and rebased ids come from a [`Rng`] seeded by the
//!   caller ([`Drainer::new`]). The same seed and inputs replay the same decisions.
//! - **I/O goes out.** The [`Session`] (one per context) is driven with `handle(now, input)`,
//!   then `poll_action()` until it returns `None`, then `poll_timeout()`; it runs a [`Drainer`]
//!   (the delivery decisions) while it holds the drain lock. Actions are performed in order, and a
//!   blocking one (a store transaction, the lock) is answered before the next is taken: a write is
//!   committed before any later action, so a context that dies at any point resumes from the
//!   store without losing or repeating a decision.
//! - **Storage is described, not performed.** The functions in [`store`] say what one
//!   transaction reads and writes, against the [`QueueTxn`] trait. The browser shell implements
//!   it over IndexedDB; [`MemoryStore`] implements it for native tests.
//!
//! See `docs/DELIVERY.md` for the delivery semantics these modules implement.

pub mod admit;
pub mod backoff;
pub mod breaker;
pub mod codec;
pub mod config;
pub mod copy;
pub mod drain;
pub mod event;
pub mod json;
pub mod memory;
pub mod op;
pub mod outcome;
pub mod records;
pub mod retry_after;
pub mod rng;
pub mod session;
pub mod store;
pub mod time;
pub mod wire;

pub use admit::Refusal;
pub use backoff::{Backoff, Strategy};
pub use breaker::{Breaker, BreakerConfig};
pub use config::{Config, ConflictPolicy, KindPolicy, SendMode};
pub use drain::{Action, Drainer, Input, Request, RequestId, WakeReason};
pub use event::{ConflictOutcome, Event};
pub use memory::MemoryStore;
pub use op::{Draft, Op, OpId, Priority};
pub use outcome::Reply;
pub use records::{
    Counters, DeadCause, DeadLetter, KeyRecord, ParkedConflict, Receipt, Resolution,
};
pub use rng::Rng;
pub use session::{Action as SessionAction, Input as SessionInput, Session, credentials_checksum};
pub use store::{Fate, QueueTxn, Write};
pub use time::Millis;
