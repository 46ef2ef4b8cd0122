//! `cargo xtask bench sidecar --scan` (`cargo run --release -p bulkhead-sidecar --example
//! bench_scan`): what leak scanning costs per KiB of prompt and of streamed
//! response, with 10 and with 1,000 canaries and keywords (plus the default injection
//! markers), against a pass over the same bytes that finds nothing (the floor); and the
//! response scan as the meter runs it: SSE events of 24 bytes of text each, one choice and two
//! interleaved, scanned per (choice, field), against parsing each event and scanning its
//! content in one stream (the earlier meter's work); a buffered answer, raw and decoded.

use bulkhead_sidecar::Config;
use bulkhead_sidecar::record::leaks::{LeakPatterns, ResponseScan, StreamScan, Where};
use std::time::{Duration, Instant};

fn patterns(n: usize) -> LeakPatterns {
    let per = n.div_ceil(10);
    let mut text = String::from("[upstream]\nurl = \"http://127.0.0.1:1\"\n");
    for t in 0..10 {
        text.push_str(&format!("[tenants.t{t}]\ncanaries = ["));
        let list: Vec<String> = (0..per)
            .map(|i| format!("\"CANARY-t{t}-{i:06}-9f3e\""))
            .collect();
        text.push_str(&list.join(","));
        text.push_str("]\n");
    }
    text.push_str("[[keys]]\nid = \"gw\"\nsecret_files = [\"/x\"]\ntenants = [\"*\"]\n");
    LeakPatterns::new(&Config::from_toml(&text).expect("bench config"))
}

/// English-like text with no pattern in it.
fn corpus(bytes: usize) -> Vec<u8> {
    let words = [
        "the",
        "model",
        "answers",
        "questions",
        "about",
        "quarterly",
        "revenue",
        "and",
        "cost",
        "of",
        "inference",
        "per",
        "tenant",
        "with",
        "tokens",
        "cached",
        "prefix",
    ];
    let mut out = Vec::with_capacity(bytes);
    let mut i = 0usize;
    while out.len() < bytes {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        out.push(b' ');
        i += 1;
    }
    out.truncate(bytes);
    out
}

fn per_kib(total: Duration, rounds: u32, bytes: usize) -> f64 {
    total.as_secs_f64() * 1e9 / f64::from(rounds) / (bytes as f64 / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let text = corpus(32 * 1024);
    let rounds = 2000u32;
    println!(
        "bench_scan: {} KiB of text, {rounds} rounds each, median of 5; patterns = \
         canaries over 10 tenants + 12 default injection markers",
        text.len() / 1024
    );
    let floor = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let mut n = 0u64;
            for _ in 0..rounds {
                n += std::hint::black_box(&text)
                    .iter()
                    .filter(|b| **b == b'~')
                    .count() as u64;
            }
            std::hint::black_box(n);
            v.push(per_kib(t0.elapsed(), rounds, text.len()));
        }
        v.sort_by(f64::total_cmp);
        v[2]
    };
    println!("floor (one pass counting a byte): {floor:.0} ns/KiB");
    for n in [10usize, 1000] {
        let p = patterns(n);
        let mut prompt = Vec::new();
        let mut stream = Vec::new();
        for _ in 0..5 {
            let mut hits = Vec::new();
            let t0 = Instant::now();
            for _ in 0..rounds {
                p.scan("t0", std::hint::black_box(&text), Where::Prompt, &mut hits);
            }
            prompt.push(per_kib(t0.elapsed(), rounds, text.len()));
            assert!(hits.is_empty());
            let t0 = Instant::now();
            for _ in 0..rounds / 4 {
                let mut s = StreamScan::default();
                for piece in text.chunks(24) {
                    s.feed(&p, "t0", piece, &mut hits);
                }
            }
            stream.push(per_kib(t0.elapsed(), rounds / 4, text.len()));
        }
        prompt.sort_by(f64::total_cmp);
        stream.sort_by(f64::total_cmp);
        println!(
            "{n:>5} canaries: prompt scan {:.0} ns/KiB, streamed in 24-byte pieces {:.0} ns/KiB",
            prompt[2], stream[2]
        );
        responses(&p, &text, rounds / 8);
    }
    Ok(())
}

/// One chat completion chunk carrying `piece` in choice `index`.
fn event(index: usize, piece: &[u8]) -> Vec<u8> {
    let v = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": index, "delta": {"content": String::from_utf8_lossy(piece)}, "finish_reason": null}]
    });
    format!("data: {v}").into_bytes()
}

fn median5(mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..5).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

/// The response scan per KiB of text a client reads.
fn responses(p: &LeakPatterns, text: &[u8], rounds: u32) {
    let one: Vec<Vec<u8>> = text.chunks(24).map(|c| event(0, c)).collect();
    let two: Vec<Vec<u8>> = text
        .chunks(24)
        .enumerate()
        .map(|(i, c)| event(i % 2, c))
        .collect();
    let per_event = |events: &[Vec<u8>]| {
        median5(|| {
            let mut hits = Vec::new();
            let t0 = Instant::now();
            for _ in 0..rounds {
                let mut s = ResponseScan::default();
                for e in events {
                    s.event(p, "t0", std::hint::black_box(e), &mut hits);
                }
            }
            assert!(hits.is_empty());
            per_kib(t0.elapsed(), rounds, text.len())
        })
    };
    // The earlier meter: each event parsed, its content fed to one stream scanner.
    let one_stream = median5(|| {
        let mut hits = Vec::new();
        let t0 = Instant::now();
        for _ in 0..rounds {
            let mut s = StreamScan::default();
            for e in &one {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::hint::black_box(e)[6..]).expect("event");
                if let Some(c) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(|c| c.as_str())
                {
                    s.feed(p, "t0", c.as_bytes(), &mut hits);
                }
            }
        }
        per_kib(t0.elapsed(), rounds, text.len())
    });
    let answer = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": String::from_utf8_lossy(text)}}]
    })
    .to_string()
    .into_bytes();
    let body = median5(|| {
        let mut hits = Vec::new();
        let t0 = Instant::now();
        for _ in 0..rounds {
            let mut s = ResponseScan::default();
            for piece in answer.chunks(16 * 1024) {
                s.body(p, "t0", std::hint::black_box(piece), &mut hits);
            }
        }
        per_kib(t0.elapsed(), rounds, text.len())
    });
    println!(
        "        SSE events of 24 bytes: per (choice, field) {:.0} ns/KiB, two interleaved choices \
         {:.0} ns/KiB; one stream of the parsed content (earlier meter) {:.0} ns/KiB; a \
         buffered answer, raw and decoded {:.0} ns/KiB",
        per_event(&one),
        per_event(&two),
        one_stream,
        body
    );
}
