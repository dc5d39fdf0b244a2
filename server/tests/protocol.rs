//! The protocol's semantics against the real binary: idempotency, Idempotency-Key, ordering,
//! versions, merge, tenants, beacon.

mod common;

use common::{OTHER, Server, TOKEN, envelope, op, uuid};
use serde_json::{Value, json};

fn replayed(result: &Value) -> bool {
    result["replayed"] == true
}

#[tokio::test]
async fn concurrent_copies_of_one_op_in_batches_apply_exactly_once() {
    let server = Server::start(&[]);
    let client = uuid();
    let body = envelope(&client, vec![op(1, 0, Some("pr/1"), json!({"n": 1}))]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (http, url, body) = (server.http.clone(), server.at("/v1/ops"), body.clone());
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                response.json::<Value>().await.expect("json")["results"][0].clone()
            })
        })
        .collect();
    let mut fresh = 0;
    for task in tasks {
        let result = task.await.expect("task");
        assert_eq!(result["status"], "applied");
        assert_eq!(result["version"], 1);
        if !replayed(&result) {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one copy applies, the others are replays");
    let entity = server.entity(TOKEN, "pr/1").await.expect("entity");
    assert_eq!(entity["version"], 1);
    let log = server.log("test").await;
    assert_eq!(log.len(), 100);
    assert_eq!(
        log.iter()
            .filter(|e| e["status"] == "applied" && e["replayed"] == false)
            .count(),
        1
    );
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_apply_exactly_once() {
    let server = Server::start(&[]);
    let client = uuid();
    let the_op = op(1, 0, Some("pr/1"), json!({"n": 1}));
    let key = the_op["id"].as_str().unwrap().to_owned();
    let body = envelope(&client, vec![the_op]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (http, url, body, key) = (
                server.http.clone(),
                server.at("/v1/op"),
                body.clone(),
                key.clone(),
            );
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(TOKEN)
                    .header("Idempotency-Key", key)
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                (
                    response.status().as_u16(),
                    response.json::<Value>().await.expect("json"),
                )
            })
        })
        .collect();
    let (mut fresh, mut replays, mut in_progress) = (0, 0, 0);
    for task in tasks {
        match task.await.expect("task") {
            (200, body) if replayed(&body) => {
                assert_eq!(body["status"], "applied");
                replays += 1;
            }
            (200, body) => {
                assert_eq!(body["status"], "applied");
                assert_eq!(body["version"], 1);
                fresh += 1;
            }
            (409, body) => {
                assert_eq!(body["type"], "https://outbox.dev/problems/in-progress");
                in_progress += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(
        fresh, 1,
        "exactly one request applies ({replays} replays, {in_progress} in progress)"
    );
    let response = server.op(TOKEN, Some(&key), &body).await.expect("request");
    assert_eq!(response.status(), 200);
    let again: Value = response.json().await.expect("json");
    assert!(replayed(&again) && again["version"] == 1, "{again}");
    assert_eq!(
        server.entity(TOKEN, "pr/1").await.expect("entity")["version"],
        1
    );
}

#[tokio::test]
async fn sequential_resend_replays_the_stored_result() {
    let server = Server::start(&[]);
    let client = uuid();
    // Batch route: applied, then replayed with the same version even after the entity moved.
    let first = envelope(&client, vec![op(1, 0, Some("a"), json!({"x": 1}))]);
    let applied = server.ops_ok(&first).await;
    assert_eq!(applied[0]["status"], "applied");
    assert!(!replayed(&applied[0]));
    server
        .ops_ok(&envelope(
            &client,
            vec![op(2, 1, Some("a"), json!({"x": 2}))],
        ))
        .await;
    let again = server.ops_ok(&first).await;
    assert_eq!(again[0]["status"], "applied");
    assert_eq!(
        again[0]["version"], 1,
        "the stored result, not the current version"
    );
    assert!(replayed(&again[0]));

    // Keyed route.
    let keyed = op(3, 2, Some("a"), json!({"x": 3}));
    let key = keyed["id"].as_str().unwrap().to_owned();
    let body = envelope(&client, vec![keyed]);
    let r1: Value = server
        .op(TOKEN, Some(&key), &body)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r2 = server.op(TOKEN, Some(&key), &body).await.unwrap();
    assert_eq!(r2.status(), 200);
    let r2: Value = r2.json().await.unwrap();
    assert_eq!(r1["status"], "applied");
    assert_eq!(r2["status"], "applied");
    assert_eq!(r1["version"], r2["version"]);
    assert!(!replayed(&r1) && replayed(&r2));

    // A stored error is replayed too: a rejected op stays rejected.
    let bad = envelope(&client, vec![op(4, 3, Some("a"), json!("not an object"))]);
    let rejected = server.ops_ok(&bad).await;
    assert_eq!(rejected[0]["status"], "rejected");
    assert_eq!(rejected[0]["reason"], "payload must be a JSON object");
    let rejected_again = server.ops_ok(&bad).await;
    assert_eq!(rejected_again[0]["status"], "rejected");
    assert!(replayed(&rejected_again[0]));
}

#[tokio::test]
async fn idempotency_key_reused_with_another_body_is_422() {
    let server = Server::start(&[]);
    let client = uuid();
    let the_op = op(1, 0, Some("a"), json!({"x": 1}));
    let key = the_op["id"].as_str().unwrap().to_owned();
    let response = server
        .op(TOKEN, Some(&key), &envelope(&client, vec![the_op.clone()]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut other = the_op.clone();
    other["payload"] = json!({"x": 2});
    let response = server
        .op(TOKEN, Some(&key), &envelope(&client, vec![other]))
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/key-reused");
    assert_eq!(
        server.entity(TOKEN, "a").await.unwrap()["state"],
        json!({"x": 1})
    );
}

#[tokio::test]
async fn idempotency_key_is_required_and_its_quoted_form_is_the_same_key() {
    let server = Server::start(&[]);
    let client = uuid();
    let body = envelope(&client, vec![op(1, 0, Some("a"), json!({"x": 1}))]);
    let response = server.op(TOKEN, None, &body).await.unwrap();
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/missing-key");

    let first = server.op(TOKEN, Some("k-1"), &body).await.unwrap();
    assert_eq!(first.status(), 200);
    let quoted = server.op(TOKEN, Some("\"k-1\""), &body).await.unwrap();
    assert_eq!(quoted.status(), 200);
    assert!(replayed(&quoted.json().await.unwrap()));
}

#[tokio::test]
async fn a_gap_is_out_of_order_until_the_predecessor_arrives() {
    let server = Server::start(&[]);
    let client = uuid();
    let second = op(2, 1, Some("a"), json!({"second": true}));
    let result = server
        .ops_ok(&envelope(&client, vec![second.clone()]))
        .await;
    assert_eq!(result[0]["status"], "out_of_order");
    assert_eq!(result[0]["last"], 0);
    // Not final, so not stored: a resend is judged again, not replayed.
    let result = server
        .ops_ok(&envelope(&client, vec![second.clone()]))
        .await;
    assert_eq!(result[0]["status"], "out_of_order");
    assert!(!replayed(&result[0]));
    assert!(server.entity(TOKEN, "a").await.is_none());

    // The keyed route says 425 with `last`.
    let key = second["id"].as_str().unwrap().to_owned();
    let response = server
        .op(TOKEN, Some(&key), &envelope(&client, vec![second.clone()]))
        .await
        .unwrap();
    assert_eq!(response.status(), 425);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/out-of-order");
    assert_eq!(problem["last"], 0);

    let first = server
        .ops_ok(&envelope(
            &client,
            vec![op(1, 0, Some("a"), json!({"first": true}))],
        ))
        .await;
    assert_eq!(first[0]["status"], "applied");
    let result = server.ops_ok(&envelope(&client, vec![second])).await;
    assert_eq!(result[0]["status"], "applied");
    assert_eq!(result[0]["version"], 2);
    assert_eq!(
        server.entity(TOKEN, "a").await.unwrap()["state"],
        json!({"first": true, "second": true})
    );
}

#[tokio::test]
async fn a_seq_at_or_below_last_is_a_duplicate_even_under_a_new_id() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .ops_ok(&envelope(
            &client,
            vec![op(5, 0, Some("a"), json!({"x": 1}))],
        ))
        .await;
    for seq in [5, 3] {
        let copy = op(seq, 0, Some("a"), json!({"x": 99}));
        let result = server.ops_ok(&envelope(&client, vec![copy.clone()])).await;
        assert_eq!(result[0]["status"], "duplicate", "seq {seq}");
        assert_eq!(result[0]["version"], 1);
        let again = server.ops_ok(&envelope(&client, vec![copy])).await;
        assert_eq!(again[0]["status"], "duplicate");
        assert!(replayed(&again[0]), "a duplicate is final and stored");
    }
    // Another client has its own `last` for the same entity.
    let result = server
        .ops_ok(&envelope(
            &uuid(),
            vec![op(3, 0, Some("a"), json!({"y": 1}))],
        ))
        .await;
    assert_eq!(result[0]["status"], "applied");
    assert_eq!(
        server.entity(TOKEN, "a").await.unwrap()["state"],
        json!({"x": 1, "y": 1})
    );
}

#[tokio::test]
async fn a_clients_own_writes_never_make_its_base_version_stale() {
    let server = Server::start(&[]);
    let (alice, bob) = (uuid(), uuid());
    // Alice read version 0, commented twice, then approved against the version she read: her
    // own comments moved the entity, nobody else did.
    let mut approve = op(3, 2, Some("pr/5"), json!({"approved": true}));
    approve["base_version"] = json!(0);
    let result = server
        .ops_ok(&envelope(
            &alice,
            vec![
                op(1, 0, Some("pr/5"), json!({"c1": "a"})),
                op(2, 1, Some("pr/5"), json!({"c2": "b"})),
                approve,
            ],
        ))
        .await;
    assert_eq!(result[2]["status"], "applied", "{result:?}");
    assert_eq!(result[2]["version"], 3);

    // Bob writes; now Alice's next op against what she read before Bob is a conflict...
    server
        .ops_ok(&envelope(
            &bob,
            vec![op(1, 0, Some("pr/5"), json!({"b": 1}))],
        ))
        .await;
    let mut stale = op(4, 3, Some("pr/5"), json!({"approved": false}));
    stale["base_version"] = json!(3);
    let result = server.ops_ok(&envelope(&alice, vec![stale])).await;
    assert_eq!(result[0]["status"], "conflict");
    assert_eq!(result[0]["version"], 4);
    // ...and a version that does not exist yet is one too.
    let mut future = op(4, 3, Some("pr/5"), json!({"x": 1}));
    future["base_version"] = json!(9);
    let result = server.ops_ok(&envelope(&alice, vec![future])).await;
    assert_eq!(result[0]["status"], "conflict");
    // Against Bob's version it applies.
    let mut fresh = op(4, 3, Some("pr/5"), json!({"approved": false}));
    fresh["base_version"] = json!(4);
    let result = server.ops_ok(&envelope(&alice, vec![fresh])).await;
    assert_eq!(result[0]["status"], "applied");
}

#[tokio::test]
async fn a_stale_base_version_is_a_conflict_with_the_current_state() {
    let server = Server::start(&[]);
    let (alice, bob) = (uuid(), uuid());
    server
        .ops_ok(&envelope(
            &alice,
            vec![
                op(1, 0, Some("pr/9"), json!({"title": "t"})),
                op(2, 1, Some("pr/9"), json!({"approved": true})),
            ],
        ))
        .await;
    let mut stale = op(1, 0, Some("pr/9"), json!({"approved": false}));
    stale["base_version"] = json!(1);
    let result = server.ops_ok(&envelope(&bob, vec![stale.clone()])).await;
    assert_eq!(result[0]["status"], "conflict");
    assert_eq!(result[0]["version"], 2);
    assert_eq!(result[0]["state"], json!({"title": "t", "approved": true}));

    // The keyed route says 409 with version and state.
    let mut keyed = stale.clone();
    let key = uuid();
    keyed["id"] = json!(key);
    let response = server
        .op(TOKEN, Some(&key), &envelope(&bob, vec![keyed]))
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/conflict");
    assert_eq!(problem["version"], 2);
    assert_eq!(problem["state"]["approved"], true);

    // client-wins: a copy with a new id, the same seq and prev, and the current base_version.
    let mut retry = stale.clone();
    retry["id"] = json!(uuid());
    retry["base_version"] = json!(2);
    let result = server.ops_ok(&envelope(&bob, vec![retry])).await;
    assert_eq!(result[0]["status"], "applied");
    assert_eq!(result[0]["version"], 3);
    // The old id keeps its conflict.
    let result = server.ops_ok(&envelope(&bob, vec![stale])).await;
    assert_eq!(result[0]["status"], "conflict");
    assert!(replayed(&result[0]));
}

#[tokio::test]
async fn payload_merges_into_state_as_json_merge_patch() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .ops_ok(&envelope(
            &client,
            vec![
                op(
                    1,
                    0,
                    Some("e"),
                    json!({"a": {"b": 1, "c": 2}, "keep": "yes"}),
                ),
                op(
                    2,
                    1,
                    Some("e"),
                    json!({"a": {"b": null}, "d": [1, 2], "keep": "yes"}),
                ),
            ],
        ))
        .await;
    let entity = server.entity(TOKEN, "e").await.unwrap();
    assert_eq!(
        entity,
        json!({"id": "e", "version": 2, "state": {"a": {"c": 2}, "d": [1, 2], "keep": "yes"}})
    );
}

#[tokio::test]
async fn invalid_ops_are_rejected_while_the_rest_of_the_batch_applies() {
    let server = Server::start(&[]);
    let client = uuid();
    let mut prev_too_big = op(3, 0, Some("b"), json!({}));
    prev_too_big["prev"] = json!(3);
    let mut empty_kind = op(4, 0, Some("c"), json!({}));
    empty_kind["kind"] = json!("");
    let results = server
        .ops_ok(&envelope(
            &client,
            vec![
                op(1, 0, Some("a"), json!({"ok": 1})),
                op(2, 0, Some("b"), json!([1, 2])),
                prev_too_big,
                empty_kind,
                op(5, 0, Some("d"), json!({"ok": 2})),
            ],
        ))
        .await;
    let statuses: Vec<_> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["applied", "rejected", "rejected", "rejected", "applied"]
    );
    assert!(results[1]["reason"].as_str().unwrap().contains("payload"));
}

#[tokio::test]
async fn an_op_without_entity_is_applied_unversioned_and_still_idempotent() {
    let server = Server::start(&[]);
    let client = uuid();
    let body = envelope(&client, vec![op(1, 0, None, json!({"event": "opened"}))]);
    let results = server.ops_ok(&body).await;
    assert_eq!(results[0]["status"], "applied");
    assert!(results[0]["version"].is_null());
    assert!(results[0].as_object().unwrap().contains_key("version"));
    assert!(replayed(&server.ops_ok(&body).await[0]));
}

#[tokio::test]
async fn missing_or_unknown_token_is_401() {
    let server = Server::start(&[]);
    let body = envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]);
    let requests = [
        server.http.post(server.at("/v1/ops")).json(&body),
        server
            .http
            .post(server.at("/v1/ops"))
            .bearer_auth("wrong")
            .json(&body),
        server
            .http
            .post(server.at("/v1/ops"))
            .header("Authorization", "Basic dGVzdDpzZWNyZXQ=")
            .json(&body),
        server
            .http
            .post(server.at("/v1/op"))
            .header("Idempotency-Key", "k")
            .json(&body),
        server
            .http
            .post(server.at("/v1/beacon"))
            .body(body.to_string()),
        server.http.get(server.at("/v1/entities/a")),
        server
            .http
            .get(server.at("/v1/entities/a"))
            .bearer_auth("wrong"),
    ];
    for request in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert!(
        server.log("test").await.is_empty(),
        "nothing reached the store"
    );
}

#[tokio::test]
async fn a_client_of_another_tenant_is_403() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .ops_ok(&envelope(&client, vec![op(1, 0, Some("a"), json!({}))]))
        .await;
    let response = server
        .ops(
            OTHER,
            &envelope(&client, vec![op(2, 0, Some("b"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://outbox.dev/problems/forbidden");
    assert!(server.entity(OTHER, "b").await.is_none());
    // The owner still works.
    server
        .ops_ok(&envelope(&client, vec![op(3, 0, Some("c"), json!({}))]))
        .await;
}

#[tokio::test]
async fn tenants_see_neither_each_others_entities_nor_keys() {
    let server = Server::start(&[]);
    let shared_op = op(1, 0, Some("pr/1"), json!({"who": "test"}));
    server
        .ops_ok(&envelope(&uuid(), vec![shared_op.clone()]))
        .await;
    assert!(server.entity(OTHER, "pr/1").await.is_none());

    // The same op id and the same Idempotency-Key under the other tenant are new there.
    let mut theirs = shared_op.clone();
    theirs["payload"] = json!({"who": "other"});
    let their_client = uuid();
    let response = server
        .ops(OTHER, &envelope(&their_client, vec![theirs.clone()]))
        .await
        .unwrap();
    let results: Value = response.json().await.unwrap();
    assert_eq!(results["results"][0]["status"], "applied");
    assert!(!replayed(&results["results"][0]));
    let key = "same-key";
    let mine = server
        .op(
            TOKEN,
            Some(key),
            &envelope(&uuid(), vec![op(1, 0, Some("k"), json!({"a": 1}))]),
        )
        .await
        .unwrap();
    assert_eq!(mine.status(), 200);
    let response = server
        .op(
            OTHER,
            Some(key),
            &envelope(&their_client, vec![op(2, 0, Some("k"), json!({"b": 2}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "not 422: keys are per tenant");
    assert!(!replayed(&response.json().await.unwrap()));

    assert_eq!(
        server.entity(TOKEN, "pr/1").await.unwrap()["state"],
        json!({"who": "test"})
    );
    assert_eq!(
        server.entity(OTHER, "pr/1").await.unwrap()["state"],
        json!({"who": "other"})
    );
    assert_eq!(
        server.entity(OTHER, "k").await.unwrap()["state"],
        json!({"b": 2})
    );
}

#[tokio::test]
async fn a_legacy_beacon_takes_a_text_plain_body_with_the_token_inside() {
    // The body token is legacy and off by default (tests/grants.rs has the default and the
    // grants that replace it); --beacon-access-token turns it back on.
    let server = Server::start(&["--beacon-access-token"]);
    let client = uuid();
    let the_op = op(1, 0, Some("a"), json!({"closing": true}));
    let mut body = envelope(&client, vec![the_op.clone()]);
    body["access_token"] = json!(TOKEN);
    let response = server
        .http
        .post(server.at("/v1/beacon"))
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let results: Value = response.json().await.unwrap();
    assert_eq!(results["results"][0]["status"], "applied");

    // The queued copy of the same op arrives second: a replay.
    let again = server.ops_ok(&envelope(&client, vec![the_op])).await;
    assert!(replayed(&again[0]));

    // The header works too, and a wrong body token is 401.
    let next = envelope(&client, vec![op(2, 1, Some("a"), json!({"n": 2}))]);
    let response = server
        .http
        .post(server.at("/v1/beacon"))
        .bearer_auth(TOKEN)
        .body(next.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut wrong = envelope(&client, vec![op(3, 2, Some("a"), json!({}))]);
    wrong["access_token"] = json!("nope");
    let response = server
        .http
        .post(server.at("/v1/beacon"))
        .body(wrong.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let log = server.log("test").await;
    assert_eq!(log.iter().filter(|e| e["route"] == "beacon").count(), 2);
}
