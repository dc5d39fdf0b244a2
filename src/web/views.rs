//! The shapes JavaScript sees: camelCase, payloads and states as parsed JSON.
//!
//! Stored records keep their Rust field names (the indexes name them); these views are made for
//! the API and go through `JSON.parse`, so payloads come out as the objects that went in.

use serde::Serialize;
use serde_json::value::RawValue;
use wasm_bindgen::JsValue;

use super::error::{Error, JsError, Result};
use crate::core::{DeadCause, DeadLetter, Millis, Op, OpId, ParkedConflict, Priority, Receipt};

/// An op as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpView<'a> {
    id: OpId,
    seq: u64,
    prev: u64,
    entity: &'a Option<String>,
    kind: &'a str,
    payload: Option<&'a RawValue>,
    base_version: Option<u64>,
    priority: Priority,
    created_at: Millis,
    attempts: u32,
    failures: u32,
    next_attempt_at: Option<Millis>,
    last_error: &'a Option<String>,
}

impl<'a> From<&'a Op> for OpView<'a> {
    fn from(op: &'a Op) -> Self {
        OpView {
            id: op.id,
            seq: op.seq,
            prev: op.prev,
            entity: &op.entity,
            kind: &op.kind,
            // Payloads were validated as JSON on the way in.
            payload: serde_json::from_str(&op.payload).ok(),
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

/// A dead letter as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView<'a> {
    op: OpView<'a>,
    reason: &'a str,
    status: Option<u16>,
    cause: DeadCause,
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

/// A parked conflict as the API shows it: both sides, for a side-by-side UI.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictView<'a> {
    op: OpView<'a>,
    server_version: Option<u64>,
    server_state: Option<&'a RawValue>,
    at: Millis,
}

impl<'a> From<&'a ParkedConflict> for ConflictView<'a> {
    fn from(conflict: &'a ParkedConflict) -> Self {
        ConflictView {
            op: (&conflict.op).into(),
            server_version: conflict.server_version,
            server_state: conflict
                .server_state
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            at: conflict.at,
        }
    }
}

/// A receipt as the API shows it.
#[derive(Serialize)]
pub struct ReceiptView {
    id: OpId,
    seq: u64,
    replaced: Option<OpId>,
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

/// `beacon()` as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BeaconView {
    /// `/v1/beacon?grant=…`.
    pub url: String,
    /// The envelope with the one op.
    pub body: String,
    /// When the grant expires.
    pub expires_at: Millis,
}

/// `stats()` as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
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
    pub breaker: BreakerView,
}

/// The breaker as `stats()` shows it.
#[derive(Serialize)]
pub struct BreakerView {
    /// `closed`, `open` or `half-open`.
    pub state: &'static str,
    /// When an open breaker probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
}

/// Serialises with serde_json (which understands raw JSON) and parses in JavaScript.
pub fn to_js<T: Serialize>(value: &T) -> Result<JsValue> {
    let text = serde_json::to_string(value).map_err(|e| {
        Error::Storage(JsError {
            name: "DataError".into(),
            message: e.to_string(),
        })
    })?;
    js_sys::JSON::parse(&text).map_err(Error::storage)
}
