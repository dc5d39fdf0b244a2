//! Ops: the user actions that the outbox delivers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::time::Millis;

/// The idempotency key of an op: a random (version 4) UUID.
///
/// The core never draws randomness: the shell makes ids from `crypto.getRandomValues` with
/// [`OpId::from_random_bytes`]. The id names exactly one body forever, so an op that must be sent
/// with another body (a rebase after a conflict) gets a new id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(u128);

impl OpId {
    /// Makes a version 4 UUID from 16 random bytes (the version and variant bits are set here).
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        let raw = u128::from_be_bytes(bytes);
        let version_mask: u128 = 0xF << 76;
        let variant_mask: u128 = 0b11 << 62;
        OpId((raw & !version_mask & !variant_mask) | (0x4 << 76) | (0b10 << 62))
    }

    /// The id as a 128-bit number.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not a UUID in canonical form (`8-4-4-4-12` hexadecimal digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a UUID: {0:?}")]
pub struct BadOpId(pub String);

impl FromStr for OpId {
    type Err = BadOpId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadOpId(text.chars().take(64).collect());
        let bytes = text.as_bytes();
        if bytes.len() != 36 {
            return Err(bad());
        }
        let mut value: u128 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return Err(bad());
                }
                continue;
            }
            let digit = (b as char).to_digit(16).ok_or_else(bad)?;
            value = (value << 4) | u128::from(digit);
        }
        Ok(OpId(value))
    }
}

impl Serialize for OpId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OpId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How urgently an op matters to the user, which sets how long delivery keeps trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum Priority {
    /// The user just did this and watches for it: few attempts, short life.
    #[default]
    User,
    /// Bookkeeping the user does not wait for: many attempts, long life.
    Background,
}

/// What the caller asks to enqueue, before the outbox gives it an id and a place in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    /// The thing the op changes, such as `"pr/17"`. Ops on one entity are delivered in order;
    /// `None` means unordered.
    pub entity: Option<String>,
    /// What the op does, such as `"comment"`. Selects the conflict and coalescing policy.
    pub kind: String,
    /// The op's body as JSON text. The core never parses it; it only counts its bytes.
    pub payload: String,
    /// The entity version the user saw when acting; the server reports a conflict if it moved.
    pub base_version: Option<u64>,
    /// How long to keep trying.
    pub priority: Priority,
}

/// An op in the queue: the persisted record, one per pending op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The idempotency key.
    pub id: OpId,
    /// This client's sequence number, strictly increasing across all its ops. The store's key.
    pub seq: u64,
    /// The `seq` of this client's previous op on the same entity still pending when this one was
    /// made, or 0. The server applies the op only after `prev`, so reordering cannot skip one.
    pub prev: u64,
    /// See [`Draft::entity`].
    pub entity: Option<String>,
    /// See [`Draft::kind`].
    pub kind: String,
    /// See [`Draft::payload`].
    pub payload: String,
    /// See [`Draft::base_version`].
    pub base_version: Option<u64>,
    /// See [`Draft::priority`].
    pub priority: Priority,
    /// When the op was enqueued; it expires `max_age` after this.
    pub created_at: Millis,
    /// Requests that carried this op. Drives the backoff exponent.
    pub attempts: u32,
    /// Attempts that the server failed (5xx, 408, out of order, a bad answer). Only these count
    /// toward `max_attempts`: an unreachable or busy server is bounded by `max_age` instead, so an
    /// offline user does not lose ops.
    pub failures: u32,
    /// When the op may be sent next. `None` while an earlier op on its entity is pending: only the
    /// head of each entity has a time, so the due index holds exactly the sendable ops.
    pub next_attempt_at: Option<Millis>,
    /// Why the last attempt failed, for the UI.
    pub last_error: Option<String>,
    /// Send this op in a request of its own: a whole batch was refused once, and sending alone
    /// finds the op at fault without taking the others down with it.
    pub solo: bool,
    /// The last retry delay chosen, which `decorrelated` backoff grows from.
    #[serde(default)]
    pub last_delay_ms: Option<Millis>,
}

/// Bytes an op adds to a request beyond its payload, kind and entity: the JSON field names, ids
/// and numbers. Generous on purpose, so batches stay under the server's body limit.
pub const OP_OVERHEAD_BYTES: usize = 192;

impl Op {
    /// The op's size on the wire and in the store, as counted by quotas and batch limits.
    pub fn size(&self) -> u64 {
        (self.payload.len()
            + self.kind.len()
            + self.entity.as_ref().map_or(0, String::len)
            + OP_OVERHEAD_BYTES) as u64
    }

    /// Whether this op is the head of its entity (or unordered) and so may be sent.
    pub fn is_head(&self) -> bool {
        self.next_attempt_at.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_id_is_a_version_4_uuid_that_round_trips_through_text() {
        let id = OpId::from_random_bytes([0xff; 16]);
        let text = id.to_string();
        assert_eq!(text, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(text.parse::<OpId>().unwrap(), id);
        let zero = OpId::from_random_bytes([0; 16]).to_string();
        assert_eq!(zero, "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn op_id_rejects_text_that_is_not_a_canonical_uuid() {
        for bad in [
            "",
            "not-a-uuid",
            "ffffffffffff4fffbfffffffffffffffffff",
            "ffffffff-ffff-4fff-bfff-fffffffffffg",
            "ffffffff-ffff-4fff-bfff-fffffffffffff",
        ] {
            assert!(bad.parse::<OpId>().is_err(), "{bad:?} parsed");
        }
    }
}
