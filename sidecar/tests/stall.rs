//! A client that stops reading its response must not hold what its request holds: the fair
//! queue's slot, the exclusive tenant's cache window, its tokens. Its response is cut after
//! `http.response_write_idle_timeout_ms`, the upstream request cancelled, and other tenants
//! go on. (Before, such a client held the exclusive window, and with it every other tenant,
//! for as long as it kept the connection open.)

mod common;
use bulkhead_sim::SimConfig;
use common::*;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE_IDLE_MS: u64 = 300;

/// Send `req` over a raw connection whose receive buffer is tiny, read the status line, and
/// never read again.
async fn stalled_client(
    h: &Harness,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> tokio::net::TcpStream {
    use http_body_util::BodyExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let mut s = sock.connect(h.addr).await.unwrap();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
        parts.method,
        parts.uri.path(),
        h.addr,
        body.len()
    );
    for (k, v) in &parts.headers {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    s
}

#[tokio::test]
async fn a_client_that_stops_reading_cannot_hold_other_tenants() {
    let sim = SimConfig {
        completion_tokens: 1_000_000,
        ..SimConfig::default()
    };
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\n";
    let h = Harness::start_with(tenants, sim, |t| {
        *t = t
            .replacen("[upstream]\n", "[upstream]\nflavor = \"vllm\"\n", 1)
            .replacen("max_inflight = 64", "max_inflight = 1", 1)
            .replacen("timeout_ms = 5000", "timeout_ms = 30000", 1)
            .replacen(
                "[http]\n",
                &format!("[http]\nresponse_write_idle_timeout_ms = {WRITE_IDLE_MS}\n"),
                1,
            );
        t.push_str("\n[cache]\nexclusive_window_ms = 100\nexclusive_drain_timeout_ms = 20000\n");
    })
    .await;
    // acme (exclusive) streams a long answer to a client that stops reading. It holds the
    // only upstream slot and its exclusive window.
    let stalled = stalled_client(
        &h,
        h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat(
                "tell me everything",
                r#","stream":true,"max_tokens":1000000"#,
            ),
        ),
    )
    .await;
    // globex waits behind it, and gets its answer once the stalled response is cut.
    let t0 = Instant::now();
    let (p, b) = h
        .send_collect(h.signed(
            "globex",
            Method::POST,
            "/v1/chat/completions",
            &chat("hi", ""),
        ))
        .await;
    let waited = t0.elapsed();
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    // Bounded by the time the stalled client's socket buffers take to fill (CPU-bound: ~1.5 s
    // on a quiet machine, 5-7 s on a loaded one), the write-idle timeout and the window's
    // close (flushes against the simulator are immediate): below the 20 s drain bound and the
    // 30 s queue timeout that would apply if the stalled response were never cut.
    assert!(
        waited < Duration::from_millis(WRITE_IDLE_MS) + Duration::from_secs(15),
        "globex waited {waited:?}"
    );
    assert_eq!(
        h.metric(r#"bulkhead_response_write_timeouts_total{tenant="acme"}"#)
            .await,
        Some(1.0)
    );
    // The cut stream was charged what it was sent, and the upstream stopped generating.
    let charged = h
        .metric(r#"bulkhead_tokens_total{tenant="acme",kind="completion"}"#)
        .await
        .unwrap();
    assert!(charged > 0.0 && charged < 1_000_000.0, "{charged}");
    assert!(
        h.sim.sim.completed() <= 1,
        "the stalled stream never completed"
    );
    drop(stalled);
    let dir = h.shutdown_keep_dir().await;
    let audit = std::fs::read_to_string(dir.path().join("audit/acme.jsonl")).unwrap();
    assert!(
        audit.contains(r#""reason":"response_write_timeout""#),
        "{audit}"
    );
}
