//! [`Exchange`]: one request's context from its first byte to its last, and the ONE finish
//! step (its `Drop`) that settles tokens, releases what the request held and writes metrics
//! and the audit record for every outcome: refused, forwarded, upstream error, client gone.

use super::refusal::Refusal;
use crate::cache::GatePass;
use crate::limits::shared::Grant;
use crate::limits::wfq::Permit;
use crate::node::kv::KvCharge;
use crate::record::audit::{AuditRecord, LeakRecord, UNAUTHENTICATED};
use crate::record::metrics::{Reason, TenantCode};
use crate::runtime::{App, TenantRuntime};
use crate::telemetry::RequestTrace;
use crate::telemetry::genai::{Instrument, Series};
use agent_common::otlp::{self, Attr};
use http::{HeaderValue, Method, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedSemaphorePermit;

/// Tokens a request used.
pub use crate::record::cost::Usage;

/// How the exchange ended (so far).
#[derive(Debug)]
pub enum End {
    /// No answer yet: dropped in this state, the client went away (499).
    Pending,
    /// The sidecar answered itself.
    Refused(Refusal),
    /// The upstream answered with this status; the meter says whether its body ended.
    Answered(StatusCode),
}

/// Why a forwarded response did not reach its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    ClientGone,
    WriteTimeout,
    UpstreamError,
}

impl Cut {
    fn reason(self) -> &'static str {
        match self {
            Cut::ClientGone => "client_disconnected",
            Cut::WriteTimeout => "response_write_timeout",
            Cut::UpstreamError => "upstream_body_error",
        }
    }
}

/// A piece of the response, for the leak scan.
#[derive(Debug, Clone, Copy)]
pub enum Scanned<'a> {
    /// One whole SSE event.
    Event(&'a [u8]),
    /// The next bytes of a body that is not an event stream.
    Body(&'a [u8]),
}

/// What the response meter saw.
#[derive(Debug, Default)]
pub struct Meter {
    pub usage: Option<Usage>,
    /// Content chunks forwarded (about one token each).
    pub chunks: u64,
    pub ended: bool,
    pub cut: Option<Cut>,
    pub ttft: Option<Duration>,
    pub prompt_estimate: u64,
    /// The model the answer names (top-level `model`, or `response.model` in the Responses
    /// API's events), cut to [`MAX_MODEL`] bytes: what the request is priced by.
    pub served_model: Option<String>,
}

/// The longest served model name kept.
pub const MAX_MODEL: usize = 128;

/// Request-body bytes held under `http.max_inflight_body_bytes`.
pub struct BodyBytes {
    pub permit: OwnedSemaphorePermit,
    pub gauge: Gauge,
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        self.gauge.dec_by(self.permit.num_permits() as i64);
    }
}

/// What a forwarded request holds until its response ends (released when dropped).
#[allow(
    dead_code,
    reason = "the queue slot and gate pass are held for their Drop"
)]
pub struct Held {
    pub permit: Permit,
    pub gate: GatePass,
    pub kv: KvCharge,
    pub inflight: Gauge,
}

impl Held {
    /// Counts the request in flight (`inflight`) until dropped.
    pub fn new(permit: Permit, gate: GatePass, kv: KvCharge, inflight: Gauge) -> Self {
        inflight.inc();
        Self {
            permit,
            gate,
            kv,
            inflight,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.inflight.dec();
    }
}

pub struct Exchange {
    pub app: Arc<App>,
    pub t0: Instant,
    pub request_id: String,
    /// `request_id` as the `x-request-id` header value (to the client and the upstream).
    pub request_id_header: HeaderValue,
    pub client_request_id: Option<String>,
    pub method: Method,
    pub route: String,
    pub tenant: Option<Arc<TenantRuntime>>,
    /// A configured tenant a verified signature named, on a request then refused by
    /// authentication (replayed, expired, ...): counted per tenant, never attributed.
    pub signed_for: Option<Arc<TenantRuntime>>,
    pub key_id: Option<String>,
    /// The request body's `model`, for its price.
    pub model: Option<String>,
    pub stream: bool,
    pub prompt_hash: Option<String>,
    pub queue_wait: Option<Duration>,
    /// Tokens reserved at admission.
    pub reserved: Option<u64>,
    pub admission: Option<Grant>,
    pub body_bytes: Option<BodyBytes>,
    pub held: Option<Held>,
    /// The request was sent upstream (the upstream may have worked on it).
    pub forwarded: bool,
    /// Canaries, keywords and markers found in the prompt and the response.
    pub leaks: Vec<crate::record::leaks::Hit>,
    /// The response is scanned for other tenants' canaries and keywords.
    pub leak_scan: Option<(
        Arc<crate::record::leaks::LeakPatterns>,
        crate::record::leaks::ResponseScan,
    )>,
    /// The response was cut because it carried another tenant's canary (`on_canary = block`).
    pub leak_blocked: bool,
    pub meter: Meter,
    pub end: End,
    /// The route, once classified (names the span and the GenAI operation).
    pub route_kind: Option<super::Route>,
    /// Spans of this request (inert without `[telemetry.otlp]`).
    pub trace: RequestTrace,
    /// Time spent at the cache gate (with `queue_wait`, not the sidecar's own overhead).
    pub gate_wait: Option<Duration>,
    /// When the request was handed to the upstream client.
    pub sent_at: Option<Instant>,
    /// When the upstream's response head arrived (the meter phase starts).
    pub meter_start: Option<Instant>,
}

impl Exchange {
    pub fn new(
        app: Arc<App>,
        method: Method,
        route: String,
        client_request_id: Option<String>,
        headers: &http::HeaderMap,
    ) -> Self {
        let request_id = app.request_id();
        let t0 = Instant::now();
        let trace = RequestTrace::new(app.tracer.as_ref(), headers, t0);
        Self {
            request_id_header: HeaderValue::from_str(&request_id)
                .expect("a request id is hex digits"),
            request_id,
            app,
            t0,
            client_request_id,
            method,
            route,
            tenant: None,
            signed_for: None,
            key_id: None,
            model: None,
            stream: false,
            prompt_hash: None,
            queue_wait: None,
            reserved: None,
            admission: None,
            body_bytes: None,
            held: None,
            forwarded: false,
            leaks: Vec::new(),
            leak_scan: None,
            leak_blocked: false,
            meter: Meter::default(),
            end: End::Pending,
            route_kind: None,
            trace,
            gate_wait: None,
            sent_at: None,
            meter_start: None,
        }
    }

    /// KV tokens held now: the prompt (real once known) plus what was generated so far.
    pub fn kv_sync(&mut self) {
        let (prompt, completion) = match self.meter.usage {
            Some(u) => (u.prompt, u.completion.max(self.meter.chunks)),
            None => (self.meter.prompt_estimate, self.meter.chunks),
        };
        if let Some(h) = &mut self.held {
            h.kv.set(prompt + completion);
            h.permit.progress(prompt, completion);
        }
    }

    /// Scan the next piece of the response for other tenants' canaries and keywords; true
    /// when it must be withheld and the response cut (a canary, `on_canary = "block"`).
    pub fn scan_response(&mut self, piece: Scanned<'_>) -> bool {
        let (Some((pats, scan)), Some(t)) = (&mut self.leak_scan, &self.tenant) else {
            return false;
        };
        let before = self.leaks.len();
        match piece {
            Scanned::Event(ev) => scan.event(pats, &t.name, ev, &mut self.leaks),
            Scanned::Body(b) => scan.body(pats, &t.name, b, &mut self.leaks),
        }
        let block = pats.blocks(&self.leaks[before..]);
        self.leak_blocked |= block;
        block
    }

    /// Count the leak hits and write them to the owners' audit (never the pattern itself).
    fn record_leaks(&self, status: u16) {
        let Some(t) = &self.tenant else { return };
        let m = &self.app.metrics;
        for h in &self.leaks {
            m.leaks.count(&t.name, h);
            if h.kind == crate::record::leaks::Kind::Marker {
                continue;
            }
            if !self
                .app
                .leak_record_allowed(&h.owner, &t.name, h.kind.as_str())
            {
                // Counted above; the owner's audit gets at most one record a second per pair.
                continue;
            }
            if h.kind == crate::record::leaks::Kind::Canary {
                tracing::warn!(owner = %h.owner, seen_by = %t.name, r#where = h.seen.as_str(), request_id = %self.request_id, "another tenant's canary seen");
            }
            self.app.audit.record(AuditRecord {
                ts_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                tenant: h.owner.to_string(),
                request_id: self.request_id.clone(),
                method: self.method.as_str().to_string(),
                route: self.route.clone(),
                status,
                reason: Some(format!("{}_seen_by_other_tenant", h.kind.as_str())),
                stream: self.stream,
                leaks: vec![LeakRecord::new(h, Some(&t.name))],
                ..AuditRecord::default()
            });
        }
    }

    pub fn first_byte(&mut self) {
        if self.meter.ttft.is_none() {
            let d = self.t0.elapsed();
            self.meter.ttft = Some(d);
            if let Some(t) = &self.tenant {
                t.metrics.ttft.observe(d.as_secs_f64());
            }
        }
    }

    /// Replace the reservation by what the request used, as well as it is known.
    fn settle_tokens(&mut self) -> Option<Usage> {
        let a = self.admission.take()?;
        let m = &self.meter;
        // A stream is charged at least what was forwarded, cut or not.
        let seen = m.usage.or_else(|| {
            (self.stream && m.chunks > 0).then_some(Usage {
                prompt: m.prompt_estimate,
                completion: m.chunks,
                cached: 0,
            })
        });
        match &self.end {
            // The upstream may be working on it (timed out waiting for its answer).
            End::Refused(r) if self.forwarded && r.status == StatusCode::GATEWAY_TIMEOUT => {
                a.reconcile(None);
                None
            }
            End::Refused(_) => {
                a.refund();
                None
            }
            // Forwarded, then the client left before an answer: the reservation stays.
            End::Pending if self.forwarded => {
                a.reconcile(None);
                None
            }
            End::Pending => {
                a.refund();
                None
            }
            End::Answered(status) => match seen {
                Some(u) => {
                    a.reconcile(Some(u.total()));
                    Some(u)
                }
                // The upstream answered with an error: it did no generation work.
                None if status.is_client_error() || status.is_server_error() => {
                    a.refund();
                    None
                }
                None => {
                    a.reconcile(None);
                    None
                }
            },
        }
    }

    /// The finish step; runs once, from `Drop`.
    fn finish(&mut self) {
        let usage = self.settle_tokens();
        if let (Some(u), Some(h)) = (usage, &mut self.held) {
            // The fair queue's counter ends with what the tenant was really served.
            h.permit.progress(u.prompt, u.completion);
        }
        self.held.take();
        self.body_bytes.take();
        let (status, reason): (StatusCode, Option<&'static str>) = match &self.end {
            End::Pending => (
                StatusCode::from_u16(499).expect("valid status"),
                Some("client_disconnected"),
            ),
            End::Refused(r) => (r.status, Some(r.code)),
            End::Answered(s) => (
                *s,
                match self.meter.cut {
                    _ if self.leak_blocked => Some("canary_blocked"),
                    Some(c) => Some(c.reason()),
                    None if !self.meter.ended => Some("client_disconnected"),
                    None => None,
                },
            ),
        };
        self.record_leaks(status.as_u16());
        let elapsed = self.t0.elapsed();
        self.telemetry(status, reason, usage, elapsed);
        let m = &self.app.metrics;
        let mut charged = None;
        match &self.tenant {
            Some(t) => {
                let tm = &t.metrics;
                if status == StatusCode::OK {
                    tm.ok.inc();
                } else {
                    m.requests
                        .get_or_create(&TenantCode {
                            tenant: t.name.to_string(),
                            code: status.as_u16(),
                        })
                        .inc();
                }
                if let End::Refused(r) = &self.end
                    && let Some(limit) = r.limit
                {
                    m.limits.refused(&t.name, limit);
                }
                if self.meter.cut == Some(Cut::WriteTimeout) {
                    tm.write_timeouts.inc();
                }
                if let Some(u) = usage {
                    tm.prompt_tokens.inc_by(u.prompt);
                    tm.completion_tokens.inc_by(u.completion);
                    charged =
                        t.cost
                            .charge(self.meter.served_model.as_deref(), self.model.as_deref(), u);
                    if charged.is_none() && t.cost.is_priced() {
                        // Priced tenants only: without `[cost]` every answer is unpriced.
                        tm.cost_unpriced.inc();
                    }
                }
                if self.forwarded {
                    tm.duration.observe(elapsed.as_secs_f64());
                }
            }
            None => {
                let reason = reason.unwrap_or("client_disconnected");
                m.unattributed_requests
                    .get_or_create(&Reason { reason })
                    .inc();
                if let End::Refused(r) = &self.end
                    && r.auth
                {
                    tracing::info!(request_id = %self.request_id, reason, "request refused: authentication failed");
                    m.auth
                        .refused(reason, self.signed_for.as_ref().map(|t| &*t.name));
                }
            }
        }
        self.app.audit.record(AuditRecord {
            ts_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tenant: self
                .tenant
                .as_ref()
                .map_or_else(|| UNAUTHENTICATED.to_string(), |t| t.name.to_string()),
            key_id: self.key_id.take(),
            request_id: std::mem::take(&mut self.request_id),
            client_request_id: self.client_request_id.take(),
            method: self.method.as_str().to_string(),
            route: std::mem::take(&mut self.route),
            route_truncated: false,
            method_truncated: false,
            status: status.as_u16(),
            reason: reason.map(str::to_string),
            stream: self.stream,
            prompt_tokens: usage.map(|u| u.prompt),
            completion_tokens: usage.map(|u| u.completion),
            reserved_tokens: self.reserved,
            latency_ms: elapsed.as_secs_f64() * 1e3,
            ttft_ms: self.meter.ttft.map(|d| d.as_secs_f64() * 1e3),
            queue_ms: self.queue_wait.map(|d| d.as_secs_f64() * 1e3),
            prompt_hash: self.prompt_hash.take(),
            leaks: self
                .leaks
                .iter()
                .map(|h| LeakRecord::new(h, None))
                .collect(),
            model: self.model.take(),
            served_model: self.meter.served_model.take(),
            cached_tokens: usage.map(|u| u.cached).filter(|c| *c > 0),
            cost: charged.as_ref().map(|c| c.cost),
            price_model: charged.map(|c| c.price_model),
        });
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `gen_ai.operation.name` of a route (semconv 1.38.0), for the GenAI routes.
fn operation(route: Option<super::Route>) -> Option<&'static str> {
    use super::{Api, Route};
    match route? {
        Route::Generate(Api::Chat) => Some("chat"),
        Route::Generate(Api::Completions) => Some("text_completion"),
        Route::Generate(Api::Responses) => Some("generate_content"),
        Route::Encode(crate::proxy::schema::Body::Embeddings) => Some("embeddings"),
        _ => None,
    }
}

/// `http.route`: the route's template (never a client's id or an unknown path).
fn route_template(route: Option<super::Route>, path: &str) -> Option<&'static str> {
    use super::Route;
    match route? {
        Route::StoredResponse => Some("/v1/responses/{response_id}"),
        Route::Unknown => None,
        _ => super::ROUTES
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(p, _)| *p),
    }
}

impl Exchange {
    /// The GenAI metrics and this request's spans (the finish step's part for telemetry).
    fn telemetry(
        &mut self,
        status: StatusCode,
        reason: Option<&'static str>,
        usage: Option<Usage>,
        elapsed: Duration,
    ) {
        let op = operation(self.route_kind);
        // `error.type`: the refusal or cut's code, or the class of an upstream error status.
        let reason = reason.or(match status.as_u16() {
            500.. => Some("upstream_5xx"),
            400.. => Some("upstream_4xx"),
            _ => None,
        });
        if let (Some(t), Some(op)) = (&self.tenant, op) {
            let g = &self.app.metrics.genai;
            let series = |instrument, kind| Series {
                instrument,
                tenant: t.name.clone(),
                operation: op,
                kind,
            };
            g.observe(
                series(Instrument::RequestDuration, reason.unwrap_or("")),
                elapsed.as_secs_f64(),
            );
            if let Some(ttft) = self.meter.ttft {
                g.observe(series(Instrument::TimeToFirstToken, ""), ttft.as_secs_f64());
                if let Some(u) = usage
                    && self.stream
                    && u.completion >= 2
                {
                    let per =
                        elapsed.saturating_sub(ttft).as_secs_f64() / (u.completion - 1) as f64;
                    g.observe(series(Instrument::TimePerOutputToken, ""), per);
                }
            }
            if let Some(u) = usage {
                g.observe(series(Instrument::TokenUsage, "input"), u.prompt as f64);
                g.observe(
                    series(Instrument::TokenUsage, "output"),
                    u.completion as f64,
                );
                g.observe(
                    series(Instrument::TokenUsage, "cache_read"),
                    u.cached as f64,
                );
            }
            if let Some(sent) = self.sent_at {
                let waited =
                    self.gate_wait.unwrap_or_default() + self.queue_wait.unwrap_or_default();
                let own = sent
                    .saturating_duration_since(self.t0)
                    .saturating_sub(waited);
                g.observe(series(Instrument::Overhead, ""), own.as_secs_f64());
            }
        }
        if !self.trace.on() {
            return;
        }
        // Decided by now (a request never authenticated: a new trace); nothing more to build
        // for one that is not sampled.
        self.trace.decide(false);
        if self.trace.sampled() != Some(true) {
            return;
        }
        if let Some(start) = self.meter_start {
            let cut = self.meter.cut.is_some() || self.leak_blocked;
            self.trace.phase("meter", Some(start), cut);
        }
        let blocked = reason == Some("canary_blocked");
        for h in &self.leaks {
            let mut attrs = vec![
                otlp::attr("bulkhead.guardrail.kind", h.kind.as_str()),
                otlp::attr("bulkhead.guardrail.where", h.seen.as_str()),
                otlp::attr(
                    "bulkhead.guardrail.action",
                    if blocked && h.kind == crate::record::leaks::Kind::Canary {
                        "blocked"
                    } else {
                        "recorded"
                    },
                ),
            ];
            // A marker's label is configuration text: only a tenant names an owner.
            if h.kind != crate::record::leaks::Kind::Marker {
                attrs.push(otlp::attr("bulkhead.guardrail.owner", h.owner.to_string()));
            }
            self.trace.event("gen_ai.guardrail.result", attrs);
        }
        let mut a: Vec<Attr> = Vec::with_capacity(20);
        a.push(otlp::attr(
            "http.request.method",
            self.method.as_str().to_string(),
        ));
        a.push(otlp::attr(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(r) = route_template(self.route_kind, &self.route) {
            a.push(otlp::attr("http.route", r));
        }
        a.push(otlp::attr("bulkhead.request_id", self.request_id.clone()));
        if let Some(op) = op {
            a.push(otlp::attr("gen_ai.operation.name", op));
        }
        // The client's model name, cut as the served one is (a span is no place for 64 KiB).
        let model = self.model.as_deref().map(|m| cut(m, MAX_MODEL).to_string());
        if let Some(m) = &model {
            a.push(otlp::attr("gen_ai.request.model", m.clone()));
        }
        if let Some(m) = &self.meter.served_model {
            a.push(otlp::attr("gen_ai.response.model", m.clone()));
        }
        if let Some(u) = usage {
            a.push(otlp::attr("gen_ai.usage.input_tokens", u.prompt));
            a.push(otlp::attr("gen_ai.usage.output_tokens", u.completion));
            a.push(otlp::attr("gen_ai.usage.cache_read.input_tokens", u.cached));
        }
        if let Some(t) = &self.tenant {
            a.push(otlp::attr("bulkhead.tenant", t.name.to_string()));
        }
        if let Some(k) = &self.key_id {
            a.push(otlp::attr("bulkhead.key_id", k.clone()));
        }
        if self.stream {
            a.push(otlp::attr("bulkhead.stream", true));
        }
        if let Some(r) = self.reserved {
            a.push(otlp::attr("bulkhead.tokens.reserved", r));
        }
        if let End::Refused(r) = &self.end {
            a.push(otlp::attr("bulkhead.refusal.code", r.code));
        }
        if let Some(r) = reason {
            a.push(otlp::attr("error.type", r));
        }
        let name = match (op, &model) {
            (Some(op), Some(m)) => format!("{op} {m}"),
            (Some(op), None) => op.to_string(),
            (None, _) => match route_template(self.route_kind, &self.route) {
                Some(r) => format!("{} {r}", self.method),
                None => self.method.to_string(),
            },
        };
        self.trace.finish(name, a, reason);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.finish();
    }
}
