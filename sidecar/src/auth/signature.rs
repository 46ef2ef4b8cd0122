//! RFC 9421 HTTP Message Signatures with `hmac-sha256`: signature base construction, the
//! sidecar's fail-closed verification policy, a bounded nonce replay cache and a signing helper.

use crate::auth::digest;
use crate::auth::scope::Scope;
use crate::config::LoadedKey;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use ring::hmac;
use sfv::{BareItem, InnerList, Item, Key, ListEntry, Parameters, SerializeValue};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The header naming the tenant; it must be covered by the signature.
pub const TENANT_HEADER: &str = "x-bulkhead-tenant";
/// Every client header with this prefix is removed unless the signature covers it.
pub const RESERVED_PREFIX: &str = "x-bulkhead-";
pub const ALG: &str = "hmac-sha256";

/// Why a request failed authentication. `reason()` is the stable metric label and error code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing: {0}")]
    Missing(String),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("bad signature")]
    BadSignature,
    #[error("expired: {0}")]
    Expired(String),
    #[error("replayed nonce")]
    Replayed,
    #[error("unknown key id")]
    UnknownKey,
    #[error("tenant mismatch: the key may not assert this tenant")]
    TenantMismatch,
    #[error("content digest mismatch: {0}")]
    DigestMismatch(String),
    #[error("unknown tenant")]
    UnknownTenant,
    #[error("replay cache full, try again later")]
    ReplayCacheFull,
    #[error("algorithm not allowed: {0}")]
    AlgNotAllowed(String),
    #[error("the key named by kid is not of the token's algorithm")]
    KeyMismatch,
    #[error("not yet valid: {0}")]
    NotYetValid(String),
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token has no string claim `{0}`")]
    ClaimMissing(String),
    #[error("the token's tier is not configured")]
    UnknownTier,
    #[error("{0} credentials are not accepted on this route")]
    MethodNotAccepted(&'static str),
    #[error("the token's issuer may not name this tenant")]
    TenantNotAllowedForIssuer,
    #[error("the token's type (header typ) is not the one its issuer requires")]
    WrongType,
    #[error("the token's authorized party (azp) is not accepted")]
    AzpNotAllowed,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired(_) => "expired",
            AuthError::Replayed => "replayed",
            AuthError::UnknownKey => "unknown_key",
            AuthError::TenantMismatch => "tenant_mismatch",
            AuthError::DigestMismatch(_) => "digest_mismatch",
            AuthError::UnknownTenant => "unknown_tenant",
            AuthError::ReplayCacheFull => "replay_cache_full",
            AuthError::AlgNotAllowed(_) => "alg_not_allowed",
            AuthError::KeyMismatch => "key_mismatch",
            AuthError::NotYetValid(_) => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::ClaimMissing(_) => "claim_missing",
            AuthError::UnknownTier => "unknown_tier",
            AuthError::MethodNotAccepted(_) => "method_not_accepted",
            AuthError::TenantNotAllowedForIssuer => "tenant_not_allowed_for_issuer",
            AuthError::WrongType => "wrong_type",
            AuthError::AzpNotAllowed => "azp_not_allowed",
        }
    }

    /// Every reason, for pre-creating metric series.
    pub const REASONS: [&'static str; 21] = [
        "missing",
        "malformed",
        "bad_signature",
        "expired",
        "replayed",
        "unknown_key",
        "tenant_mismatch",
        "digest_mismatch",
        "unknown_tenant",
        "replay_cache_full",
        "alg_not_allowed",
        "key_mismatch",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "claim_missing",
        "unknown_tier",
        "method_not_accepted",
        "tenant_not_allowed_for_issuer",
        "wrong_type",
        "azp_not_allowed",
    ];
}

fn malformed(m: impl Into<String>) -> AuthError {
    AuthError::Malformed(m.into())
}

/// The parts of a request that signatures can cover.
#[derive(Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// Value of one covered component (RFC 9421 sections 2.1 and 2.2). Component parameters
/// (`sf`, `key`, `bs`, `req`, `name`) are not supported and fail closed.
fn component_value(req: RequestView<'_>, name: &str) -> Result<String, AuthError> {
    let authority = || -> Result<String, AuthError> {
        if req.headers.get_all(http::header::HOST).iter().count() > 1 {
            return Err(malformed("Host appears more than once"));
        }
        if let Some(h) = req.headers.get(http::header::HOST) {
            let s = h
                .to_str()
                .map_err(|_| malformed("Host is not visible ASCII"))?;
            Ok(s.trim().to_ascii_lowercase())
        } else if let Some(a) = req.uri.authority() {
            Ok(a.as_str().to_ascii_lowercase())
        } else {
            Err(AuthError::Missing(
                "@authority is covered but unknown".into(),
            ))
        }
    };
    let path = || {
        let p = req.uri.path();
        if p.is_empty() {
            "/".to_string()
        } else {
            p.to_string()
        }
    };
    let query = || format!("?{}", req.uri.query().unwrap_or(""));
    let scheme = || req.uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    Ok(match name {
        "@method" => req.method.as_str().to_string(),
        "@authority" => authority()?,
        "@scheme" => scheme(),
        "@path" => path(),
        "@query" => query(),
        "@request-target" => match req.uri.query() {
            Some(q) => format!("{}?{q}", path()),
            None => path(),
        },
        "@target-uri" => {
            let q = req.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{}://{}{}{q}", scheme(), authority()?, path())
        }
        n if n.starts_with('@') => {
            return Err(malformed(format!("unsupported derived component {n}")));
        }
        n => {
            if n.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(malformed("component names must be lowercase"));
            }
            let hn = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| malformed("component is not a header name"))?;
            let mut vals = Vec::new();
            for v in req.headers.get_all(&hn) {
                let s = v
                    .to_str()
                    .map_err(|_| malformed(format!("header {n} is not visible ASCII")))?;
                vals.push(s.trim().to_string());
            }
            if vals.is_empty() {
                return Err(AuthError::Missing(format!(
                    "covered header {n} is not in the request"
                )));
            }
            vals.join(", ")
        }
    })
}

/// Signature parameters as parsed from `Signature-Input`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SigParams {
    pub components: Vec<String>,
    pub created: Option<i64>,
    pub expires: Option<i64>,
    pub nonce: Option<String>,
    pub keyid: Option<String>,
    pub alg: Option<String>,
    pub tag: Option<String>,
}

impl SigParams {
    /// Serialize as an RFC 8941 inner list (the `@signature-params` value and the
    /// `Signature-Input` member). Parameters are written in the order the RFC examples use.
    pub fn to_inner_list(&self) -> Result<InnerList, AuthError> {
        let mut items = Vec::new();
        for c in &self.components {
            let s = sfv::String::from_string(c.clone())
                .map_err(|_| malformed("component name is not an sf-string"))?;
            items.push(Item::new(BareItem::String(s)));
        }
        let mut params = Parameters::new();
        let key = |k: &str| Key::from_string(k.to_string()).expect("static key is valid");
        let int = |v: i64| -> Result<BareItem, AuthError> {
            Ok(BareItem::Integer(
                sfv::Integer::try_from(v).map_err(|_| malformed("integer out of range"))?,
            ))
        };
        let string = |v: &str| -> Result<BareItem, AuthError> {
            Ok(BareItem::String(
                sfv::String::from_string(v.to_string())
                    .map_err(|_| malformed("parameter is not an sf-string"))?,
            ))
        };
        if let Some(v) = self.created {
            params.insert(key("created"), int(v)?);
        }
        if let Some(v) = self.expires {
            params.insert(key("expires"), int(v)?);
        }
        if let Some(v) = &self.nonce {
            params.insert(key("nonce"), string(v)?);
        }
        if let Some(v) = &self.alg {
            params.insert(key("alg"), string(v)?);
        }
        if let Some(v) = &self.keyid {
            params.insert(key("keyid"), string(v)?);
        }
        if let Some(v) = &self.tag {
            params.insert(key("tag"), string(v)?);
        }
        Ok(InnerList::with_params(items, params))
    }

    fn from_inner_list(il: &InnerList) -> Result<SigParams, AuthError> {
        let mut p = SigParams::default();
        let mut seen = HashSet::new();
        for item in &il.items {
            if !item.params.is_empty() {
                return Err(malformed("component parameters are not supported"));
            }
            let s = item
                .bare_item
                .as_string()
                .ok_or_else(|| malformed("covered components must be strings"))?;
            if !seen.insert(s.as_str().to_string()) {
                return Err(malformed("a component is covered twice"));
            }
            p.components.push(s.as_str().to_string());
        }
        for (k, v) in &il.params {
            let int = || -> Result<i64, AuthError> {
                v.as_integer()
                    .map(i64::from)
                    .ok_or_else(|| malformed(format!("{} must be an integer", k.as_str())))
            };
            let string = || -> Result<String, AuthError> {
                v.as_string()
                    .map(|s| s.as_str().to_string())
                    .ok_or_else(|| malformed(format!("{} must be a string", k.as_str())))
            };
            match k.as_str() {
                "created" => p.created = Some(int()?),
                "expires" => p.expires = Some(int()?),
                "nonce" => p.nonce = Some(string()?),
                "keyid" => p.keyid = Some(string()?),
                "alg" => p.alg = Some(string()?),
                // `tag` (application-specific), like unknown parameters, is covered by the
                // signature and otherwise ignored.
                _ => {}
            }
        }
        Ok(p)
    }
}

/// Build the signature base (RFC 9421 section 2.5) for `components` over `req`, with
/// `params_value` as the serialized `@signature-params` value.
pub fn signature_base(
    req: RequestView<'_>,
    components: &[String],
    params_value: &str,
) -> Result<String, AuthError> {
    let mut base = String::new();
    for c in components {
        if c == "@signature-params" {
            return Err(malformed("@signature-params cannot be covered"));
        }
        let v = component_value(req, c)?;
        if v.contains('\n') || v.contains('\r') {
            return Err(malformed("component value contains a newline"));
        }
        base.push('"');
        base.push_str(c);
        base.push_str("\": ");
        base.push_str(&v);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(params_value);
    Ok(base)
}

fn serialize_inner_list(il: InnerList) -> Result<String, AuthError> {
    vec![ListEntry::InnerList(il)]
        .serialize_value()
        .map_err(|_| malformed("cannot serialize signature parameters"))
}

fn joined(headers: &HeaderMap, name: &str) -> Result<Option<String>, AuthError> {
    let mut parts = Vec::new();
    for v in headers.get_all(name) {
        parts.push(
            v.to_str()
                .map_err(|_| malformed(format!("{name} is not visible ASCII")))?
                .to_string(),
        );
    }
    Ok(if parts.is_empty() {
        None
    } else {
        Some(parts.join(", "))
    })
}

/// One signature found in a request, with its parameters and raw bytes.
#[derive(Debug, Clone)]
pub struct FoundSignature {
    pub params: SigParams,
    pub params_value: String,
    pub signature: Vec<u8>,
}

/// Find and parse the signature labelled `label`.
pub fn find_signature(headers: &HeaderMap, label: &str) -> Result<FoundSignature, AuthError> {
    let input = joined(headers, "signature-input")?
        .ok_or_else(|| AuthError::Missing("no Signature-Input header".into()))?;
    let sig = joined(headers, "signature")?
        .ok_or_else(|| AuthError::Missing("no Signature header".into()))?;
    let parse = |v: &str, what: &str| {
        sfv::Parser::new(v)
            .with_version(sfv::Version::Rfc8941)
            .parse_dictionary()
            .map_err(|_| malformed(format!("{what} is not an RFC 8941 dictionary")))
    };
    let input = parse(&input, "Signature-Input")?;
    let sig = parse(&sig, "Signature")?;
    let il = match input.into_iter().find(|(k, _)| k.as_str() == label) {
        Some((_, ListEntry::InnerList(il))) => il,
        Some(_) => return Err(malformed("Signature-Input member is not an inner list")),
        None => {
            return Err(AuthError::Missing(format!(
                "no signature labelled {label:?}"
            )));
        }
    };
    let bytes = match sig.iter().find(|(k, _)| k.as_str() == label) {
        Some((_, ListEntry::Item(item))) => item
            .bare_item
            .as_byte_sequence()
            .ok_or_else(|| malformed("Signature member is not a byte sequence"))?
            .to_vec(),
        Some(_) => return Err(malformed("Signature member is not an item")),
        None => {
            return Err(AuthError::Missing(format!(
                "no Signature member labelled {label:?}"
            )));
        }
    };
    let params = SigParams::from_inner_list(&il)?;
    let params_value = serialize_inner_list(il)?;
    Ok(FoundSignature {
        params,
        params_value,
        signature: bytes,
    })
}

/// HMAC-SHA256 of the signature base.
pub fn hmac_sign(key: &[u8], base: &str) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&k, base.as_bytes()).as_ref().to_vec()
}

/// Constant-time HMAC-SHA256 check.
pub fn hmac_verify(key: &[u8], base: &str, sig: &[u8]) -> bool {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::verify(&k, base.as_bytes(), sig).is_ok()
}

/// A bounded set of recently seen `(keyid, nonce)` pairs, each remembered until the time after
/// which its signature would be rejected as expired anyway.
///
/// Entries are 128-bit keyed hashes (two independently keyed SipHash-1-3), so memory per nonce
/// stays small and fixed; a false "replayed" needs a 128-bit collision under keys the sender
/// does not know. Expiry is ordered by the time an entry may be forgotten (a min-heap), so an
/// entry remembered for long never delays the expiry of the others. Capacity is shared per key
/// id: each insert names the most entries its key id may hold (see [`Verifier`]), so one key
/// that fills its share is refused alone; `capacity` bounds the total.
pub struct ReplayCache {
    capacity: usize,
    hashers: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    /// Entry hash -> (forget_at, key id hash).
    seen: HashMap<u128, (i64, u64)>,
    /// (forget_at, entry hash), earliest first.
    expiry: BinaryHeap<Reverse<(i64, u128)>>,
    /// Key id hash -> live entries of that key id.
    per_key: HashMap<u64, usize>,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("capacity", &self.capacity)
            .field("len", &self.seen.len())
            .field("key_ids", &self.per_key.len())
            .finish()
    }
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            hashers: Default::default(),
            seen: HashMap::new(),
            expiry: BinaryHeap::new(),
            per_key: HashMap::new(),
        }
    }

    /// The most entries held, all key ids together.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held (some may be expired but not yet dropped; they are dropped on the next
    /// check or insert).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn key(&self, keyid: &str, nonce: &str) -> u128 {
        use std::hash::BuildHasher;
        let a = self.hashers.0.hash_one((keyid, nonce));
        let b = self.hashers.1.hash_one((keyid, nonce));
        ((a as u128) << 64) | b as u128
    }

    fn owner(&self, keyid: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hashers.0.hash_one(("key id", keyid))
    }

    /// Drop every entry whose `forget_at` is `<= now`.
    fn expire(&mut self, now: i64) {
        while let Some(&Reverse((t, k))) = self.expiry.peek() {
            if t > now {
                break;
            }
            self.expiry.pop();
            if let Some(&(forget_at, owner)) = self.seen.get(&k)
                && forget_at == t
            {
                self.seen.remove(&k);
                if let Some(n) = self.per_key.get_mut(&owner) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_key.remove(&owner);
                    }
                }
            }
        }
    }

    /// Check without recording: `Replayed` when the nonce is live, `ReplayCacheFull` when
    /// `keyid` already holds `key_limit` live entries or the whole cache is full.
    pub fn check(
        &mut self,
        keyid: &str,
        nonce: &str,
        now: i64,
        key_limit: usize,
    ) -> Result<(), AuthError> {
        self.expire(now);
        if self.seen.contains_key(&self.key(keyid, nonce)) {
            return Err(AuthError::Replayed);
        }
        let held = self.per_key.get(&self.owner(keyid)).copied().unwrap_or(0);
        if held >= key_limit || self.seen.len() >= self.capacity {
            return Err(AuthError::ReplayCacheFull);
        }
        Ok(())
    }

    /// Record the nonce until `forget_at` (exclusive); fails as [`ReplayCache::check`] does
    /// (fail closed rather than forget a live nonce).
    pub fn check_and_insert(
        &mut self,
        keyid: &str,
        nonce: &str,
        forget_at: i64,
        now: i64,
        key_limit: usize,
    ) -> Result<(), AuthError> {
        self.check(keyid, nonce, now, key_limit)?;
        if forget_at <= now {
            // Already past its window: the signature is refused as expired from now on.
            return Ok(());
        }
        let k = self.key(keyid, nonce);
        let owner = self.owner(keyid);
        self.seen.insert(k, (forget_at, owner));
        self.expiry.push(Reverse((forget_at, k)));
        *self.per_key.entry(owner).or_insert(0) += 1;
        Ok(())
    }
}

/// What a verified request proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub tenant: String,
    pub key_id: String,
    /// Lowercase header names covered by the signature.
    pub covered_headers: HashSet<String>,
    /// What the key may ask for.
    pub scope: Arc<Scope>,
}

/// What the head of a request proved; the body is checked by [`PendingAuth::finish`].
///
/// Only [`Verifier::verify_head`] makes one, so holding one means the signature over the head
/// is authentic and was fresh and unreplayed when checked.
#[derive(Debug)]
pub struct PendingAuth {
    tenant: String,
    key_id: String,
    covered_headers: HashSet<String>,
    nonce: String,
    created: i64,
    expires: Option<i64>,
    forget_at: i64,
    /// The signed `Content-Digest` value, when the signature covers it.
    content_digest: Option<String>,
    scope: Arc<Scope>,
}

impl PendingAuth {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// What the key that signed the request may ask for.
    pub fn scope(&self) -> &Arc<Scope> {
        &self.scope
    }

    /// Lowercase header names covered by the signature.
    pub fn covered_headers(&self) -> &HashSet<String> {
        &self.covered_headers
    }

    /// Check `body` against the signed Content-Digest (when covered; a non-empty body whose
    /// digest is not covered is refused), check that the signature is still within its time
    /// window at `now` (the body may have taken a while), then record the nonce (`Replayed`
    /// if another request recorded it meanwhile). Nothing is recorded on failure, so a request
    /// whose body was damaged does not burn its nonce.
    pub fn finish(self, verifier: &Verifier, body: &[u8], now: i64) -> Result<Verified, AuthError> {
        let (verified, nonce) = self.finish_unrecorded(verifier, body, now)?;
        verifier.record_local(&nonce)?;
        Ok(verified)
    }

    /// [`PendingAuth::finish`] without recording the nonce: the caller records the returned
    /// [`NonceRecord`] (in a replay store shared by replicas, or with
    /// [`Verifier::record_local`]) before it trusts the request.
    pub fn finish_unrecorded(
        self,
        verifier: &Verifier,
        body: &[u8],
        now: i64,
    ) -> Result<(Verified, NonceRecord), AuthError> {
        // Re-checked because the replay entry of this nonce is dropped at `forget_at`: a copy
        // whose head was checked in time but whose body ended later must not slip through.
        verifier.check_time(self.created, self.expires, now)?;
        match &self.content_digest {
            Some(v) => {
                digest::verify(v, body).map_err(|e| AuthError::DigestMismatch(e.to_string()))?;
            }
            None if !body.is_empty() => {
                return Err(malformed(
                    "content-digest must be covered when there is a body",
                ));
            }
            None => {}
        }
        let record = NonceRecord {
            key_id: self.key_id.clone(),
            nonce: self.nonce,
            forget_at: self.forget_at,
            now,
            key_share: verifier.key_share,
        };
        Ok((
            Verified {
                tenant: self.tenant,
                key_id: self.key_id,
                covered_headers: self.covered_headers,
                scope: self.scope,
            },
            record,
        ))
    }
}

/// A verified request's nonce, to be remembered until `forget_at` (unix seconds, exclusive);
/// its key id may hold `key_share` live nonces at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonceRecord {
    pub key_id: String,
    pub nonce: String,
    pub forget_at: i64,
    pub now: i64,
    pub key_share: usize,
}

/// Whether the head announces a body: any `Transfer-Encoding`, or a `Content-Length` other
/// than 0 (an unparsable one counts as a body).
fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0))
}

/// The sidecar's verification policy.
pub struct Verifier {
    label: String,
    keys: HashMap<String, LoadedKey>,
    max_skew: i64,
    replay: Arc<Mutex<ReplayCache>>,
    /// Live nonces one key id may hold: the cache's capacity shared by the key ids, at least 1.
    key_share: usize,
}

impl Verifier {
    pub fn new(
        label: String,
        keys: Vec<LoadedKey>,
        max_skew_secs: u64,
        replay: Arc<Mutex<ReplayCache>>,
    ) -> Self {
        let mut map: HashMap<String, LoadedKey> = HashMap::new();
        for k in keys {
            match map.get_mut(&k.id) {
                // Several entries with one id: all their secrets verify, bindings must agree
                // (validated as the union, which is what an operator listing them means).
                Some(existing) => {
                    existing.secrets.extend(k.secrets);
                    existing.tenants = match (&existing.tenants, k.tenants) {
                        (
                            crate::config::TenantBinding::Only(a),
                            crate::config::TenantBinding::Only(b),
                        ) => crate::config::TenantBinding::Only(a.union(&b).cloned().collect()),
                        _ => crate::config::TenantBinding::Any,
                    };
                }
                None => {
                    map.insert(k.id.clone(), k);
                }
            }
        }
        let capacity = replay.lock().unwrap_or_else(|e| e.into_inner()).capacity();
        let key_share = (capacity / map.len().max(1)).max(1);
        Self {
            label,
            keys: map,
            // Config validation bounds the skew to an hour; clamp anyway so that no
            // arithmetic on it can overflow.
            max_skew: max_skew_secs.min(1 << 40) as i64,
            replay,
            key_share,
        }
    }

    /// Live nonces each key id may hold in the replay cache.
    pub fn key_share(&self) -> usize {
        self.key_share
    }

    /// Record `n` in this process's replay cache (`Replayed` / `ReplayCacheFull` as
    /// [`ReplayCache::check_and_insert`]).
    pub fn record_local(&self, n: &NonceRecord) -> Result<(), AuthError> {
        self.replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_and_insert(&n.key_id, &n.nonce, n.forget_at, n.now, n.key_share)
    }

    /// A signature is accepted at `now` in `[created - skew, created + skew]` and before
    /// `expires`.
    fn check_time(&self, created: i64, expires: Option<i64>, now: i64) -> Result<(), AuthError> {
        if created > now.saturating_add(self.max_skew) {
            return Err(AuthError::Expired("created is in the future".into()));
        }
        if created < now.saturating_sub(self.max_skew) {
            return Err(AuthError::Expired("created is too old".into()));
        }
        if let Some(exp) = expires
            && exp <= now
        {
            return Err(AuthError::Expired("expires has passed".into()));
        }
        Ok(())
    }

    /// Everything that can be checked without the body: the signature (its base covers the
    /// `Content-Digest` header value), alg, created/expires, keyid, the tenant header and the
    /// key's tenant binding, and the replay cache (checked, not recorded, so a replayed or
    /// forged request is refused before its body is read). A head that declares a body
    /// (`Content-Length` > 0 or any `Transfer-Encoding`) or carries `Content-Digest` must
    /// cover `content-digest`.
    pub fn verify_head(&self, req: RequestView<'_>, now: i64) -> Result<PendingAuth, AuthError> {
        let found = find_signature(req.headers, &self.label)?;
        let p = &found.params;
        if let Some(alg) = &p.alg
            && alg != ALG
        {
            return Err(malformed(format!("alg must be {ALG}")));
        }
        let created = p
            .created
            .ok_or_else(|| malformed("created parameter is required"))?;
        let nonce = p
            .nonce
            .as_deref()
            .ok_or_else(|| malformed("nonce parameter is required"))?;
        if nonce.is_empty() || nonce.len() > 256 {
            return Err(malformed("nonce must be 1-256 characters"));
        }
        let keyid = p
            .keyid
            .as_deref()
            .ok_or_else(|| malformed("keyid parameter is required"))?;
        let has = |c: &str| p.components.iter().any(|x| x == c);
        for required in ["@method", "@path", TENANT_HEADER] {
            if !has(required) {
                return Err(malformed(format!("{required} must be covered")));
            }
        }
        let digest_covered = has("content-digest");
        if (declares_body(req.headers) || req.headers.contains_key("content-digest"))
            && !digest_covered
        {
            return Err(malformed(
                "content-digest must be covered when there is a body",
            ));
        }
        let key = self.keys.get(keyid).ok_or(AuthError::UnknownKey)?;
        let base = signature_base(req, &p.components, &found.params_value)?;
        if !key
            .secrets
            .iter()
            .any(|s| hmac_verify(s, &base, &found.signature))
        {
            return Err(AuthError::BadSignature);
        }
        // Authentic from here on: check time, binding, replay.
        self.check_time(created, p.expires, now)?;
        let tenant = req
            .headers
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Missing(format!("no {TENANT_HEADER} header")))?;
        if req.headers.get_all(TENANT_HEADER).iter().count() != 1 {
            return Err(malformed(format!("{TENANT_HEADER} appears more than once")));
        }
        if !key.tenants.allows(&tenant) {
            return Err(AuthError::TenantMismatch);
        }
        // The exact value the signature covers (all field lines, trimmed and joined).
        let content_digest = if digest_covered {
            Some(component_value(req, "content-digest")?)
        } else {
            None
        };
        // The signature is accepted until created + skew (and before expires), so the nonce
        // must be remembered that long, even when `created` lies in the future; the cache
        // orders expiry by this time, so a late one delays no one else's expiry.
        let mut forget_at = created.saturating_add(self.max_skew).saturating_add(1);
        if let Some(exp) = p.expires {
            forget_at = forget_at.min(exp);
        }
        self.replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(keyid, nonce, now, self.key_share)?;
        let covered_headers = p
            .components
            .iter()
            .filter(|c| !c.starts_with('@'))
            .cloned()
            .collect();
        Ok(PendingAuth {
            tenant,
            key_id: keyid.to_string(),
            covered_headers,
            nonce: nonce.to_string(),
            created,
            expires: p.expires,
            forget_at,
            content_digest,
            scope: key.scope.clone(),
        })
    }

    /// Verify `req` with `body` at unix time `now`: [`Verifier::verify_head`] then
    /// [`PendingAuth::finish`]. Fails closed on anything unexpected.
    pub fn verify(
        &self,
        req: RequestView<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, AuthError> {
        self.verify_head(req, now)?.finish(self, body, now)
    }
}

/// What to sign.
#[derive(Debug, Clone)]
pub struct SignOptions {
    pub label: String,
    pub key_id: String,
    pub created: i64,
    pub expires: Option<i64>,
    /// `None` draws 16 random bytes.
    pub nonce: Option<String>,
    /// Extra components beyond the defaults (`@method`, `@path`, `x-bulkhead-tenant`,
    /// `content-digest` with a body, and every other `x-bulkhead-*` header present).
    pub extra_components: Vec<String>,
    pub include_alg: bool,
}

impl SignOptions {
    pub fn new(key_id: impl Into<String>, created: i64) -> Self {
        Self {
            label: "bulkhead".into(),
            key_id: key_id.into(),
            created,
            expires: None,
            nonce: None,
            extra_components: Vec::new(),
            include_alg: true,
        }
    }
}

/// A fresh random nonce (16 bytes, base64url).
pub fn random_nonce() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system RNG available");
    URL_SAFE_NO_PAD.encode(b)
}

/// Sign a request as a gateway would: sets `Content-Digest` (when there is a body and none is
/// present), `Signature-Input` and `Signature`. The tenant header must already be set.
pub fn sign_request(
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    body: &[u8],
    key: &[u8],
    opts: &SignOptions,
) -> Result<(), AuthError> {
    if !body.is_empty() && !headers.contains_key("content-digest") {
        headers.insert(
            "content-digest",
            HeaderValue::from_str(&digest::content_digest_sha256(body))
                .expect("digest is a valid header value"),
        );
    }
    let mut components: Vec<String> = vec!["@method".into(), "@path".into()];
    let mut names: Vec<String> = headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with(RESERVED_PREFIX))
        .collect();
    names.sort();
    names.dedup();
    components.extend(names);
    if headers.contains_key("content-digest") {
        components.push("content-digest".into());
    }
    for c in &opts.extra_components {
        if !components.contains(c) {
            components.push(c.clone());
        }
    }
    let params = SigParams {
        components,
        created: Some(opts.created),
        expires: opts.expires,
        nonce: Some(opts.nonce.clone().unwrap_or_else(random_nonce)),
        keyid: Some(opts.key_id.clone()),
        alg: opts.include_alg.then(|| ALG.to_string()),
        tag: None,
    };
    let params_value = serialize_inner_list(params.to_inner_list()?)?;
    let view = RequestView {
        method,
        uri,
        headers,
    };
    let base = signature_base(view, &params.components, &params_value)?;
    let sig = hmac_sign(key, &base);
    let input = format!("{}={}", opts.label, params_value);
    let sig = format!("{}=:{}:", opts.label, STANDARD.encode(sig));
    headers.insert(
        "signature-input",
        HeaderValue::from_str(&input).map_err(|_| malformed("bad Signature-Input value"))?,
    );
    headers.insert(
        "signature",
        HeaderValue::from_str(&sig).map_err(|_| malformed("bad Signature value"))?,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantBinding;

    // RFC 9421 appendix B.1.5, "test-shared-secret".
    const SHARED_SECRET_B64: &str =
        "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==";

    fn test_request() -> (Method, Uri, HeaderMap) {
        // RFC 9421 appendix B.2, the test request.
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert(
            "date",
            HeaderValue::from_static("Tue, 20 Apr 2021 02:07:55 GMT"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("content-digest", HeaderValue::from_static("sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"));
        h.insert("content-length", HeaderValue::from_static("18"));
        (Method::POST, "/foo?param=Value&Pet=dog".parse().unwrap(), h)
    }

    #[test]
    fn rfc9421_b25_hmac_sha256() {
        let (m, u, mut h) = test_request();
        h.insert("signature-input", HeaderValue::from_static(
            "sig-b25=(\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""));
        h.insert(
            "signature",
            HeaderValue::from_static("sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"),
        );
        let found = find_signature(&h, "sig-b25").unwrap();
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        let base = signature_base(view, &found.params.components, &found.params_value).unwrap();
        assert_eq!(
            base,
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\"content-type\": application/json\n\"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
        );
        let key = STANDARD.decode(SHARED_SECRET_B64).unwrap();
        assert!(hmac_verify(&key, &base, &found.signature));
        assert_eq!(
            STANDARD.encode(hmac_sign(&key, &base)),
            "pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8="
        );
        assert!(!hmac_verify(
            b"another key entirely",
            &base,
            &found.signature
        ));
    }

    #[test]
    fn derived_components_follow_rfc_2_2() {
        // RFC 9421 section 2.2 examples for the request `POST /path?param=value` to www.example.com.
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("www.example.com"));
        let u: Uri = "/path?param=value".parse().unwrap();
        let v = RequestView {
            method: &Method::POST,
            uri: &u,
            headers: &h,
        };
        assert_eq!(component_value(v, "@method").unwrap(), "POST");
        assert_eq!(component_value(v, "@authority").unwrap(), "www.example.com");
        assert_eq!(component_value(v, "@path").unwrap(), "/path");
        assert_eq!(component_value(v, "@query").unwrap(), "?param=value");
        assert_eq!(
            component_value(v, "@request-target").unwrap(),
            "/path?param=value"
        );
        assert_eq!(
            component_value(v, "@target-uri").unwrap(),
            "http://www.example.com/path?param=value"
        );
        let u2: Uri = "/path".parse().unwrap();
        let v2 = RequestView { uri: &u2, ..v };
        assert_eq!(component_value(v2, "@query").unwrap(), "?");
        // Section 2.1: multiple field lines are trimmed and joined with ", ".
        let mut h3 = HeaderMap::new();
        h3.append("x-list", HeaderValue::from_static("  a, b "));
        h3.append("x-list", HeaderValue::from_static("c"));
        let v3 = RequestView { headers: &h3, ..v };
        assert_eq!(component_value(v3, "x-list").unwrap(), "a, b, c");
        assert!(matches!(
            component_value(v3, "x-absent"),
            Err(AuthError::Missing(_))
        ));
        assert!(component_value(v3, "@query-param").is_err());
        // Two Host lines make the authority ambiguous: refused rather than reading the first.
        let mut h4 = h.clone();
        h4.append("host", HeaderValue::from_static("evil.example"));
        let v4 = RequestView { headers: &h4, ..v };
        assert!(matches!(
            component_value(v4, "@authority"),
            Err(AuthError::Malformed(_))
        ));
    }

    fn verifier(tenants: TenantBinding) -> Verifier {
        let key = LoadedKey {
            id: "gw".into(),
            secrets: vec![b"0123456789abcdef0123456789abcdef".to_vec()],
            tenants,
            scope: Default::default(),
        };
        Verifier::new(
            "bulkhead".into(),
            vec![key],
            30,
            Arc::new(Mutex::new(ReplayCache::new(16))),
        )
    }

    fn signed(body: &[u8], tenant: &str, created: i64, nonce: &str) -> (Method, Uri, HeaderMap) {
        let m = Method::POST;
        let u: Uri = "/v1/chat/completions".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_str(tenant).unwrap());
        let mut o = SignOptions::new("gw", created);
        o.nonce = Some(nonce.into());
        sign_request(
            &m,
            &u,
            &mut h,
            body,
            b"0123456789abcdef0123456789abcdef",
            &o,
        )
        .unwrap();
        (m, u, h)
    }

    #[test]
    fn sign_then_verify_and_policy() {
        let v = verifier(TenantBinding::Any);
        let body = br#"{"model":"m"}"#;
        let (m, u, h) = signed(body, "acme", 1000, "n1");
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        let ok = v.verify(view, body, 1005).unwrap();
        assert_eq!(ok.tenant, "acme");
        assert!(ok.covered_headers.contains("content-digest"));
        // Replay.
        assert_eq!(v.verify(view, body, 1006), Err(AuthError::Replayed));
        // Body changed: digest mismatch (signature still fine).
        let (m, u, h) = signed(body, "acme", 1000, "n2");
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert!(matches!(
            v.verify(view, b"{}", 1000),
            Err(AuthError::DigestMismatch(_))
        ));
        // The failed attempt did not burn the nonce.
        v.verify(view, body, 1000).unwrap();
        // Too old / future.
        let (m, u, h) = signed(body, "acme", 1000, "n3");
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert!(matches!(
            v.verify(view, body, 1031),
            Err(AuthError::Expired(_))
        ));
        assert!(matches!(
            v.verify(view, body, 969),
            Err(AuthError::Expired(_))
        ));
        // Tampered method.
        let view = RequestView {
            method: &Method::PUT,
            uri: &u,
            headers: &h,
        };
        assert_eq!(v.verify(view, body, 1000), Err(AuthError::BadSignature));
    }

    #[test]
    fn foreign_parameter_order_and_whitespace_verify() {
        // Another implementation may order parameters differently and add optional spaces;
        // the signature base uses the canonical serialization in the order received.
        let m = Method::GET;
        let u: Uri = "/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_static("acme"));
        let base = "\"@method\": GET\n\"@path\": /v1/models\n\"x-bulkhead-tenant\": acme\n\"@signature-params\": (\"@method\" \"@path\" \"x-bulkhead-tenant\");keyid=\"gw\";nonce=\"abc\";tag=\"t\";created=1000";
        let key = b"0123456789abcdef0123456789abcdef";
        let sig = STANDARD.encode(hmac_sign(key, base));
        h.insert("signature-input", HeaderValue::from_str(
            "other=(\"@method\");created=1, bulkhead=(  \"@method\" \"@path\"   \"x-bulkhead-tenant\" );keyid=\"gw\";nonce=\"abc\";tag=\"t\";created=1000").unwrap());
        h.insert(
            "signature",
            HeaderValue::from_str(&format!("other=:AAAA:, bulkhead=:{sig}:")).unwrap(),
        );
        let v = verifier(TenantBinding::Any);
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert_eq!(v.verify(view, b"", 1000).unwrap().tenant, "acme");
    }

    /// A GET for tenant acme signed by hand over `components` with `params` after them, as
    /// another implementation would send it.
    fn hand_signed(components: &[&str], params: &str) -> (Method, Uri, HeaderMap) {
        let m = Method::GET;
        let u: Uri = "/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_static("acme"));
        let quoted: Vec<String> = components.iter().map(|c| format!("\"{c}\"")).collect();
        let list = format!("({}){params}", quoted.join(" "));
        let mut base = String::new();
        for c in components {
            let v = match *c {
                "@method" => "GET",
                "@path" => "/v1/models",
                TENANT_HEADER => "acme",
                _ => "?",
            };
            base.push_str(&format!("\"{c}\": {v}\n"));
        }
        base.push_str(&format!("\"@signature-params\": {list}"));
        let sig = STANDARD.encode(hmac_sign(b"0123456789abcdef0123456789abcdef", &base));
        h.insert(
            "signature-input",
            HeaderValue::from_str(&format!("bulkhead={list}")).unwrap(),
        );
        h.insert(
            "signature",
            HeaderValue::from_str(&format!("bulkhead=:{sig}:")).unwrap(),
        );
        (m, u, h)
    }

    #[test]
    fn expires_alg_and_derived_components_are_enforced() {
        let v = verifier(TenantBinding::Any);
        let check = |components: &[&str], params: &str, now: i64| {
            let (m, u, h) = hand_signed(components, params);
            let view = RequestView {
                method: &m,
                uri: &u,
                headers: &h,
            };
            v.verify(view, b"", now).map(|ok| ok.tenant)
        };
        let std = ["@method", "@path", TENANT_HEADER];
        // A validly signed request past its own `expires` is refused; before it, accepted.
        assert_eq!(
            check(
                &std,
                r#";created=1000;expires=1005;keyid="gw";nonce="e1""#,
                1005
            ),
            Err(AuthError::Expired("expires has passed".into()))
        );
        assert_eq!(
            check(
                &std,
                r#";created=1000;expires=1005;keyid="gw";nonce="e2""#,
                1004
            ),
            Ok("acme".into())
        );
        // An `alg` other than HMAC-SHA256 is refused, though the HMAC is right.
        assert_eq!(
            check(
                &std,
                r#";created=1000;keyid="gw";nonce="a1";alg="rsa-pss-sha512""#,
                1000
            ),
            Err(AuthError::Malformed("alg must be hmac-sha256".into()))
        );
        // A derived component this verifier does not compute is named as such.
        let mut more = std.to_vec();
        more.push("@status");
        assert_eq!(
            check(&more, r#";created=1000;keyid="gw";nonce="s1""#, 1000),
            Err(AuthError::Malformed(
                "unsupported derived component @status".into()
            ))
        );
        // A `tag` is covered and otherwise ignored.
        assert_eq!(
            check(
                &std,
                r#";created=1000;keyid="gw";nonce="t1";tag="app""#,
                1000
            ),
            Ok("acme".into())
        );
    }

    #[test]
    fn a_key_ids_share_counts_its_live_nonces_as_some_expire() {
        let mut cache = ReplayCache::new(16);
        cache.check_and_insert("gw", "n1", 10, 0, 2).unwrap();
        cache.check_and_insert("gw", "n2", 20, 0, 2).unwrap();
        // n1 expires; n2 still counts: one more fits the share of 2, not two.
        cache.check_and_insert("gw", "n3", 30, 15, 2).unwrap();
        assert_eq!(
            cache.check_and_insert("gw", "n4", 30, 15, 2),
            Err(AuthError::ReplayCacheFull)
        );
        // All expired: the key id holds nothing.
        cache.check_and_insert("gw", "n5", 40, 35, 2).unwrap();
        cache.check_and_insert("gw", "n6", 40, 35, 2).unwrap();
        assert_eq!(
            format!("{cache:?}"),
            "ReplayCache { capacity: 16, len: 2, key_ids: 1 }"
        );
    }

    #[test]
    fn nonces_are_1_to_256_characters_and_fresh_ones_are_random() {
        let v = verifier(TenantBinding::Any);
        let check = |nonce: &str| {
            let (m, u, h) = signed(b"", "acme", 1000, nonce);
            let view = RequestView {
                method: &m,
                uri: &u,
                headers: &h,
            };
            v.verify_head(view, 1000).map(|p| p.tenant().to_string())
        };
        let too = Err(AuthError::Malformed(
            "nonce must be 1-256 characters".into(),
        ));
        assert_eq!(check(""), too);
        assert_eq!(check(&"n".repeat(257)), too);
        assert_eq!(check(&"n".repeat(256)), Ok("acme".into()));
        assert_eq!(check("n"), Ok("acme".into()));
        // 16 random bytes, base64url: 22 characters, never the same twice.
        let (a, b) = (random_nonce(), random_nonce());
        assert_eq!((a.len(), b.len()), (22, 22));
        assert_ne!(a, b);
        assert!(URL_SAFE_NO_PAD.decode(&a).is_ok(), "{a}");
    }

    #[test]
    fn a_verified_head_carries_the_signing_keys_scope() {
        let scope = Scope {
            models: Some(["m1".to_string()].into()),
            max_tokens: Some(64),
            ..Scope::default()
        };
        let mut v = verifier(TenantBinding::Any);
        let key = LoadedKey {
            id: "gw".into(),
            secrets: vec![b"0123456789abcdef0123456789abcdef".to_vec()],
            tenants: TenantBinding::Any,
            scope: Arc::new(scope.clone()),
        };
        v.keys.insert("gw".into(), key);
        let (m, u, h) = signed(b"", "acme", 1000, "sc");
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert_eq!(**v.verify_head(view, 1000).unwrap().scope(), scope);
    }

    #[test]
    fn a_signer_covers_each_extra_component_once() {
        let m = Method::GET;
        let u: Uri = "http://api.example/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_static("acme"));
        let mut o = SignOptions::new("gw", 1000);
        o.nonce = Some("x1".into());
        o.extra_components = vec!["@authority".into(), "@method".into()];
        sign_request(&m, &u, &mut h, b"", b"0123456789abcdef0123456789abcdef", &o).unwrap();
        let input = h["signature-input"].to_str().unwrap();
        assert!(
            input.starts_with(r#"bulkhead=("@method" "@path" "x-bulkhead-tenant" "@authority");"#),
            "{input}"
        );
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert_eq!(
            verifier(TenantBinding::Any)
                .verify(view, b"", 1000)
                .unwrap()
                .tenant,
            "acme"
        );
    }

    #[test]
    fn reasons_are_the_documented_metric_labels() {
        let s = String::new;
        let all = [
            (AuthError::Missing(s()), "missing"),
            (AuthError::Malformed(s()), "malformed"),
            (AuthError::BadSignature, "bad_signature"),
            (AuthError::Expired(s()), "expired"),
            (AuthError::Replayed, "replayed"),
            (AuthError::UnknownKey, "unknown_key"),
            (AuthError::TenantMismatch, "tenant_mismatch"),
            (AuthError::DigestMismatch(s()), "digest_mismatch"),
            (AuthError::UnknownTenant, "unknown_tenant"),
            (AuthError::ReplayCacheFull, "replay_cache_full"),
            (AuthError::AlgNotAllowed(s()), "alg_not_allowed"),
            (AuthError::KeyMismatch, "key_mismatch"),
            (AuthError::NotYetValid(s()), "not_yet_valid"),
            (AuthError::WrongIssuer, "wrong_issuer"),
            (AuthError::WrongAudience, "wrong_audience"),
            (AuthError::ClaimMissing(s()), "claim_missing"),
            (AuthError::UnknownTier, "unknown_tier"),
            (AuthError::MethodNotAccepted("jwt"), "method_not_accepted"),
            (
                AuthError::TenantNotAllowedForIssuer,
                "tenant_not_allowed_for_issuer",
            ),
            (AuthError::WrongType, "wrong_type"),
            (AuthError::AzpNotAllowed, "azp_not_allowed"),
        ];
        for (e, reason) in &all {
            assert_eq!(e.reason(), *reason, "{e:?}");
        }
        // The metric series made up front are exactly these.
        let listed: Vec<&str> = all.iter().map(|(_, r)| *r).collect();
        assert_eq!(AuthError::REASONS.to_vec(), listed);
    }

    #[test]
    fn the_replay_caches_debug_output_gives_its_size_not_its_nonces() {
        let mut cache = ReplayCache::new(16);
        assert!(cache.is_empty());
        cache
            .check_and_insert("gw", "secret-nonce", 2000, 1000, 16)
            .unwrap();
        assert!(!cache.is_empty());
        let dbg = format!("{cache:?}");
        assert_eq!(dbg, "ReplayCache { capacity: 16, len: 1, key_ids: 1 }");
    }

    #[test]
    fn tenant_binding() {
        let v = verifier(TenantBinding::Only(["acme".to_string()].into()));
        let (m, u, h) = signed(b"", "globex", 1000, "n");
        let view = RequestView {
            method: &m,
            uri: &u,
            headers: &h,
        };
        assert_eq!(v.verify(view, b"", 1000), Err(AuthError::TenantMismatch));
    }

    #[test]
    fn replay_cache_is_bounded_and_forgets() {
        let mut c = ReplayCache::new(2);
        c.check_and_insert("k", "a", 10, 0, 2).unwrap();
        c.check_and_insert("k", "b", 10, 0, 2).unwrap();
        assert_eq!(
            c.check_and_insert("k", "c", 10, 0, 2),
            Err(AuthError::ReplayCacheFull)
        );
        assert_eq!(
            c.check_and_insert("k", "a", 10, 5, 2),
            Err(AuthError::Replayed)
        );
        c.check_and_insert("k", "c", 20, 10, 2).unwrap();
        assert_eq!(c.len(), 1);
    }

    fn two_key_verifier(capacity: usize) -> (Verifier, Arc<Mutex<ReplayCache>>) {
        let cache = Arc::new(Mutex::new(ReplayCache::new(capacity)));
        let keys = ["a", "b"]
            .iter()
            .map(|id| LoadedKey {
                id: id.to_string(),
                secrets: vec![format!("secret-of-{id}-0123456789abcdef").into_bytes()],
                tenants: TenantBinding::Any,
                scope: Default::default(),
            })
            .collect();
        (
            Verifier::new("bulkhead".into(), keys, 30, cache.clone()),
            cache,
        )
    }

    fn signed_by(key_id: &str, created: i64, nonce: &str) -> (Method, Uri, HeaderMap) {
        let m = Method::GET;
        let u: Uri = "/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_static("acme"));
        let mut o = SignOptions::new(key_id, created);
        o.nonce = Some(nonce.into());
        let secret = format!("secret-of-{key_id}-0123456789abcdef");
        sign_request(&m, &u, &mut h, b"", secret.as_bytes(), &o).unwrap();
        (m, u, h)
    }

    fn verify_at(
        v: &Verifier,
        r: &(Method, Uri, HeaderMap),
        now: i64,
    ) -> Result<Verified, AuthError> {
        let view = RequestView {
            method: &r.0,
            uri: &r.1,
            headers: &r.2,
        };
        v.verify(view, b"", now)
    }

    #[test]
    fn one_key_filling_its_share_does_not_lock_out_another() {
        let (v, _) = two_key_verifier(4);
        verify_at(&v, &signed_by("a", 1000, "a1"), 1000).unwrap();
        verify_at(&v, &signed_by("a", 1000, "a2"), 1000).unwrap();
        // Key a has used its half of the capacity: it alone is refused.
        assert_eq!(
            verify_at(&v, &signed_by("a", 1000, "a3"), 1000).unwrap_err(),
            AuthError::ReplayCacheFull
        );
        verify_at(&v, &signed_by("b", 1000, "b1"), 1000).unwrap();
        verify_at(&v, &signed_by("b", 1000, "b2"), 1000).unwrap();
        assert_eq!(
            verify_at(&v, &signed_by("b", 1000, "b3"), 1000).unwrap_err(),
            AuthError::ReplayCacheFull
        );
        // Once a's nonces are past their window, a is accepted again.
        verify_at(&v, &signed_by("a", 1040, "a3"), 1040).unwrap();
    }

    #[test]
    fn a_late_expiring_entry_does_not_keep_earlier_ones_alive() {
        let (v, cache) = two_key_verifier(100);
        // Inserted first, `created` 30 s ahead: remembered until 1061.
        verify_at(&v, &signed_by("a", 1030, "future"), 1000).unwrap();
        for i in 0..10 {
            verify_at(&v, &signed_by("a", 1000, &format!("n{i}")), 1000).unwrap();
        }
        assert_eq!(cache.lock().unwrap().len(), 11);
        // At 1031 the ten are expired (created + skew < now); one more request triggers expiry.
        verify_at(&v, &signed_by("b", 1031, "later"), 1031).unwrap();
        assert_eq!(cache.lock().unwrap().len(), 2);
        // The future one is still live: its replay is refused until its window closes.
        assert_eq!(
            verify_at(&v, &signed_by("a", 1030, "future"), 1060).unwrap_err(),
            AuthError::Replayed
        );
        verify_at(&v, &signed_by("a", 1030, "future"), 1061).unwrap_err();
    }

    fn view(r: &(Method, Uri, HeaderMap)) -> RequestView<'_> {
        RequestView {
            method: &r.0,
            uri: &r.1,
            headers: &r.2,
        }
    }

    #[test]
    fn forged_or_replayed_heads_fail_before_the_body() {
        let v = verifier(TenantBinding::Any);
        let body = br#"{"model":"m"}"#;
        // A forged signature is refused from the head alone.
        let mut forged = signed(body, "acme", 1000, "f1");
        forged.2.insert(
            "signature",
            HeaderValue::from_static("bulkhead=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"),
        );
        assert_eq!(
            v.verify_head(view(&forged), 1000).unwrap_err(),
            AuthError::BadSignature
        );
        // A changed covered header likewise (here the tenant).
        let mut tampered = signed(body, "acme", 1000, "f2");
        tampered
            .2
            .insert(TENANT_HEADER, HeaderValue::from_static("globex"));
        assert_eq!(
            v.verify_head(view(&tampered), 1000).unwrap_err(),
            AuthError::BadSignature
        );
        // A replay is refused from the head alone once the original has finished.
        let r = signed(body, "acme", 1000, "r1");
        let p = v.verify_head(view(&r), 1000).unwrap();
        assert_eq!((p.tenant(), p.key_id()), ("acme", "gw"));
        assert!(p.covered_headers().contains("content-digest"));
        p.finish(&v, body, 1001).unwrap();
        assert_eq!(
            v.verify_head(view(&r), 1002).unwrap_err(),
            AuthError::Replayed
        );
    }

    #[test]
    fn digest_mismatch_fails_in_finish_without_burning_the_nonce() {
        let v = verifier(TenantBinding::Any);
        let body = br#"{"model":"m"}"#;
        let r = signed(body, "acme", 1000, "d1");
        let p = v.verify_head(view(&r), 1000).unwrap();
        assert!(matches!(
            p.finish(&v, b"{\"model\":\"x\"}", 1000),
            Err(AuthError::DigestMismatch(_))
        ));
        // The legitimate request with the same nonce still verifies, once.
        let p = v.verify_head(view(&r), 1001).unwrap();
        assert_eq!(p.finish(&v, body, 1001).unwrap().tenant, "acme");
        assert_eq!(v.verify(view(&r), body, 1002), Err(AuthError::Replayed));
    }

    #[test]
    fn of_two_pending_heads_with_one_nonce_only_the_first_finish_wins() {
        let v = verifier(TenantBinding::Any);
        let body = b"hello";
        let r = signed(body, "acme", 1000, "c1");
        let first = v.verify_head(view(&r), 1000).unwrap();
        let second = v.verify_head(view(&r), 1000).unwrap();
        first.finish(&v, body, 1001).unwrap();
        assert_eq!(second.finish(&v, body, 1001), Err(AuthError::Replayed));
    }

    #[test]
    fn a_copy_whose_body_ends_after_the_window_is_refused() {
        // The copy's head is checked while the original is still in flight; the original's
        // nonce is forgotten at created + skew + 1, so the copy must not finish after that.
        let v = verifier(TenantBinding::Any);
        let body = b"hello";
        let r = signed(body, "acme", 1000, "slow");
        let copy = v.verify_head(view(&r), 1000).unwrap();
        v.verify(view(&r), body, 1001).unwrap();
        assert!(matches!(
            copy.finish(&v, body, 1031),
            Err(AuthError::Expired(_))
        ));
        // Within the window the cache still refuses it.
        let r = signed(body, "acme", 1000, "slow2");
        let copy = v.verify_head(view(&r), 1000).unwrap();
        v.verify(view(&r), body, 1000).unwrap();
        assert_eq!(copy.finish(&v, body, 1030), Err(AuthError::Replayed));
    }

    #[test]
    fn a_declared_body_needs_a_covered_digest_before_it_is_read() {
        let v = verifier(TenantBinding::Any);
        // Signed without a body, so content-digest is not covered.
        for (name, value) in [
            ("content-length", "5"),
            ("content-length", "not a number"),
            ("transfer-encoding", "chunked"),
        ] {
            let mut r = signed(b"", "acme", 1000, name);
            r.2.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            assert!(
                matches!(v.verify_head(view(&r), 1000), Err(AuthError::Malformed(_))),
                "{name}: {value}"
            );
        }
        let mut r = signed(b"", "acme", 1000, "zero");
        r.2.insert("content-length", HeaderValue::from_static("0"));
        let p = v.verify_head(view(&r), 1000).unwrap();
        // A body that arrives without a declared length (HTTP/2) is refused by finish.
        assert!(matches!(
            p.finish(&v, b"smuggled", 1000),
            Err(AuthError::Malformed(_))
        ));
        v.verify(view(&r), b"", 1000).unwrap();
    }

    #[test]
    fn the_digest_checked_is_the_signed_value_of_every_field_line() {
        // Content-Digest split over two field lines: the signature covers "a, b" and the body
        // is checked against both members.
        let v = verifier(TenantBinding::Any);
        let body = b"hello";
        let m = Method::POST;
        let u: Uri = "/v1/chat/completions".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, HeaderValue::from_static("acme"));
        h.append(
            "content-digest",
            HeaderValue::from_str(&digest::content_digest_sha256(body)).unwrap(),
        );
        h.append("content-digest", HeaderValue::from_static("sha-512=:AAAA:"));
        let mut o = SignOptions::new("gw", 1000);
        o.nonce = Some("two-lines".into());
        sign_request(
            &m,
            &u,
            &mut h,
            body,
            b"0123456789abcdef0123456789abcdef",
            &o,
        )
        .unwrap();
        let r = (m, u, h);
        assert!(matches!(
            v.verify(view(&r), body, 1000),
            Err(AuthError::DigestMismatch(_))
        ));
    }

    #[test]
    fn replay_cache_shares_capacity_per_key() {
        let mut c = ReplayCache::new(4);
        c.check_and_insert("a", "1", 100, 0, 2).unwrap();
        c.check_and_insert("a", "2", 100, 0, 2).unwrap();
        assert_eq!(
            c.check_and_insert("a", "3", 100, 0, 2),
            Err(AuthError::ReplayCacheFull)
        );
        assert_eq!(c.check("a", "3", 0, 2), Err(AuthError::ReplayCacheFull));
        c.check_and_insert("b", "1", 100, 0, 2).unwrap();
        c.check_and_insert("b", "2", 100, 0, 2).unwrap();
        // The total still bounds memory.
        assert_eq!(
            c.check_and_insert("c", "1", 100, 0, 2),
            Err(AuthError::ReplayCacheFull)
        );
        // Replays are reported as such even when full.
        assert_eq!(c.check("b", "2", 0, 2), Err(AuthError::Replayed));
        let v = Verifier::new(
            "bulkhead".into(),
            Vec::new(),
            30,
            Arc::new(Mutex::new(ReplayCache::new(7))),
        );
        assert_eq!(v.key_share(), 7);
        let (v, _) = two_key_verifier(7);
        assert_eq!(v.key_share(), 3);
        let (v, _) = two_key_verifier(1);
        assert_eq!(v.key_share(), 1);
    }

    #[test]
    fn live_nonces_are_never_forgotten_before_they_expire() {
        // Entries with scattered expiry times, inserted in no particular order.
        let mut c = ReplayCache::new(10_000);
        let mut live = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let forget_at = 1 + (x % 200) as i64;
            let key = if i % 3 == 0 { "a" } else { "b" };
            c.check_and_insert(key, &i.to_string(), forget_at, 0, 10_000)
                .unwrap();
            live.push((key, i.to_string(), forget_at));
        }
        for now in 0..=201 {
            for (key, nonce, forget_at) in &live {
                let r = c.check(key, nonce, now, 10_000);
                if *forget_at > now {
                    assert_eq!(r, Err(AuthError::Replayed), "{nonce} at {now}");
                }
            }
            let expected = live.iter().filter(|e| e.2 > now).count();
            assert_eq!(c.len(), expected, "at {now}");
        }
        assert!(c.is_empty());
        assert!(c.per_key.is_empty());
        assert!(c.expiry.is_empty());
    }
}
