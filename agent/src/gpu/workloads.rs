//! Which workload, and so which tenant, a GPU process belongs to.

use crate::config::{GpuConfig, GpuWorkload};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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
    pub(super) fn workload_of(&self, cgroup: &str) -> Option<(usize, &GpuWorkload)> {
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
