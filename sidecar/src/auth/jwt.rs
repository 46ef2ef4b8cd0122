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

use crate::auth::scope::{Routes, Scope, ScopeConfig};
use crate::auth::signature::AuthError;
use crate::config::{Config, ConfigError, JwtConfig, JwtRealm};
use crate::record::metrics::ResultLabel;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    UnparsedPublicKey,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Keys in one JWKS at most.
pub const MAX_JWKS_KEYS: usize = 64;
/// Nesting of a token's header or claims at most.
pub const MAX_JWT_DEPTH: usize = 16;
/// Bytes of a `kid` at most.
const MAX_KID: usize = 256;
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

/// The signature algorithms the sidecar verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    pub const ALL: [Alg; 3] = [Alg::Rs256, Alg::Es256, Alg::EdDsa];

    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A public key, in the form `ring` verifies with.
#[derive(Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point `04 || x || y`.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl KeyMaterial {
    /// The one algorithm this key verifies.
    fn alg(&self) -> Alg {
        match self {
            KeyMaterial::Rsa { .. } => Alg::Rs256,
            KeyMaterial::P256(_) => Alg::Es256,
            KeyMaterial::Ed25519(_) => Alg::EdDsa,
        }
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            KeyMaterial::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            KeyMaterial::P256(p) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, p)
                .verify(msg, sig)
                .is_ok(),
            KeyMaterial::Ed25519(x) => UnparsedPublicKey::new(&ED25519, x).verify(msg, sig).is_ok(),
        }
    }
}

/// One signing key of a JWKS.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: String,
    key: KeyMaterial,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.key.alg())
            .finish()
    }
}

/// The usable signing keys of a JWKS document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<Jwk>,
}

fn b64(v: &Value, field: &str) -> Result<Vec<u8>, String> {
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{field}` missing"))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| format!("`{field}` is not base64url"))
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let lead = v.iter().take_while(|b| **b == 0).count();
    v.drain(..lead);
    v
}

impl KeySet {
    /// Parse a JWKS (`{"keys": [...]}`). Keys for encryption (`use` other than `sig`), of
    /// other types or curves, or declaring another `alg`, are left out; a key without a `kid`
    /// is left out (tokens must name their key); private key material fails the whole set.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if !depth_ok(&doc, MAX_JWT_DEPTH) {
            return Err(format!("nests deeper than {MAX_JWT_DEPTH} levels"));
        }
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no `keys` array")?;
        if list.len() > MAX_JWKS_KEYS {
            return Err(format!("more than {MAX_JWKS_KEYS} keys"));
        }
        let mut keys = Vec::new();
        for (i, k) in list.iter().enumerate() {
            let at = |m: String| format!("keys[{i}]: {m}");
            if ["d", "p", "q", "dp", "dq", "qi", "k"]
                .iter()
                .any(|f| k.get(f).is_some())
            {
                return Err(at("holds private or symmetric key material".into()));
            }
            if k.get("use").is_some_and(|u| u != "sig") {
                continue;
            }
            let Some(kid) = k.get("kid").and_then(Value::as_str) else {
                continue;
            };
            if kid.is_empty() || kid.len() > MAX_KID {
                continue;
            }
            let kty = k.get("kty").and_then(Value::as_str).unwrap_or("");
            let crv = k.get("crv").and_then(Value::as_str).unwrap_or("");
            let key = match (kty, crv) {
                ("RSA", _) => {
                    let n = strip_zeros(b64(k, "n").map_err(at)?);
                    let e = strip_zeros(b64(k, "e").map_err(at)?);
                    if !(256..=1024).contains(&n.len()) || e.is_empty() || e.len() > 8 {
                        return Err(at("RSA modulus must be 2048-8192 bits".into()));
                    }
                    KeyMaterial::Rsa { n, e }
                }
                ("EC", "P-256") => {
                    let (x, y) = (b64(k, "x").map_err(at)?, b64(k, "y").map_err(at)?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(at("P-256 coordinates must be 32 bytes".into()));
                    }
                    let mut p = Vec::with_capacity(65);
                    p.push(4);
                    p.extend_from_slice(&x);
                    p.extend_from_slice(&y);
                    KeyMaterial::P256(p)
                }
                ("OKP", "Ed25519") => {
                    let x = b64(k, "x").map_err(at)?;
                    if x.len() != 32 {
                        return Err(at("Ed25519 key must be 32 bytes".into()));
                    }
                    KeyMaterial::Ed25519(x)
                }
                _ => continue,
            };
            if let Some(alg) = k.get("alg")
                && alg.as_str().and_then(Alg::parse) != Some(key.alg())
            {
                continue;
            }
            keys.push(Jwk {
                kid: kid.to_string(),
                key,
            });
        }
        Ok(KeySet { keys })
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }
}

/// Read each issuer's `jwks_file` (an empty set for one without), in the order of
/// [`JwtConfig::realms`]; none without `[auth.jwt]`. Called at start, on reload (a bad JWKS
/// file rejects the reload) and by `check-config`.
pub fn load_jwks_files(config: &Config) -> Result<Vec<KeySet>, ConfigError> {
    let Some(j) = config.auth.jwt.as_ref() else {
        return Ok(Vec::new());
    };
    j.realms()
        .iter()
        .map(|realm| {
            let Some(p) = realm.jwks_file else {
                return Ok(KeySet::default());
            };
            let invalid = |message: String| ConfigError::Invalid {
                field: format!("{}.jwks_file", realm.field),
                message,
            };
            let raw = std::fs::read(p)
                .map_err(|e| invalid(format!("cannot read {}: {e}", p.display())))?;
            KeySet::parse(&raw).map_err(invalid)
        })
        .collect()
}

fn depth_ok(v: &Value, left: usize) -> bool {
    match v {
        Value::Array(a) => left > 0 && a.iter().all(|x| depth_ok(x, left - 1)),
        Value::Object(o) => left > 0 && o.values().all(|x| depth_ok(x, left - 1)),
        _ => true,
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

/// The JWKS URL's settings; a reload that keeps them keeps the fetched keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlSettings {
    pub url: http::Uri,
    pub refresh: Duration,
    pub min_refresh: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// Keys fetched from a JWKS URL by a background task, which ends once this is dropped.
pub struct UrlKeys {
    settings: UrlSettings,
    keys: RwLock<Arc<KeySet>>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for UrlKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlKeys")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl UrlKeys {
    /// Start fetching (at once, then every `refresh`; after a failure every `min_refresh`).
    pub fn start(settings: UrlSettings, results: Family<ResultLabel, Counter>) -> Arc<UrlKeys> {
        let me = Arc::new(UrlKeys {
            settings: settings.clone(),
            keys: RwLock::new(Arc::new(KeySet::default())),
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(refresh_loop(
                    Arc::downgrade(&me),
                    me.wake.clone(),
                    settings,
                    results,
                ));
            }
            Err(_) => tracing::warn!("no async runtime: the JWKS URL is not fetched"),
        }
        me
    }

    pub fn settings(&self) -> &UrlSettings {
        &self.settings
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ask for an early refresh (a token named an unknown key: the IdP may have rotated). At
    /// most one fetch per `min_refresh` happens however often this is called.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }
}

impl Drop for UrlKeys {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

async fn refresh_loop(
    me: std::sync::Weak<UrlKeys>,
    wake: Arc<tokio::sync::Notify>,
    s: UrlSettings,
    results: Family<ResultLabel, Counter>,
) {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, http_body_util::Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let started = tokio::time::Instant::now();
        let fetched = fetch(&client, &s).await;
        let Some(keys) = me.upgrade() else {
            return;
        };
        let next = match fetched {
            Ok(set) => {
                results.get_or_create(&ResultLabel { result: "ok" }).inc();
                tracing::debug!(url = %s.url, keys = set.len(), "JWKS refreshed");
                *keys.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                started + s.refresh
            }
            Err(e) => {
                results
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                tracing::warn!(url = %s.url, error = %e, "JWKS refresh failed; keeping the cached keys");
                started + s.min_refresh.min(s.refresh)
            }
        };
        drop(keys);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {
                tokio::time::sleep_until(started + s.min_refresh).await;
            }
        }
        if me.strong_count() == 0 {
            return;
        }
    }
}

async fn fetch(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    s: &UrlSettings,
) -> Result<KeySet, String> {
    use http_body_util::BodyExt;
    let get = async {
        let mut req = http::Request::new(http_body_util::Full::new(Bytes::new()));
        *req.uri_mut() = s.url.clone();
        req.headers_mut().insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > s.max_bytes {
                    return Err(format!("larger than {} bytes", s.max_bytes));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    };
    let bytes = tokio::time::timeout(s.timeout, get)
        .await
        .map_err(|_| format!("no answer within {:?}", s.timeout))??;
    KeySet::parse(&bytes)
}

/// One issuer's keys: its JWKS file's, and its URL's (fetched in the background).
#[derive(Debug, Default)]
pub struct IssuerKeys {
    pub file: KeySet,
    pub url: Option<Arc<UrlKeys>>,
}

impl From<KeySet> for IssuerKeys {
    fn from(file: KeySet) -> Self {
        IssuerKeys { file, url: None }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keeps_only_usable_signing_keys() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let doc = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": x},
            {"kty": "RSA", "kid": "rsa", "n": n, "e": "AQAB", "alg": "RS256", "use": "sig"},
            {"kty": "RSA", "kid": "enc", "n": n, "e": "AQAB", "use": "enc"},
            {"kty": "RSA", "kid": "ps", "n": n, "e": "AQAB", "alg": "PS256"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": x, "y": x},
            {"kty": "OKP", "crv": "Ed25519", "x": x},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["ed", "rsa"]);
        let private = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": x, "d": x}]});
        assert!(KeySet::parse(private.to_string().as_bytes()).is_err());
        let small =
            serde_json::json!({"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]});
        assert!(KeySet::parse(small.to_string().as_bytes()).is_err());
        assert!(KeySet::parse(b"[]").is_err());
    }

    #[test]
    fn jwks_bounds_hold_at_their_edges() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let ed =
            |kid: String| serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x});
        let parse = |keys: Vec<serde_json::Value>| {
            KeySet::parse(serde_json::json!({ "keys": keys }).to_string().as_bytes())
        };
        // As many keys as allowed, and not one more.
        let full: Vec<_> = (0..MAX_JWKS_KEYS).map(|i| ed(format!("k{i}"))).collect();
        assert_eq!(parse(full.clone()).unwrap().len(), MAX_JWKS_KEYS);
        let mut over = full;
        over.push(ed("one-more".into()));
        assert!(parse(over).unwrap_err().contains("more than 64 keys"));
        // A kid may be up to MAX_KID bytes; an empty or longer one leaves its key out.
        let set = parse(vec![
            ed(String::new()),
            ed("a".repeat(MAX_KID)),
            ed("b".repeat(MAX_KID + 1)),
        ])
        .unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["a".repeat(MAX_KID)]);
        // RSA: an exponent of 1 to 8 bytes; P-256: both coordinates of 32 bytes.
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let rsa = |e: &[u8]| {
            parse(vec![
                serde_json::json!({"kty": "RSA", "kid": "r", "n": n, "e": URL_SAFE_NO_PAD.encode(e)}),
            ])
        };
        assert_eq!(rsa(&[1; 8]).unwrap().len(), 1);
        assert!(rsa(&[1; 9]).is_err());
        assert!(rsa(&[]).is_err());
        assert!(rsa(&[0, 0]).is_err(), "an exponent of zeros is empty");
        let ec = |x: usize, y: usize| {
            let (x, y) = (
                URL_SAFE_NO_PAD.encode(vec![1u8; x]),
                URL_SAFE_NO_PAD.encode(vec![1u8; y]),
            );
            parse(vec![
                serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "e", "x": x, "y": y}),
            ])
        };
        assert_eq!(ec(32, 32).unwrap().len(), 1);
        assert!(ec(32, 31).is_err() && ec(31, 32).is_err());
        // Objects nest MAX_JWT_DEPTH levels at most, as arrays do.
        let nested = |levels: usize| {
            let mut v = serde_json::json!(1);
            for _ in 0..levels {
                v = serde_json::json!({ "a": v });
            }
            KeySet::parse(
                serde_json::json!({"keys": [], "x": v})
                    .to_string()
                    .as_bytes(),
            )
        };
        assert!(nested(MAX_JWT_DEPTH - 1).is_ok());
        assert!(nested(MAX_JWT_DEPTH).unwrap_err().contains("nests deeper"));
        // Its Debug names the key, never its material.
        let shown = format!("{:?}", set.keys[0]);
        assert!(shown.contains("aaaa") && shown.contains("EdDsa"), "{shown}");
        assert!(!shown.contains(&x), "{shown}");
    }

    #[test]
    fn claims_by_name_or_dotted_path() {
        let c = serde_json::json!({"https://x.io/tenant": "a", "org": {"tenant": "b"}});
        assert_eq!(claim(&c, "https://x.io/tenant"), Some(&Value::from("a")));
        assert_eq!(claim(&c, "org.tenant"), Some(&Value::from("b")));
        assert_eq!(claim(&c, "org.none"), None);
    }

    /// An Ed25519 signing key with its JWKS entry.
    struct TestKey {
        kid: String,
        pair: ring::signature::Ed25519KeyPair,
    }

    impl TestKey {
        fn new(kid: &str) -> TestKey {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            TestKey {
                kid: kid.into(),
                pair,
            }
        }

        fn jwks(keys: &[&TestKey]) -> KeySet {
            use ring::signature::KeyPair;
            let list: Vec<Value> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": k.kid,
                        "x": URL_SAFE_NO_PAD.encode(k.pair.public_key().as_ref())})
                })
                .collect();
            KeySet::parse(serde_json::json!({ "keys": list }).to_string().as_bytes()).unwrap()
        }

        fn token(&self, header: Value, claims: Value) -> String {
            let mut h = serde_json::json!({"alg": "EdDSA", "kid": self.kid});
            h.as_object_mut()
                .unwrap()
                .extend(header.as_object().unwrap().clone());
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = self.pair.sign(input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }
    }

    const NOW: i64 = 1_800_000_000;

    fn claims(iss: &str, tenant: &str) -> Value {
        serde_json::json!({"iss": iss, "aud": "bh", "exp": NOW + 60, "tenant_id": tenant,
            "azp": "ui"})
    }

    /// Issuer A (acme, typ at+jwt, azp ui) and issuer B (globex), each with one key; both keys
    /// have the kid `k`.
    fn two_issuers() -> (JwtVerifier, TestKey, TestKey) {
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[tenants.globex]\n\
            [auth.jwt]\naudiences = [\"bh\"]\n\
            [[auth.jwt.issuers]]\nissuer = \"A\"\njwks_file = \"/a\"\ntenants = [\"acme\"]\n\
            typ = \"at+jwt\"\nallowed_azp = [\"ui\"]\n\
            [[auth.jwt.issuers]]\nissuer = \"B\"\njwks_file = \"/b\"\ntenants = [\"globex\"]\n";
        let cfg = Config::from_toml(text).unwrap();
        let (a, b) = (TestKey::new("k"), TestKey::new("k"));
        let v = JwtVerifier::new(
            cfg.auth.jwt.as_ref().unwrap(),
            vec![TestKey::jwks(&[&a]).into(), TestKey::jwks(&[&b]).into()],
        )
        .unwrap();
        (v, a, b)
    }

    #[test]
    fn an_issuers_key_speaks_for_that_issuer_and_its_tenants_only() {
        let (v, a, b) = two_issuers();
        let at = serde_json::json!({"typ": "at+jwt"});
        let none = serde_json::json!({});
        let reason = |t: &str| v.verify(t, NOW).map(|id| id.tenant).map_err(|e| e.reason());
        assert_eq!(
            reason(&a.token(at.clone(), claims("A", "acme"))),
            Ok("acme".into())
        );
        assert_eq!(
            reason(&b.token(none.clone(), claims("B", "globex"))),
            Ok("globex".into())
        );
        // A's key naming B's tenant, or claiming to be B (whose key has the same kid).
        assert_eq!(
            reason(&a.token(at.clone(), claims("A", "globex"))),
            Err("tenant_not_allowed_for_issuer")
        );
        assert_eq!(
            reason(&a.token(at.clone(), claims("B", "globex"))),
            Err("wrong_issuer")
        );
        assert_eq!(
            reason(&b.token(at.clone(), claims("A", "acme"))),
            Err("wrong_issuer")
        );
        assert_eq!(
            reason(&b.token(none.clone(), claims("B", "acme"))),
            Err("tenant_not_allowed_for_issuer")
        );
        // A's typ and azp; B requires neither.
        assert_eq!(
            reason(&a.token(none.clone(), claims("A", "acme"))),
            Err("wrong_type")
        );
        let mut other = claims("A", "acme");
        other["azp"] = "batch".into();
        assert_eq!(reason(&a.token(at.clone(), other)), Err("azp_not_allowed"));
        let mut no_azp = claims("B", "globex");
        no_azp.as_object_mut().unwrap().remove("azp");
        assert_eq!(reason(&b.token(none, no_azp)), Ok("globex".into()));
        // A remembered token is the same answer again (the cache keeps its issuer).
        let t = a.token(at, claims("A", "acme"));
        assert_eq!(reason(&t), Ok("acme".into()));
        assert_eq!(reason(&t), Ok("acme".into()));
    }

    #[test]
    fn typ_compares_without_case_or_application_prefix() {
        assert_eq!(normalize_typ("application/AT+JWT"), "at+jwt");
        assert_eq!(normalize_typ("at+jwt"), "at+jwt");
        assert_eq!(normalize_typ("JWT"), "jwt");
        assert_ne!(normalize_typ("x-application/at+jwt"), "at+jwt");
    }

    #[test]
    fn issuer_strings_are_one_issuer_with_the_top_level_keys_and_any_tenant() {
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[tenants.globex]\n\
            [auth.jwt]\nissuers = [\"A\", \"A2\"]\naudiences = [\"bh\"]\njwks_file = \"/a\"\n";
        let cfg = Config::from_toml(text).unwrap();
        let j = cfg.auth.jwt.as_ref().unwrap();
        let realms = j.realms();
        assert_eq!(realms.len(), 1);
        assert_eq!(realms[0].field, "auth.jwt");
        assert_eq!(realms[0].issuers, ["A", "A2"]);
        assert_eq!(realms[0].tenants, None);
        let a = TestKey::new("k");
        let v = JwtVerifier::new(j, vec![TestKey::jwks(&[&a]).into()]).unwrap();
        for (iss, tenant) in [("A", "acme"), ("A2", "globex")] {
            let t = a.token(serde_json::json!({}), claims(iss, tenant));
            assert_eq!(v.verify(&t, NOW).unwrap().tenant, tenant);
        }
        // The keys must match the issuers.
        assert!(JwtVerifier::new(j, Vec::new()).is_err());
    }

    #[test]
    fn bearer_tokens() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h).unwrap(), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), None);
        h.append("authorization", "Bearer x".parse().unwrap());
        assert!(bearer(&h).is_err());
    }

    #[test]
    fn a_cached_token_is_found_while_valid_and_while_its_keys_are_current() {
        let ident = JwtIdentity {
            tenant: "acme".into(),
            kid: "k".into(),
            scope: Arc::new(Scope::default()),
        };
        let keys = Arc::new(KeySet { keys: Vec::new() });
        let rotated = Arc::new(KeySet { keys: Vec::new() });
        let mut cache = TokenCache::default();
        let entry = |url_keys: Option<Arc<KeySet>>| CachedToken {
            identity: ident.clone(),
            valid_until: 100,
            issuer: 0,
            url_keys,
        };
        // Verified with URL keys: found while those are the issuer's, not after a rotation.
        cache.put([1; 32], entry(Some(keys.clone())), 0);
        let same = |_: usize| Some(keys.clone());
        assert_eq!(
            cache.get(&[1; 32], 10, same).map(|i| i.tenant.as_str()),
            Some("acme")
        );
        assert!(cache.get(&[1; 32], 10, |_| Some(rotated.clone())).is_none());
        assert!(cache.get(&[1; 32], 10, |_| None).is_none());
        // Until it expires, and only for its own digest.
        assert!(cache.get(&[1; 32], 100, same).is_none());
        assert!(cache.get(&[2; 32], 10, same).is_none());
        // Verified with file keys: found while the issuer has no URL keys.
        cache.put([3; 32], entry(None), 0);
        assert!(cache.get(&[3; 32], 10, |_| None).is_some());
        assert!(cache.get(&[3; 32], 10, same).is_none());
    }

    #[test]
    fn a_full_token_cache_drops_expired_tokens_first_then_everything() {
        let entry = |valid_until: i64| CachedToken {
            identity: JwtIdentity {
                tenant: "t".into(),
                kid: "k".into(),
                scope: Arc::new(Scope::default()),
            },
            valid_until,
            issuer: 0,
            url_keys: None,
        };
        let digest = |i: usize| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            d
        };
        // Below the bound: nothing is dropped, expired or not.
        let mut cache = TokenCache::default();
        for i in 0..TOKEN_CACHE_ENTRIES - 1 {
            cache.put(digest(i), entry(if i % 2 == 0 { 5 } else { 100 }), 10);
        }
        assert_eq!(cache.map.len(), TOKEN_CACHE_ENTRIES - 1);
        // At the bound: the expired half goes, the valid half stays.
        cache.put(digest(TOKEN_CACHE_ENTRIES - 1), entry(100), 10);
        cache.put(digest(TOKEN_CACHE_ENTRIES), entry(100), 10);
        assert_eq!(cache.map.len(), TOKEN_CACHE_ENTRIES / 2 + 1);
        assert!(cache.map.contains_key(&digest(1)) && !cache.map.contains_key(&digest(0)));
        // A token valid until now is expired at now.
        let mut cache = TokenCache::default();
        for i in 0..TOKEN_CACHE_ENTRIES {
            cache.put(digest(i), entry(if i % 2 == 0 { 10 } else { 100 }), 0);
        }
        cache.put(digest(TOKEN_CACHE_ENTRIES), entry(100), 10);
        assert_eq!(cache.map.len(), TOKEN_CACHE_ENTRIES / 2 + 1);
        assert!(cache.map.contains_key(&digest(1)) && !cache.map.contains_key(&digest(0)));
        // Full of valid tokens: emptied, then the new one kept.
        let mut cache = TokenCache::default();
        for i in 0..TOKEN_CACHE_ENTRIES {
            cache.put(digest(i), entry(100), 0);
        }
        cache.put(digest(TOKEN_CACHE_ENTRIES), entry(100), 10);
        assert_eq!(cache.map.len(), 1);
        assert!(
            cache
                .get(&digest(TOKEN_CACHE_ENTRIES), 10, |_| None)
                .is_some()
        );
    }

    /// What a log line shows of the JWT state: the JWKS URL and how many tokens are
    /// remembered, never a token's tenant or key.
    #[tokio::test]
    async fn debug_shows_the_url_and_the_cache_size_only() {
        let url = UrlKeys::start(
            UrlSettings {
                url: "http://127.0.0.1:9/realms/acme/certs".parse().unwrap(),
                refresh: Duration::from_secs(600),
                min_refresh: Duration::from_secs(600),
                timeout: Duration::from_millis(100),
                max_bytes: 1024,
            },
            Family::default(),
        );
        let shown = format!("{url:?}");
        assert!(shown.contains("127.0.0.1:9/realms/acme/certs"), "{shown}");
        let mut cache = TokenCache::default();
        let identity = JwtIdentity {
            tenant: "acme-secret-tenant".into(),
            kid: "k".into(),
            scope: Arc::new(Scope::default()),
        };
        let entry = CachedToken {
            identity,
            valid_until: 100,
            issuer: 0,
            url_keys: None,
        };
        cache.put([1; 32], entry, 0);
        let shown = format!("{cache:?}");
        assert_eq!(shown, "TokenCache(1 tokens)");
    }

    #[test]
    fn algorithm_names_are_the_jose_ones() {
        let names: Vec<&str> = Alg::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, ["RS256", "ES256", "EdDSA"]);
        for a in Alg::ALL {
            assert_eq!(Alg::parse(a.as_str()), Some(a));
        }
    }
}
