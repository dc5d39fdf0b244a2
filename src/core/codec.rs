//! The JSON form of the core's types, written by hand over [`json`](super::json).
//!
//! These conversions are what the browser module runs: they replaced serde_json and the serde
//! derives there, which were a quarter of the module (issue #15). The derives stay on the types
//! as the reference for the stored format: natively, the tests below check each conversion
//! against serde_json both ways, so a record written by the previous build reads the same.
//!
//! Stored records (ops, dead letters, conflicts, keys, counters, the breaker, the copy) keep the
//! Rust field names and ignore members they do not know, so a newer build's records still
//! read. The options (`Config`) are camelCase and refuse unknown members, so a misspelled
//! option is an error, never a silently ignored one. Events are camelCase with a `type` tag.

use std::collections::BTreeMap;

use super::backoff::{Backoff, Strategy};
use super::breaker::{Breaker, BreakerConfig};
use super::config::{
    BatchConfig, Config, ConflictPolicy, KindPolicy, Limits, RetryLimits, SendMode,
};
use super::copy::{CopiedOp, CopyMeta, Incident, IncidentCode};
use super::event::{ConflictOutcome, Event};
use super::json::{self, FromJson, JsonError, Node, ToJson, Writer};
use super::op::{Op, OpId, Priority};
use super::records::{Counters, DeadCause, DeadLetter, KeyRecord, ParkedConflict, Receipt};

/// A fieldless enum written as one of a fixed set of strings.
macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name JSON carries.
            pub fn json_name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl ToJson for $ty {
            fn write_json(&self, out: &mut Writer) {
                out.str(self.json_name());
            }
        }

        impl FromJson for $ty {
            fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
                match node.str()? {
                    $($name => Ok($ty::$variant),)+
                    other => Err(JsonError::new(format!(
                        concat!("unknown variant `{}`, expected one of ", $("`", $name, "` "),+),
                        other
                    ))),
                }
            }
        }
    };
}

string_enum!(Priority { User => "user", Background => "background" });
string_enum!(DeadCause {
    Rejected => "rejected",
    Exhausted => "exhausted",
    Expired => "expired",
    Ambiguous => "ambiguous",
});
string_enum!(Strategy {
    Proportional => "proportional",
    Full => "full",
    Decorrelated => "decorrelated",
});
string_enum!(SendMode { Batch => "batch", Single => "single" });
string_enum!(ConflictPolicy {
    ServerWins => "server-wins",
    ClientWins => "client-wins",
    Manual => "manual",
});
string_enum!(IncidentCode {
    StorageRecovered => "STORAGE_RECOVERED",
    StorageLost => "STORAGE_LOST",
});
string_enum!(ConflictOutcome {
    ServerWins => "server-wins",
    Rebased => "rebased",
    Parked => "parked",
});

impl ToJson for OpId {
    fn write_json(&self, out: &mut Writer) {
        out.str(&self.to_string());
    }
}

impl FromJson for OpId {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.str()?
            .parse()
            .map_err(|e: super::op::BadOpId| JsonError::new(e.to_string()))
    }
}

impl ToJson for Op {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("id", &self.id)
            .field("seq", &self.seq)
            .field("prev", &self.prev)
            .field("entity", &self.entity)
            .field("kind", &self.kind)
            .field("payload", &self.payload)
            .field("base_version", &self.base_version)
            .field("priority", &self.priority)
            .field("created_at", &self.created_at)
            .field("attempts", &self.attempts)
            .field("failures", &self.failures)
            .field("next_attempt_at", &self.next_attempt_at)
            .field("last_error", &self.last_error)
            .field("solo", &self.solo)
            .field("last_delay_ms", &self.last_delay_ms)
            .end_object();
    }
}

impl FromJson for Op {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(Op {
            id: node.req("id")?,
            seq: node.req("seq")?,
            prev: node.req("prev")?,
            entity: node.opt("entity")?,
            kind: node.req("kind")?,
            payload: node.req("payload")?,
            base_version: node.opt("base_version")?,
            priority: node.req("priority")?,
            created_at: node.req("created_at")?,
            attempts: node.req("attempts")?,
            failures: node.req("failures")?,
            next_attempt_at: node.opt("next_attempt_at")?,
            last_error: node.opt("last_error")?,
            solo: node.req("solo")?,
            last_delay_ms: node.opt("last_delay_ms")?,
        })
    }
}

impl ToJson for Counters {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending)
            .field("bytes", &self.bytes)
            .end_object();
    }
}

impl FromJson for Counters {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(Counters {
            next_seq: node.req("next_seq")?,
            pending: node.req("pending")?,
            bytes: node.req("bytes")?,
        })
    }
}

impl ToJson for Receipt {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("id", &self.id)
            .field("seq", &self.seq)
            .field("replaced", &self.replaced)
            .field("replayed", &self.replayed)
            .end_object();
    }
}

impl FromJson for Receipt {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(Receipt {
            id: node.req("id")?,
            seq: node.req("seq")?,
            replaced: node.opt("replaced")?,
            replayed: node.or_default("replayed")?,
        })
    }
}

impl ToJson for KeyRecord {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("receipt", &self.receipt)
            .field("at", &self.at)
            .end_object();
    }
}

impl FromJson for KeyRecord {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(KeyRecord {
            key: node.req("key")?,
            fingerprint: node.req("fingerprint")?,
            receipt: node.opt("receipt")?,
            at: node.req("at")?,
        })
    }
}

impl ToJson for DeadLetter {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("op", &self.op)
            .field("reason", &self.reason)
            .field("status", &self.status)
            .field("cause", &self.cause)
            .field("at", &self.at)
            .end_object();
    }
}

impl FromJson for DeadLetter {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(DeadLetter {
            op: node.req("op")?,
            reason: node.req("reason")?,
            status: node.opt("status")?,
            cause: node.req("cause")?,
            at: node.req("at")?,
        })
    }
}

impl ToJson for ParkedConflict {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("op", &self.op)
            .field("server_version", &self.server_version)
            .field("server_state", &self.server_state)
            .field("server_state_omitted", &self.server_state_omitted)
            .field("at", &self.at)
            .end_object();
    }
}

impl FromJson for ParkedConflict {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(ParkedConflict {
            op: node.req("op")?,
            server_version: node.opt("server_version")?,
            server_state: node.opt("server_state")?,
            server_state_omitted: node.or_default("server_state_omitted")?,
            at: node.req("at")?,
        })
    }
}

impl ToJson for Breaker {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object();
        match *self {
            Breaker::Closed { failures, calls } => out
                .key("closed")
                .begin_object()
                .field("failures", &failures)
                .field("calls", &calls),
            Breaker::Open {
                until,
                open_ms,
                since,
            } => out
                .key("open")
                .begin_object()
                .field("until", &until)
                .field("open_ms", &open_ms)
                .field("since", &since),
            Breaker::HalfOpen { open_ms, since } => out
                .key("half-open")
                .begin_object()
                .field("open_ms", &open_ms)
                .field("since", &since),
        };
        out.end_object().end_object();
    }
}

impl FromJson for Breaker {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let [(state, body)] = node.object()? else {
            return Err(JsonError::new(
                "expected one of `closed`, `open`, `half-open`",
            ));
        };
        let read = || -> Result<Breaker, JsonError> {
            match state.as_ref() {
                "closed" => Ok(Breaker::Closed {
                    failures: body.req("failures")?,
                    calls: body.req("calls")?,
                }),
                "open" => Ok(Breaker::Open {
                    until: body.req("until")?,
                    open_ms: body.req("open_ms")?,
                    since: body.or_default("since")?,
                }),
                "half-open" => Ok(Breaker::HalfOpen {
                    open_ms: body.req("open_ms")?,
                    since: body.or_default("since")?,
                }),
                other => Err(JsonError::new(format!("unknown variant `{other}`"))),
            }
        };
        read().map_err(|e| e.under(state))
    }
}

impl ToJson for CopyMeta {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("client", &self.client)
            .field("nextSeq", &self.next_seq)
            .field("pending", &self.pending)
            .end_object();
    }
}

impl FromJson for CopyMeta {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(CopyMeta {
            client: node.req("client")?,
            next_seq: node.req("nextSeq")?,
            pending: node.req("pending")?,
        })
    }
}

impl ToJson for CopiedOp {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("op", &self.op)
            .field("key", &self.key)
            .end_object();
    }
}

impl FromJson for CopiedOp {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(CopiedOp {
            op: node.req("op")?,
            key: node.opt("key")?,
        })
    }
}

impl ToJson for Incident {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object()
            .field("code", &self.code)
            .field("at", &self.at)
            .field("recovered", &self.recovered)
            .field("lost", &self.lost)
            .end_object();
    }
}

impl FromJson for Incident {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(Incident {
            code: node.req("code")?,
            at: node.req("at")?,
            recovered: node.req("recovered")?,
            lost: node.req("lost")?,
        })
    }
}

/// Writes `json` as it is if it is JSON, else `null`: a server's state came from a parsed
/// response, but a value that is not JSON must not break the text around it.
fn raw_or_null(out: &mut Writer, json: Option<&str>) {
    match json.filter(|text| json::is_valid(text)) {
        Some(text) => out.raw(text),
        None => out.null(),
    };
}

impl ToJson for Event {
    fn write_json(&self, out: &mut Writer) {
        out.begin_object().field("type", self.name());
        match self {
            Event::Delivered {
                id,
                entity,
                kind,
                version,
                duplicate,
            } => {
                out.field("id", id)
                    .field("entity", entity)
                    .field("kind", kind)
                    .field("version", version)
                    .field("duplicate", duplicate);
            }
            Event::RetryScheduled {
                id,
                entity,
                attempt,
                delay_ms,
                error,
            } => {
                out.field("id", id)
                    .field("entity", entity)
                    .field("attempt", attempt)
                    .field("delayMs", delay_ms)
                    .field("error", error);
            }
            Event::DeadLettered {
                id,
                entity,
                kind,
                reason,
            } => {
                out.field("id", id)
                    .field("entity", entity)
                    .field("kind", kind)
                    .field("reason", reason);
            }
            Event::Conflict {
                id,
                entity,
                kind,
                resolution,
                server_version,
                server_state,
                state_omitted,
                rebased_as,
            } => {
                out.field("id", id)
                    .field("entity", entity)
                    .field("kind", kind)
                    .field("resolution", resolution)
                    .field("serverVersion", server_version)
                    .key("serverState");
                raw_or_null(out, server_state.as_deref());
                out.field("stateOmitted", state_omitted)
                    .field("rebasedAs", rebased_as);
            }
            Event::BreakerOpened { until } => {
                out.field("until", until);
            }
            Event::QueueFull { limit, max } => {
                out.field("limit", limit).field("max", max);
            }
            Event::AuthRequired | Event::BreakerClosed | Event::Drained => {}
        }
        out.end_object();
    }
}

impl FromJson for Backoff {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let mut backoff = Backoff::default();
        node.fields(|name, value| {
            match name {
                "strategy" => backoff.strategy = FromJson::read_json(value)?,
                "baseMs" => backoff.base_ms = value.u64()?,
                "factor" => backoff.factor = value.f64()?,
                "capMs" => backoff.cap_ms = value.u64()?,
                "jitter" => backoff.jitter = value.f64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(backoff)
    }
}

impl FromJson for RetryLimits {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.fields(|name, _| Ok(matches!(name, "maxAttempts" | "maxAgeMs")))?;
        Ok(RetryLimits {
            max_attempts: node.req("maxAttempts")?,
            max_age_ms: node.req("maxAgeMs")?,
        })
    }
}

impl FromJson for BatchConfig {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let mut batch = BatchConfig::default();
        node.fields(|name, value| {
            match name {
                "maxOps" => batch.max_ops = value.usize()?,
                "maxBytes" => batch.max_bytes = value.u64()?,
                "mode" => batch.mode = FromJson::read_json(value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(batch)
    }
}

impl FromJson for Limits {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let mut limits = Limits::default();
        node.fields(|name, value| {
            match name {
                "maxPending" => limits.max_pending = value.u64()?,
                "maxBytes" => limits.max_bytes = value.u64()?,
                "maxOpBytes" => limits.max_op_bytes = value.u64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(limits)
    }
}

impl FromJson for BreakerConfig {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let mut breaker = BreakerConfig::default();
        node.fields(|name, value| {
            match name {
                "window" => breaker.window = value.u32()?,
                "minCalls" => breaker.min_calls = value.u32()?,
                "failureRate" => breaker.failure_rate = value.f64()?,
                "openMs" => breaker.open_ms = value.u64()?,
                "maxOpenMs" => breaker.max_open_ms = value.u64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(breaker)
    }
}

impl FromJson for KindPolicy {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.fields(|name, _| Ok(matches!(name, "conflict" | "coalesce")))?;
        Ok(KindPolicy {
            conflict: node.req("conflict")?,
            coalesce: node.or_default("coalesce")?,
        })
    }
}

impl FromJson for Config {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let mut config = Config::default();
        node.fields(|name, value| {
            match name {
                "backoff" => config.backoff = FromJson::read_json(value)?,
                "user" => config.user = FromJson::read_json(value)?,
                "background" => config.background = FromJson::read_json(value)?,
                "maxRetryAfterMs" => config.max_retry_after_ms = value.u64()?,
                "requestTimeoutMs" => config.request_timeout_ms = value.u64()?,
                "maxInFlight" => config.max_in_flight = value.usize()?,
                "batch" => config.batch = FromJson::read_json(value)?,
                "limits" => config.limits = FromJson::read_json(value)?,
                "breaker" => config.breaker = FromJson::read_json(value)?,
                "defaultConflict" => config.default_conflict = FromJson::read_json(value)?,
                "kinds" => {
                    let mut kinds = BTreeMap::new();
                    for (kind, policy) in value.object()? {
                        let policy = KindPolicy::read_json(policy).map_err(|e| e.under(kind))?;
                        kinds.insert(kind.to_string(), policy);
                    }
                    config.kinds = kinds;
                }
                "keyRetentionMs" => config.key_retention_ms = value.u64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(config)
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use proptest::prelude::{Just, any, prop, prop_assert_eq, prop_compose, prop_oneof, proptest};
    use proptest::strategy::BoxedStrategy;
    use proptest::strategy::Strategy as _;
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    /// Our text means what serde's means, and each side reads the other's.
    fn agrees_with_serde<T>(value: &T)
    where
        T: ToJson + FromJson + Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let ours = value.to_json();
        let theirs = serde_json::to_string(value).unwrap();
        let ours_parsed: serde_json::Value = serde_json::from_str(&ours).unwrap();
        let theirs_parsed: serde_json::Value = serde_json::from_str(&theirs).unwrap();
        assert_eq!(ours_parsed, theirs_parsed, "ours: {ours}\ntheirs: {theirs}");
        assert_eq!(&T::from_json(&theirs).unwrap(), value, "reading {theirs}");
        assert_eq!(&serde_json::from_str::<T>(&ours).unwrap(), value);
    }

    fn text() -> BoxedStrategy<String> {
        // Quotes, escapes, control characters, non-ASCII and astral characters.
        prop::string::string_regex("[a-z\"\\\\\u{0}-\u{1f}\u{7f}é☃😀/ ]{0,12}")
            .unwrap()
            .boxed()
    }

    fn payload() -> BoxedStrategy<String> {
        prop_oneof![
            Just("null".to_owned()),
            Just(r#"{"text":"hi ☃","n":[1,2.5e3,-0]}"#.to_owned()),
            text().prop_map(|t| serde_json::to_string(&t).unwrap()),
        ]
        .boxed()
    }

    prop_compose! {
        fn any_op()(
            id in any::<[u8; 16]>(), seq in any::<u64>(), prev in any::<u64>(),
            entity in proptest::option::of(text()), kind in text(), payload in payload(),
            base_version in proptest::option::of(any::<u64>()), background in any::<bool>(),
            created_at in any::<u64>(), attempts in any::<u32>(), failures in any::<u32>(),
            next_attempt_at in proptest::option::of(any::<u64>()),
            last_error in proptest::option::of(text()), solo in any::<bool>(),
            last_delay_ms in proptest::option::of(any::<u64>()),
        ) -> Op {
            Op {
                id: OpId::from_random_bytes(id), seq, prev, entity, kind, payload, base_version,
                priority: if background { Priority::Background } else { Priority::User },
                created_at, attempts, failures, next_attempt_at, last_error, solo, last_delay_ms,
            }
        }
    }

    prop_compose! {
        fn any_key()(
            key in text(), fingerprint in any::<u64>(), at in any::<u64>(),
            receipt in proptest::option::of((any::<[u8; 16]>(), any::<u64>(),
                proptest::option::of(any::<[u8; 16]>()), any::<bool>())),
        ) -> KeyRecord {
            KeyRecord {
                key, fingerprint, at,
                receipt: receipt.map(|(id, seq, replaced, replayed)| Receipt {
                    id: OpId::from_random_bytes(id),
                    seq,
                    replaced: replaced.map(OpId::from_random_bytes),
                    replayed,
                }),
            }
        }
    }

    proptest! {
        #[test]
        fn stored_records_agree_with_serde(
            op in any_op(), key in proptest::option::of(any_key()), reason in text(),
            status in proptest::option::of(any::<u16>()), cause in 0usize..4, at in any::<u64>(),
            state in proptest::option::of(payload()), version in proptest::option::of(any::<u64>()),
        ) {
            agrees_with_serde(&op);
            let causes = [DeadCause::Rejected, DeadCause::Exhausted, DeadCause::Expired,
                DeadCause::Ambiguous];
            agrees_with_serde(&DeadLetter { op: op.clone(), reason, status, cause: causes[cause], at });
            agrees_with_serde(&ParkedConflict {
                op: op.clone(), server_version: version, server_state: state, at,
                server_state_omitted: status.is_some(),
            });
            if let Some(key) = &key {
                agrees_with_serde(key);
            }
            agrees_with_serde(&CopiedOp { op, key });
        }

        #[test]
        fn small_records_agree_with_serde(
            a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), calls in any::<u32>(),
            id in any::<[u8; 16]>(), lost in any::<bool>(),
        ) {
            agrees_with_serde(&Counters { next_seq: a, pending: b, bytes: c });
            agrees_with_serde(&CopyMeta { client: OpId::from_random_bytes(id), next_seq: a, pending: b });
            agrees_with_serde(&Incident {
                code: if lost { IncidentCode::StorageLost } else { IncidentCode::StorageRecovered },
                at: a, recovered: b, lost: c,
            });
            agrees_with_serde(&Breaker::Closed { failures: a, calls });
            agrees_with_serde(&Breaker::Open { until: a, open_ms: b, since: c });
            agrees_with_serde(&Breaker::HalfOpen { open_ms: b, since: c });
            agrees_with_serde(&OpId::from_random_bytes(id));
        }

        #[test]
        fn any_text_is_written_as_the_json_string_serde_writes(s in any::<String>()) {
            let mut out = Writer::new();
            out.str(&s);
            let ours = out.finish();
            prop_assert_eq!(serde_json::from_str::<String>(&ours).unwrap(), s.clone());
            let theirs = serde_json::to_string(&s).unwrap();
            let node = json::parse(&theirs).unwrap();
            prop_assert_eq!(node.str().unwrap(), s.as_str());
        }
    }

    #[test]
    fn records_of_the_previous_build_without_the_newer_fields_still_read() {
        let op = r#"{"id":"00000000-0000-4000-8000-000000000000","seq":1,"prev":0,"entity":null,
            "kind":"k","payload":"{}","base_version":null,"priority":"user","created_at":5,
            "attempts":0,"failures":0,"next_attempt_at":0,"last_error":null,"solo":false,
            "a_field_from_the_future":[1]}"#;
        let read = Op::from_json(op).unwrap();
        assert_eq!(read.last_delay_ms, None);
        assert_eq!(read, serde_json::from_str::<Op>(op).unwrap());
        let open = r#"{"open":{"until":9,"open_ms":3}}"#;
        assert_eq!(
            Breaker::from_json(open).unwrap(),
            Breaker::Open {
                until: 9,
                open_ms: 3,
                since: 0
            }
        );
        let receipt = r#"{"id":"00000000-0000-4000-8000-000000000000","seq":1,"replaced":null}"#;
        assert!(!Receipt::from_json(receipt).unwrap().replayed);
    }

    #[test]
    fn a_broken_record_is_an_error_that_names_the_field() {
        let error = Op::from_json(r#"{"id":"nope"}"#).unwrap_err();
        assert_eq!(error.path, "id", "{error}");
        let error = DeadLetter::from_json(
            r#"{"op":{"id":"00000000-0000-4000-8000-000000000000","seq":-1}}"#,
        )
        .unwrap_err();
        assert_eq!(error.path, "op.seq", "{error}");
        assert!(Breaker::from_json(r#"{"closed":{"failures":1,"calls":1},"open":{}}"#).is_err());
        assert!(Breaker::from_json(r#"{"ajar":{}}"#).is_err());
        assert!(Counters::from_json("[1,2,3]").is_err());
    }

    #[test]
    fn options_read_as_serde_reads_them_defaults_and_all() {
        let cases = [
            "{}",
            r#"{"backoff":{"baseMs":5,"factor":1.5,"strategy":"full"},"user":{"maxAttempts":3,"maxAgeMs":10}}"#,
            r#"{"batch":{"mode":"single"},"limits":{"maxOpBytes":10},"maxInFlight":4}"#,
            r#"{"breaker":{"failureRate":0.25,"window":10,"minCalls":2,"openMs":1,"maxOpenMs":9}}"#,
            r#"{"kinds":{"approve":{"conflict":"manual"},"title":{"conflict":"client-wins","coalesce":true}},
                "defaultConflict":"server-wins","keyRetentionMs":1000,"maxRetryAfterMs":7,"requestTimeoutMs":8,
                "background":{"maxAttempts":1,"maxAgeMs":2}}"#,
        ];
        for case in cases {
            let theirs: Config = serde_json::from_str(case).unwrap();
            assert_eq!(Config::from_json(case).unwrap(), theirs, "{case}");
        }
    }

    #[test]
    fn options_refuse_what_serde_refuses() {
        let cases = [
            (r#"{"bogus":1}"#, ""),
            (r#"{"backoff":{"baseMS":5}}"#, "backoff"),
            (r#"{"user":{"maxAttempts":3}}"#, "user"),
            (r#"{"user":{"maxAttempts":3,"maxAgeMs":1,"x":0}}"#, "user"),
            (
                r#"{"kinds":{"approve":{"conflict":"sometimes"}}}"#,
                "kinds.approve.conflict",
            ),
            (r#"{"kinds":{"approve":{}}}"#, "kinds.approve"),
            (r#"{"maxInFlight":-1}"#, "maxInFlight"),
            (r#"{"maxInFlight":1.5}"#, "maxInFlight"),
            (r#"{"batch":null}"#, "batch"),
            (
                r#"{"breaker":{"failureRate":"half"}}"#,
                "breaker.failureRate",
            ),
            (
                r#"{"limits":{"maxPending":1},"limits":{"maxPending":2}}"#,
                "",
            ),
        ];
        for (case, path) in cases {
            assert!(
                serde_json::from_str::<Config>(case).is_err(),
                "serde took {case}"
            );
            let error = Config::from_json(case).unwrap_err();
            assert_eq!(error.path, path, "{case}: {error}");
        }
        // Stricter than serde, which takes a struct's fields from an array too.
        assert!(Config::from_json("[]").is_err());
    }

    fn conflict_of(id: OpId) -> Event {
        Event::Conflict {
            id,
            entity: Some("pr/1".into()),
            kind: "approve".into(),
            resolution: ConflictOutcome::Rebased,
            server_version: Some(4),
            server_state: Some(r#"{"title":"x"}"#.into()),
            state_omitted: false,
            rebased_as: Some(id),
        }
    }

    #[test]
    fn events_carry_a_type_tag_camel_case_fields_and_the_raw_state() {
        let id = OpId::from_random_bytes([1; 16]);
        let conflict = conflict_of(id);
        let value: serde_json::Value = serde_json::from_str(&conflict.to_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "type": "conflict", "id": id.to_string(), "entity": "pr/1", "kind": "approve",
                "resolution": "rebased", "serverVersion": 4, "serverState": {"title": "x"},
                "stateOmitted": false, "rebasedAs": id.to_string(),
            })
        );
        let Event::Conflict {
            id,
            entity,
            kind,
            resolution,
            server_version,
            state_omitted,
            rebased_as,
            ..
        } = conflict
        else {
            unreachable!()
        };
        let broken = Event::Conflict {
            id,
            entity,
            kind,
            resolution,
            server_version,
            rebased_as,
            state_omitted,
            server_state: Some("{not json".into()),
        };
        let value: serde_json::Value = serde_json::from_str(&broken.to_json()).unwrap();
        assert_eq!(value["serverState"], serde_json::Value::Null);
        let retry = Event::RetryScheduled {
            id,
            entity: None,
            attempt: 2,
            delay_ms: 150,
            error: "HTTP 503".into(),
        };
        let value: serde_json::Value = serde_json::from_str(&retry.to_json()).unwrap();
        assert_eq!(value["delayMs"], 150);
        assert_eq!(value["entity"], serde_json::Value::Null);
        for event in [
            Event::AuthRequired,
            Event::BreakerClosed,
            Event::Drained,
            Event::BreakerOpened { until: 5 },
            Event::QueueFull {
                limit: "maxPending".into(),
                max: 3,
            },
            Event::Delivered {
                id,
                entity: None,
                kind: "k".into(),
                version: Some(1),
                duplicate: true,
            },
            Event::DeadLettered {
                id,
                entity: Some("e".into()),
                kind: "k".into(),
                reason: "r".into(),
            },
            retry,
            conflict_of(id),
        ] {
            let ours: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
            assert_eq!(ours, serde_json::to_value(&event).unwrap(), "{event:?}");
        }
    }
}
