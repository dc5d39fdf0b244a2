//! Admission: whether an op may join the queue, and where.

use super::config::Config;
use super::op::{Draft, Op, OpId};
use super::records::Counters;
use super::time::Millis;

/// Longest `kind`, in bytes.
pub const MAX_KIND_BYTES: usize = 64;
/// Longest `entity`, in bytes.
pub const MAX_ENTITY_BYTES: usize = 256;

/// Why a request to the queue was refused. Nothing is queued when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The op is malformed.
    #[error("invalid op: {0}")]
    InvalidOp(String),
    /// The op is bigger than `limits.maxOpBytes`.
    #[error("op is {size} bytes, more than the {max}-byte limit")]
    OpTooLarge {
        /// The op's size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The queue is at a cap.
    #[error("queue is full: {limit} is {max}")]
    QueueFull {
        /// Which cap: `maxPending` or `maxBytes`.
        limit: &'static str,
        /// Its value.
        max: u64,
    },
    /// No dead letter or conflict has that id.
    #[error("nothing with id {0}")]
    NotFound(OpId),
    /// A caller's key is malformed.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A caller's key came with another request than the one it first came with.
    #[error("key {0:?} was used for another request")]
    KeyReused(String),
}

/// Longest caller key, in bytes.
pub const MAX_KEY_BYTES: usize = 200;

/// Checks a caller's idempotency key: 1 to [`MAX_KEY_BYTES`] bytes of visible ASCII.
pub fn validate_key(key: &str) -> Result<(), Refusal> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::InvalidKey(format!(
            "a key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"
        )));
    }
    Ok(())
}

/// An admitted op and what admission changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The op to store.
    pub op: Op,
    /// A queued op that the new one replaces (coalescing); delete it in the same transaction.
    pub replaces: Option<Op>,
    /// The counters after the change.
    pub counters: Counters,
}

/// Decides whether `draft` joins the queue. `tail` is the newest pending op on the same entity.
///
/// The new op is the entity's head (due now) when no op on its entity is pending; otherwise it
/// waits behind `tail`, with `prev = tail.seq`. A coalescing kind replaces a `tail` of the same
/// kind that never left the device (no attempts), which is the only case where replacing cannot
/// lose a write already on the wire, and that is not its entity's head: a drainer may hold the head
/// in its window, and would go on deciding on a copy that no longer exists (a lease catches a
/// send of it, but nothing would catch its expiry).
pub fn admit(
    config: &Config,
    counters: &Counters,
    tail: Option<&Op>,
    draft: Draft,
    id: OpId,
    now: Millis,
) -> Result<Admission, Refusal> {
    validate(&draft)?;
    let mut op = Op {
        id,
        seq: counters.next_seq,
        prev: 0,
        entity: draft.entity,
        kind: draft.kind,
        payload: draft.payload,
        base_version: draft.base_version,
        priority: draft.priority,
        created_at: now,
        attempts: 0,
        failures: 0,
        next_attempt_at: Some(now),
        last_error: None,
        solo: false,
        last_delay_ms: None,
    };
    let size = op.size();
    let max_op = config.limits.max_op_bytes;
    if size > max_op {
        return Err(Refusal::OpTooLarge { size, max: max_op });
    }
    let replaces = tail
        .filter(|t| {
            t.kind == op.kind && t.attempts == 0 && !t.is_head() && config.kind(&op.kind).coalesce
        })
        .cloned();
    match (&replaces, tail) {
        (Some(old), _) => {
            op.prev = old.prev;
            op.next_attempt_at = old.next_attempt_at;
        }
        (None, Some(tail)) => {
            op.prev = tail.seq;
            op.next_attempt_at = None;
        }
        (None, None) => {}
    }
    let (freed_ops, freed_bytes) = replaces.as_ref().map_or((0, 0), |old| (1, old.size()));
    let pending = counters.pending + 1 - freed_ops;
    let bytes = counters.bytes + size - freed_bytes;
    if pending > config.limits.max_pending {
        return Err(Refusal::QueueFull {
            limit: "maxPending",
            max: config.limits.max_pending,
        });
    }
    if bytes > config.limits.max_bytes {
        return Err(Refusal::QueueFull {
            limit: "maxBytes",
            max: config.limits.max_bytes,
        });
    }
    Ok(Admission {
        op,
        replaces,
        counters: Counters {
            next_seq: counters.next_seq + 1,
            pending,
            bytes,
        },
    })
}

fn validate(draft: &Draft) -> Result<(), Refusal> {
    let invalid = |why: String| Err(Refusal::InvalidOp(why));
    if draft.kind.is_empty() || draft.kind.len() > MAX_KIND_BYTES {
        return invalid(format!("kind must be 1 to {MAX_KIND_BYTES} bytes"));
    }
    if let Some(entity) = &draft.entity
        && (entity.is_empty() || entity.len() > MAX_ENTITY_BYTES)
    {
        return invalid(format!("entity must be 1 to {MAX_ENTITY_BYTES} bytes"));
    }
    if let Err(e) = super::json::check(&draft.payload) {
        return invalid(format!("payload is not JSON: {e}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::{ConflictPolicy, KindPolicy};
    use crate::core::op::Priority;

    fn draft(entity: Option<&str>, kind: &str) -> Draft {
        Draft {
            entity: entity.map(str::to_owned),
            kind: kind.into(),
            payload: r#"{"v":1}"#.into(),
            base_version: None,
            priority: Priority::User,
        }
    }

    fn id(n: u8) -> OpId {
        OpId::from_random_bytes([n; 16])
    }

    #[test]
    fn first_op_on_an_entity_is_its_head_and_later_ones_wait_behind_the_tail() {
        let config = Config::default();
        let first = admit(
            &config,
            &Counters::default(),
            None,
            draft(Some("e"), "k"),
            id(1),
            5,
        )
        .unwrap();
        assert_eq!(
            (first.op.seq, first.op.prev, first.op.next_attempt_at),
            (1, 0, Some(5))
        );
        let second = admit(
            &config,
            &first.counters,
            Some(&first.op),
            draft(Some("e"), "k"),
            id(2),
            6,
        )
        .unwrap();
        assert_eq!(
            (second.op.seq, second.op.prev, second.op.next_attempt_at),
            (2, 1, None)
        );
        assert_eq!(second.counters.pending, 2);
        assert_eq!(second.counters.bytes, first.op.size() + second.op.size());
    }

    #[test]
    fn coalescing_replaces_only_an_unsent_tail_of_the_same_kind() {
        let mut config = Config::default();
        config.kinds.insert(
            "title".into(),
            KindPolicy {
                conflict: ConflictPolicy::ServerWins,
                coalesce: true,
            },
        );
        let head = admit(
            &config,
            &Counters::default(),
            None,
            draft(Some("e"), "title"),
            id(1),
            0,
        )
        .unwrap();
        let behind = admit(
            &config,
            &head.counters,
            Some(&head.op),
            draft(Some("e"), "title"),
            id(2),
            1,
        )
        .unwrap();
        assert_eq!(
            behind.replaces, None,
            "the head is never replaced: a drainer may hold it"
        );
        let merged = admit(
            &config,
            &behind.counters,
            Some(&behind.op),
            draft(Some("e"), "title"),
            id(3),
            2,
        )
        .unwrap();
        assert_eq!(merged.replaces.as_ref().map(|o| o.id), Some(id(2)));
        assert_eq!(
            (merged.op.prev, merged.op.next_attempt_at),
            (head.op.seq, None)
        );
        assert_eq!(merged.counters.pending, 2);

        let mut sent = behind.op.clone();
        sent.attempts = 1;
        let queued = admit(
            &config,
            &behind.counters,
            Some(&sent),
            draft(Some("e"), "title"),
            id(4),
            2,
        )
        .unwrap();
        assert_eq!(
            queued.replaces, None,
            "an op that may be on the wire is never replaced"
        );
        let other_kind = admit(
            &config,
            &behind.counters,
            Some(&behind.op),
            draft(Some("e"), "body"),
            id(5),
            2,
        )
        .unwrap();
        assert_eq!(other_kind.replaces, None);
    }

    #[test]
    fn each_quota_refuses_with_its_own_error() {
        let mut config = Config::default();
        config.limits.max_op_bytes = 300;
        config.limits.max_pending = 1;
        let mut big = draft(None, "k");
        big.payload = format!("\"{}\"", "x".repeat(400));
        assert!(matches!(
            admit(&config, &Counters::default(), None, big, id(1), 0),
            Err(Refusal::OpTooLarge { max: 300, .. })
        ));
        let full = Counters {
            next_seq: 2,
            pending: 1,
            bytes: 10,
        };
        assert_eq!(
            admit(&config, &full, None, draft(None, "k"), id(2), 0),
            Err(Refusal::QueueFull {
                limit: "maxPending",
                max: 1
            })
        );
        config.limits.max_pending = 10;
        config.limits.max_bytes = 300;
        let heavy = Counters {
            next_seq: 2,
            pending: 1,
            bytes: 200,
        };
        assert_eq!(
            admit(&config, &heavy, None, draft(None, "k"), id(3), 0),
            Err(Refusal::QueueFull {
                limit: "maxBytes",
                max: 300
            })
        );
    }

    /// The limits are inclusive: a kind, entity, key, op size, pending count or byte count at
    /// its limit is admitted, one past it refused.
    #[test]
    fn every_admission_limit_admits_its_value_and_refuses_one_past_it() {
        let config = Config::default();
        let ok = |d: Draft| admit(&config, &Counters::default(), None, d, id(1), 0);
        let named = |entity: Option<String>, kind: String| Draft {
            entity,
            kind,
            ..draft(None, "k")
        };
        assert!(ok(named(None, "k".repeat(MAX_KIND_BYTES))).is_ok());
        assert!(ok(named(None, "k".repeat(MAX_KIND_BYTES + 1))).is_err());
        assert!(ok(named(Some("e".repeat(MAX_ENTITY_BYTES)), "k".into())).is_ok());
        assert!(ok(named(Some("e".repeat(MAX_ENTITY_BYTES + 1)), "k".into())).is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(validate_key("").is_err());
        assert!(validate_key("tab\tkey").is_err());

        let mut config = Config::default();
        let exact = admit(
            &config,
            &Counters::default(),
            None,
            draft(None, "k"),
            id(1),
            0,
        )
        .unwrap()
        .op
        .size();
        config.limits.max_op_bytes = exact;
        config.limits.max_pending = 2;
        config.limits.max_bytes = 2 * exact;
        let one = admit(
            &config,
            &Counters::default(),
            None,
            draft(None, "k"),
            id(1),
            0,
        )
        .unwrap();
        let two = admit(&config, &one.counters, None, draft(None, "k"), id(2), 0)
            .expect("the second op fills both caps exactly");
        assert_eq!((two.counters.pending, two.counters.bytes), (2, 2 * exact));
        assert!(matches!(
            admit(&config, &two.counters, None, draft(None, "k"), id(3), 0),
            Err(Refusal::QueueFull {
                limit: "maxPending",
                ..
            })
        ));
        config.limits.max_pending = 3;
        assert!(matches!(
            admit(&config, &two.counters, None, draft(None, "k"), id(3), 0),
            Err(Refusal::QueueFull {
                limit: "maxBytes",
                ..
            })
        ));
        config.limits.max_op_bytes = exact - 1;
        assert!(matches!(
            admit(
                &config,
                &Counters::default(),
                None,
                draft(None, "k"),
                id(4),
                0
            ),
            Err(Refusal::OpTooLarge { .. })
        ));
    }

    #[test]
    fn malformed_drafts_are_invalid_ops() {
        let config = Config::default();
        let mut bad_payload = draft(None, "k");
        bad_payload.payload = "{not json".into();
        for bad in [
            draft(None, ""),
            draft(Some(""), "k"),
            draft(None, &"k".repeat(65)),
            bad_payload,
        ] {
            assert!(matches!(
                admit(&config, &Counters::default(), None, bad, id(1), 0),
                Err(Refusal::InvalidOp(_))
            ));
        }
    }
}
