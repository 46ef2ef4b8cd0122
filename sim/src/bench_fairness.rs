//! `bulkhead-bench --fairness`: the fair queue by request counting vs by tokens (VTC), on a
//! skewed workload: `big` sends 32 KiB prompts, `small` 256-byte prompts, both always
//! backlogged, and `victim` sends one small request at a time. Reports Jain's fairness index
//! of the weighted tokens served to big and small, the victim's TTFT against its idle TTFT,
//! and the throughput of each queue on the plain benchmark request. Trials are interleaved
//! (requests, tokens, requests, tokens, ...) and medians reported.

use super::proxy::{Body, Kind, load};
use super::{
    Args, free_port, pct, scrape, spawn_sidecar, spawn_sim, tier_request, wait_port,
    write_config_file, write_sidecar_config,
};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MODES: [&str; 2] = ["requests", "tokens"];
const TRIALS: usize = 3;
const MAX_INFLIGHT: usize = 4;

fn write_config(
    dir: &Path,
    port: u16,
    admin: u16,
    sim: u16,
    mode: &str,
) -> anyhow::Result<PathBuf> {
    let body = format!(
        r#"[queue]
max_inflight = {MAX_INFLIGHT}
max_queue_per_tenant = 1024
timeout_ms = 60000
fairness = "{mode}"
[http]
max_body_bytes = 1048576
[audit]
dir = "{audit}"
[tenants.big]
[tenants.small]
[tenants.victim]"#,
        audit = dir.join(format!("audit-{mode}")).display(),
    );
    write_config_file(dir, &format!("fair-{mode}.toml"), (port, admin, sim), &body)
}

/// A streamed chat request whose prompt has `bytes` bytes of 4-byte words, unique by `n`.
fn body(bytes: usize, n: u64) -> String {
    let mut content = format!("q{n:09} ");
    while content.len() + 4 <= bytes {
        content.push_str("abc ");
    }
    serde_json::json!({
        "model": "bulkhead-sim", "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": content}]
    })
    .to_string()
}

/// Send one streamed request; its time to the first content bytes.
async fn one(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: SocketAddr,
    tenant: &str,
    body: String,
) -> anyhow::Result<Option<Duration>> {
    let t0 = Instant::now();
    let resp = sender
        .send_request(tier_request(addr, tenant, body))
        .await?;
    let ok = resp.status().is_success();
    let mut b = resp.into_body();
    let mut first = None;
    while let Some(f) = b.frame().await {
        if f?.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(t0.elapsed());
        }
    }
    Ok(if ok { first } else { None })
}

async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// `conns` connections of `tenant` sending `bytes`-byte prompts back to back until `stop`.
fn flood(
    addr: SocketAddr,
    tenant: &'static str,
    conns: usize,
    bytes: usize,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    (0..conns)
        .map(|_| {
            let (stop, seq) = (stop.clone(), seq.clone());
            tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                while !stop.load(Ordering::Relaxed) {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    one(&mut sender, addr, tenant, body(bytes, n)).await?;
                }
                Ok(())
            })
        })
        .collect()
}

/// Weighted tokens (prompt x 1 + completion x 2, the default costs) the sidecar counted.
fn served(admin: SocketAddr, tenant: &str) -> f64 {
    let get = |kind: &str| {
        scrape(
            admin,
            &format!("bulkhead_tokens_total{{tenant=\"{tenant}\",kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    get("prompt") + 2.0 * get("completion")
}

struct Trial {
    jain: f64,
    big_share: f64,
    idle_p50: Duration,
    victim_p50: Duration,
    victim_p99: Duration,
}

async fn skewed(addr: SocketAddr, admin: SocketAddr, duration: Duration) -> anyhow::Result<Trial> {
    let seq = Arc::new(AtomicU64::new(0));
    let mut victim = connect(addr).await?;
    let mut idle = Vec::new();
    for _ in 0..30 {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        idle.extend(one(&mut victim, addr, "victim", body(256, n)).await?);
    }
    idle.sort();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = flood(addr, "big", 8, 32 * 1024, stop.clone(), seq.clone());
    tasks.extend(flood(addr, "small", 16, 256, stop.clone(), seq.clone()));
    // Let both queues fill before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b0, s0) = (served(admin, "big"), served(admin, "small"));
    let end = Instant::now() + duration;
    let mut during = Vec::new();
    while Instant::now() < end {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        during.extend(one(&mut victim, addr, "victim", body(256, n)).await?);
    }
    let (b, s) = (served(admin, "big") - b0, served(admin, "small") - s0);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    during.sort();
    let jain = (b + s).powi(2) / (2.0 * (b * b + s * s)).max(f64::MIN_POSITIVE);
    Ok(Trial {
        jain,
        big_share: b / (b + s).max(1.0),
        idle_p50: pct(&idle, 0.5),
        victim_p50: pct(&during, 0.5),
        victim_p99: pct(&during, 0.99),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: &Args, bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let sim_port = free_port()?;
    let sim = spawn_sim(
        bin_dir,
        &[
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--tokens",
            "16",
            "--ttft-ms",
            "5",
            "--threads",
            "1",
            "--prefix-block-words",
            "16",
            "--prefill-ms-per-block",
            "0.01",
        ],
    )?;
    wait_port(([127, 0, 0, 1], sim_port).into(), sim.name)?;
    // The queue's own cost is measured against an instant simulator, so the sidecar's CPU (not
    // the 5 ms time to first token) bounds the throughput.
    let fast_port = free_port()?;
    let fast = spawn_sim(
        bin_dir,
        &[
            "--listen",
            &format!("127.0.0.1:{fast_port}"),
            "--tokens",
            "16",
            "--threads",
            "1",
        ],
    )?;
    wait_port(([127, 0, 0, 1], fast_port).into(), fast.name)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let duration = Duration::from_secs_f64(args.duration);
    println!(
        "bulkhead-bench --fairness: {TRIALS} interleaved trials per queue of {} s; max_inflight \
         {MAX_INFLIGHT}; big: 8 connections of 32 KiB prompts, small: 16 connections of 256-byte \
         prompts, victim: 1 connection of 256-byte prompts, one at a time; sim 5 ms to first \
         token + 10 us per uncached 16-word block, 16 tokens",
        args.duration
    );
    let mut trials: std::collections::HashMap<&str, Vec<Trial>> = Default::default();
    let mut rps: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    for trial in 0..TRIALS {
        for mode in MODES {
            let (port, admin) = (free_port()?, free_port()?);
            let cfg = write_config(dir, port, admin, sim_port, mode)?;
            let sc = spawn_sidecar(bin_dir, &cfg)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            wait_port(addr, sc.name)?;
            let t = rt.block_on(skewed(addr, ([127, 0, 0, 1], admin).into(), duration))?;
            println!(
                "trial {trial} {mode:>8}: Jain {:.3}, big's share of tokens {:.1} %, victim TTFT \
                 p50 {:.2?} (idle {:.2?}) p99 {:.2?}",
                t.jain,
                t.big_share * 100.0,
                t.victim_p50,
                t.idle_p50,
                t.victim_p99
            );
            trials.entry(mode).or_default().push(t);
            drop(sc);

            // The queue's own cost: the plain benchmark request at 32 connections.
            let (port, admin) = (free_port()?, free_port()?);
            let cfg = write_sidecar_config(dir, port, admin, fast_port)?;
            let text = std::fs::read_to_string(&cfg)?.replace(
                "timeout_ms = 30000\n",
                &format!("timeout_ms = 30000\nfairness = \"{mode}\"\n"),
            );
            std::fs::write(&cfg, text)?;
            let sc = spawn_sidecar(bin_dir, &cfg)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            wait_port(addr, sc.name)?;
            let plain = Body::chat(0, false);
            let r = rt.block_on(async {
                load(
                    Kind::Sidecar,
                    addr,
                    &plain,
                    4,
                    Duration::from_millis(300),
                    1000,
                )
                .await?;
                load(Kind::Sidecar, addr, &plain, 32, duration, args.max_requests).await
            })?;
            let rate = r.rps;
            println!(
                "trial {trial} {mode:>8}: {rate:.0} req/s at 32 connections ({} errors)",
                r.errors
            );
            rps.entry(mode).or_default().push(rate);
            drop(sc);
        }
    }
    let mut report = serde_json::Map::new();
    println!("medians of {TRIALS}:");
    for mode in MODES {
        let t = &trials[mode];
        let jain = median(t.iter().map(|t| t.jain).collect());
        let share = median(t.iter().map(|t| t.big_share).collect());
        let idle = median(t.iter().map(|t| t.idle_p50.as_secs_f64()).collect());
        let p50 = median(t.iter().map(|t| t.victim_p50.as_secs_f64()).collect());
        let p99 = median(t.iter().map(|t| t.victim_p99.as_secs_f64()).collect());
        let r = median(rps[mode].clone());
        println!(
            "{mode:>8}: Jain {jain:.3}, big's share {:.1} %, victim TTFT p50 {:.2}x idle, p99 \
             {:.2}x idle p50 (idle p50 {:.2} ms), {r:.0} req/s",
            share * 100.0,
            p50 / idle,
            p99 / idle,
            idle * 1e3
        );
        report.insert(format!("{mode}_jain"), jain.into());
        report.insert(format!("{mode}_big_share"), share.into());
        report.insert(format!("{mode}_victim_ttft_p50_ratio"), (p50 / idle).into());
        report.insert(format!("{mode}_victim_ttft_p99_ratio"), (p99 / idle).into());
        report.insert(format!("{mode}_rps"), r.into());
    }
    let ratio = median(rps["tokens"].clone()) / median(rps["requests"].clone());
    println!(
        "tokens / requests throughput: {ratio:.3}x (goal >= 0.97x); Jain with tokens: goal >= 0.95"
    );
    report.insert("tokens_vs_requests_rps".into(), ratio.into());
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    drop(fast);
    drop(sim);
    Ok(())
}
