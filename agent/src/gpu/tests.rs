use super::*;
use crate::config::GpuWorkload;
use std::path::PathBuf;

const GIB: u64 = 1 << 30;

fn gpu(index: u32, used: u64, procs: &[(u32, Option<u64>)]) -> GpuSnapshot {
    GpuSnapshot {
        index,
        uuid: format!("GPU-{index}"),
        used_bytes: used,
        total_bytes: 80 * GIB,
        processes: procs
            .iter()
            .map(|&(pid, used_bytes)| GpuProcess { pid, used_bytes })
            .collect(),
        ..Default::default()
    }
}

fn roles(pid: u32) -> Option<Role> {
    match pid {
        100 => Some(Role::Dedicated("acme".into())),
        200 => Some(Role::Shared("server".into())),
        _ => None,
    }
}

#[test]
fn dedicated_shared_and_unknown_processes() {
    let gpus = [gpu(
        0,
        61 * GIB,
        &[
            (100, Some(10 * GIB)),
            (200, Some(40 * GIB)),
            (300, Some(10 * GIB)),
        ],
    )];
    let kv = HashMap::from([(
        "server".to_string(),
        BTreeMap::from([
            ("acme".to_string(), 6 * GIB),
            ("globex".to_string(), 2 * GIB),
        ]),
    )]);
    let u = &attribute(&gpus, &roles, &kv)[0];
    assert_eq!(
        u.memory["acme"],
        10 * GIB + 6 * GIB,
        "dedicated pod plus its KV share"
    );
    assert_eq!(u.memory["globex"], 2 * GIB);
    assert_eq!(
        u.memory[SHARED],
        32 * GIB,
        "weights and free KV pool of the server"
    );
    assert_eq!(
        u.memory[UNATTRIBUTED],
        10 * GIB + GIB,
        "unknown pid plus driver memory"
    );
    assert_eq!(u.memory.values().sum::<u64>(), u.used_bytes);
    assert_eq!(
        u.kv_cache,
        BTreeMap::from([
            ("acme".to_string(), 6 * GIB),
            ("globex".to_string(), 2 * GIB)
        ])
    );
}

#[test]
fn a_server_on_two_gpus_holds_half_of_each_tenants_kv_on_each() {
    let gpus = [
        gpu(0, 40 * GIB, &[(200, Some(40 * GIB))]),
        gpu(1, 40 * GIB, &[(200, Some(40 * GIB))]),
    ];
    let kv = HashMap::from([(
        "server".to_string(),
        BTreeMap::from([("acme".to_string(), 10 * GIB)]),
    )]);
    for u in attribute(&gpus, &roles, &kv) {
        assert_eq!(u.kv_cache["acme"], 5 * GIB);
        assert_eq!(u.memory[SHARED], 35 * GIB);
    }
}

#[test]
fn kv_reports_never_claim_more_than_the_process_holds() {
    let gpus = [gpu(0, 4 * GIB, &[(200, Some(4 * GIB))])];
    let kv = HashMap::from([(
        "server".to_string(),
        BTreeMap::from([
            ("acme".to_string(), 3 * GIB),
            ("globex".to_string(), 3 * GIB),
        ]),
    )]);
    let u = &attribute(&gpus, &roles, &kv)[0];
    assert_eq!(u.memory["acme"], 3 * GIB);
    assert_eq!(u.memory["globex"], GIB);
    assert!(!u.memory.contains_key(SHARED));
    assert_eq!(u.memory.values().sum::<u64>(), 4 * GIB);
}

#[test]
fn without_a_report_the_server_is_shared_and_unsized_processes_are_unattributed() {
    let gpus = [gpu(0, 30 * GIB, &[(200, Some(20 * GIB)), (100, None)])];
    let u = &attribute(&gpus, &roles, &HashMap::new())[0];
    assert_eq!(u.memory[SHARED], 20 * GIB);
    assert_eq!(u.memory[UNATTRIBUTED], 10 * GIB);
    assert!(
        !u.memory.contains_key("acme"),
        "NVML could not size acme's process"
    );
}

#[test]
fn garbled_entries_are_dropped() {
    let mut g = gpu(
        0,
        10 * GIB,
        &[
            (0, Some(GIB)),
            (100, Some(GIB)),
            (100, Some(GIB)),
            (7, Some(u64::MAX)),
        ],
    );
    assert_eq!(sanitize(&mut g), 3);
    assert_eq!(
        g.processes,
        vec![GpuProcess {
            pid: 100,
            used_bytes: Some(GIB)
        }]
    );
}

#[test]
fn pods_match_either_cgroup_driver_spelling() {
    let config = GpuConfig {
        workloads: vec![
            GpuWorkload {
                pod_uid: Some("1a2b-3c4d".into()),
                cgroup_contains: None,
                tenant: Some("acme".into()),
                shared: false,
                tenants: Vec::new(),
            },
            GpuWorkload {
                pod_uid: None,
                cgroup_contains: Some("vllm".into()),
                tenant: None,
                shared: true,
                tenants: vec!["acme".into()],
            },
        ],
        ..GpuConfig::default()
    };
    let m = Matcher::new(&config);
    let systemd = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c4d.slice/cri-containerd-ab.scope";
    let cgroupfs = "/kubepods/burstable/pod1a2b-3c4d/ab";
    assert_eq!(
        m.classify_cgroup(systemd),
        Some(Role::Dedicated("acme".into()))
    );
    assert_eq!(
        m.classify_cgroup(cgroupfs),
        Some(Role::Dedicated("acme".into()))
    );
    assert_eq!(
        m.classify_cgroup("/system.slice/vllm.service"),
        Some(Role::Shared("gpu.workloads[1]".into()))
    );
    assert_eq!(m.classify_cgroup("/user.slice"), None);
}

#[test]
fn pod_uids_are_read_from_either_cgroup_driver_spelling() {
    let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let cgroup = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-9.scope",
        uid.replace('-', "_")
    );
    assert_eq!(pod_uid_of(&cgroup).as_deref(), Some(uid));
    assert_eq!(
        pod_uid_of(&format!("/kubepods/besteffort/pod{uid}/abc")).as_deref(),
        Some(uid)
    );
    assert_eq!(pod_uid_of("/system.slice/podman.service"), None);
    // A pod is no workload unless it is configured.
    assert_eq!(
        Matcher::new(&GpuConfig::default()).classify_cgroup(&cgroup),
        None
    );
}

/// A scripted /proc for `kv_report`: `self` is the real one (the caller's PID is read
/// from its pidfd's fdinfo), and this process's cgroup is `cgroup`.
struct ScriptedProc(PathBuf);

impl ScriptedProc {
    fn new(name: &str, cgroup: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bulkhead-kv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = dir.join(std::process::id().to_string());
        std::fs::create_dir_all(&me).unwrap();
        std::fs::write(me.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        std::os::unix::fs::symlink("/proc/self", dir.join("self")).unwrap();
        Self(dir)
    }
}

impl Drop for ScriptedProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends `report` from this process (in `cgroup`) to a `GpuState` with `workloads`, whose
/// agent knows the tenants acme, globex and initech; returns the outcome and what was
/// recorded.
fn report_from(
    name: &str,
    cgroup: &str,
    workloads: Vec<GpuWorkload>,
    report: &[(&str, u64)],
) -> (
    Result<u32, KvRefusal>,
    HashMap<String, BTreeMap<String, u64>>,
) {
    let proc = ScriptedProc::new(name, cgroup);
    let state = GpuState::new(&GpuConfig {
        proc_root: proc.0.clone(),
        workloads,
        ..GpuConfig::default()
    });
    let (agent_end, _caller_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let caller = ReportCaller {
        conn: agent_end.as_fd(),
        creds: getsockopt(&agent_end, sockopt::PeerCredentials).unwrap(),
    };
    let report: BTreeMap<String, u64> = report.iter().map(|&(t, b)| (t.to_string(), b)).collect();
    let outcome = state.kv_report(&caller, &report, None, &|t| {
        ["acme", "globex", "initech"].contains(&t)
    });
    let recorded = state.kv.lock().unwrap().fresh(Duration::from_secs(60));
    (outcome, recorded)
}

fn server(pod_uid: &str, tenants: &[&str]) -> GpuWorkload {
    GpuWorkload {
        pod_uid: Some(pod_uid.into()),
        cgroup_contains: None,
        tenant: None,
        shared: true,
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
    }
}

const SERVER_POD: &str = "/kubepods/burstable/pod33cc-44dd/sidecar";

#[test]
fn a_configured_shared_server_reports_for_its_tenants() {
    let workloads = vec![
        server("11aa-22bb", &["initech"]),
        server("33cc-44dd", &["acme", "globex"]),
    ];
    let (outcome, recorded) = report_from(
        "ok",
        SERVER_POD,
        workloads,
        &[("acme", 6 * GIB), ("globex", GIB)],
    );
    assert_eq!(outcome, Ok(2));
    assert_eq!(
        recorded,
        HashMap::from([(
            "gpu.workloads[1]".to_string(),
            BTreeMap::from([("acme".to_string(), 6 * GIB), ("globex".to_string(), GIB)])
        )])
    );
}

#[test]
fn a_pod_that_is_no_configured_shared_server_is_refused_and_not_discovered() {
    // A pod nobody configured, in a kubelet cgroup: refused, nothing recorded.
    let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let cgroup = format!("/kubepods/burstable/pod{uid}/sidecar");
    let workloads = vec![server("33cc-44dd", &["acme"])];
    let (outcome, recorded) = report_from("pod", &cgroup, workloads.clone(), &[("acme", GIB)]);
    let (code, message) = outcome.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownWorkload);
    assert!(message.contains(&format!("pod {uid}")), "{message}");
    assert!(
        message.contains("gpu.workloads with shared = true"),
        "{message}"
    );
    assert!(recorded.is_empty(), "{recorded:?}");

    // Outside any pod.
    let (outcome, recorded) = report_from(
        "plain",
        "/system.slice/vllm.service",
        workloads,
        &[("acme", GIB)],
    );
    assert_eq!(outcome.unwrap_err().0, ErrorCode::UnknownWorkload);
    assert!(recorded.is_empty());

    // A pod dedicated to a tenant is no shared server either.
    let dedicated = GpuWorkload {
        pod_uid: Some("33cc-44dd".into()),
        cgroup_contains: None,
        tenant: Some("acme".into()),
        shared: false,
        tenants: Vec::new(),
    };
    let (outcome, recorded) =
        report_from("dedicated", SERVER_POD, vec![dedicated], &[("acme", GIB)]);
    let (code, message) = outcome.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownWorkload);
    assert!(
        message.contains("dedicated to tenant \"acme\""),
        "{message}"
    );
    assert!(recorded.is_empty());
}

#[test]
fn a_shared_server_reports_only_for_its_own_tenants() {
    let workloads = vec![server("33cc-44dd", &["acme"])];
    // globex is an agent tenant, not this server's: the report is refused whole.
    let (outcome, recorded) = report_from(
        "other",
        SERVER_POD,
        workloads.clone(),
        &[("acme", GIB), ("globex", GIB)],
    );
    let (code, message) = outcome.unwrap_err();
    assert_eq!(code, ErrorCode::NotAllowed);
    assert!(
        message.contains("\"globex\"") && message.contains("gpu.workloads[0].tenants"),
        "{message}"
    );
    assert!(recorded.is_empty(), "{recorded:?}");
    // A name the agent does not know at all.
    let (outcome, recorded) = report_from("unknown", SERVER_POD, workloads, &[("zed", GIB)]);
    assert_eq!(outcome.unwrap_err().0, ErrorCode::UnknownTenant);
    assert!(recorded.is_empty());
}

#[test]
fn the_first_configured_workload_wins_whether_looked_up_by_uid_or_scanned() {
    let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let w = |pod_uid: Option<&str>, contains: Option<&str>, tenant: &str| GpuWorkload {
        pod_uid: pod_uid.map(str::to_string),
        cgroup_contains: contains.map(str::to_string),
        tenant: Some(tenant.into()),
        shared: false,
        tenants: Vec::new(),
    };
    let cgroup = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-vllm.scope",
        uid.replace('-', "_")
    );
    let matcher = |workloads| {
        Matcher::new(&GpuConfig {
            workloads,
            ..GpuConfig::default()
        })
    };
    let dedicated = |t: &str| Some(Role::Dedicated(t.into()));
    let m = matcher(vec![w(None, Some("vllm"), "a"), w(Some(uid), None, "b")]);
    assert_eq!(m.classify_cgroup(&cgroup), dedicated("a"));
    let m = matcher(vec![w(Some(uid), None, "b"), w(None, Some("vllm"), "a")]);
    assert_eq!(m.classify_cgroup(&cgroup), dedicated("b"));
    // A partial UID is scanned for, as before.
    let m = matcher(vec![
        w(Some("0f1e2d3c_4b5a"), None, "c"),
        w(Some(uid), None, "b"),
    ]);
    assert_eq!(m.classify_cgroup(&cgroup), dedicated("c"));
    assert_eq!(
        m.classify_cgroup("/kubepods/pod0f1e2d3c-0000-0000-0000-a5b4c3d2e1f0/x"),
        None
    );
}

#[test]
fn a_pids_workload_is_read_again_when_it_left_the_gpus_or_its_time_is_up() {
    let dir = std::env::temp_dir().join(format!("bulkhead-roles-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("42")).unwrap();
    let set = |pod: &str| {
        std::fs::write(dir.join("42/cgroup"), format!("0::/kubepods/pod{pod}/x\n")).unwrap()
    };
    let workload = |uid: &str, t: &str| GpuWorkload {
        pod_uid: Some(uid.into()),
        cgroup_contains: None,
        tenant: Some(t.into()),
        shared: false,
        tenants: Vec::new(),
    };
    let m = Matcher::new(&GpuConfig {
        proc_root: dir.clone(),
        workloads: vec![
            workload("1a2b-3c4d", "acme"),
            workload("5e6f-7a8b", "globex"),
        ],
        ..GpuConfig::default()
    });
    let mut cache = RoleCache::default();
    let pids = HashSet::from([42]);
    let t0 = Instant::now();
    set("1a2b-3c4d");
    cache.refresh(&pids, &m, t0);
    assert_eq!(cache.get(42), Some(Role::Dedicated("acme".into())));
    // PID 42 is now another process, in globex's pod: while 42 stays on the GPUs the
    // cached workload holds, until its time is up...
    set("5e6f-7a8b");
    cache.refresh(&pids, &m, t0 + Duration::from_secs(1));
    assert_eq!(cache.get(42), Some(Role::Dedicated("acme".into())));
    cache.refresh(&pids, &m, t0 + ROLE_TTL);
    assert_eq!(cache.get(42), Some(Role::Dedicated("globex".into())));
    // ...and a PID that leaves the GPUs is forgotten at once.
    set("1a2b-3c4d");
    cache.refresh(&HashSet::new(), &m, t0 + ROLE_TTL);
    assert_eq!(cache.get(42), None);
    cache.refresh(&pids, &m, t0 + ROLE_TTL);
    assert_eq!(cache.get(42), Some(Role::Dedicated("acme".into())));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pids_are_read_from_the_proc_root() {
    let dir = std::env::temp_dir().join(format!("bulkhead-proc-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("42")).unwrap();
    std::fs::write(dir.join("42/cgroup"), "0::/kubepods/pod1a2b-3c4d/x\n").unwrap();
    let config = GpuConfig {
        proc_root: dir.clone(),
        workloads: vec![GpuWorkload {
            pod_uid: Some("1a2b-3c4d".into()),
            cgroup_contains: None,
            tenant: Some("acme".into()),
            shared: false,
            tenants: Vec::new(),
        }],
        ..GpuConfig::default()
    };
    let m = Matcher::new(&config);
    assert_eq!(m.classify_pid(42), Some(Role::Dedicated("acme".into())));
    assert_eq!(m.classify_pid(43), None);
    std::fs::remove_dir_all(&dir).unwrap();
}
