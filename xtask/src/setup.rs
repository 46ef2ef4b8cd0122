//! `cargo xtask setup`: the nightly's rust-src and a bpf-linker built against the nightly's own
//! libLLVM (Debian's LLVM is older than rustc's), cached under ~/.cache/bulkhead/bpf-linker.
//! A second run checks a stamp and returns at once. Also `redis-server` from Debian when
//! missing (the shared-limits tests start one).

use crate::run as sh;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("bulkhead/bpf-linker")
}

fn nightly(args: &[&str]) -> Result<String> {
    let out = Command::new("rustup")
        .args(["run", "nightly"])
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .context("running rustup")?;
    if !out.status.success() {
        bail!(
            "`rustup run nightly {}` failed: {}\nThe eBPF crate needs the nightly toolchain \
             (`rustup toolchain install nightly`).",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// $PATH with the cached bpf-linker first.
pub fn path_with_linker() -> Result<std::ffi::OsString> {
    let mut dirs = vec![cache_dir().join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    Ok(std::env::join_paths(dirs)?)
}

/// `redis-server` (and `redis-cli`) from Debian, for the shared-limits tests
/// (`sidecar/tests/redis_limits.rs`) and `bench sidecar --limits redis`.
pub fn redis() -> Result<()> {
    if crate::which("redis-server").is_some() && crate::which("redis-cli").is_some() {
        return Ok(());
    }
    eprintln!("setup: installing redis-server (the shared-limits tests run a real one)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "redis-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        if !install() {
            bail!(
                "could not install redis-server with apt-get (needs root and a Debian-like \
                 system); install it by hand, the shared-limits tests need it"
            );
        }
    }
    Ok(())
}

pub fn run() -> Result<()> {
    redis()?;
    let sysroot = PathBuf::from(nightly(&["rustc", "--print", "sysroot"])?);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !sysroot.join("bin/cargo-clippy").exists() {
        sh(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]))?;
    }

    let version = nightly(&["rustc", "-vV"])?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in `rustc +nightly -vV`")?
        .to_string();
    let stamp_text = format!("bpf-linker {BPF_LINKER_VERSION}\n{version}\n");
    let cache = cache_dir();
    let stamp = cache.join("stamp");
    let linker = cache.join("bin/bpf-linker");
    if linker.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&stamp_text) {
        eprintln!(
            "setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major}) is in {}",
            linker.display()
        );
        return Ok(());
    }

    // bpf-linker links against the LLVM that rustc itself uses: point LLVM_PREFIX at a folder
    // whose lib/libLLVM.so is the nightly's libLLVM.
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = cache.join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute on 2 cores)",
        libllvm.display()
    );
    sh(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(&cache)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))?;
    if !linker.is_file() {
        bail!("cargo install finished but {} is missing", linker.display());
    }
    std::fs::write(&stamp, stamp_text)?;
    Ok(())
}
