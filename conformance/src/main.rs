//! `outbox-conformance`: runs the rules of the outbox wire protocol (docs/PROTOCOL.md) against
//! a backend and prints one line per rule, `held` or `BROKEN` (with the request and the answer
//! that broke it). Exits 1 when any rule is broken, 2 when the backend cannot be reached.
//!
//! It writes only to entities named `conformance-<run>/…` with fresh client ids, so it can run
//! against a staging backend that holds other data. It depends on nothing of the reference
//! server: only on the protocol.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use reqwest::Method;
use serde_json::{Value, json};

/// Checks a backend against the outbox wire protocol, version 1.
#[derive(Debug, Parser)]
#[command(name = "outbox-conformance", version)]
struct Args {
    /// The backend's base URL, e.g. http://127.0.0.1:8080 (plain HTTP: put a TLS backend
    /// behind a local port forward).
    #[arg(long)]
    url: String,
    /// A bearer token of a tenant the kit may write test entities into.
    #[arg(long, env = "OUTBOX_CONFORMANCE_TOKEN")]
    token: String,
    /// The size of the body sent to provoke 413 (must be over the backend's body limit).
    #[arg(long, default_value_t = 2 << 20)]
    large_body: usize,
    /// The most requests sent from one client to provoke 429.
    #[arg(long, default_value_t = 3000)]
    rate_requests: usize,
    /// Only the rules whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// One HTTP answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    content_type: String,
    retry_after: Option<String>,
    www_authenticate: Option<String>,
    text: String,
    json: Value,
}

/// A request and its answer, as printed when a rule breaks.
#[derive(Debug, Clone)]
struct Exchange {
    request: String,
    answer: Answer,
}

impl Exchange {
    fn show(&self) -> String {
        let mut head = format!("HTTP {}", self.answer.status);
        if !self.answer.content_type.is_empty() {
            head += &format!(" content-type: {}", self.answer.content_type);
        }
        if let Some(retry) = &self.answer.retry_after {
            head += &format!(" retry-after: {retry}");
        }
        format!(
            "    request: {}\n    answer:  {} {}",
            clip(&self.request, 600),
            head,
            clip(&self.answer.text, 600)
        )
    }
}

fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Why a rule is broken.
#[derive(Debug)]
struct Broken {
    why: String,
    exchange: Option<Exchange>,
}

impl Broken {
    fn at(exchange: &Exchange, why: impl Into<String>) -> Broken {
        Broken {
            why: why.into(),
            exchange: Some(exchange.clone()),
        }
    }
}

/// What a rule found.
enum Outcome {
    Held,
    Skipped(String),
}

type Check = Result<Outcome, Broken>;

/// Fails the rule at `$ex` unless `$cond`.
macro_rules! ensure {
    ($cond:expr, $ex:expr, $($why:tt)+) => {
        if !$cond {
            return Err(Broken::at(&$ex, format!($($why)+)));
        }
    };
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn op(seq: u64, prev: u64, entity: Option<&str>, payload: Value) -> Value {
    json!({
        "id": uuid(), "seq": seq, "prev": prev, "entity": entity, "kind": "conformance",
        "payload": payload, "created_at": now_ms(),
    })
}

fn with_base(mut op: Value, base: u64) -> Value {
    op["base_version"] = json!(base);
    op
}

fn envelope(client: &str, ops: Vec<Value>) -> Value {
    json!({ "client": client, "ops": ops })
}

fn replayed(result: &Value) -> bool {
    result["replayed"] == true
}

/// Whether a problem's `type` is the protocol's `…/<segment>`.
fn problem_is(answer: &Answer, segment: &str) -> bool {
    answer.json["type"]
        .as_str()
        .is_some_and(|t| t.ends_with(&format!("/{segment}")))
}

enum Auth<'a> {
    Token,
    None,
    Bearer(&'a str),
}

struct Kit {
    http: reqwest::Client,
    base: String,
    token: String,
    run: String,
    large_body: usize,
    rate_requests: usize,
    /// Every non-2xx answer seen, for the problem+json rule.
    errors: Mutex<Vec<Exchange>>,
}

impl Kit {
    fn entity(&self, name: &str) -> String {
        format!("conformance-{}/{name}", self.run)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Exchange, Broken> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        match auth {
            Auth::Token => request = request.bearer_auth(&self.token),
            Auth::Bearer(token) => request = request.bearer_auth(token),
            Auth::None => {}
        }
        let mut shown = format!("{method} {path}");
        for (name, value) in headers {
            request = request.header(*name, *value);
            shown += &format!(" {name}: {value}");
        }
        if let Some(body) = &body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.clone());
            shown += &format!(" {body}");
        }
        let response = request.send().await.map_err(|e| Broken {
            why: format!("{shown}: no answer: {e}"),
            exchange: None,
        })?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = response.status().as_u16();
        let content_type = header("content-type").unwrap_or_default();
        let retry_after = header("retry-after");
        let www_authenticate = header("www-authenticate");
        let text = response.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        let exchange = Exchange {
            request: shown,
            answer: Answer {
                status,
                content_type,
                retry_after,
                www_authenticate,
                text,
                json,
            },
        };
        if !(200..300).contains(&status) {
            self.errors.lock().unwrap().push(exchange.clone());
        }
        Ok(exchange)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Exchange, Broken> {
        self.send(Method::POST, path, Auth::Token, &[], Some(body.to_string()))
            .await
    }

    /// POST /v1/ops, expecting 200 with one result per op, in order, with the op's id.
    async fn ops(&self, body: &Value) -> Result<(Exchange, Vec<Value>), Broken> {
        let ex = self.post("/v1/ops", body).await?;
        ensure!(
            ex.answer.status == 200,
            ex,
            "POST /v1/ops answered {}, not 200",
            ex.answer.status
        );
        let results = ex.answer.json["results"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ops = body["ops"].as_array().map_or(0, Vec::len);
        ensure!(
            results.len() == ops,
            ex,
            "{} results for {ops} ops",
            results.len()
        );
        for (i, result) in results.iter().enumerate() {
            ensure!(
                result["id"] == body["ops"][i]["id"],
                ex,
                "results[{i}].id is not the id of ops[{i}]"
            );
        }
        Ok((ex, results))
    }

    /// POST /v1/op with an optional Idempotency-Key.
    async fn keyed(&self, key: Option<&str>, body: &Value) -> Result<Exchange, Broken> {
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        self.send(
            Method::POST,
            "/v1/op",
            Auth::Token,
            &headers,
            Some(body.to_string()),
        )
        .await
    }

    /// GET /v1/entities/{id}: the entity, or `None` on 404.
    async fn read(&self, id: &str) -> Result<(Exchange, Option<Value>), Broken> {
        let ex = self
            .send(
                Method::GET,
                &format!("/v1/entities/{id}"),
                Auth::Token,
                &[],
                None,
            )
            .await?;
        match ex.answer.status {
            200 => {
                let entity = ex.answer.json.clone();
                Ok((ex, Some(entity)))
            }
            404 => Ok((ex, None)),
            status => Err(Broken::at(&ex, format!("GET entity answered {status}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rules, in the order they run. The rate limit runs last: it uses up a client's budget.

type RuleFn = for<'a> fn(&'a Kit) -> std::pin::Pin<Box<dyn Future<Output = Check> + 'a>>;

macro_rules! rules {
    ($($name:literal => $f:ident,)*) => {
        const RULES: &[(&str, RuleFn)] = &[$(($name, |kit| Box::pin($f(kit))),)*];
    };
}

rules! {
    "auth: no token is 401 with WWW-Authenticate: Bearer" => auth_401,
    "ops: a malformed envelope is 400" => malformed_400,
    "ops: a resent op id replays its stored result and applies once" => replay_by_id,
    "ops: a gap (prev not applied) is out_of_order, not stored, until the fill arrives" => gap_and_fill,
    "ops: a seq at or below the last applied one is a duplicate, even under a new id" => duplicate_seq,
    "ops: versions grow by one per applied op and the state is a JSON merge patch" => versions_and_merge,
    "ops: a stale base_version is a conflict; the old id keeps it; a new id applies" => stale_conflict,
    "ops: a client's own writes never make its base_version stale" => own_writes_not_stale,
    "ops: an invalid op is rejected and the rest of the batch applies" => rejected_per_op,
    "op: no Idempotency-Key is 400 missing-key" => op_missing_key,
    "op: the same key and body replay the stored answer (bare or quoted key)" => op_replay,
    "op: the key with another body is 422 key-reused" => op_key_reused,
    "op: a stale base_version is 409 conflict with the version" => op_conflict,
    "op: an invalid op is 422 rejected with a reason" => op_rejected,
    "op: a gap is 425 out-of-order with last" => op_out_of_order,
    "op: concurrent copies of one key apply once (others replay or 409 in-progress)" => op_concurrent,
    "op: an op id first sent through /v1/ops is a replay on /v1/op" => op_shares_ids,
    "beacon: a grant lets a beacon apply once; the queued copy replays" => beacon_grant,
    "beacon: a tampered grant is 401 grant-invalid" => beacon_tampered,
    "beacon: a grant does not cover another op (403 grant-mismatch)" => beacon_mismatch,
    "beacon: no header and no grant is 401" => beacon_no_credentials,
    "limits: a body over the limit is 413 too-large" => too_large,
    "limits: past the rate a client gets 429 with Retry-After" => rate_limited,
    "errors: every non-2xx answer is problem+json with type, title and status" => problem_json,
}

async fn auth_401(kit: &Kit) -> Check {
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some(&kit.entity("auth")), json!({}))],
    );
    for (auth, what) in [
        (Auth::None, "no token"),
        (Auth::Bearer("conformance-wrong-token"), "an unknown token"),
    ] {
        let ex = kit
            .send(Method::POST, "/v1/ops", auth, &[], Some(body.to_string()))
            .await?;
        ensure!(
            ex.answer.status == 401,
            ex,
            "{what} answered {}, not 401",
            ex.answer.status
        );
        ensure!(
            ex.answer
                .www_authenticate
                .as_deref()
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
            ex,
            "401 without WWW-Authenticate: Bearer"
        );
    }
    Ok(Outcome::Held)
}

async fn malformed_400(kit: &Kit) -> Check {
    let mut bad = op(1, 0, Some(&kit.entity("malformed")), json!({}));
    bad["seq"] = json!("1");
    let ex = kit.post("/v1/ops", &envelope(&uuid(), vec![bad])).await?;
    ensure!(
        ex.answer.status == 400,
        ex,
        "\"seq\": \"1\" answered {}, not 400",
        ex.answer.status
    );
    ensure!(
        problem_is(&ex.answer, "malformed"),
        ex,
        "problem type is not …/malformed"
    );
    let ex = kit
        .send(
            Method::POST,
            "/v1/ops",
            Auth::Token,
            &[],
            Some("not json".into()),
        )
        .await?;
    ensure!(
        ex.answer.status == 400,
        ex,
        "a body that is not JSON answered {}, not 400",
        ex.answer.status
    );
    Ok(Outcome::Held)
}

async fn replay_by_id(kit: &Kit) -> Check {
    let (client, entity) = (uuid(), kit.entity("replay"));
    let first = envelope(&client, vec![op(1, 0, Some(&entity), json!({"a": 1}))]);
    let (ex, r) = kit.ops(&first).await?;
    ensure!(
        r[0]["status"] == "applied" && r[0]["version"] == 1,
        ex,
        "the first op was not applied at version 1"
    );
    ensure!(!replayed(&r[0]), ex, "a first send says replayed");
    let (ex, r) = kit
        .ops(&envelope(
            &client,
            vec![op(2, 1, Some(&entity), json!({"b": 2}))],
        ))
        .await?;
    ensure!(
        r[0]["status"] == "applied" && r[0]["version"] == 2,
        ex,
        "the second op was not applied at version 2"
    );
    for _ in 0..2 {
        let (ex, r) = kit.ops(&first).await?;
        ensure!(
            r[0]["status"] == "applied" && r[0]["version"] == 1 && replayed(&r[0]),
            ex,
            "a resent op id must answer its stored result (applied, version 1, replayed: true)"
        );
    }
    let (ex, e) = kit.read(&entity).await?;
    let e = e.unwrap_or_default();
    ensure!(
        e["version"] == 2,
        ex,
        "the entity is at version {}, not 2: a resend applied again",
        e["version"]
    );
    Ok(Outcome::Held)
}

async fn gap_and_fill(kit: &Kit) -> Check {
    let (client, entity) = (uuid(), kit.entity("gap"));
    let second = envelope(
        &client,
        vec![op(2, 1, Some(&entity), json!({"second": true}))],
    );
    for attempt in 0..2 {
        let (ex, r) = kit.ops(&second).await?;
        ensure!(
            r[0]["status"] == "out_of_order" && r[0]["last"] == 0,
            ex,
            "seq 2 with prev 1 before seq 1 must be out_of_order with last 0"
        );
        ensure!(
            attempt == 0 || !replayed(&r[0]),
            ex,
            "out_of_order is not final: it must not be stored and replayed"
        );
    }
    let (ex, e) = kit.read(&entity).await?;
    ensure!(e.is_none(), ex, "an out_of_order op changed the entity");
    let (ex, r) = kit
        .ops(&envelope(
            &client,
            vec![op(1, 0, Some(&entity), json!({"first": true}))],
        ))
        .await?;
    ensure!(
        r[0]["status"] == "applied" && r[0]["version"] == 1,
        ex,
        "the fill (seq 1) was not applied at version 1"
    );
    let (ex, r) = kit.ops(&second).await?;
    ensure!(
        r[0]["status"] == "applied" && r[0]["version"] == 2,
        ex,
        "after the fill, seq 2 must apply at version 2"
    );
    let (ex, e) = kit.read(&entity).await?;
    ensure!(
        e.is_some_and(|e| e["state"] == json!({"first": true, "second": true})),
        ex,
        "the state is not both ops merged"
    );
    Ok(Outcome::Held)
}

async fn duplicate_seq(kit: &Kit) -> Check {
    let (client, entity) = (uuid(), kit.entity("duplicate"));
    let (ex, r) = kit
        .ops(&envelope(
            &client,
            vec![op(5, 0, Some(&entity), json!({"x": 1}))],
        ))
        .await?;
    ensure!(r[0]["status"] == "applied", ex, "seq 5 was not applied");
    for seq in [5, 3] {
        let copy = envelope(&client, vec![op(seq, 0, Some(&entity), json!({"x": 99}))]);
        let (ex, r) = kit.ops(&copy).await?;
        ensure!(
            r[0]["status"] == "duplicate" && r[0]["version"] == 1,
            ex,
            "seq {seq} under a new id after seq 5 must be duplicate with version 1"
        );
        let (ex, r) = kit.ops(&copy).await?;
        ensure!(
            r[0]["status"] == "duplicate" && replayed(&r[0]),
            ex,
            "a duplicate is final: its resend must replay it"
        );
    }
    let (ex, e) = kit.read(&entity).await?;
    ensure!(
        e.is_some_and(|e| e["version"] == 1 && e["state"] == json!({"x": 1})),
        ex,
        "a duplicate changed the entity"
    );
    // Another client has its own `last`.
    let (ex, r) = kit
        .ops(&envelope(
            &uuid(),
            vec![op(3, 0, Some(&entity), json!({"y": 1}))],
        ))
        .await?;
    ensure!(
        r[0]["status"] == "applied",
        ex,
        "another client's seq 3 must apply: `last` is per client"
    );
    Ok(Outcome::Held)
}

async fn versions_and_merge(kit: &Kit) -> Check {
    let (client, entity) = (uuid(), kit.entity("merge"));
    let body = envelope(
        &client,
        vec![
            op(
                1,
                0,
                Some(&entity),
                json!({"a": {"b": 1, "c": 2}, "keep": "yes"}),
            ),
            op(2, 1, Some(&entity), json!({"a": {"b": null}, "d": [1, 2]})),
            op(3, 2, Some(&entity), json!({"e": true})),
        ],
    );
    let (ex, r) = kit.ops(&body).await?;
    for (i, result) in r.iter().enumerate() {
        ensure!(
            result["status"] == "applied" && result["version"] == i as u64 + 1,
            ex,
            "ops[{i}] must be applied at version {}",
            i + 1
        );
    }
    let (ex, e) = kit.read(&entity).await?;
    let want = json!({"a": {"c": 2}, "d": [1, 2], "keep": "yes", "e": true});
    ensure!(
        e.as_ref()
            .is_some_and(|e| e["version"] == 3 && e["state"] == want && e["id"] == json!(entity)),
        ex,
        "GET /v1/entities must say version 3 and state {want}"
    );
    Ok(Outcome::Held)
}

/// A conflict has the current version and exactly one of `state` (an object) and
/// `state_omitted: true`.
fn conflict_shape(result: &Value, version: u64) -> bool {
    let has_state = result.get("state").is_some_and(Value::is_object);
    let omitted = result.get("state_omitted") == Some(&json!(true));
    result["version"] == version && has_state != omitted
}

async fn stale_conflict(kit: &Kit) -> Check {
    let (alice, bob, entity) = (uuid(), uuid(), kit.entity("conflict"));
    let (ex, r) = kit
        .ops(&envelope(
            &alice,
            vec![
                op(1, 0, Some(&entity), json!({"title": "t"})),
                op(2, 1, Some(&entity), json!({"approved": true})),
            ],
        ))
        .await?;
    ensure!(
        r[1]["status"] == "applied",
        ex,
        "the setup ops were not applied"
    );
    let stale = with_base(op(1, 0, Some(&entity), json!({"approved": false})), 1);
    let (ex, r) = kit.ops(&envelope(&bob, vec![stale.clone()])).await?;
    ensure!(
        r[0]["status"] == "conflict" && conflict_shape(&r[0], 2),
        ex,
        "another client's op against version 1 of a version-2 entity must be a conflict with version 2 and one of state / state_omitted"
    );
    let (ex, e) = kit.read(&entity).await?;
    ensure!(
        e.is_some_and(|e| e["version"] == 2),
        ex,
        "a conflict changed the entity"
    );
    let (ex, r) = kit.ops(&envelope(&bob, vec![stale.clone()])).await?;
    ensure!(
        r[0]["status"] == "conflict" && replayed(&r[0]) && r[0]["version"] == 2,
        ex,
        "the conflicting id resent must replay its conflict"
    );
    let mut future = with_base(op(1, 0, Some(&entity), json!({"x": 1})), 9);
    future["id"] = json!(uuid());
    let (ex, r) = kit.ops(&envelope(&bob, vec![future])).await?;
    ensure!(
        r[0]["status"] == "conflict",
        ex,
        "a base_version above the entity's version must be a conflict"
    );
    let mut retry = with_base(stale, 2);
    retry["id"] = json!(uuid());
    let (ex, r) = kit.ops(&envelope(&bob, vec![retry])).await?;
    ensure!(
        r[0]["status"] == "applied" && r[0]["version"] == 3,
        ex,
        "a copy with a new id, the same seq and the current base_version must apply (client-wins)"
    );
    Ok(Outcome::Held)
}

async fn own_writes_not_stale(kit: &Kit) -> Check {
    let (alice, entity) = (uuid(), kit.entity("own"));
    let (ex, r) = kit
        .ops(&envelope(
            &alice,
            vec![
                op(1, 0, Some(&entity), json!({"c1": "a"})),
                op(2, 1, Some(&entity), json!({"c2": "b"})),
                with_base(op(3, 2, Some(&entity), json!({"approved": true})), 0),
            ],
        ))
        .await?;
    ensure!(
        r[2]["status"] == "applied" && r[2]["version"] == 3,
        ex,
        "an op against version 0 after the same client's own two writes must apply"
    );
    Ok(Outcome::Held)
}

async fn rejected_per_op(kit: &Kit) -> Check {
    let client = uuid();
    let mut invalid = op(3, 0, Some(&kit.entity("rejected-b")), json!({}));
    invalid["prev"] = json!(3);
    let body = envelope(
        &client,
        vec![
            op(1, 0, Some(&kit.entity("rejected-a")), json!({"ok": 1})),
            invalid,
            op(5, 0, Some(&kit.entity("rejected-c")), json!({"ok": 2})),
        ],
    );
    let (ex, r) = kit.ops(&body).await?;
    ensure!(
        r[0]["status"] == "applied"
            && r[1]["status"] == "rejected"
            && r[1]["reason"].is_string()
            && r[2]["status"] == "applied",
        ex,
        "[valid, prev ≥ seq, valid] must be [applied, rejected with a reason, applied]"
    );
    let resend = envelope(&client, vec![body["ops"][1].clone()]);
    let (ex, r) = kit.ops(&resend).await?;
    ensure!(
        r[0]["status"] == "rejected" && replayed(&r[0]),
        ex,
        "a rejected op is final: its resend must replay it"
    );
    Ok(Outcome::Held)
}

async fn op_missing_key(kit: &Kit) -> Check {
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some(&kit.entity("nokey")), json!({}))],
    );
    let ex = kit.keyed(None, &body).await?;
    ensure!(
        ex.answer.status == 400 && problem_is(&ex.answer, "missing-key"),
        ex,
        "expected 400 …/missing-key"
    );
    let (ex, e) = kit.read(&kit.entity("nokey")).await?;
    ensure!(e.is_none(), ex, "a request without a key was applied");
    Ok(Outcome::Held)
}

async fn op_replay(kit: &Kit) -> Check {
    let the_op = op(1, 0, Some(&kit.entity("keyed")), json!({"x": 1}));
    let key = the_op["id"].as_str().unwrap_or_default().to_owned();
    let body = envelope(&uuid(), vec![the_op]);
    let ex = kit.keyed(Some(&key), &body).await?;
    ensure!(
        ex.answer.status == 200
            && ex.answer.json["status"] == "applied"
            && ex.answer.json["version"] == 1
            && !replayed(&ex.answer.json),
        ex,
        "the first keyed request must be 200 applied at version 1"
    );
    let quoted = format!("\"{key}\"");
    for k in [key.as_str(), quoted.as_str()] {
        let ex = kit.keyed(Some(k), &body).await?;
        ensure!(
            ex.answer.status == 200 && ex.answer.json["version"] == 1 && replayed(&ex.answer.json),
            ex,
            "the same key ({k}) and body must replay the first answer with replayed: true"
        );
    }
    Ok(Outcome::Held)
}

async fn op_key_reused(kit: &Kit) -> Check {
    let client = uuid();
    let the_op = op(1, 0, Some(&kit.entity("reused")), json!({"x": 1}));
    let key = uuid();
    let ex = kit
        .keyed(Some(&key), &envelope(&client, vec![the_op.clone()]))
        .await?;
    ensure!(
        ex.answer.status == 200,
        ex,
        "the first keyed request answered {}",
        ex.answer.status
    );
    let mut other = the_op;
    other["payload"] = json!({"x": 2});
    let ex = kit
        .keyed(Some(&key), &envelope(&client, vec![other]))
        .await?;
    ensure!(
        ex.answer.status == 422 && problem_is(&ex.answer, "key-reused"),
        ex,
        "expected 422 …/key-reused"
    );
    let (ex, e) = kit.read(&kit.entity("reused")).await?;
    ensure!(
        e.is_some_and(|e| e["state"] == json!({"x": 1})),
        ex,
        "the reused key's second body took effect"
    );
    Ok(Outcome::Held)
}

async fn op_conflict(kit: &Kit) -> Check {
    let entity = kit.entity("keyed-conflict");
    let (ex, r) = kit
        .ops(&envelope(
            &uuid(),
            vec![
                op(1, 0, Some(&entity), json!({"a": 1})),
                op(2, 1, Some(&entity), json!({"b": 1})),
            ],
        ))
        .await?;
    ensure!(
        r[1]["status"] == "applied",
        ex,
        "the setup ops were not applied"
    );
    let stale = with_base(op(1, 0, Some(&entity), json!({"c": 1})), 1);
    let key = stale["id"].as_str().unwrap_or_default().to_owned();
    let ex = kit
        .keyed(Some(&key), &envelope(&uuid(), vec![stale]))
        .await?;
    ensure!(
        ex.answer.status == 409
            && problem_is(&ex.answer, "conflict")
            && conflict_shape(&ex.answer.json, 2),
        ex,
        "expected 409 …/conflict with version 2 and one of state / state_omitted"
    );
    Ok(Outcome::Held)
}

async fn op_rejected(kit: &Kit) -> Check {
    let mut invalid = op(2, 0, Some(&kit.entity("keyed-rejected")), json!({}));
    invalid["prev"] = json!(2);
    let key = uuid();
    let ex = kit
        .keyed(Some(&key), &envelope(&uuid(), vec![invalid]))
        .await?;
    ensure!(
        ex.answer.status == 422
            && problem_is(&ex.answer, "rejected")
            && ex.answer.json["reason"].is_string(),
        ex,
        "prev ≥ seq must be 422 …/rejected with a reason"
    );
    Ok(Outcome::Held)
}

async fn op_out_of_order(kit: &Kit) -> Check {
    let client = uuid();
    let second = op(2, 1, Some(&kit.entity("keyed-gap")), json!({}));
    let key = second["id"].as_str().unwrap_or_default().to_owned();
    let body = envelope(&client, vec![second]);
    for _ in 0..2 {
        let ex = kit.keyed(Some(&key), &body).await?;
        ensure!(
            ex.answer.status == 425
                && problem_is(&ex.answer, "out-of-order")
                && ex.answer.json["last"] == 0,
            ex,
            "a gap must be 425 …/out-of-order with last 0, every time (it is not stored)"
        );
    }
    let (ex, r) = kit
        .ops(&envelope(
            &client,
            vec![op(1, 0, Some(&kit.entity("keyed-gap")), json!({}))],
        ))
        .await?;
    ensure!(r[0]["status"] == "applied", ex, "the fill was not applied");
    let ex = kit.keyed(Some(&key), &body).await?;
    ensure!(
        ex.answer.status == 200
            && ex.answer.json["status"] == "applied"
            && ex.answer.json["version"] == 2,
        ex,
        "after the fill the same key must be judged again and apply"
    );
    Ok(Outcome::Held)
}

async fn op_concurrent(kit: &Kit) -> Check {
    let entity = kit.entity("keyed-concurrent");
    let the_op = op(1, 0, Some(&entity), json!({"n": 1}));
    let key = the_op["id"].as_str().unwrap_or_default().to_owned();
    let body = envelope(&uuid(), vec![the_op]);
    let answers = futures_join(
        (0..16)
            .map(|_| kit.keyed(Some(&key), &body))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut fresh = 0;
    for ex in answers {
        let ex = ex?;
        match ex.answer.status {
            200 if ex.answer.json["status"] == "applied" => {
                if !replayed(&ex.answer.json) {
                    fresh += 1;
                }
            }
            409 => ensure!(
                problem_is(&ex.answer, "in-progress") && ex.answer.retry_after.is_some(),
                ex,
                "a 409 to a copy of a running request must be …/in-progress with Retry-After"
            ),
            _ => {
                return Err(Broken::at(
                    &ex,
                    "a concurrent copy must be 200 applied or 409 in-progress",
                ));
            }
        }
    }
    let (ex, e) = kit.read(&entity).await?;
    ensure!(
        fresh == 1 && e.is_some_and(|e| e["version"] == 1),
        ex,
        "16 concurrent copies of one key: {fresh} answered as first applies, and the entity must be at version 1"
    );
    Ok(Outcome::Held)
}

/// Runs the futures concurrently (on this task) and returns their outputs in order.
async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("ready")).collect()
}

async fn op_shares_ids(kit: &Kit) -> Check {
    let the_op = op(1, 0, Some(&kit.entity("shared-id")), json!({"x": 1}));
    let key = the_op["id"].as_str().unwrap_or_default().to_owned();
    let body = envelope(&uuid(), vec![the_op]);
    let (ex, r) = kit.ops(&body).await?;
    ensure!(r[0]["status"] == "applied", ex, "the op was not applied");
    let ex = kit.keyed(Some(&key), &body).await?;
    ensure!(
        ex.answer.status == 200 && replayed(&ex.answer.json) && ex.answer.json["version"] == 1,
        ex,
        "the same op id on /v1/op must be a replay (200, replayed: true, version 1)"
    );
    Ok(Outcome::Held)
}

/// POST /v1/grants for `body`; the grant.
async fn grant(kit: &Kit, body: &Value) -> Result<String, Broken> {
    let ex = kit.post("/v1/grants", body).await?;
    let grant = ex.answer.json["grant"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        ex.answer.status == 200
            && !grant.is_empty()
            && grant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && ex.answer.json["expires_at"]
                .as_u64()
                .is_some_and(|t| t > now_ms()),
        ex,
        "POST /v1/grants must answer 200 with a URL-safe grant and a future expires_at"
    );
    Ok(grant)
}

async fn beacon(kit: &Kit, grant: &str, body: &Value) -> Result<Exchange, Broken> {
    kit.send(
        Method::POST,
        &format!("/v1/beacon?grant={grant}"),
        Auth::None,
        &[],
        Some(body.to_string()),
    )
    .await
}

async fn beacon_grant(kit: &Kit) -> Check {
    let entity = kit.entity("beacon");
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some(&entity), json!({"closing": true}))],
    );
    let grant = grant(kit, &body).await?;
    let (ex, e) = kit.read(&entity).await?;
    ensure!(e.is_none(), ex, "POST /v1/grants applied the op");
    let ex = beacon(kit, &grant, &body).await?;
    let result = &ex.answer.json["results"][0];
    ensure!(
        ex.answer.status == 200 && result["status"] == "applied" && !replayed(result),
        ex,
        "a beacon with its grant must be 200 with the op applied"
    );
    let ex = beacon(kit, &grant, &body).await?;
    ensure!(
        ex.answer.status == 200 && replayed(&ex.answer.json["results"][0]),
        ex,
        "the beacon sent twice must replay"
    );
    let (ex, r) = kit.ops(&body).await?;
    ensure!(
        replayed(&r[0]) && r[0]["version"] == 1,
        ex,
        "the queued copy after the beacon must replay"
    );
    Ok(Outcome::Held)
}

async fn beacon_tampered(kit: &Kit) -> Check {
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some(&kit.entity("tampered")), json!({}))],
    );
    let grant = grant(kit, &body).await?;
    // Change one character in the middle.
    let mut bytes = grant.into_bytes();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap_or_default();
    let ex = beacon(kit, &tampered, &body).await?;
    ensure!(
        ex.answer.status == 401 && problem_is(&ex.answer, "grant-invalid"),
        ex,
        "expected 401 …/grant-invalid"
    );
    let (ex, e) = kit.read(&kit.entity("tampered")).await?;
    ensure!(e.is_none(), ex, "a tampered grant applied the op");
    Ok(Outcome::Held)
}

async fn beacon_mismatch(kit: &Kit) -> Check {
    let client = uuid();
    let granted = op(1, 0, Some(&kit.entity("mismatch")), json!({"ok": true}));
    let grant = grant(kit, &envelope(&client, vec![granted.clone()])).await?;
    let mut changed = granted;
    changed["payload"] = json!({"ok": false});
    let ex = beacon(kit, &grant, &envelope(&client, vec![changed])).await?;
    ensure!(
        ex.answer.status == 403 && problem_is(&ex.answer, "grant-mismatch"),
        ex,
        "the granted id with another payload must be 403 …/grant-mismatch"
    );
    let other = op(2, 1, Some(&kit.entity("mismatch")), json!({}));
    let ex = beacon(kit, &grant, &envelope(&client, vec![other])).await?;
    ensure!(
        ex.answer.status == 403 && problem_is(&ex.answer, "grant-mismatch"),
        ex,
        "an op the grant does not name must be 403 …/grant-mismatch"
    );
    let (ex, e) = kit.read(&kit.entity("mismatch")).await?;
    ensure!(e.is_none(), ex, "a mismatched beacon applied an op");
    Ok(Outcome::Held)
}

async fn beacon_no_credentials(kit: &Kit) -> Check {
    let body = envelope(
        &uuid(),
        vec![op(1, 0, Some(&kit.entity("anonymous")), json!({}))],
    );
    let ex = kit
        .send(
            Method::POST,
            "/v1/beacon",
            Auth::None,
            &[],
            Some(body.to_string()),
        )
        .await?;
    ensure!(
        ex.answer.status == 401,
        ex,
        "a beacon without a header or a grant must be 401"
    );
    Ok(Outcome::Held)
}

async fn too_large(kit: &Kit) -> Check {
    let padding = "x".repeat(kit.large_body);
    let body = envelope(
        &uuid(),
        vec![op(
            1,
            0,
            Some(&kit.entity("large")),
            json!({"pad": padding}),
        )],
    );
    let ex = match kit.post("/v1/ops", &body).await {
        Ok(ex) => ex,
        Err(broken) => {
            return Err(Broken {
                why: format!(
                    "a {} byte body got no answer (expected 413): {}",
                    kit.large_body,
                    clip(&broken.why, 200)
                ),
                exchange: None,
            });
        }
    };
    ensure!(
        ex.answer.status == 413 && problem_is(&ex.answer, "too-large"),
        ex,
        "a {} byte body must be 413 …/too-large (raise --large-body past your limit)",
        kit.large_body
    );
    Ok(Outcome::Held)
}

async fn rate_limited(kit: &Kit) -> Check {
    let body = envelope(&uuid(), vec![op(1, 0, None, json!({"rate": true}))]);
    let mut sent = 0;
    while sent < kit.rate_requests {
        let batch = 32.min(kit.rate_requests - sent);
        sent += batch;
        let answers = futures_join((0..batch).map(|_| kit.post("/v1/ops", &body)).collect()).await;
        for ex in answers {
            let ex = ex?;
            match ex.answer.status {
                200 => {}
                429 => {
                    let retry = ex.answer.retry_after.clone().unwrap_or_default();
                    let valid = retry.trim().parse::<u64>().is_ok()
                        || (retry.ends_with(" GMT") && retry.len() >= 29);
                    ensure!(
                        valid,
                        ex,
                        "429 must carry Retry-After: <seconds> or an HTTP date"
                    );
                    ensure!(
                        problem_is(&ex.answer, "rate-limited"),
                        ex,
                        "429 must be …/rate-limited"
                    );
                    return Ok(Outcome::Held);
                }
                status => {
                    return Err(Broken::at(
                        &ex,
                        format!("answered {status} while sending fast"),
                    ));
                }
            }
        }
    }
    Ok(Outcome::Skipped(format!(
        "no 429 after {sent} requests from one client"
    )))
}

async fn problem_json(kit: &Kit) -> Check {
    // Add two answers every backend makes: an unknown route and a missing token.
    kit.send(
        Method::GET,
        "/v1/conformance-no-such-route",
        Auth::Token,
        &[],
        None,
    )
    .await?;
    kit.send(
        Method::GET,
        &format!("/v1/entities/{}", kit.entity("none")),
        Auth::None,
        &[],
        None,
    )
    .await?;
    let errors = kit.errors.lock().unwrap().clone();
    for ex in &errors {
        let a = &ex.answer;
        let media = a.content_type.split(';').next().unwrap_or("").trim();
        ensure!(
            media.eq_ignore_ascii_case("application/problem+json"),
            ex,
            "a {} is not application/problem+json",
            a.status
        );
        ensure!(
            a.json["type"].is_string()
                && a.json["title"].is_string()
                && a.json["status"] == a.status,
            ex,
            "the problem must have type, title and status {}",
            a.status
        );
    }
    Ok(Outcome::Held)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let base = args.url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let kit = Kit {
        http,
        base: base.clone(),
        token: args.token,
        run: uuid()[..8].to_owned(),
        large_body: args.large_body,
        rate_requests: args.rate_requests,
        errors: Mutex::new(Vec::new()),
    };
    if let Err(e) = kit.http.get(format!("{base}/v1/health")).send().await {
        eprintln!("outbox-conformance: cannot reach {base}: {e}");
        return ExitCode::from(2);
    }
    println!(
        "outbox-conformance: {base} (run {}, entities conformance-{}/…)",
        kit.run, kit.run
    );
    let (mut held, mut broken, mut skipped) = (0, 0, 0);
    for (name, rule) in RULES {
        if args
            .only
            .as_deref()
            .is_some_and(|only| !name.contains(only))
        {
            continue;
        }
        match rule(&kit).await {
            Ok(Outcome::Held) => {
                held += 1;
                println!("held    {name}");
            }
            Ok(Outcome::Skipped(why)) => {
                skipped += 1;
                println!("skipped {name}: {why}");
            }
            Err(b) => {
                broken += 1;
                println!("BROKEN  {name}: {}", b.why);
                if let Some(ex) = b.exchange {
                    println!("{}", ex.show());
                }
            }
        }
    }
    println!("{held} held, {broken} broken, {skipped} skipped");
    if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
