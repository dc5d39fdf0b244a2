//! The persisted records besides ops: counters, dead letters, parked conflicts, receipts.

use serde::{Deserialize, Serialize};

use super::op::{Draft, Op, OpId};
use super::time::Millis;

/// Queue-wide numbers kept in one record, updated in the same transaction as the ops they count,
/// so quotas cost one read instead of a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The `seq` the next op gets.
    pub next_seq: u64,
    /// Pending ops.
    pub pending: u64,
    /// Bytes of pending ops (see [`Op::size`]).
    pub bytes: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            next_seq: 1,
            pending: 0,
            bytes: 0,
        }
    }
}

/// What `enqueue` hands back once the op is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The op's id, which is also its idempotency key.
    pub id: OpId,
    /// The op's place in this client's sequence.
    pub seq: u64,
    /// The queued op this one replaced, when its kind coalesces.
    pub replaced: Option<OpId>,
}

/// Why an op became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadCause {
    /// The server answered with a final refusal, which it stored under the op's id.
    Rejected,
    /// The server failed it `max_attempts` times.
    Exhausted,
    /// It was older than `max_age`.
    Expired,
    /// The server holds a final answer for the op's id that it will not show: in single mode, an
    /// earlier copy with another body (a retried dead letter keeps its id under a new `seq`)
    /// used the `Idempotency-Key` (`422 key-reused`). It may have taken effect, so it is never
    /// sent under a new id; the user can discard it, or act again.
    Ambiguous,
}

/// An op that delivery gave up on. It stays until the user retries or discards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The op as it was last sent.
    pub op: Op,
    /// Why, in words for the user.
    pub reason: String,
    /// The HTTP status of the final answer, if there was one.
    pub status: Option<u16>,
    /// Which rule gave up.
    pub cause: DeadCause,
    /// When.
    pub at: Millis,
}

impl DeadLetter {
    /// Whether the server stored a final answer under the op's id. Such an op must be retried
    /// with a new id, or the server would only replay its answer. Any other dead letter keeps its
    /// id, so that if an earlier attempt did take effect, the retry is a harmless duplicate.
    pub fn reached_server(&self) -> bool {
        self.cause == DeadCause::Rejected
    }
}

/// An op parked by the `manual` conflict policy, with what the server had instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedConflict {
    /// The op that conflicted.
    pub op: Op,
    /// The server's version when it refused.
    pub server_version: Option<u64>,
    /// The server's state when it refused, as JSON text.
    pub server_state: Option<String>,
    /// When.
    pub at: Millis,
}

/// How the user settles a parked conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resolution {
    /// Send my op again against the server's current version.
    KeepMine,
    /// Drop my op; the server's state stands.
    TakeTheirs,
}

impl Op {
    /// The caller's request that made this op, for sending it again as a new op.
    pub fn draft(&self) -> Draft {
        Draft {
            entity: self.entity.clone(),
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            base_version: self.base_version,
            priority: self.priority,
        }
    }
}
