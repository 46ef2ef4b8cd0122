//! Scoped credentials over real sockets: a key limited to models, routes, tools and
//! `max_tokens` is refused (403 `permission_denied`, naming what was refused) outside its
//! scope, and nothing reaches the upstream; inside its scope it is served.

mod common;
use common::*;
use http::{Method, StatusCode};

/// A key for acme limited to one model, two route patterns, one tool and 100 tokens.
fn with_scoped_key(t: &mut String) {
    let secret = t
        .lines()
        .find(|l| l.contains("acme.key"))
        .unwrap()
        .to_string();
    t.push_str(&format!(
        r#"
[[keys]]
id = "scoped"
{secret}
tenants = ["acme"]
[keys.scope]
models = ["small"]
routes = ["/v1/chat/completions", "/v1/models/*", "/v1/tokenize"]
tools = ["get_weather"]
max_tokens = 100
"#
    ));
}

fn scoped(
    h: &Harness,
    method: Method,
    path: &str,
    body: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    h.signed_with("acme", method, path, body, "scoped", ACME_KEY, |_| {})
}

fn chat_with(model: &str, extra: &str) -> String {
    format!(r#"{{"model":{model:?},"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

const WEATHER: &str =
    r#","tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}]"#;

#[tokio::test]
async fn outside_the_scope_is_refused_and_never_forwarded() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), with_scoped_key).await;
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, String, &str)> = vec![
        (chat, chat_with("big", ""), r#"model "big""#),
        (
            "/v1/embeddings",
            r#"{"model":"small","input":"x"}"#.into(),
            r#"route "/v1/embeddings""#,
        ),
        (
            "/v1/completions",
            r#"{"model":"small","prompt":"x"}"#.into(),
            r#"route "/v1/completions""#,
        ),
        (
            chat,
            chat_with(
                "small",
                r#","tools":[{"type":"function","function":{"name":"get_weather"}},{"type":"function","function":{"name":"rm_rf"}}]"#,
            ),
            r#"tool "rm_rf""#,
        ),
        (
            chat,
            chat_with(
                "small",
                &format!(
                    r#"{WEATHER},"tool_choice":{{"type":"function","function":{{"name":"rm_rf"}}}}"#
                ),
            ),
            r#"tool "rm_rf""#,
        ),
        (
            chat,
            chat_with("small", r#","functions":[{"name":"rm_rf"}]"#),
            r#"tool "rm_rf""#,
        ),
        (
            chat,
            chat_with("small", r#","max_tokens":101"#),
            "at most 100",
        ),
        (
            chat,
            chat_with("small", r#","max_completion_tokens":"5000""#),
            "at most 100",
        ),
        (
            chat,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
            "name one in `model`",
        ),
    ];
    for (path, body, names) in cases {
        let before = h.sim.sim.requests().len();
        let (p, b) = h.send_collect(scoped(&h, Method::POST, path, &body)).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{path} {body}: {b:?}");
        let v = json(&b);
        assert_eq!(v["error"]["code"], "permission_denied", "{v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(names), "{body}: {msg}");
        assert_eq!(
            h.sim.sim.requests().len(),
            before,
            "{path} {body} was forwarded"
        );
    }
    // Refusals after the body verified are the tenant's, counted as 403s; a route refused on
    // the head alone (before the body and its digest) is not attributed yet.
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"403\"}", 7.0)
        .await;
    h.wait_metric(
        "bulkhead_unattributed_requests_total{reason=\"permission_denied\"}",
        2.0,
    )
    .await;
    assert_eq!(h.sim.sim.requests().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn refused_names_are_escaped_and_cut_short() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), with_scoped_key).await;
    let evil = format!("x\"\n</script>{}", "A".repeat(5000));
    let body = serde_json::json!({"model": evil, "messages": []}).to_string();
    let (p, b) = h
        .send_collect(scoped(&h, Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    let msg = json(&b)["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.len() < 200, "{msg}");
    assert!(msg.contains(r#"model "x\"\n</script>AAA"#), "{msg}");
    assert!(!msg.contains('\n'));
    // Secrets never appear.
    assert!(!String::from_utf8_lossy(&b).contains("acme-only"));
    h.shutdown().await;
}

#[tokio::test]
async fn inside_the_scope_is_served() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), with_scoped_key).await;
    let chat = "/v1/chat/completions";
    for body in [
        chat_with("small", ""),
        chat_with(
            "small",
            &format!(r#"{WEATHER},"tool_choice":"auto","max_tokens":100"#),
        ),
        chat_with(
            "small",
            &format!(
                r#"{WEATHER},"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}"#
            ),
        ),
    ] {
        let (p, b) = h.send_collect(scoped(&h, Method::POST, chat, &body)).await;
        assert_eq!(p.status, StatusCode::OK, "{body}: {b:?}");
    }
    // Without a limit the request gets the scope's (below the tenant default of 256).
    let first = &h.sim.sim.requests()[0];
    assert_eq!(json(&first.body)["max_tokens"], 100);
    // A prefix pattern; the tokenizer route may leave the model out.
    let (p, _) = h
        .send_collect(scoped(&h, Method::GET, "/v1/models/small", ""))
        .await;
    assert_ne!(p.status, StatusCode::FORBIDDEN);
    let (p, b) = h
        .send_collect(scoped(
            &h,
            Method::POST,
            "/v1/tokenize",
            r#"{"prompt":"x"}"#,
        ))
        .await;
    assert_ne!(p.status, StatusCode::FORBIDDEN, "{b:?}");
    // The unscoped gateway key is not limited.
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/embeddings",
            r#"{"model":"big","input":"x"}"#,
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;
}

#[test]
fn bad_scopes_name_the_field() {
    let base = |scope: &str| {
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[[keys]]\nid = \"k\"\n\
             secret_files = [\"/x\"]\ntenants = [\"acme\"]\n[keys.scope]\n{scope}\n"
        )
    };
    for (scope, field) in [
        ("max_tokens = 0", "keys[0].scope.max_tokens"),
        ("routes = [\"/v2/x\"]", "keys[0].scope.routes"),
        ("routes = [\"/v1/*/x\"]", "keys[0].scope.routes"),
        ("models = [\"\"]", "keys[0].scope.models"),
    ] {
        let e = bulkhead_sidecar::Config::from_toml(&base(scope))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{scope}: {e}");
    }
    assert!(bulkhead_sidecar::Config::from_toml(&base("bogus = 1")).is_err());
    bulkhead_sidecar::Config::from_toml(&base("models = [\"m\"]\nmax_tokens = 5")).unwrap();
}
