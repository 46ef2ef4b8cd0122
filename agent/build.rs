//! Builds the eBPF programs (`../agent-ebpf`) with the nightly toolchain and bpf-linker, and
//! leaves the object in `$OUT_DIR/bulkhead.bpf.o` for `include_bytes!`.
//!
//! There is no fallback: without the eBPF toolchain the build fails and says to run
//! `cargo xtask setup`. An empty or stale object is never embedded in its place.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SETUP_HINT: &str = "run `cargo xtask setup` once (it installs the nightly's rust-src and \
builds bpf-linker against the nightly's LLVM), then build again";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("agent-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/Cargo.lock",
        "agent-ebpf/.cargo/config.toml",
        "agent-common/src",
        "agent-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=BULKHEAD_BPF_LINKER_DIR");

    let linker_dir = find_bpf_linker().unwrap_or_else(|| {
        fail(&format!(
            "bpf-linker was not found (looked in $BULKHEAD_BPF_LINKER_DIR, {}, and $PATH): {SETUP_HINT}",
            default_linker_dir().display()
        ))
    });
    check_rust_src();

    // A separate target dir: the outer cargo holds the lock on the workspace's.
    let target_dir = root.join("target").join("bpf");
    let path = match env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![linker_dir];
            dirs.extend(env::split_paths(&p));
            env::join_paths(dirs).unwrap()
        }
        None => linker_dir.into_os_string(),
    };
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("PATH", path);
    // Nothing of the outer (stable, host) build may leak into the nested one.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        fail(&format!(
            "could not run `rustup run nightly cargo`: {e}: {SETUP_HINT}"
        ))
    });
    if !status.success() {
        fail(&format!(
            "building the eBPF programs in {} failed ({status}); if the error above is about \
             rust-src or the linker, {SETUP_HINT}",
            ebpf_dir.display()
        ));
    }
    let obj = target_dir.join("bpfel-unknown-none/release/bulkhead");
    let bytes = std::fs::read(&obj).unwrap_or_else(|e| {
        fail(&format!(
            "the eBPF object {} is missing: {e}",
            obj.display()
        ))
    });
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        fail(&format!("{} is not an ELF object", obj.display()));
    }
    std::fs::write(out_dir.join("bulkhead.bpf.o"), &bytes).unwrap();
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}

fn default_linker_dir() -> PathBuf {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("bulkhead/bpf-linker/bin")
}

fn find_bpf_linker() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = env::var_os("BULKHEAD_BPF_LINKER_DIR") {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(default_linker_dir());
    if let Some(p) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&p));
    }
    candidates
        .into_iter()
        .find(|d| d.join("bpf-linker").is_file())
}

fn check_rust_src() {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output();
    let sysroot = match out {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => fail(&format!(
            "the nightly toolchain is not installed: {SETUP_HINT}"
        )),
    };
    let lib = sysroot.join("lib/rustlib/src/rust/library/core");
    if !lib.is_dir() {
        fail(&format!(
            "the nightly toolchain has no rust-src ({} is missing): {SETUP_HINT}",
            lib.display()
        ));
    }
}
