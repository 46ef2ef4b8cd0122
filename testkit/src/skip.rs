//! A test that cannot run here (no root or BPF, no `redis-server`, no image): it says so and
//! is counted as skipped, except under a truthy `CI`, where it fails (never a silent pass).
//! The rule itself is `agent_common::skip` (the agent's tests use it without this crate).

pub use agent_common::skip::{ci_strict, skip, truthy};

/// `name` is on PATH as a file.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `bin --version` runs and succeeds.
pub fn runs(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `true` when `bin --version` runs; else a skip (a failure under CI) saying `why`, and
/// `false`: the caller returns.
pub fn require_runs(bin: &str, why: &str) -> bool {
    if runs(bin) {
        return true;
    }
    skip(why);
    false
}
