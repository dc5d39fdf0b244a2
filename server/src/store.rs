//! Storage: the [`Store`] trait the HTTP layer talks to, and [`SqliteStore`], its embedded
//! SQLite implementation.
//!
//! The trait is shaped so that a shared SQL engine (Postgres) could serve many stateless
//! server instances: every decision that must be atomic (idempotency, order, version, apply,
//! record) happens inside one [`Store::apply`] call, which a database implementation runs as
//! one transaction per op or per request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::config::SyncMode;
use crate::merge::merge_patch;
use crate::now_ms;
use crate::recent::Recent;
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
    /// `base_version` was stale.
    Conflict {
        /// The entity's version when the conflict happened.
        version: i64,
        /// The entity's state then, when this answer carries it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<Value>,
        /// Set instead of `state` when the answer leaves the state out (a second conflict on
        /// the entity in one answer, a state past the answer's budget, or a replay).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        state_omitted: bool,
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
    /// A conflict at `version`, carrying `state` or the `state_omitted` marker.
    pub fn conflict(version: i64, state: Option<Value>) -> Self {
        let state_omitted = state.is_none();
        Outcome::Conflict {
            version,
            state,
            state_omitted,
        }
    }

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

    /// The same outcome without an entity state: what is stored and replayed, so that stored
    /// results never hold a copy of the state per op.
    pub fn without_state(&self) -> Self {
        match self {
            Outcome::Conflict { version, .. } => Outcome::conflict(*version, None),
            other => other.clone(),
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

/// The `created_at` range an op without an entity must fall in, relative to the store's
/// clock when the op is applied. Such an op has no `last` seq to catch a resend after its
/// stored result was purged; refusing any op older than the retention (minus a margin)
/// makes sure a resend that passes still finds its stored result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `created_at` may be at most this many ms in the past.
    pub max_age_ms: i64,
    /// `created_at` may be at most this many ms in the future.
    pub max_ahead_ms: i64,
}

impl Window {
    /// The window for a retention `r`: margin `m = min(r / 10, 1 h)`, ops from `r − 2m` ago
    /// to `m` ahead. A first copy applied at `t1` has `created_at ≤ t1 + m`; a resend applied
    /// at `t2` passes only if `created_at ≥ t2 − (r − 2m)`, so `t2 − t1 ≤ r − m < r` and the
    /// first copy's result (kept at least `r`) is still there.
    pub fn for_retention(retention: Duration) -> Self {
        let r = retention.as_millis().min(i64::MAX as u128 / 4) as i64;
        let margin = (r / 10).min(3_600_000);
        Window {
            max_age_ms: r - 2 * margin,
            max_ahead_ms: margin,
        }
    }
}

/// The bounds one request is applied under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// An op that would grow an entity's state (as JSON) past this many bytes is rejected.
    pub max_state_bytes: usize,
    /// Most bytes of entity state the conflicts of one answer carry.
    pub answer_state_bytes: usize,
    /// The `created_at` window of ops without an entity; `None` accepts any.
    pub unordered: Option<Window>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: 256 << 10,
            answer_state_bytes: 256 << 10,
            unordered: None,
        }
    }
}

/// Everything [`Store::apply`] needs.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    /// The tenant the credential named.
    pub tenant: String,
    /// The client id.
    pub client: String,
    /// The ops, applied in order.
    pub ops: Vec<Op>,
    /// A scripted rejection to apply at validation.
    pub reject: Option<RejectRule>,
    /// Set for `/v1/op`.
    pub key: Option<KeyedRequest>,
    /// The bounds to apply under.
    pub limits: Limits,
    /// The size of the request body, a hint of the memory the request holds while it waits.
    pub body_bytes: usize,
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
/// Contract: within one [`apply`](Store::apply), ops are applied in order and each op's
/// idempotency check, order check, version check, state change, `last` update and result
/// record happen together or not at all, and are durable before the future resolves.
/// Concurrent calls for the same (tenant, client, op id) must serialise so that exactly one
/// applies. A conflict result carries the entity's state at most once per entity and
/// call, within [`Limits::answer_state_bytes`]; stored results never keep the state. The
/// [`Window`] and the time a result is stored at are read on the store's clock when the op
/// is applied.
pub trait Store: Send + Sync + 'static {
    /// Binds `client` to `tenant` on first use and says whether it belongs to `tenant`.
    fn bind_client(
        &self,
        tenant: &str,
        client: &str,
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

    /// Marks an Idempotency-Key as running for every instance that shares the store, or says
    /// that a request with it runs elsewhere. The server also keeps its own requests' keys in
    /// memory; a store that only one process uses (SQLite) needs nothing more, which is the
    /// default.
    fn claim_key(
        &self,
        _tenant: &str,
        _client: &str,
        _key: &KeyedRequest,
    ) -> impl Future<Output = Result<KeyClaim, StoreError>> + Send {
        std::future::ready(Ok(KeyClaim::Claimed(ClaimGuard::none())))
    }
}

/// What [`Store::claim_key`] found.
pub enum KeyClaim {
    /// The key is ours until the guard is released (or dropped).
    Claimed(ClaimGuard),
    /// A request with this key runs on another instance, with the same body or not.
    Running {
        /// Whether its body fingerprint is this request's.
        same_body: bool,
    },
}

type Release =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Holds an Idempotency-Key claim. [`ClaimGuard::release`] gives it back and waits; a guard
/// dropped unreleased (a cancelled request) gives it back in the background.
pub struct ClaimGuard(Option<Release>);

impl ClaimGuard {
    /// A guard with nothing to release.
    pub fn none() -> Self {
        ClaimGuard(None)
    }

    /// A guard whose release runs `release`.
    pub fn new(
        release: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        ClaimGuard(Some(Box::new(release)))
    }

    /// Gives the claim back and waits until it is gone.
    pub async fn release(mut self) {
        if let Some(release) = self.0.take() {
            release().await;
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(release) = self.0.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(release());
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Work for the writer thread. A permit of the tenant's admission semaphore travels with the
/// job and is given back when the writer is done with it.
enum Job {
    Apply(ApplyRequest, Reply<ApplyOutcome>, OwnedSemaphorePermit),
    Bind {
        tenant: String,
        client: String,
        reply: Reply<String>,
        permit: OwnedSemaphorePermit,
    },
    Purge {
        before_ms: i64,
        reply: Reply<u64>,
    },
}

/// How much of one tenant's work may be queued for the writer, in units of one op or one KiB
/// of request body, whichever a request has more of (so at most 8,192 ops or about 8 MiB of
/// bodies). A tenant past it waits (its own requests only) instead of filling a queue, and the
/// memory, that every tenant shares.
const LANE_UNITS: usize = 8_192;
/// While another lane waits, a lane keeps the writer at most this long (then at the next op
/// boundary it yields).
const SLICE: Duration = Duration::from_micros(500);
/// In a group that serves several lanes, a finished job waits for the commit at most about
/// this long while other lanes' work runs.
const WAIT: Duration = Duration::from_micros(250);
/// A group commits after this long, or after [`GROUP_OPS`] ops, even when one lane is alone.
const GROUP_MAX: Duration = Duration::from_millis(25);
/// Most ops one group commit takes on before it commits.
const GROUP_OPS: usize = 2_000;
/// Rows one purge step deletes: about 1.5 ms of work here, so that a purge of any size
/// delays other lanes by about one step (it once deleted 400,000 rows in one 0.9 s job).
const PURGE_CHUNK: usize = 250;
/// Client bindings cached in memory.
const OWNERS_CACHED: usize = 65_536;

/// SQLite in WAL mode. All writes go through one writer thread that serves a queue (lane)
/// per tenant in turn, so that one tenant's large or many jobs cannot stall another's (see
/// `Writer`). Reads use a separate connection, which WAL lets run beside the writer.
pub struct SqliteStore {
    jobs: mpsc::UnboundedSender<Job>,
    /// Dropped with the store, which ends the checkpoint thread.
    _stop_checkpoints: std::sync::mpsc::Sender<()>,
    reader: Arc<Mutex<Connection>>,
    /// client → owning tenant. Bindings never change once made, so both answers (ours and
    /// another tenant's) are cached; bounded, because strangers can make up client ids.
    owners: Mutex<Recent<String, String>>,
    /// Admission per tenant: the writer's queue for a tenant holds at most [`LANE_UNITS`].
    admission: Mutex<HashMap<String, Arc<Semaphore>>>,
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
        writer.busy_timeout(Duration::from_secs(5))?;
        writer.execute_batch(SCHEMA)?;
        writer.set_prepared_statement_cache_capacity(64);
        // Large states span many overflow pages; a page cache of 64 MiB keeps a group's dirty
        // pages in memory (no spill into the WAL mid-transaction) and hot entities cached.
        writer.pragma_update(None, "cache_size", -65_536)?;
        // Checkpoints (copying the WAL into the database file, with its syncs) run on a thread
        // of their own, so that they never stall the writer and everyone waiting for it.
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Connection::open(path)?;
        checkpointer.busy_timeout(Duration::from_secs(5))?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stopped))
            .map_err(|e| StoreError(format!("could not start the checkpoint thread: {e}")))?;

        let reader = Connection::open(path)?;
        reader.busy_timeout(Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", true)?;

        let (jobs, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || Writer::new(writer, rx).run())
            .map_err(|e| StoreError(format!("could not start the writer thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            _stop_checkpoints: stop_checkpoints,
            reader: Arc::new(Mutex::new(reader)),
            owners: Mutex::new(Recent::new(OWNERS_CACHED)),
            admission: Mutex::new(HashMap::new()),
        })
    }

    /// Waits until `tenant`'s lane has room for `units` more.
    async fn admit(&self, tenant: &str, units: usize) -> Result<OwnedSemaphorePermit, StoreError> {
        let semaphore = self
            .admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(LANE_UNITS)))
            .clone();
        let n = units.clamp(1, LANE_UNITS) as u32;
        semaphore
            .acquire_many_owned(n)
            .await
            .map_err(|_| StoreError("the writer's admission closed".into()))
    }

    async fn submit<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.jobs
            .send(job)
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

    fn cached_owner(&self, client: &str) -> Option<String> {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&client.to_owned())
            .cloned()
    }
}

impl Store for SqliteStore {
    async fn bind_client(&self, tenant: &str, client: &str) -> Result<Binding, StoreError> {
        let owner = match self.cached_owner(client) {
            Some(owner) => owner,
            None => {
                // A known client (and so every refusal of another tenant's client) costs a
                // read, not a writer job; only a new client needs the writer.
                let id = client.to_owned();
                let known: Option<String> = self
                    .read(move |conn| {
                        conn.prepare_cached("SELECT tenant FROM clients WHERE client = ?1")?
                            .query_row(params![id], |r| r.get(0))
                            .optional()
                    })
                    .await?;
                let owner = match known {
                    Some(owner) => owner,
                    None => {
                        let permit = self.admit(tenant, 1).await?;
                        let (reply, rx) = oneshot::channel();
                        let job = Job::Bind {
                            tenant: tenant.to_owned(),
                            client: client.to_owned(),
                            reply,
                            permit,
                        };
                        self.submit(job, rx).await?
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
        let units = request.ops.len().max(request.body_bytes / 1024);
        let permit = self.admit(&request.tenant, units).await?;
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Apply(request, reply, permit), rx).await
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
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Purge { before_ms, reply }, rx).await
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

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Runs passive checkpoints (they wait for nobody) until the store is dropped.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "checkpoint failed");
        }
    }
}

/// A lane of the writer: one tenant's jobs, or the purge.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Lane {
    Tenant(Arc<str>),
    Purge,
}

/// A job the writer is working on.
enum Task {
    Apply(Box<ApplyTask>),
    Bind {
        tenant: String,
        client: String,
        reply: Reply<String>,
        _permit: OwnedSemaphorePermit,
        owner: Option<String>,
    },
    Purge(PurgeTask),
}

struct ApplyTask {
    request: ApplyRequest,
    reply: Reply<ApplyOutcome>,
    _permit: OwnedSemaphorePermit,
    /// The next op to apply; the ops before it are applied (maybe in earlier groups).
    next: usize,
    results: Vec<OpResult>,
    /// Set when a keyed request found its stored answer.
    keyed: Option<ApplyOutcome>,
    /// Entities whose state this answer already carries, and the state budget left.
    shown: HashSet<String>,
    budget: usize,
}

struct PurgeTask {
    before_ms: i64,
    reply: Reply<u64>,
    deleted: u64,
    chunks: u64,
    results_done: bool,
    done: bool,
}

/// A finished job: its reply waits for the group's commit.
enum Done {
    Apply(Reply<ApplyOutcome>, Result<ApplyOutcome, StoreError>),
    Bind(Reply<String>, Result<String, StoreError>),
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

impl Task {
    fn from_job(job: Job) -> (Lane, Task) {
        match job {
            Job::Apply(request, reply, permit) => {
                let budget = request.limits.answer_state_bytes;
                (
                    Lane::Tenant(request.tenant.as_str().into()),
                    Task::Apply(Box::new(ApplyTask {
                        results: Vec::with_capacity(request.ops.len()),
                        request,
                        reply,
                        _permit: permit,
                        next: 0,
                        keyed: None,
                        shown: HashSet::new(),
                        budget,
                    })),
                )
            }
            Job::Bind {
                tenant,
                client,
                reply,
                permit,
            } => (
                Lane::Tenant(tenant.as_str().into()),
                Task::Bind {
                    tenant,
                    client,
                    reply,
                    _permit: permit,
                    owner: None,
                },
            ),
            Job::Purge { before_ms, reply } => (
                Lane::Purge,
                Task::Purge(PurgeTask {
                    before_ms,
                    reply,
                    deleted: 0,
                    chunks: 0,
                    results_done: false,
                    done: false,
                }),
            ),
        }
    }

    /// Does one step (one op, one bind, one purge chunk); returns whether the task is done.
    fn step(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        match self {
            Task::Apply(task) => task.step(conn),
            Task::Bind {
                tenant,
                client,
                owner,
                ..
            } => {
                *owner = Some(bind(conn, tenant, client)?);
                Ok(true)
            }
            Task::Purge(task) => task.step(conn),
        }
    }

    /// The reply once the task is done, or failed with `error`.
    fn finish(self, error: Option<StoreError>) -> Done {
        match self {
            Task::Apply(task) => {
                let outcome = match error {
                    Some(e) => Err(e),
                    None => Ok(task.keyed.unwrap_or(ApplyOutcome::Results(task.results))),
                };
                Done::Apply(task.reply, outcome)
            }
            Task::Bind { reply, owner, .. } => {
                let owner = match (error, owner) {
                    (Some(e), _) => Err(e),
                    (None, Some(owner)) => Ok(owner),
                    (None, None) => Err(StoreError("the client was not bound".into())),
                };
                Done::Bind(reply, owner)
            }
            Task::Purge(task) => {
                if error.is_none() && task.deleted > 0 {
                    tracing::info!(
                        rows = task.deleted,
                        chunks = task.chunks,
                        "purged expired results"
                    );
                }
                Done::Purge(task.reply, error.map_or(Ok(task.deleted), Err))
            }
        }
    }
}

impl ApplyTask {
    fn step(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let now = now_ms();
        if let Some(key) = &self.request.key {
            // A keyed request has one op; its key lookup, the op and the key record are one
            // step, so they commit together.
            let stored: Option<(Vec<u8>, String, String)> = conn
                .prepare_cached(
                    "SELECT fingerprint, op_id, outcome FROM idempotency_keys
                     WHERE tenant = ?1 AND client = ?2 AND key = ?3",
                )?
                .query_row(
                    params![self.request.tenant, self.request.client, key.key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((fingerprint, id, outcome)) = stored {
                self.keyed = Some(if fingerprint == key.fingerprint {
                    ApplyOutcome::KeyReplay(OpResult {
                        id,
                        outcome: decode(&outcome)?.without_state(),
                        replayed: true,
                    })
                } else {
                    ApplyOutcome::KeyReused
                });
                return Ok(true);
            }
            let Some(op) = self.request.ops.first() else {
                return Ok(true);
            };
            let result = apply_op(
                conn,
                &self.request,
                op,
                now,
                &mut self.shown,
                &mut self.budget,
            )?;
            if result.outcome.is_final() {
                conn.prepare_cached(
                    "INSERT INTO idempotency_keys (tenant, client, key, fingerprint, op_id, outcome, stored_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    self.request.tenant,
                    self.request.client,
                    key.key,
                    key.fingerprint.as_slice(),
                    result.id,
                    encode(&result.outcome.without_state())?,
                    now
                ])?;
            }
            self.results.push(result);
            return Ok(true);
        }
        let Some(op) = self.request.ops.get(self.next) else {
            return Ok(true);
        };
        let result = apply_op(
            conn,
            &self.request,
            op,
            now,
            &mut self.shown,
            &mut self.budget,
        )?;
        self.results.push(result);
        self.next += 1;
        Ok(self.next >= self.request.ops.len())
    }
}

impl PurgeTask {
    /// Deletes up to [`PURGE_CHUNK`] rows: results first, then Idempotency-Key responses.
    fn step(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let sql = if self.results_done {
            "DELETE FROM idempotency_keys WHERE (tenant, client, key) IN
               (SELECT tenant, client, key FROM idempotency_keys WHERE stored_at < ?1 LIMIT ?2)"
        } else {
            "DELETE FROM results WHERE (tenant, client, op_id) IN
               (SELECT tenant, client, op_id FROM results WHERE stored_at < ?1 LIMIT ?2)"
        };
        let n = conn
            .prepare_cached(sql)?
            .execute(params![self.before_ms, PURGE_CHUNK as i64])?;
        self.deleted += n as u64;
        self.chunks += 1;
        if n < PURGE_CHUNK {
            if self.results_done {
                self.done = true;
            }
            self.results_done = true;
        }
        Ok(self.done)
    }
}

/// The writer thread's state. Jobs arrive on one channel and are sorted into lanes, one per
/// tenant plus one for the purge; the lanes take turns (round robin). A group is one
/// transaction and one commit; it runs lane after lane until nothing is left, or until
/// [`GROUP_MAX`] or [`GROUP_OPS`] (so that a lone busy tenant still gets group commit), or,
/// when it serves more than one lane, once a finished job has waited [`WAIT`], or before a
/// lane whose steps lately took long enough to keep another lane's finished reply past
/// [`WAIT`]. Within a group a lane yields after [`SLICE`] whenever another lane waits, at an
/// op boundary: a request of many ops may so be applied across several groups, op by op, in
/// order. The writer thus never runs one tenant's work for much longer than a slice and one
/// op while another tenant waits, whatever the size of its requests.
struct Writer {
    conn: Connection,
    rx: mpsc::UnboundedReceiver<Job>,
    lanes: HashMap<Lane, VecDeque<Task>>,
    /// Lanes with work, in turn order; the lane running now is not in it.
    ring: VecDeque<Lane>,
    /// What one step of each lane took lately (a moving average), to tell whether running it
    /// before the commit would keep other lanes' finished replies waiting too long.
    step_cost: HashMap<Lane, Duration>,
}

impl Writer {
    fn new(conn: Connection, rx: mpsc::UnboundedReceiver<Job>) -> Self {
        Writer {
            conn,
            rx,
            lanes: HashMap::new(),
            ring: VecDeque::new(),
            step_cost: HashMap::new(),
        }
    }

    fn run(mut self) {
        loop {
            if self.ring.is_empty() {
                match self.rx.blocking_recv() {
                    Some(job) => enqueue(&mut self.lanes, &mut self.ring, None, job),
                    None => return,
                }
            }
            drain(&mut self.rx, &mut self.lanes, &mut self.ring, None);
            self.group();
        }
    }

    fn group(&mut self) {
        let Writer {
            conn,
            rx,
            lanes,
            ring,
            step_cost,
        } = self;
        let started = Instant::now();
        let mut done: Vec<Done> = Vec::new();
        let mut ops = 0usize;
        let mut served: Vec<Lane> = Vec::new();
        // When the first job of this group finished: its reply waits for the commit.
        let mut first_done: Option<Instant> = None;
        let mut tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                // Nothing can run: fail the lane at the front so that the writer does not spin.
                tracing::error!(error = %e, "storage could not begin a transaction");
                if let Some(lane) = ring.pop_front()
                    && let Some(queue) = lanes.remove(&lane)
                {
                    let error = StoreError::from(e);
                    for task in queue {
                        fail(task, error.clone());
                    }
                }
                return;
            }
        };
        // Whether the group must commit now: it is full, or it serves several lanes and a
        // finished reply has waited long enough for others' work.
        let commit_due = |now: Instant, ops: usize, served: usize, first_done: Option<Instant>| {
            ops >= GROUP_OPS
                || now - started >= GROUP_MAX
                || (served > 1 && first_done.is_some_and(|t| now - t >= WAIT))
        };
        let mut commit_now = false;
        // Lanes whose finished replies wait for this group's commit.
        let mut waiting: Vec<Lane> = Vec::new();
        while let Some(lane) = ring.pop_front() {
            // Another lane's replies wait: if one step of this lane would keep them past
            // WAIT, commit first and run it in the next group.
            if let Some(since) = first_done
                && waiting.iter().any(|l| *l != lane)
                && since.elapsed() + step_cost.get(&lane).copied().unwrap_or_default() >= WAIT
            {
                ring.push_front(lane);
                break;
            }
            if !served.contains(&lane) {
                served.push(lane.clone());
            }
            let slice_started = Instant::now();
            // The lane yields once it had its slice and another lane waits.
            let slice_over = |now: Instant, ring: &VecDeque<Lane>| {
                !ring.is_empty() && now - slice_started >= SLICE
            };
            loop {
                let Some(mut task) = lanes.get_mut(&lane).and_then(VecDeque::pop_front) else {
                    break;
                };
                let (n_served, done_at) = (served.len(), first_done);
                let cost = step_cost.entry(lane.clone()).or_default();
                let outcome = (|| -> Result<bool, StoreError> {
                    let sp = tx.savepoint()?;
                    let mut finished;
                    loop {
                        let step_started = Instant::now();
                        finished = task.step(&sp)?;
                        let now = Instant::now();
                        *cost = (*cost * 7 + (now - step_started)) / 8;
                        ops += 1;
                        if finished {
                            break;
                        }
                        drain(rx, lanes, ring, Some(&lane));
                        if commit_due(now, ops, n_served, done_at) || slice_over(now, ring) {
                            break;
                        }
                    }
                    sp.commit()?;
                    Ok(finished)
                })();
                match outcome {
                    Ok(true) => {
                        done.push(task.finish(None));
                        first_done.get_or_insert_with(Instant::now);
                        if !waiting.contains(&lane) {
                            waiting.push(lane.clone());
                        }
                    }
                    Ok(false) => {
                        // Yielding mid-task: it stays at the head of its lane.
                        if let Some(queue) = lanes.get_mut(&lane) {
                            queue.push_front(task);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "storage failed a job");
                        done.push(task.finish(Some(e)));
                        first_done.get_or_insert_with(Instant::now);
                        if !waiting.contains(&lane) {
                            waiting.push(lane.clone());
                        }
                    }
                }
                drain(rx, lanes, ring, Some(&lane));
                let now = Instant::now();
                if commit_due(now, ops, served.len(), first_done) {
                    commit_now = true;
                    break;
                }
                if slice_over(now, ring) {
                    break;
                }
            }
            match lanes.get(&lane) {
                Some(queue) if !queue.is_empty() => ring.push_back(lane),
                _ => {
                    lanes.remove(&lane);
                }
            }
            if commit_now || commit_due(Instant::now(), ops, served.len(), first_done) {
                break;
            }
        }
        let work = started.elapsed();
        let commit = tx.commit().map_err(StoreError::from);
        if let Err(e) = &commit {
            tracing::error!(error = %e, "storage commit failed");
        }
        tracing::trace!(
            ops,
            lanes = served.len(),
            replies = done.len(),
            work_us = work.as_micros() as u64,
            commit_us = (started.elapsed() - work).as_micros() as u64,
            "group committed"
        );
        for d in done {
            d.send(&commit);
        }
    }
}

/// Fails a task that never ran (its transaction could not begin).
fn fail(task: Task, error: StoreError) {
    let done = match task {
        Task::Apply(t) => Done::Apply(t.reply, Err(error)),
        Task::Bind { reply, .. } => Done::Bind(reply, Err(error)),
        Task::Purge(t) => Done::Purge(t.reply, Err(error)),
    };
    done.send(&Ok(()));
}

/// Files a job into its lane; a lane that gets work joins the ring unless it is `running`.
fn enqueue(
    lanes: &mut HashMap<Lane, VecDeque<Task>>,
    ring: &mut VecDeque<Lane>,
    running: Option<&Lane>,
    job: Job,
) {
    let (lane, task) = Task::from_job(job);
    let queue = lanes.entry(lane.clone()).or_default();
    let idle = queue.is_empty();
    queue.push_back(task);
    if idle && running != Some(&lane) && !ring.contains(&lane) {
        ring.push_back(lane);
    }
}

/// Files every job that is waiting.
fn drain(
    rx: &mut mpsc::UnboundedReceiver<Job>,
    lanes: &mut HashMap<Lane, VecDeque<Task>>,
    ring: &mut VecDeque<Lane>,
    running: Option<&Lane>,
) {
    while let Ok(job) = rx.try_recv() {
        enqueue(lanes, ring, running, job);
    }
}

/// Binds `client` to `tenant` unless it is bound already; returns its owner.
fn bind(conn: &Connection, tenant: &str, client: &str) -> rusqlite::Result<String> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO clients (client, tenant, bound_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![client, tenant, now_ms()])?;
    conn.prepare_cached("SELECT tenant FROM clients WHERE client = ?1")?
        .query_row(params![client], |r| r.get(0))
}

fn decode(outcome: &str) -> rusqlite::Result<Outcome> {
    serde_json::from_str(outcome).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn encode(outcome: &Outcome) -> rusqlite::Result<String> {
    serde_json::to_string(outcome).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// An entity's row as the order and version checks read it.
#[derive(Debug, Clone)]
pub(crate) struct Current {
    pub version: i64,
    pub state: String,
    pub writer: String,
    pub run_base: i64,
}

/// What an applied op writes: the entity's new row (its writer is the op's client) and the
/// client's new `last` for the entity (the op's seq).
#[derive(Debug, Clone)]
pub(crate) struct EntityWrite {
    pub version: i64,
    pub state: String,
    pub run_base: i64,
    pub last: i64,
}

/// The replay of a stored outcome.
pub(crate) fn replayed(id: &str, stored: &str) -> Result<OpResult, serde_json::Error> {
    Ok(OpResult {
        id: id.to_owned(),
        outcome: serde_json::from_str::<Outcome>(stored)?.without_state(),
        replayed: true,
    })
}

/// Step 2 of docs/PROTOCOL.md, *Applying an op* (validation), and the whole answer of an
/// op without an entity, at store time `now`. `None`: the op names an entity and passed;
/// go on with [`decide_entity`]. Shared by every store, so that they decide alike.
pub(crate) fn decide_without_entity(req: &ApplyRequest, op: &Op, now: i64) -> Option<Outcome> {
    let scripted = req
        .reject
        .as_ref()
        .filter(|rule| rule.kind.as_ref().is_none_or(|k| *k == op.kind))
        .map(|rule| rule.reason.clone());
    if let Some(reason) = op.invalid.clone().or(scripted) {
        return Some(Outcome::Rejected { reason });
    }
    if op.entity.is_some() {
        return None;
    }
    if let Some(window) = req.limits.unordered {
        if op.created_at < now.saturating_sub(window.max_age_ms) {
            return Some(Outcome::Rejected {
                reason: format!(
                    "expired: created_at is more than {} s old, and an op without an entity \
                     that old could outlive its stored result and apply twice",
                    window.max_age_ms / 1000
                ),
            });
        }
        if op.created_at > now.saturating_add(window.max_ahead_ms) {
            return Some(Outcome::Rejected {
                reason: format!(
                    "created_at is more than {} ms ahead of the server's clock",
                    window.max_ahead_ms
                ),
            });
        }
    }
    Some(Outcome::Applied { version: None })
}

/// Steps 3 to 5 (order, version, apply) for an op on `entity`, given the client's `last`
/// seq for it and its row (`None`: it does not exist yet). Returns the outcome and, when the
/// op applies, what to write. `shown` and `budget` bound the states the answer carries.
/// Shared by every store: each reads its rows, calls this, and writes what it says.
pub(crate) fn decide_entity(
    req: &ApplyRequest,
    op: &Op,
    entity: &str,
    last: i64,
    current: Option<&Current>,
    shown: &mut HashSet<String>,
    budget: &mut usize,
) -> (Outcome, Option<EntityWrite>) {
    let client = &req.client;
    let (version, text, writer, run_base) = match current {
        Some(c) => (c.version, c.state.as_str(), c.writer.as_str(), c.run_base),
        None => (0, "{}", "", 0),
    };
    // 3. Order.
    if op.seq <= last {
        return (Outcome::Duplicate { version }, None);
    }
    if last < op.prev {
        return (Outcome::OutOfOrder { last }, None);
    }

    // 4. Version. Stale means another client wrote after `base` (this client's own writes were
    // made on top of what it read), or `base` names a version that does not exist yet. The
    // state is parsed only when the answer will carry it: once per entity, within the budget.
    let own_run = writer == client.as_str();
    let foreign = if own_run { run_base } else { version };
    if let Some(base) = op.base_version
        && (base < foreign || base > version)
    {
        let state = if !shown.contains(entity) && text.len() <= *budget {
            *budget -= text.len();
            shown.insert(entity.to_owned());
            serde_json::from_str(text).ok()
        } else {
            None
        };
        return (Outcome::conflict(version, state), None);
    }

    // 5. Apply, unless the state would grow past the limit.
    let mut state: Value =
        serde_json::from_str(text).unwrap_or_else(|_| Value::Object(Default::default()));
    merge_patch(&mut state, &op.payload);
    let merged = state.to_string();
    if merged.len() > req.limits.max_state_bytes && merged.len() > text.len() {
        return (
            Outcome::Rejected {
                reason: format!(
                    "state too large: this op would make the entity's state {} bytes, over the \
                     server's limit of {} bytes",
                    merged.len(),
                    req.limits.max_state_bytes
                ),
            },
            None,
        );
    }
    let run_base = if own_run { run_base } else { version };
    let version = version + 1;
    (
        Outcome::Applied {
            version: Some(version),
        },
        Some(EntityWrite {
            version,
            state: merged,
            run_base,
            last: op.seq,
        }),
    )
}

/// The five steps of docs/PROTOCOL.md, *Applying an op*, at store time `now`, on SQLite: the
/// reads and writes around [`decide_without_entity`] and [`decide_entity`].
fn apply_op(
    conn: &Connection,
    req: &ApplyRequest,
    op: &Op,
    now: i64,
    shown: &mut HashSet<String>,
    budget: &mut usize,
) -> rusqlite::Result<OpResult> {
    let (tenant, client) = (&req.tenant, &req.client);

    // 1. Idempotency.
    let stored: Option<String> = conn
        .prepare_cached(
            "SELECT outcome FROM results WHERE tenant = ?1 AND client = ?2 AND op_id = ?3",
        )?
        .query_row(params![tenant, client, op.id], |r| r.get(0))
        .optional()?;
    if let Some(outcome) = stored {
        return replayed(&op.id, &outcome)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
    }
    // The stored copy never holds the state; the answer may.
    let store = |outcome: Outcome| -> rusqlite::Result<OpResult> {
        if outcome.is_final() {
            conn.prepare_cached(
                "INSERT INTO results (tenant, client, op_id, outcome, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![tenant, client, op.id, encode(&outcome.without_state())?, now])?;
        }
        Ok(OpResult {
            id: op.id.clone(),
            outcome,
            replayed: false,
        })
    };

    // 2. Validation (and the answer of an op without an entity).
    if let Some(outcome) = decide_without_entity(req, op, now) {
        return store(outcome);
    }
    let Some(entity) = &op.entity else {
        return store(Outcome::Applied { version: None });
    };

    // 3.–5. Order, version, apply.
    let last: i64 = conn
        .prepare_cached("SELECT last FROM lasts WHERE tenant = ?1 AND client = ?2 AND entity = ?3")?
        .query_row(params![tenant, client, entity], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let current: Option<Current> = conn
        .prepare_cached(
            "SELECT version, state, writer, run_base FROM entities WHERE tenant = ?1 AND entity = ?2",
        )?
        .query_row(params![tenant, entity], |r| {
            Ok(Current {
                version: r.get(0)?,
                state: r.get(1)?,
                writer: r.get(2)?,
                run_base: r.get(3)?,
            })
        })
        .optional()?;
    let (outcome, write) = decide_entity(req, op, entity, last, current.as_ref(), shown, budget);
    if let Some(w) = write {
        conn.prepare_cached(
            "INSERT INTO entities (tenant, entity, version, state, writer, run_base)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant, entity) DO UPDATE SET version = excluded.version,
               state = excluded.state, writer = excluded.writer, run_base = excluded.run_base",
        )?
        .execute(params![
            tenant, entity, w.version, w.state, client, w.run_base
        ])?;
        conn.prepare_cached(
            "INSERT INTO lasts (tenant, client, entity, last) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant, client, entity) DO UPDATE SET last = excluded.last",
        )?
        .execute(params![tenant, client, entity, w.last])?;
    }
    store(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conflicts_serialize_with_the_state_or_the_marker() {
        let with = OpResult {
            id: "a".into(),
            outcome: Outcome::conflict(9, Some(json!({"x": 1}))),
            replayed: false,
        };
        assert_eq!(
            serde_json::to_value(&with).unwrap(),
            json!({"id": "a", "status": "conflict", "version": 9, "state": {"x": 1}})
        );
        let without = OpResult {
            outcome: with.outcome.without_state(),
            replayed: true,
            ..with
        };
        assert_eq!(
            serde_json::to_value(&without).unwrap(),
            json!({"id": "a", "status": "conflict", "version": 9, "state_omitted": true, "replayed": true})
        );
        // A row stored before states were left out still decodes, and replays without it.
        let old: Outcome =
            serde_json::from_str(r#"{"status":"conflict","version":3,"state":{"y":2}}"#).unwrap();
        assert_eq!(old.without_state(), Outcome::conflict(3, None));
    }

    #[test]
    fn the_unordered_window_leaves_a_margin_on_both_sides() {
        let w = Window::for_retention(Duration::from_secs(7 * 86_400));
        assert_eq!(w.max_ahead_ms, 3_600_000);
        assert_eq!(w.max_age_ms, 7 * 86_400_000 - 7_200_000);
        let w = Window::for_retention(Duration::from_secs(1));
        assert_eq!((w.max_age_ms, w.max_ahead_ms), (800, 100));
    }
}
