//! Limits and replay protection shared by every replica, in Redis (or Valkey, standalone or
//! Cluster): `[limits] backend = "redis"`.
//!
//! One Lua script per admission ([`scripts::ADMIT`]: requests per minute as GCRA, tokens per
//! minute as a token bucket with reservation, concurrency as leased slots), one per settlement
//! (the reservation replaced by the real usage, the slot released; sent from the exchange's
//! finish step without delaying the response) and one per verified nonce
//! ([`scripts::REPLAY`]). In `leased` mode a replica takes tokens and requests from Redis in
//! leases and spends them locally, going to Redis only when its lease is spent (or for a
//! concurrency slot).
//!
//! When Redis does not answer within `command_timeout_ms` the backend is marked down (one log
//! line, `bulkhead_limits_backend_up` 0) and, until a probe finds it back, every decision is
//! made without it: `on_backend_failure = "local"` enforces limit / `expected_replicas` in this
//! process, `"deny"` refuses with 503 `limits_backend_unavailable`. No request waits on Redis
//! longer than the command timeout, and none is admitted without a limit.

mod conn;
mod nonces;
mod responses;
pub mod scripts;
mod settle;
mod tenant;

pub use tenant::{SharedAdmission, SharedTenant};

use crate::auth::signature::AuthError;
use crate::config::{BackendFailure, LimitsMode, RedisLimitsConfig};
use crate::limits::local::{
    Admission, LimitNumbers, RateInfo, Rejection, SharedClock, TenantLimits,
};
use crate::limits::metrics::Metrics;
use conn::Backend;
use scripts::TenantKeys;
use settle::Pending;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Why a shared decision could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SharedError {
    #[error("a limit refused the request")]
    Limit(Rejection),
    #[error("authentication failed: {0}")]
    Auth(AuthError),
    /// Redis is unreachable and `on_backend_failure = "deny"`.
    #[error("the limits backend is unavailable")]
    Unavailable,
}

/// An admitted request, by whichever limiter admitted it.
#[derive(Debug)]
pub enum Grant {
    Local(Admission),
    Shared(SharedAdmission),
}

impl Grant {
    pub fn info(&self) -> &RateInfo {
        match self {
            Grant::Local(a) => &a.info,
            Grant::Shared(a) => &a.info,
        }
    }

    /// Replace the reservation by the real usage (`None`: unknown, the reservation stays).
    pub fn reconcile(self, actual: Option<u64>) {
        match self {
            Grant::Local(a) => a.reconcile(actual),
            Grant::Shared(mut a) => a.settle(actual),
        }
    }

    /// Give the whole reservation back (the upstream did no work).
    pub fn refund(self) {
        match self {
            Grant::Local(a) => a.refund(),
            Grant::Shared(mut a) => a.settle(Some(0)),
        }
    }
}

/// The process's connection to the shared limits, its health and its background work.
pub struct SharedLimits {
    cfg: RedisLimitsConfig,
    backend: Arc<Backend>,
    metrics: Metrics,
    /// This process's slot ids start with it (random per start).
    replica: String,
    next_slot: AtomicU64,
    /// Concurrency slots this replica holds, by key: renewed every third of the lease.
    slots: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    /// Tenants with leases (leased mode), for returning idle leases.
    tenants: Mutex<Vec<Weak<SharedTenant>>>,
    /// Settlements not sent yet, by tenant, and whether a flush is scheduled.
    pending: Mutex<HashMap<Arc<str>, Pending>>,
    flush_scheduled: std::sync::atomic::AtomicBool,
    clock: SharedClock,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("mode", &self.cfg.mode)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Connect (in the background: a Redis that is down at start is a backend failure like
    /// any other) and start the renewal and lease-return tasks. Needs a Tokio runtime.
    pub fn start(cfg: RedisLimitsConfig, metrics: Metrics, clock: SharedClock) -> Arc<Self> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut id);
        let replica: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let backend = Backend::start(&cfg, metrics.clone());
        let s = Arc::new(Self {
            cfg,
            backend,
            metrics,
            replica,
            next_slot: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
            tenants: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            flush_scheduled: std::sync::atomic::AtomicBool::new(false),
            clock,
        });
        tokio::spawn(settle::renew_loop(Arc::downgrade(&s)));
        if s.cfg.mode == LimitsMode::Leased {
            tokio::spawn(tenant::lease_return_loop(Arc::downgrade(&s)));
        }
        s
    }

    /// Wait (at most the connect timeout) for the first connection, so a replica starting
    /// beside a healthy Redis makes no decision without it; whether it is up.
    pub async fn wait_connected(&self) -> bool {
        self.backend
            .wait_up(Duration::from_millis(self.cfg.connect_timeout_ms))
            .await
    }

    /// Whether a verified nonce is best recorded by the admission's own script
    /// ([`SharedTenant::admit`]) instead of its own call: `strict` mode on one server (in a
    /// Cluster the nonce's key has another hash tag than the tenant's).
    pub fn records_nonce_at_admission(&self) -> bool {
        self.cfg.mode == LimitsMode::Strict && self.cfg.url.is_some()
    }

    /// A tenant's shared limiter (its local fallback enforces `numbers` / `expected_replicas`).
    pub fn tenant(self: &Arc<Self>, name: &str, numbers: LimitNumbers) -> Arc<SharedTenant> {
        let n = self.cfg.expected_replicas.max(1);
        let share = LimitNumbers {
            requests_per_minute: numbers.requests_per_minute.map(|v| v.div_ceil(n).max(1)),
            tokens_per_minute: numbers
                .tokens_per_minute
                .map(|v| v.div_ceil(n as u64).max(1)),
            max_concurrent: numbers.max_concurrent.map(|v| v.div_ceil(n).max(1)),
        };
        let t = Arc::new(SharedTenant::new(
            name,
            numbers,
            TenantKeys::new(&self.cfg.key_prefix, name),
            Arc::new(TenantLimits::new(share, self.clock.clone())),
            self.clone(),
        ));
        if self.cfg.mode == LimitsMode::Leased {
            let mut v = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&t));
        }
        t
    }

    /// Count a decision made without Redis; what `on_backend_failure` says to do.
    fn degraded(&self) -> BackendFailure {
        let action = self.cfg.on_backend_failure;
        self.metrics.degraded(action);
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a log line shows of the shared limits: the mode, never the URL's password.
    #[tokio::test]
    async fn debug_names_the_mode_and_hides_the_url() {
        let cfg = RedisLimitsConfig {
            url: Some("redis://:hunter2-secret@127.0.0.1:1/".into()),
            mode: LimitsMode::Leased,
            ..RedisLimitsConfig::default()
        };
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let s = SharedLimits::start(cfg, metrics, SharedClock::system());
        let shown = format!("{s:?}");
        assert!(shown.contains("Leased"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    /// Tenants are built again at every configuration reload: the leased mode's list of
    /// tenants (whose idle leases go back to Redis) keeps only the ones still in use, however
    /// many reloads came before.
    #[tokio::test]
    async fn reloads_leave_no_dropped_tenant_in_the_lease_list() {
        let cfg = RedisLimitsConfig {
            url: Some("redis://127.0.0.1:1/".into()),
            mode: LimitsMode::Leased,
            ..RedisLimitsConfig::default()
        };
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let s = SharedLimits::start(cfg, metrics, SharedClock::system());
        let acme = s.tenant("acme", LimitNumbers::default());
        for _ in 0..10 {
            drop(s.tenant("globex", LimitNumbers::default()));
        }
        let globex = s.tenant("globex", LimitNumbers::default());
        let listed: Vec<Arc<SharedTenant>> = s
            .tenants
            .lock()
            .unwrap()
            .iter()
            .map(|w| w.upgrade().expect("only tenants in use are listed"))
            .collect();
        assert_eq!(listed.len(), 2);
        assert!(Arc::ptr_eq(&listed[0], &acme) && Arc::ptr_eq(&listed[1], &globex));
    }

    /// A tenant's shared limiter in a log line: which tenant, and the limits it shares; an
    /// admission: what it reserved.
    #[tokio::test]
    async fn a_tenants_debug_names_it_and_its_limits() {
        let cfg = RedisLimitsConfig {
            url: Some("redis://127.0.0.1:1/".into()),
            ..RedisLimitsConfig::default()
        };
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let s = SharedLimits::start(cfg, metrics, SharedClock::system());
        let numbers = LimitNumbers {
            requests_per_minute: Some(42),
            tokens_per_minute: Some(1234),
            max_concurrent: None,
        };
        let shown = format!("{:?}", s.tenant("acme-7", numbers));
        assert!(shown.contains("acme-7"), "{shown}");
        assert!(shown.contains("42") && shown.contains("1234"), "{shown}");
        // An admission: what it reserved.
        let g = s
            .tenant("globex", LimitNumbers::default())
            .admit(77, None)
            .await
            .unwrap();
        let shown = format!("{g:?}");
        assert!(shown.contains("reserved: 77"), "{shown}");
    }
}
