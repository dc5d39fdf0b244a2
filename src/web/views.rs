//! The shapes JavaScript sees: camelCase, payloads and states as parsed JSON.
//!
//! Stored records keep their Rust field names (the indexes name them); these views are made for
//! the API and go through `JSON.parse`, so payloads come out as the objects that went in.

use wasm_bindgen::JsValue;

use super::error::{Error, Result};
use crate::core::copy::Incident;
use crate::core::json::{self, ToJson, Writer};
use crate::core::{DeadCause, DeadLetter, Millis, Op, OpId, ParkedConflict, Priority, Receipt};

/// A queued op as `pending()` lists it.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct QueuedOp<'a> {
    /// The op's id, its idempotency key.
    id: OpId,
    /// Its place in this client's sequence.
    seq: u64,
    /// The `seq` of this client's previous op on its entity still pending when it was made.
    prev: u64,
    /// What it changes; `null` for unordered ops.
    entity: &'a Option<String>,
    /// What it does.
    kind: &'a str,
    /// Its body, as it was enqueued (JSON text).
    #[tsify(type = "unknown")]
    payload: &'a str,
    /// The entity version it was made against.
    base_version: Option<u64>,
    /// How long delivery keeps trying.
    priority: Priority,
    /// When it was enqueued.
    created_at: Millis,
    /// Requests that carried it.
    attempts: u32,
    /// Attempts the server failed.
    failures: u32,
    /// When it may be sent next; `null` while an earlier op on its entity is pending.
    next_attempt_at: Option<Millis>,
    /// Why the last attempt failed.
    last_error: &'a Option<String>,
}

impl<'a> From<&'a Op> for QueuedOp<'a> {
    fn from(op: &'a Op) -> Self {
        QueuedOp {
            id: op.id,
            seq: op.seq,
            prev: op.prev,
            entity: &op.entity,
            kind: &op.kind,
            payload: &op.payload,
            base_version: op.base_version,
            priority: op.priority,
            created_at: op.created_at,
            attempts: op.attempts,
            failures: op.failures,
            next_attempt_at: op.next_attempt_at,
            last_error: &op.last_error,
        }
    }
}

/// An op delivery gave up on; `cause` says which rule.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[tsify(rename = "DeadLetter")]
pub struct DeadLetterView<'a> {
    /// The op as it was last sent.
    op: QueuedOp<'a>,
    /// Why, in words for the user.
    reason: &'a str,
    /// The HTTP status of the final answer, if there was one.
    status: Option<u16>,
    /// Which rule gave up.
    cause: DeadCause,
    /// When.
    at: Millis,
}

impl<'a> From<&'a DeadLetter> for DeadLetterView<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        DeadLetterView {
            op: (&letter.op).into(),
            reason: &letter.reason,
            status: letter.status,
            cause: letter.cause,
            at: letter.at,
        }
    }
}

/// An op parked by the `manual` policy, with the server's side, for a side-by-side UI.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[tsify(rename = "Conflict")]
pub struct ConflictView<'a> {
    /// The op that conflicted.
    op: QueuedOp<'a>,
    /// The server's version when it refused.
    server_version: Option<u64>,
    /// The server's state when it refused (JSON text).
    #[tsify(type = "unknown")]
    server_state: Option<&'a str>,
    /// The server left its state out of the answer: `serverState` is `null`; read the entity
    /// from the server if the UI needs it.
    server_state_omitted: bool,
    /// When.
    at: Millis,
}

impl<'a> From<&'a ParkedConflict> for ConflictView<'a> {
    fn from(conflict: &'a ParkedConflict) -> Self {
        ConflictView {
            op: (&conflict.op).into(),
            server_version: conflict.server_version,
            server_state: conflict.server_state.as_deref(),
            server_state_omitted: conflict.server_state_omitted,
            at: conflict.at,
        }
    }
}

/// What `enqueue` resolves with once the op is on disk.
#[derive(tsify::Tsify)]
#[tsify(rename = "Receipt")]
pub struct ReceiptView {
    /// The op's id, its idempotency key.
    id: OpId,
    /// Its place in this client's sequence.
    seq: u64,
    /// The queued op it replaced, when its kind coalesces.
    replaced: Option<OpId>,
    /// Whether this answers an earlier call with the same key (nothing new was queued).
    replayed: bool,
}

impl From<&Receipt> for ReceiptView {
    fn from(receipt: &Receipt) -> Self {
        ReceiptView {
            id: receipt.id,
            seq: receipt.seq,
            replaced: receipt.replaced,
            replayed: receipt.replayed,
        }
    }
}

/// What a closing page sends itself: `body` to `url`, which carries a beacon grant for exactly
/// that op until `expiresAt`.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[tsify(rename = "Beacon")]
pub struct BeaconView {
    /// `/v1/beacon?grant=…`.
    pub url: String,
    /// The envelope with the one op.
    pub body: String,
    /// When the grant expires.
    pub expires_at: Millis,
}

/// Counts and states for a status UI; `draining` and `inFlight` are this context's.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[tsify(rename = "Stats")]
pub struct StatsView {
    /// The client id.
    pub client: Option<String>,
    /// Pending ops.
    pub pending: u64,
    /// Bytes of pending ops.
    pub bytes: u64,
    /// Dead letters.
    pub dead_letters: u32,
    /// Parked conflicts.
    pub conflicts: u32,
    /// The earliest next attempt of any op.
    pub next_attempt_at: Option<Millis>,
    /// Whether delivery waits for credentials.
    pub paused: bool,
    /// Whether this context is delivering now.
    pub draining: bool,
    /// Requests in flight from this context.
    pub in_flight: usize,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// Whether a second copy of the pending ops is kept (the `backup` option).
    pub copy: bool,
    /// The last time the browser was found to have dropped the database, if ever.
    pub incident: Option<Incident>,
}

/// The breaker as `stats()` shows it.
#[derive(tsify::Tsify)]
pub struct BreakerState {
    /// `closed`, `open` or `half-open`.
    #[tsify(type = "\"closed\" | \"open\" | \"half-open\"")]
    pub state: &'static str,
    /// When an open breaker probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[tsify(optional)]
    pub until: Option<Millis>,
}

/// Writes JSON text as it is if it is JSON, else `null`: payloads were checked on the way in and
/// states came from parsed answers, but a bad stored value must not break the whole view.
fn raw_or_null(out: &mut Writer, name: &str, text: Option<&str>) {
    out.key(name);
    match text.filter(|text| json::is_valid(text)) {
        Some(text) => out.raw(text),
        None => out.null(),
    };
}

impl ToJson for QueuedOp<'_> {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("id", &self.id)
            .field("seq", &self.seq)
            .field("prev", &self.prev)
            .field("entity", self.entity)
            .field("kind", self.kind);
        raw_or_null(out, "payload", Some(self.payload));
        out.field("baseVersion", &self.base_version)
            .field("priority", &self.priority)
            .field("createdAt", &self.created_at)
            .field("attempts", &self.attempts)
            .field("failures", &self.failures)
            .field("nextAttemptAt", &self.next_attempt_at)
            .field("lastError", self.last_error)
            .end_object();
    }
}

impl ToJson for DeadLetterView<'_> {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("op", &self.op)
            .field("reason", self.reason)
            .field("status", &self.status)
            .field("cause", &self.cause)
            .field("at", &self.at)
            .end_object();
    }
}

impl ToJson for ConflictView<'_> {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("op", &self.op)
            .field("serverVersion", &self.server_version);
        raw_or_null(out, "serverState", self.server_state);
        out.field("serverStateOmitted", &self.server_state_omitted)
            .field("at", &self.at)
            .end_object();
    }
}

impl ToJson for ReceiptView {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("id", &self.id)
            .field("seq", &self.seq)
            .field("replaced", &self.replaced)
            .field("replayed", &self.replayed)
            .end_object();
    }
}

impl ToJson for BeaconView {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("url", &self.url)
            .field("body", &self.body)
            .field("expiresAt", &self.expires_at)
            .end_object();
    }
}

impl ToJson for StatsView {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("client", &self.client)
            .field("pending", &self.pending)
            .field("bytes", &self.bytes)
            .field("deadLetters", &self.dead_letters)
            .field("conflicts", &self.conflicts)
            .field("nextAttemptAt", &self.next_attempt_at)
            .field("paused", &self.paused)
            .field("draining", &self.draining)
            .field("inFlight", &self.in_flight)
            .key("breaker")
            .begin_object()
            .field("state", self.breaker.state);
        if let Some(until) = self.breaker.until {
            out.field("until", &until);
        }
        out.end_object()
            .field("copy", &self.copy)
            .field("incident", &self.incident)
            .end_object();
    }
}

/// Writes the view as JSON and parses it in JavaScript: one crossing of the boundary, and the
/// payloads come out as the objects that went in.
pub fn to_js<T: ToJson + ?Sized>(value: &T) -> Result<JsValue> {
    js_sys::JSON::parse(&value.to_json()).map_err(Error::storage)
}
