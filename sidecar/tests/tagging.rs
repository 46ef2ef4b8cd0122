//! Socket tagging through a fake node agent speaking the real protocol (SOCK_SEQPACKET +
//! SCM_RIGHTS): client sockets are tagged and re-tagged when a keep-alive connection changes
//! tenant; upstream sockets are tagged with their pool's tenant. The same fake agent records
//! `kv_report`s: per-tenant KV-cache bytes while a stream is held open, zero after it ends.

mod common;
use bulkhead_testkit::agent::{AgentOptions, FakeAgent, KvLog, TokenLog};
use common::*;
use http::{Method, StatusCode};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
struct Tagged {
    tenant: String,
    local_port: u16,
    peer_port: u16,
}

/// The tags the fake agent saw, in order.
fn tags(agent: &FakeAgent) -> Vec<Tagged> {
    agent
        .calls()
        .into_iter()
        .filter(|c| c.op == "tag")
        .map(|c| Tagged {
            tenant: c.tenant.unwrap_or_default(),
            local_port: c.local_port,
            peer_port: c.peer_port,
        })
        .collect()
}

fn fake_agent(path: &std::path::Path) -> FakeAgent {
    FakeAgent::start(path, AgentOptions::default())
}

#[tokio::test]
async fn sockets_are_tagged_and_retagged_per_tenant() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let agent = fake_agent(&sock);
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&format!("\n[agent]\nsocket = \"{}\"\n", sock.display()));
    })
    .await;
    // One keep-alive connection (sequential requests on one pooled client connection).
    for tenant in ["acme", "globex", "acme"] {
        let (p, _) = h
            .send_collect(h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", "")))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    assert_eq!(
        h.metric("bulkhead_agent_tagging_available").await,
        Some(1.0)
    );
    let log = tags(&agent);
    let client: Vec<&Tagged> = log
        .iter()
        .filter(|t| t.local_port == h.addr.port())
        .collect();
    let upstream: Vec<&Tagged> = log
        .iter()
        .filter(|t| t.peer_port == h.sim.addr.port())
        .collect();
    assert_eq!(
        client.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>(),
        ["acme", "globex", "acme"],
        "{log:?}"
    );
    assert!(
        client.iter().all(|t| t.peer_port == client[0].peer_port),
        "one client connection"
    );
    // One upstream connection per tenant, reused for acme's second request.
    let mut up: Vec<(&str, u16)> = upstream
        .iter()
        .map(|t| (t.tenant.as_str(), t.local_port))
        .collect();
    up.sort();
    assert_eq!(up.len(), 2, "{log:?}");
    assert_eq!(up[0].0, "acme");
    assert_eq!(up[1].0, "globex");
    assert_ne!(up[0].1, up[1].1);
    // The simulator saw acme on acme's tagged connection only.
    for r in h.sim.sim.requests() {
        let tenant = r.headers["x-bulkhead-tenant"].to_str().unwrap();
        let port = r.peer.unwrap().port();
        assert!(up.contains(&(tenant, port)), "{tenant} on {port}: {up:?}");
    }
    h.shutdown().await;
}

/// Poll the fake agent's KV reports until the latest one satisfies `want`.
async fn wait_report(kv: &KvLog, what: &str, want: impl Fn(&BTreeMap<String, u64>) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let last = kv.lock().unwrap().last().cloned();
        if last.as_ref().is_some_and(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no KV report with {what}; last {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn kv_cache_bytes_are_tracked_and_reported_while_a_stream_runs() {
    use http_body_util::BodyExt;
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let kv: KvLog = fake_agent(&sock).kv;
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&format!(
            "\n[agent]\nsocket = \"{}\"\nkv_report_interval_ms = 100\n\
             [model]\nlayers = 2\nkv_heads = 1\nhead_dim = 4\ndtype = \"fp16\"\n",
            sock.display()
        ));
    })
    .await;
    // 2 (K, V) x 2 layers x 1 head x 4 dims x 2 bytes = 32 bytes per token.
    let mut body = h.hold_stream("acme", "hello world").await;
    // The prompt estimate (26 bytes of message keys and strings -> 7 tokens, and 4 for the
    // message) plus the first generated token.
    h.wait_metric("bulkhead_kv_cache_tokens{tenant=\"acme\"}", 12.0)
        .await;
    h.wait_metric("bulkhead_sidecar_kv_inflight_bytes{tenant=\"acme\"}", 384.0)
        .await;
    wait_report(&kv, "acme = 384", |r| {
        r.get("acme") == Some(&384) && r.get("globex").copied().unwrap_or(0) == 0
    })
    .await;
    // The stream ends: nothing held any more.
    h.sim.sim.open_gate();
    while body.frame().await.is_some() {}
    h.wait_metric("bulkhead_kv_cache_tokens{tenant=\"acme\"}", 0.0)
        .await;
    wait_report(&kv, "acme = 0", |r| {
        r.get("acme").copied().unwrap_or(0) == 0
    })
    .await;
    assert!(
        h.metric("bulkhead_agent_kv_reports_total{result=\"ok\"}")
            .await
            .unwrap()
            >= 2.0
    );
    h.shutdown().await;
}

/// The sidecar's KV reports with the fake agent at `sock` (`old`: one without token counts).
async fn start_reporting(sock: &std::path::Path) -> Harness {
    Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&format!(
            "\n[agent]\nsocket = \"{}\"\nkv_report_interval_ms = 100\n\
             [model]\nlayers = 2\nkv_heads = 1\nhead_dim = 4\ndtype = \"fp16\"\n",
            sock.display()
        ));
    })
    .await
}

/// Sums each tenant's reported tokens once `reports` have `want` in all (polled).
async fn reported_tokens(tokens: &TokenLog, want: u64) -> BTreeMap<String, u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut sum: BTreeMap<String, u64> = BTreeMap::new();
        for r in tokens.lock().unwrap().iter().flatten() {
            for (t, n) in r {
                *sum.entry(t.clone()).or_default() += n;
            }
        }
        if sum.values().sum::<u64>() >= want {
            return sum;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reports carried {sum:?}, want {want} tokens in all"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn kv_reports_carry_the_tokens_the_simulator_served_each_tenant_weighted_by_the_queue_costs()
{
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let tokens: TokenLog = fake_agent(&sock).tokens;
    let h = start_reporting(&sock).await;
    for (tenant, prompt) in [("acme", "a"), ("acme", "b c d e f"), ("globex", "g h")] {
        let (p, _) = h
            .send_collect(h.signed(
                tenant,
                Method::POST,
                "/v1/chat/completions",
                &chat(prompt, ""),
            ))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    // The simulator's own counts, weighted by the default costs (1 per prompt token, 2 per
    // output token): every token reported once, across however many reports.
    let weighted = |t: &str| {
        let s = h.sim.sim.tenant_kv(t);
        s.prompt_tokens + 2 * s.completion_tokens
    };
    let want = BTreeMap::from([
        ("acme".to_string(), weighted("acme")),
        ("globex".to_string(), weighted("globex")),
    ]);
    assert!(want.values().all(|&n| n > 0), "{want:?}");
    let mut got = reported_tokens(&tokens, want.values().sum()).await;
    got.retain(|_, n| *n > 0);
    assert_eq!(got, want);
    h.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_predates_token_counts_still_gets_the_kv_bytes() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let FakeAgent { kv, tokens, .. } = FakeAgent::start(
        &sock,
        AgentOptions {
            predates_tokens: true,
            ..Default::default()
        },
    );
    let h = start_reporting(&sock).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h
        .metric("bulkhead_agent_kv_reports_total{result=\"ok\"}")
        .await
        .unwrap_or(0.0)
        < 3.0
    {
        assert!(std::time::Instant::now() < deadline, "no accepted reports");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(kv.lock().unwrap().len() >= 3);
    assert!(
        tokens.lock().unwrap().iter().all(Option::is_none),
        "after the refusal, reports carry no tokens"
    );
    assert_eq!(
        h.metric("bulkhead_agent_kv_reports_total{result=\"error\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "a refused first try that was resent without tokens is no failed report"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn kv_reports_to_an_absent_agent_are_counted_and_never_block_requests() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("nobody.sock");
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&format!(
            "\n[agent]\nsocket = \"{}\"\nkv_report_interval_ms = 100\n\
             [model]\nlayers = 1\nkv_heads = 1\nhead_dim = 1\ndtype = \"fp8\"\n",
            sock.display()
        ));
    })
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h
        .metric("bulkhead_agent_kv_reports_total{result=\"error\"}")
        .await
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(std::time::Instant::now() < deadline, "no failed reports");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &chat("x", "")))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;
}

/// The sidecar with the fake agent at `sock`, `extra_agent` appended to `[agent]`, and idle
/// keep-alive connections kept open (the test's 300 ms header timeout would close them).
async fn start_tagging(tenants: &str, sock: &std::path::Path, extra_agent: &str) -> Harness {
    let sock = sock.display().to_string();
    let extra_agent = extra_agent.to_string();
    Harness::start_with(tenants, Default::default(), move |t| {
        *t = t.replace(
            "header_read_timeout_ms = 300",
            "header_read_timeout_ms = 60000",
        );
        t.push_str(&format!("\n[agent]\nsocket = \"{sock}\"\n{extra_agent}\n"));
    })
    .await
}

/// The client-socket tags the fake agent saw, as (tenant, client port).
fn client_tags(agent: &FakeAgent, h: &Harness) -> Vec<(String, u16)> {
    tags(agent)
        .iter()
        .filter(|t| t.local_port == h.addr.port())
        .map(|t| (t.tenant.clone(), t.peer_port))
        .collect()
}

#[tokio::test]
async fn every_client_connection_is_tagged_and_the_old_per_tenant_cap_is_ignored() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let agent = fake_agent(&sock);
    // A configuration written for the cap still starts; the cap no longer applies (the agent
    // keeps tags in socket storage, which no tenant can fill for another).
    let h = start_tagging(
        DEFAULT_TENANTS,
        &sock,
        "max_tagged_connections_per_tenant = 3",
    )
    .await;
    let chat_req =
        |tenant: &str| h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", ""));
    // Six keep-alive connections of acme, all kept open, one request each: every one tagged.
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut c = H1Conn::open(h.addr).await;
        let (p, _) = c.request(chat_req("acme")).await.unwrap();
        assert_eq!(p.status, StatusCode::OK);
        conns.push(c);
    }
    let all: Vec<(String, u16)> = conns.iter().map(|c| ("acme".to_string(), c.port)).collect();
    assert_eq!(client_tags(&agent, &h), all);
    // A second request on a tagged connection is not tagged again.
    let (p, _) = conns[3].request(chat_req("acme")).await.unwrap();
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(client_tags(&agent, &h), all);
    // Another tenant's connection is tagged with its own tenant.
    let mut globex = H1Conn::open(h.addr).await;
    let (p, _) = globex.request(chat_req("globex")).await.unwrap();
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(
        client_tags(&agent, &h).last(),
        Some(&("globex".to_string(), globex.port))
    );
    assert_eq!(
        h.metric("bulkhead_tagging_cap_reached_total{tenant=\"acme\"}")
            .await,
        None,
        "the cap's counter is gone with the cap"
    );
}

#[tokio::test]
async fn requests_refused_before_admission_leave_the_connection_untagged() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let agent = fake_agent(&sock);
    let h = start_tagging(
        "[tenants.acme]\nrequests_per_minute = 1\n[tenants.globex]\n",
        &sock,
        "",
    )
    .await;
    let body = chat("x", "");
    let path = "/v1/chat/completions";
    // Admitted: tagged.
    let mut ok = H1Conn::open(h.addr).await;
    let (p, _) = ok
        .request(h.signed("acme", Method::POST, path, &body))
        .await
        .unwrap();
    assert_eq!(p.status, StatusCode::OK);
    // A valid key, refused by the tenant's limits: not tagged.
    let mut limited = H1Conn::open(h.addr).await;
    let (p, _) = limited
        .request(h.signed("acme", Method::POST, path, &body))
        .await
        .unwrap();
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    // A bad signature (the wrong secret for the key id): not tagged.
    let mut bad_sig = H1Conn::open(h.addr).await;
    let (p, _) = bad_sig
        .request(h.signed_with("globex", Method::POST, path, &body, "gw", ACME_KEY, |_| {}))
        .await
        .unwrap();
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    // Signed headers, but a body other than the one signed: not tagged.
    let mut tampered = H1Conn::open(h.addr).await;
    let mut req = h.signed("globex", Method::POST, path, &body);
    *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from(chat("y", "")));
    let (p, _) = tampered.request(req).await.unwrap();
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    // A tenant the key may not speak for: not tagged.
    let mut mismatch = H1Conn::open(h.addr).await;
    let (p, _) = mismatch
        .request(h.signed_with(
            "globex",
            Method::POST,
            path,
            &body,
            "acme-key",
            ACME_KEY,
            |_| {},
        ))
        .await
        .unwrap();
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        client_tags(&agent, &h),
        [("acme".to_string(), ok.port)],
        "ports: ok {} limited {} bad_sig {} tampered {} mismatch {}",
        ok.port,
        limited.port,
        bad_sig.port,
        tampered.port,
        mismatch.port
    );
    for c in [ok, limited, bad_sig, tampered, mismatch] {
        c.close().await;
    }
    h.shutdown().await;
}
