//! `[telemetry]`: traces and the GenAI metrics over OTLP/HTTP (read at start only).

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `[telemetry.otlp]`; off when absent.
    pub otlp: Option<OtlpConfig>,
}

/// `[telemetry.otlp]`: where and how spans and metrics are exported.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`, required): spans go to
    /// `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`.
    pub endpoint: String,
    /// The share of new traces sampled (0.0 ..= 1.0); a trusted client's sampled flag is
    /// followed (parent-based).
    pub sample_ratio: f64,
    /// Spans waiting for export at most; beyond, new spans are dropped and counted.
    pub max_queue_spans: usize,
    /// Spans in one export request at most.
    pub max_batch_spans: usize,
    /// How long spans wait for a fuller batch at most.
    pub export_interval_ms: u64,
    /// One export request's time limit; a batch that misses it is dropped and counted.
    pub timeout_ms: u64,
    /// How often the GenAI metrics are exported (0: traces only).
    pub metrics_interval_ms: u64,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            sample_ratio: 0.1,
            max_queue_spans: 4096,
            max_batch_spans: 512,
            export_interval_ms: 1000,
            timeout_ms: 2000,
            metrics_interval_ms: 15_000,
            service_name: "bulkhead-sidecar".into(),
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.otlp.as_ref().map_or(Ok(()), OtlpConfig::validate)
    }
}

impl OtlpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = |x: &str| format!("telemetry.otlp.{x}");
        if self.endpoint.is_empty() {
            return Err(invalid(
                f("endpoint"),
                "required: the collector's OTLP/HTTP base URL (http://collector:4318)",
            ));
        }
        let uri: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e| invalid(f("endpoint"), format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                f("endpoint"),
                "only http:// is supported (OTLP/HTTP to a collector beside the sidecar)",
            ));
        }
        if uri.authority().is_none() {
            return Err(invalid(f("endpoint"), "missing host"));
        }
        if uri.query().is_some() {
            return Err(invalid(f("endpoint"), "must not have a query"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(f("sample_ratio"), "must be between 0.0 and 1.0"));
        }
        if self.max_queue_spans == 0 || self.max_queue_spans > 1_000_000 {
            return Err(invalid(f("max_queue_spans"), "must be 1-1000000"));
        }
        if self.max_batch_spans == 0 || self.max_batch_spans > self.max_queue_spans {
            return Err(invalid(
                f("max_batch_spans"),
                "must be > 0 and at most max_queue_spans",
            ));
        }
        if self.export_interval_ms == 0 {
            return Err(invalid(f("export_interval_ms"), "must be > 0"));
        }
        if self.timeout_ms == 0 {
            return Err(invalid(f("timeout_ms"), "must be > 0"));
        }
        if self.service_name.is_empty() || self.service_name.len() > 256 {
            return Err(invalid(f("service_name"), "must be 1-256 characters"));
        }
        Ok(())
    }
}
