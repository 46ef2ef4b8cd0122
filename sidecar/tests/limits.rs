//! Per-tenant limits over real sockets: a concurrent burst against a small TPM limit, streamed
//! usage charged, RPM and concurrency refusals with OpenAI-style headers.

mod common;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

/// The sidecar's estimate for `chat("hi", max_tokens=100)`: the message's keys and strings
/// ("role", "user", "content", "hi": 17 bytes) a token per 4 started, 4 tokens of template
/// for the message, and the completion limit: 5 + 4 + 100.
const EST: u64 = 9 + 100;

/// A harness whose limits run on a clock that only moves when told (no refill during a test).
async fn frozen(
    tenants: &str,
) -> (
    Harness,
    std::sync::Arc<bulkhead_sidecar::limits::local::ManualClock>,
) {
    let clock = std::sync::Arc::new(bulkhead_sidecar::limits::local::ManualClock::default());
    let opts = bulkhead_sidecar::Options {
        clock: bulkhead_sidecar::limits::local::SharedClock(clock.clone()),
        ..Default::default()
    };
    (
        Harness::start_opts(tenants, Default::default(), |_| {}, opts).await,
        clock,
    )
}

#[tokio::test]
async fn concurrent_burst_admits_at_most_the_limit_plus_one_reservation() {
    let (h, _clock) = frozen(
        r#"
[tenants.acme]
tokens_per_minute = 1000
[tenants.globex]
"#,
    )
    .await;
    // Hold every stream open so no usage is reconciled during the burst.
    h.sim.sim.close_gate();
    let body = chat("hi", r#","stream":true,"max_tokens":100"#);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let req = h.signed("acme", Method::POST, "/v1/chat/completions", &body);
        let client = h.client.clone();
        tasks.push(tokio::spawn(
            async move { client.request(req).await.unwrap() },
        ));
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status() {
            StatusCode::OK => admitted.push(r),
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                let hd = r.headers();
                assert!(hd["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
                assert_eq!(hd["x-ratelimit-limit-tokens"], "1000");
                let rem: u64 = hd["x-ratelimit-remaining-tokens"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(rem < EST, "refused with {rem} remaining");
                assert!(hd.contains_key("x-ratelimit-reset-tokens"));
                let b = r.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(json(&b)["error"]["code"], "tokens");
                assert_eq!(json(&b)["error"]["type"], "rate_limit_error");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    let n = admitted.len() as u64;
    assert!(
        n * EST <= 1000 + EST,
        "admitted {n} x {EST} tokens against 1000 TPM"
    );
    assert!(n >= 1000 / EST, "admitted only {n}");
    assert_eq!(n + refused, 40);
    assert_eq!(
        h.metric("bulkhead_rate_limited_total{tenant=\"acme\",limit=\"tokens\"}")
            .await,
        Some(refused as f64)
    );
    // Another tenant is not affected.
    let (p, _) = h
        .send_collect(h.signed(
            "globex",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.sim.sim.open_gate();
    for r in admitted {
        r.into_body().collect().await.unwrap();
    }
    h.shutdown().await;
}

#[tokio::test]
async fn streamed_usage_is_charged_not_the_reservation() {
    let (h, _clock) = frozen(
        r#"
[tenants.acme]
tokens_per_minute = 10000
[tenants.globex]
"#,
    )
    .await;
    let body = chat("hi", r#","stream":true,"max_tokens":100"#);
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b).contains("[DONE]"));
    // The simulator counts 4 + 1 prompt tokens and generates 16.
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"prompt\"}",
        5.0,
    )
    .await;
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"completion\"}",
        16.0,
    )
    .await;
    // The next admission sees 10000 - 21 (used) - EST (its own reservation), not
    // 10000 - 2 * EST (the clock is frozen: no refill).
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    let rem: u64 = p.headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rem, 10000 - 21 - EST);
    h.shutdown().await;
}

#[tokio::test]
async fn requests_per_minute_with_openai_headers() {
    let h = Harness::start(
        r#"
[tenants.acme]
requests_per_minute = 2
[tenants.globex]
"#,
    )
    .await;
    let send = || h.signed("acme", Method::GET, "/v1/models", "");
    let (p, _) = h.send_collect(send()).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(p.headers["x-ratelimit-remaining-requests"], "1");
    let (p, _) = h.send_collect(send()).await;
    assert_eq!(p.status, StatusCode::OK);
    let (p, b) = h.send_collect(send()).await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&b)["error"]["code"], "requests");
    let retry: u64 = p.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(p.headers["x-ratelimit-remaining-requests"], "0");
    assert!(p.headers.contains_key("x-ratelimit-reset-requests"));
    assert_eq!(h.sim.sim.requests().len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn concurrency_limit_counts_open_streams() {
    let h = Harness::start(
        r#"
[tenants.acme]
max_concurrent = 1
[tenants.globex]
"#,
    )
    .await;
    h.sim.sim.close_gate();
    let body = chat("hi", r#","stream":true"#);
    let r1 = h
        .send(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(r1.status(), StatusCode::OK);
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&b)["error"]["code"], "concurrency");
    h.sim.sim.open_gate();
    r1.into_body().collect().await.unwrap();
    // The slot comes back when the stream ends.
    h.wait_metric("bulkhead_inflight_requests{tenant=\"acme\"}", 0.0)
        .await;
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test]
async fn limits_refill_with_the_injected_clock() {
    use bulkhead_sidecar::limits::local::{ManualClock, SharedClock};
    use std::sync::Arc;
    use std::time::Duration;
    let clock = Arc::new(ManualClock::default());
    let opts = bulkhead_sidecar::Options {
        clock: SharedClock(clock.clone()),
        ..Default::default()
    };
    let h = Harness::start_opts(
        r#"
[tenants.acme]
requests_per_minute = 1
tokens_per_minute = 200
[tenants.globex]
"#,
        Default::default(),
        |_| {},
        opts,
    )
    .await;
    let body = chat("hi", r#","max_tokens":100"#);
    let send = || h.signed("acme", Method::POST, "/v1/chat/completions", &body);
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    let (p, _) = h.send_collect(send()).await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(p.headers["retry-after"], "60");
    // No sleeping: the limits' clock moves a minute.
    clock.advance(Duration::from_secs(60));
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    h.shutdown().await;
}

/// A reload that changes only a tenant's weight or isolation keeps its buckets: a tenant
/// cannot refill its limits by getting any unrelated setting changed (old: any change of the
/// tenant's section built a fresh, full limiter).
#[tokio::test]
async fn a_reload_that_changes_only_weight_keeps_the_buckets() {
    let tenants =
        "[tenants.acme]\nrequests_per_minute = 2\ntokens_per_minute = 1000\n[tenants.globex]\n";
    let (h, _clock) = frozen(tenants).await;
    for _ in 0..2 {
        let (p, _) = h
            .send_collect(h.signed(
                "acme",
                Method::POST,
                "/v1/chat/completions",
                &chat("hi", r#","max_tokens":100"#),
            ))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    h.write_config(&text.replacen("[tenants.acme]\n", "[tenants.acme]\nweight = 5\n", 1));
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{b:?}");
    assert_eq!(json(&b)["error"]["code"], "requests");
    h.shutdown().await;
}
