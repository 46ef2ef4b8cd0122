//! KV-cache attribution: each in-flight request holds a [`KvCharge`] of its prompt plus the
//! tokens generated so far (in `bulkhead_kv_cache_tokens` / `bulkhead_sidecar_kv_inflight_bytes`), and [`report_loop`]
//! sends the per-tenant bytes to the node agent every `agent.kv_report_interval_ms`, with the
//! tokens each tenant had the server process since the last report (prompt and completion
//! tokens as settled from `usage`, weighted by the fair queue's `input_token_cost` and
//! `output_token_cost`): the agent splits the server's GPU time and energy by them.

use crate::record::metrics::{ResultLabel, TenantKind, TenantLabel};
use agent_common::client::AgentClient;
use agent_common::proto::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// KV-cache attribution's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// KV-cache tokens held by the tenant's in-flight requests (prompt + generated so far).
    pub tokens: Family<TenantLabel, Gauge>,
    /// The same in bytes (needs `[model]`).
    pub bytes: Family<TenantLabel, Gauge>,
    /// KV reports to the node agent by result (`ok`, `error`).
    pub reports: Family<ResultLabel, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "kv_cache_tokens",
            "KV-cache tokens held by the tenant's in-flight requests",
            m.tokens.clone(),
        );
        r.register(
            "sidecar_kv_inflight_bytes",
            "KV-cache bytes held by the tenant's in-flight requests through this sidecar \
             ([model] geometry); the node agent's GPU memory view is bulkhead_kv_cache_bytes",
            m.bytes.clone(),
        );
        r.register(
            "agent_kv_reports",
            "KV reports sent to the node agent, by result",
            m.reports.clone(),
        );
        m
    }
}

/// What the report loop needs of the configuration (sent again on every reload).
#[derive(Debug, Clone, PartialEq)]
pub struct KvSettings {
    pub socket: Option<PathBuf>,
    pub interval: Duration,
    pub has_model: bool,
    pub tenants: Vec<String>,
    /// The fair queue's cost of a prompt token and of an output token.
    pub input_cost: f64,
    pub output_cost: f64,
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
                .bytes
                .get_or_create(&TenantLabel { tenant: t.clone() })
                .get();
            (t, v.max(0) as u64)
        })
        .collect()
}

/// Prompt and completion tokens settled per tenant so far (`bulkhead_tokens_total`).
pub fn settled_tokens(
    tokens: &Family<TenantKind, Counter>,
    tenants: &[String],
) -> BTreeMap<String, (u64, u64)> {
    tenants
        .iter()
        .map(|t| {
            let get = |kind| {
                tokens
                    .get_or_create(&TenantKind {
                        tenant: t.clone(),
                        kind,
                    })
                    .get()
            };
            (t.clone(), (get("prompt"), get("completion")))
        })
        .collect()
}

/// The weighted tokens each tenant was served between two readings of [`settled_tokens`]:
/// `input_cost x prompt + output_cost x completion`, rounded to whole units.
pub fn weighted_since(
    now: &BTreeMap<String, (u64, u64)>,
    before: &BTreeMap<String, (u64, u64)>,
    input_cost: f64,
    output_cost: f64,
) -> BTreeMap<String, u64> {
    now.iter()
        .map(|(t, &(p, c))| {
            let (p0, c0) = before.get(t).copied().unwrap_or((0, 0));
            let w = p.saturating_sub(p0) as f64 * input_cost
                + c.saturating_sub(c0) as f64 * output_cost;
            (t.clone(), w.round() as u64)
        })
        .collect()
}

/// Report to the node agent until `stop`; failures are logged once per outage and counted,
/// and never touch the request path (the blocking call runs on the blocking pool). `tokens`:
/// the settled tokens per tenant (`bulkhead_tokens_total`).
pub async fn report_loop(
    metrics: Metrics,
    tokens: Family<TenantKind, Counter>,
    settings: tokio::sync::watch::Receiver<KvSettings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    let mut said_no_model = false;
    // Tokens as of the last report the agent took: a failed report's tokens go with the next.
    let mut reported: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    // An agent that predates token counts refuses them as malformed: then send bytes only.
    let mut agent_takes_tokens = true;
    loop {
        let KvSettings {
            socket,
            interval,
            has_model,
            tenants,
            input_cost,
            output_cost,
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
                let settled = settled_tokens(&tokens, &tenants);
                let tokens = weighted_since(&settled, &reported, input_cost, output_cost);
                let report = snapshot(&metrics, tenants.into_iter());
                let client = AgentClient::new(path).with_timeout(Duration::from_millis(500));
                let with_tokens = agent_takes_tokens;
                let res = tokio::task::spawn_blocking(move || {
                    let first = client.report_kv_tokens(&report, with_tokens.then_some(&tokens));
                    match first {
                        Err(e) if with_tokens && e.code() == Some(ErrorCode::Malformed) => {
                            (false, client.report_kv(&report))
                        }
                        other => (with_tokens, other),
                    }
                })
                .await
                .map(|(took_tokens, r)| {
                    if with_tokens && !took_tokens && r.is_ok() {
                        tracing::warn!("the node agent does not take token counts in KV reports (an older agent): the server's GPU time is not split between tenants");
                        agent_takes_tokens = false;
                    }
                    r
                });
                let ok = matches!(res, Ok(Ok(_)));
                if ok {
                    reported = settled;
                }
                metrics
                    .reports
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_since_the_last_report_are_weighted_by_the_queue_costs() {
        let before = BTreeMap::from([("a".to_string(), (10, 5)), ("b".to_string(), (3, 3))]);
        let now = BTreeMap::from([
            ("a".to_string(), (14, 8)),
            ("b".to_string(), (3, 3)),
            ("c".to_string(), (1, 1)),
        ]);
        assert_eq!(
            weighted_since(&now, &before, 1.0, 2.0),
            BTreeMap::from([
                ("a".to_string(), 4 + 2 * 3),
                ("b".to_string(), 0),
                ("c".to_string(), 3),
            ])
        );
        assert_eq!(
            weighted_since(&now, &before, 0.5, 1.5)["a"],
            7,
            "2 + 4.5 rounded"
        );
    }
}
