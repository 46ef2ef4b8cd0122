//! Socket tagging through the node agent (Unix SOCK_SEQPACKET + SCM_RIGHTS). Optional: when the
//! agent is not reachable, the sidecar runs on, says so once in the log, and sets
//! `bulkhead_agent_tagging_available` to 0; it tries again at most every [`RETRY_AFTER`].

use agent_common::client::{AgentClient, ClientError};
use prometheus_client::metrics::gauge::Gauge;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const RETRY_AFTER: Duration = Duration::from_secs(30);

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
        }
    }

    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Tag `sock` with `tenant` (best effort; never fails the request).
    pub async fn tag(&self, sock: BorrowedFd<'_>, tenant: &str) {
        let Some(client) = self.client.clone() else {
            return;
        };
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Down(since) = *st
                && since.elapsed() < RETRY_AFTER
            {
                return;
            }
        }
        let fd = match sock.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "cannot duplicate socket for tagging");
                return;
            }
        };
        let tenant_owned = tenant.to_string();
        let res = tokio::task::spawn_blocking(move || client.tag(fd.as_fd(), &tenant_owned)).await;
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
            }
            Ok(Err(ClientError::Rejected { code, message })) => {
                tracing::debug!(tenant = %tenant, code = code.as_str(), %message, "agent refused to tag a socket");
            }
            Ok(Err(e)) => {
                if !matches!(*st, State::Down(_)) {
                    tracing::warn!(error = %e, "node agent tagging API unreachable: running without socket tagging");
                }
                *st = State::Down(Instant::now());
                self.gauge.set(0);
            }
            Err(e) => tracing::debug!(error = %e, "tagging task failed"),
        }
    }
}
