//! Per-tenant limits: requests per minute (governor GCRA), tokens per minute (a token bucket
//! with reservation at admission and reconciliation with the real usage), and concurrency.
//! Time comes from an injected [`Clock`] so tests never sleep.

use crate::config::TenantConfig;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A monotonic clock: time since an arbitrary origin.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(Mutex<Duration>);

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cloneable handle on a [`Clock`]; also a `governor` clock.
#[derive(Clone)]
pub struct SharedClock(pub Arc<dyn Clock>);

impl SharedClock {
    pub fn system() -> Self {
        Self(Arc::new(SystemClock::default()))
    }
}

impl std::fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClock")
    }
}

impl governor::clock::Clock for SharedClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.0.now()
    }
}

/// Which limit refused a request (also the `limit` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    Queue,
    /// The tenant's KV-cache quota (`max_kv_tokens`).
    KvTokens,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Requests,
        LimitKind::Tokens,
        LimitKind::Concurrency,
        LimitKind::Queue,
        LimitKind::KvTokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "concurrency",
            LimitKind::Queue => "queue",
            LimitKind::KvTokens => "kv_tokens",
        }
    }
}

/// OpenAI-style rate-limit state, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateInfo {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub kind: LimitKind,
    pub retry_after: Duration,
    pub info: RateInfo,
}

/// Tokens per minute: a bucket that refills continuously and may go negative when a
/// reservation turns out too small (time: the limiter clock's `Duration` since its origin).
type TokenBucket = agent_common::bucket::TokenBucket<Duration>;

fn tokens_per_minute(tpm: u64) -> TokenBucket {
    TokenBucket::full(tpm as f64, tpm as f64 / 60.0)
}

/// The `x-ratelimit-remaining-tokens` of a bucket: its balance, 0 when overdrawn.
fn remaining(b: &TokenBucket) -> u64 {
    b.balance().max(0.0) as u64
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, SharedClock, StateInformationMiddleware>;

/// The numbers a tenant's limiter enforces (and nothing else of its configuration, so a reload
/// that changes only its weight or isolation keeps its buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitNumbers {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl LimitNumbers {
    pub fn of(t: &TenantConfig) -> Self {
        Self {
            requests_per_minute: t.requests_per_minute,
            tokens_per_minute: t.tokens_per_minute,
            max_concurrent: t.max_concurrent,
        }
    }
}

/// One tenant's limits.
pub struct TenantLimits {
    config: LimitNumbers,
    clock: SharedClock,
    rpm: Option<Gcra>,
    tpm: Option<Mutex<TokenBucket>>,
    concurrent: AtomicU32,
}

impl std::fmt::Debug for TenantLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLimits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct ConcurrencyGuard(Option<Arc<TenantLimits>>);

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.concurrent.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// An admitted request: the tokens reserved for it and its concurrency slot. Dropped without
/// an outcome (the client went away), its reservation stays charged.
#[derive(Debug)]
pub struct Admission {
    pub reserved: u64,
    pub info: RateInfo,
    pub guard: ConcurrencyGuard,
    limits: Arc<TenantLimits>,
    settled: bool,
}

impl Admission {
    /// Replace the reservation by the real usage (`None`: unknown, the reservation stays).
    pub fn reconcile(mut self, actual: Option<u64>) {
        self.settle(actual);
    }

    /// Give the whole reservation back (the upstream did no work).
    pub fn refund(mut self) {
        self.settle(Some(0));
    }

    fn settle(&mut self, actual: Option<u64>) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let (Some(actual), Some(tpm)) = (actual, &self.limits.tpm) {
            let delta = self.reserved as f64 - actual as f64;
            let now = self.limits.clock.0.now();
            tpm.lock()
                .unwrap_or_else(|e| e.into_inner())
                .credit(delta, now);
        }
    }
}

impl TenantLimits {
    pub fn new(config: LimitNumbers, clock: SharedClock) -> Self {
        let rpm = config
            .requests_per_minute
            .and_then(NonZeroU32::new)
            .map(|n| {
                RateLimiter::direct_with_clock(Quota::per_minute(n), clock.clone())
                    .with_middleware::<StateInformationMiddleware>()
            });
        let tpm = config
            .tokens_per_minute
            .map(|t| Mutex::new(tokens_per_minute(t)));
        Self {
            config,
            clock,
            rpm,
            tpm,
            concurrent: AtomicU32::new(0),
        }
    }

    pub fn numbers(&self) -> &LimitNumbers {
        &self.config
    }

    /// Admit a request estimated at `estimate` tokens, or say which limit refused it.
    pub fn admit(self: &Arc<Self>, estimate: u64) -> Result<Admission, Rejection> {
        let mut info = RateInfo::default();
        let now = self.clock.0.now();
        // Concurrency first: it is given back on every path below.
        let guard = if let Some(max) = self.config.max_concurrent {
            let mut cur = self.concurrent.load(Ordering::Acquire);
            loop {
                if cur >= max {
                    return Err(Rejection {
                        kind: LimitKind::Concurrency,
                        retry_after: Duration::from_secs(1),
                        info: self.peek_info(now),
                    });
                }
                match self.concurrent.compare_exchange(
                    cur,
                    cur + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(c) => cur = c,
                }
            }
            ConcurrencyGuard(Some(self.clone()))
        } else {
            ConcurrencyGuard(None)
        };
        if let (Some(rpm), Some(limit)) = (&self.rpm, self.config.requests_per_minute) {
            info.limit_requests = Some(limit as u64);
            match rpm.check() {
                Ok(snap) => {
                    let rem = snap.remaining_burst_capacity() as u64;
                    info.remaining_requests = Some(rem);
                    info.reset_requests =
                        Some(per_unit(limit as u64 - rem.min(limit as u64), limit as u64));
                }
                Err(nu) => {
                    let wait = nu.wait_time_from(now);
                    info.remaining_requests = Some(0);
                    info.reset_requests = Some(wait);
                    self.fill_tokens(&mut info, now);
                    return Err(Rejection {
                        kind: LimitKind::Requests,
                        retry_after: wait,
                        info,
                    });
                }
            }
        }
        if let Some(tpm) = &self.tpm {
            let mut b = tpm.lock().unwrap_or_else(|e| e.into_inner());
            let res = b.reserve(estimate as f64, now);
            info.limit_tokens = self.config.tokens_per_minute;
            info.remaining_tokens = Some(remaining(&b));
            info.reset_tokens = Some(b.until_full());
            if let Err(wait) = res {
                return Err(Rejection {
                    kind: LimitKind::Tokens,
                    retry_after: wait,
                    info,
                });
            }
        }
        Ok(Admission {
            reserved: estimate,
            info,
            guard,
            limits: self.clone(),
            settled: false,
        })
    }

    fn fill_tokens(&self, info: &mut RateInfo, now: Duration) {
        if let Some(tpm) = &self.tpm {
            let mut b = tpm.lock().unwrap_or_else(|e| e.into_inner());
            b.refill(now);
            info.limit_tokens = self.config.tokens_per_minute;
            info.remaining_tokens = Some(remaining(&b));
            info.reset_tokens = Some(b.until_full());
        }
    }

    fn peek_info(&self, now: Duration) -> RateInfo {
        let mut info = RateInfo {
            limit_requests: self.config.requests_per_minute.map(u64::from),
            ..RateInfo::default()
        };
        self.fill_tokens(&mut info, now);
        info
    }

    /// Tokens currently available (tests and metrics).
    pub fn tokens_remaining(&self) -> Option<i64> {
        self.tpm.as_ref().map(|t| {
            let mut b = t.lock().unwrap_or_else(|e| e.into_inner());
            b.refill(self.clock.0.now());
            b.balance().floor() as i64
        })
    }
}

fn per_unit(used: u64, limit: u64) -> Duration {
    Duration::from_secs_f64(60.0 * used as f64 / limit as f64)
}

/// Format a duration the way OpenAI's `x-ratelimit-reset-*` headers do (`1s`, `6m0s`, `20ms`).
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let total = d.as_secs();
    format!("{}m{}s", total / 60, total % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rpm: Option<u32>, tpm: Option<u64>, conc: Option<u32>) -> TenantConfig {
        TenantConfig {
            weight: 1,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent: conc,
            default_max_tokens: 100,
            max_kv_tokens: None,
            canaries: Vec::new(),
            keywords: Vec::new(),
            audit_key_file: None,
            isolation: Default::default(),
            unknown_routes: Default::default(),
            extra_fields: Vec::new(),
            priority: 0,
            trusted_engine_fields: Vec::new(),
            store_responses: false,
            trust_traceparent: false,
        }
    }

    fn setup(cfg: TenantConfig) -> (Arc<ManualClock>, Arc<TenantLimits>) {
        let clock = Arc::new(ManualClock::default());
        let l = Arc::new(TenantLimits::new(
            LimitNumbers::of(&cfg),
            SharedClock(clock.clone()),
        ));
        (clock, l)
    }

    #[test]
    fn rpm_refills_with_the_clock() {
        let (clock, l) = setup(tenant(Some(2), None, None));
        let a = l.admit(1).unwrap();
        assert_eq!(a.info.remaining_requests, Some(1));
        l.admit(1).unwrap();
        let r = l.admit(1).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert_eq!(r.retry_after, Duration::from_secs(30));
        clock.advance(Duration::from_secs(30));
        l.admit(1).unwrap();
    }

    #[test]
    fn tokens_reserve_and_reconcile() {
        let (clock, l) = setup(tenant(None, Some(1000), None));
        let a = l.admit(600).unwrap();
        assert_eq!(l.tokens_remaining(), Some(400));
        // A second 600 does not fit while the first is reserved.
        let r = l.admit(600).unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
        assert_eq!(r.info.remaining_tokens, Some(400));
        assert_eq!(r.retry_after, Duration::from_secs(12));
        // The real usage was 100: 500 come back.
        a.reconcile(Some(100));
        assert_eq!(l.tokens_remaining(), Some(900));
        // Usage above the reservation drives the balance down (even negative).
        let b = l.admit(100).unwrap();
        b.reconcile(Some(1500));
        assert_eq!(l.tokens_remaining(), Some(-600));
        assert!(l.admit(1).is_err());
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.tokens_remaining(), Some(400));
        // Dropping without an outcome keeps the reservation charged; refund gives it back.
        drop(l.admit(300).unwrap());
        assert_eq!(l.tokens_remaining(), Some(100));
        l.admit(100).unwrap().refund();
        assert_eq!(l.tokens_remaining(), Some(100));
    }

    #[test]
    fn oversized_request_waits_for_a_full_bucket() {
        let (clock, l) = setup(tenant(None, Some(100), None));
        l.admit(500).unwrap().reconcile(Some(500));
        assert!(l.admit(500).is_err());
        clock.advance(Duration::from_secs(300));
        l.admit(500).unwrap();
    }

    #[test]
    fn concurrency_slots_come_back() {
        let (_c, l) = setup(tenant(None, None, Some(1)));
        let a = l.admit(1).unwrap();
        assert_eq!(l.admit(1).unwrap_err().kind, LimitKind::Concurrency);
        drop(a);
        l.admit(1).unwrap();
    }

    #[test]
    fn rate_headers_say_what_is_left_and_when_it_is_back() {
        let (_c, l) = setup(tenant(Some(2), Some(1000), Some(5)));
        let a = l.admit(600).unwrap();
        let want = RateInfo {
            limit_requests: Some(2),
            remaining_requests: Some(1),
            // One of two requests used: back in half a minute.
            reset_requests: Some(Duration::from_secs(30)),
            limit_tokens: Some(1000),
            remaining_tokens: Some(400),
            // 600 of 1000 tokens used, 1000 a minute: back in 36 s.
            reset_tokens: Some(Duration::from_secs(36)),
        };
        assert_eq!(a.info, want);
        assert_eq!(
            *l.numbers(),
            LimitNumbers {
                requests_per_minute: Some(2),
                tokens_per_minute: Some(1000),
                max_concurrent: Some(5)
            }
        );
        // Refused by the request rate: the token figures come along.
        l.admit(1).unwrap().refund();
        let r = l.admit(1).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert_eq!(
            (
                r.info.limit_tokens,
                r.info.remaining_tokens,
                r.info.reset_tokens
            ),
            (Some(1000), Some(400), Some(Duration::from_secs(36)))
        );
    }

    #[test]
    fn the_request_reset_is_the_time_the_used_requests_take_to_come_back() {
        let (_c, l) = setup(tenant(Some(4), None, None));
        let resets: Vec<_> = (0..3)
            .map(|_| l.admit(1).unwrap().info.reset_requests.unwrap())
            .collect();
        // 4 a minute: each used request is back after 15 s.
        assert_eq!(
            resets,
            [15, 30, 45].map(Duration::from_secs),
            "after 1, 2 and 3 requests"
        );
    }

    #[test]
    fn a_concurrency_refusal_carries_the_rate_figures() {
        let (_c, l) = setup(tenant(Some(10), Some(1000), Some(1)));
        let _a = l.admit(250).unwrap();
        let r = l.admit(1).unwrap_err();
        assert_eq!(r.kind, LimitKind::Concurrency);
        assert_eq!(
            r.info,
            RateInfo {
                limit_requests: Some(10),
                remaining_requests: None,
                reset_requests: None,
                limit_tokens: Some(1000),
                remaining_tokens: Some(750),
                reset_tokens: Some(Duration::from_secs(15)),
            }
        );
    }

    #[test]
    fn limit_names_are_the_metric_labels() {
        let names: Vec<_> = [
            LimitKind::Requests,
            LimitKind::Tokens,
            LimitKind::Concurrency,
            LimitKind::Queue,
            LimitKind::KvTokens,
        ]
        .map(LimitKind::as_str)
        .into();
        assert_eq!(
            names,
            ["requests", "tokens", "concurrency", "queue", "kv_tokens"]
        );
    }

    #[test]
    fn the_system_clock_moves_and_debug_output_names_the_numbers() {
        let clock = SharedClock::system();
        let t0 = governor::clock::Clock::now(&clock);
        let deadline = Instant::now() + Duration::from_secs(5);
        while governor::clock::Clock::now(&clock) == t0 {
            assert!(Instant::now() < deadline, "the system clock stands still");
            std::hint::spin_loop();
        }
        assert_eq!(format!("{clock:?}"), "SharedClock");
        let (_c, l) = setup(tenant(Some(7), None, None));
        let dbg = format!("{l:?}");
        assert!(
            dbg.starts_with("TenantLimits") && dbg.contains("requests_per_minute: Some(7)"),
            "{dbg}"
        );
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(999)), "999ms");
        assert_eq!(format_reset(Duration::from_secs(59)), "59s");
        assert_eq!(format_reset(Duration::from_secs(60)), "1m0s");
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
