//! Socket tagging through the node agent (Unix SOCK_SEQPACKET + SCM_RIGHTS). Optional: when the
//! agent is not reachable, the sidecar runs on, says so once in the log, and sets
//! `bulkhead_agent_tagging_available` to 0; it tries again at most every [`RETRY_AFTER`].

use crate::record::metrics::TenantLabel;
use agent_common::client::{AgentClient, ClientError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Socket tagging's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// 1 when the node agent's tagging API answered last time, 0 when not.
    pub available: Gauge,
    /// Client connections left untagged because the tenant reached its tagged-connection cap.
    pub cap_reached: Family<TenantLabel, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "agent_tagging_available",
            "1 when the node agent's tagging API is reachable",
            m.available.clone(),
        );
        r.register(
            "tagging_cap_reached",
            "Client connections left untagged: the tenant had agent.max_tagged_connections_per_tenant tagged",
            m.cap_reached.clone(),
        );
        m
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unknown,
    Up,
    Down(Instant),
}

/// Client connections tagged now, per tenant.
type TaggedCounts = Arc<Mutex<HashMap<Arc<str>, usize>>>;

pub struct Tagger {
    client: Option<AgentClient>,
    state: Mutex<State>,
    gauge: Gauge,
    /// Client connections tagged now, per tenant (capped by
    /// `agent.max_tagged_connections_per_tenant`; the agent's tags are socket storage, which
    /// cannot be evicted, so the cap no longer protects other tenants' tags).
    tagged: TaggedCounts,
    max_per_tenant: usize,
    cap_reached: Family<TenantLabel, Counter>,
    /// The (agent error code, tenant) refusals already logged as warnings: each once per
    /// process (tenants are configured names, so this stays small).
    refusals_logged: Mutex<HashSet<(&'static str, String)>>,
}

/// One client connection's tag under the per-tenant cap; the count drops when it is dropped.
/// A connection left untagged at the cap keeps a slot holding no count, so that it is
/// counted in `tagging_cap_reached` once, not on every request.
#[derive(Debug)]
pub struct TagSlot {
    tenant: Arc<str>,
    /// The per-tenant counts this slot holds one of; `None` when left untagged.
    held: Option<TaggedCounts>,
}

impl TagSlot {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Drop for TagSlot {
    fn drop(&mut self) {
        let Some(tagged) = &self.held else {
            return;
        };
        let mut m = tagged.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

impl Tagger {
    pub fn new(
        socket: Option<PathBuf>,
        max_per_tenant: usize,
        gauge: Gauge,
        cap_reached: Family<TenantLabel, Counter>,
    ) -> Self {
        if socket.is_none() {
            tracing::info!("socket tagging is off: no agent.socket configured");
        }
        gauge.set(0);
        Self {
            client: socket.map(|p| AgentClient::new(p).with_timeout(Duration::from_millis(500))),
            state: Mutex::new(State::Unknown),
            gauge,
            tagged: Arc::default(),
            max_per_tenant,
            cap_reached,
            refusals_logged: Mutex::default(),
        }
    }

    /// Tag an admitted request's client connection with `tenant`, unless it already is.
    /// Beyond the per-tenant cap the connection stays untagged, counted once (not on each of
    /// its requests), and holds no count.
    pub async fn tag_connection(
        &self,
        sock: BorrowedFd<'_>,
        slot: &mut Option<TagSlot>,
        tenant: &Arc<str>,
    ) {
        if slot
            .as_ref()
            .is_some_and(|s| s.tenant == *tenant && s.held.is_some())
        {
            return;
        }
        // Left untagged for this tenant before: tagged now if a slot came back, not counted
        // again if not.
        let counted = slot.as_ref().is_some_and(|s| s.tenant == *tenant);
        // Give up the old tenant's slot first (a keep-alive connection changing tenant).
        let was_tagged = slot.take().is_some_and(|s| s.held.is_some());
        let at_cap = {
            let mut m = self.tagged.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(tenant.clone()).or_default();
            let full = *n >= self.max_per_tenant;
            if !full {
                *n += 1;
            }
            full
        };
        if at_cap {
            if !counted {
                self.cap_reached
                    .get_or_create(&TenantLabel {
                        tenant: tenant.to_string(),
                    })
                    .inc();
            }
            *slot = Some(TagSlot {
                tenant: tenant.clone(),
                held: None,
            });
            // Never leave the previous tenant's tag on this tenant's bytes.
            if was_tagged {
                self.untag(sock).await;
            }
            return;
        }
        *slot = Some(TagSlot {
            tenant: tenant.clone(),
            held: Some(self.tagged.clone()),
        });
        // A re-tag the agent did not accept (it does not know the tenant, or no longer allows
        // this process) would leave the previous tenant's tag on this tenant's bytes: untag.
        if !self.tag(sock, tenant).await && was_tagged {
            self.untag(sock).await;
        }
    }

    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Tag `sock` with `tenant` (best effort; never fails the request). True when the agent
    /// accepted the tag.
    pub async fn tag(&self, sock: BorrowedFd<'_>, tenant: &str) -> bool {
        self.call(sock, Some(tenant)).await
    }

    /// Remove `sock`'s tag: its bytes count as untagged from now on.
    pub async fn untag(&self, sock: BorrowedFd<'_>) {
        self.call(sock, None).await;
    }

    /// Tag with `Some(tenant)`, untag with `None`; true when the agent accepted.
    async fn call(&self, sock: BorrowedFd<'_>, tenant: Option<&str>) -> bool {
        let Some(client) = self.client.clone() else {
            return false;
        };
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Down(since) = *st
                && since.elapsed() < RETRY_AFTER
            {
                return false;
            }
        }
        let fd = match sock.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "cannot duplicate socket for tagging");
                return false;
            }
        };
        let op = tenant.map(str::to_string);
        let res = tokio::task::spawn_blocking(move || match op {
            Some(t) => client.tag(fd.as_fd(), &t),
            None => client.untag(fd.as_fd()),
        })
        .await;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(Ok(_)) => {
                if *st != State::Up {
                    tracing::info!(
                        "node agent tagging API reachable: sockets are tagged per tenant"
                    );
                }
                *st = State::Up;
                self.gauge.set(1);
                true
            }
            Ok(Err(ClientError::Rejected { code, message })) => {
                drop(st);
                let who = tenant.unwrap_or("(untag)");
                let first = self
                    .refusals_logged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((code.as_str(), who.to_string()));
                if first {
                    tracing::warn!(tenant = who, code = code.as_str(), %message, "the node agent refused to tag a socket: it stays untagged (its bytes count as untagged); the request is served; logged once per code and tenant");
                } else {
                    tracing::debug!(tenant = who, code = code.as_str(), %message, "agent refused to tag a socket");
                }
                false
            }
            Ok(Err(e)) => {
                if !matches!(*st, State::Down(_)) {
                    tracing::warn!(error = %e, "node agent tagging API unreachable: running without socket tagging");
                }
                *st = State::Down(Instant::now());
                self.gauge.set(0);
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "tagging task failed");
                false
            }
        }
    }
}
