//! `cargo xtask bench ebpf`: what the agent's programs cost on the data path.
//!
//! Loopback TCP throughput with the programs detached and attached, in the same run, trials
//! interleaved so drift hits both sides alike; the figure is the ratio of the medians. While
//! attached, the kernel's BPF run statistics give the cost per program run (ns per packet per
//! hook).

use bulkhead_tests::harness::{Agent, Paths, tcp_pair};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let trials = arg("--trials", 5) as usize;
    let secs = Duration::from_millis(arg("--millis", 1500));
    let exe = std::env::current_exe()?;
    let agent_bin = exe.with_file_name("bulkhead-agent");
    let agent_bin = agent_bin.to_str().unwrap();
    if !bulkhead_tests::harness::require_bpf(agent_bin) {
        anyhow::bail!("the benchmark loads the eBPF programs: run it as root");
    }
    let paths = Paths::named("bench");
    let config = format!(
        "pin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n[tagging]\nsocket_path = {:?}\n[[tenants]]\nname = \"bench\"\n",
        paths.pin_dir, paths.socket
    );
    let mut bulk = (Vec::new(), Vec::new());
    let mut small = (Vec::new(), Vec::new());
    for trial in 0..trials {
        bulk.0.push(stream(None, secs, 128 << 10));
        small.0.push(stream(None, secs, 1024));
        let agent = Agent::start(agent_bin, &paths, &config);
        let client = agent.client();
        bulk.1.push(stream(Some(&client), secs, 128 << 10));
        small.1.push(stream(Some(&client), secs, 1024));
        agent.stop();
        eprintln!(
            "trial {trial}: bulk {:.2} -> {:.2} Gbit/s, 1 KiB writes {:.3} -> {:.3} Gbit/s",
            bulk.0[trial].gbps, bulk.1[trial].gbps, small.0[trial].gbps, small.1[trial].gbps
        );
    }

    // The kernel's run statistics cost time of their own, so they are on only for this last,
    // separate run, which measures the programs rather than the throughput.
    let stats_before = std::fs::read_to_string(STATS_SYSCTL).unwrap_or_default();
    std::fs::write(STATS_SYSCTL, "1")?;
    let agent = Agent::start(agent_bin, &paths, &config);
    let client = agent.client();
    let mut per_run_ns = Vec::new();
    for chunk in [128 << 10, 1024] {
        let before = prog_stats();
        stream(Some(&client), secs, chunk);
        let after = prog_stats();
        let (runs, ns) = (after.0 - before.0, after.1 - before.1);
        per_run_ns.push((chunk, runs, ns as f64 / runs.max(1) as f64));
    }
    agent.stop();
    let _ = std::fs::write(STATS_SYSCTL, stats_before.trim());

    println!(
        "\n## bench ebpf ({trials} interleaved trials of {} ms each, loopback TCP, one stream)\n",
        secs.as_millis()
    );
    println!(
        "| workload | detached (median) | attached (median) | attached / detached | CPU s/GiB detached | CPU s/GiB attached | attached / detached |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, (d, a)) in [
        ("128 KiB writes", &bulk),
        ("1 KiB writes, TCP_NODELAY", &small),
    ] {
        let tput = |v: &[Run]| median(&v.iter().map(|r| r.gbps).collect::<Vec<_>>());
        let cpu = |v: &[Run]| median(&v.iter().map(|r| r.cpu_s_per_gib).collect::<Vec<_>>());
        let (dt, at, dc, ac) = (tput(d), tput(a), cpu(d), cpu(a));
        println!(
            "| {name} | {dt:.2} Gbit/s | {at:.2} Gbit/s | {:.3} | {dc:.3} | {ac:.3} | {:.3} |",
            at / dt,
            ac / dc
        );
    }
    println!(
        "\nKernel BPF run statistics (kernel.bpf_stats_enabled=1, separate run; a loopback packet runs two programs, egress at the sender and ingress at the receiver; the statistics add their own clock reads to each run):\n"
    );
    println!("| workload | program runs | ns per run |");
    println!("|---|---|---|");
    for (chunk, runs, ns) in per_run_ns {
        println!("| {} B writes | {runs} | {ns:.0} |", chunk);
    }
    Ok(())
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given; RUSAGE_SELF is
    // always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One stream's figures: throughput, and CPU seconds per GiB moved (both ends are in this
/// process, so the kernel's work for both, the programs' included, is in its system time).
#[derive(Clone, Copy)]
struct Run {
    gbps: f64,
    cpu_s_per_gib: f64,
}

fn stream(tag: Option<&agent_common::client::AgentClient>, dur: Duration, chunk: usize) -> Run {
    let cpu0 = cpu_time();
    let gbps = stream_gbps(tag, dur, chunk);
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let gib = gbps * 1e9 / 8.0 * dur.as_secs_f64() / f64::from(1u32 << 30);
    Run {
        gbps,
        cpu_s_per_gib: cpu / gib,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One TCP stream for `dur`, `chunk` bytes per write; both ends tagged when a client is given.
fn stream_gbps(
    tag: Option<&agent_common::client::AgentClient>,
    dur: Duration,
    chunk: usize,
) -> f64 {
    let (mut c, mut s) = tcp_pair();
    if let Some(client) = tag {
        client.tag(c.as_fd(), "bench").expect("tag");
        client.tag(s.as_fd(), "bench").expect("tag");
    }
    c.set_nodelay(true).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let data = vec![0xa5u8; chunk];
    let start = Instant::now();
    while start.elapsed() < dur {
        for _ in 0..64 {
            c.write_all(&data).unwrap();
        }
    }
    let elapsed = start.elapsed();
    shutdown(c);
    let n = reader.join().unwrap();
    n as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

fn shutdown(c: TcpStream) {
    let _ = c.shutdown(std::net::Shutdown::Write);
}

/// (runs, ns) summed over the loaded programs named bulkhead_* (names are cut to 15 bytes).
fn prog_stats() -> (u64, u64) {
    let mut runs = 0;
    let mut ns = 0;
    for p in aya::programs::loaded_programs().flatten() {
        if p.name_as_str().is_some_and(|n| n.starts_with("bulkhead_")) {
            runs += p.run_count();
            ns += p.run_time().as_nanos() as u64;
        }
    }
    (runs, ns)
}
