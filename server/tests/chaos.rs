//! Fault injection as a client sees it, a kill-and-restart, and retention.

mod common;

use std::time::Duration;

use common::{OTHER, Server, TOKEN, envelope, eventually, op, uuid};
use serde_json::{Value, json};

fn expect_connection_error(result: reqwest::Result<reqwest::Response>, what: &str) {
    match result {
        Ok(response) => panic!(
            "{what}: expected a connection error, got {}",
            response.status()
        ),
        Err(e) => assert!(!e.is_timeout() && e.status().is_none(), "{what}: {e:?}"),
    }
}

#[tokio::test]
async fn scripted_status_faults_answer_with_retry_after_and_apply_nothing() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .faults(json!([
            {"route": "ops", "times": 1, "action": {"status": 503, "retry_after": 2}},
            {"route": "ops", "times": 1, "action": {"status": 429, "retry_after": 3}},
        ]))
        .await;
    let body = envelope(&client, vec![op(1, 0, Some("a"), json!({"x": 1}))]);
    for (status, retry_after) in [(503, "2"), (429, "3")] {
        let response = server.ops(TOKEN, &body).await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["retry-after"], retry_after);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "https://outbox.dev/problems/injected");
        assert!(
            server.entity(TOKEN, "a").await.is_none(),
            "nothing applied on {status}"
        );
    }
    let results = server.ops_ok(&body).await;
    assert_eq!(results[0]["status"], "applied");
    assert!(
        results[0].get("replayed").is_none(),
        "the faults stored nothing"
    );
    let log = server.log("test").await;
    let seen: Vec<_> = log
        .iter()
        .map(|e| (e["http"].clone(), e["fault"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (json!(503), json!("status")),
            (json!(429), json!("429")),
            (json!(200), Value::Null)
        ]
    );
    assert!(log[2]["at"].as_i64() >= log[0]["at"].as_i64());
}

#[tokio::test]
async fn scripted_delay_is_logged_and_the_op_still_applies() {
    let server = Server::start(&[]);
    server
        .faults(json!([{"route": "ops", "times": 1, "action": {"delay_ms": 200}}]))
        .await;
    let results = server
        .ops_ok(&envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]))
        .await;
    assert_eq!(results[0]["status"], "applied");
    assert_eq!(server.log("test").await[0]["fault"], "delay");
    assert!(server.stderr().contains("WARN") && server.stderr().contains("kind=\"delay\""));
}

#[tokio::test]
async fn reset_before_commit_is_a_connection_error_and_applies_nothing() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .faults(json!([{"route": "any", "times": 2, "action": "reset_before_commit"}]))
        .await;
    let batch = envelope(&client, vec![op(1, 0, Some("a"), json!({}))]);
    expect_connection_error(server.ops(TOKEN, &batch).await, "ops");
    let single = op(1, 0, Some("b"), json!({}));
    let key = single["id"].as_str().unwrap().to_owned();
    let single = envelope(&client, vec![single]);
    expect_connection_error(server.op(TOKEN, Some(&key), &single).await, "op");
    assert!(server.entity(TOKEN, "a").await.is_none());
    assert!(server.entity(TOKEN, "b").await.is_none());

    // Resends are fresh applies, not replays: nothing was stored.
    let results = server.ops_ok(&batch).await;
    assert!(results[0]["status"] == "applied" && results[0].get("replayed").is_none());
    let response = server.op(TOKEN, Some(&key), &single).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .json::<Value>()
            .await
            .unwrap()
            .get("replayed")
            .is_none()
    );
    let log = server.log("test").await;
    assert!(log[..2].iter().all(|e| e["status"].is_null()
        && e["http"].is_null()
        && e["fault"] == "reset_before_commit"));
    assert!(server.stderr().contains("kind=\"reset_before_commit\""));
}

#[tokio::test]
async fn drop_after_commit_is_a_connection_error_yet_the_op_applies_once_and_a_resend_replays() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .faults(json!([{"route": "ops", "times": 1, "action": "drop_after_commit"}]))
        .await;
    let batch = envelope(&client, vec![op(1, 0, Some("a"), json!({"n": 1}))]);
    expect_connection_error(server.ops(TOKEN, &batch).await, "ops");
    assert_eq!(
        server.entity(TOKEN, "a").await.expect("committed")["version"],
        1
    );
    let results = server.ops_ok(&batch).await;
    assert_eq!(results[0]["status"], "applied");
    assert_eq!(results[0]["version"], 1);
    assert_eq!(results[0]["replayed"], true);

    let single = op(1, 0, Some("b"), json!({"n": 1}));
    let key = single["id"].as_str().unwrap().to_owned();
    let single = envelope(&client, vec![single]);
    server
        .faults(json!([{"route": "op", "times": 1, "action": "drop_after_commit"}]))
        .await;
    expect_connection_error(server.op(TOKEN, Some(&key), &single).await, "op");
    let response = server.op(TOKEN, Some(&key), &single).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["replayed"] == true && body["version"] == 1, "{body}");
    assert_eq!(server.entity(TOKEN, "b").await.unwrap()["version"], 1);

    let log = server.log("test").await;
    let fresh = log
        .iter()
        .filter(|e| e["status"] == "applied" && e["replayed"] == false)
        .count();
    assert_eq!(fresh, 2, "each op applied exactly once: {log:?}");
    assert!(log.iter().any(|e| e["fault"] == "drop_after_commit"
        && e["http"].is_null()
        && e["status"] == "applied"));
    assert!(server.stderr().contains("kind=\"drop_after_commit\""));
}

#[tokio::test]
async fn a_second_request_while_the_first_still_runs_gets_409_in_progress() {
    let server = Server::start(&[]);
    let client = uuid();
    // The delay holds the key: the fault is drawn after the key is claimed.
    server
        .faults(json!([{"route": "op", "times": 1, "action": {"delay_ms": 3000}}]))
        .await;
    let the_op = op(1, 0, Some("a"), json!({"n": 1}));
    let key = the_op["id"].as_str().unwrap().to_owned();
    let body = envelope(&client, vec![the_op.clone()]);
    let first = {
        let (http, url, body, key) = (
            server.http.clone(),
            server.at("/v1/op"),
            body.clone(),
            key.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
        })
    };
    eventually(
        Duration::from_secs(30),
        "the first request to hold its key",
        || async { server.stderr().contains("fault injected") },
    )
    .await;
    let second = server.op(TOKEN, Some(&key), &body).await.unwrap();
    assert_eq!(second.status(), 409);
    assert_eq!(second.headers()["retry-after"], "1");
    let problem: Value = second.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/in-progress");
    let mut changed = the_op.clone();
    changed["payload"] = json!({"n": 2});
    let third = server
        .op(TOKEN, Some(&key), &envelope(&client, vec![changed]))
        .await
        .unwrap();
    assert_eq!(third.status(), 422, "another body under a running key");

    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200);
    assert!(
        first
            .json::<Value>()
            .await
            .unwrap()
            .get("replayed")
            .is_none()
    );
    let last = server.op(TOKEN, Some(&key), &body).await.unwrap();
    assert_eq!(last.status(), 200);
    assert_eq!(last.json::<Value>().await.unwrap()["replayed"], true);
}

#[tokio::test]
async fn a_reject_rule_rejects_only_ops_of_its_kind_and_the_rejection_is_stored() {
    let server = Server::start(&[]);
    let client = uuid();
    server.faults(json!([{"route": "ops", "times": 1, "action": {"reject": "comments are closed", "kind": "comment"}}])).await;
    let mut comment = op(1, 0, Some("a"), json!({"c": 1}));
    comment["kind"] = json!("comment");
    let edit = op(2, 0, Some("b"), json!({"e": 1}));
    let body = envelope(&client, vec![comment.clone(), edit]);
    let results = server.ops_ok(&body).await;
    assert_eq!(results[0]["status"], "rejected");
    assert_eq!(results[0]["reason"], "comments are closed");
    assert_eq!(results[1]["status"], "applied");
    let again = server.ops_ok(&envelope(&client, vec![comment])).await;
    assert_eq!(again[0]["status"], "rejected", "a rejection is final");
    assert_eq!(again[0]["replayed"], true);
}

#[tokio::test]
async fn a_rule_for_one_tenant_spares_the_others() {
    let server = Server::start(&[]);
    server
        .faults(json!([{"route": "ops", "tenant": "other", "times": 1, "action": {"status": 500}}]))
        .await;
    server
        .ops_ok(&envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]))
        .await;
    let response = server
        .ops(
            OTHER,
            &envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
}

#[tokio::test]
async fn health_rules_make_the_probe_fail_then_recover() {
    let server = Server::start(&[]);
    server
        .faults(
            json!([{"route": "health", "times": 1, "action": {"status": 503, "retry_after": 5}}]),
        )
        .await;
    let response = server
        .http
        .get(server.at("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert!(server.healthy().await);
    server
        .faults(json!([{"route": "health", "times": 1, "action": "reset_before_commit"}]))
        .await;
    expect_connection_error(
        server.http.get(server.at("/v1/health")).send().await,
        "health",
    );
    assert!(server.healthy().await);
}

#[tokio::test]
async fn seeded_faults_hit_every_kind_yet_each_op_applies_exactly_once() {
    let server = Server::start(&[
        "--rate",
        "0",
        "--fault-seed",
        "7",
        "--fault-5xx",
        "0.15",
        "--fault-429",
        "0.15",
        "--fault-delay",
        "0.1",
        "--fault-delay-ms",
        "10",
        "--fault-reset",
        "0.15",
        "--fault-drop-after-commit",
        "0.15",
    ]);
    let client = uuid();
    for i in 1..=40 {
        let body = envelope(
            &client,
            vec![op(i, 0, Some(&format!("e{i}")), json!({"i": i}))],
        );
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts <= 100, "op {i} never got through");
            match server.ops(TOKEN, &body).await {
                Ok(response) if response.status() == 200 => {
                    let results: Value = response.json().await.unwrap();
                    assert_eq!(results["results"][0]["status"], "applied");
                    break;
                }
                Ok(response) => assert!([429, 500, 502, 503].contains(&response.status().as_u16())),
                Err(e) => assert!(!e.is_timeout()),
            }
        }
    }
    for i in 1..=40 {
        assert_eq!(
            server.entity(TOKEN, &format!("e{i}")).await.unwrap()["version"],
            1,
            "e{i}"
        );
    }
    let log = server.log("test").await;
    for i in 1..=40 {
        let fresh = log
            .iter()
            .filter(|e| e["seq"] == i && e["status"] == "applied" && e["replayed"] == false)
            .count();
        assert_eq!(fresh, 1, "op {i} applied exactly once");
    }
    let stderr = server.stderr();
    for kind in [
        "status",
        "429",
        "delay",
        "reset_before_commit",
        "drop_after_commit",
    ] {
        assert!(
            stderr.contains(&format!("kind=\"{kind}\"")),
            "no {kind} fault logged"
        );
        assert!(
            log.iter().any(|e| e["fault"] == kind),
            "no {kind} fault in the admin log"
        );
    }
}

#[tokio::test]
async fn a_restart_on_the_same_database_still_deduplicates() {
    let mut server = Server::start(&[]);
    let client = uuid();
    let first = envelope(&client, vec![op(1, 0, Some("a"), json!({"n": 1}))]);
    server.ops_ok(&first).await;
    let second = op(2, 1, Some("a"), json!({"n": 2}));
    let key = second["id"].as_str().unwrap().to_owned();
    let second = envelope(&client, vec![second]);
    assert_eq!(
        server
            .op(TOKEN, Some(&key), &second)
            .await
            .unwrap()
            .status(),
        200
    );

    server.restart();

    let results = server.ops_ok(&first).await;
    assert!(
        results[0]["status"] == "applied"
            && results[0]["replayed"] == true
            && results[0]["version"] == 1
    );
    let response = server.op(TOKEN, Some(&key), &second).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["replayed"] == true && body["version"] == 2, "{body}");
    // A copy under a new id is still known by its seq.
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![op(2, 1, Some("a"), json!({"n": 99}))],
        ))
        .await;
    assert_eq!(results[0]["status"], "duplicate");
    assert_eq!(
        server.entity(TOKEN, "a").await.unwrap(),
        json!({"id": "a", "version": 2, "state": {"n": 2}})
    );
    // The client still belongs to its tenant.
    let response = server
        .ops(
            OTHER,
            &envelope(&client, vec![op(3, 0, Some("z"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn retention_purges_stored_results_but_last_still_catches_duplicates() {
    let server = Server::start(&["--retention", "1s"]);
    let client = uuid();
    let keyed = op(1, 0, Some("a"), json!({"n": 1}));
    let key = keyed["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .op(TOKEN, Some(&key), &envelope(&client, vec![keyed.clone()]))
            .await
            .unwrap()
            .status(),
        200
    );
    let batch = envelope(&client, vec![op(2, 1, Some("a"), json!({"n": 2}))]);
    server.ops_ok(&batch).await;

    // Before the purge a resend is a replay; after it, `last` makes it a fresh duplicate.
    eventually(
        Duration::from_secs(30),
        "the stored result to be purged",
        || async {
            let results = server.ops_ok(&batch).await;
            assert!(results[0]["status"] == "applied" || results[0]["status"] == "duplicate");
            results[0]["status"] == "duplicate" && results[0].get("replayed").is_none()
        },
    )
    .await;
    // The key went with it (it was stored first): another body under it is no longer a 422.
    let mut changed = keyed.clone();
    changed["payload"] = json!({"n": 100});
    let response = server
        .op(TOKEN, Some(&key), &envelope(&client, vec![changed]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "duplicate");
    assert_eq!(
        server.entity(TOKEN, "a").await.unwrap()["state"],
        json!({"n": 2})
    );
    assert!(server.stderr().contains("purged expired results"));
}
