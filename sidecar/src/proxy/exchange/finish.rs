//! The finish step: [`Exchange`]'s `Drop` settles tokens, releases what the request held and
//! writes the metrics, the telemetry and the audit record (its own, and the leak owners').

use super::{Cut, End, Exchange, MAX_MODEL, Usage};
use crate::proxy::RefusalCode;
use crate::record::audit::{AuditRecord, LeakRecord, UNAUTHENTICATED};
use crate::record::metrics::{Reason, TenantCode};
use crate::telemetry::genai::{Instrument, Series};
use agent_common::otlp::{self, Attr};
use http::StatusCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

impl Exchange {
    /// Count the leak hits and write them to the owners' audit (never the pattern itself).
    fn record_leaks(&self, status: u16) {
        let Some(t) = self.tenant() else { return };
        let m = &self.app.metrics;
        for h in &self.found.leaks {
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
                stream: self.found.stream,
                leaks: vec![LeakRecord::new(h, Some(&t.name))],
                ..AuditRecord::default()
            });
        }
    }

    /// Replace the reservation by what the request used, as well as it is known.
    fn settle_tokens(&mut self) -> Option<Usage> {
        let a = self.admission.take()?;
        let m = &self.meter;
        // A stream is charged at least what was forwarded, cut or not.
        let seen = m.usage.or_else(|| {
            (self.found.stream && m.chunks > 0).then_some(Usage {
                prompt: m.prompt_estimate,
                completion: m.chunks,
                cached: 0,
            })
        });
        match &self.end {
            // The upstream may be working on it (timed out waiting for its answer).
            End::Refused(r) if self.forwarded && r.code == RefusalCode::UpstreamTimeout => {
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
            End::Refused(r) => (r.status(), Some(r.code.as_str())),
            End::Answered(s) => (
                *s,
                match self.meter.cut {
                    _ if self.found.leak_blocked => Some(RefusalCode::CanaryWithheld.as_str()),
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
        match self.tenant() {
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
                    && let Some(limit) = r.code.limit()
                {
                    m.limits.refused(&t.name, limit);
                }
                if self.meter.cut == Some(Cut::WriteTimeout) {
                    tm.write_timeouts.inc();
                }
                if let Some(u) = usage {
                    tm.prompt_tokens.inc_by(u.prompt);
                    tm.completion_tokens.inc_by(u.completion);
                    charged = t.cost.charge(
                        self.meter.served_model.as_deref(),
                        self.found.model.as_deref(),
                        u,
                    );
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
                    && r.code.is_auth()
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
                .tenant()
                .map_or_else(|| UNAUTHENTICATED.to_string(), |t| t.name.to_string()),
            key_id: self.who.as_ref().map(|w| w.key_id.clone()),
            request_id: std::mem::take(&mut self.request_id),
            client_request_id: self.client_request_id.take(),
            method: self.method.as_str().to_string(),
            route: std::mem::take(&mut self.route),
            route_truncated: false,
            method_truncated: false,
            status: status.as_u16(),
            reason: reason.map(str::to_string),
            stream: self.found.stream,
            prompt_tokens: usage.map(|u| u.prompt),
            completion_tokens: usage.map(|u| u.completion),
            reserved_tokens: self.reserved,
            latency_ms: elapsed.as_secs_f64() * 1e3,
            ttft_ms: self.meter.ttft.map(|d| d.as_secs_f64() * 1e3),
            queue_ms: self.queue_wait.map(|d| d.as_secs_f64() * 1e3),
            // A long prompt's hash may still be in its task (or not started): taken now.
            prompt_hash: self.found.prompt_hash.take().map(|h| h.value()),
            leaks: self
                .found
                .leaks
                .iter()
                .map(|h| LeakRecord::new(h, None))
                .collect(),
            model: self.found.model.take(),
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
fn operation(route: Option<crate::proxy::Route>) -> Option<&'static str> {
    use crate::proxy::{Api, Route};
    match route? {
        Route::Generate(Api::Chat) => Some("chat"),
        Route::Generate(Api::Completions) => Some("text_completion"),
        Route::Generate(Api::Responses) => Some("generate_content"),
        Route::Encode(crate::proxy::schema::Body::Embeddings) => Some("embeddings"),
        _ => None,
    }
}

/// `http.route`: the route's template (never a client's id or an unknown path).
fn route_template(route: Option<crate::proxy::Route>, path: &str) -> Option<&'static str> {
    use crate::proxy::Route;
    match route? {
        Route::StoredResponse => Some("/v1/responses/{response_id}"),
        Route::Unknown => None,
        _ => crate::proxy::ROUTES
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
        if let (Some(t), Some(op)) = (self.tenant(), op) {
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
                    && self.found.stream
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
            let cut = self.meter.cut.is_some() || self.found.leak_blocked;
            self.trace.phase("meter", Some(start), cut);
        }
        let blocked = reason == Some(RefusalCode::CanaryWithheld.as_str());
        for h in &self.found.leaks {
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
        let model = self
            .found
            .model
            .as_deref()
            .map(|m| cut(m, MAX_MODEL).to_string());
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
        if let Some(t) = self.tenant() {
            a.push(otlp::attr("bulkhead.tenant", t.name.to_string()));
        }
        if let Some(k) = self.who.as_ref().map(|w| &w.key_id) {
            a.push(otlp::attr("bulkhead.key_id", k.clone()));
        }
        if self.found.stream {
            a.push(otlp::attr("bulkhead.stream", true));
        }
        if let Some(r) = self.reserved {
            a.push(otlp::attr("bulkhead.tokens.reserved", r));
        }
        if let End::Refused(r) = &self.end {
            a.push(otlp::attr("bulkhead.refusal.code", r.code.as_str()));
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
