//! A deterministic simulation of the outbox: the core driven exactly as the browser shell drives
//! it, against an in-memory store and a simulated server that speaks the wire protocol of
//! docs/PROTOCOL.md, on a fake clock. Nothing sleeps and nothing reads the wall clock.
//!
//! - [`Server`] applies ops by the five steps of PROTOCOL.md (idempotency by `(client, id)`,
//!   validation, `prev <= last < seq` ordering, versions, apply) and answers in batch mode
//!   (`{"results": [...]}`) or single mode (HTTP statuses and problem bodies). It keeps a log of
//!   every op it applied.
//! - [`Fault`]s are injected at the moment a request reaches the server: from a script first (for
//!   scenario tests), then at random by [`FaultRates`] (for the model test).
//! - [`Sim`] is the shell: it performs every [`Action`], keeps requests in flight across clock
//!   advances (they can arrive at the server and be answered in any order, or time out), and
//!   restarts by dropping the drainer and everything in flight and rebuilding from the store.
//! - [`Ledger`] follows every accepted op (and its rebased copies, retried dead letters and
//!   resolved conflicts) and checks the delivery contract as the simulation runs.
//!
//! Every check panics with the recent trace, so a failing seed explains itself.
#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;

use outbox::core::copy::{self, Copied, CopiedOp, CopyMeta, CopyWrite, Start};
use outbox::core::memory::run_now;
use outbox::core::retry_after::format_http_date;
use outbox::core::store::{self, QueueTxn};
use outbox::core::wire::{ClientId, encode_request};
use outbox::core::{
    Config, ConflictOutcome, Counters, DeadLetter, Draft, Event, MemoryStore, Millis, Op, OpId,
    ParkedConflict, Priority, Receipt, Refusal, Reply, RequestId, Resolution, Rng, SendMode,
    Session, SessionAction, SessionInput, Strategy, WakeReason, credentials_checksum,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// 2025-11-25T00:00:00Z: a realistic epoch, so HTTP dates look like HTTP dates.
pub const EPOCH: Millis = 1_764_028_800_000;

/// The kind whose ops make a whole request malformed (`400` for the request, not per op). It
/// stands for an op the server cannot parse although the client's admission let it in (a
/// client and a server that disagree on a limit).
pub const POISON_KIND: &str = "poison";

// ---------------------------------------------------------------------------------------------
// The simulated server
// ---------------------------------------------------------------------------------------------

/// A final or passing result of one op, as the server decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The op took effect; `version` is the entity's version after it (`None` if unordered).
    Applied { version: Option<u64> },
    /// An op with this `seq` or a later one already took effect.
    Duplicate { version: u64 },
    /// `base_version` is stale.
    Conflict { version: u64 },
    /// The op is invalid.
    Rejected { reason: String },
    /// A predecessor has not arrived.
    OutOfOrder { last: u64 },
}

impl Outcome {
    /// Whether the result is stored under the op's id (all but `out_of_order`).
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::OutOfOrder { .. })
    }
}

/// One op the server applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Whose op.
    pub client: ClientId,
    /// Its id.
    pub id: OpId,
    /// Its seq (0 for another user's edit).
    pub seq: u64,
    /// Its entity.
    pub entity: Option<String>,
    /// The entity's version after it.
    pub version: Option<u64>,
    /// When.
    pub at: Millis,
}

#[derive(Deserialize)]
struct WireOp {
    id: OpId,
    seq: u64,
    prev: u64,
    entity: Option<String>,
    kind: String,
    payload: Box<RawValue>,
    #[serde(default)]
    base_version: Option<u64>,
    #[allow(dead_code)]
    created_at: u64,
}

#[derive(Deserialize)]
struct Envelope {
    client: ClientId,
    ops: Vec<WireOp>,
}

/// The reference server's apply rules, in memory.
#[derive(Debug, Clone)]
pub struct Server {
    /// Stored final results by `(client, op id)`.
    results: HashMap<(ClientId, OpId), Outcome>,
    /// Stored `Idempotency-Key` responses: the body they answered and the result.
    keys: HashMap<(ClientId, String), (String, OpId, Outcome)>,
    /// The highest applied `seq` per `(client, entity)`.
    lasts: HashMap<(ClientId, String), u64>,
    /// Entity versions.
    versions: BTreeMap<String, u64>,
    /// Per entity, the client of the latest run of writes and the version before that run: what
    /// the version check compares with, since a client's own writes never conflict.
    runs: BTreeMap<String, (ClientId, u64)>,
    /// Every op applied, in order.
    pub log: Vec<Applied>,
    /// Whether the bearer token is accepted (`401` otherwise).
    pub auth_ok: bool,
    /// Whether the server is unreachable (requests fail, the probe fails).
    pub down: bool,
    /// Largest request body accepted (`413` beyond).
    pub max_body: usize,
    /// Requests answered, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// `out_of_order` answers given.
    pub out_of_order: u64,
    /// The last op answered `out_of_order`: (seq, prev, last, entity).
    pub last_out_of_order: Option<(u64, u64, u64, String)>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            results: HashMap::new(),
            keys: HashMap::new(),
            lasts: HashMap::new(),
            versions: BTreeMap::new(),
            runs: BTreeMap::new(),
            log: Vec::new(),
            auth_ok: true,
            down: false,
            max_body: 1024 * 1024,
            statuses: BTreeMap::new(),
            out_of_order: 0,
            last_out_of_order: None,
        }
    }
}

/// Another user of the same backend, who edits entities too.
pub fn other_client() -> ClientId {
    OpId::from_random_bytes([0xEE; 16])
}

fn problem(status: u16, slug: &str, detail: &str, extra: Value) -> String {
    let mut body = json!({
        "type": format!("https://outbox.dev/problems/{slug}"),
        "title": slug,
        "status": status,
        "detail": detail,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body.to_string()
}

fn http(status: u16, retry_after: Option<String>, body: String) -> Reply {
    Reply::Http {
        status,
        retry_after,
        body,
    }
}

fn entity_state(version: u64) -> Value {
    json!({ "v": version })
}

/// A conflict carries the entity's state unless `with_state` is false (PROTOCOL.md, *Conflict
/// states*: once per entity per answer, never on a replay), and then `state_omitted`.
fn result_json(id: OpId, outcome: &Outcome, replayed: bool, with_state: bool) -> Value {
    let id = id.to_string();
    let mut value = match outcome {
        Outcome::Applied { version } => json!({"id": id, "status": "applied", "version": version}),
        Outcome::Duplicate { version } => {
            json!({"id": id, "status": "duplicate", "version": version})
        }
        Outcome::Conflict { version } if with_state => json!({
            "id": id, "status": "conflict", "version": version, "state": entity_state(*version)
        }),
        Outcome::Conflict { version } => json!({
            "id": id, "status": "conflict", "version": version, "state_omitted": true
        }),
        Outcome::Rejected { reason } => json!({"id": id, "status": "rejected", "reason": reason}),
        Outcome::OutOfOrder { last } => json!({"id": id, "status": "out_of_order", "last": last}),
    };
    if replayed {
        value["replayed"] = Value::Bool(true);
    }
    value
}

/// How `/v1/op` answers one result (the `/v1/op` table of PROTOCOL.md). Problem bodies carry the
/// op's `id` and `op_status`; a replayed answer carries `"replayed": true`.
fn single_response(id: OpId, outcome: &Outcome, replayed: bool) -> Reply {
    let extra = |mut extra: Value, op_status: &str| {
        extra["id"] = Value::String(id.to_string());
        extra["op_status"] = Value::String(op_status.to_owned());
        if replayed {
            extra["replayed"] = Value::Bool(true);
        }
        extra
    };
    match outcome {
        Outcome::Applied { .. } | Outcome::Duplicate { .. } => http(
            200,
            None,
            result_json(id, outcome, replayed, !replayed).to_string(),
        ),
        Outcome::Conflict { version } => http(
            409,
            None,
            problem(
                409,
                "conflict",
                "base_version is not the entity's version",
                extra(
                    match replayed {
                        false => json!({"version": version, "state": entity_state(*version)}),
                        true => json!({"version": version, "state_omitted": true}),
                    },
                    "conflict",
                ),
            ),
        ),
        Outcome::Rejected { reason } => http(
            422,
            None,
            problem(
                422,
                "rejected",
                reason,
                extra(json!({ "reason": reason }), "rejected"),
            ),
        ),
        Outcome::OutOfOrder { last } => http(
            425,
            None,
            problem(
                425,
                "out-of-order",
                "a predecessor has not arrived",
                extra(json!({ "last": last }), "out_of_order"),
            ),
        ),
    }
}

impl Server {
    /// The entity's current version (0: it does not exist).
    pub fn version(&self, entity: &str) -> u64 {
        self.versions.get(entity).copied().unwrap_or(0)
    }

    /// The highest `seq` of `client` applied on `entity`.
    pub fn last(&self, client: ClientId, entity: &str) -> u64 {
        self.lasts
            .get(&(client, entity.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The stored final result for an op id.
    pub fn stored(&self, client: ClientId, id: OpId) -> Option<&Outcome> {
        self.results.get(&(client, id))
    }

    /// Another user changes `entity`: its version moves on.
    pub fn other_user_edits(&mut self, entity: &str, now: Millis) {
        self.record_write(other_client(), entity);
        let version = self.version(entity) + 1;
        self.versions.insert(entity.to_owned(), version);
        self.log.push(Applied {
            client: other_client(),
            id: OpId::from_random_bytes([0; 16]),
            seq: 0,
            entity: Some(entity.to_owned()),
            version: Some(version),
            at: now,
        });
    }

    /// The version `client`'s `base_version` is checked against: the entity's version when
    /// another client wrote last, or the version before `client`'s own latest run of writes.
    pub fn foreign_version(&self, client: ClientId, entity: &str) -> u64 {
        match self.runs.get(entity) {
            Some(&(writer, before)) if writer == client => before,
            _ => self.version(entity),
        }
    }

    fn record_write(&mut self, client: ClientId, entity: &str) {
        let before = self.version(entity);
        match self.runs.get(entity) {
            Some(&(writer, _)) if writer == client => {}
            _ => {
                self.runs.insert(entity.to_owned(), (client, before));
            }
        }
    }

    /// `GET /v1/health`.
    pub fn healthy(&self) -> bool {
        !self.down
    }

    /// Handles a request that reached the server. `key` is the `Idempotency-Key` header (single
    /// mode). `crash_after` makes the server fail with 500 after applying that many ops.
    pub fn handle(
        &mut self,
        now: Millis,
        mode: SendMode,
        body: &str,
        key: Option<&str>,
        crash_after: Option<usize>,
    ) -> Reply {
        let reply = self.answer(now, mode, body, key, crash_after);
        if let Reply::Http { status, .. } = &reply {
            *self.statuses.entry(*status).or_default() += 1;
        }
        reply
    }

    fn answer(
        &mut self,
        now: Millis,
        mode: SendMode,
        body: &str,
        key: Option<&str>,
        crash_after: Option<usize>,
    ) -> Reply {
        if !self.auth_ok {
            let body = problem(401, "unauthorized", "unknown bearer token", json!({}));
            return http(401, None, body);
        }
        if body.len() > self.max_body {
            let body = problem(413, "too-large", "body is larger than the limit", json!({}));
            return http(413, None, body);
        }
        let envelope: Envelope = match serde_json::from_str(body) {
            Ok(envelope) => envelope,
            Err(e) => {
                return http(
                    400,
                    None,
                    problem(400, "malformed", &e.to_string(), json!({})),
                );
            }
        };
        if let Some(i) = envelope.ops.iter().position(|op| op.kind == POISON_KIND) {
            let detail = format!("ops[{i}].kind: not accepted");
            return http(400, None, problem(400, "malformed", &detail, json!({})));
        }
        match mode {
            SendMode::Batch => {
                let mut results = Vec::new();
                let mut states_sent = BTreeSet::new();
                for (i, op) in envelope.ops.iter().enumerate() {
                    if crash_after == Some(i) {
                        return http(500, None, problem(500, "internal", "crashed", json!({})));
                    }
                    let (outcome, replayed) = self.apply_op(now, envelope.client, op);
                    let first = matches!(outcome, Outcome::Conflict { .. })
                        && states_sent.insert(op.entity.clone());
                    results.push(result_json(op.id, &outcome, replayed, first && !replayed));
                }
                if crash_after.is_some_and(|n| n >= envelope.ops.len()) {
                    return http(500, None, problem(500, "internal", "crashed", json!({})));
                }
                http(200, None, json!({ "results": results }).to_string())
            }
            SendMode::Single => {
                let Some(key) = key else {
                    return http(400, None, problem(400, "missing-key", "no key", json!({})));
                };
                let [op] = envelope.ops.as_slice() else {
                    let detail = "a single-op request must carry exactly one op";
                    return http(400, None, problem(400, "malformed", detail, json!({})));
                };
                let slot = (envelope.client, key.to_owned());
                if let Some((stored_body, id, outcome)) = self.keys.get(&slot) {
                    if stored_body == body {
                        return single_response(*id, outcome, true);
                    }
                    let detail = "this Idempotency-Key was used with another body";
                    return http(422, None, problem(422, "key-reused", detail, json!({})));
                }
                if crash_after == Some(0) {
                    return http(500, None, problem(500, "internal", "crashed", json!({})));
                }
                let (outcome, replayed) = self.apply_op(now, envelope.client, op);
                if outcome.is_final() {
                    self.keys
                        .insert(slot, (body.to_owned(), op.id, outcome.clone()));
                }
                if crash_after.is_some() {
                    return http(500, None, problem(500, "internal", "crashed", json!({})));
                }
                single_response(op.id, &outcome, replayed)
            }
        }
    }

    /// The five steps of PROTOCOL.md, *Applying an op*.
    fn apply_op(&mut self, now: Millis, client: ClientId, op: &WireOp) -> (Outcome, bool) {
        // 1. Idempotency.
        if let Some(outcome) = self.results.get(&(client, op.id)) {
            return (outcome.clone(), true);
        }
        let outcome = self.decide(now, client, op);
        if outcome.is_final() {
            self.results.insert((client, op.id), outcome.clone());
        }
        (outcome, false)
    }

    fn decide(&mut self, now: Millis, client: ClientId, op: &WireOp) -> Outcome {
        // 2. Validation (of values; what cannot be parsed failed the whole request with 400).
        if op.seq == 0 || op.prev >= op.seq {
            return Outcome::Rejected {
                reason: "seq or prev out of range".into(),
            };
        }
        if !op.payload.get().trim_start().starts_with('{') {
            return Outcome::Rejected {
                reason: "payload must be a JSON object".into(),
            };
        }
        let Some(entity) = &op.entity else {
            self.log.push(Applied {
                client,
                id: op.id,
                seq: op.seq,
                entity: None,
                version: None,
                at: now,
            });
            return Outcome::Applied { version: None };
        };
        // 3. Order.
        let last = self.last(client, entity);
        let version = self.version(entity);
        if op.seq <= last {
            return Outcome::Duplicate { version };
        }
        if last < op.prev {
            self.out_of_order += 1;
            self.last_out_of_order = Some((op.seq, op.prev, last, entity.clone()));
            return Outcome::OutOfOrder { last };
        }
        // 4. Version: stale if another client wrote after `base`, or `base` is from the future.
        let foreign = self.foreign_version(client, entity);
        if op
            .base_version
            .is_some_and(|base| base < foreign || base > version)
        {
            return Outcome::Conflict { version };
        }
        // 5. Apply (the merge patch of the state is not simulated: versions stand for it).
        self.record_write(client, entity);
        let version = version + 1;
        self.versions.insert(entity.clone(), version);
        self.lasts.insert((client, entity.clone()), op.seq);
        self.log.push(Applied {
            client,
            id: op.id,
            seq: op.seq,
            entity: Some(entity.clone()),
            version: Some(version),
            at: now,
        });
        Outcome::Applied {
            version: Some(version),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// How a `Retry-After` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfterForm {
    /// Delta-seconds.
    Seconds(u64),
    /// An HTTP date this many whole seconds after the server's now.
    DateIn(u64),
}

/// A `Retry-After` as sent, resolved to what it asks of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Wait this long from when the reply is read.
    Seconds(u64),
    /// Wait until this instant.
    Until(Millis),
}

impl RetryAfter {
    fn resolve(form: RetryAfterForm, now: Millis) -> Self {
        match form {
            RetryAfterForm::Seconds(s) => RetryAfter::Seconds(s),
            // HTTP dates have whole seconds: round up, so the date is not before now + s.
            RetryAfterForm::DateIn(s) => RetryAfter::Until(now.div_ceil(1000) * 1000 + s * 1000),
        }
    }

    /// The header value.
    pub fn header(&self) -> String {
        match self {
            RetryAfter::Seconds(s) => s.to_string(),
            RetryAfter::Until(at) => format_http_date(*at),
        }
    }

    /// The wait it asks for when read at `now`.
    pub fn wait_from(&self, now: Millis) -> Millis {
        match self {
            RetryAfter::Seconds(s) => s * 1000,
            RetryAfter::Until(at) => at.saturating_sub(now),
        }
    }
}

/// Something that goes wrong with one request, decided when it reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request never reaches the server; the client sees a network error.
    Drop,
    /// The server answers this status (500, 502, 504, 408) without applying anything.
    Status(u16),
    /// The server answers 429 or 503 with a `Retry-After`, without applying anything.
    Busy(u16, RetryAfterForm),
    /// The server applies the first n ops, then fails with 500.
    CrashAfter(usize),
    /// The server commits, then the connection drops: the client sees a network error.
    LostAck,
    /// The network delivers the request twice, back to back; the client sees one answer.
    Duplicate,
    /// The server commits but the answer never comes: the client times out.
    Hang,
    /// `409 in-progress` (single mode: the same key is being processed by another copy).
    InProgress,
}

/// The chance of each random fault per request. All zero by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultRates {
    /// [`Fault::Drop`].
    pub drop: f64,
    /// [`Fault::Status`].
    pub server_error: f64,
    /// [`Fault::Busy`].
    pub busy: f64,
    /// [`Fault::CrashAfter`].
    pub crash: f64,
    /// [`Fault::LostAck`].
    pub lost_ack: f64,
    /// [`Fault::Duplicate`].
    pub duplicate: f64,
    /// [`Fault::Hang`].
    pub hang: f64,
    /// [`Fault::InProgress`], single mode only.
    pub in_progress: f64,
    /// The chance that a request the client gave up on (timeout, restart) still reaches the
    /// server later.
    pub ghost: f64,
    /// The chance that the health probe fails although the server is up.
    pub probe_fail: f64,
}

impl FaultRates {
    /// Rates scaled by `level` (0 = none).
    pub fn level(level: u32) -> Self {
        let l = f64::from(level);
        FaultRates {
            drop: 0.04 * l,
            server_error: 0.04 * l,
            busy: 0.03 * l,
            crash: 0.02 * l,
            lost_ack: 0.04 * l,
            duplicate: 0.04 * l,
            hang: 0.02 * l,
            in_progress: 0.02 * l,
            ghost: (0.25 * l).min(0.9),
            probe_fail: 0.1 * l,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger: what the caller was promised
// ---------------------------------------------------------------------------------------------

/// How an accepted op ended, as the caller was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A `delivered` event.
    Delivered { duplicate: bool },
    /// A `dead-lettered` event.
    DeadLettered,
    /// A `conflict` event with `server-wins`.
    Dropped,
    /// A `conflict` event with `parked`.
    Parked,
    /// Lost with the database and missing from the copy (reported as `STORAGE_LOST`).
    Lost,
}

/// One accepted op (one receipt).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The receipt `enqueue` gave.
    pub receipt: Receipt,
    /// The draft.
    pub draft: Draft,
    /// Every id it was sent under (rebased copies get new ids).
    pub ids: Vec<OpId>,
    /// The `seq` of the first op of its chain: a retried dead letter or a kept conflict belongs
    /// to the chain of the op it came from.
    pub chain: u64,
    /// How it ended.
    pub ending: Option<Ending>,
    /// The receipt that replaced it by coalescing.
    pub replaced_by: Option<u64>,
    /// Whether the user settled its dead letter or parked conflict.
    pub settled_by_user: bool,
}

/// Follows every accepted op and checks the contract.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Accepted ops by `seq`.
    pub entries: BTreeMap<u64, Entry>,
    /// The entry each id belongs to now.
    ids: HashMap<OpId, u64>,
    /// Times each chain took effect on the server.
    pub applied: BTreeMap<u64, u32>,
    /// The last applied `seq` per entity.
    last_applied: HashMap<String, u64>,
}

impl Ledger {
    fn accept(
        &mut self,
        receipt: &Receipt,
        draft: Draft,
        parent: Option<OpId>,
    ) -> Result<(), String> {
        let chain = match parent {
            Some(id) => self.chain_of(id)?,
            None => receipt.seq,
        };
        if let Some(old) = receipt.replaced {
            let seq = self.seq_of(old)?;
            let entry = self.entries.get_mut(&seq).expect("seq_of found it");
            if entry.ending.is_some() || entry.replaced_by.is_some() {
                return Err(format!("{old} was replaced after it ended: {entry:?}"));
            }
            entry.replaced_by = Some(receipt.seq);
        }
        if self.entries.contains_key(&receipt.seq) {
            return Err(format!("seq {} given twice", receipt.seq));
        }
        self.ids.insert(receipt.id, receipt.seq);
        self.entries.insert(
            receipt.seq,
            Entry {
                receipt: receipt.clone(),
                draft,
                ids: vec![receipt.id],
                chain,
                ending: None,
                replaced_by: None,
                settled_by_user: false,
            },
        );
        Ok(())
    }

    /// The seq of the entry an id belongs to.
    pub fn seq_of(&self, id: OpId) -> Result<u64, String> {
        self.ids
            .get(&id)
            .copied()
            .ok_or_else(|| format!("unknown op id {id}"))
    }

    fn chain_of(&self, id: OpId) -> Result<u64, String> {
        Ok(self.entries[&self.seq_of(id)?].chain)
    }

    /// The entry of an id.
    pub fn entry(&self, id: OpId) -> &Entry {
        &self.entries[&self.seq_of(id).expect("known id")]
    }

    fn end(&mut self, id: OpId, ending: Ending) -> Result<(), String> {
        let seq = self.seq_of(id)?;
        let entry = self.entries.get_mut(&seq).expect("seq_of found it");
        if let Some(before) = entry.ending {
            return Err(format!(
                "op seq {seq} ({id}) ended twice: {before:?}, then {ending:?}"
            ));
        }
        if entry.replaced_by.is_some() {
            return Err(format!("op seq {seq} ({id}) ended after it was replaced"));
        }
        entry.ending = Some(ending);
        Ok(())
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::Delivered { id, duplicate, .. } => self.end(
                *id,
                Ending::Delivered {
                    duplicate: *duplicate,
                },
            ),
            Event::DeadLettered { id, .. } => self.end(*id, Ending::DeadLettered),
            Event::Conflict {
                id,
                resolution,
                rebased_as,
                ..
            } => match (resolution, rebased_as) {
                (ConflictOutcome::Rebased, Some(new)) => {
                    let seq = self.seq_of(*id)?;
                    let entry = self.entries.get_mut(&seq).expect("seq_of found it");
                    if entry.ending.is_some() {
                        return Err(format!("op seq {seq} rebased after it ended"));
                    }
                    entry.ids.push(*new);
                    self.ids.insert(*new, seq);
                    Ok(())
                }
                (ConflictOutcome::Rebased, None) => Err(format!("rebase of {id} without new id")),
                (ConflictOutcome::ServerWins, _) => self.end(*id, Ending::Dropped),
                (ConflictOutcome::Parked, _) => self.end(*id, Ending::Parked),
            },
            _ => Ok(()),
        }
    }

    /// The server applied an op of this client.
    fn on_applied(&mut self, applied: &Applied, store: &MemoryStore) -> Result<(), String> {
        let Some(entry) = self.entries.get(&applied.seq) else {
            return Err(format!("server applied unknown seq {}", applied.seq));
        };
        if !entry.ids.contains(&applied.id) {
            return Err(format!(
                "server applied seq {} under id {}, which it never had (ids {:?})",
                applied.seq, applied.id, entry.ids
            ));
        }
        let count = self.applied.entry(entry.chain).or_default();
        *count += 1;
        if *count > 1 {
            return Err(format!(
                "op seq {} (chain {}) took effect twice",
                applied.seq, entry.chain
            ));
        }
        if let Some(entity) = &applied.entity {
            let last = self.last_applied.entry(entity.clone()).or_default();
            if applied.seq <= *last {
                return Err(format!(
                    "on {entity}, seq {} applied after seq {}",
                    applied.seq, last
                ));
            }
            *last = applied.seq;
            // An op takes effect only once every earlier op on its entity has left the queue;
            // otherwise that earlier op could never take effect any more (its seq is now below
            // `last`), and would come back as a `duplicate` that never happened.
            if let Some(earlier) = store
                .ops()
                .find(|op| op.entity.as_deref() == Some(entity) && op.seq < applied.seq)
            {
                return Err(format!(
                    "on {entity}, seq {} took effect while earlier seq {} is still queued",
                    applied.seq, earlier.seq
                ));
            }
        }
        Ok(())
    }

    /// Checks the end state once the queue has drained: every accepted op ended in a way the
    /// caller saw, and none was reported delivered without taking effect.
    pub fn check_drained(&self, store: &MemoryStore) -> Result<(), String> {
        if let Some(op) = store.ops().next() {
            return Err(format!("queue not drained: seq {} still pending", op.seq));
        }
        let dead: BTreeSet<OpId> = store.dead_letters().map(|d| d.op.id).collect();
        let parked: BTreeSet<OpId> = store.conflicts().map(|c| c.op.id).collect();
        let mut delivered_chains = BTreeSet::new();
        for (seq, entry) in &self.entries {
            let last_id = *entry.ids.last().expect("an entry has an id");
            match (entry.ending, entry.replaced_by) {
                (None, None) => {
                    return Err(format!(
                        "op seq {seq} vanished without an ending: {entry:?}"
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(format!("op seq {seq} ended and was replaced: {entry:?}"));
                }
                (Some(Ending::Delivered { .. }), None) => {
                    delivered_chains.insert(entry.chain);
                }
                (Some(Ending::DeadLettered), None) => {
                    if !entry.settled_by_user && !dead.contains(&last_id) {
                        return Err(format!("op seq {seq} dead-lettered without a record"));
                    }
                }
                (Some(Ending::Parked), None) => {
                    if !entry.settled_by_user && !parked.contains(&last_id) {
                        return Err(format!("op seq {seq} parked without a record"));
                    }
                }
                (Some(Ending::Dropped | Ending::Lost), None) | (None, Some(_)) => {}
            }
        }
        for chain in delivered_chains {
            let times = self.applied.get(&chain).copied().unwrap_or(0);
            if times != 1 {
                return Err(format!(
                    "chain {chain} was reported delivered but took effect {times} times: {:?}",
                    self.entries
                        .values()
                        .filter(|e| e.chain == chain)
                        .collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The shell
// ---------------------------------------------------------------------------------------------

/// A request on its way: sent by a context's drainer, not yet answered.
#[derive(Debug, Clone)]
pub struct Flight {
    /// The context that sent it.
    pub context: usize,
    /// The drainer's name for it.
    pub request: RequestId,
    /// Batch or single.
    pub mode: SendMode,
    /// The ops sent (the leased ones).
    pub ops: Vec<Op>,
    /// The request body, as the shell sends it.
    pub body: String,
    /// When it left.
    pub sent_at: Millis,
    /// Whether it reached the server (or was lost on the way).
    pub arrived: bool,
    /// The answer waiting for the client, once it arrived (none if the server hangs).
    pub reply: Option<Reply>,
    /// The `Retry-After` in the answer.
    pub retry_after: Option<RetryAfter>,
}

/// A copy of a request that nobody waits for any more, which may still reach the server.
#[derive(Debug, Clone)]
pub struct Ghost {
    /// Batch or single.
    pub mode: SendMode,
    /// The body.
    pub body: String,
    /// The `Idempotency-Key`.
    pub key: Option<String>,
}

/// Counts of what happened, to show what a run covered.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Steps taken by the model.
    pub steps: u64,
    /// Requests sent.
    pub sends: u64,
    /// Requests answered.
    pub replies: u64,
    /// Requests timed out.
    pub timeouts: u64,
    /// Restarts.
    pub restarts: u64,
    /// Ghost copies that reached the server.
    pub ghosts_arrived: u64,
    /// Ops that vanished between load and lease.
    pub vanished: u64,
    /// Writes found stale (another drainer had taken the op over).
    pub stale: u64,
    /// Steps during which two sessions drained at once.
    pub concurrent: u64,
    /// Store reads of due ops.
    pub loads: u64,
    /// Retry delays checked.
    pub retries: u64,
    /// Of which raised to a `Retry-After` floor.
    pub floors: u64,
    /// Refused enqueues.
    pub refused: u64,
    /// Idle checks of the next wake made.
    pub wake_checks: u64,
    /// Checks that a draining session with a free slot leaves nothing due unsent.
    pub progress_checks: u64,
    /// Queues rebuilt from the second copy after the database was lost.
    pub rebuilds: u64,
    /// Probes answered.
    pub probes: u64,
    /// Conflict events whose state the server left out.
    pub omitted_states: u64,
    /// Events by name.
    pub events: BTreeMap<&'static str, u64>,
}

/// The drain lock, as Web Locks give it: one holder, others wait or give up; unless it is
/// `broken`, when every request is granted (a lock lost with a worker that still runs, or granted
/// to a new worker while the old one finishes).
#[derive(Debug, Clone, Default)]
pub struct Lock {
    /// Who holds it.
    pub holders: Vec<usize>,
    /// Who waits for it, in order.
    pub waiting: VecDeque<usize>,
    /// Whether it grants everyone.
    pub broken: bool,
    /// It was broken since every session was last idle: drainers may still know different
    /// things.
    pub was_broken: bool,
}

/// The contexts of the main extension in the simulation: the background and a popup.
pub const BACKGROUND: usize = 0;
/// The popup: a second context with a session of its own on the same store.
pub const POPUP: usize = 1;

/// The shell, the store, the network and the server, on one fake clock.
pub struct Sim {
    /// The fake clock.
    pub now: Millis,
    /// The delivery policy.
    pub config: Config,
    /// The persisted state: the only thing a restart keeps.
    pub store: MemoryStore,
    /// One session per context ([`BACKGROUND`], [`POPUP`]).
    pub sessions: Vec<Session>,
    /// The drain lock.
    pub lock: Lock,
    /// The backend.
    pub server: Server,
    /// This client's id.
    pub client: ClientId,
    /// Requests in flight, of every context, in the order sent.
    pub flights: Vec<Flight>,
    /// Abandoned copies still in the network.
    pub ghosts: Vec<Ghost>,
    /// Faults for the next requests, used before any random fault.
    pub script: VecDeque<Fault>,
    /// Random faults.
    pub rates: FaultRates,
    /// Every event, with when it was emitted.
    pub events: Vec<(Millis, Event)>,
    /// Every request sent, as (when, ops).
    pub sent: Vec<(Millis, Vec<Op>)>,
    /// The contract bookkeeping.
    pub ledger: Ledger,
    /// What happened.
    pub stats: Stats,
    /// The harness's randomness (faults, ids, seeds).
    pub rng: Rng,
    /// An op was enqueued in another context and its message has not woken the drainer yet.
    pub unannounced: bool,
    /// Inputs waiting to be fed to a context, in order.
    pending: VecDeque<(usize, SessionInput)>,
    /// The extension's durable alarm (`chrome.alarms`, through the `schedule` hook): one for the
    /// whole extension, surviving restarts, and it wakes the background.
    pub alarm: Option<Millis>,
    /// The second copy (`chrome.storage.local` in the extension): its ops by `seq`, and its
    /// record. It survives what the database does not.
    pub copy: BTreeMap<u64, CopiedOp>,
    /// The copy's record of the queue.
    pub copy_meta: Option<CopyMeta>,
    /// The client id the database holds (the store keeps the rest).
    pub db_client: Option<ClientId>,
    /// Times the database was lost and the queue rebuilt from the copy.
    pub rebuilds: u64,
    /// Whether an `out_of_order` answer is expected (a test that loses an op from the copy).
    pub out_of_order_expected: bool,
    seed: u64,
    trace: VecDeque<String>,
    /// Keep at most this many trace lines.
    pub trace_len: usize,
}

fn expect_store<T>(result: Result<T, Refusal>) -> T {
    result.expect("the memory store does not fail")
}

/// Everything persisted that a refused transaction must leave alone.
type Snapshot = (Counters, Vec<Op>, Vec<DeadLetter>, Vec<ParkedConflict>);

fn snapshot(store: &MemoryStore) -> Snapshot {
    (
        store.counters_record(),
        store.ops().cloned().collect(),
        store.dead_letters().cloned().collect(),
        store.conflicts().cloned().collect(),
    )
}

/// The range of a retry delay after `attempt` attempts, computed independently of the core
/// from the configuration (`previous` is the op's last delay, for `decorrelated`).
pub fn backoff_range(config: &Config, attempt: u32, previous: Option<Millis>) -> (Millis, Millis) {
    let b = &config.backoff;
    assert_eq!(b.factor, 2.0, "the harness checks factor 2");
    let doubled = |exponent: u32| -> Millis {
        if exponent >= 63 {
            b.cap_ms
        } else {
            b.base_ms.saturating_mul(1 << exponent).min(b.cap_ms)
        }
    };
    match b.strategy {
        Strategy::Proportional => {
            let nominal = doubled(attempt.saturating_sub(1));
            let spread = (nominal as f64 * b.jitter) as Millis;
            (nominal - spread, nominal + spread)
        }
        Strategy::Full => (0, doubled(attempt)),
        Strategy::Decorrelated => {
            let previous = previous.unwrap_or(b.base_ms).max(b.base_ms);
            (
                b.base_ms,
                previous.saturating_mul(3).min(b.cap_ms).max(b.base_ms),
            )
        }
    }
}

impl Sim {
    /// A fresh client at [`EPOCH`] with a background and a popup context; the background is
    /// started (woken with [`WakeReason::Start`]).
    pub fn new(config: Config, seed: u64) -> Sim {
        config.validate().expect("a valid config");
        let mut rng = Rng::from_u64(seed);
        let client = OpId::from_random_bytes(rng.bytes16());
        let sessions = vec![
            Session::new(config.clone(), seed32(&mut rng)),
            Session::new(config.clone(), seed32(&mut rng)),
        ];
        let mut sim = Sim {
            now: EPOCH,
            config,
            store: MemoryStore::default(),
            sessions,
            lock: Lock::default(),
            server: Server::default(),
            client,
            flights: Vec::new(),
            ghosts: Vec::new(),
            script: VecDeque::new(),
            rates: FaultRates::default(),
            events: Vec::new(),
            sent: Vec::new(),
            ledger: Ledger::default(),
            stats: Stats::default(),
            rng,
            unannounced: false,
            pending: VecDeque::new(),
            alarm: None,
            copy: BTreeMap::new(),
            // What `Outbox.open` writes for a fresh client.
            copy_meta: Some(CopyMeta {
                client,
                next_seq: 1,
                pending: 0,
            }),
            db_client: Some(client),
            rebuilds: 0,
            out_of_order_expected: false,
            seed,
            trace: VecDeque::new(),
            trace_len: 60,
        };
        sim.wake(WakeReason::Start);
        sim
    }

    /// Records a line of the trace.
    pub fn note(&mut self, line: impl FnOnce() -> String) {
        if self.trace_len == 0 {
            return;
        }
        if self.trace.len() == self.trace_len {
            self.trace.pop_front();
        }
        let line = format!("[{}] {}", self.now - EPOCH, line());
        self.trace.push_back(line);
    }

    /// Fails the run with the recent trace.
    #[track_caller]
    pub fn fail(&self, why: &str) -> ! {
        let mut text = format!("seed {}: {why}\nrecent trace:\n", self.seed);
        for line in &self.trace {
            let _ = writeln!(text, "  {line}");
        }
        for (i, session) in self.sessions.iter().enumerate() {
            let _ = writeln!(
                text,
                "context {i}: idle {} draining {} lock {} timeout {:?}",
                session.is_idle(),
                session.is_draining(),
                session.holds_lock(),
                session.poll_timeout().map(|t| t as i128 - EPOCH as i128),
            );
        }
        let _ = writeln!(
            text,
            "now {} paused {} breaker {:?} lock {:?} flights {:?}",
            self.now - EPOCH,
            self.store.paused,
            self.store.breaker,
            self.lock,
            self.flights
                .iter()
                .map(|f| (
                    f.context,
                    f.request,
                    f.ops.iter().map(|o| o.seq).collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>(),
        );
        for op in self.store.ops() {
            let _ = writeln!(
                text,
                "  stored seq {} prev {} entity {:?} kind {} attempts {} failures {} next {:?}",
                op.seq,
                op.prev,
                op.entity,
                op.kind,
                op.attempts,
                op.failures,
                op.next_attempt_at.map(|t| t as i128 - EPOCH as i128)
            );
        }
        panic!("{text}");
    }

    #[track_caller]
    fn ensure(&self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.fail(&why());
        }
    }

    fn ok(&self, result: Result<(), String>) {
        if let Err(why) = result {
            self.fail(&why);
        }
    }

    /// A fresh random op id, as the shell draws one.
    pub fn fresh_id(&mut self) -> OpId {
        OpId::from_random_bytes(self.rng.bytes16())
    }

    // --- driving the core ---------------------------------------------------------------------

    /// The background's running drainer, if a session runs there.
    pub fn drainer(&self) -> Option<&outbox::core::Drainer> {
        self.sessions[BACKGROUND].drainer()
    }

    /// The earliest time any context wants to be woken (its timer), not counting the alarm.
    pub fn next_wake(&self) -> Option<Millis> {
        self.sessions.iter().filter_map(Session::poll_timeout).min()
    }

    /// The earliest wake-up of any kind: a context's timer or the extension's alarm.
    pub fn next_wake_or_alarm(&self) -> Option<Millis> {
        let alarm = self.alarm.map(|t| t.max(self.now + 1));
        self.next_wake().into_iter().chain(alarm).min()
    }

    /// Feeds one input to a context and performs everything that follows, in every context.
    pub fn input_to(&mut self, context: usize, input: SessionInput) {
        self.pending.push_back((context, input));
        self.drive();
    }

    /// Feeds one input to the background.
    pub fn input(&mut self, input: SessionInput) {
        self.input_to(BACKGROUND, input);
    }

    /// Wakes the background.
    pub fn wake(&mut self, reason: WakeReason) {
        self.wake_context(BACKGROUND, reason);
    }

    /// Wakes a context.
    pub fn wake_context(&mut self, context: usize, reason: WakeReason) {
        // Any wake of the background makes it look at the store again.
        if context == BACKGROUND {
            self.unannounced = false;
        }
        self.note(|| format!("wake {context} {reason:?}"));
        self.input_to(context, SessionInput::Wake(reason));
    }

    /// Performs every action of every context until none is left, as the shells do; inputs one
    /// action produces for another context (a broadcast, a lock passed on) queue up in order.
    fn drive(&mut self) {
        let mut guard = 0;
        loop {
            guard += 1;
            self.ensure(guard < 1_000_000, || {
                "the sessions never stop acting".into()
            });
            if let Some((context, input)) = self.pending.pop_front() {
                self.sessions[context].handle(self.now, input);
                continue;
            }
            let Some((context, action)) = (0..self.sessions.len())
                .find_map(|c| self.sessions[c].poll_action().map(|a| (c, a)))
            else {
                break;
            };
            self.perform(context, action);
        }
        let draining = self.sessions.iter().filter(|s| s.is_draining()).count();
        if draining > 1 {
            self.stats.concurrent += 1;
        }
    }

    fn perform(&mut self, context: usize, action: SessionAction) {
        let now = self.now;
        let answer = match action {
            SessionAction::AcquireLock { wait } => {
                let free = self.lock.holders.is_empty() || self.lock.broken;
                if free {
                    self.lock.holders.push(context);
                    Some(SessionInput::LockAcquired)
                } else if wait {
                    self.lock.waiting.push_back(context);
                    None
                } else {
                    Some(SessionInput::LockBusy)
                }
            }
            SessionAction::ReleaseLock => {
                self.release_lock(context);
                None
            }
            SessionAction::Broadcast => {
                for other in 0..self.sessions.len() {
                    if other != context {
                        if other == BACKGROUND {
                            self.unannounced = false;
                        }
                        self.pending
                            .push_back((other, SessionInput::Wake(WakeReason::Message)));
                    }
                }
                None
            }
            SessionAction::ReadState => {
                // A session that starts alone from the store's state ends any divergence that
                // drainers overlapping after a lost lock left behind.
                let alone = (0..self.sessions.len())
                    .all(|c| c == context || !self.sessions[c].holds_lock());
                if alone && !self.lock.broken {
                    self.lock.was_broken = false;
                }
                Some(SessionInput::StateRead {
                    breaker: self.store.breaker,
                    paused: self.store.paused,
                    refused: self.store.refused,
                })
            }
            SessionAction::CheckCredentials => {
                let credentials = if self.server.auth_ok {
                    "good"
                } else {
                    "expired"
                };
                Some(SessionInput::CredentialsChecked {
                    checksum: Some(credentials_checksum(Some(credentials))),
                })
            }
            SessionAction::Load { due_by, limit } => {
                self.stats.loads += 1;
                let (ops, next_due) =
                    expect_store(run_now(QueueTxn::due_heads(&mut self.store, due_by, limit)));
                self.ensure(ops.len() <= limit, || "due_heads returned too many".into());
                Some(SessionInput::Loaded { ops, next_due })
            }
            SessionAction::Lease(request) => Some(self.lease(context, request)),
            SessionAction::Send { request, mode, ops } => {
                self.send(context, request, mode, ops);
                None
            }
            SessionAction::Probe => {
                self.stats.probes += 1;
                let healthy = self.server.healthy() && !self.rng.chance(self.rates.probe_fail);
                self.note(|| format!("probe {context}: healthy {healthy}"));
                self.pending
                    .push_back((context, SessionInput::ProbeResult { healthy }));
                None
            }
            SessionAction::Persist(writes) => {
                let applied = expect_store(run_now(store::apply(&mut self.store, &writes, now)));
                let stale = applied.stale;
                self.stats.stale += stale.len() as u64;
                if !stale.is_empty() {
                    self.note(|| format!("context {context}: stale writes {stale:?}"));
                }
                Some(SessionInput::Persisted {
                    stale,
                    copy: applied.copy,
                })
            }
            SessionAction::Emit(event) => {
                self.emit(event);
                None
            }
            SessionAction::WriteCopy(copy) => {
                self.write_copy(copy);
                None
            }
            SessionAction::SweepCopy { below } => {
                self.copy.retain(|&seq, _| seq >= below);
                None
            }
            SessionAction::Schedule(at) => {
                self.alarm = at;
                None
            }
            SessionAction::Finish { keys_before, limit } => {
                expect_store(run_now(self.store.purge_keys(keys_before, limit)));
                Some(SessionInput::Finished {
                    pending: self.store.counters_record().pending,
                    next_seq: self.store.counters_record().next_seq,
                })
            }
            SessionAction::Ended { .. } => None,
        };
        if let Some(answer) = answer {
            // A completion goes straight back, before any other input: the shell awaits it.
            self.sessions[context].handle(now, answer);
        }
    }

    fn release_lock(&mut self, context: usize) {
        self.lock.holders.retain(|&c| c != context);
        self.lock.waiting.retain(|&c| c != context);
        if self.lock.holders.is_empty()
            && let Some(next) = self.lock.waiting.pop_front()
        {
            self.lock.holders.push(next);
            self.pending.push_back((next, SessionInput::LockAcquired));
        }
    }

    fn lease(&mut self, context: usize, request: outbox::core::Request) -> SessionInput {
        let now = self.now;
        if request.mode == SendMode::Single && request.ops.len() != 1 {
            self.fail("single mode sent several ops");
        }
        let max_ops = match request.mode {
            SendMode::Single => 1,
            SendMode::Batch => self.config.batch.max_ops,
        };
        self.ensure(
            !request.ops.is_empty() && request.ops.len() <= max_ops,
            || format!("request of {} ops", request.ops.len()),
        );
        // Only due heads are sent, and only as the store has them, and never past their max age.
        for op in &request.ops {
            let max_age = self.config.limits_for(op.priority).max_age_ms;
            self.ensure(now < op.created_at + max_age, || {
                format!("seq {} sent past its max age", op.seq)
            });
            if let Some(stored) = self
                .store
                .ops()
                .find(|s| s.seq == op.seq && s.id == op.id && s.attempts + 1 == op.attempts)
            {
                self.ensure(stored.next_attempt_at.is_some_and(|t| t <= now), || {
                    format!(
                        "seq {} sent before it was due ({:?}, now {now})",
                        op.seq, stored.next_attempt_at
                    )
                });
            }
        }
        let vanished = expect_store(run_now(store::lease(&mut self.store, &request.ops)));
        if !vanished.is_empty() {
            self.stats.vanished += vanished.len() as u64;
            let id = request.id;
            self.note(|| format!("context {context} request {id:?}: vanished {vanished:?}"));
        }
        SessionInput::Leased {
            request: request.id,
            vanished,
        }
    }

    fn send(&mut self, context: usize, request: RequestId, mode: SendMode, ops: Vec<Op>) {
        let now = self.now;
        // At most one op per entity in flight from one drainer, within the request and across
        // its requests. (Two drainers on one store, after a lost lock, may each have one: the
        // leases and the server's order keep that safe, and the ledger checks the effects.)
        let mut busy: BTreeSet<&str> = self
            .flights
            .iter()
            .filter(|f| f.context == context)
            .flat_map(|f| f.ops.iter().filter_map(|op| op.entity.as_deref()))
            .collect();
        for op in &ops {
            if let Some(entity) = op.entity.as_deref()
                && !busy.insert(entity)
            {
                self.fail(&format!(
                    "two ops of {entity} in flight at once from context {context} (seq {} in \
                     request {request:?})",
                    op.seq
                ));
            }
        }
        self.stats.sends += 1;
        let body = encode_request(self.client, &ops);
        self.note(|| {
            format!(
                "send {context} {:?}: {}",
                request,
                ops.iter()
                    .map(|o| format!(
                        "seq {} prev {} {:?} {} try {}",
                        o.seq, o.prev, o.entity, o.kind, o.attempts
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        });
        self.sent.push((now, ops.clone()));
        self.flights.push(Flight {
            context,
            request,
            mode,
            ops,
            body,
            sent_at: now,
            arrived: false,
            reply: None,
            retry_after: None,
        });
    }

    fn emit(&mut self, event: Event) {
        *self.stats.events.entry(event.name()).or_default() += 1;
        self.note(|| format!("event {event:?}"));
        if let Event::Conflict {
            id,
            server_state,
            state_omitted,
            ..
        } = &event
        {
            // Exactly one of the two, as the server sends them.
            self.ensure(server_state.is_some() != *state_omitted, || {
                format!("conflict {id}: state {server_state:?} with state_omitted {state_omitted}")
            });
            if *state_omitted {
                self.stats.omitted_states += 1;
            }
        }
        // The write is committed before the event.
        match &event {
            Event::DeadLettered { id, reason, .. } => {
                self.ensure(!reason.is_empty(), || "dead letter without a reason".into());
                self.ensure(self.store.dead_letters().any(|d| d.op.id == *id), || {
                    format!("dead-lettered {id} without a dead letter record")
                });
            }
            Event::Conflict {
                id,
                resolution: ConflictOutcome::Parked,
                ..
            } => self.ensure(self.store.conflicts().any(|c| c.op.id == *id), || {
                format!("parked {id} without a conflict record")
            }),
            Event::Delivered { id, .. } => {
                self.ensure(!self.store.ops().any(|op| op.id == *id), || {
                    format!("delivered {id} is still queued")
                });
            }
            _ => {}
        }
        let result = self.ledger.on_event(&event);
        self.ok(result);
        self.events.push((self.now, event));
    }

    // --- the second copy -----------------------------------------------------------------------

    /// Writes what a transaction changed to the copy, and returns its value.
    fn copied<T>(&mut self, queued: Copied<T>) -> T {
        self.write_copy(queued.copy);
        queued.value
    }

    fn write_copy(&mut self, copy: CopyWrite) {
        for entry in copy.put {
            self.copy.insert(entry.op.seq, entry);
        }
        for seq in copy.remove {
            self.copy.remove(&seq);
        }
        if let Some(counters) = copy.counters {
            self.copy_meta = Some(CopyMeta {
                client: self.client,
                next_seq: counters.next_seq,
                pending: counters.pending,
            });
        }
    }

    /// The browser drops the database (LevelDB found corrupt after a hard kill): every store is
    /// empty when the contexts start again, and they rebuild the queue from the copy. Dead
    /// letters and parked conflicts go with the database: they are not in the copy.
    pub fn lose_database(&mut self) {
        self.note(|| "database lost".into());
        self.store = MemoryStore::default();
        self.db_client = None;
        for entry in self.ledger.entries.values_mut() {
            if matches!(entry.ending, Some(Ending::DeadLettered | Ending::Parked)) {
                entry.settled_by_user = true;
            }
        }
        for context in 0..self.sessions.len() {
            self.restart_context(context);
        }
    }

    /// Drops one op from the copy, as a copy write lost with a crash would (a test's setup).
    pub fn forget_in_copy(&mut self, seq: u64) {
        self.copy.remove(&seq);
    }

    /// What a context does with the database and the copy as it opens (`Outbox.open`).
    fn open_store(&mut self) {
        match copy::start(self.db_client, self.copy_meta) {
            Start::Fresh | Start::Intact => {}
            Start::Seed | Start::Orphaned(_) => self.fail("the sim's copy always has the queue"),
            Start::Rebuild(meta) => {
                let copied: Vec<CopiedOp> = self.copy.values().cloned().collect();
                let rebuilt = copy::rebuild(meta, copied, self.now);
                self.ensure(rebuilt.missing == 0 || self.out_of_order_expected, || {
                    format!("the copy lost {} ops: {meta:?}", rebuilt.missing)
                });
                // Ops the copy lost are lost: the ledger stops waiting for them.
                let kept: BTreeSet<u64> = rebuilt.ops.iter().map(|op| op.seq).collect();
                for (seq, entry) in self.ledger.entries.iter_mut() {
                    if entry.ending.is_none() && entry.replaced_by.is_none() && !kept.contains(seq)
                    {
                        entry.ending = Some(Ending::Lost);
                    }
                }
                self.ensure(rebuilt.client == self.client, || {
                    "rebuilt as another client".into()
                });
                expect_store(run_now(store::restore(&mut self.store, &rebuilt)));
                self.db_client = Some(rebuilt.client);
                self.rebuilds += 1;
                let count = rebuilt.ops.len();
                self.note(|| format!("rebuilt {count} ops from the copy"));
            }
        }
    }

    /// The copy holds exactly the queue's ops, with the fields that make them the same op on
    /// the wire, and its record matches the counters.
    pub fn check_copy(&self) {
        if self.out_of_order_expected {
            return;
        }
        let stored: Vec<u64> = self.store.ops().map(|op| op.seq).collect();
        let copied: Vec<u64> = self.copy.keys().copied().collect();
        self.ensure(stored == copied, || {
            format!("the copy holds seqs {copied:?}, the queue {stored:?}")
        });
        for op in self.store.ops() {
            let entry = &self.copy[&op.seq].op;
            let same = (
                entry.id,
                entry.prev,
                &entry.entity,
                &entry.payload,
                entry.base_version,
            ) == (op.id, op.prev, &op.entity, &op.payload, op.base_version);
            self.ensure(same, || {
                format!("the copy of seq {} differs: {entry:?} vs {op:?}", op.seq)
            });
        }
        if let Some(meta) = self.copy_meta {
            let counters = self.store.counters_record();
            self.ensure(
                meta.next_seq == counters.next_seq && meta.pending == counters.pending,
                || format!("the copy's record {meta:?} against the counters {counters:?}"),
            );
        }
    }

    // --- the application ----------------------------------------------------------------------

    /// Runs a store transaction; a refused one must leave the store as it was.
    fn transact<T>(
        &mut self,
        f: impl FnOnce(&mut MemoryStore, &Config) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let before = snapshot(&self.store);
        let result = f(&mut self.store, &self.config);
        if result.is_err() {
            let after = snapshot(&self.store);
            self.ensure(before == after, || {
                "a refused transaction changed the store".into()
            });
        }
        result
    }

    /// `enqueue(draft)` in the background: stores the op, then wakes the background.
    pub fn enqueue(&mut self, draft: Draft) -> Result<Receipt, Refusal> {
        self.enqueue_in(draft, Some(BACKGROUND))
    }

    /// `enqueue(draft)` in the popup: stores the op and wakes the popup's session, which finds
    /// the lock taken (or takes it) and tells the background.
    pub fn enqueue_in_popup(&mut self, draft: Draft) -> Result<Receipt, Refusal> {
        self.enqueue_in(draft, Some(POPUP))
    }

    /// `enqueue(draft)` in a context without a session (a content script's message handled
    /// late): the op is stored, and the background hears of it only when
    /// [`announce`](Self::announce) delivers the message.
    pub fn enqueue_elsewhere(&mut self, draft: Draft) -> Result<Receipt, Refusal> {
        self.enqueue_in(draft, None)
    }

    /// The runtime message of an enqueue in another context arrives.
    pub fn announce(&mut self) {
        self.wake(WakeReason::Message);
        self.check();
    }

    fn enqueue_in(&mut self, draft: Draft, context: Option<usize>) -> Result<Receipt, Refusal> {
        let id = self.fresh_id();
        let now = self.now;
        let for_ledger = draft.clone();
        let result = self
            .transact(|s, c| run_now(store::enqueue(s, c, draft, id, None, now)))
            .map(|queued| self.copied(queued));
        self.note(|| format!("enqueue {for_ledger:?} -> {result:?}"));
        match &result {
            Ok(receipt) => {
                let accepted = self.ledger.accept(receipt, for_ledger, None);
                self.ok(accepted);
                match context {
                    Some(context) => self.wake_context(context, WakeReason::Enqueued),
                    None => self.unannounced = true,
                }
            }
            Err(_) => self.stats.refused += 1,
        }
        self.check();
        result
    }

    /// Retries a dead letter, then wakes the drainer.
    pub fn retry_dead_letter(&mut self, id: OpId) -> Result<Receipt, Refusal> {
        let fresh = self.fresh_id();
        let now = self.now;
        let draft = self
            .store
            .dead_letters()
            .find(|d| d.op.id == id)
            .map(|d| d.op.draft());
        let result = self
            .transact(|s, c| run_now(store::retry_dead_letter(s, c, id, fresh, None, now)))
            .map(|queued| self.copied(queued));
        self.note(|| format!("retry dead letter {id} -> {result:?}"));
        if let Ok(receipt) = &result {
            self.settle_by_user(id);
            let accepted = self
                .ledger
                .accept(receipt, draft.expect("it existed"), Some(id));
            self.ok(accepted);
            self.wake(WakeReason::Enqueued);
        }
        self.check();
        result
    }

    /// Discards a dead letter.
    pub fn discard_dead_letter(&mut self, id: OpId) -> Result<(), Refusal> {
        let result = self.transact(|s, _| run_now(store::discard_dead_letter(s, id, None)));
        self.note(|| format!("discard dead letter {id} -> {result:?}"));
        if result.is_ok() {
            self.settle_by_user(id);
        }
        self.check();
        result
    }

    /// Settles a parked conflict; `KeepMine` wakes the drainer.
    pub fn resolve(
        &mut self,
        id: OpId,
        resolution: Resolution,
    ) -> Result<Option<Receipt>, Refusal> {
        let fresh = self.fresh_id();
        let now = self.now;
        let draft = self.store.conflicts().find(|c| c.op.id == id).map(|c| {
            let mut draft = c.op.draft();
            draft.base_version = c.server_version.or(draft.base_version);
            draft
        });
        let result = self
            .transact(|s, c| {
                run_now(store::resolve_conflict(
                    s, c, id, resolution, fresh, None, now,
                ))
            })
            .map(|queued| self.copied(queued));
        self.note(|| format!("resolve {id} {resolution:?} -> {result:?}"));
        if let Ok(receipt) = &result {
            self.settle_by_user(id);
            if let Some(receipt) = receipt {
                let accepted = self
                    .ledger
                    .accept(receipt, draft.expect("it existed"), Some(id));
                self.ok(accepted);
                self.wake(WakeReason::Enqueued);
            }
        }
        self.check();
        result
    }

    fn settle_by_user(&mut self, id: OpId) {
        if let Ok(seq) = self.ledger.seq_of(id) {
            self.ledger
                .entries
                .get_mut(&seq)
                .expect("known")
                .settled_by_user = true;
        }
    }

    /// The auth hook yields working credentials again, and the application says so
    /// (`wake("auth")`): the glue feeds the renewal and a wake.
    pub fn renew_auth(&mut self) {
        self.server.auth_ok = true;
        self.note(|| "auth renewed".into());
        self.pending
            .push_back((BACKGROUND, SessionInput::AuthRenewed));
        self.input(SessionInput::Wake(WakeReason::Message));
        self.check();
    }

    /// The background dies: its session and every request it had in flight are dropped (copies
    /// that had not reached the server may still do so later), the browser frees its lock, and
    /// a new background starts from the store.
    pub fn restart(&mut self) {
        self.restart_context(BACKGROUND);
    }

    /// A context dies and starts again.
    pub fn restart_context(&mut self, context: usize) {
        self.stats.restarts += 1;
        let (mine, others): (Vec<Flight>, Vec<Flight>) = std::mem::take(&mut self.flights)
            .into_iter()
            .partition(|f| f.context == context);
        self.flights = others;
        for flight in mine {
            if !flight.arrived && self.rng.chance(self.rates.ghost) {
                self.ghosts.push(ghost_of(&flight));
            }
        }
        self.note(|| format!("restart {context}"));
        self.open_store();
        self.pending.retain(|(c, _)| *c != context);
        self.sessions[context] = Session::new(self.config.clone(), seed32(&mut self.rng));
        self.release_lock(context);
        self.wake_context(context, WakeReason::Start);
        self.check();
    }

    /// The lock breaks (every request is granted) or heals.
    pub fn set_lock_broken(&mut self, broken: bool) {
        self.note(|| format!("lock broken: {broken}"));
        self.lock.broken = broken;
        self.lock.was_broken |= broken;
        if !broken {
            return;
        }
        // Everyone waiting gets it now.
        while let Some(next) = self.lock.waiting.pop_front() {
            self.lock.holders.push(next);
            self.pending.push_back((next, SessionInput::LockAcquired));
        }
        self.drive();
    }

    // --- the network and the server -----------------------------------------------------------

    fn next_fault(&mut self, mode: SendMode) -> Option<Fault> {
        if let Some(fault) = self.script.pop_front() {
            return Some(fault);
        }
        let r = self.rates;
        let rng = &mut self.rng;
        if rng.chance(r.drop) {
            Some(Fault::Drop)
        } else if rng.chance(r.server_error) {
            Some(Fault::Status([500, 502, 504, 408][rng.up_to(3) as usize]))
        } else if rng.chance(r.busy) {
            let status = if rng.chance(0.5) { 429 } else { 503 };
            let secs = rng.up_to(90);
            let form = if rng.chance(0.5) {
                RetryAfterForm::Seconds(secs)
            } else {
                RetryAfterForm::DateIn(secs)
            };
            Some(Fault::Busy(status, form))
        } else if rng.chance(r.crash) {
            Some(Fault::CrashAfter(rng.up_to(2) as usize))
        } else if rng.chance(r.lost_ack) {
            Some(Fault::LostAck)
        } else if rng.chance(r.duplicate) {
            Some(Fault::Duplicate)
        } else if rng.chance(r.hang) {
            Some(Fault::Hang)
        } else if mode == SendMode::Single && rng.chance(r.in_progress) {
            Some(Fault::InProgress)
        } else {
            None
        }
    }

    fn key_of(mode: SendMode, ops: &[Op]) -> Option<String> {
        match (mode, ops) {
            (SendMode::Single, [op]) => Some(op.id.to_string()),
            _ => None,
        }
    }

    /// Runs `f` on the server and checks every op it applied meanwhile.
    fn on_server<T>(&mut self, f: impl FnOnce(&mut Server, Millis) -> T) -> T {
        let mark = self.server.log.len();
        let out_of_order = self.server.out_of_order;
        let out = f(&mut self.server, self.now);
        // An op goes out only as the head of its entity, with `prev` relinked past every op
        // that left without effect: the server never has to wait for a predecessor.
        let expected = self.out_of_order_expected;
        self.ensure(expected || self.server.out_of_order == out_of_order, || {
            format!(
                "the server answered out_of_order (seq, prev, last, entity) {:?}: an op was sent \
                 before its predecessor took effect or was relinked past",
                self.server.last_out_of_order
            )
        });
        for i in mark..self.server.log.len() {
            let applied = self.server.log[i].clone();
            if applied.client == self.client {
                let result = self.ledger.on_applied(&applied, &self.store);
                self.ok(result);
            }
        }
        out
    }
    /// The request `i` of [`flights`](Self::flights) reaches the server (or is lost on the way).
    pub fn arrive(&mut self, i: usize) {
        assert!(!self.flights[i].arrived, "a request arrives once");
        let (mode, body, key) = {
            let f = &self.flights[i];
            (f.mode, f.body.clone(), Self::key_of(f.mode, &f.ops))
        };
        let fault = if self.server.down {
            Some(Fault::Drop)
        } else {
            self.next_fault(mode)
        };
        let now = self.now;
        let key = key.as_deref();
        let mut retry_after = None;
        let reply = match fault {
            None => Some(self.on_server(|s, now| s.handle(now, mode, &body, key, None))),
            Some(Fault::Drop) => Some(Reply::Unreachable {
                reason: "TypeError: Failed to fetch".into(),
            }),
            Some(Fault::Status(status)) => Some(http(
                status,
                None,
                problem(status, "internal", "injected", json!({})),
            )),
            Some(Fault::Busy(status, form)) => {
                let ra = RetryAfter::resolve(form, now);
                retry_after = Some(ra);
                Some(http(
                    status,
                    Some(ra.header()),
                    problem(status, "busy", "slow down", json!({})),
                ))
            }
            Some(Fault::CrashAfter(n)) => {
                Some(self.on_server(|s, now| s.handle(now, mode, &body, key, Some(n))))
            }
            Some(Fault::LostAck) => {
                self.on_server(|s, now| s.handle(now, mode, &body, key, None));
                Some(Reply::Unreachable {
                    reason: "TypeError: network error (connection reset)".into(),
                })
            }
            Some(Fault::Duplicate) => {
                let first = self.on_server(|s, now| s.handle(now, mode, &body, key, None));
                let second = self.on_server(|s, now| s.handle(now, mode, &body, key, None));
                Some(if self.rng.chance(0.5) { first } else { second })
            }
            Some(Fault::Hang) => {
                self.on_server(|s, now| s.handle(now, mode, &body, key, None));
                None
            }
            Some(Fault::InProgress) => {
                let ra = RetryAfter::Seconds(1);
                retry_after = Some(ra);
                Some(http(
                    409,
                    Some(ra.header()),
                    problem(409, "in-progress", "still running", json!({})),
                ))
            }
        };
        let request = self.flights[i].request;
        self.note(|| {
            format!(
                "arrive {request:?} fault {fault:?} -> {}",
                match &reply {
                    Some(Reply::Http { status, body, .. }) => format!("{status} {}", shorten(body)),
                    Some(other) => format!("{other:?}"),
                    None => "no answer".into(),
                }
            )
        });
        let flight = &mut self.flights[i];
        flight.arrived = true;
        flight.reply = reply;
        flight.retry_after = retry_after;
    }

    /// The client reads the answer of request `i`, which must have one.
    pub fn respond(&mut self, i: usize) {
        let flight = self.flights.remove(i);
        let reply = flight
            .reply
            .clone()
            .expect("respond to an answered request");
        self.note(|| format!("reply {} {:?}", flight.context, flight.request));
        self.reply(&flight, reply);
    }

    /// Request `i` reaches the server if it has not yet, and its answer (if any) is read.
    pub fn deliver(&mut self, i: usize) {
        if !self.flights[i].arrived {
            self.arrive(i);
        }
        if self.flights[i].reply.is_some() {
            self.respond(i);
        }
        self.check();
    }

    /// Delivers every request in flight, and the ones they lead to, in order, until none is
    /// left that can be answered now.
    pub fn deliver_all(&mut self) {
        let mut guard = 0;
        while let Some(i) = self
            .flights
            .iter()
            .position(|f| !f.arrived || f.reply.is_some())
        {
            guard += 1;
            self.ensure(guard < 100_000, || "deliver_all never ends".into());
            self.deliver(i);
        }
    }

    fn reply(&mut self, flight: &Flight, reply: Reply) {
        self.stats.replies += 1;
        let floor = flight
            .retry_after
            .map(|ra| ra.wait_from(self.now))
            .unwrap_or(0)
            .min(self.config.max_retry_after_ms);
        let mark = self.events.len();
        let credentials = if self.server.auth_ok {
            "good"
        } else {
            "expired"
        };
        self.input_to(
            flight.context,
            SessionInput::Reply {
                request: flight.request,
                reply,
                credentials: Some(credentials_checksum(Some(credentials))),
            },
        );
        for i in mark..self.events.len() {
            if let Event::RetryScheduled {
                id,
                delay_ms,
                attempt,
                ..
            } = self.events[i].1
            {
                self.stats.retries += 1;
                let previous = flight
                    .ops
                    .iter()
                    .find(|op| op.id == id)
                    .and_then(|op| op.last_delay_ms);
                let soon = backoff_range(&self.config, 1, None);
                let (low, high) = backoff_range(&self.config, attempt, previous);
                let in_range = |d: Millis, (l, h): (Millis, Millis)| d >= l && d <= h;
                self.ensure(delay_ms >= floor, || {
                    format!("retry delay {delay_ms} ms is below the Retry-After floor {floor} ms")
                });
                self.ensure(
                    in_range(delay_ms, (low, high))
                        || in_range(delay_ms, soon)
                        || delay_ms == floor,
                    || {
                        format!(
                            "retry delay {delay_ms} ms after attempt {attempt} is outside \
                             [{low}, {high}] and is not the floor {floor}"
                        )
                    },
                );
                if delay_ms > high {
                    self.stats.floors += 1;
                }
            }
        }
    }

    /// A ghost copy reaches the server; nobody reads the answer.
    pub fn ghost_arrives(&mut self, i: usize) {
        let ghost = self.ghosts.remove(i);
        self.stats.ghosts_arrived += 1;
        if self.server.down {
            return;
        }
        let reply = self
            .on_server(|s, now| s.handle(now, ghost.mode, &ghost.body, ghost.key.as_deref(), None));
        self.note(|| {
            format!(
                "ghost arrives: {}",
                match &reply {
                    Reply::Http { status, body, .. } => format!("{status} {}", shorten(body)),
                    other => format!("{other:?}"),
                }
            )
        });
        self.check();
    }

    /// Another user edits `entity` on the server.
    pub fn other_user_edits(&mut self, entity: &str) {
        let now = self.now;
        self.server.other_user_edits(entity, now);
        self.note(|| format!("other user edits {entity}"));
    }

    // --- time ---------------------------------------------------------------------------------

    fn deadline(&self, f: &Flight) -> Millis {
        f.sent_at + self.config.request_timeout_ms
    }

    /// Moves the clock to `target`, firing timers and request timeouts on the way, in order.
    pub fn advance_to(&mut self, target: Millis) {
        let mut guard = 0;
        loop {
            guard += 1;
            self.ensure(guard < 100_000, || "time does not move".into());
            let timeout = self
                .flights
                .iter()
                .enumerate()
                .map(|(i, f)| (self.deadline(f), i))
                .min();
            // The alarm fires at least 100 ms out, as the glue clamps it; it wakes the background.
            let alarm = self.alarm.map(|t| (t.max(self.now + 1), BACKGROUND, true));
            let wake = (0..self.sessions.len())
                .filter_map(|c| self.sessions[c].poll_timeout().map(|t| (t, c, false)))
                .chain(alarm)
                .min();
            let fire_timeout = match (timeout, wake) {
                (Some((t, _)), Some((w, _, _))) => t <= w,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if fire_timeout {
                let (t, i) = timeout.expect("some");
                if t > target {
                    break;
                }
                self.now = self.now.max(t);
                self.time_out(i);
            } else {
                match wake {
                    Some((w, context, alarm)) if w <= target => {
                        self.now = self.now.max(w);
                        if alarm {
                            self.alarm = None;
                            self.note(|| "alarm".into());
                            self.input_to(context, SessionInput::Wake(WakeReason::Alarm));
                        } else {
                            self.note(|| format!("timer {context}"));
                            self.input_to(context, SessionInput::Wake(WakeReason::Timer));
                        }
                    }
                    _ => break,
                }
            }
        }
        self.now = self.now.max(target);
        self.check();
    }

    /// Moves the clock by `ms`.
    pub fn advance(&mut self, ms: Millis) {
        self.advance_to(self.now + ms);
    }

    /// Moves the clock to the next wake-up of any context, or the alarm, if there is one.
    pub fn advance_to_next_wake(&mut self) -> bool {
        match self.next_wake_or_alarm() {
            Some(t) => {
                self.advance_to(t.max(self.now));
                true
            }
            None => false,
        }
    }

    fn time_out(&mut self, i: usize) {
        self.stats.timeouts += 1;
        let flight = self.flights.remove(i);
        if !flight.arrived && self.rng.chance(self.rates.ghost) {
            self.ghosts.push(ghost_of(&flight));
        }
        self.note(|| format!("timeout {} {:?}", flight.context, flight.request));
        let reply = Reply::Unreachable {
            reason: "TimeoutError: signal timed out".into(),
        };
        let flight = Flight {
            retry_after: None,
            ..flight
        };
        self.reply(&flight, reply);
    }

    /// Whether every context's session is idle.
    pub fn all_idle(&self) -> bool {
        self.sessions.iter().all(Session::is_idle)
    }

    /// Delivers everything and follows the wake-ups until nothing is left to do, or `rounds`
    /// rounds pass. Returns whether it got quiet: nothing in flight and nothing to wake for.
    pub fn run_until_quiet(&mut self, rounds: usize) -> bool {
        for _ in 0..rounds {
            if !self.flights.is_empty() {
                self.deliver_all();
                if let Some(f) = self.flights.first() {
                    // A hanging request: wait for its timeout.
                    let t = self.deadline(f);
                    self.advance_to(t);
                }
                continue;
            }
            // Quiet: nothing in flight and nothing to do when a wake-up comes. (The alarm stays
            // armed as a heartbeat while ops are pending, so it alone does not count.)
            let pending = self.store.counters_record().pending > 0;
            if self.all_idle() && self.next_wake().is_none() && (!pending || self.alarm.is_none()) {
                return true;
            }
            if !self.advance_to_next_wake() {
                return self.all_idle();
            }
        }
        false
    }

    // --- invariants ---------------------------------------------------------------------------

    /// Checks the invariants that hold between any two steps.
    pub fn check(&mut self) {
        self.check_store();
        self.check_copy();
        self.check_wake();
        self.check_progress();
        let wake = self.next_wake();
        self.ensure(wake.is_none_or(|w| w > self.now), || {
            format!("next wake {wake:?} is not in the future (now {})", self.now)
        });
    }

    /// The store's invariants: counters match the ops; only the head of each entity has a
    /// `next_attempt_at`; each queued op on an entity depends on the one queued before it.
    pub fn check_store(&self) {
        let counters = self.store.counters_record();
        let mut pending = 0;
        let mut bytes = 0;
        let mut max_seq = 0;
        let mut tails: HashMap<&str, u64> = HashMap::new();
        for op in self.store.ops() {
            pending += 1;
            bytes += op.size();
            max_seq = max_seq.max(op.seq);
            match op.entity.as_deref() {
                None => self.ensure(op.next_attempt_at.is_some(), || {
                    format!("unordered seq {} has no next_attempt_at", op.seq)
                }),
                Some(entity) => match tails.insert(entity, op.seq) {
                    None => self.ensure(op.next_attempt_at.is_some() && op.prev < op.seq, || {
                        format!("head seq {} of {entity} is not due ever", op.seq)
                    }),
                    Some(before) => {
                        self.ensure(op.next_attempt_at.is_none() && op.prev == before, || {
                            format!(
                                "seq {} of {entity} behind {before}: prev {} next {:?}",
                                op.seq, op.prev, op.next_attempt_at
                            )
                        })
                    }
                },
            }
        }
        self.ensure(
            counters.pending == pending && counters.bytes == bytes && counters.next_seq > max_seq,
            || format!("counters {counters:?} but {pending} ops, {bytes} bytes, max seq {max_seq}"),
        );
        self.ensure(
            pending <= self.config.limits.max_pending && bytes <= self.config.limits.max_bytes,
            || format!("queue past its caps: {pending} ops, {bytes} bytes"),
        );
    }

    /// Liveness while draining: a session whose drainer has a free request slot leaves no due op
    /// unsent, unless a pause or an open breaker holds it, its entity has a request in flight, or
    /// nobody has told the drainer of it yet. (The simulated store answers at once; in the
    /// browser the bound is one store read.) Only while the lock holds: drainers that overlapped
    /// after a lost lock each know only what they did until they have all stopped, and the final
    /// drain checks that nothing is left.
    pub fn check_progress(&mut self) {
        let draining = self.sessions.iter().filter(|s| s.is_draining()).count();
        if draining != 1
            || self.lock.was_broken
            || self.unannounced
            || self.store.paused
            || !self.store.breaker.is_closed()
        {
            return;
        }
        let busy: BTreeSet<&str> = self
            .flights
            .iter()
            .flat_map(|f| f.ops.iter().filter_map(|op| op.entity.as_deref()))
            .collect();
        for (context, session) in self.sessions.iter().enumerate() {
            let Some(drainer) = session.drainer() else {
                continue;
            };
            if drainer.in_flight() >= self.config.max_in_flight || drainer.is_paused() {
                continue;
            }
            self.stats.progress_checks += 1;
            let stuck = self.store.ops().find(|op| {
                op.next_attempt_at.is_some_and(|t| t <= self.now)
                    && op.entity.as_deref().is_none_or(|e| !busy.contains(e))
            });
            if let Some(op) = stuck {
                self.fail(&format!(
                    "seq {} is due since {:?} and context {context} has a free slot, but it \
                     is not sent",
                    op.seq,
                    op.next_attempt_at.map(|t| self.now - t)
                ));
            }
        }
    }

    /// Liveness while idle: when no context drains, every due op is either not due yet, with a
    /// wake-up armed no later than it, or held back by a pause or an open breaker. (Not after a
    /// lost lock until a session has started alone: overlapping drainers may have left timers
    /// made from what each alone knew.)
    pub fn check_wake(&mut self) {
        if !self.all_idle()
            || self.lock.was_broken
            || self.store.paused
            || !self.store.breaker.is_closed()
            || self.unannounced
        {
            return;
        }
        self.stats.wake_checks += 1;
        let Some((earliest, seq)) = self
            .store
            .ops()
            .filter_map(|op| op.next_attempt_at.map(|t| (t, op.seq)))
            .min()
        else {
            return;
        };
        self.ensure(earliest > self.now, || {
            format!(
                "idle sessions leave seq {seq}, due at {earliest}, unsent at {}",
                self.now
            )
        });
        let wake = self.next_wake();
        self.ensure(wake.is_some_and(|w| w <= earliest), || {
            format!("next wake {wake:?} is later than seq {seq}, due at {earliest}")
        });
    }

    /// Events of one name.
    pub fn events_named(&self, name: &str) -> Vec<&Event> {
        self.events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.name() == name)
            .collect()
    }

    /// The ops this client's requests carried, in order of sending.
    pub fn sent_seqs(&self) -> Vec<u64> {
        self.sent
            .iter()
            .flat_map(|(_, ops)| ops.iter().map(|o| o.seq))
            .collect()
    }

    /// The seqs of this client the server applied, in order.
    pub fn applied_seqs(&self) -> Vec<u64> {
        self.server
            .log
            .iter()
            .filter(|a| a.client == self.client)
            .map(|a| a.seq)
            .collect()
    }
}

fn ghost_of(flight: &Flight) -> Ghost {
    Ghost {
        mode: flight.mode,
        body: flight.body.clone(),
        key: Sim::key_of(flight.mode, &flight.ops),
    }
}

fn seed32(rng: &mut Rng) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(&rng.bytes16());
    seed[16..].copy_from_slice(&rng.bytes16());
    seed
}

fn shorten(text: &str) -> String {
    if text.len() <= 160 {
        text.to_owned()
    } else {
        let mut end = 160;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

/// A draft with a JSON object payload.
pub fn draft(entity: Option<&str>, kind: &str, payload: &str) -> Draft {
    Draft {
        entity: entity.map(str::to_owned),
        kind: kind.to_owned(),
        payload: payload.to_owned(),
        base_version: None,
        priority: Priority::User,
    }
}
