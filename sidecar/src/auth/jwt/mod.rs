//! Tenants from JWTs issued by an identity provider (Keycloak, Auth0, ...): compact JWS
//! tokens in `Authorization: Bearer`, verified with `ring` against a JWKS (a file, reloaded
//! with the configuration, and/or an `http://` URL, fetched in the background, bounded in
//! size and time, and kept when the IdP is down). RS256, ES256 and EdDSA (Ed25519) only:
//! `none`, HS* and anything else are refused before a key is looked at, a key is used only
//! for the algorithm of its own type, and header parameters that carry or point at keys
//! (`jwk`, `jku`, `x5u`, `x5c`) are never used.
//!
//! Several issuers (`[[auth.jwt.issuers]]`) each have keys of their own and the tenants their
//! tokens may name: a token is accepted only when its `iss` is the issuer whose key verified
//! it, and names one of that issuer's tenants, so one realm's keys can never mint another
//! realm's tenants.

mod jwks;
#[cfg(test)]
mod tests;

pub use jwks::{
    Alg, IssuerKeys, Jwk, KeySet, MAX_JWKS_KEYS, MAX_JWT_DEPTH, UrlKeys, UrlSettings,
    load_jwks_files,
};
use jwks::{MAX_KID, depth_ok};

use crate::auth::scope::{Routes, Scope, ScopeConfig};
use crate::auth::signature::AuthError;
use crate::config::{ConfigError, JwtConfig, JwtRealm};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Verified tokens remembered at most (per configuration generation).
pub const TOKEN_CACHE_ENTRIES: usize = 4096;

/// A verified token, remembered by the SHA-256 of its exact bytes until it expires, so a
/// client reusing its token is not charged a signature verification per request.
struct CachedToken {
    identity: JwtIdentity,
    /// `exp` plus the leeway: refused from then on.
    valid_until: i64,
    /// The issuer (index in the verifier's) whose key verified it.
    issuer: usize,
    /// That issuer's URL keys it was verified with: a refresh (rotation) forgets it.
    url_keys: Option<Arc<KeySet>>,
}

#[derive(Default)]
struct TokenCache {
    map: HashMap<[u8; 32], CachedToken>,
}

impl TokenCache {
    /// The identity of a remembered token, while it is valid and the URL keys of the issuer
    /// that verified it (`url_keys(issuer)`) are the ones it was verified with.
    fn get(
        &self,
        digest: &[u8; 32],
        now: i64,
        url_keys: impl Fn(usize) -> Option<Arc<KeySet>>,
    ) -> Option<&JwtIdentity> {
        let c = self.map.get(digest)?;
        let current = url_keys(c.issuer);
        let same_keys = match (&c.url_keys, current.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        (same_keys && now < c.valid_until).then_some(&c.identity)
    }

    fn put(&mut self, digest: [u8; 32], entry: CachedToken, now: i64) {
        if self.map.len() >= TOKEN_CACHE_ENTRIES {
            self.map.retain(|_, c| now < c.valid_until);
            if self.map.len() >= TOKEN_CACHE_ENTRIES {
                self.map.clear();
            }
        }
        self.map.insert(digest, entry);
    }
}

/// What a verified token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    /// The tenant claim's value (checked against the configured tenants by the caller).
    pub tenant: String,
    /// The key that signed it.
    pub kid: String,
    /// The token's scope: its tier's, narrowed by its scope claim.
    pub scope: Arc<Scope>,
}

/// One issuer of the verifier: what its tokens may say, and its keys.
#[derive(Debug)]
struct Issuer {
    /// Accepted `iss` values.
    names: Vec<String>,
    /// The tenants its tokens may name; `None`: any.
    tenants: Option<HashSet<String>>,
    /// The header `typ` required, normalized ([`normalize_typ`]).
    typ: Option<String>,
    allowed_azp: Option<Vec<String>>,
    file_keys: KeySet,
    url: Option<Arc<UrlKeys>>,
}

/// A `typ` as compared: lower case, without `application/` (RFC 7515 4.1.9).
fn normalize_typ(t: &str) -> String {
    let t = t.to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_string(),
        None => t,
    }
}

/// The JWT verification policy of one configuration.
#[derive(Debug)]
pub struct JwtVerifier {
    issuers: Vec<Issuer>,
    audiences: Vec<String>,
    algs: Vec<Alg>,
    leeway: i64,
    max_token_bytes: usize,
    tenant_claim: String,
    tier_claim: Option<String>,
    default_tier: Option<String>,
    tiers: HashMap<String, Arc<Scope>>,
    scope_claim: Option<String>,
    /// Routes that accept a JWT.
    pub routes: Routes,
    unlimited: Arc<Scope>,
    cache: std::sync::Mutex<TokenCache>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenCache({} tokens)", self.map.len())
    }
}

/// A claim by name: the name as a whole first (namespaced claims such as
/// `https://example.com/tenant` have dots), then as a dotted path into nested objects.
pub fn claim<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut v = claims;
    for part in name.split('.') {
        v = v.get(part)?;
    }
    Some(v)
}

fn numeric_date(claims: &Value, name: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite() && f.abs() < 1e15)
                    .map(|f| f.floor() as i64)
            })
            .map(Some)
            .ok_or_else(|| AuthError::Malformed(format!("`{name}` is not a NumericDate"))),
    }
}

fn part(s: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed(format!("the token's {what} is not base64url")))
}

fn json_part(bytes: &[u8], what: &str) -> Result<Value, AuthError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|_| AuthError::Malformed(format!("the token's {what} is not JSON")))?;
    if !v.is_object() {
        return Err(AuthError::Malformed(format!(
            "the token's {what} is not an object"
        )));
    }
    if !depth_ok(&v, MAX_JWT_DEPTH) {
        return Err(AuthError::Malformed(format!(
            "the token's {what} nests deeper than {MAX_JWT_DEPTH} levels"
        )));
    }
    Ok(v)
}

impl JwtVerifier {
    /// Build from `[auth.jwt]`; `keys` holds each issuer's keys in the order of
    /// [`JwtConfig::realms`]: its `jwks_file`'s, and its URL's (carried over a reload that kept
    /// the URL's settings).
    pub fn new(c: &JwtConfig, keys: Vec<IssuerKeys>) -> Result<JwtVerifier, ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid { field, message };
        let realms: Vec<JwtRealm<'_>> = c.realms();
        if realms.len() != keys.len() {
            return Err(invalid(
                "auth.jwt.issuers".into(),
                format!(
                    "{} issuers but keys for {} were given",
                    realms.len(),
                    keys.len()
                ),
            ));
        }
        let issuers = realms
            .iter()
            .zip(keys)
            .map(|(r, k)| Issuer {
                names: r.issuers.iter().map(|s| s.to_string()).collect(),
                tenants: r.tenants.map(|t| t.iter().cloned().collect()),
                typ: r.typ.map(normalize_typ),
                allowed_azp: r.allowed_azp.map(<[String]>::to_vec),
                file_keys: k.file,
                url: k.url,
            })
            .collect();
        let mut tiers = HashMap::new();
        for (name, t) in &c.tiers {
            let s = Scope::from_config(t)
                .map_err(|e| invalid(format!("auth.jwt.tiers.{name}.{}", e.field), e.message))?;
            tiers.insert(name.clone(), Arc::new(s));
        }
        let routes = Routes::parse(&c.routes).map_err(|m| invalid("auth.jwt.routes".into(), m))?;
        Ok(JwtVerifier {
            issuers,
            audiences: c.audiences.clone(),
            algs: c.algorithms.iter().filter_map(|a| Alg::parse(a)).collect(),
            leeway: c.leeway_secs.min(1 << 30) as i64,
            max_token_bytes: c.max_token_bytes,
            tenant_claim: c.tenant_claim.clone(),
            tier_claim: c.tier_claim.clone(),
            default_tier: c.default_tier.clone(),
            tiers,
            scope_claim: c.scope_claim.clone(),
            routes,
            unlimited: Arc::new(Scope::default()),
            cache: Default::default(),
        })
    }

    /// The URL key sources (one per issuer with a `jwks_url`), to carry over a reload.
    pub fn url_keys(&self) -> impl Iterator<Item = &Arc<UrlKeys>> {
        self.issuers.iter().filter_map(|i| i.url.as_ref())
    }

    /// The current URL keys of issuer `i`.
    fn url_keys_of(&self, i: usize) -> Option<Arc<KeySet>> {
        self.issuers.get(i)?.url.as_ref().map(|u| u.keys())
    }

    /// [`JwtVerifier::verify_uncached`], remembering a verified token (by the SHA-256 of its
    /// bytes, at most [`TOKEN_CACHE_ENTRIES`]) until its `exp` plus the leeway, or until the
    /// URL's keys are refreshed; a configuration reload starts a new cache.
    pub fn verify(&self, token: &str, now: i64) -> Result<JwtIdentity, AuthError> {
        // (An oversized token is hashed, misses, and is refused by `verify_full` first thing;
        // the request's header bound limits what is hashed.)
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(id) =
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&digest, now, |i| self.url_keys_of(i))
        {
            return Ok(id.clone());
        }
        let verified = self.verify_full(token, now)?;
        let entry = CachedToken {
            identity: verified.identity.clone(),
            valid_until: verified.exp.saturating_add(self.leeway),
            issuer: verified.issuer,
            url_keys: verified.url_keys,
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(digest, entry, now);
        Ok(verified.identity)
    }

    /// Verify a compact JWS at unix time `now`: size, header, algorithm, key, signature,
    /// then (only for an authentic token) `exp`/`nbf`/`iat`, the issuer (the one whose key
    /// verified the token), its `typ` and `azp` when it requires them, audience, the tenant
    /// claim (one of the issuer's tenants), the tier and the scope claim.
    pub fn verify_uncached(&self, token: &str, now: i64) -> Result<JwtIdentity, AuthError> {
        self.verify_full(token, now).map(|v| v.identity)
    }

    /// [`JwtVerifier::verify_uncached`], with what the token cache needs.
    fn verify_full(&self, token: &str, now: i64) -> Result<VerifiedToken, AuthError> {
        #[cfg(test)]
        FULL_VERIFICATIONS.with(|c| c.set(c.get() + 1));
        if token.len() > self.max_token_bytes {
            return Err(AuthError::Malformed(format!(
                "the token is larger than {} bytes",
                self.max_token_bytes
            )));
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(
                "the token is not a compact JWS (three dot-separated parts)".into(),
            ));
        };
        let header = json_part(&part(h64, "header")?, "header")?;
        if header.get("crit").is_some() {
            return Err(AuthError::Malformed(
                "critical header parameters are not supported".into(),
            ));
        }
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Malformed("the token's header has no `alg`".into()))?;
        let alg = Alg::parse(alg_name)
            .filter(|a| self.algs.contains(a))
            .ok_or_else(|| {
                AuthError::AlgNotAllowed(format!(
                    "{} is not accepted",
                    crate::auth::scope::quoted(alg_name)
                ))
            })?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty() && k.len() <= MAX_KID)
            .ok_or_else(|| AuthError::Malformed("the token's header has no usable `kid`".into()))?;
        let sig = part(s64, "signature")?;
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        // Each issuer's keys named by `kid`; the issuers one of whose keys verifies the token.
        let url_keys: Vec<Option<Arc<KeySet>>> = self
            .issuers
            .iter()
            .map(|i| i.url.as_ref().map(|u| u.keys()))
            .collect();
        let (mut named, mut usable) = (false, false);
        let mut verified_by = Vec::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            let keys = issuer
                .file_keys
                .keys
                .iter()
                .chain(url_keys[i].iter().flat_map(|k| k.keys.iter()))
                .filter(|k| k.kid == kid);
            for k in keys {
                named = true;
                if k.key.alg() != alg {
                    continue;
                }
                usable = true;
                if k.key.verify(signed, &sig) {
                    verified_by.push(i);
                    break;
                }
            }
        }
        if !named {
            for u in self.url_keys() {
                u.nudge();
            }
            return Err(AuthError::UnknownKey);
        }
        if !usable {
            return Err(AuthError::KeyMismatch);
        }
        if verified_by.is_empty() {
            return Err(AuthError::BadSignature);
        }
        // Authentic from here on (signed by a key of each issuer in `verified_by`).
        let claims = json_part(&part(p64, "claims")?, "claims")?;
        let leeway = self.leeway;
        let exp = numeric_date(&claims, "exp")?
            .ok_or_else(|| AuthError::Malformed("the token has no `exp`".into()))?;
        if exp.saturating_add(leeway) <= now {
            return Err(AuthError::Expired("the token's exp has passed".into()));
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")?
            && nbf > now.saturating_add(leeway)
        {
            return Err(AuthError::NotYetValid("nbf is in the future".into()));
        }
        if let Some(iat) = numeric_date(&claims, "iat")?
            && iat > now.saturating_add(leeway)
        {
            return Err(AuthError::NotYetValid("iat is in the future".into()));
        }
        // The issuer the token names must be one whose key signed it: issuer A's key never
        // speaks for issuer B.
        let iss = claims.get("iss").and_then(Value::as_str);
        let Some(at) = iss.and_then(|iss| {
            verified_by
                .iter()
                .copied()
                .find(|&i| self.issuers[i].names.iter().any(|n| n == iss))
        }) else {
            return Err(AuthError::WrongIssuer);
        };
        let issuer = &self.issuers[at];
        if let Some(want) = &issuer.typ {
            let typ = header.get("typ").and_then(Value::as_str).map(normalize_typ);
            if typ.as_ref() != Some(want) {
                return Err(AuthError::WrongType);
            }
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(AuthError::WrongAudience);
        }
        if let Some(allowed) = &issuer.allowed_azp {
            let azp = claims.get("azp").and_then(Value::as_str);
            if !azp.is_some_and(|a| allowed.iter().any(|x| x == a)) {
                return Err(AuthError::AzpNotAllowed);
            }
        }
        let tenant = claim(&claims, &self.tenant_claim)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::ClaimMissing(self.tenant_claim.clone()))?;
        if let Some(tenants) = &issuer.tenants
            && !tenants.contains(tenant)
        {
            return Err(AuthError::TenantNotAllowedForIssuer);
        }
        let mut scope = self.unlimited.clone();
        if let Some(tc) = &self.tier_claim {
            let tier = match claim(&claims, tc) {
                Some(Value::String(t)) => Some(t.as_str()),
                None | Some(Value::Null) => self.default_tier.as_deref(),
                Some(_) => None,
            }
            .ok_or_else(|| AuthError::ClaimMissing(tc.clone()))?;
            scope = self
                .tiers
                .get(tier)
                .cloned()
                .ok_or(AuthError::UnknownTier)?;
        }
        if let Some(sc) = &self.scope_claim
            && let Some(v) = claim(&claims, sc)
        {
            let c: ScopeConfig = serde_json::from_value(v.clone()).map_err(|_| {
                AuthError::Malformed(format!(
                    "the `{sc}` claim is not a scope (models, routes, tools, max_tokens)"
                ))
            })?;
            let own = Scope::from_config(&c)
                .map_err(|e| AuthError::Malformed(format!("the `{sc}` claim's {}", e)))?;
            scope = Arc::new(scope.intersect(&own));
        }
        Ok(VerifiedToken {
            identity: JwtIdentity {
                tenant: tenant.to_string(),
                kid: kid.to_string(),
                scope,
            },
            exp,
            issuer: at,
            url_keys: url_keys[at].clone(),
        })
    }
}

/// A verified token, with what the token cache keeps beside its identity.
struct VerifiedToken {
    identity: JwtIdentity,
    exp: i64,
    /// The index of the issuer that verified it, and the URL keys it had then.
    issuer: usize,
    url_keys: Option<Arc<KeySet>>,
}

#[cfg(test)]
thread_local! {
    /// Tokens verified in full on this thread: what the token cache did not answer.
    static FULL_VERIFICATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The bearer token of `Authorization`, when there is exactly one such header.
pub fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(AuthError::Malformed(
            "Authorization appears more than once".into(),
        ));
    }
    let s = v
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization is not visible ASCII".into()))?;
    let Some((scheme, token)) = s.trim().split_once(' ') else {
        return Ok(None);
    };
    Ok(scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim()))
}
