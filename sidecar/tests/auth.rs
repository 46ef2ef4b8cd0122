//! RFC 9421 verification over real sockets: every failure reason answers 401 with an
//! OpenAI-style error naming it, is counted, and is never forwarded.

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;

async fn expect_refused(h: &Harness, req: http::Request<Full<Bytes>>, reason: &str) {
    let before = h.sim.sim.requests().len();
    let series = format!("bulkhead_auth_failures_total{{reason=\"{reason}\"}}");
    let count = h.metric(&series).await.unwrap_or(0.0);
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{reason}: {b:?}");
    let v = json(&b);
    assert_eq!(v["error"]["code"], reason, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["error"]["message"].as_str().unwrap().contains(reason));
    // Nothing about the keys leaks.
    let text = String::from_utf8_lossy(&b);
    assert!(!text.contains("gateway-secret") && !text.contains("acme-only"));
    assert_eq!(
        h.sim.sim.requests().len(),
        before,
        "{reason}: request was forwarded"
    );
    assert_eq!(h.metric(&series).await, Some(count + 1.0), "{reason}");
}

fn body() -> String {
    chat("hello", "")
}

#[tokio::test]
async fn every_failure_reason() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let path = "/v1/chat/completions";

    // missing: no signature at all; and a tenant header alone proves nothing.
    let mut req = h.signed("acme", Method::POST, path, &body());
    req.headers_mut().remove("signature");
    req.headers_mut().remove("signature-input");
    expect_refused(&h, req, "missing").await;

    // malformed: not a structured dictionary; alg other than hmac-sha256.
    let mut req = h.signed("acme", Method::POST, path, &body());
    req.headers_mut()
        .insert("signature-input", "bulkhead=((garbage".parse().unwrap());
    expect_refused(&h, req, "malformed").await;
    let mut req = h.signed("acme", Method::POST, path, &body());
    let si = req.headers()["signature-input"]
        .to_str()
        .unwrap()
        .replace("hmac-sha256", "rsa-pss-sha512");
    req.headers_mut()
        .insert("signature-input", si.parse().unwrap());
    expect_refused(&h, req, "malformed").await;
    // malformed: required components not covered (no nonce, no @path).
    let req = h.signed_with("acme", Method::POST, path, &body(), "gw", GW_KEY, |_| {});
    let si = req.headers()["signature-input"]
        .to_str()
        .unwrap()
        .to_string();
    let mut req2 = req;
    req2.headers_mut().insert(
        "signature-input",
        si.replace(" \"@path\"", "").parse().unwrap(),
    );
    expect_refused(&h, req2, "malformed").await;

    // malformed: a body whose digest the signature does not cover.
    let mut req = h.signed("acme", Method::POST, path, "");
    *req.body_mut() = Full::new(Bytes::from(body()));
    expect_refused(&h, req, "malformed").await;

    // bad_signature: right key id, wrong secret; or a tampered covered component.
    let req = h.signed_with(
        "acme",
        Method::POST,
        path,
        &body(),
        "gw",
        b"not-the-gateway-secret-at-all!!!",
        |_| {},
    );
    expect_refused(&h, req, "bad_signature").await;
    let mut req = h.signed("acme", Method::POST, path, &body());
    *req.uri_mut() = h.url("/v1/completions");
    expect_refused(&h, req, "bad_signature").await;

    // expired: created too old; expires in the past.
    let req = h.signed_with("acme", Method::POST, path, &body(), "gw", GW_KEY, |o| {
        o.created = now() - 300
    });
    expect_refused(&h, req, "expired").await;
    let req = h.signed_with("acme", Method::POST, path, &body(), "gw", GW_KEY, |o| {
        o.expires = Some(now() - 1)
    });
    expect_refused(&h, req, "expired").await;

    // unknown_key
    let req = h.signed_with("acme", Method::POST, path, &body(), "nope", GW_KEY, |_| {});
    expect_refused(&h, req, "unknown_key").await;

    // tenant_mismatch: the acme-bound key asserting globex.
    let req = h.signed_with(
        "globex",
        Method::POST,
        path,
        &body(),
        "acme-key",
        ACME_KEY,
        |_| {},
    );
    expect_refused(&h, req, "tenant_mismatch").await;
    // ... while it may assert acme.
    let req = h.signed_with(
        "acme",
        Method::POST,
        path,
        &body(),
        "acme-key",
        ACME_KEY,
        |_| {},
    );
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);

    // digest_mismatch: body swapped after signing (digest header and signature intact).
    let mut req = h.signed("acme", Method::POST, path, &body());
    *req.body_mut() = Full::new(Bytes::from(chat("something else", "")));
    expect_refused(&h, req, "digest_mismatch").await;

    // unknown_tenant: a gateway key asserting a tenant that is not configured.
    let req = h.signed("initech", Method::POST, path, &body());
    expect_refused(&h, req, "unknown_tenant").await;
    let m = h.metrics().await;
    assert!(
        !m.contains("initech"),
        "unconfigured tenants never become labels"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn replayed_request_is_refused() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let req = h.signed("acme", Method::POST, "/v1/chat/completions", &body());
    let copy = {
        let mut r = http::Request::new(Full::new(Bytes::from(body())));
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        r
    };
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    let by_tenant = |tenant: &str, reason: &str| {
        format!("bulkhead_auth_failures_by_tenant_total{{tenant=\"{tenant}\",reason=\"{reason}\"}}")
    };
    assert_eq!(h.metric(&by_tenant("acme", "replayed")).await, Some(0.0));
    expect_refused(&h, copy, "replayed").await;
    assert_eq!(h.sim.sim.requests().len(), 1);
    // The replayed copy's signature verified: the tenant it named is counted (for alerts that
    // name the tenant), and nothing else is.
    assert_eq!(h.metric(&by_tenant("acme", "replayed")).await, Some(1.0));
    // A forged signature names a tenant nobody signed for: not counted per tenant.
    let mut forged = h.signed("globex", Method::POST, "/v1/chat/completions", &body());
    let sig = forged.headers()["signature"]
        .to_str()
        .unwrap()
        .replacen(':', ":AAAA", 1);
    forged
        .headers_mut()
        .insert("signature", sig.parse().unwrap());
    expect_refused(&h, forged, "bad_signature").await;
    let text = h.metrics().await;
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("bulkhead_auth_failures_by_tenant_total{") && !l.ends_with(" 0"))
        .collect();
    assert_eq!(counted, [format!("{} 1", by_tenant("acme", "replayed"))]);
    h.shutdown().await;
}

/// The replay cache is shared fairly per key id: a key that fills its share is refused alone
/// (old: one key could fill the whole cache and lock every other key out with 503).
#[tokio::test]
async fn one_key_filling_the_replay_cache_does_not_lock_out_another() {
    // Two keys (gw, acme-key): capacity 4 gives each a share of 2.
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replacen("[auth]\n", "[auth]\nreplay_cache_capacity = 4\n", 1);
    })
    .await;
    let path = "/v1/chat/completions";
    for _ in 0..2 {
        let (p, _) = h
            .send_collect(h.signed("acme", Method::POST, path, &body()))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, path, &body()))
        .await;
    assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{b:?}");
    assert_eq!(json(&b)["error"]["code"], "replay_cache_full");
    // The other key still works.
    let req = h.signed_with(
        "acme",
        Method::POST,
        path,
        &body(),
        "acme-key",
        ACME_KEY,
        |_| {},
    );
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    h.shutdown().await;
}

/// A client's `Authorization` header (its key for a gateway, a bearer token) is not passed to
/// the upstream unless `auth.forward_authorization = true` (old: always forwarded).
#[tokio::test]
async fn authorization_is_not_forwarded_by_default() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut req = h.signed("acme", Method::POST, "/v1/chat/completions", &body());
    req.headers_mut()
        .insert("authorization", "Bearer sk-client-secret".parse().unwrap());
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    let seen = h.sim.sim.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("authorization"),
        "the client's Authorization reached the upstream"
    );
    h.shutdown().await;
}
