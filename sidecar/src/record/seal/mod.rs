//! Sealed per-tenant audit records: with `tenants.<name>.audit_key_file`, each of that
//! tenant's audit records is written AES-256-GCM-sealed (ring) under the tenant's current key,
//! with a fresh random 96-bit nonce per record, and chained to the record before it.
//!
//! Format 2 (written since chaining; `v` says which format a line is):
//!
//! ```text
//! {"sealed":"aes-256-gcm","v":2,"kid":"<key id>","stream":"<32 hex>","seq":<n>,
//!  "prev":"<base64 tag of seq n-1>","nonce":"<base64>","ct":"<base64 ciphertext+tag>"}
//! ```
//!
//! A *stream* is one writer's run for one tenant's file: a random 128-bit id picked when the
//! sidecar first writes a sealed record of that tenant after it starts, kept across rotations.
//! Its first record has `"seq":0`, `"start":true` and no `prev` (a zero tag in the associated
//! data) and, when the writer could open the last record already in the file, `"after":
//! {"stream","seq","tag"}` naming that record, so a reader can tell a restart from records
//! deleted at the end of the previous stream. Every other record has `seq` one more than the
//! record before it and `prev`, that record's 16-byte GCM tag. The associated data binds all of
//! it: `"bulkhead-audit-v2\0" || u32 BE len(tenant) || tenant || stream || u64 BE seq || prev
//! (16 zero bytes at seq 0) || 0 | 1 || [after.stream || u64 BE after.seq || after.tag]`. So a
//! record moved into another tenant's file, renumbered, or given another predecessor does not
//! open, and [`Verifier`] finds plain lines, gaps, duplicates, reorderings and torn lines.
//!
//! Format 1 (no `v`; written before chaining): `{"sealed","kid","nonce","ct"}` with the tenant's
//! name alone as associated data. It still opens (so old files stay readable), but its order,
//! duplicates and deletions cannot be checked; a format-1 record after a format-2 one is a
//! finding (a writer never goes back).
//!
//! Key file: one key a line, `<kid> <base64 of 32 bytes>`, `#` comments allowed. The first key
//! seals; every key listed opens, so a rotation puts the new key first and keeps the old ones
//! as long as their records are kept.

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The `sealed` value of a sealed record.
pub const ALGORITHM: &str = "aes-256-gcm";
/// The `v` of a chained record; a sealed record without `v` is format 1 (unchained).
pub const FORMAT: u64 = 2;
/// The start of a format-2 record's associated data.
const AD_LABEL: &[u8] = b"bulkhead-audit-v2\0";
/// Bytes of a GCM tag (what `prev` and a link name a record by).
pub const TAG_LEN: usize = 16;
/// A record's GCM tag.
pub type Tag = [u8; TAG_LEN];
/// A stream's random id.
pub type StreamId = [u8; 16];
/// `prev` of a stream's first record.
const ZERO_TAG: Tag = [0; TAG_LEN];

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
    #[error("sealed record format v{0}, which this reader does not know (it reads 1 and 2)")]
    Format(u64),
    #[error("malformed sealed record: {0}")]
    Malformed(&'static str),
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

/// A sealed line as read (both formats).
#[derive(serde::Deserialize)]
struct Wire {
    sealed: String,
    v: Option<u64>,
    kid: String,
    stream: Option<String>,
    seq: Option<u64>,
    #[serde(default)]
    start: bool,
    prev: Option<String>,
    after: Option<WireLink>,
    nonce: String,
    ct: String,
}

#[derive(serde::Deserialize)]
struct WireLink {
    stream: String,
    seq: u64,
    tag: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Append the base64 of `data` to `out` (no allocation beyond `out`'s growth).
fn push_b64(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    let n = base64::encoded_len(data.len(), true).unwrap_or(0);
    out.resize(start + n, 0);
    let written = b64().encode_slice(data, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
}

fn push_hex(out: &mut Vec<u8>, data: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in data {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
}

/// A stream id (or any bytes) as lowercase hex, as records and `audit read` show it.
pub fn hex(data: &[u8]) -> String {
    let mut out = Vec::with_capacity(data.len() * 2);
    push_hex(&mut out, data);
    String::from_utf8(out).unwrap_or_default()
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

fn decode16(s: &str) -> Option<[u8; 16]> {
    b64().decode(s).ok()?.try_into().ok()
}

/// A stream's last record, as the first record of the next stream names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub stream: StreamId,
    pub seq: u64,
    pub tag: Tag,
}

/// One writer's chain of one tenant's records: the stream id, the next `seq` and the tag of
/// the record before it. `Copy`, so a writer can take a checkpoint and go back to it when a
/// write fails (a record that did not reach the file is sealed again, with the same `seq`).
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    stream: StreamId,
    next: u64,
    prev: Tag,
    after: Option<Link>,
}

impl Chain {
    /// A new stream with a random id; `after` is the last record already written, when known.
    pub fn new(after: Option<Link>) -> Option<Self> {
        let mut stream = [0u8; 16];
        SystemRandom::new().fill(&mut stream).ok()?;
        Some(Self {
            stream,
            next: 0,
            prev: ZERO_TAG,
            after,
        })
    }

    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// The last record sealed in this chain, if any.
    pub fn last(&self) -> Option<Link> {
        self.next.checked_sub(1).map(|seq| Link {
            stream: self.stream,
            seq,
            tag: self.prev,
        })
    }
}

/// Buffers [`SealKeys::seal_chained`] reuses, so that sealing allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Scratch {
    ad: Vec<u8>,
    buf: Vec<u8>,
}

/// A format-2 record's place in its chain (all of it authenticated by the associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chained {
    pub stream: StreamId,
    pub seq: u64,
    /// The tag of the record before it (zero for a stream's first record).
    pub prev: Tag,
    /// On a stream's first record: the record written before it, when the writer knew it.
    pub after: Option<Link>,
    /// This record's own tag (the next record's `prev`).
    pub tag: Tag,
}

/// A record opened from its sealed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plain: Vec<u8>,
    /// `None` for a format-1 (unchained) record.
    pub chain: Option<Chained>,
}

/// The associated data of a format-2 record.
fn chained_ad(
    ad: &mut Vec<u8>,
    tenant: &str,
    stream: &StreamId,
    seq: u64,
    prev: &Tag,
    after: Option<&Link>,
) {
    ad.clear();
    ad.extend_from_slice(AD_LABEL);
    ad.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    ad.extend_from_slice(tenant.as_bytes());
    ad.extend_from_slice(stream);
    ad.extend_from_slice(&seq.to_be_bytes());
    ad.extend_from_slice(prev);
    match after {
        Some(l) => {
            ad.push(1);
            ad.extend_from_slice(&l.stream);
            ad.extend_from_slice(&l.seq.to_be_bytes());
            ad.extend_from_slice(&l.tag);
        }
        None => ad.push(0),
    }
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

    /// Append the sealed line (without newline) of `plain`, the next record of `chain`, a
    /// record of `tenant`, to `out`, and advance the chain. False (and nothing appended, the
    /// chain unchanged) when it cannot be sealed.
    pub fn seal_chained(
        &self,
        tenant: &str,
        chain: &mut Chain,
        plain: &[u8],
        out: &mut Vec<u8>,
        scratch: &mut Scratch,
    ) -> bool {
        let Some(key) = self.keys.get(&self.current) else {
            return false;
        };
        let mut nonce = [0u8; NONCE_LEN];
        if SystemRandom::new().fill(&mut nonce).is_err() {
            return false;
        }
        let seq = chain.next;
        let after = if seq == 0 { chain.after } else { None };
        chained_ad(
            &mut scratch.ad,
            tenant,
            &chain.stream,
            seq,
            &chain.prev,
            after.as_ref(),
        );
        scratch.buf.clear();
        scratch.buf.extend_from_slice(plain);
        let Ok(tag) = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&scratch.ad[..]),
            &mut scratch.buf,
        ) else {
            return false;
        };
        let Ok(tag) = Tag::try_from(tag.as_ref()) else {
            return false;
        };
        scratch.buf.extend_from_slice(&tag);
        out.extend_from_slice(b"{\"sealed\":\"aes-256-gcm\",\"v\":2,\"kid\":\"");
        out.extend_from_slice(self.current.as_bytes());
        out.extend_from_slice(b"\",\"stream\":\"");
        push_hex(out, &chain.stream);
        let _ = write!(out, "\",\"seq\":{seq}");
        if seq == 0 {
            out.extend_from_slice(b",\"start\":true");
            if let Some(l) = after {
                out.extend_from_slice(b",\"after\":{\"stream\":\"");
                push_hex(out, &l.stream);
                let _ = write!(out, "\",\"seq\":{},\"tag\":\"", l.seq);
                push_b64(out, &l.tag);
                out.extend_from_slice(b"\"}");
            }
        } else {
            out.extend_from_slice(b",\"prev\":\"");
            push_b64(out, &chain.prev);
            out.push(b'"');
        }
        out.extend_from_slice(b",\"nonce\":\"");
        push_b64(out, &nonce);
        out.extend_from_slice(b"\",\"ct\":\"");
        push_b64(out, &scratch.buf);
        out.extend_from_slice(b"\"}");
        chain.next += 1;
        chain.prev = tag;
        true
    }

    /// The record inside a sealed line of `tenant`'s audit (either format), with its place in
    /// its chain for format 2.
    pub fn open_record(&self, tenant: &str, line: &[u8]) -> Result<Opened, SealError> {
        let s: Wire = serde_json::from_slice(line).map_err(|_| SealError::NotSealed)?;
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
        let tag = ct
            .len()
            .checked_sub(TAG_LEN)
            .and_then(|at| Tag::try_from(&ct[at..]).ok())
            .ok_or(SealError::Open)?;
        let chain = match s.v {
            None => None,
            Some(FORMAT) => Some(chained_header(&s, tag)?),
            Some(v) => return Err(SealError::Format(v)),
        };
        let mut ad = Vec::new();
        match &chain {
            None => ad.extend_from_slice(tenant.as_bytes()),
            Some(c) => chained_ad(&mut ad, tenant, &c.stream, c.seq, &c.prev, c.after.as_ref()),
        }
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut ct)
            .map_err(|_| SealError::Open)?;
        Ok(Opened {
            plain: plain.to_vec(),
            chain,
        })
    }

    /// The record inside a sealed line of `tenant`'s audit (either format).
    pub fn open(&self, tenant: &str, line: &[u8]) -> Result<Vec<u8>, SealError> {
        self.open_record(tenant, line).map(|o| o.plain)
    }

    /// The link to `line`, when it is a format-2 record of `tenant` that opens: what a new
    /// stream's first record names as its predecessor.
    pub fn link_of(&self, tenant: &str, line: &[u8]) -> Option<Link> {
        let c = self.open_record(tenant, line).ok()?.chain?;
        Some(Link {
            stream: c.stream,
            seq: c.seq,
            tag: c.tag,
        })
    }
}

/// The chain fields of a format-2 line (checked for shape; the AEAD checks the values).
fn chained_header(s: &Wire, tag: Tag) -> Result<Chained, SealError> {
    let stream = s
        .stream
        .as_deref()
        .and_then(parse_hex16)
        .ok_or(SealError::Malformed("`stream` must be 32 hex digits"))?;
    let seq = s.seq.ok_or(SealError::Malformed("no `seq`"))?;
    if s.start != (seq == 0) {
        return Err(SealError::Malformed(
            "`start` is set on seq 0 and only there",
        ));
    }
    let prev = match (seq, s.prev.as_deref()) {
        (0, None) => ZERO_TAG,
        (0, Some(_)) => {
            return Err(SealError::Malformed(
                "a stream's first record has no `prev`",
            ));
        }
        (_, Some(p)) => decode16(p).ok_or(SealError::Malformed("`prev` must be 16 bytes"))?,
        (_, None) => return Err(SealError::Malformed("no `prev`")),
    };
    let after = match (&s.after, seq) {
        (None, _) => None,
        (Some(l), 0) => Some(Link {
            stream: parse_hex16(&l.stream)
                .ok_or(SealError::Malformed("`after.stream` must be 32 hex digits"))?,
            seq: l.seq,
            tag: decode16(&l.tag).ok_or(SealError::Malformed("`after.tag` must be 16 bytes"))?,
        }),
        (Some(_), _) => {
            return Err(SealError::Malformed(
                "`after` only on a stream's first record",
            ));
        }
    };
    Ok(Chained {
        stream,
        seq,
        prev,
        after,
        tag,
    })
}

/// Is this audit line sealed?
pub fn is_sealed(line: &[u8]) -> bool {
    line.starts_with(b"{\"sealed\":")
}

mod verify;

pub use verify::{Note, Verifier};

#[cfg(test)]
mod tests;
