//! Fair queuing in front of the upstream by the tokens each tenant is served: the Virtual
//! Token Counter (VTC) of Sheng et al., "Fairness in Serving Large Language Models" (OSDI
//! 2024), with per-tenant KV-cache quotas.
//!
//! At most `max_inflight` requests are in flight; beyond that, requests wait in bounded
//! per-tenant FIFO queues. Each tenant has a counter of the weighted tokens it was served:
//! `(input_cost x prompt tokens + output_cost x output tokens) / weight`. The prompt estimate
//! is charged when a request is let in, output tokens as they stream
//! ([`Permit::progress`]), and both are corrected from the response's `usage`. A free slot
//! goes to the backlogged tenant with the smallest counter (ties: the earlier request).
//! A tenant that arrives with nothing queued has its counter lifted to the smallest counter
//! of the backlogged tenants (or, when nobody waits, to the counter of the tenant served last),
//! so idle time cannot be banked for a burst later.
//!
//! Bound (VTC's Theorem, for this scheduler): while two tenants are both backlogged, their
//! counters differ by at most `U = max_inflight x (input_cost x L + output_cost x M)` where `L`
//! is the largest prompt and `M` the largest output of one request (what one dispatch and
//! every request in flight can add before the other tenant's turn comes), so over any such
//! interval their weighted service differs by at most `2U`.
//!
//! KV quota: a tenant with `max_kv_tokens` holds at most that many tokens in flight. Each
//! request reserves its worst case (prompt estimate + `max_tokens` x choices) when it is let
//! in; a request that would go over waits (other tenants pass it), one larger than the whole
//! quota is refused at once.
//!
//! `fairness = "requests"` charges one unit per request instead (start-time fair queuing):
//! kept for upstreams whose requests cost about the same whatever their size, and as the
//! baseline the fairness benchmark compares against.

use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub use crate::config::Fairness;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    #[error("the tenant's queue is full")]
    Full,
    #[error("timed out waiting in the tenant's queue")]
    Timeout,
    /// Timed out while the tenant's in-flight requests held its KV quota.
    #[error("timed out waiting for the tenant's KV-cache quota")]
    KvQuotaTimeout,
    /// The request alone reserves more KV-cache tokens than the tenant's quota.
    #[error("the request needs {need} KV-cache tokens, more than the tenant's quota of {quota}")]
    OverKvQuota { need: u64, quota: u64 },
}

/// What a request asks of the scheduler: its cost and its KV-cache reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    /// Estimated prompt tokens.
    pub prompt: u64,
    /// Output tokens it may generate at most (`max_tokens` x choices).
    pub completion_reserve: u64,
}

impl Ask {
    /// The most KV-cache tokens the request can hold.
    pub fn kv(self) -> u64 {
        self.prompt.saturating_add(self.completion_reserve)
    }
}

/// How the scheduler charges service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub fairness: Fairness,
    /// Counter units per input (prompt) token.
    pub input: f64,
    /// Counter units per output token.
    pub output: f64,
}

impl Default for Costs {
    fn default() -> Self {
        Self {
            fairness: Fairness::Tokens,
            input: 1.0,
            output: 2.0,
        }
    }
}

/// One tenant's scheduling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantSettings {
    pub weight: u32,
    pub max_kv_tokens: Option<u64>,
}

/// The gauges the scheduler keeps per tenant.
#[derive(Clone, Default)]
pub struct SchedGauges {
    /// The tenant's virtual counter (weighted tokens served).
    pub counter: Gauge<f64, AtomicU64>,
    /// KV-cache tokens reserved by the tenant's in-flight requests.
    pub kv_reserved: Gauge,
    /// The tenant's KV quota (0: none).
    pub kv_quota: Gauge,
    /// The tenant's weight.
    pub weight: Gauge,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    ask: Ask,
    tx: oneshot::Sender<Permit>,
}

struct TenantQueue {
    weight: u32,
    max_kv: Option<u64>,
    counter: f64,
    kv_reserved: u64,
    queue: VecDeque<Waiter>,
    gauges: SchedGauges,
}

impl TenantQueue {
    fn fits(&self, ask: Ask) -> bool {
        self.max_kv
            .is_none_or(|q| self.kv_reserved.saturating_add(ask.kv()) <= q)
    }

    fn head_fits(&self) -> bool {
        self.queue.front().is_some_and(|w| self.fits(w.ask))
    }

    fn add(&mut self, units: f64) {
        self.counter += units / f64::from(self.weight.max(1));
        self.gauges.counter.set(self.counter);
    }
}

struct State {
    max_inflight: usize,
    max_queue: usize,
    costs: Costs,
    inflight: usize,
    seq: u64,
    /// The tenant let in last (its counter is the floor for an arrival when nobody waits).
    last: Option<usize>,
    tenants: Vec<TenantQueue>,
    index: HashMap<String, usize>,
}

impl State {
    fn tenant(&mut self, name: &str, gauges: &dyn Fn(&str) -> SchedGauges) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.tenants.len();
        self.tenants.push(TenantQueue {
            weight: 1,
            max_kv: None,
            counter: 0.0,
            kv_reserved: 0,
            queue: VecDeque::new(),
            gauges: gauges(name),
        });
        self.index.insert(name.to_string(), i);
        i
    }

    /// VTC's lift: a tenant arriving with nothing queued starts at the smallest counter of
    /// the tenants that wait (those that could be served first), else at the counter of the
    /// tenant served last, never below its own.
    fn lift(&mut self, i: usize) {
        if !self.tenants[i].queue.is_empty() {
            return;
        }
        let min_of = |eligible_only: bool| {
            self.tenants
                .iter()
                .enumerate()
                .filter(|(j, q)| {
                    *j != i && !q.queue.is_empty() && (!eligible_only || q.head_fits())
                })
                .map(|(_, q)| q.counter)
                .min_by(f64::total_cmp)
        };
        let floor = min_of(true).or_else(|| min_of(false)).or_else(|| {
            self.last
                .filter(|&l| l != i)
                .map(|l| self.tenants[l].counter)
        });
        if let Some(f) = floor
            && f > self.tenants[i].counter
        {
            let q = &mut self.tenants[i];
            q.counter = f;
            q.gauges.counter.set(f);
        }
    }

    fn any_waiting(&self) -> bool {
        self.tenants.iter().any(|q| !q.queue.is_empty())
    }

    /// Let tenant `i` in with `ask`: count the slot, reserve its KV, charge its prompt.
    fn let_in(&mut self, i: usize, ask: Ask) -> (usize, u64, f64) {
        self.inflight += 1;
        self.last = Some(i);
        let costs = self.costs;
        let q = &mut self.tenants[i];
        if q.max_kv.is_some() {
            q.kv_reserved = q.kv_reserved.saturating_add(ask.kv());
            q.gauges.kv_reserved.set(q.kv_reserved as i64);
        }
        let charged = match costs.fairness {
            Fairness::Tokens => ask.prompt as f64 * costs.input,
            Fairness::Requests => 1.0,
        };
        q.add(charged);
        (i, if q.max_kv.is_some() { ask.kv() } else { 0 }, charged)
    }

    /// Undo [`State::let_in`] for a permit that was never used.
    fn undo(&mut self, i: usize, kv: u64, charged: f64) {
        self.inflight = self.inflight.saturating_sub(1);
        let q = &mut self.tenants[i];
        q.kv_reserved = q.kv_reserved.saturating_sub(kv);
        q.gauges.kv_reserved.set(q.kv_reserved as i64);
        q.add(-charged);
    }
}

/// The shared scheduler.
pub struct Scheduler {
    state: Mutex<State>,
    gauges: Box<dyn Fn(&str) -> SchedGauges + Send + Sync>,
}

/// One slot of upstream capacity, with the KV reservation and the charges made for it;
/// dropping it lets the next waiter in.
pub struct Permit {
    sched: Option<Arc<Scheduler>>,
    /// Output and prompt corrections are charged (`fairness = "tokens"`).
    by_tokens: bool,
    tenant: usize,
    kv: u64,
    /// Input tokens and output tokens charged so far.
    prompt: u64,
    output: u64,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("kv", &self.kv)
            .field("prompt", &self.prompt)
            .field("output", &self.output)
            .finish()
    }
}

impl Permit {
    /// The request has now used `prompt` input and `output` output tokens (the prompt
    /// estimate until `usage` says otherwise): charge the difference to the tenant's counter.
    pub fn progress(&mut self, prompt: u64, output: u64) {
        let Some(s) = &self.sched else { return };
        if !self.by_tokens || (prompt == self.prompt && output == self.output) {
            return;
        }
        let mut st = s.lock();
        let units = (prompt as f64 - self.prompt as f64) * st.costs.input
            + (output as f64 - self.output as f64) * st.costs.output;
        st.tenants[self.tenant].add(units);
        self.prompt = prompt;
        self.output = output;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.sched.take() {
            s.release(self.tenant, self.kv);
        }
    }
}

impl Scheduler {
    /// `gauges` makes the per-tenant gauges (called once per tenant name).
    pub fn new(
        max_inflight: usize,
        max_queue: usize,
        costs: Costs,
        tenants: impl IntoIterator<Item = (String, TenantSettings)>,
        gauges: impl Fn(&str) -> SchedGauges + Send + Sync + 'static,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            state: Mutex::new(State {
                max_inflight,
                max_queue,
                costs,
                inflight: 0,
                seq: 0,
                last: None,
                tenants: Vec::new(),
                index: HashMap::new(),
            }),
            gauges: Box::new(gauges),
        });
        s.update(max_inflight, max_queue, costs, tenants);
        s
    }

    /// Apply new settings (config reload); waiting requests keep their place, counters stay.
    pub fn update(
        self: &Arc<Self>,
        max_inflight: usize,
        max_queue: usize,
        costs: Costs,
        tenants: impl IntoIterator<Item = (String, TenantSettings)>,
    ) {
        let mut st = self.lock();
        st.max_inflight = max_inflight;
        st.max_queue = max_queue;
        st.costs = costs;
        for (name, t) in tenants {
            let i = st.tenant(&name, &*self.gauges);
            let q = &mut st.tenants[i];
            q.weight = t.weight.max(1);
            q.max_kv = t.max_kv_tokens;
            q.gauges.kv_quota.set(t.max_kv_tokens.unwrap_or(0) as i64);
            q.gauges.weight.set(i64::from(q.weight));
        }
        self.dispatch(&mut st);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inflight(&self) -> usize {
        self.lock().inflight
    }

    pub fn queued(&self, tenant: &str) -> usize {
        let st = self.lock();
        st.index
            .get(tenant)
            .map_or(0, |&i| st.tenants[i].queue.len())
    }

    /// The tenant's virtual counter (weighted tokens served).
    pub fn counter(&self, tenant: &str) -> f64 {
        let st = self.lock();
        st.index.get(tenant).map_or(0.0, |&i| st.tenants[i].counter)
    }

    /// KV-cache tokens the tenant's in-flight requests have reserved (0 without a quota).
    pub fn kv_reserved(&self, tenant: &str) -> u64 {
        let st = self.lock();
        st.index
            .get(tenant)
            .map_or(0, |&i| st.tenants[i].kv_reserved)
    }

    /// Wait for a slot (at most `timeout`); returns the permit and the time spent waiting.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        ask: Ask,
        timeout: Duration,
    ) -> Result<(Permit, Duration), QueueError> {
        let t0 = Instant::now();
        let (i, seq, rx) = {
            let mut st = self.lock();
            let i = st.tenant(tenant, &*self.gauges);
            if let Some(quota) = st.tenants[i].max_kv
                && ask.kv() > quota
            {
                return Err(QueueError::OverKvQuota {
                    need: ask.kv(),
                    quota,
                });
            }
            st.lift(i);
            if st.inflight < st.max_inflight && !st.any_waiting() && st.tenants[i].fits(ask) {
                let by_tokens = st.costs.fairness == Fairness::Tokens;
                let (tenant, kv, _) = st.let_in(i, ask);
                return Ok((self.permit(by_tokens, tenant, kv, ask), Duration::ZERO));
            }
            if st.tenants[i].queue.len() >= st.max_queue {
                return Err(QueueError::Full);
            }
            st.seq += 1;
            let seq = st.seq;
            let (tx, rx) = oneshot::channel();
            st.tenants[i].queue.push_back(Waiter { seq, ask, tx });
            // Free slots may be waiting only for tenants over their quota.
            self.dispatch(&mut st);
            (i, seq, rx)
        };
        let mut guard = WaitGuard {
            sched: self,
            tenant: i,
            seq,
            armed: true,
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(permit)) => {
                guard.armed = false;
                Ok((permit, t0.elapsed()))
            }
            // A closed channel cannot happen while we are queued (only dispatch takes the
            // sender, and it sends); on timeout leave the queue. A permit sent at the last
            // moment was dropped with the receiver and has released its slot.
            Ok(Err(_)) | Err(_) => {
                guard.armed = false;
                let over_quota = self.remove(i, seq);
                Err(if over_quota {
                    QueueError::KvQuotaTimeout
                } else {
                    QueueError::Timeout
                })
            }
        }
    }

    fn permit(self: &Arc<Self>, by_tokens: bool, tenant: usize, kv: u64, ask: Ask) -> Permit {
        Permit {
            sched: Some(self.clone()),
            by_tokens,
            tenant,
            kv,
            prompt: ask.prompt,
            output: 0,
        }
    }

    /// Leave the queue; true when the request was held back by its tenant's KV quota.
    fn remove(&self, tenant: usize, seq: u64) -> bool {
        let mut st = self.lock();
        let q = &mut st.tenants[tenant];
        if let Some(pos) = q.queue.iter().position(|w| w.seq == seq)
            && let Some(w) = q.queue.remove(pos)
        {
            return !q.fits(w.ask);
        }
        false
    }

    fn release(self: &Arc<Self>, tenant: usize, kv: u64) {
        let mut st = self.lock();
        st.inflight = st.inflight.saturating_sub(1);
        let q = &mut st.tenants[tenant];
        q.kv_reserved = q.kv_reserved.saturating_sub(kv);
        q.gauges.kv_reserved.set(q.kv_reserved as i64);
        self.dispatch(&mut st);
    }

    fn dispatch(self: &Arc<Self>, st: &mut State) {
        while st.inflight < st.max_inflight {
            let next = st
                .tenants
                .iter()
                .enumerate()
                .filter(|(_, q)| q.head_fits())
                .filter_map(|(i, q)| q.queue.front().map(|w| (i, q.counter, w.seq)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)))
                .map(|(i, _, _)| i);
            let Some(i) = next else { break };
            let w = st.tenants[i]
                .queue
                .pop_front()
                .expect("picked a non-empty queue");
            let (tenant, kv, charged) = st.let_in(i, w.ask);
            let by_tokens = st.costs.fairness == Fairness::Tokens;
            let permit = self.permit(by_tokens, tenant, kv, w.ask);
            if let Err(mut p) = w.tx.send(permit) {
                // The waiter is gone: take back what was counted for it (we hold the lock).
                p.sched = None;
                st.undo(i, kv, charged);
            }
        }
        if st.inflight == 0 && !st.any_waiting() {
            // Nothing queued or running: nobody holds credit over anybody, start again at 0.
            st.last = None;
            for q in &mut st.tenants {
                q.counter = 0.0;
                q.gauges.counter.set(0.0);
            }
        }
    }
}

struct WaitGuard<'a> {
    sched: &'a Arc<Scheduler>,
    tenant: usize,
    seq: u64,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        // The waiting future was dropped (client went away): leave the queue.
        if self.armed {
            self.sched.remove(self.tenant, self.seq);
            // Its place may have been the only thing holding back a smaller request.
            let mut st = self.sched.lock();
            self.sched.dispatch(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(
        max_inflight: usize,
        costs: Costs,
        tenants: &[(&str, u32, Option<u64>)],
    ) -> Arc<Scheduler> {
        Scheduler::new(
            max_inflight,
            1000,
            costs,
            tenants.iter().map(|(n, w, kv)| {
                (
                    n.to_string(),
                    TenantSettings {
                        weight: *w,
                        max_kv_tokens: *kv,
                    },
                )
            }),
            |_| SchedGauges::default(),
        )
    }

    fn ask(prompt: u64, out: u64) -> Ask {
        Ask {
            prompt,
            completion_reserve: out,
        }
    }

    /// Queue `n` requests of `tenant` (each waits until it is let in), in order.
    async fn queue_n(
        s: &Arc<Scheduler>,
        tenant: &'static str,
        n: usize,
        a: Ask,
        order: &Arc<Mutex<Vec<(&'static str, Permit)>>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let before = s.queued(tenant);
            let (s2, order) = (s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let (p, _) = s2
                    .acquire(tenant, a, Duration::from_secs(30))
                    .await
                    .unwrap();
                order.lock().unwrap().push((tenant, p));
            }));
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.queued(tenant) == before {
                assert!(Instant::now() < deadline, "task never queued");
                tokio::task::yield_now().await;
            }
        }
        tasks
    }

    /// Let the permits in one at a time (each finishing with `usage` as asked) and return
    /// the tenants in the order they were let in.
    async fn drain(
        s: &Arc<Scheduler>,
        first: Permit,
        order: &Arc<Mutex<Vec<(&'static str, Permit)>>>,
        total: usize,
    ) -> Vec<&'static str> {
        drop(first);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < total {
            assert!(Instant::now() < deadline, "stalled after {seen:?}");
            let next = order.lock().unwrap().pop();
            match next {
                Some((t, p)) => {
                    seen.push(t);
                    drop(p);
                }
                None => tokio::task::yield_now().await,
            }
        }
        assert_eq!(s.inflight(), 0);
        seen
    }

    #[tokio::test]
    async fn serves_by_weight_not_by_arrival() {
        let costs = Costs {
            fairness: Fairness::Requests,
            ..Costs::default()
        };
        let s = sched(1, costs, &[("a", 1, None), ("b", 3, None)]);
        let (first, _) = s
            .acquire("a", ask(1, 1), Duration::from_secs(5))
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // a floods with 12, then b asks for 6.
        let mut tasks = queue_n(&s, "a", 12, ask(1, 1), &order).await;
        tasks.extend(queue_n(&s, "b", 6, ask(1, 1), &order).await);
        let seen = drain(&s, first, &order, 18).await;
        for t in tasks {
            t.await.unwrap();
        }
        // b (weight 3) gets 3 of every 4 slots while both wait: all 6 of b's are done within
        // the first 8 grants, although a queued all 12 first.
        let last_b = seen.iter().rposition(|t| *t == "b").unwrap();
        assert!(last_b < 8, "order {seen:?}");
    }

    #[tokio::test]
    async fn large_prompts_get_fewer_turns() {
        let s = sched(1, Costs::default(), &[("big", 1, None), ("small", 1, None)]);
        let (first, _) = s
            .acquire("big", ask(1, 0), Duration::from_secs(5))
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // big: 8,000-token prompts; small: 100-token prompts. Both wait with 40 each.
        let mut tasks = queue_n(&s, "big", 40, ask(8000, 0), &order).await;
        tasks.extend(queue_n(&s, "small", 40, ask(100, 0), &order).await);
        let seen = drain(&s, first, &order, 80).await;
        for t in tasks {
            t.await.unwrap();
        }
        // While both are backlogged (the first 40 turns), small gets about 80 turns per big
        // one: tokens served differ by at most one big request.
        let first40 = &seen[..40];
        let big = first40.iter().filter(|t| **t == "big").count() as u64;
        let small = first40.len() as u64 - big;
        assert!(big <= 2, "big got {big} of the first 40 turns: {seen:?}");
        assert!(
            (big * 8000).abs_diff(small * 100) <= 8000 + 100,
            "{big} {small}"
        );
    }

    #[tokio::test]
    async fn output_tokens_are_charged_as_they_stream() {
        let s = sched(2, Costs::default(), &[("a", 1, None), ("b", 1, None)]);
        let (mut pa, _) = s
            .acquire("a", ask(10, 100), Duration::from_secs(5))
            .await
            .unwrap();
        let (pb, _) = s
            .acquire("b", ask(10, 100), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(s.counter("a"), 10.0);
        // b arrived when nobody waited: lifted to the counter of the tenant served last.
        assert_eq!(s.counter("b"), 10.0 + 10.0);
        pa.progress(10, 30);
        assert_eq!(s.counter("a"), 10.0 + 60.0, "output costs 2 per token");
        // usage says the prompt was 7 tokens: corrected, never charged twice.
        pa.progress(7, 30);
        assert_eq!(s.counter("a"), 7.0 + 60.0);
        pa.progress(7, 30);
        assert_eq!(s.counter("a"), 67.0);
        assert_eq!(s.counter("b"), 20.0, "a's tokens are not charged to b");
        drop((pa, pb));
    }

    #[tokio::test]
    async fn a_returning_tenant_cannot_spend_banked_idle_time() {
        let s = sched(1, Costs::default(), &[("a", 1, None), ("b", 1, None)]);
        // a alone is served 1,000 requests of 100 tokens while b is idle.
        let (hold, _) = s
            .acquire("a", ask(100, 0), Duration::from_secs(5))
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks = queue_n(&s, "a", 999, ask(100, 0), &order).await;
        drop(hold);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut served = 1;
        // Keep a backlogged: let in 998 of its queued requests, the last one stays queued.
        while served < 999 {
            assert!(Instant::now() < deadline);
            let next = order.lock().unwrap().pop();
            match next {
                Some((_, p)) => {
                    served += 1;
                    if served < 999 {
                        drop(p);
                    } else {
                        // Keep the slot: a's last request and b must queue.
                        order.lock().unwrap().push(("a", p));
                    }
                }
                None => tokio::task::yield_now().await,
            }
        }
        let a_counter = s.counter("a");
        assert!(a_counter >= 99_000.0, "{a_counter}");
        // b returns with 20 requests while a still waits: it starts at a's counter, so it
        // gets about one turn per a turn, not 1,000 turns in a row.
        let more_a = queue_n(&s, "a", 20, ask(100, 0), &order).await;
        let more_b = queue_n(&s, "b", 20, ask(100, 0), &order).await;
        assert!(s.counter("b") >= a_counter - 100.0, "b was lifted");
        let holder = order.lock().unwrap().pop().unwrap().1;
        let seen = drain(&s, holder, &order, 41).await;
        let first10_b = seen[..10].iter().filter(|t| **t == "b").count();
        assert!((4..=6).contains(&first10_b), "{seen:?}");
        for t in tasks.into_iter().chain(more_a).chain(more_b) {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn kv_quota_holds_a_tenant_back_and_lets_others_pass() {
        let s = sched(
            4,
            Costs::default(),
            &[("flood", 1, Some(1000)), ("victim", 1, None)],
        );
        let (p1, _) = s
            .acquire("flood", ask(600, 100), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(s.kv_reserved("flood"), 700);
        // The next one would hold 1,400 > 1,000: it waits although slots are free.
        let s2 = s.clone();
        let waiting = tokio::spawn(async move {
            s2.acquire("flood", ask(600, 100), Duration::from_secs(30))
                .await
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.queued("flood") == 0 {
            assert!(Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        // Another tenant passes at once.
        let (v, waited) = s
            .acquire("victim", ask(50, 10), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(waited < Duration::from_secs(1));
        assert_eq!(s.kv_reserved("flood"), 700);
        // Larger than the whole quota: refused at once.
        assert_eq!(
            s.acquire("flood", ask(1000, 1), Duration::from_secs(5))
                .await
                .unwrap_err(),
            QueueError::OverKvQuota {
                need: 1001,
                quota: 1000
            }
        );
        drop(p1);
        let (p2, _) = waiting.await.unwrap().unwrap();
        assert_eq!(s.kv_reserved("flood"), 700);
        drop((p2, v));
        assert_eq!(s.kv_reserved("flood"), 0);
        assert_eq!(s.inflight(), 0);
    }

    #[tokio::test]
    async fn a_wait_on_the_kv_quota_times_out_as_such() {
        tokio::time::pause();
        let s = sched(4, Costs::default(), &[("a", 1, Some(100))]);
        let (p, _) = s
            .acquire("a", ask(60, 0), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            s.acquire("a", ask(60, 0), Duration::from_secs(1))
                .await
                .unwrap_err(),
            QueueError::KvQuotaTimeout
        );
        assert_eq!(s.queued("a"), 0);
        drop(p);
    }

    #[tokio::test]
    async fn bounded_queue_and_timeout() {
        tokio::time::pause();
        let s = sched(1, Costs::default(), &[("a", 1, None)]);
        let s = {
            s.update(1, 1, Costs::default(), []);
            s
        };
        let (p, _) = s
            .acquire("a", ask(1, 0), Duration::from_secs(1))
            .await
            .unwrap();
        let s2 = s.clone();
        let waiter =
            tokio::spawn(async move { s2.acquire("a", ask(1, 0), Duration::from_secs(1)).await });
        while s.queued("a") == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            s.acquire("a", ask(1, 0), Duration::from_secs(1))
                .await
                .unwrap_err(),
            QueueError::Full
        );
        // Paused time auto-advances to the timeout.
        assert_eq!(waiter.await.unwrap().unwrap_err(), QueueError::Timeout);
        assert_eq!(s.queued("a"), 0);
        drop(p);
        assert_eq!(s.inflight(), 0);
    }
}
