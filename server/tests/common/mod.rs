//! Shared harness: starts the real `outbox-server` binary on 127.0.0.1:0 with a temporary
//! SQLite file, and kills it on drop (so a failing test never leaves a server behind).
//!
//! With `OUTBOX_TEST_DB=postgres://…` (scripts/with-postgres sets it) every server runs on
//! PostgreSQL instead, on a fresh database of its own in that cluster, so that the same test
//! bodies check both stores.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tempfile::TempDir;

/// Tenant `test`'s token.
pub const TOKEN: &str = "secret";
/// Tenant `other`'s token.
pub const OTHER: &str = "other-secret";
/// The admin token.
pub const ADMIN: &str = "admin";

/// A running server process.
pub struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The SQLite file, or the PostgreSQL URL of the server's own database.
    pub db: PathBuf,
    /// Where its stderr (the tracing log) goes.
    pub log_path: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    dir: TempDir,
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a server with tenants `test` and `other`, the admin endpoints, and `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec![
            "--token",
            "test=secret",
            "--token",
            "other=other-secret",
            "--admin-token",
            ADMIN,
        ];
        args.extend_from_slice(extra);
        Self::start_bare(&args, &[])
    }

    /// Starts a server with exactly these flags (no default tenants) and environment.
    pub fn start_bare(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, args, envs)
    }

    /// Starts a server in `dir` (which may hold files the flags name).
    pub fn start_in(dir: TempDir, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let db = match test_db() {
            Some(cluster) => PathBuf::from(fresh_database(&cluster)),
            None => dir.path().join("outbox.db"),
        };
        let log_path = dir.path().join("server-0.log");
        let (child, stdout, url) = launch(&args, &envs, &db, &log_path);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        Server {
            child,
            _stdout: stdout,
            url,
            db,
            log_path,
            args,
            envs,
            dir,
            http,
        }
    }

    /// The temporary directory the database sits in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Like [`Server::restart`], with other flags from now on.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Kills the process (SIGKILL: no graceful shutdown) and starts a new one on the same
    /// database with the same flags. The port changes.
    pub fn restart(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        self.log_path = self.dir.path().join(format!("server-{n}.log"));
        let (child, stdout, url) = launch(&self.args, &self.envs, &self.db, &self.log_path);
        self.child = child;
        self._stdout = stdout;
        self.url = url;
        // Pooled connections point at the dead process.
        self.http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
    }

    /// Sends SIGTERM (a graceful shutdown) and waits for the process to end, failing the
    /// test past `guard`.
    pub fn terminate(&mut self, guard: Duration) -> std::process::ExitStatus {
        // SAFETY: kill only sends a signal to the child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + guard;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not stop within {guard:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `sql` (no parameters) on the server's database, whichever engine it is, and
    /// returns the rows, every column as text (NULL as an empty string).
    pub fn sql(&self, sql: &str) -> Vec<Vec<String>> {
        let db = self.db.to_string_lossy().into_owned();
        if db.starts_with("postgres") {
            return pg_query(&db, sql);
        }
        let conn = rusqlite::Connection::open(&self.db).expect("open the SQLite file");
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut stmt = conn.prepare(sql).expect("prepare");
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => String::new(),
                            rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                            rusqlite::types::ValueRef::Real(v) => v.to_string(),
                            rusqlite::types::ValueRef::Text(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                            rusqlite::types::ValueRef::Blob(b) => format!("{b:?}"),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .expect("query");
        rows.map(Result::unwrap).collect()
    }

    /// The server's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POST /v1/ops as `token`.
    pub async fn ops(&self, token: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.at("/v1/ops"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
    }

    /// POST /v1/ops as tenant `test`, expecting 200; returns `results`.
    pub async fn ops_ok(&self, body: &Value) -> Vec<Value> {
        let response = self.ops(TOKEN, body).await.expect("request");
        assert_eq!(response.status(), 200, "POST /v1/ops");
        let body: Value = response.json().await.expect("json");
        body["results"].as_array().expect("results").clone()
    }

    /// POST /v1/op with an optional Idempotency-Key header value.
    pub async fn op(
        &self,
        token: &str,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = self
            .http
            .post(self.at("/v1/op"))
            .bearer_auth(token)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await
    }

    /// GET /v1/entities/{id} as `token`; `None` on 404.
    pub async fn entity(&self, token: &str, id: &str) -> Option<Value> {
        let response = self
            .http
            .get(self.at(&format!("/v1/entities/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        match response.status().as_u16() {
            200 => Some(response.json().await.expect("json")),
            404 => None,
            other => panic!("GET entity answered {other}"),
        }
    }

    /// GET /v1/admin/log?tenant=…
    pub async fn log(&self, tenant: &str) -> Vec<Value> {
        let response = self
            .http
            .get(self.at(&format!("/v1/admin/log?tenant={tenant}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        response.json().await.expect("json")
    }

    /// POST /v1/admin/faults with these rules.
    pub async fn faults(&self, rules: Value) {
        let response = self
            .http
            .post(self.at("/v1/admin/faults"))
            .bearer_auth(ADMIN)
            .json(&json!({ "rules": rules }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "POST /v1/admin/faults");
    }

    /// Whether GET /v1/health answers 200 {"status":"ok"}.
    pub async fn healthy(&self) -> bool {
        match self.http.get(self.at("/v1/health")).send().await {
            Ok(r) if r.status() == 200 => r
                .json::<Value>()
                .await
                .map(|b| b["status"] == "ok")
                .unwrap_or(false),
            _ => false,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(
    args: &[String],
    envs: &[(String, String)],
    db: &PathBuf,
    log_path: &PathBuf,
) -> (Child, BufReader<ChildStdout>, String) {
    let log = std::fs::File::create(log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .args(args)
        // The test's own environment must not leak tokens or keys into the server.
        .env_remove("OUTBOX_TOKENS")
        .env_remove("OUTBOX_TOKENS_FILE")
        .env_remove("OUTBOX_GRANT_KEY")
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn outbox-server");
    let stdout = child.stdout.take().expect("stdout");
    // Read the `listening on` line on a thread so that a server that never prints fails the
    // test after a bound instead of hanging it.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let _ = tx.send((read.map(|_| line), reader));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok((Ok(line), reader)) if line.starts_with("listening on http://") => {
            let url = line.trim().trim_start_matches("listening on ").to_owned();
            (child, reader, url)
        }
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            panic!(
                "server did not start ({:?}); stderr:\n{log}",
                other.map(|(l, _)| l)
            );
        }
    }
}

/// A fresh canonical lowercase UUID (unique within the test process).
pub fn uuid() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        (t >> 16) & 0xffff,
        (t >> 4) & 0xfff,
        (n >> 48) & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

/// Milliseconds since the Unix epoch (the server and the tests share this machine's clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An op with a fresh id, made now (an op without an entity must be recent: see the
/// `created_at` window in docs/PROTOCOL.md).
pub fn op(seq: i64, prev: i64, entity: Option<&str>, payload: Value) -> Value {
    json!({
        "id": uuid(), "seq": seq, "prev": prev, "entity": entity, "kind": "edit",
        "payload": payload, "created_at": now_ms(),
    })
}

/// `{client, ops}`.
pub fn envelope(client: &str, ops: Vec<Value>) -> Value {
    json!({ "client": client, "ops": ops })
}

/// Polls `check` until it is true, failing the test after `within`. For conditions the test
/// cannot be told about (a background purge), not for ordering requests.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `host:port` of a server URL.
pub fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_owned()
}

/// Reads from `stream` until the server closes it and returns what came. Fails the test if
/// the server keeps it open past `guard` (a bound far above any timeout a test sets, so
/// that a server that never closes fails instead of hanging; no test asserts on durations).
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, guard: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(guard, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open past {guard:?}; got {:?}",
        String::from_utf8_lossy(&answer)
    );
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw HTTP answer.
pub fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// The JSON body of a raw HTTP answer.
pub fn body_of(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body of {answer:?}: {e}"))
}

/// The PostgreSQL cluster the tests run on, if any (`OUTBOX_TEST_DB`).
pub fn test_db() -> Option<String> {
    std::env::var("OUTBOX_TEST_DB")
        .ok()
        .filter(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
}

/// Creates a new, empty database in the cluster of `cluster_url` and returns its URL.
pub fn fresh_database(cluster_url: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        now_ms()
    );
    pg_query(cluster_url, &format!("CREATE DATABASE {name}"));
    let base = cluster_url.rsplit_once('/').map_or(cluster_url, |(b, _)| b);
    format!("{base}/{name}")
}

/// Runs `sql` (simple query protocol: one or more statements) on `url` on a thread of its
/// own (callers may be inside a runtime), returning the rows of text.
pub fn pg_query(url: &str, sql: &str) -> Vec<Vec<String>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
            let task = tokio::spawn(conn);
            let mut rows = Vec::new();
            for m in client
                .simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
            {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    rows.push(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or_default().to_owned())
                            .collect(),
                    );
                }
            }
            drop(client);
            let _ = task.await;
            rows
        })
    })
    .join()
    .expect("postgres query thread")
}
