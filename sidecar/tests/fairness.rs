//! Weighted fair queuing over real sockets: a flooding tenant does not starve another; bounded
//! per-tenant queues and the queue timeout answer with a clear reason.

mod common;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

const ONE_SLOT: &str = r#"
[tenants.acme]
weight = 1
[tenants.globex]
weight = 1
"#;

fn one_slot(t: &mut String) {
    *t = t.replace("max_inflight = 64", "max_inflight = 1");
}

#[tokio::test]
async fn a_flooding_tenant_does_not_starve_another() {
    let h = Harness::start_with(ONE_SLOT, Default::default(), one_slot).await;
    h.sim.sim.close_gate();
    let body = chat("hi", r#","stream":true"#);
    let mut tasks = Vec::new();
    let spawn = |tenant: &str| {
        let req = h.signed(tenant, Method::POST, "/v1/chat/completions", &body);
        let client = h.client.clone();
        tokio::spawn(async move {
            let r = client.request(req).await.unwrap();
            let status = r.status();
            r.into_body().collect().await.unwrap();
            status
        })
    };
    // acme floods: one request holds the only upstream slot, 20 wait.
    for _ in 0..21 {
        tasks.push(spawn("acme"));
    }
    h.wait_metric("bulkhead_queued_requests{tenant=\"acme\"}", 20.0)
        .await;
    // globex arrives last.
    tasks.push(spawn("globex"));
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    h.sim.sim.open_gate();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    // The upstream saw requests in dispatch order: globex is served within its fair share
    // (after at most one more acme request), not after acme's whole backlog.
    let order: Vec<String> = h
        .sim
        .sim
        .requests()
        .iter()
        .map(|r| r.headers["x-bulkhead-tenant"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(order.len(), 22);
    let pos = order.iter().position(|t| t == "globex").unwrap();
    assert!(pos <= 2, "globex served at position {pos}: {order:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn full_queue_and_queue_timeout() {
    let h = Harness::start_with(ONE_SLOT, Default::default(), |t| {
        one_slot(t);
        *t = t.replace("max_queue_per_tenant = 64", "max_queue_per_tenant = 1");
        *t = t.replace("timeout_ms = 5000", "timeout_ms = 300");
    })
    .await;
    h.sim.sim.close_gate();
    let body = chat("hi", r#","stream":true"#);
    let holder = h
        .send(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(holder.status(), StatusCode::OK);
    // One waits (and times out), the next finds the queue full.
    let waiter = {
        let req = h.signed("globex", Method::POST, "/v1/chat/completions", &body);
        let client = h.client.clone();
        tokio::spawn(async move {
            let r = client.request(req).await.unwrap();
            let s = r.status();
            (s, r.into_body().collect().await.unwrap().to_bytes())
        })
    };
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    let (p, b) = h
        .send_collect(h.signed("globex", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&b)["error"]["code"], "queue");
    let (s, b) = waiter.await.unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&b)["error"]["code"], "queue");
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(
        h.metric("bulkhead_rate_limited_total{tenant=\"globex\",limit=\"queue\"}")
            .await,
        Some(2.0)
    );
    // The timeout is a 503, the full queue a 429, in the metrics as on the wire.
    assert_eq!(
        h.metric("bulkhead_requests_total{tenant=\"globex\",code=\"503\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        h.metric("bulkhead_requests_total{tenant=\"globex\",code=\"429\"}")
            .await,
        Some(1.0)
    );
    h.sim.sim.open_gate();
    holder.into_body().collect().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_gets_its_reservation_back() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start_with(
        // 250 tokens: two 106-token requests fit only if the abandoned one was refunded.
        "[tenants.acme]\n[tenants.globex]\ntokens_per_minute = 250\n",
        Default::default(),
        one_slot,
    )
    .await;
    h.sim.sim.close_gate();
    let body = chat("hi", r#","stream":true,"max_tokens":100"#);
    let holder = h
        .send(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(holder.status(), StatusCode::OK);
    // globex queues on a raw connection, then goes away.
    let req = h.signed("globex", Method::POST, "/v1/chat/completions", &body);
    let mut raw = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\n", h.addr);
    for (k, v) in req.headers() {
        raw.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    raw.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    drop(s);
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 0.0)
        .await;
    h.sim.sim.open_gate();
    holder.into_body().collect().await.unwrap();
    // Two reservations at once (neither reconciled yet): 212 of 250 only fit if the
    // abandoned 106 came back.
    h.sim.sim.close_gate();
    let first = h
        .send(h.signed("globex", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = {
        let req = h.signed("globex", Method::POST, "/v1/chat/completions", &body);
        let client = h.client.clone();
        tokio::spawn(async move {
            let r = client.request(req).await.unwrap();
            let status = r.status();
            r.into_body().collect().await.unwrap();
            status
        })
    };
    // Admitted (waiting for the one upstream slot), not refused.
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    h.sim.sim.open_gate();
    first.into_body().collect().await.unwrap();
    assert_eq!(second.await.unwrap(), StatusCode::OK);
    h.shutdown().await;
}
