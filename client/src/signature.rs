//! RFC 9421 HTTP Message Signatures with `hmac-sha256`, the parts a signer and the sidecar's
//! verifier share: the covered components' values (sections 2.1 and 2.2), the signature
//! parameters as an RFC 8941 inner list, the signature base (section 2.5), HMAC-SHA256, and
//! the gateway's signing helper [`sign_request`].

use crate::{ALG, DEFAULT_LABEL, RESERVED_PREFIX, digest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use ring::hmac;
use sfv::{BareItem, InnerList, Item, Key, ListEntry, Parameters, SerializeValue};

/// Why a signature base (or a signature) could not be built. The sidecar's verifier reports
/// these as its `missing` and `malformed` refusals.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing: {0}")]
    Missing(String),
    #[error("malformed: {0}")]
    Malformed(String),
}

fn malformed(m: impl Into<String>) -> SignatureError {
    SignatureError::Malformed(m.into())
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
pub fn component_value(req: RequestView<'_>, name: &str) -> Result<String, SignatureError> {
    let authority = || -> Result<String, SignatureError> {
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
            Err(SignatureError::Missing(
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
                return Err(SignatureError::Missing(format!(
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
    pub fn to_inner_list(&self) -> Result<InnerList, SignatureError> {
        let mut items = Vec::new();
        for c in &self.components {
            let s = sfv::String::from_string(c.clone())
                .map_err(|_| malformed("component name is not an sf-string"))?;
            items.push(Item::new(BareItem::String(s)));
        }
        let mut params = Parameters::new();
        let key = |k: &str| Key::from_string(k.to_string()).expect("static key is valid");
        let int = |v: i64| -> Result<BareItem, SignatureError> {
            Ok(BareItem::Integer(
                sfv::Integer::try_from(v).map_err(|_| malformed("integer out of range"))?,
            ))
        };
        let string = |v: &str| -> Result<BareItem, SignatureError> {
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
}

/// Build the signature base (RFC 9421 section 2.5) for `components` over `req`, with
/// `params_value` as the serialized `@signature-params` value.
pub fn signature_base(
    req: RequestView<'_>,
    components: &[String],
    params_value: &str,
) -> Result<String, SignatureError> {
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

/// Serialize signature parameters as the `@signature-params` value (one inner list).
pub fn serialize_inner_list(il: InnerList) -> Result<String, SignatureError> {
    vec![ListEntry::InnerList(il)]
        .serialize_value()
        .map_err(|_| malformed("cannot serialize signature parameters"))
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
            label: DEFAULT_LABEL.into(),
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
) -> Result<(), SignatureError> {
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

    // RFC 9421 appendix B.1.5, "test-shared-secret".
    const SHARED_SECRET_B64: &str =
        "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==";

    #[test]
    fn rfc9421_b25_signature_base_and_hmac() {
        // RFC 9421 appendix B.2.5 over the test request of appendix B.2, its parameters built
        // here (the sidecar's tests parse them from the RFC's Signature-Input).
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert(
            "date",
            HeaderValue::from_static("Tue, 20 Apr 2021 02:07:55 GMT"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let u: Uri = "/foo?param=Value&Pet=dog".parse().unwrap();
        let params = SigParams {
            components: vec!["date".into(), "@authority".into(), "content-type".into()],
            created: Some(1618884473),
            keyid: Some("test-shared-secret".into()),
            ..Default::default()
        };
        let params_value = serialize_inner_list(params.to_inner_list().unwrap()).unwrap();
        let view = RequestView {
            method: &Method::POST,
            uri: &u,
            headers: &h,
        };
        let base = signature_base(view, &params.components, &params_value).unwrap();
        assert_eq!(
            base,
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\"content-type\": application/json\n\"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
        );
        let key = STANDARD.decode(SHARED_SECRET_B64).unwrap();
        let sig = hmac_sign(&key, &base);
        assert_eq!(
            STANDARD.encode(&sig),
            "pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8="
        );
        assert!(hmac_verify(&key, &base, &sig));
        assert!(!hmac_verify(b"another key entirely", &base, &sig));
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
            Err(SignatureError::Missing(_))
        ));
        assert!(component_value(v3, "@query-param").is_err());
        // Two Host lines make the authority ambiguous: refused rather than reading the first.
        let mut h4 = h.clone();
        h4.append("host", HeaderValue::from_static("evil.example"));
        let v4 = RequestView { headers: &h4, ..v };
        assert!(matches!(
            component_value(v4, "@authority"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn a_signature_base_refuses_what_it_cannot_state_unambiguously() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("one"));
        let u: Uri = "/p".parse().unwrap();
        let v = RequestView {
            method: &Method::GET,
            uri: &u,
            headers: &h,
        };
        let covered = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            signature_base(v, &covered(&["@signature-params"]), "()"),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            signature_base(v, &covered(&["@method", "x-a"]), "(\"@method\" \"x-a\")").unwrap(),
            "\"@method\": GET\n\"x-a\": one\n\"@signature-params\": (\"@method\" \"x-a\")"
        );
    }

    #[test]
    fn a_signer_covers_the_tenant_every_reserved_header_and_the_digest() {
        let m = Method::POST;
        let u: Uri = "/v1/chat/completions".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(crate::TENANT_HEADER, HeaderValue::from_static("acme"));
        h.insert("x-bulkhead-priority", HeaderValue::from_static("high"));
        let mut o = SignOptions::new("gw", 1000);
        o.nonce = Some("n1".into());
        sign_request(&m, &u, &mut h, b"{}", b"k", &o).unwrap();
        assert_eq!(
            h["content-digest"],
            crate::digest::content_digest_sha256(b"{}").as_str()
        );
        assert_eq!(
            h["signature-input"],
            r#"bulkhead=("@method" "@path" "x-bulkhead-priority" "x-bulkhead-tenant" "content-digest");created=1000;nonce="n1";alg="hmac-sha256";keyid="gw""#
        );
        let sig = h["signature"].to_str().unwrap();
        assert!(sig.starts_with("bulkhead=:") && sig.ends_with(':'), "{sig}");
    }
}
