//! The wasm test bodies, shared by tests/browser.rs, tests/service_worker.rs and
//! tests/dedicated_worker.rs, so that each runs in every global scope the outbox supports.
//!
//! They run against the real reference server, which `scripts/test-wasm` starts on a free port
//! and names in `OUTBOX_TEST_SERVER` at compile time (tenant `test`, token `secret`, admin token
//! `admin`). Each test uses its own database, so its own client id, and its own entities.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Function, Object, Promise, Reflect};
use outbox::web::{Outbox, schema};
use serde_json::{Value, json};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::wasm_bindgen_test;
use web_sys::{Headers, RequestInit, Response};

fn server() -> &'static str {
    // Read at compile time: the test runs in a browser, which has no environment. Not `env!`,
    // so that the tests still build (for clippy) without a server.
    match option_env!("OUTBOX_TEST_SERVER") {
        Some(url) => url,
        None => panic!("run through scripts/test-wasm, which starts the server"),
    }
}

#[wasm_bindgen]
extern "C" {
    // Named through globalThis so the binding does not clash with the library's own `fetch`.
    #[wasm_bindgen(js_namespace = globalThis, js_name = fetch)]
    fn global_fetch(url: &str, init: &RequestInit) -> Promise;
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:x}", (js_sys::Math::random() * 1e15) as u64)
}

async fn call(promise: Promise) -> Result<JsValue, JsValue> {
    JsFuture::from(promise).await
}

async fn ok(promise: Promise) -> Value {
    let value = call(promise)
        .await
        .unwrap_or_else(|e| panic!("rejected: {}", describe(&e)));
    js_to_json(&value)
}

fn js_to_json(value: &JsValue) -> Value {
    if value.is_undefined() {
        return Value::Null;
    }
    let text = js_sys::JSON::stringify(value).unwrap().as_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

fn describe(error: &JsValue) -> String {
    let get = |k: &str| {
        Reflect::get(error, &k.into())
            .ok()
            .and_then(|v| v.as_string())
    };
    format!("{:?} {:?}", get("code"), get("message"))
}

/// The `code` of a rejected promise.
async fn error_code(promise: Promise) -> String {
    let error = call(promise).await.expect_err("expected a rejection");
    Reflect::get(&error, &"code".into())
        .unwrap()
        .as_string()
        .unwrap_or_default()
}

fn to_js(value: &Value) -> JsValue {
    js_sys::JSON::parse(&value.to_string()).unwrap()
}

/// Credentials the test can change while the outbox runs.
#[derive(Clone)]
struct Token(Rc<RefCell<String>>);

impl Token {
    fn new(token: &str) -> Self {
        Token(Rc::new(RefCell::new(token.into())))
    }

    fn set(&self, token: &str) {
        *self.0.borrow_mut() = token.into();
    }

    fn hook(&self) -> Function {
        let token = self.0.clone();
        Closure::<dyn Fn() -> JsValue>::new(move || {
            to_js(&json!({"authorization": format!("Bearer {}", token.borrow())}))
        })
        .into_js_value()
        .unchecked_into()
    }
}

async fn open_with(database: &str, token: &Token, extra: Value) -> Outbox {
    let config = to_js(&extra);
    let set = |k: &str, v: &JsValue| Reflect::set(&config, &k.into(), v).unwrap();
    if Reflect::get(&config, &"endpoint".into())
        .unwrap()
        .is_undefined()
    {
        set("endpoint", &server().into());
    }
    set("database", &database.into());
    set("auth", &token.hook());
    Outbox::connect(config)
        .await
        .unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// Fast retries, so tests that wait for a retry wait milliseconds.
fn quick() -> Value {
    json!({"backoff": {"baseMs": 10, "capMs": 80}, "breaker": {"minCalls": 20}})
}

async fn open(database: &str) -> Outbox {
    open_with(database, &Token::new("secret"), quick()).await
}

/// Collects the events named `name`.
fn record(outbox: &Outbox, name: &str) -> Rc<RefCell<Vec<Value>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let sink = seen.clone();
    let callback = Closure::<dyn Fn(JsValue)>::new(move |event: JsValue| {
        sink.borrow_mut().push(js_to_json(&event));
    });
    outbox
        .on(name.into(), callback.into_js_value().unchecked_into())
        .unwrap();
    seen
}

async fn sleep(ms: u32) {
    gloo_timers::future::TimeoutFuture::new(ms).await;
}

/// Polls until `done` holds; a browser test has to wait for real timers and the network.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..250 {
        if done().await {
            return;
        }
        sleep(40).await;
    }
    panic!("timed out waiting until {what}");
}

async fn stats(outbox: &Outbox) -> Value {
    ok(outbox.stats()).await
}

async fn admin(method: &str, path: &str, body: Option<Value>) -> Value {
    let headers = Headers::new().unwrap();
    let token = if path.starts_with("/v1/admin/") {
        "admin"
    } else {
        "secret"
    };
    headers
        .set("authorization", &format!("Bearer {token}"))
        .unwrap();
    let init = RequestInit::new();
    init.set_method(method);
    init.set_headers(&headers);
    if let Some(body) = body {
        headers.set("content-type", "application/json").unwrap();
        init.set_body(&body.to_string().into());
    }
    let url = format!("{}{}", server(), path);
    let response: Response = call(global_fetch(&url, &init))
        .await
        .unwrap()
        .unchecked_into();
    let text = call(response.text().unwrap())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    assert!(
        response.ok(),
        "admin {method} {path}: {} {text}",
        response.status()
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn inject(rules: Value) {
    admin("DELETE", "/v1/admin/faults", None).await;
    admin("POST", "/v1/admin/faults", Some(json!({"rules": rules}))).await;
}

/// Every op the server saw from this client, in arrival order.
async fn server_log(client: &str) -> Vec<Value> {
    let log = admin("GET", "/v1/admin/log?tenant=test", None).await;
    log.as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["client"] == client)
        .cloned()
        .collect()
}

async fn client_of(outbox: &Outbox) -> String {
    stats(outbox).await["client"].as_str().unwrap().to_owned()
}

async fn enqueue(outbox: &Outbox, request: Value) -> Value {
    ok(outbox.enqueue(to_js(&request))).await
}

fn applied(log: &[Value]) -> Vec<&Value> {
    log.iter()
        .filter(|e| e["status"] == "applied" && e["replayed"] == false)
        .collect()
}

#[wasm_bindgen_test]
async fn ops_survive_closing_and_reopening() {
    let db = unique("survive");
    // A port nobody listens on: every send fails, so the ops stay queued (and the breaker
    // opens, which the later flush ends early).
    let offline = json!({"endpoint": "http://127.0.0.1:9", "backoff": {"baseMs": 5, "capMs": 20}});
    let outbox = open_with(&db, &Token::new("secret"), offline.clone()).await;
    let first = enqueue(
        &outbox,
        json!({"entity": "doc/1", "kind": "edit", "payload": {"n": 1}}),
    )
    .await;
    let second = enqueue(
        &outbox,
        json!({"entity": "doc/1", "kind": "edit", "payload": {"n": 2}}),
    )
    .await;
    ok(outbox.close()).await;
    assert_eq!(error_code(outbox.stats()).await, "CLOSED");

    let reopened = open_with(&db, &Token::new("secret"), offline).await;
    let pending = ok(reopened.pending(None)).await;
    let ids: Vec<&Value> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|op| &op["id"])
        .collect();
    assert_eq!(ids, [&first["id"], &second["id"]]);
    assert_eq!(pending[1]["payload"], json!({"n": 2}));
    assert_eq!(pending[1]["prev"], first["seq"]);
    ok(reopened.close()).await;

    let online = open(&db).await;
    ok(online.flush()).await;
    eventually("both ops are delivered", async || {
        stats(&online).await["pending"] == 0
    })
    .await;
    let log = server_log(&client_of(&online).await).await;
    assert_eq!(applied(&log).len(), 2);
}

#[wasm_bindgen_test]
async fn ops_on_one_entity_are_applied_in_order() {
    let db = unique("order");
    let outbox = open(&db).await;
    let mut expected = Vec::new();
    for n in 0..6 {
        let entity = format!("{db}/{}", n % 2);
        let receipt = enqueue(
            &outbox,
            json!({"entity": entity, "kind": "step", "payload": {"n": n}}),
        )
        .await;
        expected.push((entity, receipt["seq"].as_u64().unwrap()));
    }
    enqueue(&outbox, json!({"kind": "unordered", "payload": {}})).await;
    ok(outbox.flush()).await;
    eventually("all delivered", async || {
        stats(&outbox).await["pending"] == 0
    })
    .await;
    let log = server_log(&client_of(&outbox).await).await;
    assert_eq!(applied(&log).len(), 7);
    for entity in [format!("{db}/0"), format!("{db}/1")] {
        let seqs: Vec<u64> = applied(&log)
            .iter()
            .filter(|e| e["entity"] == entity.as_str())
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        let mut want: Vec<u64> = expected
            .iter()
            .filter(|(e, _)| *e == entity)
            .map(|(_, s)| *s)
            .collect();
        want.sort();
        assert_eq!(seqs, want, "order on {entity}");
    }
}

#[wasm_bindgen_test]
async fn delivers_to_the_reference_server() {
    let db = unique("deliver");
    let outbox = open(&db).await;
    let delivered = record(&outbox, "delivered");
    let entity = format!("{db}/pr");
    enqueue(
        &outbox,
        json!({"entity": entity, "kind": "review", "payload": {"approved": true}}),
    )
    .await;
    enqueue(
        &outbox,
        json!({"entity": entity, "kind": "review", "payload": {"comment": "ship it"}}),
    )
    .await;
    eventually("two delivered events", async || {
        delivered.borrow().len() == 2
    })
    .await;
    let state = admin("GET", &format!("/v1/entities/{entity}"), None).await;
    assert_eq!(state["version"], 2);
    assert_eq!(
        state["state"],
        json!({"approved": true, "comment": "ship it"})
    );
    assert_eq!(delivered.borrow()[1]["version"], 2);
    let stats = stats(&outbox).await;
    assert_eq!(
        (stats["pending"].clone(), stats["bytes"].clone()),
        (json!(0), json!(0))
    );
}

#[wasm_bindgen_test]
async fn retries_after_injected_server_errors() {
    let db = unique("retry");
    inject(json!([{"route": "ops", "tenant": "test", "times": 2, "action": {"status": 500}}]))
        .await;
    let outbox = open(&db).await;
    let retries = record(&outbox, "retry-scheduled");
    let delivered = record(&outbox, "delivered");
    let receipt = enqueue(
        &outbox,
        json!({"entity": format!("{db}/e"), "kind": "k", "payload": {}}),
    )
    .await;
    eventually("the op is delivered", async || {
        delivered.borrow().len() == 1
    })
    .await;
    assert_eq!(retries.borrow().len(), 2, "{:?}", retries.borrow());
    assert!(
        retries.borrow()[0]["error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    let log = server_log(&client_of(&outbox).await).await;
    let ours: Vec<&Value> = log.iter().filter(|e| e["id"] == receipt["id"]).collect();
    assert_eq!(
        ours.len(),
        3,
        "two failed attempts then one apply: {ours:?}"
    );
    assert_eq!(applied(&log).len(), 1);
}

#[wasm_bindgen_test]
async fn dead_letter_on_422_does_not_block_its_entity() {
    let db = unique("dead");
    inject(json!([{"route": "any", "tenant": "test", "times": 1,
                   "action": {"reject": "comments may not be empty", "kind": "comment"}}]))
    .await;
    let outbox = open(&db).await;
    let dead = record(&outbox, "dead-lettered");
    let entity = format!("{db}/pr");
    let bad = enqueue(
        &outbox,
        json!({"entity": entity, "kind": "comment", "payload": {"text": ""}}),
    )
    .await;
    let good = enqueue(
        &outbox,
        json!({"entity": entity, "kind": "approve", "payload": {"ok": true}}),
    )
    .await;
    ok(outbox.flush()).await;
    eventually("queue is empty", async || {
        stats(&outbox).await["pending"] == 0
    })
    .await;
    assert_eq!(dead.borrow().len(), 1);
    let letters = ok(outbox.dead_letters()).await;
    assert_eq!(letters[0]["op"]["id"], bad["id"]);
    assert_eq!(letters[0]["cause"], "rejected");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("may not be empty")
    );
    let log = server_log(&client_of(&outbox).await).await;
    let good_entry = log
        .iter()
        .find(|e| e["id"] == good["id"])
        .expect("the next op was sent");
    assert_eq!(
        good_entry["status"], "applied",
        "the op after the dead letter was relinked past it"
    );

    // Retrying a rejected op sends a copy with a new id (the old id's answer is stored).
    let retry = ok(outbox.retry_dead_letter(bad["id"].as_str().unwrap().into(), None)).await;
    assert_ne!(retry["id"], bad["id"]);
    ok(outbox.flush()).await;
    eventually("the retry is delivered", async || {
        stats(&outbox).await["pending"] == 0
    })
    .await;
    assert_eq!(ok(outbox.dead_letters()).await, json!([]));
    assert_eq!(
        error_code(outbox.discard_dead_letter(bad["id"].as_str().unwrap().into(), None)).await,
        "NOT_FOUND"
    );
}

#[wasm_bindgen_test]
async fn unauthorized_pauses_until_the_auth_hook_changes() {
    let db = unique("auth");
    let token = Token::new("wrong");
    let outbox = open_with(&db, &token, quick()).await;
    let auth_required = record(&outbox, "auth-required");
    let delivered = record(&outbox, "delivered");
    enqueue(
        &outbox,
        json!({"entity": format!("{db}/e"), "kind": "k", "payload": {}}),
    )
    .await;
    enqueue(
        &outbox,
        json!({"entity": format!("{db}/f"), "kind": "k", "payload": {}}),
    )
    .await;
    eventually("auth-required", async || auth_required.borrow().len() == 1).await;
    let paused = stats(&outbox).await;
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["pending"], 2);
    // Waking with the same credentials changes nothing.
    ok(outbox.wake("alarm".into())).await;
    assert_eq!(stats(&outbox).await["pending"], 2);
    assert!(delivered.borrow().is_empty());

    token.set("secret");
    ok(outbox.wake("alarm".into())).await;
    eventually("both delivered", async || delivered.borrow().len() == 2).await;
    assert_eq!(stats(&outbox).await["paused"], false);
    assert_eq!(auth_required.borrow().len(), 1);
}

/// Another user (another client) moves the entity to version 1 first.
async fn entity_moved_by_someone_else(entity: &str) {
    let other = open(&unique("other-user")).await;
    enqueue(
        &other,
        json!({"entity": entity, "kind": "edit", "payload": {"by": "them"}}),
    )
    .await;
    ok(other.flush()).await;
    eventually("the other user's edit lands", async || {
        stats(&other).await["pending"] == 0
    })
    .await;
    ok(other.close()).await;
}

async fn conflicting_op(policy: &str) -> (Outbox, String, Value, Rc<RefCell<Vec<Value>>>) {
    let db = unique(&format!("conflict-{policy}"));
    let entity = format!("{db}/pr");
    entity_moved_by_someone_else(&entity).await;
    let mut config = quick();
    config["kinds"] = json!({"edit": {"conflict": policy}});
    let outbox = open_with(&db, &Token::new("secret"), config).await;
    let conflicts = record(&outbox, "conflict");
    let receipt = enqueue(
        &outbox,
        json!({"entity": entity, "kind": "edit", "payload": {"by": "me"}, "baseVersion": 0}),
    )
    .await;
    ok(outbox.flush()).await;
    eventually("a conflict event", async || conflicts.borrow().len() == 1).await;
    (outbox, entity, receipt, conflicts)
}

#[wasm_bindgen_test]
async fn server_wins_conflict_drops_the_op_and_reports_the_server_state() {
    let (outbox, entity, _, conflicts) = conflicting_op("server-wins").await;
    let event = conflicts.borrow()[0].clone();
    assert_eq!(event["resolution"], "server-wins");
    assert_eq!(event["serverVersion"], 1);
    assert_eq!(event["serverState"], json!({"by": "them"}));
    assert_eq!(stats(&outbox).await["pending"], 0);
    let state = admin("GET", &format!("/v1/entities/{entity}"), None).await;
    assert_eq!(state["state"], json!({"by": "them"}));
}

#[wasm_bindgen_test]
async fn client_wins_conflict_rebases_and_applies() {
    let (outbox, entity, receipt, conflicts) = conflicting_op("client-wins").await;
    let event = conflicts.borrow()[0].clone();
    assert_eq!(event["resolution"], "rebased");
    assert_ne!(event["rebasedAs"], receipt["id"]);
    eventually("the rebased copy lands", async || {
        stats(&outbox).await["pending"] == 0
    })
    .await;
    let state = admin("GET", &format!("/v1/entities/{entity}"), None).await;
    assert_eq!(
        (state["version"].clone(), state["state"].clone()),
        (json!(2), json!({"by": "me"}))
    );
    let log = server_log(&client_of(&outbox).await).await;
    let rebased = log.iter().find(|e| e["id"] == event["rebasedAs"]).unwrap();
    assert_eq!(
        rebased["seq"], receipt["seq"],
        "a rebase keeps its place in the sequence"
    );
}

#[wasm_bindgen_test]
async fn manual_conflict_parks_until_resolved() {
    let (outbox, entity, receipt, conflicts) = conflicting_op("manual").await;
    assert_eq!(conflicts.borrow()[0]["resolution"], "parked");
    let parked = ok(outbox.conflicts()).await;
    assert_eq!(parked[0]["op"]["id"], receipt["id"]);
    assert_eq!(parked[0]["serverState"], json!({"by": "them"}));
    assert_eq!(parked[0]["op"]["payload"], json!({"by": "me"}));
    let resolved = ok(outbox.resolve_conflict(
        receipt["id"].as_str().unwrap().into(),
        "keep-mine".into(),
        None,
    ))
    .await;
    assert_ne!(resolved["id"], receipt["id"]);
    ok(outbox.flush()).await;
    eventually("the kept op lands", async || {
        stats(&outbox).await["pending"] == 0
    })
    .await;
    let state = admin("GET", &format!("/v1/entities/{entity}"), None).await;
    assert_eq!(state["state"], json!({"by": "me"}));
    assert_eq!(ok(outbox.conflicts()).await, json!([]));
    let code = error_code(outbox.resolve_conflict(
        receipt["id"].as_str().unwrap().into(),
        "bogus".into(),
        None,
    ))
    .await;
    assert_eq!(code, "INVALID_ARGUMENT");
}

#[wasm_bindgen_test]
async fn quotas_refuse_with_queue_full_and_op_too_large() {
    let db = unique("quota");
    let config = json!({"endpoint": "http://127.0.0.1:9", "limits": {"maxPending": 2, "maxOpBytes": 1024, "maxBytes": 4096},
                        "backoff": {"baseMs": 60000, "capMs": 60000}});
    let outbox = open_with(&db, &Token::new("secret"), config).await;
    let full = record(&outbox, "queue-full");
    let big = "x".repeat(2000);
    let request = to_js(&json!({"kind": "k", "payload": {"text": big}}));
    assert_eq!(error_code(outbox.enqueue(request)).await, "OP_TOO_LARGE");
    enqueue(&outbox, json!({"kind": "k", "payload": 1})).await;
    enqueue(&outbox, json!({"kind": "k", "payload": 2})).await;
    let third = to_js(&json!({"kind": "k", "payload": 3}));
    assert_eq!(error_code(outbox.enqueue(third)).await, "QUEUE_FULL");
    assert_eq!(full.borrow().len(), 1);
    assert_eq!(full.borrow()[0]["limit"], "maxPending");
    assert_eq!(
        stats(&outbox).await["pending"],
        2,
        "a refused op is not queued"
    );
}

#[wasm_bindgen_test]
async fn bad_input_is_a_typed_error_never_a_panic() {
    let db = unique("bad");
    let outbox = open(&db).await;
    for bad in [
        json!(null),
        json!([1, 2]),
        json!({"kind": "k"}),
        json!({"kind": 7, "payload": {}}),
        json!({"kind": "", "payload": {}}),
        json!({"kind": "k", "payload": {}, "entity": 5}),
        json!({"kind": "k", "payload": {}, "baseVersion": -1}),
        json!({"kind": "k", "payload": {}, "baseVersion": 1.5}),
        json!({"kind": "k", "payload": {}, "priority": "urgent"}),
        json!({"kind": "k", "payload": {}, "basVersion": 1}),
    ] {
        assert_eq!(
            error_code(outbox.enqueue(to_js(&bad))).await,
            "INVALID_OP",
            "{bad}"
        );
    }
    let cyclic = Object::new();
    Reflect::set(&cyclic, &"self".into(), &cyclic).unwrap();
    let request = to_js(&json!({"kind": "k"}));
    Reflect::set(&request, &"payload".into(), &cyclic).unwrap();
    assert_eq!(error_code(outbox.enqueue(request)).await, "INVALID_OP");
    assert_eq!(
        error_code(outbox.retry_dead_letter("nope".into(), None)).await,
        "INVALID_ARGUMENT"
    );
    assert!(
        outbox
            .on("delivred".into(), Function::new_no_args(""))
            .is_err()
    );
    assert_eq!(
        error_code(outbox.wake("whenever".into())).await,
        "INVALID_ARGUMENT"
    );
    for config in [
        json!({}),
        json!({"endpoint": "ftp://x"}),
        json!({"endpoint": "http://x", "backof": {}}),
        json!({"endpoint": "http://x", "backoff": {"baseMs": 0}}),
        json!({"endpoint": "http://x", "database": ""}),
        json!({"endpoint": "http://x", "kinds": {"a": {"conflict": "sometimes"}}}),
    ] {
        let Err(error) = Outbox::connect(to_js(&config)).await else {
            panic!("{config} was accepted");
        };
        assert_eq!(error.code(), "INVALID_CONFIG", "{config}");
    }
    assert_eq!(stats(&outbox).await["pending"], 0);
}

#[wasm_bindgen_test]
async fn two_outboxes_on_one_database_deliver_each_op_once() {
    let db = unique("pair");
    let a = open(&db).await;
    let b = open(&db).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        let (outbox, entity) = if n % 2 == 0 {
            (&a, "shared")
        } else {
            (&b, "shared")
        };
        let receipt = enqueue(
            outbox,
            json!({"entity": format!("{db}/{entity}"), "kind": "k", "payload": {"n": n}}),
        )
        .await;
        ids.push(receipt["id"].clone());
        let receipt = enqueue(
            outbox,
            json!({"entity": format!("{db}/{n}"), "kind": "k", "payload": {"n": n}}),
        )
        .await;
        ids.push(receipt["id"].clone());
    }
    let (fa, fb) = (a.flush(), b.flush());
    ok(fa).await;
    ok(fb).await;
    eventually("all delivered", async || stats(&a).await["pending"] == 0).await;
    assert_eq!(
        client_of(&a).await,
        client_of(&b).await,
        "one database, one client"
    );
    let log = server_log(&client_of(&a).await).await;
    for id in &ids {
        let sent: Vec<&Value> = log.iter().filter(|e| &e["id"] == id).collect();
        assert_eq!(sent.len(), 1, "op {id} sent once, applied once: {sent:?}");
        assert_eq!(sent[0]["status"], "applied");
    }
    let seqs: Vec<u64> = applied(&log)
        .iter()
        .filter(|e| e["entity"] == format!("{db}/shared"))
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "shared entity in order: {seqs:?}"
    );
}

#[wasm_bindgen_test]
async fn schema_upgrade_keeps_data_and_closes_old_connections() {
    let db = unique("upgrade");
    let offline =
        json!({"endpoint": "http://127.0.0.1:9", "backoff": {"baseMs": 60000, "capMs": 60000}});
    let old = open_with(&db, &Token::new("secret"), offline.clone()).await;
    let receipt = enqueue(
        &old,
        json!({"entity": "e", "kind": "k", "payload": {"keep": true}}),
    )
    .await;
    // A newer build adds a store: the running old context must step aside, not block it.
    fn next_version(db: &web_sys::IdbDatabase, old: u32) -> Result<(), JsValue> {
        schema::migrate(db, old)?;
        if old < schema::VERSION + 1 {
            db.create_object_store("future")?;
        }
        Ok(())
    }
    let newer = schema::open_with(&db, schema::VERSION + 1, next_version)
        .await
        .expect("upgrade not blocked by the old connection");
    let names = js_sys::Array::from(&Reflect::get(&newer, &"objectStoreNames".into()).unwrap());
    let names: Vec<String> = names.iter().filter_map(|n| n.as_string()).collect();
    for store in ["future", "ops", "dead_letters", "conflicts", "meta"] {
        assert!(names.iter().any(|n| n == store), "{store} in {names:?}");
    }
    let tx = newer.transaction_with_str("ops").unwrap();
    let request = tx
        .object_store("ops")
        .unwrap()
        .get(&JsValue::from(1))
        .unwrap();
    let kept = outbox::web::idb::wait(&request)
        .await
        .expect("op 1 is still there");
    let json = Reflect::get(&kept, &"json".into())
        .unwrap()
        .as_string()
        .unwrap();
    let stored: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(stored["id"], receipt["id"]);
    newer.close();
    assert_eq!(error_code(old.stats()).await, "CLOSED");
}

#[wasm_bindgen_test]
async fn a_failing_or_hung_auth_hook_pauses_without_storing_its_words() {
    let db = unique("hook");
    let mode = Rc::new(RefCell::new("throw"));
    let hook_mode = mode.clone();
    let hook = Closure::<dyn Fn() -> JsValue>::new(move || {
        // Copied out first: a JS throw skips Rust destructors, so no borrow may be live then.
        let mode = *hook_mode.borrow();
        hook_answer(mode)
    })
    .into_js_value();
    fn hook_answer(mode: &str) -> JsValue {
        match mode {
            "throw" => wasm_bindgen::throw_str("token=SECRET-123 expired"),
            // A token refresh that never finishes.
            "hang" => js_sys::Promise::new(&mut |_, _| {}).into(),
            _ => to_js(&json!({"authorization": "Bearer secret"})),
        }
    }
    let config = to_js(
        &json!({"endpoint": server(), "database": db, "requestTimeoutMs": 300,
                               "backoff": {"baseMs": 10, "capMs": 80}}),
    );
    Reflect::set(&config, &"auth".into(), &hook).unwrap();
    let outbox = Outbox::connect(config).await.unwrap();
    let auth_required = record(&outbox, "auth-required");
    let opened = record(&outbox, "breaker-opened");
    enqueue(
        &outbox,
        json!({"entity": format!("{db}/e"), "kind": "k", "payload": {}}),
    )
    .await;
    eventually("auth-required", async || auth_required.borrow().len() == 1).await;
    let pending = ok(outbox.pending(None)).await;
    let error = pending[0]["lastError"].as_str().unwrap().to_owned();
    assert_eq!(error, "the auth hook failed");
    assert!(
        !error.contains("SECRET"),
        "the hook's words stay out of the store"
    );

    // A hook that hangs gives up after the request timeout instead of holding the queue.
    *mode.borrow_mut() = "hang";
    ok(outbox.wake("auth".into())).await;
    eventually("the hung hook times out", async || {
        auth_required.borrow().len() == 2
    })
    .await;
    assert_eq!(stats(&outbox).await["draining"], false);
    assert!(opened.borrow().is_empty(), "the server was never blamed");

    *mode.borrow_mut() = "ok";
    ok(outbox.wake("auth".into())).await;
    eventually("delivered", async || stats(&outbox).await["pending"] == 0).await;
    assert_eq!(stats(&outbox).await["paused"], false);
}

#[wasm_bindgen_test]
async fn an_enqueue_repeated_with_its_key_is_one_op_even_across_a_reopen() {
    let db = unique("keyed");
    let outbox = open(&db).await;
    let client = client_of(&outbox).await;
    let entity = unique("doc");
    let request =
        json!({"entity": entity, "kind": "rename", "payload": {"t": 1}, "key": "click-1"});
    let first = enqueue(&outbox, request.clone()).await;
    assert_eq!(first["replayed"], false);
    let again = enqueue(&outbox, request.clone()).await;
    assert_eq!((&again["id"], &again["seq"]), (&first["id"], &first["seq"]));
    assert_eq!(again["replayed"], true);
    let other_body =
        json!({"entity": entity, "kind": "rename", "payload": {"t": 2}, "key": "click-1"});
    assert_eq!(
        error_code(outbox.enqueue(to_js(&other_body))).await,
        "KEY_REUSED"
    );
    let bad_key = json!({"kind": "rename", "payload": 1, "key": "has space"});
    assert_eq!(
        error_code(outbox.enqueue(to_js(&bad_key))).await,
        "INVALID_ARGUMENT"
    );
    ok(outbox.flush()).await;
    ok(outbox.close()).await;

    // The key outlives the op's delivery and the connection: a retry that comes late (its
    // answer was lost with a worker) still gets the first receipt.
    let outbox = open(&db).await;
    let late = enqueue(&outbox, request).await;
    assert_eq!(
        (&late["id"], late["replayed"].as_bool()),
        (&first["id"], Some(true))
    );
    ok(outbox.flush()).await;
    let log = server_log(&client).await;
    assert_eq!(applied(&log).len(), 1, "one op took effect: {log:?}");
    assert_eq!(stats(&outbox).await["pending"], 0);
}

#[wasm_bindgen_test]
async fn plain_http_endpoints_are_refused_unless_loopback_or_allowed() {
    let open_at = |endpoint: &str, allow: Option<bool>| {
        let mut config = json!({"endpoint": endpoint, "database": unique("endpoint")});
        if let Some(allow) = allow {
            config["allowInsecureEndpoint"] = json!(allow);
        }
        Outbox::connect(to_js(&config))
    };
    for refused in [
        "http://api.example.com",
        "http://127.example.com",
        "http://10.0.0.1:8080",
        "http://[::2]:80",
        "https://api.example.com/v1?x=1",
    ] {
        match open_at(refused, None).await {
            Err(error) => assert_eq!(error.code(), "INVALID_CONFIG", "{refused}"),
            Ok(_) => panic!("{refused} was accepted"),
        }
    }
    for accepted in [
        "https://api.example.com",
        "http://127.0.0.1:9",
        "http://localhost:9/",
        "http://[::1]:9",
    ] {
        let outbox = open_at(accepted, None)
            .await
            .unwrap_or_else(|e| panic!("{accepted}: {e}"));
        ok(outbox.close()).await;
    }
    let outbox = open_at("http://api.example.com", Some(true))
        .await
        .expect("allowInsecureEndpoint lets it through");
    ok(outbox.close()).await;
    assert!(
        open_at("http://api.example.com", Some(false))
            .await
            .is_err()
    );
}

#[wasm_bindgen_test]
async fn a_beacon_carries_a_grant_for_its_own_op_and_never_the_token() {
    let db = unique("beacon");
    let paused = open(&db).await;
    let client = client_of(&paused).await;
    // The queued copy is held on the server, so the page's copy is the one that takes effect.
    inject(
        json!([{"route": "ops", "tenant": "test", "times": 1000, "action": {"delay_ms": 3000}}]),
    )
    .await;
    let receipt = enqueue(&paused, json!({"kind": "summary", "payload": {"s": "bye"}})).await;
    let seq = receipt["seq"].as_f64().unwrap();
    let beacon = ok(paused.beacon(seq)).await;
    let url = beacon["url"].as_str().unwrap().to_owned();
    let body = beacon["body"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("{}/v1/beacon?grant=", server())),
        "{url}"
    );
    assert!(
        !url.contains("secret") && !body.contains("secret"),
        "no token: {url} {body}"
    );
    assert!(beacon["expiresAt"].as_f64().unwrap() > js_sys::Date::now());
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["ops"][0]["id"], receipt["id"]);

    // What a closing page does: POST the body to the URL, with no credentials.
    let post = |url: String, body: String| async move {
        let init = RequestInit::new();
        init.set_method("POST");
        init.set_body(&body.into());
        let response: Response = call(global_fetch(&url, &init))
            .await
            .unwrap()
            .unchecked_into();
        response.status()
    };
    assert_eq!(post(url.clone(), body.clone()).await, 200);
    // The same grant does not cover another op.
    let mut other = sent.clone();
    other["ops"][0]["payload"] = json!({"s": "something else"});
    assert_eq!(post(url, other.to_string()).await, 403);
    admin("DELETE", "/v1/admin/faults", None).await;
    let log = server_log(&client).await;
    let effects: Vec<&Value> = applied(&log);
    assert_eq!(effects.len(), 1, "{log:?}");
    assert_eq!(effects[0]["route"], "beacon");
    ok(paused.flush()).await;
    assert_eq!(
        applied(&server_log(&client).await).len(),
        1,
        "the queued copy was a replay"
    );
    assert_eq!(
        js_to_json(&call(paused.beacon(seq)).await.unwrap()),
        Value::Null,
        "the op has left the queue"
    );
}

/// A second-copy store in memory, with the `Backup` interface (`get`, `write`), and `entries()`
/// for the test to look inside.
fn memory_backup() -> JsValue {
    let make = Function::new_no_args(
        "const m = new Map();
         return {
           get: async (names) => Object.fromEntries(
             names === null ? [...m] : names.filter((n) => m.has(n)).map((n) => [n, m.get(n)])),
           write: async (put, remove) => {
             for (const [k, v] of Object.entries(put)) m.set(k, v);
             for (const k of remove) m.delete(k);
           },
           entries: () => Object.fromEntries(m),
         };",
    );
    make.call0(&JsValue::NULL).unwrap()
}

fn backup_entries(backup: &JsValue) -> Value {
    let entries: Function = Reflect::get(backup, &"entries".into())
        .unwrap()
        .unchecked_into();
    js_to_json(&entries.call0(backup).unwrap())
}

async fn open_backed(database: &str, extra: Value, backup: &JsValue) -> Outbox {
    let config = to_js(&extra);
    let set = |k: &str, v: &JsValue| Reflect::set(&config, &k.into(), v).unwrap();
    if Reflect::get(&config, &"endpoint".into())
        .unwrap()
        .is_undefined()
    {
        set("endpoint", &server().into());
    }
    set("database", &database.into());
    set("auth", &Token::new("secret").hook());
    set("backup", backup);
    Outbox::connect(config)
        .await
        .unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// What the browser does when it finds the database's files corrupt: deletes the database.
async fn drop_database(name: &str) {
    let factory = outbox::web::idb::factory().unwrap();
    let request = factory.delete_database(name).unwrap();
    outbox::web::idb::wait(&request).await.unwrap();
}

#[wasm_bindgen_test]
async fn a_dropped_database_is_rebuilt_from_the_copy_and_every_op_delivered_once() {
    let db = unique("dropped");
    let backup = memory_backup();
    let offline = json!({"endpoint": "http://127.0.0.1:9", "backoff": {"baseMs": 5, "capMs": 20}});
    let outbox = open_backed(&db, offline.clone(), &backup).await;
    let client = client_of(&outbox).await;
    let first = enqueue(
        &outbox,
        json!({"entity": "doc/1", "kind": "edit", "payload": {"n": 1}}),
    )
    .await;
    let keyed = json!({"entity": "doc/1", "kind": "edit", "payload": {"n": 2}, "key": "k-2"});
    let second = enqueue(&outbox, keyed.clone()).await;
    let third = enqueue(&outbox, json!({"kind": "note", "payload": {"n": 3}})).await;
    assert_eq!(stats(&outbox).await["copy"], true);
    ok(outbox.close()).await;
    let copied = backup_entries(&backup);
    assert_eq!(
        copied.as_object().unwrap().len(),
        4,
        "three ops and the record: {copied}"
    );

    drop_database(&db).await;
    let reopened = open_backed(&db, offline.clone(), &backup).await;
    let errors = record(&reopened, "error");
    eventually("the rebuild is reported", async || {
        !errors.borrow().is_empty()
    })
    .await;
    assert_eq!(errors.borrow()[0]["code"], "STORAGE_RECOVERED");
    let after = stats(&reopened).await;
    assert_eq!(
        after["client"],
        client.as_str(),
        "the same client: the server deduplicates"
    );
    assert_eq!(after["incident"]["code"], "STORAGE_RECOVERED");
    assert_eq!(
        (
            after["incident"]["recovered"].as_u64(),
            after["incident"]["lost"].as_u64()
        ),
        (Some(3), Some(0))
    );
    let pending = ok(reopened.pending(None)).await;
    let seqs: Vec<(&Value, &Value)> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|op| (&op["id"], &op["seq"]))
        .collect();
    assert_eq!(
        seqs,
        [
            (&first["id"], &first["seq"]),
            (&second["id"], &second["seq"]),
            (&third["id"], &third["seq"])
        ]
    );
    // The caller's key came back with its op: a late retry is still one op.
    let retried = enqueue(&reopened, keyed).await;
    assert_eq!(
        (&retried["id"], &retried["replayed"]),
        (&second["id"], &json!(true))
    );
    ok(reopened.close()).await;

    let online = open_backed(&db, json!({}), &backup).await;
    let next = enqueue(&online, json!({"kind": "note", "payload": {"n": 4}})).await;
    assert!(
        next["seq"].as_u64() > third["seq"].as_u64(),
        "no seq is used twice"
    );
    ok(online.flush()).await;
    eventually("every op is delivered", async || {
        stats(&online).await["pending"] == 0
    })
    .await;
    let log = server_log(&client).await;
    let ids: Vec<&Value> = applied(&log).iter().map(|e| &e["id"]).collect();
    assert_eq!(ids.len(), 4, "each op once: {log:?}");
    for op in [&first, &second, &third, &next] {
        assert!(ids.contains(&&op["id"]), "{op} was not applied: {log:?}");
    }
    let at = |op: &Value| ids.iter().position(|id| **id == op["id"]);
    assert!(at(&first) < at(&second), "doc/1 in order");
    eventually("the copy empties as ops are answered", async || {
        backup_entries(&backup)
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "meta")
    })
    .await;
}

#[wasm_bindgen_test]
async fn a_dropped_database_whose_copy_lost_ops_too_is_reported_as_storage_lost() {
    let db = unique("lost");
    let backup = memory_backup();
    let offline = json!({"endpoint": "http://127.0.0.1:9"});
    let outbox = open_backed(&db, offline.clone(), &backup).await;
    enqueue(&outbox, json!({"kind": "note", "payload": 1})).await;
    enqueue(&outbox, json!({"kind": "note", "payload": 2})).await;
    ok(outbox.close()).await;
    drop_database(&db).await;
    // The copy loses one of its op entries too.
    let write: Function = Reflect::get(&backup, &"write".into())
        .unwrap()
        .unchecked_into();
    let remove = js_sys::Array::of1(&"op:1".into());
    JsFuture::from(Promise::from(
        write.call2(&backup, &Object::new(), &remove).unwrap(),
    ))
    .await
    .unwrap();
    let reopened = open_backed(&db, offline, &backup).await;
    let errors = record(&reopened, "error");
    eventually("the loss is reported", async || !errors.borrow().is_empty()).await;
    assert_eq!(errors.borrow()[0]["code"], "STORAGE_LOST");
    let incident = stats(&reopened).await["incident"].clone();
    assert_eq!(
        (incident["recovered"].as_u64(), incident["lost"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(stats(&reopened).await["pending"], 1);
}
