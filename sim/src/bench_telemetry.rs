//! `bulkhead-bench --telemetry`: the cost of OpenTelemetry per request. Three sidecars with
//! the plain bench configuration (one worker thread each) in front of one simulator: telemetry
//! off, `[telemetry.otlp]` at its default sampling (0.1), and at 100 % sampling, all exporting
//! to one OTLP/HTTP sink in this process (its own thread: it answers 200 and counts bytes).
//! Interleaved round by round so machine load falls on all alike; per variant: sidecar CPU per
//! request over the throughput runs, latency at one connection; then the spans each exported
//! and dropped, from its own `/metrics`.

use super::proxy::{Body, Kind, load};
use super::{Args, Proc, free_port, pct, proc_stats, spawn_sidecar, spawn_sim, wait_port};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// An OTLP/HTTP sink: every POST answered 200; requests and bytes counted.
fn sink() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (reqs, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r, b) = (reqs.clone(), bytes.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (r, b) = (r.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (r, b) = (r.clone(), b.clone());
                            async move {
                                let body = req.into_body().collect().await?.to_bytes();
                                r.fetch_add(1, Ordering::Relaxed);
                                b.fetch_add(body.len() as u64, Ordering::Relaxed);
                                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
    });
    Ok((addr, reqs, bytes))
}

/// One sample of a sidecar's `/metrics`.
/// The `reason` labels of `bulkhead_telemetry_dropped_spans_total` (sidecar/README.md).
const DROP_REASONS: [&str; 3] = ["queue_full", "export_failed", "export_timeout"];

fn scrape(admin: SocketAddr, series: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return f64::NAN;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn run(args: &Args, bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let sim_port = free_port()?;
    let listen = format!("127.0.0.1:{sim_port}");
    let sim = spawn_sim(
        bin_dir,
        &["--listen", &listen, "--tokens", "16", "--threads", "1"],
    )?;
    wait_port(([127, 0, 0, 1], sim_port).into(), sim.name)?;
    let (sink_addr, sink_reqs, sink_bytes) = sink()?;
    let otlp = |ratio: f64| {
        format!(
            "[telemetry.otlp]\nendpoint = \"http://{sink_addr}\"\nsample_ratio = {ratio:?}\n\
             metrics_interval_ms = 1000\n"
        )
    };
    let variants = [
        ("off", String::new()),
        ("default", otlp(0.1)),
        ("sampled_100", otlp(1.0)),
    ];
    let mut procs: Vec<(&str, SocketAddr, SocketAddr, Proc)> = Vec::new();
    for (name, telemetry) in &variants {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)?;
        let (port, admin) = (free_port()?, free_port()?);
        let cfg = super::write_sidecar_config(&sub, port, admin, sim_port)?;
        let text = std::fs::read_to_string(&cfg)?;
        std::fs::write(
            &cfg,
            format!("{text}\n[runtime]\nworker_threads = 1\n{telemetry}"),
        )?;
        let p = spawn_sidecar(bin_dir, &cfg)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_port(addr, p.name)?;
        procs.push((name, addr, ([127, 0, 0, 1], admin).into(), p));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let duration = Duration::from_secs_f64(args.duration);
    println!(
        "bulkhead-bench --telemetry: {} rounds, each sidecar (1 worker thread) {} s at {} \
         connections and {} s at 1 connection per round, interleaved; telemetry off, on at the \
         default sampling (0.1) and on at 100 %, exporting to a local OTLP sink",
        args.limits_rounds, args.duration, args.connections, args.duration
    );
    struct Acc {
        ok: u64,
        errors: u64,
        cpu: f64,
        rounds_cpu_us: Vec<f64>,
        lat1: Vec<Duration>,
    }
    let mut acc: Vec<Acc> = variants
        .iter()
        .map(|_| Acc {
            ok: 0,
            errors: 0,
            cpu: 0.0,
            rounds_cpu_us: Vec::new(),
            lat1: Vec::new(),
        })
        .collect();
    let plain = Body::chat(0, false);
    rt.block_on(async {
        for (_, addr, _, _) in &procs {
            load(
                Kind::Sidecar,
                *addr,
                &plain,
                4,
                Duration::from_millis(500),
                2000,
            )
            .await?;
        }
        for round in 0..args.limits_rounds {
            // Rotate the order so no variant always runs first.
            let n = procs.len();
            for j in 0..n {
                let i = (j + round) % n;
                let (name, addr, _, p) = &procs[i];
                let c0 = proc_stats(p.child.id()).0;
                let r = load(
                    Kind::Sidecar,
                    *addr,
                    &plain,
                    args.connections,
                    duration,
                    args.max_requests,
                )
                .await?;
                let c1 = proc_stats(p.child.id()).0;
                let r1 = load(Kind::Sidecar, *addr, &plain, 1, duration, args.max_requests).await?;
                let a = &mut acc[i];
                a.ok += r.ok;
                a.errors += r.errors + r1.errors;
                a.cpu += c1 - c0;
                let us = (c1 - c0) / r.ok.max(1) as f64 * 1e6;
                a.rounds_cpu_us.push(us);
                a.lat1.extend(r1.latencies);
                eprintln!(
                    "round {round}: {name:>11} {:.0} req/s, CPU {us:.1} us/req",
                    r.ok as f64 / r.elapsed.as_secs_f64()
                );
            }
        }
        // Let the last batches go out (export interval 1 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        anyhow::Ok(())
    })?;
    let mut report = serde_json::Map::new();
    let base_cpu = acc[0].cpu / acc[0].ok.max(1) as f64 * 1e6;
    acc[0].lat1.sort();
    let (base50, base99) = (pct(&acc[0].lat1, 0.5), pct(&acc[0].lat1, 0.99));
    for (i, (name, _, admin, _)) in procs.iter().enumerate() {
        let a = &mut acc[i];
        a.lat1.sort();
        let cpu = a.cpu / a.ok.max(1) as f64 * 1e6;
        let (p50, p99) = (pct(&a.lat1, 0.5), pct(&a.lat1, 0.99));
        let exported = scrape(*admin, "bulkhead_telemetry_exported_spans_total");
        let dropped: f64 = DROP_REASONS
            .iter()
            .map(|r| {
                scrape(
                    *admin,
                    &format!("bulkhead_telemetry_dropped_spans_total{{reason=\"{r}\"}}"),
                )
            })
            .filter(|v| v.is_finite())
            .sum();
        println!(
            "{name:>11}: CPU {cpu:.1} us/request ({:+.1} us, {:.3}x off; per round {:?}), \
             {} errors; 1 conn p50 {p50:?} p99 {p99:?} (vs off: p50 {:+.0} us, p99 {:+.0} us); \
             spans exported {exported}, dropped {dropped}",
            cpu - base_cpu,
            cpu / base_cpu,
            a.rounds_cpu_us
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            a.errors,
            (p50.as_secs_f64() - base50.as_secs_f64()) * 1e6,
            (p99.as_secs_f64() - base99.as_secs_f64()) * 1e6,
        );
        report.insert(format!("{name}_cpu_us_per_request"), cpu.into());
        report.insert(format!("{name}_cpu_vs_off"), (cpu / base_cpu).into());
        report.insert(
            format!("{name}_cpu_us_per_round"),
            serde_json::json!(a.rounds_cpu_us),
        );
        report.insert(format!("{name}_p50_us"), (p50.as_secs_f64() * 1e6).into());
        report.insert(format!("{name}_p99_us"), (p99.as_secs_f64() * 1e6).into());
        report.insert(format!("{name}_errors"), a.errors.into());
        report.insert(format!("{name}_spans_exported"), exported.into());
        report.insert(format!("{name}_spans_dropped"), dropped.into());
    }
    println!(
        "OTLP sink: {} export requests, {:.1} KiB",
        sink_reqs.load(Ordering::Relaxed),
        sink_bytes.load(Ordering::Relaxed) as f64 / 1024.0
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    drop(procs);
    drop(sim);
    Ok(())
}
