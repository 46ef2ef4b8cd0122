//! `bulkhead-bench` (default mode): the sidecar with every feature on against nginx (the plain
//! proxy users would otherwise run) and against no proxy, per core.
//!
//! Pinning: this load generator and `bulkhead-sim` run on CPU 0, the proxy under test (nginx
//! with one worker, the sidecar with one worker thread) on CPU 1, so the proxy's figures are
//! per core and the load generator never competes with it. Each trial runs every target in
//! turn (the order rotates between trials); figures are medians over the trials.
//!
//! Per target: throughput at `--connections` with the small chat request, proxy CPU per request
//! (its user+system time over the run / requests), latency at one connection, streaming TTFT
//! and inter-token gaps (chunk clumping: gaps under a fifth of the simulator's 5 ms), and the
//! same throughput and one-connection latency with 32 KiB and 256 KiB prompts. Peak RSS of the
//! sidecar over the whole run.

use super::{
    Args, KEY, Proc, free_port, pct, proc_stats, spawn_sidecar, spawn_sidecar_bin, spawn_sim,
    wait_port, which, write_nginx_config, write_sidecar_config,
};
use anyhow::Context;
use bulkhead_client::{SignOptions, TENANT_HEADER, sign_request};
use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const LITELLM_KEY: &str = "sk-bulkhead-bench";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    Direct,
    Nginx,
    Sidecar,
    /// An earlier sidecar build (`--baseline-sidecar`), same configuration.
    Baseline,
    Litellm,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Sidecar => "sidecar",
            Kind::Baseline => "baseline",
            Kind::Litellm => "litellm",
        }
    }
}

/// A request body and its precomputed `Content-Digest` (the gateway's work, not the proxy's).
#[derive(Clone)]
pub struct Body {
    pub bytes: Bytes,
    digest: HeaderValue,
}

impl Body {
    pub fn chat(prompt_bytes: usize, stream: bool) -> Self {
        let mut content = String::from("Say hello to the benchmark");
        while content.len() + 6 <= prompt_bytes {
            content.push_str(" words");
        }
        let v = serde_json::json!({
            "model": "bulkhead-sim",
            "max_tokens": if stream { 32 } else { 16 },
            "stream": stream,
            "messages": [{"role": "user", "content": content}]
        });
        let bytes = Bytes::from(v.to_string());
        let digest = HeaderValue::from_str(&bulkhead_client::digest::content_digest_sha256(&bytes))
            .expect("digest header");
        Self { bytes, digest }
    }
}

pub fn request(
    kind: Kind,
    addr: SocketAddr,
    body: &Body,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let path = "/v1/chat/completions";
    let mut req = Request::new(Full::new(body.bytes.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = path.parse().expect("static path");
    let h = req.headers_mut();
    h.insert(
        "host",
        HeaderValue::from_str(&addr.to_string()).expect("addr"),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in extra {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    match kind {
        Kind::Sidecar | Kind::Baseline => {
            h.insert(TENANT_HEADER, HeaderValue::from_static("bench"));
            h.insert("content-digest", body.digest.clone());
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            // A fresh nonce per request, as a gateway signs.
            sign_request(
                &Method::POST,
                &path.parse().expect("static path"),
                h,
                &body.bytes,
                KEY,
                &SignOptions::new("gw", created),
            )
            .expect("signing");
        }
        Kind::Litellm => {
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {LITELLM_KEY}")).expect("key"),
            );
        }
        _ => {}
    }
    req
}

pub struct Run {
    pub ok: u64,
    pub errors: u64,
    pub rps: f64,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

pub async fn load(
    kind: Kind,
    addr: SocketAddr,
    body: &Body,
    conns: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<Run> {
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (issued, errors, body) = (issued.clone(), errors.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            while Instant::now() < end && issued.fetch_add(1, Ordering::Relaxed) < max {
                let req = request(kind, addr, &body, &[]);
                let t0 = Instant::now();
                let resp = sender.send_request(req).await?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await?;
                if ok {
                    lat.push(t0.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Ok(Run {
        ok: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        elapsed,
        latencies,
    })
}

struct Stream {
    ttft: Vec<Duration>,
    gaps: Vec<Duration>,
}

async fn stream_run(kind: Kind, addr: SocketAddr, n: usize) -> anyhow::Result<Stream> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = Body::chat(0, true);
    let (mut ttft, mut gaps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let req = request(
            kind,
            addr,
            &body,
            &[("x-sim-ttft-ms", "20"), ("x-sim-itl-ms", "5")],
        );
        let t0 = Instant::now();
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "{}: streaming request answered {}",
            kind.name(),
            resp.status()
        );
        let mut b = resp.into_body();
        let mut last: Option<Instant> = None;
        while let Some(f) = b.frame().await {
            if f?.data_ref().is_some_and(|d| !d.is_empty()) {
                let t = Instant::now();
                match last {
                    None => ttft.push(t - t0),
                    Some(l) => gaps.push(t - l),
                }
                last = Some(t);
            }
        }
    }
    ttft.sort();
    gaps.sort();
    Ok(Stream { ttft, gaps })
}

/// Pin process `pid` (and its threads) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Find or (with `install`) install LiteLLM into target/litellm-venv.
fn litellm_bin(bin_dir: &Path) -> Option<std::path::PathBuf> {
    if let Some(p) = which("litellm") {
        return Some(p);
    }
    let venv = bin_dir.join("../litellm-venv");
    let p = venv.join("bin/litellm");
    if p.exists() {
        return Some(p);
    }
    eprintln!(
        "bulkhead-bench: installing LiteLLM into {} (pip)",
        venv.display()
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "litellm[proxy]"])
            .status()
            .is_ok_and(|s| s.success());
    (ok && p.exists()).then_some(p)
}

pub fn run(args: &Args, bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let pinned = !args.no_pin && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if pinned {
        pin(std::process::id(), 0);
    }
    let sim_port = free_port()?;
    let sim = spawn_sim(
        bin_dir,
        &[
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--tokens",
            "16",
            "--threads",
            "1",
        ],
    )?;
    let sim_addr: SocketAddr = ([127, 0, 0, 1], sim_port).into();
    wait_port(sim_addr, sim.name)?;
    if pinned {
        pin(sim.child.id(), 0);
    }

    let (sc_port, sc_admin) = (free_port()?, free_port()?);
    let cfg = write_sidecar_config(dir, sc_port, sc_admin, sim_port)?;
    // One worker thread: the sidecar's figures are per core, like nginx's one worker.
    let text = std::fs::read_to_string(&cfg)?;
    std::fs::write(&cfg, format!("{text}\n[runtime]\nworker_threads = 1\n"))?;
    let sidecar = spawn_sidecar(bin_dir, &cfg)?;
    let sc_addr: SocketAddr = ([127, 0, 0, 1], sc_port).into();
    wait_port(sc_addr, sidecar.name)?;
    if pinned {
        pin(sidecar.child.id(), 1);
    }
    // The earlier build, on its own ports and audit folder, the same configuration.
    let baseline = match &args.baseline_sidecar {
        Some(bin) => {
            let (port, admin) = (free_port()?, free_port()?);
            let bdir = dir.join("baseline");
            std::fs::create_dir_all(&bdir)?;
            let text = std::fs::read_to_string(&cfg)?
                .replace(
                    &format!("127.0.0.1:{sc_port}"),
                    &format!("127.0.0.1:{port}"),
                )
                .replace(
                    &format!("127.0.0.1:{sc_admin}"),
                    &format!("127.0.0.1:{admin}"),
                )
                .replace(
                    &dir.join("audit").display().to_string(),
                    &bdir.join("audit").display().to_string(),
                );
            let bcfg = bdir.join("sidecar.toml");
            std::fs::write(&bcfg, text)?;
            let p = spawn_sidecar_bin(bin, &bcfg)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            wait_port(addr, p.name)?;
            if pinned {
                pin(p.child.id(), 1);
            }
            Some((p, addr))
        }
        None => None,
    };

    let nginx = match (args.no_nginx, which("nginx")) {
        (false, Some(bin)) => {
            let port = free_port()?;
            let conf = write_nginx_config(dir, port, sim_port)?;
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx")?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut stop = Command::new(&bin);
            stop.arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir)
                .args(["-s", "stop"]);
            let p = Proc {
                name: "nginx",
                child,
                stop: Some(stop),
            };
            wait_port(addr, p.name)?;
            if pinned {
                pin(p.child.id(), 1);
                if let Ok(c) =
                    std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.child.id()))
                {
                    for w in c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()) {
                        pin(w, 1);
                    }
                }
            }
            Some((p, addr))
        }
        (false, None) => {
            eprintln!(
                "nginx not found (Debian: apt-get install nginx-light); skipping the nginx baseline"
            );
            None
        }
        (true, _) => None,
    };

    let litellm = if args.peers.iter().any(|p| p == "litellm") {
        match litellm_bin(bin_dir) {
            Some(bin) => {
                let port = free_port()?;
                let child = Command::new(&bin)
                    .args(["--model", "openai/bulkhead-sim", "--api_base"])
                    .arg(format!("http://127.0.0.1:{sim_port}/v1"))
                    .args([
                        "--port",
                        &port.to_string(),
                        "--host",
                        "127.0.0.1",
                        "--num_workers",
                        "1",
                    ])
                    .env("LITELLM_MASTER_KEY", LITELLM_KEY)
                    .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                    .env("OPENAI_API_KEY", "sk-unused")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting litellm")?;
                let p = Proc {
                    name: "litellm",
                    child,
                    stop: None,
                };
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                // LiteLLM imports for a long time before it listens.
                let deadline = Instant::now() + Duration::from_secs(120);
                while std::net::TcpStream::connect(addr).is_err() {
                    anyhow::ensure!(Instant::now() < deadline, "litellm did not start listening");
                    std::thread::sleep(Duration::from_millis(200));
                }
                if pinned {
                    pin(p.child.id(), 1);
                }
                Some((p, addr))
            }
            None => {
                eprintln!("LiteLLM could not be found or installed; the LiteLLM peer is skipped");
                None
            }
        }
    } else {
        None
    };

    let mut targets = vec![(Kind::Direct, sim_addr, sim.child.id())];
    if let Some((p, a)) = &nginx {
        targets.push((Kind::Nginx, *a, p.child.id()));
    }
    targets.push((Kind::Sidecar, sc_addr, sidecar.child.id()));
    if let Some((p, a)) = &baseline {
        targets.push((Kind::Baseline, *a, p.child.id()));
    }
    if let Some((p, a)) = &litellm {
        targets.push((Kind::Litellm, *a, p.child.id()));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let duration = Duration::from_secs_f64(args.duration);
    let sizes: [(&str, usize); 2] = [("32k", 32 * 1024), ("256k", 256 * 1024)];
    let small = Body::chat(0, false);
    let big: Vec<(&str, Body)> = sizes
        .iter()
        .map(|(n, b)| (*n, Body::chat(*b, false)))
        .collect();
    println!(
        "bulkhead-bench: {} trials, {} s per run, {} connections; {}; load average at start {}",
        args.trials,
        args.duration,
        args.connections,
        if pinned {
            "load generator + simulator on CPU 0, proxy on CPU 1 (nginx 1 worker, sidecar 1 worker thread)"
        } else {
            "not pinned"
        },
        load_average()
    );
    // (target, metric) -> one value per trial.
    let mut m: BTreeMap<(Kind, String), Vec<f64>> = BTreeMap::new();
    let mut throughput_rss_kib = 0u64;
    let mut put = |k: Kind, name: &str, v: f64| m.entry((k, name.to_string())).or_default().push(v);
    rt.block_on(async {
        for (k, a, _) in &targets {
            load(*k, *a, &small, 4, Duration::from_millis(500), 2000).await?;
        }
        for trial in 0..args.trials {
            let mut order = targets.clone();
            order.rotate_left(trial % targets.len());
            for (k, a, pid) in &order {
                let (k, a, pid) = (*k, *a, *pid);
                let conns = if k == Kind::Litellm {
                    args.connections.min(32)
                } else {
                    args.connections
                };
                let (cpu0, _) = proc_stats(pid);
                let r = load(k, a, &small, conns, duration, args.max_requests).await?;
                let (cpu1, hwm) = proc_stats(pid);
                if trial == 0 && k == Kind::Sidecar {
                    // The peak while only the small-request throughput run (and the warm-up)
                    // has run: the large-body runs come after.
                    throughput_rss_kib = hwm;
                }
                if trial == 0 {
                    put(k, "throughput_peak_rss_mib", hwm as f64 / 1024.0);
                }
                put(k, "rps", r.rps);
                put(k, "errors", r.errors as f64);
                put(
                    k,
                    "cpu_us_per_req",
                    (cpu1 - cpu0) / r.ok.max(1) as f64 * 1e6,
                );
                put(k, "cpu_s", cpu1 - cpu0);
                let r1 = load(k, a, &small, 1, duration, args.max_requests).await?;
                put(k, "p50_us", pct(&r1.latencies, 0.5).as_secs_f64() * 1e6);
                put(k, "p99_us", pct(&r1.latencies, 0.99).as_secs_f64() * 1e6);
                if k == Kind::Litellm {
                    continue;
                }
                let s = stream_run(k, a, args.stream_requests).await?;
                put(k, "ttft_p50_us", pct(&s.ttft, 0.5).as_secs_f64() * 1e6);
                let mean_gap =
                    s.gaps.iter().sum::<Duration>().as_secs_f64() / s.gaps.len().max(1) as f64;
                put(k, "itl_mean_us", mean_gap * 1e6);
                let clumped = s
                    .gaps
                    .iter()
                    .filter(|g| **g < Duration::from_millis(1))
                    .count();
                put(
                    k,
                    "clumped_share",
                    clumped as f64 / s.gaps.len().max(1) as f64,
                );
                for (name, body) in &big {
                    let (cpu0, _) = proc_stats(pid);
                    let r = load(k, a, body, conns, duration, args.max_requests).await?;
                    let (cpu1, _) = proc_stats(pid);
                    put(k, &format!("rps_{name}"), r.rps);
                    put(k, &format!("errors_{name}"), r.errors as f64);
                    put(
                        k,
                        &format!("cpu_us_per_req_{name}"),
                        (cpu1 - cpu0) / r.ok.max(1) as f64 * 1e6,
                    );
                    let r1 = load(k, a, body, 1, duration / 2, args.max_requests).await?;
                    put(
                        k,
                        &format!("p99_us_{name}"),
                        pct(&r1.latencies, 0.99).as_secs_f64() * 1e6,
                    );
                }
                eprintln!(
                    "trial {trial}: {} done (load average {})",
                    k.name(),
                    load_average()
                );
            }
        }
        anyhow::Ok(())
    })?;
    let (_, rss_kib) = proc_stats(sidecar.child.id());
    // The whole run's peak of every target, one value (not per trial).
    for (k, _, pid) in &targets {
        let (_, hwm) = proc_stats(*pid);
        m.entry((*k, "peak_rss_mib".to_string()))
            .or_default()
            .push(hwm as f64 / 1024.0);
    }
    let med = |k: Kind, name: &str| {
        m.get(&(k, name.to_string()))
            .map_or(f64::NAN, |v| median(v.clone()))
    };

    let mut report = serde_json::Map::new();
    report.insert("trials".into(), args.trials.into());
    report.insert("duration_s".into(), args.duration.into());
    report.insert("connections".into(), args.connections.into());
    report.insert("pinned".into(), pinned.into());
    report.insert("load_average_end".into(), load_average().into());
    for ((k, name), v) in &m {
        report.insert(format!("{}_{name}", k.name()), median(v.clone()).into());
        report.insert(format!("{}_{name}_trials", k.name()), serde_json::json!(v));
    }
    report.insert(
        "sidecar_peak_rss_mib".into(),
        (rss_kib as f64 / 1024.0).into(),
    );

    println!("\nmedians of {} trials:", args.trials);
    for (k, ..) in &targets {
        println!(
            "{:>8}: {:>8.0} req/s ({:.0} errors), CPU {:>6.1} us/req, 1 conn p50 {:>6.0} us p99 {:>6.0} us; \
             32k {:>7.0} req/s p99 {:>6.0} us CPU {:>6.1} us/req; 256k {:>7.0} req/s p99 {:>7.0} us CPU {:>6.1} us/req",
            k.name(),
            med(*k, "rps"),
            med(*k, "errors"),
            med(*k, "cpu_us_per_req"),
            med(*k, "p50_us"),
            med(*k, "p99_us"),
            med(*k, "rps_32k"),
            med(*k, "p99_us_32k"),
            med(*k, "cpu_us_per_req_32k"),
            med(*k, "rps_256k"),
            med(*k, "p99_us_256k"),
            med(*k, "cpu_us_per_req_256k"),
        );
    }
    let d = Kind::Direct;
    let added = |k: Kind, name: &str| med(k, name) - med(d, name);
    let s = Kind::Sidecar;
    let mut goals: Vec<(String, String, bool)> = Vec::new();
    if nginx.is_some() {
        let n = Kind::Nginx;
        let ratio = med(s, "rps") / med(n, "rps");
        report.insert("sidecar_vs_nginx".into(), ratio.into());
        goals.push((
            format!("throughput vs nginx {ratio:.2}x"),
            ">= 1.0x".into(),
            ratio >= 1.0,
        ));
        for size in ["32k", "256k"] {
            let r = med(s, &format!("rps_{size}")) / med(n, &format!("rps_{size}"));
            report.insert(format!("sidecar_vs_nginx_{size}"), r.into());
            goals.push((
                format!("{size} prompts: throughput vs nginx {r:.2}x"),
                ">= 0.9x".into(),
                r >= 0.9,
            ));
        }
        println!(
            "   nginx: added p99 {:.0} us, added TTFT p50 {:.0} us",
            added(n, "p99_us"),
            added(n, "ttft_p50_us")
        );
    }
    let cpu = med(s, "cpu_us_per_req");
    goals.push((
        format!("CPU per request {cpu:.1} us"),
        "<= 25 us".into(),
        cpu <= 25.0,
    ));
    let p99 = added(s, "p99_us");
    goals.push((
        format!("added p99 at 1 connection {p99:.0} us"),
        "<= 150 us".into(),
        p99 <= 150.0,
    ));
    let ttft = added(s, "ttft_p50_us");
    goals.push((
        format!("added TTFT p50 {ttft:.0} us"),
        "<= 300 us".into(),
        ttft <= 300.0,
    ));
    let clump = med(s, "clumped_share") - med(d, "clumped_share");
    goals.push((
        format!(
            "chunk clumping (share of gaps < 1 ms, over direct) {:.1} %",
            clump * 100.0
        ),
        "none (<= 1 %)".into(),
        clump <= 0.01,
    ));
    let rss = throughput_rss_kib as f64 / 1024.0;
    report.insert("sidecar_throughput_peak_rss_mib".into(), rss.into());
    goals.push((
        format!(
            "peak RSS under the throughput run {rss:.1} MiB (whole run, 256 KiB bodies included: {:.1} MiB)",
            rss_kib as f64 / 1024.0
        ),
        "<= 20 MiB".into(),
        rss <= 20.0,
    ));
    for size in ["32k", "256k"] {
        let a = added(s, &format!("p99_us_{size}"));
        report.insert(format!("sidecar_added_p99_us_{size}"), a.into());
        goals.push((
            format!("{size} prompts: added p99 {a:.0} us"),
            "<= 500 us".into(),
            a <= 500.0,
        ));
    }
    let c0 = med(s, "cpu_us_per_req");
    let c32 = med(s, "cpu_us_per_req_32k");
    let c256 = med(s, "cpu_us_per_req_256k");
    // Linear in size: the 256 KiB cost over the 32 KiB cost at most the size ratio (~8).
    let growth = (c256 - c0) / (c32 - c0).max(0.001);
    goals.push((
        format!(
            "CPU per request 0 / 32 KiB / 256 KiB: {c0:.1} / {c32:.1} / {c256:.1} us (growth 256k:32k {growth:.1}x)"
        ),
        "at most linear (<= 8x)".into(),
        growth <= 8.5,
    ));
    if litellm.is_some() {
        let l = Kind::Litellm;
        let per_core = |k: Kind| med(k, "rps") / (med(k, "cpu_s") / args.duration).max(0.01);
        let r = per_core(s) / per_core(l);
        report.insert("sidecar_vs_litellm_per_core".into(), r.into());
        goals.push((
            format!(
                "requests/s per core vs LiteLLM {r:.0}x ({:.0} vs {:.0})",
                per_core(s),
                per_core(l)
            ),
            ">= 300x".into(),
            r >= 300.0,
        ));
    } else {
        goals.push((
            "LiteLLM: not measured (--peers litellm)".into(),
            ">= 300x".into(),
            false,
        ));
    }
    if baseline.is_some() {
        let b = Kind::Baseline;
        println!("\nthis build over the baseline build (same configuration, same trials):");
        for (what, name) in [
            ("CPU per request, small body", "cpu_us_per_req"),
            ("CPU per request, 32 KiB prompt", "cpu_us_per_req_32k"),
            ("CPU per request, 256 KiB prompt", "cpu_us_per_req_256k"),
            ("req/s at the throughput run", "rps"),
            ("p99 at 1 connection", "p99_us"),
            ("p99 at 1 connection, 256 KiB", "p99_us_256k"),
            (
                "peak RSS under the throughput run (MiB, first trial)",
                "throughput_peak_rss_mib",
            ),
            ("peak RSS over the whole run (MiB)", "peak_rss_mib"),
        ] {
            let r = med(s, name) / med(b, name);
            report.insert(format!("sidecar_vs_baseline_{name}"), r.into());
            println!(
                "  {what}: {:.1} / {:.1} = {r:.3}x",
                med(s, name),
                med(b, name)
            );
        }
    }
    println!("\nsidecar against the goals (every feature on):");
    for (what, goal, met) in &goals {
        println!(
            "  [{}] {what} (goal {goal})",
            if *met { "met" } else { "NOT met" }
        );
    }
    report.insert(
        "goals".into(),
        serde_json::json!(
            goals
                .iter()
                .map(|(w, g, met)| serde_json::json!({"figure": w, "goal": g, "met": met}))
                .collect::<Vec<_>>()
        ),
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    drop(litellm);
    drop(nginx);
    drop(baseline);
    drop(sidecar);
    drop(sim);
    Ok(())
}
