//! The OTLP/HTTP exporter: one background task sends batched spans (and, every
//! `metrics_interval_ms`, the GenAI metrics) to the collector. A request only pushes its spans
//! into a bounded buffer under a short lock ([`SpanQueue::push`]): it never waits for the
//! collector. A full buffer, a failed or timed-out export drops spans and counts them.

use super::genai::{GenAi, SCHEMA_URL};
use crate::config::OtlpConfig;
use crate::record::metrics::{Reason, ResultLabel};
use agent_common::otlp::{self, Source, Span};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Why spans were dropped (`bulkhead_telemetry_dropped_spans_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanDrop {
    QueueFull,
    ExportFailed,
    ExportTimeout,
}

impl SpanDrop {
    pub const ALL: [SpanDrop; 3] = [
        SpanDrop::QueueFull,
        SpanDrop::ExportFailed,
        SpanDrop::ExportTimeout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            SpanDrop::QueueFull => "queue_full",
            SpanDrop::ExportFailed => "export_failed",
            SpanDrop::ExportTimeout => "export_timeout",
        }
    }
}

/// The `reason` labels of `bulkhead_telemetry_dropped_spans_total`.
pub const DROP_REASONS: [&str; 3] = [
    SpanDrop::QueueFull.as_str(),
    SpanDrop::ExportFailed.as_str(),
    SpanDrop::ExportTimeout.as_str(),
];

/// The exporter's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Spans not exported, by [`SpanDrop`].
    pub dropped_spans: Family<Reason, Counter>,
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans waiting for export now.
    pub queued: Gauge,
    /// GenAI metric exports by result (`ok`, `failed`, `timeout`).
    pub metric_exports: Family<ResultLabel, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "telemetry_dropped_spans",
            "Spans not exported over OTLP, by reason (queue_full, export_failed, export_timeout)",
            m.dropped_spans.clone(),
        );
        r.register(
            "telemetry_exported_spans",
            "Spans the OTLP collector accepted",
            m.exported.clone(),
        );
        r.register(
            "telemetry_queued_spans",
            "Spans waiting for OTLP export (at most telemetry.otlp.max_queue_spans)",
            m.queued.clone(),
        );
        r.register(
            "telemetry_metric_exports",
            "OTLP exports of the GenAI metrics, by result (ok, failed, timeout)",
            m.metric_exports.clone(),
        );
        for reason in SpanDrop::ALL {
            let _ = m.dropped_spans.get_or_create(&Reason {
                reason: reason.as_str(),
            });
        }
        m
    }

    /// `n` spans dropped for `reason`.
    pub fn dropped(&self, reason: SpanDrop, n: u64) {
        self.dropped_spans
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc_by(n);
    }

    pub fn metric_export(&self, result: &'static str) {
        self.metric_exports
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// Spans waiting for export, at most `max` of them.
pub struct SpanQueue {
    spans: Mutex<Vec<Span>>,
    max: usize,
    batch: usize,
    ready: Notify,
    metrics: Metrics,
}

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanQueue")
            .field("max", &self.max)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl SpanQueue {
    pub fn new(max: usize, batch: usize, metrics: Metrics) -> Self {
        SpanQueue {
            spans: Mutex::new(Vec::new()),
            max,
            batch,
            ready: Notify::new(),
            metrics,
        }
    }

    /// Queue one request's spans, or drop them all (counted) when they do not fit.
    pub fn push(&self, spans: Vec<Span>) {
        let n = spans.len();
        let len = {
            let mut q = self.spans.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() + n > self.max {
                drop(q);
                self.metrics.dropped(SpanDrop::QueueFull, n as u64);
                return;
            }
            q.extend(spans);
            q.len()
        };
        self.metrics.queued.set(len as i64);
        if len >= self.batch {
            self.ready.notify_one();
        }
    }

    fn take(&self) -> Vec<Span> {
        let mut q = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(self.batch);
        let out: Vec<Span> = q.drain(..n).collect();
        self.metrics.queued.set(q.len() as i64);
        out
    }

    fn len(&self) -> usize {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The exporter's HTTP side.
struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    traces: http::Uri,
    metrics_uri: http::Uri,
    timeout: Duration,
}

enum Sent {
    Ok,
    Failed(String),
    Timeout,
}

impl Sender {
    async fn post(&self, uri: &http::Uri, body: Vec<u8>) -> Sent {
        let req = Request::post(uri.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Sent::Timeout,
            Ok(Err(e)) => Sent::Failed(e.to_string()),
            // The body (a partial-success message at most) is not read: the connection is
            // dropped with it.
            Ok(Ok(r)) if r.status().is_success() => Sent::Ok,
            Ok(Ok(r)) => Sent::Failed(format!("collector answered {}", r.status())),
        }
    }
}

fn uri(endpoint: &str, path: &str) -> http::Uri {
    format!("{}{path}", endpoint.trim_end_matches('/'))
        .parse()
        .expect("validated endpoint")
}

/// Who the exports come from.
pub fn source(c: &OtlpConfig) -> Source {
    Source {
        resource: vec![
            otlp::attr("service.name", c.service_name.clone()),
            otlp::attr("service.version", env!("CARGO_PKG_VERSION")),
            otlp::attr("telemetry.sdk.name", "bulkhead"),
            otlp::attr("telemetry.sdk.language", "rust"),
        ],
        scope_name: "bulkhead-sidecar",
        scope_version: env!("CARGO_PKG_VERSION"),
        schema_url: SCHEMA_URL,
    }
}

/// Export until `stop` turns true, then send what is queued once more (within the timeout).
pub async fn run(
    config: OtlpConfig,
    queue: Arc<SpanQueue>,
    genai: Arc<GenAi>,
    metrics: Metrics,
    start_unix_nano: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(config.timeout_ms)));
    connector.set_nodelay(true);
    let sender = Sender {
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(2)
            .build(connector),
        traces: uri(&config.endpoint, "/v1/traces"),
        metrics_uri: uri(&config.endpoint, "/v1/metrics"),
        timeout: Duration::from_millis(config.timeout_ms),
    };
    let src = source(&config);
    let interval = Duration::from_millis(config.export_interval_ms);
    let metrics_every =
        (config.metrics_interval_ms > 0).then(|| Duration::from_millis(config.metrics_interval_ms));
    let mut next_metrics = metrics_every.map(|d| tokio::time::Instant::now() + d);
    let mut failing = false;
    loop {
        let wake = tokio::time::Instant::now() + interval;
        let wake = next_metrics.map_or(wake, |m| m.min(wake));
        let stopping = tokio::select! {
            _ = queue.ready.notified() => false,
            _ = tokio::time::sleep_until(wake) => false,
            r = stop.changed() => r.is_err() || *stop.borrow(),
        };
        // Spans: batches until the queue is short of one (all of it when stopping).
        loop {
            let batch = queue.take();
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            let body = otlp::encode_traces(&src, &batch);
            drop(batch);
            match sender.post(&sender.traces, body).await {
                Sent::Ok => {
                    metrics.exported.inc_by(n);
                    if failing {
                        tracing::info!("OTLP span export works again");
                        failing = false;
                    }
                }
                Sent::Failed(why) => {
                    metrics.dropped(SpanDrop::ExportFailed, n);
                    if !failing {
                        tracing::warn!(reason = %why, endpoint = %sender.traces, "OTLP span export failed; spans are dropped (counted) until it works");
                        failing = true;
                    }
                }
                Sent::Timeout => {
                    metrics.dropped(SpanDrop::ExportTimeout, n);
                    if !failing {
                        tracing::warn!(endpoint = %sender.traces, "OTLP span export timed out; spans are dropped (counted) until it works");
                        failing = true;
                    }
                }
            }
            if !stopping && queue.len() < queue.batch {
                break;
            }
        }
        if let (Some(at), Some(every)) = (next_metrics, metrics_every)
            && (stopping || tokio::time::Instant::now() >= at)
        {
            let now = super::unix_nanos();
            let body = otlp::encode_metrics(&src, &genai.otlp(start_unix_nano, now));
            let result = match sender.post(&sender.metrics_uri, body).await {
                Sent::Ok => "ok",
                Sent::Failed(_) => "failed",
                Sent::Timeout => "timeout",
            };
            metrics.metric_export(result);
            next_metrics = Some(tokio::time::Instant::now() + every);
        }
        if stopping {
            return;
        }
    }
}
