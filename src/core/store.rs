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

use super::admit::{Refusal, admit, validate_key};
use super::breaker::Breaker;
use super::config::Config;
use super::copy::{Copied, CopiedOp, CopyWrite, Rebuilt};
use super::op::{Draft, Op, OpId};
use super::records::{
    Counters, DeadCause, DeadLetter, KeyRecord, ParkedConflict, Receipt, Resolution, fingerprint,
};
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
    /// Persists the checksum of credentials the server refused (never the credentials).
    async fn put_refused(&mut self, checksum: u32) -> Result<(), Self::Error>;
    /// The record of a caller's key.
    async fn get_key(&mut self, key: &str) -> Result<Option<KeyRecord>, Self::Error>;
    /// Stores the record of a caller's key.
    async fn put_key(&mut self, record: &KeyRecord) -> Result<(), Self::Error>;
    /// Deletes up to `limit` key records made before `before`; returns how many went.
    async fn purge_keys(&mut self, before: Millis, limit: usize) -> Result<usize, Self::Error>;

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

    /// Everything admission reads: the counters, for an entity its
    /// [`last_on_entity`](Self::last_on_entity), and for a caller's key its record. Issued
    /// together where the store can.
    async fn admission_reads(
        &mut self,
        entity: Option<&str>,
        key: Option<&str>,
    ) -> Result<(Counters, Option<Op>, Option<KeyRecord>), Self::Error> {
        let counters = self.counters().await?;
        let last = match entity {
            Some(entity) => self.last_on_entity(entity).await?,
            None => None,
        };
        let record = match key {
            Some(key) => self.get_key(key).await?,
            None => None,
        };
        Ok((counters, last, record))
    }
}

/// A change the drainer asks to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Store this op in place of the one with the same `seq` (rescheduled, rebased, isolated),
    /// if the stored one is still the copy this drainer sent: id `was`, and the same attempt
    /// count. Otherwise another drainer took the op over (after a lost lock) or finished it, and
    /// the write is stale.
    Update {
        /// The op's new record.
        op: Op,
        /// Its id when it was sent (a rebase gives it a new one).
        was: OpId,
    },
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
    /// Persist the checksum of refused credentials.
    Refused(u32),
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
        /// The server left its state out.
        server_state_omitted: bool,
    },
}

/// A caller's idempotency key for one call: the call made again with the same key returns the
/// first call's answer instead of acting twice. (A page that lost the answer to an `enqueue`
/// cannot tell whether its op was queued; retrying with the key settles it.)
#[derive(Debug, Clone, Copy)]
pub struct CallKey<'a> {
    /// The key, checked by [`validate_key`].
    pub key: &'a str,
    /// When the call was made.
    pub now: Millis,
}

/// The answer an earlier call with the same key got, if any: the replayed receipt (`None` when
/// the first call queued nothing), or `KeyReused` when that call asked something else.
fn replay(record: Option<KeyRecord>, print: u64) -> Result<Option<Option<Receipt>>, Refusal> {
    match record {
        None => Ok(None),
        Some(record) if record.fingerprint != print => Err(Refusal::KeyReused(record.key)),
        Some(record) => Ok(Some(record.receipt.map(|receipt| Receipt {
            replayed: true,
            ..receipt
        }))),
    }
}

/// The refusal for a key whose stored call queued nothing while this call would queue an op.
/// (Fingerprints name the kind of call, so this means another request came with the key.)
fn reused(key: Option<CallKey<'_>>) -> Refusal {
    Refusal::KeyReused(key.map(|k| k.key.to_owned()).unwrap_or_default())
}

/// Stores the key's record of this call; returns it.
async fn remember<T: QueueTxn>(
    txn: &mut T,
    key: Option<CallKey<'_>>,
    print: u64,
    receipt: &Option<Receipt>,
) -> Result<Option<KeyRecord>, T::Error> {
    let Some(CallKey { key, now }) = key else {
        return Ok(None);
    };
    let record = KeyRecord {
        key: key.to_owned(),
        fingerprint: print,
        receipt: receipt.clone(),
        at: now,
    };
    txn.put_key(&record).await?;
    Ok(Some(record))
}

/// Puts a new op in the queue. See [`admit`] for the rules. With a `key`, a repeated call
/// returns the first call's receipt (marked `replayed`) and queues nothing. The copy gets the
/// new op (with its key), loses the one it replaced, and learns the counters.
pub async fn enqueue<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    draft: Draft,
    id: OpId,
    key: Option<CallKey<'_>>,
    now: Millis,
) -> Result<Copied<Receipt>, T::Error> {
    if let Some(key) = key {
        validate_key(key.key)?;
    }
    let (counters, tail, record) = txn
        .admission_reads(draft.entity.as_deref(), key.map(|k| k.key))
        .await?;
    let print = draft.fingerprint();
    if let Some(earlier) = replay(record, print)? {
        let receipt = earlier.ok_or_else(|| reused(key))?;
        return Ok(Copied {
            value: receipt,
            copy: CopyWrite::default(),
        });
    }
    let (receipt, op, replaced, counters) =
        admit_new(txn, config, counters, tail, draft, id, now).await?;
    let kept = remember(txn, key, print, &Some(receipt.clone())).await?;
    let copy = CopyWrite {
        put: vec![CopiedOp { op, key: kept }],
        remove: replaced.into_iter().collect(),
        counters: Some(counters),
    };
    Ok(Copied {
        value: receipt,
        copy,
    })
}

/// Admits a draft and writes it: the receipt, the op as stored, the `seq` it replaced, the new
/// counters.
async fn admit_new<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    counters: Counters,
    tail: Option<Op>,
    draft: Draft,
    id: OpId,
    now: Millis,
) -> Result<(Receipt, Op, Option<u64>, Counters), T::Error> {
    let admission = admit(config, &counters, tail.as_ref(), draft, id, now)?;
    if let Some(old) = &admission.replaces {
        txn.delete_op(old.seq).await?;
    }
    txn.put_op(&admission.op).await?;
    txn.put_counters(&admission.counters).await?;
    let receipt = Receipt {
        id,
        seq: admission.op.seq,
        replaced: admission.replaces.as_ref().map(|old| old.id),
        replayed: false,
    };
    let replaced = admission.replaces.map(|old| old.seq);
    Ok((receipt, admission.op, replaced, admission.counters))
}

/// Puts a rebuilt queue ([`copy::rebuild`](super::copy::rebuild)) into an empty store: its ops,
/// counters and callers' keys. (The client id is the shell's to store.)
pub async fn restore<T: QueueTxn>(txn: &mut T, rebuilt: &Rebuilt) -> Result<(), T::Error> {
    for op in &rebuilt.ops {
        txn.put_op(op).await?;
    }
    for key in &rebuilt.keys {
        txn.put_key(key).await?;
    }
    txn.put_counters(&rebuilt.counters).await
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

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The `seq`s of the writes that were stale (see [`Write::Update`]; a finish of an op that is
    /// gone, or that another op took the place of) and so changed nothing: their events must not
    /// be reported.
    pub stale: Vec<u64>,
    /// What changed in the second copy: finished ops leave it; ops whose wire body changed (a
    /// rebase's new id, a successor relinked past an op that took no effect) are stored again.
    pub copy: CopyWrite,
}

/// Persists the drainer's writes. Everything it must read (the stored copy of each op written,
/// each finishing op's successor, the counters) is read first, in batches, then everything is
/// written.
pub async fn apply<T: QueueTxn>(
    txn: &mut T,
    writes: &[Write],
    now: Millis,
) -> Result<Applied, T::Error> {
    let touched: Vec<u64> = writes
        .iter()
        .filter_map(|write| match write {
            Write::Finish { op, .. } | Write::Update { op, .. } => Some(op.seq),
            _ => None,
        })
        .collect();
    let keys: Vec<(&str, u64)> = writes
        .iter()
        .filter_map(|write| match write {
            Write::Finish { op, .. } => Some((op.entity.as_deref()?, op.seq)),
            _ => None,
        })
        .collect();
    let finishing = writes.iter().any(|w| matches!(w, Write::Finish { .. }));
    let mut stored = txn.get_ops(&touched).await?.into_iter();
    let mut successors = txn.next_on_entities(&keys).await?.into_iter();
    let mut counters = match finishing {
        true => Some(txn.counters().await?),
        false => None,
    };
    let mut stale = Vec::new();
    let mut copy = CopyWrite::default();
    for write in writes {
        match write {
            Write::Update { op, was } => match stored.next().flatten() {
                Some(stored) if stored.id == *was && stored.attempts == op.attempts => {
                    txn.put_op(op).await?;
                    if op.id != *was {
                        copy.put.push(CopiedOp {
                            op: op.clone(),
                            key: None,
                        });
                    }
                }
                _ => stale.push(op.seq),
            },
            Write::Finish { op, fate } => {
                let successor = match op.entity {
                    Some(_) => successors.next().flatten(),
                    None => None,
                };
                // Finishing twice (a replayed write, or two drainers answered for one op) must
                // not count twice.
                let stored = match stored.next().flatten() {
                    Some(stored) if stored.id == op.id => stored,
                    _ => {
                        stale.push(op.seq);
                        continue;
                    }
                };
                txn.delete_op(op.seq).await?;
                copy.remove.push(op.seq);
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
                        server_state_omitted,
                    } => {
                        txn.put_conflict(&ParkedConflict {
                            op: op.clone(),
                            server_version: *server_version,
                            server_state: server_state.clone(),
                            server_state_omitted: *server_state_omitted,
                            at: now,
                        })
                        .await?;
                    }
                }
                if let Some(next) = successor {
                    let before = next.prev;
                    let promoted = promote(next, op, fate, now);
                    txn.put_op(&promoted).await?;
                    if promoted.prev != before {
                        copy.put.push(CopiedOp {
                            op: promoted,
                            key: None,
                        });
                    }
                }
            }
            Write::Breaker(breaker) => txn.put_breaker(breaker).await?,
            Write::Paused(paused) => txn.put_paused(*paused).await?,
            Write::Refused(checksum) => txn.put_refused(*checksum).await?,
        }
    }
    if let Some(c) = counters {
        txn.put_counters(&c).await?;
        copy.counters = Some(c);
    }
    Ok(Applied { stale, copy })
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

/// Reads what a keyed call on an existing record needs: the key's record (if any) first, so a
/// repeated call is answered without looking for a record that the first call removed.
async fn keyed_replay<T: QueueTxn>(
    txn: &mut T,
    key: Option<CallKey<'_>>,
    print: u64,
) -> Result<Option<Option<Receipt>>, T::Error> {
    let Some(key) = key else { return Ok(None) };
    validate_key(key.key)?;
    let record = txn.get_key(key.key).await?;
    Ok(replay(record, print)?)
}

/// Queues a dead letter's op again and removes the dead letter. It keeps its id unless the server
/// stored a final answer under that id (see [`DeadLetter::reached_server`]); then it gets
/// `fresh_id`. With a `key`, a repeated call returns the first call's receipt.
pub async fn retry_dead_letter<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    id: OpId,
    fresh_id: OpId,
    key: Option<CallKey<'_>>,
    now: Millis,
) -> Result<Copied<Receipt>, T::Error> {
    let print = fingerprint(&["retry-dead-letter", &id.to_string()]);
    if let Some(earlier) = keyed_replay(txn, key, print).await? {
        let receipt = earlier.ok_or_else(|| reused(key))?;
        return Ok(Copied {
            value: receipt,
            copy: CopyWrite::default(),
        });
    }
    let letter = txn
        .get_dead_letter(id)
        .await?
        .ok_or(Refusal::NotFound(id))?;
    let new_id = if letter.reached_server() {
        fresh_id
    } else {
        id
    };
    let queued = enqueue(txn, config, letter.op.draft(), new_id, None, now).await?;
    txn.delete_dead_letter(id).await?;
    remember(txn, key, print, &Some(queued.value.clone())).await?;
    Ok(queued)
}

/// Removes a dead letter for good. With a `key`, a repeated call succeeds again instead of
/// finding nothing.
pub async fn discard_dead_letter<T: QueueTxn>(
    txn: &mut T,
    id: OpId,
    key: Option<CallKey<'_>>,
) -> Result<(), T::Error> {
    let print = fingerprint(&["discard-dead-letter", &id.to_string()]);
    if keyed_replay(txn, key, print).await?.is_some() {
        return Ok(());
    }
    txn.get_dead_letter(id)
        .await?
        .ok_or(Refusal::NotFound(id))?;
    txn.delete_dead_letter(id).await?;
    remember(txn, key, print, &None).await.map(drop)
}

/// Settles a parked conflict. `KeepMine` queues the op again against the server's version, with
/// `fresh_id` (the old id's conflict answer is stored on the server); `TakeTheirs` drops it.
/// With a `key`, a repeated call returns the first call's answer.
pub async fn resolve_conflict<T: QueueTxn>(
    txn: &mut T,
    config: &Config,
    id: OpId,
    resolution: Resolution,
    fresh_id: OpId,
    key: Option<CallKey<'_>>,
    now: Millis,
) -> Result<Copied<Option<Receipt>>, T::Error> {
    let how = match resolution {
        Resolution::KeepMine => "keep-mine",
        Resolution::TakeTheirs => "take-theirs",
    };
    let print = fingerprint(&["resolve-conflict", &id.to_string(), how]);
    if let Some(earlier) = keyed_replay(txn, key, print).await? {
        return Ok(Copied {
            value: earlier,
            copy: CopyWrite::default(),
        });
    }
    let conflict = txn.get_conflict(id).await?.ok_or(Refusal::NotFound(id))?;
    let (receipt, copy) = match resolution {
        Resolution::KeepMine => {
            let mut draft = conflict.op.draft();
            draft.base_version = conflict.server_version.or(draft.base_version);
            let queued = enqueue(txn, config, draft, fresh_id, None, now).await?;
            (Some(queued.value), queued.copy)
        }
        Resolution::TakeTheirs => (None, CopyWrite::default()),
    };
    txn.delete_conflict(id).await?;
    remember(txn, key, print, &receipt).await?;
    Ok(Copied {
        value: receipt,
        copy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::memory::{MemoryStore, run_now};
    use crate::core::op::Priority;

    fn draft(payload: &str) -> Draft {
        Draft {
            entity: Some("pr/1".into()),
            kind: "comment".into(),
            payload: payload.into(),
            base_version: None,
            priority: Priority::User,
        }
    }

    fn id(n: u8) -> OpId {
        OpId::from_random_bytes([n; 16])
    }

    fn key(key: &str, now: Millis) -> Option<CallKey<'_>> {
        Some(CallKey { key, now })
    }

    fn queue(
        store: &mut MemoryStore,
        payload: &str,
        n: u8,
        k: Option<CallKey>,
    ) -> Result<Receipt, Refusal> {
        run_now(enqueue(
            store,
            &Config::default(),
            draft(payload),
            id(n),
            k,
            10,
        ))
        .map(|queued| queued.value)
    }

    #[test]
    fn an_enqueue_repeated_with_its_key_returns_the_first_receipt_and_queues_nothing() {
        let mut store = MemoryStore::default();
        let first = queue(&mut store, "{}", 1, key("k-1", 10)).unwrap();
        assert!(!first.replayed);
        let again = queue(&mut store, "{}", 2, key("k-1", 11)).unwrap();
        assert_eq!(
            (again.id, again.seq, again.replayed),
            (first.id, first.seq, true)
        );
        assert_eq!(store.ops().count(), 1, "the repeat queued nothing");
        assert_eq!(store.counters_record().next_seq, 2);
        let other = queue(&mut store, "{}", 3, key("k-2", 12)).unwrap();
        assert_ne!(other.id, first.id, "another key is another op");
        let unkeyed = queue(&mut store, "{}", 4, None).unwrap();
        assert_eq!(unkeyed.seq, 3);
        assert_eq!(store.ops().count(), 3);
    }

    #[test]
    fn a_key_that_comes_with_another_request_is_refused_and_changes_nothing() {
        let mut store = MemoryStore::default();
        queue(&mut store, "{}", 1, key("k-1", 10)).unwrap();
        let refused = queue(&mut store, r#"{"other":1}"#, 2, key("k-1", 11)).unwrap_err();
        assert_eq!(refused, Refusal::KeyReused("k-1".into()));
        assert_eq!(store.ops().count(), 1);
        let bad = queue(&mut store, "{}", 3, key("with space", 11)).unwrap_err();
        assert!(matches!(bad, Refusal::InvalidKey(_)));
        let long = "k".repeat(201);
        assert!(matches!(
            queue(&mut store, "{}", 3, key(&long, 11)),
            Err(Refusal::InvalidKey(_))
        ));
    }

    fn dead_letter(store: &mut MemoryStore) -> OpId {
        let receipt = queue(store, "{}", 1, None).unwrap();
        let op = run_now(store.get_op(receipt.seq)).unwrap().unwrap();
        let fate = Fate::DeadLettered {
            reason: "no".into(),
            status: Some(422),
            cause: DeadCause::Rejected,
        };
        run_now(apply(store, &[Write::Finish { op, fate }], 20)).unwrap();
        receipt.id
    }

    #[test]
    fn keyed_dead_letter_calls_answer_a_repeat_as_the_first_time() {
        let config = Config::default();
        let mut store = MemoryStore::default();
        let dead = dead_letter(&mut store);
        let retry = |store: &mut MemoryStore, k| {
            run_now(retry_dead_letter(store, &config, dead, id(9), k, 30)).map(|q| q.value)
        };
        let first = retry(&mut store, key("r-1", 30)).unwrap();
        let again = retry(&mut store, key("r-1", 31)).unwrap();
        assert_eq!(
            (again.id, again.seq, again.replayed),
            (first.id, first.seq, true)
        );
        assert_eq!(store.ops().count(), 1, "retried once");
        assert_eq!(retry(&mut store, None), Err(Refusal::NotFound(dead)));

        let dead = dead_letter(&mut store);
        let discard = |store: &mut MemoryStore, k| run_now(discard_dead_letter(store, dead, k));
        discard(&mut store, key("d-1", 40)).unwrap();
        discard(&mut store, key("d-1", 41)).expect("a repeated discard succeeds again");
        assert_eq!(discard(&mut store, None), Err(Refusal::NotFound(dead)));
        assert!(matches!(
            run_now(retry_dead_letter(
                &mut store,
                &config,
                dead,
                id(9),
                key("d-1", 42),
                42
            )),
            Err(Refusal::KeyReused(_))
        ));
    }

    #[test]
    fn a_keyed_conflict_resolution_repeats_its_first_answer() {
        let config = Config::default();
        let mut store = MemoryStore::default();
        let receipt = queue(&mut store, "{}", 1, None).unwrap();
        let op = run_now(store.get_op(receipt.seq)).unwrap().unwrap();
        let fate = Fate::Parked {
            server_version: Some(4),
            server_state: None,
            server_state_omitted: true,
        };
        run_now(apply(&mut store, &[Write::Finish { op, fate }], 20)).unwrap();
        let resolve = |store: &mut MemoryStore, how, k| {
            run_now(resolve_conflict(
                store,
                &config,
                receipt.id,
                how,
                id(7),
                k,
                30,
            ))
            .map(|q| q.value)
        };
        let first = resolve(&mut store, Resolution::KeepMine, key("c-1", 30)).unwrap();
        let again = resolve(&mut store, Resolution::KeepMine, key("c-1", 31)).unwrap();
        assert_eq!(
            again.as_ref().map(|r| (r.id, r.replayed)),
            first.as_ref().map(|r| (r.id, true))
        );
        assert_eq!(store.ops().count(), 1);
        assert!(matches!(
            resolve(&mut store, Resolution::TakeTheirs, key("c-1", 32)),
            Err(Refusal::KeyReused(_))
        ));
    }

    #[test]
    fn purging_keys_removes_only_those_made_before_the_cutoff_and_at_most_the_limit() {
        let mut store = MemoryStore::default();
        for (n, at) in [(1u8, 5), (2, 6), (3, 7), (4, 50)] {
            let name = format!("k-{n}");
            run_now(enqueue(
                &mut store,
                &Config::default(),
                draft("{}"),
                id(n),
                key(&name, at),
                at,
            ))
            .unwrap();
        }
        assert_eq!(run_now(store.purge_keys(10, 2)).unwrap(), 2);
        assert_eq!(run_now(store.purge_keys(10, 2)).unwrap(), 1);
        assert_eq!(run_now(store.purge_keys(10, 2)).unwrap(), 0);
        let left: Vec<&str> = store.keys().map(|r| r.key.as_str()).collect();
        assert_eq!(left, ["k-4"]);
    }
}
