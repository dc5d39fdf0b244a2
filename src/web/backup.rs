//! The second copy's storage: the `backup` option of `Outbox.open`, an object the application
//! (the extension glue, over `chrome.storage.local`) provides. What goes into it, and what to do
//! with it at open, is the core's ([`copy`](crate::core::copy)); this only reads and writes it.

use js_sys::{Array, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use super::error::{Error, JsError, Result};
use crate::core::copy::{CopiedOp, CopyMeta, CopyWrite, META_ENTRY, entry_seq, op_entry};
use crate::core::json::{FromJson, ToJson};
use crate::core::{Counters, OpId};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** Where the second copy of the pending ops lives: storage that fails apart from IndexedDB (the extension glue gives `chrome.storage.local`). Values are JSON text. */
export interface Backup {
  /** The entries named (all of them for `null`), as name to value. */
  get(names: string[] | null): Promise<Record<string, string>>;
  /** Stores `put`, then removes `remove`; resolves once both are done. */
  write(put: Record<string, string>, remove: string[]): Promise<void>;
}
"#;

#[wasm_bindgen]
extern "C" {
    /// The application's [`Backup`] object.
    #[wasm_bindgen(typescript_type = "Backup")]
    pub type BackupObject;

    #[wasm_bindgen(method, catch)]
    fn get(this: &BackupObject, names: &JsValue) -> Result<Promise, JsValue>;

    #[wasm_bindgen(method, catch)]
    fn write(this: &BackupObject, put: &Object, remove: &Array) -> Result<Promise, JsValue>;
}

/// A read of the copy's record in flight (see [`Backup::start_meta`]).
pub struct PendingMeta(JsFuture);

impl PendingMeta {
    /// The copy's record, if it has one (a record it cannot read counts as none).
    pub async fn meta(self) -> Result<Option<CopyMeta>> {
        let entries = entries_of(self.0).await?;
        Ok(entries
            .iter()
            .find(|(name, _)| name == META_ENTRY)
            .and_then(|(_, value)| CopyMeta::from_json(value).ok()))
    }
}

async fn entries_of(read: JsFuture) -> Result<Vec<(String, String)>> {
    let found = read.await.map_err(|e| copy_error("read", e))?;
    if !found.is_object() {
        return Err(copy_error("read", "get() did not give an object".into()));
    }
    let mut entries = Vec::new();
    for pair in Object::entries(found.unchecked_ref()).iter() {
        let pair: Array = pair.unchecked_into();
        if let (Some(name), Some(value)) = (pair.get(0).as_string(), pair.get(1).as_string()) {
            entries.push((name, value));
        }
    }
    Ok(entries)
}

fn copy_error(what: &str, error: JsValue) -> Error {
    let error = JsError::from(error);
    Error::Storage(JsError {
        name: "CopyError".into(),
        message: format!("the second copy could not be {what}: {error}"),
    })
}

/// The second copy's storage.
pub struct Backup {
    object: BackupObject,
}

impl Backup {
    /// Reads the `backup` option: absent (no copy), or an object with `get` and `write`.
    pub fn from_option(value: JsValue) -> Result<Option<Backup>> {
        if value.is_undefined() || value.is_null() {
            return Ok(None);
        }
        let has = |name: &str| {
            Reflect::get(&value, &name.into())
                .map(|f| f.is_function())
                .unwrap_or(false)
        };
        if !value.is_object() || !has("get") || !has("write") {
            return Err(Error::InvalidConfig(
                "backup must be an object with get(names) and write(put, remove)".into(),
            ));
        }
        Ok(Some(Backup {
            object: value.unchecked_into(),
        }))
    }

    /// Asks for the entries named (all for `null`); [`entries_of`] reads the answer. Issued at
    /// once, so the read can overlap other work.
    fn issue(&self, names: JsValue) -> Result<JsFuture> {
        let promise = self.object.get(&names).map_err(|e| copy_error("read", e))?;
        Ok(JsFuture::from(promise))
    }

    async fn entries(&self, names: JsValue) -> Result<Vec<(String, String)>> {
        entries_of(self.issue(names)?).await
    }

    /// Starts reading the copy's record: `open` reads it while IndexedDB reads the client id.
    pub fn start_meta(&self) -> Result<PendingMeta> {
        Ok(PendingMeta(
            self.issue(Array::of1(&META_ENTRY.into()).into())?,
        ))
    }

    /// Every op the copy holds (entries it cannot read are left out: a rebuild then counts them
    /// as missing).
    pub async fn ops(&self) -> Result<Vec<CopiedOp>> {
        let entries = self.entries(JsValue::NULL).await?;
        Ok(entries
            .iter()
            .filter(|(name, _)| entry_seq(name).is_some())
            .filter_map(|(_, value)| CopiedOp::from_json(value).ok())
            .collect())
    }

    /// Starts writing `copy` for `client`; the promise settles when it is done. Started, not
    /// awaited, so that an enqueue can write the copy while IndexedDB commits.
    pub fn start(&self, client: OpId, copy: &CopyWrite) -> Result<Promise> {
        let put = Object::new();
        for entry in &copy.put {
            let json = entry.to_json();
            let _ = Reflect::set(&put, &op_entry(entry.op.seq).into(), &json.into());
        }
        if let Some(counters) = copy.counters {
            let _ = Reflect::set(&put, &META_ENTRY.into(), &meta(client, counters).into());
        }
        let remove: Array = copy
            .remove
            .iter()
            .map(|&seq| JsValue::from_str(&op_entry(seq)))
            .collect();
        self.object
            .write(&put, &remove)
            .map_err(|e| copy_error("written", e))
    }

    /// Writes `copy` and waits for it.
    pub async fn write(&self, client: OpId, copy: &CopyWrite) -> Result<()> {
        JsFuture::from(self.start(client, copy)?)
            .await
            .map(drop)
            .map_err(|e| copy_error("written", e))
    }

    /// Removes every op entry below `below` (see `SessionAction::SweepCopy`).
    pub async fn sweep(&self, below: u64) -> Result<()> {
        let entries = self.entries(JsValue::NULL).await?;
        let stale: Array = entries
            .iter()
            .filter(|(name, _)| entry_seq(name).is_some_and(|seq| seq < below))
            .map(|(name, _)| JsValue::from_str(name))
            .collect();
        if stale.length() == 0 {
            return Ok(());
        }
        let promise = self
            .object
            .write(&Object::new(), &stale)
            .map_err(|e| copy_error("swept", e))?;
        JsFuture::from(promise)
            .await
            .map(drop)
            .map_err(|e| copy_error("swept", e))
    }

    /// Removes every op entry, whatever its `seq` (the copy of a queue that is gone).
    pub async fn clear(&self) -> Result<()> {
        self.sweep(u64::MAX).await
    }
}

fn meta(client: OpId, counters: Counters) -> String {
    let meta = CopyMeta {
        client,
        next_seq: counters.next_seq,
        pending: counters.pending,
    };
    meta.to_json()
}
