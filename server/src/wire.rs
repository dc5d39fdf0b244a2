//! The request envelope of `/v1/ops`, `/v1/op` and `/v1/beacon`, parsed and checked by hand so
//! that every fault in it becomes a precise `400` (with a JSON pointer) instead of a panic or a
//! generic deserializer message.
//!
//! The line between `400` and a per-op `rejected` result: what cannot be understood or stored
//! (not JSON, a wrong type, a missing field, an id that is not a UUID, a string past its size
//! limit, an empty or oversized batch) is a `400` for the whole request; an op that is well
//! formed but breaks a value rule (seq or prev out of range, an empty entity or kind, a payload
//! that is not an object, a negative base_version) is stored as `rejected`.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Most ops one request may carry.
pub const MAX_OPS: usize = 500;
/// Longest `entity`, in characters.
pub const MAX_ENTITY_CHARS: usize = 256;
/// Longest `kind`, in characters.
pub const MAX_KIND_CHARS: usize = 64;
/// `seq` must be below 2^53 so that JavaScript numbers carry it exactly.
pub const SEQ_LIMIT: i64 = 1 << 53;
/// Longest `access_token` accepted in a beacon body.
pub const MAX_TOKEN_CHARS: usize = 4096;

/// A parsed request body.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The client id (a canonical lowercase UUID).
    pub client: String,
    /// The ops, in request order.
    pub ops: Vec<Op>,
    /// The bearer token carried in the body (beacons cannot set headers).
    pub access_token: Option<String>,
    /// SHA-256 of the canonical form of `{client, ops}`, for Idempotency-Key checks; only
    /// computed when asked for (it costs a pass over the whole body).
    pub fingerprint: Option<[u8; 32]>,
}

/// One op as it came over the wire.
#[derive(Debug, Clone)]
pub struct Op {
    /// The op id, its idempotency key.
    pub id: String,
    /// The client's counter.
    pub seq: i64,
    /// The seq of the previous pending op on the same entity, or 0.
    pub prev: i64,
    /// The entity the op changes; `None` for unordered ops.
    pub entity: Option<String>,
    /// What the user did.
    pub kind: String,
    /// The change, merged into the entity state (RFC 7386).
    pub payload: Value,
    /// The entity version the op was made against, if it asks for the check.
    pub base_version: Option<i64>,
    /// When the user acted, ms since the epoch.
    pub created_at: i64,
    /// Set when the op is well formed but breaks a value rule: it is then `rejected`.
    pub invalid: Option<String>,
}

/// Why a body is not an envelope: the `detail` and `pointer` of the 400 problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// A JSON pointer to the offending value (`/ops/3/seq`), or `""` for the whole body.
    pub pointer: String,
    /// What is wrong, prefixed with a readable path (`ops[3].seq: expected an integer`).
    pub detail: String,
}

impl Malformed {
    fn at(path: &Path, what: impl std::fmt::Display) -> Self {
        Malformed {
            pointer: path.pointer(),
            detail: format!("{}: {what}", path.dotted()),
        }
    }
}

/// Where in the body a value sits, for messages.
#[derive(Clone)]
struct Path(Vec<Seg>);

#[derive(Clone)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

impl Path {
    fn root() -> Self {
        Path(Vec::new())
    }
    fn key(&self, key: &'static str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(key));
        p
    }
    fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    fn pointer(&self) -> String {
        self.0
            .iter()
            .map(|s| match s {
                Seg::Key(k) => format!("/{k}"),
                Seg::Index(i) => format!("/{i}"),
            })
            .collect()
    }
    fn dotted(&self) -> String {
        let mut out = String::new();
        for s in &self.0 {
            match s {
                Seg::Key(k) if out.is_empty() => out.push_str(k),
                Seg::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if out.is_empty() { "body".into() } else { out }
    }
}

/// Parses and checks a request body; `fingerprint` asks for [`Envelope::fingerprint`].
pub fn parse_envelope(body: &[u8], fingerprint: bool) -> Result<Envelope, Malformed> {
    let root = Path::root();
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Malformed::at(&root, format!("not valid JSON ({e})")))?;
    let Value::Object(mut obj) = value else {
        return Err(Malformed::at(&root, "expected a JSON object"));
    };
    let client = uuid_field(&obj, &root, "client")?;
    let access_token = match obj.remove("access_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_TOKEN_CHARS => Some(s),
        Some(Value::String(_)) => {
            return Err(Malformed::at(&root.key("access_token"), "too long"));
        }
        Some(_) => {
            return Err(Malformed::at(
                &root.key("access_token"),
                "expected a string",
            ));
        }
    };
    let ops_path = root.key("ops");
    let ops_value = obj
        .get("ops")
        .ok_or_else(|| Malformed::at(&ops_path, "missing"))?;
    let Value::Array(items) = ops_value else {
        return Err(Malformed::at(&ops_path, "expected an array of ops"));
    };
    if items.is_empty() || items.len() > MAX_OPS {
        return Err(Malformed::at(
            &ops_path,
            format!("expected 1 to {MAX_OPS} ops, got {}", items.len()),
        ));
    }
    let ops = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_op(item, &ops_path.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let fingerprint = fingerprint.then(|| {
        let mut canonical = Vec::with_capacity(body.len());
        write_canonical(
            &mut canonical,
            &Value::Object(Map::from_iter([
                ("client".to_owned(), Value::String(client.clone())),
                ("ops".to_owned(), ops_value.clone()),
            ])),
        );
        Sha256::digest(&canonical).into()
    });
    Ok(Envelope {
        client,
        ops,
        access_token,
        fingerprint,
    })
}

impl Op {
    /// SHA-256 of the op's canonical form: an object of exactly `id`, `seq`, `prev`, `entity`,
    /// `kind`, `payload`, `base_version` (`null` when absent) and `created_at`, written as the
    /// Idempotency-Key fingerprint writes JSON (members sorted, no white space). A beacon grant
    /// names its ops by this digest, so a grant for an op id covers that one body only.
    /// Unknown fields are ignored by the protocol, so they do not count here either.
    pub fn digest(&self) -> [u8; 32] {
        let value = Value::Object(Map::from_iter([
            ("base_version".to_owned(), self.base_version.into()),
            ("created_at".to_owned(), self.created_at.into()),
            ("entity".to_owned(), self.entity.clone().into()),
            ("id".to_owned(), self.id.clone().into()),
            ("kind".to_owned(), self.kind.clone().into()),
            ("payload".to_owned(), self.payload.clone()),
            ("prev".to_owned(), self.prev.into()),
            ("seq".to_owned(), self.seq.into()),
        ]));
        let mut canonical = Vec::new();
        write_canonical(&mut canonical, &value);
        Sha256::digest(&canonical).into()
    }
}

fn parse_op(item: &Value, path: &Path) -> Result<Op, Malformed> {
    let Value::Object(obj) = item else {
        return Err(Malformed::at(path, "expected an op object"));
    };
    let id = uuid_field(obj, path, "id")?;
    let seq = int_field(obj, path, "seq")?;
    let prev = int_field(obj, path, "prev")?;
    let entity = match obj.get("entity") {
        None => {
            return Err(Malformed::at(
                &path.key("entity"),
                "missing (use null for none)",
            ));
        }
        Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if s.chars().count() > MAX_ENTITY_CHARS {
                return Err(Malformed::at(
                    &path.key("entity"),
                    format!("longer than {MAX_ENTITY_CHARS} characters"),
                ));
            }
            Some(s.clone())
        }
        Some(_) => {
            return Err(Malformed::at(
                &path.key("entity"),
                "expected a string or null",
            ));
        }
    };
    let kind = match obj.get("kind") {
        None => return Err(Malformed::at(&path.key("kind"), "missing")),
        Some(Value::String(s)) => {
            if s.chars().count() > MAX_KIND_CHARS {
                return Err(Malformed::at(
                    &path.key("kind"),
                    format!("longer than {MAX_KIND_CHARS} characters"),
                ));
            }
            s.clone()
        }
        Some(_) => return Err(Malformed::at(&path.key("kind"), "expected a string")),
    };
    let payload = obj
        .get("payload")
        .cloned()
        .ok_or_else(|| Malformed::at(&path.key("payload"), "missing"))?;
    let base_version = match obj.get("base_version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(int_value(v, &path.key("base_version"))?),
    };
    let created_at = int_field(obj, path, "created_at")?;

    let invalid = if !(1..SEQ_LIMIT).contains(&seq) {
        Some("seq must be at least 1 and below 2^53".to_owned())
    } else if !(0..seq).contains(&prev) {
        Some("prev must be at least 0 and below seq".to_owned())
    } else if entity.as_deref() == Some("") {
        Some("entity must not be empty (use null for none)".to_owned())
    } else if kind.is_empty() {
        Some("kind must not be empty".to_owned())
    } else if base_version.is_some_and(|v| v < 0) {
        Some("base_version must not be negative".to_owned())
    } else if !payload.is_object() {
        Some("payload must be a JSON object".to_owned())
    } else {
        None
    };
    Ok(Op {
        id,
        seq,
        prev,
        entity,
        kind,
        payload,
        base_version,
        created_at,
        invalid,
    })
}

fn uuid_field(
    obj: &Map<String, Value>,
    path: &Path,
    key: &'static str,
) -> Result<String, Malformed> {
    let path = path.key(key);
    match obj.get(key) {
        None => Err(Malformed::at(&path, "missing")),
        Some(Value::String(s)) if is_canonical_uuid(s) => Ok(s.clone()),
        Some(Value::String(_)) => Err(Malformed::at(
            &path,
            "expected a UUID in canonical lowercase form (36 characters)",
        )),
        Some(_) => Err(Malformed::at(&path, "expected a UUID string")),
    }
}

fn int_field(obj: &Map<String, Value>, path: &Path, key: &'static str) -> Result<i64, Malformed> {
    let path = path.key(key);
    match obj.get(key) {
        None => Err(Malformed::at(&path, "missing")),
        Some(v) => int_value(v, &path),
    }
}

/// An integer of any size: those past i64 saturate, which every range rule then rejects.
fn int_value(v: &Value, path: &Path) -> Result<i64, Malformed> {
    let Value::Number(n) = v else {
        return Err(Malformed::at(path, "expected an integer"));
    };
    if let Some(i) = n.as_i64() {
        Ok(i)
    } else if n.as_u64().is_some() {
        Ok(i64::MAX)
    } else {
        Err(Malformed::at(path, "expected an integer"))
    }
}

/// `8-4-4-4-12` lowercase hex digits.
pub fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// Serializes with object members sorted by key, so that the fingerprint does not depend on
/// member order or whitespace (and not on serde_json's `preserve_order` feature either).
fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(out, v);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0b6f5a0e-3c1d-4c5e-9a43-6d3f1f0f2b7a";

    fn parse_envelope_test(body: &[u8]) -> Result<Envelope, Malformed> {
        parse_envelope(body, true)
    }

    fn op() -> Value {
        json!({"id": ID, "seq": 2, "prev": 1, "entity": "pr/17", "kind": "comment",
               "payload": {"a": 1}, "base_version": 6, "created_at": 1})
    }

    fn env(ops: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"client": ID, "ops": ops})).unwrap()
    }

    #[test]
    fn fingerprint_ignores_member_order_and_whitespace() {
        let a = parse_envelope_test(&env(json!([op()]))).unwrap();
        let reordered = format!(
            r#"{{ "ops": [{{"created_at":1,"payload":{{"a":1}},"kind":"comment","entity":"pr/17","prev":1,"seq":2,"base_version":6,"id":"{ID}"}}], "client": "{ID}" }}"#
        );
        let b = parse_envelope_test(reordered.as_bytes()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        let mut other = op();
        other["payload"] = json!({"a": 2});
        let c = parse_envelope_test(&env(json!([other]))).unwrap();
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[test]
    fn the_op_digest_covers_every_field_but_not_member_order() {
        let base = parse_envelope_test(&env(json!([op()]))).unwrap().ops[0].digest();
        let reordered = format!(
            r#"{{"client":"{ID}","ops":[{{"created_at":1,"payload":{{"a":1}},"kind":"comment","entity":"pr/17","prev":1,"seq":2,"base_version":6,"id":"{ID}","extra":true}}]}}"#
        );
        assert_eq!(
            parse_envelope_test(reordered.as_bytes()).unwrap().ops[0].digest(),
            base
        );
        for (field, value) in [
            ("id", json!("1b6f5a0e-3c1d-4c5e-9a43-6d3f1f0f2b7a")),
            ("seq", json!(3)),
            ("prev", json!(0)),
            ("entity", json!("pr/18")),
            ("kind", json!("approve")),
            ("payload", json!({"a": 2})),
            ("base_version", json!(7)),
            ("created_at", json!(2)),
        ] {
            let mut changed = op();
            changed[field] = value;
            let digest = parse_envelope_test(&env(json!([changed]))).unwrap().ops[0].digest();
            assert_ne!(digest, base, "{field} is not covered");
        }
        let mut absent = op();
        absent.as_object_mut().unwrap().remove("base_version");
        let mut explicit = op();
        explicit["base_version"] = Value::Null;
        assert_eq!(
            parse_envelope_test(&env(json!([absent]))).unwrap().ops[0].digest(),
            parse_envelope_test(&env(json!([explicit]))).unwrap().ops[0].digest()
        );
    }

    #[test]
    fn wrong_types_point_at_the_field() {
        let mut bad = op();
        bad["seq"] = json!("2");
        let err = parse_envelope_test(&env(json!([op(), bad]))).unwrap_err();
        assert_eq!(err.pointer, "/ops/1/seq");
        assert_eq!(err.detail, "ops[1].seq: expected an integer");
    }

    #[test]
    fn value_rules_mark_the_op_invalid_instead_of_failing_the_body() {
        let mut bad = op();
        bad["prev"] = json!(2);
        let parsed = parse_envelope_test(&env(json!([bad]))).unwrap();
        assert!(parsed.ops[0].invalid.is_some());
        let mut bad = op();
        bad["payload"] = json!([1]);
        let parsed = parse_envelope_test(&env(json!([bad]))).unwrap();
        assert_eq!(
            parsed.ops[0].invalid.as_deref(),
            Some("payload must be a JSON object")
        );
    }

    #[test]
    fn canonical_uuid_is_lowercase_36_chars() {
        assert!(is_canonical_uuid(ID));
        assert!(!is_canonical_uuid(&ID.to_uppercase()));
        assert!(!is_canonical_uuid(&ID.replace('-', "")));
    }
}
