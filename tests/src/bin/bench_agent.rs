//! `cargo xtask bench agent`: the agent at scale. 1,000 tenants, 50,000 tagged sockets (held
//! by child processes: one process may hold only RLIMIT_NOFILE descriptors), 1,000
//! cross-tenant endpoints, and a scripted GPU source polled every second: 8 GPUs, 1,040
//! processes (one pod dedicated to each of the 1,000 tenants, and 20 shared servers of two
//! processes each), rewritten every second with the utilization samples NVML would give for
//! the second (6 device and 6 per-process samples per GPU and process) and the energy
//! counters. Measures the scrape time of `/metrics`, the agent's CPU at one scrape every 15 s,
//! the GPU poller thread's own CPU, its RSS, and the maps' fill.

use bulkhead_tests::harness::{Agent, Metrics, Paths, SocketHolder, hold_tagged_sockets_if_asked};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn main() -> anyhow::Result<()> {
    hold_tagged_sockets_if_asked();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let tenants = arg("--tenants", 1_000) as usize;
    let sockets = arg("--sockets", 50_000) as usize;
    let window = Duration::from_secs(arg("--window-secs", 60));
    let scrapes = arg("--scrapes", 30) as usize;
    let exe = std::env::current_exe()?;
    let agent_bin = exe.with_file_name("bulkhead-agent");
    let agent_bin = agent_bin.to_str().unwrap();
    if !bulkhead_tests::harness::require_bpf(agent_bin) {
        anyhow::bail!("the benchmark loads the eBPF programs: run it as root");
    }
    let paths = Paths::named("bench-agent");
    let names: Vec<String> = (0..tenants).map(|i| format!("t{i:04}")).collect();

    // Scripted host: pods 0-19 are shared servers of 2 GPU processes each, then one pod of
    // one process dedicated to each tenant.
    let proc_root = paths.dir.join("proc");
    let mut workloads = String::new();
    let mut gpus: Vec<Vec<(u32, u64)>> = vec![Vec::new(); 8];
    for pod in 0..(20 + tenants as u32) {
        let uid = format!("00000000-0000-4000-8000-{pod:012x}");
        for k in 0..(if pod < 20 { 2u32 } else { 1 }) {
            let pid = 10_000 + pod * 2 + k;
            std::fs::create_dir_all(proc_root.join(pid.to_string()))?;
            std::fs::write(
                proc_root.join(format!("{pid}/cgroup")),
                format!("0::/kubepods/burstable/pod{uid}/c{k}\n"),
            )?;
            gpus[((pod * 2 + k) % 8) as usize].push((pid, GIB));
        }
        if pod < 20 {
            writeln!(
                workloads,
                "[[gpu.workloads]]\npod_uid = \"{uid}\"\nshared = true\ntenants = [\"{}\"]",
                names[pod as usize % tenants]
            )?;
        } else {
            writeln!(
                workloads,
                "[[gpu.workloads]]\npod_uid = \"{uid}\"\ntenant = \"{}\"",
                names[(pod as usize - 20) % tenants]
            )?;
        }
    }
    let n_processes: usize = gpus.iter().map(Vec::len).sum();
    // The GPUs as NVML would answer at `now_us`: the second's samples and the counters.
    let snapshot = move |now_us: u64| {
        let gpus = gpus
            .iter()
            .enumerate()
            .map(|(i, procs)| {
                let used: u64 = procs.iter().map(|p| p.1).sum::<u64>() + GIB;
                let ts = |k: u64| now_us - 1_000_000 + k * 1_000_000 / 6;
                let busy = (1..=6)
                    .map(|k| format!(r#"{{"ts_us": {}, "sm": 90}}"#, ts(k)))
                    .collect::<Vec<_>>()
                    .join(",");
                let samples = procs
                    .iter()
                    .flat_map(|(pid, _)| {
                        (1..=6).map(move |k| {
                            format!(r#"{{"pid": {pid}, "ts_us": {}, "sm": 1, "mem": 1}}"#, ts(k))
                        })
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let procs = procs
                    .iter()
                    .map(|(pid, b)| format!(r#"{{"pid": {pid}, "used_bytes": {b}}}"#))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    r#"{{"index": {i}, "uuid": "GPU-{i}", "used_bytes": {used}, "total_bytes": {}, "processes": [{procs}],
                      "timestamp_us": {now_us}, "energy_mj": {}, "busy_samples": [{busy}], "process_samples": [{samples}]}}"#,
                    80 * GIB,
                    now_us / 2_000
                )
            })
            .collect::<Vec<_>>()
            .join(",\n");
        format!("{{\"gpus\": [{gpus}]}}")
    };
    let gpu_file = paths.dir.join("gpus.json");
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    std::fs::write(&gpu_file, snapshot(now_us()))?;
    // A new reading every second, written whole (this process's CPU, not the agent's).
    let stop_writer = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, file) = (stop_writer.clone(), gpu_file.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The bench's clock: one reading per second.
                std::thread::sleep(Duration::from_secs(1));
                let tmp = file.with_extension("tmp");
                std::fs::write(&tmp, snapshot(now_us())).unwrap();
                std::fs::rename(&tmp, &file).unwrap();
            }
        })
    };

    let mut config = format!(
        "pin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n\n[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 1000\nproc_root = {:?}\n{workloads}\n[tagging]\nsocket_path = {:?}\n\n",
        paths.pin_dir,
        gpu_file.display(),
        proc_root,
        paths.socket
    );
    for n in &names {
        writeln!(config, "[[tenants]]\nname = \"{n}\"")?;
    }
    // One endpoint per tenant, alert mode (nothing sends to them: they cost the egress
    // program its header parse and lookups on every packet).
    for (i, n) in names.iter().enumerate() {
        writeln!(
            config,
            "[[cross_tenant.endpoints]]\ntenant = \"{n}\"\naddress = \"10.{}.{}.{}\"\nport = 6333\nmode = \"alert\"",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        )?;
    }

    let load_before = loadavg();
    let started = Instant::now();
    let agent = Agent::start(agent_bin, &paths, &config);
    let start_time = started.elapsed();
    let pid = agent.child.id();
    let rss_idle = rss_kib(pid);

    // 50,000 tagged sockets, tenants round robin, from holders of at most 15,000 each.
    let per_holder = 15_000;
    let tenant_list = names.join(",");
    let tagging = Instant::now();
    let holders: Vec<SocketHolder> = std::thread::scope(|scope| {
        let mut spawned = Vec::new();
        let mut left = sockets;
        while left > 0 {
            let n = left.min(per_holder);
            left -= n;
            let (tenant_list, socket) = (&tenant_list, &paths.socket);
            spawned.push(scope.spawn(move || SocketHolder::spawn(&[], socket, tenant_list, n)));
        }
        spawned.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tag_secs = tagging.elapsed().as_secs_f64();

    // KV reports of the shared servers cannot come from here (a report speaks for the caller's
    // own pod), so the split is exercised by the unit tests; here the servers' memory is shared.
    let m = agent.wait_for("every socket counted", |m| {
        m.get("bulkhead_map_entries", &[("map", "BH_SOCK_TAGS")]) == sockets as f64
    });
    let rss_tagged = rss_kib(pid);

    // Scrape time: `scrapes` scrapes back to back.
    let mut times = Vec::new();
    let mut body_len = 0;
    for _ in 0..scrapes {
        let t = Instant::now();
        let (status, body) = agent.get("/metrics");
        times.push(t.elapsed());
        assert_eq!(status, 200);
        body_len = body.len();
    }
    times.sort();
    let series = Metrics::parse(&agent.get("/metrics").1)
        .text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();

    // CPU over the window, one scrape every 15 s (and the GPU poll every second).
    let poller = poller_tid(pid);
    let cpu0 = cpu_time(pid);
    let poller0 = poller_cpu(pid, poller);
    let busy0 = gpu_busy(&agent.metrics());
    let t0 = Instant::now();
    let mut next = t0;
    while t0.elapsed() < window {
        if Instant::now() >= next {
            agent.get("/metrics");
            next += Duration::from_secs(15);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = (cpu_time(pid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let poller_cpu = (poller_cpu(pid, poller) - poller0).as_secs_f64() / t0.elapsed().as_secs_f64();
    stop_writer.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let rss_end = rss_kib(pid);
    let load_after = loadavg();

    let m2 = agent.metrics();
    let polls = m2.get("bulkhead_gpu_polls_total", &[]);
    let busy = gpu_busy(&m2) - busy0;
    anyhow::ensure!(
        busy > 0.0,
        "the agent attributed no GPU time during the window: the scripted readings were not read"
    );
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n## bench agent: {tenants} tenants, {sockets} tagged sockets, {tenants} endpoints, 8 GPUs / {n_processes} processes with utilization samples polled every second\n"
    )?;
    writeln!(
        out,
        "load average before: {load_before}; after: {load_after}\n"
    )?;
    writeln!(out, "| measure | value |")?;
    writeln!(out, "|---|---|")?;
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (k, v) in [
        (
            format!("agent start (load, attach, {tenants} tenant ids and endpoints)"),
            format!("{:.0} ms", ms(start_time)),
        ),
        (
            format!(
                "tagging {sockets} sockets ({} holder processes, 2 threads each)",
                sockets.div_ceil(per_holder)
            ),
            format!("{tag_secs:.1} s ({:.0} tags/s)", sockets as f64 / tag_secs),
        ),
        (
            "/metrics scrape, median".into(),
            format!("{:.1} ms", ms(pct(0.5))),
        ),
        (
            "/metrics scrape, p90".into(),
            format!("{:.1} ms", ms(pct(0.9))),
        ),
        (
            "/metrics scrape, max".into(),
            format!("{:.1} ms", ms(*times.last().unwrap())),
        ),
        (
            "/metrics size".into(),
            format!("{} KiB, {series} series", body_len / 1024),
        ),
        (
            "agent CPU, one scrape / 15 s, GPU poll / 1 s".into(),
            format!("{:.2} % of a core over {} s", cpu * 100.0, window.as_secs()),
        ),
        (
            format!("agent RSS: started / {sockets} tagged / end"),
            format!("{rss_idle} / {rss_tagged} / {rss_end} KiB"),
        ),
        (
            "BH_SOCK_TAGS entries".into(),
            format!(
                "{}",
                m.get("bulkhead_map_entries", &[("map", "BH_SOCK_TAGS")])
            ),
        ),
        (
            "BH_TENANT_IDS fill".into(),
            format!(
                "{} / {} ({:.1} %)",
                m.get("bulkhead_map_entries", &[("map", "BH_TENANT_IDS")]),
                m.get("bulkhead_map_capacity", &[("map", "BH_TENANT_IDS")]),
                m.get("bulkhead_map_fill_ratio", &[("map", "BH_TENANT_IDS")]) * 100.0
            ),
        ),
        (
            "BH_ENDPOINTS fill".into(),
            format!("{tenants} / {}", agent_common::ENDPOINTS_MAX_ENTRIES),
        ),
        (
            format!("GPU poller thread CPU ({n_processes} processes, 6 samples each a second)"),
            format!(
                "{:.2} % of a core over {} s",
                poller_cpu * 100.0,
                window.as_secs()
            ),
        ),
        (
            "GPU busy seconds attributed during the window".into(),
            format!("{busy:.1} s (8 GPUs at 90 %)"),
        ),
        ("GPU polls during the run".into(), format!("{polls}")),
    ] as [(String, String); 14]
    {
        writeln!(out, "| {k} | {v} |")?;
    }
    let by_tenant: BTreeMap<String, f64> = names
        .iter()
        .take(3)
        .map(|n| {
            (
                n.clone(),
                m.get("bulkhead_tagged_sockets", &[("tenant", n)]),
            )
        })
        .collect();
    writeln!(
        out,
        "\nbulkhead_tagged_sockets of the first tenants: {by_tenant:?}"
    )?;
    drop(holders);
    agent.stop();
    Ok(())
}

/// The agent's GPU poller thread (named `gpu-poller`).
fn poller_tid(pid: u32) -> u32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "gpu-poller")
        })
        .expect("the agent has a gpu-poller thread")
}

/// User + system CPU time of one thread so far.
fn poller_cpu(pid: u32, tid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// Busy seconds the agent attributed so far, all GPUs and tenants.
fn gpu_busy(m: &Metrics) -> f64 {
    m.text
        .lines()
        .filter(|l| l.starts_with("bulkhead_gpu_device_busy_seconds_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time in a `stat` file of /proc.
fn stat_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
