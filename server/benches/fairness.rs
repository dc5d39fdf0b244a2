//! Fairness between tenants, and the stall of a retention purge, on the real binary.
//!
//! `cargo bench -p outbox-server --bench fairness [-- --seconds N] [-- --only flood|purge]`
//!
//! **flood.** Tenant B sends one single-op request at a time (its latency is what is
//! measured), alone and while tenant A floods: two tasks grow entities with 32 KiB payloads
//! (four ops a request) until the server refuses to grow them further, and two tasks send
//! batches of 500 ops with a stale `base_version` against those large entities. Every A task
//! sends its next request as soon as the last one was answered. The run alternates five
//! rounds of "B alone" and "B under the flood" (N seconds of each side in all, 0.5 s to
//! settle between), so that the load of the rest of the machine weighs on both sides alike.
//! The figures are B's p50 and p99 under the flood as a ratio to B's alone.
//!
//! **purge.** 400,000 stored results past their retention are written straight into the
//! database; the server then starts (its purge runs at start) and B measures for N seconds
//! from the first moment. The figure is B's worst latency during the purge as a ratio to B's
//! p99 after it, in the same run.
//!
//! The clients run on the same cores as the server, so they compete for CPU too.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{arg, ms, now_ms, quantile, start, uuid};

const B_TOKEN: &str = "b-secret";
const A_TOKEN: &str = "a-secret";

/// Two tenants, and no per-client rate limit: B's probe sends hundreds of requests a second
/// and must not be the thing that is limited.
fn tokens() -> Vec<&'static str> {
    vec![
        "--token",
        "a=a-secret",
        "--token",
        "b=b-secret",
        "--rate",
        "0",
    ]
}

/// B's probe: one op a request, each on a new entity, until `until`.
async fn probe(
    http: &reqwest::Client,
    url: &str,
    client: &str,
    seq: &AtomicU64,
    until: Instant,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    while Instant::now() < until {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let body = json!({"client": client, "ops": [{"id": uuid(0xb0b, n), "seq": n, "prev": 0,
            "entity": format!("b/{n}"), "kind": "probe", "payload": {"n": n}, "created_at": now_ms()}]});
        let started = Instant::now();
        let response = http
            .post(format!("{url}/v1/ops"))
            .bearer_auth(B_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("B request");
        let status = response.status();
        let text = response.bytes().await.expect("B body");
        samples.push(started.elapsed());
        assert_eq!(status, 200, "B: {}", String::from_utf8_lossy(&text));
        assert!(
            text.windows(9).any(|w| w == b"\"applied\""),
            "B's op applies: {}",
            String::from_utf8_lossy(&text)
        );
    }
    samples
}

#[derive(Default)]
struct FloodStats {
    requests: AtomicU64,
    answer_bytes: AtomicU64,
    max_answer: AtomicU64,
    refused: AtomicU64,
}

/// Sends A's request and records the size of the answer; returns the parsed body when 200
/// and `parse`.
async fn send_a(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    stats: &FloodStats,
    parse: bool,
) -> Option<Value> {
    let response = match http
        .post(format!("{url}/v1/ops"))
        .bearer_auth(A_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = response.bytes().await.unwrap_or_default();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats
        .answer_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    stats
        .max_answer
        .fetch_max(bytes.len() as u64, Ordering::Relaxed);
    if status != 200 {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        // A well-behaved client (the outbox core is one) honours Retry-After.
        if let Some(seconds) = retry {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        }
        return None;
    }
    if !parse {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Whether A floods now, and whether the run is over.
#[derive(Default)]
struct Switch {
    flooding: AtomicBool,
    stop: AtomicBool,
    /// Set once the first large entities exist (the stale batches aim at them).
    ready: AtomicBool,
}

impl Switch {
    /// Waits while A is paused; false once the run is over.
    async fn go(&self) -> bool {
        while !self.flooding.load(Ordering::Relaxed) || !self.ready.load(Ordering::Relaxed) {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// Grows `a/big/{task}/{generation}` by 4 × 32 KiB a request; a new generation starts when the
/// server rejects an op (the state limit) or the state passed about 320 KiB (a server without
/// a limit would otherwise grow it forever). The first request of each task runs before the
/// rounds start, so that the entities of the stale batches exist.
async fn grow(
    http: reqwest::Client,
    url: String,
    task: u64,
    switch: Arc<Switch>,
    stats: Arc<FloodStats>,
    created: Arc<AtomicU64>,
) {
    let client = uuid(0xa1, task);
    let pad = "x".repeat(32 * 1024);
    let (mut seq, mut generation, mut grown) = (0u64, 0u64, 0usize);
    loop {
        if seq > 0 && !switch.go().await {
            break;
        }
        let ops: Vec<Value> = (0..4)
            .map(|_| {
                seq += 1;
                json!({"id": uuid(0xa1_0000 + task, seq), "seq": seq, "prev": 0,
                       "entity": format!("a/big/{task}/{generation}"), "kind": "grow",
                       "payload": {format!("k{seq}"): pad}, "created_at": now_ms()})
            })
            .collect();
        let body = serde_json::to_vec(&json!({"client": client, "ops": ops})).expect("json");
        grown += 4 * pad.len();
        let answer = send_a(&http, &url, body, &stats, true).await;
        if seq == 4 {
            created.fetch_add(1, Ordering::Relaxed);
        }
        let rejected = answer.is_some_and(|a| {
            a["results"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["status"] == "rejected"))
        });
        if rejected || grown > 320 * 1024 {
            generation += 1;
            grown = 0;
        }
    }
}

/// Sends batches of 500 ops with `base_version: 0` against the first large entity of a grow
/// task (written by another client, so every op is a conflict).
async fn stale(
    http: reqwest::Client,
    url: String,
    task: u64,
    grow_tasks: u64,
    switch: Arc<Switch>,
    stats: Arc<FloodStats>,
) {
    let client = uuid(0xa2, task);
    let entity = format!("a/big/{}/0", task % grow_tasks);
    let mut seq = 0u64;
    while switch.go().await {
        let ops: Vec<Value> = (0..500)
            .map(|_| {
                seq += 1;
                json!({"id": uuid(0xa2_0000 + task, seq), "seq": seq, "prev": 0, "entity": entity,
                       "kind": "stale", "payload": {"s": seq}, "base_version": 0, "created_at": now_ms()})
            })
            .collect();
        let body = serde_json::to_vec(&json!({"client": client, "ops": ops})).expect("json");
        send_a(&http, &url, body, &stats, false).await;
    }
}

fn report(what: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    let p50 = quantile(samples, 0.5);
    let p99 = quantile(samples, 0.99);
    let max = quantile(samples, 1.0);
    println!(
        "| {what} | {} | {} | {} | {} |",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
    (p50, p99)
}

const ROUNDS: u32 = 5;
const SETTLE: Duration = Duration::from_millis(500);

fn flood(runtime: &tokio::runtime::Runtime, seconds: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(
        &dir.path().join("fair.db"),
        &dir.path().join("server.log"),
        &tokens(),
    );
    let url = server.url.clone();
    runtime.block_on(async move {
        let b_http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let a_http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let b_client = uuid(0xb, 1);
        let seq = AtomicU64::new(1);
        let span = Duration::from_secs(seconds) / ROUNDS;
        // Warm up: connections, the client binding, SQLite's cache.
        probe(
            &b_http,
            &url,
            &b_client,
            &seq,
            Instant::now() + Duration::from_millis(500),
        )
        .await;

        let switch = Arc::new(Switch::default());
        let stats = Arc::new(FloodStats::default());
        let created = Arc::new(AtomicU64::new(0));
        let grow_tasks = 2u64;
        let mut tasks = Vec::new();
        for t in 0..grow_tasks {
            tasks.push(tokio::spawn(grow(
                a_http.clone(),
                url.clone(),
                t,
                switch.clone(),
                stats.clone(),
                created.clone(),
            )));
        }
        for t in 0..2 {
            tasks.push(tokio::spawn(stale(
                a_http.clone(),
                url.clone(),
                t,
                grow_tasks,
                switch.clone(),
                stats.clone(),
            )));
        }
        while created.load(Ordering::Relaxed) < grow_tasks {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        switch.ready.store(true, Ordering::Relaxed);
        let (mut alone, mut flooded) = (Vec::new(), Vec::new());
        let mut a_requests = 0;
        for _ in 0..ROUNDS {
            switch.flooding.store(false, Ordering::Relaxed);
            tokio::time::sleep(SETTLE).await;
            alone.extend(probe(&b_http, &url, &b_client, &seq, Instant::now() + span).await);
            switch.flooding.store(true, Ordering::Relaxed);
            tokio::time::sleep(SETTLE).await;
            let before = stats.requests.load(Ordering::Relaxed);
            flooded.extend(probe(&b_http, &url, &b_client, &seq, Instant::now() + span).await);
            a_requests += stats.requests.load(Ordering::Relaxed) - before;
        }
        switch.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }

        println!(
            "\nflood: tenant B's latency, one single-op request at a time \
             ({ROUNDS} rounds, {seconds} s of each side)\n"
        );
        println!("| B | requests | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        let (alone50, alone99) = report("alone", &mut alone);
        let (flood50, flood99) = report("while A floods", &mut flooded);
        println!(
            "\nratios (flood / alone): p50 {:.2}x, p99 {:.2}x",
            flood50.as_secs_f64() / alone50.as_secs_f64(),
            flood99.as_secs_f64() / alone99.as_secs_f64()
        );
        println!(
            "A: {a_requests} requests answered while B measured under the flood; {} in all, \
             {} refused or failed; {:.1} MB of answers, the largest {} bytes",
            stats.requests.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
            stats.answer_bytes.load(Ordering::Relaxed) as f64 / 1e6,
            stats.max_answer.load(Ordering::Relaxed)
        );
    });
    let db_bytes: u64 = std::fs::read_dir(dir.path())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("fair.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "database on disk after the run: {:.1} MB",
        db_bytes as f64 / 1e6
    );
    drop(server);
}

fn purge(runtime: &tokio::runtime::Runtime, seconds: u64) {
    const ROWS: u64 = 400_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("purge.db");
    let log = dir.path().join("server.log");
    // A first start creates the schema.
    drop(start(&db, &dir.path().join("first.log"), &tokens()));
    {
        let mut conn = rusqlite::Connection::open(&db).expect("open");
        let tx = conn.transaction().expect("tx");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO results (tenant, client, op_id, outcome, stored_at) VALUES ('a', ?1, ?2, ?3, 0)",
                )
                .expect("prepare");
            let client = uuid(0xa3, 1);
            for i in 0..ROWS {
                insert
                    .execute(rusqlite::params![
                        client,
                        uuid(0xa3_0000, i),
                        r#"{"status":"applied","version":1}"#
                    ])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let server = start(&db, &log, &tokens());
    let url = server.url.clone();
    let log_path = log.clone();
    runtime.block_on(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let b_client = uuid(0xb, 2);
        let seq = AtomicU64::new(1);
        let started = Instant::now();
        let mut during = Vec::new();
        let mut purged_after = None;
        while started.elapsed() < Duration::from_secs(seconds.max(10)) {
            during.extend(
                probe(
                    &http,
                    &url,
                    &b_client,
                    &seq,
                    Instant::now() + Duration::from_millis(100),
                )
                .await,
            );
            if std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("purged expired results")
            {
                purged_after = Some(started.elapsed());
                break;
            }
        }
        let mut after = probe(
            &http,
            &url,
            &b_client,
            &seq,
            Instant::now() + Duration::from_secs(seconds),
        )
        .await;
        println!("\npurge: {ROWS} expired results purged at start; tenant B's latency meanwhile\n");
        println!("| B | requests | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        report("during the purge", &mut during);
        let (_, after99) = report("after it", &mut after);
        let worst = quantile(&mut during, 1.0);
        println!(
            "\npurge finished (logged) {} s after start; worst stall during it / p99 after: {:.2}x",
            purged_after
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .unwrap_or_else(|| "not".into()),
            worst.as_secs_f64() / after99.as_secs_f64()
        );
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in text.lines().filter(|l| l.contains("purged")) {
        println!("server log: {line}");
    }
    drop(server);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("fairness: run it with `cargo bench -p outbox-server --bench fairness`");
        return;
    }
    let seconds: u64 = arg(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let only = arg(&args, "--only");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if only.as_deref().is_none_or(|o| o == "flood") {
        flood(&runtime, seconds);
    }
    if only.as_deref().is_none_or(|o| o == "purge") {
        purge(&runtime, seconds);
    }
}
