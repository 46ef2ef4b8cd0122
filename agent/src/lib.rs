//! bulkhead-agent: per-tenant accounting on a GPU node.
//!
//! [`start`] loads and attaches the eBPF programs, opens the tagging API and the admin server,
//! and returns a [`RunningAgent`] handle; [`RunningAgent::shutdown`] stops it cleanly.
//!
//! `unsafe` is denied here and allowed in [`sys`] alone, the agent's interface to the kernel.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod cross_tenant;
pub mod datapath;
pub mod exit;
pub mod gpu;
pub mod gpu_compute;
pub mod metrics;
pub mod otlp;
#[allow(unsafe_code)]
pub mod sys;
pub mod tagging;
pub mod tenants;

use crate::config::Config;
use crate::datapath::{Datapath, DatapathError};
use crate::metrics::{AgentMetrics, DatapathCollector};
use crate::tagging::{TagService, TaggingError};
use crate::tenants::{TenantError, TenantRegistry};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("tenant ids: {0}")]
    Tenants(#[from] TenantError),
    #[error(transparent)]
    Tagging(#[from] TaggingError),
    #[error(transparent)]
    CrossTenant(#[from] cross_tenant::CrossTenantError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// The binary's exit status for this error ([`exit::ExitStatus`], the one table).
    pub fn exit_status(&self) -> exit::ExitStatus {
        self.into()
    }
}

/// A started agent.
pub struct RunningAgent {
    pub admin_addr: SocketAddr,
    pub socket_path: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Program links taken over from an earlier agent (0 on a fresh start).
    pub replaced_links: usize,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    datapath: Datapath,
    config: Config,
    tenants: Arc<RwLock<TenantRegistry>>,
    service: Arc<TagService>,
    event_rate: Arc<AtomicU32>,
    metrics: AgentMetrics,
    gpu_poller: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl RunningAgent {
    /// Applies a new configuration (SIGHUP): tenants, the tagging allow rule and connection
    /// limits, cross-tenant endpoints and must-tag cgroups, the event log rate,
    /// detach_on_shutdown. Fields that need a restart ([`RESTART_ONLY`]: paths, addresses,
    /// `gpu.*`) keep their running values, with a warning each. `new` was validated
    /// when parsed; what can still fail here is checked before anything changes, so the agent
    /// runs on with the old configuration when this returns an error.
    pub fn reload(&mut self, new: Config) -> Result<(), AgentError> {
        let result = self.try_reload(new);
        self.metrics.reload(if result.is_ok() {
            agent_common::ReloadResult::Ok
        } else {
            agent_common::ReloadResult::Invalid
        });
        result
    }

    /// Reads, validates and applies the config file at `path` (what SIGHUP does). On any error
    /// the running configuration stays; the error says why.
    pub fn reload_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        match Config::from_file(path) {
            Ok(c) => self.reload(c).map_err(|e| e.to_string()),
            Err(e) => {
                self.metrics.reload(agent_common::ReloadResult::Invalid);
                Err(e.to_string())
            }
        }
    }

    fn try_reload(&mut self, new: Config) -> Result<(), AgentError> {
        let (new, kept) = keep_restart_only(&self.config, new);
        // The kept fields must still agree with the new ones (gpu.workloads name tenants).
        new.validate("(reloaded, restart-only fields kept)")?;
        for field in kept {
            tracing::warn!(
                field,
                "changing this field takes a restart; keeping the running value"
            );
        }
        let maps = self.datapath.maps();
        // Fallible steps without side effects first.
        let must_tag = cross_tenant::must_tag_ids(&new, &self.cgroup)?;
        let names: Vec<String> = new.tenants.iter().map(|t| t.name.clone()).collect();
        let registry = TenantRegistry::load(&names, &maps)?;
        cross_tenant::apply(&new, &must_tag, &registry, &maps)?;
        *self.tenants.write().unwrap() = registry;
        *self.service.allow.write().unwrap() = new.tagging.clone();
        self.event_rate
            .store(new.cross_tenant.event_log_per_second, Ordering::Relaxed);
        self.config = new;
        tracing::info!(
            tenants = names.len(),
            endpoints = self.config.cross_tenant.endpoints.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Stops serving, removes the tagging socket, and detaches the programs if the config says
    /// so. Pinned maps (counters, tags, tenant ids) are always kept.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some((stop, thread)) = self.gpu_poller {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.metrics.set_up(false);
        let _ = std::fs::remove_file(&self.socket_path);
        let detach = self.config.detach_on_shutdown;
        self.datapath.shutdown(detach);
        tracing::info!(detached = detach, "bulkhead-agent stopped");
    }
}

/// Copies the running value of a field into a new config.
type KeepField = fn(&mut Config, &Config);

/// The fields a reload cannot change, each with how its running value is kept: paths and
/// addresses (the maps, links, sockets and listeners are set up from them at start), and every
/// `gpu.*` field (the poller thread, its source and the workload matcher are set up at start,
/// and `gpu` in the running config must keep describing them). The one list of them.
pub const RESTART_ONLY: [(&str, KeepField); 12] = [
    ("cgroup_path", |n, r| {
        n.cgroup_path.clone_from(&r.cgroup_path)
    }),
    ("bpffs", |n, r| n.bpffs.clone_from(&r.bpffs)),
    ("pin_dir", |n, r| n.pin_dir.clone_from(&r.pin_dir)),
    ("admin_addr", |n, r| n.admin_addr = r.admin_addr),
    ("tagging.socket_path", |n, r| {
        n.tagging.socket_path.clone_from(&r.tagging.socket_path)
    }),
    ("tagging.socket_mode", |n, r| {
        n.tagging.socket_mode = r.tagging.socket_mode
    }),
    ("gpu.source", |n, r| n.gpu.source.clone_from(&r.gpu.source)),
    ("gpu.poll_interval_ms", |n, r| {
        n.gpu.poll_interval_ms = r.gpu.poll_interval_ms
    }),
    ("gpu.proc_root", |n, r| {
        n.gpu.proc_root.clone_from(&r.gpu.proc_root)
    }),
    ("gpu.kv_report_max_age_seconds", |n, r| {
        n.gpu.kv_report_max_age_seconds = r.gpu.kv_report_max_age_seconds
    }),
    ("gpu.workloads", |n, r| {
        n.gpu.workloads.clone_from(&r.gpu.workloads)
    }),
    ("telemetry.otlp", |n, r| {
        n.telemetry.otlp.clone_from(&r.telemetry.otlp)
    }),
];

/// `new` with every [`RESTART_ONLY`] field set back to its running value, and the names of
/// those that `new` had changed.
pub fn keep_restart_only(running: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut changed = Vec::new();
    for (field, keep) in RESTART_ONLY {
        let before = new.clone();
        keep(&mut new, running);
        if new != before {
            changed.push(field);
        }
    }
    (new, changed)
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// What the agent's start found of the host.
#[derive(Debug)]
pub struct Host {
    pub cgroup: PathBuf,
    pub bpffs: sys::Bpffs,
}

/// The host checks of the agent's start, in its order: privileges, bpffs (mounted, or
/// mountable by this process), the cgroup-v2 directory, kernel BTF, `bpf()` allowed. With
/// `mount`, a missing bpffs is mounted (the agent's start); without, nothing changes
/// (`preflight`), so the two fail alike, with the same error.
pub fn check_host(config: &Config, mount: bool) -> Result<Host, AgentError> {
    let caps = sys::check_privileges()?;
    let bpffs = if mount {
        sys::ensure_bpffs(&config.bpffs, caps)?
    } else {
        sys::check_bpffs(&config.bpffs, caps)?
    };
    let cgroup = sys::resolve_cgroup(config.cgroup_path.as_deref())?;
    sys::check_btf(std::path::Path::new(sys::KERNEL_BTF))?;
    sys::check_bpf()?;
    Ok(Host { cgroup, bpffs })
}

/// Checks, without changing anything, that the agent could start here: what its start checks
/// before it loads the programs ([`check_host`]). Returns a short report.
pub fn preflight(config: &Config) -> Result<String, AgentError> {
    let host = check_host(config, false)?;
    Ok(format!(
        "privileges: ok\nbpffs: {} ({})\ncgroup v2: {}\nkernel BTF: {}\nbpf(): allowed",
        config.bpffs.display(),
        match host.bpffs {
            sys::Bpffs::Mounted | sys::Bpffs::MountedNow => "mounted",
            sys::Bpffs::WillMount => "not mounted; the agent will mount it",
        },
        host.cgroup.display(),
        sys::KERNEL_BTF,
    ))
}

/// Starts the agent. Must run inside a tokio runtime.
pub async fn start(config: Config) -> Result<RunningAgent, AgentError> {
    let Host { cgroup, bpffs } = check_host(&config, true)?;
    if bpffs == sys::Bpffs::MountedNow {
        tracing::info!(path = %config.bpffs.display(), "mounted bpffs");
    }
    let must_tag = cross_tenant::must_tag_ids(&config, &cgroup)?;
    let mut datapath = Datapath::load(&cgroup, &config.pin_dir)?;
    let maps = datapath.maps();
    let names: Vec<String> = config.tenants.iter().map(|t| t.name.clone()).collect();
    let registry = TenantRegistry::load(&names, &maps)?;
    cross_tenant::apply(&config, &must_tag, &registry, &maps)?;
    let tenants = Arc::new(RwLock::new(registry));

    let gpu_state = Arc::new(gpu::GpuState::new(&config.gpu));
    let gpu_poller = (config.gpu.source != "off").then(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = gpu::spawn_poller(
            config.gpu.source.clone(),
            std::time::Duration::from_millis(config.gpu.poll_interval_ms),
            gpu_state.clone(),
            rx,
        );
        (tx, thread)
    });

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    registry.register_collector(Box::new(DatapathCollector {
        maps: maps.clone(),
        tenants: tenants.clone(),
    }));
    registry.register_collector(Box::new(metrics::GpuCollector {
        state: gpu_state.clone(),
        enabled: config.gpu.source != "off",
    }));

    let listener = tagging::bind_socket(&config.tagging)?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| AgentError::Admin {
            addr: config.admin_addr,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AgentError::Admin {
            addr: config.admin_addr,
            source,
        })?;

    let (stop, stop_rx) = watch::channel(false);
    let admin_state = Arc::new(admin::AdminState {
        registry,
        ready: false.into(),
        metrics: metrics.clone(),
    });
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        stopped(stop_rx.clone()),
    )));
    let service = Arc::new(TagService {
        maps,
        gpu: gpu_state.clone(),
        tenants: tenants.clone(),
        allow: RwLock::new(config.tagging.clone()),
        metrics: metrics.clone(),
    });
    let rx = stop_rx.clone();
    let serving = service.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = tagging::serve(listener, serving, stopped(rx)).await {
            tracing::error!(error = %e, "tagging API stopped");
        }
    }));
    let event_rate = Arc::new(AtomicU32::new(config.cross_tenant.event_log_per_second));
    if let Some(ring) = datapath.take_flow_events() {
        tasks.push(tokio::spawn(cross_tenant::drain_events(
            ring,
            tenants.clone(),
            event_rate.clone(),
            metrics.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    if let Some(o) = &config.telemetry.otlp {
        tasks.push(tokio::spawn(otlp::run(
            o.clone(),
            admin_state.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    if let Some(logger) = datapath.take_logger() {
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(drain_kernel_logs(logger, stopped(rx))));
    }
    metrics.set_up(true);
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(
        admin = %admin_addr,
        socket = %config.tagging.socket_path.display(),
        cgroup = %cgroup.display(),
        pin_dir = %config.pin_dir.display(),
        replaced_links = datapath.replaced_links,
        tenants = names.len(),
        endpoints = config.cross_tenant.endpoints.len(),
        "bulkhead-agent ready"
    );
    Ok(RunningAgent {
        admin_addr,
        socket_path: config.tagging.socket_path.clone(),
        cgroup,
        pin_dir: config.pin_dir.clone(),
        replaced_links: datapath.replaced_links,
        stop,
        tasks,
        datapath,
        config,
        tenants,
        service,
        event_rate,
        metrics,
        gpu_poller,
    })
}

/// Forwards aya-log records from the kernel programs to `log` (and so to `tracing`).
async fn drain_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut fd = match sys::async_fd(logger, tokio::io::Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the kernel log buffer");
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            guard = fd.readable_mut() => match guard {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kernel log buffer failed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_fields_keep_their_running_values() {
        let running = Config::builtin();
        let mut new = running.clone();
        new.pin_dir = "/sys/fs/bpf/elsewhere".into();
        new.tagging.socket_mode = 0o600;
        new.tagging.max_connections = 7;
        new.gpu.poll_interval_ms = 60_000;
        new.gpu.workloads.push(config::GpuWorkload {
            pod_uid: Some("1a2b".into()),
            cgroup_contains: None,
            tenant: None,
            shared: true,
            tenants: vec!["alpha".into()],
        });
        new.cross_tenant.event_log_per_second = 99;
        let (kept, changed) = keep_restart_only(&running, new);
        assert_eq!(
            changed,
            [
                "pin_dir",
                "tagging.socket_mode",
                "gpu.poll_interval_ms",
                "gpu.workloads"
            ]
        );
        assert_eq!(kept.pin_dir, running.pin_dir);
        assert_eq!(kept.tagging.socket_mode, running.tagging.socket_mode);
        assert_eq!(kept.gpu, running.gpu, "gpu.* is not applied on reload");
        assert_eq!(kept.tagging.max_connections, 7, "reloadable");
        assert_eq!(kept.cross_tenant.event_log_per_second, 99, "reloadable");
        let (same, changed) = keep_restart_only(&running, running.clone());
        assert!(changed.is_empty());
        assert_eq!(same, running);
    }
}
