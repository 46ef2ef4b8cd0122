//! Connection-level resource limits over real sockets: `http.max_connections` (connections
//! beyond it are closed at once and counted; the admin listener is unaffected) and
//! `http.max_concurrent_streams` (advertised in the HTTP/2 SETTINGS; a client gets that many
//! streams in flight on one connection, the rest wait).

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test config with `lines` added to `[http]`, and idle keep-alive connections kept open
/// (the test's 300 ms header timeout would close them).
fn http_tweak(lines: &'static str) -> impl FnOnce(&mut String) {
    move |t: &mut String| {
        *t = t.replace(
            "header_read_timeout_ms = 300",
            &format!("header_read_timeout_ms = 60000\n{lines}"),
        );
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let h = Harness::start_with(
        DEFAULT_TENANTS,
        Default::default(),
        http_tweak("max_connections = 4"),
    )
    .await;
    let models = || h.signed("acme", Method::GET, "/v1/models", "");
    // Four keep-alive connections, served and held open.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = H1Conn::open(h.addr).await;
        let (p, _) = c.request(models()).await.unwrap();
        assert_eq!(p.status, StatusCode::OK);
        held.push(c);
    }
    h.wait_metric("bulkhead_client_connections", 4.0).await;
    // A fifth is accepted and closed by the sidecar without a byte.
    let mut fifth = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), fifth.read(&mut buf)).await {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the fifth connection was not closed: {other:?}"),
    }
    h.wait_metric("bulkhead_client_connections_refused_total", 1.0)
        .await;
    assert_eq!(h.metric("bulkhead_client_connections").await, Some(4.0));
    // The admin listener still answers, and the held connections are still served.
    let health: http::Uri = format!("http://{}/healthz", h.admin).parse().unwrap();
    assert_eq!(h.client.get(health).await.unwrap().status(), StatusCode::OK);
    let (p, _) = held[0].request(models()).await.unwrap();
    assert_eq!(p.status, StatusCode::OK);
    // One of the four closes: a new connection is served (retried until the sidecar has seen
    // the close; each refused try is counted).
    held.pop().unwrap().close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        let mut c = H1Conn::open(h.addr).await;
        match c.request(models()).await {
            Ok((p, _)) => {
                assert_eq!(p.status, StatusCode::OK);
                break c;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no connection served after one of four closed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let (p, _) = fresh.request(models()).await.unwrap();
    assert_eq!(p.status, StatusCode::OK);
    h.wait_metric("bulkhead_client_connections", 4.0).await;
    fresh.close().await;
    for c in held {
        c.close().await;
    }
    h.shutdown().await;
}

/// Read frames until the server's own (non-ACK) SETTINGS frame; its parameters as (id, value).
async fn server_settings(s: &mut tokio::net::TcpStream) -> Vec<(u16, u32)> {
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        // Type 0x4 SETTINGS, without the ACK flag (0x1).
        if head[3] == 0x4 && head[4] & 0x1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|e| {
                    (
                        u16::from_be_bytes([e[0], e[1]]),
                        u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                    )
                })
                .collect();
        }
    }
}

#[tokio::test]
async fn h2_streams_per_connection_are_capped() {
    let h = Harness::start_with(
        DEFAULT_TENANTS,
        Default::default(),
        http_tweak("max_concurrent_streams = 2"),
    )
    .await;
    // The server's SETTINGS advertise SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 2.
    let mut raw = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let settings = tokio::time::timeout(Duration::from_secs(10), server_settings(&mut raw))
        .await
        .expect("no SETTINGS from the server");
    assert_eq!(
        settings.iter().find(|(id, _)| *id == 0x3).map(|(_, v)| *v),
        Some(2),
        "{settings:?}"
    );
    drop(raw);

    // One h2c connection: a first request, so the client has the server's settings.
    let s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut first = send.clone();
    first.ready().await.unwrap();
    let r = first
        .send_request(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);
    r.into_body().collect().await.unwrap();

    // Four streams at once, each held open at the simulator after its first token.
    h.sim.sim.close_gate();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut send = send.clone();
        let tx = tx.clone();
        let req: http::Request<Full<Bytes>> = h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat(&format!("stream {i}"), r#","stream":true"#),
        );
        tasks.push(tokio::spawn(async move {
            send.ready().await.unwrap();
            let r = send.send_request(req).await.unwrap();
            let status = r.status();
            let mut body = r.into_body();
            body.frame().await.unwrap().unwrap();
            tx.send(i).unwrap();
            while let Some(f) = body.frame().await {
                f.unwrap();
            }
            status
        }));
    }
    drop(tx);
    // Two reach the upstream and stream...
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut streaming = Vec::new();
    while streaming.len() < 2 {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(i)) => streaming.push(i),
            other => panic!("two streams never started: {other:?}"),
        }
    }
    // ...and while both are held, the other two wait: they cannot start until one ends.
    assert_eq!(h.sim.sim.running(), 2);
    assert_eq!(h.sim.sim.started(), 3, "the first request and two streams");
    assert!(rx.try_recv().is_err(), "a third stream started");
    assert_eq!(h.metric("bulkhead_client_connections").await, Some(1.0));
    // Released, all four complete on the one connection.
    h.sim.sim.open_gate();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(h.sim.sim.started(), 5);
    drop((send, first));
    h.shutdown().await;
}

/// Read until the sidecar closes the connection; the bytes it sent (panics after 10 s).
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the connection was never closed (got {} bytes)", out.len()),
        }
    }
}

/// A client holding no key cannot hold connections by sending nothing, half an HTTP/2
/// preface, or an HTTP/2 handshake and no request: each is closed once it has started no
/// request within `http.header_read_timeout_ms` (old: held open for ever, which with
/// `max_connections` would shut every tenant out).
#[tokio::test]
async fn connections_that_start_no_request_are_closed() {
    let h = Harness::start(DEFAULT_TENANTS).await; // header_read_timeout_ms = 300
    let mut silent = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut h2 = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    assert!(read_until_closed(&mut silent).await.is_empty());
    read_until_closed(&mut half).await;
    // The HTTP/2 connection is told to go away (a GOAWAY frame, type 7) before it closes.
    let frames = read_until_closed(&mut h2).await;
    let mut types = Vec::new();
    let mut i = 0;
    while i + 9 <= frames.len() {
        let len = u32::from_be_bytes([0, frames[i], frames[i + 1], frames[i + 2]]) as usize;
        types.push(frames[i + 3]);
        i += 9 + len;
    }
    assert!(types.contains(&7), "frame types {types:?}");
    h.wait_metric("bulkhead_client_connections", 0.0).await;
    // A connection that does send a request is served as before.
    let (p, _) = h
        .send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;
}
