//! The database schema: its name, version, stores, indexes and upgrades, in one place.
//!
//! | store | key | indexes | holds |
//! |---|---|---|---|
//! | `ops` | `seq` | `by_due` on `next_attempt_at`; `by_entity` on `[entity, seq]` | pending ops |
//! | `dead_letters` | `id` | | ops delivery gave up on |
//! | `conflicts` | `id` | | ops parked by the `manual` policy |
//! | `meta` | out of line | | `client`, `counters`, `breaker`, `paused` |
//!
//! A record is its JSON text in `json`, beside copies of the fields that keys and indexes name
//! (see [`store`](super::store)); meta values are JSON text.
//!
//! IndexedDB leaves a record out of an index when the index's key path has no valid key in it.
//! The schema leans on that: only entity heads have `next_attempt_at`, so `by_due` holds exactly
//! the sendable ops; unordered ops have no `entity`, so `by_entity` skips them.
//!
//! Upgrades are declarative: rexie compares the declared stores and indexes with what exists
//! and creates what is missing, keeping data. To change the schema, change the declaration below
//! and bump [`VERSION`]. Open connections close themselves when a newer version asks
//! (`versionchange`), so an extension update is never blocked by a running old context.

use rexie::{Index, ObjectStore, Rexie};
use web_sys::IdbDatabase;

use super::error::{Error, JsError, Result};
use super::idb;

/// The schema version.
pub const VERSION: u32 = 1;

/// Pending ops.
pub const OPS: &str = "ops";
/// Ops delivery gave up on.
pub const DEAD_LETTERS: &str = "dead_letters";
/// Ops waiting for the user to settle a conflict.
pub const CONFLICTS: &str = "conflicts";
/// Single records: client id, counters, breaker, pause.
pub const META: &str = "meta";
/// Every store, for transactions that may touch any of them.
pub const ALL_STORES: [&str; 4] = [OPS, DEAD_LETTERS, CONFLICTS, META];

/// `ops` by `next_attempt_at` (entity heads only).
pub const BY_DUE: &str = "by_due";
/// `ops` by `[entity, seq]` (ordered ops only).
pub const BY_ENTITY: &str = "by_entity";

/// Meta key of the client id.
pub const META_CLIENT: &str = "client";
/// Meta key of the counters.
pub const META_COUNTERS: &str = "counters";
/// Meta key of the breaker.
pub const META_BREAKER: &str = "breaker";
/// Meta key of the pause flag.
pub const META_PAUSED: &str = "paused";

/// The declared schema at `version`, with `extra` stores, for tests of the upgrade path.
pub fn declare(name: &str, version: u32, extra: Vec<ObjectStore>) -> rexie::RexieBuilder {
    let mut builder = Rexie::builder(name)
        .version(version)
        .add_object_store(
            ObjectStore::new(OPS)
                .key_path("seq")
                .add_index(Index::new(BY_DUE, "next_attempt_at"))
                .add_index(Index::new_array(BY_ENTITY, ["entity", "seq"])),
        )
        .add_object_store(ObjectStore::new(DEAD_LETTERS).key_path("id"))
        .add_object_store(ObjectStore::new(CONFLICTS).key_path("id"))
        .add_object_store(ObjectStore::new(META));
    for store in extra {
        builder = builder.add_object_store(store);
    }
    builder
}

/// Opens the database `name`, creating or upgrading it to [`VERSION`], and returns the
/// connection the data path uses.
pub async fn open(name: &str) -> Result<IdbDatabase> {
    // rexie runs the upgrade, then its connection is closed: it cannot open transactions with
    // strict durability (see `idb`), so the data path opens its own.
    let upgraded = declare(name, VERSION, Vec::new())
        .build()
        .await
        .map_err(rexie_error)?;
    upgraded.close();
    idb::open(name, VERSION).await
}

fn rexie_error(error: rexie::Error) -> Error {
    Error::Storage(JsError {
        name: "RexieError".into(),
        message: error.to_string(),
    })
}
