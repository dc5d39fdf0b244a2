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

/// The shell's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable code JavaScript sees.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "INVALID_CONFIG",
            Error::InvalidOp(_) | Error::Refused(Refusal::InvalidOp(_)) => "INVALID_OP",
            Error::Refused(Refusal::OpTooLarge { .. }) => "OP_TOO_LARGE",
            Error::Refused(Refusal::QueueFull { .. }) => "QUEUE_FULL",
            Error::InvalidArgument(_) | Error::Refused(Refusal::InvalidKey(_)) => {
                "INVALID_ARGUMENT"
            }
            Error::Refused(Refusal::KeyReused(_)) => "KEY_REUSED",
            Error::Refused(Refusal::NotFound(_)) => "NOT_FOUND",
            Error::Closed(_) => "CLOSED",
            Error::Storage(_) => "STORAGE",
            Error::Unsupported(_) => "UNSUPPORTED",
            Error::Unavailable(_) => "UNAVAILABLE",
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
