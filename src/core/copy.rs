//! The second copy: every op the server has not answered, kept in storage that fails apart from
//! IndexedDB, and the decision of what to do with it when a context starts.
//!
//! Chromium deletes an extension's whole IndexedDB database when it finds its LevelDB files
//! corrupt after a hard kill (measured: tests/killloop/FINDINGS.md); strict durability does not
//! prevent it, and every IndexedDB queue loses everything then. `chrome.storage.local` and OPFS
//! were never lost together with it in the same kills, so the shell keeps a copy there (through
//! the `backup` hook), and the core decides what it holds and, at start, whether to trust the
//! database, seed the copy, rebuild the queue from it, or report the loss.
//!
//! The copy holds, per pending op, the fields that make it the same op on the wire (id, seq,
//! prev, entity, kind, payload, base version, priority, creation time) and its caller key; and
//! one record of the client id, the next `seq` and the pending count. Attempts and due times are
//! not copied: a rebuilt op starts over, and the server deduplicates whatever had arrived. Dead
//! letters and parked conflicts are not copied either: they are answered, not pending.

use serde::{Deserialize, Serialize};

use super::op::{Op, OpId};
use super::records::{Counters, KeyRecord};
use super::time::Millis;

/// The copy's record of the queue as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyMeta {
    /// The client id: a rebuilt queue must keep it, or the server would take every op as new.
    pub client: OpId,
    /// The `seq` the next op gets: a rebuilt queue must never reuse one, or the server would take
    /// a new op for a duplicate of an old one.
    pub next_seq: u64,
    /// Pending ops when the copy was last written, to tell a copy that lost ops from one that
    /// had nothing to lose.
    pub pending: u64,
}

/// One op in the copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedOp {
    /// The op as it was queued (or last relinked or rebased).
    pub op: Op,
    /// The caller key it came with, so a caller's retry still finds it after a rebuild.
    #[serde(default)]
    pub key: Option<KeyRecord>,
}

/// What one transaction changes in the copy. The shell writes it beside the transaction: puts
/// first, then removals (a removal that is lost leaves a stale copy, which a rebuild would only
/// resend as a duplicate; a lost put is an op the copy does not cover).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyWrite {
    /// Ops to store or replace, by `seq`.
    pub put: Vec<CopiedOp>,
    /// `seq`s of ops that left the queue.
    pub remove: Vec<u64>,
    /// The counters after the transaction, for [`CopyMeta`].
    pub counters: Option<Counters>,
}

impl CopyWrite {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty() && self.counters.is_none()
    }

    /// Adds `other`'s changes after this one's.
    pub fn extend(&mut self, other: CopyWrite) {
        self.remove
            .retain(|seq| !other.put.iter().any(|c| c.op.seq == *seq));
        self.put.retain(|c| !other.remove.contains(&c.op.seq));
        self.put.extend(other.put);
        self.remove.extend(other.remove);
        if other.counters.is_some() {
            self.counters = other.counters;
        }
    }
}

/// A value and what it changed in the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied<T> {
    /// The value.
    pub value: T,
    /// The copy's changes.
    pub copy: CopyWrite,
}

/// What a context does with its database and the copy when it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Neither has a queue: a new client, and a copy of it.
    Fresh,
    /// The database and the copy name the same client: go on.
    Intact,
    /// The database has a queue and the copy none (the copy is new, or was cleared): copy every
    /// pending op.
    Seed,
    /// The database has no queue and the copy has one: the browser dropped the database.
    /// Rebuild it from the copy, under the copy's client id.
    Rebuild(CopyMeta),
    /// The database has another client than the copy: the copy's queue is gone (its client's
    /// database was dropped before the copy was looked at), and what it held cannot join this
    /// client's sequence. Report it, and copy this queue instead.
    Orphaned(CopyMeta),
}

/// Decides what to do at open, from the database's client id and the copy's record.
pub fn start(database: Option<OpId>, copy: Option<CopyMeta>) -> Start {
    match (database, copy) {
        (None, None) => Start::Fresh,
        (Some(_), None) => Start::Seed,
        (Some(db), Some(meta)) if db == meta.client => Start::Intact,
        (Some(_), Some(meta)) => Start::Orphaned(meta),
        (None, Some(meta)) => Start::Rebuild(meta),
    }
}

/// A queue rebuilt from the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The client id to store.
    pub client: OpId,
    /// The counters to store.
    pub counters: Counters,
    /// The ops to store, in `seq` order, each entity's first one due at once.
    pub ops: Vec<Op>,
    /// The callers' keys to store.
    pub keys: Vec<KeyRecord>,
    /// Ops the copy's record says were pending and the copy does not hold.
    pub missing: u64,
}

/// Rebuilds the queue the copy describes, at `now`. The ops keep their ids, `seq`s and order,
/// so the server deduplicates any that had already arrived. Each entity's first op is its head,
/// due now, with the `prev` it had (if that predecessor never arrives, the server answers
/// `out_of_order` and the drainer relinks the head to the server's last); each later op is
/// linked to the op before it that the copy holds, so that one lost from the copy cannot hold
/// the others back.
pub fn rebuild(meta: CopyMeta, mut copied: Vec<CopiedOp>, now: Millis) -> Rebuilt {
    copied.sort_by_key(|c| c.op.seq);
    copied.dedup_by_key(|c| c.op.seq);
    let mut tails: Vec<(String, u64)> = Vec::new();
    let mut ops = Vec::with_capacity(copied.len());
    let mut keys = Vec::new();
    let mut counters = Counters {
        next_seq: meta.next_seq,
        pending: 0,
        bytes: 0,
    };
    for CopiedOp { op, key } in copied {
        let mut op = Op {
            attempts: 0,
            failures: 0,
            last_error: None,
            solo: false,
            last_delay_ms: None,
            ..op
        };
        let tail = op
            .entity
            .as_ref()
            .and_then(|e| tails.iter_mut().find(|(entity, _)| entity == e));
        match tail {
            Some((_, before)) => {
                op.prev = *before;
                op.next_attempt_at = None;
                *before = op.seq;
            }
            None => {
                op.next_attempt_at = Some(now);
                if let Some(entity) = &op.entity {
                    tails.push((entity.clone(), op.seq));
                }
            }
        }
        counters.next_seq = counters.next_seq.max(op.seq + 1);
        counters.pending += 1;
        counters.bytes += op.size();
        keys.extend(key);
        ops.push(op);
    }
    let missing = meta.pending.saturating_sub(counters.pending);
    Rebuilt {
        client: meta.client,
        counters,
        ops,
        keys,
        missing,
    }
}

/// What the application is told when a context found the database lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum IncidentCode {
    /// The database was lost and the queue rebuilt from the copy.
    StorageRecovered,
    /// The database was lost and (some of) its pending ops with it.
    StorageLost,
}

/// The last time a context found the database lost, kept in the database (and shown by
/// `stats()`) so the application can tell its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct Incident {
    /// What happened.
    pub code: IncidentCode,
    /// When it was found.
    pub at: Millis,
    /// Pending ops rebuilt from the copy.
    pub recovered: u64,
    /// Pending ops the copy's record counted and it did not hold: lost.
    pub lost: u64,
}

impl Incident {
    /// The incident a rebuild makes: recovered, unless the copy lacked some of what was pending.
    pub fn of_rebuild(rebuilt: &Rebuilt, at: Millis) -> Incident {
        Incident {
            code: match rebuilt.missing {
                0 => IncidentCode::StorageRecovered,
                _ => IncidentCode::StorageLost,
            },
            at,
            recovered: rebuilt.ops.len() as u64,
            lost: rebuilt.missing,
        }
    }

    /// The incident of a copy whose queue is gone ([`Start::Orphaned`]).
    pub fn of_orphan(meta: &CopyMeta, at: Millis) -> Incident {
        Incident {
            code: IncidentCode::StorageLost,
            at,
            recovered: 0,
            lost: meta.pending,
        }
    }

    /// The message of its `error` event.
    pub fn message(&self) -> String {
        match self.code {
            IncidentCode::StorageRecovered => format!(
                "the browser dropped the queue's database; {} pending ops were rebuilt from the second copy",
                self.recovered
            ),
            IncidentCode::StorageLost => format!(
                "the browser dropped the queue's database; {} pending ops could not be recovered ({} were)",
                self.lost, self.recovered
            ),
        }
    }
}

/// The copy's entry name for an op.
pub fn op_entry(seq: u64) -> String {
    format!("op:{seq}")
}

/// The copy's entry name for its [`CopyMeta`].
pub const META_ENTRY: &str = "meta";

/// The `seq` an entry name is for, if it is an op's.
pub fn entry_seq(name: &str) -> Option<u64> {
    name.strip_prefix("op:")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::op::Priority;

    fn op(seq: u64, prev: u64, entity: Option<&str>) -> Op {
        Op {
            id: OpId::from_random_bytes([seq as u8; 16]),
            seq,
            prev,
            entity: entity.map(str::to_owned),
            kind: "comment".into(),
            payload: "{}".into(),
            base_version: None,
            priority: Priority::User,
            created_at: 5,
            attempts: 7,
            failures: 2,
            next_attempt_at: Some(99),
            last_error: Some("boom".into()),
            solo: true,
            last_delay_ms: Some(3),
        }
    }

    fn copied(op: Op) -> CopiedOp {
        CopiedOp { op, key: None }
    }

    fn meta(next_seq: u64, pending: u64) -> CopyMeta {
        CopyMeta {
            client: OpId::from_random_bytes([0xC1; 16]),
            next_seq,
            pending,
        }
    }

    #[test]
    fn start_trusts_a_matching_database_and_rebuilds_only_a_lost_one() {
        let m = meta(10, 3);
        let other = OpId::from_random_bytes([2; 16]);
        assert_eq!(start(None, None), Start::Fresh);
        assert_eq!(start(Some(m.client), None), Start::Seed);
        assert_eq!(start(Some(m.client), Some(m)), Start::Intact);
        assert_eq!(start(None, Some(m)), Start::Rebuild(m));
        assert_eq!(start(Some(other), Some(m)), Start::Orphaned(m));
    }

    #[test]
    fn a_rebuilt_queue_keeps_ids_seqs_and_order_and_starts_every_entity_head_over() {
        let ops = vec![
            copied(op(7, 3, Some("a"))),
            copied(op(9, 7, Some("a"))),
            copied(op(8, 0, None)),
            copied(op(12, 9, Some("a"))),
            copied(op(11, 0, Some("b"))),
        ];
        let rebuilt = rebuild(meta(13, 5), ops.clone(), 1_000);
        let seqs: Vec<u64> = rebuilt.ops.iter().map(|o| o.seq).collect();
        assert_eq!(seqs, [7, 8, 9, 11, 12]);
        let by_seq = |s: u64| rebuilt.ops.iter().find(|o| o.seq == s).unwrap();
        assert_eq!(
            (by_seq(7).prev, by_seq(7).next_attempt_at),
            (3, Some(1_000)),
            "head keeps prev"
        );
        assert_eq!((by_seq(9).prev, by_seq(9).next_attempt_at), (7, None));
        assert_eq!((by_seq(12).prev, by_seq(12).next_attempt_at), (9, None));
        assert_eq!(
            by_seq(8).next_attempt_at,
            Some(1_000),
            "unordered ops are due"
        );
        assert_eq!(by_seq(11).next_attempt_at, Some(1_000));
        for rebuilt_op in &rebuilt.ops {
            let original = &ops.iter().find(|c| c.op.seq == rebuilt_op.seq).unwrap().op;
            assert_eq!(
                rebuilt_op.id, original.id,
                "same id: the server deduplicates"
            );
            assert_eq!((rebuilt_op.attempts, rebuilt_op.failures), (0, 0));
            assert_eq!(
                (rebuilt_op.last_error.as_ref(), rebuilt_op.solo),
                (None, false)
            );
        }
        assert_eq!(rebuilt.counters.pending, 5);
        assert_eq!(rebuilt.counters.next_seq, 13);
        assert_eq!(
            rebuilt.counters.bytes,
            rebuilt.ops.iter().map(Op::size).sum::<u64>()
        );
        assert_eq!(rebuilt.missing, 0);
    }

    #[test]
    fn an_op_missing_from_the_copy_holds_none_back_and_is_counted() {
        // seq 9 was pending (the record says 3) but its copy was lost.
        let ops = vec![copied(op(7, 0, Some("a"))), copied(op(12, 9, Some("a")))];
        let rebuilt = rebuild(meta(13, 3), ops, 0);
        let last = rebuilt.ops.iter().find(|o| o.seq == 12).unwrap();
        assert_eq!(
            last.prev, 7,
            "linked to the op before it that the copy holds"
        );
        assert_eq!(rebuilt.missing, 1);
    }

    #[test]
    fn a_rebuild_is_reported_recovered_unless_ops_were_missing() {
        let whole = rebuild(meta(8, 1), vec![copied(op(7, 0, None))], 0);
        let incident = Incident::of_rebuild(&whole, 42);
        assert_eq!(
            (
                incident.code,
                incident.at,
                incident.recovered,
                incident.lost
            ),
            (IncidentCode::StorageRecovered, 42, 1, 0)
        );
        assert!(
            incident.message().contains("1 pending ops were rebuilt"),
            "{}",
            incident.message()
        );
        let short = rebuild(meta(8, 3), vec![copied(op(7, 0, None))], 0);
        let incident = Incident::of_rebuild(&short, 42);
        assert_eq!(
            (incident.code, incident.lost),
            (IncidentCode::StorageLost, 2)
        );
        assert!(
            incident
                .message()
                .contains("2 pending ops could not be recovered")
        );
        let orphan = Incident::of_orphan(&meta(8, 5), 9);
        assert_eq!(
            (orphan.code, orphan.recovered, orphan.lost),
            (IncidentCode::StorageLost, 0, 5)
        );
        assert!(CopyWrite::default().is_empty());
        assert!(
            !CopyWrite {
                remove: vec![1],
                ..CopyWrite::default()
            }
            .is_empty()
        );
    }

    #[test]
    fn the_next_seq_never_goes_back_below_what_the_copy_saw() {
        let rebuilt = rebuild(meta(500, 0), vec![copied(op(7, 0, None))], 0);
        assert_eq!(
            rebuilt.counters.next_seq, 500,
            "seqs up to 499 may be on the server"
        );
        let rebuilt = rebuild(meta(3, 1), vec![copied(op(7, 0, None))], 0);
        assert_eq!(rebuilt.counters.next_seq, 8);
    }

    #[test]
    fn later_copy_writes_override_earlier_ones() {
        let mut first = CopyWrite {
            put: vec![copied(op(1, 0, None))],
            remove: vec![2],
            counters: None,
        };
        first.extend(CopyWrite {
            put: vec![copied(op(2, 0, None))],
            remove: vec![1],
            counters: Some(Counters::default()),
        });
        assert_eq!(first.put.iter().map(|c| c.op.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(first.remove, [1]);
        assert!(first.counters.is_some());
        assert_eq!(entry_seq(&op_entry(42)), Some(42));
        assert_eq!(entry_seq(META_ENTRY), None);
    }
}
