//! The limits' metrics: refusals by limit ([`LimitKind`]), the shared backend's health and
//! degraded decisions, and the fair queue's per-tenant gauges ([`QueueMetrics`]).

use crate::config::BackendFailure;
use crate::limits::local::LimitKind;
use crate::limits::wfq::SchedGauges;
use crate::record::metrics::{Action, KindLabel, TenantLabel, TenantLimit};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

impl BackendFailure {
    /// The `action` label of `bulkhead_limits_degraded_decisions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendFailure::Local => "local",
            BackendFailure::Deny => "deny",
        }
    }
}

/// Why a command to the shared limits backend failed (`bulkhead_limits_backend_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendFault {
    Error,
    /// No answer within `limits.redis.command_timeout_ms`.
    Timeout,
}

impl BackendFault {
    pub const ALL: [BackendFault; 2] = [BackendFault::Error, BackendFault::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendFault::Error => "error",
            BackendFault::Timeout => "timeout",
        }
    }
}

#[derive(Clone, Default)]
pub struct Metrics {
    /// Requests refused by a limit, by tenant and limit.
    pub rate_limited: Family<TenantLimit, Counter>,
    /// 1 while the limits backend answers (always 1 for `local`), 0 while it does not.
    pub backend_up: Gauge,
    /// Limits and replay decisions made without the shared backend, by action.
    pub degraded: Family<Action, Counter>,
    /// Commands to the shared limits backend that failed, by [`BackendFault`].
    pub backend_errors: Family<KindLabel, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "rate_limited",
            "Requests refused by a limit",
            m.rate_limited.clone(),
        );
        r.register(
            "limits_backend_up",
            "1 while the limits backend (limits.backend) answers, 0 while it does not",
            m.backend_up.clone(),
        );
        r.register(
            "limits_degraded_decisions",
            "Limits and replay decisions made without the shared limits backend, by action \
             (local: limit / expected_replicas in this process; deny: refused with 503)",
            m.degraded.clone(),
        );
        r.register(
            "limits_backend_errors",
            "Commands to the shared limits backend that failed (error) or ran past \
             limits.redis.command_timeout_ms (timeout)",
            m.backend_errors.clone(),
        );
        m.backend_up.set(1);
        for action in [BackendFailure::Local, BackendFailure::Deny] {
            let _ = m.degraded.get_or_create(&Action {
                action: action.as_str(),
            });
        }
        for kind in BackendFault::ALL {
            let _ = m.backend_errors.get_or_create(&KindLabel {
                kind: kind.as_str(),
            });
        }
        m
    }

    /// Create the tenant's series up front, so dashboards see zeros.
    pub fn init_tenant(&self, tenant: &str) {
        for limit in LimitKind::ALL {
            let _ = self.rate_limited.get_or_create(&TenantLimit {
                tenant: tenant.to_string(),
                limit: limit.as_str(),
            });
        }
    }

    /// A request of `tenant` refused by `limit`.
    pub fn refused(&self, tenant: &str, limit: LimitKind) {
        self.rate_limited
            .get_or_create(&TenantLimit {
                tenant: tenant.to_string(),
                limit: limit.as_str(),
            })
            .inc();
    }

    /// A decision made without the shared backend.
    pub fn degraded(&self, action: BackendFailure) {
        self.degraded
            .get_or_create(&Action {
                action: action.as_str(),
            })
            .inc();
    }

    /// A command to the shared backend failed.
    pub fn backend_error(&self, kind: BackendFault) {
        self.backend_errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}

/// The fair queue's per-tenant gauges.
#[derive(Clone, Default)]
pub struct QueueMetrics {
    /// The fair queue's virtual counter per tenant (weighted tokens served).
    pub counter: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    /// KV-cache tokens reserved by the tenant's in-flight requests (tenants with a quota).
    pub kv_reserved: Family<TenantLabel, Gauge>,
    /// The tenant's `max_kv_tokens` (0: none).
    pub kv_quota: Family<TenantLabel, Gauge>,
    /// Each tenant's fair-queue weight (`tenants.<name>.weight`).
    pub weight: Family<TenantLabel, Gauge>,
}

impl QueueMetrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "fair_queue_virtual_tokens",
            "The fair queue's counter of weighted tokens served to the tenant \
             ((input_token_cost x prompt + output_token_cost x output) / weight; reset to 0 when \
             the sidecar is idle); the backlogged tenant with the smallest is served next",
            m.counter.clone(),
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
            "tenant_weight",
            "The tenant's fair-queue weight (tenants.<name>.weight); alerts compare each \
             tenant's GPU-time share with its weight share",
            m.weight.clone(),
        );
        m
    }

    /// The fair queue's gauges for one tenant.
    pub fn gauges(&self, tenant: &str) -> SchedGauges {
        let l = TenantLabel {
            tenant: tenant.to_string(),
        };
        SchedGauges {
            counter: self.counter.get_or_create(&l).clone(),
            kv_reserved: self.kv_reserved.get_or_create(&l).clone(),
            kv_quota: self.kv_quota.get_or_create(&l).clone(),
            weight: self.weight.get_or_create(&l).clone(),
        }
    }
}
