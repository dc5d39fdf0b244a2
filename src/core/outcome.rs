//! What a reply means for each op it carried: the outcome table of docs/DELIVERY.md.

use super::config::SendMode;
use super::op::Op;
use super::retry_after::parse_retry_after;
use super::time::Millis;
use super::wire::{self, OpResult, Problem, ResultStatus};

/// What came back for a request, as the shell saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No HTTP answer: a network error, an abort or a timeout.
    Unreachable {
        /// What the browser said, for the op's `last_error`.
        reason: String,
    },
    /// Nothing was sent: the application's auth hook gave no usable credentials (it threw,
    /// timed out, or returned something that is not headers). Treated like a `401`: the queue
    /// pauses until the hook gives credentials, and the server's health is not in question.
    NoCredentials {
        /// Why, without the hook's own words (they may quote a secret).
        reason: String,
    },
    /// An HTTP answer.
    Http {
        /// The status code.
        status: u16,
        /// The raw `Retry-After` header, if any.
        retry_after: Option<String>,
        /// The body text.
        body: String,
    },
}

/// What to do with one op after a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It took effect (now, or earlier for a duplicate).
    Done {
        /// The entity version the server reported.
        version: Option<u64>,
        /// Whether an earlier copy had already taken effect.
        duplicate: bool,
    },
    /// Send it again later.
    Retry {
        /// Whether this counts toward `max_attempts` (the server failed, rather than being
        /// unreachable or busy).
        counts: bool,
        /// The least wait, from `Retry-After`.
        floor: Millis,
        /// Retry after a short fixed window instead of the growing backoff (`in_progress`).
        soon: bool,
        /// Why, for the op's `last_error`.
        error: String,
    },
    /// The server has a newer version of the entity.
    Conflict {
        /// The server's current version.
        version: Option<u64>,
        /// The server's current state, as JSON text.
        state: Option<String>,
        /// The server left the state out of its answer (see PROTOCOL.md, *Conflict states*).
        state_omitted: bool,
    },
    /// It can never succeed.
    Dead {
        /// Why, for the caller.
        reason: String,
        /// The HTTP status, if the server answered.
        status: Option<u16>,
    },
    /// The server has a final answer for this id that it will not show (`422 key-reused`): it
    /// may have taken effect, so it must never be sent under a new id.
    Ambiguous {
        /// Why, for the caller.
        reason: String,
    },
    /// The credentials were refused (or there were none): hold the whole queue until they are
    /// renewed.
    Pause {
        /// Why, for the op's `last_error`.
        reason: String,
    },
    /// A multi-op request was refused as a whole: send each op alone to find the culprit.
    Isolate,
    /// The server has not applied the op's predecessor (`prev`): it answered `out_of_order` (or
    /// `425`) with the last `seq` it applied on the entity.
    OutOfOrder {
        /// The server's last applied `seq` on the entity, when it said.
        last: Option<u64>,
        /// Why, for the op's `last_error`.
        error: String,
    },
}

/// The verdicts for a request, one per op in order, and whether the breaker counts it a success.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// One verdict per op, in the order the ops were sent.
    pub verdicts: Vec<Verdict>,
    /// Whether the server looked healthy (for the circuit breaker).
    pub healthy: bool,
}

/// Applies the outcome table to a reply. `max_retry_after` clamps the `Retry-After` floor.
pub fn classify(
    mode: SendMode,
    ops: &[Op],
    reply: &Reply,
    now: Millis,
    max_retry_after: Millis,
) -> Classified {
    let all = |verdict: Verdict| vec![verdict; ops.len()];
    let (status, retry_after, body) = match reply {
        Reply::Unreachable { reason } => {
            return Classified {
                verdicts: all(retry(false, 0, reason.clone())),
                healthy: false,
            };
        }
        Reply::NoCredentials { reason } => {
            return Classified {
                verdicts: all(Verdict::Pause {
                    reason: reason.clone(),
                }),
                healthy: true,
            };
        }
        Reply::Http {
            status,
            retry_after,
            body,
        } => (*status, retry_after.as_deref(), body.as_str()),
    };
    let floor = retry_after
        .and_then(|value| parse_retry_after(value, now))
        .unwrap_or(0)
        .min(max_retry_after);
    let healthy = !(status >= 500 || status == 408);
    let verdicts = match status {
        200..=299 => match mode {
            SendMode::Batch => match wire::decode_results(body, ops) {
                Ok(results) => results.iter().map(verdict_for_result).collect(),
                Err(why) => all(retry(true, 0, format!("bad response: {why}"))),
            },
            SendMode::Single => match ops {
                [op] => vec![match wire::decode_single(body, op) {
                    Ok(result) => verdict_for_result(&result),
                    Err(why) => retry(true, 0, format!("bad response: {why}")),
                }],
                _ => all(retry(true, 0, "single mode sent several ops".into())),
            },
        },
        401 => all(Verdict::Pause {
            reason: "credentials refused (HTTP 401)".into(),
        }),
        408 => all(retry(true, floor, "HTTP 408 request timeout".into())),
        429 | 503 => all(retry(false, floor, format!("HTTP {status}: busy"))),
        425 => all(Verdict::OutOfOrder {
            last: Problem::decode(body).last,
            error: "HTTP 425: a predecessor has not arrived".into(),
        }),
        409 => {
            let problem = Problem::decode(body);
            if problem.type_name() == Some("in-progress") {
                all(Verdict::Retry {
                    counts: false,
                    floor,
                    soon: true,
                    error: "HTTP 409: the same request is still running".into(),
                })
            } else if ops.len() > 1 {
                all(Verdict::Isolate)
            } else {
                all(Verdict::Conflict {
                    version: problem.version,
                    state: problem.state,
                    state_omitted: problem.state_omitted,
                })
            }
        }
        400..=499 if ops.len() > 1 => all(Verdict::Isolate),
        422 if Problem::decode(body).type_name() == Some("key-reused") => all(Verdict::Ambiguous {
            reason: "HTTP 422: the server holds an answer for this op id from an earlier copy \
                     with another body, and it may have taken effect"
                .into(),
        }),
        400..=499 => {
            let problem = Problem::decode(body);
            let reason = match problem.explanation() {
                Some(why) => format!("HTTP {status}: {why}"),
                None => format!("HTTP {status}"),
            };
            all(Verdict::Dead {
                reason,
                status: Some(status),
            })
        }
        500..=599 => all(retry(true, floor, format!("HTTP {status}: server error"))),
        _ => all(retry(
            true,
            floor,
            format!("HTTP {status}: unexpected status"),
        )),
    };
    Classified { verdicts, healthy }
}

fn retry(counts: bool, floor: Millis, error: String) -> Verdict {
    Verdict::Retry {
        counts,
        floor,
        soon: false,
        error,
    }
}

fn verdict_for_result(result: &OpResult) -> Verdict {
    match result.status {
        // A replayed `applied` means an earlier copy (a lost ack, a beacon) took effect.
        ResultStatus::Applied => Verdict::Done {
            version: result.version,
            duplicate: result.replayed,
        },
        // A stored `duplicate` was given to an earlier copy of this id that carried another `seq`,
        // which arrived after a later op on its entity had taken effect (the client relinked past
        // it when it became a dead letter). That copy never took effect, and no copy with this id
        // ever will: reporting it delivered would lose the write. Only a retried dead letter, which
        // keeps its id under a new `seq`, can meet it; its next retry gets a new id.
        ResultStatus::Duplicate if result.replayed => Verdict::Dead {
            reason:
                "the server answered an earlier copy of this op id as a duplicate after a later \
                     op on its entity took effect; it did not take effect, retry it to send it \
                     under a new id"
                    .into(),
            status: None,
        },
        ResultStatus::Duplicate => Verdict::Done {
            version: result.version,
            duplicate: true,
        },
        ResultStatus::Conflict => Verdict::Conflict {
            version: result.version,
            state: result.state.clone(),
            state_omitted: result.state_omitted,
        },
        ResultStatus::Rejected => Verdict::Dead {
            reason: result
                .reason
                .clone()
                .unwrap_or_else(|| "rejected by the server".into()),
            status: Some(422),
        },
        ResultStatus::OutOfOrder => Verdict::OutOfOrder {
            last: result.last,
            error: "out of order: a predecessor has not arrived".into(),
        },
        ResultStatus::Unknown => retry(true, 0, "bad response: unknown result status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::op::{OpId, Priority};

    fn op(n: u8) -> Op {
        Op {
            id: OpId::from_random_bytes([n; 16]),
            seq: u64::from(n),
            prev: 0,
            entity: None,
            kind: "k".into(),
            payload: "{}".into(),
            base_version: None,
            priority: Priority::User,
            created_at: 0,
            attempts: 1,
            failures: 0,
            next_attempt_at: Some(0),
            last_error: None,
            solo: false,
            last_delay_ms: None,
        }
    }

    fn http(status: u16, retry_after: Option<&str>, body: &str) -> Reply {
        Reply::Http {
            status,
            retry_after: retry_after.map(str::to_owned),
            body: body.to_owned(),
        }
    }

    fn one(status: u16, retry_after: Option<&str>, body: &str) -> (Verdict, bool) {
        let c = classify(
            SendMode::Single,
            &[op(1)],
            &http(status, retry_after, body),
            0,
            60_000,
        );
        (c.verdicts[0].clone(), c.healthy)
    }

    /// The outcome table of DESIGN.md, row by row.
    #[test]
    fn outcome_table_classifies_every_row() {
        let ok_body = format!(r#"{{"id":"{}","status":"applied","version":2}}"#, op(1).id);
        assert_eq!(
            one(200, None, &ok_body),
            (
                Verdict::Done {
                    version: Some(2),
                    duplicate: false
                },
                true
            )
        );
        for status in [500, 502, 504, 408] {
            let (verdict, healthy) = one(status, None, "");
            assert!(
                matches!(
                    verdict,
                    Verdict::Retry {
                        counts: true,
                        soon: false,
                        ..
                    }
                ),
                "{status}"
            );
            assert!(!healthy, "{status}");
        }
        for status in [429, 503] {
            let (verdict, _) = one(status, Some("7"), "");
            assert!(
                matches!(
                    verdict,
                    Verdict::Retry {
                        counts: false,
                        floor: 7_000,
                        ..
                    }
                ),
                "{status}: {verdict:?}"
            );
        }
        let in_progress = r#"{"type":"https://outbox.dev/problems/in-progress"}"#;
        assert!(matches!(
            one(409, None, in_progress).0,
            Verdict::Retry {
                soon: true,
                counts: false,
                ..
            }
        ));
        let conflict =
            r#"{"type":"https://outbox.dev/problems/conflict","version":5,"state":{"x":1}}"#;
        assert_eq!(
            one(409, None, conflict).0,
            Verdict::Conflict {
                version: Some(5),
                state: Some(r#"{"x":1}"#.into()),
                state_omitted: false,
            }
        );
        let replayed =
            r#"{"type":"https://outbox.dev/problems/conflict","version":5,"state_omitted":true}"#;
        assert_eq!(
            one(409, None, replayed).0,
            Verdict::Conflict {
                version: Some(5),
                state: None,
                state_omitted: true,
            }
        );
        assert!(matches!(
            one(
                425,
                None,
                r#"{"type":"https://outbox.dev/problems/out-of-order","last":4}"#
            )
            .0,
            Verdict::OutOfOrder { last: Some(4), .. }
        ));
        assert!(matches!(one(401, None, "").0, Verdict::Pause { .. }));
        for status in [400, 403, 404, 413, 422] {
            assert!(
                matches!(one(status, None, "").0, Verdict::Dead { .. }),
                "{status}"
            );
        }
        let reused = r#"{"type":"https://outbox.dev/problems/key-reused"}"#;
        assert!(matches!(
            one(422, None, reused).0,
            Verdict::Ambiguous { .. }
        ));
        let rejected = r#"{"type":"x/rejected","reason":"payload must be a JSON object"}"#;
        assert_eq!(
            one(422, None, rejected).0,
            Verdict::Dead {
                reason: "HTTP 422: payload must be a JSON object".into(),
                status: Some(422)
            }
        );
    }

    #[test]
    fn unreachable_retries_without_counting_and_marks_unhealthy() {
        let c = classify(
            SendMode::Batch,
            &[op(1), op(2)],
            &Reply::Unreachable {
                reason: "Failed to fetch".into(),
            },
            0,
            1_000,
        );
        assert!(!c.healthy);
        assert!(
            c.verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Retry { counts: false, .. }))
        );
    }

    #[test]
    fn missing_credentials_pause_without_blaming_the_server() {
        let reply = Reply::NoCredentials {
            reason: "the auth hook failed".into(),
        };
        let c = classify(SendMode::Batch, &[op(1), op(2)], &reply, 0, 0);
        assert!(c.healthy, "the breaker must not count it");
        assert!(
            c.verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Pause { .. }))
        );
    }

    #[test]
    fn retry_after_is_clamped_to_the_configured_maximum() {
        let c = classify(
            SendMode::Single,
            &[op(1)],
            &http(429, Some("86400"), ""),
            0,
            60_000,
        );
        assert!(matches!(
            c.verdicts[0],
            Verdict::Retry { floor: 60_000, .. }
        ));
        let date = http(503, Some("Thu, 01 Jan 1970 00:00:10 GMT"), "");
        let c = classify(SendMode::Single, &[op(1)], &date, 4_000, 60_000);
        assert!(matches!(c.verdicts[0], Verdict::Retry { floor: 6_000, .. }));
    }

    #[test]
    fn batch_results_map_per_op_and_bad_bodies_retry() {
        let ops = [op(1), op(2), op(3), op(4)];
        let body = format!(
            r#"{{"results":[{{"id":"{}","status":"duplicate","version":3}},{{"id":"{}","status":"rejected","reason":"no"}},
               {{"id":"{}","status":"out_of_order","last":1}},{{"id":"{}","status":"conflict","version":9,"state_omitted":true}}]}}"#,
            ops[0].id, ops[1].id, ops[2].id, ops[3].id
        );
        let c = classify(SendMode::Batch, &ops, &http(200, None, &body), 0, 0);
        assert_eq!(
            c.verdicts[0],
            Verdict::Done {
                version: Some(3),
                duplicate: true
            }
        );
        assert_eq!(
            c.verdicts[1],
            Verdict::Dead {
                reason: "no".into(),
                status: Some(422)
            }
        );
        assert!(matches!(
            c.verdicts[2],
            Verdict::OutOfOrder { last: Some(1), .. }
        ));
        assert_eq!(
            c.verdicts[3],
            Verdict::Conflict {
                version: Some(9),
                state: None,
                state_omitted: true,
            }
        );
        let c = classify(SendMode::Batch, &ops, &http(200, None, "{}"), 0, 0);
        assert!(
            c.verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Retry { counts: true, .. }))
        );
    }

    #[test]
    fn replayed_applied_is_a_duplicate_and_replayed_duplicate_never_took_effect() {
        let ops = [op(1), op(2), op(3)];
        let body = format!(
            r#"{{"results":[{{"id":"{}","status":"applied","version":3,"replayed":true}},
               {{"id":"{}","status":"duplicate","version":3,"replayed":true}},
               {{"id":"{}","status":"duplicate","version":3}}]}}"#,
            ops[0].id, ops[1].id, ops[2].id
        );
        let c = classify(SendMode::Batch, &ops, &http(200, None, &body), 0, 0);
        assert_eq!(
            c.verdicts[0],
            Verdict::Done {
                version: Some(3),
                duplicate: true
            }
        );
        assert!(matches!(c.verdicts[1], Verdict::Dead { status: None, .. }));
        assert_eq!(
            c.verdicts[2],
            Verdict::Done {
                version: Some(3),
                duplicate: true
            }
        );
    }

    #[test]
    fn whole_batch_refusal_isolates_instead_of_killing_every_op() {
        for status in [400, 413, 422, 409] {
            let c = classify(
                SendMode::Batch,
                &[op(1), op(2)],
                &http(status, None, ""),
                0,
                0,
            );
            assert_eq!(
                c.verdicts,
                vec![Verdict::Isolate, Verdict::Isolate],
                "{status}"
            );
        }
    }
}
