//! bulkhead-agent: per-tenant network accounting with eBPF, on every GPU node.
#![forbid(unsafe_code)]

use bulkhead_agent::config::Config;
use bulkhead_agent::exit::ExitStatus;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "bulkhead-agent", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the built-in default is used.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and print it.
    CheckConfig,
    /// Check, without changing anything, what the agent checks when it starts (privileges,
    /// bpffs mounted or mountable, cgroup v2, kernel BTF, bpf() allowed); exit 0 when it
    /// would pass them, else with the exit code the agent would (agent/README.md).
    Preflight,
    /// Print the built-in default configuration.
    DefaultConfig,
    /// Detach programs left attached by a stopped agent (detach_on_shutdown = false) by
    /// removing their pinned links; with --remove-maps, delete the pinned maps too (this
    /// loses all counters and tags).
    Cleanup {
        #[arg(long)]
        remove_maps: bool,
    },
    /// Poll the configured GPU source once and print each GPU's memory by tenant and each
    /// process's cgroup and workload, as the running agent would attribute them (without the
    /// sidecars' KV reports). Loads no eBPF; exit 69 when the source cannot be read.
    GpuStatus {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let config = match &cli.config {
        Some(path) => Config::from_file(path),
        None => Ok(Config::builtin()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead-agent: {e}");
            return ExitStatus::Config.into();
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!("{config:#?}");
            ExitCode::SUCCESS
        }
        Command::Preflight => match bulkhead_agent::preflight(&config) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bulkhead-agent: {e}");
                e.exit_status().into()
            }
        },
        Command::DefaultConfig => {
            print!("{}", bulkhead_agent::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Cleanup { remove_maps } => {
            let cgroup = match bulkhead_agent::sys::resolve_cgroup(config.cgroup_path.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bulkhead-agent: {e}");
                    return ExitStatus::from(&e).into();
                }
            };
            match bulkhead_agent::datapath::cleanup(&config.pin_dir, &cgroup, remove_maps) {
                Ok(removed) => {
                    for p in removed {
                        println!("removed {}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "bulkhead-agent: cleanup of {}: {e}",
                        config.pin_dir.display()
                    );
                    ExitStatus::OsError.into()
                }
            }
        }
        Command::GpuStatus { json } => gpu_status(&config, json),
        Command::Run => run(config, cli.config),
    }
}

fn gpu_status(config: &Config, json: bool) -> ExitCode {
    use bulkhead_agent::gpu::Role;
    // GPU time needs two readings: 1 s apart from NVML (a few of its sample periods), one
    // poll interval (at most 1 s) from a file.
    let window = if config.gpu.source.starts_with("file:") {
        std::time::Duration::from_millis(config.gpu.poll_interval_ms.min(1_000))
    } else {
        std::time::Duration::from_secs(1)
    };
    let status = match bulkhead_agent::gpu::one_shot(&config.gpu, window) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bulkhead-agent: gpu-status: {e}");
            return ExitStatus::Unavailable.into();
        }
    };
    let role = |r: &Option<Role>| match r {
        Some(Role::Dedicated(t)) => format!("tenant {t}"),
        Some(Role::Shared(w)) => format!("shared server {w}"),
        Some(Role::MpsServer) => "MPS server (its clients' work)".to_string(),
        None => "unattributed".to_string(),
    };
    let (usage, processes, c) = (&status.usage, &status.processes, &status.compute);
    // Per GPU (or MIG instance): busy and energy by tenant, unattributed busy by reason.
    let per_unit = |map: &std::collections::BTreeMap<(String, String), f64>, gpu: &str| {
        map.iter()
            .filter(|((g, _), _)| g == gpu)
            .map(|((_, t), v)| (t.clone(), *v))
            .collect::<std::collections::BTreeMap<String, f64>>()
    };
    let units: std::collections::BTreeSet<&String> = c
        .sharing
        .keys()
        .chain(c.device_busy.keys())
        .chain(c.device_energy.keys())
        .collect();
    if json {
        let gpus: Vec<_> = usage
            .iter()
            .map(|g| {
                serde_json::json!({
                    "gpu": g.gpu, "uuid": g.uuid, "total_bytes": g.total_bytes,
                    "used_bytes": g.used_bytes, "memory": g.memory,
                })
            })
            .collect();
        let compute: serde_json::Map<String, serde_json::Value> = units
            .iter()
            .map(|u| {
                let reasons: std::collections::BTreeMap<&str, f64> = c
                    .unattributed
                    .iter()
                    .filter(|((g, _), _)| g == *u)
                    .map(|((_, r), v)| (*r, *v))
                    .collect();
                (
                    u.to_string(),
                    serde_json::json!({
                        "sharing": c.sharing.get(*u),
                        "device_busy_seconds": c.device_busy.get(*u),
                        "device_energy_joules": c.device_energy.get(*u),
                        "busy_seconds": per_unit(&c.busy, u),
                        "energy_joules": per_unit(&c.energy, u),
                        "unattributed_busy_seconds": reasons,
                        "counter_resets": c.resets.iter().filter(|((g, _), _)| g == *u).map(|((_, k), n)| (k.to_string(), *n)).collect::<std::collections::BTreeMap<String, u64>>(),
                    }),
                )
            })
            .collect();
        let procs: Vec<_> = processes
            .iter()
            .map(|p| {
                serde_json::json!({
                    "gpu": p.gpu, "pid": p.pid, "used_bytes": p.used_bytes,
                    "cgroup": p.cgroup, "workload": role(&p.role),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "gpus": gpus, "processes": procs,
                "window_seconds": status.window.as_secs_f64(), "compute": compute,
            })
        );
        return ExitCode::SUCCESS;
    }
    const MIB: u64 = 1 << 20;
    for g in usage {
        println!(
            "GPU {} ({}): {} of {} MiB used",
            g.gpu,
            g.uuid,
            g.used_bytes / MIB,
            g.total_bytes / MIB
        );
        for (tenant, bytes) in &g.memory {
            println!("  {tenant:<32} {:>10} MiB", bytes / MIB);
        }
    }
    println!(
        "GPU time over {:.1} s (a shared server's time is \"shared\" here: only the running agent hears its sidecar):",
        status.window.as_secs_f64()
    );
    if units.is_empty() {
        println!("  no compute readings (the source gives no utilization samples or timestamps)");
    }
    for u in &units {
        println!(
            "GPU {u}: {}, busy {:.3} s, energy {}",
            c.sharing.get(*u).copied().unwrap_or("-"),
            c.device_busy.get(*u).copied().unwrap_or(0.0),
            c.device_energy
                .get(*u)
                .map_or("not measured".to_string(), |j| format!("{j:.1} J"))
        );
        let energy = per_unit(&c.energy, u);
        for (tenant, b) in per_unit(&c.busy, u) {
            println!(
                "  {tenant:<32} {b:>8.3} s {:>10.1} J",
                energy.get(&tenant).copied().unwrap_or(0.0)
            );
        }
        for ((g, reason), b) in &c.unattributed {
            if g == *u {
                println!("  unattributed because {reason}: {b:.3} s");
            }
        }
    }
    for p in processes {
        println!(
            "pid {} on GPU {}: {} MiB, {} (cgroup {})",
            p.pid,
            p.gpu,
            p.used_bytes
                .map_or("?".to_string(), |b| (b / MIB).to_string()),
            role(&p.role),
            p.cgroup.as_deref().unwrap_or("unreadable").trim()
        );
    }
    ExitCode::SUCCESS
}

fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead-agent: cannot start the runtime: {e}");
            return ExitStatus::OsError.into();
        }
    };
    rt.block_on(async move {
        // Handlers first: a SIGTERM that comes while the agent starts must still shut it down
        // cleanly, not kill it with its programs half attached.
        let signal = shutdown_signal();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("SIGHUP handler");
        let mut agent = match bulkhead_agent::start(config).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("bulkhead-agent: {e}");
                return e.exit_status().into();
            }
        };
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                _ = hup.recv() => reload(&mut agent, path.as_deref()),
            }
        }
        tracing::info!("shutting down");
        agent.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// SIGHUP: re-read the config file and apply it, or keep the running config on any error.
fn reload(agent: &mut bulkhead_agent::RunningAgent, path: Option<&std::path::Path>) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running on the built-in config, nothing to reload");
        return;
    };
    if let Err(e) = agent.reload_file(path) {
        tracing::error!(error = %e, "SIGHUP: configuration not reloaded; the running one stays");
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on the first signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
