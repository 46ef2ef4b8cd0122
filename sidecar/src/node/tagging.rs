//! Socket tagging through the node agent (Unix SOCK_SEQPACKET + SCM_RIGHTS). Optional: when the
//! agent is not reachable, the sidecar runs on, says so once in the log, and sets
//! `bulkhead_agent_tagging_available` to 0; it tries again at most every [`RETRY_AFTER`].

use agent_common::client::{AgentClient, ClientError};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
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
        m
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unknown,
    Up,
    Down(Instant),
}

pub struct Tagger {
    client: Option<AgentClient>,
    state: Mutex<State>,
    gauge: Gauge,
    /// The (agent error code, tenant) refusals already logged as warnings: each once per
    /// process (tenants are configured names, so this stays small).
    refusals_logged: Mutex<HashSet<(&'static str, String)>>,
}

/// Which tenant a client connection is tagged with (or was offered to the agent for).
#[derive(Debug)]
pub struct TagSlot {
    tenant: Arc<str>,
}

impl TagSlot {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Tagger {
    pub fn new(socket: Option<PathBuf>, gauge: Gauge) -> Self {
        if socket.is_none() {
            tracing::info!("socket tagging is off: no agent.socket configured");
        }
        gauge.set(0);
        Self {
            client: socket.map(|p| AgentClient::new(p).with_timeout(Duration::from_millis(500))),
            state: Mutex::new(State::Unknown),
            gauge,
            refusals_logged: Mutex::default(),
        }
    }

    /// Tag an admitted request's client connection with `tenant`, unless it already is. Every
    /// connection is tagged: the agent keeps a tag in the socket's own storage, freed with the
    /// socket, so there is no shared table a tenant could fill (`http.max_connections` bounds
    /// the connections there are).
    pub async fn tag_connection(
        &self,
        sock: BorrowedFd<'_>,
        slot: &mut Option<TagSlot>,
        tenant: &Arc<str>,
    ) {
        if slot.as_ref().is_some_and(|s| s.tenant == *tenant) {
            return;
        }
        // A keep-alive connection changing tenant.
        let was_tagged = slot.take().is_some();
        *slot = Some(TagSlot {
            tenant: tenant.clone(),
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
