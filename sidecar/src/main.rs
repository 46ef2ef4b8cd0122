//! bulkhead-sidecar: `run --config FILE` (default), `sign ...`, `check-config FILE`,
//! `audit read --tenant T --key-file F`.
#![forbid(unsafe_code)]

use anyhow::{Context, bail};
use bulkhead_client::{SignOptions, TENANT_HEADER, sign_request};
use bulkhead_sidecar::config::{Config, ConfigError, KeyEncoding, read_key_file_as};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the request path allocates and frees many small,
/// short-lived buffers, and glibc's `_int_malloc`/`_int_free`/`malloc_consolidate` were about a
/// tenth of the sidecar's CPU (BENCHMARKS.md, 2026-12-07).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration error (EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    version,
    about = "Per-tenant authenticating, rate-limiting, fair-queuing proxy for OpenAI-compatible inference"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run(RunArgs),
    /// Sign a request as the trusted gateway does; prints the headers to send.
    Sign(SignArgs),
    /// Validate a configuration file (and read its key files).
    CheckConfig { file: PathBuf },
    /// Print the example configuration.
    ExampleConfig,
    /// Read audit records.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print one tenant's audit records as JSON lines, opening sealed ones with its key file
    /// and checking their chain (plain lines, gaps, duplicates, reordering, torn lines); exits
    /// 1 on any problem, each named on stderr.
    Read(AuditReadArgs),
}

#[derive(Args)]
struct AuditReadArgs {
    /// The tenant whose records to print.
    #[arg(long)]
    tenant: String,
    /// The tenant's audit key file (`<kid> <base64 key>` lines); needed for sealed records.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The audit directory: reads `<tenant>.jsonl` and its rotations, oldest first.
    #[arg(long, default_value = "/var/log/bulkhead")]
    dir: PathBuf,
    /// Read these files instead of the tenant's files in --dir.
    files: Vec<PathBuf>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log format: `text` or `json` (JSON lines), as the node agent's `--log-format`.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The same as `--log-format json` (the older spelling).
    #[arg(long, hide = true, conflicts_with = "log_format")]
    log_json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct SignArgs {
    /// File holding the HMAC key (base64 unless --raw-key).
    #[arg(long)]
    key_file: PathBuf,
    #[arg(long)]
    raw_key: bool,
    #[arg(long)]
    key_id: String,
    #[arg(long)]
    tenant: String,
    #[arg(long, default_value = "POST")]
    method: String,
    /// Request target, e.g. /v1/chat/completions
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Body file ("-" for stdin); none for an empty body.
    #[arg(long)]
    body_file: Option<PathBuf>,
    #[arg(long, default_value = "bulkhead")]
    label: String,
    /// Seconds until the signature expires.
    #[arg(long)]
    expires_in: Option<i64>,
    /// Extra covered components (header names or derived components).
    #[arg(long = "cover")]
    cover: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Some(Command::Run(a)) => serve(a),
        None => serve(cli.run),
        Some(Command::Sign(a)) => sign(a),
        Some(Command::CheckConfig { file }) => check(&file),
        Some(Command::Audit(AuditCommand::Read(a))) => audit_read(a),
        Some(Command::ExampleConfig) => {
            print!("{}", bulkhead_sidecar::config::EXAMPLE_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
    };
    match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The tenant's audit files in `dir`, oldest first (`<tenant>.jsonl.N` .. `.1`, then the
/// current `<tenant>.jsonl`).
fn audit_files(dir: &std::path::Path, tenant: &str) -> anyhow::Result<Vec<PathBuf>> {
    let base = format!("{tenant}.jsonl");
    let mut rotated = Vec::new();
    let mut current = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == base {
            current = Some(e.path());
        } else if let Some(n) = name
            .strip_prefix(&base)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            rotated.push((n, e.path()));
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    Ok(rotated.into_iter().map(|(_, p)| p).chain(current).collect())
}

fn audit_read(a: AuditReadArgs) -> anyhow::Result<ExitCode> {
    use bulkhead_sidecar::record::seal::SealKeys;
    let files = if a.files.is_empty() {
        audit_files(&a.dir, &a.tenant)?
    } else {
        a.files.clone()
    };
    match &a.key_file {
        Some(p) => {
            let keys = SealKeys::load(p).with_context(|| format!("key file {}", p.display()))?;
            audit_verify(&a.tenant, &keys, &files)
        }
        None => audit_plain(&a.tenant, &files),
    }
}

/// Each line of `files` in order, without its newline, and whether it had one.
fn for_each_line(
    files: &[PathBuf],
    mut each: impl FnMut(&std::path::Path, usize, &[u8], bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut buf = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let mut r = std::io::BufReader::new(file);
        let mut n = 0;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {}", f.display()))?
                == 0
            {
                break;
            }
            n += 1;
            let terminated = buf.last() == Some(&b'\n');
            if terminated {
                buf.pop();
            }
            each(f, n, &buf, terminated)?;
        }
    }
    Ok(())
}

/// With the tenant's keys: print the records that open, each once, and check their chain
/// (bulkhead_sidecar::record::seal::Verifier); exit 1 on any problem.
fn audit_verify(
    tenant: &str,
    keys: &bulkhead_sidecar::record::seal::SealKeys,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    use bulkhead_sidecar::record::seal::{Note, Verifier};
    use std::io::Write;
    fn report(notes: Vec<Note>) {
        for n in notes {
            let at = if n.at.is_empty() {
                String::new()
            } else {
                format!("{}: ", n.at)
            };
            let kind = if n.problem { "" } else { "note: " };
            eprintln!("{at}{kind}{}", n.text);
        }
    }
    let mut v = Verifier::new(keys, tenant);
    let mut out = std::io::stdout().lock();
    let mut shown = 0u64;
    let mut file = PathBuf::new();
    for_each_line(files, |f, n, line, terminated| {
        if f != file {
            file = f.to_path_buf();
            v.file(&f.display().to_string());
        }
        if let Some(plain) = v.line(n, line, terminated) {
            out.write_all(&plain)?;
            out.write_all(b"\n")?;
            shown += 1;
        }
        report(v.take_notes());
        Ok(())
    })?;
    v.finish();
    report(v.take_notes());
    out.flush()?;
    let problems = v.problems();
    eprintln!(
        "{shown} records of {tenant} from {} files; {} sealed records did not open; {}",
        files.len(),
        v.unopened(),
        if problems == 0 {
            "chain: ok".to_string()
        } else {
            format!("chain: {problems} problems (tampering or damage)")
        }
    );
    Ok(if problems > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Without keys: print the plain records of `tenant`; a sealed line is an error (give
/// --key-file).
fn audit_plain(tenant: &str, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    use bulkhead_sidecar::record::seal::is_sealed;
    use std::io::Write;
    let (mut shown, mut unopened) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for_each_line(files, |f, n, line, _| {
        if line.is_empty() {
            return Ok(());
        }
        if is_sealed(line) {
            eprintln!("{}:{n}: sealed; give --key-file", f.display());
            unopened += 1;
            return Ok(());
        }
        let tenant_matches = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .is_some_and(|v| v["tenant"] == tenant);
        if tenant_matches {
            out.write_all(line)?;
            out.write_all(b"\n")?;
            shown += 1;
        }
        Ok(())
    })?;
    eprintln!(
        "{shown} records of {tenant} from {} files; {unopened} sealed records did not open",
        files.len()
    );
    Ok(if unopened > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn check(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = match Config::from_file(file)
        .and_then(|c| c.load_keys().map(|_| c))
        .and_then(|c| c.load_audit_seals().map(|_| c))
        .and_then(|c| bulkhead_sidecar::auth::jwt::load_jwks_files(&c).map(|_| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead-sidecar: {}: {e}", file.display());
            return Ok(ExitCode::from(EX_CONFIG));
        }
    };
    println!(
        "{}: ok ({} tenants, {} keys)",
        file.display(),
        cfg.tenants.len(),
        cfg.keys.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn sign(a: SignArgs) -> anyhow::Result<ExitCode> {
    // The sidecar's own key reader: a key it would refuse is refused here too.
    let encoding = if a.raw_key {
        KeyEncoding::Raw
    } else {
        KeyEncoding::Base64
    };
    let key = read_key_file_as(&a.key_file, "--key-file", encoding).map_err(|e| match e {
        ConfigError::Invalid { field, message } => anyhow::anyhow!("{field}: {message}"),
        e => e.into(),
    })?;
    let body = match &a.body_file {
        None => Vec::new(),
        Some(p) if p.as_os_str() == "-" => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    };
    let method: http::Method = a.method.parse().context("bad --method")?;
    let uri: http::Uri = a.path.parse().context("bad --path")?;
    let mut headers = http::HeaderMap::new();
    headers.insert(TENANT_HEADER, a.tenant.parse().context("bad --tenant")?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let mut opts = SignOptions::new(a.key_id, now);
    opts.label = a.label;
    opts.expires = a.expires_in.map(|s| now + s);
    opts.extra_components = a.cover;
    for c in &opts.extra_components {
        if !c.starts_with('@') && !headers.contains_key(c.as_str()) {
            bail!(
                "--cover {c}: only derived components and the headers set here can be covered by the CLI"
            );
        }
    }
    sign_request(&method, &uri, &mut headers, &body, &key, &opts)?;
    for (k, v) in &headers {
        println!("{}: {}", k, v.to_str()?);
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(a: RunArgs) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt().with_env_filter(filter);
    if a.log_json || a.log_format == LogFormat::Json {
        sub.json().init();
    } else {
        sub.init();
    }
    let Some(path) = a.config else {
        bail!("--config FILE is required (see `bulkhead-sidecar example-config`)");
    };
    let config = match Config::from_file(&path).and_then(|c| c.load_keys().map(|_| c)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "bad configuration");
            return Ok(ExitCode::from(EX_CONFIG));
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `runtime.worker_threads`: 0 leaves tokio's default, one per CPU.
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let rt = builder.enable_all().build()?;
    let workers = rt.metrics().num_workers();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen.addr)
            .await
            .with_context(|| format!("binding listen.addr {}", config.listen.addr))?;
        let admin = tokio::net::TcpListener::bind(config.listen.admin_addr)
            .await
            .with_context(|| format!("binding listen.admin_addr {}", config.listen.admin_addr))?;
        tracing::info!(addr = %config.listen.addr, admin = %config.listen.admin_addr, workers, "bulkhead-sidecar listening");
        let opts = bulkhead_sidecar::Options {
            config_path: Some(path),
            sighup: true,
            ..Default::default()
        };
        match bulkhead_sidecar::run_with(listener, admin, config, opts, shutdown_signal()).await {
            // A key file or a setting only read at start (the audit's hash key, the salt key):
            // a configuration error like the ones found above.
            Err(bulkhead_sidecar::SidecarError::Config(e)) => {
                tracing::error!(error = %e, "bad configuration");
                Ok(ExitCode::from(EX_CONFIG))
            }
            r => r.map(|()| ExitCode::SUCCESS).map_err(Into::into),
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
