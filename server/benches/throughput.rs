//! Applied ops per second of the real `outbox-server` binary, for batch sizes 1, 10 and 100.
//!
//! `cargo bench -p outbox-server --bench throughput [-- --sync full|normal] [-- --seconds N]`
//!
//! Each run starts a fresh server (release build, temporary SQLite file, rate limit off) and
//! 16 concurrent clients; every op targets its own entity. Bodies are serialised before the
//! clock starts, so the client spends its CPU on HTTP only (it shares this machine's cores
//! with the server). A run stops after its op budget or its time budget, whichever is first.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

const CLIENTS: usize = 16;

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(db: &std::path::Path, sync: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "bench=secret",
            "--rate",
            "0",
            "--sync",
            sync,
        ])
        .arg("--db")
        .arg(db)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn outbox-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    Server(child, url)
}

fn uuid(a: u64, b: u64) -> String {
    format!("{:08x}-{:04x}-4000-8000-{:012x}", a >> 16, a & 0xffff, b)
}

struct Run {
    applied: u64,
    requests: u64,
    seconds: f64,
}

async fn run(url: &str, batch: usize, budget_ops: usize, budget: Duration) -> Run {
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let per_client = budget_ops / CLIENTS / batch;
    // Serialise every body before the clock starts.
    let bodies: Vec<Vec<Vec<u8>>> = (0..CLIENTS as u64)
        .map(|c| {
            let client = uuid(c + 1, 0);
            (0..per_client as u64)
                .map(|r| {
                    let ops: Vec<_> = (0..batch as u64)
                        .map(|i| {
                            let n = r * batch as u64 + i;
                            json!({"id": uuid(c + 1, n + 1), "seq": n + 1, "prev": 0,
                                   "entity": format!("c{c}/e{n}"), "kind": "bench",
                                   "payload": {"n": n, "title": "benchmark op"}, "created_at": 0})
                        })
                        .collect();
                    serde_json::to_vec(&json!({"client": client, "ops": ops})).expect("json")
                })
                .collect()
        })
        .collect();
    let applied = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|bodies| {
            let (http, url) = (http.clone(), format!("{url}/v1/ops"));
            let (applied, requests, stop) = (applied.clone(), requests.clone(), stop.clone());
            tokio::spawn(async move {
                for body in bodies {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let response = http
                        .post(&url)
                        .bearer_auth("secret")
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(response.status(), 200);
                    let text = response.bytes().await.expect("body");
                    let needle = br#""status":"applied""#;
                    let n = text.windows(needle.len()).filter(|w| w == needle).count();
                    assert_eq!(n, batch, "every op applies");
                    applied.fetch_add(n as u64, Ordering::Relaxed);
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(budget).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    for task in tasks {
        task.await.expect("client task");
    }
    let seconds = start.elapsed().as_secs_f64();
    stopper.abort();
    Run {
        applied: applied.load(Ordering::Relaxed),
        requests: requests.load(Ordering::Relaxed),
        seconds,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("throughput: run it with `cargo bench -p outbox-server --bench throughput`");
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let modes: Vec<String> = match value("--sync") {
        Some(mode) => vec![mode],
        None => vec!["full".into(), "normal".into()],
    };
    let seconds: u64 = value("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| sync | batch | applied ops | requests | seconds | ops/s | requests/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for mode in &modes {
        for (batch, budget_ops) in [(1usize, 40_000usize), (10, 200_000), (100, 400_000)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let server = start(&dir.path().join("bench.db"), mode);
            let r = runtime.block_on(run(
                &server.1,
                batch,
                budget_ops,
                Duration::from_secs(seconds),
            ));
            drop(server);
            println!(
                "| {mode} | {batch} | {} | {} | {:.2} | {:.0} | {:.0} |",
                r.applied,
                r.requests,
                r.seconds,
                r.applied as f64 / r.seconds,
                r.requests as f64 / r.seconds
            );
        }
    }
}
