//! Beacon grants (docs/PROTOCOL.md, `/v1/grants` and `/v1/beacon`): a page's last ops reach
//! the server with a short-lived credential bound to the tenant, the client and the op
//! bodies, never with the user's bearer token.

mod common;

use std::time::Duration;

use common::{
    OTHER, Server, TOKEN, addr, body_of, envelope, eventually, op, read_until_closed, status_of,
    uuid,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// POST /v1/grants as `token`; the answer.
async fn ask(server: &Server, token: &str, body: &Value) -> reqwest::Response {
    server
        .http
        .post(server.at("/v1/grants"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// A grant for `body` as `token`.
async fn get_grant(server: &Server, token: &str, body: &Value) -> String {
    let response = ask(server, token, body).await;
    assert_eq!(response.status(), 200, "POST /v1/grants");
    let answer: Value = response.json().await.expect("json");
    assert!(answer["expires_at"].as_i64().unwrap() > common::now_ms());
    answer["grant"].as_str().expect("grant").to_owned()
}

/// POST /v1/beacon?grant=… with `body` as text/plain, the way sendBeacon sends it.
async fn beacon(server: &Server, grant: &str, body: &Value) -> reqwest::Response {
    server
        .http
        .post(server.at(&format!("/v1/beacon?grant={grant}")))
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

async fn problem(response: reqwest::Response, status: u16, slug: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{slug}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["type"],
        format!("https://outbox.dev/problems/{slug}"),
        "{body}"
    );
    body
}

#[tokio::test]
async fn a_granted_beacon_applies_once_and_the_queued_copy_replays() {
    let server = Server::start(&[]);
    let client = uuid();
    let the_op = op(1, 0, Some("pr/1"), json!({"closing": true}));
    let body = envelope(&client, vec![the_op.clone()]);
    let grant = get_grant(&server, TOKEN, &body).await;
    assert!(
        grant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "a grant travels in a URL as it is: {grant}"
    );
    // Asking for a grant applies nothing.
    assert!(server.entity(TOKEN, "pr/1").await.is_none());

    let response = beacon(&server, &grant, &body).await;
    assert_eq!(response.status(), 200);
    let results: Value = response.json().await.unwrap();
    assert_eq!(results["results"][0]["status"], "applied");
    let again = server.ops_ok(&body).await;
    assert_eq!(again[0]["replayed"], true, "the queued copy is a replay");
    assert_eq!(server.entity(TOKEN, "pr/1").await.unwrap()["version"], 1);
    let log = server.log("test").await;
    assert_eq!(log[0]["route"], "beacon");
}

#[tokio::test]
async fn a_replayed_grant_is_a_replay_not_a_second_effect() {
    let server = Server::start(&[]);
    let body = envelope(&uuid(), vec![op(1, 0, None, json!({"event": "closed"}))]);
    let grant = get_grant(&server, TOKEN, &body).await;
    let first: Value = beacon(&server, &grant, &body).await.json().await.unwrap();
    assert_eq!(first["results"][0]["status"], "applied");
    assert!(first["results"][0].get("replayed").is_none());
    for _ in 0..3 {
        let again: Value = beacon(&server, &grant, &body).await.json().await.unwrap();
        assert_eq!(again["results"][0]["status"], "applied");
        assert_eq!(again["results"][0]["replayed"], true);
    }
    let fresh = server
        .log("test")
        .await
        .iter()
        .filter(|e| e["status"] == "applied" && e["replayed"] == false)
        .count();
    assert_eq!(fresh, 1, "one effect for four beacons");
}

#[tokio::test]
async fn an_expired_grant_is_refused() {
    let server = Server::start(&["--grant-ttl", "1s"]);
    let body = envelope(&uuid(), vec![op(1, 0, Some("late"), json!({}))]);
    let grant = get_grant(&server, TOKEN, &body).await;
    // Wait (by polling the grant itself with a body it does not cover, which applies
    // nothing) until the server calls it expired.
    let other = envelope(&uuid(), vec![op(1, 0, Some("late"), json!({}))]);
    eventually(Duration::from_secs(30), "the grant to expire", || async {
        let response = beacon(&server, &grant, &other).await;
        response.status() == 401
    })
    .await;
    let refused = problem(beacon(&server, &grant, &body).await, 401, "grant-expired").await;
    assert!(refused["expires_at"].is_i64());
    assert!(
        server.entity(TOKEN, "late").await.is_none(),
        "nothing applied"
    );
}

#[tokio::test]
async fn a_grant_covers_only_its_op_ids() {
    let server = Server::start(&[]);
    let client = uuid();
    let granted = op(1, 0, Some("a"), json!({"n": 1}));
    let grant = get_grant(&server, TOKEN, &envelope(&client, vec![granted.clone()])).await;
    let another = op(2, 1, Some("a"), json!({"n": 2}));
    let refused = problem(
        beacon(&server, &grant, &envelope(&client, vec![another.clone()])).await,
        403,
        "grant-mismatch",
    )
    .await;
    assert_eq!(refused["pointer"], "/ops/0");
    // Smuggled in beside the granted one.
    let refused = problem(
        beacon(&server, &grant, &envelope(&client, vec![granted, another])).await,
        403,
        "grant-mismatch",
    )
    .await;
    assert_eq!(refused["pointer"], "/ops/1");
    assert!(server.entity(TOKEN, "a").await.is_none(), "nothing applied");
}

#[tokio::test]
async fn a_grant_covers_only_the_bodies_it_was_given() {
    let server = Server::start(&[]);
    let client = uuid();
    let granted = op(1, 0, Some("a"), json!({"n": 1}));
    let grant = get_grant(&server, TOKEN, &envelope(&client, vec![granted.clone()])).await;
    for (field, value) in [
        ("payload", json!({"n": 666})),
        ("seq", json!(5)),
        ("entity", json!("b")),
        ("kind", json!("delete")),
        ("base_version", json!(3)),
    ] {
        let mut changed = granted.clone();
        changed[field] = value;
        problem(
            beacon(&server, &grant, &envelope(&client, vec![changed])).await,
            403,
            "grant-mismatch",
        )
        .await;
    }
    assert!(server.entity(TOKEN, "a").await.is_none());
    assert!(server.entity(TOKEN, "b").await.is_none());
    // Member order and white space do not matter: the granted body itself still goes.
    let text = format!("{{ \"ops\": [{}], \"client\": \"{client}\" }}", granted);
    let response = server
        .http
        .post(server.at(&format!("/v1/beacon?grant={grant}")))
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_grant_covers_only_its_client() {
    let server = Server::start(&[]);
    let the_op = op(1, 0, Some("a"), json!({}));
    let grant = get_grant(&server, TOKEN, &envelope(&uuid(), vec![the_op.clone()])).await;
    let refused = problem(
        beacon(&server, &grant, &envelope(&uuid(), vec![the_op])).await,
        403,
        "grant-mismatch",
    )
    .await;
    assert_eq!(refused["pointer"], "/client");
    assert!(server.entity(TOKEN, "a").await.is_none());
}

#[tokio::test]
async fn another_tenants_grant_writes_only_into_that_tenant() {
    let server = Server::start(&[]);
    // Tenant test has pr/1 at version 1.
    server
        .ops_ok(&envelope(
            &uuid(),
            vec![op(1, 0, Some("pr/1"), json!({"who": "test"}))],
        ))
        .await;
    // Tenant other's grant, for an op on its own pr/1. The beacon even carries test's bearer
    // token: the grant alone decides the tenant.
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some("pr/1"), json!({"who": "other"}))],
    );
    let grant = get_grant(&server, OTHER, &body).await;
    let response = server
        .http
        .post(server.at(&format!("/v1/beacon?grant={grant}")))
        .bearer_auth(TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        server.entity(TOKEN, "pr/1").await.unwrap(),
        json!({"id": "pr/1", "version": 1, "state": {"who": "test"}}),
        "this tenant's entity is untouched"
    );
    assert_eq!(
        server.entity(OTHER, "pr/1").await.unwrap()["state"],
        json!({"who": "other"})
    );
    // A grant cannot be pointed at a client of another tenant either.
    let mine = uuid();
    server
        .ops_ok(&envelope(&mine, vec![op(1, 0, Some("x"), json!({}))]))
        .await;
    let response = ask(
        &server,
        OTHER,
        &envelope(&mine, vec![op(2, 1, Some("x"), json!({}))]),
    )
    .await;
    problem(response, 403, "forbidden").await;
}

#[tokio::test]
async fn a_tampered_grant_is_invalid() {
    let server = Server::start(&[]);
    let body = envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]);
    let grant = get_grant(&server, TOKEN, &body).await;
    let (payload, mac) = grant.split_once('.').unwrap();
    let flip = |s: &str, i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    let tampered = [
        format!("{}.{mac}", flip(payload, 3)),
        format!("{}.{mac}", flip(payload, payload.len() / 2)),
        format!("{payload}.{}", flip(mac, 0)),
        format!("{payload}.{}", flip(mac, mac.len() - 2)),
        format!("{payload}.{payload}"),
        payload.to_owned(),
        "not-a-grant".to_owned(),
        String::new(),
    ];
    for text in &tampered {
        problem(beacon(&server, text, &body).await, 401, "grant-invalid").await;
    }
    // A grant of another server (another key) is no better.
    let other = Server::start(&[]);
    let foreign = get_grant(&other, TOKEN, &body).await;
    problem(beacon(&server, &foreign, &body).await, 401, "grant-invalid").await;
    assert!(server.entity(TOKEN, "a").await.is_none());
    // The genuine one still works.
    assert_eq!(beacon(&server, &grant, &body).await.status(), 200);
}

#[tokio::test]
async fn a_grant_key_file_lets_grants_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("grant.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let key = key.to_str().unwrap().to_owned();
    let args = ["--token", "test=secret", "--grant-key-file", key.as_str()];
    let mut server = Server::start_in(dir, &args, &[]);
    let body = envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]);
    let grant = get_grant(&server, TOKEN, &body).await;
    server.restart();
    assert_eq!(beacon(&server, &grant, &body).await.status(), 200);

    // The same key from the environment, in hex, makes the same grants.
    let hex = "07".repeat(32);
    let twin = Server::start_bare(&["--token", "test=secret"], &[("OUTBOX_GRANT_KEY", &hex)]);
    let next = envelope(&uuid(), vec![op(1, 0, Some("b"), json!({}))]);
    let from_twin = get_grant(&twin, TOKEN, &next).await;
    assert_eq!(beacon(&server, &from_twin, &next).await.status(), 200);

    // A short key is refused at start.
    let short = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--token", "t=s"])
        .env("OUTBOX_GRANT_KEY", "abcd")
        .output()
        .unwrap();
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 bytes"));
}

#[tokio::test]
async fn a_body_access_token_is_refused_unless_the_legacy_flag_is_on() {
    let server = Server::start(&[]);
    let client = uuid();
    let mut body = envelope(&client, vec![op(1, 0, Some("a"), json!({}))]);
    body["access_token"] = json!(TOKEN);
    let send = |server: &Server| {
        server
            .http
            .post(server.at("/v1/beacon"))
            .header("Content-Type", "text/plain;charset=UTF-8")
            .body(body.to_string())
            .send()
    };
    let refused = problem(send(&server).await.unwrap(), 401, "access-token-disabled").await;
    assert!(refused["detail"].as_str().unwrap().contains("grant"));
    assert!(server.entity(TOKEN, "a").await.is_none());

    let legacy = Server::start(&["--beacon-access-token"]);
    assert_eq!(send(&legacy).await.unwrap().status(), 200);
    assert_eq!(legacy.entity(TOKEN, "a").await.unwrap()["version"], 1);
}

#[tokio::test]
async fn a_beacon_without_credentials_is_refused_before_its_body_is_read() {
    let server = Server::start(&[]);
    for (what, target, slug) in [
        ("no credential", "/v1/beacon", "access-token-disabled"),
        (
            "a forged grant",
            "/v1/beacon?grant=AAAA.BBBB",
            "grant-invalid",
        ),
    ] {
        let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
        // A large body is announced and never sent: the answer can only come if the server
        // decides from the head alone.
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut stream, Duration::from_secs(30)).await;
        assert_eq!(status_of(&answer), 401, "{what}: {answer}");
        assert_eq!(
            body_of(&answer)["type"],
            format!("https://outbox.dev/problems/{slug}"),
            "{what}"
        );
    }
    // A grant beacon's body is capped at 64 KiB, the browsers' keepalive budget.
    let client = uuid();
    let big = op(1, 0, Some("big"), json!({"pad": "x".repeat(70_000)}));
    let grant = get_grant(&server, TOKEN, &envelope(&client, vec![big.clone()])).await;
    problem(
        beacon(&server, &grant, &envelope(&client, vec![big])).await,
        413,
        "too-large",
    )
    .await;
}

#[tokio::test]
async fn grants_need_a_token_a_client_of_the_tenant_and_at_most_16_ops() {
    let server = Server::start(&[]);
    let client = uuid();
    let ops = |n: i64| {
        envelope(
            &client,
            (1..=n)
                .map(|i| op(i, 0, Some(&format!("e{i}")), json!({})))
                .collect(),
        )
    };
    assert_eq!(ask(&server, TOKEN, &ops(16)).await.status(), 200);
    let refused = problem(ask(&server, TOKEN, &ops(17)).await, 400, "malformed").await;
    assert_eq!(refused["pointer"], "/ops");
    problem(ask(&server, "wrong", &ops(1)).await, 401, "unauthorized").await;
    let anonymous = server
        .http
        .post(server.at("/v1/grants"))
        .json(&ops(1))
        .send()
        .await
        .unwrap();
    problem(anonymous, 401, "unauthorized").await;
    problem(ask(&server, OTHER, &ops(1)).await, 403, "forbidden").await;
    let garbage = server
        .http
        .post(server.at("/v1/grants"))
        .bearer_auth(TOKEN)
        .body("{\"client\":")
        .send()
        .await
        .unwrap();
    problem(garbage, 400, "malformed").await;
    // Nothing of it was applied.
    assert!(server.entity(TOKEN, "e1").await.is_none());
}
