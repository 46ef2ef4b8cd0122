//! The simulator on its own: OpenAI-compatible shapes, usage, streaming, timing.

use bulkhead_sidecar::sim::{SimConfig, SimHandle};
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
