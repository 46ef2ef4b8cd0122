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

/// POST `body` to `path` as `tenant`; the status and the body.
async fn ask(sim: &SimHandle, path: &str, tenant: &str, body: &str) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = post(&format!("{}{path}", sim.url()), body);
    req.headers_mut()
        .insert("x-bulkhead-tenant", tenant.parse().unwrap());
    let r = client.request(req).await.unwrap();
    let status = r.status();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(b.to_vec()).unwrap())
}

/// The `data:` payloads of an SSE body, `[DONE]` left out.
fn sse_data(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Wait (with a deadline) until the simulator runs nothing.
async fn idle(sim: &SimHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.sim.running() > 0 {
        assert!(Instant::now() < deadline, "a generation never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_list_prompt_gets_n_choices_per_prompt_all_counted() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    // Two prompts (2 and 3 tokens), n = 2: four choices, numbered prompt * n + j.
    let body = r#"{"prompt":["a b","c d e"],"n":2,"max_tokens":3}"#;
    let (status, b) = ask(&sim, "/v1/completions", "t1", body).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let choices = v["choices"].as_array().unwrap();
    let idx: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2, 3]);
    assert!(choices.iter().all(|c| c["text"] == "tok0 tok1 tok2 "));
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], 17);
    idle(&sim).await;
    let kv = sim.sim.tenant_kv("t1");
    assert_eq!((kv.prompt_tokens, kv.completion_tokens), (5, 12));
    assert_eq!(kv.choices_served, 4);
    // Held at the end: each prompt once per choice (10) and 12 generated tokens.
    assert_eq!((kv.peak, kv.held), (22, 0));

    // Streamed: every choice gets its tokens and its finish chunk; the usage counts them all.
    let body = r#"{"prompt":[[1,2,3],[4]],"n":3,"max_tokens":2,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (status, b) = ask(&sim, "/v1/completions", "t2", body).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&b);
    for i in 0..6u64 {
        let mine: Vec<&serde_json::Value> = events
            .iter()
            .filter_map(|e| e["choices"].as_array()?.first())
            .filter(|c| c["index"] == i)
            .collect();
        let text: String = mine.iter().filter_map(|c| c["text"].as_str()).collect();
        assert_eq!(text, "tok0 tok1 ", "choice {i}");
        assert_eq!(
            mine.last().unwrap()["finish_reason"],
            "length",
            "choice {i}"
        );
    }
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], 4);
    assert_eq!(usage["completion_tokens"], 12);
    idle(&sim).await;
    let kv = sim.sim.tenant_kv("t2");
    assert_eq!(
        (kv.prompt_tokens, kv.completion_tokens, kv.choices_served),
        (4, 12, 6)
    );
    sim.stop().await;
}

#[tokio::test]
async fn running_choices_hold_every_prompt_once_per_sequence() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    sim.sim.close_gate();
    let mut req = post(
        &format!("{}/v1/chat/completions", sim.url()),
        r#"{"messages":[{"role":"user","content":"a b c"}],"n":4,"stream":true,"max_tokens":5}"#,
    );
    req.headers_mut()
        .insert("x-bulkhead-tenant", "acme".parse().unwrap());
    let mut body = client.request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The first token of each of the 4 choices is out; the gate holds the second.
    // Prompt 4 + 3 = 7 tokens, once per choice: 28, plus 4 generated.
    assert_eq!(sim.sim.tenant_kv("acme").held, 28 + 4);
    sim.sim.open_gate();
    let mut text = first.to_vec();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            text.extend_from_slice(&d);
        }
    }
    idle(&sim).await;
    let kv = sim.sim.tenant_kv("acme");
    assert_eq!((kv.held, kv.peak), (0, 28 + 4 * 5));
    assert_eq!((kv.prompt_tokens, kv.completion_tokens), (7, 20));
    let text = String::from_utf8(text).unwrap();
    let firsts = sse_data(&text)
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"] == "tok0 ")
        .count();
    assert_eq!(firsts, 4, "{text}");
    sim.stop().await;
}

#[tokio::test]
async fn best_of_generates_more_than_it_returns() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    // vLLM answers in one piece when best_of differs from n, even when asked to stream.
    let body = r#"{"prompt":"a b","n":1,"best_of":3,"max_tokens":2,"stream":true}"#;
    let (status, b) = ask(&sim, "/v1/completions", "t", body).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&b).expect("a JSON answer, not SSE");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    idle(&sim).await;
    let kv = sim.sim.tenant_kv("t");
    // The usage leaves out the 2 sequences not returned; the simulator counts them.
    assert_eq!((kv.prompt_tokens, kv.completion_tokens), (2, 6));
    assert_eq!(kv.peak, 2 * 3 + 6);
    sim.stop().await;
}

#[tokio::test]
async fn tools_documents_and_template_kwargs_are_prompt_tokens() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    let (_, b) = ask(&sim, "/v1/chat/completions", "a", &format!("{{{msgs}}}")).await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    // The tool renders as 18 words of indented JSON; the document as 7; the kwargs as 4.
    let extra = r#""tools":[{"type":"function","function":{"name":"f","description":"get the weather","parameters":{"type":"object"}}}],"documents":[{"title":"t","text":"a b"}],"chat_template_kwargs":{"enable_thinking":false}"#;
    let (_, b) = ask(
        &sim,
        "/v1/chat/completions",
        "b",
        &format!("{{{msgs},{extra}}}"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5 + 18 + 7 + 4);
    assert_eq!(sim.sim.tenant_kv("b").prompt_tokens, 5 + 18 + 7 + 4);
    sim.stop().await;
}

#[tokio::test]
async fn the_responses_api_is_served_streamed_and_not() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    let body = r#"{"input":"one two","instructions":"be brief","max_output_tokens":3,"request_id":"abc-1"}"#;
    let (status, b) = ask(&sim, "/v1/responses", "r", body).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    // vLLM: a request's request_id is its response's id.
    assert_eq!(v["id"], "abc-1");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["role"], "assistant");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], "tok0 tok1 tok2 ");
    assert_eq!(v["usage"]["input_tokens"], 6 + 6);
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 15);
    // Without a request_id the simulator makes one up.
    let (_, b) = ask(&sim, "/v1/responses", "r", r#"{"input":"x"}"#).await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");

    let body = r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"a b c"}]}],"max_output_tokens":4,"stream":true}"#;
    let (status, b) = ask(&sim, "/v1/responses", "s", body).await;
    assert_eq!(status, StatusCode::OK);
    // Named events, each `event:` line matching its data's type.
    for e in b.split("\n\n").filter(|e| !e.is_empty()) {
        let kind = e.lines().next().unwrap().strip_prefix("event: ").unwrap();
        let data: serde_json::Value =
            serde_json::from_str(e.lines().nth(1).unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(data["type"], kind);
    }
    let events = sse_data(&b);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    let deltas: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert_eq!(deltas.len(), 4);
    assert!(
        deltas
            .iter()
            .all(|d| d["output_index"] == 0 && d["content_index"] == 0)
    );
    let text: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert_eq!(done["usage"]["input_tokens"], 7);
    assert_eq!(done["usage"]["output_tokens"], 4);
    assert_eq!(done["usage"]["total_tokens"], 11);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    idle(&sim).await;
    let kv = sim.sim.tenant_kv("s");
    assert_eq!((kv.prompt_tokens, kv.completion_tokens), (7, 4));
    sim.stop().await;
}

#[tokio::test]
async fn bad_fields_are_refused_naming_them() {
    let sim = SimHandle::start(SimConfig::default()).await.unwrap();
    for (path, body, param) in [
        ("/v1/completions", r#"{"prompt":7}"#, "prompt"),
        ("/v1/completions", r#"{"prompt":"x","n":0}"#, "n"),
        (
            "/v1/chat/completions",
            r#"{"messages":[],"max_tokens":-1}"#,
            "max_tokens",
        ),
        ("/v1/embeddings", r#"{"input":[]}"#, "input"),
        ("/v1/responses", r#"{"input":false}"#, "input"),
    ] {
        let (status, b) = ask(&sim, path, "x", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["code"], param, "{b}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with(param));
    }
    assert_eq!(sim.sim.started(), 0, "nothing was generated");
    // Embeddings: one vector per input, token ids counted as tokens.
    let (_, b) = ask(&sim, "/v1/embeddings", "e", r#"{"input":[[1,2,3],[4,5]]}"#).await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(sim.sim.tenant_kv("e").prompt_tokens, 5);
    sim.stop().await;
}

#[tokio::test]
async fn a_list_prompt_is_looked_up_in_the_prefix_cache_prompt_by_prompt() {
    let sim = SimHandle::start(SimConfig {
        prefix_block_words: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/completions", sim.url());
    // The second prompt finds the first one's blocks.
    let r = client
        .request(post(&url, r#"{"prompt":["a b c d","a b c d"]}"#))
        .await
        .unwrap();
    assert_eq!(r.headers()["x-sim-prefix-cache"], "partial");
    assert_eq!(r.headers()["x-sim-cached-blocks"], "2");
    let evs = sim.sim.cache_events();
    let seen: Vec<(usize, usize)> = evs.iter().map(|e| (e.blocks, e.cached)).collect();
    assert_eq!(seen, [(2, 0), (2, 2)]);
    // Token ids are cached by id: the same ids hit, words of the same digits do not.
    client
        .request(post(&url, r#"{"prompt":[1,2,3,4]}"#))
        .await
        .unwrap();
    let r = client
        .request(post(&url, r#"{"prompt":[[1,2,3,4]]}"#))
        .await
        .unwrap();
    assert_eq!(r.headers()["x-sim-prefix-cache"], "hit");
    let r = client
        .request(post(&url, r#"{"prompt":"1 2 3 4"}"#))
        .await
        .unwrap();
    assert_eq!(r.headers()["x-sim-prefix-cache"], "miss");
    sim.stop().await;
}
