//! The OpenTelemetry GenAI semantic conventions' metrics (semconv 1.38.0), per tenant: kept
//! once, served on `/metrics` under their Prometheus-translated names and exported over OTLP.
//!
//! | instrument (OTLP) | unit | on `/metrics` |
//! |---|---|---|
//! | `gen_ai.server.request.duration` | s | `gen_ai_server_request_duration_seconds` |
//! | `gen_ai.server.time_to_first_token` | s | `gen_ai_server_time_to_first_token_seconds` |
//! | `gen_ai.server.time_per_output_token` | s | `gen_ai_server_time_per_output_token_seconds` |
//! | `gen_ai.client.token.usage` | {token} | `gen_ai_client_token_usage` |
//! | `bulkhead.sidecar.overhead.duration` | s | `bulkhead_sidecar_overhead_duration_seconds` |
//!
//! Attributes: `bulkhead.tenant` (a configured tenant: bounded), `gen_ai.operation.name`,
//! `gen_ai.token.type` (token usage), `error.type` (request duration of a failed request).
//! The Prometheus labels are the attribute names with `.` as `_`. The model is not a label:
//! it comes from the request and would make the series unbounded.

use agent_common::otlp::{self, Attr, Data, HistogramPoint, Metric};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::MetricType;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The semantic conventions version the names and attributes follow.
pub const SEMCONV_VERSION: &str = "1.38.0";
pub const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.38.0";

/// One instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instrument {
    RequestDuration,
    TimeToFirstToken,
    TimePerOutputToken,
    TokenUsage,
    Overhead,
}

pub const INSTRUMENTS: [Instrument; 5] = [
    Instrument::RequestDuration,
    Instrument::TimeToFirstToken,
    Instrument::TimePerOutputToken,
    Instrument::TokenUsage,
    Instrument::Overhead,
];

impl Instrument {
    pub fn otel_name(self) -> &'static str {
        match self {
            Instrument::RequestDuration => "gen_ai.server.request.duration",
            Instrument::TimeToFirstToken => "gen_ai.server.time_to_first_token",
            Instrument::TimePerOutputToken => "gen_ai.server.time_per_output_token",
            Instrument::TokenUsage => "gen_ai.client.token.usage",
            Instrument::Overhead => "bulkhead.sidecar.overhead.duration",
        }
    }
    pub fn prometheus_name(self) -> &'static str {
        match self {
            Instrument::RequestDuration => "gen_ai_server_request_duration_seconds",
            Instrument::TimeToFirstToken => "gen_ai_server_time_to_first_token_seconds",
            Instrument::TimePerOutputToken => "gen_ai_server_time_per_output_token_seconds",
            Instrument::TokenUsage => "gen_ai_client_token_usage",
            Instrument::Overhead => "bulkhead_sidecar_overhead_duration_seconds",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Instrument::TokenUsage => "{token}",
            _ => "s",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Instrument::RequestDuration => {
                "GenAI server request duration (request to the end of the response)"
            }
            Instrument::TimeToFirstToken => "Time to generate the first token (first body bytes)",
            Instrument::TimePerOutputToken => {
                "Time per output token after the first (streamed answers)"
            }
            Instrument::TokenUsage => "Tokens used, by type (input, output, cache_read)",
            Instrument::Overhead => {
                "Time the sidecar spent before forwarding a request, not counting the cache \
                 gate and the fair queue"
            }
        }
    }
    /// The bucket bounds the conventions advise (the overhead: 50 us .. ~0.8 s).
    fn bounds(self) -> &'static [f64] {
        match self {
            Instrument::RequestDuration => &[
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                81.92,
            ],
            Instrument::TimeToFirstToken => &[
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0,
            ],
            Instrument::TimePerOutputToken => &[
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ],
            Instrument::TokenUsage => &[
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                4194304.0, 16777216.0, 67108864.0,
            ],
            Instrument::Overhead => &[
                0.00005, 0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256,
                0.0512, 0.1024, 0.2048, 0.4096, 0.8192,
            ],
        }
    }
}

/// One series' attributes (all bounded: a configured tenant and fixed strings).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Series {
    pub instrument: Instrument,
    pub tenant: Arc<str>,
    pub operation: &'static str,
    /// `gen_ai.token.type` (token usage) or `error.type` (request duration); "" for none.
    pub kind: &'static str,
}

impl Series {
    fn kind_key(&self) -> Option<&'static str> {
        match (self.instrument, self.kind) {
            (_, "") => None,
            (Instrument::TokenUsage, _) => Some("gen_ai.token.type"),
            _ => Some("error.type"),
        }
    }
    fn otlp_attrs(&self) -> Vec<Attr> {
        let mut a = vec![otlp::attr("bulkhead.tenant", self.tenant.to_string())];
        if !self.operation.is_empty() {
            a.push(otlp::attr("gen_ai.operation.name", self.operation));
        }
        if let Some(k) = self.kind_key() {
            a.push(otlp::attr(k, self.kind));
        }
        a
    }
}

impl EncodeLabelSet for Series {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("bulkhead_tenant", &*self.tenant).encode(encoder.encode_label())?;
        if !self.operation.is_empty() {
            ("gen_ai_operation_name", self.operation).encode(encoder.encode_label())?;
        }
        if let Some(k) = self.kind_key() {
            let k = if k == "gen_ai.token.type" {
                "gen_ai_token_type"
            } else {
                "error_type"
            };
            (k, self.kind).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A cumulative histogram with fixed bounds.
#[derive(Debug)]
struct Hist {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Self {
        Hist {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }
    fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> (f64, u64, Vec<u64>) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        (sum, counts.iter().sum(), counts)
    }
}

/// Every GenAI series of the process.
#[derive(Debug, Default)]
pub struct GenAi {
    series: RwLock<HashMap<Series, Arc<Hist>>>,
}

impl GenAi {
    pub fn observe(&self, series: Series, v: f64) {
        if let Some(h) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&series)
        {
            h.observe(v);
            return;
        }
        let h = {
            let mut m = self.series.write().unwrap_or_else(|e| e.into_inner());
            let bounds = series.instrument.bounds();
            m.entry(series)
                .or_insert_with(|| Arc::new(Hist::new(bounds)))
                .clone()
        };
        h.observe(v);
    }

    fn sorted(&self) -> Vec<(Series, Arc<Hist>)> {
        let mut v: Vec<_> = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        v.sort_by(|a, b| {
            (a.0.instrument as u8, &a.0.tenant, a.0.operation, a.0.kind).cmp(&(
                b.0.instrument as u8,
                &b.0.tenant,
                b.0.operation,
                b.0.kind,
            ))
        });
        v
    }

    /// The series as OTLP metrics (cumulative since `start_unix_nano`).
    pub fn otlp(&self, start_unix_nano: u64, now_unix_nano: u64) -> Vec<Metric> {
        let all = self.sorted();
        INSTRUMENTS
            .iter()
            .filter_map(|&inst| {
                let points: Vec<HistogramPoint> = all
                    .iter()
                    .filter(|(s, _)| s.instrument == inst)
                    .map(|(s, h)| {
                        let (sum, count, counts) = h.snapshot();
                        HistogramPoint {
                            attrs: s.otlp_attrs(),
                            start_unix_nano,
                            time_unix_nano: now_unix_nano,
                            count,
                            sum,
                            bounds: inst.bounds().to_vec(),
                            counts,
                        }
                    })
                    .collect();
                (!points.is_empty()).then(|| Metric {
                    name: Cow::Borrowed(inst.otel_name()),
                    description: Cow::Borrowed(inst.help()),
                    unit: Cow::Borrowed(inst.unit()),
                    data: Data::Histogram(points),
                })
            })
            .collect()
    }
}

/// Serves [`GenAi`] on `/metrics` (registered at the registry's root, no `bulkhead_` prefix).
#[derive(Debug)]
pub struct GenAiCollector(pub Arc<GenAi>);

impl Collector for GenAiCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.sorted();
        for inst in INSTRUMENTS {
            let mut it = all.iter().filter(|(s, _)| s.instrument == inst).peekable();
            if it.peek().is_none() {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                inst.prometheus_name(),
                inst.help(),
                None,
                MetricType::Histogram,
            )?;
            for (s, h) in it {
                let (sum, count, counts) = h.snapshot();
                let buckets: Vec<(f64, u64)> = inst
                    .bounds()
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(counts)
                    .collect();
                family
                    .encode_family(s)?
                    .encode_histogram::<Vec<(String, String)>>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_at_or_above_them() {
        let h = Hist::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let (sum, count, counts) = h.snapshot();
        assert_eq!(counts, vec![2, 1, 1]);
        assert_eq!(count, 4);
        assert_eq!(sum, 6.0);
    }

    #[test]
    fn series_are_served_under_prometheus_names_with_the_tenant() {
        let g = Arc::new(GenAi::default());
        g.observe(
            Series {
                instrument: Instrument::TokenUsage,
                tenant: "acme".into(),
                operation: "chat",
                kind: "input",
            },
            12.0,
        );
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(GenAiCollector(g.clone())));
        let text = crate::record::metrics::encode(&reg);
        assert!(
            text.contains(
                "gen_ai_client_token_usage_bucket{le=\"16.0\",bulkhead_tenant=\"acme\",gen_ai_operation_name=\"chat\",gen_ai_token_type=\"input\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE gen_ai_client_token_usage histogram"),
            "{text}"
        );
        let m = g.otlp(1, 2);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].name, "gen_ai.client.token.usage");
    }
}
