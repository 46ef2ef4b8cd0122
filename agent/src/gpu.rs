//! GPU memory attributed to tenants.
//!
//! NVML reports memory per device and per process (host PIDs), not per tenant. Each process is
//! mapped to a workload through `/proc/<pid>/cgroup` (its pod): a pod dedicated to one tenant is
//! that tenant's; a shared inference server's memory is split by the KV-cache bytes its sidecar
//! reports per tenant, the rest labelled `shared`; anything else is `unattributed`.
//!
//! The GPU is behind [`GpuSource`] so tests script it ([`FileSource`]); [`NvmlSource`] keeps one
//! NVML handle for the life of the process.

use crate::config::{GpuConfig, GpuWorkload};
pub use crate::gpu_compute::{
    Accountant, ComputeTotals, MigInstance, ProcSample, TokenMix, UtilSample,
};
use agent_common::proto::ErrorCode;
use nix::errno::Errno;
use nix::sys::socket::{UnixCredentials, getsockopt, sockopt};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Label of a shared server's memory that is no tenant's (a name no tenant may have).
pub const SHARED: &str = agent_common::SHARED_TENANT_NAME;
/// Label of memory no process or tenant could be found for (a name no tenant may have).
pub const UNATTRIBUTED: &str = agent_common::UNATTRIBUTED_TENANT_NAME;

/// One process on one GPU, as the source reports it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// `None` when the driver does not know (NVML's "not available").
    pub used_bytes: Option<u64>,
}

/// One GPU, as the source reports it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct GpuSnapshot {
    pub index: u32,
    pub uuid: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
    /// When the compute readings below were taken (CPU time, µs; NVML's sample clock).
    /// `None`: the source gives no compute readings (GPU time and energy are not attributed).
    #[serde(default)]
    pub timestamp_us: Option<u64>,
    /// The device's energy counter, mJ since the driver loaded (`None`: not supported).
    #[serde(default)]
    pub energy_mj: Option<u64>,
    /// The device's SM utilization samples since the last poll.
    #[serde(default)]
    pub busy_samples: Vec<UtilSample>,
    /// Per-process SM utilization samples since the last poll.
    #[serde(default)]
    pub process_samples: Vec<ProcSample>,
    /// MIG instances, when MIG is on: busy time is attributed per instance.
    #[serde(default)]
    pub mig: Vec<MigInstance>,
}

pub trait GpuSource: Send {
    fn snapshot(&mut self) -> Result<Vec<GpuSnapshot>, String>;
}

/// NVML, one handle for the process's life (NVML calls are slow; init is slower).
pub struct NvmlSource {
    nvml: nvml_wrapper::Nvml,
    /// Per device (or MIG instance) UUID: the newest device and process sample timestamps
    /// read, so each poll asks NVML only for newer samples.
    last_seen: HashMap<String, (u64, u64)>,
}

impl NvmlSource {
    pub fn init() -> Result<Self, String> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| Self {
                nvml,
                last_seen: HashMap::new(),
            })
            .map_err(|e| format!("NVML could not be initialised: {e}"))
    }

    /// The device's (or MIG instance's) utilization samples newer than the last poll's. A
    /// device without them (NVML's NotSupported, NotFound when none are buffered) gives none:
    /// its busy time is then not attributed.
    fn samples(
        last_seen: &mut HashMap<String, (u64, u64)>,
        uuid: &str,
        dev: &nvml_wrapper::Device<'_>,
    ) -> (Vec<UtilSample>, Vec<ProcSample>) {
        use nvml_wrapper::enum_wrappers::device::Sampling;
        use nvml_wrapper::enums::device::SampleValue;
        let (busy_seen, proc_seen) = last_seen.get(uuid).copied().unwrap_or((0, 0));
        let busy: Vec<UtilSample> = dev
            .samples(Sampling::GpuUtilization, busy_seen)
            .unwrap_or_default()
            .into_iter()
            .map(|s| UtilSample {
                ts_us: s.timestamp,
                sm: match s.value {
                    SampleValue::U32(v) => v,
                    SampleValue::U64(v) => v.min(100) as u32,
                    SampleValue::I64(v) => v.clamp(0, 100) as u32,
                    SampleValue::F64(v) => v.clamp(0.0, 100.0) as u32,
                },
            })
            .collect();
        let procs: Vec<ProcSample> = dev
            .process_utilization_stats(proc_seen)
            .unwrap_or_default()
            .into_iter()
            .map(|s| ProcSample {
                pid: s.pid,
                ts_us: s.timestamp,
                sm: s.sm_util,
                mem: s.mem_util,
            })
            .collect();
        let newest = |it: &mut dyn Iterator<Item = u64>, old: u64| it.max().unwrap_or(old).max(old);
        last_seen.insert(
            uuid.to_string(),
            (
                newest(&mut busy.iter().map(|s| s.ts_us), busy_seen),
                newest(&mut procs.iter().map(|s| s.ts_us), proc_seen),
            ),
        );
        (busy, procs)
    }
}

/// CPU time now, µs since the epoch (NVML's sample timestamps are on this clock).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl GpuSource for NvmlSource {
    fn snapshot(&mut self) -> Result<Vec<GpuSnapshot>, String> {
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for index in 0..count {
            let dev = self
                .nvml
                .device_by_index(index)
                .map_err(|e| format!("GPU {index}: {e}"))?;
            let mem = dev.memory_info().map_err(|e| format!("GPU {index}: {e}"))?;
            let processes = dev
                .running_compute_processes()
                .map_err(|e| format!("GPU {index}: {e}"))?
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_bytes: match p.used_gpu_memory {
                        nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                        nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                    },
                })
                .collect();
            let uuid = dev.uuid().unwrap_or_default();
            // MIG: each instance's samples on its own handle (the parent has none).
            let mig_on = dev.mig_mode().is_ok_and(|m| m.current == 1);
            let mut mig = Vec::new();
            let (busy_samples, process_samples) = if mig_on {
                for i in 0..dev.mig_device_count().unwrap_or(0) {
                    // Empty slots answer NotFound.
                    let Ok(m) = dev.mig_device_by_index(i) else {
                        continue;
                    };
                    let Ok(mig_uuid) = m.uuid() else { continue };
                    let (busy_samples, process_samples) =
                        Self::samples(&mut self.last_seen, &mig_uuid, &m);
                    mig.push(MigInstance {
                        total_bytes: m.memory_info().map_or(0, |i| i.total),
                        uuid: mig_uuid,
                        busy_samples,
                        process_samples,
                    });
                }
                (Vec::new(), Vec::new())
            } else {
                Self::samples(&mut self.last_seen, &uuid, &dev)
            };
            out.push(GpuSnapshot {
                index,
                uuid,
                used_bytes: mem.used,
                total_bytes: mem.total,
                processes,
                timestamp_us: Some(now_us()),
                energy_mj: dev.total_energy_consumption().ok(),
                busy_samples,
                process_samples,
                mig,
            });
        }
        Ok(out)
    }
}

/// A JSON file re-read at every poll: `{"gpus": [GpuSnapshot...]}`, `{"error": "..."}`, or
/// `{"readings": [{"gpus": [...]}, ...]}`: one reading per poll in turn, the last one
/// repeated (a script of NVML's answers). Tests (and replays of a node's state) inject GPUs
/// with it.
pub struct FileSource {
    pub path: PathBuf,
    /// Polls answered so far (the index into `readings`).
    pub served: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileSnapshot {
    Gpus { gpus: Vec<GpuSnapshot> },
    Error { error: String },
    Readings { readings: Vec<FileReading> },
}

#[derive(Deserialize)]
struct FileReading {
    gpus: Vec<GpuSnapshot>,
}

impl GpuSource for FileSource {
    fn snapshot(&mut self) -> Result<Vec<GpuSnapshot>, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        match serde_json::from_str(&text).map_err(|e| format!("{}: {e}", self.path.display()))? {
            FileSnapshot::Gpus { gpus } => Ok(gpus),
            FileSnapshot::Error { error } => Err(error),
            FileSnapshot::Readings { mut readings } => {
                if readings.is_empty() {
                    return Err(format!("{}: \"readings\" is empty", self.path.display()));
                }
                let i = self.served.min(readings.len() - 1);
                self.served += 1;
                Ok(readings.swap_remove(i).gpus)
            }
        }
    }
}

/// How a workload's GPU memory is attributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Dedicated(String),
    /// A shared inference server, by a key naming its workload: `gpu.workloads[i]`.
    Shared(String),
    /// The MPS control server (`nvidia-cuda-mps-server`): its samples are its clients' work.
    MpsServer,
}

/// Maps a process to its workload through its cgroup path. Only the configured workloads
/// (`gpu.workloads`) are known: a KV report never makes a pod a shared server.
#[derive(Clone, Debug)]
pub struct Matcher {
    workloads: Arc<Vec<GpuWorkload>>,
    /// Workloads by a full pod UID (dashed, lower case): one lookup per cgroup path.
    by_uid: Arc<HashMap<String, usize>>,
    /// The other workloads (a partial UID, `cgroup_contains`), with what to look for, in
    /// config order: `(index, needle, is_pod)`.
    scanned: Arc<Vec<(usize, String, bool)>>,
    proc_root: PathBuf,
}

impl Matcher {
    pub fn new(config: &GpuConfig) -> Self {
        let mut by_uid = HashMap::new();
        let mut scanned = Vec::new();
        for (i, w) in config.workloads.iter().enumerate() {
            match (&w.pod_uid, &w.cgroup_contains) {
                (Some(uid), _) => {
                    let dashed = uid.replace('_', "-");
                    if pod_uid_of(&format!("pod{dashed}")).as_deref() == Some(dashed.as_str()) {
                        by_uid.entry(dashed).or_insert(i);
                    } else {
                        scanned.push((i, format!("pod{dashed}"), true));
                    }
                }
                (None, Some(s)) => scanned.push((i, s.clone(), false)),
                (None, None) => {}
            }
        }
        Self {
            workloads: Arc::new(config.workloads.clone()),
            by_uid: Arc::new(by_uid),
            scanned: Arc::new(scanned),
            proc_root: config.proc_root.clone(),
        }
    }

    /// The cgroup path of `pid` (the cgroup-v2 line of /proc/<pid>/cgroup, else the whole file).
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let text =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_string)
                .unwrap_or(text),
        )
    }

    /// The configured workload a cgroup path belongs to, with its index in `gpu.workloads`.
    /// Pod UIDs match both cgroup drivers' spellings (`pod1a2b-...` with cgroupfs,
    /// `pod1a2b_...` with systemd).
    /// The first in config order: a full pod UID is looked up (the cgroup path's pod UID, as
    /// [`pod_uid_of`] reads it), the other workloads are scanned.
    fn workload_of(&self, cgroup: &str) -> Option<(usize, &GpuWorkload)> {
        let normalized = cgroup.replace('_', "-");
        let looked_up = pod_uid_of(cgroup)
            .and_then(|uid| self.by_uid.get(&uid).copied())
            .filter(|&i| {
                let uid = self.workloads[i].pod_uid.as_deref().unwrap_or_default();
                normalized.contains(&format!("pod{}", uid.replace('_', "-")))
            });
        let scanned = self.scanned.iter().find_map(|(i, needle, is_pod)| {
            let hay = if *is_pod { &normalized } else { cgroup };
            (looked_up.is_none_or(|l| *i < l) && hay.contains(needle.as_str())).then_some(*i)
        });
        let i = match (looked_up, scanned) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some((i, &self.workloads[i]))
    }

    /// The workload a cgroup path belongs to.
    pub fn classify_cgroup(&self, cgroup: &str) -> Option<Role> {
        self.workload_of(cgroup).map(|(i, w)| match &w.tenant {
            Some(t) => Role::Dedicated(t.clone()),
            None => Role::Shared(format!("gpu.workloads[{i}]")),
        })
    }

    pub fn proc_root(&self) -> &std::path::Path {
        &self.proc_root
    }

    /// The workload of `pid`; the MPS control server whatever its cgroup (its samples are
    /// its clients' work, so it is never a tenant's).
    pub fn classify_pid(&self, pid: u32) -> Option<Role> {
        if self.is_mps_server(pid) {
            return Some(Role::MpsServer);
        }
        self.classify_cgroup(&self.cgroup_of(pid)?)
    }

    /// `/proc/<pid>/comm` is `nvidia-cuda-mps-server`.
    fn is_mps_server(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .is_ok_and(|c| c.trim_end() == "nvidia-cuda-mps-server")
    }
}

/// The pod UID in a kubelet cgroup path (`pod<uid>` with `-` or `_`), dashed and lower case
/// (named in a refused KV report's message, so an operator sees which pod to configure).
pub fn pod_uid_of(cgroup: &str) -> Option<String> {
    let s = cgroup.replace('_', "-").to_ascii_lowercase();
    s.match_indices("pod").find_map(|(i, _)| {
        let uid = s.get(i + 3..i + 3 + 36)?;
        let shape = uid.char_indices().all(|(j, c)| {
            if [8, 13, 18, 23].contains(&j) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
        shape.then(|| uid.to_string())
    })
}

/// Per-tenant KV-cache bytes reported by each shared server's sidecar, and the weighted
/// tokens it had the server process (which split the server's GPU time).
#[derive(Debug, Default)]
pub struct KvReports {
    by_workload: HashMap<String, (Instant, BTreeMap<String, u64>)>,
    pub tokens: TokenMix,
}

impl KvReports {
    pub fn record(&mut self, workload: String, bytes: BTreeMap<String, u64>) {
        self.by_workload.insert(workload, (Instant::now(), bytes));
    }

    /// Reports younger than `max_age`.
    pub fn fresh(&self, max_age: Duration) -> HashMap<String, BTreeMap<String, u64>> {
        self.by_workload
            .iter()
            .filter(|(_, (at, _))| at.elapsed() <= max_age)
            .map(|(w, (_, b))| (w.clone(), b.clone()))
            .collect()
    }
}

/// One GPU's memory, attributed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuUsage {
    pub gpu: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// tenant (or "shared", "unattributed") -> bytes; sums to `used_bytes`.
    pub memory: BTreeMap<String, u64>,
    /// tenant -> KV-cache bytes on this GPU (part of `memory`).
    pub kv_cache: BTreeMap<String, u64>,
}

/// What the collector exports.
#[derive(Clone, Debug, Default)]
pub struct GpuReport {
    pub nvml_up: bool,
    pub gpus: Vec<GpuUsage>,
    /// Process entries dropped as garbled since start.
    pub garbled_total: u64,
    /// Polls done since start, failed ones included.
    pub polls_total: u64,
    /// GPU time and energy per tenant, cumulative since start.
    pub compute: ComputeTotals,
}

/// Drops process entries that cannot be right (NVML has returned garbage with several
/// processes on one GPU): PID 0, more memory than the GPU has, a PID listed twice.
/// Returns the number dropped.
pub fn sanitize(gpu: &mut GpuSnapshot) -> u64 {
    let before = gpu.processes.len();
    let mut seen = HashSet::new();
    let total = gpu.total_bytes;
    gpu.processes
        .retain(|p| p.pid != 0 && p.used_bytes.is_none_or(|b| b <= total) && seen.insert(p.pid));
    (before - gpu.processes.len()) as u64
}

/// The arithmetic: each GPU's used memory split into tenants, "shared" and "unattributed".
///
/// * a process of a dedicated workload: all its memory is the tenant's;
/// * a process of a shared server: each tenant gets its reported KV bytes (divided evenly over
///   the GPUs the server uses: tensor-parallel shards hold equal parts of each sequence's KV),
///   capped so the tenants never get more than the process holds; the rest is "shared";
/// * a process of no known workload, and device memory no process accounts for (the driver,
///   processes NVML cannot size): "unattributed".
pub fn attribute(
    gpus: &[GpuSnapshot],
    classify: &dyn Fn(u32) -> Option<Role>,
    kv: &HashMap<String, BTreeMap<String, u64>>,
) -> Vec<GpuUsage> {
    let roles: HashMap<u32, Option<Role>> = gpus
        .iter()
        .flat_map(|g| g.processes.iter().map(|p| p.pid))
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|pid| (pid, classify(pid)))
        .collect();
    // How many GPUs each shared workload is on.
    let mut spread: HashMap<String, u64> = HashMap::new();
    for g in gpus {
        let on: HashSet<String> = g
            .processes
            .iter()
            .filter_map(|p| match roles.get(&p.pid) {
                Some(Some(Role::Shared(w))) => Some(w.clone()),
                _ => None,
            })
            .collect();
        for w in on {
            *spread.entry(w).or_default() += 1;
        }
    }
    gpus.iter()
        .map(|g| {
            let mut usage = GpuUsage {
                gpu: g.index.to_string(),
                uuid: g.uuid.clone(),
                total_bytes: g.total_bytes,
                used_bytes: g.used_bytes,
                ..Default::default()
            };
            let add = |m: &mut BTreeMap<String, u64>, k: &str, v: u64| {
                if v > 0 {
                    *m.entry(k.to_string()).or_default() += v;
                }
            };
            let mut accounted = 0u64;
            for p in &g.processes {
                let Some(bytes) = p.used_bytes else { continue };
                accounted += bytes;
                match roles.get(&p.pid).cloned().flatten() {
                    Some(Role::Dedicated(t)) => add(&mut usage.memory, &t, bytes),
                    Some(Role::Shared(w)) => {
                        let mut left = bytes;
                        let n = spread.get(&w).copied().unwrap_or(1).max(1);
                        for (tenant, total) in kv.get(&w).into_iter().flatten() {
                            let share = (total / n).min(left);
                            left -= share;
                            add(&mut usage.memory, tenant, share);
                            add(&mut usage.kv_cache, tenant, share);
                        }
                        add(&mut usage.memory, SHARED, left);
                    }
                    Some(Role::MpsServer) | None => add(&mut usage.memory, UNATTRIBUTED, bytes),
                }
            }
            add(
                &mut usage.memory,
                UNATTRIBUTED,
                g.used_bytes.saturating_sub(accounted),
            );
            usage
        })
        .collect()
}

/// The process that sent a KV report, as the kernel names the peer of its tagging connection.
pub struct ReportCaller<'a> {
    /// The agent's end of the caller's connection (for `SO_PEERPIDFD`).
    pub conn: BorrowedFd<'a>,
    /// `SO_PEERCRED` of the connection.
    pub creds: UnixCredentials,
}

/// Why a KV report was refused: the error code and message the caller gets.
pub type KvRefusal = (ErrorCode, String);

/// The polling thread's shared state.
pub struct GpuState {
    pub report: RwLock<GpuReport>,
    pub kv: Mutex<KvReports>,
    pub matcher: RwLock<Matcher>,
    pub kv_max_age: Duration,
}

impl GpuState {
    pub fn new(config: &GpuConfig) -> Self {
        Self {
            report: RwLock::new(GpuReport::default()),
            kv: Mutex::new(KvReports::default()),
            matcher: RwLock::new(Matcher::new(config)),
            kv_max_age: Duration::from_secs(config.kv_report_max_age_seconds),
        }
    }
}

impl GpuState {
    /// Records a shared server's per-tenant KV bytes for the pod the caller runs in, and
    /// returns how many tenants were recorded. Only a process of a workload configured as a
    /// shared server (`gpu.workloads` with `shared = true`) may report (else
    /// `unknown_workload`: a report never makes a pod a shared server), and only for the
    /// tenants listed for that server (else `not_allowed`); `is_tenant` says which names are
    /// configured on the agent (else `unknown_tenant`). A refused report is not recorded at all.
    ///
    /// The caller is found from the kernel, never from the report: `SO_PEERPIDFD` gives a
    /// pidfd of the process that connected, its PID is read in `gpu.proc_root`'s namespace (the
    /// host's, where the agent has no PID namespace of its own to see it from), and its cgroup
    /// from `<proc_root>/<pid>/cgroup`. So a report speaks for the caller's own pod only, from
    /// any PID namespace, without hostPID.
    pub fn kv_report(
        &self,
        caller: &ReportCaller<'_>,
        tenants: &BTreeMap<String, u64>,
        tokens: Option<&BTreeMap<String, u64>>,
        is_tenant: &dyn Fn(&str) -> bool,
    ) -> Result<u32, KvRefusal> {
        let matcher = self.matcher.read().unwrap().clone();
        let (pid, cgroup) = caller_cgroup(caller, &matcher)?;
        let (index, server) = match matcher.workload_of(&cgroup) {
            Some((i, w)) if w.shared => (i, w),
            Some((i, w)) => {
                return Err((
                    ErrorCode::UnknownWorkload,
                    format!(
                        "the caller (pid {pid}) is in a workload dedicated to tenant {:?} (gpu.workloads[{i}]), not a shared inference server",
                        w.tenant.as_deref().unwrap_or_default()
                    ),
                ));
            }
            None => {
                let pod = pod_uid_of(&cgroup)
                    .map(|uid| format!("pod {uid}"))
                    .unwrap_or_else(|| "no Kubernetes pod".into());
                return Err((
                    ErrorCode::UnknownWorkload,
                    format!(
                        "the caller (pid {pid}, cgroup {cgroup:?}, {pod}) is in no workload configured as a shared inference server (gpu.workloads with shared = true); the report was not recorded"
                    ),
                ));
            }
        };
        let named = || {
            tenants
                .keys()
                .chain(tokens.into_iter().flat_map(|t| t.keys()))
        };
        if let Some(unknown) = named().find(|t| !is_tenant(t)) {
            return Err((
                ErrorCode::UnknownTenant,
                format!(
                    "tenant {unknown:?} is not configured on this agent; the report was not recorded"
                ),
            ));
        }
        if let Some(other) = named().find(|t| !server.tenants.contains(t)) {
            return Err((
                ErrorCode::NotAllowed,
                format!(
                    "tenant {other:?} is not one of the tenants of the caller's shared server (gpu.workloads[{index}].tenants); the report was not recorded"
                ),
            ));
        }
        let workload = format!("gpu.workloads[{index}]");
        tracing::debug!(workload = %workload, pid, tenants = tenants.len(), "KV report recorded");
        let mut kv = self.kv.lock().unwrap();
        if let Some(tokens) = tokens {
            kv.tokens.record(&workload, tokens);
        }
        kv.record(workload, tenants.clone());
        Ok(tenants.len() as u32)
    }
}

/// The caller's PID (in `proc_root`'s namespace) and cgroup path.
fn caller_cgroup(caller: &ReportCaller<'_>, matcher: &Matcher) -> Result<(u32, String), KvRefusal> {
    let proc_root = matcher.proc_root.as_path();
    let unknown = |m: String| (ErrorCode::UnknownWorkload, m);
    let internal = |m: String| (ErrorCode::Internal, m);
    let pidfd = match getsockopt(&caller.conn, sockopt::PeerPidfd) {
        Ok(fd) => fd,
        // Linux < 6.5 has no SO_PEERPIDFD: SO_PEERCRED's PID, which the kernel gives in the
        // agent's own PID namespace (0 when the caller is not in it).
        Err(Errno::ENOPROTOOPT) => {
            let pid = caller.creds.pid();
            if pid <= 0 {
                return Err(unknown(
                    "the caller's PID is not visible to the agent: this kernel has no SO_PEERPIDFD (Linux 6.5), and the caller is in a PID namespace the agent cannot see (run the agent with hostPID on such kernels)".into(),
                ));
            }
            let pid = pid as u32;
            let cgroup = matcher.cgroup_of(pid).ok_or_else(|| {
                unknown(format!(
                    "the caller (pid {pid}) has no readable cgroup under {}",
                    proc_root.display()
                ))
            })?;
            return Ok((pid, cgroup));
        }
        Err(Errno::ESRCH) => return Err(unknown("the calling process has exited".into())),
        Err(e) => return Err(internal(format!("SO_PEERPIDFD on the connection: {e}"))),
    };
    let pid_now = || {
        crate::sys::pidfd_pid(proc_root, pidfd.as_fd())
            .map_err(|e| internal(format!("reading the caller's PID: {e}")))
    };
    let Some(pid) = pid_now()? else {
        return Err(unknown(format!(
            "the calling process has exited, or has no PID in the namespace of gpu.proc_root ({}); mount the host's /proc there",
            proc_root.display()
        )));
    };
    let cgroup = matcher.cgroup_of(pid).ok_or_else(|| {
        unknown(format!(
            "the caller (pid {pid}) has no readable cgroup under {}",
            proc_root.display()
        ))
    })?;
    // A PID is not reused while its process lives: if the pidfd still names a live process
    // with this PID, the cgroup read above was the caller's.
    if pid_now()? != Some(pid) {
        return Err(unknown(
            "the calling process exited during its report".into(),
        ));
    }
    Ok((pid, cgroup))
}

fn open(source: &str) -> Result<Box<dyn GpuSource>, String> {
    match source.strip_prefix("file:") {
        Some(path) => Ok(Box::new(FileSource {
            path: PathBuf::from(path),
            served: 0,
        })),
        None => NvmlSource::init().map(|s| Box::new(s) as Box<dyn GpuSource>),
    }
}

/// One process of a one-shot GPU status: what NVML says and how the agent classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessStatus {
    pub gpu: u32,
    pub pid: u32,
    pub used_bytes: Option<u64>,
    /// The process's cgroup path under `gpu.proc_root`, when it could be read.
    pub cgroup: Option<String>,
    pub role: Option<Role>,
}

/// What `bulkhead-agent gpu-status` shows.
#[derive(Clone, Debug, Default)]
pub struct GpuStatus {
    pub usage: Vec<GpuUsage>,
    pub processes: Vec<ProcessStatus>,
    /// GPU time and energy over `window`, from two polls `window` apart.
    pub compute: ComputeTotals,
    pub window: Duration,
}

/// `bulkhead-agent gpu-status`: two polls of the configured source `window` apart, attributed
/// as the running agent would (without KV reports, which only a running agent receives: a
/// shared server's time is `shared`), plus each process's cgroup and role, so an SRE can see
/// why memory and GPU time land where they do. Needs no eBPF.
pub fn one_shot(config: &GpuConfig, window: Duration) -> Result<GpuStatus, String> {
    if config.source == "off" {
        return Err("gpu.source is \"off\": GPU memory attribution is disabled".into());
    }
    let mut src = open(&config.source)?;
    let matcher = Matcher::new(config);
    let classify = |pid| matcher.classify_pid(pid);
    let mut accountant = Accountant::default();
    let mut tokens = TokenMix::default();
    let mut poll = |src: &mut Box<dyn GpuSource>| -> Result<Vec<GpuSnapshot>, String> {
        let mut gpus = src.snapshot()?;
        for g in &mut gpus {
            sanitize(g);
        }
        accountant.poll(&gpus, &classify, &mut tokens, Duration::ZERO);
        Ok(gpus)
    };
    poll(&mut src)?;
    // A measurement window, not a wait for a condition: NVML's samples cover it.
    std::thread::sleep(window);
    let gpus = poll(&mut src)?;
    let processes = gpus
        .iter()
        .flat_map(|g| {
            g.processes.iter().map(|p| ProcessStatus {
                gpu: g.index,
                pid: p.pid,
                used_bytes: p.used_bytes,
                role: matcher.classify_pid(p.pid),
                cgroup: matcher.cgroup_of(p.pid),
            })
        })
        .collect();
    let usage = attribute(&gpus, &classify, &HashMap::new());
    Ok(GpuStatus {
        usage,
        processes,
        compute: accountant.totals,
        window,
    })
}

/// Polls the source every `interval` on its own thread (NVML calls block) until `stop`
/// has a message or is dropped. Without NVML the agent runs on: one log line, nvml_up 0, and
/// a quiet retry each interval.
pub fn spawn_poller(
    source: String,
    interval: Duration,
    state: Arc<GpuState>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("gpu-poller".into())
        .spawn(move || {
            let mut src: Option<Box<dyn GpuSource>> = None;
            let mut last_error: Option<String> = None;
            let mut garbled_total = 0u64;
            let mut polls_total = 0u64;
            let mut accountant = Accountant::default();
            let mut roles = RoleCache::default();
            loop {
                polls_total += 1;
                if src.is_none() {
                    match open(&source) {
                        Ok(s) => src = Some(s),
                        Err(e) => note_error(&mut last_error, e),
                    }
                }
                let result = match src.as_mut() {
                    Some(s) => s.snapshot(),
                    None => Err(last_error.clone().unwrap_or_default()),
                };
                let report = match result {
                    Ok(mut gpus) => {
                        if last_error.take().is_some() {
                            tracing::info!(source = %source, gpus = gpus.len(), "GPU source is up; attributing GPU memory");
                        }
                        for g in &mut gpus {
                            let dropped = sanitize(g);
                            if dropped > 0 {
                                tracing::warn!(gpu = g.index, dropped, "dropped garbled GPU process entries");
                            }
                            garbled_total += dropped;
                        }
                        let matcher = state.matcher.read().unwrap().clone();
                        roles.refresh(&pids_of(&gpus), &matcher, Instant::now());
                        let classify = |pid| roles.get(pid);
                        let kv = {
                            let mut reports = state.kv.lock().unwrap();
                            accountant.poll(&gpus, &classify, &mut reports.tokens, state.kv_max_age);
                            reports.fresh(state.kv_max_age)
                        };
                        GpuReport {
                            nvml_up: true,
                            gpus: attribute(&gpus, &classify, &kv),
                            garbled_total,
                            polls_total,
                            compute: accountant.totals.clone(),
                        }
                    }
                    Err(e) => {
                        note_error(&mut last_error, e);
                        GpuReport {
                            nvml_up: false,
                            gpus: Vec::new(),
                            garbled_total,
                            polls_total,
                            compute: accountant.totals.clone(),
                        }
                    }
                };
                *state.report.write().unwrap() = report;
                match stop.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
        .expect("spawn the GPU poller")
}

/// How long a PID's workload is kept while the PID stays on the GPUs (a pod's process does not
/// change pods; a PID that leaves the GPUs is forgotten at once, so a reused PID is read anew).
const ROLE_TTL: Duration = Duration::from_secs(60);

/// Each PID's workload, read from /proc once while it stays on the GPUs (reading two /proc
/// files per process every poll cost more than the rest of the poll with a thousand processes).
#[derive(Debug, Default)]
struct RoleCache {
    roles: HashMap<u32, (Option<Role>, Instant)>,
}

impl RoleCache {
    /// Keeps the PIDs of this poll, reading those new or older than [`ROLE_TTL`].
    fn refresh(&mut self, pids: &HashSet<u32>, matcher: &Matcher, now: Instant) {
        self.roles.retain(|pid, (_, at)| {
            pids.contains(pid) && now.saturating_duration_since(*at) < ROLE_TTL
        });
        for &pid in pids {
            self.roles
                .entry(pid)
                .or_insert_with(|| (matcher.classify_pid(pid), now));
        }
    }

    fn get(&self, pid: u32) -> Option<Role> {
        self.roles.get(&pid).and_then(|(r, _)| r.clone())
    }
}

/// Every PID a poll names: processes and utilization samples, MIG instances' included.
fn pids_of(gpus: &[GpuSnapshot]) -> HashSet<u32> {
    gpus.iter()
        .flat_map(|g| {
            g.processes
                .iter()
                .map(|p| p.pid)
                .chain(g.process_samples.iter().map(|s| s.pid))
                .chain(
                    g.mig
                        .iter()
                        .flat_map(|m| m.process_samples.iter().map(|s| s.pid)),
                )
        })
        .collect()
}

/// Logs a GPU source error once, not at every poll.
fn note_error(last: &mut Option<String>, e: String) {
    if last.as_deref() != Some(e.as_str()) {
        tracing::warn!(error = %e, "GPU memory attribution unavailable; the agent runs on and bulkhead_nvml_up is 0");
        *last = Some(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let dir =
                std::env::temp_dir().join(format!("bulkhead-kv-{name}-{}", std::process::id()));
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
        let report: BTreeMap<String, u64> =
            report.iter().map(|&(t, b)| (t.to_string(), b)).collect();
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
}
