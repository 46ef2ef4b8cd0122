//! `[telemetry.otlp]`: the real agent sends its metrics to an OTLP/HTTP receiver in this test,
//! which decodes them with the OpenTelemetry project's generated protobuf messages
//! (`opentelemetry-proto`), not with the project's encoder: every series of `/metrics` arrives,
//! per tenant, with its value. Needs root (or the BPF capabilities); under a truthy CI it fails
//! without them, otherwise it is skipped.

use bulkhead_tests::harness::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
use prost::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

/// The requests a receiver got: (path, body).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 receiver: every request's path and body kept, answered 200.
fn receiver() -> (std::net::SocketAddr, Received) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got: Received = Arc::default();
    let store = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let store = store.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    store.lock().unwrap().push((path, body));
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

fn value(p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN,
    }
}

fn attr<'a>(
    p: &'a opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
    key: &str,
) -> Option<&'a str> {
    p.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|v| match v {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

#[test]
fn the_agents_metrics_go_over_otlp_per_tenant() {
    if !require_bpf(AGENT) {
        return;
    }
    let (addr, got) = receiver();
    let paths = Paths::new();
    let agent = Agent::start(
        AGENT,
        &paths,
        &paths.config(&format!(
            "[telemetry.otlp]\nendpoint = \"http://{addr}\"\ninterval_ms = 1000\ntimeout_ms = 500\n"
        )),
    );
    // Traffic of a tagged socket, so a tenant's counters move.
    let (mut a, mut b) = tcp_pair();
    agent.client().tag(a.as_fd(), "alpha").unwrap();
    transfer(&mut a, &mut b, 10_000);
    let want = agent.wait_for("alpha's egress bytes", |m| {
        m.bytes("alpha", "egress") >= 10_000
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let (up, alpha_egress, names) = loop {
        let bodies: Vec<Vec<u8>> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == "/v1/metrics")
            .map(|(_, b)| b.clone())
            .collect();
        // The latest export that saw alpha's bytes.
        let found = bodies.iter().rev().find_map(|b| {
            let req = ExportMetricsServiceRequest::decode(b.as_slice()).expect("valid OTLP");
            let metrics: Vec<_> = req
                .resource_metrics
                .into_iter()
                .flat_map(|r| r.scope_metrics)
                .flat_map(|s| s.metrics)
                .collect();
            let up = metrics
                .iter()
                .find(|m| m.name == "bulkhead_agent_up")
                .and_then(|m| match &m.data {
                    Some(Data::Gauge(g)) => g.data_points.first().map(value),
                    _ => None,
                })?;
            let bytes = metrics
                .iter()
                .find(|m| m.name == "bulkhead_network_bytes_total")?;
            let Some(Data::Sum(s)) = &bytes.data else {
                panic!("bytes are not a sum: {:?}", bytes.data)
            };
            assert!(s.is_monotonic);
            assert_eq!(s.aggregation_temporality, 2, "cumulative");
            let egress = s
                .data_points
                .iter()
                .find(|p| {
                    attr(p, "tenant") == Some("alpha") && attr(p, "direction") == Some("egress")
                })
                .map(value)
                .filter(|v| *v >= 10_000.0)?;
            Some((
                up,
                egress,
                metrics.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            ))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no OTLP export with alpha's bytes"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(up, 1.0);
    // The exported count is the kernel's, as /metrics showed it (or later: it only grows).
    assert!(alpha_egress >= want.bytes("alpha", "egress") as f64 - 1.0);
    for series in [
        "bulkhead_network_packets_total",
        "bulkhead_tag_requests_total",
        "bulkhead_map_entries",
        "bulkhead_telemetry_metric_exports_total",
    ] {
        assert!(
            names.iter().any(|n| n == series),
            "{series} not exported: {names:?}"
        );
    }
    let m = agent.metrics();
    assert!(
        m.get(
            "bulkhead_telemetry_metric_exports_total",
            &[("result", "ok")]
        ) >= 1.0
    );
    agent.stop();
}
