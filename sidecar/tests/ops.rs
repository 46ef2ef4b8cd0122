//! Metrics, audit log, hot reload (bad files keep the old config), key rotation, and running
//! without the node agent.

mod common;
use base64::Engine;
use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn metrics_cover_every_family() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("a b", r#","stream":true"#),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"200\"}", 1.0)
        .await;
    let m = h.metrics().await;
    for name in [
        "bulkhead_requests_total{tenant=\"acme\",code=\"200\"}",
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"prompt\"}",
        "bulkhead_tokens_total{tenant=\"globex\",kind=\"completion\"}",
        "bulkhead_rate_limited_total{tenant=\"acme\",limit=\"concurrency\"}",
        "bulkhead_request_duration_seconds_count{tenant=\"acme\"}",
        "bulkhead_time_to_first_token_seconds_count{tenant=\"acme\"}",
        "bulkhead_queue_wait_seconds_count{tenant=\"acme\"}",
        "bulkhead_inflight_requests{tenant=\"globex\"}",
        "bulkhead_auth_failures_total{reason=\"replayed\"}",
        "bulkhead_agent_tagging_available",
    ] {
        assert!(metric_in(&m, name).is_some(), "{name} missing from:\n{m}");
    }
    assert_eq!(
        metric_in(
            &m,
            "bulkhead_time_to_first_token_seconds_count{tenant=\"acme\"}"
        ),
        Some(1.0)
    );
    for path in ["/healthz", "/readyz"] {
        let uri: http::Uri = format!("http://{}{path}", h.admin).parse().unwrap();
        assert_eq!(h.client.get(uri).await.unwrap().status(), StatusCode::OK);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn audit_log_is_per_tenant_and_holds_no_prompt() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let secret = "SECRETPROMPTMARKER";
    for tenant in ["acme", "globex", "acme"] {
        let (p, _) = h
            .send_collect(h.signed(
                tenant,
                Method::POST,
                "/v1/chat/completions",
                &chat(secret, ""),
            ))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let mut bad = h.signed(
        "acme",
        Method::POST,
        "/v1/chat/completions",
        &chat(secret, ""),
    );
    bad.headers_mut().remove("signature");
    let (p, _) = h.send_collect(bad).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    let dir = h.dir.path().join("audit");
    let read_lines = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_lines("acme.jsonl").len() < 2
        || read_lines("globex.jsonl").is_empty()
        || read_lines("_unauthenticated.jsonl").is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "audit lines never appeared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let acme = read_lines("acme.jsonl");
    assert_eq!(acme.len(), 2);
    for rec in &acme {
        assert_eq!(rec["tenant"], "acme");
        assert_eq!(rec["key_id"], "gw");
        assert_eq!(rec["status"], 200);
        assert_eq!(rec["route"], "/v1/chat/completions");
        assert_eq!(rec["completion_tokens"], 16);
        assert!(rec["latency_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(rec["prompt_hash"].as_str().unwrap().len(), 64);
        assert!(rec["request_id"].as_str().is_some());
    }
    // Same prompt, same keyed hash: linkable within the log, not reversible.
    assert_eq!(acme[0]["prompt_hash"], acme[1]["prompt_hash"]);
    assert_eq!(read_lines("globex.jsonl")[0]["tenant"], "globex");
    assert_eq!(read_lines("_unauthenticated.jsonl")[0]["reason"], "missing");
    for f in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(!text.contains(secret), "prompt leaked into the audit log");
        assert!(!text.contains("gateway-secret"));
    }
    // Everything buffered is on disk by the time `run` returns (no polling here).
    let (p, _) = h
        .send_collect(h.signed("globex", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let kept = h.shutdown_keep_dir().await;
    let lines = std::fs::read_to_string(kept.path().join("audit").join("globex.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
}

#[tokio::test]
async fn hot_reload_applies_good_files_and_keeps_the_old_config_on_bad_ones() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let original = std::fs::read_to_string(&h.config_path).unwrap();
    // A file that parses but fails validation (and names a tenant limit that would bite).
    let bad = original.replace(
        "[tenants.acme]\nweight = 1",
        "[tenants.acme]\nweight = 0\nrequests_per_minute = 1",
    );
    assert_ne!(bad, original);
    h.write_config(&bad);
    h.wait_metric("bulkhead_config_reloads_total{result=\"invalid\"}", 1.0)
        .await;
    // Broken TOML too.
    h.write_config("[upstream\nurl=");
    h.wait_metric("bulkhead_config_reloads_total{result=\"invalid\"}", 2.0)
        .await;
    for _ in 0..3 {
        let (p, _) = h
            .send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
            .await;
        assert_eq!(p.status, StatusCode::OK, "old config still applies");
    }
    // A good file applies as a whole.
    let good = original.replace(
        "[tenants.acme]\nweight = 1",
        "[tenants.acme]\nweight = 1\nrequests_per_minute = 1",
    );
    h.write_config(&good);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let (p, _) = h
        .send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let (p, _) = h
        .send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    h.shutdown().await;
}

/// The log lines the sidecar writes while a test runs on this thread (the harness's tasks run
/// on the test's current-thread runtime).
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A reload that changes a restart-only field (`http.max_header_bytes`) keeps its running
/// value, with one warning naming the field, and applies the rest of the file.
#[tokio::test]
async fn reload_keeps_restart_only_fields_and_applies_the_rest() {
    let logs = Logs::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish(),
    );
    let h = Harness::start(DEFAULT_TENANTS).await;
    let original = std::fs::read_to_string(&h.config_path).unwrap();
    let changed = original
        .replace("[http]\n", "[http]\nmax_header_bytes = 1024\n")
        .replace(
            "[tenants.acme]\nweight = 1",
            "[tenants.acme]\nweight = 1\nrequests_per_minute = 1",
        );
    assert_eq!(changed.matches("max_header_bytes = 1024").count(), 1);
    assert!(changed.contains("requests_per_minute = 1"));
    h.write_config(&changed);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    // A 4 KiB header: over the file's new 1024 bytes, within the running 64 KiB.
    let big = || {
        let mut req = h.signed("acme", Method::GET, "/v1/models", "");
        req.headers_mut()
            .insert("x-padding", "p".repeat(4096).parse().unwrap());
        req
    };
    assert_eq!(h.send_collect(big()).await.0.status, StatusCode::OK);
    // The tenant limit of the same file is in force.
    assert_eq!(
        h.send_collect(big()).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let text = logs.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("takes a restart"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("http.max_header_bytes"), "{text}");
    h.shutdown().await;
}

#[tokio::test]
async fn key_rotation_through_reload() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let next_key = b"the-next-gateway-secret-32-bytes";
    let next = h.dir.path().join("gw-next.key");
    std::fs::write(
        &next,
        base64::engine::general_purpose::STANDARD.encode(next_key),
    )
    .unwrap();
    let original = std::fs::read_to_string(&h.config_path).unwrap();
    let old_path = h.dir.path().join("gw.key").display().to_string();
    let both = original.replace(
        &format!("[\"{old_path}\"]"),
        &format!("[\"{old_path}\", \"{}\"]", next.display()),
    );
    assert_ne!(both, original);
    h.write_config(&both);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let path = "/v1/chat/completions";
    for key in [GW_KEY, next_key.as_slice()] {
        let req = h.signed_with(
            "acme",
            Method::POST,
            path,
            &chat("x", ""),
            "gw",
            key,
            |_| {},
        );
        assert_eq!(h.send_collect(req).await.0.status, StatusCode::OK);
    }
    // The old secret retired.
    let only_next = original.replace(&old_path, &next.display().to_string());
    h.write_config(&only_next);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 2.0)
        .await;
    let req = h.signed_with(
        "acme",
        Method::POST,
        path,
        &chat("x", ""),
        "gw",
        GW_KEY,
        |_| {},
    );
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&b)["error"]["code"], "bad_signature");
    h.shutdown().await;
}

#[tokio::test]
async fn runs_on_without_the_node_agent() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str("\n[agent]\nsocket = \"/nonexistent/bulkhead-agent.sock\"\n");
    })
    .await;
    for tenant in ["acme", "globex"] {
        let (p, _) = h
            .send_collect(h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", "")))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    assert_eq!(
        h.metric("bulkhead_agent_tagging_available").await,
        Some(0.0)
    );
    h.shutdown().await;
}
