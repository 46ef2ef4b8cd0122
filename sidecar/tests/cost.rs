//! Per-tenant cost over real sockets: `bulkhead_cost_total{tenant,model}` and each audit
//! record's `cost` equal usage x price for a mixed run (streaming and not, a tenant's own
//! prices, a model no table names).

mod common;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use std::time::{Duration, Instant};

const PRICES: &str = r#"
[cost]
currency = "EUR"
[cost.models.m]
input = 1.5
cached_input = 0.5
output = 2.0
[cost.default]
input = 7.0
output = 11.0
[cost.tenants.globex.models.m]
input = 3.0
output = 4.0
"#;

/// (input, output) per million tokens for `tenant` and the model label.
fn price(tenant: &str, model: &str) -> (f64, f64) {
    match (tenant, model) {
        ("globex", "m") => (3.0, 4.0),
        (_, "m") => (1.5, 2.0),
        _ => (7.0, 11.0),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
}

#[tokio::test]
async fn cost_is_usage_times_price_for_a_mixed_run() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| t.push_str(PRICES)).await;
    let chat_path = "/v1/chat/completions";
    let mut sent = 0;
    for (tenant, body) in [
        ("acme", chat("short", "")),
        (
            "acme",
            chat(
                "a somewhat longer prompt than the first one",
                r#","max_tokens":5"#,
            ),
        ),
        ("acme", chat("streamed", r#","stream":true"#)),
        (
            "acme",
            chat(
                "streamed again with more words",
                r#","stream":true,"max_tokens":3"#,
            ),
        ),
        ("acme", chat("other model", "").replace("\"m\"", "\"zzz\"")),
        ("globex", chat("globex plain", "")),
        ("globex", chat("globex streamed", r#","stream":true"#)),
    ] {
        let resp = h
            .send(h.signed(tenant, Method::POST, chat_path, &body))
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        resp.into_body().collect().await.unwrap();
        sent += 1;
    }
    // Every record written (the writer runs beside the proxy).
    let dir = h.dir.path().join("audit");
    let read = |stem: &str| -> Vec<Value> {
        std::fs::read_to_string(dir.join(format!("{stem}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read("acme").len() + read("globex").len() < sent {
        assert!(Instant::now() < deadline, "audit records missing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = h.metrics().await;
    let mut want: std::collections::BTreeMap<(String, String), f64> = Default::default();
    for tenant in ["acme", "globex"] {
        let (mut prompt, mut completion) = (0, 0);
        for r in read(tenant) {
            let model = r["model"].as_str().unwrap();
            let label = if model == "m" { "m" } else { "other" };
            let p = r["prompt_tokens"].as_u64().unwrap();
            let c = r["completion_tokens"].as_u64().unwrap();
            assert!(p > 0 && c > 0, "{r}");
            prompt += p;
            completion += c;
            let (pi, po) = price(tenant, label);
            let cost = (p as f64 * pi + c as f64 * po) / 1e6;
            assert!(close(r["cost"].as_f64().unwrap(), cost), "{r}: want {cost}");
            *want.entry((tenant.into(), label.into())).or_default() += cost;
        }
        // The same usage the token counters hold.
        let tokens = |kind: &str| {
            metric_in(
                &metrics,
                &format!("bulkhead_tokens_total{{tenant=\"{tenant}\",kind=\"{kind}\"}}"),
            )
        };
        assert_eq!(tokens("prompt"), Some(prompt as f64));
        assert_eq!(tokens("completion"), Some(completion as f64));
    }
    assert_eq!(want.len(), 3, "{want:?}");
    for ((tenant, model), cost) in &want {
        let series = format!("bulkhead_cost_total{{tenant=\"{tenant}\",model=\"{model}\"}}");
        let got = metric_in(&metrics, &series).unwrap_or_else(|| panic!("{series} missing"));
        assert!(close(got, *cost), "{series} = {got}, want {cost}");
    }
    // Model labels come from the price tables only.
    assert!(!metrics.contains("zzz"));
    h.shutdown().await;
}

#[test]
fn bad_prices_name_the_field() {
    let base = |cost: &str| {
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[[keys]]\nid = \"k\"\n\
             secret_files = [\"/x\"]\ntenants = [\"*\"]\n{cost}\n"
        )
    };
    for (cost, field) in [
        (
            "[cost.models.m]\ninput = -1.0\noutput = 1.0",
            "cost.models.m.input",
        ),
        (
            "[cost.models.other]\ninput = 1.0\noutput = 1.0",
            "cost.models.other",
        ),
        (
            "[cost.default]\ninput = 1.0\noutput = nan",
            "cost.default.output",
        ),
        (
            "[cost.tenants.nobody.models.m]\ninput = 1.0\noutput = 1.0",
            "cost.tenants.nobody",
        ),
        ("[cost]\ncurrency = \"US$\"", "cost.currency"),
    ] {
        let e = bulkhead_sidecar::Config::from_toml(&base(cost))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{cost}: {e}");
    }
    assert!(bulkhead_sidecar::Config::from_toml(&base("[cost.models.m]\ninput = 1.0")).is_err());
}

/// Every audit record of `tenant` in `dir`.
fn audit(dir: &std::path::Path, tenant: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit").join(format!("{tenant}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn cost_is_priced_by_the_model_that_served_the_answer() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| t.push_str(PRICES)).await;
    let no_model = |extra: &str| {
        format!(r#"{{"messages":[{{"role":"user","content":"no model named"}}]{extra}}}"#)
    };
    // (body, the model the answer names, the price wanted)
    let cases = [
        // No `model`: the default model served it; priced as that model, not as `other`.
        (no_model(""), Some("m"), "m"),
        (no_model(r#","stream":true"#), Some("m"), "m"),
        // An alias the tables do not name: the request's model's price.
        (chat("alias", ""), Some("m-2026-01"), "m"),
        (chat("alias", r#","stream":true"#), Some("m-2026-01"), "m"),
        // Asked for another model, served by a priced one.
        (
            chat("other", "").replace("\"m\"", "\"zzz\""),
            Some("m"),
            "m",
        ),
        // Neither priced: the default.
        (no_model(""), None, "other"),
    ];
    for (body, served, _) in &cases {
        let mut req = h.signed("acme", Method::POST, "/v1/chat/completions", body);
        if let Some(s) = served {
            req.headers_mut()
                .insert("x-sim-served-model", s.parse().unwrap());
        }
        let (p, _) = h.send_collect(req).await;
        assert_eq!(p.status, StatusCode::OK, "{body}");
    }
    let metrics = h.metrics().await;
    let dir = h.shutdown_keep_dir().await;
    let recs = audit(dir.path(), "acme");
    assert_eq!(recs.len(), cases.len());
    let mut want_m = 0.0;
    for (r, (body, served, label)) in recs.iter().zip(&cases) {
        assert_eq!(r["price_model"], *label, "{body}: {r}");
        assert_eq!(
            r["served_model"],
            served.unwrap_or("bulkhead-sim"),
            "{body}: {r}"
        );
        let (pi, po) = price("acme", label);
        let (p, c) = (
            r["prompt_tokens"].as_u64().unwrap(),
            r["completion_tokens"].as_u64().unwrap(),
        );
        let cost = (p as f64 * pi + c as f64 * po) / 1e6;
        assert!(close(r["cost"].as_f64().unwrap(), cost), "{r}: want {cost}");
        if *label == "m" {
            want_m += cost;
        }
    }
    let got = metric_in(&metrics, "bulkhead_cost_total{tenant=\"acme\",model=\"m\"}").unwrap();
    assert!(close(got, want_m), "{got} != {want_m}");
    assert_eq!(
        metric_in(&metrics, "bulkhead_cost_unpriced_total{tenant=\"acme\"}"),
        Some(0.0)
    );
    // Served-model names never become labels.
    assert!(!metrics.contains("m-2026-01"));
}

#[tokio::test]
async fn an_answer_no_price_applies_to_is_counted_as_unpriced() {
    let only_m = "[cost]\n[cost.models.m]\ninput = 1.0\noutput = 1.0\n";
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| t.push_str(only_m)).await;
    for model in ["zzz", "m", "zzz"] {
        let body = chat("hi", "").replace("\"m\"", &format!("\"{model}\""));
        let (p, _) = h
            .send_collect(h.signed("globex", Method::POST, "/v1/chat/completions", &body))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    assert_eq!(
        h.metric("bulkhead_cost_unpriced_total{tenant=\"globex\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        h.metric("bulkhead_cost_unpriced_total{tenant=\"acme\"}")
            .await,
        Some(0.0)
    );
    let dir = h.shutdown_keep_dir().await;
    let recs = audit(dir.path(), "globex");
    let priced: Vec<Option<&str>> = recs.iter().map(|r| r["price_model"].as_str()).collect();
    assert_eq!(priced, [None, Some("m"), None]);
    assert!(recs[0]["cost"].is_null() && recs[1]["cost"].as_f64().unwrap() > 0.0);
    // Without any price, answers are not "unpriced": nothing is priced at all.
    let h = Harness::start(DEFAULT_TENANTS).await;
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(
        h.metric("bulkhead_tokens_total{tenant=\"acme\",kind=\"prompt\"}")
            .await
            .is_some_and(|t| t > 0.0),
        "the answer was settled with usage"
    );
    assert_eq!(
        h.metric("bulkhead_cost_unpriced_total{tenant=\"acme\"}")
            .await,
        Some(0.0)
    );
    h.shutdown().await;
}
