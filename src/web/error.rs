//! Errors of the browser shell, and how they cross into JavaScript.
//!
//! Every failure reaches JavaScript as an `Error` named `OutboxError` with a stable `code`, so
//! callers branch on the code and never parse messages.

use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::core::Refusal;

/// A JavaScript exception, reduced to its name and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsError {
    /// `DOMException.name` or `Error.name`, such as `QuotaExceededError`.
    pub name: String,
    /// The message.
    pub message: String,
}

impl From<JsValue> for JsError {
    fn from(value: JsValue) -> Self {
        if let Some(error) = value.dyn_ref::<js_sys::Error>() {
            return JsError {
                name: error.name().into(),
                message: error.message().into(),
            };
        }
        // DOMException is an Error in browsers, but not always by prototype chain in workers.
        let field = |name: &str| {
            js_sys::Reflect::get(&value, &JsValue::from_str(name))
                .ok()
                .and_then(|v| v.as_string())
        };
        JsError {
            name: field("name").unwrap_or_else(|| "Error".into()),
            message: field("message")
                .or_else(|| value.as_string())
                .unwrap_or_else(|| format!("{value:?}")),
        }
    }
}

impl std::fmt::Display for JsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

/// Everything that can go wrong in the shell.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration passed to `Outbox.open` is unusable.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The op passed to `enqueue` is malformed.
    #[error("invalid op: {0}")]
    InvalidOp(String),
    /// Another argument is malformed (an id, an event name, a resolution).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The queue refused the request.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The outbox was closed, or its database was taken over by an upgrade.
    #[error("the outbox is closed: {0}")]
    Closed(&'static str),
    /// IndexedDB failed.
    #[error("storage failed: {0}")]
    Storage(JsError),
    /// The global scope lacks something the outbox needs.
    #[error("unsupported environment: {0}")]
    Unsupported(String),
    /// Another party that the call needs could not be reached or would not help (the backend,
    /// for a beacon grant). Nothing changed; trying again later is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Every `code` an `OutboxError` may carry, from the wasm API and from the extension glue alike,
/// so that the TypeScript union (`OutboxErrorCode`) is one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, tsify::Tsify)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[tsify(rename = "OutboxErrorCode")]
pub enum ErrorCode {
    /// `Outbox.open` was given unusable options.
    InvalidConfig,
    /// `enqueue` was given a malformed op.
    InvalidOp,
    /// Another argument is malformed (an id, a key, an event name, a resolution).
    InvalidArgument,
    /// The op is larger than `limits.maxOpBytes`.
    OpTooLarge,
    /// The queue is at a cap.
    QueueFull,
    /// A caller's key came with another request than the one it first came with.
    KeyReused,
    /// No dead letter or conflict has that id.
    NotFound,
    /// The outbox was closed, or its database taken over by an upgrade.
    Closed,
    /// IndexedDB failed.
    Storage,
    /// The global scope lacks something the outbox needs.
    Unsupported,
    /// A party the call needs could not be reached (the backend for a grant; from a page, the
    /// background). Nothing changed; calling again with the same key is safe.
    Unavailable,
    /// From the extension glue: the sender may not make this call (docs/SECURITY.md).
    Forbidden,
    /// An `error` event: the browser dropped the database and the queue was rebuilt from the
    /// second copy (`stats().incident` says how many ops).
    StorageRecovered,
    /// An `error` event: the browser dropped the database and pending ops were lost with it.
    StorageLost,
    /// A bug: the module panicked.
    Panic,
}

impl ErrorCode {
    /// The code as JavaScript sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::InvalidOp => "INVALID_OP",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::OpTooLarge => "OP_TOO_LARGE",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::KeyReused => "KEY_REUSED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::StorageRecovered => "STORAGE_RECOVERED",
            ErrorCode::StorageLost => "STORAGE_LOST",
            ErrorCode::Panic => "PANIC",
        }
    }
}

/// The shell's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable code JavaScript sees.
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The code, as the enum the TypeScript union is made from.
    pub fn kind(&self) -> ErrorCode {
        match self {
            Error::InvalidConfig(_) => ErrorCode::InvalidConfig,
            Error::InvalidOp(_) | Error::Refused(Refusal::InvalidOp(_)) => ErrorCode::InvalidOp,
            Error::Refused(Refusal::OpTooLarge { .. }) => ErrorCode::OpTooLarge,
            Error::Refused(Refusal::QueueFull { .. }) => ErrorCode::QueueFull,
            Error::InvalidArgument(_) | Error::Refused(Refusal::InvalidKey(_)) => {
                ErrorCode::InvalidArgument
            }
            Error::Refused(Refusal::KeyReused(_)) => ErrorCode::KeyReused,
            Error::Refused(Refusal::NotFound(_)) => ErrorCode::NotFound,
            Error::Closed(_) => ErrorCode::Closed,
            Error::Storage(_) => ErrorCode::Storage,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// A storage error from a failed IndexedDB call.
    pub fn storage(value: JsValue) -> Self {
        Error::Storage(JsError::from(value))
    }
}

impl From<Error> for JsValue {
    fn from(error: Error) -> Self {
        js_error(error.code(), &error.to_string()).into()
    }
}

/// Makes a JavaScript `Error` named `OutboxError` with the given `code`.
pub fn js_error(code: &str, message: &str) -> js_sys::Error {
    let error = js_sys::Error::new(message);
    error.set_name("OutboxError");
    // Setting a property on a fresh Error cannot fail.
    let _ = js_sys::Reflect::set(&error, &"code".into(), &code.into());
    error
}
