//! Prefix-cache isolation between tenants sharing one inference server.
//!
//! - `salted`: [`derive_salt`] gives each tenant a keyed `cache_salt` (HMAC-SHA256 over the
//!   generation and the tenant name), so its cache blocks are never shared.
//! - `exclusive`: the [`CacheGate`] runs such a tenant alone, in windows bounded by time and
//!   request count, with the upstream's prefix cache flushed (and the flush confirmed) before
//!   the window opens and before anyone else runs after it. Waits for running requests are
//!   bounded too (`cache.exclusive_drain_timeout_ms`): past the bound the waiter fails rather
//!   than run beside them.
//! - `shared`: unchanged, but still passes the gate so it waits while a window is open.

mod flush;
mod gate;
mod salt;

pub use flush::{FlushAttempt, FlushOutcome, judge_flush};
pub use gate::{CacheGate, GateError, GatePass, GateTimeout};
pub use salt::derive_salt;

use crate::config::{Flavor, FlushFailure};
use crate::record::metrics::{KindLabel, ResultLabel, TenantLabel, latency_histogram};
use http::Uri;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::time::Duration;

/// Gate settings, replaced on reload.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub exclusive: HashSet<String>,
    pub window: Duration,
    pub window_max_requests: u32,
    pub flavor: Flavor,
    pub upstream: Uri,
    pub flush_attempts: u32,
    pub flush_retry: Duration,
    pub flush_timeout: Duration,
    pub on_failure: FlushFailure,
    /// Bound on every wait for running requests (`cache.exclusive_drain_timeout_ms`).
    pub drain_timeout: Duration,
    /// `cache.flush_refused_while_busy`: a confirmed flush proves the upstream idle.
    pub flush_proves_idle: bool,
    /// `queue.max_inflight`: with fewer passes out than this, none waits in the fair queue.
    pub max_inflight: usize,
}

/// The prefix-cache isolation's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Flush attempts by result (see [`FlushOutcome::RESULTS`]).
    pub flushes: Family<ResultLabel, Counter>,
    pub flush_duration: Histogram,
    /// Bounded waits at the gate that ran out, by kind (see [`GateTimeout`]).
    pub gate_timeouts: Family<KindLabel, Counter>,
    /// Requests whose client tried to set `cache_salt` (always replaced or removed).
    pub salt_overrides: Family<TenantLabel, Counter>,
}

impl Metrics {
    /// Create the families and register them under `bulkhead_` (`registry` is the prefixed
    /// sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            flushes: Family::default(),
            flush_duration: latency_histogram(),
            gate_timeouts: Family::default(),
            salt_overrides: Family::default(),
        };
        r.register(
            "cache_flushes",
            "Upstream prefix-cache flush attempts, by result (ok, failed, refused)",
            m.flushes.clone(),
        );
        r.register(
            "cache_flush_duration_seconds",
            "Time one upstream prefix-cache flush call took",
            m.flush_duration.clone(),
        );
        r.register(
            "cache_gate_timeouts",
            "Cache-gate waits that ran out: exclusive_drain (an exclusive request's wait for \
             other tenants' requests), window_drain (a wait for an exclusive window's \
             requests), queue (the queue timeout)",
            m.gate_timeouts.clone(),
        );
        r.register(
            "cache_salt_overrides",
            "Requests whose client tried to set cache_salt (replaced or removed)",
            m.salt_overrides.clone(),
        );
        for result in FlushOutcome::RESULTS {
            let _ = m.flushes.get_or_create(&ResultLabel { result });
        }
        for t in GateTimeout::ALL {
            let _ = m
                .gate_timeouts
                .get_or_create(&KindLabel { kind: t.as_str() });
        }
        m
    }

    /// A wait at the gate ran out.
    pub fn timed_out(&self, kind: GateTimeout) {
        self.gate_timeouts
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}
