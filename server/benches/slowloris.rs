//! Healthy traffic while many stalled connections are open, on the real binary.
//!
//! `cargo bench -p outbox-server --bench slowloris [-- --seconds N] [-- --stalled N]`
//!
//! Four healthy clients (from 127.0.0.1) each send one single-op request at a time, in five
//! rounds of "without stalled connections" and "with them" (N seconds of each side in all).
//! In the second half of each round `--stalled` (default 1,000) connections from 127.0.0.2
//! to 127.0.0.21 stall: a quarter send nothing, a quarter send half a request head, a quarter
//! send a whole unauthenticated beacon head with a large Content-Length and no body, and a
//! quarter send an authenticated head and then one body byte a second. A stalled connection
//! that the server closes is opened again a second later, so the count stays up (reopening at
//! once would measure a connection flood instead, which costs CPU whatever the server does).
//! Between rounds the stallers close their connections. The figure is the healthy p99 with
//! them as a ratio to without, in the same run. At the end the stallers stay for 12 s more,
//! and the bench reports how long the server let each kind of stalled connection live.
//!
//! Raise the fd limit if it is below about 3 × `--stalled`: the bench tries (setrlimit, up to
//! the hard limit) and prints what it got; the server inherits it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{arg, ms, now_ms, quantile, raise_fd_limit, start, uuid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Mutex;

const TOKEN: &str = "secret";
const HEALTHY: u64 = 4;
/// Stalled connections per source address: under the default per-IP cap, so that the server
/// really holds them all and the timeouts, not the cap, are what is measured.
const PER_SOURCE: usize = 50;
const ROUNDS: u32 = 5;
/// Time for the stallers to connect, or to go, before a side of a round is measured.
const SETTLE: Duration = Duration::from_millis(1500);

async fn healthy(
    http: reqwest::Client,
    url: String,
    client: String,
    seq: Arc<AtomicU64>,
    until: Instant,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    while Instant::now() < until {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let body = json!({"client": client, "ops": [{"id": uuid(0xc0ffee, n), "seq": n, "prev": 0,
            "entity": format!("h/{n}"), "kind": "probe", "payload": {"n": n}, "created_at": now_ms()}]});
        let started = Instant::now();
        let response = http
            .post(format!("{url}/v1/ops"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("healthy request");
        let status = response.status();
        let _ = response.bytes().await;
        samples.push(started.elapsed());
        assert_eq!(status, 200, "healthy request answered {status}");
    }
    samples
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Silent,
    HalfHead,
    UnauthenticatedBody,
    SlowBody,
}

const KINDS: [Kind; 4] = [
    Kind::Silent,
    Kind::HalfHead,
    Kind::UnauthenticatedBody,
    Kind::SlowBody,
];

/// Lifetimes (open to closed by the server) of stalled connections, per kind.
type Lifetimes = Arc<Mutex<Vec<Vec<Duration>>>>;

/// Whether the stallers stall now, and whether the run is over.
#[derive(Default)]
struct Switch {
    on: AtomicBool,
    stop: AtomicBool,
}

/// Keeps one stalled connection of `kind` open from `source` while the switch is on,
/// reopening it a second after the server closes it.
async fn stall(
    server: SocketAddr,
    source: SocketAddr,
    kind: Kind,
    switch: Arc<Switch>,
    lifetimes: Lifetimes,
    opened: Arc<AtomicU64>,
) {
    while !switch.stop.load(Ordering::Relaxed) {
        if !switch.on.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Ok(socket) = TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(source).is_err() {
            return;
        }
        let Ok(mut stream) = socket.connect(server).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        let since = Instant::now();
        let head: Vec<u8> = match kind {
            Kind::Silent => Vec::new(),
            Kind::HalfHead => b"POST /v1/ops HTTP/1.1\r\nHost: x\r\nContent-Ty".to_vec(),
            Kind::UnauthenticatedBody => b"POST /v1/beacon HTTP/1.1\r\nHost: x\r\n\
                Content-Type: text/plain\r\nContent-Length: 60000\r\n\r\n"
                .to_vec(),
            Kind::SlowBody => format!(
                "POST /v1/ops HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            .into_bytes(),
        };
        if stream.write_all(&head).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        let mut next_byte = since + Duration::from_secs(1);
        // Wait for the server to close (reading its answer, if any), trickling the body of
        // the slow kind; close when the switch goes off.
        let closed_by_server = loop {
            if !switch.on.load(Ordering::Relaxed) || switch.stop.load(Ordering::Relaxed) {
                break false;
            }
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if matches!(kind, Kind::SlowBody) && Instant::now() >= next_byte {
                        next_byte += Duration::from_secs(1);
                        if stream.write_all(b" ").await.is_err() {
                            break true;
                        }
                    }
                }
            }
        };
        if closed_by_server {
            lifetimes.lock().await[kind as usize].push(since.elapsed());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("slowloris: run it with `cargo bench -p outbox-server --bench slowloris`");
        return;
    }
    let seconds: u64 = arg(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let stalled: usize = arg(&args, "--stalled")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let (soft, hard) = raise_fd_limit((stalled as u64) * 3 + 256);
    println!("fd limit: soft {soft}, hard {hard} (the server inherits it)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(
        &dir.path().join("slow.db"),
        &dir.path().join("server.log"),
        &["--token", "t=secret", "--rate", "0"],
    );
    let url = server.url.clone();
    let addr: SocketAddr = server.addr.parse().expect("addr");
    runtime.block_on(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let seq = Arc::new(AtomicU64::new(1));
        let run = |span: Duration| {
            let until = Instant::now() + span;
            let tasks: Vec<_> = (0..HEALTHY)
                .map(|c| {
                    tokio::spawn(healthy(
                        http.clone(),
                        url.clone(),
                        uuid(0xc, c),
                        seq.clone(),
                        until,
                    ))
                })
                .collect();
            async move {
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.expect("healthy task"));
                }
                all
            }
        };
        run(Duration::from_millis(500)).await;

        let switch = Arc::new(Switch::default());
        let lifetimes: Lifetimes = Arc::new(Mutex::new(vec![Vec::new(); KINDS.len()]));
        let opened = Arc::new(AtomicU64::new(0));
        let mut stallers = Vec::new();
        for i in 0..stalled {
            let source: SocketAddr = format!("127.0.0.{}:0", 2 + i / PER_SOURCE)
                .parse()
                .expect("source");
            let kind = KINDS[i % KINDS.len()];
            stallers.push(tokio::spawn(stall(
                addr,
                source,
                kind,
                switch.clone(),
                lifetimes.clone(),
                opened.clone(),
            )));
        }
        let span = Duration::from_secs(seconds) / ROUNDS;
        let (mut alone, mut with) = (Vec::new(), Vec::new());
        let mut opened_per_round = Vec::new();
        for _ in 0..ROUNDS {
            switch.on.store(false, Ordering::Relaxed);
            tokio::time::sleep(SETTLE).await;
            alone.extend(run(span).await);
            let before = opened.load(Ordering::Relaxed);
            switch.on.store(true, Ordering::Relaxed);
            tokio::time::sleep(SETTLE).await;
            opened_per_round.push(opened.load(Ordering::Relaxed) - before);
            with.extend(run(span).await);
        }
        // Hold them past the default header timeout (10 s), to see each kind closed.
        switch.on.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(12)).await;
        switch.stop.store(true, Ordering::Relaxed);
        for s in stallers {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }

        println!(
            "\nslowloris: {HEALTHY} healthy clients, single-op requests \
             ({ROUNDS} rounds, {seconds} s of each side)\n"
        );
        println!("| healthy traffic | requests | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        let row = |what: &str, s: &mut Vec<Duration>| {
            let (p50, p99, max) = (quantile(s, 0.5), quantile(s, 0.99), quantile(s, 1.0));
            println!(
                "| {what} | {} | {} | {} | {} |",
                s.len(),
                ms(p50),
                ms(p99),
                ms(max)
            );
            (p50, p99)
        };
        let (a50, a99) = row("without stalled connections", &mut alone);
        let (w50, w99) = row(&format!("with {stalled} stalled connections"), &mut with);
        println!(
            "\nratios (with / without): p50 {:.2}x, p99 {:.2}x",
            w50.as_secs_f64() / a50.as_secs_f64(),
            w99.as_secs_f64() / a99.as_secs_f64()
        );
        println!(
            "stalled connections opened before each measured side: {opened_per_round:?}; {} in all",
            opened.load(Ordering::Relaxed)
        );
        let mut lifetimes = lifetimes.lock().await;
        for (kind, l) in KINDS.iter().zip(lifetimes.iter_mut()) {
            if l.is_empty() {
                println!("{kind:?}: none closed by the server while the bench ran");
            } else {
                println!(
                    "{kind:?}: {} closed by the server, lifetime median {} ms, max {} ms",
                    l.len(),
                    ms(quantile(l, 0.5)),
                    ms(quantile(l, 1.0))
                );
            }
        }
    });
    drop(server);
}
