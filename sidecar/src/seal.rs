//! Sealed per-tenant audit records: with `tenants.<name>.audit_key_file`, each of that
//! tenant's audit records is written as
//! `{"sealed":"aes-256-gcm","kid":"<key id>","nonce":"<base64>","ct":"<base64>"}`: AES-256-GCM
//! (ring) under the tenant's current key, a fresh random 96-bit nonce per record, the tenant's
//! name as associated data (a record moved into another tenant's file does not open there).
//!
//! Key file: one key a line, `<kid> <base64 of 32 bytes>`, `#` comments allowed. The first key
//! seals; every key listed opens, so a rotation puts the new key first and keeps the old ones
//! as long as their records are kept.

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::Path;

/// The `sealed` value of a sealed record.
pub const ALGORITHM: &str = "aes-256-gcm";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("cannot read the key file: {0}")]
    Read(String),
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no key in the file")]
    Empty,
    #[error("not a sealed record")]
    NotSealed,
    #[error("sealed with key id {0:?}, which this key file does not have")]
    UnknownKid(String),
    #[error("does not open with this tenant's key (another tenant's record, or altered)")]
    Open,
}

/// One tenant's audit keys.
pub struct SealKeys {
    /// The sealing key's id (the first in the file).
    current: String,
    keys: HashMap<String, LessSafeKey>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeys")
            .field("current", &self.current)
            .field("kids", &self.keys.len())
            .finish()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    sealed: String,
    kid: String,
    nonce: String,
    ct: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl SealKeys {
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let mut current = None;
        let mut keys = HashMap::new();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let line = i + 1;
            let err = |why: &str| SealError::Line {
                line,
                why: why.to_string(),
            };
            let (kid, key) = l
                .split_once(char::is_whitespace)
                .ok_or_else(|| err("expected `<kid> <base64 key>`"))?;
            let (kid, key) = (kid.trim(), key.trim());
            if kid.is_empty()
                || kid.len() > 64
                || !kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(err("key id must be 1-64 of [A-Za-z0-9._-]"));
            }
            let raw = b64()
                .decode(key)
                .map_err(|_| err("the key is not valid base64"))?;
            if raw.len() != 32 {
                return Err(err("the key must be 32 bytes (AES-256)"));
            }
            let k = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| err("bad key"))?;
            if keys.insert(kid.to_string(), LessSafeKey::new(k)).is_some() {
                return Err(err("duplicate key id"));
            }
            current.get_or_insert_with(|| kid.to_string());
        }
        Ok(Self {
            current: current.ok_or(SealError::Empty)?,
            keys,
        })
    }

    pub fn load(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path).map_err(|e| SealError::Read(e.to_string()))?;
        Self::parse(&text)
    }

    /// The sealed line (without newline) for `plain`, a record of `tenant`.
    pub fn seal(&self, tenant: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.get(&self.current)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(tenant.as_bytes()),
            &mut buf,
        )
        .ok()?;
        serde_json::to_vec(&Sealed {
            sealed: ALGORITHM.to_string(),
            kid: self.current.clone(),
            nonce: b64().encode(nonce),
            ct: b64().encode(&buf),
        })
        .ok()
    }

    /// The record inside a sealed line of `tenant`'s audit.
    pub fn open(&self, tenant: &str, line: &[u8]) -> Result<Vec<u8>, SealError> {
        let s: Sealed = serde_json::from_slice(line).map_err(|_| SealError::NotSealed)?;
        if s.sealed != ALGORITHM {
            return Err(SealError::NotSealed);
        }
        let key = self
            .keys
            .get(&s.kid)
            .ok_or_else(|| SealError::UnknownKid(s.kid.clone()))?;
        let nonce: [u8; NONCE_LEN] = b64()
            .decode(&s.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(SealError::Open)?;
        let mut ct = b64().decode(&s.ct).map_err(|_| SealError::Open)?;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(tenant.as_bytes()),
                &mut ct,
            )
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// Is this audit line sealed?
pub fn is_sealed(line: &[u8]) -> bool {
    line.starts_with(b"{\"sealed\":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: &str, byte: u8) -> String {
        format!("{kid} {}\n", b64().encode([byte; 32]))
    }

    #[test]
    fn round_trip_rotation_and_no_cross_tenant_opening() {
        let old = SealKeys::parse(&key("k1", 1)).unwrap();
        let rec = br#"{"tenant":"acme","route":"/v1/chat/completions"}"#;
        let sealed_old = old.seal("acme", rec).unwrap();
        assert!(is_sealed(&sealed_old));
        assert!(!String::from_utf8_lossy(&sealed_old).contains("chat"));
        // Rotation: the new key first, the old one kept for reading.
        let rotated =
            SealKeys::parse(&format!("# rotated\n{}{}", key("k2", 2), key("k1", 1))).unwrap();
        let sealed_new = rotated.seal("acme", rec).unwrap();
        assert!(String::from_utf8_lossy(&sealed_new).contains("\"kid\":\"k2\""));
        assert_eq!(rotated.open("acme", &sealed_old).unwrap(), rec);
        assert_eq!(rotated.open("acme", &sealed_new).unwrap(), rec);
        // The same record under another tenant's name, or with another tenant's key: nothing.
        assert_eq!(rotated.open("globex", &sealed_new), Err(SealError::Open));
        let globex = SealKeys::parse(&key("k2", 9)).unwrap();
        assert_eq!(globex.open("acme", &sealed_new), Err(SealError::Open));
        assert_eq!(
            globex.open("acme", &sealed_old),
            Err(SealError::UnknownKid("k1".into()))
        );
        // Two seals of one record differ (fresh nonces).
        assert_ne!(old.seal("acme", rec), old.seal("acme", rec));
    }

    #[test]
    fn bad_key_files_name_the_line() {
        assert_eq!(
            SealKeys::parse("# nothing\n").unwrap_err(),
            SealError::Empty
        );
        let e = SealKeys::parse("k1 AAAA\n").unwrap_err();
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("32 bytes"),
            "{e}"
        );
        let e = SealKeys::parse(&format!("{}{}", key("k1", 1), key("k1", 2))).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
