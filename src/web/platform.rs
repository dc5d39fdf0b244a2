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

/// Runs `work` while holding the Web Lock `name`, which at most one context of the origin holds
/// at a time (service worker, popup, options page alike). With `wait`, waits for the lock;
/// without, gives up at once if it is taken. Returns whether `work` ran.
///
/// Without Web Locks (very old browsers), or where requesting one fails (an opaque origin),
/// `work` runs unguarded: a single context is still correct, and leases keep two drainers from
/// sending the same op twice in a row.
pub async fn with_lock<F>(name: &str, wait: bool, work: F) -> bool
where
    F: std::future::Future<Output = ()> + 'static,
{
    let Some(locks) = lock_manager() else {
        work.await;
        return true;
    };
    let options = js_sys::Object::new();
    // Setting a property on a fresh object cannot fail.
    let _ = Reflect::set(&options, &"ifAvailable".into(), &JsValue::from_bool(!wait));
    // Shared with the callback, so that work the callback never took can run unguarded.
    let work = std::rc::Rc::new(std::cell::RefCell::new(Some(work)));
    let offered = work.clone();
    let callback = Closure::once_into_js(move |lock: JsValue| -> Promise {
        match offered.borrow_mut().take() {
            Some(work) if !lock.is_null() => wasm_bindgen_futures::future_to_promise(async move {
                work.await;
                Ok(JsValue::TRUE)
            }),
            _ => Promise::resolve(&JsValue::FALSE),
        }
    });
    let held = locks.request_with_options(name, &options, callback.unchecked_ref());
    let held = match held {
        Ok(held) => JsFuture::from(held).await,
        Err(error) => Err(error),
    };
    match held {
        Ok(ran) => ran.is_truthy(),
        Err(error) => {
            web_sys::console::warn_2(
                &"outbox: Web Lock request failed; draining unguarded:".into(),
                &error,
            );
            let unclaimed = work.borrow_mut().take();
            match unclaimed {
                Some(work) => {
                    work.await;
                    true
                }
                None => false,
            }
        }
    }
}
