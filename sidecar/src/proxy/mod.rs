//! The request path, as phases over one [`Exchange`]:
//!
//! route -> authenticate (headers only) -> read body (bounded in size, time and memory) ->
//! verify body digest -> inspect / rewrite -> scan for leaks -> limits -> tag the client socket -> cache gate ->
//! fair queue (by tokens, within the tenant's KV quota) -> forward -> meter the response.
//!
//! Each phase returns `Result<_, Refusal>`. Whatever happens (refused, forwarded, upstream
//! error, client gone) the exchange's one finish step ([`Exchange`]'s `Drop`) settles tokens,
//! releases what the request held and writes metrics and the audit record; `x-request-id` is
//! set in [`handle`] alone.

mod exchange;
mod inspect;
mod meter;
mod refusal;
pub mod responses;
mod routes;
pub mod schema;
pub mod upstream;

pub use exchange::Usage;
pub use inspect::{DEFAULT_MEDIA_TOKENS, Inspected, MAX_CHOICES, MAX_DEPTH, Policy, inspect};
pub use meter::UsageScanner;
pub use refusal::Refusal;
pub use routes::{Api, ROUTES, Route, classify};

use crate::auth::scope::Scope;
use crate::auth::signature::NonceRecord;
use crate::auth::signature::{PendingAuth, RESERVED_PREFIX, RequestView};
use crate::http_util::ProxyBody;
use crate::limits::shared::{Grant, SharedError};
use crate::node::kv::KvCharge;
use crate::runtime::{App, ConnCtx, Runtime, TenantRuntime};
use bytes::{Bytes, BytesMut};
use exchange::{BodyBytes, End, Exchange, Held};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The client's `x-request-id`, when it is one we may record.
fn client_request_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| v.to_string())
}

/// Handle one client request.
pub async fn handle(
    app: Arc<App>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut ex = Exchange::new(
        app,
        req.method().clone(),
        req.uri().path().to_string(),
        client_request_id(req.headers()),
        req.headers(),
    );
    let request_id = ex.request_id_header.clone();
    let mut resp = match proxy(&mut ex, &conn, req).await {
        Ok(forward) => {
            let Forward {
                resp,
                strip_usage,
                write_idle,
                deadline,
            } = forward;
            meter::respond(ex, resp, strip_usage, write_idle, deadline).await
        }
        Err(refusal) => {
            let resp = refusal.response();
            ex.end = End::Refused(refusal);
            drop(ex);
            resp
        }
    };
    resp.headers_mut().insert("x-request-id", request_id);
    resp
}

/// The upstream's answer, ready to be metered.
struct Forward {
    resp: Response<Incoming>,
    strip_usage: bool,
    write_idle: Duration,
    deadline: tokio::time::Instant,
}

async fn proxy(
    ex: &mut Exchange,
    conn: &ConnCtx,
    req: Request<Incoming>,
) -> Result<Forward, Refusal> {
    let rt = ex.app.runtime();
    let route = classify(req.method(), req.uri().path())?;
    ex.route_kind = Some(route);
    let (parts, body) = req.into_parts();
    let t = ex.trace.now();
    let r = authenticate(ex, &rt, &parts);
    ex.trace.phase("authenticate", t, r.is_err());
    let (credential, tenant) = r?;
    let scope = credential.scope().clone();
    check_route(route, parts.uri.path(), &tenant, &scope)?;
    let t = ex.trace.now();
    let body = read_body(ex, &rt, &parts, body).await;
    ex.trace.phase("read_body", t, body.is_err());
    let body = body?;
    let (verified, nonce) = match credential {
        Credential::Signed(pending) => {
            let t = ex.trace.now();
            let r = verify_body(ex, &rt, pending, &body, &tenant).await;
            ex.trace.phase("verify_digest", t, r.is_err());
            let (v, nonce) = r?;
            (
                Verified {
                    key_id: v.key_id,
                    covered_headers: v.covered_headers,
                },
                nonce,
            )
        }
        // A bearer token covers no body and no header (and has no nonce).
        Credential::Token(id) => (
            Verified {
                key_id: format!("jwt:{}", id.kid),
                covered_headers: Default::default(),
            },
            None,
        ),
    };
    // Attributed to the tenant only once everything verified.
    ex.key_id = Some(verified.key_id.clone());
    ex.tenant = Some(tenant.clone());
    // The trace: the client's continued only for a tenant trusted to.
    ex.trace.decide(tenant.trust_traceparent);
    let t = ex.trace.now();
    let info = async {
        let info = inspect_body(ex, &rt, route, &tenant, &scope, &parts, body)?;
        scan_prompt(ex, &rt, &tenant, &info)?;
        stored_responses(ex, &tenant, &info).await?;
        Ok(info)
    }
    .await;
    ex.trace.phase("inspect", t, info.is_err());
    let info = info?;
    let t = ex.trace.now();
    let r = admit(ex, &rt, &tenant, &info, nonce).await;
    ex.trace.phase("limits", t, r.is_err());
    r?;
    let t = ex.trace.now();
    tag_client(ex, conn, &tenant).await;
    ex.trace.phase("tag", t, false);
    let ask = crate::limits::wfq::Ask {
        prompt: info.prompt_estimate,
        completion_reserve: info.completion_reserve,
    };
    let (permit, gate) = wait_turn(ex, &tenant, &rt, ask).await?;
    let up = upstream_request(ex, &rt, conn, parts, &verified.covered_headers, info.body)?;
    let kv = KvCharge::new(
        tenant.metrics.kv_tokens.clone(),
        tenant.metrics.kv_bytes.clone(),
        rt.kv_bytes_per_token,
    );
    ex.held = Some(Held::new(permit, gate, kv, tenant.metrics.inflight.clone()));
    ex.meter.prompt_estimate = info.prompt_estimate;
    ex.kv_sync();
    forward(ex, &rt, &tenant, up, info.strip_usage_chunk).await
}

/// How a request proved its tenant.
enum Credential {
    /// An RFC 9421 signature over the head; the body's digest is checked once read.
    Signed(PendingAuth),
    /// A verified JWT.
    Token(crate::auth::jwt::JwtIdentity),
}

impl Credential {
    fn scope(&self) -> &Arc<Scope> {
        match self {
            Credential::Signed(p) => p.scope(),
            Credential::Token(t) => &t.scope,
        }
    }
}

/// What authentication proved, once the body is read.
struct Verified {
    key_id: String,
    /// Lowercase names of the headers the credential covers (kept even if reserved).
    covered_headers: std::collections::HashSet<String>,
}

/// Phase: authenticate from the headers alone and look the tenant up once. A request with
/// `Signature` or `Signature-Input` is verified as signed (the body is checked later); one
/// with only `Authorization: Bearer` as a JWT, when `[auth.jwt]` is configured. Each method
/// only on the routes its configuration lists.
fn authenticate(
    ex: &mut Exchange,
    rt: &Runtime,
    parts: &Parts,
) -> Result<(Credential, Arc<TenantRuntime>), Refusal> {
    let h = &parts.headers;
    let signed = h.contains_key("signature") || h.contains_key("signature-input");
    if !signed && let Some(jwt) = &rt.jwt {
        let token = crate::auth::jwt::bearer(h).map_err(|e| Refusal::auth(&e))?;
        if let Some(token) = token {
            use crate::auth::signature::AuthError;
            if !jwt.routes.allows(parts.uri.path()) {
                return Err(Refusal::auth(&AuthError::MethodNotAccepted("JWT")));
            }
            let id = jwt
                .verify(token, unix_now())
                .map_err(|e| Refusal::auth(&e))?;
            let tenant = rt
                .tenant(&id.tenant)
                .cloned()
                .ok_or_else(|| Refusal::auth(&AuthError::UnknownTenant))?;
            return Ok((Credential::Token(id), tenant));
        }
    }
    if signed && !rt.hmac_routes.allows(parts.uri.path()) {
        return Err(Refusal::auth(
            &crate::auth::signature::AuthError::MethodNotAccepted("signed"),
        ));
    }
    let view = RequestView {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let pending = rt.verifier.verify_head(view, unix_now()).map_err(|e| {
        // These come after the signature verified: the tenant header it covers is what a
        // real key signed (for tenant_mismatch, a tenant the key may not speak for).
        if e.after_signature() {
            ex.signed_for = parts
                .headers
                .get(crate::auth::signature::TENANT_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|name| rt.tenant(name.trim()))
                .cloned();
        }
        Refusal::auth(&e)
    })?;
    let tenant = rt
        .tenant(pending.tenant())
        .cloned()
        .ok_or_else(|| Refusal::auth(&crate::auth::signature::AuthError::UnknownTenant))?;
    Ok((Credential::Signed(pending), tenant))
}

/// Phase: the body against the signed digest, then the nonce recorded: in this process, or in
/// the replay cache shared by the replicas. When the shared limits record it in the admission's
/// own script (one round trip for both), it is returned to be recorded there.
async fn verify_body(
    ex: &mut Exchange,
    rt: &Runtime,
    pending: PendingAuth,
    body: &Bytes,
    tenant: &Arc<TenantRuntime>,
) -> Result<(crate::auth::signature::Verified, Option<NonceRecord>), Refusal> {
    let Some(shared) = &ex.app.shared else {
        return match pending.finish(&rt.verifier, body, unix_now()) {
            Ok(v) => Ok((v, None)),
            Err(e) => {
                ex.signed_for = Some(tenant.clone());
                Err(Refusal::auth(&e))
            }
        };
    };
    let shared = shared.clone();
    let (verified, nonce) = pending
        .finish_unrecorded(&rt.verifier, body, unix_now())
        .map_err(|e| {
            ex.signed_for = Some(tenant.clone());
            Refusal::auth(&e)
        })?;
    if tenant.shared.is_some() && shared.records_nonce_at_admission() {
        return Ok((verified, Some(nonce)));
    }
    match shared.record_nonce(&rt.verifier, &nonce).await {
        Ok(()) => Ok((verified, None)),
        Err(SharedError::Auth(e)) => {
            ex.signed_for = Some(tenant.clone());
            Err(Refusal::auth(&e))
        }
        Err(e) => Err(Refusal::shared(e)),
    }
}

/// Phase: the route's policy for this tenant, and the credential's route scope.
fn check_route(
    route: Route,
    path: &str,
    tenant: &TenantRuntime,
    scope: &Scope,
) -> Result<(), Refusal> {
    check_route_policy(route, tenant)?;
    if !scope.routes.allows(path) {
        return Err(Refusal::denied("route", path));
    }
    // An unknown route is forwarded opaque: nothing in its body could be held to the scope.
    if route == Route::Unknown && scope.limits_body() {
        return Err(Refusal::permission(format!(
            "route {} is not inspected, so a credential limited to models, tools or \
             max_tokens cannot use it",
            crate::auth::scope::quoted(path)
        )));
    }
    Ok(())
}

fn check_route_policy(route: Route, tenant: &TenantRuntime) -> Result<(), Refusal> {
    match route {
        Route::Admin => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "route_forbidden",
            "this route changes the inference server for every tenant and is never forwarded",
        )),
        Route::Unknown if tenant.unknown_routes == crate::config::UnknownRoutes::Refuse => {
            Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_route",
                "the sidecar does not forward this route for this tenant",
            ))
        }
        _ => Ok(()),
    }
}

/// Phase: read the body, bounded in size (413), time (408) and, all requests together, in
/// memory (503).
async fn read_body(
    ex: &mut Exchange,
    rt: &Runtime,
    parts: &Parts,
    mut body: Incoming,
) -> Result<Bytes, Refusal> {
    let http = &rt.config.http;
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body larger than {} bytes", http.max_body_bytes),
        )
    };
    let busy = || {
        Refusal::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "too many request bodies in flight; try again",
        )
        .with_retry(Duration::from_secs(1))
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > http.max_body_bytes as u64) {
        return Err(too_large());
    }
    let app = ex.app.clone();
    let reserve = |n: usize, held: &mut Option<BodyBytes>| -> bool {
        if n == 0 {
            return true;
        }
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let Ok(p) = app.body_budget.clone().try_acquire_many_owned(n32) else {
            return false;
        };
        app.metrics.inflight_body_bytes.inc_by(n as i64);
        match held {
            Some(h) => h.permit.merge(p),
            None => {
                *held = Some(BodyBytes {
                    permit: p,
                    gauge: app.metrics.inflight_body_bytes.clone(),
                })
            }
        }
        true
    };
    let declared = declared.unwrap_or(0) as usize;
    if !reserve(declared, &mut ex.body_bytes) {
        return Err(busy());
    }
    let read = async {
        // The common case, a body in one frame, is kept without a copy.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                Refusal::invalid("body_unreadable", "the request body could not be read")
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if len + data.len() > http.max_body_bytes {
                return Err(too_large());
            }
            let beyond = (len + data.len()).saturating_sub(declared.max(len));
            if !reserve(beyond, &mut ex.body_bytes) {
                return Err(busy());
            }
            len += data.len();
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                prev => {
                    if let Some(p) = prev {
                        buf.reserve(declared.max(len));
                        buf.extend_from_slice(&p);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
        Ok(first.unwrap_or_else(|| buf.freeze()))
    };
    match tokio::time::timeout(Duration::from_millis(http.body_read_timeout_ms), read).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                http.body_read_timeout_ms
            ),
        )),
    }
}

/// Phase: parse and rewrite what the route needs; the rest is forwarded as it came.
fn inspect_body(
    ex: &mut Exchange,
    rt: &Runtime,
    route: Route,
    tenant: &TenantRuntime,
    scope: &Scope,
    parts: &Parts,
    body: Bytes,
) -> Result<Inspected, Refusal> {
    let mut info = if route.inspected() {
        if let Some(enc) = parts.headers.get(header::CONTENT_ENCODING)
            && enc.as_bytes() != b"identity"
        {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_content_encoding",
                "request bodies on this route must not be content-encoded",
            ));
        }
        let policy = Policy {
            default_max_tokens: tenant.default_max_tokens,
            salt: tenant.salt.as_deref(),
            scope: Some(scope),
            request_id: &ex.request_id,
            flavor: rt.config.upstream.flavor,
            priority: tenant.priority,
            trusted: &tenant.trusted_engine_fields,
            extra_fields: &tenant.extra_fields,
            store_responses: tenant.store_responses,
            media_tokens: rt
                .config
                .model
                .as_ref()
                .map_or(DEFAULT_MEDIA_TOKENS, |m| m.media_part_tokens),
            prompt_key: Some(ex.app.audit.prompt_key()),
        };
        inspect(route, &body, policy)?
    } else if matches!(route, Route::Models | Route::StoredResponse) {
        if !body.is_empty() {
            return Err(Refusal::invalid(
                "unexpected_body",
                "this route takes no request body",
            ));
        }
        // A stored response is the tenant's only if this sidecar handed its id to it.
        let stored = parts
            .uri
            .path()
            .strip_prefix("/v1/responses/")
            .filter(|_| route == Route::StoredResponse)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string);
        Inspected {
            previous_response_id: stored,
            ..Inspected::default()
        }
    } else {
        // An unknown route the tenant may use: opaque, reserved by size.
        Inspected {
            prompt_estimate: body.len().div_ceil(4) as u64,
            body,
            ..Inspected::default()
        }
    };
    if info.client_salt {
        tenant.metrics.salt_overrides.inc();
    }
    ex.stream = info.stream;
    ex.model = info.model.take();
    ex.prompt_hash = info.prompt_hash.take();
    Ok(info)
}

/// How long a stored response's owner is remembered in Redis.
const STORED_RESPONSE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Phase: a `previous_response_id` must be one this sidecar handed to the same tenant (asked of
/// Redis when this replica does not know it); the id of a response the upstream will store is
/// remembered as the tenant's.
async fn stored_responses(
    ex: &Exchange,
    tenant: &TenantRuntime,
    info: &Inspected,
) -> Result<(), Refusal> {
    use crate::proxy::responses::Owner;
    let shared = ex.app.shared.as_ref().filter(|_| tenant.shared.is_some());
    if let Some(id) = &info.previous_response_id {
        let owned = match ex.app.responses.owner(id, &tenant.name) {
            Owner::Tenant => true,
            Owner::Other => false,
            Owner::Unknown => match shared {
                Some(s) => s.owns_response(&tenant.name, id).await == Some(true),
                None => false,
            },
        };
        if !owned {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "previous_response_not_found",
                format!(
                    "previous_response_id {} is not a response this tenant stored",
                    crate::auth::scope::quoted(id)
                ),
            ));
        }
    }
    if let Some(id) = &info.stored_response_id {
        ex.app.responses.record(id, &tenant.name);
        if let Some(s) = shared {
            s.record_response(&tenant.name, id, STORED_RESPONSE_TTL)
                .await;
        }
    }
    Ok(())
}

/// Phase: other tenants' canaries and keywords, and injection markers, in the prompt; a
/// canary refuses the request under `leaks.on_canary = "block"`. Sets up the response scan.
fn scan_prompt(
    ex: &mut Exchange,
    rt: &Runtime,
    tenant: &TenantRuntime,
    info: &Inspected,
) -> Result<(), Refusal> {
    let pats = &rt.leaks;
    pats.scan(
        &tenant.name,
        &info.prompt_text,
        crate::record::leaks::Where::Prompt,
        &mut ex.leaks,
    );
    if pats.scans_responses() {
        ex.leak_scan = Some((pats.clone(), crate::record::leaks::ResponseScan::default()));
    }
    if pats.blocks(&ex.leaks) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "canary_blocked",
            "the request carries a marker that belongs to another tenant's data",
        ));
    }
    Ok(())
}

/// Phase: the tenant's limits; a request larger than its whole token budget is refused.
async fn admit(
    ex: &mut Exchange,
    rt: &Runtime,
    tenant: &Arc<TenantRuntime>,
    info: &Inspected,
    nonce: Option<NonceRecord>,
) -> Result<(), Refusal> {
    let estimate = info.prompt_estimate.saturating_add(info.completion_reserve);
    if let Some(tpm) = tenant.limits.numbers().tokens_per_minute
        && estimate > tpm
    {
        return Err(Refusal::invalid(
            "request_too_large",
            format!(
                "this request may use up to {estimate} tokens (prompt estimate plus max_tokens \
                 x choices x prompts), more than the tenant's limit of {tpm} tokens per minute; lower \
                 max_tokens"
            ),
        ));
    }
    let admission = match &tenant.shared {
        None => Grant::Local(tenant.limits.admit(estimate).map_err(Refusal::limit)?),
        Some(shared) => {
            let nonce = nonce.as_ref().map(|n| (&rt.verifier, n));
            match shared.admit(estimate, nonce).await {
                Ok(g) => g,
                Err(SharedError::Auth(e)) => {
                    // The nonce was recorded with the admission: refused as authentication
                    // (never attributed to the tenant), as in the verify phase.
                    ex.tenant = None;
                    ex.key_id = None;
                    ex.prompt_hash = None;
                    ex.stream = false;
                    ex.signed_for = Some(tenant.clone());
                    return Err(Refusal::auth(&e));
                }
                Err(e) => return Err(Refusal::shared(e)),
            }
        }
    };
    ex.reserved = Some(estimate);
    ex.admission = Some(admission);
    Ok(())
}

/// Phase: tag the client socket with the tenant, once admitted (capped per tenant).
async fn tag_client(ex: &Exchange, conn: &ConnCtx, tenant: &TenantRuntime) {
    if let Some(fd) = &conn.fd {
        let mut slot = conn.tag.lock().await;
        ex.app
            .tagger
            .tag_connection(fd.as_fd(), &mut slot, &tenant.name)
            .await;
    }
}

/// Phases: the cache-isolation gate, then the fair queue, within the queue timeout.
async fn wait_turn(
    ex: &mut Exchange,
    tenant: &TenantRuntime,
    rt: &Runtime,
    ask: crate::limits::wfq::Ask,
) -> Result<(crate::limits::wfq::Permit, crate::cache::GatePass), Refusal> {
    let deadline = tokio::time::Instant::now() + rt.config.queue_timeout();
    let queued = tenant.metrics.queued.clone();
    queued.inc();
    let _waiting = scopeguard(move || {
        queued.dec();
    });
    let t = ex.trace.now();
    let started = std::time::Instant::now();
    let mut flushes = Vec::new();
    let gate = ex
        .app
        .gate
        .enter_recording(&tenant.name, deadline, &mut flushes)
        .await;
    ex.gate_wait = Some(started.elapsed());
    if t.is_some() {
        // Each prefix-cache flush this request made, as an event of the gate's span.
        let events = flushes
            .iter()
            .map(|f| agent_common::otlp::Event {
                time_unix_nano: ex.trace.unix(f.started),
                name: "bulkhead.cache.flush".into(),
                attrs: vec![
                    agent_common::otlp::attr("bulkhead.cache.flush.result", f.result),
                    agent_common::otlp::attr(
                        "bulkhead.cache.flush.duration_ms",
                        f.took.as_secs_f64() * 1e3,
                    ),
                ],
            })
            .collect();
        let attrs = vec![agent_common::otlp::attr(
            "bulkhead.cache.flushes",
            flushes.len() as u64,
        )];
        ex.trace
            .phase_with("cache_gate", t, gate.is_err(), attrs, events);
    }
    let gate = gate.map_err(Refusal::gate)?;
    let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
    let t = ex.trace.now();
    let r = ex.app.sched.acquire(&tenant.name, ask, timeout).await;
    ex.trace.phase("fair_queue", t, r.is_err());
    let (permit, waited) = r.map_err(Refusal::queue)?;
    tenant.metrics.queue_wait.observe(waited.as_secs_f64());
    ex.queue_wait = Some(waited);
    Ok((permit, gate))
}

/// Runs `f` when dropped (however the enclosing future ends).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Phase: the request as the upstream gets it.
fn upstream_request(
    ex: &mut Exchange,
    rt: &Runtime,
    conn: &ConnCtx,
    parts: Parts,
    covered: &std::collections::HashSet<String>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, Refusal> {
    let mut h = parts.headers;
    crate::proxy::upstream::strip_hop_by_hop(&mut h);
    // The client's credential (a bearer token, a gateway API key) stays here unless asked.
    if !rt.config.auth.forward_authorization {
        h.remove(header::AUTHORIZATION);
    }
    let spoofable: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX) && !covered.contains(k.as_str()))
        .cloned()
        .collect();
    for k in spoofable {
        h.remove(k);
    }
    // The body may have been re-serialised: a digest sent along describes the new one.
    let had_digest = h.contains_key("content-digest");
    for k in [
        "signature",
        "signature-input",
        "host",
        "content-digest",
        "content-length",
        "x-request-id",
    ] {
        h.remove(k);
    }
    if had_digest {
        h.insert(
            "content-digest",
            HeaderValue::from_str(&crate::auth::digest::content_digest_sha256(&body))
                .expect("a digest is a valid header value"),
        );
    }
    h.insert("x-request-id", ex.request_id_header.clone());
    // The trace context is the sidecar's: the upstream's spans join the sidecar's trace, never
    // one a client named (a trusted tenant's trace is continued through the sidecar's span).
    h.remove("traceparent");
    h.remove("tracestate");
    if let Some((parent, state)) = ex.trace.upstream() {
        h.insert("traceparent", parent);
        if let Some(state) = state {
            h.insert("tracestate", state);
        }
    }
    // Identity headers that routers and engines behind the sidecar read: the verified tenant,
    // never the client's.
    let tenant = ex
        .tenant
        .as_ref()
        .and_then(|t| HeaderValue::from_str(&t.name).ok());
    for name in &rt.config.upstream.identity_headers {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            h.remove(&n);
            if let Some(v) = &tenant {
                h.insert(n, v.clone());
            }
        }
    }
    // The answer must be readable to be scanned and metered: never compressed (an encoded
    // answer is refused, see meter.rs).
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", conn.peer.ip()),
        None => conn.peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    let mut uri_parts = rt.upstream.clone().into_parts();
    uri_parts.path_and_query = parts.uri.path_and_query().cloned();
    let uri = Uri::from_parts(uri_parts)
        .map_err(|_| Refusal::invalid("bad_uri", "bad request target"))?;
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = h;
    Ok(up)
}

/// Phase: send it on the tenant's own pool and wait for the response head.
async fn forward(
    ex: &mut Exchange,
    rt: &Runtime,
    tenant: &TenantRuntime,
    up: Request<Full<Bytes>>,
    strip_usage: bool,
) -> Result<Forward, Refusal> {
    let timeout = Duration::from_millis(rt.config.upstream.response_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    ex.forwarded = true;
    ex.sent_at = Some(std::time::Instant::now());
    let answer = tokio::time::timeout_at(deadline, tenant.client.request(up)).await;
    ex.trace.upstream_done(match &answer {
        Ok(Ok(resp)) => Some(resp.status().as_u16()),
        _ => None,
    });
    match answer {
        Ok(Ok(resp)) => Ok(Forward {
            resp,
            strip_usage,
            write_idle: Duration::from_millis(rt.config.http.response_write_idle_timeout_ms),
            deadline,
        }),
        Err(_) => {
            tracing::warn!(tenant = %tenant.name, request_id = %ex.request_id, "upstream response timed out");
            Err(Refusal::server(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the inference server did not answer in time",
            ))
        }
        Ok(Err(e)) => {
            tracing::warn!(tenant = %tenant.name, request_id = %ex.request_id, error = %e, "upstream request failed");
            // Nothing reached the upstream's model: the reservation is given back.
            ex.forwarded = false;
            Err(Refusal::server(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the inference server could not be reached",
            ))
        }
    }
}
