//! [`PgStore`]: the [`Store`] on PostgreSQL, for several stateless server replicas sharing
//! one database (docs/SERVER.md, *Scaling out*).
//!
//! Concurrency control: READ COMMITTED with row locks and unique constraints, not
//! SERIALIZABLE. Every request runs in one transaction that first locks its client's row in
//! `clients` (`SELECT … FOR UPDATE`), so that all decisions about one (tenant, client) —
//! stored results, `Idempotency-Key` responses, the `last` seq per entity — are made by one
//! replica at a time; then it locks the rows of the entities its ops name, in sorted order
//! (so that two requests never wait for each other in a cycle), which serialises version
//! checks across clients. An entity that does not exist yet has no row to lock: it is
//! inserted with `ON CONFLICT DO NOTHING`, and a lost race (another replica created it
//! first) rolls the transaction back and runs it again, when the row exists and is locked.
//! The primary keys of `results` and `idempotency_keys` are the last line: a second copy of
//! an op can never be stored twice. A transaction that meets a deadlock, a serialization
//! failure or a unique violation is retried from the start.
//!
//! The decisions themselves are the SQLite store's ([`crate::store::decide_without_entity`],
//! [`crate::store::decide_entity`]): this module only reads the rows and writes what they say.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::now_ms;
use crate::recent::Recent;
use crate::store::{
    ApplyOutcome, ApplyRequest, Binding, ClaimGuard, Current, Entity, KeyClaim, KeyedRequest,
    OpResult, Store, StoreError, decide_entity, decide_without_entity, replayed,
};

/// Versioned migrations, applied in order at start under an advisory lock (so that replicas
/// starting together do not race) and recorded in `schema_migrations`. Never edit one that
/// shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial schema",
    "
CREATE TABLE clients (
    client TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    bound_at BIGINT NOT NULL
);
-- `writer` wrote the latest run of versions, which began after `run_base` (see
-- store::decide_entity, step 4).
CREATE TABLE entities (
    tenant TEXT NOT NULL,
    entity TEXT NOT NULL,
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    writer TEXT NOT NULL,
    run_base BIGINT NOT NULL,
    PRIMARY KEY (tenant, entity)
);
-- The highest seq applied per (tenant, client, entity), kept forever.
CREATE TABLE lasts (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    entity TEXT NOT NULL,
    last BIGINT NOT NULL,
    PRIMARY KEY (tenant, client, entity)
);
CREATE TABLE results (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    op_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    stored_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, client, op_id)
);
CREATE INDEX results_stored_at ON results (stored_at);
CREATE TABLE idempotency_keys (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    op_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    stored_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, client, key)
);
CREATE INDEX idempotency_keys_stored_at ON idempotency_keys (stored_at);
-- Idempotency-Keys running now, on any replica: what answers `409 in-progress` for a key
-- that another replica is applying. A replica that dies leaves its claims behind; they
-- expire after the stale age (twice the request timeout).
CREATE TABLE key_claims (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    owner TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, client, key)
);
",
)];

/// Advisory lock keys (arbitrary constants, "outbox" in ASCII plus a suffix).
const MIGRATE_LOCK: i64 = 0x006f_7574_626f_7801;
const PURGE_LOCK: i64 = 0x006f_7574_626f_7802;
/// Rows one purge step deletes (as in the SQLite store).
const PURGE_CHUNK: i64 = 250;
/// How many times a transaction that lost a race runs again before the request fails.
const RETRIES: usize = 30;
/// Client bindings cached in memory (they never change once made, so any replica may cache).
const OWNERS_CACHED: usize = 65_536;

/// PostgreSQL through a pool of connections (deadpool-postgres over tokio-postgres).
pub struct PgStore {
    pool: Pool,
    owners: Mutex<Recent<String, String>>,
    /// A claim older than this (ms) was left by a replica that died; it may be taken over.
    stale_claim_ms: i64,
    /// This process's claim owner prefix, and a counter.
    owner: String,
    claims: AtomicU64,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => StoreError(format!("postgres: {}: {}", db.code().code(), db.message())),
            None => StoreError(format!("postgres: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError(format!("postgres pool: {e}"))
    }
}

/// Why one attempt at a transaction failed.
enum TxError {
    /// It lost a race (deadlock, serialization failure, unique violation, an entity created
    /// meanwhile): run it again.
    Retry(String),
    /// Anything else.
    Fail(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        let retry = e.code().is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::UNIQUE_VIOLATION
        });
        if retry {
            TxError::Retry(StoreError::from(e).0)
        } else {
            TxError::Fail(e.into())
        }
    }
}

impl From<serde_json::Error> for TxError {
    fn from(e: serde_json::Error) -> Self {
        TxError::Fail(StoreError(format!("a stored outcome did not decode: {e}")))
    }
}

/// Whether `db` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

impl PgStore {
    /// Connects to `url`, runs the migrations that are missing, and keeps up to `pool_size`
    /// connections. `request_timeout` bounds how long a live request can hold a key claim.
    pub async fn open(
        url: &str,
        pool_size: usize,
        request_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError(format!("bad PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .config(PoolConfig {
                max_size: pool_size.max(1),
                timeouts: Timeouts {
                    wait: Some(Duration::from_secs(30)),
                    create: Some(Duration::from_secs(10)),
                    recycle: Some(Duration::from_secs(10)),
                },
                ..PoolConfig::default()
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError(format!("postgres pool: {e}")))?;
        let mut client = pool.get().await?;
        migrate(&mut client).await?;
        drop(client);
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| StoreError(format!("no randomness: {e}")))?;
        Ok(PgStore {
            pool,
            owners: Mutex::new(Recent::new(OWNERS_CACHED)),
            stale_claim_ms: (request_timeout.as_millis() as i64).saturating_mul(2) + 5_000,
            owner: format!("{}-{:016x}", std::process::id(), u64::from_le_bytes(seed)),
            claims: AtomicU64::new(0),
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Applies the migrations not yet recorded, in one transaction, under [`MIGRATE_LOCK`].
async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(unknown) = applied.iter().find(|v| **v > newest) {
        return Err(StoreError(format!(
            "the database has schema version {unknown}, newer than this server knows \
             ({newest}): run a newer server"
        )));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[version, name, &now_ms()],
        )
        .await?;
        tracing::info!(version, name, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}

/// One attempt at a request's transaction.
async fn apply_once(client: &mut Object, req: &ApplyRequest) -> Result<ApplyOutcome, TxError> {
    let (tenant, client_id) = (&req.tenant, &req.client);
    let tx = client.transaction().await?;
    let now = now_ms();

    // Every decision about this client, one replica at a time.
    let lock = tx
        .prepare_cached("SELECT 1 FROM clients WHERE client = $1 FOR UPDATE")
        .await?;
    tx.query(&lock, &[client_id]).await?;

    if let Some(key) = &req.key {
        let stmt = tx
            .prepare_cached(
                "SELECT fingerprint, op_id, outcome FROM idempotency_keys
                 WHERE tenant = $1 AND client = $2 AND key = $3",
            )
            .await?;
        if let Some(row) = tx.query_opt(&stmt, &[tenant, client_id, &key.key]).await? {
            let fingerprint: Vec<u8> = row.get(0);
            let outcome = if fingerprint == key.fingerprint {
                let (id, outcome): (String, String) = (row.get(1), row.get(2));
                ApplyOutcome::KeyReplay(replayed(&id, &outcome)?)
            } else {
                ApplyOutcome::KeyReused
            };
            tx.commit().await?;
            return Ok(outcome);
        }
    }

    // The rows the ops need, read once: the entities (locked, in sorted order), this
    // client's `last`s for them and its stored results for these op ids.
    let mut names: Vec<&str> = req.ops.iter().filter_map(|o| o.entity.as_deref()).collect();
    names.sort_unstable();
    names.dedup();
    let ids: Vec<&str> = req.ops.iter().map(|o| o.id.as_str()).collect();
    let mut current: HashMap<String, Current> = HashMap::new();
    let mut lasts: HashMap<String, i64> = HashMap::new();
    if !names.is_empty() {
        let entities = tx
            .prepare_cached(
                "SELECT entity, version, state, writer, run_base FROM entities
                 WHERE tenant = $1 AND entity = ANY($2) ORDER BY entity FOR UPDATE",
            )
            .await?;
        let last = tx
            .prepare_cached(
                "SELECT entity, last FROM lasts
                 WHERE tenant = $1 AND client = $2 AND entity = ANY($3)",
            )
            .await?;
        let p1: Params = vec![tenant, &names];
        let p2: Params = vec![tenant, client_id, &names];
        let (rows, last_rows) = tokio::try_join!(tx.query(&entities, &p1), tx.query(&last, &p2))?;
        for r in rows {
            current.insert(
                r.get(0),
                Current {
                    version: r.get(1),
                    state: r.get(2),
                    writer: r.get(3),
                    run_base: r.get(4),
                },
            );
        }
        for r in last_rows {
            lasts.insert(r.get(0), r.get(1));
        }
    }
    let existed: HashSet<String> = current.keys().cloned().collect();
    let stmt = tx
        .prepare_cached(
            "SELECT op_id, outcome FROM results
             WHERE tenant = $1 AND client = $2 AND op_id = ANY($3)",
        )
        .await?;
    let mut stored: HashMap<String, String> = tx
        .query(&stmt, &[tenant, client_id, &ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Decide, op by op, in order, on the rows as the earlier ops left them.
    let mut shown = HashSet::new();
    let mut budget = req.limits.answer_state_bytes;
    let mut results = Vec::with_capacity(req.ops.len());
    let mut new_results: Vec<(String, String)> = Vec::new();
    let mut dirty: Vec<String> = Vec::new();
    for op in &req.ops {
        if let Some(outcome) = stored.get(&op.id) {
            results.push(replayed(&op.id, outcome)?);
            continue;
        }
        let outcome = match decide_without_entity(req, op, now) {
            Some(outcome) => outcome,
            None => {
                let entity = op.entity.as_deref().unwrap_or_default();
                let last = lasts.get(entity).copied().unwrap_or(0);
                let (outcome, write) = decide_entity(
                    req,
                    op,
                    entity,
                    last,
                    current.get(entity),
                    &mut shown,
                    &mut budget,
                );
                if let Some(w) = write {
                    current.insert(
                        entity.to_owned(),
                        Current {
                            version: w.version,
                            state: w.state,
                            writer: client_id.clone(),
                            run_base: w.run_base,
                        },
                    );
                    lasts.insert(entity.to_owned(), w.last);
                    if !dirty.iter().any(|d| d == entity) {
                        dirty.push(entity.to_owned());
                    }
                }
                outcome
            }
        };
        if outcome.is_final() {
            let text = serde_json::to_string(&outcome.without_state())?;
            stored.insert(op.id.clone(), text.clone());
            new_results.push((op.id.clone(), text));
        }
        results.push(OpResult {
            id: op.id.clone(),
            outcome,
            replayed: false,
        });
    }

    // Write what the decisions say, in one round of pipelined statements.
    let (mut upd, mut ins) = (Rows::default(), Rows::default());
    let (mut last_names, mut last_values) = (Vec::new(), Vec::new());
    for name in &dirty {
        let c = &current[name];
        let rows = if existed.contains(name) {
            &mut upd
        } else {
            &mut ins
        };
        rows.push(name, c);
        last_names.push(name.as_str());
        last_values.push(lasts[name]);
    }
    let (ids, outcomes): (Vec<&str>, Vec<&str>) = new_results
        .iter()
        .map(|(i, o)| (i.as_str(), o.as_str()))
        .unzip();
    let update = tx
        .prepare_cached(
            "UPDATE entities AS e SET version = u.version, state = u.state, writer = $2,
               run_base = u.run_base
             FROM unnest($3::text[], $4::int8[], $5::text[], $6::int8[])
               AS u(entity, version, state, run_base)
             WHERE e.tenant = $1 AND e.entity = u.entity",
        )
        .await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO entities (tenant, entity, version, state, writer, run_base)
             SELECT $1, u.entity, u.version, u.state, $2, u.run_base
             FROM unnest($3::text[], $4::int8[], $5::text[], $6::int8[])
               AS u(entity, version, state, run_base)
             ON CONFLICT (tenant, entity) DO NOTHING",
        )
        .await?;
    let upsert_lasts = tx
        .prepare_cached(
            "INSERT INTO lasts (tenant, client, entity, last)
             SELECT $1, $2, u.entity, u.last FROM unnest($3::text[], $4::int8[]) AS u(entity, last)
             ON CONFLICT (tenant, client, entity) DO UPDATE SET last = excluded.last",
        )
        .await?;
    let insert_results = tx
        .prepare_cached(
            "INSERT INTO results (tenant, client, op_id, outcome, stored_at)
             SELECT $1, $2, u.op_id, u.outcome, $3 FROM unnest($4::text[], $5::text[])
               AS u(op_id, outcome)",
        )
        .await?;
    let (_, inserted, _, _) = tokio::try_join!(
        async {
            if upd.names.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &update,
                &[
                    tenant,
                    client_id,
                    &upd.names,
                    &upd.versions,
                    &upd.states,
                    &upd.bases,
                ],
            )
            .await
        },
        async {
            if ins.names.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &insert,
                &[
                    tenant,
                    client_id,
                    &ins.names,
                    &ins.versions,
                    &ins.states,
                    &ins.bases,
                ],
            )
            .await
        },
        async {
            if last_names.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &upsert_lasts,
                &[tenant, client_id, &last_names, &last_values],
            )
            .await
        },
        async {
            if ids.is_empty() {
                return Ok(0);
            }
            tx.execute(&insert_results, &[tenant, client_id, &now, &ids, &outcomes])
                .await
        },
    )?;
    if inserted as usize != ins.names.len() {
        // Another replica created one of these entities after our read: run again, when its
        // row exists and is locked.
        return Err(TxError::Retry("an entity was created meanwhile".into()));
    }
    if let Some(key) = &req.key {
        let record = tx
            .prepare_cached(
                "INSERT INTO idempotency_keys
                   (tenant, client, key, fingerprint, op_id, outcome, stored_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        let unclaim = tx
            .prepare_cached("DELETE FROM key_claims WHERE tenant = $1 AND client = $2 AND key = $3")
            .await?;
        let first = results.first().filter(|r| r.outcome.is_final());
        let fingerprint = key.fingerprint.as_slice();
        tokio::try_join!(
            async {
                let Some(result) = first else {
                    return Ok(0);
                };
                let text =
                    serde_json::to_string(&result.outcome.without_state()).unwrap_or_default();
                tx.execute(
                    &record,
                    &[
                        tenant,
                        client_id,
                        &key.key,
                        &fingerprint,
                        &result.id,
                        &text,
                        &now,
                    ],
                )
                .await
            },
            // Gone in the same commit that records the answer, so that no replica ever sees
            // neither (and answers 409) nor both.
            async { tx.execute(&unclaim, &[tenant, client_id, &key.key]).await },
        )?;
    }
    tx.commit().await?;
    Ok(ApplyOutcome::Results(results))
}

type Params<'a> = Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>;

/// Entity rows to write, as the columns `unnest` takes.
#[derive(Default)]
struct Rows<'a> {
    names: Vec<&'a str>,
    versions: Vec<i64>,
    states: Vec<&'a str>,
    bases: Vec<i64>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, name: &'a str, c: &'a Current) {
        self.names.push(name);
        self.versions.push(c.version);
        self.states.push(&c.state);
        self.bases.push(c.run_base);
    }
}

impl Store for PgStore {
    async fn bind_client(&self, tenant: &str, client: &str) -> Result<Binding, StoreError> {
        let cached = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&client.to_owned())
            .cloned();
        let owner = match cached {
            Some(owner) => owner,
            None => {
                let conn = self.client().await?;
                let select = conn
                    .prepare_cached("SELECT tenant FROM clients WHERE client = $1")
                    .await?;
                let owner: String = match conn.query_opt(&select, &[&client]).await? {
                    Some(row) => row.get(0),
                    None => {
                        let insert = conn
                            .prepare_cached(
                                "INSERT INTO clients (client, tenant, bound_at) VALUES ($1, $2, $3)
                                 ON CONFLICT (client) DO NOTHING",
                            )
                            .await?;
                        conn.execute(&insert, &[&client, &tenant, &now_ms()])
                            .await?;
                        conn.query_one(&select, &[&client]).await?.get(0)
                    }
                };
                self.owners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(client.to_owned(), owner.clone());
                owner
            }
        };
        Ok(if owner == tenant {
            Binding::Ours
        } else {
            Binding::OtherTenant
        })
    }

    async fn apply(&self, request: ApplyRequest) -> Result<ApplyOutcome, StoreError> {
        let mut attempt = 0;
        loop {
            let mut conn = self.client().await?;
            match apply_once(&mut conn, &request).await {
                Ok(outcome) => return Ok(outcome),
                Err(TxError::Retry(why)) if attempt < RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, %why, "transaction lost a race; running it again");
                    drop(conn);
                    // A little jitter so that two replicas do not collide again in step.
                    let jitter = (now_ms() as u64 ^ (attempt as u64 * 7919)) % 5;
                    tokio::time::sleep(Duration::from_millis(jitter + attempt as u64)).await;
                }
                Err(TxError::Retry(why)) => {
                    return Err(StoreError(format!(
                        "gave up after {RETRIES} retries: {why}"
                    )));
                }
                Err(TxError::Fail(e)) => return Err(e),
            }
        }
    }

    async fn entity(&self, tenant: &str, id: &str) -> Result<Option<Entity>, StoreError> {
        let conn = self.client().await?;
        let stmt = conn
            .prepare_cached("SELECT version, state FROM entities WHERE tenant = $1 AND entity = $2")
            .await?;
        let row = conn.query_opt(&stmt, &[&tenant, &id]).await?;
        Ok(row.map(|r| {
            let state: String = r.get(1);
            Entity {
                id: id.to_owned(),
                version: r.get(0),
                state: serde_json::from_str(&state).unwrap_or(serde_json::Value::Null),
            }
        }))
    }

    /// One replica at a time (a session advisory lock; the others skip this round), in
    /// chunks of [`PURGE_CHUNK`] rows, each its own statement. The connection is closed after,
    /// so that the lock can never outlive the purge on a pooled connection.
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let conn = self.client().await?;
        let got: bool = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&PURGE_LOCK])
            .await?
            .get(0);
        let conn = Object::take(conn);
        if !got {
            return Ok(0);
        }
        let mut deleted = 0u64;
        let mut chunks = 0u64;
        for sql in [
            "DELETE FROM results WHERE ctid IN
               (SELECT ctid FROM results WHERE stored_at < $1 LIMIT $2)",
            "DELETE FROM idempotency_keys WHERE ctid IN
               (SELECT ctid FROM idempotency_keys WHERE stored_at < $1 LIMIT $2)",
        ] {
            let stmt = conn.prepare(sql).await?;
            loop {
                let n = conn.execute(&stmt, &[&before_ms, &PURGE_CHUNK]).await?;
                deleted += n;
                chunks += 1;
                if n < PURGE_CHUNK as u64 {
                    break;
                }
            }
        }
        let stale = now_ms() - self.stale_claim_ms;
        conn.execute("DELETE FROM key_claims WHERE claimed_at < $1", &[&stale])
            .await?;
        if deleted > 0 {
            tracing::info!(rows = deleted, chunks, "purged expired results");
        }
        Ok(deleted)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.client().await?;
        conn.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    async fn claim_key(
        &self,
        tenant: &str,
        client: &str,
        key: &KeyedRequest,
    ) -> Result<KeyClaim, StoreError> {
        let owner = format!(
            "{}-{}",
            self.owner,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        let conn = self.client().await?;
        let take = conn
            .prepare_cached(
                "INSERT INTO key_claims (tenant, client, key, fingerprint, owner, claimed_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant, client, key) DO UPDATE SET fingerprint = excluded.fingerprint,
                   owner = excluded.owner, claimed_at = excluded.claimed_at
                 WHERE key_claims.claimed_at < $7
                 RETURNING owner",
            )
            .await?;
        let running = conn
            .prepare_cached(
                "SELECT fingerprint FROM key_claims WHERE tenant = $1 AND client = $2 AND key = $3",
            )
            .await?;
        let fingerprint = key.fingerprint.as_slice();
        for _ in 0..3 {
            let now = now_ms();
            let stale = now - self.stale_claim_ms;
            let taken = conn
                .query_opt(
                    &take,
                    &[
                        &tenant,
                        &client,
                        &key.key,
                        &fingerprint,
                        &owner,
                        &now,
                        &stale,
                    ],
                )
                .await?;
            if taken.is_some() {
                let pool = self.pool.clone();
                let (tenant, client, key) = (tenant.to_owned(), client.to_owned(), key.key.clone());
                return Ok(KeyClaim::Claimed(ClaimGuard::new(move || {
                    Box::pin(async move {
                        let release = async {
                            let conn = pool.get().await.map_err(StoreError::from)?;
                            conn.execute(
                                "DELETE FROM key_claims
                                 WHERE tenant = $1 AND client = $2 AND key = $3 AND owner = $4",
                                &[&tenant, &client, &key, &owner],
                            )
                            .await?;
                            Ok::<(), StoreError>(())
                        };
                        if let Err(e) = release.await {
                            tracing::warn!(error = %e, "could not release an Idempotency-Key claim; it expires");
                        }
                    })
                })));
            }
            if let Some(row) = conn
                .query_opt(&running, &[&tenant, &client, &key.key])
                .await?
            {
                let theirs: Vec<u8> = row.get(0);
                return Ok(KeyClaim::Running {
                    same_body: theirs == key.fingerprint,
                });
            }
            // Released between the two statements: try again.
        }
        Ok(KeyClaim::Running { same_body: true })
    }
}
