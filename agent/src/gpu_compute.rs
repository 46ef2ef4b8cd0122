//! GPU time and energy attributed to tenants.
//!
//! Each poll the source gives, per GPU (and per MIG instance), the utilization samples NVML took
//! since the last poll: the device's (SM busy %, one per sample period) and each process's (SM
//! busy % of the same periods, only for processes that were busy), plus the device's energy
//! counter (mJ since the driver loaded). [`Accountant::poll`] turns two readings into
//! increments of cumulative counters:
//!
//! * the unit's busy seconds: `D = interval x mean(device SM %) / 100`;
//! * a process's busy seconds: `interval x sum(its SM %) / (100 x device samples)`, all
//!   processes scaled down together if they add up to more than `D` (time-slicing and MPS
//!   samples can overlap), so the tenants never get more than the device was busy;
//! * what no process accounts for: `tenant="unattributed"`, with the reason counted
//!   (`no_process_samples`, `unknown_process`, `mps_server`);
//! * an MPS server's own samples: attributed to nobody (`mps_server`) when the driver reports
//!   only the server; dropped when the clients are reported by their own PIDs (never counted
//!   twice);
//! * a shared server's busy seconds: split by the weighted tokens its sidecar reported since
//!   the last split ([`TokenMix`]), `shared` without a fresh report;
//! * energy: the device's delta times each tenant's busy seconds over the interval (on a MIG
//!   instance also times the instance's share of the GPU's memory, a proxy for its slice); the
//!   rest, idle power included, `unattributed` on the physical GPU.
//!
//! So each GPU's busy series sum to its device busy seconds and its energy series (its MIG
//! instances' included) to its energy delta. Counters that go backwards are a wrap (a delta
//! that fits what a GPU can draw) or a reset on driver reload (the new value is the delta,
//! counted in `resets`).

use crate::gpu::source::{GpuSnapshot, ProcSample, UtilSample};
use crate::gpu::workloads::Role;
use agent_common::{SHARED_TENANT_NAME as SHARED, UNATTRIBUTED_TENANT_NAME as UNATTRIBUTED};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Why busy time went to `unattributed`.
pub const REASON_NO_SAMPLES: &str = "no_process_samples";
pub const REASON_UNKNOWN: &str = "unknown_process";
pub const REASON_MPS: &str = "mps_server";

/// The most a GPU can plausibly draw, W: a counter delta above this over the interval is no
/// wrap of a live counter.
const MAX_PLAUSIBLE_WATTS: f64 = 5_000.0;

/// How a counter moved between two readings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Delta {
    Normal(u64),
    /// The counter passed the top of its width (32 or 64 bits) and went on from 0.
    Wrapped(u64),
    /// The counter started again from 0 (driver reload): the new value is what was counted
    /// since; what came between the last reading and the reload is lost.
    Reset(u64),
    /// Nothing plausible fits (a reset long ago, a reading missed): nothing is counted.
    Skipped,
}

/// `new - old` for a counter that may wrap (at 2^32 or 2^64) or reset; `max` is the largest
/// plausible delta (a larger step forward is skipped too: a reading missed, a counter
/// replaced).
pub fn counter_delta(old: u64, new: u64, max: u64) -> Delta {
    if new >= old {
        return if new - old <= max {
            Delta::Normal(new - old)
        } else {
            Delta::Skipped
        };
    }
    for width in [32u32, 64] {
        let top: u128 = 1u128 << width;
        if u128::from(old) < top {
            let d = top - u128::from(old) + u128::from(new);
            if d <= u128::from(max) {
                return Delta::Wrapped(d as u64);
            }
        }
    }
    if new <= max {
        Delta::Reset(new)
    } else {
        Delta::Skipped
    }
}

/// The tokens a shared server's sidecar reported per tenant, weighted by its fair queue's
/// input and output costs.
#[derive(Debug, Default)]
pub struct TokenMix {
    /// Tokens reported since the server's busy time was last split, per workload.
    since_split: HashMap<String, BTreeMap<String, u64>>,
    /// The tokens of the last split, used while no new tokens come.
    last: HashMap<String, BTreeMap<String, u64>>,
    reported_at: HashMap<String, Instant>,
}

impl TokenMix {
    /// A report's tokens (since the sidecar's previous report) for `workload`.
    pub fn record(&mut self, workload: &str, tokens: &BTreeMap<String, u64>) {
        let acc = self.since_split.entry(workload.to_string()).or_default();
        for (t, n) in tokens {
            *acc.entry(t.clone()).or_default() += n;
        }
        self.reported_at
            .insert(workload.to_string(), Instant::now());
    }

    /// The weights to split `workload`'s busy time by now: the tokens since the last split,
    /// else those of the last split; none without a report younger than `max_age`.
    fn weights(&self, workload: &str, max_age: Duration) -> Option<&BTreeMap<String, u64>> {
        if self
            .reported_at
            .get(workload)
            .is_none_or(|at| at.elapsed() > max_age)
        {
            return None;
        }
        let nonzero = |m: &&BTreeMap<String, u64>| m.values().any(|&n| n > 0);
        self.since_split
            .get(workload)
            .filter(nonzero)
            .or_else(|| self.last.get(workload).filter(nonzero))
    }

    /// `workload`'s busy time was split: its new tokens become the last mix.
    fn split_done(&mut self, workload: &str) {
        if let Some(m) = self.since_split.remove(workload)
            && m.values().any(|&n| n > 0)
        {
            self.last.insert(workload.to_string(), m);
        }
    }
}

/// What a unit (a GPU, or a MIG instance) read last.
#[derive(Clone, Debug, Default)]
struct UnitState {
    ts_us: u64,
    last_busy_sample: u64,
    last_proc_sample: u64,
}

#[derive(Clone, Debug, Default)]
struct GpuState {
    unit: UnitState,
    energy_mj: Option<u64>,
}

/// Cumulative counters, as exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ComputeTotals {
    /// (gpu, tenant) -> busy seconds; tenants include `shared` and `unattributed`.
    pub busy: BTreeMap<(String, String), f64>,
    /// (gpu, tenant) -> joules.
    pub energy: BTreeMap<(String, String), f64>,
    /// gpu (or MIG instance) -> busy seconds of the device.
    pub device_busy: BTreeMap<String, f64>,
    /// gpu -> joules of the device (a physical GPU's).
    pub device_energy: BTreeMap<String, f64>,
    /// (gpu, reason) -> busy seconds attributed to no tenant.
    pub unattributed: BTreeMap<(String, &'static str), f64>,
    /// (gpu, counter) -> times a counter wrapped or reset.
    pub resets: BTreeMap<(String, &'static str), u64>,
    /// gpu (or MIG instance) -> how it is shared now: `exclusive`, `time_slicing`, `mps`, `mig`.
    pub sharing: BTreeMap<String, &'static str>,
}

/// Turns successive readings into the cumulative counters.
#[derive(Debug, Default)]
pub struct Accountant {
    /// By UUID (a GPU's index may change between driver loads).
    gpus: HashMap<String, GpuState>,
    units: HashMap<String, UnitState>,
    pub totals: ComputeTotals,
}

/// One unit's readings for this poll.
struct Unit<'a> {
    label: String,
    state_key: String,
    busy_samples: &'a [UtilSample],
    process_samples: &'a [ProcSample],
    /// The unit's share of its GPU's energy (1 for a whole GPU).
    energy_share: f64,
}

impl Accountant {
    /// Accounts one poll. `classify` maps a PID to its workload (as for memory); a shared
    /// server's busy time is split by `tokens`, whose mixes of servers that were busy are
    /// consumed.
    pub fn poll(
        &mut self,
        gpus: &[GpuSnapshot],
        classify: &dyn Fn(u32) -> Option<Role>,
        tokens: &mut TokenMix,
        token_max_age: Duration,
    ) {
        let mut roles: HashMap<u32, Option<Role>> = HashMap::new();
        let mut role = |pid: u32| roles.entry(pid).or_insert_with(|| classify(pid)).clone();
        let mut busy_servers: HashSet<String> = HashSet::new();
        let mut seen: HashSet<String> = HashSet::new();
        for g in gpus {
            let Some(ts) = g.timestamp_us else { continue };
            let label = g.index.to_string();
            seen.insert(label.clone());
            let prev = self.gpus.get(&g.uuid).cloned();
            if prev.as_ref().is_some_and(|p| p.unit.ts_us == ts) {
                // The same reading again (a source with nothing new): nothing to count.
                continue;
            }
            let mig_total: u64 = g.mig.iter().map(|m| m.total_bytes).sum();
            let norm = (mig_total as f64 / g.total_bytes.max(1) as f64).max(1.0);
            let units: Vec<Unit<'_>> = if g.mig.is_empty() {
                vec![Unit {
                    label: label.clone(),
                    state_key: g.uuid.clone(),
                    busy_samples: &g.busy_samples,
                    process_samples: &g.process_samples,
                    energy_share: 1.0,
                }]
            } else {
                g.mig
                    .iter()
                    .map(|m| Unit {
                        label: m.uuid.clone(),
                        state_key: m.uuid.clone(),
                        busy_samples: &m.busy_samples,
                        process_samples: &m.process_samples,
                        energy_share: m.total_bytes as f64 / g.total_bytes.max(1) as f64 / norm,
                    })
                    .collect()
            };
            // The interval: from the GPU's last reading; a clock that went back restarts it.
            let interval = match &prev {
                Some(p) if ts > p.unit.ts_us => Some((ts - p.unit.ts_us) as f64 / 1e6),
                Some(_) => {
                    *self
                        .totals
                        .resets
                        .entry((label.clone(), "clock"))
                        .or_default() += 1;
                    None
                }
                None => None,
            };
            let energy_j = match (
                interval,
                prev.as_ref().and_then(|p| p.energy_mj),
                g.energy_mj,
            ) {
                (Some(secs), Some(old), Some(new)) => {
                    let max = (MAX_PLAUSIBLE_WATTS * secs * 1000.0) as u64;
                    match counter_delta(old, new, max) {
                        Delta::Normal(d) => Some(d as f64 / 1000.0),
                        Delta::Wrapped(d) | Delta::Reset(d) => {
                            *self
                                .totals
                                .resets
                                .entry((label.clone(), "energy"))
                                .or_default() += 1;
                            Some(d as f64 / 1000.0)
                        }
                        Delta::Skipped => {
                            *self
                                .totals
                                .resets
                                .entry((label.clone(), "energy"))
                                .or_default() += 1;
                            None
                        }
                    }
                }
                _ => None,
            };
            let mut energy_left = energy_j.unwrap_or(0.0);
            for unit in units {
                let state = self.units.remove(&unit.state_key).unwrap_or_default();
                let newest_busy = unit
                    .busy_samples
                    .iter()
                    .map(|s| s.ts_us)
                    .max()
                    .unwrap_or(0)
                    .max(state.last_busy_sample);
                let newest_proc = unit
                    .process_samples
                    .iter()
                    .map(|s| s.ts_us)
                    .max()
                    .unwrap_or(0)
                    .max(state.last_proc_sample);
                self.units.insert(
                    unit.state_key.clone(),
                    UnitState {
                        ts_us: ts,
                        last_busy_sample: newest_busy,
                        last_proc_sample: newest_proc,
                    },
                );
                // Sharing mode, from who is on the unit now.
                let pids: HashSet<u32> = unit.process_samples.iter().map(|s| s.pid).collect();
                let on_gpu: HashSet<u32> = if g.mig.is_empty() {
                    g.processes
                        .iter()
                        .map(|p| p.pid)
                        .chain(pids.clone())
                        .collect()
                } else {
                    pids.clone()
                };
                let mps_server = on_gpu
                    .iter()
                    .any(|&p| matches!(role(p), Some(Role::MpsServer)));
                let mode = if !g.mig.is_empty() {
                    "mig"
                } else if mps_server {
                    "mps"
                } else if on_gpu.len() > 1 {
                    "time_slicing"
                } else {
                    "exclusive"
                };
                self.totals.sharing.insert(unit.label.clone(), mode);
                let Some(secs) = interval else { continue };
                // A unit first seen now (a new MIG instance) starts its baseline here.
                if state.ts_us == 0 && prev.is_some() && !g.mig.is_empty() {
                    continue;
                }
                let window_busy: Vec<&UtilSample> = unit
                    .busy_samples
                    .iter()
                    .filter(|s| s.ts_us > state.last_busy_sample && s.ts_us <= ts)
                    .collect();
                let n = window_busy.len() as f64;
                let device_busy = if n > 0.0 {
                    secs * window_busy
                        .iter()
                        .map(|s| u64::from(s.sm.min(100)))
                        .sum::<u64>() as f64
                        / (100.0 * n)
                } else {
                    0.0
                };
                *self
                    .totals
                    .device_busy
                    .entry(unit.label.clone())
                    .or_default() += device_busy;
                // Each process's busy seconds, from its own samples.
                let mut sm_sums: BTreeMap<u32, u64> = BTreeMap::new();
                if n > 0.0 {
                    for s in unit
                        .process_samples
                        .iter()
                        .filter(|s| s.ts_us > state.last_proc_sample && s.ts_us <= ts)
                    {
                        *sm_sums.entry(s.pid).or_default() += u64::from(s.sm.min(100));
                    }
                }
                let mut per_pid: BTreeMap<u32, f64> = sm_sums
                    .into_iter()
                    .map(|(pid, sum)| (pid, secs * sum as f64 / (100.0 * n)))
                    .collect();
                let clients_reported = per_pid
                    .keys()
                    .any(|&p| !matches!(role(p), Some(Role::MpsServer)));
                if clients_reported {
                    // The server's samples are its clients' work again: never count it twice.
                    per_pid.retain(|&p, _| !matches!(role(p), Some(Role::MpsServer)));
                }
                let sum: f64 = per_pid.values().sum();
                let scale = if sum > device_busy && sum > 0.0 {
                    device_busy / sum
                } else {
                    1.0
                };
                let mut busy: BTreeMap<String, f64> = BTreeMap::new();
                let add = |m: &mut BTreeMap<String, f64>, k: &str, v: f64| {
                    if v > 0.0 {
                        *m.entry(k.to_string()).or_default() += v;
                    }
                };
                let mut unattributed: BTreeMap<&'static str, f64> = BTreeMap::new();
                let mut attributed = 0.0;
                for (&pid, &raw) in &per_pid {
                    let b = raw * scale;
                    attributed += b;
                    match role(pid) {
                        Some(Role::Dedicated(t)) => add(&mut busy, &t, b),
                        Some(Role::Shared(w)) => {
                            busy_servers.insert(w.clone());
                            match tokens.weights(&w, token_max_age) {
                                Some(mix) => {
                                    let total: u64 = mix.values().sum();
                                    for (t, &k) in mix {
                                        add(&mut busy, t, b * k as f64 / total as f64);
                                    }
                                }
                                None => add(&mut busy, SHARED, b),
                            }
                        }
                        Some(Role::MpsServer) => {
                            add(&mut busy, UNATTRIBUTED, b);
                            *unattributed.entry(REASON_MPS).or_default() += b;
                        }
                        None => {
                            add(&mut busy, UNATTRIBUTED, b);
                            *unattributed.entry(REASON_UNKNOWN).or_default() += b;
                        }
                    }
                }
                let rest = (device_busy - attributed).max(0.0);
                if rest > 0.0 {
                    add(&mut busy, UNATTRIBUTED, rest);
                    *unattributed.entry(REASON_NO_SAMPLES).or_default() += rest;
                }
                for (reason, s) in unattributed {
                    *self
                        .totals
                        .unattributed
                        .entry((unit.label.clone(), reason))
                        .or_default() += s;
                }
                for (tenant, b) in busy {
                    if let Some(e) = energy_j {
                        let share = e * unit.energy_share * b / secs;
                        energy_left -= share;
                        *self
                            .totals
                            .energy
                            .entry((unit.label.clone(), tenant.clone()))
                            .or_default() += share;
                    }
                    *self
                        .totals
                        .busy
                        .entry((unit.label.clone(), tenant))
                        .or_default() += b;
                }
            }
            if let Some(e) = energy_j {
                *self.totals.device_energy.entry(label.clone()).or_default() += e;
                // Idle power and what no process accounts for, on the physical GPU.
                if energy_left > 0.0 {
                    *self
                        .totals
                        .energy
                        .entry((label.clone(), UNATTRIBUTED.to_string()))
                        .or_default() += energy_left;
                }
            }
            self.gpus.insert(
                g.uuid.clone(),
                GpuState {
                    unit: UnitState {
                        ts_us: ts,
                        ..Default::default()
                    },
                    energy_mj: g.energy_mj.or(prev.and_then(|p| p.energy_mj)),
                },
            );
        }
        // MIG instances removed (reconfigured) keep their counters but stop showing a mode.
        let live: HashSet<String> = gpus
            .iter()
            .flat_map(|g| g.mig.iter().map(|m| m.uuid.clone()))
            .chain(seen)
            .collect();
        self.totals.sharing.retain(|k, _| live.contains(k));
        for w in busy_servers {
            tokens.split_done(&w);
        }
    }
}

#[cfg(test)]
mod tests;
