//! The binary's behaviour on bad input and without privileges.

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");
use std::os::unix::process::CommandExt;
use std::process::Command;

#[test]
fn broken_config_is_one_clear_error_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("bulkhead-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[tenants]]\nname = \"has space\"\n").unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tenants[0].name"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = Command::new(AGENT)
        .args(["--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read config file /nonexistent.toml")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn default_config_round_trips() {
    let out = Command::new(AGENT).arg("default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(bulkhead_agent::config::Config::parse(&text, "default").is_ok());
}

#[test]
fn without_privileges_it_exits_with_one_clear_error() {
    if !nix::unistd::geteuid().is_root() {
        // Already unprivileged: run as we are.
        let out = Command::new(AGENT).output().unwrap();
        assert_eq!(out.status.code(), Some(77));
        return;
    }
    // As root, drop to nobody for the child.
    let out = Command::new(AGENT).uid(65534).gid(65534).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(
        stderr.contains("bulkhead-agent needs root, or the capabilities CAP_BPF"),
        "{stderr}"
    );
    assert!(stderr.contains("uid 65534"), "{stderr}");
}

#[test]
fn the_shipped_kubernetes_config_is_valid() {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/configmap.yaml"),
    )
    .unwrap();
    // The block scalar under `agent.toml: |`, dedented.
    let toml: String = yaml
        .lines()
        .skip_while(|l| l.trim() != "agent.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let config = bulkhead_agent::config::Config::parse(&toml, "deploy/agent/configmap.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.tenants.len(), 3);
    assert!(!config.detach_on_shutdown);
    assert_eq!(config.gpu.proc_root, std::path::PathBuf::from("/host/proc"));
    // Wired to deploy/otel-collector/.
    assert_eq!(
        config.telemetry.otlp.map(|o| o.endpoint).as_deref(),
        Some("http://otel-collector.bulkhead-system.svc:4318")
    );
}
