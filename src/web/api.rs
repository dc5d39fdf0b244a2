//! The JavaScript API: the `Outbox` class.

use std::rc::Rc;

use js_sys::{Function, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use super::backup::Backup;
use super::error::{Error, JsError, Result, js_error};
use super::idb::Durability;
use super::platform::{now, random_id};
use super::schema;
use super::session::Shared;
use super::store::Store;
use super::transport::Transport;
use super::views::{
    BeaconView, BreakerState, ConflictView, DeadLetterView, QueuedOp, ReceiptView, StatsView, to_js,
};
use crate::core::copy::{self, CopiedOp, CopyWrite, Incident, Start};
use crate::core::json::{self, FromJson, JsonError};
use crate::core::store::{self as queue, CallKey, QueueTxn};
use crate::core::{
    Breaker, Config, Draft, Event, OpId, Priority, Receipt, Refusal, Resolution, WakeReason,
};

// The declarations that are not generated from a Rust type: the shell's own options, the event
// map `on` is typed with, and the names the shell parses by hand. Everything else in
// `outbox.d.ts` comes from the Rust types themselves (tsify), so it cannot drift from them.
#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** An op's or a client's id: a UUID. */
export type OpId = string;
/** A time in milliseconds since the Unix epoch, or a duration in milliseconds. */
export type Millis = number;
/** Options of `Outbox.open`: the delivery policy (every field of `Config` is optional) and the shell's own. */
export interface OutboxConfig extends Config {
  /** The backend's base URL, such as `https://api.example.com`. Plain `http://` only to a loopback host, unless `allowInsecureEndpoint`. */
  endpoint: string;
  /** Accept a plain `http://` endpoint on a host that is not loopback. Default false. */
  allowInsecureEndpoint?: boolean;
  /** The IndexedDB database name. Default `"outbox"`. */
  database?: string;
  /** Returns the headers (credentials) for each request. Called at send time; never stored. */
  auth?: () => Record<string, string> | null | Promise<Record<string, string> | null>;
  /** Called with the time of the next wake-up (ms since epoch), or null for none; map it to chrome.alarms. */
  schedule?: (atMs: number | null) => void;
  /** Where to keep a second copy of every pending op, so a database the browser drops is rebuilt (docs/DELIVERY.md). The extension glue gives `chrome.storage.local`. */
  backup?: Backup;
}
/** Options of the calls that change a dead letter or a conflict: a key makes a repeated call return the first answer. */
export interface CallOptions { key?: string }
/** Why `wake` is called. `"auth"` says the credentials were renewed: a paused queue resumes. `"online"` and `"flush"` also end an open circuit breaker early. */
export type WakeReason = "start" | "timer" | "alarm" | "online" | "sync" | "message" | "enqueued" | "flush" | "auth";
/** The error every failed call rejects with. */
export interface OutboxError extends Error { name: "OutboxError"; code: OutboxErrorCode }
/** Every event name `on` takes. */
export type OutboxEventName = OutboxEvent["type"] | "error";
/** What a listener of each event gets. */
export type OutboxEventMap = { [K in OutboxEvent["type"]]: Extract<OutboxEvent, { type: K }> } & { error: OutboxError };
export interface Outbox {
  /** Calls `callback(event)` for each event named `name` (in any context of this outbox). */
  on<K extends OutboxEventName>(name: K, callback: (event: OutboxEventMap[K]) => void): void;
  /** Removes a listener added with `on`. */
  off<K extends OutboxEventName>(name: K, callback: (event: OutboxEventMap[K]) => void): void;
}
"#;

#[wasm_bindgen]
extern "C" {
    /// `{key?}`, the options of the calls that change a dead letter or a conflict (declared in
    /// the custom section above), as a type, so that the parameter is optional in TypeScript.
    #[wasm_bindgen(typescript_type = "CallOptions")]
    pub type CallOptions;
}

/// The most ops `pending()` lists at once.
const MAX_LISTED: u32 = 10_000;

/// A durable outbox of user actions, delivered to a backend exactly once in effect.
#[wasm_bindgen]
pub struct Outbox {
    shared: Rc<Shared>,
}

/// Turns an API call's work into a Promise. The work is boxed so that `future_to_promise` is
/// instantiated once, not once per method: it is a large function, and wasm size matters here.
fn promise(work: impl Future<Output = Result<JsValue>> + 'static) -> Promise {
    let work: std::pin::Pin<Box<dyn Future<Output = Result<JsValue>>>> = Box::pin(work);
    future_to_promise(async move { work.await.map_err(Into::into) })
}

#[wasm_bindgen]
impl Outbox {
    /// Opens (creating or upgrading) the outbox database and starts delivering what is due.
    #[wasm_bindgen(unchecked_return_type = "Promise<Outbox>")]
    pub fn open(#[wasm_bindgen(unchecked_param_type = "OutboxConfig")] config: JsValue) -> Promise {
        install_panic_hook();
        future_to_promise(async move {
            let outbox = open(config).await?;
            Ok(outbox.into())
        })
    }

    /// Queues an op. Resolves with its receipt once it is on disk (a strict IndexedDB
    /// transaction has completed), then delivery starts.
    #[wasm_bindgen(unchecked_return_type = "Promise<Receipt>")]
    pub fn enqueue(
        &self,
        #[wasm_bindgen(unchecked_param_type = "EnqueueRequest")] request: JsValue,
    ) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let (draft, key) = parse_draft(&request)?;
            let id = random_id()?;
            let config = shared.config();
            let at = now();
            let key = key.as_deref().map(|key| CallKey { key, now: at });
            let copying = shared.copying();
            let started = &copying;
            let receipt = shared
                .store
                .write(Durability::Strict, async move |t| {
                    let queued = queue::enqueue(t, config, draft, id, key, at).await?;
                    // The copy is written while IndexedDB commits, not after: both are done
                    // before the caller hears.
                    started.start(&queued.copy);
                    Ok(queued.value)
                })
                .await;
            copying.finish(receipt.is_ok()).await;
            let receipt = match receipt {
                Err(Error::Refused(Refusal::QueueFull { limit, max })) => {
                    shared.emit(&Event::QueueFull {
                        limit: limit.into(),
                        max,
                    });
                    return Err(Refusal::QueueFull { limit, max }.into());
                }
                other => other?,
            };
            queued(&shared, &receipt)
        })
    }

    /// Delivers everything due now and resolves when done (backing-off ops stay for later).
    /// Also ends an open circuit breaker early. Resolves with the stats after.
    #[wasm_bindgen(unchecked_return_type = "Promise<Stats>")]
    pub fn flush(&self) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.clone().flush().await?;
            stats(&shared).await
        })
    }

    /// Tells the outbox that something happened (an alarm, `online`, a message, …). Resolves
    /// when the delivery it started in this context, if any, is idle.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn wake(
        &self,
        #[wasm_bindgen(unchecked_param_type = "WakeReason")] reason: String,
    ) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let reason = match reason.as_str() {
                "start" => WakeReason::Start,
                "timer" => WakeReason::Timer,
                "alarm" => WakeReason::Alarm,
                "online" => WakeReason::Online,
                "sync" => WakeReason::Sync,
                "message" => WakeReason::Message,
                "enqueued" => WakeReason::Enqueued,
                "flush" => WakeReason::Flush,
                "auth" => {
                    // Ignored: it only ever resolves.
                    let _ = shared.renew_auth().await;
                    return Ok(JsValue::UNDEFINED);
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown wake reason {other:?}"
                    )));
                }
            };
            // Ignored: it only ever resolves.
            let _ = shared.wake(reason).await;
            shared.check_open()?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Counts and states, for a status UI.
    #[wasm_bindgen(unchecked_return_type = "Promise<Stats>")]
    pub fn stats(&self) -> Promise {
        let shared = self.shared.clone();
        promise(async move { stats(&shared).await })
    }

    /// The pending ops, oldest first (at most `limit`, default 100).
    #[wasm_bindgen(unchecked_return_type = "Promise<QueuedOp[]>")]
    pub fn pending(&self, limit: Option<u32>) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            // IndexedDB reads 0 as "no limit": the whole queue could come back.
            let limit = limit.unwrap_or(100);
            if !(1..=MAX_LISTED).contains(&limit) {
                return Err(Error::InvalidArgument(format!(
                    "limit must be 1 to {MAX_LISTED}"
                )));
            }
            let ops = shared.store.read(async |t| t.pending(limit).await).await?;
            to_js(&ops.iter().map(QueuedOp::from).collect::<Vec<_>>())
        })
    }

    /// What a closing page needs to send the queued op `seq` itself: `{url, body, expiresAt}`.
    /// `body` is the same op (same id and `seq`) as the queued copy, so whichever copy arrives
    /// second is a duplicate; `url` carries a beacon grant from the server that covers exactly
    /// that op until `expiresAt`, so the page never holds the credentials. Resolves with `null`
    /// once the op has left the queue; rejects with `UNAVAILABLE` when no grant can be had (the
    /// queued copy is delivered all the same).
    #[wasm_bindgen(unchecked_return_type = "Promise<Beacon | null>")]
    pub fn beacon(&self, seq: f64) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            if seq.fract() != 0.0 || !(1.0..=js_sys::Number::MAX_SAFE_INTEGER).contains(&seq) {
                // Not formatted: printing a float would pull float formatting into the module.
                return Err(Error::InvalidArgument(
                    "seq must be a positive integer".into(),
                ));
            }
            let op = shared
                .store
                .read(async |t| t.get_op(seq as u64).await)
                .await?;
            let Some(op) = op else {
                return Ok(JsValue::NULL);
            };
            let transport = &shared.transport;
            let grant = transport
                .grant(std::slice::from_ref(&op))
                .await
                .map_err(Error::Unavailable)?;
            to_js(&BeaconView {
                url: transport.beacon_url(&grant),
                body: crate::core::wire::encode_request(transport.client(), [&op]),
                expires_at: grant.expires_at,
            })
        })
    }

    /// The ops delivery gave up on.
    #[wasm_bindgen(js_name = deadLetters, unchecked_return_type = "Promise<DeadLetter[]>")]
    pub fn dead_letters(&self) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let letters = shared.store.read(async |t| t.dead_letters().await).await?;
            to_js(&letters.iter().map(DeadLetterView::from).collect::<Vec<_>>())
        })
    }

    /// Queues a dead letter's op again (see the docs for when it keeps its id). With
    /// `{key}`, a repeated call returns the first call's receipt.
    #[wasm_bindgen(js_name = retryDeadLetter, unchecked_return_type = "Promise<Receipt>")]
    pub fn retry_dead_letter(&self, id: String, options: Option<CallOptions>) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let id = parse_id(&id)?;
            let key = parse_call_options(options.as_ref().map(|o| o.as_ref()))?;
            let fresh = random_id()?;
            let config = shared.config();
            let at = now();
            let key = key.as_deref().map(|key| CallKey { key, now: at });
            let copying = shared.copying();
            let receipt = shared
                .store
                .write(Durability::Strict, async |t| {
                    let queued = queue::retry_dead_letter(t, config, id, fresh, key, at).await?;
                    copying.start(&queued.copy);
                    Ok(queued.value)
                })
                .await;
            copying.finish(receipt.is_ok()).await;
            let receipt = receipt?;
            queued(&shared, &receipt)
        })
    }

    /// Removes a dead letter for good. With `{key}`, a repeated call succeeds again.
    #[wasm_bindgen(js_name = discardDeadLetter, unchecked_return_type = "Promise<void>")]
    pub fn discard_dead_letter(&self, id: String, options: Option<CallOptions>) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let id = parse_id(&id)?;
            let key = parse_call_options(options.as_ref().map(|o| o.as_ref()))?;
            let at = now();
            let key = key.as_deref().map(|key| CallKey { key, now: at });
            shared
                .store
                .write(Durability::Strict, async |t| {
                    queue::discard_dead_letter(t, id, key).await
                })
                .await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The ops parked by the `manual` conflict policy, with the server's side.
    #[wasm_bindgen(unchecked_return_type = "Promise<Conflict[]>")]
    pub fn conflicts(&self) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let parked = shared.store.read(async |t| t.conflicts().await).await?;
            to_js(&parked.iter().map(ConflictView::from).collect::<Vec<_>>())
        })
    }

    /// Settles a parked conflict: `"keep-mine"` sends the op again against the server's
    /// version (resolves with its receipt); `"take-theirs"` drops it (resolves with null).
    /// With `{key}`, a repeated call returns the first call's answer.
    #[wasm_bindgen(js_name = resolveConflict, unchecked_return_type = "Promise<Receipt | null>")]
    pub fn resolve_conflict(
        &self,
        id: String,
        #[wasm_bindgen(unchecked_param_type = "\"keep-mine\" | \"take-theirs\"")]
        resolution: String,
        options: Option<CallOptions>,
    ) -> Promise {
        let shared = self.shared.clone();
        promise(async move {
            shared.check_open()?;
            let id = parse_id(&id)?;
            let key = parse_call_options(options.as_ref().map(|o| o.as_ref()))?;
            let resolution = match resolution.as_str() {
                "keep-mine" => Resolution::KeepMine,
                "take-theirs" => Resolution::TakeTheirs,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "resolution must be \"keep-mine\" or \"take-theirs\", not {other:?}"
                    )));
                }
            };
            let fresh = random_id()?;
            let config = shared.config();
            let at = now();
            let key = key.as_deref().map(|key| CallKey { key, now: at });
            let copying = shared.copying();
            let receipt = shared
                .store
                .write(Durability::Strict, async |t| {
                    let queued =
                        queue::resolve_conflict(t, config, id, resolution, fresh, key, at).await?;
                    copying.start(&queued.copy);
                    Ok(queued.value)
                })
                .await;
            copying.finish(receipt.is_ok()).await;
            let receipt = receipt?;
            match receipt {
                Some(receipt) => queued(&shared, &receipt),
                None => Ok(JsValue::NULL),
            }
        })
    }

    /// Every event name `on` takes, from the one list the core keeps.
    #[wasm_bindgen(js_name = eventNames, unchecked_return_type = "OutboxEventName[]")]
    pub fn event_names() -> js_sys::Array {
        Event::NAMES
            .iter()
            .chain(&["error"])
            .map(|name| JsValue::from_str(name))
            .collect()
    }

    /// Calls `callback(event)` for each event named `name` (in any context of this outbox).
    /// (Typed in the custom section, generically by event name.)
    #[wasm_bindgen(skip_typescript)]
    pub fn on(
        &self,
        #[wasm_bindgen(unchecked_param_type = "OutboxEventName")] name: String,
        callback: Function,
    ) -> Result<(), JsValue> {
        check_event_name(&name)?;
        self.shared.listeners.add(name, callback);
        Ok(())
    }

    /// Removes a listener added with `on`.
    #[wasm_bindgen(skip_typescript)]
    pub fn off(
        &self,
        #[wasm_bindgen(unchecked_param_type = "OutboxEventName")] name: String,
        callback: Function,
    ) -> Result<(), JsValue> {
        check_event_name(&name)?;
        self.shared.listeners.remove(&name, &callback);
        Ok(())
    }

    /// Stops delivery in this context and closes the database connection. Further calls fail
    /// with `CLOSED`. Ops stay queued for the next `open`.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn close(&self) -> Promise {
        self.shared.close("close() was called");
        Promise::resolve(&JsValue::UNDEFINED)
    }
}

impl Outbox {
    /// `Outbox.open` for Rust callers (the wasm tests): the same checks, a typed error.
    pub async fn connect(config: JsValue) -> Result<Outbox> {
        install_panic_hook();
        open(config).await
    }
}

async fn open(config: JsValue) -> Result<Outbox> {
    let Some(object) = config.dyn_ref::<Object>().filter(|_| !config.is_function()) else {
        return Err(Error::InvalidConfig(
            "Outbox.open takes an options object".into(),
        ));
    };
    // Split the shell's options from the core's; the core rejects unknown fields, which catches
    // misspelled options. Copied through Reflect, whose errors are values: a getter that throws
    // must not unwind through the module.
    let rest = Object::new();
    let unreadable =
        |e: JsValue| Error::InvalidConfig(format!("options unreadable: {}", JsError::from(e)));
    for key in Reflect::own_keys(object).map_err(unreadable)?.iter() {
        let value = Reflect::get(object, &key).map_err(unreadable)?;
        Reflect::set(&rest, &key, &value).map_err(unreadable)?;
    }
    let take = |name: &str| -> JsValue {
        let value = Reflect::get(&rest, &name.into()).unwrap_or(JsValue::UNDEFINED);
        let _ = Reflect::delete_property(&rest, &name.into());
        value
    };
    let endpoint = take("endpoint")
        .as_string()
        .ok_or_else(|| Error::InvalidConfig("endpoint must be a URL string".into()))?;
    let allow_insecure = match take("allowInsecureEndpoint") {
        v if v.is_undefined() => false,
        v => v.as_bool().ok_or_else(|| {
            Error::InvalidConfig("allowInsecureEndpoint must be a boolean".into())
        })?,
    };
    let endpoint = parse_endpoint(&endpoint, allow_insecure)?;
    let database = match take("database") {
        v if v.is_undefined() => "outbox".to_owned(),
        v => v
            .as_string()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::InvalidConfig("database must be a non-empty string".into()))?,
    };
    let function = |name: &str, value: JsValue| -> Result<Option<Function>> {
        if value.is_undefined() || value.is_null() {
            return Ok(None);
        }
        value
            .dyn_into::<Function>()
            .map(Some)
            .map_err(|_| Error::InvalidConfig(format!("{name} must be a function")))
    };
    let auth = function("auth", take("auth"))?;
    let backup_option = take("backup");
    let schedule = function("schedule", take("schedule"))?;
    // Through JSON text rather than serde-wasm-bindgen, which reads only the fields it knows
    // and so cannot report a misspelled one.
    let config: Config = js_sys::JSON::stringify(&rest)
        .ok()
        .and_then(|text| text.as_string())
        .ok_or_else(|| {
            Error::InvalidConfig("options must be JSON-like besides auth and schedule".into())
        })
        .and_then(|text| {
            Config::from_json(&text).map_err(|e| Error::InvalidConfig(e.to_string()))
        })?;
    config.validate().map_err(|e| Error::InvalidConfig(e.0))?;

    let backup = Backup::from_option(backup_option)?;
    let db = schema::open(&database).await?;
    let store = Store::new(db.clone());
    let (client, incident) = open_queue(&store, backup.as_ref()).await?;
    let transport = Transport::new(endpoint, client, config.request_timeout_ms, auth);
    let shared = Shared::new(database, store, config, transport, schedule, backup)?;
    // A newer version of the extension is upgrading the database: step aside, or it waits.
    let weak = Rc::downgrade(&shared);
    let on_version_change = Closure::<dyn Fn()>::new(move || {
        if let Some(shared) = weak.upgrade() {
            shared.close("the database was upgraded by a newer version; open it again");
        }
    });
    db.set_onversionchange(Some(on_version_change.as_ref().unchecked_ref()));
    shared.keep_database_handler(on_version_change);
    let weak = Rc::downgrade(&shared);
    let on_close = Closure::<dyn Fn()>::new(move || {
        if let Some(shared) = weak.upgrade() {
            shared.lost_database();
        }
    });
    db.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    shared.keep_database_handler(on_close);
    if let Some(incident) = incident {
        shared.report_incident(incident);
    }
    // The start wake waits one microtask, so that `open()` resolves before the first drive runs:
    // the caller can enqueue at once, and the drive's code is compiled (V8 compiles wasm lazily,
    // function by function, on first call) after the caller's continuation, not before it.
    let starting = shared.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let _ = wasm_bindgen_futures::JsFuture::from(Promise::resolve(&JsValue::UNDEFINED)).await;
        starting.spawn_wake(WakeReason::Start);
    });
    Ok(Outbox { shared })
}

/// The client id to deliver as, and the storage incident found on the way: the database's own
/// queue, or the queue rebuilt from the second copy after the browser dropped the database, as
/// [`copy::start`] decides.
async fn open_queue(store: &Store, backup: Option<&Backup>) -> Result<(OpId, Option<Incident>)> {
    // The copy's record is read while IndexedDB reads the client id: one wait, not two.
    let meta = backup.map(Backup::start_meta).transpose()?;
    // Most opens find the client id stored: a read-only look avoids a strict commit per start.
    let known = store.read(async |t| t.client().await).await?;
    let (Some(backup), Some(meta)) = (backup, meta) else {
        return Ok((client_of(store, known).await?, None));
    };
    let meta = meta.meta().await?;
    let at = now();
    match copy::start(known, meta) {
        Start::Intact => Ok((known.expect("intact means a client"), None)),
        Start::Fresh | Start::Seed => {
            let client = client_of(store, known).await?;
            seed(store, backup, client).await?;
            Ok((client, None))
        }
        Start::Rebuild(meta) => {
            let rebuilt = copy::rebuild(meta, backup.ops().await?, at);
            let incident = Incident::of_rebuild(&rebuilt, at);
            // Checked again inside the write: another context may have rebuilt it meanwhile.
            let restored = store
                .write(Durability::Strict, async |t| match t.client().await? {
                    Some(client) => Ok((client, false)),
                    None => {
                        t.put_client(rebuilt.client)?;
                        queue::restore(t, &rebuilt).await?;
                        t.put_incident(&incident)?;
                        Ok((rebuilt.client, true))
                    }
                })
                .await?;
            let (client, rebuilt_here) = restored;
            if !rebuilt_here {
                return Ok((client, None));
            }
            // The record now counts what the rebuilt queue holds.
            let record = CopyWrite {
                counters: Some(rebuilt.counters),
                ..CopyWrite::default()
            };
            backup.write(client, &record).await?;
            Ok((client, Some(incident)))
        }
        Start::Orphaned(meta) => {
            let client = client_of(store, known).await?;
            let incident = Incident::of_orphan(&meta, at);
            store
                .write(Durability::Strict, async |t| t.put_incident(&incident))
                .await?;
            backup.clear().await?;
            seed(store, backup, client).await?;
            Ok((client, Some(incident)))
        }
    }
}

/// The stored client id, or a new one stored.
async fn client_of(store: &Store, known: Option<OpId>) -> Result<OpId> {
    if let Some(client) = known {
        return Ok(client);
    }
    // Checked again inside the write: another context may have stored one meanwhile.
    store
        .write(Durability::Strict, async |t| match t.client().await? {
            Some(client) => Ok(client),
            None => {
                let client = random_id()?;
                t.put_client(client)?;
                Ok(client)
            }
        })
        .await
}

/// Copies every pending op and the counters into a copy that has none of them.
async fn seed(store: &Store, backup: &Backup, client: OpId) -> Result<()> {
    let (ops, counters) = store.read(async |t| t.all_ops().await).await?;
    let copy = CopyWrite {
        put: ops
            .into_iter()
            .map(|op| CopiedOp { op, key: None })
            .collect(),
        remove: Vec::new(),
        counters: Some(counters),
    };
    backup.write(client, &copy).await
}

/// Checks the endpoint: an `https://` URL, or `http://` to a loopback host only (a test server
/// on this machine), since credentials and ops would otherwise cross the network in clear. An
/// application that knows better says so with `allowInsecureEndpoint: true`.
fn parse_endpoint(endpoint: &str, allow_insecure: bool) -> Result<String> {
    let trimmed = endpoint.trim_end_matches('/');
    let (scheme, rest) = trimmed.split_once("://").unwrap_or(("", ""));
    let host = rest.split('/').next().unwrap_or("");
    let valid = matches!(scheme, "https" | "http")
        && !host.is_empty()
        && !rest.contains(['?', '#'])
        && !trimmed.contains(char::is_whitespace);
    if !valid {
        return Err(Error::InvalidConfig(format!(
            "endpoint must be an http(s) URL without a query, not {endpoint:?}"
        )));
    }
    if scheme == "http" && !allow_insecure && !is_loopback(host) {
        return Err(Error::InvalidConfig(format!(
            "endpoint {endpoint:?} is plain http to a host that is not loopback: ops and \
             credentials would cross the network unencrypted; use https, or set \
             allowInsecureEndpoint: true if you mean it"
        )));
    }
    Ok(trimmed.to_owned())
}

/// Whether `authority` (`host[:port]`, perhaps with user info) names this machine: `localhost`,
/// `127.0.0.0/8` or `[::1]`.
fn is_loopback(authority: &str) -> bool {
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next() == Some("::1"),
        None => host.split(':').next().unwrap_or(host),
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let octets: Vec<&str> = host.split('.').collect();
    octets.len() == 4
        && octets[0] == "127"
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.len() <= 3 && o.bytes().all(|b| b.is_ascii_digit()))
}

async fn stats(shared: &Shared) -> Result<JsValue> {
    shared.check_open()?;
    let snapshot = shared.store.read(async |t| t.snapshot().await).await?;
    to_js(&StatsView {
        client: snapshot.client.map(|c| c.to_string()),
        pending: snapshot.counters.pending,
        bytes: snapshot.counters.bytes,
        dead_letters: snapshot.dead_letters,
        conflicts: snapshot.conflicts,
        next_attempt_at: snapshot.earliest_due,
        paused: snapshot.paused,
        draining: shared.is_draining(),
        in_flight: shared.in_flight(),
        breaker: match snapshot.breaker {
            Breaker::Closed { .. } => BreakerState {
                state: "closed",
                until: None,
            },
            Breaker::Open { until, .. } => BreakerState {
                state: "open",
                until: Some(until),
            },
            Breaker::HalfOpen { .. } => BreakerState {
                state: "half-open",
                until: None,
            },
        },
        copy: shared.backup.is_some(),
        incident: snapshot.incident,
    })
}

/// After an op is durably queued: start delivering it, and answer with its receipt.
fn queued(shared: &Rc<Shared>, receipt: &Receipt) -> Result<JsValue> {
    shared.spawn_wake(WakeReason::Enqueued);
    to_js(&ReceiptView::from(receipt))
}

fn parse_id(id: &str) -> Result<OpId> {
    id.parse()
        .map_err(|e: crate::core::op::BadOpId| Error::InvalidArgument(e.to_string()))
}

fn check_event_name(name: &str) -> Result<(), JsValue> {
    if Event::NAMES.contains(&name) || name == "error" {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("unknown event {name:?}")).into())
    }
}

/// Reads `{key?}`, the options of the calls that change a dead letter or a conflict.
fn parse_call_options(options: Option<&JsValue>) -> Result<Option<String>> {
    let Some(options) = options.filter(|o| !o.is_undefined() && !o.is_null()) else {
        return Ok(None);
    };
    let bad = || Error::InvalidArgument("options must be {key?: string}".into());
    let object = options.dyn_ref::<Object>().ok_or_else(bad)?;
    let keys = Reflect::own_keys(object).map_err(|_| bad())?;
    if keys.iter().any(|k| k.as_string().as_deref() != Some("key")) {
        return Err(bad());
    }
    match Reflect::get(object, &"key".into()).unwrap_or(JsValue::UNDEFINED) {
        v if v.is_undefined() => Ok(None),
        v => v.as_string().map(Some).ok_or_else(bad),
    }
}

/// What `enqueue` takes. Only its declaration is used (`outbox.d.ts`); [`parse_draft`] reads it.
#[derive(tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[expect(
    dead_code,
    reason = "a declaration for TypeScript; parse_draft reads the request"
)]
pub struct EnqueueRequest {
    /// What the op changes, such as `"pr/17"`; ops on one entity are delivered in order. Omit
    /// for an unordered op.
    #[serde(default)]
    #[tsify(optional)]
    entity: Option<String>,
    /// What the op does, such as `"comment"`; it selects the conflict and coalescing policy.
    kind: String,
    /// Any JSON value (use `null` for none).
    #[tsify(type = "unknown")]
    payload: String,
    /// The entity version last read from the server; the server reports a conflict if another
    /// client wrote the entity since (this client's own writes never conflict).
    #[serde(default)]
    #[tsify(optional)]
    base_version: Option<u64>,
    /// How long delivery keeps trying. Default `"user"`.
    #[serde(default)]
    #[tsify(optional)]
    priority: Option<Priority>,
    /// The caller's idempotency key (1 to 200 visible ASCII characters): the same call made again
    /// with it, within `keyRetentionMs`, resolves with the first receipt (`replayed: true`)
    /// instead of queuing a second op.
    #[serde(default)]
    #[tsify(optional)]
    key: Option<String>,
}

/// Reads an [`EnqueueRequest`], strictly: a misspelled field is an error, not a silently dropped
/// option. Returns the draft and the caller's key. Through the browser's own `JSON.stringify`,
/// whose errors are values (a getter that throws, a cycle) and which leaves the payload as the
/// exact JSON text the op carries.
fn parse_draft(request: &JsValue) -> Result<(Draft, Option<String>)> {
    let text = js_sys::JSON::stringify(request)
        .map_err(|e| Error::InvalidOp(format!("not JSON: {}", JsError::from(e))))?
        .as_string()
        .ok_or_else(|| {
            Error::InvalidOp(
                "enqueue takes an object {entity?, kind, payload, baseVersion?, priority?, key?}"
                    .into(),
            )
        })?;
    let read = |node: &json::Node<'_>| -> std::result::Result<_, JsonError> {
        const FIELDS: [&str; 6] = [
            "entity",
            "kind",
            "payload",
            "baseVersion",
            "priority",
            "key",
        ];
        node.fields(|name, _| Ok(FIELDS.contains(&name)))?;
        // The payload is kept as the text it was, `null` included.
        let payload = node
            .object()?
            .iter()
            .find(|(name, _)| name == "payload")
            .map(|(_, value)| value.raw.to_owned())
            .ok_or_else(|| JsonError::new("missing field `payload`"))?;
        let draft = Draft {
            entity: node.opt("entity")?,
            kind: node.req("kind")?,
            payload,
            base_version: node.opt("baseVersion")?,
            priority: node.opt::<Priority>("priority")?.unwrap_or_default(),
        };
        Ok((draft, node.opt("key")?))
    };
    json::parse(&text)
        .and_then(|node| read(&node))
        .map_err(|e| Error::InvalidOp(e.to_string()))
}

fn install_panic_hook() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            // A panic is a bug; it is reported as an OutboxError like any other failure. With
            // panic=abort the module stops after this, so the report is all that can be done.
            let code = super::error::ErrorCode::Panic.as_str();
            let error = js_error(code, &format!("outbox panicked: {info}"));
            web_sys::console::error_1(&error);
        }));
    });
}
