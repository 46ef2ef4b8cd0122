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

mod auth_phase;
mod exchange;
mod forward;
mod inspect;
mod meter;
mod refusal;
pub mod responses;
mod routes;
mod scan;
pub mod schema;
pub mod upstream;

pub use exchange::Usage;
pub use inspect::{
    DEFAULT_MEDIA_TOKENS, Inspected, MAX_CHOICES, MAX_DEPTH, Policy, inspect, inspect_bytes,
};
pub use meter::UsageScanner;
pub use refusal::{Refusal, RefusalCode};
pub use routes::{Api, ROUTES, Route, classify};

use crate::auth::scope::Scope;
use crate::auth::signature::NonceRecord;
use crate::http_util::ProxyBody;
use crate::limits::shared::{Grant, SharedError};
use crate::node::kv::KvCharge;
use crate::runtime::{App, ConnCtx, Runtime, TenantRuntime};
use auth_phase::{Credential, Verified, authenticate, check_route, verify_body};
use bytes::{Bytes, BytesMut};
use exchange::{Exchange, Held, Inspecting};
use forward::{Forward, forward, upstream_request};
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

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
    let request_id = ex.request_id_header().clone();
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
            ex.refuse(refusal);
            drop(ex);
            resp
        }
    };
    resp.headers_mut().insert("x-request-id", request_id);
    resp
}

async fn proxy(
    ex: &mut Exchange,
    conn: &ConnCtx,
    req: Request<Incoming>,
) -> Result<Forward, Refusal> {
    let rt = ex.app().runtime();
    let route = classify(req.method(), req.uri().path())?;
    ex.classified(route);
    let (parts, body) = req.into_parts();
    let t = ex.trace().now();
    let r = authenticate(ex, &rt, &parts);
    ex.trace().phase("authenticate", t, r.is_err());
    let (credential, tenant) = r?;
    let scope = credential.scope().clone();
    check_route(route, parts.uri.path(), &tenant, &scope)?;
    let t = ex.trace().now();
    let body = read_body(ex, &rt, &parts, body).await;
    ex.trace().phase("read_body", t, body.is_err());
    let body = body?;
    let (verified, nonce) = match credential {
        Credential::Signed(pending) => {
            let t = ex.trace().now();
            let r = verify_body(ex, &rt, pending, &body, &tenant).await;
            ex.trace().phase("verify_digest", t, r.is_err());
            let (v, nonce) = r?;
            (
                Verified {
                    key_id: v.key_id,
                    covered_headers: v.covered_headers,
                    digest_prefixes: v.digest_prefixes,
                },
                nonce,
            )
        }
        // A bearer token covers no body and no header (and has no nonce).
        Credential::Token(id) => (
            Verified {
                key_id: format!("jwt:{}", id.kid),
                covered_headers: Default::default(),
                digest_prefixes: None,
            },
            None,
        ),
    };
    // Attributed to the tenant only once everything verified.
    ex.attribute(tenant.clone(), verified.key_id);
    let t = ex.trace().now();
    // The client's bytes, kept until the forwarded body's digest is taken.
    let client_body = body.clone();
    let info = async {
        let info = inspect_body(
            &mut ex.inspecting(),
            &rt,
            route,
            &tenant,
            &scope,
            &parts,
            body,
        )?;
        scan_prompt(&mut ex.inspecting(), &rt, &tenant, &info)?;
        stored_responses(ex, &tenant, &info).await?;
        Ok(info)
    }
    .await;
    ex.trace().phase("inspect", t, info.is_err());
    let info = info?;
    let t = ex.trace().now();
    let r = admit(ex, &rt, &tenant, &info, nonce).await;
    ex.trace().phase("limits", t, r.is_err());
    r?;
    let t = ex.trace().now();
    tag_client(ex, conn, &tenant).await;
    ex.trace().phase("tag", t, false);
    let ask = crate::limits::wfq::Ask {
        prompt: info.prompt_estimate,
        completion_reserve: info.completion_reserve,
    };
    let (permit, gate) = wait_turn(ex, &tenant, &rt, ask).await?;
    let up = upstream_request(
        ex,
        &rt,
        conn,
        parts,
        &verified.covered_headers,
        (&client_body, verified.digest_prefixes.as_ref(), info.body),
    )?;
    drop(client_body);
    let kv = KvCharge::new(
        tenant.metrics.kv_tokens.clone(),
        tenant.metrics.kv_bytes.clone(),
        rt.kv_bytes_per_token,
    );
    ex.hold(
        Held::new(permit, gate, kv, tenant.metrics.inflight.clone()),
        info.prompt_estimate,
    );
    // A long prompt's audit hash is taken while the upstream works: its task is spawned before
    // the request is sent, so the connection's task, which the request wakes, runs first.
    if let Some(h) = &ex.inspecting().prompt_hash {
        h.start();
    }
    forward(ex, &rt, &tenant, up, info.strip_usage_chunk).await
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
            RefusalCode::BodyTooLarge,
            format!("request body larger than {} bytes", http.max_body_bytes),
        )
    };
    let busy = || {
        Refusal::new(
            RefusalCode::ServerBusy,
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
    let declared = declared.unwrap_or(0) as usize;
    if !ex.reserve_body(declared) {
        return Err(busy());
    }
    let read = async {
        // The common case, a body in one frame, is kept without a copy.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                Refusal::new(
                    RefusalCode::BodyUnreadable,
                    "the request body could not be read",
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if len + data.len() > http.max_body_bytes {
                return Err(too_large());
            }
            let beyond = (len + data.len()).saturating_sub(declared.max(len));
            if !ex.reserve_body(beyond) {
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
            RefusalCode::BodyTimeout,
            format!(
                "the request body did not arrive within {} ms",
                http.body_read_timeout_ms
            ),
        )),
    }
}

/// Phase: parse and rewrite what the route needs; the rest is forwarded as it came.
#[allow(
    clippy::needless_borrow,
    reason = "`&ex.request_id` kept as written before `Inspecting` (the body is being rewritten \
              with the one-pass scanner); drop the `&` then"
)]
fn inspect_body(
    ex: &mut Inspecting<'_>,
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
                RefusalCode::UnsupportedContentEncoding,
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
        inspect_bytes(route, &body, policy)?
    } else if matches!(route, Route::Models | Route::StoredResponse) {
        if !body.is_empty() {
            return Err(Refusal::new(
                RefusalCode::UnexpectedBody,
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
    let shared = ex.app().shared.as_ref().filter(|_| tenant.shared.is_some());
    if let Some(id) = &info.previous_response_id {
        let owned = match ex.app().responses.owner(id, &tenant.name) {
            Owner::Tenant => true,
            Owner::Other => false,
            Owner::Unknown => match shared {
                Some(s) => s.owns_response(&tenant.name, id).await == Some(true),
                None => false,
            },
        };
        if !owned {
            return Err(Refusal::new(
                RefusalCode::PreviousResponseNotFound,
                format!(
                    "previous_response_id {} is not a response this tenant stored",
                    crate::auth::scope::quoted(id)
                ),
            ));
        }
    }
    if let Some(id) = &info.stored_response_id {
        ex.app().responses.record(id, &tenant.name);
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
    ex: &mut Inspecting<'_>,
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
            RefusalCode::CanaryBlocked,
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
        return Err(Refusal::new(
            RefusalCode::RequestTooLarge,
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
                    ex.unattribute(tenant.clone());
                    return Err(Refusal::auth(&e));
                }
                Err(e) => return Err(Refusal::shared(e)),
            }
        }
    };
    ex.admitted(estimate, admission);
    Ok(())
}

/// Phase: tag the client socket with the tenant, once admitted (capped per tenant).
async fn tag_client(ex: &Exchange, conn: &ConnCtx, tenant: &TenantRuntime) {
    if let Some(fd) = &conn.fd {
        let mut slot = conn.tag.lock().await;
        ex.app()
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
    let t = ex.trace().now();
    let started = std::time::Instant::now();
    let mut flushes = Vec::new();
    let gate = ex
        .app()
        .gate
        .enter_recording(&tenant.name, deadline, &mut flushes)
        .await;
    ex.waited_at_gate(started.elapsed());
    if t.is_some() {
        // Each prefix-cache flush this request made, as an event of the gate's span.
        let events = flushes
            .iter()
            .map(|f| agent_common::otlp::Event {
                time_unix_nano: ex.trace().unix(f.started),
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
        ex.trace()
            .phase_with("cache_gate", t, gate.is_err(), attrs, events);
    }
    let gate = gate.map_err(Refusal::gate)?;
    let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
    let t = ex.trace().now();
    let r = ex.app().sched.acquire(&tenant.name, ask, timeout).await;
    ex.trace().phase("fair_queue", t, r.is_err());
    let (permit, waited) = r.map_err(Refusal::queue)?;
    tenant.metrics.queue_wait.observe(waited.as_secs_f64());
    ex.waited_in_queue(waited);
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
