//! The queue's storage logic, written once against an abstract transaction.
//!
//! The core performs no I/O, but what a transaction must read and write to keep the queue's
//! invariants is a decision, so it lives here. [`QueueTxn`] is the storage interface: the browser
//! shell implements it over one IndexedDB transaction, and [`MemoryStore`](super::memory::MemoryStore)
//! implements it over maps for native tests. Every function below runs inside one transaction,
//! so it either happens completely or not at all.
//!
//! Invariants kept here:
//! - Only the head of each entity (its lowest pending `seq`) has a `next_attempt_at`; the others
//!   have none. So the due index holds exactly the sendable ops, and reading it costs the same
//!   whatever the length of the queue.
//! - When an op leaves the queue, its entity's next op becomes the head. If the op left without
//!   taking effect (dead letter, dropped or parked conflict), the next op's `prev` is relinked
//!   past it, so the server does not wait for it forever.
//! - `Counters` always match the ops stored.

use super::admit::{Refusal, admit};
use super::breaker::Breaker;
use super::config::Config;
use super::op::{Draft, Op, OpId};
use super::records::{Counters, DeadCause, DeadLetter, ParkedConflict, Receipt, Resolution};
use super::time::Millis;

/// One transaction over the queue's records. Each method is one read or write of the store.
#[allow(async_fn_in_trait)]
pub trait QueueTxn {
    /// A storage failure. It must be able to carry a [`Refusal`], so that admission can fail
    /// through the same path and abort the transaction.
    type Error: From<Refusal>;

    /// The op stored under `seq`.
    async fn get_op(&mut self, seq: u64) -> Result<Option<Op>, Self::Error>;
    /// Stores `op` under its `seq`, replacing any op there.
    async fn put_op(&mut self, op: &Op) -> Result<(), Self::Error>;
    /// Deletes the op stored under `seq`.
    async fn delete_op(&mut self, seq: u64) -> Result<(), Self::Error>;
    /// The pending op on `entity` with the lowest `seq` above `after`.
    async fn next_on_entity(&mut self, entity: &str, after: u64)
    -> Result<Option<Op>, Self::Error>;
    /// The pending op on `entity` with the highest `seq`.
    async fn last_on_entity(&mut self, entity: &str) -> Result<Option<Op>, Self::Error>;
    /// Up to `limit` head ops with `next_attempt_at <= now`, earliest first (ties by `seq`), and
    /// the `next_attempt_at` of the first head not returned.
    async fn due_heads(
        &mut self,
        now: Millis,
        limit: usize,
    ) -> Result<(Vec<Op>, Option<Millis>), Self::Error>;
    /// The counters record.
    async fn counters(&mut self) -> Result<Counters, Self::Error>;
    /// Replaces the counters record.
    async fn put_counters(&mut self, counters: &Counters) -> Result<(), Self::Error>;
    /// The dead letter for op `id`.
    async fn get_dead_letter(&mut self, id: OpId) -> Result<Option<DeadLetter>, Self::Error>;
    /// Stores a dead letter under its op's id.
    async fn put_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), Self::Error>;
    /// Deletes the dead letter for op `id`.
    async fn delete_dead_letter(&mut self, id: OpId) -> Result<(), Self::Error>;
    /// The parked conflict for op `id`.
    async fn get_conflict(&mut self, id: OpId) -> Result<Option<ParkedConflict>, Self::Error>;
    /// Stores a parked conflict under its op's id.
    async fn put_conflict(&mut self, conflict: &ParkedConflict) -> Result<(), Self::Error>;
    /// Deletes the parked conflict for op `id`.
    async fn delete_conflict(&mut self, id: OpId) -> Result<(), Self::Error>;
    /// Persists the breaker.
    async fn put_breaker(&mut self, breaker: &Breaker) -> Result<(), Self::Error>;
    /// Persists whether delivery is paused for credentials.
    async fn put_paused(&mut self, paused: bool) -> Result<(), Self::Error>;

    /// [`get_op`](Self::get_op) for each of `seqs`, in order. A store that can have several
    /// reads in flight (IndexedDB can) should issue them together: a batch then costs about
    /// one round trip instead of one per op.
    async fn get_ops(&mut self, seqs: &[u64]) -> Result<Vec<Option<Op>>, Self::Error> {
        let mut found = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            found.push(self.get_op(seq).await?);
        }
        Ok(found)
    }

    /// [`next_on_entity`](Self::next_on_entity) for each `(entity, after)`, in order; issued
    /// together where the store can.
    async fn next_on_entities(
        &mut self,
        keys: &[(&str, u64)],
    ) -> Result<Vec<Option<Op>>, Self::Error> {
        let mut found = Vec::with_capacity(keys.len());
        for &(entity, after) in keys {
            found.push(self.next_on_entity(entity, after).await?);
        }
        Ok(found)
    }

    /// The counters and, for an entity, its [`last_on_entity`](Self::last_on_entity): what
    /// admission reads. Issued together where the store can.
    async fn counters_and_last(
        &mut self,
        entity: Option<&str>,
    ) -> Result<(Counters, Option<Op>), Self::Error> {
        let counters = self.counters().await?;
        let last = match entity {
            Some(entity) => self.last_on_entity(entity).await?,
            None => None,
        };
        Ok((counters, last))
    }
}

/// A change the drainer asks to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Store this op in place of the one with the same `seq` (rescheduled, rebased, isolated).
    Update(Op),
    /// The op leaves the queue.
    Finish {
        /// The op, as the drainer last had it.
        op: Op,
        /// Where it goes.
        fate: Fate,
    },
    /// Persist the breaker.
    Breaker(Breaker),
    /// Persist the credential pause.
    Paused(bool),
}

/// How an op leaves the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// It took effect on the server.
    Delivered {
        /// It took effect through an earlier copy, perhaps one sent under an earlier `seq` (a
        /// retried dead letter keeps its id), so the server's `last` may be below this op's
        /// `seq`: the next op is relinked past it. (When it took effect under this `seq`,
        /// relinking changes nothing the server checks: `prev` only drops to one already passed.)
        duplicate: bool,
    },
    /// It conflicted and the server's version stands (`server-wins`).
    Dropped,
    /// Delivery gave up on it.
    DeadLettered {
        /// Why, for the user.
        reason: String,
        /// The final HTTP status, if any.
        status: Option<u16>,
        /// Which rule gave up.
        cause: DeadCause,
    },
    /// It conflicted and waits for the user (`manual`).
    Parked {
        /// The server's version.
        server_version: Option<u64>,
        /// The server's state as JSON text.
        server_state: Option<String>,
    },
}

/// Puts a new op in the queue. See [`admit`] for the rules.
pub async fn enqueue<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    draft: Draft,
    id: OpId,
    now: Millis,
) -> Result<Receipt, T::Error> {
    let (counters, tail) = txn.counters_and_last(draft.entity.as_deref()).await?;
    let admission = admit(config, &counters, tail.as_ref(), draft, id, now)?;
    if let Some(old) = &admission.replaces {
        txn.delete_op(old.seq).await?;
    }
    txn.put_op(&admission.op).await?;
    txn.put_counters(&admission.counters).await?;
    Ok(Receipt {
        id,
        seq: admission.op.seq,
        replaced: admission.replaces.map(|old| old.id),
    })
}

/// Records an attempt before its request goes out: stores each op as given (with its attempt
/// counted and its lease as `next_attempt_at`) if the stored copy is still the one the drainer
/// loaded. Returns the `seq`s of ops that changed underneath (replaced by coalescing, or taken
/// by another drainer); they must not be sent.
pub async fn lease<T: QueueTxn>(txn: &mut T, ops: &[Op]) -> Result<Vec<u64>, T::Error> {
    let seqs: Vec<u64> = ops.iter().map(|op| op.seq).collect();
    let stored = txn.get_ops(&seqs).await?;
    let mut vanished = Vec::new();
    for (op, stored) in ops.iter().zip(stored) {
        match stored {
            Some(stored) if stored.id == op.id && stored.attempts + 1 == op.attempts => {
                txn.put_op(op).await?;
            }
            _ => vanished.push(op.seq),
        }
    }
    Ok(vanished)
}

/// Persists the drainer's writes. Everything it must read (the stored copy of each finishing
/// op, each entity's next op, the counters) is read first, in batches, then everything is written.
pub async fn apply<T: QueueTxn>(
    txn: &mut T,
    writes: &[Write],
    now: Millis,
) -> Result<(), T::Error> {
    let finishing: Vec<&Op> = writes
        .iter()
        .filter_map(|write| match write {
            Write::Finish { op, .. } => Some(op),
            _ => None,
        })
        .collect();
    let mut counters = None;
    let (mut stored, mut successors) = (Vec::new().into_iter(), Vec::new().into_iter());
    if !finishing.is_empty() {
        let seqs: Vec<u64> = finishing.iter().map(|op| op.seq).collect();
        let keys: Vec<(&str, u64)> = finishing
            .iter()
            .filter_map(|op| Some((op.entity.as_deref()?, op.seq)))
            .collect();
        stored = txn.get_ops(&seqs).await?.into_iter();
        successors = txn.next_on_entities(&keys).await?.into_iter();
        counters = Some(txn.counters().await?);
    }
    for write in writes {
        match write {
            Write::Update(op) => txn.put_op(op).await?,
            Write::Finish { op, fate } => {
                let successor = match op.entity {
                    Some(_) => successors.next().flatten(),
                    None => None,
                };
                // Finishing twice (a replayed write) must not count twice.
                let stored = match stored.next().flatten() {
                    Some(stored) if stored.id == op.id => stored,
                    _ => continue,
                };
                txn.delete_op(op.seq).await?;
                if let Some(c) = &mut counters {
                    c.pending = c.pending.saturating_sub(1);
                    c.bytes = c.bytes.saturating_sub(stored.size());
                }
                match fate {
                    Fate::Delivered { .. } | Fate::Dropped => {}
                    Fate::DeadLettered {
                        reason,
                        status,
                        cause,
                    } => {
                        txn.put_dead_letter(&DeadLetter {
                            op: op.clone(),
                            reason: reason.clone(),
                            status: *status,
                            cause: *cause,
                            at: now,
                        })
                        .await?;
                    }
                    Fate::Parked {
                        server_version,
                        server_state,
                    } => {
                        txn.put_conflict(&ParkedConflict {
                            op: op.clone(),
                            server_version: *server_version,
                            server_state: server_state.clone(),
                            at: now,
                        })
                        .await?;
                    }
                }
                if let Some(next) = successor {
                    txn.put_op(&promote(next, op, fate, now)).await?;
                }
            }
            Write::Breaker(breaker) => txn.put_breaker(breaker).await?,
            Write::Paused(paused) => txn.put_paused(*paused).await?,
        }
    }
    if let Some(c) = counters {
        txn.put_counters(&c).await?;
    }
    Ok(())
}

/// Makes `next` the head of its entity after `departed` left with `fate`. Unless `departed`
/// took effect under its own `seq` (a fresh delivery), `next` is relinked to depend on what
/// `departed` depended on, so the server does not wait for an op that will never arrive. (A
/// duplicate may have taken effect under an earlier `seq`; relinking after a real effect changes
/// nothing the server checks, since `prev` only drops to a `seq` it has passed.)
pub fn promote(mut next: Op, departed: &Op, fate: &Fate, now: Millis) -> Op {
    let fresh = matches!(fate, Fate::Delivered { duplicate: false });
    if !fresh && next.prev == departed.seq {
        next.prev = departed.prev;
    }
    next.next_attempt_at = Some(next.next_attempt_at.map_or(now, |t| t.min(now)));
    next
}

/// Queues a dead letter's op again and removes the dead letter. It keeps its id unless the server
/// stored a final answer under that id (see [`DeadLetter::reached_server`]); then it gets
/// `fresh_id`.
pub async fn retry_dead_letter<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    id: OpId,
    fresh_id: OpId,
    now: Millis,
) -> Result<Receipt, T::Error> {
    let letter = txn
        .get_dead_letter(id)
        .await?
        .ok_or(Refusal::NotFound(id))?;
    let new_id = if letter.reached_server() {
        fresh_id
    } else {
        id
    };
    let receipt = enqueue(txn, config, letter.op.draft(), new_id, now).await?;
    txn.delete_dead_letter(id).await?;
    Ok(receipt)
}

/// Removes a dead letter for good.
pub async fn discard_dead_letter<T: QueueTxn>(txn: &mut T, id: OpId) -> Result<(), T::Error> {
    txn.get_dead_letter(id)
        .await?
        .ok_or(Refusal::NotFound(id))?;
    txn.delete_dead_letter(id).await
}

/// Settles a parked conflict. `KeepMine` queues the op again against the server's version, with
/// `fresh_id` (the old id's conflict answer is stored on the server); `TakeTheirs` drops it.
pub async fn resolve_conflict<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    id: OpId,
    resolution: Resolution,
    fresh_id: OpId,
    now: Millis,
) -> Result<Option<Receipt>, T::Error> {
    let conflict = txn.get_conflict(id).await?.ok_or(Refusal::NotFound(id))?;
    let receipt = match resolution {
        Resolution::KeepMine => {
            let mut draft = conflict.op.draft();
            draft.base_version = conflict.server_version.or(draft.base_version);
            Some(enqueue(txn, config, draft, fresh_id, now).await?)
        }
        Resolution::TakeTheirs => None,
    };
    txn.delete_conflict(id).await?;
    Ok(receipt)
}
