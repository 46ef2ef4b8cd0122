//! Where GPU readings come from: NVML, or a JSON file that scripts its answers.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// One device utilization sample: SM busy % over one sample period.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct UtilSample {
    /// CPU time of the sample, µs.
    pub ts_us: u64,
    pub sm: u32,
}

/// One process utilization sample (NVML lists only processes busy in the period).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ProcSample {
    pub pid: u32,
    pub ts_us: u64,
    pub sm: u32,
    /// Memory-controller busy % (reported, not used in the split).
    #[serde(default)]
    pub mem: u32,
}

/// One MIG instance of a GPU: its own processes and samples; energy is the parent's.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct MigInstance {
    /// The MIG device's UUID (`MIG-...`): its `gpu` label.
    pub uuid: String,
    /// Memory of the instance (its share of the GPU's weighs its share of the energy).
    pub total_bytes: u64,
    #[serde(default)]
    pub busy_samples: Vec<UtilSample>,
    #[serde(default)]
    pub process_samples: Vec<ProcSample>,
}

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

pub(super) fn open(source: &str) -> Result<Box<dyn GpuSource>, String> {
    match source.strip_prefix("file:") {
        Some(path) => Ok(Box::new(FileSource {
            path: PathBuf::from(path),
            served: 0,
        })),
        None => NvmlSource::init().map(|s| Box::new(s) as Box<dyn GpuSource>),
    }
}
