//! KV-cache attribution: each in-flight request holds a [`KvCharge`] of its prompt plus the
//! tokens generated so far (in `bulkhead_kv_cache_tokens` / `_bytes`), and [`report_loop`]
//! sends the per-tenant bytes to the node agent every `agent.kv_report_interval_ms`.

use crate::metrics::{Metrics, ResultLabel, TenantLabel};
use agent_common::client::AgentClient;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// What the report loop needs of the configuration (sent again on every reload).
#[derive(Debug, Clone, PartialEq)]
pub struct KvSettings {
    pub socket: Option<PathBuf>,
    pub interval: Duration,
    pub has_model: bool,
    pub tenants: Vec<String>,
}

/// One request's share of the KV cache; released when dropped.
pub struct KvCharge {
    tokens_gauge: Gauge,
    bytes_gauge: Gauge,
    bytes_per_token: u64,
    tokens: u64,
}

impl KvCharge {
    pub fn new(tokens_gauge: Gauge, bytes_gauge: Gauge, bytes_per_token: u64) -> Self {
        Self {
            tokens_gauge,
            bytes_gauge,
            bytes_per_token,
            tokens: 0,
        }
    }

    /// Set the tokens this request holds now.
    pub fn set(&mut self, tokens: u64) {
        if tokens == self.tokens {
            return;
        }
        let (old, new) = (self.tokens as i64, tokens as i64);
        self.tokens_gauge.inc_by(new - old);
        if self.bytes_per_token > 0 {
            let bpt = self.bytes_per_token as i64;
            self.bytes_gauge
                .inc_by(new.saturating_mul(bpt) - old.saturating_mul(bpt));
        }
        self.tokens = tokens;
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl Drop for KvCharge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// The per-tenant bytes to report: every configured tenant, 0 when it holds nothing.
pub fn snapshot(metrics: &Metrics, tenants: impl Iterator<Item = String>) -> BTreeMap<String, u64> {
    tenants
        .map(|t| {
            let v = metrics
                .kv_bytes
                .get_or_create(&TenantLabel { tenant: t.clone() })
                .get();
            (t, v.max(0) as u64)
        })
        .collect()
}

/// Report to the node agent until `stop`; failures are logged once per outage and counted,
/// and never touch the request path (the blocking call runs on the blocking pool).
pub async fn report_loop(
    metrics: Metrics,
    settings: tokio::sync::watch::Receiver<KvSettings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    let mut said_no_model = false;
    loop {
        let KvSettings {
            socket,
            interval,
            has_model,
            tenants,
        } = settings.borrow().clone();
        if let Some(path) = socket {
            if !has_model {
                if !said_no_model {
                    tracing::info!(
                        "no [model] configured: KV-cache bytes are not reported to the node agent"
                    );
                    said_no_model = true;
                }
            } else {
                let report = snapshot(&metrics, tenants.into_iter());
                let client = AgentClient::new(path).with_timeout(Duration::from_millis(500));
                let res = tokio::task::spawn_blocking(move || client.report_kv(&report)).await;
                let ok = matches!(res, Ok(Ok(_)));
                metrics
                    .kv_reports
                    .get_or_create(&ResultLabel {
                        result: if ok { "ok" } else { "error" },
                    })
                    .inc();
                if ok && failing {
                    tracing::info!("KV reports to the node agent work again");
                } else if !ok && !failing {
                    let why = match res {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(error = %why, "KV report to the node agent failed (logged once until it works again)");
                }
                failing = !ok;
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
