//! The whole node: the real agent (eBPF programs attached), the sidecar tagging its sockets
//! through the agent's API, and the simulated inference server. Needs root; under CI=true fails
//! without.

use bulkhead_tests::harness::*;
use bulkhead_tests::stack::{Stack, TempDir};

fn sidecar_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Metrics::parse(text).get(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecar_tags_its_sockets_and_the_agent_counts_each_tenant() {
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(&agent_bin, &paths, &paths.config(""));
    let dir = TempDir::new("stack-e2e");
    let tenants = "[tenants.alpha]\nweight = 1\n[tenants.beta]\nweight = 1\n";
    let stack = Stack::start(
        bulkhead_sim::SimConfig::default(),
        tenants,
        "",
        Some(&paths.socket),
        &dir.0,
    )
    .await;
    // One client, one pool: keep-alive connections carry alpha's and beta's requests in turn,
    // so the sidecar must re-tag the connection whenever its tenant changes.
    for i in 0..8 {
        let tenant = if i % 3 == 2 { "beta" } else { "alpha" };
        let out = stack.chat(tenant, "tell me about tenancy", 32).await;
        assert_eq!(out.status, 200, "{tenant}");
        assert!(out.completion_tokens > 0);
    }
    let (_, text) = stack.get_admin("/metrics").await.unwrap();
    assert_eq!(
        sidecar_metric(&text, "bulkhead_agent_tagging_available", &[]),
        1.0,
        "{text}"
    );
    let m = agent.wait_for("both tenants' bytes", |m| {
        m.bytes("alpha", "egress") > 0 && m.bytes("beta", "egress") > 0
    });
    // alpha sent 5 requests and beta 3, through the same kind of sockets: alpha's bytes, in
    // either direction, are more than beta's and both are at least a request's worth each.
    for dir in ["egress", "ingress"] {
        let (a, b) = (m.bytes("alpha", dir), m.bytes("beta", dir));
        assert!(a > b, "{dir}: alpha {a} beta {b}");
        assert!(b >= 3 * 200, "{dir}: beta {b}");
    }
    let tags = m.get(
        "bulkhead_tag_requests_total",
        &[("op", "tag"), ("result", "ok")],
    );
    assert!(
        tags >= 3.0,
        "the sidecar tagged client and upstream sockets: {tags}"
    );
    stack.stop().await;
}

/// A scripted `/proc` under `paths` with pod `uid`: this test process as its sidecar, `server`
/// as its inference server. The agent reads a KV reporter's PID from its pidfd in
/// `<proc_root>/self/fdinfo`, so the scripted /proc's `self` is the real one. Its root.
fn shared_server_pod(paths: &Paths, uid: &str, server: u32) -> std::path::PathBuf {
    let proc_root = paths.dir.join("proc");
    for (pid, container) in [(std::process::id(), "sidecar"), (server, "vllm")] {
        std::fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
        std::fs::write(
            proc_root.join(format!("{pid}/cgroup")),
            format!("0::/kubepods/burstable/pod{uid}/{container}\n"),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("/proc/self", proc_root.join("self")).unwrap();
    proc_root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecars_kv_reports_split_the_servers_gpu_memory_in_the_agent() {
    const GIB: u64 = 1 << 30;
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let paths = Paths::new();
    // A scripted node: this test process is the sidecar of a pod whose inference server
    // (pid 4242) holds 16 GiB on GPU 0; the pod is configured as a shared server of alpha and
    // beta (only such a pod's reports are heard).
    let uid = "7e1d2c3b-4a59-4867-9a8b-7c6d5e4f3a2b";
    let proc_root = shared_server_pod(&paths, uid, 4242);
    let gpus = paths.dir.join("gpus.json");
    std::fs::write(
        &gpus,
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-e2e", "used_bytes": {}, "total_bytes": {},
                "processes": [{{"pid": 4242, "used_bytes": {}}}]}}]}}"#,
            16 * GIB,
            80 * GIB,
            16 * GIB
        ),
    )
    .unwrap();
    let config = paths.config("").replace(
        "[tagging]",
        &format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 50\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"{uid}\"\nshared = true\ntenants = [\"alpha\", \"beta\"]\n\n[tagging]",
            gpus.display(),
            proc_root
        ),
    );
    let agent = Agent::start(&agent_bin, &paths, &config);
    let dir = TempDir::new("stack-kv");
    // 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 128 KiB per token.
    let model = "[model]\nlayers = 32\nkv_heads = 8\nhead_dim = 128\ndtype = \"bf16\"\n";
    let stack = std::sync::Arc::new(
        Stack::start(
            bulkhead_sim::SimConfig::default(),
            "[tenants.alpha]\nweight = 1\n[tenants.beta]\nweight = 1\n",
            model,
            Some(&paths.socket),
            &dir.0,
        )
        .await,
    );
    // Hold alpha's stream open after its first token: its KV cache is in use meanwhile.
    stack.sim.sim.close_gate();
    let s = stack.clone();
    let request = tokio::spawn(async move {
        s.chat_stream("alpha", "a long prompt about the tenants of this node", 32)
            .await
    });
    let kv = |m: &Metrics, tenant: &str| {
        m.get(
            "bulkhead_kv_cache_bytes",
            &[("tenant", tenant), ("gpu", "0")],
        ) as u64
    };
    let gpu = |m: &Metrics, tenant: &str| {
        m.get(
            "bulkhead_gpu_memory_bytes",
            &[("tenant", tenant), ("gpu", "0")],
        ) as u64
    };
    let m = agent.wait_for("alpha's KV bytes on GPU 0", |m| kv(m, "alpha") > 0);
    let alpha = kv(&m, "alpha");
    assert_eq!(
        alpha % (128 << 10),
        0,
        "a whole number of 128 KiB tokens: {alpha}"
    );
    assert_eq!(gpu(&m, "alpha"), alpha);
    assert_eq!(gpu(&m, "shared"), 16 * GIB - alpha);
    assert_eq!(kv(&m, "beta"), 0);
    stack.sim.sim.open_gate();
    assert_eq!(request.await.unwrap().status, 200);
    // When the stream ends, the next report gives alpha's KV back to the server.
    agent.wait_for("alpha's KV released", |m| {
        kv(m, "alpha") == 0 && gpu(m, "shared") == 16 * GIB
    });
    std::sync::Arc::try_unwrap(stack)
        .ok()
        .expect("the request task is done")
        .stop()
        .await;
}

/// The shared server's GPU time, split by the tokens its sidecar reported, against the
/// simulator's own count of what it served each tenant: the server idles while alpha and
/// beta are served, then its process is busy for one second; the agent splits that second by
/// the weighted tokens reported since its last split (prompt x 1 + completion x 2, the fair
/// queue's default costs), which must be the simulator's counts exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_servers_gpu_time_is_split_as_the_simulator_served_each_tenant() {
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let paths = Paths::new();
    let uid = "7e1d2c3b-4a59-4867-9a8b-7c6d5e4f3a2c";
    let proc_root = shared_server_pod(&paths, uid, 4243);
    let gpus = paths.dir.join("gpus.json");
    let reading = |ts: u64, energy: u64, samples: &str| {
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-e2e-t", "used_bytes": 0, "total_bytes": 1,
                "processes": [{{"pid": 4243, "used_bytes": null}}],
                "timestamp_us": {ts}, "energy_mj": {energy}, {samples}}}]}}"#
        )
    };
    let write = |text: String| {
        let tmp = gpus.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &gpus).unwrap();
    };
    write(reading(1_000_000, 0, r#""busy_samples": []"#));
    let config = paths.config("").replace(
        "[tagging]",
        &format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 50\nproc_root = {:?}\n\
             [[gpu.workloads]]\npod_uid = \"{uid}\"\nshared = true\ntenants = [\"alpha\", \"beta\"]\n\n[tagging]",
            gpus.display(),
            proc_root
        ),
    );
    let agent = Agent::start(&agent_bin, &paths, &config);
    agent.wait_for("the baseline poll", |m| {
        m.get(
            "bulkhead_gpu_sharing",
            &[("gpu", "0"), ("mode", "exclusive")],
        ) == 1.0
    });
    let dir = TempDir::new("stack-gpu-time");
    let model = "[model]\nlayers = 2\nkv_heads = 1\nhead_dim = 8\ndtype = \"bf16\"\n";
    let stack = Stack::start(
        bulkhead_sim::SimConfig::default(),
        "[tenants.alpha]\nweight = 1\n[tenants.beta]\nweight = 1\n",
        model,
        Some(&paths.socket),
        &dir.0,
    )
    .await;
    for (tenant, prompt, max_tokens) in [
        (
            "alpha",
            "a long prompt about the tenants of this node and their GPUs",
            40,
        ),
        ("alpha", "another question", 12),
        ("beta", "a short one", 7),
    ] {
        let out = stack.chat(tenant, prompt, max_tokens).await;
        assert_eq!(out.status, 200, "{tenant}");
    }
    // Every token is in a report the agent took: two more accepted reports after the last
    // answer (a report goes every 100 ms).
    let reports = |text: &str| {
        Metrics::parse(text).get("bulkhead_agent_kv_reports_total", &[("result", "ok")])
    };
    let after = reports(&stack.get_admin("/metrics").await.unwrap().1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reports(&stack.get_admin("/metrics").await.unwrap().1) < after + 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no further KV reports"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The server's process busy all of the next second, 500 J.
    write(reading(
        2_000_000,
        500_000,
        r#""busy_samples": [{"ts_us": 1500000, "sm": 100}, {"ts_us": 2000000, "sm": 100}],
           "process_samples": [{"pid": 4243, "ts_us": 1500000, "sm": 100}, {"pid": 4243, "ts_us": 2000000, "sm": 100}]"#,
    ));
    let m = agent.wait_for("the server's busy second", |m| {
        m.get("bulkhead_gpu_device_busy_seconds_total", &[("gpu", "0")]) > 0.0
    });
    let weighted = |t: &str| {
        let s = stack.sim.sim.tenant_kv(t);
        (s.prompt_tokens + 2 * s.completion_tokens) as f64
    };
    let (a, b) = (weighted("alpha"), weighted("beta"));
    assert!(a > 0.0 && b > 0.0);
    let busy = |t: &str| {
        m.get(
            "bulkhead_gpu_busy_seconds_total",
            &[("tenant", t), ("gpu", "0")],
        )
    };
    let joules = |t: &str| {
        m.get(
            "bulkhead_gpu_energy_joules_total",
            &[("tenant", t), ("gpu", "0")],
        )
    };
    let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
    assert!(
        close(busy("alpha"), a / (a + b)),
        "alpha {} vs {a}/{b}",
        busy("alpha")
    );
    assert!(
        close(busy("beta"), b / (a + b)),
        "beta {} vs {a}/{b}",
        busy("beta")
    );
    assert_eq!(busy("shared") + busy("unattributed"), 0.0, "{}", m.text);
    assert!(close(joules("alpha"), 500.0 * a / (a + b)));
    assert!(close(joules("alpha") + joules("beta"), 500.0));
    stack.stop().await;
}
