//! `bulkhead-sim`: a simulated OpenAI-compatible inference server for tests, the demo and
//! benchmarks. Streaming and non-streaming chat/completions, embeddings and models, with
//! configurable time to first token, inter-token latency and length; returns `usage`.
//!
//! Requests are handled by [`Sim::handle`]; new request fields (e.g. a prefix cache keyed by
//! `cache_salt`) go into [`SimRequest`] and the handler.

use crate::http_util::{ChannelBody, ProxyBody, full, json_error};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: String,
    pub time_to_first_token: Duration,
    pub inter_token_latency: Duration,
    /// Completion length when the request's `max_tokens` does not ask for fewer.
    pub completion_tokens: u64,
    /// Requests remembered for inspection (tests).
    pub record_requests: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "bulkhead-sim".into(),
            time_to_first_token: Duration::from_millis(0),
            inter_token_latency: Duration::from_millis(0),
            completion_tokens: 16,
            record_requests: 256,
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
        let mut prompt_tokens = 0;
        if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            for m in msgs {
                prompt_tokens += 4 + m.get("content").map_or(0, text_tokens);
            }
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
        }
    }
}

/// The simulator's shared state.
pub struct Sim {
    config: SimConfig,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    started: AtomicU64,
    completed: AtomicU64,
    gate: watch::Sender<bool>,
    gated: std::sync::atomic::AtomicBool,
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
        })
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
        let ttft = ms("x-sim-ttft-ms", self.config.time_to_first_token);
        let itl = ms("x-sim-itl-ms", self.config.inter_token_latency);
        let n = r
            .max_tokens
            .unwrap_or(self.config.completion_tokens)
            .min(self.config.completion_tokens);
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
        let model = self.config.model.clone();
        if !r.stream {
            if !ttft.is_zero() {
                tokio::time::sleep(ttft).await;
            }
            if n > 1 && !itl.is_zero() {
                tokio::time::sleep(itl * (n as u32 - 1)).await;
            }
            let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
            let choice = if chat {
                serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            } else {
                serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
            };
            self.completed.fetch_add(1, Ordering::SeqCst);
            return json(serde_json::json!({
                "id": id,
                "object": if chat { "chat.completion" } else { "text_completion" },
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage
            }));
        }
        let (tx, body) = ChannelBody::new(16);
        let sim = self.clone();
        tokio::spawn(async move {
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
                let text = format!("tok{i} ");
                let choice = if chat {
                    serde_json::json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}])
                } else {
                    serde_json::json!([{"index": 0, "text": text, "finish_reason": null}])
                };
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
        resp
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
