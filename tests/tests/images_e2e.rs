//! Smoke tests of the container images `cargo xtask images` builds (`cargo xtask test` builds them
//! before the tests run), run with podman the way the manifests in deploy/ run them:
//! the sidecar as deploy/example-vllm does (uid 65532, every capability dropped, read-only root
//! file system, keys as mounted files), the agent as the DaemonSet does (uid 0, every capability
//! dropped but BPF, NET_ADMIN and PERFMON, read-only root file system, the host's bpffs, cgroup
//! and /proc mounted). Without podman or the images the tests are skipped, except under CI=true,
//! where they fail.
//!
//! Both containers use the host's network namespace (`--network host`): the sidecar reaches
//! bulkhead-sim on the host's loopback and the test reaches the admin ports. On this kind of
//! machine podman needs `--runtime runc` (crun refuses the hybrid cgroup layout) and explicit
//! `--ulimit`s (raising rlimits is refused); see deploy/README.md, "Troubleshooting".

use base64::Engine;
use bulkhead_testkit::free_port;
use bulkhead_tests::harness::*;
use bulkhead_tests::stack::{GATEWAY_KEY, GATEWAY_KEY_ID, TempDir, gateway_headers};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `podman run` with what this kind of machine needs.
const PODMAN_RUN: &[&str] = &[
    "run",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--pull=never",
    // As Kubernetes' readOnlyRootFilesystem: no tmpfs on /tmp, /run and /var/tmp either.
    "--read-only",
    "--read-only-tmpfs=false",
    "--security-opt",
    "no-new-privileges",
];

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

/// True when podman runs and has `image`; otherwise skipped with a message, or a failure under
/// CI=true.
fn require_image(image: &str) -> bool {
    let why = match Command::new("podman")
        .args(["image", "exists", image])
        .status()
    {
        Ok(s) if s.success() => return true,
        Ok(_) => format!("podman has no image {image}: run `cargo xtask images --profile dev`"),
        Err(e) => format!("podman cannot run ({e}): `cargo xtask images` installs it"),
    };
    agent_common::skip::skip(&format!("the image smoke test cannot run: {why}"));
    false
}

/// A container removed (with its logs printed) when the test ends, passing or not.
struct Container(String);

impl Container {
    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of container {} ---\n{}", self.0, self.logs());
        }
        let _ = podman(&["rm", "-f", "-t", "2", &self.0]);
    }
}

fn start(name: &str, args: &[String]) -> Container {
    let _ = podman(&["rm", "-f", name]);
    let mut all: Vec<&str> = PODMAN_RUN.to_vec();
    all.extend(["-d", "--name", name]);
    all.extend(args.iter().map(String::as_str));
    let out = podman(&all);
    assert!(
        out.status.success(),
        "podman {}: {}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Container(name.to_string())
}

/// The text of the block scalar `key: |` in a YAML ConfigMap (indented 4 spaces under `data:`).
fn configmap_file(yaml: &str, key: &str) -> String {
    let start = yaml
        .find(&format!("  {key}: |\n"))
        .unwrap_or_else(|| panic!("no {key} in the ConfigMap"));
    let body = &yaml[start..];
    let mut out = String::new();
    for line in body.lines().skip(1) {
        if let Some(l) = line.strip_prefix("    ") {
            out.push_str(l);
        } else if !line.trim().is_empty() {
            break;
        }
        out.push('\n');
    }
    out
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in\n{text}");
    text.replacen(from, to, 1)
}

/// Polls `GET path` on `addr` until it answers 200 or `container` exits.
fn wait_ready(addr: SocketAddr, path: &str, container: &Container) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = try_http_get(addr, path) {
            return;
        }
        let running = podman(&["inspect", "--format", "{{.State.Running}}", &container.0]);
        assert!(
            String::from_utf8_lossy(&running.stdout).trim() == "true",
            "container {} exited before {path} answered 200",
            container.0
        );
        assert!(
            Instant::now() < deadline,
            "{path} on {addr} not 200 within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_image_answers_a_signed_request_through_to_the_sim() {
    let image = format!("bulkhead-sidecar:{VERSION}");
    if !require_image(&image) {
        return;
    }
    let sim = bulkhead_sim::SimHandle::start(bulkhead_sim::SimConfig::default())
        .await
        .expect("start the sim");
    let dir = TempDir::new("image-sidecar");
    // The Secret: one file per key id, base64, mode 0440, group 65532 (the pod's fsGroup).
    let keys = dir.0.join("keys");
    std::fs::create_dir(&keys).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    for (id, key) in [
        (GATEWAY_KEY_ID, GATEWAY_KEY),
        ("acme-batch", b"acme-batch-key-for-the-image-test"),
    ] {
        let f = keys.join(id);
        std::fs::write(&f, b64.encode(key)).unwrap();
        chown(&f, 0, 65532);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440)).unwrap();
    }
    // The audit emptyDir (group 65532 through fsGroup) and the agent's socket directory (no
    // agent here: the sidecar runs on without tagging).
    let audit = dir.0.join("audit");
    let run_dir = dir.0.join("run");
    std::fs::create_dir(&audit).unwrap();
    std::fs::create_dir(&run_dir).unwrap();
    chown(&audit, 65532, 65532);
    // deploy/example-vllm's config; only the addresses differ (the sim on the host's loopback,
    // free ports, as the container shares the host's network).
    let (port, admin_port) = (free_port(), free_port());
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/example-vllm/sidecar-configmap.yaml"),
    )
    .unwrap();
    let mut config = configmap_file(&yaml, "sidecar.toml");
    config = replace_once(
        &config,
        "url = \"http://127.0.0.1:8000\"",
        &format!("url = \"{}\"", sim.url()),
    );
    config = replace_once(
        &config,
        "addr = \"0.0.0.0:8080\"",
        &format!("addr = \"127.0.0.1:{port}\""),
    );
    config = replace_once(
        &config,
        "admin_addr = \"0.0.0.0:9465\"",
        &format!("admin_addr = \"127.0.0.1:{admin_port}\""),
    );
    let config_file = dir.0.join("sidecar.toml");
    std::fs::write(&config_file, &config).unwrap();
    std::fs::set_permissions(&config_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let container = start(
        &format!("bulkhead-test-sidecar-{}", std::process::id()),
        &[
            "--network".into(),
            "host".into(),
            "--user".into(),
            "65532:65532".into(),
            "--cap-drop".into(),
            "ALL".into(),
            "-v".into(),
            format!("{}:/etc/bulkhead/sidecar.toml:ro", config_file.display()),
            "-v".into(),
            format!("{}:/etc/bulkhead/keys:ro", keys.display()),
            "-v".into(),
            format!("{}:/run/bulkhead", run_dir.display()),
            "-v".into(),
            format!("{}:/var/log/bulkhead", audit.display()),
            image.clone(),
            "run".into(),
            "--config".into(),
            "/etc/bulkhead/sidecar.toml".into(),
            "--log-format".into(),
            "json".into(),
        ],
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_ready(admin, "/readyz", &container);

    // A chat completion for acme, signed with the gateway's key, as the gateway would send it.
    let body = serde_json::json!({
        "model": "sim",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello from the image test"}],
    })
    .to_string();
    let headers = gateway_headers("acme", &body);
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in &headers {
        req.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let json = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {resp}"));
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );

    // An unsigned request is refused.
    let (status, _) = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/v1/models");
    assert_eq!(status, 401);

    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let m = Metrics::parse(&metrics);
    assert_eq!(
        m.get(
            "bulkhead_requests_total",
            &[("tenant", "acme"), ("code", "200")]
        ),
        1.0,
        "{metrics}"
    );
    // The audit record is written (as uid 65532, into the mounted directory) once the
    // request has finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit_log = std::fs::read_to_string(audit.join("acme.jsonl")).unwrap_or_default();
        if audit_log.lines().count() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acme's audit log: {audit_log:?}; the directory: {:?}",
            std::fs::read_dir(&audit)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(container);
    sim.stop().await;
}

/// The mount point of the host's cgroup-v2 hierarchy (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` in a hybrid layout).
fn cgroup2_mount() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(str::to_string))?
        })
        .expect("cgroup v2 is mounted")
}

/// podman's default seccomp profile with `bpf` allowed to holders of CAP_BPF and
/// `perf_event_open` to holders of CAP_PERFMON, as the runtimes' current default profiles do
/// (podman 4.3's, in Debian 12, allows them only with CAP_SYS_ADMIN: see deploy/README.md).
fn seccomp_profile(dir: &Path) -> String {
    let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
        .expect("podman's default seccomp profile");
    let mut p: serde_json::Value = serde_json::from_str(&text).unwrap();
    let calls = p["syscalls"].as_array_mut().unwrap();
    for c in calls.iter_mut() {
        if c["action"] == "SCMP_ACT_ERRNO"
            && let Some(names) = c["names"].as_array_mut()
        {
            names.retain(|n| n != "bpf" && n != "perf_event_open");
        }
    }
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        calls.push(serde_json::json!({
            "names": [name], "action": "SCMP_ACT_ALLOW", "args": [],
            "includes": {"caps": [cap]}, "excludes": {},
        }));
    }
    let f = dir.join("seccomp.json");
    std::fs::write(&f, p.to_string()).unwrap();
    f.to_string_lossy().into_owned()
}

#[test]
fn the_agent_image_passes_preflight_and_counts_a_tagged_socket_as_the_daemonset_runs_it() {
    let image = format!("bulkhead-agent:{VERSION}");
    if !require_image(&image) {
        return;
    }
    // systemd mounts bpffs on a node; the DaemonSet relies on it (no CAP_SYS_ADMIN).
    if !std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .unwrap();
        assert!(st.success(), "mount bpffs at /sys/fs/bpf (needs root)");
    }
    let paths = Paths::named(&format!("image-{}", std::process::id()));
    let etc = paths.dir.join("etc");
    let run_dir = paths.dir.join("run");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let admin_port = free_port();
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/configmap.yaml"),
    )
    .unwrap();
    // The DaemonSet's config; only the pin directory (this test's own), the admin address (the
    // container shares the host's network) and detaching at the end differ.
    let mut config = configmap_file(&yaml, "agent.toml");
    config = replace_once(
        &config,
        "pin_dir = \"/sys/fs/bpf/bulkhead\"",
        &format!("pin_dir = {:?}", paths.pin_dir),
    );
    config = replace_once(
        &config,
        "admin_addr = \"0.0.0.0:9464\"",
        &format!("admin_addr = \"127.0.0.1:{admin_port}\""),
    );
    config = replace_once(
        &config,
        "detach_on_shutdown = false",
        "detach_on_shutdown = true",
    );
    std::fs::write(etc.join("agent.toml"), &config).unwrap();
    let seccomp = seccomp_profile(&paths.dir);

    // The DaemonSet's securityContext and volumes.
    let mut args: Vec<String> = [
        "--user",
        "0:0",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "BPF,NET_ADMIN,PERFMON",
        "--security-opt",
        "apparmor=unconfined",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "--security-opt".into(),
        format!("seccomp={seccomp}"),
        "-v".into(),
        format!("{}:/etc/bulkhead:ro", etc.display()),
        "-v".into(),
        "/sys/fs/bpf:/sys/fs/bpf:rslave".into(),
        "-v".into(),
        format!("{}:/host/sys/fs/cgroup:ro", cgroup2_mount()),
        "-v".into(),
        "/proc:/host/proc:ro".into(),
        "-v".into(),
        format!("{}:/run/bulkhead", run_dir.display()),
    ]);
    let agent_args = [
        "--config",
        "/etc/bulkhead/agent.toml",
        "--log-format",
        "json",
    ];

    // The init container.
    let mut preflight: Vec<&str> = PODMAN_RUN.to_vec();
    preflight.push("--rm");
    preflight.extend(args.iter().map(String::as_str));
    preflight.push(&image);
    preflight.extend(agent_args);
    preflight.push("preflight");
    let out = podman(&preflight);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "preflight: {text}");
    assert!(text.contains("privileges: ok"), "{text}");

    // The agent container.
    let mut run_args = args.clone();
    run_args.extend(["--network".into(), "host".into(), image.clone()]);
    run_args.extend(agent_args.map(String::from));
    run_args.push("run".into());
    let container = start(
        &format!("bulkhead-test-agent-{}", std::process::id()),
        &run_args,
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_ready(admin, "/readyz", &container);

    // Tag a socket through the mounted socket directory, as a sidecar on the node does.
    let client = agent_common::client::AgentClient::new(run_dir.join("agent.sock"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut from = connect_tagged(&client, "acme", listener.local_addr().unwrap()).unwrap();
    let (mut to, _) = listener.accept().unwrap();
    const PAYLOAD: usize = 1 << 20;
    transfer(&mut from, &mut to, PAYLOAD);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(admin, "/metrics");
        let m = Metrics::parse(&text);
        if m.bytes("acme", "egress") >= PAYLOAD as u64 {
            assert_eq!(m.get("bulkhead_agent_up", &[]), 1.0, "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acme's egress bytes never reached {PAYLOAD}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(container);
}

/// The sidecar image carries the isolation probe (deploy/probe/cronjob.yaml runs it with
/// `command: [/usr/local/bin/bulkhead-probe]`, as the image's user).
#[test]
fn the_sidecar_image_carries_the_probe() {
    let image = format!("bulkhead-sidecar:{VERSION}");
    if !require_image(&image) {
        return;
    }
    let mut args = PODMAN_RUN.to_vec();
    args.extend([
        "--rm",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "/usr/local/bin/bulkhead-probe",
        &image,
        "--version",
    ]);
    let out = podman(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("bulkhead-probe {VERSION}")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
