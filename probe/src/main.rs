//! bulkhead-probe: run the isolation smoke tests against a live sidecar (see the library docs).
//!
//! Exit code: 0 when no check failed, 1 when one did, 2 on a usage or configuration error,
//! 3 when every check passed but the result could not be written or pushed.
#![forbid(unsafe_code)]

use bulkhead_probe::config::{RawConfig, RawTenant, RawTiming};
use bulkhead_probe::{exit, push, run_probe, write_textfile};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "bulkhead-probe",
    version,
    about = "Isolation smoke tests against a live Bulkhead sidecar, as two test tenants",
    after_help = "Exit code: 0 no check failed, 1 a check failed, 2 usage or configuration error, \
                  3 the checks passed but the result could not be written or pushed."
)]
struct Args {
    /// TOML configuration (flags override its fields).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The sidecar's API, http://host:port (`target`).
    #[arg(long)]
    target: Option<String>,
    /// The model to ask for (`model`; default: the first of /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Tenant A's name (`tenant_a.name`).
    #[arg(long)]
    a_tenant: Option<String>,
    /// Tenant A's key id (`tenant_a.key_id`).
    #[arg(long)]
    a_key_id: Option<String>,
    /// Tenant A's key file, base64 (`tenant_a.key_file`).
    #[arg(long)]
    a_key_file: Option<PathBuf>,
    /// Tenant B's name (`tenant_b.name`).
    #[arg(long)]
    b_tenant: Option<String>,
    /// Tenant B's key id (`tenant_b.key_id`).
    #[arg(long)]
    b_key_id: Option<String>,
    /// Tenant B's key file, base64 (`tenant_b.key_file`).
    #[arg(long)]
    b_key_file: Option<PathBuf>,
    /// A file holding a canary of tenant A (`canary_file`): enables the canary checks.
    #[arg(long)]
    canary_file: Option<PathBuf>,
    /// The sidecar's metrics URL (`sidecar_metrics_url`): canary_prompt_blocked looks for its
    /// count there, canary_not_returned cross-checks its count of canaries in responses.
    #[arg(long)]
    sidecar_metrics_url: Option<String>,
    /// The node agent's metrics URL on the sidecar's node (`agent_metrics_url`).
    #[arg(long)]
    agent_metrics_url: Option<String>,
    /// Samples per timing check (`timing.samples`, default 5).
    #[arg(long)]
    samples: Option<usize>,
    /// Words per timing prompt (`timing.prompt_words`, default 1024).
    #[arg(long)]
    prompt_words: Option<usize>,
    /// A hit is faster than this times the miss median (`timing.hit_ratio`, default 0.5).
    #[arg(long)]
    hit_ratio: Option<f64>,
    /// The whole run at most, seconds (`timeout_secs`, default 600).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Write the result here (node-exporter textfile, replaced atomically; name it *.prom).
    #[arg(long)]
    textfile: Option<PathBuf>,
    /// Push the result to this Pushgateway (http://host:9091), job "bulkhead_probe".
    #[arg(long)]
    pushgateway: Option<String>,
    /// The Pushgateway grouping label `instance` (one per probed deployment).
    #[arg(long, requires = "pushgateway")]
    instance: Option<String>,
    /// Print nothing but failures.
    #[arg(long, short)]
    quiet: bool,
}

fn usage_error(msg: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("bulkhead-probe: {msg}");
    std::process::ExitCode::from(exit::USAGE as u8)
}

fn raw_config(args: &Args) -> Result<RawConfig, bulkhead_probe::ConfigError> {
    let mut raw = match &args.config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    fn set<T: Clone>(dst: &mut Option<T>, v: &Option<T>) {
        if v.is_some() {
            *dst = v.clone();
        }
    }
    set(&mut raw.target, &args.target);
    set(&mut raw.model, &args.model);
    set(&mut raw.canary_file, &args.canary_file);
    set(&mut raw.sidecar_metrics_url, &args.sidecar_metrics_url);
    set(&mut raw.agent_metrics_url, &args.agent_metrics_url);
    set(&mut raw.timeout_secs, &args.timeout_secs);
    let a = raw.tenant_a.get_or_insert_with(RawTenant::default);
    set(&mut a.name, &args.a_tenant);
    set(&mut a.key_id, &args.a_key_id);
    set(&mut a.key_file, &args.a_key_file);
    let b = raw.tenant_b.get_or_insert_with(RawTenant::default);
    set(&mut b.name, &args.b_tenant);
    set(&mut b.key_id, &args.b_key_id);
    set(&mut b.key_file, &args.b_key_file);
    let t = raw.timing.get_or_insert_with(RawTiming::default);
    set(&mut t.samples, &args.samples);
    set(&mut t.prompt_words, &args.prompt_words);
    set(&mut t.hit_ratio, &args.hit_ratio);
    Ok(raw)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match raw_config(&args).and_then(RawConfig::finish) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    if let Some(url) = &args.pushgateway {
        let ok = url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        if !ok {
            return usage_error(format!(
                "--pushgateway: {url:?} is not an http://host:port URL"
            ));
        }
    }
    if args
        .textfile
        .as_ref()
        .is_some_and(|p| p.file_name().is_none())
    {
        return usage_error("--textfile: needs a file name");
    }
    let report = run_probe(&cfg).await;
    if args.quiet {
        for c in report.checks.iter().filter(|c| !report_ok(c)) {
            println!("{}  {}  {}", c.outcome.as_str(), c.name, c.reason);
        }
    } else {
        print!("{}", report.summary());
    }
    let mut output_failed = false;
    if let Some(p) = &args.textfile
        && let Err(e) = write_textfile(p, &report.to_prometheus())
    {
        eprintln!("bulkhead-probe: writing {}: {e}", p.display());
        output_failed = true;
    }
    if let Some(url) = &args.pushgateway
        && let Err(e) = push(&cfg, url, args.instance.as_deref(), &report).await
    {
        eprintln!("bulkhead-probe: pushing to {url}: {e}");
        output_failed = true;
    }
    let code = match (report.exit_code(), output_failed) {
        (exit::OK, true) => exit::OUTPUT,
        (c, _) => c,
    };
    std::process::ExitCode::from(code as u8)
}

fn report_ok(c: &bulkhead_probe::CheckResult) -> bool {
    c.outcome != bulkhead_probe::Outcome::Fail
}
