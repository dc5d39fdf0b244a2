//! A thin async layer over IndexedDB, for the data path.
//!
//! `enqueue` needs a transaction with `durability: "strict"`: since Chrome 121 the default is
//! `relaxed`, which reports success before the data reaches the disk. rexie and the `idb` crate
//! cannot set it (see [`schema`](super::schema)), so this module binds
//! `IDBDatabase.transaction(stores, mode, {durability})` itself.
//!
//! Requests are awaited through promises resolved from their `success` events. The promise
//! reactions run in the microtask checkpoint of that event, while the transaction is still
//! active, so several requests can be chained in one transaction as long as nothing else is
//! awaited in between.

use js_sys::{Array, Promise};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    IdbDatabase, IdbFactory, IdbObjectStore, IdbRequest, IdbTransaction, IdbTransactionMode,
};

#[wasm_bindgen]
extern "C" {
    /// An `IDBDatabase`, seen through the one method web-sys cannot call without
    /// `--cfg web_sys_unstable_apis` (which every crate depending on this one would then need):
    /// `transaction(stores, mode, {durability})`.
    type DurableDatabase;

    #[wasm_bindgen(method, catch, js_name = transaction)]
    fn transaction_with_options(
        this: &DurableDatabase,
        stores: &Array,
        mode: IdbTransactionMode,
        options: &js_sys::Object,
    ) -> Result<IdbTransaction, JsValue>;
}

use super::error::{Error, Result};

/// How hard a transaction insists that its writes reach the disk before it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Complete only once the writes are flushed: for what the caller was promised (`enqueue`).
    Strict,
    /// Complete once the writes are in the OS cache: for bookkeeping that a crash may roll back
    /// safely (a lost delivery result only means a resend, which the server deduplicates).
    Relaxed,
}

/// The global `indexedDB`, found without `window()` so it works in workers too.
pub fn factory() -> Result<IdbFactory> {
    let value =
        js_sys::Reflect::get(&js_sys::global(), &"indexedDB".into()).map_err(Error::storage)?;
    value
        .dyn_into::<IdbFactory>()
        .map_err(|_| Error::Unsupported("this global scope has no indexedDB".into()))
}

/// A request whose outcome is already being listened for, to be awaited later. Issuing several
/// reads before awaiting the first lets IndexedDB work on them together; the listener must be set
/// at once, or an early `success` would be missed.
pub struct Pending {
    request: IdbRequest,
    done: JsFuture,
}

/// Starts listening to `request`.
pub fn issue(request: IdbRequest) -> Pending {
    let done = JsFuture::from(Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    }));
    Pending { request, done }
}

impl Pending {
    /// Waits for the request to succeed and returns its result.
    pub async fn result(self) -> Result<JsValue> {
        match self.done.await {
            Ok(_) => self.request.result().map_err(Error::storage),
            Err(_) => Err(request_error(&self.request)),
        }
    }
}

/// Waits for a request to succeed and returns its result.
pub async fn wait(request: &IdbRequest) -> Result<JsValue> {
    issue(request.clone()).result().await
}

fn request_error(request: &IdbRequest) -> Error {
    match request.error() {
        Ok(Some(exception)) => Error::storage(exception.into()),
        _ => Error::storage(JsValue::from_str("IndexedDB request failed")),
    }
}

/// One IndexedDB transaction, committed explicitly.
pub struct Txn {
    transaction: IdbTransaction,
    finished: JsFuture,
}

impl Txn {
    /// Starts a transaction over `stores`.
    pub fn begin(
        db: &IdbDatabase,
        stores: &[&str],
        mode: IdbTransactionMode,
        durability: Durability,
    ) -> Result<Txn> {
        let names: Array = stores.iter().map(|s| JsValue::from_str(s)).collect();
        let options = js_sys::Object::new();
        let durability = match durability {
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
        };
        // Setting a property on a fresh object cannot fail.
        let _ = js_sys::Reflect::set(&options, &"durability".into(), &durability.into());
        let transaction = db
            .unchecked_ref::<DurableDatabase>()
            .transaction_with_options(&names, mode, &options)
            .map_err(|e| match exception_name(&e).as_deref() {
                Some("InvalidStateError") => Error::Closed("the database connection was closed"),
                _ => Error::storage(e),
            })?;
        // Listen before any request can finish, so the completion is never missed.
        let finished = JsFuture::from(Promise::new(&mut |resolve, reject| {
            transaction.set_oncomplete(Some(&resolve));
            transaction.set_onabort(Some(&reject));
        }));
        Ok(Txn {
            transaction,
            finished,
        })
    }

    /// A store of this transaction.
    pub fn store(&self, name: &str) -> Result<IdbObjectStore> {
        self.transaction.object_store(name).map_err(Error::storage)
    }

    /// Commits and waits until the transaction is complete (for `Strict`, on disk).
    pub async fn commit(self) -> Result<()> {
        // commit() only hurries the end; a transaction with no pending requests ends anyway.
        // web-sys marks `commit` deprecated by mistake; it is standard and widely supported.
        #[allow(deprecated)]
        let _ = self.transaction.commit();
        match self.finished.await {
            Ok(_) => Ok(()),
            Err(_) => Err(match self.transaction.error() {
                Some(exception) => Error::storage(exception.into()),
                None => Error::storage(JsValue::from_str("IndexedDB transaction aborted")),
            }),
        }
    }

    /// Abandons the transaction and everything it wrote.
    pub fn abort(self) {
        // Aborting a transaction that already ended throws; there is nothing left to undo then.
        let _ = self.transaction.abort();
    }
}

fn exception_name(value: &JsValue) -> Option<String> {
    js_sys::Reflect::get(value, &"name".into())
        .ok()
        .and_then(|v| v.as_string())
}
