//! GPU memory attributed to tenants.
//!
//! NVML reports memory per device and per process (host PIDs), not per tenant. Each process is
//! mapped to a workload through `/proc/<pid>/cgroup` (its pod): a pod dedicated to one tenant is
//! that tenant's; a shared inference server's memory is split by the KV-cache bytes its sidecar
//! reports per tenant, the rest labelled `shared`; anything else is `unattributed`.
//!
//! The GPU is behind [`GpuSource`] so tests script it ([`FileSource`]); [`NvmlSource`] keeps one
//! NVML handle for the life of the process.

use crate::config::GpuConfig;
pub use crate::gpu_compute::{Accountant, ComputeTotals, TokenMix};
use agent_common::proto::ErrorCode;
use nix::errno::Errno;
use nix::sys::socket::{UnixCredentials, getsockopt, sockopt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Label of a shared server's memory that is no tenant's (a name no tenant may have).
pub const SHARED: &str = agent_common::SHARED_TENANT_NAME;
/// Label of memory no process or tenant could be found for (a name no tenant may have).
pub const UNATTRIBUTED: &str = agent_common::UNATTRIBUTED_TENANT_NAME;

pub(crate) mod source;
pub(crate) mod workloads;

use source::open;
pub use source::{
    FileSource, GpuProcess, GpuSnapshot, GpuSource, MigInstance, NvmlSource, ProcSample, UtilSample,
};
pub use workloads::{Matcher, Role, pod_uid_of};

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
    let proc_root = matcher.proc_root();
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
mod tests;
