#![cfg(not(target_arch = "wasm32"))]
//! Scenario tests of the drainer: each drives the core through the simulation harness
//! (`tests/sim`), against the simulated server, on the fake clock, and names the behaviour it
//! proves. The harness checks its invariants after every step as well (store counters and heads,
//! one op per entity in flight, `next_wake`, backoff bounds, the ledger).

mod sim;

use outbox::core::config::RetryLimits;
use outbox::core::time::{MINUTE, SECOND};
use outbox::core::{
    Breaker, Config, ConflictOutcome, ConflictPolicy, DeadCause, Event, KindPolicy, Op, OpId,
    Priority, Refusal, Resolution, SendMode,
};
use sim::{Ending, Fault, Outcome, POISON_KIND, RetryAfterForm, Sim, draft};

fn with_kind(mut config: Config, kind: &str, conflict: ConflictPolicy, coalesce: bool) -> Config {
    config
        .kinds
        .insert(kind.into(), KindPolicy { conflict, coalesce });
    config
}

/// A breaker that never opens: an open breaker looks at no op until a probe succeeds, so ops
/// would not expire while the server is down.
fn breaker_never_opens(mut config: Config) -> Config {
    config.breaker.window = 64;
    config.breaker.min_calls = 64;
    config
}

fn stored(sim: &Sim, seq: u64) -> Op {
    sim.store
        .ops()
        .find(|op| op.seq == seq)
        .cloned()
        .unwrap_or_else(|| panic!("seq {seq} is not queued"))
}

fn retry_delays(sim: &Sim) -> Vec<u64> {
    sim.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RetryScheduled { delay_ms, .. } => Some(*delay_ms),
            _ => None,
        })
        .collect()
}

fn delivered(sim: &Sim, id: OpId) -> Option<bool> {
    sim.events.iter().find_map(|(_, e)| match e {
        Event::Delivered {
            id: i, duplicate, ..
        } if *i == id => Some(*duplicate),
        _ => None,
    })
}

/// The ops of every request sent, as (seq, id, prev) per request.
fn requests(sim: &Sim) -> Vec<Vec<(u64, OpId, u64)>> {
    sim.sent
        .iter()
        .map(|(_, ops)| ops.iter().map(|o| (o.seq, o.id, o.prev)).collect())
        .collect()
}

/// Follows wake-ups and delivers until `done` holds, at most `rounds` times.
fn run_until(sim: &mut Sim, rounds: usize, mut done: impl FnMut(&Sim) -> bool) {
    for _ in 0..rounds {
        if done(sim) {
            return;
        }
        if !sim.flights.is_empty() {
            sim.deliver_all();
        } else if !sim.advance_to_next_wake() {
            break;
        }
    }
    if !done(sim) {
        sim.fail(&format!("condition not reached in {rounds} rounds"));
    }
}

#[test]
fn dead_letter_does_not_block_entity() {
    let mut sim = Sim::new(Config::default(), 1);
    // Valid JSON but not an object: the server rejects it, for good.
    let bad = sim.enqueue(draft(Some("pr/1"), "comment", "[1]")).unwrap();
    let next = sim
        .enqueue(draft(Some("pr/1"), "comment", r#"{"ok":true}"#))
        .unwrap();
    let waiting = stored(&sim, next.seq);
    assert_eq!(waiting.prev, bad.seq, "it depends on the op before it");
    assert_eq!(waiting.next_attempt_at, None, "only the head is due");

    sim.deliver_all();

    let letter = sim.store.dead_letters().next().expect("a dead letter");
    assert_eq!(letter.op.id, bad.id);
    assert_eq!(letter.cause, DeadCause::Rejected);
    assert_eq!(letter.reason, "payload must be a JSON object");
    assert!(sim.events.iter().any(
        |(_, e)| matches!(e, Event::DeadLettered { id, reason, .. } if *id == bad.id && !reason.is_empty())
    ));
    // The next op was relinked past the dead letter and took effect.
    let sent_next = requests(&sim).concat();
    assert!(sent_next.contains(&(next.seq, next.id, 0)));
    assert_eq!(sim.applied_seqs(), vec![next.seq]);
    assert_eq!(delivered(&sim, next.id), Some(false));
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn retry_after_is_a_floor_on_backoff() {
    let config = Config {
        max_retry_after_ms: MINUTE,
        ..Config::default()
    };
    let mut sim = Sim::new(config, 2);
    sim.script.extend([
        Fault::Busy(429, RetryAfterForm::Seconds(7)),
        Fault::Busy(503, RetryAfterForm::DateIn(12)),
        Fault::Busy(429, RetryAfterForm::Seconds(3_600)),
    ]);
    let op = sim
        .enqueue(draft(Some("pr/1"), "comment", r#"{"a":1}"#))
        .unwrap();

    // 429 with delta-seconds: the jitter window after one attempt is 200 ms, the floor 7 s.
    sim.deliver_all();
    assert_eq!(retry_delays(&sim), [7_000]);
    sim.advance(6_999);
    assert!(sim.flights.is_empty(), "sent before Retry-After passed");
    sim.advance(1);
    assert_eq!(sim.flights.len(), 1);

    // 503 with an HTTP date 12 s ahead (whole seconds, rounded up: 12 to 13 s from now).
    sim.deliver_all();
    let date_delay = retry_delays(&sim)[1];
    assert!(
        (12_000..=13_000).contains(&date_delay),
        "delay {date_delay}"
    );
    assert!(sim.advance_to_next_wake());

    // An hour is clamped to max_retry_after.
    sim.deliver_all();
    assert_eq!(retry_delays(&sim)[2], MINUTE);
    // Busy answers do not count toward max_attempts.
    assert_eq!(stored(&sim, op.seq).failures, 0);
    assert_eq!(stored(&sim, op.seq).attempts, 3);

    assert!(sim.advance_to_next_wake());
    sim.deliver_all();
    assert_eq!(delivered(&sim, op.id), Some(false));
    assert_eq!(sim.applied_seqs(), [op.seq]);
}

#[test]
fn unauthorized_pauses_queue_until_auth_renewed() {
    let mut sim = Sim::new(Config::default(), 3);
    sim.server.auth_ok = false;
    let a = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    let b = sim.enqueue(draft(None, "comment", "{}")).unwrap();
    sim.deliver_all();

    assert_eq!(sim.events_named("auth-required").len(), 1);
    assert!(sim.store.paused);
    assert_eq!(sim.next_wake(), None, "only renewal can resume");
    let sends = sim.sent.len();
    sim.advance(10 * MINUTE);
    let c = sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    assert_eq!(sim.sent.len(), sends, "nothing is sent while paused");

    // The pause survives a restart: it is persisted.
    sim.restart();
    assert!(sim.store.paused);
    assert_eq!(sim.sent.len(), sends);

    sim.renew_auth();
    sim.deliver_all();
    assert!(!sim.store.paused);
    let mut applied = sim.applied_seqs();
    applied.sort();
    assert_eq!(applied, [a.seq, b.seq, c.seq]);
    // 401 is not a server failure: it counts toward nothing.
    assert!(sim.events_named("dead-lettered").is_empty());
}

#[test]
fn stale_401_after_renewal_does_not_pause_again() {
    let mut sim = Sim::new(Config::default(), 4);
    sim.server.auth_ok = false;
    sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    assert_eq!(sim.flights.len(), 2);
    // Both reach the server with the old token; the answers come back one by one.
    sim.arrive(0);
    sim.arrive(1);
    sim.respond(0);
    assert!(sim.store.paused);
    sim.renew_auth();
    // The second 401 refused the old token, which is already replaced.
    sim.respond(0);
    assert!(!sim.store.paused, "a stale 401 paused the queue again");
    assert_eq!(sim.events_named("auth-required").len(), 1);
    assert!(sim.run_until_quiet(100));
    assert_eq!(sim.applied_seqs().len(), 2);
}

#[test]
fn client_wins_rebases_with_new_id_and_same_seq() {
    let config = with_kind(
        Config::default(),
        "title",
        ConflictPolicy::ClientWins,
        false,
    );
    let mut sim = Sim::new(config, 5);
    sim.other_user_edits("pr/1");
    let mut seen_v0 = draft(Some("pr/1"), "title", r#"{"title":"mine"}"#);
    seen_v0.base_version = Some(0);
    let op = sim.enqueue(seen_v0).unwrap();
    sim.deliver_all();

    let rebased = sim
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Conflict {
                id,
                resolution: ConflictOutcome::Rebased,
                rebased_as,
                server_version,
                ..
            } if *id == op.id => {
                assert_eq!(*server_version, Some(1));
                *rebased_as
            }
            _ => None,
        })
        .expect("a rebase");
    assert_ne!(rebased, op.id);
    // Same seq and prev, new id, new base version.
    let sends: Vec<&Op> = sim.sent.iter().flat_map(|(_, ops)| ops).collect();
    assert_eq!(sends.len(), 2);
    assert_eq!((sends[0].seq, sends[0].id), (op.seq, op.id));
    assert_eq!((sends[1].seq, sends[1].id), (op.seq, rebased));
    assert_eq!(sends[1].prev, sends[0].prev);
    assert_eq!(sends[1].base_version, Some(1));
    // The old id keeps its stored conflict; the copy took effect once.
    assert_eq!(
        sim.server.stored(sim.client, op.id),
        Some(&Outcome::Conflict { version: 1 })
    );
    assert_eq!(sim.applied_seqs(), [op.seq]);
    assert_eq!(sim.server.version("pr/1"), 2);
    assert_eq!(delivered(&sim, rebased), Some(false));
}

#[test]
fn manual_conflict_parks_and_keep_mine_requeues() {
    let config = with_kind(Config::default(), "approve", ConflictPolicy::Manual, false);
    let mut sim = Sim::new(config, 6);
    sim.other_user_edits("pr/1");
    let mut approve = draft(Some("pr/1"), "approve", r#"{"approved":true}"#);
    approve.base_version = Some(0);
    let parked = sim.enqueue(approve.clone()).unwrap();
    let other = sim
        .enqueue(draft(Some("pr/2"), "approve", r#"{"approved":true}"#))
        .unwrap();
    sim.deliver_all();

    let conflict = sim.store.conflicts().next().expect("parked").clone();
    assert_eq!(conflict.op.id, parked.id);
    assert_eq!(conflict.server_version, Some(1));
    assert!(conflict.server_state.as_deref().unwrap().contains('1'));
    assert!(sim.events.iter().any(|(_, e)| matches!(
        e,
        Event::Conflict { id, resolution: ConflictOutcome::Parked, .. } if *id == parked.id
    )));
    assert_eq!(sim.applied_seqs(), [other.seq], "nothing else waits for it");

    let mine = sim
        .resolve(parked.id, Resolution::KeepMine)
        .unwrap()
        .expect("keep-mine queues it again");
    assert_ne!(mine.id, parked.id, "the old id has a stored conflict");
    assert!(mine.seq > parked.seq);
    assert_eq!(stored(&sim, mine.seq).base_version, Some(1));
    assert_eq!(sim.store.conflicts().count(), 0);
    sim.deliver_all();
    assert_eq!(delivered(&sim, mine.id), Some(false));
    assert_eq!(sim.applied_seqs(), [other.seq, mine.seq]);

    // Take-theirs drops it.
    sim.other_user_edits("pr/1");
    approve.base_version = Some(2);
    let again = sim.enqueue(approve).unwrap();
    sim.deliver_all();
    assert_eq!(sim.store.conflicts().count(), 1);
    assert_eq!(sim.resolve(again.id, Resolution::TakeTheirs).unwrap(), None);
    assert_eq!(sim.store.conflicts().count(), 0);
    assert!(sim.store.ops().next().is_none());
    assert_eq!(sim.applied_seqs(), [other.seq, mine.seq]);
}

#[test]
fn breaker_opens_after_ten_failed_calls_and_probe_closes_it() {
    let mut sim = Sim::new(Config::default(), 7);
    sim.script.extend([Fault::Status(500); 10]);
    let mut background = draft(Some("pr/1"), "comment", "{}");
    background.priority = Priority::Background;
    let op = sim.enqueue(background).unwrap();
    run_until(&mut sim, 100, |s| !s.store.breaker.is_closed());

    assert_eq!(sim.sent.len(), 10, "opens on the tenth failed call");
    let opened_at = sim.now;
    assert!(matches!(
        sim.events.last(),
        Some((_, Event::BreakerOpened { until })) if *until == opened_at + 30 * SECOND
    ));
    assert!(matches!(sim.store.breaker, Breaker::Open { .. }));
    assert_eq!(sim.next_wake(), Some(opened_at + 30 * SECOND));

    // Nothing goes out while open, not even for a new op.
    sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    sim.advance(30 * SECOND - 1);
    assert_eq!((sim.sent.len(), sim.stats.probes), (10, 0));

    // A failed probe opens it again, for half the outage so far but at least the first opening.
    sim.server.down = true;
    sim.advance(1);
    assert_eq!(sim.stats.probes, 1);
    assert_eq!(sim.next_wake(), Some(sim.now + 30 * SECOND));
    assert_eq!(sim.sent.len(), 10);

    // A healthy probe closes it, and delivery resumes.
    sim.server.down = false;
    assert!(sim.advance_to_next_wake());
    assert_eq!(sim.stats.probes, 2);
    assert_eq!(sim.events_named("breaker-closed").len(), 1);
    assert!(sim.store.breaker.is_closed());
    sim.deliver_all();
    assert_eq!(delivered(&sim, op.id), Some(false));
    assert_eq!(sim.applied_seqs().len(), 2);
}

#[test]
fn attempt_is_leased_before_send_so_restart_resends() {
    let config = Config::default();
    let timeout = config.request_timeout_ms;
    let mut sim = Sim::new(config, 8);
    let op = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    assert_eq!(sim.flights.len(), 1);
    // The attempt is in the store before the request goes out.
    let leased = stored(&sim, op.seq);
    assert_eq!(leased.attempts, 1);
    let lease = leased.next_attempt_at.unwrap();
    assert!(lease >= sim.now + 2 * timeout);

    // The worker dies before the request reaches the server.
    sim.restart();
    assert!(sim.flights.is_empty());
    assert_eq!(sim.next_wake(), Some(lease));
    sim.advance(lease - sim.now - 1);
    assert!(sim.flights.is_empty(), "resent before the lease ended");
    sim.advance(1);
    assert_eq!(sim.flights.len(), 1);
    assert_eq!(stored(&sim, op.seq).attempts, 2);

    // This time it reaches the server and the worker dies before the answer.
    sim.arrive(0);
    sim.restart();
    assert!(sim.advance_to_next_wake());
    sim.deliver_all();
    assert_eq!(delivered(&sim, op.id), Some(true), "the resend is a replay");
    assert_eq!(sim.applied_seqs(), [op.seq], "applied once");
    assert_eq!(sim.sent.len(), 3);
}

#[test]
fn whole_batch_400_isolates_the_bad_op() {
    let config = Config {
        max_in_flight: 1,
        ..Config::default()
    };
    let mut sim = Sim::new(config, 9);
    let first = sim.enqueue(draft(None, "comment", "{}")).unwrap();
    // These wait for the request in flight, then go out together.
    let good = sim.enqueue(draft(None, "comment", r#"{"a":1}"#)).unwrap();
    let poison = sim.enqueue(draft(None, POISON_KIND, "{}")).unwrap();
    let also_good = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.deliver_all();

    let requests = requests(&sim);
    let batch: Vec<u64> = requests[1].iter().map(|r| r.0).collect();
    assert_eq!(batch, [good.seq, poison.seq, also_good.seq]);
    assert_eq!(
        sim.server.statuses.get(&400),
        Some(&2),
        "the batch, then the culprit"
    );
    assert!(
        requests[2..].iter().all(|r| r.len() == 1),
        "after the refusal each op goes alone"
    );
    let letter = sim.store.dead_letters().next().unwrap();
    assert_eq!(letter.op.id, poison.id);
    assert_eq!(letter.status, Some(400));
    assert!(letter.reason.starts_with("HTTP 400"), "{}", letter.reason);
    let mut applied = sim.applied_seqs();
    applied.sort();
    assert_eq!(applied, [first.seq, good.seq, also_good.seq]);
    // A whole-request refusal is not the server failing: no failure counted.
    assert!(sim.events_named("retry-scheduled").is_empty());
}

#[test]
fn coalescing_replaces_unsent_tail() {
    let config = with_kind(Config::default(), "title", ConflictPolicy::ServerWins, true);
    let mut sim = Sim::new(config, 10);
    let on_wire = sim
        .enqueue(draft(Some("pr/1"), "title", r#"{"t":1}"#))
        .unwrap();
    assert_eq!(sim.flights.len(), 1, "the head went out at once");
    // The head may be on the wire: it is never replaced.
    let queued = sim
        .enqueue(draft(Some("pr/1"), "title", r#"{"t":2}"#))
        .unwrap();
    assert_eq!(queued.replaced, None);
    // The unsent tail is.
    let newest = sim
        .enqueue(draft(Some("pr/1"), "title", r#"{"t":3}"#))
        .unwrap();
    assert_eq!(newest.replaced, Some(queued.id));
    assert_eq!(stored(&sim, newest.seq).prev, on_wire.seq);
    assert_eq!(sim.store.counters_record().pending, 2);
    // Another kind is not merged.
    let comment = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    assert_eq!(comment.replaced, None);
    let after_comment = sim
        .enqueue(draft(Some("pr/1"), "title", r#"{"t":4}"#))
        .unwrap();
    assert_eq!(
        after_comment.replaced, None,
        "only the tail, and only of its kind"
    );

    sim.deliver_all();
    assert_eq!(
        sim.applied_seqs(),
        [on_wire.seq, newest.seq, comment.seq, after_comment.seq]
    );
    assert!(
        !sim.sent_seqs().contains(&queued.seq),
        "the replaced op never left"
    );
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn queue_full_and_op_too_large_refuse_without_queuing() {
    let mut config = Config::default();
    config.limits.max_pending = 2;
    config.limits.max_op_bytes = 400;
    config.limits.max_bytes = 800;
    let mut sim = Sim::new(config, 11);
    sim.server.down = true;
    sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    let before = sim.store.counters_record();

    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(400));
    assert!(matches!(
        sim.enqueue(draft(Some("pr/1"), "comment", &big)),
        Err(Refusal::OpTooLarge { max: 400, .. })
    ));
    assert_eq!(sim.store.counters_record(), before);

    // 1 op of about 200 bytes is queued; another 350-byte one would pass 800 bytes... not yet.
    let medium = format!(r#"{{"text":"{}"}}"#, "x".repeat(180));
    sim.enqueue(draft(None, "comment", &medium)).unwrap();
    assert!(matches!(
        sim.enqueue(draft(None, "comment", "{}")),
        Err(Refusal::QueueFull {
            limit: "maxPending",
            max: 2
        })
    ));
    assert_eq!(sim.store.counters_record().pending, 2);
    assert_eq!(sim.store.ops().count(), 2);

    let mut config = Config::default();
    config.limits.max_op_bytes = 400;
    config.limits.max_bytes = 500;
    let mut sim = Sim::new(config, 12);
    sim.server.down = true;
    sim.enqueue(draft(None, "comment", &medium)).unwrap();
    assert!(matches!(
        sim.enqueue(draft(None, "comment", &medium)),
        Err(Refusal::QueueFull {
            limit: "maxBytes",
            max: 500
        })
    ));
    assert_eq!(sim.store.ops().count(), 1);
    assert_eq!(sim.stats.refused, 1);
}

#[test]
fn expired_op_becomes_dead_letter() {
    let config = Config {
        user: RetryLimits {
            max_attempts: 8,
            max_age_ms: 10 * MINUTE,
        },
        ..Config::default()
    };
    let mut sim = Sim::new(breaker_never_opens(config), 13);
    sim.server.down = true;
    let doomed = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    let mut lasting = draft(Some("pr/1"), "comment", r#"{"b":1}"#);
    lasting.priority = Priority::Background;
    let lasting = sim.enqueue(lasting).unwrap();
    // Unreachable does not count toward max_attempts: only age ends it.
    run_until(&mut sim, 10_000, |s| {
        !s.events_named("dead-lettered").is_empty()
    });

    let letter = sim.store.dead_letters().next().unwrap();
    assert_eq!(letter.op.id, doomed.id);
    assert_eq!(letter.cause, DeadCause::Expired);
    assert!(letter.reason.contains("expired"), "{}", letter.reason);
    assert!(sim.now >= letter.op.created_at + 10 * MINUTE);
    assert!(letter.op.attempts > 8, "more attempts than max_attempts");
    let deadline = letter.op.created_at + 10 * MINUTE;
    assert!(
        sim.sent
            .iter()
            .filter(|(_, ops)| ops.iter().any(|o| o.id == doomed.id))
            .all(|(at, _)| *at < deadline),
        "sent after it expired"
    );
    // Its successor is relinked past it and delivered once the server is back.
    assert_eq!(stored(&sim, lasting.seq).prev, 0);
    sim.server.down = false;
    sim.wake(outbox::core::WakeReason::Online);
    assert!(sim.run_until_quiet(1_000));
    assert_eq!(sim.applied_seqs(), [lasting.seq]);
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn ack_lost_after_commit_is_absorbed_as_duplicate() {
    let mut sim = Sim::new(Config::default(), 14);
    sim.script.push_back(Fault::LostAck);
    let op = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.deliver_all();
    assert_eq!(sim.applied_seqs(), [op.seq], "the server committed");
    assert_eq!(
        retry_delays(&sim).len(),
        1,
        "the client saw a network error"
    );
    assert!(sim.advance_to_next_wake());
    sim.deliver_all();
    assert_eq!(delivered(&sim, op.id), Some(true));
    assert_eq!(sim.applied_seqs(), [op.seq], "and not twice");
}

#[test]
fn duplicate_delivery_and_late_copies_apply_once() {
    let mut sim = Sim::new(Config::default(), 15);
    sim.rates.ghost = 1.0;
    sim.script.push_back(Fault::Duplicate);
    let a = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.deliver_all();
    // The next one times out before it arrives: its copy is still in the network.
    let b = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.advance(sim.config.request_timeout_ms);
    assert_eq!(sim.ghosts.len(), 1);
    assert!(sim.advance_to_next_wake());
    sim.deliver_all();
    sim.ghost_arrives(0);
    assert_eq!(sim.applied_seqs(), [a.seq, b.seq]);
    assert_eq!(delivered(&sim, b.id), Some(false));
}

#[test]
fn retried_dead_letter_is_not_delivered_by_a_stale_duplicate() {
    let config = Config {
        user: RetryLimits {
            max_attempts: 8,
            max_age_ms: MINUTE,
        },
        ..Config::default()
    };
    let mut sim = Sim::new(breaker_never_opens(config), 16);
    sim.rates.ghost = 1.0;
    let lost = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    // Its request times out before it arrives, and a copy stays in the network.
    sim.advance(sim.config.request_timeout_ms);
    assert_eq!(sim.ghosts.len(), 1);
    sim.rates.ghost = 0.0;
    sim.server.down = true;
    run_until(&mut sim, 1_000, |s| s.store.dead_letters().count() == 1);
    sim.server.down = false;
    // The next op on the entity is relinked past the dead letter and takes effect.
    let next = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    assert!(sim.run_until_quiet(1_000));
    assert_eq!(sim.applied_seqs(), [next.seq]);
    // The late copy arrives: its seq is below the entity's last, the server stores `duplicate`.
    sim.ghost_arrives(0);
    assert!(matches!(
        sim.server.stored(sim.client, lost.id),
        Some(Outcome::Duplicate { .. })
    ));

    // Retrying keeps the id (cause expired); the server replays that `duplicate`.
    let retry = sim.retry_dead_letter(lost.id).unwrap();
    assert_eq!(retry.id, lost.id);
    sim.deliver_all();
    assert_eq!(
        delivered(&sim, lost.id),
        None,
        "reported delivered, never applied"
    );
    let letter = sim.store.dead_letters().next().unwrap();
    assert_eq!(letter.cause, DeadCause::Rejected);
    // The next retry gets a new id and takes effect, once.
    let again = sim.retry_dead_letter(lost.id).unwrap();
    assert_ne!(again.id, lost.id);
    sim.deliver_all();
    assert_eq!(delivered(&sim, again.id), Some(false));
    assert_eq!(sim.applied_seqs(), [next.seq, again.seq]);
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn drained_is_emitted_after_the_last_unordered_op() {
    let mut sim = Sim::new(Config::default(), 17);
    sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.enqueue(draft(None, "comment", "{}")).unwrap();
    let mark = sim.events.len();
    // The entity's op is answered first; the unordered one finishes the queue.
    sim.deliver_all();
    assert!(sim.store.ops().next().is_none());
    let names: Vec<&str> = sim.events[mark..].iter().map(|(_, e)| e.name()).collect();
    assert_eq!(names, ["delivered", "delivered", "drained"]);
}

#[test]
fn single_mode_maps_http_statuses() {
    let mut config = Config::default();
    config.batch.mode = SendMode::Single;
    let config = with_kind(config, "approve", ConflictPolicy::Manual, false);
    let config = with_kind(config, "title", ConflictPolicy::ClientWins, false);
    let mut sim = Sim::new(config, 18);

    // 200: applied.
    let ok = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.deliver_all();
    assert_eq!(delivered(&sim, ok.id), Some(false));
    assert_eq!(sim.server.statuses.get(&200), Some(&1));

    // 422 rejected: a dead letter with the server's reason.
    let bad = sim.enqueue(draft(Some("pr/1"), "comment", "[1]")).unwrap();
    sim.deliver_all();
    let letter = sim
        .store
        .dead_letters()
        .find(|d| d.op.id == bad.id)
        .unwrap();
    assert_eq!(letter.status, Some(422));
    assert_eq!(letter.reason, "HTTP 422: payload must be a JSON object");

    // 409 conflict: the kind's policy (manual parks it, client-wins rebases).
    sim.other_user_edits("pr/2");
    let mut stale = draft(Some("pr/2"), "approve", "{}");
    stale.base_version = Some(0);
    let parked = sim.enqueue(stale.clone()).unwrap();
    sim.deliver_all();
    let conflict = sim.store.conflicts().next().unwrap();
    assert_eq!(
        (conflict.op.id, conflict.server_version),
        (parked.id, Some(1))
    );
    stale.kind = "title".into();
    let rebased = sim.enqueue(stale).unwrap();
    sim.deliver_all();
    assert!(sim.events.iter().any(|(_, e)| matches!(
        e,
        Event::Conflict { id, resolution: ConflictOutcome::Rebased, .. } if *id == rebased.id
    )));
    assert_eq!(sim.server.statuses.get(&409), Some(&2));

    // 425, 408, 5xx: retried, counting toward max_attempts; 409 in-progress: retried soon,
    // after its Retry-After: 1; 429 and 503: retried after Retry-After, not counting.
    sim.script.extend([
        Fault::Status(425),
        Fault::Status(408),
        Fault::Status(502),
        Fault::InProgress,
        Fault::Busy(503, RetryAfterForm::DateIn(4)),
    ]);
    let retried = sim.enqueue(draft(Some("pr/3"), "comment", "{}")).unwrap();
    for expected_failures in [1, 2, 3, 3] {
        sim.deliver_all();
        assert_eq!(stored(&sim, retried.seq).failures, expected_failures);
        assert!(sim.advance_to_next_wake());
    }
    assert_eq!(
        retry_delays(&sim)[3],
        1_000,
        "in-progress waits its Retry-After"
    );
    sim.deliver_all();
    let date_floor = retry_delays(&sim)[4];
    // The date has whole seconds, rounded up: 4 s ahead is 4 to 5 s away.
    assert!((4_000..=5_000).contains(&date_floor), "{date_floor}");
    assert!(sim.advance_to_next_wake());
    sim.deliver_all();
    assert_eq!(delivered(&sim, retried.id), Some(false));

    // 401: the queue pauses.
    sim.server.auth_ok = false;
    sim.enqueue(draft(Some("pr/3"), "comment", "{}")).unwrap();
    sim.deliver_all();
    assert!(sim.store.paused);
    sim.renew_auth();
    sim.deliver_all();
    assert!(sim.store.ops().next().is_none());
}

#[test]
fn key_reused_dead_letter_keeps_its_id() {
    let mut config = Config {
        user: RetryLimits {
            max_attempts: 8,
            max_age_ms: MINUTE,
        },
        ..Config::default()
    };
    config.batch.mode = SendMode::Single;
    let mut sim = Sim::new(breaker_never_opens(config), 19);
    // The server commits, the answer is lost, and the server is gone until the op expires.
    sim.script.push_back(Fault::LostAck);
    let op = sim.enqueue(draft(None, "comment", "{}")).unwrap();
    sim.deliver_all();
    assert_eq!(sim.applied_seqs(), [op.seq]);
    sim.server.down = true;
    run_until(&mut sim, 1_000, |s| s.store.dead_letters().count() == 1);
    sim.server.down = false;
    assert_eq!(
        sim.store.dead_letters().next().unwrap().cause,
        DeadCause::Expired
    );

    // The retry keeps the id under a new seq, so a new body: the key was used with another one.
    let retry = sim.retry_dead_letter(op.id).unwrap();
    assert_eq!(retry.id, op.id);
    sim.deliver_all();
    let letter = sim.store.dead_letters().next().unwrap();
    assert_eq!(letter.cause, DeadCause::Ambiguous);
    assert_eq!(letter.status, Some(422));
    // It may have taken effect (here it did): it is never sent under a new id.
    let again = sim.retry_dead_letter(op.id).unwrap();
    assert_eq!(again.id, op.id);
    sim.deliver_all();
    assert_eq!(sim.applied_seqs(), [op.seq], "applied once");
    sim.discard_dead_letter(op.id).unwrap();
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn entity_order_holds_when_answers_come_back_out_of_order() {
    let config = Config {
        max_in_flight: 3,
        ..Config::default()
    };
    let mut sim = Sim::new(config, 20);
    let a1 = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    let b1 = sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    let a2 = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    let b2 = sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    // One op per entity in flight: a1 and b1; a2 and b2 wait for them.
    let in_flight: Vec<u64> = sim
        .flights
        .iter()
        .flat_map(|f| &f.ops)
        .map(|o| o.seq)
        .collect();
    assert_eq!(in_flight, [a1.seq, b1.seq]);
    // The later request is answered first.
    sim.deliver(1);
    assert_eq!(sim.flights.len(), 2, "b2 follows b1 while a1 is still out");
    sim.deliver(0);
    sim.deliver_all();
    assert_eq!(sim.applied_seqs(), [b1.seq, a1.seq, b2.seq, a2.seq]);
}

#[test]
fn coalescing_never_replaces_a_head_the_drainer_holds() {
    let config = Config {
        max_in_flight: 1,
        ..Config::default()
    };
    let config = with_kind(config, "title", ConflictPolicy::ServerWins, true);
    let mut sim = Sim::new(config, 21);
    let other = sim.enqueue(draft(Some("pr/2"), "comment", "{}")).unwrap();
    // The only request slot is taken: the new head waits, unsent, in the drainer's window.
    let head = sim
        .enqueue(draft(Some("pr/1"), "title", r#"{"t":1}"#))
        .unwrap();
    assert_eq!(sim.flights.len(), 1);
    // A popup edits the title twice; the drainer hears of it later. The head is not replaced
    // (the drainer would go on deciding on a copy that no longer exists); the tail is.
    let behind = sim
        .enqueue_elsewhere(draft(Some("pr/1"), "title", r#"{"t":2}"#))
        .unwrap();
    assert_eq!(behind.replaced, None);
    let newest = sim
        .enqueue_elsewhere(draft(Some("pr/1"), "title", r#"{"t":3}"#))
        .unwrap();
    assert_eq!(newest.replaced, Some(behind.id));
    assert_eq!(stored(&sim, newest.seq).prev, head.seq);
    sim.announce();
    sim.deliver_all();
    assert_eq!(sim.stats.vanished, 0, "nothing changed under the drainer");
    assert!(!sim.sent_seqs().contains(&behind.seq));
    assert_eq!(sim.applied_seqs(), [other.seq, head.seq, newest.seq]);
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn a_dead_letter_delivered_by_a_replay_does_not_block_its_entity() {
    let config = Config {
        user: RetryLimits {
            max_attempts: 8,
            max_age_ms: MINUTE,
        },
        ..Config::default()
    };
    let mut sim = Sim::new(breaker_never_opens(config), 23);
    // It takes effect, the answer is lost, and the server is gone until the op expires.
    sim.script.push_back(Fault::LostAck);
    let op = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    sim.deliver_all();
    sim.server.down = true;
    run_until(&mut sim, 1_000, |s| s.store.dead_letters().count() == 1);
    sim.server.down = false;
    // The retry keeps the id under a new seq; the next op waits behind it.
    let retry = sim.retry_dead_letter(op.id).unwrap();
    let next = sim.enqueue(draft(Some("pr/1"), "comment", "{}")).unwrap();
    assert_eq!(stored(&sim, next.seq).prev, retry.seq);
    // The server replays `applied` from the first seq: its `last` never reached the retry's seq,
    // so the next op must be relinked past it (the harness fails on any `out_of_order`).
    sim.deliver_all();
    assert_eq!(delivered(&sim, retry.id), Some(true));
    assert_eq!(sim.server.last(sim.client, "pr/1"), next.seq);
    assert_eq!(sim.applied_seqs(), [op.seq, next.seq]);
    sim.ledger.check_drained(&sim.store).unwrap();
}

#[test]
fn own_queued_changes_never_conflict_only_other_clients_do() {
    let config = with_kind(Config::default(), "approve", ConflictPolicy::Manual, false);
    let mut sim = Sim::new(config, 11);
    // The reviewer read version 0, then commented twice (unversioned) and approved against the
    // version they read; the UI applied the comments at once, before the server did.
    sim.enqueue(draft(Some("pr/1"), "comment", r#"{"a":1}"#))
        .unwrap();
    sim.enqueue(draft(Some("pr/1"), "comment", r#"{"b":2}"#))
        .unwrap();
    let mut approve = draft(Some("pr/1"), "approve", r#"{"approved":true}"#);
    approve.base_version = Some(0);
    let approve = sim.enqueue(approve).unwrap();
    sim.deliver_all();

    assert!(
        sim.store.conflicts().next().is_none(),
        "no conflict with oneself"
    );
    assert_eq!(sim.server.version("pr/1"), 3);
    let sent = sim
        .sent
        .iter()
        .flat_map(|(_, ops)| ops)
        .find(|op| op.id == approve.id);
    assert_eq!(
        sent.unwrap().base_version,
        Some(0),
        "sent as the reviewer read it"
    );

    // Another user's change in between is still a conflict.
    sim.enqueue(draft(Some("pr/2"), "comment", r#"{"a":1}"#))
        .unwrap();
    sim.other_user_edits("pr/2");
    let mut stale = draft(Some("pr/2"), "approve", r#"{"approved":true}"#);
    stale.base_version = Some(0);
    sim.enqueue(stale).unwrap();
    sim.deliver_all();
    assert_eq!(sim.store.conflicts().count(), 1);
}

#[test]
fn a_rebuilt_head_whose_predecessor_was_lost_is_relinked_to_the_servers_last() {
    let mut sim = Sim::new(Config::default(), 41);
    sim.out_of_order_expected = true;
    sim.server.down = true;
    let lost = sim
        .enqueue(draft(Some("pr/1"), "comment", r#"{"a":1}"#))
        .unwrap();
    let kept = sim
        .enqueue(draft(Some("pr/1"), "comment", r#"{"b":1}"#))
        .unwrap();
    sim.deliver_all();
    // The copy write of the first op was lost with a crash, and then the database went.
    sim.forget_in_copy(lost.seq);
    sim.server.down = false;
    sim.lose_database();
    assert_eq!(
        stored(&sim, kept.seq).prev,
        lost.seq,
        "the head keeps its prev"
    );
    run_until(&mut sim, 50, |s| delivered(s, kept.id).is_some());
    assert_eq!(
        sim.server.out_of_order, 1,
        "answered out_of_order once, then relinked"
    );
    assert_eq!(sim.applied_seqs(), [kept.seq]);
    assert_eq!(sim.ledger.entry(lost.id).ending, Some(Ending::Lost));
}
