//! OpenTelemetry: one server span per request (with a child span per phase) exported over
//! OTLP/HTTP, the W3C `traceparent` sent upstream, and the GenAI semantic conventions' metrics
//! ([`genai`]). See ARCHITECTURE.md, "Telemetry".
//!
//! The request path only records instants into its [`RequestTrace`] and, at the finish step,
//! pushes its spans into a bounded queue; encoding and sending happen in the exporter task.

pub mod export;
pub mod genai;
pub mod trace;

use crate::config::OtlpConfig;
use agent_common::otlp::{self, Attr, Event, Link, Span, SpanKind, StatusCode};
use export::Metrics;
use http::{HeaderMap, HeaderValue};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
pub use trace::{Ids, Sampler, TraceParent};

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The process's tracer: ids, the sampler and the export queue (`[telemetry.otlp]`).
#[derive(Debug)]
pub struct Tracer {
    pub ids: Ids,
    pub sampler: Sampler,
    pub queue: Arc<export::SpanQueue>,
    pub config: OtlpConfig,
}

impl Tracer {
    pub fn new(config: &OtlpConfig, metrics: Metrics) -> Arc<Tracer> {
        Arc::new(Tracer {
            ids: Ids::default(),
            sampler: Sampler::new(config.sample_ratio),
            queue: Arc::new(export::SpanQueue::new(
                config.max_queue_spans,
                config.max_batch_spans,
                metrics,
            )),
            config: config.clone(),
        })
    }

    /// The exporter task (spawned by the server; ends when `stop` turns true).
    pub fn exporter(
        &self,
        genai: Arc<genai::GenAi>,
        metrics: Metrics,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + use<> {
        export::run(
            self.config.clone(),
            self.queue.clone(),
            genai,
            metrics,
            unix_nanos(),
            stop,
        )
    }
}

/// Where this request's spans go in a trace, decided once the credential is verified.
#[derive(Debug, Clone)]
pub struct Context {
    pub trace_id: [u8; 16],
    /// The request's server span.
    pub span_id: [u8; 8],
    /// The client's span, when its trace is continued.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    /// The client's context, when it was not continued (a span link).
    pub link: Option<TraceParent>,
}

/// One timed phase (a child span).
#[derive(Debug)]
struct Phase {
    name: &'static str,
    kind: SpanKind,
    span_id: Option<[u8; 8]>,
    start: Instant,
    end: Instant,
    failed: bool,
    attrs: Vec<Attr>,
    events: Vec<Event>,
}

/// One request's trace: the client's context as it came, the decision, and the phases.
#[derive(Debug, Default)]
pub struct RequestTrace {
    tracer: Option<Arc<Tracer>>,
    /// The client's `traceparent` (one valid header) and `tracestate`.
    client: Option<TraceParent>,
    client_state: Option<HeaderValue>,
    pub ctx: Option<Context>,
    start_unix: u64,
    t0: Option<Instant>,
    phases: Vec<Phase>,
    events: Vec<Event>,
}

impl RequestTrace {
    /// Read the client's trace context; inert without a tracer.
    pub fn new(tracer: Option<&Arc<Tracer>>, headers: &HeaderMap, t0: Instant) -> Self {
        let Some(tracer) = tracer else {
            return RequestTrace::default();
        };
        let mut tp = headers.get_all("traceparent").iter();
        let client = match (tp.next(), tp.next()) {
            (Some(v), None) => TraceParent::parse(v.as_bytes()),
            // Two headers are as invalid as a bad one.
            _ => None,
        };
        let mut ts = headers.get_all("tracestate").iter();
        let client_state = match (ts.next(), ts.next()) {
            (Some(v), None) if client.is_some() && v.len() <= 512 => Some(v.clone()),
            _ => None,
        };
        let mut trace = RequestTrace {
            tracer: Some(tracer.clone()),
            client,
            client_state,
            ctx: None,
            start_unix: unix_nanos(),
            t0: Some(t0),
            phases: Vec::new(),
            events: Vec::new(),
        };
        if client.is_none() {
            // Nothing to trust or link: decided now, so an unsampled request records nothing.
            trace.decide(false);
        }
        if trace.sampled() != Some(false) {
            trace.phases.reserve(10);
        }
        trace
    }

    /// Whether this request's spans are exported: `None` while undecided (or tracing is off).
    pub fn sampled(&self) -> Option<bool> {
        self.ctx.as_ref().map(|c| c.sampled)
    }

    /// Whether spans are recorded (a tracer is configured).
    pub fn on(&self) -> bool {
        self.tracer.is_some()
    }

    /// The instant a phase starts (`None` when tracing is off or the request is not sampled).
    pub fn now(&self) -> Option<Instant> {
        match (&self.tracer, self.sampled()) {
            (Some(_), None | Some(true)) => Some(Instant::now()),
            _ => None,
        }
    }

    /// Decide the trace: the client's continued when `trusted`, else a new one that links to
    /// the client's. Once; later calls change nothing.
    pub fn decide(&mut self, trusted: bool) {
        let Some(t) = &self.tracer else { return };
        if self.ctx.is_some() {
            return;
        }
        let span_id = t.ids.span_id();
        self.ctx = Some(match self.client {
            Some(c) if trusted => Context {
                trace_id: c.trace_id,
                span_id,
                parent: Some(c.parent_id),
                sampled: t.sampler.sample(Some(&c), &c.trace_id),
                link: None,
            },
            _ => {
                let trace_id = t.ids.trace_id();
                Context {
                    trace_id,
                    span_id,
                    parent: None,
                    sampled: t.sampler.sample(None, &trace_id),
                    link: self.client,
                }
            }
        });
        if !trusted {
            self.client_state = None;
        }
    }

    /// A phase that started at `start` ended now.
    pub fn phase(&mut self, name: &'static str, start: Option<Instant>, failed: bool) {
        self.phase_with(name, start, failed, Vec::new(), Vec::new());
    }

    pub fn phase_with(
        &mut self,
        name: &'static str,
        start: Option<Instant>,
        failed: bool,
        attrs: Vec<Attr>,
        events: Vec<Event>,
    ) {
        let Some(start) = start else { return };
        if self.ctx.as_ref().is_some_and(|c| !c.sampled) {
            return;
        }
        self.phases.push(Phase {
            name,
            kind: SpanKind::Internal,
            span_id: None,
            start,
            end: Instant::now(),
            failed,
            attrs,
            events,
        });
    }

    /// The unix time of an instant of this request.
    pub fn unix(&self, at: Instant) -> u64 {
        match self.t0 {
            Some(t0) => {
                let after = at.saturating_duration_since(t0).as_nanos() as u64;
                let before = t0.saturating_duration_since(at).as_nanos() as u64;
                (self.start_unix + after).saturating_sub(before)
            }
            None => 0,
        }
    }

    /// An event on the server span, now.
    pub fn event(&mut self, name: &'static str, attrs: Vec<Attr>) {
        if self.tracer.is_none() || self.sampled() == Some(false) {
            return;
        }
        let time_unix_nano = self.unix(Instant::now());
        self.events.push(Event {
            time_unix_nano,
            name: Cow::Borrowed(name),
            attrs,
        });
    }

    /// The upstream call starts: its span's `traceparent` (and the continued `tracestate`).
    pub fn upstream(&mut self) -> Option<(HeaderValue, Option<HeaderValue>)> {
        let t = self.tracer.clone()?;
        self.decide(false);
        let ctx = self.ctx.as_ref()?;
        let span_id = t.ids.span_id();
        let header = TraceParent {
            trace_id: ctx.trace_id,
            parent_id: span_id,
            sampled: ctx.sampled,
        }
        .header();
        let now = Instant::now();
        if !ctx.sampled {
            return Some((
                HeaderValue::from_str(&header).expect("hex and dashes"),
                self.client_state.clone(),
            ));
        }
        self.phases.push(Phase {
            name: "upstream",
            kind: SpanKind::Client,
            span_id: Some(span_id),
            start: now,
            end: now,
            failed: false,
            attrs: Vec::new(),
            events: Vec::new(),
        });
        Some((
            HeaderValue::from_str(&header).expect("hex and dashes"),
            self.client_state.clone(),
        ))
    }

    /// The upstream's response head arrived (or the call failed).
    pub fn upstream_done(&mut self, status: Option<u16>) {
        if let Some(p) = self.phases.iter_mut().rev().find(|p| p.name == "upstream") {
            p.end = Instant::now();
            match status {
                Some(s) => {
                    p.failed = s >= 500;
                    p.attrs
                        .push(otlp::attr("http.response.status_code", i64::from(s)));
                }
                None => p.failed = true,
            }
        }
    }

    /// The finish step: the server span and its children, queued for export when sampled.
    pub fn finish(&mut self, name: String, attrs: Vec<Attr>, error: Option<&'static str>) {
        let Some(t) = self.tracer.clone() else { return };
        self.decide(false);
        let Some(ctx) = self.ctx.clone() else { return };
        if !ctx.sampled {
            return;
        }
        let end = Instant::now();
        let mut spans = Vec::with_capacity(self.phases.len() + 1);
        spans.push(Span {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent_span_id: ctx.parent,
            name: Cow::Owned(name),
            kind: SpanKind::Server,
            start_unix_nano: self.start_unix,
            end_unix_nano: self.unix(end),
            attrs,
            events: std::mem::take(&mut self.events),
            links: ctx
                .link
                .map(|l| Link {
                    trace_id: l.trace_id,
                    span_id: l.parent_id,
                    attrs: vec![otlp::attr("bulkhead.link", "client_traceparent")],
                })
                .into_iter()
                .collect(),
            status: if error.is_some() {
                StatusCode::Error
            } else {
                StatusCode::Unset
            },
            status_message: error.map(Cow::Borrowed),
        });
        for p in std::mem::take(&mut self.phases) {
            spans.push(Span {
                trace_id: ctx.trace_id,
                span_id: p.span_id.unwrap_or_else(|| t.ids.span_id()),
                parent_span_id: Some(ctx.span_id),
                name: Cow::Borrowed(p.name),
                kind: p.kind,
                start_unix_nano: self.unix(p.start),
                end_unix_nano: self.unix(p.end),
                attrs: p.attrs,
                events: p.events,
                links: Vec::new(),
                status: if p.failed {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                },
                status_message: None,
            });
        }
        t.queue.push(spans);
    }
}
