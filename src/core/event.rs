//! What the outbox tells the application.

use serde::Serialize;

use super::op::OpId;
use super::time::Millis;

/// A notification for the application's UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
#[cfg_attr(target_arch = "wasm32", tsify(rename = "OutboxEvent"))]
#[serde(
    tag = "type",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Event {
    /// The server took the op (or had already taken an earlier copy).
    Delivered {
        /// The op.
        id: OpId,
        /// Its entity.
        entity: Option<String>,
        /// Its kind.
        kind: String,
        /// The entity version after it.
        version: Option<u64>,
        /// Whether an earlier copy (a beacon, a lost ack) had already taken effect.
        duplicate: bool,
    },
    /// An attempt failed and the op will be sent again after `delay_ms`.
    RetryScheduled {
        /// The op.
        id: OpId,
        /// Its entity.
        entity: Option<String>,
        /// Attempts made so far.
        attempt: u32,
        /// The wait before the next attempt.
        delay_ms: Millis,
        /// What went wrong.
        error: String,
    },
    /// Delivery gave up on the op; it is in the dead letters.
    DeadLettered {
        /// The op.
        id: OpId,
        /// Its entity.
        entity: Option<String>,
        /// Its kind.
        kind: String,
        /// Why.
        reason: String,
    },
    /// The server had a newer version of the op's entity.
    Conflict {
        /// The op.
        id: OpId,
        /// Its entity.
        entity: Option<String>,
        /// Its kind.
        kind: String,
        /// What the kind's policy did about it.
        resolution: ConflictOutcome,
        /// The server's version.
        server_version: Option<u64>,
        /// The server's state, so the UI can roll back or show both sides.
        // The serde derive is the native reference (see `codec`); serde_json stays out of the
        // browser module, which writes events with `codec`.
        #[cfg_attr(not(target_arch = "wasm32"), serde(serialize_with = "raw_json"))]
        #[cfg_attr(target_arch = "wasm32", tsify(type = "unknown"))]
        server_state: Option<String>,
        /// The server left its state out of the answer (it sends each entity's state once per
        /// answer, within a size budget, and never on a replay): `serverState` is `null`, and a
        /// UI that needs it reads the entity from the server.
        state_omitted: bool,
        /// For `rebased`: the id of the copy sent against the new version.
        rebased_as: Option<OpId>,
    },
    /// The server refused the credentials; delivery is paused until the auth hook gives new ones.
    AuthRequired,
    /// Too many requests failed; none will be sent until `until`, when a probe decides.
    BreakerOpened {
        /// When the probe goes out.
        until: Millis,
    },
    /// The probe succeeded and delivery resumed.
    BreakerClosed,
    /// An enqueue was refused because the queue is at a cap.
    QueueFull {
        /// Which cap.
        limit: String,
        /// Its value.
        max: u64,
    },
    /// Nothing is left to deliver.
    Drained,
}

/// What a conflict policy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum ConflictOutcome {
    /// `server-wins`: the op was dropped.
    ServerWins,
    /// `client-wins`: the op is sent again against the server's version.
    Rebased,
    /// `manual`: the op waits in the conflicts store.
    Parked,
}

impl Event {
    /// The event's name, as used by `on(name, callback)`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Delivered { .. } => "delivered",
            Event::RetryScheduled { .. } => "retry-scheduled",
            Event::DeadLettered { .. } => "dead-lettered",
            Event::Conflict { .. } => "conflict",
            Event::AuthRequired => "auth-required",
            Event::BreakerOpened { .. } => "breaker-opened",
            Event::BreakerClosed => "breaker-closed",
            Event::QueueFull { .. } => "queue-full",
            Event::Drained => "drained",
        }
    }

    /// The op the event is about, if it is about one.
    pub fn op_id(&self) -> Option<OpId> {
        match self {
            Event::Delivered { id, .. }
            | Event::RetryScheduled { id, .. }
            | Event::DeadLettered { id, .. }
            | Event::Conflict { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Every event name, for validating `on(name, …)`.
    pub const NAMES: [&'static str; 9] = [
        "delivered",
        "retry-scheduled",
        "dead-lettered",
        "conflict",
        "auth-required",
        "breaker-opened",
        "breaker-closed",
        "queue-full",
        "drained",
    ];
}

#[cfg(not(target_arch = "wasm32"))]
fn raw_json<S: serde::Serializer>(
    value: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value
        .as_deref()
        .map(|text| serde_json::value::RawValue::from_string(text.to_owned()))
    {
        Some(Ok(raw)) => raw.serialize(serializer),
        // The text came from a parsed response, so it is JSON; if not, say nothing rather than lie.
        Some(Err(_)) | None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_type_tag_camel_case_fields_and_raw_state() {
        let event = Event::Conflict {
            id: OpId::from_random_bytes([1; 16]),
            entity: Some("pr/1".into()),
            kind: "approve".into(),
            resolution: ConflictOutcome::Parked,
            server_version: Some(4),
            server_state: Some(r#"{"approved":false}"#.into()),
            state_omitted: false,
            rebased_as: None,
        };
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "conflict");
        assert_eq!(json["serverVersion"], 4);
        assert_eq!(json["serverState"]["approved"], false);
        assert_eq!(json["resolution"], "parked");
        assert_eq!(json["stateOmitted"], false);
        for event in [Event::Drained, Event::AuthRequired, Event::BreakerClosed] {
            assert!(Event::NAMES.contains(&event.name()));
            assert_eq!(serde_json::to_value(&event).unwrap()["type"], event.name());
        }
    }
}
