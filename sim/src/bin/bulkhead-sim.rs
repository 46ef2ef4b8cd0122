//! bulkhead-sim: a simulated OpenAI-compatible inference server (see the `bulkhead_sim` library).
#![forbid(unsafe_code)]

use bulkhead_sim::{Sim, SimConfig, serve};
use clap::Parser;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Simulated OpenAI-compatible inference server")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// Time to first token, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    ttft_ms: f64,
    /// Inter-token latency, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    itl_ms: f64,
    /// Completion length in tokens (the request's max_tokens can ask for fewer).
    #[arg(long, default_value_t = 16)]
    tokens: u64,
    #[arg(long, default_value = "bulkhead-sim")]
    model: String,
    /// Words per prefix-cache block.
    #[arg(long, default_value_t = 16)]
    prefix_block_words: usize,
    /// Prefill milliseconds per prompt block not in the prefix cache.
    #[arg(long, default_value_t = 0.0)]
    prefill_ms_per_block: f64,
    /// Prefill milliseconds per prompt block found in the prefix cache.
    #[arg(long, default_value_t = 0.0)]
    cached_prefill_ms_per_block: f64,
    /// No prefix cache.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Answer a refused /reset_prefix_cache with 503 instead of 200 {"success": false}.
    #[arg(long)]
    reset_busy_503: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cfg = SimConfig {
        model: a.model,
        time_to_first_token: Duration::from_secs_f64(a.ttft_ms / 1e3),
        inter_token_latency: Duration::from_secs_f64(a.itl_ms / 1e3),
        completion_tokens: a.tokens,
        record_requests: 0,
        prefix_cache: !a.no_prefix_cache,
        prefix_block_words: a.prefix_block_words.max(1),
        prefill_per_block: Duration::from_secs_f64(a.prefill_ms_per_block / 1e3),
        cached_prefill_per_block: Duration::from_secs_f64(a.cached_prefill_ms_per_block / 1e3),
        reset_busy_status: if a.reset_busy_503 { 503 } else { 200 },
        ..SimConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        eprintln!("bulkhead-sim listening on {}", listener.local_addr()?);
        serve(listener, Sim::new(cfg), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        anyhow::Ok(())
    })
}
