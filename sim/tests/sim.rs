//! The simulator on its own: OpenAI-compatible shapes, usage, streaming, timing.

use bulkhead_sim::{SimConfig, SimHandle};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

fn post(url: &str, body: &str) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from(body.to_string())));
    *r.method_mut() = Method::POST;
    *r.uri_mut() = url.parse().unwrap();
    r
}

#[tokio::test]
async fn sim_speaks_openai() {
    let sim = SimHandle::start(SimConfig {
        completion_tokens: 8,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/completions", sim.url());
    let r = client
        .request(post(&url, r#"{"prompt":"one two three","max_tokens":4}"#))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], 7);
    // Streaming with usage, and a first-token delay asked per request.
    let mut req = post(
        &url,
        r#"{"prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    req.headers_mut()
        .insert("x-sim-ttft-ms", "150".parse().unwrap());
    let t0 = Instant::now();
    let r = client.request(req).await.unwrap();
    let text = r.into_body().collect().await.unwrap().to_bytes();
    assert!(t0.elapsed() >= Duration::from_millis(150));
    let text = String::from_utf8(text.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    // 8 tokens, the finish chunk, the usage chunk, [DONE].
    assert_eq!(events.len(), 11, "{text}");
    assert!(events[9].contains("\"completion_tokens\":8"));
    assert_eq!(events[10], "data: [DONE]");
    let r = client
        .request(post(&format!("{}/v1/nothing", sim.url()), "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    sim.stop().await;
}

#[tokio::test]
async fn sim_prefix_cache_is_keyed_by_salt_and_flushes_refuse_while_busy() {
    let sim = SimHandle::start(SimConfig {
        prefix_block_words: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/completions", sim.url());
    let verdict = |r: &http::Response<hyper::body::Incoming>| {
        r.headers()["x-sim-prefix-cache"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let ask = |body: &'static str| client.request(post(&url, body));
    let r = ask(r#"{"prompt":"a b c d"}"#).await.unwrap();
    assert_eq!(verdict(&r), "miss");
    let r = ask(r#"{"prompt":"a b c d"}"#).await.unwrap();
    assert_eq!(verdict(&r), "hit");
    assert_eq!(r.headers()["x-sim-cached-blocks"], "2");
    let r = ask(r#"{"prompt":"a b x y"}"#).await.unwrap();
    assert_eq!(verdict(&r), "partial");
    // The salt is folded into the first block: another salt shares nothing.
    let r = ask(r#"{"prompt":"a b c d","cache_salt":"s1"}"#)
        .await
        .unwrap();
    assert_eq!(verdict(&r), "miss");
    let r = ask(r#"{"prompt":"a b c d","cache_salt":"s1"}"#)
        .await
        .unwrap();
    assert_eq!(verdict(&r), "hit");
    let evs = sim.sim.cache_events();
    assert_eq!(evs.len(), 5);
    assert_eq!(evs[3].salt.as_deref(), Some("s1"));
    // Busy (a stream held open): both flush endpoints refuse.
    sim.sim.close_gate();
    let held = ask(r#"{"prompt":"z","stream":true}"#).await.unwrap();
    let mut held = held.into_body();
    held.frame().await.unwrap().unwrap();
    assert_eq!(sim.sim.running(), 1);
    let flush = |path: &str| client.request(post(&format!("{}{path}", sim.url()), ""));
    let r = flush("/reset_prefix_cache").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&b[..], br#"{"success":false}"#);
    let r = flush("/flush_cache").await.unwrap();
    assert_ne!(r.status(), StatusCode::OK);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&b)
            .contains("Cache not flushed because there are pending requests")
    );
    assert!(sim.sim.cached_blocks() > 0);
    sim.sim.open_gate();
    while held.frame().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.sim.running() > 0 {
        assert!(Instant::now() < deadline, "stream never ended");
        tokio::task::yield_now().await;
    }
    let r = flush("/reset_prefix_cache").await.unwrap();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&b[..], br#"{"success":true}"#);
    assert_eq!(sim.sim.cached_blocks(), 0);
    assert_eq!(sim.sim.flushes(), (1, 2));
    let r = ask(r#"{"prompt":"a b c d"}"#).await.unwrap();
    assert_eq!(verdict(&r), "miss");
    sim.stop().await;

    // vLLM answering busy with 503 instead.
    let sim = SimHandle::start(SimConfig {
        reset_busy_status: 503,
        ..Default::default()
    })
    .await
    .unwrap();
    sim.sim.refuse_next_flushes(1);
    let r = client
        .request(post(&format!("{}/reset_prefix_cache", sim.url()), ""))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    sim.stop().await;
}
