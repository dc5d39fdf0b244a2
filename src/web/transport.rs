//! HTTP: sending requests of ops and probing health, with the global `fetch`.

use js_sys::{Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortController, Headers, RequestCredentials, RequestInit, Response};

use crate::core::wire::{ClientId, encode_request};
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
                    reply: Reply::Unreachable { reason },
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
        let body = encode_request(self.client, ops, None);
        let reply = self.fetch("POST", path, &headers, Some(&body)).await;
        Sent { reply, credentials }
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

    /// The credentials the auth hook gives now, as a fingerprint (see [`Sent::credentials`]).
    pub async fn credentials(&self) -> Option<String> {
        self.headers()
            .await
            .ok()
            .and_then(|(_, fingerprint)| fingerprint)
    }

    async fn headers(&self) -> Result<(Headers, Option<String>), String> {
        let headers = Headers::new().map_err(|_| "Headers is not constructible".to_owned())?;
        let Some(auth) = &self.auth else {
            return Ok((headers, None));
        };
        let fail = |e: JsValue| format!("auth hook failed: {}", super::error::JsError::from(e));
        let mut given = auth.call0(&JsValue::NULL).map_err(fail)?;
        if let Some(promise) = given.dyn_ref::<Promise>() {
            given = JsFuture::from(promise.clone()).await.map_err(fail)?;
        }
        if given.is_undefined() || given.is_null() {
            return Ok((headers, None));
        }
        let Some(object) = given.dyn_ref::<Object>() else {
            return Err("auth hook must return an object of header names to values".into());
        };
        for entry in Object::entries(object).iter() {
            let name = Reflect::get_u32(&entry, 0).ok().and_then(|v| v.as_string());
            let value = Reflect::get_u32(&entry, 1).ok().and_then(|v| v.as_string());
            let (Some(name), Some(value)) = (name, value) else {
                return Err("auth hook must return string header values".into());
            };
            headers.set(&name, &value).map_err(|e| {
                format!(
                    "auth hook gave a bad header {name:?}: {}",
                    super::error::JsError::from(e)
                )
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
            gloo_timers::callback::Timeout::new(
                self.timeout_ms.min(u32::MAX as u64) as u32,
                move || {
                    controller.abort();
                },
            )
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
