//! The request path, in phases: read (bounded) -> authenticate (RFC 9421) -> rewrite (strip
//! spoofable headers and `cache_salt`, ask for stream usage) -> limits (reserve tokens) ->
//! fair queue -> forward on the tenant's own connection pool -> meter the response as it
//! streams (reconcile tokens, metrics, audit) when it ends.

use crate::audit::{AuditLog, AuditRecord, UNAUTHENTICATED};
use crate::config::{Config, ConfigError};
use crate::http_util::{BoxError, ProxyBody, json_error};
use crate::isolation::{CacheGate, GateError, GatePass, GateSettings, derive_salt};
use crate::kv::KvCharge;
use crate::limits::{
    Admission, LimitKind, RateInfo, Rejection, SharedClock, TenantLimits, format_reset,
};
use crate::metrics::{Metrics, Reason, TenantCode, TenantLimit, TenantMetrics};
use crate::signature::{AuthError, RESERVED_PREFIX, ReplayCache, RequestView, Verifier};
use crate::tagging::Tagger;
use crate::wfq::{Permit, QueueError, Scheduler};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;

/// Responses larger than this are not scanned for `usage` (the reservation stays charged).
const MAX_USAGE_SCAN: usize = 8 * 1024 * 1024;

/// A connector that tags each new upstream connection with the pool's tenant.
#[derive(Clone)]
pub struct TaggingConnector {
    inner: HttpConnector,
    tenant: Arc<str>,
    tagger: Arc<Tagger>,
}

impl tower_service::Service<Uri> for TaggingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let tagger = self.tagger.clone();
        let tenant = self.tenant.clone();
        Box::pin(async move {
            let io = fut.await?;
            if tagger.enabled() {
                tagger.tag(io.inner().as_fd(), &tenant).await;
            }
            Ok(io)
        })
    }
}

pub type UpstreamClient = Client<TaggingConnector, Full<Bytes>>;

/// Everything derived from one configuration; replaced as a whole on reload.
pub struct Runtime {
    pub config: Arc<Config>,
    pub verifier: Verifier,
    pub limits: HashMap<String, Arc<TenantLimits>>,
    pub clients: HashMap<String, UpstreamClient>,
    pub tenant_metrics: HashMap<String, Arc<TenantMetrics>>,
    pub upstream: Uri,
    /// The `cache_salt` of each `salted` tenant (secret: never log).
    salts: HashMap<String, Arc<str>>,
    /// KV-cache bytes per token from `[model]`; 0 when not configured.
    pub kv_bytes_per_token: u64,
}

impl Runtime {
    /// The cache-gate settings this configuration asks for.
    pub fn gate_settings(&self) -> GateSettings {
        let c = &self.config.cache;
        GateSettings {
            exclusive: self
                .config
                .tenants
                .iter()
                .filter(|(_, t)| t.isolation == crate::config::Isolation::Exclusive)
                .map(|(k, _)| k.clone())
                .collect(),
            window: Duration::from_millis(c.exclusive_window_ms),
            window_max_requests: c.exclusive_window_max_requests,
            flavor: self.config.upstream.flavor,
            upstream: self.upstream.clone(),
            flush_attempts: c.flush_attempts,
            flush_retry: Duration::from_millis(c.flush_retry_ms),
            flush_timeout: Duration::from_millis(c.flush_timeout_ms),
            on_failure: c.on_flush_failure,
            drain_timeout: Duration::from_millis(c.exclusive_drain_timeout_ms),
            flush_proves_idle: c.flush_refused_while_busy,
            max_inflight: self.config.queue.max_inflight,
        }
    }
}

/// Per-process state shared by all connections.
pub struct App {
    runtime: RwLock<Arc<Runtime>>,
    pub sched: Arc<Scheduler>,
    pub gate: Arc<CacheGate>,
    pub metrics: Metrics,
    pub audit: AuditLog,
    pub tagger: Arc<Tagger>,
    clock: SharedClock,
    replay: Arc<Mutex<ReplayCache>>,
    seq: AtomicU64,
    id_prefix: String,
    pub ready: AtomicBool,
}

/// Per client connection.
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// A duplicate of the client socket, kept only when tagging is on.
    pub fd: Option<OwnedFd>,
    pub tenant: tokio::sync::Mutex<Option<String>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl App {
    pub fn new(
        config: Config,
        metrics: Metrics,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<App>, ConfigError> {
        let tagger = Arc::new(Tagger::new(
            config.agent.socket.clone(),
            metrics.agent_available.clone(),
        ));
        let replay = Arc::new(Mutex::new(ReplayCache::new(
            config.auth.replay_cache_capacity,
        )));
        let sched = Scheduler::new(
            config.queue.max_inflight,
            config.queue.max_queue_per_tenant,
            config.tenants.iter().map(|(k, v)| (k.clone(), v.weight)),
        );
        let runtime = build_runtime(config, None, &replay, &tagger, &clock, &metrics)?;
        let gate = CacheGate::new(runtime.gate_settings(), metrics.clone());
        let id_prefix = {
            let n = crate::signature::random_nonce();
            n[..8].to_string()
        };
        Ok(Arc::new(App {
            runtime: RwLock::new(Arc::new(runtime)),
            sched,
            gate,
            metrics,
            audit,
            tagger,
            clock,
            replay,
            seq: AtomicU64::new(0),
            id_prefix,
            ready: AtomicBool::new(true),
        }))
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Apply a new configuration completely or not at all.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        config.validate()?;
        let old = self.runtime();
        if old.config.listen != config.listen {
            tracing::warn!("listen addresses changed: they take effect only after a restart");
        }
        let (a, b) = (&old.config.http, &config.http);
        if old.config.runtime != config.runtime
            || a.max_header_bytes != b.max_header_bytes
            || a.header_read_timeout_ms != b.header_read_timeout_ms
            || a.drain_timeout_ms != b.drain_timeout_ms
        {
            tracing::warn!(
                "runtime.*, http.max_header_bytes, http.header_read_timeout_ms and \
                 http.drain_timeout_ms take effect only after a restart"
            );
        }
        let rt = build_runtime(
            config,
            Some(&old),
            &self.replay,
            &self.tagger,
            &self.clock,
            &self.metrics,
        )?;
        let c = rt.config.clone();
        self.gate.update(rt.gate_settings());
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rt);
        self.sched.update(
            c.queue.max_inflight,
            c.queue.max_queue_per_tenant,
            c.tenants.iter().map(|(k, v)| (k.clone(), v.weight)),
        );
        Ok(())
    }

    fn request_id(&self, headers: &HeaderMap) -> String {
        if let Some(v) = headers.get("x-request-id").and_then(|v| v.to_str().ok())
            && !v.is_empty()
            && v.len() <= 128
            && v.bytes().all(|b| b.is_ascii_graphic())
        {
            return v.to_string();
        }
        format!(
            "{}-{}",
            self.id_prefix,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }
}

fn build_runtime(
    config: Config,
    prev: Option<&Runtime>,
    replay: &Arc<Mutex<ReplayCache>>,
    tagger: &Arc<Tagger>,
    clock: &SharedClock,
    metrics: &Metrics,
) -> Result<Runtime, ConfigError> {
    let keys = config.load_keys()?;
    let salt_key = config.load_salt_key()?;
    let mut salts = HashMap::new();
    for (name, t) in &config.tenants {
        if t.isolation == crate::config::Isolation::Salted {
            let key = salt_key.as_deref().ok_or_else(|| ConfigError::Invalid {
                field: "cache.salt_key_file".into(),
                message: format!("required: tenants.{name}.isolation is \"salted\""),
            })?;
            let salt = derive_salt(key, config.cache.salt_generation, name);
            salts.insert(name.clone(), Arc::from(salt.as_str()));
        }
    }
    let kv_bytes_per_token = config
        .model
        .as_ref()
        .map_or(0, crate::config::ModelConfig::kv_bytes_per_token);
    let verifier = Verifier::new(
        config.auth.label.clone(),
        keys,
        config.auth.max_skew_secs,
        replay.clone(),
    );
    let upstream: Uri = config
        .upstream
        .url
        .parse()
        .map_err(|_| ConfigError::Invalid {
            field: "upstream.url".into(),
            message: "not a URL".into(),
        })?;
    let same_upstream = prev.is_some_and(|p| p.config.upstream == config.upstream);
    let mut limits = HashMap::new();
    let mut clients = HashMap::new();
    let mut tenant_metrics = HashMap::new();
    for (name, t) in &config.tenants {
        metrics.init_tenant(name);
        tenant_metrics.insert(name.clone(), Arc::new(metrics.tenant(name)));
        let l = match prev.and_then(|p| p.limits.get(name)) {
            Some(old) if old.config() == t => old.clone(),
            _ => Arc::new(TenantLimits::new(t.clone(), clock.clone())),
        };
        limits.insert(name.clone(), l);
        let c = match prev.and_then(|p| p.clients.get(name)) {
            Some(old) if same_upstream => old.clone(),
            _ => {
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                http.set_connect_timeout(Some(Duration::from_millis(
                    config.upstream.connect_timeout_ms,
                )));
                let conn = TaggingConnector {
                    inner: http,
                    tenant: Arc::from(name.as_str()),
                    tagger: tagger.clone(),
                };
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(config.upstream.pool_max_idle_per_tenant)
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(conn)
            }
        };
        clients.insert(name.clone(), c);
    }
    Ok(Runtime {
        config: Arc::new(config),
        verifier,
        limits,
        clients,
        tenant_metrics,
        upstream,
        salts,
        kv_bytes_per_token,
    })
}

/// Headers that apply to one connection only (RFC 9110 section 7.6.1), plus those named in
/// `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for t in s.split(',') {
                if let Ok(n) = HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// The parts of a response (or stream chunk) the sidecar reads; everything else is skipped
/// without being materialised.
#[derive(serde::Deserialize)]
struct ResponseView {
    #[serde(default)]
    usage: Option<UsageView>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(serde::Deserialize)]
struct UsageView {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl UsageView {
    fn usage(&self) -> Usage {
        let prompt = self.prompt_tokens.unwrap_or(0);
        let completion = self
            .completion_tokens
            .unwrap_or_else(|| self.total_tokens.map_or(0, |t| t.saturating_sub(prompt)));
        Usage { prompt, completion }
    }
}

fn parse_response(data: &[u8]) -> Option<ResponseView> {
    serde_json::from_slice::<ResponseView>(data).ok()
}

/// What the rewrite phase learned from the request body.
#[derive(Debug, Default)]
struct BodyInfo {
    stream: bool,
    strip_usage_chunk: bool,
    prompt_estimate: u64,
    completion_reserve: u64,
    prompt_hash_input: Vec<u8>,
    rewritten: Option<Bytes>,
    /// The client sent a `cache_salt` (removed or replaced).
    client_salt: bool,
}

fn text_len(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => s.len(),
        serde_json::Value::Array(a) => a.iter().map(text_len).sum(),
        serde_json::Value::Object(o) => o.values().map(text_len).sum(),
        serde_json::Value::Number(_) => 2,
        _ => 0,
    }
}

/// Inspect and rewrite a JSON request body: drop the client's `cache_salt` (and set `salt`
/// instead on generation routes, for a `salted` tenant), ask for stream usage, estimate
/// tokens (about 4 bytes per token, 4 per message, plus `max_tokens` or the tenant default).
fn inspect_body(path: &str, body: &Bytes, default_max_tokens: u64, salt: Option<&str>) -> BodyInfo {
    let mut info = BodyInfo::default();
    if body.is_empty() {
        return info;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
        info.prompt_estimate = body.len().div_ceil(4) as u64;
        info.prompt_hash_input = body.to_vec();
        return info;
    };
    let Some(obj) = v.as_object_mut() else {
        return info;
    };
    info.client_salt = obj.remove("cache_salt").is_some();
    let mut modified = info.client_salt;
    let generates = path.ends_with("/completions");
    if let Some(salt) = salt
        && generates
    {
        obj.insert("cache_salt".into(), serde_json::Value::String(salt.into()));
        modified = true;
    }
    info.stream = obj.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    if info.stream {
        let asked = obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        if !asked {
            let so = obj
                .entry("stream_options")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(so) = so.as_object_mut() {
                so.insert("include_usage".into(), serde_json::Value::Bool(true));
                info.strip_usage_chunk = true;
                modified = true;
            }
        }
    }
    let mut prompt_bytes = 0usize;
    let mut hash_input = Vec::new();
    for k in ["messages", "prompt", "input", "suffix"] {
        if let Some(x) = obj.get(k) {
            prompt_bytes += text_len(x);
            if let Some(a) = x.as_array()
                && k == "messages"
            {
                prompt_bytes += 16 * a.len();
            }
            hash_input.extend_from_slice(k.as_bytes());
            hash_input.push(b'=');
            let _ = serde_json::to_writer(&mut hash_input, x);
            hash_input.push(b'\n');
        }
    }
    info.prompt_hash_input = hash_input;
    info.prompt_estimate = prompt_bytes.div_ceil(4) as u64;
    if generates {
        let n = obj
            .get("n")
            .and_then(|x| x.as_u64())
            .unwrap_or(1)
            .clamp(1, 128);
        let max = obj
            .get("max_completion_tokens")
            .or_else(|| obj.get("max_tokens"))
            .and_then(|x| x.as_u64())
            .unwrap_or(default_max_tokens);
        info.completion_reserve = max.saturating_mul(n);
    }
    if modified {
        info.rewritten = serde_json::to_vec(&v).ok().map(Bytes::from);
    }
    info
}

fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    let mut set = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    if let Some(v) = info.limit_requests {
        set("x-ratelimit-limit-requests", v.to_string());
    }
    if let Some(v) = info.remaining_requests {
        set("x-ratelimit-remaining-requests", v.to_string());
    }
    if let Some(v) = info.reset_requests {
        set("x-ratelimit-reset-requests", format_reset(v));
    }
    if let Some(v) = info.limit_tokens {
        set("x-ratelimit-limit-tokens", v.to_string());
    }
    if let Some(v) = info.remaining_tokens {
        set("x-ratelimit-remaining-tokens", v.to_string());
    }
    if let Some(v) = info.reset_tokens {
        set("x-ratelimit-reset-tokens", format_reset(v));
    }
}

fn set_request_id(r: &mut Response<ProxyBody>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-request-id", v);
    }
}

fn auth_status(e: &AuthError) -> StatusCode {
    match e {
        AuthError::ReplayCacheFull => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    }
}

struct Ctx {
    app: Arc<App>,
    t0: Instant,
    request_id: String,
    method: String,
    route: String,
}

impl Ctx {
    fn audit(&self, tenant: &str, status: StatusCode, reason: Option<String>) -> AuditRecord {
        AuditRecord {
            ts_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tenant: tenant.to_string(),
            request_id: self.request_id.clone(),
            method: self.method.clone(),
            route: self.route.clone(),
            status: status.as_u16(),
            reason,
            latency_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            ..AuditRecord::default()
        }
    }

    fn unattributed(
        &self,
        status: StatusCode,
        reason: &'static str,
        mut resp: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        self.app
            .metrics
            .unattributed_requests
            .get_or_create(&Reason { reason })
            .inc();
        self.app
            .audit
            .record(self.audit(UNAUTHENTICATED, status, Some(reason.to_string())));
        set_request_id(&mut resp, &self.request_id);
        resp
    }
}

/// No dot segments (literal or percent-encoded), so an upstream that normalises paths cannot
/// be steered outside `/v1/`.
fn plain_path(path: &str) -> bool {
    !path.split('/').any(|seg| seg == "." || seg == "..")
        && !path
            .as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%2e"))
}

/// Handle one client request.
pub async fn handle(
    app: Arc<App>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let ctx = Ctx {
        t0: Instant::now(),
        request_id: app.request_id(req.headers()),
        method: req.method().as_str().to_string(),
        route: req.uri().path().to_string(),
        app: app.clone(),
    };
    let rt = app.runtime();
    if !ctx.route.starts_with("/v1/") || !plain_path(&ctx.route) {
        let r = json_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "only /v1/ routes are served",
        );
        return ctx.unattributed(StatusCode::NOT_FOUND, "not_found", r);
    }
    // Phase 1: read the body, bounded.
    let (mut parts, body) = req.into_parts();
    let max_body = rt.config.http.max_body_bytes;
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max_body as u64
    {
        let r = json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            "request body too large",
        );
        return ctx.unattributed(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", r);
    }
    let body = match Limited::new(body, max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                let r = json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "body_too_large",
                    "request body too large",
                );
                return ctx.unattributed(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", r);
            }
            let r = json_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body_unreadable",
                "request body unreadable",
            );
            return ctx.unattributed(StatusCode::BAD_REQUEST, "body_unreadable", r);
        }
    };
    // Phase 2: authenticate.
    let view = RequestView {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let verified = rt.verifier.verify(view, &body, unix_now()).and_then(|v| {
        if rt.config.tenants.contains_key(&v.tenant) {
            Ok(v)
        } else {
            Err(AuthError::UnknownTenant)
        }
    });
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            let reason = e.reason();
            app.metrics
                .auth_failures
                .get_or_create(&Reason { reason })
                .inc();
            tracing::info!(request_id = %ctx.request_id, reason, "request refused: authentication failed");
            let msg = format!("authentication failed ({reason}): {e}");
            let r = json_error(auth_status(&e), "authentication_error", reason, &msg);
            return ctx.unattributed(auth_status(&e), reason, r);
        }
    };
    let tenant = verified.tenant.clone();
    let tcfg = rt
        .config
        .tenants
        .get(&tenant)
        .cloned()
        .unwrap_or_else(|| unreachable!("checked above"));
    // Tag the client socket when its tenant changes.
    if let Some(fd) = &conn.fd {
        let mut cur = conn.tenant.lock().await;
        if cur.as_deref() != Some(tenant.as_str()) {
            app.tagger.tag(fd.as_fd(), &tenant).await;
            *cur = Some(tenant.clone());
        }
    }
    // Phase 3: rewrite.
    let salt = rt.salts.get(&tenant).cloned();
    let info = inspect_body(&ctx.route, &body, tcfg.default_max_tokens, salt.as_deref());
    let prompt_hash = (!info.prompt_hash_input.is_empty())
        .then(|| app.audit.prompt_hash(&info.prompt_hash_input));
    let mut fwd_headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut fwd_headers);
    let spoofable: Vec<HeaderName> = fwd_headers
        .keys()
        .filter(|k| {
            k.as_str().starts_with(RESERVED_PREFIX)
                && !verified.covered_headers.contains(k.as_str())
        })
        .cloned()
        .collect();
    for k in spoofable {
        fwd_headers.remove(k);
    }
    for k in ["signature", "signature-input", "host"] {
        fwd_headers.remove(k);
    }
    let fwd_body = match &info.rewritten {
        Some(b) => {
            if fwd_headers.contains_key("content-digest") {
                fwd_headers.insert(
                    "content-digest",
                    HeaderValue::from_str(&crate::digest::content_digest_sha256(b))
                        .expect("valid header"),
                );
            }
            b.clone()
        }
        None => body.clone(),
    };
    fwd_headers.remove(header::CONTENT_LENGTH);
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        fwd_headers.insert("x-request-id", v);
    }
    let xff = match fwd_headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", conn.peer.ip()),
        None => conn.peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        fwd_headers.insert("x-forwarded-for", v);
    }
    let mut base_rec = ctx.audit(&tenant, StatusCode::OK, None);
    base_rec.key_id = Some(verified.key_id.clone());
    base_rec.stream = info.stream;
    base_rec.prompt_hash = prompt_hash;
    // Phase 4: limits.
    let estimate = info.prompt_estimate + info.completion_reserve;
    let limits = rt
        .limits
        .get(&tenant)
        .cloned()
        .unwrap_or_else(|| unreachable!("tenant is configured"));
    let admission = match limits.admit(estimate) {
        Ok(a) => a,
        Err(rej) => return limited(&ctx, &tenant, base_rec, rej),
    };
    // Until the request is forwarded, any way out (including the client going away while
    // queued) gives the reservation back.
    let mut admission = RefundUnlessForwarded(Some(admission));
    // Phase 5: fair queue.
    let timeout = rt.config.queue_timeout();
    let tm = rt
        .tenant_metrics
        .get(&tenant)
        .cloned()
        .unwrap_or_else(|| unreachable!("tenant is configured"));
    if info.client_salt {
        tm.salt_overrides.inc();
    }
    let queued = tm.queued.clone();
    // Phase 5a: the cache-isolation gate (exclusive windows, flushes).
    let gate_deadline = tokio::time::Instant::now() + timeout;
    let entered = {
        let _waiting = GaugeGuard::new(queued.clone());
        app.gate.enter(&tenant, gate_deadline).await
    };
    let gate_pass = match entered {
        Ok(p) => p,
        Err(e) => {
            drop(admission);
            return gate_refused(&ctx, &tenant, base_rec, e);
        }
    };
    let timeout = gate_deadline.saturating_duration_since(tokio::time::Instant::now());
    let acquired = {
        // Decremented however the wait ends (including the client going away).
        let _waiting = GaugeGuard::new(queued);
        app.sched.acquire(&tenant, timeout).await
    };
    let (permit, waited) = match acquired {
        Ok(p) => p,
        Err(e) => {
            drop(admission);
            let (status, msg) = match e {
                QueueError::Full => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "the tenant's fair-share queue is full",
                ),
                QueueError::Timeout => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timed out waiting for the tenant's fair share of the upstream",
                ),
            };
            let rej = Rejection {
                kind: LimitKind::Queue,
                retry_after: Duration::from_secs(1),
                info: RateInfo::default(),
            };
            return refused(&ctx, &tenant, base_rec, rej, status, msg);
        }
    };
    tm.queue_wait.observe(waited.as_secs_f64());
    base_rec.queue_ms = Some(waited.as_secs_f64() * 1e3);
    base_rec.reserved_tokens = Some(estimate);
    // Phase 6: forward.
    let mut uri_parts = rt.upstream.clone().into_parts();
    uri_parts.path_and_query = parts.uri.path_and_query().cloned();
    let Ok(uri) = Uri::from_parts(uri_parts) else {
        drop(admission);
        let r = json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad_uri",
            "bad request target",
        );
        return ctx.unattributed(StatusCode::BAD_REQUEST, "bad_uri", r);
    };
    let mut up = Request::new(Full::new(fwd_body));
    *up.method_mut() = parts.method.clone();
    *up.uri_mut() = uri;
    *up.headers_mut() = fwd_headers;
    let inflight = tm.inflight.clone();
    inflight.inc();
    let mut kv = KvCharge::new(
        tm.kv_tokens.clone(),
        tm.kv_bytes.clone(),
        rt.kv_bytes_per_token,
    );
    kv.set(info.prompt_estimate);
    let mut outcome = Outcome {
        app: app.clone(),
        tenant: tenant.clone(),
        tm,
        rec: base_rec,
        t0: ctx.t0,
        admission: admission.0.take(),
        permit: Some(permit),
        gate: Some(gate_pass),
        kv,
        inflight,
        // 499 (client closed request) until the upstream answers.
        status: StatusCode::from_u16(499).expect("valid status"),
        responded: false,
        usage: None,
        chunks: 0,
        ended: false,
        prompt_estimate: info.prompt_estimate,
        ttft: None,
    };
    let client = rt
        .clients
        .get(&tenant)
        .cloned()
        .unwrap_or_else(|| unreachable!("tenant is configured"));
    let response_timeout = Duration::from_millis(rt.config.upstream.response_timeout_ms);
    drop(rt);
    let resp = match tokio::time::timeout(response_timeout, client.request(up)).await {
        Ok(Ok(r)) => r,
        Err(_) => {
            // The upstream may be working on it: the reservation stays charged.
            tracing::warn!(tenant = %tenant, request_id = %ctx.request_id, "upstream response timed out");
            outcome.status = StatusCode::GATEWAY_TIMEOUT;
            outcome.responded = true;
            let mut r = json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "upstream_timeout",
                "the inference server did not answer in time",
            );
            set_request_id(&mut r, &ctx.request_id);
            if let Some(a) = outcome.admission.take() {
                a.reconcile(None);
            }
            return r;
        }
        Ok(Err(e)) => {
            tracing::warn!(tenant = %tenant, request_id = %ctx.request_id, error = %e, "upstream request failed");
            if let Some(a) = outcome.admission.take() {
                a.refund();
            }
            outcome.status = StatusCode::BAD_GATEWAY;
            let mut r = json_error(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "upstream_unavailable",
                "the inference server could not be reached",
            );
            set_request_id(&mut r, &ctx.request_id);
            return r; // outcome drops here: metrics and audit with status 502
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    outcome.status = rparts.status;
    outcome.responded = true;
    strip_hop_by_hop(&mut rparts.headers);
    if info.strip_usage_chunk {
        // The body may lose its usage chunk: its length is no longer known.
        rparts.headers.remove(header::CONTENT_LENGTH);
    }
    let is_sse = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if let Some(a) = &outcome.admission {
        rate_headers(&mut rparts.headers, &a.info);
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        rparts.headers.insert("x-request-id", v);
    }
    let mode = if is_sse {
        Mode::Sse(SseFilter {
            buf: BytesMut::new(),
            strip_usage: info.strip_usage_chunk,
        })
    } else {
        Mode::Json(Vec::new())
    };
    let body = MeteredBody {
        inner: rbody,
        mode,
        outcome: Some(outcome),
        tail: None,
        done: false,
    };
    Response::from_parts(rparts, body.boxed_unsync())
}

fn limited(ctx: &Ctx, tenant: &str, rec: AuditRecord, rej: Rejection) -> Response<ProxyBody> {
    let msg = match rej.kind {
        LimitKind::Requests => "rate limit reached: requests per minute",
        LimitKind::Tokens => "rate limit reached: tokens per minute",
        LimitKind::Concurrency => "rate limit reached: concurrent requests",
        LimitKind::Queue => "the tenant's fair-share queue is full",
    };
    refused(ctx, tenant, rec, rej, StatusCode::TOO_MANY_REQUESTS, msg)
}

/// A refusal by a limit or the queue: metrics, audit, `Retry-After` and rate headers.
fn refused(
    ctx: &Ctx,
    tenant: &str,
    mut rec: AuditRecord,
    rej: Rejection,
    status: StatusCode,
    msg: &str,
) -> Response<ProxyBody> {
    let app = &ctx.app;
    let limit = rej.kind.as_str();
    app.metrics
        .rate_limited
        .get_or_create(&TenantLimit {
            tenant: tenant.to_string(),
            limit,
        })
        .inc();
    app.metrics
        .requests
        .get_or_create(&TenantCode {
            tenant: tenant.to_string(),
            code: status.as_u16(),
        })
        .inc();
    let mut r = json_error(status, "rate_limit_error", limit, msg);
    let secs = rej.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    rate_headers(r.headers_mut(), &rej.info);
    set_request_id(&mut r, &ctx.request_id);
    rec.status = status.as_u16();
    rec.reason = Some(limit.to_string());
    rec.latency_ms = ctx.t0.elapsed().as_secs_f64() * 1e3;
    app.audit.record(rec);
    r
}

/// The gate refused: timed out, the flush isolation needs was not confirmed, or requests it
/// must not run beside outlived the drain bound.
fn gate_refused(
    ctx: &Ctx,
    tenant: &str,
    mut rec: AuditRecord,
    e: GateError,
) -> Response<ProxyBody> {
    match e {
        GateError::Timeout => {
            let rej = Rejection {
                kind: LimitKind::Queue,
                retry_after: Duration::from_secs(1),
                info: RateInfo::default(),
            };
            refused(
                ctx,
                tenant,
                rec,
                rej,
                StatusCode::SERVICE_UNAVAILABLE,
                "timed out waiting for the tenant's cache-isolation window",
            )
        }
        GateError::FlushFailed(why) => {
            tracing::warn!(tenant = %tenant, request_id = %ctx.request_id, reason = %why, "request refused: prefix-cache flush not confirmed");
            let status = StatusCode::SERVICE_UNAVAILABLE;
            ctx.app
                .metrics
                .requests
                .get_or_create(&TenantCode {
                    tenant: tenant.to_string(),
                    code: status.as_u16(),
                })
                .inc();
            let mut r = json_error(
                status,
                "server_error",
                "cache_flush_failed",
                "the inference server did not confirm the prefix-cache flush that tenant \
                 isolation needs before this request; it was not forwarded",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            set_request_id(&mut r, &ctx.request_id);
            rec.status = status.as_u16();
            rec.reason = Some("cache_flush_failed".into());
            rec.latency_ms = ctx.t0.elapsed().as_secs_f64() * 1e3;
            ctx.app.audit.record(rec);
            r
        }
        GateError::DrainTimeout => {
            tracing::warn!(tenant = %tenant, request_id = %ctx.request_id, "request refused: requests it must not run beside outlived cache.exclusive_drain_timeout_ms");
            let status = StatusCode::SERVICE_UNAVAILABLE;
            ctx.app
                .metrics
                .requests
                .get_or_create(&TenantCode {
                    tenant: tenant.to_string(),
                    code: status.as_u16(),
                })
                .inc();
            let mut r = json_error(
                status,
                "server_error",
                "exclusive_drain_timeout",
                "requests that prefix-cache isolation does not let this request run beside \
                 were still running after cache.exclusive_drain_timeout_ms; it was not forwarded",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            set_request_id(&mut r, &ctx.request_id);
            rec.status = status.as_u16();
            rec.reason = Some("exclusive_drain_timeout".into());
            rec.latency_ms = ctx.t0.elapsed().as_secs_f64() * 1e3;
            ctx.app.audit.record(rec);
            r
        }
    }
}

struct RefundUnlessForwarded(Option<Admission>);

impl Drop for RefundUnlessForwarded {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.refund();
        }
    }
}

struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn new(g: prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Finishes a forwarded request when its response ends or is dropped.
struct Outcome {
    app: Arc<App>,
    tenant: String,
    tm: Arc<TenantMetrics>,
    rec: AuditRecord,
    t0: Instant,
    admission: Option<Admission>,
    permit: Option<Permit>,
    gate: Option<GatePass>,
    kv: KvCharge,
    inflight: prometheus_client::metrics::gauge::Gauge,
    status: StatusCode,
    responded: bool,
    usage: Option<Usage>,
    chunks: u64,
    ended: bool,
    prompt_estimate: u64,
    ttft: Option<Duration>,
}

impl Outcome {
    /// KV tokens held now: the prompt (real once known) plus what was generated so far.
    fn kv_sync(&mut self) {
        let (prompt, completion) = match self.usage {
            Some(u) => (u.prompt, u.completion.max(self.chunks)),
            None => (self.prompt_estimate, self.chunks),
        };
        self.kv.set(prompt + completion);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let m = &self.app.metrics;
        let t = || self.tenant.clone();
        // Tokens: real usage when the upstream reported it; for a stream that ended without
        // it, the prompt estimate plus one token per chunk; otherwise keep the reservation.
        let usage = self.usage.or_else(|| {
            (self.ended && self.rec.stream && self.chunks > 0).then_some(Usage {
                prompt: self.prompt_estimate,
                completion: self.chunks,
            })
        });
        if let Some(a) = self.admission.take() {
            match usage {
                Some(u) => a.reconcile(Some(u.prompt + u.completion)),
                // The upstream answered with an error: it did no generation work.
                None if self.responded
                    && (self.status.is_client_error() || self.status.is_server_error()) =>
                {
                    a.refund()
                }
                // Forwarded but the outcome is unknown (client gone): keep the reservation.
                None => a.reconcile(None),
            }
        }
        self.permit.take();
        self.kv.set(0);
        self.gate.take();
        self.inflight.dec();
        if let Some(u) = usage {
            self.tm.prompt_tokens.inc_by(u.prompt);
            self.tm.completion_tokens.inc_by(u.completion);
            self.rec.prompt_tokens = Some(u.prompt);
            self.rec.completion_tokens = Some(u.completion);
        }
        if self.status == StatusCode::OK {
            self.tm.ok.inc();
        } else {
            m.requests
                .get_or_create(&TenantCode {
                    tenant: t(),
                    code: self.status.as_u16(),
                })
                .inc();
        }
        let elapsed = self.t0.elapsed();
        self.tm.duration.observe(elapsed.as_secs_f64());
        self.rec.status = self.status.as_u16();
        self.rec.latency_ms = elapsed.as_secs_f64() * 1e3;
        self.rec.ttft_ms = self.ttft.map(|d| d.as_secs_f64() * 1e3);
        if !self.responded && self.status == StatusCode::BAD_GATEWAY {
            self.rec.reason = Some("upstream_unavailable".into());
        } else if !self.responded || (!self.ended && self.status.is_success()) {
            self.rec.reason = Some("client_disconnected".into());
        }
        self.app.audit.record(std::mem::take(&mut self.rec));
    }
}

struct SseFilter {
    buf: BytesMut,
    strip_usage: bool,
}

enum Mode {
    Sse(SseFilter),
    Json(Vec<u8>),
}

fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Look at one SSE event: record usage and count content chunks; false to drop it.
fn inspect_event(ev: &[u8], strip_usage: bool, outcome: &mut Outcome) -> bool {
    let mut keep = true;
    for line in ev.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" || data.is_empty() {
            continue;
        }
        let has_usage = data.windows(7).any(|w| w == b"\"usage\"");
        if !has_usage {
            outcome.chunks += 1;
            continue;
        }
        let Some(v) = parse_response(data) else {
            outcome.chunks += 1;
            continue;
        };
        if let Some(u) = &v.usage {
            outcome.usage = Some(u.usage());
        }
        let empty_choices = v.choices.as_ref().is_some_and(|c| c.is_empty());
        if empty_choices && strip_usage {
            keep = false;
        } else if !empty_choices {
            outcome.chunks += 1;
        }
    }
    keep
}

/// The response body on its way to the client: forwarded frame by frame, metered.
struct MeteredBody {
    inner: Incoming,
    mode: Mode,
    outcome: Option<Outcome>,
    tail: Option<Bytes>,
    done: bool,
}

impl MeteredBody {
    fn on_data(&mut self, data: Bytes) -> Option<Bytes> {
        let outcome = self.outcome.as_mut()?;
        if outcome.ttft.is_none() && !data.is_empty() {
            let d = outcome.t0.elapsed();
            outcome.ttft = Some(d);
            outcome.tm.ttft.observe(d.as_secs_f64());
        }
        match &mut self.mode {
            Mode::Json(buf) => {
                if buf.len() + data.len() <= MAX_USAGE_SCAN {
                    buf.extend_from_slice(&data);
                }
                Some(data)
            }
            Mode::Sse(f) => {
                // Fast path: the frame is exactly whole events and nothing is pending.
                f.buf.extend_from_slice(&data);
                let mut out = BytesMut::new();
                while let Some(end) = event_end(&f.buf) {
                    let ev = f.buf.split_to(end);
                    if inspect_event(&ev, f.strip_usage, outcome) {
                        out.extend_from_slice(&ev);
                    }
                }
                outcome.kv_sync();
                (!out.is_empty()).then(|| out.freeze())
            }
        }
    }

    fn on_end(&mut self) -> Option<Bytes> {
        let mut tail = None;
        if let Some(outcome) = self.outcome.as_mut() {
            match &mut self.mode {
                Mode::Json(buf) => {
                    if let Some(v) = parse_response(buf) {
                        outcome.usage = v.usage.as_ref().map(UsageView::usage);
                    }
                }
                Mode::Sse(f) => {
                    if !f.buf.is_empty() {
                        let ev = f.buf.split();
                        if inspect_event(&ev, f.strip_usage, outcome) {
                            tail = Some(ev.freeze());
                        }
                    }
                }
            }
            outcome.ended = true;
        }
        tail
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(t) = this.tail.take() {
                return Poll::Ready(Some(Ok(Frame::data(t))));
            }
            if this.done {
                this.outcome.take();
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.tail = this.on_end();
                    this.done = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.outcome.take();
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.on_data(data);
                        // With a Content-Length the server may stop polling once it has
                        // written that many bytes: finish as soon as the upstream is done.
                        if this.inner.is_end_stream() && !this.done {
                            this.tail = this.on_end();
                            this.done = true;
                        }
                        if let Some(out) = out {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.tail.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.mode {
            // Passed through unchanged: the upstream's length holds.
            Mode::Json(_) => self.inner.size_hint(),
            Mode::Sse(_) => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_body_strips_salt_and_asks_for_usage() {
        let b = Bytes::from_static(br#"{"model":"m","cache_salt":"victim","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hello there"}]}"#);
        let i = inspect_body("/v1/chat/completions", &b, 256, None);
        assert!(i.stream && i.strip_usage_chunk && i.client_salt);
        assert_eq!(i.completion_reserve, 10);
        assert!(i.prompt_estimate >= 3);
        let v: serde_json::Value = serde_json::from_slice(i.rewritten.as_ref().unwrap()).unwrap();
        assert!(v.get("cache_salt").is_none());
        assert_eq!(v["stream_options"]["include_usage"], true);
        // A client that asked for usage keeps its chunk; no salt, nothing rewritten.
        let b = Bytes::from_static(
            br#"{"stream":true,"stream_options":{"include_usage":true},"prompt":"x"}"#,
        );
        let i = inspect_body("/v1/completions", &b, 7, None);
        assert!(!i.strip_usage_chunk && i.rewritten.is_none() && !i.client_salt);
        assert_eq!(i.completion_reserve, 7);
        // Embeddings reserve no completion.
        let b = Bytes::from_static(br#"{"input":"abcd abcd"}"#);
        assert_eq!(
            inspect_body("/v1/embeddings", &b, 7, None).completion_reserve,
            0
        );
        // A salted tenant's salt replaces the client's, on generation routes only.
        let b = Bytes::from_static(br#"{"prompt":"x","cache_salt":"mine"}"#);
        let i = inspect_body("/v1/completions", &b, 7, Some("s3cret"));
        let v: serde_json::Value = serde_json::from_slice(i.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["cache_salt"], "s3cret");
        assert!(i.client_salt);
        let b = Bytes::from_static(br#"{"input":"x"}"#);
        assert!(
            inspect_body("/v1/embeddings", &b, 7, Some("s"))
                .rewritten
                .is_none()
        );
    }

    #[test]
    fn dot_segments_are_refused() {
        assert!(plain_path("/v1/chat/completions"));
        assert!(!plain_path("/v1/../admin"));
        assert!(!plain_path("/v1/./models"));
        assert!(!plain_path("/v1/%2E%2e/admin"));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn sse_event_boundaries() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\nx"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
    }
}
