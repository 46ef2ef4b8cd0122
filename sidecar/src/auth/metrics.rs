//! Authentication's metrics: refusals by reason, the signed ones again by tenant, and the JWKS
//! refreshes. Reasons are [`AuthError::reason`]s.

use crate::auth::signature::AuthError;
use crate::record::metrics::{Reason, ResultLabel, TenantReason};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct Metrics {
    /// Requests refused by authentication, by reason.
    pub failures: Family<Reason, Counter>,
    /// The signed refusals of `failures` again, by the configured tenant they named.
    pub failures_by_tenant: Family<TenantReason, Counter>,
    /// JWKS URL fetches by result (`ok`, `error`).
    pub jwks_refreshes: Family<ResultLabel, Counter>,
}

/// Authentication failures that happen after the signature verified, so the tenant the request
/// named is the one a real key signed for (`bulkhead_auth_failures_by_tenant_total`).
pub fn signed_failures() -> [&'static str; 5] {
    [
        AuthError::TenantMismatch,
        AuthError::Expired(String::new()),
        AuthError::Replayed,
        AuthError::DigestMismatch(String::new()),
        AuthError::ReplayCacheFull,
    ]
    .map(|e| e.reason())
}

impl AuthError {
    /// Whether this refusal came after the signature verified (one of `signed_failures()`):
    /// the tenant the request named is then one a real key signed for.
    pub fn after_signature(&self) -> bool {
        signed_failures().contains(&self.reason())
    }
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "auth_failures",
            "Requests refused by authentication (a signature or a JWT), by reason",
            m.failures.clone(),
        );
        r.register(
            "auth_failures_by_tenant",
            "Requests refused after their signature verified (replayed, expired, tenant_mismatch, \
             digest_mismatch, replay_cache_full), by the configured tenant they named",
            m.failures_by_tenant.clone(),
        );
        r.register(
            "jwks_refreshes",
            "Fetches of auth.jwt.jwks_url, by result (ok, error: the cached keys are kept)",
            m.jwks_refreshes.clone(),
        );
        for result in ["ok", "error"] {
            let _ = m.jwks_refreshes.get_or_create(&ResultLabel { result });
        }
        for reason in AuthError::REASONS {
            let _ = m.failures.get_or_create(&Reason { reason });
        }
        m
    }

    /// Create the tenant's series up front, so dashboards see zeros.
    pub fn init_tenant(&self, tenant: &str) {
        for reason in signed_failures() {
            let _ = self.failures_by_tenant.get_or_create(&TenantReason {
                tenant: tenant.to_string(),
                reason,
            });
        }
    }

    /// A request refused by authentication; `signed_for`: the configured tenant a verified
    /// signature named, if any.
    pub fn refused(&self, reason: &'static str, signed_for: Option<&str>) {
        self.failures.get_or_create(&Reason { reason }).inc();
        if let Some(tenant) = signed_for {
            self.failures_by_tenant
                .get_or_create(&TenantReason {
                    tenant: tenant.to_string(),
                    reason,
                })
                .inc();
        }
    }
}
