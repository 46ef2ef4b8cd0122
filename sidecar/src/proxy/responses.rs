//! Which tenant each stored Responses API answer belongs to. The inference server keeps one
//! response store for every tenant and looks `previous_response_id` up in it without asking
//! whose it is; the sidecar sets the id of every response it lets the upstream store (its own
//! request id) and remembers the tenant, so a tenant can continue only its own responses.
//!
//! Remembered per replica (bounded: the oldest ids are forgotten first) and, with
//! `limits.backend = "redis"`, in Redis too, so that any replica can answer for an id another
//! replica handed out. An id nobody remembers is refused: the check fails closed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Ids remembered per replica at most.
pub const MAX_LOCAL_IDS: usize = 65_536;

/// Response id -> tenant, bounded.
#[derive(Debug)]
pub struct ResponseOwners {
    inner: Mutex<Owners>,
    cap: usize,
}

#[derive(Debug, Default)]
struct Owners {
    by_id: HashMap<String, Arc<str>>,
    order: VecDeque<String>,
}

impl Default for ResponseOwners {
    fn default() -> Self {
        Self::with_capacity(MAX_LOCAL_IDS)
    }
}

/// What this replica knows of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Handed to this tenant.
    Tenant,
    /// Handed to another tenant.
    Other,
    /// Not remembered here.
    Unknown,
}

impl ResponseOwners {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            inner: Mutex::new(Owners::default()),
            cap: cap.max(1),
        }
    }

    /// Remember that `id` was handed to `tenant` (the oldest id is forgotten when full).
    pub fn record(&self, id: &str, tenant: &Arc<str>) {
        let mut o = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if o.by_id.insert(id.to_string(), tenant.clone()).is_none() {
            o.order.push_back(id.to_string());
            while o.order.len() > self.cap {
                if let Some(old) = o.order.pop_front() {
                    o.by_id.remove(&old);
                }
            }
        }
    }

    /// Whose `id` is, as far as this replica knows.
    pub fn owner(&self, id: &str, tenant: &str) -> Owner {
        let o = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match o.by_id.get(id) {
            Some(t) if &**t == tenant => Owner::Tenant,
            Some(_) => Owner::Other,
            None => Owner::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids remembered.
    fn len(o: &ResponseOwners) -> usize {
        o.inner.lock().unwrap().by_id.len()
    }

    #[test]
    fn an_id_belongs_to_the_tenant_it_was_handed_to() {
        let o = ResponseOwners::default();
        let acme: Arc<str> = Arc::from("acme");
        o.record("resp_1", &acme);
        assert_eq!(o.owner("resp_1", "acme"), Owner::Tenant);
        assert_eq!(o.owner("resp_1", "globex"), Owner::Other);
        assert_eq!(o.owner("resp_2", "acme"), Owner::Unknown);
        // Recording again does not take a second slot.
        o.record("resp_1", &acme);
        assert_eq!(len(&o), 1);
    }

    #[test]
    fn the_oldest_ids_are_forgotten_first_and_the_map_stays_bounded() {
        let o = ResponseOwners::with_capacity(3);
        let t: Arc<str> = Arc::from("t");
        for i in 0..5 {
            o.record(&format!("r{i}"), &t);
        }
        assert_eq!(len(&o), 3);
        assert_eq!(o.owner("r0", "t"), Owner::Unknown);
        assert_eq!(o.owner("r1", "t"), Owner::Unknown);
        for i in 2..5 {
            assert_eq!(o.owner(&format!("r{i}"), "t"), Owner::Tenant);
        }
    }
}
