//! [`Exchange`]: one request's context from its first byte to its last, and the ONE finish
//! step (its `Drop`, in `finish.rs`) that settles tokens, releases what the request held and
//! writes metrics and the audit record for every outcome: refused, forwarded, upstream error,
//! client gone.
//!
//! The phases change it only through its methods. Whatever is known of the request's tenant
//! (its identity and what its body showed) is set by [`Exchange::attribute`] and dropped, all
//! of it, by [`Exchange::unattribute`], so a refusal after authentication cannot leave half an
//! identity behind for the unauthenticated audit record.

mod finish;

use super::refusal::Refusal;
use crate::cache::GatePass;
use crate::limits::local::RateInfo;
use crate::limits::shared::Grant;
use crate::limits::wfq::Permit;
use crate::node::kv::KvCharge;
use crate::record::leaks::{Hit, LeakPatterns, ResponseScan};
use crate::runtime::{App, TenantRuntime};
use crate::telemetry::RequestTrace;
use http::{HeaderValue, Method, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
struct BodyBytes {
    permit: OwnedSemaphorePermit,
    gauge: Gauge,
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
    permit: Permit,
    gate: GatePass,
    kv: KvCharge,
    inflight: Gauge,
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

/// The tenant a request was attributed to, once everything about its credential verified.
struct Identity {
    tenant: Arc<TenantRuntime>,
    key_id: String,
}

/// What the body of an attributed request showed (and its response, for the leak scan):
/// dropped with the identity by [`Exchange::unattribute`].
#[derive(Default)]
pub struct Findings {
    /// The request body's `model`, for its price.
    pub model: Option<String>,
    pub stream: bool,
    pub prompt_hash: Option<crate::proxy::inspect::prompt_hash::PromptHash>,
    /// Canaries, keywords and markers found in the prompt and the response.
    pub leaks: Vec<Hit>,
    /// The response is scanned for other tenants' canaries and keywords.
    pub leak_scan: Option<(Arc<LeakPatterns>, ResponseScan)>,
    /// The response was cut because it carried another tenant's canary (`on_canary = block`).
    leak_blocked: bool,
}

/// The inspect phase's view of an attributed exchange: the app and request id to read, the
/// [`Findings`] to write.
pub struct Inspecting<'a> {
    pub app: &'a Arc<App>,
    pub request_id: &'a String,
    found: &'a mut Findings,
}

impl Deref for Inspecting<'_> {
    type Target = Findings;
    fn deref(&self) -> &Findings {
        self.found
    }
}

impl DerefMut for Inspecting<'_> {
    fn deref_mut(&mut self) -> &mut Findings {
        self.found
    }
}

pub struct Exchange {
    app: Arc<App>,
    t0: Instant,
    request_id: String,
    /// `request_id` as the `x-request-id` header value (to the client and the upstream).
    request_id_header: HeaderValue,
    client_request_id: Option<String>,
    method: Method,
    route: String,
    /// The route, once classified (names the span and the GenAI operation).
    route_kind: Option<super::Route>,
    /// Set by [`Exchange::attribute`], cleared by [`Exchange::unattribute`].
    who: Option<Identity>,
    /// Goes with `who`: never set without it, cleared with it.
    found: Findings,
    /// A configured tenant a verified signature named, on a request then refused by
    /// authentication (replayed, expired, ...): counted per tenant, never attributed.
    signed_for: Option<Arc<TenantRuntime>>,
    queue_wait: Option<Duration>,
    /// Tokens reserved at admission.
    reserved: Option<u64>,
    admission: Option<Grant>,
    body_bytes: Option<BodyBytes>,
    held: Option<Held>,
    /// The request was sent upstream (the upstream may have worked on it).
    forwarded: bool,
    meter: Meter,
    end: End,
    /// Spans of this request (inert without `[telemetry.otlp]`).
    trace: RequestTrace,
    /// Time spent at the cache gate (with `queue_wait`, not the sidecar's own overhead).
    gate_wait: Option<Duration>,
    /// When the request was handed to the upstream client.
    sent_at: Option<Instant>,
    /// When the upstream's response head arrived (the meter phase starts).
    meter_start: Option<Instant>,
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
            route_kind: None,
            who: None,
            found: Findings::default(),
            signed_for: None,
            queue_wait: None,
            reserved: None,
            admission: None,
            body_bytes: None,
            held: None,
            forwarded: false,
            meter: Meter::default(),
            end: End::Pending,
            trace,
            gate_wait: None,
            sent_at: None,
            meter_start: None,
        }
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn request_id_header(&self) -> &HeaderValue {
        &self.request_id_header
    }

    /// This request's spans.
    pub fn trace(&mut self) -> &mut RequestTrace {
        &mut self.trace
    }

    pub fn classified(&mut self, route: super::Route) {
        self.route_kind = Some(route);
    }

    /// The tenant the request is attributed to.
    pub fn tenant(&self) -> Option<&Arc<TenantRuntime>> {
        self.who.as_ref().map(|w| &w.tenant)
    }

    /// Attribute the request to `tenant`, once everything about its credential verified; the
    /// trace continues the client's only for a tenant trusted to.
    pub fn attribute(&mut self, tenant: Arc<TenantRuntime>, key_id: String) {
        self.trace.decide(tenant.trust_traceparent);
        self.who = Some(Identity { tenant, key_id });
    }

    /// Undo [`Exchange::attribute`] for a request that authentication then refused (a nonce
    /// the shared replay cache refused with the admission): the identity and everything its
    /// body showed are dropped; it is counted for `signed_for`, the tenant its signature named.
    pub fn unattribute(&mut self, signed_for: Arc<TenantRuntime>) {
        self.who = None;
        self.found = Findings::default();
        self.refused_signed_for(Some(signed_for));
    }

    /// Authentication refused a request whose verified signature named `tenant` (a
    /// configured tenant, or none).
    pub fn refused_signed_for(&mut self, tenant: Option<Arc<TenantRuntime>>) {
        self.signed_for = tenant;
    }

    /// The inspect phase's view (what it reads, what it finds).
    pub fn inspecting(&mut self) -> Inspecting<'_> {
        debug_assert!(
            self.who.is_some(),
            "only an attributed request is inspected"
        );
        Inspecting {
            app: &self.app,
            request_id: &self.request_id,
            found: &mut self.found,
        }
    }

    /// Hold `n` more request-body bytes under `http.max_inflight_body_bytes`; false when they
    /// are not to be had.
    pub fn reserve_body(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let Ok(p) = self.app.body_budget.clone().try_acquire_many_owned(n32) else {
            return false;
        };
        self.app.metrics.inflight_body_bytes.inc_by(n as i64);
        match &mut self.body_bytes {
            Some(h) => h.permit.merge(p),
            None => {
                self.body_bytes = Some(BodyBytes {
                    permit: p,
                    gauge: self.app.metrics.inflight_body_bytes.clone(),
                })
            }
        }
        true
    }

    /// Admitted by the tenant's limits, `reserved` tokens held.
    pub fn admitted(&mut self, reserved: u64, grant: Grant) {
        self.reserved = Some(reserved);
        self.admission = Some(grant);
    }

    /// The rate-limit state at admission (for the `x-ratelimit-*` headers).
    pub fn rate_info(&self) -> Option<&RateInfo> {
        self.admission.as_ref().map(Grant::info)
    }

    pub fn waited_at_gate(&mut self, d: Duration) {
        self.gate_wait = Some(d);
    }

    pub fn waited_in_queue(&mut self, d: Duration) {
        self.queue_wait = Some(d);
    }

    /// The request holds `held` until its response ends; its prompt is estimated at
    /// `prompt_estimate` tokens until the upstream says.
    pub fn hold(&mut self, held: Held, prompt_estimate: u64) {
        self.held = Some(held);
        self.meter.prompt_estimate = prompt_estimate;
        self.kv_sync();
    }

    /// Handed to the upstream client.
    pub fn sent(&mut self) {
        self.forwarded = true;
        self.sent_at = Some(Instant::now());
    }

    /// The upstream could not be reached: nothing reached its model.
    pub fn not_delivered(&mut self) {
        self.forwarded = false;
    }

    /// The sidecar answers itself.
    pub fn refuse(&mut self, refusal: Refusal) {
        self.end = End::Refused(refusal);
    }

    /// The upstream's response head arrived: the meter phase starts; the request body is
    /// long gone upstream.
    pub fn answered(&mut self, status: StatusCode) {
        self.end = End::Answered(status);
        self.meter_start = self.trace.now();
        self.body_bytes.take();
    }

    /// The answer was withheld as `status` (the upstream did the work: settled as answered).
    pub fn withheld(&mut self, status: StatusCode) {
        self.end = End::Answered(status);
    }

    /// What the response meter saw so far.
    pub fn meter(&mut self) -> &mut Meter {
        &mut self.meter
    }

    /// The response was cut short.
    pub fn cut(&mut self, why: Cut) {
        self.meter.cut = Some(why);
    }

    pub fn is_cut(&self) -> bool {
        self.meter.cut.is_some()
    }

    /// The response was cut for another tenant's canary.
    pub fn leak_blocked(&self) -> bool {
        self.found.leak_blocked
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
        let Some(who) = &self.who else { return false };
        let f = &mut self.found;
        let Some((pats, scan)) = &mut f.leak_scan else {
            return false;
        };
        let before = f.leaks.len();
        match piece {
            Scanned::Event(ev) => scan.event(pats, &who.tenant.name, ev, &mut f.leaks),
            Scanned::Body(b) => scan.body(pats, &who.tenant.name, b, &mut f.leaks),
        }
        let block = pats.blocks(&f.leaks[before..]);
        f.leak_blocked |= block;
        block
    }

    pub fn first_byte(&mut self) {
        if self.meter.ttft.is_none() {
            let d = self.t0.elapsed();
            self.meter.ttft = Some(d);
            if let Some(t) = self.tenant() {
                t.metrics.ttft.observe(d.as_secs_f64());
            }
        }
    }
}
