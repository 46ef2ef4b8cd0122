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

/// Preflight runs the agent's own start checks: where the agent would fail on bpffs (not
/// mounted, and no CAP_SYS_ADMIN to mount it), preflight fails the same way, naming the path,
/// and with it all in place it passes. Runs as root, with CAP_SYS_ADMIN dropped by setpriv.
#[test]
fn preflight_fails_where_the_agent_fails_on_bpffs() {
    if !nix::unistd::geteuid().is_root() {
        agent_common::skip::skip("preflight's bpffs check needs root (to drop CAP_SYS_ADMIN)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        agent_common::skip::skip("no setpriv (util-linux) to drop CAP_SYS_ADMIN");
        return;
    }
    let dir = std::env::temp_dir().join(format!("bulkhead-preflight-{}", std::process::id()));
    let not_bpffs = dir.join("bpf");
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "bpffs = {not_bpffs:?}\npin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n\
             [gpu]\nsource = \"off\"\n[tagging]\nsocket_path = {:?}\n[[tenants]]\nname = \"a\"\n",
            not_bpffs.join("bulkhead"),
            dir.join("agent.sock"),
        ),
    )
    .unwrap();
    let without_sys_admin = |command: &str| {
        let out = Command::new("setpriv")
            .args([
                "--inh-caps=-sys_admin",
                "--bounding-set=-sys_admin",
                "--",
                AGENT,
                "--config",
            ])
            .arg(&cfg)
            .arg(command)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), stderr)
    };
    let named = format!("{} is not a bpffs mount", not_bpffs.display());
    let (code, preflight) = without_sys_admin("preflight");
    assert_eq!(code, Some(77), "{preflight}");
    assert!(preflight.contains(&named), "{preflight}");
    assert!(preflight.contains("CAP_SYS_ADMIN"), "{preflight}");
    let (code, agent) = without_sys_admin("run");
    assert_eq!(code, Some(77), "the agent fails alike: {agent}");
    assert!(agent.contains(&named), "{agent}");
    assert_eq!(
        nix::sys::statfs::statfs(&not_bpffs)
            .unwrap()
            .filesystem_type()
            .0 as u64,
        nix::sys::statfs::statfs(&dir).unwrap().filesystem_type().0 as u64,
        "nothing was mounted"
    );

    // With CAP_SYS_ADMIN the agent would mount it: preflight says so and changes nothing.
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&cfg)
        .arg("preflight")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(
            stdout.contains("not mounted; the agent will mount it"),
            "{stdout}"
        );
    } else {
        // A machine that cannot run the agent at all fails a later check, not bpffs.
        assert!(!stderr.contains(&named), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
