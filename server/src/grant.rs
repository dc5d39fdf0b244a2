//! Beacon grants: a short-lived credential that lets a closing page send its last ops to
//! `/v1/beacon` without ever holding the user's bearer token.
//!
//! The background asks `POST /v1/grants` (with the token) for a grant that names the tenant,
//! the client, the SHA-256 digest of each op (so the grant cannot carry another body under a
//! granted op id) and an expiry; the page sends it in the beacon's query string. The server
//! keeps nothing: a grant is verified by its HMAC-SHA256 under the server's key alone, so any
//! instance that shares the key can check it.
//!
//! Wire form (URL-safe, no padding): `base64url(payload) "." base64url(mac)`, where
//!
//! ```text
//! payload = version (1 byte, 1)
//!           expires_at (8 bytes, big-endian ms since the Unix epoch)
//!           tenant length L (1 byte, 1..=255), tenant (L bytes, UTF-8)
//!           client (16 bytes, the UUID's raw bytes)
//!           n (1 byte, 1..=16), n × op digest (32 bytes each, SHA-256 of Op::digest's form)
//! mac     = HMAC-SHA256(key, "outbox-grant\0" || payload)   (32 bytes)
//! ```

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Most ops one grant covers.
pub const MAX_GRANT_OPS: usize = 16;
/// Fewest key bytes accepted.
pub const MIN_KEY_BYTES: usize = 32;

const VERSION: u8 = 1;
/// Binds the MAC to this use of the key.
const DOMAIN: &[u8] = b"outbox-grant\0";
const MAC_BYTES: usize = 32;

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The tenant whose token asked for it.
    pub tenant: String,
    /// The client id (a canonical lowercase UUID).
    pub client: String,
    /// The digests ([`crate::wire::Op::digest`]) of the ops it covers.
    pub digests: Vec<[u8; 32]>,
    /// When it stops being valid, ms since the epoch.
    pub expires_at: i64,
}

/// Why a grant is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// Not a grant of this server's key: unparseable, tampered with, or of another key.
    Invalid(&'static str),
    /// A genuine grant past its expiry.
    Expired {
        /// When it expired.
        expires_at: i64,
    },
}

/// The server's grant key.
pub struct GrantKey(Vec<u8>);

impl GrantKey {
    /// The bytes of `path`, which must hold at least [`MIN_KEY_BYTES`].
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("--grant-key-file {}: {e}", path.display()))?;
        Self::from_bytes(bytes).map_err(|e| format!("--grant-key-file {}: {e}", path.display()))
    }

    /// A key written in hex (white space around it ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if !text.len().is_multiple_of(2) {
            return Err("OUTBOX_GRANT_KEY: an odd number of hex digits".into());
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| "OUTBOX_GRANT_KEY: not hex".to_owned())?;
        Self::from_bytes(bytes).map_err(|e| format!("OUTBOX_GRANT_KEY: {e}"))
    }

    /// A random key for this process only.
    pub fn random() -> Result<Self, String> {
        let mut bytes = vec![0u8; MIN_KEY_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a grant key: {e}"))?;
        Ok(GrantKey(bytes))
    }

    fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "a grant key needs at least {MIN_KEY_BYTES} bytes, got {}",
                bytes.len()
            ));
        }
        Ok(GrantKey(bytes))
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(DOMAIN);
        mac.update(payload);
        mac
    }

    /// The wire form of `grant`. The caller keeps to the limits (1 to 16 digests, a tenant
    /// of 1 to 255 bytes, a canonical client UUID); past them `None`.
    pub fn issue(&self, grant: &Grant) -> Option<String> {
        let tenant = grant.tenant.as_bytes();
        if tenant.is_empty()
            || tenant.len() > 255
            || grant.digests.is_empty()
            || grant.digests.len() > MAX_GRANT_OPS
        {
            return None;
        }
        let client = uuid_bytes(&grant.client)?;
        let mut payload = Vec::with_capacity(27 + tenant.len() + 32 * grant.digests.len());
        payload.push(VERSION);
        payload.extend_from_slice(&(grant.expires_at.max(0) as u64).to_be_bytes());
        payload.push(tenant.len() as u8);
        payload.extend_from_slice(tenant);
        payload.extend_from_slice(&client);
        payload.push(grant.digests.len() as u8);
        for digest in &grant.digests {
            payload.extend_from_slice(digest);
        }
        let mac = self.mac(&payload).finalize().into_bytes();
        Some(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(mac)
        ))
    }

    /// Checks `text` at `now_ms`: the MAC first (in constant time), then the payload, then
    /// the expiry.
    pub fn verify(&self, text: &str, now_ms: i64) -> Result<Grant, GrantError> {
        let (payload, mac) = text
            .split_once('.')
            .ok_or(GrantError::Invalid("not two parts joined by `.`"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| GrantError::Invalid("the payload is not base64url"))?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| GrantError::Invalid("the MAC is not base64url"))?;
        if mac.len() != MAC_BYTES {
            return Err(GrantError::Invalid("the MAC has the wrong length"));
        }
        self.mac(&payload)
            .verify_slice(&mac)
            .map_err(|_| GrantError::Invalid("the MAC does not match"))?;
        let grant = parse(&payload).ok_or(GrantError::Invalid("unknown grant format"))?;
        if now_ms > grant.expires_at {
            return Err(GrantError::Expired {
                expires_at: grant.expires_at,
            });
        }
        Ok(grant)
    }
}

/// Reads an authenticated payload; `None` if it does not follow the layout exactly.
fn parse(payload: &[u8]) -> Option<Grant> {
    let mut rest = payload;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    if take(1)? != [VERSION] {
        return None;
    }
    let expires_at = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let tenant_len = take(1)?[0] as usize;
    let tenant = std::str::from_utf8(take(tenant_len)?).ok()?.to_owned();
    let client = uuid_string(take(16)?.try_into().ok()?);
    let n = take(1)?[0] as usize;
    if tenant.is_empty() || n == 0 || n > MAX_GRANT_OPS {
        return None;
    }
    let digests = (0..n)
        .map(|_| take(32).and_then(|d| d.try_into().ok()))
        .collect::<Option<Vec<[u8; 32]>>>()?;
    if !rest.is_empty() {
        return None;
    }
    Some(Grant {
        tenant,
        client,
        digests,
        expires_at: i64::try_from(expires_at).ok()?,
    })
}

/// The 16 bytes of a canonical UUID string.
fn uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    if !crate::wire::is_canonical_uuid(uuid) {
        return None;
    }
    let hex: Vec<u8> = uuid.bytes().filter(|b| *b != b'-').collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The canonical lowercase string of 16 UUID bytes.
fn uuid_string(bytes: [u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "0b6f5a0e-3c1d-4c5e-9a43-6d3f1f0f2b7a";

    fn key() -> GrantKey {
        GrantKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    fn grant() -> Grant {
        Grant {
            tenant: "acme".into(),
            client: CLIENT.into(),
            digests: vec![[7u8; 32], [9u8; 32]],
            expires_at: 1_000_000,
        }
    }

    #[test]
    fn a_grant_round_trips_and_is_url_safe() {
        let text = key().issue(&grant()).unwrap();
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{text}"
        );
        assert_eq!(key().verify(&text, 1_000_000), Ok(grant()));
        assert_eq!(
            key().verify(&text, 1_000_001),
            Err(GrantError::Expired {
                expires_at: 1_000_000
            })
        );
    }

    #[test]
    fn tampering_or_another_key_is_invalid() {
        let text = key().issue(&grant()).unwrap();
        let other = GrantKey::from_hex(&"cd".repeat(32)).unwrap();
        assert!(matches!(
            other.verify(&text, 0),
            Err(GrantError::Invalid(_))
        ));
        for i in 0..text.len() {
            if text.as_bytes()[i] == b'.' {
                continue;
            }
            let mut bytes = text.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert!(
                matches!(key().verify(&tampered, 0), Err(GrantError::Invalid(_))),
                "flipping byte {i} went unnoticed"
            );
        }
        for bad in ["", ".", "abc", "a.b.c", "!!.!!"] {
            assert!(matches!(key().verify(bad, 0), Err(GrantError::Invalid(_))));
        }
    }

    #[test]
    fn keys_need_32_bytes() {
        assert!(GrantKey::from_hex(&"ab".repeat(31)).is_err());
        assert!(GrantKey::from_hex("xyz").is_err());
        assert!(GrantKey::random().is_ok());
        assert_eq!(uuid_string(uuid_bytes(CLIENT).unwrap()), CLIENT);
    }
}
