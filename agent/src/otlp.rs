//! `[telemetry.otlp]`: the agent's metrics over OTLP/HTTP, for clusters without Prometheus.
//! Every `interval_ms` the registry is encoded exactly as `/metrics` serves it, read back
//! ([`from_text`]: counters become monotonic cumulative sums named as their samples, gauges
//! gauges, labels attributes) and sent to `<endpoint>/v1/metrics`. One export at a time, each
//! bounded by `timeout_ms`; a failure is counted and logged once until exports work again.

use crate::admin::AdminState;
use crate::config::OtlpConfig;
use agent_common::otlp::{self, Attr, Data, Metric, Number, NumberPoint, Source};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Read a Prometheus/OpenMetrics text exposition (counters and gauges) into OTLP metrics.
pub fn from_text(text: &str, start_unix_nano: u64, now_unix_nano: u64) -> Vec<Metric> {
    let mut out: Vec<Metric> = Vec::new();
    let mut family: Option<(String, String, bool)> = None;
    let mut help = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map_or("", |(_, h)| h).to_string();
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            family = Some((name.to_string(), kind.to_string(), false));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((name, kind, _)) = &mut family else {
            continue;
        };
        let Some((series, labels, value)) = sample(line) else {
            continue;
        };
        let monotonic = kind == "counter";
        if monotonic && series != format!("{name}_total") {
            // `_created` and anything else that is not the count itself.
            continue;
        }
        if !monotonic && (kind != "gauge" || series != *name) {
            continue;
        }
        let point = NumberPoint {
            attrs: labels,
            start_unix_nano,
            time_unix_nano: now_unix_nano,
            value: Number::Double(value),
        };
        match out.last_mut() {
            Some(m) if m.name == series => match &mut m.data {
                Data::Sum { points, .. } | Data::Gauge(points) => points.push(point),
                Data::Histogram(_) => {}
            },
            _ => out.push(Metric {
                name: Cow::Owned(series),
                description: Cow::Owned(help.clone()),
                unit: Cow::Borrowed(""),
                data: if monotonic {
                    Data::Sum {
                        points: vec![point],
                        monotonic: true,
                    }
                } else {
                    Data::Gauge(vec![point])
                },
            }),
        }
    }
    out
}

/// `name{k="v",...} value` (label values with `\"`, `\\` and `\n` escapes).
fn sample(line: &str) -> Option<(String, Vec<Attr>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head.to_string(), Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut attrs = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        attrs.push(Attr {
            key: Cow::Owned(key.trim_start_matches(',').to_string()),
            value: otlp::Value::Str(Cow::Owned(v)),
        });
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name.to_string(), attrs, value))
}

/// Export until `stop` resolves.
pub async fn run(
    config: OtlpConfig,
    state: Arc<AdminState>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(config.timeout_ms)));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let uri: http::Uri =
        match format!("{}/v1/metrics", config.endpoint.trim_end_matches('/')).parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "telemetry.otlp.endpoint: not a URL; no OTLP export");
                return;
            }
        };
    let src = Source {
        resource: vec![
            otlp::attr("service.name", config.service_name.clone()),
            otlp::attr("service.version", env!("CARGO_PKG_VERSION")),
        ],
        scope_name: "bulkhead-agent",
        scope_version: env!("CARGO_PKG_VERSION"),
        schema_url: "",
    };
    state.metrics.otlp_exports_init();
    let start = unix_nanos();
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
            continue;
        }
        let body = otlp::encode_metrics(&src, &from_text(&text, start, unix_nanos()));
        let req = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let result = match tokio::time::timeout(timeout, client.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => "ok",
            Ok(Ok(_)) | Ok(Err(_)) => "failed",
            Err(_) => "timeout",
        };
        state.metrics.otlp_export(result);
        match (result, failing) {
            ("ok", true) => {
                tracing::info!("OTLP metric export works again");
                failing = false;
            }
            ("ok", false) => {}
            (r, false) => {
                tracing::warn!(result = r, endpoint = %uri, "OTLP metric export did not succeed; retrying every interval");
                failing = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_are_read_with_their_labels() {
        let text = "# HELP bulkhead_network_bytes Bytes.\n# TYPE bulkhead_network_bytes counter\n\
                    bulkhead_network_bytes_total{tenant=\"a\\\"b\",direction=\"ingress\"} 12\n\
                    bulkhead_network_bytes_total{tenant=\"c\",direction=\"egress\"} 3.5\n\
                    bulkhead_network_bytes_created{tenant=\"c\"} 1.0\n\
                    # HELP bulkhead_agent_up Up.\n# TYPE bulkhead_agent_up gauge\nbulkhead_agent_up 1\n# EOF\n";
        let m = from_text(text, 1, 2);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "bulkhead_network_bytes_total");
        assert_eq!(m[0].description, "Bytes.");
        let Data::Sum { points, monotonic } = &m[0].data else {
            panic!("{:?}", m[0].data)
        };
        assert!(monotonic);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].value, Number::Double(12.0));
        assert_eq!(
            points[0].attrs,
            vec![
                otlp::attr("tenant", "a\"b"),
                otlp::attr("direction", "ingress")
            ]
        );
        assert_eq!(points[1].value, Number::Double(3.5));
        assert_eq!(m[1].name, "bulkhead_agent_up");
        assert!(matches!(&m[1].data, Data::Gauge(p) if p.len() == 1 && p[0].attrs.is_empty()));
    }
}
