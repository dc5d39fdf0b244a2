//! HTTP: sending requests of ops and probing health, with the global `fetch`.

use js_sys::{Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortController, Headers, RequestCredentials, RequestInit, Response};

use crate::core::wire::{ClientId, Grant, Problem, decode_grant, encode_request};
use crate::core::{Millis, Op, Reply, SendMode};

#[wasm_bindgen]
extern "C" {
    /// The global `fetch`, bound the way gloo-net binds it, so the same code runs in a window, a
    /// dedicated worker and a service worker (`window()` does not exist in the latter two).
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(url: &str, init: &RequestInit) -> Promise;
}

/// Where and how requests go.
pub struct Transport {
    endpoint: String,
    client: ClientId,
    timeout_ms: Millis,
    /// Called at send time for extra headers (the credentials); never stored.
    auth: Option<js_sys::Function>,
}

/// What a send produced: the reply, and a fingerprint of the credentials it carried.
pub struct Sent {
    /// The reply for the drainer.
    pub reply: Reply,
    /// `JSON.stringify` of the auth headers, kept in memory only, to tell renewed credentials
    /// from the refused ones.
    pub credentials: Option<String>,
}

impl Transport {
    /// A transport to `endpoint` (the server's base URL, without a trailing `/`).
    pub fn new(
        endpoint: String,
        client: ClientId,
        timeout_ms: Millis,
        auth: Option<js_sys::Function>,
    ) -> Self {
        Transport {
            endpoint,
            client,
            timeout_ms,
            auth,
        }
    }

    /// The client id every request carries.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// Sends ops: a batch to `/v1/ops`, or one op to `/v1/op` with its id as `Idempotency-Key`.
    pub async fn send(&self, mode: SendMode, ops: &[Op]) -> Sent {
        let (headers, credentials) = match self.headers().await {
            Ok(found) => found,
            Err(reason) => {
                return Sent {
                    reply: Reply::NoCredentials { reason },
                    credentials: None,
                };
            }
        };
        let path = match mode {
            SendMode::Batch => "/v1/ops",
            SendMode::Single => {
                // Set on a fresh Headers object; the name and value are valid.
                let _ = headers.set("idempotency-key", &ops[0].id.to_string());
                "/v1/op"
            }
        };
        let _ = headers.set("content-type", "application/json");
        let body = encode_request(self.client, ops);
        let reply = self.fetch("POST", path, &headers, Some(&body)).await;
        Sent { reply, credentials }
    }

    /// Asks the server for a beacon grant covering exactly `ops` (`POST /v1/grants`, with the
    /// auth hook's credentials, which stay here). The grant, not the credentials, is what a
    /// closing page may hold.
    pub async fn grant(&self, ops: &[Op]) -> Result<Grant, String> {
        let (headers, _) = self.headers().await?;
        let _ = headers.set("content-type", "application/json");
        let body = encode_request(self.client, ops);
        match self
            .fetch("POST", "/v1/grants", &headers, Some(&body))
            .await
        {
            Reply::Http {
                status: 200, body, ..
            } => decode_grant(&body),
            Reply::Http { status, body, .. } => {
                let problem = Problem::decode(&body);
                Err(match problem.explanation() {
                    Some(why) => format!("the server refused a grant: HTTP {status}: {why}"),
                    None => format!("the server refused a grant: HTTP {status}"),
                })
            }
            Reply::Unreachable { reason } | Reply::NoCredentials { reason } => Err(reason),
        }
    }

    /// The URL a beacon authorised by `grant` goes to.
    pub fn beacon_url(&self, grant: &Grant) -> String {
        let grant: String = js_sys::encode_uri_component(&grant.grant).into();
        format!("{}/v1/beacon?grant={grant}", self.endpoint)
    }

    /// `GET /v1/health`: whether the server answers `2xx`.
    pub async fn probe(&self) -> bool {
        let Ok(headers) = Headers::new() else {
            return false;
        };
        matches!(
            self.fetch("GET", "/v1/health", &headers, None).await,
            Reply::Http {
                status: 200..=299,
                ..
            }
        )
    }

    /// The credentials the auth hook gives now, as a fingerprint (see [`Sent::credentials`]), or
    /// an error when it gives none that can be used.
    pub async fn credentials(&self) -> Result<Option<String>, String> {
        self.headers().await.map(|(_, fingerprint)| fingerprint)
    }

    /// Calls the auth hook, within the request timeout: a hook that waits on a stalled token
    /// refresh must not hold the queue. Errors are fixed sentences, because the hook's own
    /// messages (and the browser's, about a bad header value) may quote a secret, and these end
    /// up in `last_error`, in the store; the details go to the console only.
    async fn headers(&self) -> Result<(Headers, Option<String>), String> {
        let headers = Headers::new().map_err(|_| "Headers is not constructible".to_owned())?;
        let Some(auth) = &self.auth else {
            return Ok((headers, None));
        };
        let failed = |detail: &JsValue| {
            web_sys::console::warn_2(&"outbox: the auth hook failed:".into(), detail);
            "the auth hook failed".to_owned()
        };
        let mut given = auth.call0(&JsValue::NULL).map_err(|e| failed(&e))?;
        if let Some(promise) = given.dyn_ref::<Promise>() {
            let answer = JsFuture::from(promise.clone());
            let deadline = gloo_timers::future::TimeoutFuture::new(timer_ms(self.timeout_ms));
            given = match futures_select(answer, deadline).await {
                Some(Ok(value)) => value,
                Some(Err(e)) => return Err(failed(&e)),
                None => {
                    return Err(format!(
                        "the auth hook did not answer within {} ms",
                        self.timeout_ms
                    ));
                }
            };
        }
        if given.is_undefined() || given.is_null() {
            return Ok((headers, None));
        }
        let unusable =
            || "the auth hook must return an object of header names to strings".to_owned();
        if !given.is_object() {
            return Err(unusable());
        }
        // Reflect, not Object.entries: its errors come back as values, so a getter that throws
        // cannot unwind through the module.
        let names = Reflect::own_keys(&given).map_err(|e| failed(&e))?;
        for name in names.iter() {
            let value = Reflect::get(&given, &name).map_err(|e| failed(&e))?;
            let (Some(name), Some(value)) = (name.as_string(), value.as_string()) else {
                return Err(unusable());
            };
            headers.set(&name, &value).map_err(|e| {
                failed(&e);
                format!("the auth hook gave an invalid value for header {name:?}")
            })?;
        }
        let fingerprint = js_sys::JSON::stringify(&given)
            .ok()
            .and_then(|s| s.as_string());
        Ok((headers, fingerprint))
    }

    async fn fetch(
        &self,
        method: &str,
        path: &str,
        headers: &Headers,
        body: Option<&str>,
    ) -> Reply {
        let controller = match AbortController::new() {
            Ok(controller) => controller,
            Err(e) => return unreachable(e),
        };
        let init = RequestInit::new();
        init.set_method(method);
        init.set_headers(headers);
        init.set_signal(Some(&controller.signal()));
        // Credentials travel in headers from the auth hook; cookies would only add CORS rules.
        init.set_credentials(RequestCredentials::Omit);
        if let Some(body) = body {
            init.set_body(&JsValue::from_str(body));
        }
        let url = format!("{}{}", self.endpoint, path);
        // The timer aborts the request, headers and body alike, and is cancelled when dropped.
        let timeout = {
            let controller = controller.clone();
            gloo_timers::callback::Timeout::new(timer_ms(self.timeout_ms), move || {
                controller.abort();
            })
        };
        let reply = async {
            let response: Response = JsFuture::from(global_fetch(&url, &init))
                .await?
                .unchecked_into();
            let retry_after = response.headers().get("retry-after").ok().flatten();
            let body = JsFuture::from(response.text()?).await?;
            Ok::<Reply, JsValue>(Reply::Http {
                status: response.status(),
                retry_after,
                body: body.as_string().unwrap_or_default(),
            })
        }
        .await;
        drop(timeout);
        reply.unwrap_or_else(unreachable)
    }
}

fn unreachable(error: JsValue) -> Reply {
    let error = super::error::JsError::from(error);
    let reason = if error.name == "AbortError" {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    Reply::Unreachable { reason }
}

/// A delay for `setTimeout`, which takes a signed 32-bit count: longer ones fire at once.
pub fn timer_ms(ms: Millis) -> u32 {
    ms.min(i32::MAX as Millis) as u32
}

/// The first of two futures to finish: `Some` with `first`'s output, or `None` if `second` won.
async fn futures_select<A: Future, B: Future>(first: A, second: B) -> Option<A::Output> {
    let (mut first, mut second) = (std::pin::pin!(first), std::pin::pin!(second));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(output) = first.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(output));
        }
        second.as_mut().poll(cx).map(|_| None)
    })
    .await
}
