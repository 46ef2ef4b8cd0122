//! Proxying over real sockets: non-streaming, streaming chunk by chunk, h2c, spoofing,
//! hop-by-hop headers, size and time limits, graceful drain.

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn forwards_chat_models_and_embeddings() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hello world", ""),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    let v = json(&b);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert!(p.headers.contains_key("x-request-id"));
    let (p, b) = h
        .send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(json(&b)["data"][0]["id"], "bulkhead-sim");
    let (p, b) = h
        .send_collect(h.signed(
            "globex",
            Method::POST,
            "/v1/embeddings",
            r#"{"input":"a b c"}"#,
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(json(&b)["usage"]["prompt_tokens"], 3);
    // The upstream saw the tenant header and a request id, and no signature headers.
    let reqs = h.sim.sim.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert!(r.headers.contains_key("x-bulkhead-tenant"));
        assert!(r.headers.contains_key("x-request-id"));
        assert!(!r.headers.contains_key("signature"));
        assert!(!r.headers.contains_key("signature-input"));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn stream_chunks_reach_the_client_before_the_upstream_finishes() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    h.sim.sim.close_gate();
    let resp = h
        .send(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", r#","stream":true"#),
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first token arrives while the simulator holds the rest of the stream.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk in time")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(
        first.starts_with("data: ") && first.contains("tok0"),
        "{first}"
    );
    assert_eq!(h.sim.sim.completed(), 0, "upstream had not finished");
    h.sim.sim.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    assert!(rest.contains("tok15"));
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    // The client did not ask for usage: the extra chunk the sidecar asked for is gone ...
    assert!(!rest.contains("\"usage\""), "{rest}");
    // ... but the upstream was asked for it, and it was charged.
    let up = json(&h.sim.sim.requests()[0].body);
    assert_eq!(up["stream_options"]["include_usage"], true);
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"completion\"}",
        16.0,
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn stream_usage_is_kept_when_the_client_asks() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let body = chat(
        "hi",
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert!(text.contains("\"usage\""), "{text}");
    h.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let r = client
        .request(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&b)["usage"]["completion_tokens"], 16);
    h.shutdown().await;
}

#[tokio::test]
async fn spoofed_headers_and_cache_salt_are_removed() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let body = chat("hi", r#","cache_salt":"victim-salt""#);
    let mut req = h.signed("acme", Method::POST, "/v1/chat/completions", &body);
    // Added after signing: not covered, so it must not reach the upstream.
    req.headers_mut()
        .insert("x-bulkhead-priority", "high".parse().unwrap());
    req.headers_mut()
        .insert("x-bulkhead-tenant-override", "globex".parse().unwrap());
    // Hop-by-hop: named in Connection, must not be forwarded.
    req.headers_mut()
        .insert("connection", "x-hop".parse().unwrap());
    req.headers_mut().insert("x-hop", "1".parse().unwrap());
    req.headers_mut()
        .insert("x-end-to-end", "1".parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    // A covered x-bulkhead-* header is kept.
    let mut req = h.signed("acme", Method::POST, "/v1/chat/completions", &chat("x", ""));
    let uri = req.uri().clone();
    req.headers_mut().remove("signature");
    req.headers_mut().remove("signature-input");
    req.headers_mut().remove("content-digest");
    req.headers_mut()
        .insert("x-bulkhead-priority", "low".parse().unwrap());
    let body = chat("x", "");
    let path: http::Uri = uri.path().parse().unwrap();
    let mut hm = req.headers().clone();
    bulkhead_sidecar::auth::signature::sign_request(
        &Method::POST,
        &path,
        &mut hm,
        body.as_bytes(),
        GW_KEY,
        &bulkhead_sidecar::auth::signature::SignOptions::new("gw", now()),
    )
    .unwrap();
    *req.headers_mut() = hm;
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);

    let reqs = h.sim.sim.requests();
    assert_eq!(reqs.len(), 2);
    let first = &reqs[0];
    assert!(!first.headers.contains_key("x-bulkhead-priority"));
    assert!(!first.headers.contains_key("x-bulkhead-tenant-override"));
    assert!(!first.headers.contains_key("x-hop"));
    assert!(first.headers.contains_key("x-end-to-end"));
    // The client's address is appended to the chain it sent; the second request sent none.
    assert_eq!(first.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(reqs[1].headers["x-forwarded-for"], "127.0.0.1");
    // The sidecar's own request id, never the client's; no trace context a client named.
    assert_eq!(first.headers["x-request-id"].len(), 32);
    assert_eq!(first.headers["x-bulkhead-tenant"], "acme");
    let v = json(&first.body);
    assert!(v.get("cache_salt").is_none(), "{v}");
    // The forwarded Content-Digest matches the rewritten body.
    let cd = first.headers["content-digest"].to_str().unwrap();
    bulkhead_sidecar::auth::digest::verify(cd, &first.body).unwrap();
    assert_eq!(reqs[1].headers["x-bulkhead-priority"], "low");
    h.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_is_refused() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let big = "a ".repeat(40_000);
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat(&big, ""),
        ))
        .await;
    assert_eq!(p.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(&b)["error"]["code"], "body_too_large");
    assert!(h.sim.sim.requests().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the sidecar closes the connection after header_read_timeout.
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("connection closed by the server");
    // header_read_timeout_ms = 300 in the test config.
    assert!(t0.elapsed() >= Duration::from_millis(250));
    // Closed without an answer, as the README says (no 408: the head never arrived).
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty(), "{text}");
    assert!(h.sim.sim.requests().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let big = "x".repeat(100 * 1024);
    let req = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("connection closed by the server");
    // 431 Request Header Fields Too Large, then the connection is closed.
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{text}"
    );
    assert!(h.sim.sim.requests().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams() {
    let mut h = Harness::start(DEFAULT_TENANTS).await;
    let body = h.hold_stream("acme", "hi").await;
    h.trigger_shutdown();
    // Readiness drops while draining.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let uri: http::Uri = format!("http://{}/readyz", h.admin).parse().unwrap();
        let r = h.client.get(uri).await.unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "never became unready");
        tokio::task::yield_now().await;
    }
    // New connections are refused, the stream in flight completes.
    assert!(tokio::net::TcpStream::connect(h.addr).await.is_err());
    h.sim.sim.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    let task = h.sidecar.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("run returns after draining")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unknown_routes_are_404_and_not_forwarded() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let (p, _) = h
        .send_collect(h.signed("acme", Method::GET, "/admin", ""))
        .await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert!(h.sim.sim.requests().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_connections_are_never_shared_between_tenants() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let req = h.signed(
            tenant,
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        );
        let client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.request(req).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.into_body().collect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut owner = std::collections::HashMap::new();
    let reqs = h.sim.sim.requests();
    assert_eq!(reqs.len(), 24);
    for r in &reqs {
        let tenant = r.headers["x-bulkhead-tenant"].to_str().unwrap().to_string();
        let peer = r.peer.unwrap();
        let prev = owner.entry(peer).or_insert_with(|| tenant.clone());
        assert_eq!(*prev, tenant, "connection {peer} carried two tenants");
    }
    // Keep-alive reuse happens (fewer connections than requests overall is not guaranteed
    // under concurrency, but sequential requests of one tenant reuse one connection).
    let before: std::collections::HashSet<_> = reqs.iter().map(|r| r.peer).collect();
    for _ in 0..3 {
        let (p, _) = h
            .send_collect(h.signed(
                "acme",
                Method::POST,
                "/v1/chat/completions",
                &chat("hi", ""),
            ))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let reqs = h.sim.sim.requests();
    let new_peers: std::collections::HashSet<_> = reqs[24..]
        .iter()
        .map(|r| r.peer)
        .filter(|p| !before.contains(p))
        .collect();
    assert!(
        new_peers.len() <= 1,
        "sequential requests opened {new_peers:?}"
    );
    for r in &reqs[24..] {
        assert_eq!(
            owner
                .get(&r.peer.unwrap())
                .map(String::as_str)
                .unwrap_or("acme"),
            "acme"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_refunds_the_reservation() {
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let h = Harness::start_with(
        // 250 tokens: without refunds the third 106-token reservation would be refused (429).
        "[tenants.acme]\ntokens_per_minute = 250\n[tenants.globex]\n",
        Default::default(),
        |t| {
            let start = t.find("url = \"").unwrap() + 7;
            let end = start + t[start..].find('"').unwrap();
            t.replace_range(start..end, &url);
        },
    )
    .await;
    let body = chat("hi", r#","max_tokens":100"#);
    for _ in 0..3 {
        let (p, b) = h
            .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
            .await;
        assert_eq!(p.status, StatusCode::BAD_GATEWAY);
        assert_eq!(json(&b)["error"]["code"], "upstream_unavailable");
    }
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"502\"}", 3.0)
        .await;
    h.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_headers_time_out_with_504() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replace("[listen]", "response_timeout_ms = 200\n[listen]");
    })
    .await;
    let mut req = h.signed(
        "acme",
        Method::POST,
        "/v1/chat/completions",
        &chat("hi", ""),
    );
    // The simulator waits 30 s before answering a non-streaming request.
    req.headers_mut()
        .insert("x-sim-ttft-ms", "30000".parse().unwrap());
    let t0 = Instant::now();
    let (p, b) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&b)["error"]["code"], "upstream_timeout");
    assert!(t0.elapsed() < Duration::from_secs(10));
    h.wait_metric("bulkhead_inflight_requests{tenant=\"acme\"}", 0.0)
        .await;
    h.shutdown().await;
}
