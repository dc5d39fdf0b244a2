//! The wire format of docs/PROTOCOL.md: request bodies out, response bodies in.
//!
//! This is pure text handling, so it lives in the core where the model test's simulated server
//! speaks exactly the bytes the browser sends. Request bodies are written by hand: the payload is
//! already JSON text and is copied in without being parsed again.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::op::{Op, OpId};

/// The client's id: a random UUID kept in the store, the same type as an op id.
pub type ClientId = OpId;

/// Writes the `{"client", "ops"}` envelope that `/v1/ops`, `/v1/op`, `/v1/grants` and
/// `/v1/beacon` accept. It never carries a credential: a beacon is authorised by a grant in its
/// URL (see [`decode_grant`]).
pub fn encode_request<'a>(client: ClientId, ops: impl IntoIterator<Item = &'a Op>) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"client\":\"");
    out.push_str(&client.to_string());
    out.push_str("\",\"ops\":[");
    for (i, op) in ops.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        encode_op(&mut out, op);
    }
    out.push_str("]}");
    out
}

fn encode_op(out: &mut String, op: &Op) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{{\"id\":\"{}\",\"seq\":{},\"prev\":{},\"entity\":",
        op.id, op.seq, op.prev
    );
    match &op.entity {
        Some(entity) => push_json_string(out, entity),
        None => out.push_str("null"),
    }
    out.push_str(",\"kind\":");
    push_json_string(out, &op.kind);
    out.push_str(",\"payload\":");
    out.push_str(&op.payload);
    if let Some(version) = op.base_version {
        let _ = write!(out, ",\"base_version\":{version}");
    }
    let _ = write!(out, ",\"created_at\":{}}}", op.created_at);
}

fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).expect("a str always serialises"));
}

/// The server's verdict on one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// The op took effect now.
    Applied,
    /// An earlier copy took effect.
    Duplicate,
    /// The op's `base_version` is stale.
    Conflict,
    /// The op is invalid and never will be valid.
    Rejected,
    /// A predecessor has not arrived yet.
    OutOfOrder,
    /// A status this client does not know, treated as a server fault.
    #[serde(other)]
    Unknown,
}

/// One entry of a `results` array, or the body of a `200` from `/v1/op`.
#[derive(Debug, Clone, Deserialize)]
pub struct OpResult {
    /// Which op this is about.
    pub id: OpId,
    /// The verdict.
    pub status: ResultStatus,
    /// The entity version after the op, or the current one for conflicts and duplicates.
    #[serde(default)]
    pub version: Option<u64>,
    /// The entity's current state, for conflicts, as JSON text.
    #[serde(default)]
    pub state: Option<Box<RawValue>>,
    /// Why the op was rejected.
    #[serde(default)]
    pub reason: Option<String>,
    /// The server's last applied `seq`, for `out_of_order`.
    #[serde(default)]
    pub last: Option<u64>,
    /// Whether this is a stored result replayed for a repeated id.
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Deserialize)]
struct ResultsBody {
    results: Vec<OpResult>,
}

/// Reads a batch response and checks that it answers exactly the ops that were sent, in order.
pub fn decode_results(body: &str, sent: &[Op]) -> Result<Vec<OpResult>, String> {
    let parsed: ResultsBody =
        serde_json::from_str(body).map_err(|e| format!("unreadable results: {e}"))?;
    if parsed.results.len() != sent.len() {
        return Err(format!(
            "{} results for {} ops",
            parsed.results.len(),
            sent.len()
        ));
    }
    for (result, op) in parsed.results.iter().zip(sent) {
        if result.id != op.id {
            return Err(format!("result for {} where {} was sent", result.id, op.id));
        }
    }
    Ok(parsed.results)
}

/// Reads the single result of a `2xx` from `/v1/op`.
pub fn decode_single(body: &str, sent: &Op) -> Result<OpResult, String> {
    let result: OpResult =
        serde_json::from_str(body).map_err(|e| format!("unreadable result: {e}"))?;
    if result.id != sent.id {
        return Err(format!(
            "result for {} where {} was sent",
            result.id, sent.id
        ));
    }
    Ok(result)
}

/// The answer of `POST /v1/grants`: a credential that authorises one beacon of exactly the ops
/// it was asked for, until `expires_at`. It is worthless for anything else, so a closing page
/// may hold it where the user's token must never go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Grant {
    /// The opaque grant, URL-safe; it travels as `/v1/beacon?grant=…`.
    pub grant: String,
    /// When the server stops accepting it, ms since the epoch.
    pub expires_at: u64,
}

/// Reads a `200` answer of `POST /v1/grants`. The grant must be URL-safe, since it goes into a
/// query string as it is.
pub fn decode_grant(body: &str) -> Result<Grant, String> {
    let grant: Grant = serde_json::from_str(body).map_err(|e| format!("unreadable grant: {e}"))?;
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
    if grant.grant.is_empty() || grant.grant.len() > 4096 || !grant.grant.bytes().all(url_safe) {
        return Err("the grant is not a URL-safe string of at most 4096 characters".into());
    }
    Ok(grant)
}

/// An RFC 9457 problem body, with the protocol's extension members.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Problem {
    /// The problem type URI; the protocol's types end in `/in-progress`, `/conflict`, ….
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// A short summary.
    #[serde(default)]
    pub title: Option<String>,
    /// What went wrong with this request.
    #[serde(default)]
    pub detail: Option<String>,
    /// For conflicts: the current version.
    #[serde(default)]
    pub version: Option<u64>,
    /// For conflicts: the current state.
    #[serde(default)]
    pub state: Option<Box<RawValue>>,
    /// For rejections: why.
    #[serde(default)]
    pub reason: Option<String>,
    /// For `425 out-of-order`: the last `seq` the server applied on the entity.
    #[serde(default)]
    pub last: Option<u64>,
}

impl Problem {
    /// Reads a problem body; anything unreadable is an empty problem, since the status code alone
    /// still decides the class.
    pub fn decode(body: &str) -> Problem {
        serde_json::from_str(body).unwrap_or_default()
    }

    /// The last path segment of the type URI, such as `in-progress`.
    pub fn type_name(&self) -> Option<&str> {
        self.kind
            .as_deref()
            .map(|t| t.rsplit('/').next().unwrap_or(t))
    }

    /// The most specific human-readable explanation available.
    pub fn explanation(&self) -> Option<&str> {
        self.reason
            .as_deref()
            .or(self.detail.as_deref())
            .or(self.title.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::op::Priority;

    fn op(seq: u64, entity: Option<&str>) -> Op {
        Op {
            id: OpId::from_random_bytes([seq as u8; 16]),
            seq,
            prev: seq - 1,
            entity: entity.map(str::to_owned),
            kind: "comment \"quoted\"".into(),
            payload: r#"{"text":"hi ☃"}"#.into(),
            base_version: Some(3),
            priority: Priority::User,
            created_at: 1_700_000_000_000,
            attempts: 0,
            failures: 0,
            next_attempt_at: Some(0),
            last_error: None,
            solo: false,
            last_delay_ms: None,
        }
    }

    #[test]
    fn request_body_is_valid_json_with_the_payload_embedded_raw() {
        let client = OpId::from_random_bytes([9; 16]);
        let ops = [op(1, Some("pr/1")), op(2, None)];
        let body = encode_request(client, &ops);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["client"], client.to_string());
        assert!(
            value.get("access_token").is_none(),
            "no credential in a body"
        );
        assert_eq!(value["ops"][0]["payload"]["text"], "hi ☃");
        assert_eq!(value["ops"][0]["kind"], "comment \"quoted\"");
        assert_eq!(value["ops"][0]["base_version"], 3);
        assert_eq!(value["ops"][1]["entity"], serde_json::Value::Null);
        assert_eq!(value["ops"][1]["id"], ops[1].id.to_string());
        assert!(body.len() as u64 <= ops.iter().map(Op::size).sum::<u64>() + 128);
    }

    #[test]
    fn results_must_answer_the_sent_ops_in_order() {
        let ops = [op(1, None), op(2, None)];
        let good = format!(
            r#"{{"results":[{{"id":"{}","status":"applied","version":1}},
                {{"id":"{}","status":"conflict","version":4,"state":{{"a":1}}}}]}}"#,
            ops[0].id, ops[1].id
        );
        let results = decode_results(&good, &ops).unwrap();
        assert_eq!(results[1].status, ResultStatus::Conflict);
        assert_eq!(results[1].state.as_ref().unwrap().get(), r#"{"a":1}"#);
        let swapped = format!(
            r#"{{"results":[{{"id":"{}","status":"applied"}},{{"id":"{}","status":"applied"}}]}}"#,
            ops[1].id, ops[0].id
        );
        assert!(decode_results(&swapped, &ops).is_err());
        assert!(decode_results(r#"{"results":[]}"#, &ops).is_err());
        assert!(decode_results("<html>", &ops).is_err());
    }

    #[test]
    fn unknown_result_status_is_read_as_unknown() {
        let sent = op(1, None);
        let body = format!(r#"{{"id":"{}","status":"teleported"}}"#, sent.id);
        assert_eq!(
            decode_single(&body, &sent).unwrap().status,
            ResultStatus::Unknown
        );
    }

    #[test]
    fn a_grant_must_be_url_safe() {
        let grant = decode_grant(r#"{"grant":"eyJ2IjoxfQ.c2ln-_","expires_at":5}"#).unwrap();
        assert_eq!(
            (grant.grant.as_str(), grant.expires_at),
            ("eyJ2IjoxfQ.c2ln-_", 5)
        );
        for bad in [
            r#"{"grant":"a b","expires_at":5}"#,
            r#"{"grant":"a&b=c","expires_at":5}"#,
            r#"{"grant":"","expires_at":5}"#,
            r#"{"grant":"ok"}"#,
            "<html>",
        ] {
            assert!(decode_grant(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn problem_type_name_is_the_last_path_segment() {
        let problem =
            Problem::decode(r#"{"type":"https://outbox.dev/problems/in-progress","status":409}"#);
        assert_eq!(problem.type_name(), Some("in-progress"));
        assert_eq!(Problem::decode("not json").type_name(), None);
    }
}
