//! Every knob of delivery, with the defaults that DESIGN.md argues for.
//!
//! The JS API accepts the same structure in camelCase; every field is optional there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::breaker::BreakerConfig;
use super::op::Priority;
use super::time::{DAY, MINUTE, Millis, SECOND};

/// The whole delivery policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct Config {
    /// Retry delays.
    pub backoff: Backoff,
    /// Limits for ops the user waits on.
    pub user: RetryLimits,
    /// Limits for background ops.
    pub background: RetryLimits,
    /// The largest `Retry-After` honoured; longer ones are clamped so a misconfigured server
    /// cannot park the queue for days.
    pub max_retry_after_ms: Millis,
    /// How long a request may take before it is abandoned. An op's attempt is recorded with a
    /// lease this long, so a worker killed mid-send retries it after the lease.
    pub request_timeout_ms: Millis,
    /// How many requests may be in flight at once.
    pub max_in_flight: usize,
    /// Request sizing.
    pub batch: BatchConfig,
    /// Queue size caps.
    pub limits: Limits,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// The conflict policy for kinds not listed in `kinds`.
    pub default_conflict: ConflictPolicy,
    /// Per-kind policies.
    pub kinds: BTreeMap<String, KindPolicy>,
    /// How long a caller's idempotency key is remembered after its call: a call repeated with the
    /// same key within this time gets the first answer. Far longer than any retry of a lost
    /// answer takes (the page helper gives up after 30 s by default).
    pub key_retention_ms: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backoff: Backoff::default(),
            // The research document's numbers: a user watches for 3 to 5 attempts, background
            // work may take 10 or more. Only attempts the server failed count (see
            // docs/DELIVERY.md, "Retries and backoff").
            user: RetryLimits {
                max_attempts: 5,
                max_age_ms: DAY,
            },
            // Six days: inside the reference server's 7-day retention less its margins (an
            // unordered op older than 7 days - 2 h is refused there), with room for clock skew.
            background: RetryLimits {
                max_attempts: 12,
                max_age_ms: 6 * DAY,
            },
            max_retry_after_ms: 10 * MINUTE,
            request_timeout_ms: 5 * SECOND,
            max_in_flight: 2,
            batch: BatchConfig::default(),
            limits: Limits::default(),
            breaker: BreakerConfig::default(),
            default_conflict: ConflictPolicy::ServerWins,
            kinds: BTreeMap::new(),
            key_retention_ms: DAY,
        }
    }
}

/// The longest delay any setting may ask for: a day.
pub const MAX_DELAY_MS: Millis = DAY;
/// The most ops one request may carry (docs/PROTOCOL.md).
pub const MAX_BATCH_OPS: usize = 500;

/// Why a [`Config`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The retry limits for a priority.
    pub fn limits_for(&self, priority: Priority) -> &RetryLimits {
        match priority {
            Priority::User => &self.user,
            Priority::Background => &self.background,
        }
    }

    /// The policy for a kind.
    pub fn kind(&self, kind: &str) -> KindPolicy {
        self.kinds.get(kind).copied().unwrap_or(KindPolicy {
            conflict: self.default_conflict,
            coalesce: false,
        })
    }

    /// Checks the values that would make delivery misbehave rather than fail loudly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |why: &str| Err(ConfigError(why.to_owned()));
        // Upper bounds keep every sum and product of these values far from overflow, and the
        // timers they feed within what `setTimeout` accepts (2^31 - 1 ms).
        let too_long = [
            ("backoff.capMs", self.backoff.cap_ms),
            ("maxRetryAfterMs", self.max_retry_after_ms),
            ("requestTimeoutMs", self.request_timeout_ms),
            ("breaker.maxOpenMs", self.breaker.max_open_ms),
        ];
        for (name, value) in too_long {
            if value > MAX_DELAY_MS {
                return Err(ConfigError(format!(
                    "{name} must be at most {MAX_DELAY_MS} (a day)"
                )));
            }
        }
        if !(MINUTE..=366 * DAY).contains(&self.key_retention_ms) {
            return fail("keyRetentionMs must be between a minute and a year");
        }
        for (name, limits) in [("user", &self.user), ("background", &self.background)] {
            if limits.max_age_ms > 366 * DAY {
                return Err(ConfigError(format!(
                    "{name}.maxAgeMs must be at most a year"
                )));
            }
        }
        if self.batch.max_ops > MAX_BATCH_OPS {
            return Err(ConfigError(format!(
                "batch.maxOps must be at most {MAX_BATCH_OPS}, the protocol's limit per request"
            )));
        }
        if self.max_in_flight > 16 {
            return fail("maxInFlight must be at most 16");
        }
        self.backoff
            .validate()
            .map_err(|why| ConfigError(why.into()))?;
        for (name, limits) in [("user", &self.user), ("background", &self.background)] {
            if limits.max_attempts == 0 || limits.max_age_ms == 0 {
                return Err(ConfigError(format!(
                    "{name}.maxAttempts and {name}.maxAgeMs must be at least 1"
                )));
            }
        }
        if self.request_timeout_ms == 0 {
            return fail("requestTimeoutMs must be at least 1");
        }
        if self.max_in_flight == 0 {
            return fail("maxInFlight must be at least 1");
        }
        if self.batch.max_ops == 0 || self.batch.max_bytes == 0 {
            return fail("batch.maxOps and batch.maxBytes must be at least 1");
        }
        if self.limits.max_pending == 0 || self.limits.max_op_bytes == 0 {
            return fail("limits.maxPending and limits.maxOpBytes must be at least 1");
        }
        if self.limits.max_op_bytes > self.limits.max_bytes {
            return fail("limits.maxOpBytes must not exceed limits.maxBytes");
        }
        if self.limits.max_op_bytes > self.batch.max_bytes {
            return fail(
                "limits.maxOpBytes must not exceed batch.maxBytes, or a large op could never be sent",
            );
        }
        self.breaker
            .validate()
            .map_err(|why| ConfigError(why.into()))
    }
}

/// When to give up on an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct RetryLimits {
    /// Server-side failures tolerated before the op becomes a dead letter.
    pub max_attempts: u32,
    /// Age after which an undelivered op becomes a dead letter.
    pub max_age_ms: Millis,
}

/// How requests are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct BatchConfig {
    /// Most ops in one request. With `single`, always 1.
    pub max_ops: usize,
    /// Most bytes of ops in one request (see [`Op::size`](super::op::Op::size)).
    pub max_bytes: u64,
    /// Batch requests, or one op per request with an `Idempotency-Key` header.
    pub mode: SendMode,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_ops: 100,
            max_bytes: 512 * 1024,
            mode: SendMode::Batch,
        }
    }
}

/// The shape of requests on the wire (see docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum SendMode {
    /// `POST /v1/ops` with many ops and a result per op.
    Batch,
    /// `POST /v1/op` with one op and an `Idempotency-Key` header; the HTTP status is the result.
    Single,
}

/// Caps on the queue, so it cannot grow without bound. Past a cap `enqueue` fails; nothing is
/// dropped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct Limits {
    /// Most pending ops.
    pub max_pending: u64,
    /// Most bytes of pending ops.
    pub max_bytes: u64,
    /// Largest single op. Kept under 64 KiB by default so an op also fits a keepalive beacon.
    pub max_op_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 200_000,
            max_bytes: 64 * 1024 * 1024,
            max_op_bytes: 60 * 1024,
        }
    }
}

/// What to do when the server reports that an op's `base_version` is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum ConflictPolicy {
    /// Drop the op and emit `conflict` with the server's state, so the UI rolls back.
    ServerWins,
    /// Last writer wins: rebase on the server's version and send again (with a new id).
    ClientWins,
    /// Park the op in the conflicts store until the UI resolves it.
    Manual,
}

/// Per-kind behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct KindPolicy {
    /// See [`ConflictPolicy`].
    pub conflict: ConflictPolicy,
    /// Whether a newer op of this kind replaces a queued one on the same entity that never left
    /// the device ("replace"-style ops, where only the latest value matters).
    #[serde(default)]
    pub coalesce: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut config = Config::default();
        config.backoff.base_ms = 0;
        assert!(config.validate().unwrap_err().0.contains("baseMs"));
        let mut config = Config::default();
        config.limits.max_op_bytes = config.batch.max_bytes + 1;
        assert!(config.validate().is_err());
    }

    #[test]
    fn upper_bounds_keep_timers_and_requests_in_range() {
        let mut config = Config::default();
        config.backoff.cap_ms = 2 * DAY;
        assert!(config.validate().unwrap_err().0.contains("backoff.capMs"));
        let mut config = Config::default();
        config.batch.max_ops = MAX_BATCH_OPS + 1;
        assert!(config.validate().unwrap_err().0.contains("batch.maxOps"));
        let config = Config {
            request_timeout_ms: u64::MAX,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }

    /// Every bound is inclusive: the value at the bound is accepted, one past it refused.
    #[test]
    fn every_bound_accepts_its_limit_and_refuses_one_past_it() {
        type Set = fn(&mut Config, u64);
        let cases: [(&str, Set, u64, u64); 12] = [
            (
                "backoff.capMs",
                |c, v| c.backoff.cap_ms = v,
                MAX_DELAY_MS,
                MAX_DELAY_MS + 1,
            ),
            (
                "maxRetryAfterMs",
                |c, v| c.max_retry_after_ms = v,
                MAX_DELAY_MS,
                MAX_DELAY_MS + 1,
            ),
            (
                "requestTimeoutMs",
                |c, v| c.request_timeout_ms = v,
                MAX_DELAY_MS,
                MAX_DELAY_MS + 1,
            ),
            (
                "breaker.maxOpenMs",
                |c, v| c.breaker.max_open_ms = v,
                MAX_DELAY_MS,
                MAX_DELAY_MS + 1,
            ),
            (
                "keyRetentionMs",
                |c, v| c.key_retention_ms = v,
                366 * DAY,
                366 * DAY + 1,
            ),
            (
                "keyRetentionMs",
                |c, v| c.key_retention_ms = v,
                MINUTE,
                MINUTE - 1,
            ),
            (
                "user.maxAgeMs",
                |c, v| c.user.max_age_ms = v,
                366 * DAY,
                366 * DAY + 1,
            ),
            (
                "background.maxAgeMs",
                |c, v| c.background.max_age_ms = v,
                366 * DAY,
                366 * DAY + 1,
            ),
            (
                "batch.maxOps",
                |c, v| c.batch.max_ops = v as usize,
                MAX_BATCH_OPS as u64,
                MAX_BATCH_OPS as u64 + 1,
            ),
            ("maxInFlight", |c, v| c.max_in_flight = v as usize, 16, 17),
            (
                "limits.maxOpBytes",
                |c, v| c.limits.max_op_bytes = v,
                512 * 1024,
                512 * 1024 + 1,
            ),
            (
                "limits.maxOpBytes vs maxBytes",
                |c, v| {
                    c.limits.max_bytes = 1_000;
                    c.limits.max_op_bytes = v;
                },
                1_000,
                1_001,
            ),
        ];
        for (name, set, good, bad) in cases {
            let mut config = Config::default();
            if name == "limits.maxOpBytes" {
                config.limits.max_bytes = 1 << 30;
            }
            set(&mut config, good);
            assert!(
                config.validate().is_ok(),
                "{name} = {good} refused: {:?}",
                config.validate()
            );
            let mut config = Config::default();
            if name == "limits.maxOpBytes" {
                config.limits.max_bytes = 1 << 30;
            }
            set(&mut config, bad);
            assert!(config.validate().is_err(), "{name} = {bad} accepted");
        }
        // The lower bounds: zero is refused wherever it would stall delivery.
        type Zero = (&'static str, fn(&mut Config));
        let zeroes: [Zero; 8] = [
            ("user.maxAttempts", |c| c.user.max_attempts = 0),
            ("background.maxAgeMs", |c| c.background.max_age_ms = 0),
            ("requestTimeoutMs", |c| c.request_timeout_ms = 0),
            ("maxInFlight", |c| c.max_in_flight = 0),
            ("batch.maxOps", |c| c.batch.max_ops = 0),
            ("batch.maxBytes", |c| c.batch.max_bytes = 0),
            ("limits.maxPending", |c| c.limits.max_pending = 0),
            ("limits.maxOpBytes", |c| c.limits.max_op_bytes = 0),
        ];
        for (name, set) in zeroes {
            let mut config = Config::default();
            set(&mut config);
            assert!(config.validate().is_err(), "{name} = 0 accepted");
        }
    }

    #[test]
    fn config_parses_from_partial_camel_case_json() {
        let config: Config = serde_json::from_str(
            r#"{"backoff": {"baseMs": 50, "capMs": 1000, "factor": 2},
                "kinds": {"title": {"conflict": "client-wins", "coalesce": true}}}"#,
        )
        .unwrap();
        assert_eq!(config.backoff.base_ms, 50);
        assert_eq!(config.kind("title").conflict, ConflictPolicy::ClientWins);
        assert!(config.kind("title").coalesce);
        assert_eq!(config.kind("other").conflict, ConflictPolicy::ServerWins);
        assert!(serde_json::from_str::<Config>(r#"{"bogus": 1}"#).is_err());
    }
}
