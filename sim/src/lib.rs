//! bulkhead-sim: a simulated OpenAI-compatible inference server for tests, the demo and
//! benchmarks; none of it is part of the production sidecar. Streaming and non-streaming
//! chat/completions, completions and the Responses API (`/v1/responses`), embeddings and
//! models, with configurable time to first token, inter-token latency and length; returns
//! `usage`.
//!
//! # What it serves and counts, as vLLM does
//!
//! A token is a whitespace-separated word; a token id is one token; each prompt costs at
//! least 1. [`SimRequest::parse`] reads, per route:
//! - `/v1/completions`: `prompt` as a string, a list of strings, a list of token ids (one
//!   prompt) or a list of token-id lists: one prompt per list entry except for the token-id
//!   list. `suffix` counts in every prompt. `max_tokens` only (vLLM's completions ignore
//!   `max_completion_tokens`). `n` choices per prompt, numbered `prompt_index * n + j` (as
//!   vLLM numbers them); `best_of` generates `max(n, best_of)` sequences per prompt and
//!   returns `n`, and `usage` counts only the returned ones (vLLM's V0 did); a request whose
//!   `best_of` differs from `n` is answered in one JSON piece even when it asks to stream
//!   (vLLM does not stream it).
//! - `/v1/chat/completions`: each message is 4 tokens plus the words of every string in it but
//!   `role` and `type` (content and all its parts, `name`, `tool_calls` names and arguments,
//!   `tool_call_id`, ...). The chat template also renders `tools`, `functions`, `documents`
//!   and `chat_template_kwargs`: each entry costs the words of its JSON text indented as
//!   templates write it (`tojson(indent=4)`, here serde's pretty printer), ahead of the
//!   messages (and in the prefix cache's words). `max_completion_tokens`, else `max_tokens`;
//!   `n` choices.
//! - `/v1/responses`: `instructions` (a system message), `input` (a string: a user message;
//!   or a list of items, each counted as a message) and `tools`; `max_output_tokens`; one
//!   choice. The response's id is the body's `request_id` when present (vLLM returns it as
//!   the id), else `resp_<n>`. Non-streamed: `{"object":"response","output":[{"type":
//!   "message",...,"content":[{"type":"output_text","text":...}]}],"usage":{"input_tokens",
//!   "output_tokens","total_tokens"}}`; streamed: named SSE events (`event:` + `data:`, each
//!   with a `sequence_number`) `response.created`, one `response.output_text.delta` per token
//!   and `response.completed` carrying the whole response and its usage; no `[DONE]`.
//! - `/v1/embeddings`: `input` in the same shapes as `prompt`; one vector per input.
//!
//! Integers are read as pydantic's lax mode reads them (`2`, `2.0`, `"2"`). A field of the
//! wrong shape (`prompt: 7`, an empty prompt list, `n: 0`, `best_of < n`, a negative
//! `max_tokens`, ...) is a 400 whose `error.code` names the field.
//!
//! Every sequence generates `min(limit, completion_tokens)` tokens (or the `x-sim-reply` text's
//! pieces). `usage.prompt_tokens` is every prompt once; `completion_tokens` every returned
//! choice. Streamed with several choices, each token step sends one chunk per choice (in
//! index order), then one finish chunk per choice; a single choice streams as it always did.
//!
//! Per tenant (the sidecar's `x-bulkhead-tenant`), [`Sim::tenant_kv`] gives what was served,
//! counted by the simulator: prompt tokens (every prompt once, embeddings included), completion
//! tokens (every generated sequence, `best_of` extras included), choices started, and the
//! KV-cache tokens held (`held`, and its `peak`): while a generation runs it holds each prompt
//! once per sequence generated for it (vLLM runs a sequence per choice; this is the worst case,
//! with no prefix sharing between them) plus every token generated so far.
//!
//! Like vLLM with `--otlp-traces-endpoint`, it reads the W3C `traceparent` of each request:
//! [`Sim::traceparents`] gives the last [`TRACEPARENTS_KEPT`] it received, with the request's
//! `x-request-id`, so a test can check that the inference server's spans would join the
//! sidecar's trace.
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
//! (every full block cached), `partial` or `miss`, and `x-sim-cached-blocks: N`. A list prompt
//! is looked up prompt by prompt (one [`CacheEvent`] each); the headers and the prefill time
//! add them up. Token-id prompts are cached by id.
//! `POST /reset_prefix_cache` (vLLM: `{"success": false}` while requests run, or a 503 with
//! `reset_busy_status = 503`; `{"success": true}` when idle) and `POST /flush_cache` (SGLang:
//! 400 "Cache not flushed because there are pending requests" while busy) empty it.
#![forbid(unsafe_code)]

mod http_util;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_util::{ProxyBody, full, json_error};
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

/// Which API a request is for: it decides which fields count and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/responses`
    Responses,
    /// `/v1/embeddings`
    Embeddings,
}

/// One prompt of a request: its tokens and its words (for the prefix cache).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: u64,
    pub words: Vec<String>,
}

/// The parsed request fields the simulator uses.
#[derive(Debug, Clone, Default)]
pub struct SimRequest {
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    /// Prompt tokens of all prompts together (`usage.prompt_tokens`).
    pub prompt_tokens: u64,
    /// Each prompt: one, unless `prompt` (completions) or `input` (embeddings) is a list of
    /// prompts.
    pub prompts: Vec<Prompt>,
    /// Choices returned per prompt (`n`, default 1).
    pub n: u64,
    /// Sequences generated per prompt: `max(n, best_of)` on completions, else `n`.
    pub sequences: u64,
    pub cache_salt: Option<String>,
    /// The body's `request_id` (a vLLM extension).
    pub request_id: Option<String>,
}

/// A field the simulator cannot use, as a 400 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadField {
    pub param: &'static str,
    pub message: String,
}

impl BadField {
    fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: format!("{param}: {}", message.into()),
        }
    }
}

impl std::fmt::Display for BadField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The words of every string in `v` (a number or boolean is one word), keys `role` and
/// `type` left out: a message or content part as a chat template renders it.
fn leaf_words(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.extend(s.split_whitespace().map(str::to_string)),
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Bool(b) => out.push(b.to_string()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| leaf_words(x, out)),
        serde_json::Value::Object(o) => o
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "type")
            .for_each(|(_, x)| leaf_words(x, out)),
        serde_json::Value::Null => {}
    }
}

/// The words of `v`'s JSON text, indented as templates render tools (`tojson(indent=4)`).
fn json_words(v: &serde_json::Value, out: &mut Vec<String>) {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    out.extend(text.split_whitespace().map(str::to_string));
}

/// A chat message (or Responses input item): 4 tokens of template, plus the words of its
/// strings (content and its parts, `name`, `tool_calls`, `tool_call_id`, ...).
fn message(m: &serde_json::Value, tokens: &mut u64, words: &mut Vec<String>) {
    let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
    words.push(format!("<{role}>"));
    let before = words.len();
    leaf_words(m, words);
    *tokens += 4 + (words.len() - before) as u64;
}

/// An unsigned integer as pydantic reads one in lax mode (vLLM): a JSON integer, a float
/// with no fraction, or a string holding one. `None` when absent or null.
fn lax_uint(v: &serde_json::Value, param: &'static str) -> Result<Option<u64>, BadField> {
    let bad = || BadField::new(param, format!("must be a non-negative integer, got {v}"));
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(Some(f as u64)),
            _ => Err(bad()),
        },
        serde_json::Value::String(s) => s.trim().parse::<u64>().map(Some).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// `prompt` (completions) or `input` (embeddings): a string, a list of strings, a list of
/// token ids (one prompt, each id one token) or a list of token-id lists.
fn prompt_list(v: &serde_json::Value, param: &'static str) -> Result<Vec<Prompt>, BadField> {
    let text = |s: &str| Prompt {
        tokens: s.split_whitespace().count() as u64,
        words: s.split_whitespace().map(str::to_string).collect(),
    };
    let ids = |a: &[serde_json::Value]| -> Option<Prompt> {
        let ids: Option<Vec<u64>> = a.iter().map(|x| x.as_u64()).collect();
        let ids = ids?;
        Some(Prompt {
            tokens: ids.len() as u64,
            words: ids.iter().map(|i| format!("#{i}")).collect(),
        })
    };
    let shape =
        "must be a string, a list of strings, a list of token ids or a list of token-id lists";
    match v {
        serde_json::Value::Null => Ok(vec![Prompt::default()]),
        serde_json::Value::String(s) => Ok(vec![text(s)]),
        serde_json::Value::Array(a) if a.is_empty() => {
            Err(BadField::new(param, "is an empty list (no prompt)"))
        }
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_string()) => Ok(a
            .iter()
            .map(|x| text(x.as_str().unwrap_or_default()))
            .collect()),
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_number()) => ids(a)
            .map(|p| vec![p])
            .ok_or_else(|| BadField::new(param, "token ids must be non-negative integers")),
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_array()) => a
            .iter()
            .map(|x| {
                let inner = x.as_array().map(Vec::as_slice).unwrap_or_default();
                if inner.is_empty() {
                    return Err(BadField::new(param, "holds an empty token-id list"));
                }
                ids(inner)
                    .ok_or_else(|| BadField::new(param, "token ids must be non-negative integers"))
            })
            .collect(),
        _ => Err(BadField::new(param, shape)),
    }
}

impl SimRequest {
    /// Read a request body for `api`; a field of the wrong shape is an error naming it.
    ///
    /// Prompt tokens are whitespace-separated words (a token id is one token); each prompt
    /// counts at least 1.
    pub fn parse(api: Api, v: &serde_json::Value) -> Result<Self, BadField> {
        let null = serde_json::Value::Null;
        let field = |k: &str| v.get(k).unwrap_or(&null);
        let prompts = match api {
            Api::Completions => {
                let mut ps = prompt_list(field("prompt"), "prompt")?;
                if let Some(s) = field("suffix").as_str() {
                    for p in &mut ps {
                        p.tokens += s.split_whitespace().count() as u64;
                        p.words.extend(s.split_whitespace().map(str::to_string));
                    }
                }
                ps
            }
            Api::Embeddings => prompt_list(field("input"), "input")?,
            Api::Chat | Api::Responses => {
                let mut tokens = 0;
                let mut words = Vec::new();
                // The chat template renders the tool definitions (and, on chat, documents and
                // `chat_template_kwargs`) into the prompt, as JSON.
                let mut rendered: Vec<&'static str> = vec!["tools", "functions"];
                if api == Api::Chat {
                    rendered.extend(["documents", "chat_template_kwargs"]);
                }
                for k in rendered {
                    let before = words.len();
                    match field(k) {
                        serde_json::Value::Null => {}
                        serde_json::Value::Array(a) => {
                            a.iter().for_each(|e| json_words(e, &mut words))
                        }
                        other => json_words(other, &mut words),
                    }
                    tokens += (words.len() - before) as u64;
                }
                if api == Api::Chat {
                    match field("messages") {
                        serde_json::Value::Null => {}
                        serde_json::Value::Array(ms) => {
                            ms.iter().for_each(|m| message(m, &mut tokens, &mut words))
                        }
                        _ => return Err(BadField::new("messages", "must be a list of messages")),
                    }
                } else {
                    match field("instructions") {
                        serde_json::Value::Null => {}
                        serde_json::Value::String(s) => message(
                            &serde_json::json!({"role": "system", "content": s}),
                            &mut tokens,
                            &mut words,
                        ),
                        _ => return Err(BadField::new("instructions", "must be a string")),
                    }
                    match field("input") {
                        serde_json::Value::Null => {}
                        serde_json::Value::String(s) => message(
                            &serde_json::json!({"role": "user", "content": s}),
                            &mut tokens,
                            &mut words,
                        ),
                        serde_json::Value::Array(items) => items
                            .iter()
                            .for_each(|m| message(m, &mut tokens, &mut words)),
                        _ => {
                            return Err(BadField::new(
                                "input",
                                "must be a string or a list of input items",
                            ));
                        }
                    }
                }
                vec![Prompt { tokens, words }]
            }
        };
        let prompts: Vec<Prompt> = prompts
            .into_iter()
            .map(|p| Prompt {
                tokens: p.tokens.max(1),
                ..p
            })
            .collect();
        let (n, sequences) = match api {
            Api::Chat | Api::Completions => {
                let n = lax_uint(field("n"), "n")?.unwrap_or(1);
                if n == 0 {
                    return Err(BadField::new("n", "must be at least 1"));
                }
                let best_of = match api {
                    Api::Completions => lax_uint(field("best_of"), "best_of")?,
                    _ => None,
                };
                match best_of {
                    Some(b) if b < n => {
                        return Err(BadField::new(
                            "best_of",
                            format!("must be greater than or equal to n ({n}), got {b}"),
                        ));
                    }
                    Some(b) => (n, b),
                    None => (n, n),
                }
            }
            Api::Responses | Api::Embeddings => (1, 1),
        };
        let max_tokens = match api {
            // vLLM: `max_completion_tokens or max_tokens`.
            Api::Chat => match lax_uint(field("max_completion_tokens"), "max_completion_tokens")? {
                Some(m) => Some(m),
                None => lax_uint(field("max_tokens"), "max_tokens")?,
            },
            Api::Completions => lax_uint(field("max_tokens"), "max_tokens")?,
            Api::Responses => lax_uint(field("max_output_tokens"), "max_output_tokens")?,
            Api::Embeddings => None,
        };
        let stream = field("stream").as_bool().unwrap_or(false)
            && api != Api::Embeddings
            // vLLM answers a completion whose best_of differs from n in one piece, stream or not.
            && sequences == n;
        Ok(Self {
            stream,
            include_usage: v
                .pointer("/stream_options/include_usage")
                .and_then(|s| s.as_bool())
                .unwrap_or(false),
            max_tokens,
            prompt_tokens: prompts.iter().map(|p| p.tokens).sum(),
            prompts,
            n,
            sequences,
            cache_salt: field("cache_salt").as_str().map(str::to_string),
            request_id: field("request_id").as_str().map(str::to_string),
        })
    }

    /// Choices returned: `n` per prompt.
    pub fn choices(&self) -> u64 {
        self.prompts.len() as u64 * self.n
    }

    /// KV-cache tokens the prompts hold while the request runs: each prompt once per
    /// sequence generated for it (vLLM runs a sequence per choice; the worst case, no prefix
    /// sharing between them).
    pub fn held_prompt_tokens(&self) -> u64 {
        self.prompts.iter().map(|p| p.tokens).sum::<u64>() * self.sequences
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

/// One running generation: counted in `running`, and its KV-cache tokens (every prompt once
/// per sequence, plus the tokens generated so far) held in its tenant's [`TenantKv`] until
/// dropped.
struct Running {
    sim: Arc<Sim>,
    tenant: String,
    held: u64,
}

impl Running {
    fn new(sim: Arc<Sim>, tenant: String, r: &SimRequest) -> Self {
        sim.running.fetch_add(1, Ordering::SeqCst);
        let held = r.held_prompt_tokens();
        let mut kv = sim.kv.lock().unwrap_or_else(|e| e.into_inner());
        let t = kv.entry(tenant.clone()).or_default();
        t.held += held;
        t.peak = t.peak.max(t.held);
        t.prompt_tokens += r.prompt_tokens;
        t.choices_served += r.choices();
        drop(kv);
        Self { sim, tenant, held }
    }

    /// `n` more generated tokens in the KV cache.
    fn generated(&mut self, n: u64) {
        let mut kv = self.sim.kv.lock().unwrap_or_else(|e| e.into_inner());
        let t = kv.entry(self.tenant.clone()).or_default();
        t.held += n;
        t.peak = t.peak.max(t.held);
        t.completion_tokens += n;
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
/// what it served, counted by the simulator itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantKv {
    /// KV-cache tokens its running generations hold now: each prompt once per sequence
    /// generated for it (`n`, or `best_of` when larger), plus every token generated so far.
    pub held: u64,
    /// The most `held` ever was.
    pub peak: u64,
    /// Prompt tokens served: every prompt once (as `usage.prompt_tokens`); embeddings too.
    pub prompt_tokens: u64,
    /// Tokens generated, over every sequence (`best_of` sequences that are not returned
    /// included, although `usage` leaves them out, as vLLM's does).
    pub completion_tokens: u64,
    /// Choices started (`n` per prompt).
    pub choices_served: u64,
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
    traceparents: Mutex<VecDeque<SeenTraceparent>>,
}

/// How many received `traceparent` headers [`Sim::traceparents`] keeps.
pub const TRACEPARENTS_KEPT: usize = 4096;

/// A `traceparent` header the simulator received (as sent, unparsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenTraceparent {
    /// The request's `x-request-id` (the sidecar's request id).
    pub request_id: Option<String>,
    pub path: String,
    /// Every `traceparent` value of the request, in order.
    pub traceparent: Vec<String>,
    pub tracestate: Option<String>,
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
            traceparents: Mutex::new(VecDeque::new()),
        })
    }

    /// The trace context of the last requests received (those with or without one).
    pub fn traceparents(&self) -> Vec<SeenTraceparent> {
        self.traceparents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn record_traceparent(&self, path: &str, h: &HeaderMap) {
        let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let seen = SeenTraceparent {
            request_id: h.get("x-request-id").map(text),
            path: path.to_string(),
            traceparent: h.get_all("traceparent").iter().map(text).collect(),
            tracestate: h.get("tracestate").map(text),
        };
        let mut q = self.traceparents.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= TRACEPARENTS_KEPT {
            q.pop_front();
        }
        q.push_back(seen);
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

    /// Look up and insert each prompt's blocks (one [`CacheEvent`] each); all prompts
    /// together, and the prefill time they cost.
    fn prefix_lookup(&self, r: &SimRequest) -> (CacheEvent, Duration) {
        let mut total = CacheEvent {
            salt: r.cache_salt.clone(),
            blocks: 0,
            cached: 0,
        };
        let mut prefill = Duration::ZERO;
        for p in &r.prompts {
            let (ev, time) = self.prefix_lookup_one(r.cache_salt.as_deref(), &p.words);
            total.blocks += ev.blocks;
            total.cached += ev.cached;
            prefill += time;
        }
        (total, prefill)
    }

    fn prefix_lookup_one(&self, salt: Option<&str>, words: &[String]) -> (CacheEvent, Duration) {
        let c = &self.config;
        let hashes = block_hashes(salt, words, c.prefix_block_words);
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
            salt: salt.map(str::to_string),
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
        self.record_traceparent(&path, &parts.headers);
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
                self.generate(&parts.headers, &body, Api::Chat).await
            }
            (Method::POST, "/v1/completions") => {
                self.generate(&parts.headers, &body, Api::Completions).await
            }
            (Method::POST, "/v1/responses") => {
                self.generate(&parts.headers, &body, Api::Responses).await
            }
            (Method::POST, "/v1/embeddings") => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return bad_json();
                };
                let r = match SimRequest::parse(Api::Embeddings, &v) {
                    Ok(r) => r,
                    Err(e) => return bad_field(&e),
                };
                self.kv
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(tenant(&parts.headers))
                    .or_default()
                    .prompt_tokens += r.prompt_tokens;
                let data: Vec<serde_json::Value> = (0..r.prompts.len())
                    .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]}))
                    .collect();
                json(serde_json::json!({
                    "object": "list",
                    "model": self.config.model,
                    "data": data,
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
        api: Api,
    ) -> Response<ProxyBody> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return bad_json();
        };
        let r = match SimRequest::parse(api, &v) {
            Ok(r) => r,
            Err(e) => return bad_field(&e),
        };
        // Per-request timing overrides (benchmarks): `x-sim-ttft-ms`, `x-sim-itl-ms`.
        let ms = |name: &str, default: Duration| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0 && *v <= 60_000.0)
                .map_or(default, |v| Duration::from_secs_f64(v / 1e3))
        };
        let mut running = Running::new(self.clone(), tenant(headers), &r);
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
        // Tokens each sequence generates.
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
        // Choices returned (`n` per prompt, numbered prompt_index * n + j), and sequences
        // generated (more with best_of).
        let choices = r.choices();
        let sequences = r.prompts.len() as u64 * r.sequences;
        self.started.fetch_add(1, Ordering::SeqCst);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = match api {
            // vLLM: the request's `request_id` is the response's id.
            Api::Responses => r
                .request_id
                .clone()
                .unwrap_or_else(|| format!("resp_{}", self.started())),
            _ => format!("cmpl-{}", self.started()),
        };
        let completion = n * choices;
        let usage = match api {
            Api::Responses => serde_json::json!({
                "input_tokens": r.prompt_tokens,
                "output_tokens": completion,
                "total_tokens": r.prompt_tokens + completion
            }),
            _ => serde_json::json!({
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": r.prompt_tokens + completion
            }),
        };
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
            running.generated(n * sequences);
            self.completed.fetch_add(1, Ordering::SeqCst);
            drop(running);
            let chat = api == Api::Chat;
            let body = match api {
                Api::Responses => {
                    response_object(&id, created, &model, "completed", Some(&text), usage)
                }
                _ => {
                    let choices: Vec<serde_json::Value> = match out.whole_choices(chat) {
                        Some(c) => c,
                        None => (0..choices)
                            .map(|i| {
                                if chat {
                                    serde_json::json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
                                } else {
                                    serde_json::json!({"index": i, "text": text, "finish_reason": "length"})
                                }
                            })
                            .collect(),
                    };
                    serde_json::json!({
                        "id": id,
                        "object": if chat { "chat.completion" } else { "text_completion" },
                        "created": created,
                        "model": model,
                        "choices": choices,
                        "usage": usage
                    })
                }
            };
            let mut resp = json_text(out.render(&body));
            out.encode(&mut resp);
            cache_headers(resp.headers_mut());
            return resp;
        }
        let (tx, body) = ChannelBody::new(16);
        let encoding = out.clone();
        let sim = self.clone();
        tokio::spawn(async move {
            let mut running = running;
            let chat = api == Api::Chat;
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
            // Responses: named events, numbered.
            let mut seq = 0u64;
            let mut event = |v: serde_json::Value| {
                let mut v = v;
                v["sequence_number"] = seq.into();
                seq += 1;
                let kind = v["type"].as_str().unwrap_or_default().to_string();
                Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
            };
            let msg_id = format!("msg_{id}");
            if api == Api::Responses {
                let created_ev = event(serde_json::json!({
                    "type": "response.created",
                    "response": response_object(&id, created, &model, "in_progress", None, serde_json::Value::Null)
                }));
                if tx.send(created_ev).await.is_err() {
                    return;
                }
            }
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
                running.generated(sequences);
                if api != Api::Responses
                    && let Some(c) = out.event_choice(i as usize, chat)
                {
                    // A scripted piece: one event for the choice the script names.
                    if tx.send(chunk(c)).await.is_err() {
                        return;
                    }
                    continue;
                }
                for c in 0..choices {
                    let bytes = match api {
                        Api::Responses => event(serde_json::json!({
                            "type": "response.output_text.delta", "item_id": msg_id,
                            "output_index": 0, "content_index": 0, "delta": text
                        })),
                        Api::Chat => chunk(
                            serde_json::json!([{"index": c, "delta": {"content": text}, "finish_reason": null}]),
                        ),
                        _ => chunk(
                            serde_json::json!([{"index": c, "text": text, "finish_reason": null}]),
                        ),
                    };
                    if tx.send(bytes).await.is_err() {
                        return;
                    }
                }
            }
            if api == Api::Responses {
                let text: String = (0..n).map(&piece).collect();
                let done = event(serde_json::json!({
                    "type": "response.completed",
                    "response": response_object(&id, created, &model, "completed", Some(&text), usage)
                }));
                if tx.send(done).await.is_ok() {
                    sim.completed.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            for c in 0..choices {
                let last = if chat {
                    serde_json::json!([{"index": c, "delta": {}, "finish_reason": "length"}])
                } else {
                    serde_json::json!([{"index": c, "text": "", "finish_reason": "length"}])
                };
                if tx.send(chunk(last)).await.is_err() {
                    return;
                }
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

/// The tenant the sidecar names in `x-bulkhead-tenant` ("" when none).
fn tenant(headers: &HeaderMap) -> String {
    headers
        .get("x-bulkhead-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A Responses API response object; `text` None for one with no output yet.
fn response_object(
    id: &str,
    created: u64,
    model: &str,
    status: &str,
    text: Option<&str>,
    usage: serde_json::Value,
) -> serde_json::Value {
    let output: Vec<serde_json::Value> = text
        .map(|t| {
            serde_json::json!({
                "type": "message", "id": format!("msg_{id}"), "role": "assistant",
                "status": status,
                "content": [{"type": "output_text", "text": t, "annotations": []}]
            })
        })
        .into_iter()
        .collect();
    serde_json::json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": status,
        "output": output,
        "usage": usage
    })
}

fn bad_field(e: &BadField) -> Response<ProxyBody> {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        e.param,
        &e.message,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(api: Api, v: serde_json::Value) -> SimRequest {
        SimRequest::parse(api, &v).unwrap()
    }

    fn tokens(r: &SimRequest) -> Vec<u64> {
        r.prompts.iter().map(|p| p.tokens).collect()
    }

    #[test]
    fn every_prompt_shape_counts_its_tokens() {
        let c = |prompt| parse(Api::Completions, json!({ "prompt": prompt }));
        let r = c(json!("one two three"));
        assert_eq!((tokens(&r), r.prompt_tokens), (vec![3], 3));
        let r = c(json!(["a b", "c d e"]));
        assert_eq!((tokens(&r), r.prompt_tokens), (vec![2, 3], 5));
        // Token ids: each id one token, whatever the words would say.
        let r = c(json!([101, 7, 7, 9000, 3]));
        assert_eq!((tokens(&r), r.prompt_tokens), (vec![5], 5));
        let r = c(json!([[1, 2], [3, 4, 5, 6], [7]]));
        assert_eq!((tokens(&r), r.prompt_tokens), (vec![2, 4, 1], 7));
        // An empty prompt still costs a token; the suffix is part of every prompt.
        assert_eq!(tokens(&c(json!(""))), vec![1]);
        let r = parse(
            Api::Completions,
            json!({"prompt": ["a", "b c"], "suffix": "x y z"}),
        );
        assert_eq!(tokens(&r), vec![4, 5]);
        // Embeddings take the same shapes in `input`.
        let r = parse(Api::Embeddings, json!({"input": [[1, 2, 3], [4]]}));
        assert_eq!(tokens(&r), vec![3, 1]);
        // Token-id prompts are cached by id.
        let a = c(json!([1, 2, 3]));
        assert_eq!(a.prompts[0].words, ["#1", "#2", "#3"]);
    }

    #[test]
    fn bad_fields_are_errors_naming_the_field() {
        for (api, body, param) in [
            (Api::Completions, json!({"prompt": 5}), "prompt"),
            (Api::Completions, json!({"prompt": []}), "prompt"),
            (Api::Completions, json!({"prompt": [1, "a"]}), "prompt"),
            (Api::Completions, json!({"prompt": [[]]}), "prompt"),
            (Api::Completions, json!({"prompt": [-1]}), "prompt"),
            (Api::Completions, json!({"prompt": [[1], 2]}), "prompt"),
            (Api::Embeddings, json!({"input": {"a": 1}}), "input"),
            (Api::Completions, json!({"prompt": "x", "n": 0}), "n"),
            (Api::Chat, json!({"n": -2}), "n"),
            (Api::Chat, json!({"n": "two"}), "n"),
            (Api::Chat, json!({"max_tokens": 1.5}), "max_tokens"),
            (
                Api::Completions,
                json!({"prompt": "x", "n": 3, "best_of": 2}),
                "best_of",
            ),
            (Api::Chat, json!({"messages": "hi"}), "messages"),
            (Api::Responses, json!({"input": 3}), "input"),
            (
                Api::Responses,
                json!({"instructions": ["x"]}),
                "instructions",
            ),
        ] {
            let e = SimRequest::parse(api, &body).unwrap_err();
            assert_eq!(e.param, param, "{body}");
            assert!(e.message.starts_with(&format!("{param}: ")), "{e}");
        }
    }

    #[test]
    fn choices_and_sequences_follow_n_and_best_of() {
        let r = parse(Api::Completions, json!({"prompt": ["a", "b", "c"], "n": 2}));
        assert_eq!((r.n, r.sequences, r.choices()), (2, 2, 6));
        assert_eq!(r.held_prompt_tokens(), 3 * 2);
        // best_of: more sequences generated (and held) than choices returned; a stream is
        // answered in one piece, as vLLM does.
        let r = parse(
            Api::Completions,
            json!({"prompt": "a b", "n": 2, "best_of": 5, "stream": true}),
        );
        assert_eq!((r.n, r.sequences, r.choices()), (2, 5, 2));
        assert_eq!(r.held_prompt_tokens(), 2 * 5);
        assert!(!r.stream);
        // pydantic's lax integers, as vLLM reads them.
        let r = parse(Api::Chat, json!({"n": "3", "max_tokens": 4.0}));
        assert_eq!((r.n, r.max_tokens), (3, Some(4)));
        // best_of is a completions field only; the Responses API has no n.
        let r = parse(Api::Chat, json!({"n": 2, "best_of": 9}));
        assert_eq!(r.sequences, 2);
        let r = parse(Api::Responses, json!({"input": "x", "n": 4}));
        assert_eq!(r.choices(), 1);
    }

    #[test]
    fn each_api_reads_its_own_limit_field() {
        let both = json!({"prompt": "x", "input": "x", "max_tokens": 7, "max_completion_tokens": 3, "max_output_tokens": 5});
        // vLLM's chat: max_completion_tokens, else max_tokens.
        assert_eq!(parse(Api::Chat, both.clone()).max_tokens, Some(3));
        assert_eq!(
            parse(Api::Chat, json!({"max_tokens": 7})).max_tokens,
            Some(7)
        );
        // Completions know only max_tokens.
        assert_eq!(parse(Api::Completions, both.clone()).max_tokens, Some(7));
        assert_eq!(
            parse(Api::Completions, json!({"max_completion_tokens": 3})).max_tokens,
            None
        );
        assert_eq!(parse(Api::Responses, both).max_tokens, Some(5));
        assert_eq!(
            parse(Api::Chat, json!({"max_completion_tokens": "12"})).max_tokens,
            Some(12)
        );
    }

    #[test]
    fn chat_counts_every_string_a_template_renders() {
        let msgs = json!([
            {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hi there"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny and warm"}
        ]);
        let base = parse(Api::Chat, json!({ "messages": msgs }));
        // 4 + bob hi there; 4 + c1 f {"city": "Paris"}; 4 + c1 sunny and warm.
        assert_eq!(base.prompt_tokens, 7 + 8 + 8);
        // A tool is rendered as its indented JSON: 18 words for this one
        // ({ / "function": { / "description": "get the weather", / "name": "f", /
        // "parameters": { / "type": "object" / } / }, / "type": "function" / }).
        let tool = json!({"type": "function", "function": {"name": "f",
            "description": "get the weather", "parameters": {"type": "object"}}});
        let r = parse(Api::Chat, json!({"messages": msgs, "tools": [tool, tool]}));
        assert_eq!(r.prompt_tokens, base.prompt_tokens + 2 * 18);
        let r = parse(Api::Chat, json!({"messages": msgs, "functions": [tool]}));
        assert_eq!(r.prompt_tokens, base.prompt_tokens + 18);
        // { "text": "a b", "title": "t" } is 7 words; { "enable_thinking": false } 4.
        let r = parse(
            Api::Chat,
            json!({"messages": msgs, "documents": [{"title": "t", "text": "a b"}],
                   "chat_template_kwargs": {"enable_thinking": false}}),
        );
        assert_eq!(r.prompt_tokens, base.prompt_tokens + 7 + 4);
        // The tools' words come first in the prompt (the prefix cache sees them).
        let r = parse(Api::Chat, json!({"messages": msgs, "tools": [tool]}));
        assert_eq!(r.prompts[0].words[0], "{");
        assert_eq!(r.prompts.len(), 1);
    }

    #[test]
    fn responses_count_instructions_input_and_tools() {
        let r = parse(
            Api::Responses,
            json!({"instructions": "be brief", "input": "hello world"}),
        );
        assert_eq!(r.prompt_tokens, (4 + 2) + (4 + 2));
        let r = parse(
            Api::Responses,
            json!({"input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a b c"}]},
                {"type": "function_call_output", "call_id": "c1", "output": "done now"}
            ]}),
        );
        assert_eq!(r.prompt_tokens, (4 + 3) + (4 + 3));
        let tool = json!({"type": "function", "name": "f"});
        // { / "name": "f", / "type": "function" / }
        let with = parse(Api::Responses, json!({"input": "x", "tools": [tool]}));
        assert_eq!(with.prompt_tokens, (4 + 1) + 6);
        let r = parse(Api::Responses, json!({"input": "x", "request_id": "abc"}));
        assert_eq!(r.request_id.as_deref(), Some("abc"));
    }
}
