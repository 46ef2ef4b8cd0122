//! One tenant's shared limiter: its admission (one script call, or none while this replica's
//! lease covers it, in `leased` mode), its lease, and the admission it hands out, settled once.

use super::{Grant, SharedError, SharedLimits, scripts};
use crate::auth::signature::{AuthError, NonceRecord, Verifier};
use crate::config::{BackendFailure, LimitsMode};
use crate::limits::local::{LimitKind, LimitNumbers, RateInfo, Rejection, TenantLimits};
use scripts::TenantKeys;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A lease left unused this long goes back to Redis.
const LEASE_IDLE: Duration = Duration::from_secs(1);

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
    pub(super) name: Arc<str>,
    pub(super) numbers: LimitNumbers,
    pub(super) keys: TenantKeys,
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
    pub(super) fn new(
        name: &str,
        numbers: LimitNumbers,
        keys: TenantKeys,
        fallback: Arc<TenantLimits>,
        shared: Arc<SharedLimits>,
    ) -> Self {
        Self {
            name: Arc::from(name),
            numbers,
            keys,
            lease: Mutex::new(Lease::default()),
            fallback,
            shared,
        }
    }

    pub fn numbers(&self) -> &LimitNumbers {
        &self.numbers
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
    pub(super) fn settle(&mut self, actual: Option<u64>) {
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

/// Return leases left unused for [`LEASE_IDLE`] (leased mode), so tokens do not sit idle in
/// one replica while another is refused.
pub(super) async fn lease_return_loop(s: Weak<SharedLimits>) {
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
