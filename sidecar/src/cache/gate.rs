//! The [`CacheGate`]: `exclusive` tenants run alone, in windows, with the upstream's prefix
//! cache flushed before a window opens and before anyone else runs after it.

use super::flush::Flusher;
use super::{FlushAttempt, GateSettings, Metrics};
use crate::config::FlushFailure;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::time::Instant;

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

/// A bounded wait at the gate that ran out (the `kind` of `bulkhead_cache_gate_timeouts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateTimeout {
    /// An exclusive request's wait for other tenants' requests.
    ExclusiveDrain,
    /// A wait for a closed exclusive window's requests.
    WindowDrain,
    /// The queue timeout.
    Queue,
}

impl GateTimeout {
    pub const ALL: [GateTimeout; 3] = [
        GateTimeout::ExclusiveDrain,
        GateTimeout::WindowDrain,
        GateTimeout::Queue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GateTimeout::ExclusiveDrain => "exclusive_drain",
            GateTimeout::WindowDrain => "window_drain",
            GateTimeout::Queue => "queue",
        }
    }
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
    /// Passes of the current epoch not dropped yet.
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
    /// Fail with [`GateError::DrainTimeout`]; which wait ran out.
    Fail(GateTimeout),
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
                            return Step::Fail(GateTimeout::ExclusiveDrain);
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
                            return Step::Fail(GateTimeout::WindowDrain);
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

    /// Admit waiter `ticket`; the epoch of its pass.
    fn enter(&mut self, ticket: u64, now: Instant) -> u64 {
        let w = self.waiting.remove(&ticket).expect("waiting");
        self.running_total += 1;
        self.last_change = now;
        self.dirty.insert(w.tenant);
        if let Phase::Exclusive { admitted, .. } = &mut self.phase {
            *admitted += 1;
        }
        self.epoch
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
    flusher: Flusher,
    metrics: Metrics,
}

/// A request past the gate; dropping it (when the response ends) lets the gate move on.
pub struct GatePass {
    gate: Arc<CacheGate>,
    epoch: u64,
}

impl Drop for GatePass {
    fn drop(&mut self) {
        {
            let mut st = self.gate.lock();
            if self.epoch != st.epoch {
                st.detached = st.detached.saturating_sub(1);
            } else {
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
        Arc::new(Self {
            state: Mutex::new(State::new(settings, Instant::now())),
            notify: Notify::new(),
            flusher: Flusher::new(metrics.clone()),
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

    fn timed_out(&self, kind: GateTimeout) {
        self.metrics.timed_out(kind);
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
                        let epoch = st.enter(ticket, now);
                        drop(st);
                        std::mem::forget(guard);
                        // Others may enter along (same phase).
                        self.notify.notify_waiters();
                        return Ok(GatePass {
                            gate: self.clone(),
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
                    let settings = self.lock().settings.clone();
                    let (ok, why) = self
                        .flusher
                        .flush_with_retries(&settings, deadline, flushes)
                        .await;
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
                        self.timed_out(GateTimeout::WindowDrain);
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
                                    self.timed_out(GateTimeout::Queue);
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
                        self.timed_out(GateTimeout::Queue);
                        return Err(GateError::Timeout);
                    }
                }
                Step::Enter | Step::Fail(_) => unreachable!("returned above"),
            }
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
