//! The queue in IndexedDB: [`QueueTxn`] over one transaction, and the reads the API needs.

use js_sys::{Object, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{
    IdbCursorDirection, IdbCursorWithValue, IdbDatabase, IdbKeyRange, IdbObjectStore,
    IdbTransactionMode,
};

use super::error::{Error, Result};
use super::idb::{self, Durability, Pending, Txn};
use super::schema::*;
use crate::core::copy::Incident;
use crate::core::json::{FromJson, ToJson};
use crate::core::records::KeyRecord;
use crate::core::store::QueueTxn;
use crate::core::{Breaker, Counters, DeadLetter, Millis, Op, OpId, ParkedConflict};

/// Records are stored as JSON text (`json`) beside the few fields the key paths and indexes name
/// (`seq`, `next_attempt_at`, `entity`; `id` for dead letters and conflicts). IndexedDB clones a
/// string faster than an object of many fields, and the core's own JSON (`core::codec`) keeps
/// the module small. A field left unset keeps the record out of that index.
fn record(fields: &[(&str, JsValue)], json: String) -> JsValue {
    let record = Object::new();
    for (name, value) in fields {
        // Setting a property on a fresh object cannot fail.
        let _ = Reflect::set(&record, &(*name).into(), value);
    }
    let _ = Reflect::set(&record, &"json".into(), &json.into());
    record.into()
}

fn encode<T: ToJson + ?Sized>(value: &T) -> String {
    value.to_json()
}

/// Reads a record written by [`record`], or a meta value (JSON text itself).
fn decode<T: FromJson>(value: JsValue) -> Result<Option<T>> {
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    let text = match value.as_string() {
        Some(text) => text,
        None => Reflect::get(&value, &"json".into())
            .ok()
            .and_then(|json| json.as_string())
            .ok_or_else(|| data_error("a record without its json field"))?,
    };
    T::from_json(&text).map(Some).map_err(data_error)
}

fn data_error(error: impl std::fmt::Display) -> Error {
    // Records that fail to convert were written by an incompatible build: a storage fault.
    Error::Storage(super::error::JsError {
        name: "DataError".into(),
        message: error.to_string(),
    })
}

fn op_record(op: &Op) -> JsValue {
    let mut fields = vec![("seq", key(op.seq))];
    if let Some(at) = op.next_attempt_at {
        fields.push(("next_attempt_at", JsValue::from_f64(at as f64)));
    }
    if let Some(entity) = &op.entity {
        fields.push(("entity", JsValue::from_str(entity)));
    }
    record(&fields, encode(op))
}

fn keyed_record<T: ToJson>(id: OpId, value: &T) -> JsValue {
    record(&[("id", id.to_string().into())], encode(value))
}

fn key(seq: u64) -> JsValue {
    JsValue::from_f64(seq as f64)
}

/// What `stats()` reads.
pub struct Snapshot {
    /// The counters.
    pub counters: Counters,
    /// The client id.
    pub client: Option<OpId>,
    /// The breaker.
    pub breaker: Breaker,
    /// The pause flag.
    pub paused: bool,
    /// How many dead letters.
    pub dead_letters: u32,
    /// How many parked conflicts.
    pub conflicts: u32,
    /// The earliest `next_attempt_at` of any head op.
    pub earliest_due: Option<Millis>,
    /// The last storage incident.
    pub incident: Option<Incident>,
}

/// A handle on one outbox database.
#[derive(Debug, Clone)]
pub struct Store {
    db: IdbDatabase,
}

impl Store {
    /// Wraps an open connection (see [`schema::open`](super::schema::open)).
    pub fn new(db: IdbDatabase) -> Self {
        Store { db }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.db.close();
    }

    /// Removes the `versionchange` and `close` handlers set on the connection.
    pub fn clear_handlers(&self) {
        self.db.set_onversionchange(None);
        self.db.set_onclose(None);
    }

    /// Runs `body` in one read-write transaction over every store and commits it. If `body`
    /// fails, nothing it wrote is kept.
    pub async fn write<R>(
        &self,
        durability: Durability,
        body: impl AsyncFnOnce(&mut IdbTxn) -> Result<R>,
    ) -> Result<R> {
        let mut txn = IdbTxn::begin(&self.db, IdbTransactionMode::Readwrite, durability)?;
        match body(&mut txn).await {
            Ok(result) => {
                txn.txn.commit().await?;
                Ok(result)
            }
            Err(error) => {
                txn.txn.abort();
                Err(error)
            }
        }
    }

    /// Runs `body` in one read-only transaction.
    pub async fn read<R>(&self, body: impl AsyncFnOnce(&mut IdbTxn) -> Result<R>) -> Result<R> {
        let mut txn = IdbTxn::begin(&self.db, IdbTransactionMode::Readonly, Durability::Relaxed)?;
        let result = body(&mut txn).await;
        txn.txn.commit().await?;
        result
    }
}

/// One transaction over the outbox's stores.
pub struct IdbTxn {
    txn: Txn,
    ops: IdbObjectStore,
    dead_letters: IdbObjectStore,
    conflicts: IdbObjectStore,
    meta: IdbObjectStore,
    keys: IdbObjectStore,
}

impl IdbTxn {
    fn begin(db: &IdbDatabase, mode: IdbTransactionMode, durability: Durability) -> Result<Self> {
        let txn = Txn::begin(db, &ALL_STORES, mode, durability)?;
        Ok(IdbTxn {
            ops: txn.store(OPS)?,
            dead_letters: txn.store(DEAD_LETTERS)?,
            conflicts: txn.store(CONFLICTS)?,
            meta: txn.store(META)?,
            keys: txn.store(KEYS)?,
            txn,
        })
    }

    async fn get<T: FromJson>(store: &IdbObjectStore, key: &JsValue) -> Result<Option<T>> {
        decode(Self::issue_get(store, key)?.result().await?)
    }

    /// Starts a read, to await later: reads issued together finish in about one round trip.
    fn issue_get(store: &IdbObjectStore, key: &JsValue) -> Result<Pending> {
        Ok(idb::issue(store.get(key).map_err(Error::storage)?))
    }

    fn issue_next_on_entity(&self, entity: &str, after: u64) -> Result<Pending> {
        let index = self.ops.index(BY_ENTITY).map_err(Error::storage)?;
        let range = Self::entity_range(entity, Some(after))?;
        Ok(idb::issue(
            index.get(&range.into()).map_err(Error::storage)?,
        ))
    }

    /// The last op on `entity`, by a cursor walking `by_entity` backwards from its end.
    fn issue_last_on_entity(&self, entity: &str) -> Result<Pending> {
        let index = self.ops.index(BY_ENTITY).map_err(Error::storage)?;
        let range = Self::entity_range(entity, None)?;
        let request = index
            .open_cursor_with_range_and_direction(&range.into(), IdbCursorDirection::Prev)
            .map_err(Error::storage)?;
        Ok(idb::issue(request.unchecked_into()))
    }

    async fn cursor_op(cursor: Pending) -> Result<Option<Op>> {
        let cursor = cursor.result().await?;
        if cursor.is_null() {
            return Ok(None);
        }
        let cursor: IdbCursorWithValue = cursor.unchecked_into();
        decode(cursor.value().map_err(Error::storage)?)
    }

    /// Queues a put. Its failure aborts the transaction, which `commit` reports, so there is no
    /// need to wait for it here; not waiting lets IndexedDB pipeline the writes.
    fn put(store: &IdbObjectStore, value: &JsValue, key: Option<&str>) -> Result<()> {
        match key {
            Some(key) => store.put_with_key(value, &JsValue::from_str(key)),
            None => store.put(value),
        }
        .map(drop)
        .map_err(Error::storage)
    }

    fn delete(store: &IdbObjectStore, key: &JsValue) -> Result<()> {
        store.delete(key).map(drop).map_err(Error::storage)
    }

    /// The client id, if one was stored.
    pub async fn client(&mut self) -> Result<Option<OpId>> {
        Self::get(&self.meta, &META_CLIENT.into()).await
    }

    /// Stores the client id.
    pub fn put_client(&mut self, client: OpId) -> Result<()> {
        Self::put(&self.meta, &encode(&client).into(), Some(META_CLIENT))
    }

    /// Stores the last storage incident.
    pub fn put_incident(&mut self, incident: &Incident) -> Result<()> {
        Self::put(&self.meta, &encode(incident).into(), Some(META_INCIDENT))
    }

    /// Every pending op, in `seq` order, and the counters (to seed the second copy).
    pub async fn all_ops(&mut self) -> Result<(Vec<Op>, Counters)> {
        let counters = Self::issue_get(&self.meta, &META_COUNTERS.into())?;
        let request = self.ops.get_all().map_err(Error::storage)?;
        let ops = all(idb::wait(&request).await?)?;
        Ok((ops, decode(counters.result().await?)?.unwrap_or_default()))
    }

    /// The persisted breaker, pause flag, and checksum of the last refused credentials.
    pub async fn drainer_state(&mut self) -> Result<(Breaker, bool, Option<u32>)> {
        let breaker = Self::issue_get(&self.meta, &META_BREAKER.into())?;
        let paused = Self::issue_get(&self.meta, &META_PAUSED.into())?;
        let refused = Self::issue_get(&self.meta, &META_REFUSED.into())?;
        let breaker: Option<Breaker> = decode(breaker.result().await?)?;
        let paused: Option<bool> = decode(paused.result().await?)?;
        let refused: Option<u32> = decode(refused.result().await?)?;
        Ok((
            breaker.unwrap_or_default(),
            paused.unwrap_or(false),
            refused,
        ))
    }

    /// Everything `stats()` shows, read in one round.
    pub async fn snapshot(&mut self) -> Result<Snapshot> {
        let counters = Self::issue_get(&self.meta, &META_COUNTERS.into())?;
        let client = Self::issue_get(&self.meta, &META_CLIENT.into())?;
        let breaker = Self::issue_get(&self.meta, &META_BREAKER.into())?;
        let paused = Self::issue_get(&self.meta, &META_PAUSED.into())?;
        let incident = Self::issue_get(&self.meta, &META_INCIDENT.into())?;
        let dead = idb::issue(self.dead_letters.count().map_err(Error::storage)?);
        let parked = idb::issue(self.conflicts.count().map_err(Error::storage)?);
        let index = self.ops.index(BY_DUE).map_err(Error::storage)?;
        let earliest = idb::issue(
            index
                .open_key_cursor()
                .map_err(Error::storage)?
                .unchecked_into(),
        );
        let count = |v: JsValue| v.as_f64().unwrap_or(0.0) as u32;
        Ok(Snapshot {
            counters: decode(counters.result().await?)?.unwrap_or_default(),
            client: decode(client.result().await?)?,
            breaker: decode(breaker.result().await?)?.unwrap_or_default(),
            paused: decode(paused.result().await?)?.unwrap_or(false),
            incident: decode(incident.result().await?)?,
            dead_letters: count(dead.result().await?),
            conflicts: count(parked.result().await?),
            earliest_due: match earliest.result().await? {
                cursor if cursor.is_null() => None,
                cursor => cursor
                    .unchecked_into::<web_sys::IdbCursor>()
                    .key()
                    .ok()
                    .and_then(|k| k.as_f64())
                    .map(|k| k as Millis),
            },
        })
    }

    /// Up to `limit` pending ops, in `seq` order.
    pub async fn pending(&mut self, limit: u32) -> Result<Vec<Op>> {
        let request = self
            .ops
            .get_all_with_key_and_limit(&JsValue::UNDEFINED, limit)
            .map_err(Error::storage)?;
        all(idb::wait(&request).await?)
    }

    /// Every dead letter.
    pub async fn dead_letters(&mut self) -> Result<Vec<DeadLetter>> {
        let request = self.dead_letters.get_all().map_err(Error::storage)?;
        all(idb::wait(&request).await?)
    }

    /// Every parked conflict.
    pub async fn conflicts(&mut self) -> Result<Vec<ParkedConflict>> {
        let request = self.conflicts.get_all().map_err(Error::storage)?;
        all(idb::wait(&request).await?)
    }

    fn entity_range(entity: &str, after: Option<u64>) -> Result<IdbKeyRange> {
        let lower = js_sys::Array::of2(&entity.into(), &key(after.unwrap_or(0)));
        let upper = js_sys::Array::of2(&entity.into(), &key(u64::MAX));
        IdbKeyRange::bound_with_lower_open_and_upper_open(&lower, &upper, after.is_some(), false)
            .map_err(Error::storage)
    }
}

fn all<T: FromJson>(array: JsValue) -> Result<Vec<T>> {
    let array: js_sys::Array = array.unchecked_into();
    array
        .iter()
        .filter_map(|value| decode(value).transpose())
        .collect()
}

impl QueueTxn for IdbTxn {
    type Error = Error;

    async fn get_op(&mut self, seq: u64) -> Result<Option<Op>> {
        Self::get(&self.ops, &key(seq)).await
    }

    async fn put_op(&mut self, op: &Op) -> Result<()> {
        Self::put(&self.ops, &op_record(op), None)
    }

    async fn delete_op(&mut self, seq: u64) -> Result<()> {
        Self::delete(&self.ops, &key(seq))
    }

    async fn next_on_entity(&mut self, entity: &str, after: u64) -> Result<Option<Op>> {
        decode(self.issue_next_on_entity(entity, after)?.result().await?)
    }

    async fn last_on_entity(&mut self, entity: &str) -> Result<Option<Op>> {
        Self::cursor_op(self.issue_last_on_entity(entity)?).await
    }

    async fn get_ops(&mut self, seqs: &[u64]) -> Result<Vec<Option<Op>>> {
        let pending = seqs
            .iter()
            .map(|&seq| Self::issue_get(&self.ops, &key(seq)))
            .collect::<Result<Vec<_>>>()?;
        let mut found = Vec::with_capacity(pending.len());
        for read in pending {
            found.push(decode(read.result().await?)?);
        }
        Ok(found)
    }

    async fn next_on_entities(&mut self, keys: &[(&str, u64)]) -> Result<Vec<Option<Op>>> {
        let pending = keys
            .iter()
            .map(|&(entity, after)| self.issue_next_on_entity(entity, after))
            .collect::<Result<Vec<_>>>()?;
        let mut found = Vec::with_capacity(pending.len());
        for read in pending {
            found.push(decode(read.result().await?)?);
        }
        Ok(found)
    }

    async fn admission_reads(
        &mut self,
        entity: Option<&str>,
        key: Option<&str>,
    ) -> Result<(Counters, Option<Op>, Option<KeyRecord>)> {
        let counters = Self::issue_get(&self.meta, &META_COUNTERS.into())?;
        let last = entity.map(|e| self.issue_last_on_entity(e)).transpose()?;
        let record = key
            .map(|k| Self::issue_get(&self.keys, &k.into()))
            .transpose()?;
        let counters = decode(counters.result().await?)?.unwrap_or_default();
        let last = match last {
            Some(cursor) => Self::cursor_op(cursor).await?,
            None => None,
        };
        let record = match record {
            Some(read) => decode(read.result().await?)?,
            None => None,
        };
        Ok((counters, last, record))
    }

    async fn due_heads(&mut self, now: Millis, limit: usize) -> Result<(Vec<Op>, Option<Millis>)> {
        let index = self.ops.index(BY_DUE).map_err(Error::storage)?;
        let due = IdbKeyRange::upper_bound(&key(now)).map_err(Error::storage)?;
        // One more than asked, to learn whether the due ops go on past the limit.
        let request = index
            .get_all_with_key_and_limit(&due, limit as u32 + 1)
            .map_err(Error::storage)?;
        let mut ops: Vec<Op> = all(idb::wait(&request).await?)?;
        if ops.len() > limit {
            let next = ops[limit].next_attempt_at;
            ops.truncate(limit);
            return Ok((ops, next));
        }
        let later = IdbKeyRange::lower_bound_with_open(&key(now), true).map_err(Error::storage)?;
        let request = index.get(&later).map_err(Error::storage)?;
        let next: Option<Op> = decode(idb::wait(&request).await?)?;
        Ok((ops, next.and_then(|op| op.next_attempt_at)))
    }

    async fn counters(&mut self) -> Result<Counters> {
        Ok(Self::get(&self.meta, &META_COUNTERS.into())
            .await?
            .unwrap_or_default())
    }

    async fn put_counters(&mut self, counters: &Counters) -> Result<()> {
        Self::put(&self.meta, &encode(counters).into(), Some(META_COUNTERS))
    }

    async fn get_dead_letter(&mut self, id: OpId) -> Result<Option<DeadLetter>> {
        Self::get(&self.dead_letters, &id.to_string().into()).await
    }

    async fn put_dead_letter(&mut self, letter: &DeadLetter) -> Result<()> {
        Self::put(
            &self.dead_letters,
            &keyed_record(letter.op.id, letter),
            None,
        )
    }

    async fn delete_dead_letter(&mut self, id: OpId) -> Result<()> {
        Self::delete(&self.dead_letters, &id.to_string().into())
    }

    async fn get_conflict(&mut self, id: OpId) -> Result<Option<ParkedConflict>> {
        Self::get(&self.conflicts, &id.to_string().into()).await
    }

    async fn put_conflict(&mut self, conflict: &ParkedConflict) -> Result<()> {
        Self::put(
            &self.conflicts,
            &keyed_record(conflict.op.id, conflict),
            None,
        )
    }

    async fn delete_conflict(&mut self, id: OpId) -> Result<()> {
        Self::delete(&self.conflicts, &id.to_string().into())
    }

    async fn put_breaker(&mut self, breaker: &Breaker) -> Result<()> {
        Self::put(&self.meta, &encode(breaker).into(), Some(META_BREAKER))
    }

    async fn put_paused(&mut self, paused: bool) -> Result<()> {
        Self::put(&self.meta, &encode(&paused).into(), Some(META_PAUSED))
    }

    async fn put_refused(&mut self, checksum: u32) -> Result<()> {
        Self::put(&self.meta, &encode(&checksum).into(), Some(META_REFUSED))
    }

    async fn get_key(&mut self, key: &str) -> Result<Option<KeyRecord>> {
        Self::get(&self.keys, &key.into()).await
    }

    async fn put_key(&mut self, kept: &KeyRecord) -> Result<()> {
        let fields = [
            ("key", JsValue::from_str(&kept.key)),
            ("at", JsValue::from_f64(kept.at as f64)),
        ];
        Self::put(&self.keys, &record(&fields, encode(kept)), None)
    }

    async fn purge_keys(&mut self, before: Millis, limit: usize) -> Result<usize> {
        let index = self.keys.index(BY_AT).map_err(Error::storage)?;
        let old = IdbKeyRange::upper_bound_with_open(&key(before), true).map_err(Error::storage)?;
        let request = index
            .get_all_keys_with_key_and_limit(&old, limit as u32)
            .map_err(Error::storage)?;
        let keys: js_sys::Array = idb::wait(&request).await?.unchecked_into();
        for key in keys.iter() {
            Self::delete(&self.keys, &key)?;
        }
        Ok(keys.length() as usize)
    }
}
