//! `cargo xtask bench ebpf`: what the agent's programs cost on the data path.
//!
//! Loopback TCP throughput in three arms, in the same run, trials interleaved (the order
//! alternates from trial to trial) so drift hits every arm alike; the figures are medians:
//!
//! * detached: no program of ours on the cgroup;
//! * empty: two `cgroup_skb` programs that only return 1 (ingress and egress), loaded here with
//!   raw `bpf()` calls: the cost of the cgroup hook itself, the floor any program pays;
//! * agent: the agent with its programs attached and both sockets tagged.
//!
//! Then a separate run with `kernel.bpf_stats_enabled=1` gives ns per program run for the empty
//! programs and the agent's.

use bulkhead_tests::harness::{Agent, Paths, tcp_pair};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Name of the empty programs (in the kernel's program list).
const EMPTY_NAME: &str = "bh_empty_skb";

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    Detached,
    Empty,
    Agent,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let trials = arg("--trials", 9) as usize;
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
    let cgroup = cgroup2_root()?;
    let load_before = loadavg();
    // Programs of ours already loaded (another agent or test on this machine, or links a
    // crashed test left pinned) run on every packet of every arm: say so.
    let foreign_before = foreign_programs();
    let arms = [Arm::Detached, Arm::Empty, Arm::Agent];
    // [arm][workload] -> runs; workload 0: bulk, 1: 1 KiB.
    let mut runs: Vec<[Vec<Run>; 2]> = arms.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    for trial in 0..trials {
        let mut order = arms;
        if trial % 2 == 1 {
            order.reverse();
        }
        for arm in order {
            let i = arms.iter().position(|a| *a == arm).unwrap();
            let (bulk, small) = match arm {
                Arm::Detached => (stream(None, secs, 128 << 10), stream(None, secs, 1024)),
                Arm::Empty => {
                    let _empty = EmptyPrograms::attach(&cgroup)?;
                    (stream(None, secs, 128 << 10), stream(None, secs, 1024))
                }
                Arm::Agent => {
                    let agent = Agent::start(agent_bin, &paths, &config);
                    let client = agent.client();
                    let r = (
                        stream(Some(&client), secs, 128 << 10),
                        stream(Some(&client), secs, 1024),
                    );
                    agent.stop();
                    r
                }
            };
            runs[i][0].push(bulk);
            runs[i][1].push(small);
        }
        eprintln!(
            "trial {trial}: bulk {:.2} / {:.2} / {:.2} Gbit/s, 1 KiB writes {:.3} / {:.3} / {:.3} Gbit/s (detached / empty / agent)",
            runs[0][0][trial].gbps,
            runs[1][0][trial].gbps,
            runs[2][0][trial].gbps,
            runs[0][1][trial].gbps,
            runs[1][1][trial].gbps,
            runs[2][1][trial].gbps,
        );
    }

    // The kernel's run statistics cost time of their own, so they are on only for this last,
    // separate run, which measures the programs rather than the throughput.
    let stats_before = std::fs::read_to_string(STATS_SYSCTL).unwrap_or_default();
    std::fs::write(STATS_SYSCTL, "1")?;
    let mut per_run = Vec::new();
    for chunk in [128 << 10, 1024] {
        let empty = EmptyPrograms::attach(&cgroup)?;
        let ids = empty.program_ids();
        let before = prog_stats(&ids);
        stream(None, secs, chunk);
        let after = prog_stats(&ids);
        drop(empty);
        let empty_ns = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
        let agent = Agent::start(agent_bin, &paths, &config);
        let client = agent.client();
        // Only this agent's programs (by the ids behind its pinned links): another agent's, or a
        // crashed test's left attached, would mix into the figures otherwise.
        let ids = linked_programs(&paths.pin_dir);
        let before = prog_stats(&ids);
        stream(Some(&client), secs, chunk);
        let after = prog_stats(&ids);
        agent.stop();
        let runs = after.0 - before.0;
        let agent_ns = (after.1 - before.1) as f64 / runs.max(1) as f64;
        per_run.push((chunk, runs, empty_ns, agent_ns));
    }
    let _ = std::fs::write(STATS_SYSCTL, stats_before.trim());
    let load_after = loadavg();

    println!(
        "\n## bench ebpf ({trials} interleaved trials of {} ms per arm and workload, loopback TCP, one stream)\n",
        secs.as_millis()
    );
    println!("load average before: {load_before}; after: {load_after}\n");
    println!(
        "other bulkhead_* programs loaded on the machine: {foreign_before} before, {} after (0 for a clean baseline)\n",
        foreign_programs()
    );
    println!(
        "| workload | detached | empty programs | agent | empty / detached | agent / detached | agent / empty | CPU s/GiB detached | empty | agent |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (w, name) in ["128 KiB writes", "1 KiB writes, TCP_NODELAY"]
        .iter()
        .enumerate()
    {
        let tput = |v: &[Run]| median(&v.iter().map(|r| r.gbps).collect::<Vec<_>>());
        let cpu = |v: &[Run]| median(&v.iter().map(|r| r.cpu_s_per_gib).collect::<Vec<_>>());
        let (d, e, a) = (tput(&runs[0][w]), tput(&runs[1][w]), tput(&runs[2][w]));
        println!(
            "| {name} | {d:.3} Gbit/s | {e:.3} Gbit/s | {a:.3} Gbit/s | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            e / d,
            a / d,
            a / e,
            cpu(&runs[0][w]),
            cpu(&runs[1][w]),
            cpu(&runs[2][w]),
        );
    }
    println!(
        "\nKernel BPF run statistics (kernel.bpf_stats_enabled=1, separate run; a loopback packet runs two programs, egress at the sender and ingress at the receiver; the statistics add their own clock reads to each run, the same for both):\n"
    );
    println!(
        "| workload | agent program runs | ns per run, empty program | ns per run, agent's programs | agent's own cost per run |"
    );
    println!("|---|---|---|---|---|");
    for (chunk, runs, empty, agent) in per_run {
        println!(
            "| {chunk} B writes | {runs} | {empty:.0} | {agent:.0} | {:.0} |",
            agent - empty
        );
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The cgroup-v2 root, where the agent attaches by default.
fn cgroup2_root() -> anyhow::Result<std::path::PathBuf> {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(p).join("cgroup.controllers").exists() {
            return Ok(p.into());
        }
    }
    anyhow::bail!("no cgroup-v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// Two `cgroup_skb` programs that return 1 and do nothing else, attached (with links) to the
/// cgroup for ingress and egress while this value lives.
struct EmptyPrograms {
    _links: Vec<OwnedFd>,
}

impl EmptyPrograms {
    /// Loaded programs named like the empty ones (no other program has that name).
    fn program_ids(&self) -> Vec<u32> {
        aya::programs::loaded_programs()
            .flatten()
            .filter(|p| p.name_as_str() == Some(EMPTY_NAME))
            .map(|p| p.id())
            .collect()
    }

    fn attach(cgroup: &Path) -> std::io::Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
        // r0 = 1; exit
        let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..EMPTY_NAME.len()].copy_from_slice(EMPTY_NAME.as_bytes());
        /// The prefix of `union bpf_attr` that BPF_PROG_LOAD reads, up to `expected_attach_type`.
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
        }
        /// The prefix of `union bpf_attr` that BPF_LINK_CREATE reads for a cgroup.
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
        }
        let cg = std::fs::File::open(cgroup)?;
        let mut links = Vec::new();
        for attach_type in [0u32, 1] {
            let attr = ProgLoad {
                prog_type: BPF_PROG_TYPE_CGROUP_SKB,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 0,
                log_size: 0,
                log_buf: 0,
                kern_version: 0,
                prog_flags: 0,
                prog_name: name,
                prog_ifindex: 0,
                expected_attach_type: attach_type,
            };
            // SAFETY: the kernel reads `size` bytes of `attr`, laid out as the BPF_PROG_LOAD
            // member of `union bpf_attr`; `insns` and `license` point to live memory of the
            // sizes given.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_LOAD,
                    &raw const attr,
                    std::mem::size_of::<ProgLoad>() as libc::c_uint,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a new program descriptor owned by nobody else.
            let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let attr = LinkCreate {
                prog_fd: prog.as_raw_fd() as u32,
                target_fd: cg.as_fd().as_raw_fd() as u32,
                attach_type,
                flags: 0,
            };
            // SAFETY: as above, for the BPF_LINK_CREATE member; both descriptors are open.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_LINK_CREATE,
                    &raw const attr,
                    std::mem::size_of::<LinkCreate>() as libc::c_uint,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a new link descriptor owned by nobody else; closing it detaches.
            links.push(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        Ok(Self { _links: links })
    }
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

/// (runs, ns) summed over the loaded programs with these ids.
fn prog_stats(ids: &[u32]) -> (u64, u64) {
    let mut runs = 0;
    let mut ns = 0;
    for p in aya::programs::loaded_programs().flatten() {
        if ids.contains(&p.id()) {
            runs += p.run_count();
            ns += p.run_time().as_nanos() as u64;
        }
    }
    (runs, ns)
}

/// Loaded programs named like the agent's (`bulkhead_*`, cut to 15 bytes by the kernel).
fn foreign_programs() -> usize {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("bulkhead_")))
        .count()
}

/// The ids of the programs behind the links an agent pinned in `pin_dir`.
fn linked_programs(pin_dir: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("link_") {
            continue;
        }
        if let Ok(link) = aya::programs::links::PinnedLink::from_pin(entry.path()) {
            let link: aya::programs::links::FdLink = link.into();
            if let Ok(info) = link.info() {
                ids.push(info.program_id());
            }
        }
    }
    ids
}
