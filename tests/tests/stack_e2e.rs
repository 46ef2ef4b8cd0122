//! The whole node: the real agent (eBPF programs attached), the sidecar tagging its sockets
//! through the agent's API, and the simulated inference server. Needs root; under CI=true fails
//! without.

use bulkhead_tests::harness::*;
use bulkhead_tests::stack::{Stack, TempDir};

fn sidecar_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Metrics::parse(text).get(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecar_tags_its_sockets_and_the_agent_counts_each_tenant() {
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(&agent_bin, &paths, &paths.config(""));
    let dir = TempDir::new("stack-e2e");
    let tenants = "[tenants.alpha]\nweight = 1\n[tenants.beta]\nweight = 1\n";
    let stack = Stack::start(
        bulkhead_sidecar::sim::SimConfig::default(),
        tenants,
        "",
        Some(&paths.socket),
        &dir.0,
    )
    .await;
    // One client, one pool: keep-alive connections carry alpha's and beta's requests in turn,
    // so the sidecar must re-tag the connection whenever its tenant changes.
    for i in 0..8 {
        let tenant = if i % 3 == 2 { "beta" } else { "alpha" };
        let out = stack.chat(tenant, "tell me about tenancy", 32).await;
        assert_eq!(out.status, 200, "{tenant}");
        assert!(out.completion_tokens > 0);
    }
    let (_, text) = stack.get_admin("/metrics").await.unwrap();
    assert_eq!(
        sidecar_metric(&text, "bulkhead_agent_tagging_available", &[]),
        1.0,
        "{text}"
    );
    let m = agent.wait_for("both tenants' bytes", |m| {
        m.bytes("alpha", "egress") > 0 && m.bytes("beta", "egress") > 0
    });
    // alpha sent 5 requests and beta 3, through the same kind of sockets: alpha's bytes, in
    // either direction, are more than beta's and both are at least a request's worth each.
    for dir in ["egress", "ingress"] {
        let (a, b) = (m.bytes("alpha", dir), m.bytes("beta", dir));
        assert!(a > b, "{dir}: alpha {a} beta {b}");
        assert!(b >= 3 * 200, "{dir}: beta {b}");
    }
    let tags = m.get(
        "bulkhead_tag_requests_total",
        &[("op", "tag"), ("result", "ok")],
    );
    assert!(
        tags >= 3.0,
        "the sidecar tagged client and upstream sockets: {tags}"
    );
    stack.stop().await;
}
