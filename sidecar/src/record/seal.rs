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
use std::collections::{HashMap, HashSet};
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

/// What `audit read` says about one place in the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `file:line`, or empty when about the whole read.
    pub at: String,
    pub text: String,
    /// Tampering or damage (a record the reader cannot vouch for): `audit read` exits 1.
    pub problem: bool,
}

/// What the verifier knows of one stream.
struct Seen {
    /// The highest `seq` read, and its tag.
    max: u64,
    max_tag: Tag,
    seqs: HashSet<u64>,
}

/// Where the `seq`s of a stream jumped (records may be missing there).
struct Jump {
    stream: StreamId,
    from: u64,
    to: u64,
    at: String,
}

/// A line that is not a whole record, waiting for the next record to say whether it was a
/// write cut short by a restart.
struct Unreadable {
    at: String,
    /// The last record of the stream being read when it came.
    before: Option<Link>,
}

/// Checks one tenant's audit, line by line in the order written (oldest file first), for what
/// the chain proves (see the module documentation):
///
/// * a plain (unsealed) line, a line that is not a whole record, a record that does not open
///   with the tenant's keys, a format-1 record after a format-2 one;
/// * a duplicate, a record out of order, a gap in a stream's `seq`s (records deleted);
/// * at a restart, the new stream's first record names the previous stream's last record: when
///   it is not the last one read, records were deleted at the end of that stream;
/// * a torn tail: a last line cut short.
///
/// It cannot prove that nothing was deleted after the last record read (unless a later stream
/// names it), nor before the first (retention deletes the oldest files): [`Verifier::finish`]
/// says where the records read begin and end.
pub struct Verifier<'a> {
    keys: &'a SealKeys,
    tenant: &'a str,
    file: String,
    streams: HashMap<StreamId, Seen>,
    current: Option<StreamId>,
    jumps: Vec<Jump>,
    chained: u64,
    unchained: u64,
    unopened: u64,
    problems: u64,
    unreadable: Option<Unreadable>,
    /// Streams named as a predecessor by a stream read: predecessor -> successor.
    named: HashMap<StreamId, StreamId>,
    notes: Vec<Note>,
}

impl<'a> Verifier<'a> {
    pub fn new(keys: &'a SealKeys, tenant: &'a str) -> Self {
        Self {
            keys,
            tenant,
            file: String::new(),
            streams: HashMap::new(),
            current: None,
            jumps: Vec::new(),
            chained: 0,
            unchained: 0,
            unopened: 0,
            problems: 0,
            unreadable: None,
            named: HashMap::new(),
            notes: Vec::new(),
        }
    }

    /// The lines that follow are from this file.
    pub fn file(&mut self, name: &str) {
        name.clone_into(&mut self.file);
    }

    /// The notes since the last call, in order.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Problems found so far (tampering or damage).
    pub fn problems(&self) -> u64 {
        self.problems
    }

    /// Sealed records that did not open (counted in [`Verifier::problems`] too).
    pub fn unopened(&self) -> u64 {
        self.unopened
    }

    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.file)
    }

    fn note(&mut self, at: String, problem: bool, text: String) {
        self.problems += u64::from(problem);
        self.notes.push(Note { at, text, problem });
    }

    fn last_read(&self) -> Option<Link> {
        let s = self.current?;
        let seen = self.streams.get(&s)?;
        Some(Link {
            stream: s,
            seq: seen.max,
            tag: seen.max_tag,
        })
    }

    /// One line (without its newline; `terminated` is false for a last line that has none).
    /// Returns the record to show: only records that open with the tenant's keys, each once.
    pub fn line(&mut self, n: usize, line: &[u8], terminated: bool) -> Option<Vec<u8>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        if !is_sealed(line) {
            if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() {
                let at = self.at(n);
                self.note(
                    at,
                    true,
                    "plain record: an unsealed line in a sealed audit (anyone who can write the \
                     file can write one); not shown"
                        .into(),
                );
            } else {
                self.unreadable(n, terminated);
            }
            return None;
        }
        match self.keys.open_record(self.tenant, line) {
            Err(SealError::NotSealed) => {
                self.unreadable(n, terminated);
                None
            }
            Err(e) => {
                self.unopened += 1;
                let at = self.at(n);
                self.note(at, true, format!("{e}; not shown"));
                None
            }
            Ok(Opened { plain, chain: None }) => {
                if self.chained > 0 {
                    let at = self.at(n);
                    self.note(
                        at,
                        true,
                        "unchained record: a format-1 record after chained (format-2) records, \
                         which a writer never writes"
                            .into(),
                    );
                } else {
                    self.unchained += 1;
                }
                Some(plain)
            }
            Ok(Opened {
                plain,
                chain: Some(c),
            }) => {
                self.chained += 1;
                self.chained_record(n, c).then_some(plain)
            }
        }
    }

    fn unreadable(&mut self, n: usize, terminated: bool) {
        let at = self.at(n);
        if !terminated {
            self.note(
                at,
                true,
                "torn tail: the last line is cut short (the writer was stopped mid-write, or \
                 the file was cut); its record is lost"
                    .into(),
            );
            return;
        }
        if let Some(u) = self.unreadable.take() {
            self.note(u.at, true, UNREADABLE.into());
        }
        self.unreadable = Some(Unreadable {
            at,
            before: self.last_read(),
        });
    }

    /// A format-2 record; true when it is to be shown.
    fn chained_record(&mut self, n: usize, c: Chained) -> bool {
        if let Some(u) = self.unreadable.take() {
            // A write cut short by a stop: the next writer ends the torn line and its first
            // record names the record before it.
            if c.seq == 0 && c.after == u.before {
                self.note(
                    u.at,
                    false,
                    "torn write: a line cut short when the writer stopped; the next stream \
                     names the record before it as its predecessor"
                        .into(),
                );
            } else {
                self.note(u.at, true, UNREADABLE.into());
            }
        }
        if c.seq == 0 {
            self.start(n, c)
        } else {
            self.next(n, c)
        }
    }

    fn start(&mut self, n: usize, c: Chained) -> bool {
        let s = hex(&c.stream);
        if let Some(seen) = self.streams.get_mut(&c.stream) {
            let dup = !seen.seqs.insert(0);
            let at = self.at(n);
            if dup {
                self.note(
                    at,
                    true,
                    format!("duplicate: stream {s} seq 0 again; not shown"),
                );
                return false;
            }
            self.note(
                at,
                true,
                format!("out of order: the first record of stream {s} after its later records"),
            );
            return true;
        }
        let at = self.at(n);
        self.named_before(&at, &c.stream);
        if let Some(after) = c.after {
            self.named.insert(after.stream, c.stream);
        }
        match (self.last_read(), c.after) {
            (Some(last), Some(after)) if after.stream == last.stream => {
                let a = hex(&last.stream);
                if after == last {
                    self.note(
                        at,
                        false,
                        format!(
                            "stream {a} ended after seq {}; a new stream {s} started (a restart: \
                             its first record names that record as its predecessor)",
                            last.seq
                        ),
                    );
                } else if after.seq > last.seq {
                    self.note(
                        at,
                        true,
                        format!(
                            "records deleted: stream {s} started after seq {} of stream {a}, \
                             but the last record of {a} read is seq {}: seq {}..={} missing",
                            after.seq,
                            last.seq,
                            last.seq + 1,
                            after.seq
                        ),
                    );
                } else {
                    self.note(
                        at,
                        true,
                        format!(
                            "out of order: stream {s} started after seq {} of stream {a}, but \
                             records of {a} up to seq {} come before it",
                            after.seq, last.seq
                        ),
                    );
                }
            }
            (Some(last), Some(after)) => {
                let (a, x) = (hex(&last.stream), hex(&after.stream));
                let text = if self.streams.contains_key(&after.stream) {
                    format!(
                        "out of order: stream {s} started after stream {x} seq {}, but comes \
                         after stream {a}",
                        after.seq
                    )
                } else {
                    format!(
                        "records deleted: stream {s} started after stream {x} seq {}, of which \
                         nothing is here between stream {a} and it",
                        after.seq
                    )
                };
                self.note(at, true, text);
            }
            (Some(last), None) => {
                let a = hex(&last.stream);
                self.note(
                    at,
                    false,
                    format!(
                        "stream {a} ended after seq {}; a new stream {s} started (it names no \
                         predecessor: its writer found no record it could open at the end of the \
                         file, so records deleted at the end of {a} cannot be detected)",
                        last.seq
                    ),
                );
            }
            (None, Some(after)) => {
                self.note(
                    at,
                    false,
                    format!(
                        "stream {s} started after stream {} seq {}, whose records are not in \
                         these files (rotated away, or not read)",
                        hex(&after.stream),
                        after.seq
                    ),
                );
            }
            (None, None) => {}
        }
        self.streams.insert(
            c.stream,
            Seen {
                max: 0,
                max_tag: c.tag,
                seqs: HashSet::from([0]),
            },
        );
        self.current = Some(c.stream);
        true
    }

    fn next(&mut self, n: usize, c: Chained) -> bool {
        let s = hex(&c.stream);
        let current = self.current;
        let Some(seen) = self.streams.get_mut(&c.stream) else {
            let at = self.at(n);
            self.named_before(&at, &c.stream);
            if self.streams.is_empty() {
                self.note(
                    at,
                    false,
                    format!(
                        "the records read begin inside stream {s}, at seq {}: the records before \
                         it were rotated away (or are in files not read)",
                        c.seq
                    ),
                );
            } else {
                self.note(
                    at,
                    true,
                    format!(
                        "out of order: stream {s} seq {} without the stream's first record, after \
                         stream {}",
                        c.seq,
                        current.map(|c| hex(&c)).unwrap_or_default()
                    ),
                );
            }
            self.streams.insert(
                c.stream,
                Seen {
                    max: c.seq,
                    max_tag: c.tag,
                    seqs: HashSet::from([c.seq]),
                },
            );
            self.current = Some(c.stream);
            return true;
        };
        if !seen.seqs.insert(c.seq) {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!("duplicate: stream {s} seq {} again; not shown", c.seq),
            );
            return false;
        }
        let max = seen.max;
        if current != Some(c.stream) {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!(
                    "out of order: stream {s} seq {} after a later stream started",
                    c.seq
                ),
            );
        } else if c.seq == max + 1 {
            let broken = c.prev != seen.max_tag;
            (seen.max, seen.max_tag) = (c.seq, c.tag);
            if broken {
                let at = self.at(n);
                self.note(
                    at,
                    true,
                    format!(
                        "chain broken: stream {s} seq {} does not follow the seq {max} read \
                         before it",
                        c.seq
                    ),
                );
            }
        } else if c.seq > max {
            (seen.max, seen.max_tag) = (c.seq, c.tag);
            let at = self.at(n);
            self.jumps.push(Jump {
                stream: c.stream,
                from: max,
                to: c.seq,
                at,
            });
        } else {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!("out of order: stream {s} seq {} after seq {max}", c.seq),
            );
        }
        true
    }

    /// A stream first seen after a stream that names it as its predecessor: out of order.
    fn named_before(&mut self, at: &str, stream: &StreamId) {
        if let Some(succ) = self.named.get(stream) {
            let text = format!(
                "out of order: stream {} comes after stream {}, which started after it",
                hex(stream),
                hex(succ)
            );
            self.note(at.to_string(), true, text);
        }
    }

    /// After the last line: gaps, an unexplained unreadable line, and where the records end.
    pub fn finish(&mut self) {
        if let Some(u) = self.unreadable.take() {
            self.note(u.at, true, UNREADABLE.into());
        }
        for j in std::mem::take(&mut self.jumps) {
            let seqs = self.streams.get(&j.stream).map(|s| &s.seqs);
            let mut missing: Vec<(u64, u64)> = Vec::new();
            // A jump bigger than any audit file holds is reported whole.
            if j.to - j.from > 1_000_000 {
                missing.push((j.from + 1, j.to - 1));
            } else {
                for q in j.from + 1..j.to {
                    if seqs.is_some_and(|s| s.contains(&q)) {
                        continue;
                    }
                    match missing.last_mut() {
                        Some(r) if r.1 + 1 == q => r.1 = q,
                        _ => missing.push((q, q)),
                    }
                }
            }
            let s = hex(&j.stream);
            for (a, b) in missing {
                let range = if a == b {
                    format!("seq {a}")
                } else {
                    format!("seq {a}..={b}")
                };
                self.note(
                    j.at.clone(),
                    true,
                    format!("gap: stream {s} {range} missing before this record (deleted)"),
                );
            }
        }
        if let Some(last) = self.last_read() {
            self.note(
                String::new(),
                false,
                format!(
                    "the last record read is stream {} seq {}: records deleted after it cannot \
                     be detected from the files alone (compare with the sidecar's log line \
                     \"audit stream ended\", or with a later stream's first record)",
                    hex(&last.stream),
                    last.seq
                ),
            );
        }
        if self.unchained > 0 {
            self.note(
                String::new(),
                false,
                format!(
                    "{} records in the unchained format 1 (written before chaining): their \
                     order, duplicates and deletions cannot be checked",
                    self.unchained
                ),
            );
        }
    }
}

const UNREADABLE: &str = "unreadable line: not a whole record (damaged, or written by \
                          something else), and no restart explains it; not shown";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(kid: &str, byte: u8) -> String {
        format!("{kid} {}\n", b64().encode([byte; 32]))
    }

    /// A format-1 line, as sealed before chaining (tenant name as the associated data).
    fn seal_v1(keys: &SealKeys, tenant: &str, plain: &[u8]) -> Vec<u8> {
        let key = &keys.keys[&keys.current];
        let nonce = [7u8; NONCE_LEN];
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(tenant.as_bytes()),
            &mut buf,
        )
        .unwrap();
        format!(
            r#"{{"sealed":"{ALGORITHM}","kid":"{}","nonce":"{}","ct":"{}"}}"#,
            keys.current,
            b64().encode(nonce),
            b64().encode(&buf)
        )
        .into_bytes()
    }

    fn rec(n: usize) -> Vec<u8> {
        format!(r#"{{"tenant":"acme","request_id":"r{n}"}}"#).into_bytes()
    }

    /// `n` records of a new stream (after `after`), as lines; and the chain after them.
    fn stream(
        keys: &SealKeys,
        first: usize,
        n: usize,
        after: Option<Link>,
    ) -> (Vec<Vec<u8>>, Chain) {
        let mut chain = Chain::new(after).unwrap();
        let mut scratch = Scratch::default();
        let lines = (first..first + n)
            .map(|i| {
                let mut out = Vec::new();
                assert!(keys.seal_chained("acme", &mut chain, &rec(i), &mut out, &mut scratch));
                out
            })
            .collect();
        (lines, chain)
    }

    /// Verify `lines` as one file (the last one without its newline when `torn`): the notes,
    /// the problem count and the records shown.
    fn verify(keys: &SealKeys, lines: &[Vec<u8>], torn: bool) -> (Vec<Note>, u64, Vec<Vec<u8>>) {
        let mut v = Verifier::new(keys, "acme");
        v.file("acme.jsonl");
        let mut shown = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let terminated = !(torn && i + 1 == lines.len());
            shown.extend(v.line(i + 1, l, terminated));
        }
        v.finish();
        (v.take_notes(), v.problems(), shown)
    }

    fn has(notes: &[Note], problem: bool, text: &str) -> bool {
        notes
            .iter()
            .any(|n| n.problem == problem && n.text.contains(text))
    }

    #[test]
    fn format_1_round_trip_rotation_and_no_cross_tenant_opening() {
        let old = SealKeys::parse(&key("k1", 1)).unwrap();
        let record = br#"{"tenant":"acme","route":"/v1/chat/completions"}"#;
        let sealed_old = seal_v1(&old, "acme", record);
        assert!(is_sealed(&sealed_old));
        // Rotation: the new key first, the old one kept for reading.
        let rotated =
            SealKeys::parse(&format!("# rotated\n{}{}", key("k2", 2), key("k1", 1))).unwrap();
        let (lines, _) = stream(&rotated, 0, 1, None);
        assert!(String::from_utf8_lossy(&lines[0]).contains("\"kid\":\"k2\""));
        let o = rotated.open_record("acme", &sealed_old).unwrap();
        assert_eq!((o.plain.as_slice(), o.chain), (&record[..], None));
        assert_eq!(rotated.open("acme", &lines[0]).unwrap(), rec(0));
        // The same record under another tenant's name, or with another tenant's key: nothing.
        assert_eq!(rotated.open("globex", &sealed_old), Err(SealError::Open));
        assert_eq!(rotated.open("globex", &lines[0]), Err(SealError::Open));
        let globex = SealKeys::parse(&key("k2", 9)).unwrap();
        assert_eq!(globex.open("acme", &lines[0]), Err(SealError::Open));
        assert_eq!(
            globex.open("acme", &sealed_old),
            Err(SealError::UnknownKid("k1".into()))
        );
    }

    #[test]
    fn chained_records_carry_stream_seq_and_the_previous_tag() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let (lines, chain) = stream(&keys, 0, 3, None);
        let text: Vec<String> = lines
            .iter()
            .map(|l| String::from_utf8(l.clone()).unwrap())
            .collect();
        let id = hex(&chain.stream());
        assert!(
            text[0].starts_with(&format!(
                r#"{{"sealed":"aes-256-gcm","v":2,"kid":"k1","stream":"{id}","seq":0,"start":true,"nonce":""#
            )),
            "{}",
            text[0]
        );
        assert!(!text[0].contains("prev") && !text[0].contains("acme"));
        let opened: Vec<Chained> = lines
            .iter()
            .map(|l| keys.open_record("acme", l).unwrap().chain.unwrap())
            .collect();
        assert_eq!(opened[0].prev, ZERO_TAG);
        for i in 1..3 {
            assert_eq!(opened[i].seq, i as u64);
            assert_eq!(opened[i].prev, opened[i - 1].tag);
            assert!(text[i].contains(&format!(
                r#""seq":{i},"prev":"{}""#,
                b64().encode(opened[i - 1].tag)
            )));
        }
        assert_eq!(
            chain.last(),
            Some(Link {
                stream: chain.stream(),
                seq: 2,
                tag: opened[2].tag
            })
        );
        // A restart names the last record; the link is authenticated too.
        let (next, _) = stream(&keys, 3, 1, chain.last());
        let c = keys.open_record("acme", &next[0]).unwrap().chain.unwrap();
        assert_eq!(c.after, chain.last());
        assert_eq!(keys.link_of("acme", &lines[2]), chain.last());
        // Any chain field changed: the record no longer opens (or is refused as malformed).
        let prev_of_2 = format!(r#""prev":"{}""#, b64().encode(opened[1].tag));
        let other_prev = format!(r#""prev":"{}""#, b64().encode(opened[0].tag));
        let edits: [(usize, &str, String); 7] = [
            (1, r#""seq":1"#, r#""seq":5"#.into()),
            (2, &prev_of_2, other_prev),
            (2, r#""v":2,"#, String::new()),
            (2, r#""v":2"#, r#""v":3"#.into()),
            (2, &id, hex(&[0xab; 16])),
            (0, r#""start":true,"#, String::new()),
            (2, r#""seq":2"#, r#""seq":0,"start":true"#.into()),
        ];
        let after = String::from_utf8(next[0].clone()).unwrap();
        for (i, from, to) in &edits {
            let bad = text[*i].replacen(from, to, 1);
            assert_ne!(bad, text[*i], "{from}");
            let e = keys.open_record("acme", bad.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    e,
                    SealError::Open | SealError::Malformed(_) | SealError::Format(3)
                ),
                "{from}: {e}"
            );
        }
        let seq_pos = after.find(r#""after":{"stream":""#).unwrap();
        let bad = format!(
            "{}{}",
            &after[..seq_pos],
            &after[seq_pos..].replacen(r#","seq":2,"#, r#","seq":1,"#, 1)
        );
        assert_ne!(bad, after);
        assert_eq!(
            keys.open_record("acme", bad.as_bytes()),
            Err(SealError::Open)
        );
        assert_eq!(
            keys.open_record("acme", text[1].replace(r#""v":2"#, r#""v":9"#).as_bytes()),
            Err(SealError::Format(9))
        );
    }

    #[test]
    fn a_clean_chain_and_a_linked_restart_are_not_problems() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let (mut lines, a) = stream(&keys, 0, 4, None);
        let (b, _) = stream(&keys, 4, 3, a.last());
        lines.extend(b);
        let (notes, problems, shown) = verify(&keys, &lines, false);
        assert_eq!(problems, 0, "{notes:?}");
        assert_eq!(shown, (0..7).map(rec).collect::<Vec<_>>());
        let ended = format!(
            "stream {} ended after seq 3; a new stream",
            hex(&a.stream())
        );
        assert!(has(&notes, false, &ended), "{notes:?}");
        assert!(
            has(&notes, false, "the last record read is stream"),
            "{notes:?}"
        );
        // The oldest records rotated away: the read begins inside a stream, not a problem.
        let (notes, problems, _) = verify(&keys, &lines[2..], false);
        assert_eq!(problems, 0, "{notes:?}");
        assert!(has(&notes, false, "begin inside stream"), "{notes:?}");
    }

    #[test]
    fn each_fault_is_named() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let (lines, a) = stream(&keys, 0, 5, None);
        let check = |lines: &[Vec<u8>], torn: bool, want: &str| {
            let (notes, problems, _) = verify(&keys, lines, torn);
            assert!(problems > 0 && has(&notes, true, want), "{want}: {notes:?}");
        };
        let mut plain = lines.clone();
        plain.push(rec(99));
        check(&plain, false, "plain record");
        let mut dup = lines.clone();
        dup.insert(3, lines[2].clone());
        check(&dup, false, "duplicate: ");
        let (_, _, shown) = verify(&keys, &dup, false);
        assert_eq!(shown.len(), 5, "a duplicate is shown once");
        let mut gap = lines.clone();
        gap.remove(2);
        check(&gap, false, "gap: ");
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        check(&swapped, false, "out of order");
        let mut torn = lines.clone();
        let last = torn.last_mut().unwrap();
        last.truncate(last.len() / 2);
        check(&torn, true, "torn tail");
        // The end of a stream deleted before a restart: the next stream names its last record.
        let (b, _) = stream(&keys, 5, 2, a.last());
        let mut cut = lines[..3].to_vec();
        cut.extend(b.clone());
        check(&cut, false, "records deleted");
        // A format-1 record after chained ones; another tenant's record.
        let mut old = lines.clone();
        old.push(seal_v1(&keys, "acme", &rec(9)));
        check(&old, false, "unchained record");
        let mut moved = lines.clone();
        let mut globex = Chain::new(None).unwrap();
        let mut line = Vec::new();
        keys.seal_chained(
            "globex",
            &mut globex,
            &rec(1),
            &mut line,
            &mut Scratch::default(),
        );
        moved.push(line);
        check(&moved, false, "does not open");
        // A torn write before a restart (the next writer ended the line) is explained.
        let mut restart = lines.clone();
        restart.push(lines[4][..40].to_vec());
        restart.extend(b);
        let (notes, problems, _) = verify(&keys, &restart, false);
        assert_eq!(problems, 0, "{notes:?}");
        assert!(has(&notes, false, "torn write"), "{notes:?}");
        // The same torn line with no restart after it is not.
        let mut mid = lines.clone();
        mid.insert(3, lines[3][..40].to_vec());
        check(&mid, false, "unreadable line");
    }

    #[derive(Debug, Clone)]
    enum Fault {
        Plain(usize),
        Duplicate(usize, usize),
        Delete(usize),
        Swap(usize),
        TornTail,
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            any::<usize>().prop_map(Fault::Plain),
            (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Fault::Duplicate(a, b)),
            any::<usize>().prop_map(Fault::Delete),
            any::<usize>().prop_map(Fault::Swap),
            Just(Fault::TornTail),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Streams of random lengths, each a linked restart of the one before; one fault at a
        /// random place. Deleting the very first or the very last record is left out: nothing
        /// in the files can prove those (retention deletes the oldest records; see `finish`).
        #[test]
        fn a_random_fault_is_always_found(
            lens in proptest::collection::vec(1usize..6, 1..4),
            f in fault(),
        ) {
            let keys = SealKeys::parse(&key("k1", 1)).unwrap();
            let mut lines = Vec::new();
            let mut after = None;
            for n in lens {
                let (l, c) = stream(&keys, lines.len(), n, after);
                lines.extend(l);
                after = c.last();
            }
            let (notes, problems, _) = verify(&keys, &lines, false);
            prop_assert_eq!(problems, 0, "{:?}", notes);
            let len = lines.len();
            let mut torn = false;
            match f.clone() {
                Fault::Plain(at) => lines.insert(at % (len + 1), rec(1000)),
                Fault::Duplicate(from, to) => {
                    let l = lines[from % len].clone();
                    lines.insert(to % (len + 1), l);
                }
                Fault::Delete(at) => {
                    prop_assume!(len >= 3);
                    lines.remove(1 + at % (len - 2));
                }
                Fault::Swap(at) => {
                    prop_assume!(len >= 2);
                    lines.swap(at % (len - 1), at % (len - 1) + 1);
                }
                Fault::TornTail => {
                    let last = lines.last_mut().unwrap();
                    let keep = last.len() / 3;
                    last.truncate(keep);
                    torn = true;
                }
            }
            let (notes, problems, _) = verify(&keys, &lines, torn);
            prop_assert!(problems > 0, "{:?} not found: {:?}", f, notes);
        }
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

    #[test]
    fn base64_is_appended_after_what_the_buffer_holds() {
        for prefix in [&b""[..], b"x", b"xy", b"prefix="] {
            let mut out = prefix.to_vec();
            push_b64(&mut out, b"hello");
            assert_eq!(out, [prefix, &b"aGVsbG8="[..]].concat(), "{prefix:?}");
        }
    }

    #[test]
    fn debug_names_the_key_ids_count_never_a_key() {
        let keys = SealKeys::parse(&(key("k1", 1) + &key("k2", 2))).unwrap();
        let d = format!("{keys:?}");
        assert!(
            d.contains("SealKeys") && d.contains("\"k1\"") && d.contains("kids: 2"),
            "{d}"
        );
        assert!(!d.contains(&b64().encode([1u8; 32])), "{d}");
    }

    #[test]
    fn key_ids_are_1_to_64_safe_characters() {
        let k = |kid: &str| SealKeys::parse(&key(kid, 1));
        assert!(k("a").is_ok());
        assert!(k(&"a".repeat(64)).is_ok());
        assert!(k("A.z-9_").is_ok());
        for bad in ["a".repeat(65), "a/b".into(), "a:b".into(), "ä".into()] {
            assert!(k(&bad).is_err(), "{bad}");
        }
        // An empty key id: the line has no key id, only a key.
        assert!(SealKeys::parse(&format!(" {}\n", b64().encode([1u8; 32]))).is_err());
    }

    #[test]
    fn notes_name_the_file_and_line_and_count_what_did_not_open() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let other = SealKeys::parse(&key("k1", 2)).unwrap();
        let mut v = Verifier::new(&keys, "acme");
        v.file("acme.jsonl.1");
        assert!(v.line(3, br#"{"plain":true}"#, true).is_none());
        assert_eq!(v.unopened(), 0);
        // Sealed with another key under the same key id: does not open.
        assert!(v.line(4, &seal_v1(&other, "acme", b"{}"), true).is_none());
        assert_eq!(v.unopened(), 1);
        // Two records of format 1 open, and are counted as such.
        assert!(
            v.line(5, &seal_v1(&keys, "acme", b"{\"a\":1}"), true)
                .is_some()
        );
        assert!(
            v.line(6, &seal_v1(&keys, "acme", b"{\"a\":2}"), true)
                .is_some()
        );
        v.finish();
        let notes = v.take_notes();
        let at: Vec<&str> = notes.iter().map(|n| n.at.as_str()).collect();
        assert!(
            at.contains(&"acme.jsonl.1:3") && at.contains(&"acme.jsonl.1:4"),
            "{at:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.text.starts_with("2 records in the unchained format 1")),
            "{:?}",
            notes.iter().map(|n| &n.text).collect::<Vec<_>>()
        );
        assert_eq!(v.problems(), 2);
    }

    #[test]
    fn gaps_are_reported_as_the_ranges_that_are_missing() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let (lines, chain) = stream(&keys, 0, 12, None);
        let s = hex(&chain.stream());
        // Delete seq 3..=5 and 8 and 10: three gaps, each named exactly.
        let kept: Vec<Vec<u8>> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| ![3, 4, 5, 8, 10].contains(i))
            .map(|(_, l)| l.clone())
            .collect();
        let (notes, problems, shown) = verify(&keys, &kept, false);
        let gaps: Vec<&str> = notes
            .iter()
            .filter(|n| n.text.starts_with("gap: "))
            .map(|n| n.text.as_str())
            .collect();
        assert_eq!(
            gaps,
            [
                format!("gap: stream {s} seq 3..=5 missing before this record (deleted)"),
                format!("gap: stream {s} seq 8 missing before this record (deleted)"),
                format!("gap: stream {s} seq 10 missing before this record (deleted)"),
            ]
        );
        assert_eq!((problems, shown.len()), (3, 7));
        // The last record read is named, as what a reader cannot see past.
        assert!(
            has(&notes, false, &format!("stream {s} seq 11:")),
            "{notes:?}"
        );
        // Records that come later in the files are out of order, not missing.
        let order = [0, 1, 2, 5, 3, 4, 6];
        let moved: Vec<Vec<u8>> = order.iter().map(|i| lines[*i].clone()).collect();
        let (notes, _, _) = verify(&keys, &moved, false);
        assert!(!has(&notes, true, "gap: "), "{notes:?}");
        assert!(has(&notes, true, "out of order"), "{notes:?}");
        // Within one jump, a record seen elsewhere splits the missing range in two.
        let order = [0, 1, 2, 9, 5, 10, 11];
        let moved: Vec<Vec<u8>> = order.iter().map(|i| lines[*i].clone()).collect();
        let (notes, _, _) = verify(&keys, &moved, false);
        for range in ["seq 3..=4 missing", "seq 6..=8 missing"] {
            assert!(has(&notes, true, range), "{range}: {notes:?}");
        }
    }

    #[test]
    fn a_jump_past_any_audit_file_is_one_range() {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        // A record claiming seq 1,000,002 after seq 1: 1,000,000 records missing, reported
        // whole; one short of the bound, the same range found record by record.
        for (next, range) in [(1_000_002, "2..=1000001"), (1_000_001, "2..=1000000")] {
            let (mut lines, mut chain) = stream(&keys, 0, 2, None);
            let s = hex(&chain.stream());
            chain.next = next;
            let mut out = Vec::new();
            assert!(keys.seal_chained(
                "acme",
                &mut chain,
                &rec(9),
                &mut out,
                &mut Scratch::default()
            ));
            lines.push(out);
            let (notes, _, _) = verify(&keys, &lines, false);
            let want = format!("gap: stream {s} seq {range} missing");
            assert!(has(&notes, true, &want), "{want}: {notes:?}");
        }
    }
}
