//! Tenants from JWTs over real sockets, with tokens from an independent signer
//! (`tests/support/jwt_signer.py`, pyca/cryptography): RS256, ES256 and EdDSA accepted; every
//! attack refused with 401 and its reason, counted, never forwarded; JWKS rotation picked up
//! without a restart, from a file and from a URL; the IdP going away keeps the cached keys.

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ISS: &str = "https://idp.test/realms/acme";

/// Keys (public JWKs by name) and the tokens the independent signer made.
struct Signed {
    jwks: Value,
    tokens: Vec<String>,
}

/// Run the signer on `spec`. Missing python3 or `cryptography` fails the test (never skips).
fn sign(spec: Value) -> Signed {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/jwt_signer.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("the JWT tests need python3 with pyca/cryptography (python3-cryptography): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the JWT signer failed (the JWT tests need python3 with pyca/cryptography, Debian \
         package python3-cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Signed {
        jwks: v["jwks"].clone(),
        tokens: v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
    }
}

impl Signed {
    /// A JWKS document with the named keys.
    fn jwks(&self, names: &[&str]) -> String {
        json!({"keys": names.iter().map(|n| self.jwks[*n].clone()).collect::<Vec<_>>()}).to_string()
    }
}

/// Claims as Keycloak issues them, the tenant in a nested claim.
fn claims(tenant: &str) -> Value {
    let now = now();
    json!({
        "iss": ISS, "aud": ["account", "bulkhead"], "sub": "user-1", "azp": "chat-ui",
        "exp": now + 300, "iat": now - 1, "nbf": now - 1,
        "org": {"tenant": tenant},
    })
}

fn with(mut c: Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    f(c.as_object_mut().unwrap());
    c
}

/// `[auth.jwt]` reading keys from `jwks` (a file path) and/or `url`, plus `extra` lines.
fn jwt_config(file: Option<&std::path::Path>, url: Option<&str>, extra: &str) -> String {
    let mut s = format!(
        "\n[auth.jwt]\nissuers = [{ISS:?}]\naudiences = [\"bulkhead\"]\n\
         tenant_claim = \"org.tenant\"\nleeway_secs = 30\n"
    );
    if let Some(f) = file {
        s.push_str(&format!("jwks_file = {:?}\n", f.display().to_string()));
    }
    if let Some(u) = url {
        s.push_str(&format!(
            // No periodic refresh within a test: a fetch after the first is an early refresh
            // (a token named an unknown key) or a retry after a failure.
            "jwks_url = {u:?}\njwks_refresh_ms = 600000\njwks_min_refresh_ms = 100\n"
        ));
    }
    s.push_str(extra);
    s.push('\n');
    s
}

/// A verifier as the sidecar builds one at start: tenant acme's JWT settings (`extra`
/// appended to `[auth.jwt]`) with the keys of `s` named in `keys`.
fn jwt_verifier(
    s: &Signed,
    keys: &[&str],
    extra: &str,
) -> bulkhead_sidecar::auth::jwt::JwtVerifier {
    use bulkhead_sidecar::auth::jwt::{JwtVerifier, KeySet};
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n{}",
        jwt_config(Some(std::path::Path::new("/unused")), None, extra)
    );
    let cfg = bulkhead_sidecar::Config::from_toml(&text).unwrap();
    let keys = KeySet::parse(s.jwks(keys).as_bytes()).unwrap();
    JwtVerifier::new(cfg.auth.jwt.as_ref().unwrap(), vec![keys.into()]).unwrap()
}

fn bearer(h: &Harness, path: &str, body: &str, token: &str) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from(body.to_string())));
    *r.method_mut() = Method::POST;
    *r.uri_mut() = h.url(path);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

const CHAT: &str = "/v1/chat/completions";

fn body() -> String {
    chat("hello", "")
}

async fn expect_refused(h: &Harness, req: Request<Full<Bytes>>, reason: &str, what: &str) {
    let before = h.sim.sim.requests().len();
    let series = format!("bulkhead_auth_failures_total{{reason=\"{reason}\"}}");
    let count = h.metric(&series).await.unwrap_or(0.0);
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{what}: {b:?}");
    let v = json(&b);
    assert_eq!(v["error"]["code"], reason, "{what}: {v}");
    assert_eq!(v["error"]["type"], "authentication_error", "{what}");
    assert_eq!(h.sim.sim.requests().len(), before, "{what}: forwarded");
    assert_eq!(h.metric(&series).await, Some(count + 1.0), "{what}");
}

async fn expect_ok_req(h: &Harness, req: Request<Full<Bytes>>) {
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
}

async fn expect_ok(h: &Harness, token: &str, what: &str) {
    let (p, b) = h.send_collect(bearer(h, CHAT, &body(), token)).await;
    assert_eq!(p.status, StatusCode::OK, "{what}: {b:?}");
}

/// Poll until `token` is answered with `want` (or panic at the deadline).
async fn wait_status(h: &Harness, token: &str, want: StatusCode, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (p, b) = h.send_collect(bearer(h, CHAT, &body(), token)).await;
        if p.status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} ({b:?})",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn keys3() -> Value {
    json!([
        {"name": "rsa", "kty": "RSA", "kid": "rsa-1"},
        {"name": "ec", "kty": "EC", "kid": "ec-1"},
        {"name": "ed", "kty": "OKP", "kid": "ed-1"},
    ])
}

#[tokio::test]
async fn each_algorithm_is_accepted_and_authorization_stays_here() {
    let s = sign(json!({"keys": keys3(), "tokens": [
        {"key": "rsa", "claims": claims("acme")},
        {"key": "ec", "claims": claims("acme")},
        {"key": "ed", "claims": claims("globex")},
        // Audience as a plain string, times as floats, the tenant as a namespaced claim.
        {"key": "ed", "claims": with(claims("acme"), |c| {
            c.insert("aud".into(), "bulkhead".into());
            c.insert("exp".into(), json!(now() as f64 + 300.5));
        })},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks(&["rsa", "ec", "ed"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&jwt_config(Some(&jwks), None, ""))
    })
    .await;
    for (i, t) in s.tokens.iter().enumerate() {
        expect_ok(&h, t, &format!("token {i}")).await;
    }
    let seen = h.sim.sim.requests();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter()
            .all(|r| !r.headers.contains_key("authorization")),
        "the bearer token was forwarded"
    );
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"200\"}", 3.0)
        .await;
    h.wait_metric(
        "bulkhead_requests_total{tenant=\"globex\",code=\"200\"}",
        1.0,
    )
    .await;
    // A JWT client's own tenant header is not believed, nor passed on.
    let mut req = bearer(&h, CHAT, &body(), &s.tokens[0]);
    req.headers_mut()
        .insert("x-bulkhead-tenant", "globex".parse().unwrap());
    expect_ok_req(&h, req).await;
    let last = h.sim.sim.requests().pop().unwrap();
    assert!(!last.headers.contains_key("x-bulkhead-tenant"));
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"200\"}", 4.0)
        .await;
    // The gateway's signatures still work beside JWTs, and a client's Authorization header
    // on a signed request is not passed on either.
    let mut req = h.signed("acme", Method::POST, CHAT, &body());
    req.headers_mut()
        .insert("authorization", "Bearer sk-client-key".parse().unwrap());
    expect_ok_req(&h, req).await;
    let last = h.sim.sim.requests().pop().unwrap();
    assert!(!last.headers.contains_key("authorization"));
    // Audit records name the key that signed the token.
    let dir = h.shutdown_keep_dir().await;
    let audit = std::fs::read_to_string(dir.path().join("audit/globex.jsonl")).unwrap();
    assert!(audit.contains(r#""key_id":"jwt:ed-1""#), "{audit}");
}

#[tokio::test]
async fn authorization_is_forwarded_only_when_configured() {
    let s = sign(
        json!({"keys": [{"name": "ed", "kty": "OKP", "kid": "ed-1"}],
        "tokens": [{"key": "ed", "claims": claims("acme")}]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks(&["ed"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replacen("[auth]\n", "[auth]\nforward_authorization = true\n", 1);
        t.push_str(&jwt_config(Some(&jwks), None, ""));
    })
    .await;
    expect_ok(&h, &s.tokens[0], "token").await;
    let seen = h.sim.sim.requests();
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {}", s.tokens[0])
    );
    h.shutdown().await;
}

#[tokio::test]
async fn every_attack_is_refused_and_never_forwarded() {
    let now = now();
    let deep = (0..20).fold(json!(1), |v, _| json!([v]));
    let attacks: Vec<(Value, &str, &str)> = vec![
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"alg": "none"}, "sign": "none"}),
            "alg_not_allowed",
            "alg none",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"alg": "HS256"},
            "sign": "hs256-with-public-key"}),
            "alg_not_allowed",
            "HS256 keyed with the public key",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"alg": "PS256"}}),
            "alg_not_allowed",
            "PS256",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"kid": "nope"}}),
            "unknown_key",
            "kid not in the JWKS",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"kid": null}}),
            "malformed",
            "no kid",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"kid": ""}}),
            "malformed",
            "an empty kid",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"kid": "k".repeat(257)}}),
            "malformed",
            "a kid over 256 bytes",
        ),
        (
            json!({"key": "evil", "claims": claims("acme"), "header": {"kid": "evil-1",
            "jku": "http://evil.test/jwks", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}}}),
            "unknown_key",
            "attacker key embedded in the header",
        ),
        (
            json!({"key": "evil", "claims": claims("acme"), "header": {"kid": "ed-1"}}),
            "bad_signature",
            "attacker key under a known kid",
        ),
        (
            json!({"key": "ec", "claims": claims("acme"), "header": {"alg": "RS256"}}),
            "key_mismatch",
            "RS256 naming an EC key",
        ),
        (
            json!({"key": "rsa", "claims": claims("acme"), "header": {"alg": "ES256"}}),
            "key_mismatch",
            "ES256 naming an RSA key",
        ),
        (
            json!({"key": "ed", "claims": claims("acme"), "header": {"alg": "ES256", "kid": "ed-1"}}),
            "key_mismatch",
            "ES256 naming an Ed25519 key",
        ),
        (
            json!({"key": "rsa", "claims": with(claims("acme"), |c| { c.insert("exp".into(), json!(now - 120)); })}),
            "expired",
            "expired",
        ),
        (
            json!({"key": "rsa", "claims": with(claims("acme"), |c| { c.remove("exp"); })}),
            "malformed",
            "no exp",
        ),
        (
            json!({"key": "ec", "claims": with(claims("acme"), |c| { c.insert("nbf".into(), json!(now + 300)); })}),
            "not_yet_valid",
            "nbf in the future",
        ),
        (
            json!({"key": "ec", "claims": with(claims("acme"), |c| { c.insert("iat".into(), json!(now + 300)); })}),
            "not_yet_valid",
            "iat in the future",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert("aud".into(), json!(["account"])); })}),
            "wrong_audience",
            "wrong audience",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.remove("aud"); })}),
            "wrong_audience",
            "no audience",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert("iss".into(), json!("https://evil.test")); })}),
            "wrong_issuer",
            "wrong issuer",
        ),
        (
            json!({"key": "ed", "claims": claims("initech")}),
            "unknown_tenant",
            "unknown tenant",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.remove("org"); })}),
            "claim_missing",
            "no tenant claim",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert("org".into(), json!({"tenant": 7})); })}),
            "claim_missing",
            "tenant claim not a string",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert("pad".into(), json!("x".repeat(9000))); })}),
            "malformed",
            "token over 8 KiB",
        ),
        (
            json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert("deep".into(), deep); })}),
            "malformed",
            "claims nested too deep",
        ),
        (
            json!({"key": "ed", "claims": claims("acme"), "header": {"crit": ["exp"]}}),
            "malformed",
            "crit header",
        ),
    ];
    let mut tokens: Vec<Value> = attacks.iter().map(|(t, _, _)| t.clone()).collect();
    // Two valid tokens, to tamper with and to use on a route that takes no JWT.
    tokens.push(json!({"key": "ed", "claims": claims("acme")}));
    tokens.push(json!({"key": "ed", "claims": claims("globex")}));
    let mut keys = keys3().as_array().unwrap().clone();
    keys.push(json!({"name": "evil", "kty": "OKP", "kid": "evil-1"}));
    let s = sign(json!({"keys": keys, "tokens": tokens}));
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks(&["rsa", "ec", "ed"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&jwt_config(
            Some(&jwks),
            None,
            "routes = [\"/v1/chat/completions\", \"/v1/models/*\"]",
        ))
    })
    .await;
    for ((_, reason, what), token) in attacks.iter().zip(&s.tokens) {
        expect_refused(&h, bearer(&h, CHAT, &body(), token), reason, what).await;
    }
    let n = attacks.len();
    let (acme, globex) = (&s.tokens[n], &s.tokens[n + 1]);
    // A valid signature over other claims: globex's payload under acme's header and signature.
    let mut parts: Vec<&str> = acme.split('.').collect();
    parts[1] = globex.split('.').nth(1).unwrap();
    expect_refused(
        &h,
        bearer(&h, CHAT, &body(), &parts.join(".")),
        "bad_signature",
        "spliced",
    )
    .await;
    for junk in ["a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.AA=="] {
        expect_refused(&h, bearer(&h, CHAT, &body(), junk), "malformed", junk).await;
    }
    // A route that does not take JWTs.
    let req = bearer(&h, "/v1/embeddings", r#"{"model":"m","input":"x"}"#, acme);
    expect_refused(&h, req, "method_not_accepted", "embeddings").await;
    // The valid one passes; unconfigured tenants never became labels.
    expect_ok(&h, acme, "valid").await;
    let m = h.metrics().await;
    assert!(!m.contains("initech"));
    h.shutdown().await;
}

#[tokio::test]
async fn jwks_file_rotation_is_picked_up_without_restart() {
    let s = sign(json!({"keys": [
            {"name": "old", "kty": "RSA", "kid": "2026-10"},
            {"name": "new", "kty": "RSA", "kid": "2026-11"}],
        "tokens": [{"key": "old", "claims": claims("acme")},
                   {"key": "new", "claims": claims("acme")}]}));
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks(&["old"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&jwt_config(Some(&jwks), None, ""))
    })
    .await;
    let (old, new) = (&s.tokens[0], &s.tokens[1]);
    expect_ok(&h, old, "old key").await;
    expect_refused(
        &h,
        bearer(&h, CHAT, &body(), new),
        "unknown_key",
        "not yet published",
    )
    .await;
    // The IdP publishes the new key next to the old one (written as a volume update is).
    let write = |text: String| {
        let tmp = jwks.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &jwks).unwrap();
    };
    write(s.jwks(&["old", "new"]));
    wait_status(&h, new, StatusCode::OK, "new key after rotation").await;
    expect_ok(&h, old, "old key still published").await;
    // ... then retires the old one.
    write(s.jwks(&["new"]));
    wait_status(&h, old, StatusCode::UNAUTHORIZED, "old key retired").await;
    expect_ok(&h, new, "new key").await;
    // A broken JWKS file is rejected as a reload; the keys in use stay.
    let reloads = "bulkhead_config_reloads_total{result=\"invalid\"}";
    let errors = h.metric(reloads).await.unwrap_or(0.0);
    write("{\"keys\": 7}".into());
    h.wait_metric(reloads, errors + 1.0).await;
    expect_ok(&h, new, "new key after a bad JWKS file").await;
    h.shutdown().await;
}

/// A stand-in IdP serving a JWKS document (each answer closes its connection, so stopping the
/// task makes the IdP unreachable); `fetches` counts the documents it served.
async fn idp(
    doc: Arc<Mutex<String>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
) -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/realms/acme/protocol/openid-connect/certs",
        l.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (doc, fetches) = (doc.clone(), fetches.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = doc.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("connection", "close")
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn jwks_url_rotation_and_an_unreachable_idp_keeps_cached_keys() {
    let s = sign(json!({"keys": [
            {"name": "a", "kty": "OKP", "kid": "a"},
            {"name": "b", "kty": "EC", "kid": "b"}],
        "tokens": [{"key": "a", "claims": claims("acme")},
                   {"key": "b", "claims": claims("acme")}]}));
    let doc = Arc::new(Mutex::new(s.jwks(&["a"])));
    let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fetched = || fetches.load(std::sync::atomic::Ordering::SeqCst);
    let (url, server) = idp(doc.clone(), fetches.clone()).await;
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&jwt_config(None, Some(&url), "jwks_max_bytes = 2048"))
    })
    .await;
    let (a, b) = (&s.tokens[0], &s.tokens[1]);
    wait_status(&h, a, StatusCode::OK, "first fetch").await;
    // Rotation: an unknown kid asks for an early refresh (at most one per 100 ms here; the
    // periodic one is 10 minutes away).
    *doc.lock().unwrap() = s.jwks(&["a", "b"]);
    wait_status(&h, b, StatusCode::OK, "rotated key").await;
    // The IdP was asked once at start and once per early refresh, not in a loop: over a
    // quiet half second (no unknown kid, the periodic refresh 10 minutes away) it is asked at
    // most once more (a nudge left pending by the last refused request). (A window in which
    // nothing may happen, not a wait for a condition.)
    let quiet = fetched();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fetched() <= quiet + 1,
        "{} fetches with nothing asking",
        fetched() - quiet
    );
    let oks = "bulkhead_jwks_refreshes_total{result=\"ok\"}";
    let errors = "bulkhead_jwks_refreshes_total{result=\"error\"}";
    let unknown_kid = {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.e30.AA", b.encode(r#"{"alg":"EdDSA","kid":"c"}"#))
    };
    // Poll until `more` further fetches failed, asking for refreshes with an unknown kid.
    let failed_fetches = |more: f64| {
        let (h, unknown_kid) = (&h, &unknown_kid);
        async move {
            let want = h.metric(errors).await.unwrap_or(0.0) + more;
            let deadline = Instant::now() + Duration::from_secs(10);
            while h.metric(errors).await.unwrap_or(0.0) < want {
                assert!(Instant::now() < deadline, "no failed refresh seen");
                let req = bearer(h, CHAT, &body(), unknown_kid);
                expect_refused(h, req, "unknown_key", "unknown kid").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // An answer of exactly jwks_max_bytes (2 KiB here) is taken.
    let exact = s.jwks(&["a", "b"]);
    *doc.lock().unwrap() = format!("{exact}{}", " ".repeat(2048 - exact.len()));
    let want = h.metric(oks).await.unwrap_or(0.0) + 1.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.metric(oks).await.unwrap_or(0.0) < want {
        assert!(Instant::now() < deadline, "a 2,048-byte JWKS was not taken");
        let req = bearer(&h, CHAT, &body(), &unknown_kid);
        expect_refused(&h, req, "unknown_key", "unknown kid").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One over it is a failed fetch: the keys stay.
    *doc.lock().unwrap() = format!("{}{}", s.jwks(&["b"]), " ".repeat(4096));
    failed_fetches(1.0).await;
    expect_ok(&h, a, "key a after an oversized answer").await;
    // The IdP goes away: fetches fail, the cached keys keep working, and a failed fetch is
    // retried after jwks_min_refresh_ms, not at once.
    server.abort();
    let _ = server.await;
    failed_fetches(2.0).await;
    // Over half a second, at most one retry per jwks_min_refresh_ms (100 ms here).
    let before = h.metric(errors).await.unwrap_or(0.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = h.metric(errors).await.unwrap_or(0.0);
    assert!(
        after - before <= 7.0,
        "{} failed fetches in 500 ms",
        after - before
    );
    expect_ok(&h, a, "cached key a").await;
    expect_ok(&h, b, "cached key b").await;
    h.shutdown().await;
}

#[tokio::test]
async fn tiers_and_scope_claims_limit_a_token() {
    let scoped = |tier: Option<&str>, scope: Option<Value>| {
        with(claims("acme"), |c| {
            if let Some(t) = tier {
                c.insert("tier".into(), t.into());
            }
            if let Some(s) = scope {
                c.insert("bulkhead".into(), s);
            }
        })
    };
    let s = sign(
        json!({"keys": [{"name": "ed", "kty": "OKP", "kid": "ed-1"}], "tokens": [
            {"key": "ed", "claims": scoped(Some("free"), None)},
            {"key": "ed", "claims": scoped(Some("pro"), None)},
            {"key": "ed", "claims": scoped(Some("gold"), None)},
            {"key": "ed", "claims": scoped(None, None)},
            {"key": "ed", "claims": scoped(Some("pro"), Some(json!({"models": ["small"]})))},
            {"key": "ed", "claims": scoped(Some("pro"), Some(json!({"models": "small"})))},
            {"key": "ed", "claims": scoped(Some("pro"), Some(json!({"tools": ["get_weather"]})))},
        ]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks(&["ed"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replacen(
            "[auth]\n",
            "[auth]\nhmac_routes = [\"/v1/embeddings\"]\n",
            1,
        );
        t.push_str(&jwt_config(
            Some(&jwks),
            None,
            "tier_claim = \"tier\"\nscope_claim = \"bulkhead\"\n\
             [auth.jwt.tiers.free]\nmodels = [\"small\"]\nmax_tokens = 64\n\
             [auth.jwt.tiers.pro]\n",
        ));
    })
    .await;
    let t = &s.tokens;
    let big = chat("hi", "").replace("\"m\"", "\"big\"");
    let small = chat("hi", "").replace("\"m\"", "\"small\"");
    let status = |tok: &str, body: &str| {
        let req = bearer(&h, CHAT, body, tok);
        async { h.send_collect(req).await }
    };
    let (p, b) = status(&t[0], &big).await;
    assert_eq!(
        p.status,
        StatusCode::FORBIDDEN,
        "free tier, big model: {b:?}"
    );
    assert_eq!(json(&b)["error"]["code"], "permission_denied");
    assert_eq!(status(&t[0], &small).await.0.status, StatusCode::OK);
    assert_eq!(
        status(&t[1], &big).await.0.status,
        StatusCode::OK,
        "pro tier"
    );
    expect_refused(&h, bearer(&h, CHAT, &big, &t[2]), "unknown_tier", "gold").await;
    expect_refused(
        &h,
        bearer(&h, CHAT, &big, &t[3]),
        "claim_missing",
        "no tier",
    )
    .await;
    assert_eq!(
        status(&t[4], &big).await.0.status,
        StatusCode::FORBIDDEN,
        "pro narrowed by the scope claim"
    );
    expect_refused(
        &h,
        bearer(&h, CHAT, &big, &t[5]),
        "malformed",
        "bad scope claim",
    )
    .await;
    // The scope claim's tools narrow the tier's (pro allows every tool): a tool outside the
    // claim is refused and never forwarded, one inside it is served.
    let tools = |names: &[&str]| {
        let list: Vec<String> = names
            .iter()
            .map(|n| format!(r#"{{"type":"function","function":{{"name":"{n}"}}}}"#))
            .collect();
        chat("hi", &format!(r#","tools":[{}]"#, list.join(",")))
    };
    for (names, what) in [
        (&["rm_rf"][..], "a tool outside the claim"),
        (
            &["get_weather", "rm_rf"][..],
            "one tool of two outside the claim",
        ),
    ] {
        let before = h.sim.sim.requests().len();
        let (p, b) = status(&t[6], &tools(names)).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{what}: {b:?}");
        let v = json(&b);
        assert_eq!(v["error"]["code"], "permission_denied", "{what}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(r#"tool "rm_rf""#), "{what}: {msg}");
        assert_eq!(h.sim.sim.requests().len(), before, "{what}: forwarded");
    }
    let (p, b) = status(&t[6], &tools(&["get_weather"])).await;
    assert_eq!(p.status, StatusCode::OK, "the claim's own tool: {b:?}");
    assert_eq!(
        status(&t[1], &tools(&["rm_rf"])).await.0.status,
        StatusCode::OK,
        "pro without a scope claim allows the tool"
    );
    // Signatures are accepted on the embeddings route only.
    let req = h.signed("acme", Method::POST, CHAT, &body());
    expect_refused(&h, req, "method_not_accepted", "signed chat").await;
    let req = h.signed(
        "acme",
        Method::POST,
        "/v1/embeddings",
        r#"{"model":"m","input":"x"}"#,
    );
    assert_eq!(h.send_collect(req).await.0.status, StatusCode::OK);
    h.shutdown().await;
}

const ISS_A: &str = "https://idp.test/realms/a";
const ISS_B: &str = "https://idp.test/realms/b";

/// `[auth.jwt]` with two issuers, each with its own JWKS file and tenants, plus `extra_a`
/// lines in issuer A's table.
fn two_issuers(a: &std::path::Path, b: &std::path::Path, extra_a: &str) -> String {
    format!(
        "\n[auth.jwt]\naudiences = [\"bulkhead\"]\ntenant_claim = \"org.tenant\"\n\
         [[auth.jwt.issuers]]\nissuer = {ISS_A:?}\njwks_file = {:?}\ntenants = [\"acme\"]\n{extra_a}\n\
         [[auth.jwt.issuers]]\nissuer = {ISS_B:?}\njwks_file = {:?}\ntenants = [\"globex\"]\n",
        a.display().to_string(),
        b.display().to_string()
    )
}

fn from(iss: &str, tenant: &str) -> Value {
    with(claims(tenant), |c| {
        c.insert("iss".into(), iss.into());
    })
}

/// Each issuer's keys mint its own tenants only, and speak for no other issuer: even when both
/// issuers' keys have the same `kid`.
#[tokio::test]
async fn each_issuer_mints_only_its_own_tenants_with_its_own_keys() {
    let s = sign(json!({"keys": [
        {"name": "a", "kty": "OKP", "kid": "k-1"},
        {"name": "b", "kty": "OKP", "kid": "k-1"},
        {"name": "b2", "kty": "EC", "kid": "b-2"},
    ], "tokens": [
        {"key": "a", "claims": from(ISS_A, "acme")},
        {"key": "b", "claims": from(ISS_B, "globex")},
        {"key": "b2", "claims": from(ISS_B, "globex")},
        {"key": "a", "claims": from(ISS_A, "globex")},
        {"key": "b2", "claims": from(ISS_B, "acme")},
        {"key": "a", "claims": from(ISS_B, "globex")},
        {"key": "b", "claims": from(ISS_A, "acme")},
        {"key": "a", "header": {"kid": "b-2", "alg": "ES256"}, "claims": from(ISS_B, "globex")},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let (ja, jb) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&ja, s.jwks(&["a"])).unwrap();
    std::fs::write(&jb, s.jwks(&["b", "b2"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&two_issuers(&ja, &jb, ""))
    })
    .await;
    // The new reasons are series from the start.
    for reason in [
        "tenant_not_allowed_for_issuer",
        "wrong_type",
        "azp_not_allowed",
    ] {
        assert_eq!(
            h.metric(&format!(
                "bulkhead_auth_failures_total{{reason=\"{reason}\"}}"
            ))
            .await,
            Some(0.0),
            "{reason}"
        );
    }
    let t = &s.tokens;
    expect_ok(&h, &t[0], "A's key, A's tenant").await;
    expect_ok(&h, &t[1], "B's key, B's tenant").await;
    expect_ok(&h, &t[2], "B's other key, B's tenant").await;
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"200\"}", 1.0)
        .await;
    h.wait_metric(
        "bulkhead_requests_total{tenant=\"globex\",code=\"200\"}",
        2.0,
    )
    .await;
    let req = |tok: &str| bearer(&h, CHAT, &body(), tok);
    expect_refused(
        &h,
        req(&t[3]),
        "tenant_not_allowed_for_issuer",
        "A names B's tenant",
    )
    .await;
    expect_refused(
        &h,
        req(&t[4]),
        "tenant_not_allowed_for_issuer",
        "B names A's tenant",
    )
    .await;
    expect_refused(
        &h,
        req(&t[5]),
        "wrong_issuer",
        "A's key, iss B (same kid as B's key)",
    )
    .await;
    expect_refused(&h, req(&t[6]), "wrong_issuer", "B's key, iss A").await;
    expect_refused(&h, req(&t[7]), "bad_signature", "A's key under B's kid").await;
    assert_eq!(h.sim.sim.requests().len(), 3);
    h.shutdown().await;
}

/// An issuer may require the header `typ` (RFC 9068 access tokens: `at+jwt`) and an `azp`
/// from a list; the other issuer requires neither.
#[tokio::test]
async fn an_issuer_can_require_a_token_type_and_authorized_parties() {
    let at = |c: Value| json!({"key": "a", "header": {"typ": "at+jwt"}, "claims": c});
    let s = sign(json!({"keys": [
        {"name": "a", "kty": "OKP", "kid": "a-1"},
        {"name": "b", "kty": "OKP", "kid": "b-1"},
    ], "tokens": [
        at(from(ISS_A, "acme")),
        {"key": "a", "header": {"typ": "application/AT+JWT"}, "claims": from(ISS_A, "acme")},
        {"key": "a", "claims": from(ISS_A, "acme")},
        {"key": "a", "header": {"typ": null}, "claims": from(ISS_A, "acme")},
        at(with(from(ISS_A, "acme"), |c| { c.insert("azp".into(), "batch".into()); })),
        at(with(from(ISS_A, "acme"), |c| { c.remove("azp"); })),
        at(with(from(ISS_A, "acme"), |c| { c.insert("azp".into(), "ops".into()); })),
        {"key": "b", "claims": with(from(ISS_B, "globex"), |c| { c.remove("azp"); })},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let (ja, jb) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&ja, s.jwks(&["a"])).unwrap();
    std::fs::write(&jb, s.jwks(&["b"])).unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&two_issuers(
            &ja,
            &jb,
            "typ = \"at+jwt\"\nallowed_azp = [\"chat-ui\", \"ops\"]",
        ))
    })
    .await;
    let t = &s.tokens;
    expect_ok(&h, &t[0], "typ at+jwt, azp chat-ui").await;
    expect_ok(&h, &t[1], "typ application/at+jwt in another letter case").await;
    let req = |tok: &str| bearer(&h, CHAT, &body(), tok);
    expect_refused(&h, req(&t[2]), "wrong_type", "typ JWT").await;
    expect_refused(&h, req(&t[3]), "wrong_type", "no typ").await;
    expect_refused(&h, req(&t[4]), "azp_not_allowed", "azp batch").await;
    expect_refused(&h, req(&t[5]), "azp_not_allowed", "no azp").await;
    expect_ok(&h, &t[6], "azp ops").await;
    expect_ok(&h, &t[7], "issuer B requires neither").await;
    h.shutdown().await;
}

#[test]
fn jwt_config_is_validated() {
    let base = |jwt: &str| {
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[auth.jwt]\n\
             issuers = [\"i\"]\naudiences = [\"a\"]\n{jwt}\n"
        )
    };
    for (jwt, field) in [
        ("", "auth.jwt.jwks_file"),
        ("jwks_url = \"https://idp/certs\"", "auth.jwt.jwks_url"),
        (
            "jwks_file = \"/j\"\nalgorithms = [\"HS256\"]",
            "auth.jwt.algorithms",
        ),
        (
            "jwks_file = \"/j\"\nalgorithms = [\"none\"]",
            "auth.jwt.algorithms",
        ),
        (
            "jwks_file = \"/j\"\nmax_token_bytes = 10",
            "auth.jwt.max_token_bytes",
        ),
        ("jwks_file = \"/j\"\ntier_claim = \"t\"", "auth.jwt.tiers"),
        (
            "jwks_file = \"/j\"\ndefault_tier = \"x\"",
            "auth.jwt.tier_claim",
        ),
        ("jwks_file = \"/j\"\nroutes = [\"/v2\"]", "auth.jwt.routes"),
        (
            "jwks_file = \"/j\"\ntier_claim = \"t\"\n[auth.jwt.tiers.f]\nmax_tokens = 0",
            "auth.jwt.tiers.f.max_tokens",
        ),
    ] {
        let e = bulkhead_sidecar::Config::from_toml(&base(jwt))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{jwt}: {e}");
    }
    // Issuer tables: each error names the issuer's field.
    let tables = |rest: &str| {
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[tenants.globex]\n\
             [auth.jwt]\naudiences = [\"a\"]\n\
             [[auth.jwt.issuers]]\nissuer = \"i\"\njwks_file = \"/j\"\ntenants = [\"acme\"]\n\
             [[auth.jwt.issuers]]\n{rest}\n"
        )
    };
    for (rest, field, says) in [
        (
            "issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"initech\"]",
            "auth.jwt.issuers[1].tenants",
            "\"initech\" is not a configured tenant",
        ),
        (
            "issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"acme\", \"acme\"]",
            "auth.jwt.issuers[1].tenants",
            "listed twice",
        ),
        (
            "issuer = \"k\"\njwks_file = \"/k\"\ntenants = []",
            "auth.jwt.issuers[1].tenants",
            "list the tenants",
        ),
        (
            "issuer = \"i\"\njwks_file = \"/k\"\ntenants = [\"globex\"]",
            "auth.jwt.issuers[1].issuer",
            "\"i\" is listed twice",
        ),
        (
            "issuer = \"k\"\ntenants = [\"globex\"]",
            "auth.jwt.issuers[1].jwks_file",
            "set jwks_file, jwks_url or both",
        ),
        (
            "issuer = \"k\"\njwks_url = \"https://idp/certs\"\ntenants = [\"globex\"]",
            "auth.jwt.issuers[1].jwks_url",
            "only http://",
        ),
        (
            "issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"globex\"]\nallowed_azp = []",
            "auth.jwt.issuers[1].allowed_azp",
            "list 1-64 values",
        ),
        (
            "issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"globex\"]\ntyp = \"\"",
            "auth.jwt.issuers[1].typ",
            "1-256 bytes",
        ),
    ] {
        let e = bulkhead_sidecar::Config::from_toml(&tables(rest))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(says), "{rest}: {e}");
    }
    // A typo in an issuer table is named; so is a missing `tenants`.
    let e = bulkhead_sidecar::Config::from_toml(&tables(
        "issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"globex\"]\nallowed_azps = [\"x\"]",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("allowed_azps"), "{e}");
    let e = bulkhead_sidecar::Config::from_toml(&tables("issuer = \"k\"\njwks_file = \"/k\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tenants"), "{e}");
    // Strings and tables are not mixed, and tables take no top-level keys.
    let mixed = base("jwks_file = \"/j\"").replace(
        "issuers = [\"i\"]",
        "issuers = [\"i\", {issuer = \"k\", jwks_file = \"/k\", tenants = [\"acme\"]}]",
    );
    let e = bulkhead_sidecar::Config::from_toml(&mixed)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("auth.jwt.issuers[0]") && e.contains("not both"),
        "{e}"
    );
    let top = tables("issuer = \"k\"\njwks_file = \"/k\"\ntenants = [\"globex\"]").replace(
        "audiences = [\"a\"]\n",
        "audiences = [\"a\"]\njwks_url = \"http://idp/certs\"\n",
    );
    let e = bulkhead_sidecar::Config::from_toml(&top)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("auth.jwt.jwks_url") && e.contains("its own"),
        "{e}"
    );
    let ok = bulkhead_sidecar::Config::from_toml(&tables(
        "issuer = \"k\"\njwks_url = \"http://idp/certs\"\ntenants = [\"globex\"]\n\
         typ = \"at+jwt\"\nallowed_azp = [\"ui\"]",
    ))
    .unwrap();
    let realms = ok.auth.jwt.as_ref().unwrap().realms();
    assert_eq!(realms.len(), 2);
    assert_eq!(realms[1].field, "auth.jwt.issuers[1]");
    assert_eq!(realms[1].tenants, Some(&["globex".to_string()][..]));
    // JWT alone is enough: no [[keys]] needed.
    let c = bulkhead_sidecar::Config::from_toml(&base("jwks_file = \"/j\"")).unwrap();
    let j = c.auth.jwt.unwrap();
    assert_eq!(j.max_token_bytes, 8192);
    assert_eq!(j.tenant_claim, "tenant_id");
    assert_eq!(j.algorithms, ["RS256", "ES256", "EdDSA"]);
    assert!(!c.auth.forward_authorization);
}

/// `max_token_bytes` is the largest token taken: one of exactly that size is verified, one byte
/// less of allowance refuses it before anything is parsed.
#[test]
fn a_token_of_exactly_max_token_bytes_is_taken() {
    let s = sign(
        json!({"keys": [{"name": "ed", "kty": "OKP", "kid": "ed-1"}],
        "tokens": [{"key": "ed", "claims": claims("acme")}]}),
    );
    let t = &s.tokens[0];
    let verifier = |max: usize| jwt_verifier(&s, &["ed"], &format!("max_token_bytes = {max}"));
    assert_eq!(verifier(t.len()).verify(t, now()).unwrap().tenant, "acme");
    let e = verifier(t.len() - 1).verify(t, now()).unwrap_err();
    assert_eq!(e.reason(), "malformed");
    assert!(e.to_string().contains("larger than"), "{e}");
}

/// `nbf` and `iat` may be up to the leeway (30 s here) ahead of the clock and no more; a
/// NumericDate may be a fraction (floored) but not beyond 10^15 seconds.
#[test]
fn time_claims_hold_at_their_edges() {
    let now = now();
    let at = |field: &'static str, v: Value| json!({"key": "ed", "claims": with(claims("acme"), |c| { c.insert(field.into(), v); })});
    let s = sign(
        json!({"keys": [{"name": "ed", "kty": "OKP", "kid": "ed-1"}],
        "tokens": [
            at("nbf", json!(now + 30)), at("nbf", json!(now + 31)),
            at("iat", json!(now + 30)), at("iat", json!(now + 31)),
            at("exp", json!(now as f64 + 300.5)), at("exp", json!(1e15)), at("exp", json!(1e300)),
        ]}),
    );
    let jwt = jwt_verifier(&s, &["ed"], "");
    let reason = |i: usize| match jwt.verify_uncached(&s.tokens[i], now) {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    };
    let got: Vec<&str> = (0..7).map(reason).collect();
    assert_eq!(
        got,
        [
            "ok",
            "not_yet_valid",
            "ok",
            "not_yet_valid",
            "ok",
            "malformed",
            "malformed"
        ]
    );
}

#[test]
fn a_remembered_token_still_expires_and_a_reload_forgets_it() {
    let now = now();
    let s = sign(json!({"keys": [{"name": "ed", "kty": "OKP", "kid": "ed-1"},
                             {"name": "ec", "kty": "EC", "kid": "ec-1"}],
    "tokens": [{"key": "ed", "claims": with(claims("acme"), |c| {
        c.insert("exp".into(), json!(now + 10));
    })}]}));
    let jwt = jwt_verifier(&s, &["ed"], "");
    let t = &s.tokens[0];
    assert_eq!(jwt.verify(t, now).unwrap().tenant, "acme");
    // Remembered, still within exp + leeway (30 s) ...
    assert!(jwt.verify(t, now + 39).is_ok());
    // ... and refused from then on, remembered or not.
    assert_eq!(jwt.verify(t, now + 40).unwrap_err().reason(), "expired");
    assert_eq!(
        jwt.verify_uncached(t, now + 40).unwrap_err().reason(),
        "expired"
    );
    // The key set of a reload (here: without the token's key) starts afresh.
    let reloaded = jwt_verifier(&s, &["ec"], "");
    assert_eq!(reloaded.verify(t, now).unwrap_err().reason(), "unknown_key");
}

/// Verification cost per request, HMAC signature next to each JWT algorithm (a micro-bench,
/// not a check): `cargo test --release -p bulkhead-sidecar --test jwt -- --ignored
/// --nocapture verify_cost`. The HMAC request is the benchmark's (`bulkhead-bench`), each
/// with its own nonce (verification records it in the replay cache); a JWT is verified whole
/// (header, key lookup, signature, claims, tier and scope).
#[test]
#[ignore = "a micro-bench: run it in a release build"]
fn verify_cost() {
    use bulkhead_sidecar::auth::signature::{
        ReplayCache, RequestView, SignOptions, TENANT_HEADER, Verifier, sign_request,
    };
    use bulkhead_sidecar::config::{LoadedKey, TenantBinding};
    const BODY: &str = r#"{"model":"bulkhead-sim","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the benchmark"}]}"#;
    let per_op = |n: usize, f: &mut dyn FnMut(usize)| {
        for i in 0..n.min(1000) {
            f(i); // warm up
        }
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    // HMAC, as the benchmark signs.
    let n = 50_000;
    let key = b"gateway-secret-0123456789abcdef!".to_vec();
    let verifier = Verifier::new(
        "bulkhead".into(),
        vec![LoadedKey {
            id: "gw".into(),
            secrets: vec![key.clone()],
            tenants: TenantBinding::Any,
            scope: Default::default(),
        }],
        30,
        Arc::new(Mutex::new(ReplayCache::new(2 * n + 2000))),
    );
    let method = Method::POST;
    let uri: http::Uri = CHAT.parse().unwrap();
    let signed: Vec<http::HeaderMap> = (0..n + 1000)
        .map(|_| {
            let mut h = http::HeaderMap::new();
            h.insert(TENANT_HEADER, "acme".parse().unwrap());
            h.insert("content-type", "application/json".parse().unwrap());
            sign_request(
                &method,
                &uri,
                &mut h,
                BODY.as_bytes(),
                &key,
                &SignOptions::new("gw", now()),
            )
            .unwrap();
            h
        })
        .collect();
    let mut next = 0;
    let hmac = per_op(n, &mut |_| {
        let view = RequestView {
            method: &method,
            uri: &uri,
            headers: &signed[next],
        };
        next += 1;
        verifier.verify(view, BODY.as_bytes(), now()).unwrap();
    });
    println!("verify hmac-sha256 (head + finish, replay recorded): {hmac:.2} us/request");
    // JWTs as Keycloak issues them.
    let s = sign(json!({"keys": keys3(), "tokens": [
        {"key": "rsa", "claims": claims("acme")},
        {"key": "ec", "claims": claims("acme")},
        {"key": "ed", "claims": claims("acme")},
    ]}));
    let jwt = jwt_verifier(&s, &["rsa", "ec", "ed"], "");
    for (alg, token) in ["RS256 (RSA-2048)", "ES256 (P-256)", "EdDSA (Ed25519)"]
        .iter()
        .zip(&s.tokens)
    {
        let us = per_op(20_000, &mut |_| {
            jwt.verify_uncached(token, now()).unwrap();
        });
        let again = per_op(200_000, &mut |_| {
            jwt.verify(token, now()).unwrap();
        });
        println!(
            "verify JWT {alg}, {} bytes: {us:.2} us/request; the same token again \
             (remembered): {again:.2} us/request",
            token.len()
        );
    }
}
