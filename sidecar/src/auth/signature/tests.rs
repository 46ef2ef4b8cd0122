use super::*;
use crate::config::TenantBinding;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{HeaderName, HeaderValue, Method, Uri};

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

fn verify_at(v: &Verifier, r: &(Method, Uri, HeaderMap), now: i64) -> Result<Verified, AuthError> {
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
