//! The edges of the server: rate and body limits, malformed input, health, metrics, CORS and
//! the admin switch.

mod common;

use std::time::Duration;

use common::{ADMIN, OTHER, Server, TOKEN, addr, envelope, op, read_until_closed, status_of, uuid};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes over one connection and returns the status code of the answer.
async fn raw_status(server: &Server, request: &[u8]) -> u16 {
    let addr = server.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("application/problem+json"), "{text}");
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text}"))
}

async fn assert_problem(response: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{what}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
    assert_eq!(body["status"], status, "{what}");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("https://outbox.dev/problems/"),
        "{what}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{what}: {body}"
    );
    body
}

#[tokio::test]
async fn a_client_past_its_rate_gets_429_with_retry_after() {
    // One token per 100 s after a burst of 3, so the fourth request is over the rate however
    // slow this machine is.
    let server = Server::start(&["--rate", "0.01", "--burst", "3"]);
    let client = uuid();
    for seq in 1..=3 {
        server
            .ops_ok(&envelope(
                &client,
                vec![op(seq, 0, Some(&format!("e{seq}")), json!({}))],
            ))
            .await;
    }
    let over = server
        .ops(
            TOKEN,
            &envelope(&client, vec![op(4, 0, Some("e4"), json!({}))]),
        )
        .await
        .unwrap();
    let retry_after: u64 = over.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body = assert_problem(over, 429, "rate limit").await;
    assert_eq!(body["type"], "https://outbox.dev/problems/rate-limited");
    assert!(
        server.entity(TOKEN, "e4").await.is_none(),
        "nothing applied"
    );
    // The bucket is per client.
    server
        .ops_ok(&envelope(&uuid(), vec![op(1, 0, Some("e5"), json!({}))]))
        .await;
    let log = server.log("test").await;
    let limited = log.iter().find(|e| e["entity"] == "e4").expect("logged");
    assert_eq!(limited["http"], 429);
    assert!(limited["status"].is_null());
}

#[tokio::test]
async fn a_body_past_the_limit_gets_413_by_length_or_while_streaming() {
    let server = Server::start(&["--max-body", "1024"]);
    let client = uuid();
    let big = envelope(
        &client,
        vec![op(1, 0, Some("a"), json!({"pad": "x".repeat(2000)}))],
    );
    let response = server.ops(TOKEN, &big).await.unwrap();
    let body = assert_problem(response, 413, "content-length").await;
    assert_eq!(body["type"], "https://outbox.dev/problems/too-large");

    // Chunked, so the server only learns the size while reading.
    let payload = big.to_string();
    let mut request = format!(
        "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in payload.as_bytes().chunks(500) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_status(&server, &request).await, 413);

    // A body under the limit still goes through, and nothing of the big one was applied.
    assert!(server.entity(TOKEN, "a").await.is_none());
    server
        .ops_ok(&envelope(
            &client,
            vec![op(1, 0, Some("a"), json!({"small": 1}))],
        ))
        .await;
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_problem_and_the_server_stays_healthy() {
    let server = Server::start(&[]);
    let client = uuid();
    let good = || op(1, 0, Some("a"), json!({"x": 1}));
    let with = |field: &str, value: Value| {
        let mut o = good();
        o[field] = value;
        envelope(&client, vec![o]).to_string()
    };
    let without = |field: &str| {
        let mut o = good();
        o.as_object_mut().unwrap().remove(field);
        envelope(&client, vec![o]).to_string()
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, String, u16)> = vec![
        ("not JSON", "{\"client\":".into(), 400),
        ("empty body", String::new(), 400),
        ("JSON array", "[]".into(), 400),
        ("JSON string", "\"ops\"".into(), 400),
        ("nested 100000 deep", deep, 400),
        ("client missing", json!({"ops": [good()]}).to_string(), 400),
        (
            "client not a UUID",
            envelope("c-1", vec![good()]).to_string(),
            400,
        ),
        (
            "client in upper case",
            envelope(&client.to_uppercase(), vec![good()]).to_string(),
            400,
        ),
        ("ops missing", json!({"client": client}).to_string(), 400),
        (
            "ops an object",
            json!({"client": client, "ops": {}}).to_string(),
            400,
        ),
        ("ops empty", envelope(&client, vec![]).to_string(), 400),
        (
            "501 ops",
            envelope(&client, (0..501).map(|_| good()).collect()).to_string(),
            400,
        ),
        (
            "op a number",
            json!({"client": client, "ops": [7]}).to_string(),
            400,
        ),
        ("id missing", without("id"), 400),
        ("id not a UUID", with("id", json!("op-1")), 400),
        ("seq a string", with("seq", json!("1")), 400),
        ("seq a fraction", with("seq", json!(1.5)), 400),
        (
            "seq past f64",
            envelope(&client, vec![]).to_string().replace(
                "[]",
                &format!(
                    "[{}]",
                    good().to_string().replace("\"seq\":1", "\"seq\":1e400")
                ),
            ),
            400,
        ),
        ("prev missing", without("prev"), 400),
        ("entity a number", with("entity", json!(17)), 400),
        ("entity missing", without("entity"), 400),
        (
            "entity 257 characters",
            with("entity", json!("e".repeat(257))),
            400,
        ),
        ("kind missing", without("kind"), 400),
        (
            "kind 65 characters",
            with("kind", json!("k".repeat(65))),
            400,
        ),
        ("payload missing", without("payload"), 400),
        (
            "created_at a string",
            with("created_at", json!("yesterday")),
            400,
        ),
        (
            "base_version a string",
            with("base_version", json!("6")),
            400,
        ),
        (
            "access_token a number",
            json!({"client": client, "ops": [good()], "access_token": 1}).to_string(),
            400,
        ),
    ];
    assert!(cases.len() >= 15);
    for (what, body, status) in &cases {
        let response = server
            .http
            .post(server.at("/v1/ops"))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let problem = assert_problem(response, *status, what).await;
        assert_eq!(
            problem["type"], "https://outbox.dev/problems/malformed",
            "{what}"
        );
    }

    // Bytes that are not UTF-8.
    let response = server
        .http
        .post(server.at("/v1/ops"))
        .bearer_auth(TOKEN)
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid UTF-8").await;
    // The keyed route: two ops, and a broken key.
    let two = envelope(&client, vec![good(), op(2, 1, Some("a"), json!({}))]);
    assert_problem(
        server.op(TOKEN, Some("k"), &two).await.unwrap(),
        400,
        "two ops on /v1/op",
    )
    .await;
    let one = envelope(&client, vec![good()]);
    assert_problem(
        server
            .op(TOKEN, Some("\"unterminated"), &one)
            .await
            .unwrap(),
        400,
        "bad key",
    )
    .await;
    // Routing and admin input.
    assert_problem(
        server.http.get(server.at("/v1/ops")).send().await.unwrap(),
        405,
        "GET /v1/ops",
    )
    .await;
    assert_problem(
        server
            .http
            .get(server.at("/v2/nothing"))
            .send()
            .await
            .unwrap(),
        404,
        "no route",
    )
    .await;
    let bad_rule = server
        .http
        .post(server.at("/v1/admin/faults"))
        .bearer_auth(ADMIN)
        .json(&json!({"rules": [{"route": "ops", "action": {"status": 200}}]}))
        .send()
        .await
        .unwrap();
    assert_problem(bad_rule, 400, "a fault rule with status 200").await;
    let bad_log = server
        .http
        .get(server.at("/v1/admin/log"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_problem(bad_log, 400, "admin log without tenant").await;

    assert!(server.healthy().await, "still healthy");
    let results = server.ops_ok(&envelope(&client, vec![good()])).await;
    assert_eq!(results[0]["status"], "applied", "still applying");
    assert!(!server.stderr().contains("panicked"));
}

#[tokio::test]
async fn health_answers_get_and_head_without_auth() {
    let server = Server::start(&[]);
    let response = server
        .http
        .get(server.at("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    let response = server
        .http
        .head(server.at("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn metrics_count_requests_results_and_faults() {
    let server = Server::start(&[]);
    let client = uuid();
    server
        .ops_ok(&envelope(&client, vec![op(1, 0, Some("a"), json!({}))]))
        .await;
    server
        .faults(json!([{"route": "ops", "times": 1, "action": {"status": 503}}]))
        .await;
    let response = server
        .ops(
            TOKEN,
            &envelope(&client, vec![op(2, 1, Some("a"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let text = server
        .http
        .get(server.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "outbox_http_requests_total{route=\"/v1/ops\",status=\"200\"} 1",
        "outbox_http_requests_total{route=\"/v1/ops\",status=\"503\"} 1",
        "outbox_op_results_total{status=\"applied\"} 1",
        "outbox_faults_injected_total{kind=\"status\"} 1",
        "# TYPE outbox_storage_seconds histogram",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[tokio::test]
async fn cors_preflight_allows_authorization_json_and_idempotency_key() {
    let server = Server::start(&["--cors-origin", "*"]);
    let origin = "http://127.0.0.1:9";
    let response = server
        .http
        .request(reqwest::Method::OPTIONS, server.at("/v1/op"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for h in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );

    // Actual answers, errors included, carry the CORS headers and expose Retry-After.
    let response = server
        .http
        .post(server.at("/v1/ops"))
        .header("Origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    assert!(
        response.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("retry-after")
    );
}

#[tokio::test]
async fn cors_names_only_the_listed_origins() {
    let server = Server::start(&["--cors-origin", "http://127.0.0.1:9"]);
    let ask = |origin: &'static str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, server.at("/v1/ops"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
    };
    let listed = ask("http://127.0.0.1:9").await.unwrap();
    assert_eq!(
        listed.headers()["access-control-allow-origin"],
        "http://127.0.0.1:9"
    );
    let other = ask("http://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_token_and_exist_only_when_enabled() {
    let server = Server::start(&[]);
    let response = server
        .http
        .get(server.at("/v1/admin/log?tenant=test"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "a tenant token on admin").await;
    let response = server
        .http
        .delete(server.at("/v1/admin/faults"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "no token on admin").await;
    let response = server
        .http
        .delete(server.at("/v1/admin/faults"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    // Without --admin-token the routes do not exist.
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--token", "test=secret", "--db"])
        .arg(dir.path().join("db"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(&mut child);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(_kill.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().trim_start_matches("listening on ");
    let response = server
        .http
        .get(format!("{url}/v1/admin/log?tenant=test"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "admin off").await;
    // Without fault injection connections are kept alive.
    let response = server
        .http
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("connection").is_none());
}

#[tokio::test]
async fn every_answer_closes_its_connection_while_faults_are_possible() {
    // Browsers silently resend a request that fails on a reused connection, which would hide
    // injected drops; one connection per request prevents that.
    let server = Server::start(&["--cors-origin", "*"]);
    let health = server
        .http
        .get(server.at("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.headers()["connection"], "close");
    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.at("/v1/ops"))
        .header("Origin", "http://127.0.0.1:9")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.headers()["connection"], "close");
    let ops = server
        .ops(
            TOKEN,
            &envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(ops.headers()["connection"], "close");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn help_lists_every_flag() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--db",
        "--token",
        "--retention",
        "--rate",
        "--burst",
        "--max-body",
        "--cors-origin",
        "--admin-token",
        "--fault-seed",
        "--fault-5xx",
        "--fault-429",
        "--fault-delay",
        "--fault-delay-ms",
        "--fault-reset",
        "--fault-drop-after-commit",
        "--demo-pages",
        "--tokens-file",
        "--tenant-rate",
        "--tenant-burst",
        "--max-state-bytes",
        "--max-answer-state-bytes",
        "--header-timeout",
        "--idle-timeout",
        "--body-timeout",
        "--body-min-rate",
        "--request-timeout",
        "--max-connections",
        "--max-connections-per-ip",
        "--grant-key-file",
        "--grant-ttl",
        "--beacon-access-token",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn demo_pages_serve_static_files_under_demo_only_when_enabled() {
    let root = tempfile::tempdir().unwrap();
    let pages = root.path().join("pages");
    std::fs::create_dir_all(pages.join("pr")).unwrap();
    std::fs::write(pages.join("pr/17.html"), "<h1>PR 17</h1>").unwrap();
    std::fs::write(root.path().join("secret.txt"), "not for the web").unwrap();
    let dir = pages.to_str().unwrap();
    let server = Server::start(&["--demo-pages", dir]);
    let page = server
        .http
        .get(server.at("/demo/pr/17.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.text().await.unwrap(), "<h1>PR 17</h1>");
    // %2F survives URL normalisation, so the server sees the `..` (and must refuse it).
    for missing in [
        "/demo/pr/18.html",
        "/demo/pr",
        "/demo/pr%2F..%2F..%2Fsecret.txt",
        "/demo/..%2Fsecret.txt",
        "/demo/",
    ] {
        let response = server.http.get(server.at(missing)).send().await.unwrap();
        assert_problem(response, 404, missing).await;
    }
    // The op routes are untouched.
    assert!(server.healthy().await);

    let off = Server::start(&[]);
    let response = off
        .http
        .get(off.at("/demo/pr/17.html"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "demo pages off").await;
}

#[tokio::test]
async fn a_tenant_past_its_rate_gets_429_whatever_client_ids_it_makes_up() {
    let server = Server::start(&["--tenant-rate", "0.01", "--tenant-burst", "5"]);
    for i in 0..5 {
        let results = server
            .ops_ok(&envelope(
                &uuid(),
                vec![op(1, 0, Some(&format!("e{i}")), json!({}))],
            ))
            .await;
        assert_eq!(results[0]["status"], "applied");
    }
    // A sixth fresh client id is still this tenant.
    let over = server
        .ops(
            TOKEN,
            &envelope(&uuid(), vec![op(1, 0, Some("e5"), json!({}))]),
        )
        .await
        .unwrap();
    assert!(over.headers().contains_key("retry-after"));
    let body = assert_problem(over, 429, "tenant rate").await;
    assert!(body["detail"].as_str().unwrap().contains("tenant"));
    assert!(server.entity(TOKEN, "e5").await.is_none());
    // The tenant's bucket is checked from the head alone: a huge announced body that never
    // comes is answered at once.
    let mut stream = tokio::net::TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 900000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(30)).await;
    assert_eq!(status_of(&answer), 429, "{answer}");
    // Another tenant is not affected.
    let response = server
        .ops(
            OTHER,
            &envelope(&uuid(), vec![op(1, 0, Some("x"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn refusals_of_another_tenants_client_are_limited_with_the_tenant() {
    let server = Server::start(&["--tenant-rate", "0.01", "--tenant-burst", "4"]);
    let theirs = uuid();
    let response = server
        .ops(
            OTHER,
            &envelope(&theirs, vec![op(1, 0, Some("a"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut statuses = Vec::new();
    for seq in 1..=6 {
        let response = server
            .ops(
                TOKEN,
                &envelope(&theirs, vec![op(seq, 0, Some("b"), json!({}))]),
            )
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [403, 403, 403, 403, 429, 429]);
}

#[tokio::test]
async fn an_address_with_many_refusals_is_slowed_down_before_its_credentials_are_checked() {
    let server = Server::start(&[]);
    let body = envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]);
    let mut statuses = Vec::new();
    for _ in 0..120 {
        statuses.push(server.ops("guess", &body).await.unwrap().status().as_u16());
    }
    // A burst of 100 refusals, then 429 with Retry-After (10 more refusals a second).
    assert!(statuses[..100].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[100..].contains(&429), "{statuses:?}");
    let blocked = server.ops(TOKEN, &body).await.unwrap();
    if blocked.status() == 429 {
        assert!(blocked.headers().contains_key("retry-after"));
    }
    // The address gets its turn back.
    common::eventually(
        Duration::from_secs(30),
        "the refusal bucket to refill",
        || async { server.ops(TOKEN, &body).await.unwrap().status() == 200 },
    )
    .await;
}

#[tokio::test]
async fn tokens_come_from_a_file_or_the_environment_and_argv_tokens_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# tenants\n\nfiled = file-secret\n").unwrap();
    let file = file.to_str().unwrap().to_owned();
    let server = Server::start_in(
        dir,
        &["--tokens-file", &file],
        &[("OUTBOX_TOKENS", "env1=env-secret-1, env2=env-secret-2")],
    );
    for token in ["file-secret", "env-secret-1", "env-secret-2"] {
        let response = server
            .ops(
                token,
                &envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{token}");
    }
    assert!(!server.stderr().contains("--token puts bearer tokens"));
    let argv = Server::start(&[]);
    assert!(
        argv.stderr()
            .contains("--token puts bearer tokens on the command line")
    );
    // The same file through OUTBOX_TOKENS_FILE.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    std::fs::write(&path, "via=env-file\n").unwrap();
    let via = Server::start_bare(&[], &[("OUTBOX_TOKENS_FILE", path.to_str().unwrap())]);
    let response = via
        .ops(
            "env-file",
            &envelope(&uuid(), vec![op(1, 0, Some("a"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Runs the binary with `args` and expects it to refuse to start, saying `why`.
fn refuses_to_start(args: &[&str], why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("db"))
        .args(args)
        .env_remove("OUTBOX_TOKENS")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(why), "{args:?}: {stderr}");
}

#[tokio::test]
async fn bad_flags_are_refused_at_start() {
    refuses_to_start(
        &["--token", "t=same", "--admin-token", "same"],
        "--admin-token must differ",
    );
    refuses_to_start(&["--token", "t=x", "--token", "u=x"], "same token");
    refuses_to_start(&["--rate", "1e-20"], "--rate must be 0 (off) or between");
    refuses_to_start(&["--rate", "NaN"], "--rate must be");
    refuses_to_start(&["--tenant-rate=-1"], "--tenant-rate must be");
    refuses_to_start(&["--burst", "0.5"], "--burst must be");
    refuses_to_start(&["--grant-ttl", "2h"], "--grant-ttl must be between");
    refuses_to_start(&["--header-timeout", "0s"], "--header-timeout must be");
    refuses_to_start(
        &["--body-timeout", "1m", "--request-timeout", "30s"],
        "--body-timeout must not be longer",
    );
    refuses_to_start(&["--tokens-file", "/nonexistent/tokens"], "--tokens-file");
}

#[tokio::test]
async fn the_slowest_rate_answers_a_long_retry_after_and_keeps_running() {
    // One request per 1,000 s: the wait is long, and must be answered, not abort the server
    // (a tiny rate once overflowed Duration::from_secs_f64 with panic = "abort").
    let server = Server::start(&["--rate", "0.001", "--burst", "1"]);
    let client = uuid();
    server
        .ops_ok(&envelope(&client, vec![op(1, 0, Some("a"), json!({}))]))
        .await;
    let over = server
        .ops(
            TOKEN,
            &envelope(&client, vec![op(2, 0, Some("b"), json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(over.status(), 429);
    let wait: u64 = over.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((990..=1000).contains(&wait), "{wait}");
    assert!(server.healthy().await);
}
