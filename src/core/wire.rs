//! The wire format of docs/PROTOCOL.md: request bodies out, response bodies in.
//!
//! This is pure text handling, so it lives in the core where the model test's simulated server
//! speaks exactly the bytes the browser sends. Request bodies are written by hand: the payload is
//! already JSON text and is copied in without being parsed again.

use super::json::{self, FromJson, JsonError, Node, Writer};
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
    let mut w = Writer::with_capacity(op.size() as usize);
    w.begin_object()
        .field("id", &op.id)
        .field("seq", &op.seq)
        .field("prev", &op.prev)
        .field("entity", &op.entity)
        .field("kind", &op.kind)
        .raw_field("payload", &op.payload);
    if let Some(version) = op.base_version {
        w.field("base_version", &version);
    }
    w.field("created_at", &op.created_at).end_object();
    out.push_str(&w.finish());
}

/// The server's verdict on one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    Unknown,
}

impl FromJson for ResultStatus {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(match node.str()? {
            "applied" => ResultStatus::Applied,
            "duplicate" => ResultStatus::Duplicate,
            "conflict" => ResultStatus::Conflict,
            "rejected" => ResultStatus::Rejected,
            "out_of_order" => ResultStatus::OutOfOrder,
            _ => ResultStatus::Unknown,
        })
    }
}

/// One entry of a `results` array, or the body of a `200` from `/v1/op`. Members the client
/// does not know are ignored, so the server may add some.
#[derive(Debug, Clone, PartialEq)]
pub struct OpResult {
    /// Which op this is about.
    pub id: OpId,
    /// The verdict.
    pub status: ResultStatus,
    /// The entity version after the op, or the current one for conflicts and duplicates.
    pub version: Option<u64>,
    /// The entity's current state, for conflicts, as JSON text.
    pub state: Option<String>,
    /// For conflicts: the server left the state out (an answer carries each entity's state at
    /// most once and within a size budget, and a replayed conflict never has it).
    pub state_omitted: bool,
    /// Why the op was rejected.
    pub reason: Option<String>,
    /// The server's last applied `seq`, for `out_of_order`.
    pub last: Option<u64>,
    /// Whether this is a stored result replayed for a repeated id.
    pub replayed: bool,
}

/// A member kept as the JSON text it was (a server's state), `None` when absent or `null`.
fn raw_member(node: &Node<'_>, name: &str) -> Result<Option<String>, JsonError> {
    node.object()?;
    Ok(node.get(name).map(|value| value.raw.to_owned()))
}

impl FromJson for OpResult {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(OpResult {
            id: node.req("id")?,
            status: node.req("status")?,
            version: node.opt("version")?,
            state: raw_member(node, "state")?,
            state_omitted: node.or_default("state_omitted")?,
            reason: node.opt("reason")?,
            last: node.opt("last")?,
            replayed: node.or_default("replayed")?,
        })
    }
}

/// Reads a batch response and checks that it answers exactly the ops that were sent, in order.
pub fn decode_results(body: &str, sent: &[Op]) -> Result<Vec<OpResult>, String> {
    let results: Vec<OpResult> = json::parse(body)
        .and_then(|node| node.req("results"))
        .map_err(|e| format!("unreadable results: {e}"))?;
    if results.len() != sent.len() {
        return Err(format!("{} results for {} ops", results.len(), sent.len()));
    }
    for (result, op) in results.iter().zip(sent) {
        if result.id != op.id {
            return Err(format!("result for {} where {} was sent", result.id, op.id));
        }
    }
    Ok(results)
}

/// Reads the single result of a `2xx` from `/v1/op`.
pub fn decode_single(body: &str, sent: &Op) -> Result<OpResult, String> {
    let result = OpResult::from_json(body).map_err(|e| format!("unreadable result: {e}"))?;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The opaque grant, URL-safe; it travels as `/v1/beacon?grant=…`.
    pub grant: String,
    /// When the server stops accepting it, ms since the epoch.
    pub expires_at: u64,
}

/// Reads a `200` answer of `POST /v1/grants`. The grant must be URL-safe, since it goes into a
/// query string as it is.
pub fn decode_grant(body: &str) -> Result<Grant, String> {
    let grant = json::parse(body)
        .and_then(|node| {
            Ok(Grant {
                grant: node.req("grant")?,
                expires_at: node.req("expires_at")?,
            })
        })
        .map_err(|e| format!("unreadable grant: {e}"))?;
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
    if grant.grant.is_empty() || grant.grant.len() > 4096 || !grant.grant.bytes().all(url_safe) {
        return Err("the grant is not a URL-safe string of at most 4096 characters".into());
    }
    Ok(grant)
}

/// An RFC 9457 problem body, with the protocol's extension members.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problem {
    /// The problem type URI; the protocol's types end in `/in-progress`, `/conflict`, ….
    pub kind: Option<String>,
    /// A short summary.
    pub title: Option<String>,
    /// What went wrong with this request.
    pub detail: Option<String>,
    /// For conflicts: the current version.
    pub version: Option<u64>,
    /// For conflicts: the current state, as JSON text.
    pub state: Option<String>,
    /// For conflicts: the server left the state out (always on a replay).
    pub state_omitted: bool,
    /// For rejections: why.
    pub reason: Option<String>,
    /// For `425 out-of-order`: the last `seq` the server applied on the entity.
    pub last: Option<u64>,
}

impl FromJson for Problem {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        Ok(Problem {
            kind: node.opt("type")?,
            title: node.opt("title")?,
            detail: node.opt("detail")?,
            version: node.opt("version")?,
            state: raw_member(node, "state")?,
            state_omitted: node.or_default("state_omitted")?,
            reason: node.opt("reason")?,
            last: node.opt("last")?,
        })
    }
}

impl Problem {
    /// Reads a problem body; anything unreadable is an empty problem, since the status code alone
    /// still decides the class.
    pub fn decode(body: &str) -> Problem {
        Problem::from_json(body).unwrap_or_default()
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
        assert_eq!(results[1].state.as_deref(), Some(r#"{"a":1}"#));
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
