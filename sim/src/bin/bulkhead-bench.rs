//! bulkhead-bench: one benchmark run on this machine, against bulkhead-sim: direct, through
//! nginx (plain proxy baseline, when installed) and through bulkhead-sidecar with every feature
//! on (signatures, limits, fair queue, metrics, audit log, tagging configured).
//!
//! `cargo xtask bench sidecar` builds release binaries and runs
//! `target/release/bulkhead-bench --bin-dir target/release`.
//! `--limits redis` compares the limits backends instead (local, Redis strict, Redis leased),
//! `--cache-tiers` the prefix-cache isolation tiers, `--telemetry` the cost of OpenTelemetry
//! (off, default sampling, 100 %).
//! Load is generated here, in Rust, only to 127.0.0.1.
#![forbid(unsafe_code)]

#[path = "../bench_fairness.rs"]
mod fairness;
#[path = "../bench_proxy.rs"]
mod proxy;
use proxy::{Body, Kind, load, request};
#[path = "../bench_telemetry.rs"]
mod telemetry;

use anyhow::{Context, bail};
use base64::Engine;
use bulkhead_client::{SignOptions, TENANT_HEADER, sign_request};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Clone)]
#[command(about = "Benchmark bulkhead-sidecar against bulkhead-sim, direct and through nginx")]
struct Args {
    /// Where bulkhead-sim and bulkhead-sidecar are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds per throughput and latency run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Connections for the throughput run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Upper bound on requests per run.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Streaming requests per target for the TTFT / inter-token runs.
    #[arg(long, default_value_t = 100)]
    stream_requests: usize,
    /// Skip nginx even when installed.
    #[arg(long)]
    no_nginx: bool,
    /// Trials per target (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Do not pin the load generator and the simulator to CPU 0 and the proxy to CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// Peer gateways to measure too: `litellm` (found on PATH or installed into
    /// target/litellm-venv with pip).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Another `bulkhead-sidecar` binary (an earlier build) to measure beside this one, with
    /// the same configuration, interleaved in the same trials: its figures and this build's
    /// over its are reported.
    #[arg(long)]
    baseline_sidecar: Option<PathBuf>,
    /// Instead: compare the prefix-cache isolation tiers (shared, salted, exclusive) with
    /// three tenants interleaving against the simulator's prefix cache.
    #[arg(long)]
    cache_tiers: bool,
    /// Connections per tenant in --cache-tiers.
    #[arg(long, default_value_t = 4)]
    tier_connections: usize,
    /// Instead: the fair queue by requests vs by tokens on a skewed two-tenant workload
    /// (Jain's index of served tokens, a light tenant's TTFT, the queue's throughput).
    #[arg(long)]
    fairness: bool,
    /// Instead: compare the limits backends. `redis` starts a redis-server (no persistence) and
    /// runs the sidecar with `local`, `redis` strict and `redis` leased limits, interleaved.
    #[arg(long)]
    limits: Option<String>,
    /// Rounds of the interleaved --limits or --telemetry comparison (each runs every variant
    /// once).
    #[arg(long, default_value_t = 3)]
    limits_rounds: usize,
    /// Instead: the cost of `[telemetry.otlp]` per request: the sidecar with telemetry off, at
    /// the default sampling and at 100 %, interleaved, exporting to a local OTLP sink.
    #[arg(long)]
    telemetry: bool,
    /// Instead: a demo of N sidecar replicas of one model, first with local limits, then
    /// sharing them through a redis-server; prints each tenant's admitted totals.
    #[arg(long)]
    replicas_demo: Option<usize>,
}

const KEY: &[u8] = b"bench-gateway-secret-0123456789ab";

struct Proc {
    name: &'static str,
    child: Child,
    /// How to stop it gracefully (nginx: its master must stop its workers).
    stop: Option<Command>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only the processes this run started.
        if let Some(cmd) = self.stop.as_mut() {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `bulkhead-sim` from `bin_dir` with `args`.
fn spawn_sim(bin_dir: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let bin = bin_dir.join("bulkhead-sim");
    Ok(Proc {
        name: "bulkhead-sim",
        child: Command::new(&bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
        stop: None,
    })
}

/// Start `bulkhead-sidecar` from `bin_dir` on the configuration file `cfg`.
fn spawn_sidecar(bin_dir: &Path, cfg: &Path) -> anyhow::Result<Proc> {
    spawn_sidecar_bin(&bin_dir.join("bulkhead-sidecar"), cfg)
}

fn spawn_sidecar_bin(bin: &Path, cfg: &Path) -> anyhow::Result<Proc> {
    let bin = bin.to_path_buf();
    Ok(Proc {
        name: "bulkhead-sidecar",
        child: Command::new(&bin)
            .args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
        stop: None,
    })
}

/// A plain `bulkhead-sim` (16 tokens, one thread) and a `redis-server` without persistence
/// (files in `dir`), each with its port, both listening.
fn sim_and_redis(bin_dir: &Path, dir: &Path) -> anyhow::Result<((Proc, u16), (Proc, u16))> {
    let sim_port = free_port()?;
    let listen = format!("127.0.0.1:{sim_port}");
    let sim = spawn_sim(
        bin_dir,
        &["--listen", &listen, "--tokens", "16", "--threads", "1"],
    )?;
    wait_port(([127, 0, 0, 1], sim_port).into(), sim.name)?;
    let redis_port = free_port()?;
    let redis_bin =
        which("redis-server").context("redis-server not found (cargo xtask setup installs it)")?;
    let redis = Proc {
        name: "redis-server",
        child: Command::new(redis_bin)
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?,
        stop: None,
    };
    wait_port(([127, 0, 0, 1], redis_port).into(), redis.name)?;
    Ok(((sim, sim_port), (redis, redis_port)))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// (user + system CPU seconds, peak RSS in KiB) of a process and its children.
fn proc_stats(pid: u32) -> (f64, u64) {
    let mut pids = vec![pid];
    if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    let mut cpu = 0.0;
    let mut rss = 0;
    for p in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the parenthesised command name.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
                    + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                cpu += ticks / 100.0;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status"))
            && let Some(l) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            rss += l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (cpu, rss)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Write a sidecar configuration to `dir/file`: the common head (upstream `sim`, listeners,
/// auth, the gateway key, written next to it) around `body` (queue, tenants, anything else).
fn write_config_file(
    dir: &Path,
    file: &str,
    (port, admin, sim): (u16, u16, u16),
    body: &str,
) -> anyhow::Result<PathBuf> {
    let key = dir.join("gw.key");
    std::fs::write(&key, base64::engine::general_purpose::STANDARD.encode(KEY))?;
    let cfg = format!(
        r#"
[upstream]
url = "http://127.0.0.1:{sim}"
pool_max_idle_per_tenant = 64
[listen]
addr = "127.0.0.1:{port}"
admin_addr = "127.0.0.1:{admin}"
[auth]
max_skew_secs = 60
replay_cache_capacity = 2000000
{body}
[[keys]]
id = "gw"
secret_files = ["{key}"]
tenants = ["*"]
"#,
        key = key.display(),
    );
    let p = dir.join(file);
    std::fs::write(&p, cfg)?;
    Ok(p)
}

/// The plain benchmark tenants: `bench` with limits it never reaches, and `other`.
const BENCH_QUEUE_AND_TENANTS: &str = "[queue]
max_inflight = 256
max_queue_per_tenant = 1024
timeout_ms = 30000
{extra}
[tenants.bench]
weight = 2
requests_per_minute = 100000000
tokens_per_minute = 100000000000
{concurrent}
[tenants.other]
weight = 1
";

fn write_sidecar_config(dir: &Path, port: u16, admin: u16, sim: u16) -> anyhow::Result<PathBuf> {
    let extra = format!(
        "[audit]\ndir = \"{}\"\n[agent]\nsocket = \"{}/no-agent.sock\"",
        dir.join("audit").display(),
        dir.display()
    );
    write_config_file(
        dir,
        "sidecar.toml",
        (port, admin, sim),
        &BENCH_QUEUE_AND_TENANTS
            .replace("{extra}", &extra)
            .replace("{concurrent}", "max_concurrent = 1000"),
    )
}

fn write_nginx_config(dir: &Path, port: u16, sim: u16) -> anyhow::Result<PathBuf> {
    let cfg = format!(
        r#"
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    # Request bodies up to 8 MiB, kept in memory (as the sidecar does), streamed upstream.
    client_max_body_size 8m;
    client_body_buffer_size 1m;
    proxy_request_buffering off;
    upstream sim {{ server 127.0.0.1:{sim}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    let p = dir.join("nginx.conf");
    std::fs::write(&p, cfg)?;
    Ok(p)
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

const TIER_TENANTS: [&str; 3] = ["t1", "t2", "t3"];
const SALT_KEY: &[u8] = b"bench-salt-key-0123456789abcdef!";

fn write_tier_config(
    dir: &Path,
    port: u16,
    admin: u16,
    sim: u16,
    tier: &str,
) -> anyhow::Result<PathBuf> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = dir.join("gw.key");
    std::fs::write(&key, b64.encode(KEY))?;
    let salt = dir.join("salt.key");
    std::fs::write(&salt, b64.encode(SALT_KEY))?;
    let tenants: String = TIER_TENANTS
        .iter()
        .map(|t| format!("[tenants.{t}]\nisolation = \"{tier}\"\n"))
        .collect();
    let cfg = format!(
        r#"
[upstream]
url = "http://127.0.0.1:{sim}"
flavor = "vllm"
pool_max_idle_per_tenant = 64
[listen]
addr = "127.0.0.1:{port}"
admin_addr = "127.0.0.1:{admin}"
[auth]
max_skew_secs = 60
replay_cache_capacity = 2000000
[queue]
max_inflight = 256
max_queue_per_tenant = 1024
timeout_ms = 60000
[cache]
salt_key_file = "{salt}"
exclusive_window_ms = 200
exclusive_window_max_requests = 32
{tenants}
[[keys]]
id = "gw"
secret_files = ["{key}"]
tenants = ["*"]
"#,
        salt = salt.display(),
        key = key.display(),
    );
    let p = dir.join(format!("sidecar-{tier}.toml"));
    std::fs::write(&p, cfg)?;
    Ok(p)
}

/// A request prompt: a system prefix common to every tenant (4 blocks of 16 words), the
/// tenant's own context (2 blocks), and a question unique to the request (1 block).
fn tier_body(tenant: &str, n: u64) -> String {
    let common: Vec<String> = (0..64).map(|i| format!("sys{i}")).collect();
    let own: Vec<String> = (0..32).map(|i| format!("{tenant}ctx{i}")).collect();
    let q: Vec<String> = (0..16).map(|i| format!("q{n}w{i}")).collect();
    let content = format!("{} {} {}", common.join(" "), own.join(" "), q.join(" "));
    serde_json::json!({
        "model": "bulkhead-sim", "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": content}]
    })
    .to_string()
}

fn tier_request(addr: SocketAddr, tenant: &str, body: String) -> Request<Full<Bytes>> {
    let path = "/v1/chat/completions";
    let mut h = http::HeaderMap::new();
    h.insert(
        "host",
        HeaderValue::from_str(&addr.to_string()).expect("addr"),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        TENANT_HEADER,
        HeaderValue::from_str(tenant).expect("tenant"),
    );
    let uri: http::Uri = path.parse().expect("static path");
    sign_request(
        &Method::POST,
        &uri,
        &mut h,
        body.as_bytes(),
        KEY,
        &SignOptions::new("gw", now()),
    )
    .expect("signing");
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.headers_mut() = h;
    req
}

#[derive(Default)]
struct TierResult {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    ttft: Vec<Duration>,
    blocks_cached: u64,
    blocks: u64,
}

/// `conns` connections per tenant, round-robin interleaved, streaming, for `duration`.
async fn tier_load(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<TierResult> {
    let start = Instant::now();
    let end = start + duration;
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        for tenant in TIER_TENANTS {
            let seq = seq.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = TierResult::default();
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                while Instant::now() < end {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let req = tier_request(addr, tenant, tier_body(tenant, n));
                    let t0 = Instant::now();
                    let resp = sender.send_request(req).await?;
                    if !resp.status().is_success() {
                        r.errors += 1;
                        resp.into_body().collect().await?;
                        continue;
                    }
                    let cached = resp
                        .headers()
                        .get("x-sim-cached-blocks")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    let mut body = resp.into_body();
                    let mut first = None;
                    while let Some(f) = body.frame().await {
                        if f?.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                            first = Some(t0.elapsed());
                        }
                    }
                    r.ok += 1;
                    r.blocks_cached += cached;
                    r.blocks += 7;
                    r.ttft.extend(first);
                }
                anyhow::Ok(r)
            }));
        }
    }
    let mut total = TierResult::default();
    for t in tasks {
        let r = t.await??;
        total.ok += r.ok;
        total.errors += r.errors;
        total.blocks += r.blocks;
        total.blocks_cached += r.blocks_cached;
        total.ttft.extend(r.ttft);
    }
    total.elapsed = start.elapsed();
    total.ttft.sort();
    Ok(total)
}

/// Scrape one sample from the sidecar's /metrics.
fn scrape(admin: SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn reset_sim_cache(sim: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(sim)?;
    write!(
        s,
        "POST /reset_prefix_cache HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if !text.contains("\"success\":true") {
        bail!("the simulator did not reset its cache: {text}");
    }
    Ok(())
}

fn cache_tiers(args: &Args, bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let sim_port = free_port()?;
    let sim = spawn_sim(
        bin_dir,
        &[
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--tokens",
            "16",
            "--itl-ms",
            "2",
            "--threads",
            "1",
            "--prefix-block-words",
            "16",
            "--prefill-ms-per-block",
            "10",
            "--cached-prefill-ms-per-block",
            "0.5",
        ],
    )?;
    let sim_addr: SocketAddr = ([127, 0, 0, 1], sim_port).into();
    wait_port(sim_addr, sim.name)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let duration = Duration::from_secs_f64(args.duration);
    println!(
        "bulkhead-bench --cache-tiers: {} s per tier, 3 tenants x {} connections, streaming, \
         prompts of 7 blocks (4 common to all tenants, 2 per tenant, 1 unique); sim prefill 10 ms \
         per uncached block, 0.5 ms cached, 16 tokens at 2 ms",
        args.duration, args.tier_connections
    );
    let mut report = serde_json::Map::new();
    let mut base: Option<(f64, Duration, Duration)> = None;
    for tier in ["shared", "salted", "exclusive"] {
        reset_sim_cache(sim_addr)?;
        let (port, admin) = (free_port()?, free_port()?);
        let cfg = write_tier_config(dir, port, admin, sim_port, tier)?;
        let sidecar = spawn_sidecar(bin_dir, &cfg)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
        wait_port(addr, sidecar.name)?;
        let r = rt.block_on(tier_load(addr, args.tier_connections, duration))?;
        let flushes =
            scrape(admin_addr, "bulkhead_cache_flushes_total{result=\"ok\"}").unwrap_or(0.0);
        let refused = scrape(
            admin_addr,
            "bulkhead_cache_flushes_total{result=\"refused\"}",
        )
        .unwrap_or(0.0);
        drop(sidecar);
        let rps = r.ok as f64 / r.elapsed.as_secs_f64();
        let (p50, p99) = (pct(&r.ttft, 0.5), pct(&r.ttft, 0.99));
        let hit = r.blocks_cached as f64 / r.blocks.max(1) as f64;
        let (brps, b50, b99) = *base.get_or_insert((rps, p50, p99));
        println!(
            "{tier:>9}: {rps:7.1} req/s ({:.2}x shared), TTFT p50 {:>9.2?} ({:.2}x) p99 {:>9.2?} ({:.2}x), \
             cached blocks {:4.1} %, flushes {flushes} ok / {refused} refused, {} errors",
            rps / brps,
            p50,
            p50.as_secs_f64() / b50.as_secs_f64(),
            p99,
            p99.as_secs_f64() / b99.as_secs_f64(),
            hit * 100.0,
            r.errors
        );
        report.insert(format!("{tier}_rps"), rps.into());
        report.insert(
            format!("{tier}_ttft_p50_ms"),
            (p50.as_secs_f64() * 1e3).into(),
        );
        report.insert(
            format!("{tier}_ttft_p99_ms"),
            (p99.as_secs_f64() * 1e3).into(),
        );
        report.insert(format!("{tier}_cached_block_share"), hit.into());
        report.insert(format!("{tier}_flushes"), flushes.into());
        report.insert(format!("{tier}_errors"), r.errors.into());
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    drop(sim);
    Ok(())
}

/// A sidecar config for the --limits comparison: the bench tenant with requests and tokens
/// per minute (high enough never to refuse), on the given limits backend.
fn write_limits_config(
    dir: &Path,
    name: &str,
    port: u16,
    admin: u16,
    sim: u16,
    limits: &str,
) -> anyhow::Result<PathBuf> {
    write_config_file(
        dir,
        &format!("sidecar-{name}.toml"),
        (port, admin, sim),
        // No max_concurrent: on Redis it would lease a slot per request in every mode.
        &BENCH_QUEUE_AND_TENANTS
            .replace("{extra}", limits)
            .replace("{concurrent}", ""),
    )
}

/// Round trips Redis has served so far: the commands a sidecar sends (EVALSHA, EVAL, SCRIPT
/// LOAD, PING) from INFO commandstats, which also counts the commands scripts run inside.
fn redis_calls(addr: SocketAddr) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"INFO commandstats\r\nQUIT\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| {
            [
                "cmdstat_evalsha:",
                "cmdstat_eval:",
                "cmdstat_script",
                "cmdstat_ping:",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

/// `--limits redis`: the same sidecar with local limits, Redis strict and Redis leased,
/// interleaved round by round so that machine load falls on all alike.
fn limits_backends(args: &Args, bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let ((sim, sim_port), (redis, redis_port)) = sim_and_redis(bin_dir, dir)?;
    let redis_addr: SocketAddr = ([127, 0, 0, 1], redis_port).into();
    wait_port(redis_addr, redis.name)?;
    let url = format!("redis://127.0.0.1:{redis_port}/");
    let backends = [
        ("local", String::new()),
        (
            "strict",
            format!(
                "[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"{url}\"\nmode = \"strict\""
            ),
        ),
        (
            "leased",
            format!(
                "[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"{url}\"\nmode = \"leased\"\n\
                 key_prefix = \"leased:\"\nlease_tokens = 100000\nlease_requests = 1000"
            ),
        ),
    ];
    let mut procs = Vec::new();
    for (name, limits) in &backends {
        let (port, admin) = (free_port()?, free_port()?);
        let cfg = write_limits_config(dir, name, port, admin, sim_port, limits)?;
        let p = spawn_sidecar(bin_dir, &cfg)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_port(addr, p.name)?;
        procs.push((*name, addr, p));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let duration = Duration::from_secs_f64(args.duration);
    println!(
        "bulkhead-bench --limits redis: {} rounds, each backend {} s at {} connections and {} s \
         at 1 connection per round, interleaved; tenant with requests and tokens per minute",
        args.limits_rounds, args.duration, args.connections, args.duration
    );
    struct Acc {
        ok: u64,
        errors: u64,
        elapsed: Duration,
        lat1: Vec<Duration>,
        calls: u64,
        requests: u64,
        sidecar_cpu: f64,
        redis_cpu: f64,
    }
    let mut acc: Vec<Acc> = backends
        .iter()
        .map(|_| Acc {
            ok: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            lat1: Vec::new(),
            calls: 0,
            requests: 0,
            sidecar_cpu: 0.0,
            redis_cpu: 0.0,
        })
        .collect();
    let plain = Body::chat(0, false);
    rt.block_on(async {
        for (_, addr, _) in &procs {
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
            for (i, (name, addr, p)) in procs.iter().enumerate() {
                let c0 = redis_calls(redis_addr)?;
                let (s0, r0) = (proc_stats(p.child.id()).0, proc_stats(redis.child.id()).0);
                let r = load(
                    Kind::Sidecar,
                    *addr,
                    &plain,
                    args.connections,
                    duration,
                    args.max_requests,
                )
                .await?;
                let r1 = load(Kind::Sidecar, *addr, &plain, 1, duration, args.max_requests).await?;
                // Settlements are sent after the response: let the last ones land.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let c1 = redis_calls(redis_addr)?;
                let (s1, r1cpu) = (proc_stats(p.child.id()).0, proc_stats(redis.child.id()).0);
                let a = &mut acc[i];
                a.sidecar_cpu += s1 - s0;
                a.redis_cpu += r1cpu - r0;
                a.ok += r.ok;
                a.errors += r.errors + r1.errors;
                a.elapsed += r.elapsed;
                a.lat1.extend(r1.latencies);
                a.calls += c1 - c0;
                a.requests += r.ok + r.errors + r1.ok + r1.errors;
                eprintln!(
                    "round {round}: {name:>6} {:.0} req/s",
                    r.ok as f64 / r.elapsed.as_secs_f64()
                );
            }
        }
        anyhow::Ok(())
    })?;
    let mut report = serde_json::Map::new();
    let base_rps = acc[0].ok as f64 / acc[0].elapsed.as_secs_f64();
    acc[0].lat1.sort();
    let base99 = pct(&acc[0].lat1, 0.99);
    let base50 = pct(&acc[0].lat1, 0.5);
    for (i, (name, _, _)) in procs.iter().enumerate() {
        let a = &mut acc[i];
        a.lat1.sort();
        let rps = a.ok as f64 / a.elapsed.as_secs_f64();
        let (p50, p99) = (pct(&a.lat1, 0.5), pct(&a.lat1, 0.99));
        let rt_per_req = a.calls as f64 / a.requests.max(1) as f64;
        let sc_us = a.sidecar_cpu / a.requests.max(1) as f64 * 1e6;
        let rd_us = a.redis_cpu / a.requests.max(1) as f64 * 1e6;
        println!(
            "{name:>6}: {rps:8.0} req/s at {} conns ({:.2}x local, {} errors); 1 conn p50 {p50:?} \
             p99 {p99:?} (added vs local: p50 {:+.0} us, p99 {:+.0} us); Redis round trips per \
             request {rt_per_req:.2}; CPU per request: sidecar {sc_us:.1} us, redis-server \
             {rd_us:.1} us",
            args.connections,
            rps / base_rps,
            a.errors,
            (p50.as_secs_f64() - base50.as_secs_f64()) * 1e6,
            (p99.as_secs_f64() - base99.as_secs_f64()) * 1e6,
        );
        report.insert(format!("{name}_rps"), rps.into());
        report.insert(format!("{name}_vs_local"), (rps / base_rps).into());
        report.insert(format!("{name}_p99_us"), (p99.as_secs_f64() * 1e6).into());
        report.insert(
            format!("{name}_added_p99_us"),
            ((p99.as_secs_f64() - base99.as_secs_f64()) * 1e6).into(),
        );
        report.insert(
            format!("{name}_redis_commands_per_request"),
            rt_per_req.into(),
        );
        report.insert(format!("{name}_errors"), a.errors.into());
        report.insert(format!("{name}_sidecar_cpu_us_per_request"), sc_us.into());
        report.insert(format!("{name}_redis_cpu_us_per_request"), rd_us.into());
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    drop(procs);
    drop(redis);
    drop(sim);
    Ok(())
}

/// The demo's tenants: (name, requests per minute).
const DEMO_TENANTS: [(&str, u32); 3] = [("acme", 120), ("globex", 60), ("initech", 30)];

/// Send `tenant` requests over `conns` connections, request i to replica i % n, for
/// `duration`; returns the requests admitted by each replica.
async fn demo_load(
    addrs: Vec<SocketAddr>,
    tenant: &'static str,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<Vec<u64>> {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let addrs = addrs.clone();
        let body = Body::chat(0, false);
        tasks.push(tokio::spawn(async move {
            let mut senders = Vec::new();
            for a in &addrs {
                let stream = tokio::net::TcpStream::connect(a).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                senders.push(sender);
            }
            let mut admitted = vec![0u64; addrs.len()];
            let mut i = c;
            while Instant::now() < end {
                let r = i % addrs.len();
                i += 1;
                let mut req = request(Kind::Direct, addrs[r], &body, &[]);
                let h = req.headers_mut();
                h.insert(TENANT_HEADER, HeaderValue::from_static(tenant));
                let uri: http::Uri = "/v1/chat/completions".parse().expect("static path");
                sign_request(
                    &Method::POST,
                    &uri,
                    h,
                    &body.bytes,
                    KEY,
                    &SignOptions::new("gw", now()),
                )
                .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
                let resp = senders[r].send_request(req).await?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await?;
                if ok {
                    admitted[r] += 1;
                } else {
                    // Refused (429): back off a little, as a client would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            anyhow::Ok(admitted)
        }));
    }
    let mut total = vec![0u64; addrs.len()];
    for t in tasks {
        for (i, n) in t.await??.into_iter().enumerate() {
            total[i] += n;
        }
    }
    Ok(total)
}

/// `--replicas-demo N`: N replicas of one model behind a round-robin client, with local
/// limits (each replica enforces the whole limit) and then with limits shared in Redis.
fn replicas_demo(args: &Args, bin_dir: &Path, dir: &Path, n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--replicas-demo needs at least 1 replica");
    }
    let ((sim, sim_port), (redis, redis_port)) = sim_and_redis(bin_dir, dir)?;
    wait_port(([127, 0, 0, 1], redis_port).into(), redis.name)?;
    let tenants: String = DEMO_TENANTS
        .iter()
        .map(|(t, rpm)| format!("[tenants.{t}]\nrequests_per_minute = {rpm}\n"))
        .collect();
    let duration = Duration::from_secs_f64(args.duration);
    println!(
        "bulkhead-bench --replicas-demo {n}: {n} sidecar replicas of one model, each tenant's \
         clients spread round-robin over them for {} s (GCRA: a burst of the limit, then \
         limit/60 per second)",
        args.duration
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (backend, limits) in [
        ("local", String::new()),
        (
            "redis",
            format!(
                "[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"redis://127.0.0.1:{redis_port}/\"\n\
                 expected_replicas = {n}"
            ),
        ),
    ] {
        let mut procs = Vec::new();
        for i in 0..n {
            let (port, admin) = (free_port()?, free_port()?);
            let cfg_text = format!(
                "[upstream]\nurl = \"http://127.0.0.1:{sim_port}\"\n[listen]\naddr = \"127.0.0.1:{port}\"\n\
                 admin_addr = \"127.0.0.1:{admin}\"\n{limits}\n{tenants}\n[[keys]]\nid = \"gw\"\n\
                 secret_files = [\"{key}\"]\ntenants = [\"*\"]\n",
                key = dir.join("gw.key").display(),
            );
            std::fs::write(
                dir.join("gw.key"),
                base64::engine::general_purpose::STANDARD.encode(KEY),
            )?;
            let cfg = dir.join(format!("demo-{backend}-{i}.toml"));
            std::fs::write(&cfg, cfg_text)?;
            let p = spawn_sidecar(bin_dir, &cfg)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            wait_port(addr, p.name)?;
            procs.push((addr, p));
        }
        let addrs: Vec<SocketAddr> = procs.iter().map(|(a, _)| *a).collect();
        let results = rt.block_on(async {
            let mut handles = Vec::new();
            for (t, _) in DEMO_TENANTS {
                handles.push(tokio::spawn(demo_load(addrs.clone(), t, 4, duration)));
            }
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await??);
            }
            anyhow::Ok(out)
        })?;
        println!("\nlimits.backend = \"{backend}\":");
        let per: Vec<String> = (1..=n).map(|i| format!("replica {i}")).collect();
        println!(
            "  {:<8} {:>6} {:>9} | {} | {:>8} {:>6}",
            "tenant",
            "rpm",
            "allowed",
            per.iter()
                .map(|p| format!("{p:>9}"))
                .collect::<Vec<_>>()
                .join(" "),
            "admitted",
            "ratio"
        );
        for ((t, rpm), counts) in DEMO_TENANTS.iter().zip(&results) {
            let allowed = *rpm as f64 * (1.0 + args.duration / 60.0);
            let total: u64 = counts.iter().sum();
            println!(
                "  {:<8} {:>6} {:>9.0} | {} | {:>8} {:>5.2}x",
                t,
                rpm,
                allowed,
                counts
                    .iter()
                    .map(|c| format!("{c:>9}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                total,
                total as f64 / allowed
            );
        }
        drop(procs);
    }
    drop(redis);
    drop(sim);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_path_buf(),
    };
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if args.fairness {
        let r = fairness::run(&args, &bin_dir, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    if args.cache_tiers {
        let r = cache_tiers(&args, &bin_dir, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    if args.telemetry {
        let r = telemetry::run(&args, &bin_dir, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    if let Some(n) = args.replicas_demo {
        let r = replicas_demo(&args, &bin_dir, &dir, n);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    match args.limits.as_deref() {
        None => {}
        Some("redis") => {
            let r = limits_backends(&args, &bin_dir, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            return r;
        }
        Some(other) => bail!("--limits {other}: only `redis` is compared (against local)"),
    }

    let r = proxy::run(&args, &bin_dir, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}
