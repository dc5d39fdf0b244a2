//! Bounded answers, bounded states, the chunked retention purge, and exactly-once for ops
//! without an entity beyond the retention.

mod common;

use std::time::Duration;

use common::{Server, TOKEN, envelope, eventually, now_ms, op, uuid};
use serde_json::{Value, json};

/// An op on `entity` against `base_version` 0, which another client's write made stale.
fn stale(seq: i64, entity: &str) -> Value {
    let mut o = op(seq, 0, Some(entity), json!({"late": seq}));
    o["base_version"] = json!(0);
    o
}

/// Has another client write `state` to `entity`.
async fn seed(server: &Server, entity: &str, state: Value) {
    let results = server
        .ops_ok(&envelope(&uuid(), vec![op(1, 0, Some(entity), state)]))
        .await;
    assert_eq!(results[0]["status"], "applied");
}

#[tokio::test]
async fn a_stale_batch_carries_each_entity_state_once() {
    let server = Server::start(&[]);
    seed(&server, "e", json!({"title": "x".repeat(1000)})).await;
    seed(&server, "f", json!({"title": "f"})).await;
    let client = uuid();
    let mut ops: Vec<Value> = (1..=100).map(|i| stale(i, "e")).collect();
    ops.push(stale(101, "f"));
    let response = server.ops(TOKEN, &envelope(&client, ops)).await.unwrap();
    let text = response.text().await.unwrap();
    assert!(
        text.len() < 20_000,
        "100 conflicts on one entity answer in {} bytes",
        text.len()
    );
    let answer: Value = serde_json::from_str(&text).unwrap();
    let results = answer["results"].as_array().unwrap();
    assert!(
        results
            .iter()
            .all(|r| r["status"] == "conflict" && r["version"] == 1)
    );
    assert_eq!(results[0]["state"]["title"].as_str().unwrap().len(), 1000);
    assert!(results[0].get("state_omitted").is_none());
    for r in &results[1..100] {
        assert_eq!(r["state_omitted"], true, "{r}");
        assert!(r.get("state").is_none(), "{r}");
    }
    assert_eq!(
        results[100]["state"],
        json!({"title": "f"}),
        "f's first conflict"
    );
}

#[tokio::test]
async fn states_past_the_answer_budget_are_omitted_and_replays_never_carry_one() {
    let server = Server::start(&["--max-answer-state-bytes", "300"]);
    seed(&server, "small", json!({"n": 1})).await;
    seed(&server, "big", json!({"pad": "y".repeat(400)})).await;
    let client = uuid();
    let body = envelope(&client, vec![stale(1, "big"), stale(2, "small")]);
    let results = server.ops_ok(&body).await;
    assert_eq!(results[0]["state_omitted"], true, "over the budget");
    assert_eq!(results[0]["version"], 1);
    assert_eq!(results[1]["state"], json!({"n": 1}), "within the budget");
    // A replay of a stored conflict never carries the state, small or not.
    let replay = server.ops_ok(&body).await;
    for r in &replay {
        assert_eq!(r["replayed"], true);
        assert_eq!(r["status"], "conflict");
        assert_eq!(r["state_omitted"], true);
        assert!(r.get("state").is_none());
    }
    // The state is one read away.
    assert_eq!(
        server.entity(TOKEN, "big").await.unwrap()["state"]["pad"]
            .as_str()
            .unwrap()
            .len(),
        400
    );
    // Stored results hold no state.
    let outcomes: Vec<String> = server
        .sql("SELECT outcome FROM results")
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect();
    assert!(outcomes.len() >= 4);
    assert!(
        outcomes.iter().all(|o| !o.contains("\"state\"")),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn a_keyed_conflict_carries_the_state_and_its_replay_the_marker() {
    let server = Server::start(&[]);
    seed(&server, "k", json!({"a": 1})).await;
    let the_op = stale(1, "k");
    let key = the_op["id"].as_str().unwrap().to_owned();
    let body = envelope(&uuid(), vec![the_op]);
    let first = server.op(TOKEN, Some(&key), &body).await.unwrap();
    assert_eq!(first.status(), 409);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["state"], json!({"a": 1}));
    let again = server.op(TOKEN, Some(&key), &body).await.unwrap();
    assert_eq!(again.status(), 409);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["replayed"], true);
    assert_eq!(again["state_omitted"], true);
    assert_eq!(again["version"], 1);
    assert!(again.get("state").is_none());
}

#[tokio::test]
async fn an_op_that_would_grow_a_state_past_the_limit_is_rejected_whole() {
    let mut server = Server::start(&["--max-state-bytes", "1000"]);
    let client = uuid();
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![
                op(1, 0, Some("s"), json!({"a": "x".repeat(400)})),
                op(2, 1, Some("s"), json!({"b": "x".repeat(700)})),
                op(3, 0, Some("t"), json!({"ok": true})),
            ],
        ))
        .await;
    assert_eq!(results[0]["status"], "applied");
    assert_eq!(results[1]["status"], "rejected");
    let reason = results[1]["reason"].as_str().unwrap();
    assert!(reason.starts_with("state too large"), "{reason}");
    assert!(reason.contains("1000"), "{reason}");
    assert_eq!(
        results[2]["status"], "applied",
        "the rest of the batch goes on"
    );
    // Nothing of the rejected op was written.
    let s = server.entity(TOKEN, "s").await.unwrap();
    assert_eq!(s["version"], 1);
    assert!(s["state"].get("b").is_none());
    // Smaller ops still apply.
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![op(4, 1, Some("s"), json!({"c": 1}))],
        ))
        .await;
    assert_eq!(results[0]["status"], "applied");

    // An entity already past a (lowered) limit can still shrink, but not grow.
    let args = [
        "--token",
        "test=secret",
        "--admin-token",
        common::ADMIN,
        "--max-state-bytes",
        "100",
    ];
    server.restart_with(&args);
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![
                op(5, 4, Some("s"), json!({"d": 1})),
                op(6, 4, Some("s"), json!({"a": null})),
            ],
        ))
        .await;
    assert_eq!(results[0]["status"], "rejected");
    assert_eq!(results[1]["status"], "applied");
    assert!(
        server.entity(TOKEN, "s").await.unwrap()["state"]
            .get("a")
            .is_none()
    );
    assert!(!server.stderr().contains("panicked"));
}

#[tokio::test]
async fn the_retention_purge_runs_in_bounded_chunks() {
    let server = Server::start(&["--retention", "10s"]);
    // 2,500 expired results, written beside the running server in one transaction.
    server.sql(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 2499)
         INSERT INTO results (tenant, client, op_id, outcome, stored_at)
         SELECT 'test', 'c', 'op-' || i, '{\"status\":\"applied\",\"version\":1}', 0 FROM n",
    );
    // The purge runs every second (a tenth of the retention, at least 1 s).
    eventually(Duration::from_secs(30), "the purge", || async {
        server.stderr().contains("rows=2500")
    })
    .await;
    let line = server
        .stderr()
        .lines()
        .find(|l| l.contains("rows=2500"))
        .unwrap()
        .to_owned();
    // Ten steps of 250 results, one that finds no more, one for the (empty) keys: no step
    // deletes more than 250 rows.
    assert!(line.contains("chunks=12"), "{line}");
    // Work went on.
    let results = server
        .ops_ok(&envelope(&uuid(), vec![op(1, 0, Some("after"), json!({}))]))
        .await;
    assert_eq!(results[0]["status"], "applied");
}

#[tokio::test]
async fn an_op_without_entity_outside_the_created_at_window_is_rejected() {
    // Retention 1 s: the window is 800 ms back and 100 ms ahead.
    let server = Server::start(&["--retention", "1s"]);
    let client = uuid();
    let at = |created_at: i64, seq: i64| {
        let mut o = op(seq, 0, None, json!({"event": seq}));
        o["created_at"] = json!(created_at);
        o
    };
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![
                at(now_ms(), 1),
                at(now_ms() - 60_000, 2),
                at(now_ms() + 60_000, 3),
                // Ops on an entity have `last` and are not bound by the window.
                {
                    let mut o = op(4, 0, Some("e"), json!({}));
                    o["created_at"] = json!(now_ms() - 60_000);
                    o
                },
            ],
        ))
        .await;
    assert_eq!(results[0]["status"], "applied");
    assert_eq!(results[1]["status"], "rejected");
    assert!(
        results[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("expired"),
        "{}",
        results[1]
    );
    assert_eq!(results[2]["status"], "rejected");
    assert!(results[2]["reason"].as_str().unwrap().contains("ahead"));
    assert_eq!(results[3]["status"], "applied");
}

#[tokio::test]
async fn a_resend_of_an_op_without_entity_is_never_applied_again_after_the_purge() {
    let server = Server::start(&["--retention", "1s"]);
    let body = envelope(&uuid(), vec![op(1, 0, None, json!({"event": "opened"}))]);
    let first = server.ops_ok(&body).await;
    assert_eq!(first[0]["status"], "applied");
    // Resend until the result is purged: every answer is the stored result replayed or,
    // once the op is older than the window, `rejected` as expired; never a second apply.
    eventually(Duration::from_secs(30), "the resend to expire", || async {
        let r = &server.ops_ok(&body).await[0];
        match r["status"].as_str() {
            Some("applied") => {
                assert_eq!(r["replayed"], true, "applied twice: {r}");
                false
            }
            Some("rejected") => {
                assert!(r["reason"].as_str().unwrap().starts_with("expired"), "{r}");
                true
            }
            other => panic!("unexpected {other:?}: {r}"),
        }
    })
    .await;
    // Well after the purge, still never applied again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = &server.ops_ok(&body).await[0];
    assert_ne!(r["status"], "applied", "{r}");
    let fresh = server
        .log("test")
        .await
        .iter()
        .filter(|e| e["status"] == "applied" && e["replayed"] == false)
        .count();
    assert_eq!(fresh, 1);
    assert!(server.stderr().contains("purged expired results"));
}
