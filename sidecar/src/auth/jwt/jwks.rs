//! JWKS: the usable keys of a JWKS document ([`KeySet`], bounded), the issuers' JWKS files,
//! and the keys fetched from a JWKS URL in the background ([`UrlKeys`]), kept when the IdP is
//! down.

use crate::config::{Config, ConfigError};
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
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Keys in one JWKS at most.
pub const MAX_JWKS_KEYS: usize = 64;
/// Nesting of a token's header or claims at most.
pub const MAX_JWT_DEPTH: usize = 16;
/// Bytes of a `kid` at most.
pub(super) const MAX_KID: usize = 256;

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
pub(super) enum KeyMaterial {
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
    pub(super) fn alg(&self) -> Alg {
        match self {
            KeyMaterial::Rsa { .. } => Alg::Rs256,
            KeyMaterial::P256(_) => Alg::Es256,
            KeyMaterial::Ed25519(_) => Alg::EdDsa,
        }
    }

    pub(super) fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
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
    pub(super) key: KeyMaterial,
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
    pub(super) keys: Vec<Jwk>,
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

    pub(super) fn len(&self) -> usize {
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

pub(super) fn depth_ok(v: &Value, left: usize) -> bool {
    match v {
        Value::Array(a) => left > 0 && a.iter().all(|x| depth_ok(x, left - 1)),
        Value::Object(o) => left > 0 && o.values().all(|x| depth_ok(x, left - 1)),
        _ => true,
    }
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
    pub(super) settings: UrlSettings,
    pub(super) keys: RwLock<Arc<KeySet>>,
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
