//! The few globals the shell needs beyond IndexedDB and fetch: time, randomness, Web Locks.
//!
//! Each is reached through `globalThis`, never `window()`, so the shell runs in service workers.

use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use super::error::{Error, Result};
use crate::core::{Millis, OpId};

/// Wall-clock time, which is what persisted `next_attempt_at` values are compared with.
pub fn now() -> Millis {
    js_sys::Date::now() as Millis
}

/// `N` random bytes from `crypto.getRandomValues`.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Unsupported(format!("crypto.getRandomValues failed: {e}")))?;
    Ok(bytes)
}

/// A fresh op id.
pub fn random_id() -> Result<OpId> {
    Ok(OpId::from_random_bytes(random()?))
}

#[wasm_bindgen]
extern "C" {
    /// `navigator.locks` (bound by hand: web-sys marks the Web Locks API unstable).
    type LockManager;

    #[wasm_bindgen(method, catch, js_name = request)]
    fn request_with_options(
        this: &LockManager,
        name: &str,
        options: &JsValue,
        callback: &Function,
    ) -> Result<Promise, JsValue>;
}

fn lock_manager() -> Option<LockManager> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let locks = Reflect::get(&navigator, &"locks".into()).ok()?;
    (!locks.is_undefined() && !locks.is_null()).then(|| locks.unchecked_into())
}

/// The answer to a Web Lock request.
pub enum LockGrant {
    /// The lock is held until this function is called (it resolves the promise that the lock's
    /// callback returned), or until the context goes away.
    Held(Function),
    /// Another context holds it, and the request did not wait.
    Busy,
    /// There are no Web Locks here (very old browsers), or requesting one failed (an opaque
    /// origin).
    Unavailable,
}

/// Asks for the Web Lock `name`, which at most one context of the origin holds at a time
/// (service worker, popup, options page alike). With `wait`, waits for it; without, gives up at
/// once if it is taken.
pub async fn acquire_lock(name: &str, wait: bool) -> LockGrant {
    let Some(locks) = lock_manager() else {
        return LockGrant::Unavailable;
    };
    let options = js_sys::Object::new();
    // Setting a property on a fresh object cannot fail.
    let _ = Reflect::set(&options, &"ifAvailable".into(), &JsValue::from_bool(!wait));
    // `granted` resolves with the lock (or null) when the browser calls back; the callback
    // returns `held`, which keeps the lock until `release` resolves it.
    let mut settle_granted = None;
    let granted = Promise::new(&mut |resolve, _| settle_granted = Some(resolve));
    let mut release = None;
    let held = Promise::new(&mut |resolve, _| release = Some(resolve));
    let (Some(settle_granted), Some(release)) = (settle_granted, release) else {
        return LockGrant::Unavailable;
    };
    let callback = Closure::once_into_js(move |lock: JsValue| -> Promise {
        let _ = settle_granted.call1(&JsValue::NULL, &lock);
        if lock.is_null() {
            Promise::resolve(&JsValue::FALSE)
        } else {
            held
        }
    });
    let failed = |error: &JsValue| {
        web_sys::console::warn_2(&"outbox: Web Lock request failed:".into(), error);
        LockGrant::Unavailable
    };
    let requested = match locks.request_with_options(name, &options, callback.unchecked_ref()) {
        Ok(requested) => requested,
        Err(error) => return failed(&error),
    };
    // A request that fails before the callback (a SecurityError) rejects `requested` first.
    let first = Promise::race(&js_sys::Array::of2(&granted, &requested));
    match JsFuture::from(first).await {
        Ok(lock) if lock.is_null() || lock.is_falsy() => LockGrant::Busy,
        Ok(_) => LockGrant::Held(release),
        Err(error) => failed(&error),
    }
}
