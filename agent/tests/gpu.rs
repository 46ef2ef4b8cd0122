//! GPU memory attribution through the real agent, with a scripted GPU source (a JSON file the
//! agent re-reads each poll) and a scripted /proc; and the NVML source: on a machine without an
//! NVIDIA driver (CI) it must say so once and run on, on a GPU node it must report the GPUs.

use agent_common::proto::ErrorCode;
use bulkhead_tests::harness::*;
use std::collections::BTreeMap;
use std::path::Path;

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");
const GIB: u64 = 1 << 30;

fn gpu_mem(m: &Metrics, tenant: &str, gpu: &str) -> u64 {
    m.get(
        "bulkhead_gpu_memory_bytes",
        &[("tenant", tenant), ("gpu", gpu)],
    ) as u64
}

fn kv(m: &Metrics, tenant: &str, gpu: &str) -> u64 {
    m.get(
        "bulkhead_kv_cache_bytes",
        &[("tenant", tenant), ("gpu", gpu)],
    ) as u64
}

fn write_cgroup(proc_root: &Path, pid: u32, cgroup: &str) {
    std::fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
    std::fs::write(
        proc_root.join(format!("{pid}/cgroup")),
        format!("0::{cgroup}\n"),
    )
    .unwrap();
}

#[test]
fn the_nvml_source_reports_the_gpus_or_says_once_that_it_cannot() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let config = paths.config("").replace(
        "[tagging]",
        "[gpu]\nsource = \"nvml\"\npoll_interval_ms = 1000\n\n[tagging]",
    );
    let agent = Agent::start(AGENT, &paths, &config);
    if std::path::Path::new("/dev/nvidiactl").exists() {
        // A GPU node: the same configuration must find NVML and report every GPU's memory.
        let m = agent.wait_for("bulkhead_nvml_up 1 and the GPUs' memory", |m| {
            m.text.contains("bulkhead_nvml_up 1")
                && m.text.contains("bulkhead_gpu_memory_total_bytes{")
        });
        assert!(!m.text.contains("bulkhead_nvml_up 0"), "{}", m.text);
        return;
    }
    let line = agent.wait_for_log("the NVML line", |l| {
        l.contains("GPU memory attribution unavailable")
    });
    assert!(line.contains("NVML"), "{line}");
    let m = agent.wait_for("bulkhead_nvml_up 0", |m| {
        m.text.contains("bulkhead_nvml_up 0")
    });
    assert!(!m.text.contains("bulkhead_gpu_memory_bytes{"), "{}", m.text);
    // Tagging and counting work as ever.
    let (c, _s) = tcp_pair();
    use std::os::fd::AsFd;
    agent.client().tag(c.as_fd(), "alpha").unwrap();
}

#[test]
fn gpu_memory_is_attributed_to_dedicated_pods_and_split_by_kv_reports() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let proc_root = paths.dir.join("proc");
    let dedicated = "/kubepods.slice/kubepods-pod11aa_22bb.slice/cri-containerd-1.scope";
    let shared = "/kubepods.slice/kubepods-pod33cc_44dd.slice/cri-containerd-2.scope";
    write_cgroup(&proc_root, 1001, dedicated);
    write_cgroup(&proc_root, 1002, shared);
    write_cgroup(&proc_root, 1003, "/system.slice/unknown.service");
    // This test process plays the shared server's sidecar: it is in the same pod. The agent
    // reads a caller's PID from its pidfd in `<proc_root>/self/fdinfo`, so the scripted /proc's
    // `self` is the real one.
    std::os::unix::fs::symlink("/proc/self", proc_root.join("self")).unwrap();
    let me = std::process::id();
    write_cgroup(&proc_root, me, shared);
    let gpus = paths.dir.join("gpus.json");
    let snapshot = |extra: &str| {
        format!(
            r#"{{"gpus": [
              {{"index": 0, "uuid": "GPU-aaaa", "used_bytes": {u0}, "total_bytes": {t},
                "processes": [{{"pid": 1001, "used_bytes": {p1}}}, {{"pid": 1002, "used_bytes": {p2}}},
                              {{"pid": 1003, "used_bytes": {p3}}}{extra}]}},
              {{"index": 1, "uuid": "GPU-bbbb", "used_bytes": {p2}, "total_bytes": {t},
                "processes": [{{"pid": 1002, "used_bytes": {p2}}}]}}
            ]}}"#,
            u0 = 61 * GIB,
            t = 80 * GIB,
            p1 = 10 * GIB,
            p2 = 40 * GIB,
            p3 = 10 * GIB,
        )
    };
    // Two garbled entries: PID 0, and PID 1001 twice.
    let garbled = format!(
        r#", {{"pid": 0, "used_bytes": 5}}, {{"pid": 1001, "used_bytes": {}}}"#,
        GIB
    );
    std::fs::write(&gpus, snapshot(&garbled)).unwrap();
    let config = paths.config("").replace(
        "[tagging]",
        &format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 50\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"11aa-22bb\"\ntenant = \"alpha\"\n\
             [[gpu.workloads]]\npod_uid = \"33cc-44dd\"\nshared = true\ntenants = [\"alpha\", \"beta\"]\n\n[tagging]",
            gpus.display(),
            proc_root
        ),
    ) + "[[tenants]]\nname = \"gamma\"\n";
    let agent = Agent::start(AGENT, &paths, &config);
    let m = agent.wait_for("the first attribution", |m| gpu_mem(m, "alpha", "0") > 0);
    assert_eq!(m.get("bulkhead_nvml_up", &[]), 1.0);
    assert_eq!(
        m.get("bulkhead_gpu_memory_total_bytes", &[("gpu", "0")]),
        (80 * GIB) as f64
    );
    assert_eq!(gpu_mem(&m, "alpha", "0"), 10 * GIB, "the dedicated pod");
    assert_eq!(
        gpu_mem(&m, "shared", "0"),
        40 * GIB,
        "no KV report yet: all shared"
    );
    assert_eq!(
        gpu_mem(&m, "unattributed", "0"),
        11 * GIB,
        "unknown process + driver"
    );
    assert!(m.get("bulkhead_nvml_garbled_entries_total", &[]) >= 2.0);

    // The sidecar reports per-tenant KV bytes; the server runs on both GPUs (tensor parallel),
    // so each GPU holds half of each tenant's KV cache.
    let report = BTreeMap::from([
        ("alpha".to_string(), 6 * GIB),
        ("beta".to_string(), 2 * GIB),
    ]);
    assert_eq!(agent.client().report_kv(&report).unwrap(), 2);
    let m = agent.wait_for("the KV split", |m| kv(m, "beta", "1") > 0);
    for gpu in ["0", "1"] {
        assert_eq!(kv(&m, "alpha", gpu), 3 * GIB);
        assert_eq!(kv(&m, "beta", gpu), GIB);
        assert_eq!(gpu_mem(&m, "shared", gpu), 36 * GIB);
    }
    assert_eq!(
        gpu_mem(&m, "alpha", "0"),
        13 * GIB,
        "dedicated pod plus KV share"
    );
    assert_eq!(gpu_mem(&m, "beta", "1"), GIB);

    // A report naming an unknown tenant is refused whole; so is one from outside the server.
    let bad = BTreeMap::from([("alpha".to_string(), GIB), ("zed".to_string(), GIB)]);
    let err = agent.client().report_kv(&bad).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownTenant), "{err}");
    write_cgroup(&proc_root, me, dedicated);
    let err = agent.client().report_kv(&report).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownWorkload), "{err}");
    write_cgroup(&proc_root, me, "/user.slice/session-1.scope");
    let err = agent.client().report_kv(&report).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownWorkload), "{err}");

    // The server reports only for its own tenants: gamma is the agent's, not the server's.
    write_cgroup(&proc_root, me, shared);
    let gamma = BTreeMap::from([("gamma".to_string(), GIB)]);
    let err = agent.client().report_kv(&gamma).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAllowed), "{err}");
    assert!(
        err.to_string().contains("gpu.workloads[1].tenants"),
        "{err}"
    );

    // A sidecar in a pod nobody configured is refused, and its report never makes the pod a
    // shared server: the pod's GPU process stays unattributed.
    let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    write_cgroup(
        &proc_root,
        me,
        &format!("/kubepods/burstable/pod{uid}/sidecar"),
    );
    write_cgroup(
        &proc_root,
        1003,
        &format!("/kubepods/burstable/pod{uid}/vllm"),
    );
    let only_beta = BTreeMap::from([("beta".to_string(), 4 * GIB)]);
    let err = agent.client().report_kv(&only_beta).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownWorkload), "{err}");
    assert!(err.to_string().contains(&format!("pod {uid}")), "{err}");
    let polls = agent.metrics().get("bulkhead_gpu_polls_total", &[]);
    let m = agent.wait_for("two more GPU polls", |m| {
        m.get("bulkhead_gpu_polls_total", &[]) >= polls + 2.0
    });
    assert_eq!(
        kv(&m, "beta", "0"),
        GIB,
        "beta's share of the configured server only"
    );
    assert_eq!(
        gpu_mem(&m, "unattributed", "0"),
        11 * GIB,
        "the unconfigured pod's process and the driver's memory"
    );

    // The GPU source fails: nvml_up drops to 0 and no stale attribution is exported.
    std::fs::write(&gpus, r#"{"error": "NVML: GPU is lost"}"#).unwrap();
    let m = agent.wait_for("nvml down", |m| m.text.contains("bulkhead_nvml_up 0"));
    assert_eq!(gpu_mem(&m, "alpha", "0"), 0);
}

#[test]
fn gpu_settings_need_a_restart_and_are_kept_on_reload() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let proc_root = paths.dir.join("proc");
    write_cgroup(
        &proc_root,
        1001,
        "/kubepods.slice/kubepods-pod11aa_22bb.slice/cri-containerd-1.scope",
    );
    let gpus = paths.dir.join("gpus.json");
    std::fs::write(
        &gpus,
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-aaaa", "used_bytes": {u}, "total_bytes": {t},
                "processes": [{{"pid": 1001, "used_bytes": {u}}}]}}]}}"#,
            u = 10 * GIB,
            t = 80 * GIB
        ),
    )
    .unwrap();
    let gpu_section = |tenant: &str, poll_ms: u64| {
        format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = {poll_ms}\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"11aa-22bb\"\ntenant = \"{tenant}\"\n\n[tagging]",
            gpus.display(),
            proc_root
        )
    };
    let cfg = paths.dir.join("reloaded.toml");
    std::fs::write(
        &cfg,
        paths
            .config("")
            .replace("[tagging]", &gpu_section("alpha", 50)),
    )
    .unwrap();
    let agent = Agent::start_file(AGENT, &paths, &cfg);
    agent.wait_for("alpha's pod", |m| gpu_mem(m, "alpha", "0") == 10 * GIB);

    // The pod handed to beta, and a poll a minute: both need a restart.
    std::fs::write(
        &cfg,
        paths
            .config("")
            .replace("[tagging]", &gpu_section("beta", 60_000)),
    )
    .unwrap();
    agent.hup();
    for field in ["gpu.poll_interval_ms", "gpu.workloads"] {
        agent.wait_for_log(field, |l| {
            l.contains("changing this field takes a restart") && l.contains(field)
        });
    }
    agent.wait_for_log("the reload", |l| l.contains("configuration reloaded"));
    // The poller runs on as started (every 50 ms) and attributes as started.
    let polls = agent.metrics().get("bulkhead_gpu_polls_total", &[]);
    let m = agent.wait_for("three more polls", |m| {
        m.get("bulkhead_gpu_polls_total", &[]) >= polls + 3.0
    });
    assert_eq!(gpu_mem(&m, "alpha", "0"), 10 * GIB);
    assert_eq!(
        gpu_mem(&m, "beta", "0"),
        0,
        "a gpu.workloads change was applied"
    );
    assert_eq!(
        m.get("bulkhead_config_reloads_total", &[("result", "ok")]),
        1.0
    );

    // Removing a tenant the kept gpu.workloads still name is refused whole.
    std::fs::write(
        &cfg,
        paths
            .config("")
            .replace("[[tenants]]\nname = \"alpha\"\n", "")
            .replace("[tagging]", &gpu_section("beta", 50)),
    )
    .unwrap();
    agent.hup();
    let line = agent.wait_for_log("the refused reload", |l| l.contains("not reloaded"));
    assert!(line.contains("gpu.workloads[0].tenant"), "{line}");
}

/// `bulkhead-agent gpu-status` reads the configured source once and explains the attribution
/// per process, without eBPF (so it runs on any node, root or not).
#[test]
fn gpu_status_prints_the_attribution_and_each_processes_workload() {
    let dir = std::env::temp_dir().join(format!("bulkhead-gpu-status-{}", std::process::id()));
    let proc_root = dir.join("proc");
    write_cgroup(
        &proc_root,
        2001,
        "/kubepods.slice/kubepods-pod11aa_22bb.slice/cri-containerd-1.scope",
    );
    write_cgroup(&proc_root, 2002, "/system.slice/other.service");
    let gpus = dir.join("gpus.json");
    std::fs::write(
        &gpus,
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-cccc", "used_bytes": {}, "total_bytes": {},
                "processes": [{{"pid": 2001, "used_bytes": {}}}, {{"pid": 2002, "used_bytes": {}}},
                              {{"pid": 2003, "used_bytes": null}}]}}]}}"#,
            13 * GIB,
            80 * GIB,
            8 * GIB,
            4 * GIB
        ),
    )
    .unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gpu]\nsource = \"file:{}\"\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"11aa-22bb\"\ntenant = \"alpha\"\n\
             [[tenants]]\nname = \"alpha\"\n",
            gpus.display(),
            proc_root
        ),
    )
    .unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["--config", cfg.to_str().unwrap(), "gpu-status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let memory = &v["gpus"][0]["memory"];
    assert_eq!(memory["alpha"], 8 * GIB, "{v}");
    // The unknown process and the memory no process accounts for (the driver).
    assert_eq!(memory["unattributed"], 5 * GIB, "{v}");
    let procs = v["processes"].as_array().unwrap();
    let workload = |pid: u64| {
        procs.iter().find(|p| p["pid"] == pid).unwrap()["workload"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(workload(2001), "tenant alpha");
    assert_eq!(workload(2002), "unattributed");
    assert_eq!(workload(2003), "unattributed", "no cgroup file for 2003");

    // The source cannot be read: a clear error naming it, exit 69.
    std::fs::remove_file(&gpus).unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["--config", cfg.to_str().unwrap(), "gpu-status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gpu-status") && stderr.contains("gpus.json"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
