//! An in-memory [`QueueTxn`], with the same indexes as the IndexedDB schema.
//!
//! It backs the native tests and the model test, and documents by example what the browser store
//! must do. Each call on it is one whole transaction: the functions of
//! [`store`](super::store) never suspend on it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::admit::Refusal;
use super::breaker::Breaker;
use super::op::{Op, OpId};
use super::records::{Counters, DeadLetter, KeyRecord, ParkedConflict};
use super::store::QueueTxn;
use super::time::Millis;

/// The whole persisted state of one outbox, in maps.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    ops: BTreeMap<u64, Op>,
    /// The due index: `(next_attempt_at, seq)` for head ops only.
    due: BTreeSet<(Millis, u64)>,
    /// The entity index: `(entity, seq)`.
    by_entity: BTreeSet<(String, u64)>,
    counters: Counters,
    dead_letters: BTreeMap<OpId, DeadLetter>,
    conflicts: BTreeMap<OpId, ParkedConflict>,
    keys: BTreeMap<String, KeyRecord>,
    /// The persisted breaker.
    pub breaker: Breaker,
    /// The persisted credential pause.
    pub paused: bool,
    /// The persisted checksum of refused credentials.
    pub refused: Option<u32>,
}

impl MemoryStore {
    /// All pending ops, by `seq`.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.ops.values()
    }

    /// The counters record.
    pub fn counters_record(&self) -> Counters {
        self.counters
    }

    /// All dead letters.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        self.dead_letters.values()
    }

    /// All parked conflicts.
    pub fn conflicts(&self) -> impl Iterator<Item = &ParkedConflict> {
        self.conflicts.values()
    }

    /// All callers' key records.
    pub fn keys(&self) -> impl Iterator<Item = &KeyRecord> {
        self.keys.values()
    }

    fn unindex(&mut self, seq: u64) -> Option<Op> {
        let old = self.ops.remove(&seq)?;
        if let Some(at) = old.next_attempt_at {
            self.due.remove(&(at, seq));
        }
        if let Some(entity) = &old.entity {
            self.by_entity.remove(&(entity.clone(), seq));
        }
        Some(old)
    }
}

impl QueueTxn for MemoryStore {
    type Error = Refusal;

    async fn get_op(&mut self, seq: u64) -> Result<Option<Op>, Refusal> {
        Ok(self.ops.get(&seq).cloned())
    }

    async fn put_op(&mut self, op: &Op) -> Result<(), Refusal> {
        self.unindex(op.seq);
        if let Some(at) = op.next_attempt_at {
            self.due.insert((at, op.seq));
        }
        if let Some(entity) = &op.entity {
            self.by_entity.insert((entity.clone(), op.seq));
        }
        self.ops.insert(op.seq, op.clone());
        Ok(())
    }

    async fn delete_op(&mut self, seq: u64) -> Result<(), Refusal> {
        self.unindex(seq);
        Ok(())
    }

    async fn next_on_entity(&mut self, entity: &str, after: u64) -> Result<Option<Op>, Refusal> {
        let next = self
            .by_entity
            .range((entity.to_owned(), after + 1)..)
            .next()
            .filter(|(e, _)| e == entity)
            .map(|(_, seq)| self.ops[seq].clone());
        Ok(next)
    }

    async fn last_on_entity(&mut self, entity: &str) -> Result<Option<Op>, Refusal> {
        let last = self
            .by_entity
            .range((entity.to_owned(), 0)..=(entity.to_owned(), u64::MAX))
            .next_back()
            .map(|(_, seq)| self.ops[seq].clone());
        Ok(last)
    }

    async fn due_heads(
        &mut self,
        now: Millis,
        limit: usize,
    ) -> Result<(Vec<Op>, Option<Millis>), Refusal> {
        let mut iter = self.due.iter();
        let mut ops = Vec::new();
        for &(at, seq) in iter.by_ref() {
            if at > now || ops.len() == limit {
                return Ok((ops, Some(at)));
            }
            ops.push(self.ops[&seq].clone());
        }
        Ok((ops, None))
    }

    async fn counters(&mut self) -> Result<Counters, Refusal> {
        Ok(self.counters)
    }

    async fn put_counters(&mut self, counters: &Counters) -> Result<(), Refusal> {
        self.counters = *counters;
        Ok(())
    }

    async fn get_dead_letter(&mut self, id: OpId) -> Result<Option<DeadLetter>, Refusal> {
        Ok(self.dead_letters.get(&id).cloned())
    }

    async fn put_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), Refusal> {
        self.dead_letters.insert(letter.op.id, letter.clone());
        Ok(())
    }

    async fn delete_dead_letter(&mut self, id: OpId) -> Result<(), Refusal> {
        self.dead_letters.remove(&id);
        Ok(())
    }

    async fn get_conflict(&mut self, id: OpId) -> Result<Option<ParkedConflict>, Refusal> {
        Ok(self.conflicts.get(&id).cloned())
    }

    async fn put_conflict(&mut self, conflict: &ParkedConflict) -> Result<(), Refusal> {
        self.conflicts.insert(conflict.op.id, conflict.clone());
        Ok(())
    }

    async fn delete_conflict(&mut self, id: OpId) -> Result<(), Refusal> {
        self.conflicts.remove(&id);
        Ok(())
    }

    async fn put_breaker(&mut self, breaker: &Breaker) -> Result<(), Refusal> {
        self.breaker = *breaker;
        Ok(())
    }

    async fn put_paused(&mut self, paused: bool) -> Result<(), Refusal> {
        self.paused = paused;
        Ok(())
    }

    async fn put_refused(&mut self, checksum: u32) -> Result<(), Refusal> {
        self.refused = Some(checksum);
        Ok(())
    }

    async fn get_key(&mut self, key: &str) -> Result<Option<KeyRecord>, Refusal> {
        Ok(self.keys.get(key).cloned())
    }

    async fn put_key(&mut self, record: &KeyRecord) -> Result<(), Refusal> {
        self.keys.insert(record.key.clone(), record.clone());
        Ok(())
    }

    async fn purge_keys(&mut self, before: Millis, limit: usize) -> Result<usize, Refusal> {
        let old: Vec<String> = self
            .keys
            .values()
            .filter(|r| r.at < before)
            .take(limit)
            .map(|r| r.key.clone())
            .collect();
        for key in &old {
            self.keys.remove(key);
        }
        Ok(old.len())
    }
}

/// Runs a store function against a [`MemoryStore`] to completion. Such futures never wait, so
/// this needs no executor; it panics if one does, which would be a bug in the store.
pub fn run_now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a MemoryStore transaction suspended"),
    }
}
