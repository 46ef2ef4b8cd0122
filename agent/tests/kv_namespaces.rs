//! KV reports from sidecars the agent cannot see in its own PID namespace (the shipped
//! DaemonSet has no hostPID): the agent runs in a PID namespace of its own, each sidecar-like
//! client in another one and in a cgroup of its own (made under this test's cgroup), and a
//! report is attributed to the cgroup (pod) of the process that sent it, whatever it claims.
//! Needs root and `unshare`; under CI=true fails without.

use agent_common::client::AgentClient;
use bulkhead_tests::harness::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");
const GIB: u64 = 1 << 30;
const POD_A: &str = "0a1b2c3d-0000-4000-8000-00000000000a";
const POD_B: &str = "0a1b2c3d-0000-4000-8000-00000000000b";
/// A pod no workload names: its sidecar's reports are refused.
const POD_C: &str = "0a1b2c3d-0000-4000-8000-00000000000c";

/// Not a test of its own: the sidecar-like client, run by the test below as
/// `unshare --pid --fork <this test binary> --exact kv_report_client` in a cgroup of its own.
/// Without its environment it does nothing.
#[test]
fn kv_report_client() {
    let Ok(socket) = std::env::var("BULKHEAD_KV_CLIENT_SOCKET") else {
        return;
    };
    let report: BTreeMap<String, u64> =
        serde_json::from_str(&std::env::var("BULKHEAD_KV_CLIENT_REPORT").unwrap()).unwrap();
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let outcome = match AgentClient::new(socket).report_kv(&report) {
        Ok(n) => format!("accepted {n}"),
        Err(e) => format!("refused {}", e.code().map_or("none", |c| c.as_str())),
    };
    println!(
        "KV-CLIENT pid={} ns={} {outcome}",
        std::process::id(),
        pid_ns.display()
    );
}

/// A cgroup-v2 directory made for the test, removed (once empty) when dropped.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `cmd` (a program and its arguments) as a process moved into `cgroup` before it execs.
fn in_cgroup(cgroup: &Path, cmd: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(cgroup)
        .args(cmd);
    c
}

struct ClientOutcome {
    /// "accepted N" or "refused CODE".
    outcome: String,
    /// The client's PID namespace (`pid:[inode]`).
    pid_ns: String,
    /// The client's PID as it sees it (1: the first process of a new namespace).
    pid: u32,
}

/// Sends `report` from a client in a new PID namespace and in `cgroup`.
fn report_from(cgroup: &Path, socket: &Path, report: &[(&str, u64)]) -> ClientOutcome {
    let exe = std::env::current_exe().unwrap();
    let report: BTreeMap<&str, u64> = report.iter().copied().collect();
    let out = in_cgroup(
        cgroup,
        &[
            "unshare",
            "--pid",
            "--fork",
            exe.to_str().unwrap(),
            "--exact",
            "kv_report_client",
            "--nocapture",
            "--test-threads=1",
        ],
    )
    .env("BULKHEAD_KV_CLIENT_SOCKET", socket)
    .env(
        "BULKHEAD_KV_CLIENT_REPORT",
        serde_json::to_string(&report).unwrap(),
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("KV-CLIENT ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "the client printed no result ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut words = line.splitn(3, ' ');
    let pid = words.next().unwrap().strip_prefix("pid=").unwrap();
    let ns = words.next().unwrap().strip_prefix("ns=").unwrap();
    ClientOutcome {
        outcome: words.next().unwrap().to_string(),
        pid_ns: ns.to_string(),
        pid: pid.parse().unwrap(),
    }
}

fn pid_ns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap()
        .display()
        .to_string()
}

fn kv(m: &Metrics, tenant: &str) -> u64 {
    m.get(
        "bulkhead_kv_cache_bytes",
        &[("tenant", tenant), ("gpu", "0")],
    ) as u64
}

fn gpu_mem(m: &Metrics, tenant: &str) -> u64 {
    m.get(
        "bulkhead_gpu_memory_bytes",
        &[("tenant", tenant), ("gpu", "0")],
    ) as u64
}

#[test]
fn kv_reports_cross_pid_namespaces_and_speak_for_the_callers_own_pod() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let gpus = paths.dir.join("gpus.json");
    // Pods A and B are shared servers, A of alpha, B of beta; pod C is configured as nothing.
    let config = paths.config("").replace(
        "[tagging]",
        &format!(
            "[gpu]\nsource = \"file:{}\"\npoll_interval_ms = 50\n\
             [[gpu.workloads]]\npod_uid = \"{POD_A}\"\nshared = true\ntenants = [\"alpha\"]\n\
             [[gpu.workloads]]\npod_uid = \"{POD_B}\"\nshared = true\ntenants = [\"beta\"]\n\n[tagging]",
            gpus.display()
        ),
    );
    // An empty GPU until the server process exists.
    std::fs::write(&gpus, r#"{"gpus": []}"#).unwrap();
    let agent = Agent::start_wrapped(
        &["unshare", "--pid", "--fork", "--kill-child=SIGTERM"],
        AGENT,
        &paths,
        &config,
    );

    // cgroups under this test's own: three pods and a plain service.
    let root = PathBuf::from(agent.ready_line["cgroup"].as_str().unwrap());
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let base = Cgroup::new(
        root.join(own.trim_start_matches('/'))
            .join(format!("bulkhead-kv-{}", std::process::id())),
    );
    let pod_a = Cgroup::new(base.0.join(format!("pod{POD_A}")));
    let pod_b = Cgroup::new(base.0.join(format!("pod{}", POD_B.replace('-', "_"))));
    let pod_c = Cgroup::new(base.0.join(format!("pod{POD_C}")));
    let plain = Cgroup::new(base.0.join("system-service"));

    // The shared inference server of pod A holds 40 GiB of GPU 0.
    let mut server = in_cgroup(&pod_a.0, &["sleep", "60"]).spawn().unwrap();
    let server_pid = server.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{server_pid}/cgroup"))
        .unwrap_or_default()
        .contains(POD_A)
    {
        assert!(Instant::now() < deadline, "the server never joined pod A");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(
        &gpus,
        format!(
            r#"{{"gpus": [{{"index": 0, "uuid": "GPU-kv", "used_bytes": {u}, "total_bytes": {t},
                "processes": [{{"pid": {server_pid}, "used_bytes": {u}}}]}}]}}"#,
            u = 40 * GIB,
            t = 80 * GIB
        ),
    )
    .unwrap();
    let m = agent.wait_for(
        "the server's memory, all shared until its sidecar reports",
        |m| gpu_mem(m, "shared") == 40 * GIB,
    );
    assert_eq!(kv(&m, "alpha"), 0);
    assert_eq!(gpu_mem(&m, "unattributed"), 0);

    // The agent cannot see the clients: it is in a PID namespace of its own, and so is each
    // client (the first process of its namespace).
    let mine = pid_ns_of(std::process::id());
    let a = report_from(&pod_a.0, &paths.socket, &[("alpha", 6 * GIB)]);
    assert_eq!(a.outcome, "accepted 1", "pod A's sidecar is heard");
    assert_ne!(a.pid_ns, mine, "the client has a PID namespace of its own");
    assert_eq!(a.pid, 1);
    let agent_pid = agent_process(agent.child.id());
    let agent_ns = pid_ns_of(agent_pid);
    assert_ne!(agent_ns, mine, "the agent has a PID namespace of its own");
    assert_ne!(agent_ns, a.pid_ns);

    // Attributed to pod A (its server's memory is split by the report).
    let m = agent.wait_for("alpha's KV share of pod A's server", |m| {
        kv(m, "alpha") == 6 * GIB
    });
    assert_eq!(gpu_mem(&m, "shared"), 34 * GIB);
    assert_eq!(gpu_mem(&m, "unattributed"), 0);

    // A client in another pod reports for its own pod, never for pod A: whatever it claims,
    // pod A's server is still split by pod A's report alone.
    let b = report_from(&pod_b.0, &paths.socket, &[("beta", 30 * GIB)]);
    assert_eq!(b.outcome, "accepted 1");
    let polls = m.get("bulkhead_gpu_polls_total", &[]);
    let m = agent.wait_for("two more GPU polls", |m| {
        m.get("bulkhead_gpu_polls_total", &[]) >= polls + 2.0
    });
    assert_eq!(kv(&m, "beta"), 0, "pod B's report was charged to pod A");
    assert_eq!(kv(&m, "alpha"), 6 * GIB);

    // A shared server reports for its own tenants only: pod A's report naming beta (pod B's
    // tenant) is refused whole, and pod A's split stays as it was.
    let a = report_from(&pod_a.0, &paths.socket, &[("alpha", GIB), ("beta", GIB)]);
    assert_eq!(a.outcome, "refused not_allowed");

    // A client in a pod configured as no shared server is refused, and never makes its pod
    // one; so is a client in no pod.
    let c = report_from(&pod_c.0, &paths.socket, &[("alpha", GIB)]);
    assert_eq!(c.outcome, "refused unknown_workload");
    let c = report_from(&plain.0, &paths.socket, &[("alpha", GIB)]);
    assert_eq!(c.outcome, "refused unknown_workload");
    let polls = agent.metrics().get("bulkhead_gpu_polls_total", &[]);
    let m = agent.wait_for("two more GPU polls", |m| {
        m.get("bulkhead_gpu_polls_total", &[]) >= polls + 2.0
    });
    assert_eq!(
        kv(&m, "alpha"),
        6 * GIB,
        "a refused report changed the split"
    );
    assert_eq!(kv(&m, "beta"), 0);

    server.kill().unwrap();
    server.wait().unwrap();
    drop(agent);
}

/// The agent's host PID: the child of the `unshare` process that runs it.
fn agent_process(unshare_pid: u32) -> u32 {
    let path = format!("/proc/{unshare_pid}/task/{unshare_pid}/children");
    let text = std::fs::read_to_string(&path).unwrap();
    text.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{path} is empty"))
        .parse()
        .unwrap()
}
