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
    /// The call repeated an earlier one with the same caller key: this is the first call's
    /// receipt, and nothing new was queued.
    #[serde(default)]
    pub replayed: bool,
}

/// What a caller's key remembers about the call it first came with, so that the same call made
/// again (after a lost answer) gets the same answer instead of a second effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The caller's key.
    pub key: String,
    /// What the first call asked (see [`fingerprint`]); another request under the same key is
    /// refused.
    pub fingerprint: u64,
    /// The first call's receipt, or `None` for a call that queued nothing (a discard, or
    /// take-theirs).
    pub receipt: Option<Receipt>,
    /// When the first call was made; the record is kept for the key retention after it.
    pub at: Millis,
}

/// A 64-bit FNV-1a checksum of the parts of a request, separated so that `["ab", "c"]` and
/// `["a", "bc"]` differ. It tells a repeated call from another call under the same key; it
/// guards against mistakes, not adversaries (a caller can only confuse its own calls).
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// Why an op became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
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
    /// The server left its state out of the answer (see [`Event::Conflict`]).
    ///
    /// [`Event::Conflict`]: super::event::Event::Conflict
    #[serde(default)]
    pub server_state_omitted: bool,
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

impl Draft {
    /// The fingerprint of an `enqueue` of this draft (see [`fingerprint`]).
    pub fn fingerprint(&self) -> u64 {
        let version = self.base_version.map(|v| v.to_string()).unwrap_or_default();
        let priority = match self.priority {
            super::op::Priority::User => "user",
            super::op::Priority::Background => "background",
        };
        fingerprint(&[
            "enqueue",
            self.entity.as_deref().unwrap_or("\u{0}"),
            &self.kind,
            &self.payload,
            &version,
            priority,
        ])
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::op::Priority;

    #[test]
    fn fingerprints_tell_requests_apart_by_every_field_and_boundary() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
        let draft = Draft {
            entity: Some("pr/1".into()),
            kind: "comment".into(),
            payload: "{}".into(),
            base_version: None,
            priority: Priority::User,
        };
        let same = draft.clone();
        assert_eq!(draft.fingerprint(), same.fingerprint());
        let variants = [
            Draft {
                entity: None,
                ..draft.clone()
            },
            Draft {
                kind: "approve".into(),
                ..draft.clone()
            },
            Draft {
                payload: "{\"a\":1}".into(),
                ..draft.clone()
            },
            Draft {
                base_version: Some(0),
                ..draft.clone()
            },
            Draft {
                priority: Priority::Background,
                ..draft.clone()
            },
        ];
        for variant in variants {
            assert_ne!(variant.fingerprint(), draft.fingerprint(), "{variant:?}");
        }
    }
}
