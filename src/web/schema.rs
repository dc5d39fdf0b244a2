//! The database schema: its name, version, stores, indexes and upgrades, in one place.
//!
//! | store | key | indexes | holds |
//! |---|---|---|---|
//! | `ops` | `seq` | `by_due` on `next_attempt_at`; `by_entity` on `[entity, seq]` | pending ops |
//! | `dead_letters` | `id` | | ops delivery gave up on |
//! | `conflicts` | `id` | | ops parked by the `manual` policy |
//! | `meta` | out of line | | `client`, `counters`, `breaker`, `paused`, `refused`, `incident` |
//! | `keys` | `key` | `by_at` on `at` | callers' idempotency keys and the answers they got |
//!
//! A record is its JSON text in `json`, beside copies of the fields that keys and indexes name
//! (see [`store`](super::store)); meta values are JSON text.
//!
//! IndexedDB leaves a record out of an index when the index's key path has no valid key in it.
//! The schema leans on that: only entity heads have `next_attempt_at`, so `by_due` holds exactly
//! the sendable ops; unordered ops have no `entity`, so `by_entity` skips them.
//!
//! Upgrades are migrations by version, run in the `upgradeneeded` transaction: [`migrate`]
//! brings a database from any older version to [`VERSION`], keeping its data. To change the
//! schema, add a step for the next version and bump [`VERSION`]. Open connections close
//! themselves when a newer version asks (`versionchange`), so an extension update is never
//! blocked by a running old context.
//!
//! The plan was to declare this schema with rexie. Two facts changed it: rexie (and the `idb`
//! crate under it) cannot open a transaction with `durability: "strict"`, so the data path had
//! to use web-sys directly anyway; and its dependencies (idb, indexmap, hashbrown, tokio's sync
//! parts) cost 16 KB of the 100 KB gzipped budget, measured with and without it. What rexie did
//! here is the twenty lines of [`migrate`].

use js_sys::Array;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{IdbDatabase, IdbObjectStoreParameters, IdbOpenDbRequest, IdbVersionChangeEvent};

use super::error::{Error, Result};
use super::idb;

/// The schema version.
pub const VERSION: u32 = 2;

/// Pending ops.
pub const OPS: &str = "ops";
/// Ops delivery gave up on.
pub const DEAD_LETTERS: &str = "dead_letters";
/// Ops waiting for the user to settle a conflict.
pub const CONFLICTS: &str = "conflicts";
/// Single records: client id, counters, breaker, pause.
pub const META: &str = "meta";
/// Callers' idempotency keys (version 2).
pub const KEYS: &str = "keys";
/// Every store, for transactions that may touch any of them.
pub const ALL_STORES: [&str; 5] = [OPS, DEAD_LETTERS, CONFLICTS, META, KEYS];

/// `ops` by `next_attempt_at` (entity heads only).
pub const BY_DUE: &str = "by_due";
/// `ops` by `[entity, seq]` (ordered ops only).
pub const BY_ENTITY: &str = "by_entity";
/// `keys` by `at`, for purging old keys.
pub const BY_AT: &str = "by_at";

/// Meta key of the client id.
pub const META_CLIENT: &str = "client";
/// Meta key of the counters.
pub const META_COUNTERS: &str = "counters";
/// Meta key of the breaker.
pub const META_BREAKER: &str = "breaker";
/// Meta key of the pause flag.
pub const META_PAUSED: &str = "paused";
/// Meta key of the checksum of the last refused credentials (never the credentials).
pub const META_REFUSED: &str = "refused";
/// Meta key of the last storage incident (the database found lost).
pub const META_INCIDENT: &str = "incident";

/// Brings the database from `old_version` to [`VERSION`]. Runs inside `upgradeneeded`.
pub fn migrate(db: &IdbDatabase, old_version: u32) -> Result<(), JsValue> {
    if old_version < 1 {
        let ops = db.create_object_store_with_optional_parameters(OPS, &key_path("seq"))?;
        ops.create_index_with_str(BY_DUE, "next_attempt_at")?;
        let entity_seq: Array = ["entity", "seq"]
            .iter()
            .map(|s| JsValue::from_str(s))
            .collect();
        ops.create_index_with_str_sequence(BY_ENTITY, &entity_seq)?;
        db.create_object_store_with_optional_parameters(DEAD_LETTERS, &key_path("id"))?;
        db.create_object_store_with_optional_parameters(CONFLICTS, &key_path("id"))?;
        db.create_object_store(META)?;
    }
    if old_version < 2 {
        let keys = db.create_object_store_with_optional_parameters(KEYS, &key_path("key"))?;
        keys.create_index_with_str(BY_AT, "at")?;
    }
    Ok(())
}

fn key_path(path: &str) -> IdbObjectStoreParameters {
    let parameters = IdbObjectStoreParameters::new();
    parameters.set_key_path(&JsValue::from_str(path));
    parameters
}

/// Opens the database `name`, creating or upgrading it to [`VERSION`].
pub async fn open(name: &str) -> Result<IdbDatabase> {
    open_with(name, VERSION, migrate).await
}

/// Opens the database `name` at `version`, running `upgrade(db, old_version)` if it is older.
/// [`open`] passes [`migrate`]; tests pass a later version's migrations to exercise upgrades.
pub async fn open_with(
    name: &str,
    version: u32,
    upgrade: fn(&IdbDatabase, u32) -> Result<(), JsValue>,
) -> Result<IdbDatabase> {
    let request: IdbOpenDbRequest = idb::factory()?
        .open_with_u32(name, version)
        .map_err(Error::storage)?;
    let on_upgrade = {
        let request = request.clone();
        Closure::<dyn Fn(IdbVersionChangeEvent)>::new(move |event: IdbVersionChangeEvent| {
            let Ok(db) = request.result() else { return };
            if let Err(error) = upgrade(db.unchecked_ref(), event.old_version() as u32) {
                // An exception here would be lost; aborting fails the open with the cause.
                web_sys::console::error_2(&"outbox: schema upgrade failed".into(), &error);
                if let Some(transaction) = request.transaction() {
                    let _ = transaction.abort();
                }
            }
        })
    };
    request.set_onupgradeneeded(Some(on_upgrade.as_ref().unchecked_ref()));
    let opened = idb::wait(request.unchecked_ref()).await;
    request.set_onupgradeneeded(None);
    Ok(opened?.unchecked_into())
}
