//! Settlements and concurrency slots: what an admission gives back (tokens, requests, its
//! slot), gathered and sent off every request's path; the slots this replica holds, renewed
//! while it lives.

use super::{SharedLimits, SharedTenant, scripts};
use crate::limits::local::LimitNumbers;
use scripts::TenantKeys;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Settlements are gathered this long and sent as one call per tenant.
const SETTLE_BATCH: Duration = Duration::from_millis(2);
/// Slots released by one settlement call at most (the script's argument list).
const SLOTS_PER_CALL: usize = 500;

impl SharedLimits {
    pub(super) fn slot_id(&self) -> String {
        let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.replica)
    }

    pub(super) fn hold_slot(&self, key: &Arc<str>, id: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .insert(id.to_string());
    }

    pub(super) fn drop_slot(&self, key: &Arc<str>, id: &str) {
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
    pub(super) fn settle_later(
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
pub(super) struct Pending {
    keys: TenantKeys,
    numbers: LimitNumbers,
    requests: u64,
    tokens: f64,
    slots: Vec<String>,
}

/// Renew this replica's slots every third of the lease, so they outlive it only while the
/// replica lives.
pub(super) async fn renew_loop(s: Weak<SharedLimits>) {
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
