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

use crate::config::{Flavor, FlushFailure};
use crate::http_util::BoxError;
use crate::record::metrics::{KindLabel, Metrics, ResultLabel};
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The `cache_salt` of a `salted` tenant: base64url(HMAC-SHA256(key, domain || generation ||
/// tenant)). Not derivable from the tenant name without the key; a new key or generation
/// changes every salt. Never log it.
pub fn derive_salt(key: &[u8], generation: u64, tenant: &str) -> String {
    use base64::Engine;
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(b"bulkhead cache_salt v1\0");
    ctx.update(&generation.to_be_bytes());
    ctx.update(tenant.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.sign().as_ref())
}

/// How one flush call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    Ok,
    /// The server answered but did not flush (busy, `success: false`).
    Refused(String),
    /// No usable answer (unreachable, timeout, unexpected status).
    Failed(String),
}

impl FlushOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            FlushOutcome::Ok => "ok",
            FlushOutcome::Refused(_) => "refused",
            FlushOutcome::Failed(_) => "failed",
        }
    }
}

/// Judge a flush answer. vLLM: 200, and `success` true when the body is JSON with it. SGLang:
/// the same, and never a body saying the cache was not flushed. Anything else is no flush.
pub fn judge_flush(flavor: Flavor, status: StatusCode, body: &[u8]) -> FlushOutcome {
    let text = String::from_utf8_lossy(body);
    let snippet: String = text.chars().take(200).collect();
    let lower = text.to_ascii_lowercase();
    let json_success = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("success").cloned());
    let says_no = lower.contains("not flushed")
        || lower.contains("pending requests")
        || json_success
            .as_ref()
            .is_some_and(|s| s != &serde_json::Value::Bool(true));
    if status == StatusCode::OK && !says_no {
        return match flavor {
            Flavor::Vllm | Flavor::Sglang => FlushOutcome::Ok,
            Flavor::Openai => FlushOutcome::Failed("the upstream has no flush".into()),
        };
    }
    if says_no
        || matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::CONFLICT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_REQUEST
        )
    {
        return FlushOutcome::Refused(format!("HTTP {}: {snippet}", status.as_u16()));
    }
    FlushOutcome::Failed(format!("HTTP {}: {snippet}", status.as_u16()))
}

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

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GateError {
    #[error("timed out waiting for the cache isolation window")]
    Timeout,
    #[error("the inference server did not confirm the prefix-cache flush: {0}")]
    FlushFailed(String),
    /// Requests this one must not run alongside were still running after
    /// `cache.exclusive_drain_timeout_ms` (and no flush proved the upstream idle).
    #[error("other tenants' requests were still running after cache.exclusive_drain_timeout_ms")]
    DrainTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Non-exclusive tenants run: those that arrived before the oldest waiting exclusive
    /// request, or before `admit_until` (everyone waiting when an exclusive window closed or
    /// an exclusive request gave up on the drain).
    Shared { admit_until: u64 },
    /// One exclusive tenant's window.
    Exclusive {
        tenant: String,
        opened: Instant,
        admitted: u32,
    },
}

#[derive(Debug)]
struct Waiting {
    tenant: String,
    exclusive: bool,
    arrived: Instant,
}

#[derive(Debug)]
struct State {
    settings: GateSettings,
    phase: Phase,
    /// When `phase` began.
    phase_since: Instant,
    /// When the exclusive window began closing (others wait, the owner's requests drain).
    closing_since: Option<Instant>,
    /// The last time a request entered or the settings changed.
    last_change: Instant,
    /// Waiters up to this ticket fail: they waited through a flush that was to prove a
    /// closing window's requests done, and it was not confirmed.
    refused_upto: u64,
    seq: u64,
    waiting: BTreeMap<u64, Waiting>,
    /// Passes of the current epoch not dropped yet, per tenant and in all.
    running: HashMap<String, usize>,
    running_total: usize,
    /// Bumped when a confirmed flush vouched that the running passes are done upstream.
    epoch: u64,
    /// Passes of earlier epochs not dropped yet (they still hold fair-queue slots).
    detached: usize,
    /// Tenants whose requests ran since the last confirmed flush; [`UNKNOWN_CACHE`] until the
    /// first one.
    dirty: BTreeSet<String>,
    flushing: bool,
}

enum Step {
    Enter,
    /// Flush first. `vouch`: for a closing window whose requests outlived the drain bound;
    /// confirmed, it retires them.
    Flush {
        vouch: bool,
    },
    Wait(Option<Instant>),
    /// Fail with [`GateError::DrainTimeout`]; the `kind` label of the timeout metric.
    Fail(&'static str),
}

/// The dirty mark of a cache whose contents are unknown (at start); no tenant has this name.
const UNKNOWN_CACHE: &str = "";

impl State {
    fn new(settings: GateSettings, now: Instant) -> Self {
        Self {
            settings,
            phase: Phase::Shared { admit_until: 0 },
            phase_since: now,
            closing_since: None,
            last_change: now,
            refused_upto: 0,
            seq: 0,
            waiting: BTreeMap::new(),
            running: HashMap::new(),
            running_total: 0,
            epoch: 0,
            detached: 0,
            // What the upstream cached before this sidecar started (an earlier process,
            // another replica, a request sent around it) is unknown: dirty, so the first
            // exclusive request flushes.
            dirty: BTreeSet::from([UNKNOWN_CACHE.to_string()]),
            flushing: false,
        }
    }

    fn set_phase(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.phase_since = now;
        self.closing_since = None;
        self.refused_upto = 0;
    }

    fn window_over(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Shared { .. } => false,
            Phase::Exclusive {
                opened, admitted, ..
            } => {
                now.duration_since(*opened) >= self.settings.window
                    || *admitted >= self.settings.window_max_requests
            }
        }
    }

    /// Whether entering `tenant` now needs a flush first.
    fn needs_flush(&self, tenant: &str, exclusive: bool) -> bool {
        if exclusive {
            self.dirty.iter().any(|t| t != tenant)
        } else {
            self.dirty
                .iter()
                .any(|t| self.settings.exclusive.contains(t))
        }
    }

    /// Whether a confirmed flush may vouch that the running passes are done upstream. It
    /// may when the upstream refuses to flush while it runs requests, and when no pass can
    /// still be waiting for a fair-queue slot: fewer passes are out than there are slots, so
    /// each got its slot on entry, and (the caller checks) the last entry was a drain bound
    /// ago, longer than the upstream connect timeout, so each request reached the upstream.
    fn may_vouch(&self) -> bool {
        self.settings.flush_proves_idle
            && self.running_total + self.detached < self.settings.max_inflight
    }

    /// Retire the running passes: a confirmed flush vouched they are done upstream.
    fn detach(&mut self) {
        self.epoch += 1;
        self.detached += self.running_total;
        self.running.clear();
        self.running_total = 0;
    }

    /// Advance the phase if it should change; then decide for waiter `ticket`.
    fn step(&mut self, ticket: u64, now: Instant) -> Step {
        let Some(me) = self.waiting.get(&ticket) else {
            return Step::Wait(None);
        };
        let (tenant, exclusive) = (me.tenant.clone(), me.exclusive);
        let drain = self.settings.drain_timeout;
        // Phase changes happen only when nothing runs.
        let mut wake_at = None;
        match self.phase.clone() {
            Phase::Shared { admit_until } => {
                let oldest_excl = self
                    .waiting
                    .iter()
                    .find(|(_, w)| w.exclusive)
                    .map(|(k, w)| (*k, w.tenant.clone(), w.arrived));
                if let Some((e, et, arrived)) = oldest_excl {
                    let older_shared = self
                        .waiting
                        .range(..e.max(admit_until))
                        .any(|(_, w)| !w.exclusive);
                    if self.running_total == 0 && !older_shared {
                        self.set_phase(
                            Phase::Exclusive {
                                tenant: et,
                                opened: now,
                                admitted: 0,
                            },
                            now,
                        );
                    } else if e == ticket {
                        // Others drain for this request, and newer shared requests wait
                        // behind it: bounded. Past the bound it fails, and everyone waiting
                        // behind it goes; a later exclusive request starts a new drain.
                        let until = arrived.max(self.phase_since) + drain;
                        if now < until {
                            wake_at = Some(until);
                        } else if self.running_total > 0 {
                            self.phase = Phase::Shared {
                                admit_until: self.seq + 1,
                            };
                            return Step::Fail("exclusive_drain");
                        }
                        // (Nothing runs: older shared requests are about to enter.)
                    }
                }
            }
            Phase::Exclusive {
                tenant: owner,
                opened,
                ..
            } => {
                let others = self.waiting.values().any(|w| w.tenant != owner);
                let owner_waits = self.waiting.values().any(|w| w.tenant == owner);
                let over = self.window_over(now);
                if others && (over || !owner_waits) {
                    // Closing: no more of the owner; switch once drained.
                    let since = *self.closing_since.get_or_insert(now);
                    if self.running_total == 0 {
                        let next = self
                            .waiting
                            .values()
                            .find(|w| w.tenant != owner)
                            .map(|w| (w.tenant.clone(), w.exclusive));
                        if let Some((t, excl)) = next {
                            let phase = if excl {
                                Phase::Exclusive {
                                    tenant: t,
                                    opened: now,
                                    admitted: 0,
                                }
                            } else {
                                Phase::Shared {
                                    admit_until: self.seq + 1,
                                }
                            };
                            self.set_phase(phase, now);
                        }
                    } else if tenant != owner {
                        // The owner's requests drain, bounded: past the bound, only a flush
                        // that proves them done upstream lets others run beside them (they
                        // would see the owner's cache blocks otherwise); without one, the
                        // waiters fail rather than wait on.
                        let until = since.max(self.last_change) + drain;
                        if now < until {
                            wake_at = Some(until);
                        } else if self.flushing {
                            return Step::Wait(None);
                        } else if ticket <= self.refused_upto || !self.may_vouch() {
                            return Step::Fail("window_drain");
                        } else {
                            return Step::Flush { vouch: true };
                        }
                    }
                } else {
                    self.closing_since = None;
                    self.refused_upto = 0;
                    if over && !others {
                        // Nobody else wants the server: a new window for the owner.
                        self.set_phase(
                            Phase::Exclusive {
                                tenant: owner,
                                opened: now,
                                admitted: 0,
                            },
                            now,
                        );
                    } else if others {
                        wake_at = Some(opened + self.settings.window);
                    }
                }
            }
        }
        let allowed = match &self.phase {
            Phase::Shared { admit_until } => {
                !exclusive
                    && match self.waiting.iter().find(|(_, w)| w.exclusive) {
                        Some((e, _)) => ticket < (*e).max(*admit_until),
                        None => true,
                    }
            }
            // The owner's requests enter while its window lasts: the step above renewed a
            // window that was over with nobody else waiting, so an over window is closing.
            Phase::Exclusive { tenant: owner, .. } => {
                exclusive && &tenant == owner && !self.window_over(now)
            }
        };
        if !allowed || self.flushing {
            return Step::Wait(wake_at);
        }
        if self.needs_flush(&tenant, exclusive) {
            if self.running_total == 0 {
                return Step::Flush { vouch: false };
            }
            return Step::Wait(wake_at);
        }
        Step::Enter
    }

    /// Admit waiter `ticket`; its tenant and the epoch of its pass.
    fn enter(&mut self, ticket: u64, now: Instant) -> (String, u64) {
        let w = self.waiting.remove(&ticket).expect("waiting");
        *self.running.entry(w.tenant.clone()).or_default() += 1;
        self.running_total += 1;
        self.last_change = now;
        self.dirty.insert(w.tenant.clone());
        if let Phase::Exclusive { admitted, .. } = &mut self.phase {
            *admitted += 1;
        }
        (w.tenant, self.epoch)
    }
}

/// The exclusivity lock in front of the fair queue.
///
/// Every wait it imposes on running requests is bounded by `drain_timeout`:
/// - An exclusive request waiting for others' requests to finish (newer shared requests
///   queue behind it meanwhile) fails with [`GateError::DrainTimeout`] after that long, and
///   everyone who was waiting behind it is admitted.
/// - Requests waiting for a closed exclusive window's requests to finish stop waiting after
///   that long (from the window's close and the last entry). Running beside those requests
///   would let them see the owner's cache blocks, so they go ahead only if a flush confirms
///   the upstream idle and that confirmation is trustworthy (see `State::may_vouch`): the
///   window's requests are then retired (detached). Otherwise they fail with
///   [`GateError::DrainTimeout`], and so does every newcomer until those requests end:
///   refused, never mixed.
pub struct CacheGate {
    state: Mutex<State>,
    notify: Notify,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Metrics,
}

/// One prefix-cache flush a request made at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushAttempt {
    pub started: std::time::Instant,
    pub took: Duration,
    /// `ok`, `refused` or `failed` (as `bulkhead_cache_flushes_total`).
    pub result: &'static str,
}

/// A request past the gate; dropping it (when the response ends) lets the gate move on.
pub struct GatePass {
    gate: Arc<CacheGate>,
    tenant: String,
    epoch: u64,
}

impl Drop for GatePass {
    fn drop(&mut self) {
        {
            let mut st = self.gate.lock();
            if self.epoch != st.epoch {
                st.detached = st.detached.saturating_sub(1);
            } else {
                if let Some(n) = st.running.get_mut(&self.tenant) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        st.running.remove(&self.tenant);
                    }
                }
                st.running_total = st.running_total.saturating_sub(1);
            }
        }
        self.gate.notify.notify_waiters();
    }
}

/// Marks the flush in progress over when dropped.
struct Flushing<'a>(&'a CacheGate);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.lock().flushing = false;
        self.0.notify.notify_waiters();
    }
}

/// Removes a waiter that gave up (timeout, client gone).
struct WaitGuard<'a> {
    gate: &'a CacheGate,
    ticket: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let removed = self.gate.lock().waiting.remove(&self.ticket).is_some();
        if removed {
            self.gate.notify.notify_waiters();
        }
    }
}

impl CacheGate {
    pub fn new(settings: GateSettings, metrics: Metrics) -> Arc<Self> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Arc::new(Self {
            state: Mutex::new(State::new(settings, Instant::now())),
            notify: Notify::new(),
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(http),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply new settings (reload); waiters re-evaluate.
    pub fn update(&self, settings: GateSettings) {
        {
            let mut st = self.lock();
            st.settings = settings;
            // A larger fair queue may let waiting passes through: a drain bound starts over.
            st.last_change = Instant::now();
        }
        self.notify.notify_waiters();
    }

    /// Requests past the gate and not finished.
    pub fn running(&self) -> usize {
        let st = self.lock();
        st.running_total + st.detached
    }

    fn timed_out(&self, kind: &'static str) {
        self.metrics
            .cache_gate_timeouts
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Wait (until `deadline`) until `tenant` may run; flush first when isolation needs it.
    pub async fn enter(
        self: &Arc<Self>,
        tenant: &str,
        deadline: Instant,
    ) -> Result<GatePass, GateError> {
        self.enter_recording(tenant, deadline, &mut Vec::new())
            .await
    }

    /// [`CacheGate::enter`], noting every flush this request made on the way in `flushes`
    /// (for its trace), whether it then entered or not.
    pub async fn enter_recording(
        self: &Arc<Self>,
        tenant: &str,
        deadline: Instant,
        flushes: &mut Vec<FlushAttempt>,
    ) -> Result<GatePass, GateError> {
        let ticket = {
            let mut st = self.lock();
            st.seq += 1;
            let ticket = st.seq;
            let exclusive = st.settings.exclusive.contains(tenant);
            st.waiting.insert(
                ticket,
                Waiting {
                    tenant: tenant.to_string(),
                    exclusive,
                    arrived: Instant::now(),
                },
            );
            ticket
        };
        let guard = WaitGuard { gate: self, ticket };
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut st = self.lock();
                let before = st.phase.clone();
                let now = Instant::now();
                let step = st.step(ticket, now);
                if st.phase != before {
                    // Someone else may be the one the new phase lets in.
                    self.notify.notify_waiters();
                }
                match step {
                    Step::Enter => {
                        let (tenant, epoch) = st.enter(ticket, now);
                        drop(st);
                        std::mem::forget(guard);
                        // Others may enter along (same phase).
                        self.notify.notify_waiters();
                        return Ok(GatePass {
                            gate: self.clone(),
                            tenant,
                            epoch,
                        });
                    }
                    Step::Fail(kind) => {
                        drop(st);
                        // The guard removes this waiter and wakes those behind it.
                        drop(guard);
                        self.timed_out(kind);
                        return Err(GateError::DrainTimeout);
                    }
                    Step::Flush { vouch } => {
                        st.flushing = true;
                        Step::Flush { vouch }
                    }
                    w => w,
                }
            };
            match step {
                Step::Flush { vouch } => {
                    let started = Instant::now();
                    // Cleared however this ends, including the client going away mid-flush.
                    let flushing = Flushing(self);
                    let (ok, why) = self.flush_with_retries(deadline, flushes).await;
                    let (policy, changed) = {
                        let mut st = self.lock();
                        // A reload meanwhile may have let queued passes through: no vouching.
                        let changed = st.last_change > started;
                        if ok {
                            st.dirty.clear();
                            if vouch && !changed {
                                let n = st.running_total;
                                st.detach();
                                tracing::warn!(
                                    requests = n,
                                    "an exclusive window's requests outlived cache.exclusive_drain_timeout_ms; \
                                     the upstream confirmed a flush (idle), so they are retired and others go ahead"
                                );
                            }
                        } else if vouch {
                            // Those who waited through it fail with it.
                            st.refused_upto = st.seq;
                        }
                        (st.settings.on_failure, changed)
                    };
                    drop(flushing);
                    if vouch {
                        if ok || changed {
                            continue;
                        }
                        drop(guard);
                        tracing::info!(tenant, reason = %why, "no flush proved the upstream idle after an exclusive window's drain bound");
                        self.timed_out("window_drain");
                        return Err(GateError::DrainTimeout);
                    }
                    if !ok {
                        match policy {
                            FlushFailure::Fail => return Err(GateError::FlushFailed(why)),
                            FlushFailure::Hold => {
                                tracing::warn!(tenant, reason = %why, "prefix-cache flush not confirmed; holding the request and retrying");
                                let retry = self.lock().settings.flush_retry;
                                let until = (Instant::now() + retry).min(deadline);
                                tokio::time::sleep_until(until).await;
                                if Instant::now() >= deadline {
                                    self.timed_out("queue");
                                    return Err(GateError::Timeout);
                                }
                            }
                        }
                    }
                }
                Step::Wait(wake) => {
                    let until = wake.map_or(deadline, |w| w.min(deadline));
                    if tokio::time::timeout_at(until, notified).await.is_err()
                        && Instant::now() >= deadline
                    {
                        self.timed_out("queue");
                        return Err(GateError::Timeout);
                    }
                }
                Step::Enter | Step::Fail(_) => unreachable!("returned above"),
            }
        }
    }

    /// Flush, retrying up to `flush_attempts`; true only when the upstream confirmed.
    async fn flush_with_retries(
        &self,
        deadline: Instant,
        flushes: &mut Vec<FlushAttempt>,
    ) -> (bool, String) {
        let s = self.lock().settings.clone();
        let mut why = String::new();
        for attempt in 0..s.flush_attempts {
            if attempt > 0 {
                if Instant::now() + s.flush_retry >= deadline {
                    break;
                }
                tokio::time::sleep(s.flush_retry).await;
            }
            let t0 = Instant::now();
            let outcome = self.flush_once(&s).await;
            let took = t0.elapsed();
            self.metrics
                .cache_flush_duration
                .observe(took.as_secs_f64());
            flushes.push(FlushAttempt {
                started: t0.into_std(),
                took,
                result: outcome.label(),
            });
            self.metrics
                .cache_flushes
                .get_or_create(&ResultLabel {
                    result: outcome.label(),
                })
                .inc();
            match outcome {
                FlushOutcome::Ok => {
                    tracing::debug!("upstream prefix cache flushed");
                    return (true, String::new());
                }
                FlushOutcome::Refused(w) | FlushOutcome::Failed(w) => {
                    tracing::info!(attempt, reason = %w, "prefix-cache flush not confirmed");
                    why = w;
                }
            }
        }
        (false, why)
    }

    async fn flush_once(&self, s: &GateSettings) -> FlushOutcome {
        let Some(path) = s.flavor.flush_path() else {
            return FlushOutcome::Failed("upstream.flavor \"openai\" has no cache flush".into());
        };
        let mut parts = s.upstream.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        let Ok(uri) = Uri::from_parts(parts) else {
            return FlushOutcome::Failed("bad upstream URL".into());
        };
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let call = async {
            let resp = self.client.request(req).await.map_err(BoxError::from)?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>((status, body))
        };
        match tokio::time::timeout(s.flush_timeout, call).await {
            Err(_) => FlushOutcome::Failed("flush timed out".into()),
            Ok(Err(e)) => FlushOutcome::Failed(format!("flush request failed: {e}")),
            Ok(Ok((status, body))) => judge_flush(s.flavor, status, &body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window_ms: u64, max: u32) -> GateSettings {
        GateSettings {
            exclusive: ["a".to_string()].into_iter().collect(),
            window: Duration::from_millis(window_ms),
            window_max_requests: max,
            flavor: Flavor::Vllm,
            upstream: "http://127.0.0.1:1".parse().unwrap(),
            flush_attempts: 1,
            flush_retry: Duration::ZERO,
            flush_timeout: Duration::from_secs(1),
            on_failure: FlushFailure::Fail,
            drain_timeout: Duration::from_secs(3600),
            flush_proves_idle: false,
            max_inflight: 64,
        }
    }

    /// A gate's state with a cache known to be clean (most tests start there).
    fn state(window_ms: u64, max: u32) -> State {
        let mut st = State::new(settings(window_ms, max), Instant::now());
        st.dirty.clear();
        st
    }

    #[test]
    fn the_cache_is_dirty_until_the_first_flush_after_start() {
        // What the upstream cached before the sidecar started is unknown: the first exclusive
        // request flushes; shared tenants need no flush for it.
        let mut st = State::new(settings(100, 100), Instant::now());
        let now = Instant::now();
        let b1 = arrive_at(&mut st, "b", now);
        assert_eq!(try_step(&mut st, b1, now), "enter");
        leave(&mut st, "b");
        let mut st = State::new(settings(100, 100), Instant::now());
        let a1 = arrive_at(&mut st, "a", now);
        assert_eq!(try_step(&mut st, a1, now), "flush");
        assert_eq!(try_step(&mut st, a1, now), "enter");
    }

    fn arrive(st: &mut State, tenant: &str) -> u64 {
        arrive_at(st, tenant, Instant::now())
    }

    fn arrive_at(st: &mut State, tenant: &str, now: Instant) -> u64 {
        st.seq += 1;
        let exclusive = st.settings.exclusive.contains(tenant);
        st.waiting.insert(
            st.seq,
            Waiting {
                tenant: tenant.into(),
                exclusive,
                arrived: now,
            },
        );
        st.seq
    }

    fn leave(st: &mut State, tenant: &str) {
        *st.running.get_mut(tenant).unwrap() -= 1;
        st.running_total -= 1;
    }

    /// What `ticket` may do now: "enter" (and enters), "flush" (and the flush succeeds),
    /// "vouch" (a flush for a stalled drain, and it succeeds), "fail" (gives up: removed,
    /// as its guard does) or "wait".
    fn try_step(st: &mut State, ticket: u64, now: Instant) -> &'static str {
        match st.step(ticket, now) {
            Step::Enter => {
                st.enter(ticket, now);
                "enter"
            }
            Step::Flush { vouch: false } => {
                st.dirty.clear();
                "flush"
            }
            Step::Flush { vouch: true } => {
                st.dirty.clear();
                st.detach();
                "vouch"
            }
            Step::Fail(_) => {
                st.waiting.remove(&ticket);
                "fail"
            }
            Step::Wait(_) => "wait",
        }
    }

    #[test]
    fn exclusive_window_is_bounded_by_time() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut st = state(2000, 100);
        // b (shared) ran before: a's window starts with a flush.
        let b0 = arrive(&mut st, "b");
        assert_eq!(try_step(&mut st, b0, t0), "enter");
        leave(&mut st, "b");
        let a1 = arrive(&mut st, "a");
        assert_eq!(try_step(&mut st, a1, t0), "flush");
        assert_eq!(try_step(&mut st, a1, t0), "enter");
        // b waits while a runs; a's queued requests join the window until it ends.
        let b1 = arrive(&mut st, "b");
        assert_eq!(try_step(&mut st, b1, ms(10)), "wait");
        let a2 = arrive(&mut st, "a");
        assert_eq!(try_step(&mut st, a2, ms(10)), "enter");
        let a3 = arrive(&mut st, "a");
        assert_eq!(try_step(&mut st, a3, ms(2001)), "wait", "window over");
        assert_eq!(try_step(&mut st, b1, ms(2001)), "wait", "a still runs");
        leave(&mut st, "a");
        leave(&mut st, "a");
        // Drained: flush, then b; a's next window waits for b.
        assert_eq!(try_step(&mut st, b1, ms(2002)), "flush");
        assert_eq!(try_step(&mut st, b1, ms(2002)), "enter");
        assert_eq!(try_step(&mut st, a3, ms(2003)), "wait");
        let b2 = arrive(&mut st, "b");
        assert_eq!(
            try_step(&mut st, b2, ms(2003)),
            "wait",
            "behind a's waiting request"
        );
        leave(&mut st, "b");
        assert_eq!(try_step(&mut st, a3, ms(2004)), "flush");
        assert_eq!(try_step(&mut st, a3, ms(2004)), "enter");
    }

    #[test]
    fn exclusive_window_is_bounded_by_count() {
        let t0 = Instant::now();
        let mut st = state(60_000, 2);
        let a: Vec<u64> = (0..4).map(|_| arrive(&mut st, "a")).collect();
        let b = arrive(&mut st, "b");
        assert_eq!(try_step(&mut st, a[0], t0), "enter");
        assert_eq!(try_step(&mut st, a[1], t0), "enter");
        assert_eq!(
            try_step(&mut st, a[2], t0),
            "wait",
            "two per window while b waits"
        );
        leave(&mut st, "a");
        leave(&mut st, "a");
        assert_eq!(try_step(&mut st, a[2], t0), "wait");
        assert_eq!(try_step(&mut st, b, t0), "flush");
        assert_eq!(try_step(&mut st, b, t0), "enter");
        leave(&mut st, "b");
        assert_eq!(try_step(&mut st, a[2], t0), "flush");
        assert_eq!(try_step(&mut st, a[2], t0), "enter");
        // Nobody else waits: a's window renews instead of ending.
        assert_eq!(try_step(&mut st, a[3], t0), "enter");
        let a5 = arrive(&mut st, "a");
        assert_eq!(try_step(&mut st, a5, t0), "enter");
        assert_eq!(st.running_total, 3);
    }

    #[test]
    fn an_exclusive_request_gives_up_on_a_drain_that_does_not_end() {
        let mut st = state(2000, 100);
        st.settings.drain_timeout = Duration::from_millis(500);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let b0 = arrive_at(&mut st, "b", t0);
        assert_eq!(try_step(&mut st, b0, t0), "enter");
        // a waits for b's request; b's newer request waits behind a.
        let a1 = arrive_at(&mut st, "a", t0);
        assert_eq!(try_step(&mut st, a1, t0), "wait");
        let b1 = arrive_at(&mut st, "b", ms(10));
        assert_eq!(try_step(&mut st, b1, ms(10)), "wait");
        assert!(matches!(st.step(a1, ms(10)), Step::Wait(Some(w)) if w == ms(500)));
        assert_eq!(try_step(&mut st, a1, ms(499)), "wait");
        // b0 never ends: a fails at the bound, and b1 goes at once.
        assert_eq!(try_step(&mut st, a1, ms(500)), "fail");
        assert_eq!(try_step(&mut st, b1, ms(500)), "enter");
        // A later exclusive request starts a new drain of its own.
        let a2 = arrive_at(&mut st, "a", ms(600));
        assert_eq!(try_step(&mut st, a2, ms(1000)), "wait");
        leave(&mut st, "b");
        leave(&mut st, "b");
        assert_eq!(try_step(&mut st, a2, ms(1001)), "flush");
        assert_eq!(try_step(&mut st, a2, ms(1001)), "enter");
    }

    #[test]
    fn a_closed_window_whose_requests_stall_refuses_others_unless_a_flush_vouches() {
        let mut st = state(100, 100);
        st.settings.drain_timeout = Duration::from_millis(500);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a1 = arrive_at(&mut st, "a", t0);
        assert_eq!(try_step(&mut st, a1, t0), "enter");
        // b arrives; a has nothing more waiting: the window closes and a's request drains.
        let b1 = arrive_at(&mut st, "b", ms(10));
        assert!(matches!(st.step(b1, ms(10)), Step::Wait(Some(w)) if w == ms(510)));
        assert_eq!(try_step(&mut st, b1, ms(509)), "wait");
        // It never ends. Without a flush that can prove the upstream idle: refused, and so is
        // every newcomer while it runs; nobody runs beside it.
        assert_eq!(try_step(&mut st, b1, ms(510)), "fail");
        let b2 = arrive_at(&mut st, "b", ms(600));
        assert_eq!(try_step(&mut st, b2, ms(600)), "fail");
        // Flushes the upstream refuses while busy, but a's passes fill the fair queue: one of
        // them may still be on its way to the upstream, so no flush can vouch.
        st.settings.flush_proves_idle = true;
        st.settings.max_inflight = 1;
        let b3 = arrive_at(&mut st, "b", ms(700));
        assert_eq!(try_step(&mut st, b3, ms(700)), "fail");
        // With a free slot, a confirmed flush retires a's pass and b runs.
        st.settings.max_inflight = 2;
        let b4 = arrive_at(&mut st, "b", ms(800));
        assert_eq!(try_step(&mut st, b4, ms(800)), "vouch");
        assert_eq!((st.running_total, st.detached), (0, 1));
        assert_eq!(try_step(&mut st, b4, ms(800)), "enter");
        // a's next window drains b only: a's retired pass does not hold it up.
        let a2 = arrive_at(&mut st, "a", ms(900));
        assert_eq!(try_step(&mut st, a2, ms(900)), "wait");
        leave(&mut st, "b");
        assert_eq!(try_step(&mut st, a2, ms(901)), "flush");
        assert_eq!(try_step(&mut st, a2, ms(901)), "enter");
    }

    #[test]
    fn a_flush_vouches_only_while_the_passes_out_leave_a_fair_queue_slot_free() {
        let mut st = state(100, 100);
        st.settings.flush_proves_idle = true;
        st.settings.max_inflight = 2;
        st.running_total = 1;
        st.detached = 1;
        assert!(
            !st.may_vouch(),
            "a running and a retired pass fill both slots"
        );
        st.detached = 0;
        assert!(st.may_vouch());
        st.settings.flush_proves_idle = false;
        assert!(!st.may_vouch(), "an upstream whose flush proves nothing");
    }

    #[test]
    fn an_exclusive_request_past_its_drain_bound_waits_on_while_nothing_runs() {
        let mut st = state(100, 100);
        st.settings.drain_timeout = Duration::from_millis(100);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let b1 = arrive_at(&mut st, "b", t0);
        let a1 = arrive_at(&mut st, "a", t0);
        // Nothing runs and the older b is about to enter: there is no drain to give up on.
        assert_eq!(try_step(&mut st, a1, ms(200)), "wait");
        assert_eq!(try_step(&mut st, b1, ms(200)), "enter");
    }

    #[test]
    fn after_a_failed_drain_the_shared_requests_waiting_behind_it_go_first() {
        let mut st = state(100, 100);
        st.settings.drain_timeout = Duration::from_millis(100);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let b1 = arrive_at(&mut st, "b", t0);
        assert_eq!(try_step(&mut st, b1, t0), "enter");
        // b never ends; a waits for the drain, then another a, then c (shared) behind them.
        let a1 = arrive_at(&mut st, "a", ms(10));
        let _a2 = arrive_at(&mut st, "a", ms(20));
        let c1 = arrive_at(&mut st, "c", ms(30));
        assert_eq!(
            try_step(&mut st, c1, ms(30)),
            "wait",
            "behind the exclusive"
        );
        assert_eq!(try_step(&mut st, a1, ms(200)), "fail");
        // Everyone who waited behind the failed request goes, the newest included, before
        // the next exclusive request starts a drain of its own.
        assert_eq!(try_step(&mut st, c1, ms(200)), "enter");
    }

    #[test]
    fn a_window_is_renewed_only_once_over() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut st = state(2000, 100);
        let a1 = arrive_at(&mut st, "a", t0);
        assert_eq!(try_step(&mut st, a1, t0), "enter");
        // More of a while its window lasts: the same window, not a new one.
        let a2 = arrive_at(&mut st, "a", ms(1000));
        assert_eq!(try_step(&mut st, a2, ms(1000)), "enter");
        // b comes once the window (from 0 ms) is over: a's next request waits.
        let _b1 = arrive_at(&mut st, "b", ms(2500));
        let a3 = arrive_at(&mut st, "a", ms(2500));
        assert_eq!(try_step(&mut st, a3, ms(2500)), "wait");
    }

    #[test]
    fn an_over_window_nobody_else_wants_is_renewed_from_then() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut st = state(2000, 100);
        let a1 = arrive_at(&mut st, "a", t0);
        assert_eq!(try_step(&mut st, a1, t0), "enter");
        let a2 = arrive_at(&mut st, "a", ms(2500));
        assert_eq!(try_step(&mut st, a2, ms(2500)), "enter");
        // The new window runs from 2500 ms: at 3000 ms a's request still enters before b.
        let _b1 = arrive_at(&mut st, "b", ms(3000));
        let a3 = arrive_at(&mut st, "a", ms(3000));
        assert_eq!(try_step(&mut st, a3, ms(3000)), "enter");
    }

    #[test]
    fn a_window_drain_bound_runs_from_the_close_and_restarts_on_reload() {
        let mut st = state(100, 100);
        st.settings.drain_timeout = Duration::from_millis(500);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a1 = arrive_at(&mut st, "a", t0);
        let a2 = arrive_at(&mut st, "a", t0);
        let b1 = arrive_at(&mut st, "b", t0);
        assert_eq!(try_step(&mut st, a1, t0), "enter");
        assert!(matches!(st.step(b1, ms(10)), Step::Wait(Some(w)) if w == ms(100)));
        // a2 joins the window while it lasts; it closes at 100 ms.
        assert_eq!(try_step(&mut st, a2, ms(90)), "enter");
        assert!(matches!(st.step(b1, ms(100)), Step::Wait(Some(w)) if w == ms(600)));
        // A reload (a larger fair queue may let queued passes through) starts it over.
        st.last_change = ms(300);
        assert_eq!(try_step(&mut st, b1, ms(600)), "wait");
        assert_eq!(try_step(&mut st, b1, ms(800)), "fail");
    }

    /// A gate whose flushes go to a simulator; `b` is shared, `a` exclusive.
    async fn sim_gate(
        drain_ms: u64,
    ) -> (
        Arc<CacheGate>,
        bulkhead_sim::SimHandle,
        prometheus_client::registry::Registry,
    ) {
        let sim = bulkhead_sim::SimHandle::start(bulkhead_sim::SimConfig::default())
            .await
            .unwrap();
        let mut s = settings(50, 100);
        s.upstream = sim.url().parse().unwrap();
        s.drain_timeout = Duration::from_millis(drain_ms);
        s.flush_proves_idle = true;
        let mut registry = prometheus_client::registry::Registry::default();
        let gate = CacheGate::new(s, Metrics::register(&mut registry));
        // A cache known to be clean: the flush counts below are the tests' own.
        gate.lock().dirty.clear();
        (gate, sim, registry)
    }

    fn gate_timeouts(gate: &CacheGate, kind: &'static str) -> u64 {
        gate.metrics
            .cache_gate_timeouts
            .get_or_create(&KindLabel { kind })
            .get()
    }

    #[tokio::test]
    async fn a_flush_proving_the_upstream_idle_lets_others_past_a_stalled_window() {
        let (gate, sim, _r) = sim_gate(300).await;
        let far = Instant::now() + Duration::from_secs(60);
        // a's request is done upstream but its pass is held (a client that stopped reading).
        let stalled = gate.enter("a", far).await.unwrap();
        let t0 = Instant::now();
        let b = gate.enter("b", far).await.unwrap();
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(sim.sim.flushes(), (1, 0), "b ran without a confirmed flush");
        assert_eq!(gate.running(), 2);
        // a's next window waits for b alone and is flushed again.
        drop(b);
        let a = gate.enter("a", far).await.unwrap();
        assert_eq!(sim.sim.flushes(), (2, 0));
        drop(stalled);
        assert_eq!(gate.running(), 1);
        // The retired pass ending is not the new window's pass ending: b still may not run
        // beside a's request.
        let soon = Instant::now() + Duration::from_millis(150);
        assert_eq!(gate.enter("b", soon).await.err(), Some(GateError::Timeout));
        drop(a);
        assert_eq!(gate.running(), 0);
        assert_eq!(gate_timeouts(&gate, "window_drain"), 0);
        sim.stop().await;
    }

    #[tokio::test]
    async fn an_unconfirmed_flush_after_the_drain_bound_refuses_everyone_who_waited() {
        let (gate, sim, _r) = sim_gate(300).await;
        let far = Instant::now() + Duration::from_secs(60);
        let stalled = gate.enter("a", far).await.unwrap();
        sim.sim.refuse_next_flushes(100);
        let t0 = Instant::now();
        let (b1, b2) = tokio::join!(gate.enter("b", far), gate.enter("b", far));
        let took = t0.elapsed();
        assert_eq!(b1.err(), Some(GateError::DrainTimeout));
        assert_eq!(b2.err(), Some(GateError::DrainTimeout));
        assert!(took < Duration::from_secs(5), "{took:?}");
        // One flush call answered for both (the second waited through it).
        assert_eq!(sim.sim.flushes(), (0, 1));
        assert_eq!(gate_timeouts(&gate, "window_drain"), 2);
        // Once a's request ends, others run (after a flush).
        sim.sim.refuse_next_flushes(0);
        drop(stalled);
        let b = gate.enter("b", far).await.unwrap();
        assert_eq!(sim.sim.flushes(), (1, 1));
        drop(b);
        sim.stop().await;
    }

    #[tokio::test]
    async fn a_waiter_gone_mid_flush_does_not_wedge_the_gate() {
        // An upstream that accepts the flush call and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut settings = state(1000, 10).settings;
        settings.upstream = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        settings.flush_timeout = Duration::from_secs(600);
        let mut registry = prometheus_client::registry::Registry::default();
        let gate = CacheGate::new(settings, Metrics::register(&mut registry));
        let far = Instant::now() + Duration::from_secs(600);
        drop(gate.enter("b", far).await.unwrap());
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.enter("a", far).await.map(|_| ()) });
        let (_conn, _) = listener.accept().await.unwrap();
        assert!(gate.lock().flushing);
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        let st = gate.lock();
        assert!(!st.flushing && st.waiting.is_empty());
    }

    #[tokio::test]
    async fn a_reload_that_makes_a_tenant_exclusive_takes_effect() {
        let (gate, sim, _r) = sim_gate(300).await;
        let far = Instant::now() + Duration::from_secs(60);
        drop(gate.enter("c", far).await.unwrap());
        let mut s = gate.lock().settings.clone();
        s.exclusive.insert("b".into());
        gate.update(s);
        drop(gate.enter("b", far).await.unwrap());
        assert_eq!(
            sim.sim.flushes(),
            (1, 0),
            "b, exclusive now, ran after c unflushed"
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn hold_retries_the_flush_each_flush_retry_until_the_deadline() {
        let (gate, sim, _r) = sim_gate(300).await;
        let mut s = gate.lock().settings.clone();
        s.on_failure = FlushFailure::Hold;
        s.flush_retry = Duration::from_millis(100);
        gate.update(s);
        drop(
            gate.enter("b", Instant::now() + Duration::from_secs(60))
                .await
                .unwrap(),
        );
        sim.sim.refuse_next_flushes(1000);
        let t0 = Instant::now();
        let r = gate.enter("a", t0 + Duration::from_secs(1)).await;
        let took = t0.elapsed();
        assert_eq!(r.err(), Some(GateError::Timeout));
        assert!(took >= Duration::from_secs(1), "gave up early: {took:?}");
        // One attempt each 100 ms (fewer on a loaded machine, never a busy loop).
        let (confirmed, refused) = sim.sim.flushes();
        assert_eq!(confirmed, 0);
        assert!((3..=11).contains(&refused), "{refused} flush calls in 1 s");
        sim.stop().await;
    }

    #[tokio::test]
    async fn flush_retries_wait_flush_retry_between_attempts() {
        let (gate, sim, _r) = sim_gate(300).await;
        let mut s = gate.lock().settings.clone();
        s.flush_attempts = 3;
        s.flush_retry = Duration::from_millis(150);
        gate.update(s);
        let far = Instant::now() + Duration::from_secs(60);
        drop(gate.enter("b", far).await.unwrap());
        sim.sim.refuse_next_flushes(2);
        let t0 = Instant::now();
        drop(gate.enter("a", far).await.unwrap());
        let took = t0.elapsed();
        assert_eq!(sim.sim.flushes(), (1, 2));
        assert!(
            took >= Duration::from_millis(300),
            "two waits of 150 ms: {took:?}"
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn the_first_flush_goes_at_once_and_no_retry_outlives_the_deadline() {
        let (gate, sim, _r) = sim_gate(300).await;
        let far = Instant::now() + Duration::from_secs(60);
        drop(gate.enter("b", far).await.unwrap());
        // A retry interval longer than the time left: the first attempt still goes.
        let mut s = gate.lock().settings.clone();
        s.flush_attempts = 3;
        s.flush_retry = Duration::from_secs(10);
        gate.update(s.clone());
        drop(
            gate.enter("a", Instant::now() + Duration::from_secs(1))
                .await
                .unwrap(),
        );
        assert_eq!(sim.sim.flushes(), (1, 0));
        // Refused throughout: a retry goes only while it can end before the deadline (at
        // 500 ms, not at 1000 ms).
        drop(gate.enter("b", far).await.unwrap());
        s.flush_retry = Duration::from_millis(500);
        gate.update(s);
        sim.sim.refuse_next_flushes(100);
        let r = gate
            .enter("a", Instant::now() + Duration::from_millis(800))
            .await;
        assert!(matches!(r, Err(GateError::FlushFailed(_))), "{:?}", r.err());
        // (b's entry after a's window was flushed: the second confirmed one.)
        assert_eq!(sim.sim.flushes(), (2, 2));
        sim.stop().await;
    }

    /// An upstream whose flush answers wait for the test: each flush call is announced on the
    /// first channel, then answered 200 once the second gets a message.
    async fn held_flush_upstream() -> (
        String,
        tokio::sync::mpsc::Receiver<()>,
        tokio::sync::mpsc::Sender<()>,
    ) {
        held_flush_upstream_answering(String::new()).await
    }

    async fn held_flush_upstream_answering(
        body: String,
    ) -> (
        String,
        tokio::sync::mpsc::Receiver<()>,
        tokio::sync::mpsc::Sender<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (started_tx, started_rx) = tokio::sync::mpsc::channel(8);
        let (release_tx, release_rx) = tokio::sync::mpsc::channel::<()>(8);
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (started_tx, release_rx) = (started_tx.clone(), release_rx.clone());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let _ = started_tx.send(()).await;
                            release_rx.lock().await.recv().await;
                            if conn.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, started_rx, release_tx)
    }

    #[tokio::test]
    async fn a_long_confirmation_is_read_whole() {
        // vLLM's answer is short, but nothing says it must be: a 2 KiB JSON confirmation.
        let detail = "x".repeat(2048);
        let (url, _started, release) =
            held_flush_upstream_answering(format!(r#"{{"success":true,"detail":"{detail}"}}"#))
                .await;
        let mut s = settings(50, 100);
        s.upstream = url.parse().unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let gate = CacheGate::new(s, Metrics::register(&mut registry));
        release.send(()).await.unwrap();
        let pass = gate
            .enter("a", Instant::now() + Duration::from_secs(10))
            .await;
        assert!(pass.is_ok(), "{:?}", pass.err());
    }

    #[tokio::test]
    async fn a_flush_during_which_the_settings_changed_vouches_for_nothing() {
        let (url, mut started, release) = held_flush_upstream().await;
        let mut s = settings(50, 100);
        s.upstream = url.parse().unwrap();
        s.drain_timeout = Duration::from_millis(300);
        s.flush_proves_idle = true;
        let mut registry = prometheus_client::registry::Registry::default();
        let gate = CacheGate::new(s.clone(), Metrics::register(&mut registry));
        gate.lock().dirty.clear();
        let far = Instant::now() + Duration::from_secs(60);
        let stalled = gate.enter("a", far).await.unwrap();
        let g = gate.clone();
        let b = tokio::spawn(async move { g.enter("b", far).await.map(|_| ()) });
        // Past the drain bound b asks for a flush to vouch that a's request is done; a reload
        // comes while it is on its way (a larger fair queue may have let a pass through).
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, started.recv()).await.unwrap();
        gate.update(s);
        release.send(()).await.unwrap();
        // That flush retires nothing: b waits a new drain bound and asks again.
        tokio::time::timeout(wait, started.recv())
            .await
            .expect("a second flush: the first one, though confirmed, vouched for nothing");
        {
            let st = gate.lock();
            assert_eq!((st.running_total, st.detached), (1, 0));
        }
        release.send(()).await.unwrap();
        tokio::time::timeout(wait, b)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(gate.lock().detached, 1, "the second flush retired a's pass");
        drop(stalled);
        assert_eq!(gate.running(), 0);
    }

    #[test]
    fn salts_are_keyed_and_rotate() {
        let k1 = b"0123456789abcdef0123456789abcdef";
        let k2 = b"fedcba9876543210fedcba9876543210";
        let a = derive_salt(k1, 1, "acme");
        assert_eq!(a, derive_salt(k1, 1, "acme"));
        assert_ne!(a, derive_salt(k1, 1, "globex"));
        assert_ne!(a, derive_salt(k1, 2, "acme"));
        assert_ne!(a, derive_salt(k2, 1, "acme"));
        assert!(!a.contains("acme") && a.len() >= 43);
    }

    #[test]
    fn flush_answers_are_judged_strictly() {
        let ok = StatusCode::OK;
        assert_eq!(judge_flush(Flavor::Vllm, ok, b""), FlushOutcome::Ok);
        assert_eq!(
            judge_flush(Flavor::Vllm, ok, br#"{"success":true}"#),
            FlushOutcome::Ok
        );
        assert_eq!(
            judge_flush(Flavor::Vllm, ok, br#"{"success":false}"#).label(),
            "refused"
        );
        assert_eq!(
            judge_flush(Flavor::Vllm, StatusCode::SERVICE_UNAVAILABLE, b"busy").label(),
            "refused"
        );
        assert_eq!(
            judge_flush(Flavor::Vllm, StatusCode::INTERNAL_SERVER_ERROR, b"").label(),
            "failed"
        );
        assert_eq!(
            judge_flush(
                Flavor::Sglang,
                ok,
                b"Cache not flushed because there are pending requests."
            )
            .label(),
            "refused"
        );
        assert_eq!(
            judge_flush(Flavor::Sglang, ok, b"Cache flushed.\n"),
            FlushOutcome::Ok
        );
        // Each refusal phrase on its own is a refusal, whatever else the body says.
        for body in [
            &b"Cache NOT FLUSHED: the scheduler is busy"[..],
            b"There are pending requests; try again later",
            br#"{"success":"maybe"}"#,
        ] {
            assert_eq!(
                judge_flush(Flavor::Sglang, ok, body).label(),
                "refused",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
