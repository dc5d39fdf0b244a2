//! Storage: the [`Store`] trait the HTTP layer talks to, and [`SqliteStore`], its embedded
//! SQLite implementation.
//!
//! The trait is shaped so that a shared SQL engine (Postgres) could serve many stateless
//! server instances: every decision that must be atomic (idempotency, order, version, apply,
//! record) happens inside one [`Store::apply`] call, which a database implementation runs as
//! one transaction.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::SyncMode;
use crate::merge::merge_patch;
use crate::wire::Op;

/// A storage failure. The HTTP layer answers it with 503.
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// What one op came to. Serialized with `status` as the tag, as on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The op took effect; `version` is the entity's new version (`null` for `entity: null`).
    Applied {
        /// The new version.
        version: Option<i64>,
    },
    /// An earlier op with this or a higher seq already took effect on the entity.
    Duplicate {
        /// The entity's current version.
        version: i64,
    },
    /// `base_version` was not the entity's version.
    Conflict {
        /// The entity's current version.
        version: i64,
        /// The entity's current state.
        state: Value,
    },
    /// The op is invalid and never will be applied.
    Rejected {
        /// Why.
        reason: String,
    },
    /// A predecessor (`prev`) has not been applied yet. Not final, so not stored.
    OutOfOrder {
        /// The highest seq applied for (tenant, client, entity).
        last: i64,
    },
}

impl Outcome {
    /// The wire name of the status.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Conflict { .. } => "conflict",
            Outcome::Rejected { .. } => "rejected",
            Outcome::OutOfOrder { .. } => "out_of_order",
        }
    }

    /// Final outcomes are stored and replayed; `out_of_order` is not.
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::OutOfOrder { .. })
    }

    /// The version the outcome names, if any.
    pub fn version(&self) -> Option<i64> {
        match self {
            Outcome::Applied { version } => *version,
            Outcome::Duplicate { version } | Outcome::Conflict { version, .. } => Some(*version),
            _ => None,
        }
    }
}

/// One per-op result as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    /// The op id.
    pub id: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Whether this is a stored result answered again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// A scripted `reject` fault: ops of `kind` (or all ops) are rejected with `reason`.
#[derive(Debug, Clone)]
pub struct RejectRule {
    /// The `reason` of the rejection.
    pub reason: String,
    /// Only ops of this kind, or every op when `None`.
    pub kind: Option<String>,
}

/// An `Idempotency-Key` request (`/v1/op`).
#[derive(Debug, Clone)]
pub struct KeyedRequest {
    /// The key, unquoted.
    pub key: String,
    /// The body fingerprint.
    pub fingerprint: [u8; 32],
}

/// Everything [`Store::apply`] needs.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    /// The tenant the bearer token named.
    pub tenant: String,
    /// The client id.
    pub client: String,
    /// The ops, applied in order.
    pub ops: Vec<Op>,
    /// A scripted rejection to apply at validation.
    pub reject: Option<RejectRule>,
    /// Set for `/v1/op`.
    pub key: Option<KeyedRequest>,
    /// The server's clock, ms since the epoch (recorded with stored results for retention).
    pub now_ms: i64,
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutcome {
    /// One result per op, in order.
    Results(Vec<OpResult>),
    /// The Idempotency-Key had a stored response for the same body: here it is, replayed.
    KeyReplay(OpResult),
    /// The Idempotency-Key was used before with another body.
    KeyReused,
}

/// Whether a client id may be used by a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The client belongs to this tenant (now, or from before).
    Ours,
    /// Another tenant used the client id first.
    OtherTenant,
}

/// An entity as `GET /v1/entities/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    /// The entity id.
    pub id: String,
    /// Its version (≥ 1 once it exists).
    pub version: i64,
    /// Its state.
    pub state: Value,
}

/// The storage the server runs on.
///
/// Contract: each [`apply`](Store::apply) is atomic and durable before its future resolves;
/// every op's idempotency check, order check, version check, state change, `last` update and
/// result record happen together or not at all. Concurrent calls for the same
/// (tenant, client, op id) must serialise so that exactly one applies.
pub trait Store: Send + Sync + 'static {
    /// Binds `client` to `tenant` on first use and says whether it belongs to `tenant`.
    fn bind_client(
        &self,
        tenant: &str,
        client: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Binding, StoreError>> + Send;

    /// Applies a request's ops (see the trait contract and docs/PROTOCOL.md, *Applying*).
    fn apply(
        &self,
        request: ApplyRequest,
    ) -> impl Future<Output = Result<ApplyOutcome, StoreError>> + Send;

    /// Reads one entity of a tenant.
    fn entity(
        &self,
        tenant: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send;

    /// Deletes stored results and Idempotency-Key responses stored before `before_ms`; returns
    /// how many rows went.
    fn purge(&self, before_ms: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Checks that the storage answers (for `/v1/health`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Work for the writer thread.
enum Job {
    Apply(ApplyRequest, Reply<ApplyOutcome>),
    Bind {
        tenant: String,
        client: String,
        now_ms: i64,
        reply: Reply<Binding>,
    },
    Purge {
        before_ms: i64,
        reply: Reply<u64>,
    },
}

impl Job {
    /// Rough cost, to bound how much one group commit takes on.
    fn weight(&self) -> usize {
        match self {
            Job::Apply(r, _) => r.ops.len(),
            _ => 1,
        }
    }
}

/// A job done but not yet committed: its reply waits for the group's commit.
enum Done {
    Apply(Reply<ApplyOutcome>, Result<ApplyOutcome, StoreError>),
    Bind(Reply<Binding>, Result<Binding, StoreError>),
    Purge(Reply<u64>, Result<u64, StoreError>),
}

impl Done {
    fn send(self, commit: &Result<(), StoreError>) {
        // A receiver that went away (the client hung up) is fine: the work is committed anyway.
        match self {
            Done::Apply(tx, r) => drop(tx.send(commit.clone().and(r))),
            Done::Bind(tx, r) => drop(tx.send(commit.clone().and(r))),
            Done::Purge(tx, r) => drop(tx.send(commit.clone().and(r))),
        }
    }
}

/// Most ops one group commit takes on before it commits.
const GROUP_OPS: usize = 2_000;

/// SQLite in WAL mode. All writes go through one writer thread, which takes every job that is
/// waiting and commits them together (group commit): one `fsync` covers many requests, and
/// each job runs in its own savepoint so that one failing job does not undo the others. Reads
/// use a separate connection, which WAL lets run beside the writer.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    /// Client bindings never change once made, so they are cached.
    bindings: Mutex<HashMap<String, String>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    bound_at INTEGER NOT NULL
) WITHOUT ROWID;
-- `writer` wrote the latest run of versions, which began after `run_base`: a client's own
-- writes never make its base_version stale, so the check needs the last version someone else
-- wrote (see apply_op, step 4).
CREATE TABLE IF NOT EXISTS entities (
    tenant TEXT NOT NULL,
    entity TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    writer TEXT NOT NULL,
    run_base INTEGER NOT NULL,
    PRIMARY KEY (tenant, entity)
) WITHOUT ROWID;
-- The highest seq applied per (tenant, client, entity). Kept forever: it is what turns a
-- resend into a duplicate after its stored result was purged.
CREATE TABLE IF NOT EXISTS lasts (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    entity TEXT NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (tenant, client, entity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    op_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, client, op_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_stored_at ON results (stored_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant TEXT NOT NULL,
    client TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    op_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, client, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_stored_at ON idempotency_keys (stored_at);
";

impl SqliteStore {
    /// Opens (or creates) the database and starts the writer thread.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Self, StoreError> {
        let writer = Connection::open(path)?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!(
                "could not switch {} to WAL (got {mode})",
                path.display()
            )));
        }
        writer.pragma_update(
            None,
            "synchronous",
            match sync {
                SyncMode::Full => "FULL",
                SyncMode::Normal => "NORMAL",
            },
        )?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        writer.execute_batch(SCHEMA)?;
        writer.set_prepared_statement_cache_capacity(64);

        let reader = Connection::open(path)?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", true)?;

        let (jobs, rx) = mpsc::channel(1024);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| StoreError(format!("could not start the writer thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
            bindings: Mutex::new(HashMap::new()),
        })
    }

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(make(tx))
            .await
            .map_err(|_| StoreError("the writer thread is gone".into()))?;
        rx.await
            .map_err(|_| StoreError("the writer thread is gone".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|e| StoreError(format!("read task failed: {e}")))?
    }
}

impl Store for SqliteStore {
    async fn bind_client(
        &self,
        tenant: &str,
        client: &str,
        now_ms: i64,
    ) -> Result<Binding, StoreError> {
        let cached = self
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client)
            .cloned();
        let owner = match cached {
            Some(owner) => owner,
            None => {
                let binding = self
                    .submit(|reply| Job::Bind {
                        tenant: tenant.to_owned(),
                        client: client.to_owned(),
                        now_ms,
                        reply,
                    })
                    .await?;
                if binding == Binding::Ours {
                    self.bindings
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(client.to_owned(), tenant.to_owned());
                }
                return Ok(binding);
            }
        };
        Ok(if owner == tenant {
            Binding::Ours
        } else {
            Binding::OtherTenant
        })
    }

    async fn apply(&self, request: ApplyRequest) -> Result<ApplyOutcome, StoreError> {
        self.submit(|reply| Job::Apply(request, reply)).await
    }

    async fn entity(&self, tenant: &str, id: &str) -> Result<Option<Entity>, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT version, state FROM entities WHERE tenant = ?1 AND entity = ?2",
                )?
                .query_row(params![tenant, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(row.map(|(version, state)| Entity {
                id,
                version,
                state: serde_json::from_str(&state).unwrap_or(Value::Null),
            }))
        })
        .await
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.submit(|reply| Job::Purge { before_ms, reply }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            // Touches the file (a bare `SELECT 1` would not) in O(1).
            conn.query_row(
                "SELECT count(*) FROM (SELECT 1 FROM clients LIMIT 1)",
                [],
                |_| Ok(()),
            )
        })
        .await
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut weight = first.weight();
        let mut jobs = vec![first];
        while weight < GROUP_OPS {
            match rx.try_recv() {
                Ok(job) => {
                    weight += job.weight();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        run_group(&mut conn, jobs);
    }
}

fn run_group(conn: &mut Connection, jobs: Vec<Job>) {
    let mut done = Vec::with_capacity(jobs.len());
    let commit = (|| -> Result<(), StoreError> {
        let mut tx = conn.transaction()?;
        for job in jobs {
            done.push(match job {
                Job::Apply(request, reply) => {
                    Done::Apply(reply, in_savepoint(&mut tx, |c| apply(c, &request)))
                }
                Job::Bind {
                    tenant,
                    client,
                    now_ms,
                    reply,
                } => Done::Bind(
                    reply,
                    in_savepoint(&mut tx, |c| bind(c, &tenant, &client, now_ms)),
                ),
                Job::Purge { before_ms, reply } => {
                    Done::Purge(reply, in_savepoint(&mut tx, |c| purge(c, before_ms)))
                }
            });
        }
        tx.commit()?;
        Ok(())
    })();
    if let Err(e) = &commit {
        tracing::error!(error = %e, "storage commit failed");
    }
    for d in done {
        d.send(&commit);
    }
}

fn in_savepoint<T>(
    tx: &mut Transaction<'_>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let sp = tx.savepoint()?;
    let out = f(&sp)?;
    sp.commit()?;
    Ok(out)
}

fn bind(conn: &Connection, tenant: &str, client: &str, now_ms: i64) -> rusqlite::Result<Binding> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO clients (client, tenant, bound_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![client, tenant, now_ms])?;
    let owner: String = conn
        .prepare_cached("SELECT tenant FROM clients WHERE client = ?1")?
        .query_row(params![client], |r| r.get(0))?;
    Ok(if owner == tenant {
        Binding::Ours
    } else {
        Binding::OtherTenant
    })
}

fn purge(conn: &Connection, before_ms: i64) -> rusqlite::Result<u64> {
    let results = conn.execute(
        "DELETE FROM results WHERE stored_at < ?1",
        params![before_ms],
    )?;
    let keys = conn.execute(
        "DELETE FROM idempotency_keys WHERE stored_at < ?1",
        params![before_ms],
    )?;
    Ok((results + keys) as u64)
}

fn decode(outcome: &str) -> rusqlite::Result<Outcome> {
    serde_json::from_str(outcome).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn encode(outcome: &Outcome) -> rusqlite::Result<String> {
    serde_json::to_string(outcome).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn apply(conn: &Connection, req: &ApplyRequest) -> rusqlite::Result<ApplyOutcome> {
    if let Some(key) = &req.key {
        let stored: Option<(Vec<u8>, String, String)> = conn
            .prepare_cached(
                "SELECT fingerprint, op_id, outcome FROM idempotency_keys
                 WHERE tenant = ?1 AND client = ?2 AND key = ?3",
            )?
            .query_row(params![req.tenant, req.client, key.key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((fingerprint, id, outcome)) = stored {
            return Ok(if fingerprint == key.fingerprint {
                ApplyOutcome::KeyReplay(OpResult {
                    id,
                    outcome: decode(&outcome)?,
                    replayed: true,
                })
            } else {
                ApplyOutcome::KeyReused
            });
        }
    }
    let results = req
        .ops
        .iter()
        .map(|op| apply_op(conn, req, op))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if let (Some(key), [result]) = (&req.key, results.as_slice())
        && result.outcome.is_final()
    {
        conn.prepare_cached(
            "INSERT INTO idempotency_keys (tenant, client, key, fingerprint, op_id, outcome, stored_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            req.tenant,
            req.client,
            key.key,
            key.fingerprint.as_slice(),
            result.id,
            encode(&result.outcome)?,
            req.now_ms
        ])?;
    }
    Ok(ApplyOutcome::Results(results))
}

/// The five steps of docs/PROTOCOL.md, *Applying an op*.
fn apply_op(conn: &Connection, req: &ApplyRequest, op: &Op) -> rusqlite::Result<OpResult> {
    let (tenant, client) = (&req.tenant, &req.client);
    let result = |outcome, replayed| OpResult {
        id: op.id.clone(),
        outcome,
        replayed,
    };

    // 1. Idempotency.
    let stored: Option<String> = conn
        .prepare_cached(
            "SELECT outcome FROM results WHERE tenant = ?1 AND client = ?2 AND op_id = ?3",
        )?
        .query_row(params![tenant, client, op.id], |r| r.get(0))
        .optional()?;
    if let Some(outcome) = stored {
        return Ok(result(decode(&outcome)?, true));
    }
    let store = |outcome: Outcome| -> rusqlite::Result<OpResult> {
        conn.prepare_cached(
            "INSERT INTO results (tenant, client, op_id, outcome, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![tenant, client, op.id, encode(&outcome)?, req.now_ms])?;
        Ok(result(outcome, false))
    };

    // 2. Validation.
    let scripted = req
        .reject
        .as_ref()
        .filter(|rule| rule.kind.as_ref().is_none_or(|k| *k == op.kind))
        .map(|rule| rule.reason.clone());
    if let Some(reason) = op.invalid.clone().or(scripted) {
        return store(Outcome::Rejected { reason });
    }
    let Some(entity) = &op.entity else {
        return store(Outcome::Applied { version: None });
    };

    // 3. Order.
    let last: i64 = conn
        .prepare_cached("SELECT last FROM lasts WHERE tenant = ?1 AND client = ?2 AND entity = ?3")?
        .query_row(params![tenant, client, entity], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let current: Option<(i64, String, String, i64)> = conn
        .prepare_cached(
            "SELECT version, state, writer, run_base FROM entities WHERE tenant = ?1 AND entity = ?2",
        )?
        .query_row(params![tenant, entity], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let (version, state, writer, run_base) =
        current.unwrap_or_else(|| (0, "{}".to_owned(), String::new(), 0));
    if op.seq <= last {
        return store(Outcome::Duplicate { version });
    }
    if last < op.prev {
        return Ok(result(Outcome::OutOfOrder { last }, false));
    }
    let mut state: Value =
        serde_json::from_str(&state).unwrap_or_else(|_| Value::Object(Default::default()));

    // 4. Version. Stale means another client wrote after `base` (this client's own writes were
    // made on top of what it read), or `base` names a version that does not exist yet.
    let own_run = writer == *client;
    let foreign = if own_run { run_base } else { version };
    if let Some(base) = op.base_version
        && (base < foreign || base > version)
    {
        return store(Outcome::Conflict { version, state });
    }

    // 5. Apply.
    merge_patch(&mut state, &op.payload);
    let run_base = if own_run { run_base } else { version };
    let version = version + 1;
    conn.prepare_cached(
        "INSERT INTO entities (tenant, entity, version, state, writer, run_base)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, entity) DO UPDATE SET version = excluded.version,
           state = excluded.state, writer = excluded.writer, run_base = excluded.run_base",
    )?
    .execute(params![
        tenant,
        entity,
        version,
        state.to_string(),
        client,
        run_base
    ])?;
    conn.prepare_cached(
        "INSERT INTO lasts (tenant, client, entity, last) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, client, entity) DO UPDATE SET last = excluded.last",
    )?
    .execute(params![tenant, client, entity, op.seq])?;
    store(Outcome::Applied {
        version: Some(version),
    })
}
