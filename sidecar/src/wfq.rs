//! Weighted fair queuing in front of the upstream: at most `max_inflight` requests in flight;
//! beyond that, requests wait in bounded per-tenant queues and are served in order of their
//! virtual finish tags (start-time fair queuing with unit cost per request): each tenant gets
//! a share proportional to its weight, and a flooding tenant only pushes its own tags back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    #[error("the tenant's queue is full")]
    Full,
    #[error("timed out waiting in the tenant's queue")]
    Timeout,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    start: f64,
    finish: f64,
    tx: oneshot::Sender<Permit>,
}

#[derive(Debug, Default)]
struct TenantQueue {
    weight: u32,
    last_finish: f64,
    queue: VecDeque<Waiter>,
}

#[derive(Debug)]
struct State {
    max_inflight: usize,
    max_queue: usize,
    inflight: usize,
    vtime: f64,
    seq: u64,
    tenants: HashMap<String, TenantQueue>,
}

/// The shared scheduler.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
}

/// One slot of upstream capacity; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct Permit {
    sched: Option<Arc<Scheduler>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.sched.take() {
            s.release();
        }
    }
}

impl Scheduler {
    pub fn new(
        max_inflight: usize,
        max_queue: usize,
        weights: impl IntoIterator<Item = (String, u32)>,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            state: Mutex::new(State {
                max_inflight,
                max_queue,
                inflight: 0,
                vtime: 0.0,
                seq: 0,
                tenants: HashMap::new(),
            }),
        });
        s.update(max_inflight, max_queue, weights);
        s
    }

    /// Apply new settings (config reload); waiting requests keep their place.
    pub fn update(
        self: &Arc<Self>,
        max_inflight: usize,
        max_queue: usize,
        weights: impl IntoIterator<Item = (String, u32)>,
    ) {
        let mut st = self.lock();
        st.max_inflight = max_inflight;
        st.max_queue = max_queue;
        for (t, w) in weights {
            st.tenants.entry(t).or_default().weight = w.max(1);
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
        self.lock().tenants.get(tenant).map_or(0, |q| q.queue.len())
    }

    /// Wait for a slot (at most `timeout`); returns the permit and the time spent waiting.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        timeout: Duration,
    ) -> Result<(Permit, Duration), QueueError> {
        let t0 = Instant::now();
        let (seq, rx) = {
            let mut st = self.lock();
            let any_waiting = st.tenants.values().any(|q| !q.queue.is_empty());
            if st.inflight < st.max_inflight && !any_waiting {
                st.inflight += 1;
                return Ok((
                    Permit {
                        sched: Some(self.clone()),
                    },
                    Duration::ZERO,
                ));
            }
            let max_queue = st.max_queue;
            let vtime = st.vtime;
            st.seq += 1;
            let seq = st.seq;
            let q = st.tenants.entry(tenant.to_string()).or_default();
            if q.queue.len() >= max_queue {
                return Err(QueueError::Full);
            }
            let w = q.weight.max(1) as f64;
            let start = vtime.max(q.last_finish);
            let finish = start + 1.0 / w;
            q.last_finish = finish;
            let (tx, rx) = oneshot::channel();
            q.queue.push_back(Waiter {
                seq,
                start,
                finish,
                tx,
            });
            (seq, rx)
        };
        let mut guard = WaitGuard {
            sched: self,
            tenant,
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
                self.remove(tenant, seq);
                Err(QueueError::Timeout)
            }
        }
    }

    fn remove(&self, tenant: &str, seq: u64) -> bool {
        let mut st = self.lock();
        if let Some(q) = st.tenants.get_mut(tenant)
            && let Some(pos) = q.queue.iter().position(|w| w.seq == seq)
        {
            q.queue.remove(pos);
            return true;
        }
        false
    }

    fn release(self: &Arc<Self>) {
        let mut st = self.lock();
        st.inflight = st.inflight.saturating_sub(1);
        self.dispatch(&mut st);
    }

    fn dispatch(self: &Arc<Self>, st: &mut State) {
        while st.inflight < st.max_inflight {
            let next = st
                .tenants
                .iter()
                .filter_map(|(name, q)| q.queue.front().map(|w| (name, w.finish, w.seq)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)))
                .map(|(name, _, _)| name.clone());
            let Some(name) = next else { break };
            let w = st
                .tenants
                .get_mut(&name)
                .and_then(|q| q.queue.pop_front())
                .expect("picked a non-empty queue");
            st.vtime = st.vtime.max(w.start);
            let permit = Permit {
                sched: Some(self.clone()),
            };
            match w.tx.send(permit) {
                Ok(()) => st.inflight += 1,
                Err(mut p) => {
                    // The waiter is gone; defuse the permit (we hold the lock).
                    p.sched = None;
                }
            }
        }
        let idle = st.tenants.values().all(|q| q.queue.is_empty());
        if idle && st.inflight == 0 {
            // Nothing queued or running: restart virtual time so old tags carry no credit.
            st.vtime = 0.0;
            for q in st.tenants.values_mut() {
                q.last_finish = 0.0;
            }
        }
    }
}

struct WaitGuard<'a> {
    sched: &'a Arc<Scheduler>,
    tenant: &'a str,
    seq: u64,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        // The waiting future was dropped (client went away): leave the queue.
        if self.armed {
            self.sched.remove(self.tenant, self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_by_weight_not_by_arrival() {
        let s = Scheduler::new(1, 100, [("a".to_string(), 1), ("b".to_string(), 3)]);
        let (first, _) = s.acquire("a", Duration::from_secs(5)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // a floods with 12, then b asks for 6.
        for (tenant, n) in [("a", 12), ("b", 6)] {
            for _ in 0..n {
                let s2 = s.clone();
                let order = order.clone();
                let t = tenant.to_string();
                let before = s.queued(tenant);
                tasks.push(tokio::spawn(async move {
                    let (p, _) = s2.acquire(&t, Duration::from_secs(5)).await.unwrap();
                    order.lock().unwrap().push(t);
                    drop(p);
                }));
                // Wait until the task has queued (poll, no sleep).
                let deadline = Instant::now() + Duration::from_secs(5);
                while s.queued(tenant) == before {
                    assert!(Instant::now() < deadline, "task never queued");
                    tokio::task::yield_now().await;
                }
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        // b (weight 3) gets 3 of every 4 slots while both wait: all 6 of b's are done within
        // the first 8 grants, although a queued all 12 first.
        let last_b = order.iter().rposition(|t| t == "b").unwrap();
        assert!(last_b < 8, "order {order:?}");
        assert_eq!(order.len(), 18);
        assert_eq!(s.inflight(), 0);
    }

    #[tokio::test]
    async fn bounded_queue_and_timeout() {
        tokio::time::pause();
        let s = Scheduler::new(1, 1, [("a".to_string(), 1)]);
        let (p, _) = s.acquire("a", Duration::from_secs(1)).await.unwrap();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.acquire("a", Duration::from_secs(1)).await });
        while s.queued("a") == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            s.acquire("a", Duration::from_secs(1)).await.unwrap_err(),
            QueueError::Full
        );
        // Paused time auto-advances to the timeout.
        assert_eq!(waiter.await.unwrap().unwrap_err(), QueueError::Timeout);
        assert_eq!(s.queued("a"), 0);
        drop(p);
        assert_eq!(s.inflight(), 0);
    }
}
