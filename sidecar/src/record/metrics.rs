//! Prometheus metrics (one registry per process). Tenant labels only ever carry configured
//! tenant names, so cardinality is bounded by the config.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantCode {
    pub tenant: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantKind {
    pub tenant: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CurrencyLabel {
    pub currency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLimit {
    pub tenant: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModel {
    pub tenant: String,
    /// A model named in the price tables, or `other`.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReason {
    pub tenant: String,
    pub reason: &'static str,
}

/// Authentication failures that happen after the signature verified, so the tenant the request
/// named is the one a real key signed for (`bulkhead_auth_failures_by_tenant_total`).
pub const SIGNED_AUTH_FAILURES: [&str; 5] = [
    "tenant_mismatch",
    "expired",
    "replayed",
    "digest_mismatch",
    "replay_cache_full",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A canary or keyword of `owner` seen in `seen_by`'s traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeakLabel {
    pub owner: String,
    pub seen_by: String,
    pub r#where: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantMarker {
    pub tenant: String,
    pub marker: String,
}

/// What a limits decision made without its shared backend did (`local`, `deny`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Action {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The `kind` labels of `bulkhead_cache_gate_timeouts_total`.
pub const GATE_TIMEOUT_KINDS: [&str; 3] = ["exclusive_drain", "window_drain", "queue"];

/// Why an audit record was not written (`bulkhead_audit_dropped_total{reason}`).
pub const AUDIT_DROP_REASONS: [&str; 4] =
    ["rate_limited", "buffer_full", "oversized", "write_failed"];

type HistFamily = Family<TenantLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 us .. ~105 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<TenantCode, Counter>,
    pub tokens: Family<TenantKind, Counter>,
    pub rate_limited: Family<TenantLimit, Counter>,
    pub duration: HistFamily,
    pub ttft: HistFamily,
    pub queue_wait: HistFamily,
    pub inflight: Family<TenantLabel, Gauge>,
    pub queued: Family<TenantLabel, Gauge>,
    pub auth_failures: Family<Reason, Counter>,
    /// The signed refusals of `auth_failures` again, by the configured tenant they named.
    pub auth_failures_by_tenant: Family<TenantReason, Counter>,
    /// 1 when the node agent's tagging API answered last time, 0 when not.
    pub agent_available: Gauge,
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Audit records not written, by reason (`AUDIT_DROP_REASONS`).
    pub audit_dropped: Family<Reason, Counter>,
    /// Requests answered without a trusted tenant (auth failures, unknown routes).
    pub unattributed_requests: Family<Reason, Counter>,
    /// Prefix-cache flush attempts by result (`ok`, `failed`, `refused`).
    pub cache_flushes: Family<ResultLabel, Counter>,
    pub cache_flush_duration: Histogram,
    /// Bounded waits at the cache gate that ran out, by kind (see [`GATE_TIMEOUT_KINDS`]).
    pub cache_gate_timeouts: Family<KindLabel, Counter>,
    /// Requests whose client tried to set `cache_salt` (always replaced or removed).
    pub cache_salt_overrides: Family<TenantLabel, Counter>,
    /// KV-cache tokens held by the tenant's in-flight requests (prompt + generated so far).
    pub kv_tokens: Family<TenantLabel, Gauge>,
    /// The same in bytes (needs `[model]`).
    pub kv_bytes: Family<TenantLabel, Gauge>,
    /// KV reports to the node agent by result (`ok`, `error`).
    pub kv_reports: Family<ResultLabel, Counter>,
    /// Client connections left untagged because the tenant reached its tagged-connection cap.
    pub tag_cap_reached: Family<TenantLabel, Counter>,
    /// Client connections open now.
    pub client_connections: Gauge,
    /// Client connections closed at once because `http.max_connections` were open.
    pub connections_refused: Counter,
    /// Request-body bytes held in memory now (bounded by `http.max_inflight_body_bytes`).
    pub inflight_body_bytes: Gauge,
    /// Responses cut because the client stopped reading (`http.response_write_idle_timeout_ms`).
    pub write_timeouts: Family<TenantLabel, Counter>,
    /// The fair queue's virtual counter per tenant (weighted tokens served).
    pub queue_counter: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    /// KV-cache tokens reserved by the tenant's in-flight requests (tenants with a quota).
    pub kv_reserved: Family<TenantLabel, Gauge>,
    /// The tenant's `max_kv_tokens` (0: none).
    pub kv_quota: Family<TenantLabel, Gauge>,
    /// Another tenant's canary seen in a prompt or a response.
    pub canary_hits: Family<LeakLabel, Counter>,
    /// Another tenant's keyword seen in a prompt or a response.
    pub keyword_hits: Family<LeakLabel, Counter>,
    /// Injection markers in a tenant's prompts, by marker.
    pub injection_markers: Family<TenantMarker, Counter>,
    /// JWKS URL fetches by result (`ok`, `error`).
    pub jwks_refreshes: Family<ResultLabel, Counter>,
    /// What requests cost (`[cost]` prices x usage), by tenant and priced model.
    pub cost: Family<TenantModel, crate::record::cost::CostCounter>,
    /// Answers with usage that no `[cost]` price applied to (tenants with prices).
    pub cost_unpriced: Family<TenantLabel, Counter>,
    /// `cost.gpu_hour_price`, labelled with `cost.currency` (no series when unset).
    pub gpu_hour_price: Family<CurrencyLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Each tenant's fair-queue weight (`tenants.<name>.weight`).
    pub tenant_weight: Family<TenantLabel, Gauge>,
    /// 1 while the limits backend answers (always 1 for `local`), 0 while it does not.
    pub limits_backend_up: Gauge,
    /// Limits and replay decisions made without the shared backend, by action (`local`, `deny`).
    pub limits_degraded: Family<Action, Counter>,
    /// Commands to the shared limits backend that failed, by kind (`error`, `timeout`).
    pub limits_backend_errors: Family<KindLabel, Counter>,
    /// The GenAI semantic conventions' histograms (served at the registry's root).
    pub genai: Arc<crate::telemetry::genai::GenAi>,
    /// Spans not exported, by reason (`telemetry::export::DROP_REASONS`).
    pub telemetry_dropped_spans: Family<Reason, Counter>,
    /// Spans the collector accepted.
    pub telemetry_exported: Counter,
    /// Spans waiting for export now.
    pub telemetry_queued: Gauge,
    /// GenAI metric exports by result (`ok`, `failed`, `timeout`).
    pub telemetry_metric_exports: Family<ResultLabel, Counter>,
}

impl Metrics {
    /// Create the metrics and register them under `bulkhead_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            tokens: Family::default(),
            rate_limited: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            ttft: Family::new_with_constructor(latency_histogram),
            queue_wait: Family::new_with_constructor(latency_histogram),
            inflight: Family::default(),
            queued: Family::default(),
            auth_failures: Family::default(),
            auth_failures_by_tenant: Family::default(),
            agent_available: Gauge::default(),
            config_reloads: Family::default(),
            audit_dropped: Family::default(),
            unattributed_requests: Family::default(),
            cache_flushes: Family::default(),
            cache_flush_duration: latency_histogram(),
            cache_gate_timeouts: Family::default(),
            cache_salt_overrides: Family::default(),
            kv_tokens: Family::default(),
            kv_bytes: Family::default(),
            kv_reports: Family::default(),
            tag_cap_reached: Family::default(),
            client_connections: Gauge::default(),
            connections_refused: Counter::default(),
            inflight_body_bytes: Gauge::default(),
            write_timeouts: Family::default(),
            queue_counter: Family::default(),
            kv_reserved: Family::default(),
            kv_quota: Family::default(),
            canary_hits: Family::default(),
            keyword_hits: Family::default(),
            injection_markers: Family::default(),
            jwks_refreshes: Family::default(),
            cost: Family::default(),
            cost_unpriced: Family::default(),
            gpu_hour_price: Family::default(),
            tenant_weight: Family::default(),
            limits_backend_up: Gauge::default(),
            limits_degraded: Family::default(),
            limits_backend_errors: Family::default(),
            genai: Arc::default(),
            telemetry_dropped_spans: Family::default(),
            telemetry_exported: Counter::default(),
            telemetry_queued: Gauge::default(),
            telemetry_metric_exports: Family::default(),
        };
        registry.register_collector(Box::new(crate::telemetry::genai::GenAiCollector(
            m.genai.clone(),
        )));
        let r = registry.sub_registry_with_prefix("bulkhead");
        r.register(
            "requests",
            "Requests answered, by tenant and status code",
            m.requests.clone(),
        );
        r.register(
            "tokens",
            "LLM tokens used (prompt or completion)",
            m.tokens.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a limit",
            m.rate_limited.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request to the end of the response",
            m.duration.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from request to the first response body bytes",
            m.ttft.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time spent in the fair queue",
            m.queue_wait.clone(),
        );
        r.register(
            "inflight_requests",
            "Requests in flight to the upstream",
            m.inflight.clone(),
        );
        r.register(
            "queued_requests",
            "Requests waiting in the fair queue",
            m.queued.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused by authentication (a signature or a JWT), by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "auth_failures_by_tenant",
            "Requests refused after their signature verified (replayed, expired, tenant_mismatch, \
             digest_mismatch, replay_cache_full), by the configured tenant they named",
            m.auth_failures_by_tenant.clone(),
        );
        r.register(
            "agent_tagging_available",
            "1 when the node agent's tagging API is reachable",
            m.agent_available.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reload attempts",
            m.config_reloads.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit records not written, by reason (rate_limited: unauthenticated over \
             audit.unauthenticated_per_second; buffer_full: the stream's buffer share was full; \
             oversized; write_failed)",
            m.audit_dropped.clone(),
        );
        r.register(
            "unattributed_requests",
            "Requests answered without a trusted tenant",
            m.unattributed_requests.clone(),
        );
        r.register(
            "cache_flushes",
            "Upstream prefix-cache flush attempts, by result (ok, failed, refused)",
            m.cache_flushes.clone(),
        );
        r.register(
            "cache_flush_duration_seconds",
            "Time one upstream prefix-cache flush call took",
            m.cache_flush_duration.clone(),
        );
        r.register(
            "cache_gate_timeouts",
            "Cache-gate waits that ran out: exclusive_drain (an exclusive request's wait for \
             other tenants' requests), window_drain (a wait for an exclusive window's \
             requests), queue (the queue timeout)",
            m.cache_gate_timeouts.clone(),
        );
        r.register(
            "cache_salt_overrides",
            "Requests whose client tried to set cache_salt (replaced or removed)",
            m.cache_salt_overrides.clone(),
        );
        r.register(
            "kv_cache_tokens",
            "KV-cache tokens held by the tenant's in-flight requests",
            m.kv_tokens.clone(),
        );
        r.register(
            "kv_cache_bytes",
            "KV-cache bytes held by the tenant's in-flight requests ([model] geometry)",
            m.kv_bytes.clone(),
        );
        r.register(
            "agent_kv_reports",
            "KV reports sent to the node agent, by result",
            m.kv_reports.clone(),
        );
        r.register(
            "tagging_cap_reached",
            "Client connections left untagged: the tenant had agent.max_tagged_connections_per_tenant tagged",
            m.tag_cap_reached.clone(),
        );
        r.register(
            "client_connections",
            "Client connections open",
            m.client_connections.clone(),
        );
        r.register(
            "client_connections_refused",
            "Client connections closed at once because http.max_connections were open",
            m.connections_refused.clone(),
        );
        r.register(
            "inflight_body_bytes",
            "Request-body bytes held in memory (bounded by http.max_inflight_body_bytes)",
            m.inflight_body_bytes.clone(),
        );
        r.register(
            "response_write_timeouts",
            "Responses cut because the client stopped reading",
            m.write_timeouts.clone(),
        );
        r.register(
            "fair_queue_virtual_tokens",
            "The fair queue's counter of weighted tokens served to the tenant \
             ((input_token_cost x prompt + output_token_cost x output) / weight; reset to 0 when \
             the sidecar is idle); the backlogged tenant with the smallest is served next",
            m.queue_counter.clone(),
        );
        r.register(
            "kv_cache_reserved_tokens",
            "KV-cache tokens reserved by the tenant's in-flight requests (prompt estimate + \
             max_tokens x choices x prompts; tenants with max_kv_tokens)",
            m.kv_reserved.clone(),
        );
        r.register(
            "kv_cache_quota_tokens",
            "The tenant's KV-cache quota, max_kv_tokens (0: none)",
            m.kv_quota.clone(),
        );
        r.register(
            "canary_hits",
            "A canary of tenant `owner` seen in tenant `seen_by`'s prompt or response (a leak \
             signal: cache, RAG or prompt bleed)",
            m.canary_hits.clone(),
        );
        r.register(
            "keyword_hits",
            "A keyword of tenant `owner` seen in tenant `seen_by`'s prompt or response",
            m.keyword_hits.clone(),
        );
        r.register(
            "injection_markers",
            "Injection markers (leaks.injection_markers) in a tenant's prompts",
            m.injection_markers.clone(),
        );
        r.register(
            "jwks_refreshes",
            "Fetches of auth.jwt.jwks_url, by result (ok, error: the cached keys are kept)",
            m.jwks_refreshes.clone(),
        );
        r.register(
            "cost",
            "What requests cost in cost.currency: usage x the [cost] price per million input, \
             cached input and output tokens, by tenant and model (a model the price tables do \
             not name is \"other\")",
            m.cost.clone(),
        );
        r.register(
            "cost_unpriced",
            "Answers with usage that no [cost] price applied to (neither the served model, nor \
             the request's model, nor a default; tenants with some price only)",
            m.cost_unpriced.clone(),
        );
        r.register(
            "gpu_hour_price",
            "cost.gpu_hour_price: the price of one GPU-hour in cost.currency (recording rules \
             price each tenant's GPU busy time with it); no series when unset",
            m.gpu_hour_price.clone(),
        );
        r.register(
            "tenant_weight",
            "The tenant's fair-queue weight (tenants.<name>.weight); alerts compare each \
             tenant's GPU-time share with its weight share",
            m.tenant_weight.clone(),
        );
        for result in ["ok", "error"] {
            let _ = m.jwks_refreshes.get_or_create(&ResultLabel { result });
        }
        r.register(
            "limits_backend_up",
            "1 while the limits backend (limits.backend) answers, 0 while it does not",
            m.limits_backend_up.clone(),
        );
        r.register(
            "limits_degraded_decisions",
            "Limits and replay decisions made without the shared limits backend, by action \
             (local: limit / expected_replicas in this process; deny: refused with 503)",
            m.limits_degraded.clone(),
        );
        r.register(
            "limits_backend_errors",
            "Commands to the shared limits backend that failed (error) or ran past \
             limits.redis.command_timeout_ms (timeout)",
            m.limits_backend_errors.clone(),
        );
        m.limits_backend_up.set(1);
        for action in ["local", "deny"] {
            let _ = m.limits_degraded.get_or_create(&Action { action });
        }
        for kind in ["error", "timeout"] {
            let _ = m.limits_backend_errors.get_or_create(&KindLabel { kind });
        }
        for result in ["ok", "failed", "refused"] {
            let _ = m.cache_flushes.get_or_create(&ResultLabel { result });
        }
        for reason in AUDIT_DROP_REASONS {
            let _ = m.audit_dropped.get_or_create(&Reason { reason });
        }
        for kind in GATE_TIMEOUT_KINDS {
            let _ = m.cache_gate_timeouts.get_or_create(&KindLabel { kind });
        }
        for reason in crate::auth::signature::AuthError::REASONS {
            let _ = m.auth_failures.get_or_create(&Reason { reason });
        }
        r.register(
            "telemetry_dropped_spans",
            "Spans not exported over OTLP, by reason (queue_full, export_failed, export_timeout)",
            m.telemetry_dropped_spans.clone(),
        );
        r.register(
            "telemetry_exported_spans",
            "Spans the OTLP collector accepted",
            m.telemetry_exported.clone(),
        );
        r.register(
            "telemetry_queued_spans",
            "Spans waiting for OTLP export (at most telemetry.otlp.max_queue_spans)",
            m.telemetry_queued.clone(),
        );
        r.register(
            "telemetry_metric_exports",
            "OTLP exports of the GenAI metrics, by result (ok, failed, timeout)",
            m.telemetry_metric_exports.clone(),
        );
        for reason in crate::telemetry::export::DROP_REASONS {
            let _ = m.telemetry_dropped_spans.get_or_create(&Reason { reason });
        }
        m
    }

    /// `n` spans dropped for `reason`.
    pub fn telemetry_dropped(&self, reason: &'static str, n: u64) {
        self.telemetry_dropped_spans
            .get_or_create(&Reason { reason })
            .inc_by(n);
    }

    pub fn telemetry_metric_export(&self, result: &'static str) {
        self.telemetry_metric_exports
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Create the per-tenant series up front, so dashboards see zeros.
    pub fn init_tenant(&self, tenant: &str) {
        let t = || tenant.to_string();
        for kind in ["prompt", "completion"] {
            let _ = self.tokens.get_or_create(&TenantKind { tenant: t(), kind });
        }
        for limit in ["requests", "tokens", "concurrency", "queue", "kv_tokens"] {
            let _ = self
                .rate_limited
                .get_or_create(&TenantLimit { tenant: t(), limit });
        }
        let _ = self.inflight.get_or_create(&TenantLabel { tenant: t() });
        let _ = self.queued.get_or_create(&TenantLabel { tenant: t() });
        let _ = self
            .cache_salt_overrides
            .get_or_create(&TenantLabel { tenant: t() });
        let _ = self.kv_tokens.get_or_create(&TenantLabel { tenant: t() });
        let _ = self.kv_bytes.get_or_create(&TenantLabel { tenant: t() });
        let _ = self
            .tag_cap_reached
            .get_or_create(&TenantLabel { tenant: t() });
        let _ = self
            .write_timeouts
            .get_or_create(&TenantLabel { tenant: t() });
        let _ = self
            .cost_unpriced
            .get_or_create(&TenantLabel { tenant: t() });
        let _ = self.sched_gauges(tenant);
        for reason in SIGNED_AUTH_FAILURES {
            let _ = self.auth_failures_by_tenant.get_or_create(&TenantReason {
                tenant: t(),
                reason,
            });
        }
    }
}

/// One tenant's series, looked up once per configuration instead of once per request.
#[derive(Clone)]
pub struct TenantMetrics {
    pub ok: Counter,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub duration: Histogram,
    pub ttft: Histogram,
    pub queue_wait: Histogram,
    pub inflight: Gauge,
    pub queued: Gauge,
    pub salt_overrides: Counter,
    pub kv_tokens: Gauge,
    pub kv_bytes: Gauge,
    pub write_timeouts: Counter,
    pub cost_unpriced: Counter,
}

impl Metrics {
    pub fn tenant(&self, tenant: &str) -> TenantMetrics {
        let l = TenantLabel {
            tenant: tenant.to_string(),
        };
        let kind = |kind| TenantKind {
            tenant: tenant.to_string(),
            kind,
        };
        TenantMetrics {
            ok: self
                .requests
                .get_or_create(&TenantCode {
                    tenant: tenant.to_string(),
                    code: 200,
                })
                .clone(),
            prompt_tokens: self.tokens.get_or_create(&kind("prompt")).clone(),
            completion_tokens: self.tokens.get_or_create(&kind("completion")).clone(),
            duration: self.duration.get_or_create(&l).clone(),
            ttft: self.ttft.get_or_create(&l).clone(),
            queue_wait: self.queue_wait.get_or_create(&l).clone(),
            inflight: self.inflight.get_or_create(&l).clone(),
            queued: self.queued.get_or_create(&l).clone(),
            salt_overrides: self.cache_salt_overrides.get_or_create(&l).clone(),
            kv_tokens: self.kv_tokens.get_or_create(&l).clone(),
            kv_bytes: self.kv_bytes.get_or_create(&l).clone(),
            write_timeouts: self.write_timeouts.get_or_create(&l).clone(),
            cost_unpriced: self.cost_unpriced.get_or_create(&l).clone(),
        }
    }
}

impl Metrics {
    /// The fair queue's gauges for one tenant.
    pub fn sched_gauges(&self, tenant: &str) -> crate::limits::wfq::SchedGauges {
        let l = TenantLabel {
            tenant: tenant.to_string(),
        };
        crate::limits::wfq::SchedGauges {
            counter: self.queue_counter.get_or_create(&l).clone(),
            kv_reserved: self.kv_reserved.get_or_create(&l).clone(),
            kv_quota: self.kv_quota.get_or_create(&l).clone(),
            weight: self.tenant_weight.get_or_create(&l).clone(),
        }
    }

    /// Exports `cost.gpu_hour_price` (at start and on every reload).
    pub fn set_gpu_hour_price(&self, cost: &crate::config::CostConfig) {
        self.gpu_hour_price.clear();
        if let Some(p) = cost.gpu_hour_price {
            self.gpu_hour_price
                .get_or_create(&CurrencyLabel {
                    currency: cost.currency.clone(),
                })
                .set(p);
        }
    }
}

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
