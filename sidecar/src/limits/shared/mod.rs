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
pub mod scripts;

use crate::auth::signature::{AuthError, NonceRecord, Verifier};
use crate::config::{BackendFailure, LimitsMode, RedisLimitsConfig};
use crate::limits::local::{
    Admission, LimitKind, LimitNumbers, RateInfo, Rejection, SharedClock, TenantLimits,
};
use crate::limits::metrics::Metrics;
use conn::Backend;
use scripts::TenantKeys;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A lease left unused this long goes back to Redis.
const LEASE_IDLE: Duration = Duration::from_secs(1);
/// Settlements are gathered this long and sent as one call per tenant.
const SETTLE_BATCH: Duration = Duration::from_millis(2);
/// Slots released by one settlement call at most (the script's argument list).
const SLOTS_PER_CALL: usize = 500;

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
        tokio::spawn(renew_loop(Arc::downgrade(&s)));
        if s.cfg.mode == LimitsMode::Leased {
            tokio::spawn(lease_return_loop(Arc::downgrade(&s)));
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
        let t = Arc::new(SharedTenant {
            name: Arc::from(name),
            numbers,
            keys: TenantKeys::new(&self.cfg.key_prefix, name),
            lease: Mutex::new(Lease::default()),
            fallback: Arc::new(TenantLimits::new(share, self.clock.clone())),
            shared: self.clone(),
        });
        if self.cfg.mode == LimitsMode::Leased {
            let mut v = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&t));
        }
        t
    }

    /// Record a verified request's nonce in Redis (or, while Redis is down, as
    /// `on_backend_failure` says). A nonce Redis accepts is recorded in this process's replay
    /// cache too ([`SharedLimits::remember_locally`]).
    pub async fn record_nonce(
        &self,
        verifier: &Verifier,
        n: &NonceRecord,
    ) -> Result<(), SharedError> {
        if self.backend.is_up() {
            let key = scripts::replay_key(&self.cfg.key_prefix, &n.key_id);
            let member = scripts::replay_member(&n.key_id, &n.nonce);
            let mut inv = scripts::REPLAY.prepare_invoke();
            inv.key(key)
                .arg(member)
                .arg(n.forget_at.saturating_mul(1000))
                .arg(n.key_share);
            match self.backend.invoke::<i64>(&inv).await {
                Some(0) => return Self::remember_locally(verifier, n),
                Some(1) => return Err(SharedError::Auth(AuthError::Replayed)),
                Some(_) => return Err(SharedError::Auth(AuthError::ReplayCacheFull)),
                None => {}
            }
        }
        match self.degraded() {
            BackendFailure::Local => verifier.record_local(n).map_err(SharedError::Auth),
            BackendFailure::Deny => Err(SharedError::Unavailable),
        }
    }

    /// Remember in Redis that `tenant` was handed the stored response `id`, for `ttl`. Best
    /// effort: the replica remembers it too, and an id nobody remembers is refused.
    pub async fn record_response(&self, tenant: &str, id: &str, ttl: Duration) {
        if !self.backend.is_up() {
            return;
        }
        let mut inv = scripts::RESPONSE_RECORD.prepare_invoke();
        inv.key(scripts::response_key(&self.cfg.key_prefix, tenant, id))
            .arg(ttl.as_millis() as u64);
        self.backend.invoke::<i64>(&inv).await;
    }

    /// Whether Redis remembers `id` as `tenant`'s; `None` while Redis cannot answer.
    pub async fn owns_response(&self, tenant: &str, id: &str) -> Option<bool> {
        if !self.backend.is_up() {
            return None;
        }
        let mut inv = scripts::RESPONSE_OWNED.prepare_invoke();
        inv.key(scripts::response_key(&self.cfg.key_prefix, tenant, id));
        self.backend.invoke::<i64>(&inv).await.map(|n| n == 1)
    }

    /// Record a nonce Redis has recorded in this process's replay cache as well, so that while
    /// Redis is down (`on_backend_failure = "local"` checks nonces here alone) this replica
    /// still refuses a replay of a request it served. Fails closed as the local cache does
    /// (`ReplayCacheFull` when its key id's share is full: better refuse than forget a live
    /// nonce).
    fn remember_locally(verifier: &Verifier, n: &NonceRecord) -> Result<(), SharedError> {
        verifier.record_local(n).map_err(SharedError::Auth)
    }

    /// Count a decision made without Redis; what `on_backend_failure` says to do.
    fn degraded(&self) -> BackendFailure {
        let action = self.cfg.on_backend_failure;
        self.metrics.degraded(action);
        action
    }

    fn slot_id(&self) -> String {
        let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.replica)
    }

    fn hold_slot(&self, key: &Arc<str>, id: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .insert(id.to_string());
    }

    fn drop_slot(&self, key: &Arc<str>, id: &str) {
        let mut m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get_mut(key) {
            s.remove(id);
            if s.is_empty() {
                m.remove(key);
            }
        }
    }

    /// Send a settlement without waiting for it (from a `Drop`): tokens credited (negative:
    /// charged), requests returned, a slot released. Settlements are gathered for
    /// [`SETTLE_BATCH`] and sent as one call per tenant, off every request's path. Lost when
    /// Redis is down: the slot then expires with its lease, and the bucket refills with time.
    fn settle_later(
        self: &Arc<Self>,
        t: &SharedTenant,
        requests: u64,
        tokens: f64,
        slot: Option<String>,
    ) {
        if requests == 0 && tokens == 0.0 && slot.is_none() {
            return;
        }
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let e = p.entry(t.name.clone()).or_insert_with(|| Pending {
                keys: t.keys.clone(),
                numbers: t.numbers,
                requests: 0,
                tokens: 0.0,
                slots: Vec::new(),
            });
            e.numbers = t.numbers;
            e.requests += requests;
            e.tokens += tokens;
            e.slots.extend(slot);
        }
        if self.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.flush_scheduled.store(false, Ordering::Release);
            return;
        };
        let s = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(SETTLE_BATCH).await;
            s.flush_scheduled.store(false, Ordering::Release);
            let batch: Vec<Pending> = s
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .map(|(_, v)| v)
                .collect();
            if !s.backend.is_up() {
                return;
            }
            for p in batch {
                let mut slots = p.slots.chunks(SLOTS_PER_CALL).peekable();
                let mut first = true;
                while first || slots.peek().is_some() {
                    let chunk = slots.next().unwrap_or(&[]);
                    let (requests, tokens) = if first {
                        (p.requests, p.tokens)
                    } else {
                        (0, 0.0)
                    };
                    first = false;
                    let mut inv = scripts::SETTLE.prepare_invoke();
                    inv.key(&p.keys.rpm)
                        .key(&p.keys.tpm)
                        .key(&*p.keys.conc)
                        .arg(p.numbers.requests_per_minute.unwrap_or(0))
                        .arg(requests)
                        .arg(p.numbers.tokens_per_minute.unwrap_or(0))
                        .arg(format!("{tokens:.3}"));
                    for id in chunk {
                        inv.arg(id);
                    }
                    if s.backend.invoke::<i64>(&inv).await.is_none() {
                        return;
                    }
                }
            }
        });
    }
}

/// Settlements of one tenant gathered for one call.
struct Pending {
    keys: TenantKeys,
    numbers: LimitNumbers,
    requests: u64,
    tokens: f64,
    slots: Vec<String>,
}

/// Tokens and requests a replica holds from Redis (leased mode).
#[derive(Debug)]
struct Lease {
    tokens: f64,
    requests: u64,
    last_used: Instant,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            tokens: 0.0,
            requests: 0,
            last_used: Instant::now(),
        }
    }
}

/// One tenant's shared limiter.
pub struct SharedTenant {
    name: Arc<str>,
    numbers: LimitNumbers,
    keys: TenantKeys,
    lease: Mutex<Lease>,
    /// Enforces numbers / `expected_replicas` while Redis is down.
    fallback: Arc<TenantLimits>,
    shared: Arc<SharedLimits>,
}

impl std::fmt::Debug for SharedTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTenant")
            .field("name", &self.name)
            .field("numbers", &self.numbers)
            .finish_non_exhaustive()
    }
}

/// Releases a slot when dropped armed: an admission whose answer never came (cancelled, or
/// the call failed) after the script may have taken it.
struct SlotOnDrop(Option<(Arc<SharedTenant>, String)>);

impl Drop for SlotOnDrop {
    fn drop(&mut self) {
        if let Some((t, id)) = self.0.take() {
            t.shared.settle_later(&t, 0, 0.0, Some(id));
        }
    }
}

/// What the admission script answered.
struct Answer {
    status: i64,
    retry_ms: i64,
    req_granted: i64,
    tok_granted: i64,
    info: RateInfo,
}

impl SharedTenant {
    pub fn numbers(&self) -> &LimitNumbers {
        &self.numbers
    }

    /// The redis keys of this tenant (tests and tooling).
    pub fn keys(&self) -> &TenantKeys {
        &self.keys
    }

    /// Admit a request estimated at `estimate` tokens: one round trip to Redis in `strict`
    /// mode; in `leased` mode none while the replica's lease covers it (and no concurrency
    /// limit is set). No lock is held across the call.
    ///
    /// `nonce`: a verified request's nonce not recorded yet (see
    /// [`SharedLimits::records_nonce_at_admission`]): recorded first, in the admission's own
    /// script when it can be, else by its own call; `SharedError::Auth` when replayed.
    pub async fn admit(
        self: &Arc<Self>,
        estimate: u64,
        nonce: Option<(&Verifier, &NonceRecord)>,
    ) -> Result<Grant, SharedError> {
        let s = &self.shared;
        let n = self.numbers;
        let merged = nonce.filter(|_| {
            s.records_nonce_at_admission() && s.backend.is_up() && n != LimitNumbers::default()
        });
        if merged.is_none()
            && let Some((verifier, record)) = nonce
        {
            s.record_nonce(verifier, record).await?;
        }
        if n == LimitNumbers::default() {
            // No limit to share: nothing to ask.
            return Ok(self.granted(estimate, false, None, RateInfo::default()));
        }
        let leased = s.cfg.mode == LimitsMode::Leased;
        if leased
            && n.max_concurrent.is_none()
            && let Some(g) = self.from_lease(estimate)
        {
            return Ok(g);
        }
        if !s.backend.is_up() {
            return self.degraded(estimate);
        }
        // What this request needs, and (leased) the lease taken beside it.
        let (req_need, tok_need) = (
            u64::from(n.requests_per_minute.is_some()),
            if n.tokens_per_minute.is_some() {
                estimate
            } else {
                0
            },
        );
        let (req_extra, tok_extra) = if leased {
            let r = s.cfg.expected_replicas.max(1);
            (
                n.requests_per_minute
                    .map_or(0, |rpm| u64::from(s.cfg.lease_requests.min(rpm / r))),
                n.tokens_per_minute
                    .map_or(0, |tpm| s.cfg.lease_tokens.min(tpm / r as u64)),
            )
        } else {
            (0, 0)
        };
        let slot = n.max_concurrent.map(|_| s.slot_id());
        let mut inv = scripts::ADMIT.prepare_invoke();
        inv.key(&self.keys.rpm)
            .key(&self.keys.tpm)
            .key(&*self.keys.conc)
            .arg(n.requests_per_minute.unwrap_or(0))
            .arg(req_need + req_extra)
            .arg(req_need)
            .arg(n.tokens_per_minute.unwrap_or(0))
            .arg(tok_need + tok_extra)
            .arg(tok_need)
            .arg(n.max_concurrent.unwrap_or(0))
            .arg(slot.as_deref().unwrap_or(""))
            .arg(s.cfg.concurrency_lease_ms);
        if let Some((_, record)) = merged {
            inv.key(scripts::replay_key(&s.cfg.key_prefix, &record.key_id))
                .arg(scripts::replay_member(&record.key_id, &record.nonce))
                .arg(record.forget_at.saturating_mul(1000))
                .arg(record.key_share);
        }
        // Should this future be dropped during the call (the client went away), the slot the
        // script may have taken is released rather than left to its lease.
        let mut cancelled = SlotOnDrop(slot.as_ref().map(|id| (self.clone(), id.clone())));
        let answer = s.backend.invoke::<Vec<i64>>(&inv).await;
        let a = match answer.as_deref().map(|v| self.answer(v)) {
            Some(Some(a)) => a,
            failed => {
                if failed.is_some() {
                    tracing::warn!(tenant = %self.name, "unexpected answer from the limits script");
                }
                // Without Redis's answer: the nonce goes where on_backend_failure says.
                if let Some((verifier, record)) = merged {
                    s.record_nonce(verifier, record).await?;
                }
                return self.degraded(estimate);
            }
        };
        // Statuses 0-3: the script recorded the nonce (before it applied the limits); this
        // replica remembers it too. Should that fail, the slot the script took is released.
        if let Some((verifier, record)) = merged
            && (0..=3).contains(&a.status)
        {
            SharedLimits::remember_locally(verifier, record)?;
        }
        // Answered: the slot is taken (admitted) or was never added (refused).
        cancelled.0 = None;
        let kind = match a.status {
            0 => None,
            1 => Some(LimitKind::Requests),
            2 => Some(LimitKind::Tokens),
            3 => Some(LimitKind::Concurrency),
            4 => return Err(SharedError::Auth(AuthError::Replayed)),
            _ => return Err(SharedError::Auth(AuthError::ReplayCacheFull)),
        };
        if let Some(kind) = kind {
            // Grants to concurrent requests may have refilled the lease meanwhile.
            if leased
                && kind != LimitKind::Concurrency
                && n.max_concurrent.is_none()
                && let Some(g) = self.from_lease(estimate)
            {
                return Ok(g);
            }
            return Err(SharedError::Limit(Rejection {
                kind,
                retry_after: Duration::from_millis(a.retry_ms.max(0) as u64),
                info: a.info,
            }));
        }
        if let Some(id) = &slot {
            s.hold_slot(&self.keys.conc, id);
        }
        let mut info = a.info;
        if leased {
            // The request's own share of the grant is spent; the rest is the lease.
            let mut l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
            l.requests += (a.req_granted.max(0) as u64).saturating_sub(req_need);
            l.tokens += (a.tok_granted.max(0) as u64).saturating_sub(tok_need) as f64;
            l.last_used = Instant::now();
            info = self.local_info(&l);
        }
        Ok(self.granted(estimate, leased, slot, info))
    }

    /// Spend from this replica's lease when it covers the request (leased mode).
    fn from_lease(self: &Arc<Self>, estimate: u64) -> Option<Grant> {
        let n = self.numbers;
        let mut l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        let req_ok = n.requests_per_minute.is_none() || l.requests >= 1;
        let tok_ok = n.tokens_per_minute.is_none() || l.tokens >= estimate as f64;
        if !(req_ok && tok_ok) {
            return None;
        }
        if n.requests_per_minute.is_some() {
            l.requests -= 1;
        }
        if n.tokens_per_minute.is_some() {
            l.tokens -= estimate as f64;
        }
        l.last_used = Instant::now();
        Some(self.granted(estimate, true, None, self.local_info(&l)))
    }

    fn answer(&self, v: &[i64]) -> Option<Answer> {
        let [
            status,
            retry_ms,
            req_granted,
            tok_granted,
            rem_req,
            reset_req,
            rem_tok,
            reset_tok,
        ] = *v
        else {
            return None;
        };
        let opt = |x: i64| (x >= 0).then_some(x as u64);
        let n = &self.numbers;
        Some(Answer {
            status,
            retry_ms,
            req_granted,
            tok_granted,
            info: RateInfo {
                limit_requests: n.requests_per_minute.map(u64::from),
                remaining_requests: opt(rem_req),
                reset_requests: opt(reset_req).map(Duration::from_millis),
                limit_tokens: n.tokens_per_minute,
                remaining_tokens: opt(rem_tok),
                reset_tokens: opt(reset_tok).map(Duration::from_millis),
            },
        })
    }

    /// Rate headers in leased mode: what this replica's lease holds.
    fn local_info(&self, l: &Lease) -> RateInfo {
        let n = &self.numbers;
        RateInfo {
            limit_requests: n.requests_per_minute.map(u64::from),
            remaining_requests: n.requests_per_minute.map(|_| l.requests),
            reset_requests: None,
            limit_tokens: n.tokens_per_minute,
            remaining_tokens: n.tokens_per_minute.map(|_| l.tokens.max(0.0) as u64),
            reset_tokens: None,
        }
    }

    fn granted(
        self: &Arc<Self>,
        estimate: u64,
        leased: bool,
        slot: Option<String>,
        info: RateInfo,
    ) -> Grant {
        Grant::Shared(SharedAdmission {
            reserved: estimate,
            info,
            tenant: self.clone(),
            leased,
            slot,
            settled: false,
        })
    }

    fn degraded(&self, estimate: u64) -> Result<Grant, SharedError> {
        match self.shared.degraded() {
            BackendFailure::Local => self
                .fallback
                .admit(estimate)
                .map(Grant::Local)
                .map_err(SharedError::Limit),
            BackendFailure::Deny => Err(SharedError::Unavailable),
        }
    }

    /// Give an idle lease back to Redis (leased mode).
    fn return_idle_lease(self: &Arc<Self>) {
        let (requests, tokens) = {
            let mut l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
            if l.last_used.elapsed() < LEASE_IDLE || (l.requests == 0 && l.tokens <= 0.0) {
                return;
            }
            let r = (
                std::mem::take(&mut l.requests),
                std::mem::take(&mut l.tokens),
            );
            l.last_used = Instant::now();
            r
        };
        self.shared
            .settle_later(self, requests, tokens.max(0.0), None);
    }
}

/// A request admitted by the shared limits: its reservation and its concurrency slot, settled
/// once (reconcile, refund or drop).
pub struct SharedAdmission {
    pub reserved: u64,
    pub info: RateInfo,
    tenant: Arc<SharedTenant>,
    /// The tokens came out of this replica's lease (leased mode): settle against it.
    leased: bool,
    slot: Option<String>,
    settled: bool,
}

impl std::fmt::Debug for SharedAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAdmission")
            .field("reserved", &self.reserved)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl SharedAdmission {
    fn settle(&mut self, actual: Option<u64>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let t = &self.tenant;
        let s = &t.shared;
        if let Some(id) = &self.slot {
            s.drop_slot(&t.keys.conc, id);
        }
        let mut delta = match (actual, t.numbers.tokens_per_minute) {
            (Some(actual), Some(_)) => self.reserved as f64 - actual as f64,
            _ => 0.0,
        };
        if self.leased && delta != 0.0 {
            // A refund goes into the lease; a charge beyond it goes to Redis.
            let mut l = t.lease.lock().unwrap_or_else(|e| e.into_inner());
            l.tokens += delta;
            delta = l.tokens.min(0.0);
            l.tokens = l.tokens.max(0.0);
        }
        s.settle_later(t, 0, delta, self.slot.take());
    }
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        // Dropped without an outcome: the reservation stays charged, the slot is released.
        self.settle(None);
    }
}

/// Renew this replica's slots every third of the lease, so they outlive it only while the
/// replica lives.
async fn renew_loop(s: Weak<SharedLimits>) {
    let every = match s.upgrade() {
        Some(s) => Duration::from_millis(s.cfg.concurrency_lease_ms / 3),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = s.upgrade() else { return };
        if !s.backend.is_up() {
            continue;
        }
        let held: Vec<(Arc<str>, Vec<String>)> = s
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
            .collect();
        for (key, ids) in held {
            let mut inv = scripts::RENEW.prepare_invoke();
            inv.key(&*key).arg(s.cfg.concurrency_lease_ms);
            for id in ids {
                inv.arg(id);
            }
            if s.backend.invoke::<i64>(&inv).await.is_none() {
                break;
            }
        }
    }
}

/// Return leases left unused for [`LEASE_IDLE`] (leased mode), so tokens do not sit idle in
/// one replica while another is refused.
async fn lease_return_loop(s: Weak<SharedLimits>) {
    let mut tick = tokio::time::interval(LEASE_IDLE / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = s.upgrade() else { return };
        let tenants: Vec<Arc<SharedTenant>> = s
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for t in tenants {
            t.return_idle_lease();
        }
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
