//! The connection layer against raw sockets: every phase of a connection has a timeout, and
//! the number of open connections has a cap. The flags are set short so that the tests run
//! fast; no test asserts how long anything took, only that the server closed or answered
//! (each wait has a guard far above the timeout, so a server that never closes fails).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Server, TOKEN, addr, body_of, envelope, op, read_until_closed, status_of, uuid};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const GUARD: Duration = Duration::from_secs(30);

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(addr(server)).await.expect("connect")
}

/// Whether the server closed `stream` while this side kept sending `trickle` every 100 ms.
async fn closed_while_trickling(stream: &mut TcpStream, trickle: &[u8]) -> bool {
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut buf = [0u8; 1024];
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if stream.write_all(trickle).await.is_err() {
                    return true;
                }
            }
        }
    }
    false
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-timeout", "300ms"]);
    let mut silent = connect(&server).await;
    let answer = read_until_closed(&mut silent, GUARD).await;
    assert!(answer.is_empty(), "closed without an answer: {answer}");
    assert!(server.healthy().await);
}

#[tokio::test]
async fn a_trickled_request_head_is_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-timeout", "500ms"]);
    let mut slow = connect(&server).await;
    slow.write_all(b"POST /v1/ops HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One more header byte every 100 ms never completes the head, and does not extend it.
    assert!(closed_while_trickling(&mut slow, b"X").await);
    let metrics = server
        .http
        .get(server.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("outbox_timeouts_total{kind=\"header\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    // Without faults (and so without the admin token) answers keep connections alive.
    let server = Server::start_bare(&["--token", "test=secret", "--idle-timeout", "300ms"], &[]);
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, GUARD).await;
    assert_eq!(status_of(&answer), 200);
    assert!(!answer.to_ascii_lowercase().contains("connection: close"));
}

#[tokio::test]
async fn an_idle_timeout_does_not_cut_a_connection_that_keeps_working() {
    let server = Server::start_bare(
        &[
            "--token",
            "test=secret",
            "--idle-timeout",
            "1s",
            "--header-timeout",
            "1s",
        ],
        &[],
    );
    let mut stream = connect(&server).await;
    let mut buf = vec![0u8; 4096];
    // Ten requests 300 ms apart on one connection: each gap is shorter than the idle
    // timeout, and all of it is longer.
    for _ in 0..10 {
        stream
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(GUARD, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the connection was closed while in use");
        assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_the_connection_closes() {
    let server = Server::start(&["--body-timeout", "500ms", "--request-timeout", "5s"]);
    let mut stream = connect(&server).await;
    let head = format!(
        "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"client\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, GUARD).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    let problem = body_of(&answer);
    assert_eq!(problem["type"], "https://outbox.dev/problems/body-timeout");
    assert!(server.healthy().await);
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_gets_408() {
    let server = Server::start(&["--body-min-rate", "1000", "--body-timeout", "30s"]);
    let mut stream = connect(&server).await;
    let head = format!(
        "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 10 bytes a second, far under 1000: refused once the grace is over, well before the
    // 30 s body timeout (the guard of this test is the same 30 s).
    assert!(closed_while_trickling(&mut stream, b" ").await);
}

#[tokio::test]
async fn a_request_past_the_request_timeout_gets_503_and_applies_nothing() {
    let server = Server::start(&["--request-timeout", "500ms", "--body-timeout", "500ms"]);
    server
        .faults(json!([{"route": "ops", "times": 1, "action": {"delay_ms": 1500}}]))
        .await;
    let body = envelope(&uuid(), vec![op(1, 0, Some("slow"), json!({}))]);
    let response = server.ops(TOKEN, &body).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://outbox.dev/problems/request-timeout"
    );
    // The delay was before the apply, and the request ended with it.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(server.entity(TOKEN, "slow").await.is_none());
    // The resend goes through.
    assert_eq!(server.ops_ok(&body).await[0]["status"], "applied");
}

#[tokio::test]
async fn connections_past_the_cap_get_503_with_retry_after() {
    let server = Server::start(&["--max-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&server).await);
    }
    // The accept loop takes connections in order; give it the three first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect(&server).await;
    over.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut over, GUARD).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    assert_eq!(
        body_of(&answer)["type"],
        "https://outbox.dev/problems/too-many-connections"
    );
    // A place frees up when one closes.
    held.pop();
    common::eventually(Duration::from_secs(10), "a free place", || async {
        server.healthy().await
    })
    .await;
}

#[tokio::test]
async fn one_address_past_its_cap_leaves_room_for_others() {
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    let target: SocketAddr = addr(&server).parse().unwrap();
    let from = |ip: &str| {
        let source: SocketAddr = format!("{ip}:0").parse().unwrap();
        async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(source).unwrap();
            socket.connect(target).await.unwrap()
        }
    };
    let _a = from("127.0.0.2").await;
    let _b = from("127.0.0.2").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = from("127.0.0.2").await;
    let answer = read_until_closed(&mut third, GUARD).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(
        body_of(&answer)["detail"]
            .as_str()
            .unwrap()
            .contains("this address")
    );
    // Another address is not affected.
    let mut other = from("127.0.0.3").await;
    other
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status_of(&read_until_closed(&mut other, GUARD).await), 200);
    assert!(server.healthy().await);
}

#[tokio::test]
async fn hyper_level_refusals_are_problem_json() {
    let server = Server::start(&[]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a bad method token",
            b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a bad request target",
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "an unknown HTTP version",
            b"GET / HTTP/9.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a bad header name",
            b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a bad Content-Length",
            b"POST /v1/ops HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
        ),
        (
            "two Content-Lengths",
            b"POST /v1/ops HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                .to_vec(),
            400,
        ),
        (
            "an unknown Transfer-Encoding",
            b"POST /v1/ops HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a header too large",
            [
                &b"GET / HTTP/1.1\r\nHost: x\r\nX: "[..],
                &vec![b'a'; 100_000],
                b"\r\n\r\n",
            ]
            .concat(),
            431,
        ),
        (
            "too many headers",
            [
                b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(),
                (0..200)
                    .flat_map(|i| format!("X{i}: a\r\n").into_bytes())
                    .collect(),
                b"\r\n".to_vec(),
            ]
            .concat(),
            431,
        ),
        (
            // hyper's 414 (past 65,534 bytes) lies beyond the 64 KiB head limit.
            "a request target too long",
            [
                &b"GET /"[..],
                &vec![b'a'; 70_000],
                b" HTTP/1.1\r\nHost: x\r\n\r\n",
            ]
            .concat(),
            431,
        ),
        (
            "a bad chunk",
            format!(
                "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\nzz\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "an unknown method",
            b"FOO /v1/ops HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
        ),
        (
            "bad UTF-8 in a path",
            format!(
                "GET /v1/entities/%ff HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
    ];
    for (what, request, status) in cases {
        let mut stream = connect(&server).await;
        stream.write_all(&request).await.unwrap();
        let answer = read_until_closed(&mut stream, GUARD).await;
        assert_eq!(status_of(&answer), status, "{what}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{what}: {answer}"
        );
        let problem = body_of(&answer);
        assert_eq!(problem["status"], status, "{what}");
        assert!(problem["detail"].is_string(), "{what}");
    }
    assert!(server.healthy().await);
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_hand_and_drops_idle_and_half_sent_connections() {
    let mut server = Server::start(&[]);
    // Connections that hold nothing back: one that sent half a head, one that sent nothing.
    let mut half = connect(&server).await;
    half.write_all(b"POST /v1/ops HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let _silent = connect(&server).await;
    // A request in hand: held in the handler by a scripted delay.
    server
        .faults(json!([{"route": "ops", "times": 1, "action": {"delay_ms": 1000}}]))
        .await;
    let body = envelope(&uuid(), vec![op(1, 0, Some("last"), json!({}))]);
    let running = {
        let (http, url, body) = (server.http.clone(), server.at("/v1/ops"), body.clone());
        tokio::spawn(async move { http.post(url).bearer_auth(TOKEN).json(&body).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate(GUARD);
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    let response = running
        .await
        .unwrap()
        .expect("the request in hand is answered");
    assert_eq!(response.status(), 200);
    let answer = read_until_closed(&mut half, GUARD).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(status.1.stderr().contains("stopped"));
}
