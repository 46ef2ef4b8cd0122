//! bulkhead-sim: a simulated OpenAI-compatible inference server for tests, the demo and
//! benchmarks; none of it is part of the production sidecar. Streaming and non-streaming
//! chat/completions, embeddings and models, with configurable time to first token,
//! inter-token latency and length; returns `usage`.
//!
//! Binaries: `bulkhead-sim` (the simulator on its own) and `bulkhead-bench` (the sidecar
//! benchmark, run by `cargo xtask bench sidecar`).
//!
//! Requests are handled by [`Sim::handle`]; [`SimHandle::start`] runs the simulator in the
//! background of the current runtime on 127.0.0.1:0, [`serve`] on a listener of your own.
//!
//! Prefix cache: the prompt's words are hashed in blocks of `prefix_block_words`, chained like
//! vLLM's block hashes, with `cache_salt` folded into the first block; the longest cached
//! prefix of full blocks costs `cached_prefill_per_block` each, the rest `prefill_per_block`
//! each (added to the time to first token). Each response says `x-sim-prefix-cache: hit`
//! (every full block cached), `partial` or `miss`, and `x-sim-cached-blocks: N`.
//! `POST /reset_prefix_cache` (vLLM: `{"success": false}` while requests run, or a 503 with
//! `reset_busy_status = 503`; `{"success": true}` when idle) and `POST /flush_cache` (SGLang:
//! 400 "Cache not flushed because there are pending requests" while busy) empty it.
#![forbid(unsafe_code)]

use bulkhead_sidecar::http_util::{ProxyBody, full, json_error};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: String,
    pub time_to_first_token: Duration,
    pub inter_token_latency: Duration,
    /// Completion length when the request's `max_tokens` does not ask for fewer.
    pub completion_tokens: u64,
    /// Requests remembered for inspection (tests).
    pub record_requests: usize,
    /// Model a prefix cache.
    pub prefix_cache: bool,
    /// Words per cache block.
    pub prefix_block_words: usize,
    /// Prefill time per block not in the cache.
    pub prefill_per_block: Duration,
    /// Prefill time per block found in the cache.
    pub cached_prefill_per_block: Duration,
    /// Status of a refused `/reset_prefix_cache`: 200 (body `{"success": false}`) or 503.
    pub reset_busy_status: u16,
    /// Blocks kept at most (the cache is emptied when full).
    pub cache_capacity_blocks: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "bulkhead-sim".into(),
            time_to_first_token: Duration::from_millis(0),
            inter_token_latency: Duration::from_millis(0),
            completion_tokens: 16,
            record_requests: 256,
            prefix_cache: true,
            prefix_block_words: 16,
            prefill_per_block: Duration::ZERO,
            cached_prefill_per_block: Duration::ZERO,
            reset_busy_status: 200,
            cache_capacity_blocks: 1 << 20,
        }
    }
}

/// A request as the simulator received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The client's address (the sidecar's upstream connection).
    pub peer: Option<SocketAddr>,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The parsed request fields the simulator uses.
#[derive(Debug, Clone, Default)]
pub struct SimRequest {
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub prompt_tokens: u64,
    pub cache_salt: Option<String>,
    /// The prompt's words (message contents and `prompt`), for the prefix cache.
    pub prompt_words: Vec<String>,
}

impl SimRequest {
    pub fn parse(v: &serde_json::Value) -> Self {
        let text_tokens = |v: &serde_json::Value| -> u64 {
            match v {
                serde_json::Value::String(s) => s.split_whitespace().count() as u64,
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| match x {
                        serde_json::Value::String(s) => s.split_whitespace().count() as u64,
                        serde_json::Value::Object(o) => o
                            .get("text")
                            .and_then(|t| t.as_str())
                            .map_or(0, |s| s.split_whitespace().count() as u64),
                        _ => 1,
                    })
                    .sum(),
                _ => 0,
            }
        };
        let mut words = Vec::new();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::String(s) => {
                    out.extend(s.split_whitespace().map(str::to_string))
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
                serde_json::Value::Object(o) => {
                    if let Some(t) = o.get("text") {
                        collect(t, out)
                    }
                }
                _ => {}
            }
        }
        let mut prompt_tokens = 0;
        if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            for m in msgs {
                prompt_tokens += 4 + m.get("content").map_or(0, text_tokens);
                if let Some(role) = m.get("role").and_then(|r| r.as_str()) {
                    words.push(format!("<{role}>"));
                }
                if let Some(c) = m.get("content") {
                    collect(c, &mut words);
                }
            }
        }
        if let Some(p) = v.get("prompt") {
            collect(p, &mut words);
        }
        if let Some(p) = v.get("prompt") {
            prompt_tokens += text_tokens(p);
        }
        if let Some(p) = v.get("input") {
            prompt_tokens += text_tokens(p);
        }
        Self {
            stream: v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false),
            include_usage: v
                .pointer("/stream_options/include_usage")
                .and_then(|s| s.as_bool())
                .unwrap_or(false),
            max_tokens: v
                .get("max_tokens")
                .or_else(|| v.get("max_completion_tokens"))
                .and_then(|m| m.as_u64()),
            prompt_tokens: prompt_tokens.max(1),
            cache_salt: v
                .get("cache_salt")
                .and_then(|s| s.as_str())
                .map(str::to_string),
            prompt_words: words,
        }
    }
}

/// The chained block hashes of `words` (full blocks only), the salt folded into the first.
pub fn block_hashes(salt: Option<&str>, words: &[String], block: usize) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut prev: u64 = 0;
    for (i, chunk) in words.chunks_exact(block.max(1)).enumerate() {
        let mut h = std::hash::DefaultHasher::new();
        if i == 0 {
            salt.hash(&mut h);
        } else {
            prev.hash(&mut h);
        }
        chunk.hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

/// One generation request's prefix-cache lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEvent {
    pub salt: Option<String>,
    /// Full blocks in the prompt.
    pub blocks: usize,
    /// Of those, found in the cache (a prefix).
    pub cached: usize,
}

impl CacheEvent {
    /// `hit` (every full block cached), `partial`, or `miss`.
    pub fn verdict(&self) -> &'static str {
        if self.cached == 0 {
            "miss"
        } else if self.cached == self.blocks {
            "hit"
        } else {
            "partial"
        }
    }
}

/// Counts a generation request as running while alive.
/// One running generation: counted in `running`, and its KV-cache tokens (prompt + generated
/// so far) held in its tenant's [`TenantKv`] until dropped.
struct Running {
    sim: Arc<Sim>,
    tenant: String,
    held: u64,
}

impl Running {
    fn new(sim: Arc<Sim>, tenant: String, prompt: u64) -> Self {
        sim.running.fetch_add(1, Ordering::SeqCst);
        let mut r = Self {
            sim,
            tenant,
            held: 0,
        };
        r.hold(prompt, true);
        r
    }

    /// `n` more tokens in the KV cache (the prompt, or one generated token).
    fn hold(&mut self, n: u64, prompt: bool) {
        let mut kv = self.sim.kv.lock().unwrap_or_else(|e| e.into_inner());
        let t = kv.entry(self.tenant.clone()).or_default();
        t.held += n;
        t.peak = t.peak.max(t.held);
        if prompt {
            t.prompt_tokens += n;
        } else {
            t.completion_tokens += n;
        }
        self.held += n;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sim.running.fetch_sub(1, Ordering::SeqCst);
        let mut kv = self.sim.kv.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = kv.get_mut(&self.tenant) {
            t.held -= self.held;
        }
    }
}

/// The simulator's view of one tenant (by the `x-bulkhead-tenant` header the sidecar sends):
/// KV-cache tokens held by its running generations, their peak, and the tokens served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantKv {
    pub held: u64,
    pub peak: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The simulator's shared state.
pub struct Sim {
    config: SimConfig,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    started: AtomicU64,
    completed: AtomicU64,
    gate: watch::Sender<bool>,
    gated: std::sync::atomic::AtomicBool,
    cache: Mutex<std::collections::HashSet<u64>>,
    cache_events: Mutex<Vec<CacheEvent>>,
    running: AtomicU64,
    refuse_flushes: AtomicU64,
    flushes_ok: AtomicU64,
    flushes_refused: AtomicU64,
    kv: Mutex<std::collections::HashMap<String, TenantKv>>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            recorded: Mutex::new(VecDeque::new()),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            gate: watch::channel(true).0,
            gated: false.into(),
            cache: Mutex::new(Default::default()),
            cache_events: Mutex::new(Vec::new()),
            running: AtomicU64::new(0),
            refuse_flushes: AtomicU64::new(0),
            flushes_ok: AtomicU64::new(0),
            flushes_refused: AtomicU64::new(0),
            kv: Mutex::new(Default::default()),
        })
    }

    /// What this simulator saw of one tenant's KV cache and tokens.
    pub fn tenant_kv(&self, tenant: &str) -> TenantKv {
        self.kv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }

    /// Every generation request's prefix-cache lookup, in order.
    pub fn cache_events(&self) -> Vec<CacheEvent> {
        self.cache_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Generation requests running now (a stream until its last chunk is sent).
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::SeqCst)
    }

    /// Refuse the next `n` flushes even when idle (tests of unsuccessful flushes).
    pub fn refuse_next_flushes(&self, n: u64) {
        self.refuse_flushes.store(n, Ordering::SeqCst);
    }

    /// Flushes done / refused.
    pub fn flushes(&self) -> (u64, u64) {
        (
            self.flushes_ok.load(Ordering::SeqCst),
            self.flushes_refused.load(Ordering::SeqCst),
        )
    }

    /// Blocks in the cache.
    pub fn cached_blocks(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Look up and insert the prompt's blocks; the prefill time they cost.
    fn prefix_lookup(&self, r: &SimRequest) -> (CacheEvent, Duration) {
        let c = &self.config;
        let hashes = block_hashes(
            r.cache_salt.as_deref(),
            &r.prompt_words,
            c.prefix_block_words,
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = if c.prefix_cache {
            hashes.iter().take_while(|h| cache.contains(h)).count()
        } else {
            0
        };
        if c.prefix_cache {
            if cache.len() + hashes.len() > c.cache_capacity_blocks {
                cache.clear();
            }
            cache.extend(hashes.iter().copied());
        }
        drop(cache);
        let ev = CacheEvent {
            salt: r.cache_salt.clone(),
            blocks: hashes.len(),
            cached,
        };
        let prefill = c.cached_prefill_per_block * cached as u32
            + c.prefill_per_block * (hashes.len() - cached) as u32;
        if self.config.record_requests > 0 {
            let mut evs = self.cache_events.lock().unwrap_or_else(|e| e.into_inner());
            if evs.len() >= self.config.record_requests {
                evs.remove(0);
            }
            evs.push(ev.clone());
        }
        (ev, prefill)
    }

    /// vLLM `/reset_prefix_cache` or SGLang `/flush_cache`.
    fn flush(&self, sglang: bool) -> Response<ProxyBody> {
        let forced = self
            .refuse_flushes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let busy = forced || self.running() > 0;
        if busy {
            self.flushes_refused.fetch_add(1, Ordering::SeqCst);
            if sglang {
                let mut r = Response::new(full(
                    "Cache not flushed because there are pending requests. #queue-req: 0, #running-req: 1\n",
                ));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
            let mut r = json(serde_json::json!({"success": false}));
            *r.status_mut() =
                StatusCode::from_u16(self.config.reset_busy_status).unwrap_or(StatusCode::OK);
            return r;
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.flushes_ok.fetch_add(1, Ordering::SeqCst);
        if sglang {
            Response::new(full(
                "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n",
            ))
        } else {
            json(serde_json::json!({"success": true}))
        }
    }

    /// Hold every stream after its first token until [`Sim::open_gate`] (tests).
    pub fn close_gate(&self) {
        self.gated.store(true, Ordering::SeqCst);
        self.gate.send_replace(false);
    }

    pub fn open_gate(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.send_replace(true);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Generation requests started / whose response body was fully produced.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    fn record(&self, r: RecordedRequest) {
        if self.config.record_requests == 0 {
            return;
        }
        let mut q = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.config.record_requests {
            q.pop_front();
        }
        q.push_back(r);
    }

    pub async fn handle(
        self: Arc<Self>,
        peer: Option<SocketAddr>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "body",
                    "unreadable body",
                );
            }
        };
        let path = parts.uri.path().to_string();
        self.record(RecordedRequest {
            peer,
            method: parts.method.clone(),
            path: path.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
        match (parts.method.clone(), path.as_str()) {
            (Method::GET, "/v1/models") => json(serde_json::json!({
                "object": "list",
                "data": [{"id": self.config.model, "object": "model", "owned_by": "bulkhead-sim"}]
            })),
            (Method::GET, "/health") => json(serde_json::json!({"status": "ok"})),
            (Method::POST, "/reset_prefix_cache") => self.flush(false),
            (Method::POST, "/flush_cache") => self.flush(true),
            (Method::POST, "/v1/chat/completions") => {
                self.generate(&parts.headers, &body, true).await
            }
            (Method::POST, "/v1/completions") => self.generate(&parts.headers, &body, false).await,
            (Method::POST, "/v1/embeddings") => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return bad_json();
                };
                let r = SimRequest::parse(&v);
                json(serde_json::json!({
                    "object": "list",
                    "model": self.config.model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
                    "usage": {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens}
                }))
            }
            _ => json_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            ),
        }
    }

    async fn generate(
        self: Arc<Self>,
        headers: &HeaderMap,
        body: &[u8],
        chat: bool,
    ) -> Response<ProxyBody> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return bad_json();
        };
        let r = SimRequest::parse(&v);
        // Per-request timing overrides (benchmarks): `x-sim-ttft-ms`, `x-sim-itl-ms`.
        let ms = |name: &str, default: Duration| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0 && *v <= 60_000.0)
                .map_or(default, |v| Duration::from_secs_f64(v / 1e3))
        };
        let tenant = headers
            .get("x-bulkhead-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut running = Running::new(self.clone(), tenant, r.prompt_tokens);
        let (cache_ev, prefill) = self.prefix_lookup(&r);
        let ttft = ms("x-sim-ttft-ms", self.config.time_to_first_token) + prefill;
        let cache_headers = move |h: &mut HeaderMap| {
            h.insert(
                "x-sim-prefix-cache",
                HeaderValue::from_static(cache_ev.verdict()),
            );
            h.insert("x-sim-cached-blocks", HeaderValue::from(cache_ev.cached));
        };
        let itl = ms("x-sim-itl-ms", self.config.inter_token_latency);
        // `x-sim-reply` (tests): answer this text, streamed in pieces of
        // `x-sim-chunk-bytes` bytes (default 4), instead of "tok0 tok1 ...".
        let reply: Option<Arc<Vec<String>>> = headers
            .get("x-sim-reply")
            .and_then(|v| v.to_str().ok())
            .map(|text| {
                let size = headers
                    .get("x-sim-chunk-bytes")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or(4);
                let bytes: Vec<char> = text.chars().collect();
                Arc::new(
                    bytes
                        .chunks(size)
                        .map(|c| c.iter().collect::<String>())
                        .collect(),
                )
            });
        let out = OutputOptions::from_headers(headers);
        let n = match &reply {
            _ if out.script.is_some() => out.script.as_ref().map_or(0, |s| s.len() as u64),
            Some(pieces) => pieces.len() as u64,
            None => r
                .max_tokens
                .unwrap_or(self.config.completion_tokens)
                .min(self.config.completion_tokens),
        };
        let piece = move |i: u64| match &reply {
            Some(p) => p[i as usize].clone(),
            None => format!("tok{i} "),
        };
        self.started.fetch_add(1, Ordering::SeqCst);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = format!("cmpl-{}", self.started());
        let usage = serde_json::json!({
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": r.prompt_tokens + n
        });
        let model = out
            .served_model
            .clone()
            .unwrap_or_else(|| self.config.model.clone());
        if !r.stream {
            if !ttft.is_zero() {
                tokio::time::sleep(ttft).await;
            }
            if n > 1 && !itl.is_zero() {
                tokio::time::sleep(itl * (n as u32 - 1)).await;
            }
            let text: String = (0..n).map(&piece).collect();
            let choice = if chat {
                serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            } else {
                serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
            };
            running.hold(n, false);
            self.completed.fetch_add(1, Ordering::SeqCst);
            drop(running);
            let choices = match out.whole_choices(chat) {
                Some(c) => c,
                None => vec![choice],
            };
            let mut resp = json_text(out.render(&serde_json::json!({
                "id": id,
                "object": if chat { "chat.completion" } else { "text_completion" },
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage
            })));
            out.encode(&mut resp);
            cache_headers(resp.headers_mut());
            return resp;
        }
        let (tx, body) = ChannelBody::new(16);
        let encoding = out.clone();
        let sim = self.clone();
        tokio::spawn(async move {
            let mut running = running;
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let chunk = |choices: serde_json::Value| {
                let c = serde_json::json!({
                    "id": id, "object": object, "created": created, "model": model, "choices": choices
                });
                Bytes::from(format!("data: {c}\n\n"))
            };
            if !ttft.is_zero() {
                tokio::time::sleep(ttft).await;
            }
            let mut gate = sim.gate.subscribe();
            for i in 0..n {
                if i > 0 {
                    if sim.gated.load(Ordering::SeqCst)
                        && gate.wait_for(|open| *open).await.is_err()
                    {
                        return;
                    }
                    if !itl.is_zero() {
                        tokio::time::sleep(itl).await;
                    }
                }
                let text = piece(i);
                let choice = if let Some(c) = out.event_choice(i as usize, chat) {
                    c
                } else if chat {
                    serde_json::json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}])
                } else {
                    serde_json::json!([{"index": 0, "text": text, "finish_reason": null}])
                };
                running.hold(1, false);
                if tx.send(chunk(choice)).await.is_err() {
                    return;
                }
            }
            let last = if chat {
                serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "length"}])
            } else {
                serde_json::json!([{"index": 0, "text": "", "finish_reason": "length"}])
            };
            if tx.send(chunk(last)).await.is_err() {
                return;
            }
            if r.include_usage {
                let c = serde_json::json!({
                    "id": id, "object": object, "created": created, "model": model,
                    "choices": [], "usage": usage
                });
                if tx
                    .send(Bytes::from(format!("data: {c}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tx
                .send(Bytes::from_static(b"data: [DONE]\n\n"))
                .await
                .is_ok()
            {
                sim.completed.fetch_add(1, Ordering::SeqCst);
            }
        });
        let mut resp = Response::new(body.map_err(|never| match never {}).boxed_unsync());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        encoding.encode(&mut resp);
        cache_headers(resp.headers_mut());
        resp
    }
}

/// Test controls of a generation's output, by request header:
/// - `x-sim-script`: a JSON array of `[choice, field, text]` pieces. Streamed, each piece is
///   one event carrying `text` in `field` of choice `choice` (so choices interleave as the
///   script orders them); not streamed, each choice's pieces are joined per field. Fields:
///   `content`, `reasoning`, `reasoning_content`, `refusal`, `tool_arguments`
///   (`tool_calls[0].function.arguments`), `logprobs` (`logprobs.content[].token`), `text`
///   (completions).
/// - `x-sim-pad-bytes: N` (not streamed): one more choice whose content is N bytes of `x`.
/// - `x-sim-escape: unicode` (not streamed): the script's joined texts written as `\u00XX`.
/// - `x-sim-served-model`: the `model` the answer names.
/// - `x-sim-encoding`: the answer's `content-encoding` (the body is not encoded).
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    pub script: Option<Vec<(u64, String, String)>>,
    pub pad_bytes: usize,
    pub escape_unicode: bool,
    pub served_model: Option<String>,
    pub encoding: Option<HeaderValue>,
}

/// The fields `x-sim-script` can write.
pub const SCRIPT_FIELDS: [&str; 7] = [
    "content",
    "reasoning",
    "reasoning_content",
    "refusal",
    "tool_arguments",
    "logprobs",
    "text",
];

impl OutputOptions {
    pub fn from_headers(h: &HeaderMap) -> Self {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        Self {
            script: text("x-sim-script")
                .and_then(|s| serde_json::from_str::<Vec<(u64, String, String)>>(s).ok()),
            pad_bytes: text("x-sim-pad-bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            escape_unicode: text("x-sim-escape") == Some("unicode"),
            served_model: text("x-sim-served-model").map(str::to_string),
            encoding: h.get("x-sim-encoding").cloned(),
        }
    }

    /// One streamed event's `choices` for script piece `i`.
    fn event_choice(&self, i: usize, chat: bool) -> Option<serde_json::Value> {
        let (c, field, text) = self.script.as_ref()?.get(i)?;
        let choice = match field.as_str() {
            "text" => serde_json::json!({"index": c, "text": text, "finish_reason": null}),
            _ if !chat => serde_json::json!({"index": c, "text": text, "finish_reason": null}),
            "tool_arguments" => serde_json::json!({"index": c, "delta": {"tool_calls": [
                {"index": 0, "id": "call_0", "type": "function",
                 "function": {"name": "lookup", "arguments": text}}]}, "finish_reason": null}),
            "logprobs" => serde_json::json!({"index": c, "delta": {"content": ""},
                "logprobs": {"content": [{"token": text, "logprob": -0.5}]}, "finish_reason": null}),
            f => serde_json::json!({"index": c, "delta": {f: text}, "finish_reason": null}),
        };
        Some(serde_json::json!([choice]))
    }

    /// The script's text joined per (choice, field), in choice order.
    fn joined(
        &self,
    ) -> std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>> {
        let mut by: std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>> =
            Default::default();
        for (c, f, t) in self.script.iter().flatten() {
            by.entry(*c)
                .or_default()
                .entry(f.clone())
                .or_default()
                .push_str(t);
        }
        by
    }

    /// A non-streamed answer's `choices`, when the script or padding shapes them.
    fn whole_choices(&self, chat: bool) -> Option<Vec<serde_json::Value>> {
        if self.script.is_none() && self.pad_bytes == 0 {
            return None;
        }
        let by = self.joined();
        let mut choices = Vec::new();
        for (c, fields) in &by {
            let get = |f: &str| fields.get(f).cloned();
            if !chat {
                let text: String = fields.values().cloned().collect();
                choices
                    .push(serde_json::json!({"index": c, "text": text, "finish_reason": "length"}));
                continue;
            }
            let mut message = serde_json::json!({"role": "assistant", "content": get("content")});
            for f in ["reasoning", "reasoning_content", "refusal"] {
                if let Some(t) = get(f) {
                    message[f] = serde_json::Value::String(t);
                }
            }
            if let Some(a) = get("tool_arguments") {
                message["tool_calls"] = serde_json::json!([{"id": "call_0", "type": "function",
                    "function": {"name": "lookup", "arguments": a}}]);
            }
            let mut choice =
                serde_json::json!({"index": c, "message": message, "finish_reason": "length"});
            if let Some(t) = get("logprobs") {
                choice["logprobs"] =
                    serde_json::json!({"content": [{"token": t, "logprob": -0.5}]});
            }
            if let Some(t) = get("text") {
                choice["text"] = serde_json::Value::String(t);
            }
            choices.push(choice);
        }
        if self.pad_bytes > 0 {
            let index = by.keys().next_back().map_or(0, |c| c + 1);
            let pad = "x".repeat(self.pad_bytes);
            choices.push(if chat {
                serde_json::json!({"index": index, "message": {"role": "assistant", "content": pad}, "finish_reason": "length"})
            } else {
                serde_json::json!({"index": index, "text": pad, "finish_reason": "length"})
            });
        }
        Some(choices)
    }

    /// A non-streamed answer's text (with `x-sim-escape: unicode`, every joined script text
    /// written as `\u` escapes).
    fn render(&self, v: &serde_json::Value) -> String {
        let mut body = v.to_string();
        if self.escape_unicode {
            for fields in self.joined().values() {
                for t in fields.values() {
                    let plain = serde_json::Value::String(t.clone()).to_string();
                    let escaped: String = t.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
                    body = body.replace(&plain, &format!("\"{escaped}\""));
                }
            }
        }
        body
    }

    fn encode(&self, resp: &mut Response<ProxyBody>) {
        if let Some(e) = &self.encoding {
            resp.headers_mut()
                .insert(http::header::CONTENT_ENCODING, e.clone());
        }
    }
}

fn json(v: serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(full(v.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json_text(text: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(text));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn bad_json() -> Response<ProxyBody> {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_json",
        "the body is not JSON",
    )
}

/// Serve the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Sim>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "sim accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        let svc = hyper::service::service_fn(move |req| {
            let sim = sim.clone();
            async move { Ok::<_, std::convert::Infallible>(sim.handle(Some(peer), req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// A simulator running in the background of the current runtime.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// Bind 127.0.0.1:0 and serve.
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Sim::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(listener, sim.clone(), async move {
            let _ = rx.await;
        }));
        Ok(SimHandle {
            addr,
            sim,
            stop: Some(tx),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A body fed from a channel, frame by frame (the streamed responses).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    fn new(capacity: usize) -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
