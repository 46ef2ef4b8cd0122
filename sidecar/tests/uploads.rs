//! A client holding no key cannot make the sidecar buffer bodies, and one holding a key cannot
//! exhaust its memory with uploads: the signature is checked from the headers before any body
//! byte is read, bodies must arrive within `http.body_read_timeout_ms` (408), and all bodies in
//! memory together stay under `http.max_inflight_body_bytes` (503 beyond). One test per
//! binary, since it measures the process's peak memory.

mod common;
use common::*;
use http::Method;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UPLOADS: usize = 64;
const BODY: usize = 8 * 1024 * 1024;

/// Peak resident memory of this process since the last reset, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

fn reset_peak_rss() {
    // Linux >= 4.0: writing 5 resets VmHWM to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// The signed head of a POST of `body` to `path` as `tenant` (headers only: 64 copies of an
/// 8 MiB body would themselves be the memory this test measures).
fn signed_head(tenant: &str, path: &str, body: &[u8]) -> http::HeaderMap {
    signed_headers(tenant, &Method::POST, path, body, "gw", GW_KEY, |_| {})
}

/// Open a connection, send a head declaring an 8 MiB body, then `send` bytes of it; the
/// status code the sidecar answers with (it may answer before the body is finished).
async fn upload(addr: std::net::SocketAddr, headers: http::HeaderMap, send: usize) -> u16 {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head =
        format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = async move {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < send {
            if wr.write_all(&chunk).await.is_err() {
                return None;
            }
            sent += chunk.len();
        }
        // Stall: keep the connection open until the answer came.
        Some(wr)
    };
    let reader = async move {
        let mut status = [0u8; 12];
        rd.read_exact(&mut status).await.map(|_| {
            String::from_utf8_lossy(&status[9..12])
                .parse::<u16>()
                .unwrap()
        })
    };
    let (_wr, code) = tokio::join!(writer, reader);
    code.expect("an answer before the connection closed")
}

/// Run `n` uploads at once; their status codes.
async fn uploads(
    h: &Harness,
    heads: impl Iterator<Item = http::HeaderMap>,
    send: usize,
) -> Vec<u16> {
    let tasks: Vec<_> = heads
        .map(|hd| tokio::spawn(upload(h.addr, hd, send)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn healthz(h: &Harness) -> bool {
    let uri: http::Uri = format!("http://{}/healthz", h.admin).parse().unwrap();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), h.client.get(uri)).await,
        Ok(Ok(r)) if r.status() == http::StatusCode::OK
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_cannot_exhaust_memory() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replacen(
            "max_body_bytes = 65536",
            "max_body_bytes = 8388608\nmax_inflight_body_bytes = 33554432\nbody_read_timeout_ms = 1000",
            1,
        );
    })
    .await;

    // 1. No key: 64 uploads of 8 MiB with a forged signature are answered 401 from their
    // headers; their bodies are never buffered (512 MiB if they were).
    reset_peak_rss();
    let base = peak_rss();
    let body = vec![b' '; BODY];
    let forged = (0..UPLOADS).map(|_| {
        let mut hd = signed_head("acme", "/v1/completions", &body);
        let sig = hd["signature"].to_str().unwrap().replacen(':', ":AAAA", 1);
        hd.insert("signature", sig.parse().unwrap());
        hd
    });
    let codes = tokio::time::timeout(Duration::from_secs(20), uploads(&h, forged, BODY))
        .await
        .expect("every forged upload was answered");
    assert!(codes.iter().all(|c| *c == 401), "{codes:?}");
    let grew = peak_rss().saturating_sub(base);
    assert!(grew < 64 << 20, "peak RSS grew by {} MiB", grew >> 20);
    assert!(h.sim.sim.requests().is_empty());

    // 2. A key holder's 64 stalled uploads (1 MiB of 8 MiB sent): as many as fit in
    // max_inflight_body_bytes (32 MiB: 4) wait and get 408 after the body timeout; the rest
    // 503 at once. Memory stays bounded and /healthz answers throughout.
    reset_peak_rss();
    let base = peak_rss();
    let t0 = Instant::now();
    let stalled: Vec<_> = (0..UPLOADS)
        .map(|_| signed_head("acme", "/v1/completions", &body))
        .collect();
    let (c, healthy) = tokio::join!(
        async {
            tokio::time::timeout(
                Duration::from_secs(20),
                uploads(&h, stalled.into_iter(), 1024 * 1024),
            )
            .await
            .expect("every stalled upload was answered")
        },
        async {
            // Once the budget is taken by stalled uploads (32 MiB), the admin port answers.
            h.wait_metric("bulkhead_inflight_body_bytes", (32 << 20) as f64)
                .await;
            healthz(&h).await
        }
    );
    assert!(healthy, "/healthz answered while uploads stalled");
    assert_eq!(c.iter().filter(|x| **x == 408).count(), 4, "{c:?}");
    assert_eq!(
        c.iter().filter(|x| **x == 503).count(),
        UPLOADS - 4,
        "{c:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let grew = peak_rss().saturating_sub(base);
    // The sidecar holds at most 32 MiB of bodies (64 MiB if it buffered every first MiB).
    assert!(grew < 56 << 20, "peak RSS grew by {} MiB", grew >> 20);
    assert_eq!(
        h.metric("bulkhead_inflight_body_bytes").await,
        Some(0.0),
        "every body reservation was released"
    );
    assert!(h.sim.sim.requests().is_empty());
    h.shutdown().await;
}
