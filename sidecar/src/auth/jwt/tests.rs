use super::*;
use crate::Config;
use prometheus_client::metrics::family::Family;
use std::time::Duration;

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
    let private =
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": x, "d": x}]});
    assert!(KeySet::parse(private.to_string().as_bytes()).is_err());
    let small = serde_json::json!({"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]});
    assert!(KeySet::parse(small.to_string().as_bytes()).is_err());
    assert!(KeySet::parse(b"[]").is_err());
}

#[test]
fn jwks_bounds_hold_at_their_edges() {
    let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let ed = |kid: String| serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x});
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

/// The keys of a JWKS URL, ten minutes between fetches (fetched only inside a runtime).
fn url_keys(url: &str) -> Arc<UrlKeys> {
    UrlKeys::start(
        UrlSettings {
            url: url.parse().unwrap(),
            refresh: Duration::from_secs(600),
            min_refresh: Duration::from_secs(600),
            timeout: Duration::from_millis(100),
            max_bytes: 1024,
        },
        Family::default(),
    )
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

/// A verified token is remembered: asked again, the verifier answers without checking its
/// signature, for as long as the keys that verified it are the issuer's (a refresh of the
/// issuer's JWKS URL checks it again); a token verified with file keys likewise.
#[test]
fn a_remembered_token_is_not_verified_again_until_its_url_keys_change() {
    let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[tenants.globex]\n\
        [auth.jwt]\naudiences = [\"bh\"]\n\
        [[auth.jwt.issuers]]\nissuer = \"A\"\njwks_url = \"http://127.0.0.1:9/certs\"\n\
        tenants = [\"acme\"]\n\
        [[auth.jwt.issuers]]\nissuer = \"B\"\njwks_file = \"/b\"\ntenants = [\"globex\"]\n";
    let cfg = Config::from_toml(text).unwrap();
    let (a, b) = (TestKey::new("a"), TestKey::new("b"));
    // No runtime here: the URL is never fetched; the test sets its keys.
    let url = url_keys("http://127.0.0.1:9/certs");
    let refresh = || *url.keys.write().unwrap() = Arc::new(TestKey::jwks(&[&a]));
    refresh();
    let v = JwtVerifier::new(
        cfg.auth.jwt.as_ref().unwrap(),
        vec![
            IssuerKeys {
                file: KeySet::default(),
                url: Some(url.clone()),
            },
            TestKey::jwks(&[&b]).into(),
        ],
    )
    .unwrap();
    let full = || FULL_VERIFICATIONS.with(|c| c.get());
    let tenant = |t: &str| v.verify(t, NOW).map(|id| id.tenant).map_err(|e| e.reason());
    let from_url = a.token(serde_json::json!({}), claims("A", "acme"));
    let from_file = b.token(serde_json::json!({}), claims("B", "globex"));
    let before = full();
    for expected in [1, 1, 1] {
        assert_eq!(tenant(&from_url), Ok("acme".into()));
        assert_eq!(full() - before, expected);
    }
    // The URL's keys refreshed (the same key in a new set): checked once more, then remembered.
    refresh();
    for expected in [2, 2] {
        assert_eq!(tenant(&from_url), Ok("acme".into()));
        assert_eq!(full() - before, expected);
    }
    for expected in [3, 3] {
        assert_eq!(tenant(&from_file), Ok("globex".into()));
        assert_eq!(full() - before, expected);
    }
    // The key gone from the URL: the remembered token is refused like any other.
    *url.keys.write().unwrap() = Arc::new(KeySet::default());
    assert_eq!(tenant(&from_url), Err("unknown_key"));
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
    let url = url_keys("http://127.0.0.1:9/realms/acme/certs");
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
