//! Request bodies closed by default, end to end through the sidecar to the simulator (which
//! serves list prompts, `n` choices per prompt, token-id prompts and rendered tools as vLLM
//! does, and counts what it served per tenant). Each limit is checked against what the
//! simulator served, never against the sidecar's own estimate; each engine field against what
//! the simulator received.

mod common;

use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

/// The tenants' table with the upstream read as vLLM (request ids and priorities written).
fn vllm(t: &mut String) {
    *t = t.replace("[upstream]\n", "[upstream]\nflavor = \"vllm\"\n");
}

async fn post(h: &Harness, tenant: &str, path: &str, body: &str) -> (StatusCode, Value) {
    let (p, b) = h
        .send_collect(h.signed(tenant, Method::POST, path, body))
        .await;
    let v = serde_json::from_slice(&b).unwrap_or(Value::Null);
    (p.status, v)
}

/// What the simulator received on `path` from `tenant`, as JSON, in order.
fn received(h: &Harness, path: &str, tenant: &str) -> Vec<Value> {
    h.sim
        .sim
        .requests()
        .into_iter()
        .filter(|r| {
            r.path == path
                && r.headers
                    .get("x-bulkhead-tenant")
                    .and_then(|v| v.to_str().ok())
                    == Some(tenant)
        })
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

fn list_prompt(n: usize, max_tokens: u64) -> String {
    let prompts: Vec<String> = (0..n).map(|i| format!("\"say {i}\"")).collect();
    format!(
        r#"{{"model":"m","prompt":[{}],"max_tokens":{max_tokens}}}"#,
        prompts.join(",")
    )
}

#[tokio::test]
async fn a_list_prompt_is_reserved_prompt_by_prompt() {
    let h = Harness::start(
        "[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\nmax_kv_tokens = 300\n",
    )
    .await;
    // The red team's request: 80 prompts x 16 tokens against 1,000 tokens a minute.
    let (st, v) = post(&h, "acme", "/v1/completions", &list_prompt(80, 16)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    // A burst of admissible list prompts: the simulator never serves more than the limit.
    for _ in 0..20 {
        post(&h, "acme", "/v1/completions", &list_prompt(12, 16)).await;
    }
    let served = h.sim.sim.tenant_kv("acme");
    assert!(
        served.prompt_tokens + served.completion_tokens <= 1000,
        "the simulator served {served:?} against 1,000 tokens a minute"
    );
    assert!(served.completion_tokens >= 12 * 16, "{served:?}");
    // 40 prompts would hold 40 x (prompt + 16) KV tokens against a quota of 300.
    let (st, v) = post(&h, "globex", "/v1/completions", &list_prompt(40, 16)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    assert_eq!(h.sim.sim.tenant_kv("globex").peak, 0);
    // Admitted: the simulator's peak stays within the quota.
    let (st, v) = post(&h, "globex", "/v1/completions", &list_prompt(8, 16)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(8));
    let served = h.sim.sim.tenant_kv("globex");
    assert!(served.peak <= 300, "{served:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn n_choices_and_token_id_prompts_are_reserved() {
    let h = Harness::start("[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\n").await;
    // 3 token-id prompts x n = 4 x 16 tokens: 192 completion tokens reserved, and served.
    let body = r#"{"model":"m","prompt":[[1,2,3],[4,5],[6]],"n":4,"max_tokens":16}"#;
    for _ in 0..10 {
        post(&h, "acme", "/v1/completions", body).await;
    }
    let served = h.sim.sim.tenant_kv("acme");
    assert!(
        served.prompt_tokens + served.completion_tokens <= 1000,
        "{served:?}"
    );
    assert!(served.completion_tokens >= 192, "{served:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn tools_and_template_arguments_count_as_prompt() {
    let h = Harness::start("[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\n").await;
    // A 6 KB tool description with a one-word message: the template renders it.
    let desc = "word ".repeat(1200);
    let tool = format!(
        r#"{{"type":"function","function":{{"name":"f","description":"{desc}","parameters":{{"type":"object"}}}}}}"#
    );
    let body = chat("hi", &format!(r#","max_tokens":16,"tools":[{tool}]"#));
    let (st, v) = post(&h, "acme", "/v1/chat/completions", &body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large");
    // The same text as template arguments or documents.
    for extra in [
        format!(r#","max_tokens":16,"chat_template_kwargs":{{"context":"{desc}"}}"#),
        format!(r#","max_tokens":16,"documents":[{{"text":"{desc}"}}]"#),
    ] {
        let (st, v) = post(&h, "acme", "/v1/chat/completions", &chat("hi", &extra)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    }
    assert_eq!(h.sim.sim.tenant_kv("acme").prompt_tokens, 0);
    // A small tool fits, and is counted: what the simulator served stays within the limit.
    let small = r#","max_tokens":16,"tools":[{"type":"function","function":{"name":"f","description":"looks a word up in the dictionary"}}]"#;
    for _ in 0..30 {
        post(&h, "acme", "/v1/chat/completions", &chat("hi", small)).await;
    }
    let served = h.sim.sim.tenant_kv("acme");
    assert!(
        served.prompt_tokens + served.completion_tokens <= 1000,
        "{served:?}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn fields_outside_the_schema_never_reach_the_upstream() {
    let h =
        Harness::start("[tenants.acme]\n[tenants.globex]\nextra_fields = [\"x_trace\"]\n").await;
    let body = chat("hi", r#","x_trace":"t1""#);
    let (st, v) = post(&h, "acme", "/v1/chat/completions", &body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "unknown_field");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("x_trace"),
        "{v}"
    );
    assert!(received(&h, "/v1/chat/completions", "acme").is_empty());
    // Opted in for globex: forwarded as written.
    let (st, _) = post(&h, "globex", "/v1/chat/completions", &body).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        received(&h, "/v1/chat/completions", "globex")[0]["x_trace"],
        "t1"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn engine_fields_are_set_by_the_sidecar() {
    let h = Harness::start_with(
        "[tenants.acme]\npriority = 3\n[tenants.globex]\ntrusted_engine_fields = [\"kv_transfer_params\"]\n",
        Default::default(),
        vllm,
    )
    .await;
    // The client's request id is replaced by the sidecar's (the one it answers with).
    let body = chat("hi", r#","request_id":"victim-id""#);
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let sidecar_id = p.headers["x-request-id"].to_str().unwrap().to_string();
    let got = &received(&h, "/v1/chat/completions", "acme")[0];
    assert_eq!(got["request_id"], sidecar_id.as_str());
    // The tenant's priority is written; a client's is refused.
    assert_eq!(got["priority"], 3);
    let (st, v) = post(
        &h,
        "acme",
        "/v1/chat/completions",
        &chat("hi", r#","priority":-10"#),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("owned_field"))
    );
    // KV-transfer parameters name remote KV blocks and a host: only for a trusted tenant.
    let kv = chat(
        "hi",
        r#","kv_transfer_params":{"remote_host":"10.0.0.9","remote_block_ids":[1]}"#,
    );
    let (st, v) = post(&h, "acme", "/v1/chat/completions", &kv).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("engine_field"))
    );
    let (st, _) = post(&h, "globex", "/v1/chat/completions", &kv).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        received(&h, "/v1/chat/completions", "globex")[0]["kv_transfer_params"]["remote_host"],
        "10.0.0.9"
    );
    assert_eq!(received(&h, "/v1/chat/completions", "acme").len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn stored_responses_belong_to_the_tenant_that_stored_them() {
    let h = Harness::start_with(
        "[tenants.acme]\nstore_responses = true\n[tenants.globex]\n",
        Default::default(),
        vllm,
    )
    .await;
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/responses",
            r#"{"model":"m","input":"remember this","request_id":"resp_mine"}"#,
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let id = json(&b)["id"].as_str().unwrap().to_string();
    // Stored under the sidecar's id, never the client's.
    let sidecar_id = p.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id, format!("resp_{sidecar_id}"));
    assert_eq!(received(&h, "/v1/responses", "acme")[0]["store"], true);
    // Another tenant cannot continue it; the owner can.
    let next = format!(r#"{{"model":"m","input":"and now?","previous_response_id":"{id}"}}"#);
    let (st, v) = post(&h, "globex", "/v1/responses", &next).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    assert!(received(&h, "/v1/responses", "globex").is_empty());
    let (st, _) = post(&h, "acme", "/v1/responses", &next).await;
    assert_eq!(st, StatusCode::OK);
    // Reading or cancelling it by id: only its tenant's request is forwarded.
    let by_id = format!("/v1/responses/{id}");
    for path in [by_id.clone(), format!("{by_id}/cancel")] {
        let method = if path.ends_with("cancel") {
            Method::POST
        } else {
            Method::GET
        };
        let (p, b) = h
            .send_collect(h.signed("globex", method.clone(), &path, ""))
            .await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json(&b)["error"]["code"], "previous_response_not_found");
        let seen = |h: &Harness| {
            h.sim
                .sim
                .requests()
                .iter()
                .filter(|r| r.path == path)
                .count()
        };
        assert_eq!(seen(&h), 0, "{path}");
        h.send_collect(h.signed("acme", method, &path, "")).await;
        assert_eq!(seen(&h), 1, "{path}");
    }
    // A tenant without store_responses: `store` written false, a client's `true` refused.
    let (st, _) = post(
        &h,
        "globex",
        "/v1/responses",
        r#"{"model":"m","input":"x"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(received(&h, "/v1/responses", "globex")[0]["store"], false);
    let (st, v) = post(
        &h,
        "globex",
        "/v1/responses",
        r#"{"model":"m","input":"x","store":true}"#,
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("permission_denied"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn identity_headers_carry_the_verified_tenant() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut req = h.signed(
        "acme",
        Method::POST,
        "/v1/chat/completions",
        &chat("hi", ""),
    );
    for name in ["x-tenant-id", "x-gateway-inference-fairness-id"] {
        req.headers_mut().insert(name, "globex".parse().unwrap());
    }
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    let r = h.sim.sim.requests().pop().unwrap();
    for name in ["x-tenant-id", "x-gateway-inference-fairness-id"] {
        let seen: Vec<_> = r.headers.get_all(name).iter().collect();
        assert_eq!(seen, ["acme"], "{name}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn a_canary_anywhere_the_model_reads_is_caught() {
    const CANARY: &str = "CANARY-acme-7f3a9c5e";
    let tenants = format!("[tenants.acme]\ncanaries = [\"{CANARY}\"]\n[tenants.globex]\n");
    let h = Harness::start_with(&tenants, Default::default(), |t| {
        t.push_str("\n[leaks]\non_canary = \"block\"\n")
    })
    .await;
    // The canary in a tool description, a document, template arguments, a content part split
    // in two (the model reads the parts as one text), and a Responses instruction.
    let split = r#"[{"type":"text","text":"CANARY-acme"},{"type":"text","text":"-7f3a9c5e"}]"#;
    let tries = [
        (
            "/v1/chat/completions",
            chat(
                "hi",
                &format!(
                    r#","tools":[{{"type":"function","function":{{"name":"f","description":"uses {CANARY}"}}}}]"#
                ),
            ),
        ),
        (
            "/v1/chat/completions",
            chat("hi", &format!(r#","documents":[{{"text":"{CANARY}"}}]"#)),
        ),
        (
            "/v1/chat/completions",
            chat(
                "hi",
                &format!(r#","chat_template_kwargs":{{"ctx":"{CANARY}"}}"#),
            ),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":{split}}}]}}"#),
        ),
        (
            "/v1/responses",
            format!(r#"{{"model":"m","input":"x","instructions":"{CANARY}"}}"#),
        ),
    ];
    for (i, (path, body)) in tries.iter().enumerate() {
        let (st, v) = post(&h, "globex", path, body).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{body}: {v}");
        assert_eq!(v["error"]["code"], "canary_blocked", "{body}");
        let hits = h
            .metric(
                "bulkhead_canary_hits_total{owner=\"acme\",seen_by=\"globex\",where=\"prompt\"}",
            )
            .await;
        assert_eq!(hits, Some((i + 1) as f64), "{body}");
    }
    assert!(received(&h, "/v1/chat/completions", "globex").is_empty());
    // The owner's own traffic is no leak.
    let (st, _) = post(&h, "acme", tries[0].0, &tries[0].1).await;
    assert_eq!(st, StatusCode::OK);
    h.shutdown().await;
}
