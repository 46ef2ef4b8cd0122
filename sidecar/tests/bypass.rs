//! A tenant holding a valid key tries to get around what the sidecar enforces: use more
//! tokens than it is charged, slip a body past inspection, reach a model route without its
//! tier's treatment, or choose the request id the upstream sees. Each test fails on the
//! sidecar before the request path was redesigned (see the comments).

mod common;
use bulkhead_sim::SimConfig;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use std::time::{Duration, Instant};

fn completion_tokens(text: &str) -> f64 {
    metric_in(
        text,
        r#"bulkhead_tokens_total{tenant="acme",kind="completion"}"#,
    )
    .unwrap_or(0.0)
}

/// Old: a request without `max_tokens` reserved the tenant default but the upstream generated
/// up to its own limit. Now the default is written into the forwarded body.
#[tokio::test]
async fn a_request_without_max_tokens_gets_what_was_reserved() {
    let sim = SimConfig {
        completion_tokens: 200,
        ..SimConfig::default()
    };
    let tenants = "[tenants.acme]\ndefault_max_tokens = 16\ntokens_per_minute = 100000\n";
    let h = Harness::start_with(tenants, sim, |_| {}).await;
    let resp = h
        .send(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", r#","stream":true"#),
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let chunks = String::from_utf8_lossy(&text)
        .matches("\"content\":\"tok")
        .count();
    assert_eq!(chunks, 16, "the upstream honoured the reserved limit");
    let fwd = json(&h.sim.sim.requests().last().unwrap().body);
    assert_eq!(fwd["max_tokens"], 16);
    h.shutdown().await;
}

/// Old: a stream the client cut was charged its reservation only, however much it had got.
#[tokio::test]
async fn a_cut_stream_is_charged_what_was_forwarded() {
    let sim = SimConfig {
        completion_tokens: 400,
        inter_token_latency: Duration::from_millis(2),
        ..SimConfig::default()
    };
    let tenants = "[tenants.acme]\ntokens_per_minute = 1000000\n";
    let h = Harness::start_with(tenants, sim, |_| {}).await;
    let resp = h
        .send(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", r#","stream":true,"max_tokens":400"#),
        ))
        .await;
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 60 {
        let f = body.frame().await.unwrap().unwrap();
        if let Ok(d) = f.into_data() {
            got += String::from_utf8_lossy(&d).matches("\"delta\"").count();
        }
    }
    drop(body);
    // Cut after `got` chunks: the charge lands once the sidecar notices (poll).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let charged = completion_tokens(&h.metrics().await);
        if charged >= got as f64 {
            assert!(charged < 400.0, "charged {charged}: the stream was cut");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "charged {charged} completion tokens after forwarding {got}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown().await;
}

/// Old: `1e5`, `"100000"` and `n = 200` were not read as numbers, the tenant default was
/// reserved and the request forwarded.
#[tokio::test]
async fn token_fields_are_read_as_the_upstream_reads_them() {
    let tenants = "[tenants.acme]\ntokens_per_minute = 1000\n";
    let h = Harness::start_with(tenants, SimConfig::default(), |_| {}).await;
    for (extra, code) in [
        (r#","max_tokens":1e5"#, "request_too_large"),
        (r#","max_tokens":"100000""#, "request_too_large"),
        (r#","max_completion_tokens":5000.0"#, "request_too_large"),
        (r#","max_tokens":10,"n":200"#, "invalid_parameter"),
        (r#","max_tokens":900,"n":"2""#, "request_too_large"),
        (r#","max_tokens":-5"#, "invalid_parameter"),
        (r#","max_tokens":{"a":1}"#, "invalid_parameter"),
    ] {
        let (p, b) = h
            .send_collect(h.signed(
                "acme",
                Method::POST,
                "/v1/chat/completions",
                &chat("hi", extra),
            ))
            .await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{extra}: {b:?}");
        assert_eq!(json(&b)["error"]["code"], code, "{extra}");
    }
    assert!(h.sim.sim.requests().is_empty(), "nothing was forwarded");
    // Within the limit: forwarded with the number as a number.
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", r#","max_tokens":"12""#),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(json(&h.sim.sim.requests()[0].body)["max_tokens"], 12);
    h.shutdown().await;
}

/// Old: a non-streamed answer over 8 MiB was not scanned for usage: its tokens were never
/// counted and the reservation stood.
#[tokio::test]
async fn a_large_answer_is_still_reconciled() {
    let n = 1_100_000u64;
    let sim = SimConfig {
        completion_tokens: n,
        ..SimConfig::default()
    };
    let h = Harness::start_with(DEFAULT_TENANTS, sim, |_| {}).await;
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/completions",
            &format!(r#"{{"prompt":"hi","max_tokens":{n}}}"#),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(b.len() > 8 * 1024 * 1024, "{} bytes", b.len());
    assert_eq!(json(&b)["usage"]["completion_tokens"], n);
    h.wait_metric(
        r#"bulkhead_tokens_total{tenant="acme",kind="completion"}"#,
        n as f64,
    )
    .await;
    h.shutdown().await;
}

/// Old: a body the sidecar's parser rejected was forwarded as sent, `cache_salt` and all,
/// with no reservation; a duplicate key could hide a second `cache_salt`.
#[tokio::test]
async fn only_bodies_the_sidecar_parsed_are_forwarded() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let deep = format!(
        r#"{{"prompt":"x","cache_salt":"v","x":{}{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let bodies: Vec<Vec<u8>> = vec![
        br#"{"prompt":"x","cache_salt":"victim","temperature":NaN}"#.to_vec(),
        br#"{"prompt":"x","cache_salt":"victim","temperature":Infinity}"#.to_vec(),
        b"\xef\xbb\xbf{\"prompt\":\"x\",\"cache_salt\":\"victim\"}".to_vec(),
        br#"{"prompt":"x"}{"cache_salt":"victim"}"#.to_vec(),
        b"{\"prompt\":\"\xff\",\"cache_salt\":\"victim\"}".to_vec(),
        deep.into_bytes(),
    ];
    for body in bodies {
        let text: String = String::from_utf8_lossy(&body).chars().take(60).collect();
        let req = h.signed_bytes("acme", Method::POST, "/v1/completions", &body);
        let (p, b) = h.send_collect(req).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{text}: {b:?}");
        assert_eq!(json(&b)["error"]["code"], "invalid_json", "{text}");
    }
    assert!(h.sim.sim.requests().is_empty(), "nothing was forwarded");
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/completions",
            r#"{"prompt":"x","cache_salt":"a","cache_salt":"b"}"#,
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let fwd = &h.sim.sim.requests()[0].body;
    assert!(
        !String::from_utf8_lossy(fwd).contains("cache_salt"),
        "{fwd:?}"
    );
    h.shutdown().await;
}

/// Old: an encoded path reached the upstream (which decodes it to a model route) without the
/// tier's treatment, and so did the LoRA admin routes and any unknown `/v1/` route.
#[tokio::test]
async fn routes_are_matched_on_the_canonical_path_only() {
    let tenants = "[tenants.acme]\n[tenants.globex]\nunknown_routes = \"forward\"\n";
    let h = Harness::start(tenants).await;
    let body = r#"{"prompt":"x","cache_salt":"victim"}"#;
    for (method, path, status, code) in [
        (Method::POST, "/v1/chat/complet%69ons", 400, "encoded_path"),
        (Method::POST, "/v1/chat%2Fcompletions", 400, "encoded_path"),
        (Method::POST, "/v1/completions/", 400, "non_canonical_path"),
        (Method::POST, "/v1//completions", 400, "non_canonical_path"),
        (
            Method::POST,
            "/v1/load_lora_adapter",
            403,
            "route_forbidden",
        ),
        (Method::POST, "/v1/unknown", 404, "unknown_route"),
        (Method::GET, "/v1/completions", 405, "method_not_allowed"),
    ] {
        let (p, b) = h.send_collect(h.signed("acme", method, path, body)).await;
        assert_eq!(p.status.as_u16(), status, "{path}: {b:?}");
        assert_eq!(json(&b)["error"]["code"], code, "{path}");
    }
    assert!(h.sim.sim.requests().is_empty(), "nothing was forwarded");
    // /v1/responses is a generating route: a limit is written in, the client's salt removed.
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/responses",
            r#"{"input":"x","cache_salt":"v"}"#,
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    assert_eq!(json(&b)["object"], "response");
    let fwd = json(&h.sim.sim.requests()[0].body);
    assert_eq!(fwd["max_output_tokens"], 256);
    assert!(fwd.get("cache_salt").is_none());
    // A tenant allowed unknown routes gets them forwarded.
    let (p, _) = h
        .send_collect(h.signed("globex", Method::POST, "/v1/unknown", body))
        .await;
    assert_eq!(p.status, StatusCode::NOT_FOUND, "answered by the simulator");
    assert_eq!(h.sim.sim.requests().last().unwrap().path, "/v1/unknown");
    h.shutdown().await;
}

/// Old: the client's `x-request-id` was the id the upstream saw.
#[tokio::test]
async fn the_upstream_sees_the_sidecars_request_id() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut req = h.signed("acme", Method::POST, "/v1/completions", r#"{"prompt":"x"}"#);
        req.headers_mut()
            .insert("x-request-id", "attacker-chosen".parse().unwrap());
        let (p, _) = h.send_collect(req).await;
        assert_eq!(p.status, StatusCode::OK);
        ids.push(p.headers["x-request-id"].to_str().unwrap().to_string());
    }
    let seen: Vec<String> = h
        .sim
        .sim
        .requests()
        .iter()
        .map(|r| r.headers["x-request-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, ids, "the upstream and the client see the same id");
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    // The client's id is kept in the audit record, apart.
    let dir = h.shutdown_keep_dir().await;
    let audit = std::fs::read_to_string(dir.path().join("audit/acme.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2);
    for (r, id) in recs.iter().zip(&ids) {
        assert_eq!(r["request_id"], id.as_str());
        assert_eq!(r["client_request_id"], "attacker-chosen");
    }
}
