//! GPU memory attribution through the real agent, with a scripted GPU source (a JSON file the
//! agent re-reads each poll) and a scripted /proc; and the NVML source: on a machine without an
//! NVIDIA driver (CI) it must say so once and run on, on a GPU node it must report the GPUs.

use agent_common::proto::ErrorCode;
use bulkhead_tests::harness::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// Alpha's dedicated pod, and the shared server's pod (tenants alpha and beta).
const DEDICATED: &str = "/kubepods.slice/kubepods-pod11aa_22bb.slice/cri-containerd-1.scope";
const SHARED: &str = "/kubepods.slice/kubepods-pod33cc_44dd.slice/cri-containerd-2.scope";

/// A scripted `/proc` under `paths`: PID 1001 in alpha's dedicated pod, 1002 the shared
/// server, 1003 an unknown service, and this test process in the shared server's pod (it plays
/// that pod's sidecar: the agent reads a caller's PID from its pidfd in
/// `<proc_root>/self/fdinfo`, so the scripted /proc's `self` is the real one). Its root.
fn scripted_node(paths: &Paths) -> PathBuf {
    let proc_root = paths.dir.join("proc");
    write_cgroup(&proc_root, 1001, DEDICATED);
    write_cgroup(&proc_root, 1002, SHARED);
    write_cgroup(&proc_root, 1003, "/system.slice/unknown.service");
    std::os::unix::fs::symlink("/proc/self", proc_root.join("self")).unwrap();
    write_cgroup(&proc_root, std::process::id(), SHARED);
    proc_root
}

/// The agent's configuration for [`scripted_node`]: the GPU file source `gpus` polled every
/// 50 ms, and the two pods as workloads.
fn node_config(paths: &Paths, gpus: &Path, proc_root: &Path) -> String {
    paths.config("").replace(
        "[tagging]",
        &format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 50\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"11aa-22bb\"\ntenant = \"alpha\"\n\
             [[gpu.workloads]]\npod_uid = \"33cc-44dd\"\nshared = true\ntenants = [\"alpha\", \"beta\"]\n\n[tagging]",
            gpus.display(),
            proc_root
        ),
    )
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
    let proc_root = scripted_node(&paths);
    let (dedicated, shared) = (DEDICATED, SHARED);
    let me = std::process::id();
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
    let config = node_config(&paths, &gpus, &proc_root) + "[[tenants]]\nname = \"gamma\"\n";
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

    // GPU time: a script of two readings 1 s apart (the window's two polls); alpha's process
    // busy half the second, and samples of an MPS server (known by its comm), 400 J. The
    // driver reports a client by its PID, so the server's samples are its clients' work again
    // and are dropped: the other half is busy time no process sample accounts for.
    write_cgroup(&proc_root, 2004, "/system.slice/nvidia-mps.service");
    std::fs::write(proc_root.join("2004/comm"), "nvidia-cuda-mps-server\n").unwrap();
    let reading = |ts: u64, energy: u64, samples: &str| {
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-cccc", "used_bytes": 0, "total_bytes": {},
                "processes": [{{"pid": 2001, "used_bytes": null}}, {{"pid": 2004, "used_bytes": null}}],
                "timestamp_us": {ts}, "energy_mj": {energy}, {samples}}}]}}"#,
            80 * GIB
        )
    };
    let samples = r#""busy_samples": [{"ts_us": 1500000, "sm": 100}, {"ts_us": 2000000, "sm": 100}],
        "process_samples": [{"pid": 2001, "ts_us": 1500000, "sm": 100}, {"pid": 2004, "ts_us": 2000000, "sm": 100}]"#;
    std::fs::write(
        &gpus,
        format!(
            r#"{{"readings": [{}, {}]}}"#,
            reading(1_000_000, 0, r#""busy_samples": []"#),
            reading(2_000_000, 400_000, samples)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["--config", cfg.to_str().unwrap(), "gpu-status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &v["compute"]["0"];
    assert_eq!(c["sharing"], "mps", "{v}");
    assert_eq!(c["device_busy_seconds"], 1.0, "{v}");
    assert_eq!(c["busy_seconds"]["alpha"], 0.5, "{v}");
    assert_eq!(c["busy_seconds"]["unattributed"], 0.5, "{v}");
    assert_eq!(
        c["unattributed_busy_seconds"],
        serde_json::json!({"no_process_samples": 0.5}),
        "{v}"
    );
    assert_eq!(c["energy_joules"]["alpha"], 200.0, "{v}");
    let procs = v["processes"].as_array().unwrap();
    let mps = procs.iter().find(|p| p["pid"] == 2004).unwrap();
    assert_eq!(mps["workload"], "MPS server (its clients' work)", "{v}");
    let out = std::process::Command::new(AGENT)
        .args(["--config", cfg.to_str().unwrap(), "gpu-status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("GPU 0: mps, busy 1.000 s, energy 400.0 J"),
        "{text}"
    );
    assert!(
        text.contains("unattributed because no_process_samples: 0.500 s"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `text` to `path` at once (the agent re-reads the file at every poll).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn busy(m: &Metrics, tenant: &str, gpu: &str) -> f64 {
    m.get(
        "bulkhead_gpu_busy_seconds_total",
        &[("tenant", tenant), ("gpu", gpu)],
    )
}

fn joules(m: &Metrics, tenant: &str, gpu: &str) -> f64 {
    m.get(
        "bulkhead_gpu_energy_joules_total",
        &[("tenant", tenant), ("gpu", gpu)],
    )
}

#[test]
fn gpu_time_and_energy_are_attributed_per_tenant_and_a_shared_servers_by_its_reported_tokens() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let proc_root = scripted_node(&paths);
    // GPU 1 runs under MPS, and its driver reports only the MPS server's samples.
    write_cgroup(&proc_root, 1009, "/system.slice/nvidia-mps.service");
    std::fs::write(proc_root.join("1009/comm"), "nvidia-cuda-mps-server\n").unwrap();
    write_cgroup(&proc_root, 1010, DEDICATED);
    let gpus = paths.dir.join("gpus.json");
    // The baseline: both GPUs idle at t = 1 s.
    let reading = |ts: u64, energy: [u64; 2], samples: [&str; 2], procs: [&str; 2]| {
        format!(
            r#"{{"gpus": [
              {{"index": 0, "uuid": "GPU-aaaa", "used_bytes": 0, "total_bytes": {t},
                "processes": [{{"pid": 1001, "used_bytes": null}}, {{"pid": 1002, "used_bytes": null}},
                              {{"pid": 1003, "used_bytes": null}}],
                "timestamp_us": {ts}, "energy_mj": {e0}, "busy_samples": [{s0}], "process_samples": [{p0}]}},
              {{"index": 1, "uuid": "GPU-bbbb", "used_bytes": 0, "total_bytes": {t},
                "processes": [{{"pid": 1009, "used_bytes": null}}, {{"pid": 1010, "used_bytes": null}}],
                "timestamp_us": {ts}, "energy_mj": {e1}, "busy_samples": [{s1}], "process_samples": [{p1}]}}
            ]}}"#,
            t = 80 * GIB,
            e0 = energy[0],
            e1 = energy[1],
            s0 = samples[0],
            s1 = samples[1],
            p0 = procs[0],
            p1 = procs[1],
        )
    };
    write_atomic(&gpus, &reading(1_000_000, [0, 0], ["", ""], ["", ""]));
    let config = node_config(&paths, &gpus, &proc_root);
    let agent = Agent::start(AGENT, &paths, &config);
    let m = agent.wait_for("the baseline poll", |m| {
        m.get("bulkhead_gpu_sharing", &[("gpu", "1"), ("mode", "mps")]) == 1.0
    });
    assert_eq!(
        m.get(
            "bulkhead_gpu_sharing",
            &[("gpu", "0"), ("mode", "time_slicing")]
        ),
        1.0
    );
    assert!(
        !m.text.contains("bulkhead_gpu_busy_seconds_total{"),
        "{}",
        m.text
    );
    // A sidecar that predates token counts is still heard (its server's time stays shared);
    // then one that counts them: alpha 30 weighted tokens, beta 10.
    let bytes = BTreeMap::from([("alpha".to_string(), 0), ("beta".to_string(), 0)]);
    assert_eq!(agent.client().report_kv(&bytes).unwrap(), 2);
    let tokens = BTreeMap::from([("alpha".to_string(), 30), ("beta".to_string(), 10)]);
    assert_eq!(
        agent
            .client()
            .report_kv_tokens(&bytes, Some(&tokens))
            .unwrap(),
        2
    );
    // A server may not report tokens for another server's tenant either.
    let gamma = BTreeMap::from([("gamma".to_string(), 5)]);
    let err = agent
        .client()
        .report_kv_tokens(&bytes, Some(&gamma))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownTenant), "{err}");
    // Two seconds later, 8 sample periods: GPU 0 busy all along (alpha's pod 4 periods, the
    // shared server 2, an unknown process 2), 800 J; GPU 1 half busy (the MPS server's
    // samples only), 300 J.
    let periods = |sm: u32| -> String {
        (1..=8)
            .map(|i| format!(r#"{{"ts_us": {}, "sm": {sm}}}"#, 1_000_000 + i * 250_000))
            .collect::<Vec<_>>()
            .join(",")
    };
    let procs = |pid: u32, from: u64, n: u64, sm: u32| -> Vec<String> {
        (from..from + n)
            .map(|i| {
                format!(
                    r#"{{"pid": {pid}, "ts_us": {}, "sm": {sm}}}"#,
                    1_000_000 + i * 250_000
                )
            })
            .collect()
    };
    let gpu0 = [
        procs(1001, 1, 4, 100),
        procs(1002, 5, 2, 100),
        procs(1003, 7, 2, 100),
    ]
    .concat()
    .join(",");
    let gpu1 = procs(1009, 1, 8, 50).join(",");
    write_atomic(
        &gpus,
        &reading(
            3_000_000,
            [800_000, 300_000],
            [&periods(100), &periods(50)],
            [&gpu0, &gpu1],
        ),
    );
    let m = agent.wait_for("GPU time attributed", |m| {
        m.get("bulkhead_gpu_device_busy_seconds_total", &[("gpu", "1")]) > 0.0
    });
    assert_eq!(
        m.get("bulkhead_gpu_device_busy_seconds_total", &[("gpu", "0")]),
        2.0
    );
    assert_eq!(
        busy(&m, "alpha", "0"),
        1.0 + 0.5 * 0.75,
        "its pod, and 3/4 of the server"
    );
    assert_eq!(busy(&m, "beta", "0"), 0.5 * 0.25);
    assert_eq!(busy(&m, "unattributed", "0"), 0.5);
    assert_eq!(busy(&m, "shared", "0"), 0.0);
    assert_eq!(
        m.get(
            "bulkhead_gpu_unattributed_busy_seconds_total",
            &[("gpu", "0"), ("reason", "unknown_process")]
        ),
        0.5
    );
    assert_eq!(
        m.get("bulkhead_gpu_device_energy_joules_total", &[("gpu", "0")]),
        800.0
    );
    assert_eq!(joules(&m, "alpha", "0"), 550.0);
    assert_eq!(joules(&m, "beta", "0"), 50.0);
    assert_eq!(joules(&m, "unattributed", "0"), 200.0);
    // GPU 1: the MPS server's samples are its clients' work, whose PIDs the driver did not
    // give: attributed to nobody, never to alpha's client 1010.
    assert_eq!(busy(&m, "alpha", "1"), 0.0);
    assert_eq!(busy(&m, "unattributed", "1"), 1.0);
    assert_eq!(
        m.get(
            "bulkhead_gpu_unattributed_busy_seconds_total",
            &[("gpu", "1"), ("reason", "mps_server")]
        ),
        1.0
    );
    assert_eq!(joules(&m, "unattributed", "1"), 300.0);
}
