//! Developer tasks. `cargo xtask <task>`:
//!
//! * `setup`: install what the eBPF build needs and `redis-server` (idempotent; instant when
//!   done already).
//! * `test`: setup, then fmt, clippy and every test: the command CI runs.
//! * `demo`: setup, then run the demo (needs root: it loads the eBPF programs).
//!   `demo --replicas N`: N sidecar replicas of one model, limits local then shared in Redis
//!   (each tenant's admitted totals against its limit; no root).
//! * `bench ebpf`: loopback throughput detached, with empty programs, and with the agent's.
//! * `bench agent`: the agent at 1,000 tenants and 50,000 tagged sockets (scrape time, CPU,
//!   RSS, map fill).
//! * `bench sidecar`: the sidecar against bulkhead-sim directly and through nginx (installed
//!   with apt-get when missing, as the plain-proxy baseline). `bench sidecar --limits redis`:
//!   the limits backends compared (local, Redis strict, Redis leased), interleaved.
//!   `bench sidecar --telemetry`: telemetry off, at the default sampling and at 100 %, interleaved.
//! * `images [--profile release|dev] [--no-build]`: the `bulkhead-agent` and `bulkhead-sidecar`
//!   images (the latter with `bulkhead-probe` too), FROM scratch, offline, with podman
//!   (installed with apt-get when missing).
//! * `gpu-check`: on a machine with an NVIDIA GPU, two processes in two pod-like cgroups
//!   allocate known GPU memory (CUDA driver API, loaded at run time) and the agent's
//!   `bulkhead_gpu_memory_bytes{tenant}` is checked against NVML's per-process figures (5 %).
//! * `mutants [--fast | FILE ...]`: cargo-mutants over the security and accounting core (see
//!   TESTING.md); fails when a file scores under 90 % or a survivor is not argued equivalent.
//! * `structure`: the sidecar's module map drawn from its `use` lines (ARCHITECTURE.md holds it;
//!   a test checks) and the lines of code of every agent and sidecar source file.
//! * `deploy-check`: yamllint, kubernetes-validate, hadolint, promtool and consistency checks of
//!   `deploy/` (installs promtool and a Python venv with the validators when missing).
//!
//! xtask depends on no workspace crate: it must build before the eBPF toolchain exists.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

mod deploy_check;
mod gpu_check;
mod images;
mod mutants;
mod setup;
mod structure;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["setup"] => setup::run(),
        ["test"] => test(),
        ["demo", rest @ ..] => demo(rest),
        ["bench", "ebpf", rest @ ..] => bench_ebpf(rest),
        ["bench", "agent", rest @ ..] => bench_agent(rest),
        ["bench", "sidecar", rest @ ..] => bench_sidecar(rest),
        ["deploy-check"] => deploy_check::run(&root()),
        ["images", rest @ ..] => images::run_task(rest),
        ["gpu-check"] => gpu_check::run(None),
        ["gpu-check", "--bin-dir", dir] => gpu_check::run(Some(std::path::Path::new(dir))),
        ["mutants", rest @ ..] => mutants::run(rest),
        ["structure", rest @ ..] => structure::run(rest),
        ["gpu-alloc", bytes] => gpu_check::alloc(bytes),
        ["gpu-busy", fraction] => gpu_check::busy(fraction),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | test | demo [--serve | --replicas N] | bench ebpf | bench agent | bench sidecar | deploy-check | images | gpu-check [--bin-dir DIR] | mutants [--fast | FILE ...] | structure [--write]>\n\n\
                 setup       install the nightly rust-src and bpf-linker (cached), and redis-server\n\
                 test        setup, fmt, clippy, all tests (what CI runs)\n\
                 demo        run the agent with synthetic tagged traffic, print a per-tenant table\n\
                 demo --replicas N  N sidecars sharing limits in Redis vs local limits, admitted per tenant\n\
                 bench ebpf  loopback TCP throughput: detached, empty programs, the agent's programs\n\
                 bench agent  the agent at 1,000 tenants and 50,000 tagged sockets: scrape time, CPU, RSS, map fill\n\
                 bench sidecar [--limits redis | --fairness | --scan | --cache-tiers | --telemetry]  requests/s, added latency, TTFT, CPU, RSS: direct vs nginx vs sidecar (or the limits backends, the fair queue, leak scanning, cache tiers, telemetry's cost)\n\
                 deploy-check  lint and validate deploy/ (manifests, alert rules and their tests, dashboard)\n\
                 images [--profile release|dev] [--no-build]  build the agent and sidecar images with podman\n\
                 gpu-check   on an NVIDIA GPU machine: the agent's per-tenant GPU memory against NVML's per-process figures\n\
                 mutants [--fast | FILE ...]  cargo-mutants over the security core; fails under 90 % a file or on an unargued survivor (TESTING.md)\n\
                 structure [--write]  the sidecar's module map from its `use` lines, lines of code per file"
            );
            bail!("unknown task {:?}", args);
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", render(cmd));
    let status = cmd
        .current_dir(
            cmd.get_current_dir()
                .map(Path::to_path_buf)
                .unwrap_or_else(root),
        )
        .status()
        .with_context(|| format!("running {}", render(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", render(cmd));
    }
    Ok(())
}

pub fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Release builds of the sidecar and the simulator's binaries (bulkhead-bench starts
/// bulkhead-sim and bulkhead-sidecar from the directory it is in); that directory.
fn build_bench_bins() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bulkhead-sidecar",
        "-p",
        "bulkhead-sim",
        "--bins",
    ]))?;
    Ok(target_dir().join("release"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test() -> Result<()> {
    setup::run()?;
    let linker_path = setup::path_with_linker()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("rustfmt").args(["--edition", "2024", "--check", "agent-ebpf/src/main.rs"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "../target/bpf",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(root().join("agent-ebpf"))
        .env("PATH", &linker_path)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))?;
    deploy_check::run(&root())?;
    let ci = std::env::var("CI")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !matches!(ci.as_str(), "" | "0" | "false" | "no" | "off") {
        eprintln!(
            "CI is set: tests that cannot run here (no root or BPF, a missing tool) fail, never skip"
        );
    }
    // The images the smoke tests (tests/tests/images_e2e.rs) run, built from the debug binaries
    // `cargo test` uses anyway: no release build in CI.
    images::run_task(&["--profile", "dev"])?;
    ensure_jwt_signer()?;
    cargo_test(&["--workspace"])
}

/// The sidecar's JWT tests sign tokens with an independent library: python3 with
/// pyca/cryptography (Debian `python3-cryptography`), installed here when missing. The tests
/// themselves fail (never skip) without it.
fn ensure_jwt_signer() -> Result<()> {
    let ok = || {
        Command::new("python3")
            .args(["-c", "import cryptography"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok() {
        deploy_check::apt_install(&["python3-cryptography"])?;
        if !ok() {
            bail!("python3 cannot import cryptography after installing python3-cryptography");
        }
    }
    Ok(())
}

/// `cargo test`, its output passed through, closing with one line that totals every test
/// binary's "test result" line: `tests: N passed, N failed, N skipped`, where skipped counts
/// `#[ignore]`d tests and tests that recorded a skip at run time (in `BULKHEAD_SKIP_LOG`).
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    // Tests that cannot run here record themselves (agent_common::skip): counted as skipped.
    let skip_log = root().join("target").join("test-skips.log");
    let _ = std::fs::remove_file(&skip_log);
    cmd.arg("test")
        .args(args)
        .current_dir(root())
        .env("BULKHEAD_SKIP_LOG", &skip_log);
    eprintln!("+ {}", render(&cmd));
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if !skips.is_empty() {
        println!("skipped at run time ({}):", skips.len());
        for s in &skips {
            println!("  {s}");
        }
    }
    // A skipped test returns early and so reports itself as passed to libtest.
    let skipped = skips.len() as u64;
    println!(
        "tests: {} passed, {failed} failed, {} skipped",
        passed.saturating_sub(skipped),
        ignored + skipped
    );
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn demo(rest: &[&str]) -> Result<()> {
    if let Some(i) = rest.iter().position(|a| *a == "--replicas") {
        // Sidecar replicas sharing limits through Redis: no agent, no root.
        let n = rest.get(i + 1).copied().unwrap_or("2");
        setup::redis()?;
        let bin_dir = build_bench_bins()?;
        return run(Command::new(bin_dir.join("bulkhead-bench"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--replicas-demo", n, "--duration", "5"]));
    }
    setup::run()?;
    run_with_agent("bulkhead-demo", rest)
}

/// Builds `bin` (of the tests package) and the agent it runs, in release, and runs `bin`.
fn run_with_agent(bin: &str, rest: &[&str]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bulkhead-tests",
        "--bin",
        bin,
        "-p",
        "bulkhead-agent",
        "--bin",
        "bulkhead-agent",
    ]))?;
    run(Command::new(target_dir().join("release").join(bin)).args(rest))
}

fn bench_sidecar(rest: &[&str]) -> Result<()> {
    if rest == ["--scan"] {
        // The leak scanner in-process: the sidecar's example, no servers.
        return run(cargo().args([
            "run",
            "--release",
            "-p",
            "bulkhead-sidecar",
            "--example",
            "bench_scan",
        ]));
    }
    let limits = rest.contains(&"--limits");
    if limits {
        // `--limits redis` runs a redis-server beside the sidecars (and no nginx).
        setup::redis()?;
    }
    // The limits and telemetry comparisons run sidecars only (no nginx).
    if !limits && !rest.contains(&"--telemetry") && which("nginx").is_none() {
        eprintln!("bench sidecar: installing nginx (the plain-proxy baseline)");
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-q", "nginx-light"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            || (Command::new("apt-get")
                .args(["update", "-q"])
                .status()
                .is_ok()
                && Command::new("apt-get")
                    .args(["install", "-y", "-q", "nginx-light"])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false));
        if !installed {
            eprintln!("bench sidecar: nginx could not be installed; the nginx baseline is skipped");
        }
    }
    let bin_dir = build_bench_bins()?;
    run(Command::new(bin_dir.join("bulkhead-bench"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(rest))
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn bench_ebpf(rest: &[&str]) -> Result<()> {
    setup::run()?;
    run_with_agent("bulkhead-bench-ebpf", rest)
}

fn bench_agent(rest: &[&str]) -> Result<()> {
    setup::run()?;
    run_with_agent("bulkhead-bench-agent", rest)
}
