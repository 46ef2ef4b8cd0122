//! bulkhead-agent: per-tenant accounting on a GPU node.
//!
//! [`start`] loads and attaches the eBPF programs, opens the tagging API and the admin server,
//! and returns a [`RunningAgent`] handle; [`RunningAgent::shutdown`] stops it cleanly.

pub mod admin;
pub mod config;
pub mod cross_tenant;
pub mod datapath;
pub mod gpu;
pub mod metrics;
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
use tokio::io::unix::AsyncFd;
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
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Exit status for the binary: 77 (EX_NOPERM) without privileges, 69 (EX_UNAVAILABLE) when
    /// a kernel feature is missing, 71 (EX_OSERR) otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Sys(sys::SysError::NotPrivileged { .. }) => 77,
            AgentError::Sys(sys::SysError::NoCgroup2 | sys::SysError::NotCgroup2 { .. }) => 69,
            _ => 71,
        }
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
    gpu: Arc<gpu::GpuState>,
    gpu_poller: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl RunningAgent {
    /// Applies a new configuration (SIGHUP): tenants, the tagging allow rule, cross-tenant
    /// endpoints and must-tag cgroups, the event log rate, detach_on_shutdown. Fields that need
    /// a restart (paths, addresses) are left as they are, with a warning. `new` was validated
    /// when parsed; what can still fail here is checked before anything changes, so the agent
    /// runs on with the old configuration when this returns an error.
    pub fn reload(&mut self, new: Config) -> Result<(), AgentError> {
        let result = self.try_reload(new);
        self.metrics
            .reload(if result.is_ok() { "ok" } else { "invalid" });
        result
    }

    /// Reads, validates and applies the config file at `path` (what SIGHUP does). On any error
    /// the running configuration stays; the error says why.
    pub fn reload_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        match Config::from_file(path) {
            Ok(c) => self.reload(c).map_err(|e| e.to_string()),
            Err(e) => {
                self.metrics.reload("invalid");
                Err(e.to_string())
            }
        }
    }

    fn try_reload(&mut self, new: Config) -> Result<(), AgentError> {
        let old = &self.config;
        for (field, changed) in [
            ("cgroup_path", old.cgroup_path != new.cgroup_path),
            ("bpffs", old.bpffs != new.bpffs),
            ("pin_dir", old.pin_dir != new.pin_dir),
            ("admin_addr", old.admin_addr != new.admin_addr),
            (
                "tagging.socket_path",
                old.tagging.socket_path != new.tagging.socket_path,
            ),
            (
                "tagging.socket_mode",
                old.tagging.socket_mode != new.tagging.socket_mode,
            ),
        ] {
            if changed {
                tracing::warn!(
                    field,
                    "changing this field takes a restart; keeping the running value"
                );
            }
        }
        let maps = self.datapath.maps();
        // Fallible steps without side effects first.
        let must_tag = cross_tenant::must_tag_ids(&new, &self.cgroup)?;
        let names: Vec<String> = new.tenants.iter().map(|t| t.name.clone()).collect();
        let registry = TenantRegistry::load(&names, &maps)?;
        cross_tenant::apply(&new, &must_tag, &registry, &maps)?;
        *self.tenants.write().unwrap() = registry;
        *self.service.allow.write().unwrap() = new.tagging.clone();
        {
            let mut matcher = self.gpu.matcher.write().unwrap();
            *matcher = gpu::Matcher::new(&new.gpu).with_discovered_from(&matcher);
        }
        for (field, changed) in [
            ("gpu.source", self.config.gpu.source != new.gpu.source),
            (
                "gpu.poll_interval_ms",
                self.config.gpu.poll_interval_ms != new.gpu.poll_interval_ms,
            ),
        ] {
            if changed {
                tracing::warn!(
                    field,
                    "changing this field takes a restart; keeping the running value"
                );
            }
        }
        self.event_rate
            .store(new.cross_tenant.event_log_per_second, Ordering::Relaxed);
        let keep = Config {
            cgroup_path: self.config.cgroup_path.clone(),
            bpffs: self.config.bpffs.clone(),
            pin_dir: self.config.pin_dir.clone(),
            admin_addr: self.config.admin_addr,
            tagging: config::TaggingConfig {
                socket_path: self.config.tagging.socket_path.clone(),
                socket_mode: self.config.tagging.socket_mode,
                ..new.tagging.clone()
            },
            ..new
        };
        self.config = keep;
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

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Checks, without changing anything, that the agent could start here: privileges and the
/// cgroup-v2 mount. Returns a short report.
pub fn preflight(config: &Config) -> Result<String, AgentError> {
    sys::check_privileges()?;
    let cgroup = sys::resolve_cgroup(config.cgroup_path.as_deref())?;
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    Ok(format!(
        "privileges: ok\ncgroup v2: {}\nbpffs: {} ({})\nkernel BTF: {}",
        cgroup.display(),
        config.bpffs.display(),
        if sys::is_bpffs(&config.bpffs) {
            "mounted"
        } else {
            "not mounted; the agent will mount it"
        },
        if btf { "present" } else { "absent" }
    ))
}

/// Starts the agent. Must run inside a tokio runtime.
pub async fn start(config: Config) -> Result<RunningAgent, AgentError> {
    sys::check_privileges()?;
    if sys::ensure_bpffs(&config.bpffs)? {
        tracing::info!(path = %config.bpffs.display(), "mounted bpffs");
    }
    let cgroup = sys::resolve_cgroup(config.cgroup_path.as_deref())?;
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
        gpu: gpu_state,
        gpu_poller,
    })
}

/// Forwards aya-log records from the kernel programs to `log` (and so to `tracing`).
async fn drain_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // SAFETY: the logger owns its ring buffer's descriptor, which stays open and the same for
    // the logger's lifetime.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
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
