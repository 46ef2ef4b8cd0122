//! Prefix-cache flushes: one call to the upstream's flush endpoint ([`Flusher`]), retried as
//! `cache.flush_attempts` says, and how its answer is judged ([`judge_flush`]).

use super::{GateSettings, Metrics};
use crate::config::Flavor;
use crate::http_util::BoxError;
use crate::record::metrics::ResultLabel;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tokio::time::Instant;

/// How one flush call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    Ok,
    /// The server answered but did not flush (busy, `success: false`).
    Refused(String),
    /// No usable answer (unreachable, timeout, unexpected status).
    Failed(String),
}

impl FlushOutcome {
    /// Every [`FlushOutcome::label`], for pre-creating metric series.
    pub const RESULTS: [&'static str; 3] = ["ok", "failed", "refused"];

    pub fn label(&self) -> &'static str {
        match self {
            FlushOutcome::Ok => "ok",
            FlushOutcome::Refused(_) => "refused",
            FlushOutcome::Failed(_) => "failed",
        }
    }
}

/// Judge a flush answer. vLLM: 200, and `success` true when the body is JSON with it. SGLang:
/// the same, and never a body saying the cache was not flushed. Anything else is no flush.
pub fn judge_flush(flavor: Flavor, status: StatusCode, body: &[u8]) -> FlushOutcome {
    let text = String::from_utf8_lossy(body);
    let snippet: String = text.chars().take(200).collect();
    let lower = text.to_ascii_lowercase();
    let json_success = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("success").cloned());
    let says_no = lower.contains("not flushed")
        || lower.contains("pending requests")
        || json_success
            .as_ref()
            .is_some_and(|s| s != &serde_json::Value::Bool(true));
    if status == StatusCode::OK && !says_no {
        return match flavor {
            Flavor::Vllm | Flavor::Sglang => FlushOutcome::Ok,
            Flavor::Openai => FlushOutcome::Failed("the upstream has no flush".into()),
        };
    }
    if says_no
        || matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::CONFLICT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_REQUEST
        )
    {
        return FlushOutcome::Refused(format!("HTTP {}: {snippet}", status.as_u16()));
    }
    FlushOutcome::Failed(format!("HTTP {}: {snippet}", status.as_u16()))
}

/// One prefix-cache flush a request made at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushAttempt {
    pub started: std::time::Instant,
    pub took: Duration,
    /// `ok`, `refused` or `failed` (as `bulkhead_cache_flushes_total`).
    pub result: &'static str,
}

/// Calls the upstream's flush endpoint and counts each call.
pub(super) struct Flusher {
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Metrics,
}

impl Flusher {
    pub(super) fn new(metrics: Metrics) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(http),
            metrics,
        }
    }

    /// Flush, retrying up to `flush_attempts`; true only when the upstream confirmed.
    pub(super) async fn flush_with_retries(
        &self,
        s: &GateSettings,
        deadline: Instant,
        flushes: &mut Vec<FlushAttempt>,
    ) -> (bool, String) {
        let mut why = String::new();
        for attempt in 0..s.flush_attempts {
            if attempt > 0 {
                if Instant::now() + s.flush_retry >= deadline {
                    break;
                }
                tokio::time::sleep(s.flush_retry).await;
            }
            let t0 = Instant::now();
            let outcome = self.flush_once(s).await;
            let took = t0.elapsed();
            self.metrics.flush_duration.observe(took.as_secs_f64());
            flushes.push(FlushAttempt {
                started: t0.into_std(),
                took,
                result: outcome.label(),
            });
            self.metrics
                .flushes
                .get_or_create(&ResultLabel {
                    result: outcome.label(),
                })
                .inc();
            match outcome {
                FlushOutcome::Ok => {
                    tracing::debug!("upstream prefix cache flushed");
                    return (true, String::new());
                }
                FlushOutcome::Refused(w) | FlushOutcome::Failed(w) => {
                    tracing::info!(attempt, reason = %w, "prefix-cache flush not confirmed");
                    why = w;
                }
            }
        }
        (false, why)
    }

    async fn flush_once(&self, s: &GateSettings) -> FlushOutcome {
        let Some(path) = s.flavor.flush_path() else {
            return FlushOutcome::Failed("upstream.flavor \"openai\" has no cache flush".into());
        };
        let mut parts = s.upstream.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        let Ok(uri) = Uri::from_parts(parts) else {
            return FlushOutcome::Failed("bad upstream URL".into());
        };
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let call = async {
            let resp = self.client.request(req).await.map_err(BoxError::from)?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>((status, body))
        };
        match tokio::time::timeout(s.flush_timeout, call).await {
            Err(_) => FlushOutcome::Failed("flush timed out".into()),
            Ok(Err(e)) => FlushOutcome::Failed(format!("flush request failed: {e}")),
            Ok(Ok((status, body))) => judge_flush(s.flavor, status, &body),
        }
    }
}
