//! The process's metrics: the per-request families and every component's own families
//! (`auth::Metrics`, `limits::metrics`, `cache::Metrics`, ...), registered under `bulkhead_`
//! in one registry; and the per-tenant handles the request path uses ([`TenantMetrics`]).
//! Each component names its series and their label values; this module only puts them
//! together.

use crate::record::metrics::{
    HistFamily, Reason, ResultLabel, TenantCode, TenantKind, TenantLabel, latency_histogram,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<TenantCode, Counter>,
    pub tokens: Family<TenantKind, Counter>,
    pub duration: HistFamily,
    pub ttft: HistFamily,
    pub queue_wait: HistFamily,
    pub inflight: Family<TenantLabel, Gauge>,
    pub queued: Family<TenantLabel, Gauge>,
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Requests answered without a trusted tenant (auth failures, unknown routes).
    pub unattributed_requests: Family<Reason, Counter>,
    /// Client connections open now.
    pub client_connections: Gauge,
    /// Client connections closed at once because `http.max_connections` were open.
    pub connections_refused: Counter,
    /// Request-body bytes held in memory now (bounded by `http.max_inflight_body_bytes`).
    pub inflight_body_bytes: Gauge,
    /// Responses cut because the client stopped reading (`http.response_write_idle_timeout_ms`).
    pub write_timeouts: Family<TenantLabel, Counter>,
    pub limits: crate::limits::metrics::Metrics,
    pub queue: crate::limits::metrics::QueueMetrics,
    pub auth: crate::auth::Metrics,
    pub tagging: crate::node::tagging::Metrics,
    pub kv: crate::node::kv::Metrics,
    pub cache: crate::cache::Metrics,
    pub audit: crate::record::audit::Metrics,
    pub leaks: crate::record::leaks::Metrics,
    pub cost: crate::record::cost::Metrics,
    pub telemetry: crate::telemetry::export::Metrics,
    /// The GenAI semantic conventions' histograms (served at the registry's root).
    pub genai: Arc<crate::telemetry::genai::GenAi>,
}

impl Metrics {
    /// Create the metrics and register them under `bulkhead_`.
    pub fn register(registry: &mut Registry) -> Self {
        let genai: Arc<crate::telemetry::genai::GenAi> = Arc::default();
        registry.register_collector(Box::new(crate::telemetry::genai::GenAiCollector(
            genai.clone(),
        )));
        let r = registry.sub_registry_with_prefix("bulkhead");
        let requests: Family<TenantCode, Counter> = Family::default();
        r.register(
            "requests",
            "Requests answered, by tenant and status code",
            requests.clone(),
        );
        let tokens: Family<TenantKind, Counter> = Family::default();
        r.register(
            "tokens",
            "LLM tokens used (prompt or completion)",
            tokens.clone(),
        );
        let limits = crate::limits::metrics::Metrics::register(r);
        let duration: HistFamily = Family::new_with_constructor(latency_histogram);
        r.register(
            "request_duration_seconds",
            "Time from request to the end of the response",
            duration.clone(),
        );
        let ttft: HistFamily = Family::new_with_constructor(latency_histogram);
        r.register(
            "time_to_first_token_seconds",
            "Time from request to the first response body bytes",
            ttft.clone(),
        );
        let queue_wait: HistFamily = Family::new_with_constructor(latency_histogram);
        r.register(
            "queue_wait_seconds",
            "Time spent in the fair queue",
            queue_wait.clone(),
        );
        let inflight: Family<TenantLabel, Gauge> = Family::default();
        r.register(
            "inflight_requests",
            "Requests in flight to the upstream",
            inflight.clone(),
        );
        let queued: Family<TenantLabel, Gauge> = Family::default();
        r.register(
            "queued_requests",
            "Requests waiting in the fair queue",
            queued.clone(),
        );
        let auth = crate::auth::Metrics::register(r);
        let tagging = crate::node::tagging::Metrics::register(r);
        let config_reloads: Family<ResultLabel, Counter> = Family::default();
        r.register(
            "config_reloads",
            "Configuration reload attempts",
            config_reloads.clone(),
        );
        let audit = crate::record::audit::Metrics::register(r);
        let unattributed_requests: Family<Reason, Counter> = Family::default();
        r.register(
            "unattributed_requests",
            "Requests answered without a trusted tenant",
            unattributed_requests.clone(),
        );
        let cache = crate::cache::Metrics::register(r);
        let kv = crate::node::kv::Metrics::register(r);
        let client_connections = Gauge::default();
        r.register(
            "client_connections",
            "Client connections open",
            client_connections.clone(),
        );
        let connections_refused = Counter::default();
        r.register(
            "client_connections_refused",
            "Client connections closed at once because http.max_connections were open",
            connections_refused.clone(),
        );
        let inflight_body_bytes = Gauge::default();
        r.register(
            "inflight_body_bytes",
            "Request-body bytes held in memory (bounded by http.max_inflight_body_bytes)",
            inflight_body_bytes.clone(),
        );
        let write_timeouts: Family<TenantLabel, Counter> = Family::default();
        r.register(
            "response_write_timeouts",
            "Responses cut because the client stopped reading",
            write_timeouts.clone(),
        );
        let queue = crate::limits::metrics::QueueMetrics::register(r);
        let leaks = crate::record::leaks::Metrics::register(r);
        let cost = crate::record::cost::Metrics::register(r);
        let telemetry = crate::telemetry::export::Metrics::register(r);
        Self {
            requests,
            tokens,
            duration,
            ttft,
            queue_wait,
            inflight,
            queued,
            config_reloads,
            unattributed_requests,
            client_connections,
            connections_refused,
            inflight_body_bytes,
            write_timeouts,
            limits,
            queue,
            auth,
            tagging,
            kv,
            cache,
            audit,
            leaks,
            cost,
            telemetry,
            genai,
        }
    }

    /// Create the per-tenant series up front, so dashboards see zeros.
    pub fn init_tenant(&self, tenant: &str) {
        let l = TenantLabel {
            tenant: tenant.to_string(),
        };
        for kind in ["prompt", "completion"] {
            let _ = self.tokens.get_or_create(&TenantKind {
                tenant: tenant.to_string(),
                kind,
            });
        }
        self.limits.init_tenant(tenant);
        let _ = self.inflight.get_or_create(&l);
        let _ = self.queued.get_or_create(&l);
        let _ = self.cache.salt_overrides.get_or_create(&l);
        let _ = self.kv.tokens.get_or_create(&l);
        let _ = self.kv.bytes.get_or_create(&l);
        let _ = self.write_timeouts.get_or_create(&l);
        let _ = self.cost.unpriced.get_or_create(&l);
        let _ = self.queue.gauges(tenant);
        self.auth.init_tenant(tenant);
    }

    /// The tenant's series, looked up once per configuration instead of once per request.
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
            salt_overrides: self.cache.salt_overrides.get_or_create(&l).clone(),
            kv_tokens: self.kv.tokens.get_or_create(&l).clone(),
            kv_bytes: self.kv.bytes.get_or_create(&l).clone(),
            write_timeouts: self.write_timeouts.get_or_create(&l).clone(),
            cost_unpriced: self.cost.unpriced.get_or_create(&l).clone(),
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
