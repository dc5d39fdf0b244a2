//! `outbox-conformance` against the reference server (every rule held) and against deliberately
//! broken backends, each of which it must catch by naming the rule.
//!
//! A broken backend is the reference server behind a small proxy (`Broken`) that breaks one
//! promise of the protocol: it applies a resent op again, ignores `prev`, or drops
//! `base_version` (so a stale op answers `applied`), drops `Retry-After`, or answers errors as
//! plain JSON. The reference server is the release binary (`make build` builds it; set
//! `OUTBOX_SERVER` to use another). Everything listens on 127.0.0.1 port 0 and is stopped on drop,
//! so a failing test leaves nothing behind.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};

const TOKEN: &str = "conformance-token";

/// The reference server, killed on drop.
struct Reference {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTBOX_SERVER") {
        return path.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let path = target.join(profile).join("outbox-server");
        if path.exists() {
            return path;
        }
    }
    panic!(
        "no outbox-server binary under {}: run `cargo build --release -p outbox-server` (make build) or set OUTBOX_SERVER",
        target.display()
    );
}

fn reference() -> Reference {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0", "--token"])
        .arg(format!("conformance={TOKEN}"))
        .arg("--db")
        .arg(dir.path().join("outbox.db"))
        .env_remove("OUTBOX_TOKENS")
        .env_remove("OUTBOX_TOKENS_FILE")
        .env_remove("OUTBOX_GRANT_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start outbox-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Reference {
        child,
        url,
        _dir: dir,
    }
}

/// How a proxy breaks the protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// A resent op id is applied again (under a fresh id and seq, its id restored in the
    /// answer): no replay by op id.
    ApplyReplaysTwice,
    /// Every op's `prev` becomes 0: no out_of_order, gaps are applied.
    IgnorePrev,
    /// `base_version` is dropped: a stale op answers 200 `applied`.
    StaleIsApplied,
    /// `Retry-After` is dropped from every answer.
    NoRetryAfter,
    /// Error answers say `application/json`.
    PlainErrors,
}

struct Proxy {
    mode: Mode,
    upstream: String,
    http: reqwest::Client,
    seen: Mutex<HashSet<(String, String)>>,
    fresh_seq: AtomicU64,
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("random bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Proxy {
    /// Rewrites a request body; returns the ids to put back into the answer's results.
    fn request(&self, path: &str, body: &mut Value) -> Option<Vec<Value>> {
        let client = body["client"].as_str()?.to_owned();
        let ops = body["ops"].as_array_mut()?;
        let original: Vec<Value> = ops.iter().map(|op| op["id"].clone()).collect();
        for op in ops.iter_mut() {
            match self.mode {
                Mode::ApplyReplaysTwice if path == "/v1/ops" => {
                    let id = op["id"].as_str().unwrap_or_default().to_owned();
                    if !self.seen.lock().unwrap().insert((client.clone(), id)) {
                        op["id"] = json!(uuid());
                        op["seq"] = json!(self.fresh_seq.fetch_add(1, Ordering::Relaxed));
                    }
                }
                Mode::IgnorePrev => op["prev"] = json!(0),
                Mode::StaleIsApplied => {
                    op.as_object_mut().map(|o| o.remove("base_version"));
                }
                _ => {}
            }
        }
        Some(original)
    }
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(path.clone(), |p| p.to_string());
    let mut bytes = to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default()
        .to_vec();
    let mut restore = None;
    if let Ok(mut json) = serde_json::from_slice::<Value>(&bytes) {
        restore = proxy.request(&path, &mut json);
        bytes = json.to_string().into_bytes();
    }
    let mut upstream = proxy.http.request(
        parts.method.clone(),
        format!("{}{path_and_query}", proxy.upstream),
    );
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            upstream = upstream.header(name, value);
        }
    }
    let answer = upstream.body(bytes).send().await.expect("upstream answer");
    let status = answer.status();
    let headers = answer.headers().clone();
    let mut body = answer.bytes().await.unwrap_or_default().to_vec();
    if let (Some(ids), Ok(mut json)) = (restore, serde_json::from_slice::<Value>(&body))
        && let Some(results) = json["results"].as_array_mut()
    {
        for (result, id) in results.iter_mut().zip(ids) {
            result["id"] = id;
        }
        body = json.to_string().into_bytes();
    }
    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        let dropped = name == "content-length"
            || name == "transfer-encoding"
            || (proxy.mode == Mode::NoRetryAfter && name == "retry-after");
        if dropped {
            continue;
        }
        if proxy.mode == Mode::PlainErrors && name == "content-type" && !status.is_success() {
            response = response.header(name, "application/json");
        } else {
            response = response.header(name, value);
        }
    }
    response.body(Body::from(body)).expect("response")
}

/// A broken backend: the proxy in front of its own reference server.
struct BrokenBackend {
    url: String,
    _reference: Reference,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BrokenBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn broken(mode: Mode) -> BrokenBackend {
    let reference = reference();
    let proxy = Arc::new(Proxy {
        mode,
        upstream: reference.url.clone(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        seen: Mutex::new(HashSet::new()),
        fresh_seq: AtomicU64::new(1 << 40),
    });
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    BrokenBackend {
        url,
        _reference: reference,
        task,
    }
}

/// Runs the kit; its exit code and output.
async fn kit(url: &str) -> (i32, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-conformance"))
        .args(["--url", url, "--token", TOKEN])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run outbox-conformance");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn the_reference_server_holds_every_rule() {
    let server = reference();
    let (code, output) = kit(&server.url).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains(" 0 broken, 0 skipped"), "{output}");
    assert!(!output.contains("BROKEN"), "{output}");
}

async fn catches(mode: Mode, rule: &str) {
    let backend = broken(mode).await;
    let (code, output) = kit(&backend.url).await;
    eprintln!("{mode:?}:\n{output}");
    assert_eq!(code, 1, "{mode:?} must fail the kit:\n{output}");
    let line = output
        .lines()
        .find(|l| l.starts_with("BROKEN") && l.contains(rule))
        .unwrap_or_else(|| panic!("{mode:?}: no BROKEN line for {rule:?}:\n{output}"));
    // The request and the answer that broke it follow the rule's line.
    let after: Vec<_> = output.lines().skip_while(|l| *l != line).take(3).collect();
    assert!(
        after.len() == 3
            && after[1].trim_start().starts_with("request: ")
            && after[2].trim_start().starts_with("answer: "),
        "{mode:?}: no request and answer under {line:?}:\n{output}"
    );
}

#[tokio::test]
async fn a_backend_that_applies_replays_twice_is_caught() {
    catches(
        Mode::ApplyReplaysTwice,
        "a resent op id replays its stored result",
    )
    .await;
}

#[tokio::test]
async fn a_backend_that_ignores_prev_is_caught() {
    catches(Mode::IgnorePrev, "a gap (prev not applied) is out_of_order").await;
}

#[tokio::test]
async fn a_backend_that_applies_a_stale_base_version_is_caught() {
    catches(Mode::StaleIsApplied, "a stale base_version is a conflict").await;
    // The keyed route's rule too.
    let backend = broken(Mode::StaleIsApplied).await;
    let (_, output) = kit(&backend.url).await;
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("BROKEN") && l.contains("op: a stale base_version is 409")),
        "{output}"
    );
}

#[tokio::test]
async fn a_backend_without_retry_after_is_caught() {
    catches(Mode::NoRetryAfter, "429 with Retry-After").await;
}

#[tokio::test]
async fn a_backend_without_problem_json_is_caught() {
    catches(Mode::PlainErrors, "problem+json").await;
}
