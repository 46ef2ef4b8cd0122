//! RFC 9421 HTTP Message Signatures with `hmac-sha256`: the sidecar's fail-closed verification
//! policy ([`Verifier`]), the parsing of `Signature-Input` ([`params`]) and a bounded nonce
//! replay cache ([`replay`]). The signature base and signing are `bulkhead-client`'s
//! (re-exported here), so a signer and the verifier build the base with the same code.

mod params;
mod replay;

pub use bulkhead_client::signature::{
    RequestView, SigParams, SignOptions, SignatureError, component_value, hmac_sign, hmac_verify,
    random_nonce, sign_request, signature_base,
};
pub use bulkhead_client::{ALG, RESERVED_PREFIX, TENANT_HEADER};
pub use params::{FoundSignature, find_signature, parse_params};
pub use replay::ReplayCache;

use crate::auth::digest;
use crate::auth::scope::Scope;
use crate::config::LoadedKey;
use http::HeaderMap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

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

/// The signature base could not be built: the verifier refuses the request as `missing` or
/// `malformed`.
impl From<SignatureError> for AuthError {
    fn from(e: SignatureError) -> Self {
        match e {
            SignatureError::Missing(m) => AuthError::Missing(m),
            SignatureError::Malformed(m) => AuthError::Malformed(m),
        }
    }
}

fn malformed(m: impl Into<String>) -> AuthError {
    AuthError::Malformed(m.into())
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
    /// The SHA-256 states of the body's prefixes, kept by the Content-Digest check (when the
    /// digest has a sha-256 member) for the forwarded body's digest.
    pub digest_prefixes: Option<digest::Sha256Prefixes>,
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
        let digest_prefixes = match &self.content_digest {
            Some(v) => digest::verify_keeping(v, body)
                .map_err(|e| AuthError::DigestMismatch(e.to_string()))?,
            None if !body.is_empty() => {
                return Err(malformed(
                    "content-digest must be covered when there is a body",
                ));
            }
            None => None,
        };
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
                digest_prefixes,
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

#[cfg(test)]
mod tests;
