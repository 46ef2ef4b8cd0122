//! An upstream that splits SSE events at awkward places (mid-line, mid-JSON, CRLF endings):
//! the sidecar still forwards every content event, drops only the usage chunk it asked for,
//! and charges the usage.

mod common;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn fake_upstream(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        s.set_nodelay(true).unwrap();
        tokio::spawn(async move {
            // Read one request (headers and a Content-Length body).
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let header_end = loop {
                let n = s.read(&mut tmp).await.unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < header_end + len {
                let n = s.read(&mut tmp).await.unwrap();
                buf.extend_from_slice(&tmp[..n]);
            }
            let body: serde_json::Value = serde_json::from_slice(&buf[header_end..]).unwrap();
            if body["messages"][0]["content"] == "two-mebibytes" {
                // A non-streamed answer of over 2 MiB in chunks (no length), another tenant's
                // canary at its end.
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                let text = format!(
                    r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}the secret is CANARY-acme-7f3a9c5e"}}}}]}}"#,
                    "a".repeat(2 << 20)
                );
                for piece in text.as_bytes().chunks(64 * 1024) {
                    let chunk =
                        [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    // The sidecar hangs up once it has cut the answer.
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
                let _ = s.shutdown().await;
                return;
            }
            if body["messages"][0]["content"] == "two-frames" {
                // A non-streamed answer in two chunks, another tenant's canary in the second.
                let pieces = [
                    r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"#,
                    r#""the secret is CANARY-acme-7f3a9c5e"}}]}"#,
                ];
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                for piece in pieces {
                    s.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())
                        .await
                        .unwrap();
                    s.flush().await.unwrap();
                }
                s.write_all(b"0\r\n\r\n").await.unwrap();
                let _ = s.shutdown().await;
                return;
            }
            assert_eq!(body["stream_options"]["include_usage"], true);
            // An upstream that sends no usage, names its model in the first event only, sends
            // an event whose data is empty (no content: not charged), and ends without the
            // last event's blank line.
            let no_usage = concat!(
                "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"A\"}}]}\n\n",
                "data:\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"B\"}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"C\"}}]}",
            );
            let events = if body["messages"][0]["content"] == "no-usage" {
                no_usage
            } else {
                concat!(
                    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"A\"}}]}\r\n\r\n",
                    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"B\"}}]}\n\n",
                    ": a comment line\n\n",
                    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
                    "data: [DONE]\n\n",
                )
            };
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            // Chunks of 7 bytes: every event is split, several mid-JSON.
            for piece in events.as_bytes().chunks(7) {
                s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(piece).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
                s.flush().await.unwrap();
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
            let _ = s.shutdown().await;
        });
    }
}

/// A sidecar with `tenants` (and `extra` configuration) in front of a fresh fake upstream.
async fn behind_fake_upstream(tenants: &str, extra: &str) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fake_upstream(listener));
    Harness::start_with(tenants, Default::default(), |t| {
        let start = t.find("url = \"").unwrap() + 7;
        let end = start + t[start..].find('"').unwrap();
        t.replace_range(start..end, &up);
        t.push_str(extra);
    })
    .await
}

/// Acme's streamed chat with `prompt` (which picks the fake upstream's script): answered 200,
/// the whole text it got.
async fn acme_stream(h: &Harness, prompt: &str) -> String {
    let r = h
        .send(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat(prompt, r#","stream":true"#),
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn split_events_are_reassembled_and_usage_is_stripped_and_charged() {
    let h = behind_fake_upstream(DEFAULT_TENANTS, "").await;
    let text = acme_stream(&h, "hi").await;
    assert!(
        text.contains("\"content\":\"A\"") && text.contains("\"content\":\"B\""),
        "{text}"
    );
    assert!(text.contains(": a comment line"));
    assert!(text.contains("finish_reason"));
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"prompt\"}",
        7.0,
    )
    .await;
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"completion\"}",
        2.0,
    )
    .await;
    h.shutdown().await;
}

/// Without usage from the upstream, a stream is charged the content events it forwarded, the
/// last one included even without its blank line; its time to first token is recorded.
#[tokio::test]
async fn a_stream_without_usage_is_charged_its_content_events() {
    let h = behind_fake_upstream(DEFAULT_TENANTS, "").await;
    let text = acme_stream(&h, "no-usage").await;
    for c in ["A", "B", "C"] {
        assert!(
            text.contains(&format!("\"content\":\"{c}\"")),
            "{c}: {text}"
        );
    }
    h.wait_metric(
        "bulkhead_tokens_total{tenant=\"acme\",kind=\"completion\"}",
        3.0,
    )
    .await;
    h.wait_metric(
        "bulkhead_time_to_first_token_seconds_count{tenant=\"acme\"}",
        1.0,
    )
    .await;
    h.shutdown().await;
}

/// A non-streamed answer too large to buffer (chunked: no length) goes out as it is scanned;
/// another tenant's canary past the first MiB cuts it, in block mode, and the client sees the
/// body break off with an error, never a clean end that would pass for the whole answer.
#[tokio::test]
async fn a_chunked_answer_cut_for_a_canary_ends_in_an_error() {
    let tenants = "[tenants.acme]\ncanaries = [\"CANARY-acme-7f3a9c5e\"]\n[tenants.globex]\n";
    let h = behind_fake_upstream(tenants, "\n[leaks]\non_canary = \"block\"\n").await;
    let r = h
        .send(h.signed(
            "globex",
            Method::POST,
            "/v1/chat/completions",
            &chat("two-mebibytes", ""),
        ))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the head went out with the first MiB"
    );
    let (got, broke) = read_to_end_or_error(r.into_body()).await;
    assert!(
        broke,
        "the body ends in an error ({} bytes came)",
        got.len()
    );
    assert!(
        got.len() > 1 << 20,
        "the first MiB and more went out ({})",
        got.len()
    );
    assert!(!String::from_utf8_lossy(&got).contains("CANARY-acme"));
    h.shutdown().await;
}

/// A non-streamed answer is read whole before any byte is sent, whatever frames it comes in:
/// another tenant's canary in its second frame withholds it all (502), in block mode.
#[tokio::test]
async fn a_buffered_answer_in_several_frames_is_withheld_whole() {
    let tenants = "[tenants.acme]\ncanaries = [\"CANARY-acme-7f3a9c5e\"]\n[tenants.globex]\n";
    let h = behind_fake_upstream(tenants, "\n[leaks]\non_canary = \"block\"\n").await;
    let (p, b) = h
        .send_collect(h.signed(
            "globex",
            Method::POST,
            "/v1/chat/completions",
            &chat("two-frames", ""),
        ))
        .await;
    assert_eq!(
        p.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(!String::from_utf8_lossy(&b).contains("the secret"));
    h.shutdown().await;
}
