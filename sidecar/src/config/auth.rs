//! `[auth]`: RFC 9421 signatures (`label`, skew, replay cache, routes) and `[auth.jwt]`
//! (bearer tokens from identity providers).

use super::{ConfigError, invalid};
use crate::auth::scope::{Scope, ScopeConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Signature label to verify (RFC 9421 `Signature-Input` dictionary key).
    pub label: String,
    /// Allowed clock skew for `created`, in seconds; also the replay window.
    pub max_skew_secs: u64,
    /// Nonces remembered at most (fail closed with 503 when full of live nonces).
    pub replay_cache_capacity: usize,
    /// Routes that accept an RFC 9421 signature (`*`, paths, or `/v1/.../*` prefixes).
    pub hmac_routes: Vec<String>,
    /// Forward the client's `Authorization` header to the upstream (off: it is removed).
    pub forward_authorization: bool,
    /// Tenants from JWTs (`Authorization: Bearer`); off when absent.
    pub jwt: Option<JwtConfig>,
}
impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            label: "bulkhead".into(),
            max_skew_secs: 30,
            replay_cache_capacity: 100_000,
            hmac_routes: vec!["*".into()],
            forward_authorization: false,
            jwt: None,
        }
    }
}

/// `[auth.jwt]`: bearer tokens signed by an identity provider.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The issuers: either `iss` strings (exact match), all trusting the keys of `jwks_file` /
    /// `jwks_url` below and naming any tenant; or `[[auth.jwt.issuers]]` tables, each an
    /// issuer with keys and tenants of its own (see [`JwtIssuerConfig`]). Not both kinds.
    pub issuers: Vec<JwtIssuer>,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// A JWKS file (reloaded with the configuration: on change and on SIGHUP), for issuers
    /// given as strings.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http://` only), fetched at start and every `jwks_refresh_ms`, for issuers
    /// given as strings.
    pub jwks_url: Option<String>,
    pub jwks_refresh_ms: u64,
    /// Fetches at most this often (an unknown `kid` asks for an early one; after a failed
    /// fetch the next is this long after).
    pub jwks_min_refresh_ms: u64,
    pub jwks_timeout_ms: u64,
    pub jwks_max_bytes: usize,
    /// Accepted algorithms: any of `RS256`, `ES256`, `EdDSA`.
    pub algorithms: Vec<String>,
    /// Allowed clock skew for `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Longer tokens are refused.
    pub max_token_bytes: usize,
    /// The claim naming the tenant: a name, or a dotted path into nested objects.
    pub tenant_claim: String,
    /// A claim naming the token's tier (a key of `tiers`), whose scope the token gets.
    pub tier_claim: Option<String>,
    /// The tier of a token without the tier claim; without it such tokens are refused.
    pub default_tier: Option<String>,
    pub tiers: BTreeMap<String, ScopeConfig>,
    /// A claim holding a scope object (`models`, `routes`, `tools`, `max_tokens`) that
    /// narrows the tier's.
    pub scope_claim: Option<String>,
    /// Routes that accept a JWT.
    pub routes: Vec<String>,
}
/// The JWT signature algorithms the sidecar verifies.
pub const JWT_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            audiences: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_ms: 300_000,
            jwks_min_refresh_ms: 10_000,
            jwks_timeout_ms: 2000,
            jwks_max_bytes: 256 * 1024,
            algorithms: JWT_ALGORITHMS.map(String::from).to_vec(),
            leeway_secs: 30,
            max_token_bytes: 8192,
            tenant_claim: "tenant_id".into(),
            tier_claim: None,
            default_tier: None,
            tiers: BTreeMap::new(),
            scope_claim: None,
            routes: vec!["*".into()],
        }
    }
}

/// One entry of `auth.jwt.issuers`: an `iss` string, or an issuer table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JwtIssuer {
    Name(String),
    Table(JwtIssuerConfig),
}

impl<'de> Deserialize<'de> for JwtIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = JwtIssuer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an issuer (`iss`) string, or an issuer table (issuer, jwks_file and/or \
                     jwks_url, tenants)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JwtIssuer, E> {
                Ok(JwtIssuer::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<JwtIssuer, A::Error> {
                JwtIssuerConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(JwtIssuer::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// `[[auth.jwt.issuers]]`: one issuer (an IdP realm) with its own keys and the tenants its
/// tokens may name, so one realm's keys can never mint another realm's tenants.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The `iss` value (exact match).
    pub issuer: String,
    /// This issuer's JWKS file (reloaded with the configuration).
    pub jwks_file: Option<PathBuf>,
    /// This issuer's JWKS URL (`http://` only), fetched as `auth.jwt.jwks_refresh_ms` and the
    /// other `jwks_*` settings say.
    pub jwks_url: Option<String>,
    /// The configured tenants this issuer's tokens may name; any other is refused
    /// (`tenant_not_allowed_for_issuer`).
    pub tenants: Vec<String>,
    /// The header `typ` required (e.g. `at+jwt`, RFC 9068; compared without letter case and
    /// without an `application/` prefix); absent: any.
    pub typ: Option<String>,
    /// The `azp` (authorized party) values accepted; absent: any, or none.
    pub allowed_azp: Option<Vec<String>>,
}

/// One issuer as the verifier sees it, whichever way it was configured.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRealm<'a> {
    /// Where it is configured: `auth.jwt` (issuers given as strings) or `auth.jwt.issuers[i]`.
    pub field: String,
    /// Accepted `iss` values.
    pub issuers: Vec<&'a str>,
    pub jwks_file: Option<&'a PathBuf>,
    pub jwks_url: Option<&'a String>,
    /// The tenants its tokens may name; `None`: any configured tenant.
    pub tenants: Option<&'a [String]>,
    pub typ: Option<&'a str>,
    pub allowed_azp: Option<&'a [String]>,
}

impl JwtConfig {
    /// The issuers, each with its keys: the strings of `issuers` as one issuer with the
    /// top-level `jwks_file` / `jwks_url` and any tenant, then each issuer table.
    pub fn realms(&self) -> Vec<JwtRealm<'_>> {
        let names: Vec<&str> = self
            .issuers
            .iter()
            .filter_map(|i| match i {
                JwtIssuer::Name(n) => Some(n.as_str()),
                JwtIssuer::Table(_) => None,
            })
            .collect();
        let mut out = Vec::new();
        if !names.is_empty() {
            out.push(JwtRealm {
                field: "auth.jwt".into(),
                issuers: names,
                jwks_file: self.jwks_file.as_ref(),
                jwks_url: self.jwks_url.as_ref(),
                tenants: None,
                typ: None,
                allowed_azp: None,
            });
        }
        for (i, entry) in self.issuers.iter().enumerate() {
            if let JwtIssuer::Table(t) = entry {
                out.push(JwtRealm {
                    field: format!("auth.jwt.issuers[{i}]"),
                    issuers: vec![t.issuer.as_str()],
                    jwks_file: t.jwks_file.as_ref(),
                    jwks_url: t.jwks_url.as_ref(),
                    tenants: Some(&t.tenants),
                    typ: t.typ.as_deref(),
                    allowed_azp: t.allowed_azp.as_deref(),
                });
            }
        }
        out
    }
}

impl AuthConfig {
    /// `tenants`: is a name a configured tenant (issuer tables name the tenants they may mint)?
    pub fn validate(&self, tenants: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        if self.label.is_empty()
            || !self
                .label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
            || !self.label.as_bytes()[0].is_ascii_lowercase()
        {
            return Err(invalid(
                "auth.label",
                "must be an RFC 8941 key (lowercase letter, then a-z 0-9 _ - . *)",
            ));
        }
        if self.max_skew_secs == 0 || self.max_skew_secs > 3600 {
            return Err(invalid("auth.max_skew_secs", "must be within 1..=3600"));
        }
        if self.replay_cache_capacity == 0 {
            return Err(invalid("auth.replay_cache_capacity", "must be > 0"));
        }
        crate::auth::scope::Routes::parse(&self.hmac_routes)
            .map_err(|m| invalid("auth.hmac_routes", m))?;
        if let Some(j) = &self.jwt {
            validate_jwt(j, tenants)?;
        }
        Ok(())
    }
}

fn validate_jwt(j: &JwtConfig, tenants: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
    let f = |k: &str| format!("auth.jwt.{k}");
    let strings = |k: &str, list: &[String]| -> Result<(), ConfigError> {
        if list.is_empty() || list.len() > 64 {
            return Err(invalid(f(k), "list 1-64 values"));
        }
        if list.iter().any(|s| s.is_empty() || s.len() > 1024) {
            return Err(invalid(f(k), "values must be 1-1024 bytes"));
        }
        Ok(())
    };
    validate_jwt_issuers(j, tenants)?;
    strings("audiences", &j.audiences)?;
    strings("algorithms", &j.algorithms)?;
    if let Some(a) = j
        .algorithms
        .iter()
        .find(|a| !JWT_ALGORITHMS.contains(&a.as_str()))
    {
        return Err(invalid(
            f("algorithms"),
            format!("{a:?} is not one of \"RS256\", \"ES256\", \"EdDSA\""),
        ));
    }
    for realm in j.realms() {
        let f = |k: &str| format!("{}.{k}", realm.field);
        if realm.jwks_file.is_none() && realm.jwks_url.is_none() {
            return Err(invalid(f("jwks_file"), "set jwks_file, jwks_url or both"));
        }
        if let Some(u) = realm.jwks_url {
            let uri: http::Uri = u
                .parse()
                .map_err(|e| invalid(f("jwks_url"), format!("not a URL: {e}")))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(invalid(
                    f("jwks_url"),
                    "only http:// URLs are supported (no TLS stack): use the IdP's \
                     in-cluster service address, or a jwks_file kept up to date",
                ));
            }
        }
    }
    for (k, v, lo, hi) in [
        ("jwks_refresh_ms", j.jwks_refresh_ms, 1000, 86_400_000),
        ("jwks_min_refresh_ms", j.jwks_min_refresh_ms, 100, 3_600_000),
        ("jwks_timeout_ms", j.jwks_timeout_ms, 1, 60_000),
        ("jwks_max_bytes", j.jwks_max_bytes as u64, 1024, 16 << 20),
        ("leeway_secs", j.leeway_secs, 0, 3600),
        ("max_token_bytes", j.max_token_bytes as u64, 256, 65_536),
    ] {
        if !(lo..=hi).contains(&v) {
            return Err(invalid(f(k), format!("must be within {lo}..={hi}")));
        }
    }
    for (k, v) in [
        ("tenant_claim", Some(&j.tenant_claim)),
        ("tier_claim", j.tier_claim.as_ref()),
        ("scope_claim", j.scope_claim.as_ref()),
    ] {
        if let Some(v) = v
            && (v.is_empty() || v.len() > 256)
        {
            return Err(invalid(f(k), "must be 1-256 bytes"));
        }
    }
    if j.tier_claim.is_none() && (!j.tiers.is_empty() || j.default_tier.is_some()) {
        return Err(invalid(
            f("tier_claim"),
            "required when tiers are configured",
        ));
    }
    if j.tier_claim.is_some() && j.tiers.is_empty() {
        return Err(invalid(f("tiers"), "list at least one tier for tier_claim"));
    }
    if let Some(d) = &j.default_tier
        && !j.tiers.contains_key(d)
    {
        return Err(invalid(
            f("default_tier"),
            format!("{d:?} is not in auth.jwt.tiers"),
        ));
    }
    for (name, t) in &j.tiers {
        Scope::from_config(t)
            .map_err(|e| invalid(f(&format!("tiers.{name}.{}", e.field)), e.message))?;
    }
    crate::auth::scope::Routes::parse(&j.routes).map_err(|m| invalid(f("routes"), m))?;
    Ok(())
}

/// `auth.jwt.issuers`: `iss` strings (the top-level keys), or issuer tables, each with
/// keys of its own and the configured tenants it may name.
fn validate_jwt_issuers(j: &JwtConfig, tenants: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
    let value = |field: &str, v: &str, max: usize| -> Result<(), ConfigError> {
        if v.is_empty() || v.len() > max {
            return Err(invalid(field, format!("values must be 1-{max} bytes")));
        }
        Ok(())
    };
    if j.issuers.is_empty() || j.issuers.len() > 64 {
        return Err(invalid("auth.jwt.issuers", "list 1-64 values"));
    }
    let tables = j
        .issuers
        .iter()
        .filter(|i| matches!(i, JwtIssuer::Table(_)))
        .count();
    if tables == 0 {
        for i in &j.issuers {
            if let JwtIssuer::Name(n) = i {
                value("auth.jwt.issuers", n, 1024)?;
            }
        }
        return Ok(());
    }
    if let Some(at) = j
        .issuers
        .iter()
        .position(|i| matches!(i, JwtIssuer::Name(_)))
    {
        return Err(invalid(
            format!("auth.jwt.issuers[{at}]"),
            "give every issuer as a [[auth.jwt.issuers]] table (issuer, jwks_file / \
             jwks_url, tenants), or every one as a string, not both",
        ));
    }
    for (k, set) in [
        ("jwks_file", j.jwks_file.is_some()),
        ("jwks_url", j.jwks_url.is_some()),
    ] {
        if set {
            return Err(invalid(
                format!("auth.jwt.{k}"),
                "with [[auth.jwt.issuers]] tables each issuer names its own jwks_file \
                 and/or jwks_url",
            ));
        }
    }
    let mut seen = HashSet::new();
    for (i, entry) in j.issuers.iter().enumerate() {
        let JwtIssuer::Table(t) = entry else {
            continue;
        };
        let f = |k: &str| format!("auth.jwt.issuers[{i}].{k}");
        value(&f("issuer"), &t.issuer, 1024)?;
        if !seen.insert(t.issuer.as_str()) {
            return Err(invalid(
                f("issuer"),
                format!("{:?} is listed twice", t.issuer),
            ));
        }
        if t.tenants.is_empty() {
            return Err(invalid(
                f("tenants"),
                "list the tenants this issuer's tokens may name",
            ));
        }
        let mut listed = HashSet::new();
        for name in &t.tenants {
            if !tenants(name) {
                return Err(invalid(
                    f("tenants"),
                    format!("{name:?} is not a configured tenant ([tenants.{name}])"),
                ));
            }
            if !listed.insert(name.as_str()) {
                return Err(invalid(f("tenants"), format!("{name:?} is listed twice")));
            }
        }
        if let Some(typ) = &t.typ {
            value(&f("typ"), typ, 256)?;
        }
        if let Some(azp) = &t.allowed_azp {
            if azp.is_empty() || azp.len() > 64 {
                return Err(invalid(f("allowed_azp"), "list 1-64 values"));
            }
            for a in azp {
                value(&f("allowed_azp"), a, 1024)?;
            }
        }
    }
    Ok(())
}
