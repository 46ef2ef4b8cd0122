//! bulkhead-agent: per-tenant network accounting with eBPF, on every GPU node.
#![forbid(unsafe_code)]

use bulkhead_agent::config::Config;
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
    /// Check that this process and kernel can run the agent (privileges, cgroup v2, bpffs
    /// mount point) without changing anything; exit 0 when they can.
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
            return ExitCode::from(64);
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
                ExitCode::from(e.exit_code() as u8)
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
                    return ExitCode::from(69);
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
                    ExitCode::from(71)
                }
            }
        }
        Command::Run => run(config, cli.config),
    }
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
            return ExitCode::from(71);
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
                return ExitCode::from(e.exit_code() as u8);
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
