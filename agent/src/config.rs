//! The agent's TOML configuration, validated as a whole at start-up.

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The built-in configuration, used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../bulkhead-agent.toml");

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cgroup_path: Option<PathBuf>,
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_true")]
    pub detach_on_shutdown: bool,
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    #[serde(default)]
    pub tagging: TaggingConfig,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub cross_tenant: CrossTenantConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    /// `[telemetry.otlp]`: these metrics over OTLP/HTTP too (off by default).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp: Option<OtlpConfig>,
}

/// Where and how often the metrics are sent (`<endpoint>/v1/metrics`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://otel-collector:4318`.
    pub endpoint: String,
    #[serde(default = "default_otlp_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_otlp_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_otlp_service")]
    pub service_name: String,
}

fn default_otlp_interval() -> u64 {
    15_000
}
fn default_otlp_timeout() -> u64 {
    2_000
}
fn default_otlp_service() -> String {
    "bulkhead-agent".into()
}

/// GPU memory attribution: NVML polling, and which workloads (pods) belong to whom.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// `"nvml"`, `"off"`, or `"file:PATH"`: a JSON snapshot re-read at every poll (for tests
    /// and replays; see `gpu::FileSource`).
    #[serde(default = "default_gpu_source")]
    pub source: String,
    #[serde(default = "default_gpu_poll_ms")]
    pub poll_interval_ms: u64,
    /// Where the host's /proc is visible (NVML reports host PIDs): `/proc` with hostPID, else
    /// the mount point of the host's /proc.
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// A shared server's KV report older than this is ignored (its memory counts as shared).
    #[serde(default = "default_kv_max_age")]
    pub kv_report_max_age_seconds: u64,
    #[serde(default)]
    pub workloads: Vec<GpuWorkload>,
}

/// A workload using GPUs: matched by pod UID or by a substring of the process's cgroup path,
/// and either dedicated to one tenant or a shared inference server split by its KV reports.
/// Only a shared server's processes may send KV reports, and only for its `tenants`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuWorkload {
    #[serde(default)]
    pub pod_uid: Option<String>,
    #[serde(default)]
    pub cgroup_contains: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub shared: bool,
    /// A shared server's tenants: the only ones its sidecar's KV reports may name.
    #[serde(default)]
    pub tenants: Vec<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            source: default_gpu_source(),
            poll_interval_ms: default_gpu_poll_ms(),
            proc_root: default_proc_root(),
            kv_report_max_age_seconds: default_kv_max_age(),
            workloads: Vec::new(),
        }
    }
}

fn default_gpu_source() -> String {
    "nvml".into()
}
fn default_gpu_poll_ms() -> u64 {
    5_000
}
fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}
fn default_kv_max_age() -> u64 {
    30
}

/// Cross-tenant flow detection: endpoints tenants own, and cgroups whose sockets must be tagged.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrossTenantConfig {
    /// cgroup-v2 directories (absolute, or relative to the attach cgroup) whose sockets, and
    /// those of cgroups below them, must carry a tag: their untagged traffic to a tenant's
    /// endpoint is a cross-tenant flow.
    #[serde(default)]
    pub must_tag_cgroups: Vec<PathBuf>,
    /// Flow events logged per second at most (the rest are counted, not logged).
    #[serde(default = "default_event_rate")]
    pub event_log_per_second: u32,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The owning tenant (must be one of `tenants`).
    pub tenant: String,
    /// An IPv4 or IPv6 address.
    pub address: std::net::IpAddr,
    /// A TCP/UDP port; absent: every port of the address.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub mode: EndpointMode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// Count and report the flow.
    #[default]
    Alert,
    /// Count, report, and drop its packets.
    Enforce,
}

impl EndpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointMode::Alert => "alert",
            EndpointMode::Enforce => "enforce",
        }
    }
}

fn default_event_rate() -> u32 {
    10
}

impl Default for CrossTenantConfig {
    fn default() -> Self {
        Self {
            must_tag_cgroups: Vec::new(),
            event_log_per_second: default_event_rate(),
            endpoints: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaggingConfig {
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    #[serde(default = "default_allowed_uids")]
    pub allowed_uids: Vec<u32>,
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Connections served at once; one more is accepted and closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection with no request (or whose caller does not take its answer) for this long
    /// is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl Default for TaggingConfig {
    fn default() -> Self {
        Self {
            socket_path: default_socket_path(),
            socket_mode: default_socket_mode(),
            allowed_uids: default_allowed_uids(),
            allowed_gids: Vec::new(),
            max_connections: default_max_connections(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_max_connections() -> usize {
    256
}
fn default_idle_timeout_ms() -> u64 {
    10_000
}

impl TaggingConfig {
    /// The allow rule: a caller may tag when its uid or gid is listed.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/bulkhead")
}
fn default_true() -> bool {
    true
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_socket_path() -> PathBuf {
    PathBuf::from("/run/bulkhead/agent.sock")
}
fn default_socket_mode() -> u32 {
    0o666
}
fn default_allowed_uids() -> Vec<u32> {
    vec![0]
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The built-in default configuration.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_CONFIG, "(built-in)").expect("the built-in config is valid")
    }

    /// Parses and validates; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks the whole configuration; `origin` names it in error messages.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if let Some(o) = &self.telemetry.otlp {
            let uri: Result<http::Uri, _> = o.endpoint.parse();
            match uri {
                Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {}
                _ => {
                    return Err(invalid(
                        "telemetry.otlp.endpoint",
                        format!("{:?} is not an http:// URL", o.endpoint),
                    ));
                }
            }
            if o.interval_ms < 1000 {
                return Err(invalid(
                    "telemetry.otlp.interval_ms",
                    "must be at least 1000".into(),
                ));
            }
            if o.timeout_ms == 0 || o.timeout_ms > o.interval_ms {
                return Err(invalid(
                    "telemetry.otlp.timeout_ms",
                    "must be > 0 and at most interval_ms".into(),
                ));
            }
            if o.service_name.is_empty() {
                return Err(invalid(
                    "telemetry.otlp.service_name",
                    "must not be empty".into(),
                ));
            }
        }
        for (field, path) in [
            ("bpffs", &self.bpffs),
            ("pin_dir", &self.pin_dir),
            ("tagging.socket_path", &self.tagging.socket_path),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if let Some(cg) = &self.cgroup_path
            && !cg.is_absolute()
        {
            return Err(invalid(
                "cgroup_path",
                format!("{} is not an absolute path", cg.display()),
            ));
        }
        if !self.pin_dir.starts_with(&self.bpffs) || self.pin_dir == self.bpffs {
            return Err(invalid(
                "pin_dir",
                format!(
                    "{} must be a directory below bpffs ({})",
                    self.pin_dir.display(),
                    self.bpffs.display()
                ),
            ));
        }
        if self.tagging.socket_mode > 0o777 {
            return Err(invalid(
                "tagging.socket_mode",
                format!(
                    "{:o} is not a file mode (0o000-0o777)",
                    self.tagging.socket_mode
                ),
            ));
        }
        if self.tagging.allowed_uids.is_empty() && self.tagging.allowed_gids.is_empty() {
            return Err(invalid(
                "tagging.allowed_uids",
                "no caller could tag a socket: allow at least one uid or gid".into(),
            ));
        }
        if !(1..=65_536).contains(&self.tagging.max_connections) {
            return Err(invalid(
                "tagging.max_connections",
                format!("{} is not in 1-65536", self.tagging.max_connections),
            ));
        }
        if !(10..=3_600_000).contains(&self.tagging.idle_timeout_ms) {
            return Err(invalid(
                "tagging.idle_timeout_ms",
                format!(
                    "{} ms is not in 10-3600000 (10 ms to an hour)",
                    self.tagging.idle_timeout_ms
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let field = format!("tenants[{i}].name");
            agent_common::check_tenant_name(&t.name)
                .map_err(|e| invalid(&field, format!("{:?}: {e}", t.name)))?;
            if !seen.insert(t.name.as_str()) {
                return Err(invalid(
                    &field,
                    format!("tenant {:?} is listed twice", t.name),
                ));
            }
        }
        let mut endpoints = HashSet::new();
        for (i, e) in self.cross_tenant.endpoints.iter().enumerate() {
            if !seen.contains(e.tenant.as_str()) {
                return Err(invalid(
                    &format!("cross_tenant.endpoints[{i}].tenant"),
                    format!("tenant {:?} is not in `tenants`", e.tenant),
                ));
            }
            if e.port == Some(0) {
                return Err(invalid(
                    &format!("cross_tenant.endpoints[{i}].port"),
                    "port 0 is not a port; leave it out to mean every port".into(),
                ));
            }
            if !endpoints.insert((e.address, e.port)) {
                return Err(invalid(
                    &format!("cross_tenant.endpoints[{i}]"),
                    format!("{} port {:?} is listed twice", e.address, e.port),
                ));
            }
        }
        if self.cross_tenant.endpoints.len() > agent_common::ENDPOINTS_MAX_ENTRIES as usize {
            return Err(invalid(
                "cross_tenant.endpoints",
                format!("at most {} endpoints", agent_common::ENDPOINTS_MAX_ENTRIES),
            ));
        }
        if self.cross_tenant.must_tag_cgroups.len() > agent_common::MUST_TAG_MAX_ENTRIES as usize {
            return Err(invalid(
                "cross_tenant.must_tag_cgroups",
                format!("at most {} cgroups", agent_common::MUST_TAG_MAX_ENTRIES),
            ));
        }
        if self.cross_tenant.event_log_per_second == 0 {
            return Err(invalid(
                "cross_tenant.event_log_per_second",
                "must be at least 1".into(),
            ));
        }
        let gpu = &self.gpu;
        if gpu.source != "nvml" && gpu.source != "off" && !gpu.source.starts_with("file:") {
            return Err(invalid(
                "gpu.source",
                format!("{:?}: use \"nvml\", \"off\" or \"file:PATH\"", gpu.source),
            ));
        }
        let min_poll = if gpu.source == "nvml" { 1_000 } else { 10 };
        if gpu.poll_interval_ms < min_poll {
            return Err(invalid(
                "gpu.poll_interval_ms",
                format!(
                    "{} ms is too often; at least {min_poll} ms (NVML calls take tens to hundreds of ms)",
                    gpu.poll_interval_ms
                ),
            ));
        }
        for (i, w) in gpu.workloads.iter().enumerate() {
            let field = format!("gpu.workloads[{i}]");
            match (&w.pod_uid, &w.cgroup_contains) {
                (Some(s), None) | (None, Some(s)) if !s.is_empty() => {}
                _ => {
                    return Err(invalid(
                        &field,
                        "give exactly one of pod_uid and cgroup_contains, not empty".into(),
                    ));
                }
            }
            match (&w.tenant, w.shared) {
                (Some(_), false) if !w.tenants.is_empty() => {
                    return Err(invalid(
                        &format!("{field}.tenants"),
                        "only a shared server (shared = true) lists tenants; a dedicated workload names its one `tenant`".into(),
                    ));
                }
                (Some(t), false) => {
                    if !seen.contains(t.as_str()) {
                        return Err(invalid(
                            &format!("{field}.tenant"),
                            format!("tenant {t:?} is not in `tenants`"),
                        ));
                    }
                }
                (None, true) => {
                    let field = format!("{field}.tenants");
                    if w.tenants.is_empty() {
                        return Err(invalid(
                            &field,
                            "a shared server must list the tenants its sidecar may report KV usage for".into(),
                        ));
                    }
                    let mut listed = HashSet::new();
                    for t in &w.tenants {
                        if !seen.contains(t.as_str()) {
                            return Err(invalid(
                                &field,
                                format!("tenant {t:?} is not in `tenants`"),
                            ));
                        }
                        if !listed.insert(t.as_str()) {
                            return Err(invalid(&field, format!("tenant {t:?} is listed twice")));
                        }
                    }
                }
                _ => {
                    return Err(invalid(
                        &field,
                        "give either tenant (a pod dedicated to one tenant) or shared = true (a shared inference server), not both".into(),
                    ));
                }
            }
        }
        if self.tenants.len() >= agent_common::MAX_TENANTS as usize {
            return Err(invalid(
                "tenants",
                format!(
                    "{} tenants; at most {} are supported",
                    self.tenants.len(),
                    agent_common::MAX_TENANTS - 1
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn builtin_config_is_valid_and_has_tenants() {
        let c = Config::builtin();
        assert_eq!(c.tenants.len(), 3);
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/bulkhead"));
        assert!(c.detach_on_shutdown);
        assert!(c.tagging.allows(0, 12345));
        assert!(!c.tagging.allows(1000, 1000));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err("[[tenants]]\nname = \"a b\""),
            "config test.toml: field `tenants[0].name`: \"a b\": tenant name has the character ' ' at position 2; use letters, digits, '.', '_' and '-'"
        );
        assert!(
            err("[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"")
                .contains("`tenants[1].name`: tenant \"a\" is listed twice")
        );
        assert!(err("pin_dir = \"/tmp/x\"").contains("`pin_dir`"));
        assert!(
            err("pin_dir = \"relative\"").contains("`pin_dir`: relative is not an absolute path")
        );
        assert!(err("[tagging]\nallowed_uids = []").contains("`tagging.allowed_uids`"));
        assert!(err("[tagging]\nsocket_mode = 4096").contains("`tagging.socket_mode`"));
        assert!(err("[tagging]\nmax_connections = 0").contains("`tagging.max_connections`"));
        assert!(err("[tagging]\nidle_timeout_ms = 5").contains("`tagging.idle_timeout_ms`"));
        let long = "x".repeat(65);
        assert!(
            err(&format!("[[tenants]]\nname = \"{long}\"")).contains("`tenants[0].name`: \"xxx")
        );
        assert!(
            err(&format!("[[tenants]]\nname = \"{long}\""))
                .contains("tenant name is 65 bytes long; at most 64 are allowed")
        );
    }

    #[test]
    fn tenant_names_follow_the_shared_rule() {
        // Reserved names (metric labels of no tenant), in any letter case.
        for (name, reserved) in [
            ("untagged", "untagged"),
            ("Shared", "shared"),
            ("UNATTRIBUTED", "unattributed"),
        ] {
            assert_eq!(
                err(&format!(
                    "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"{name}\""
                )),
                format!(
                    "config test.toml: field `tenants[1].name`: {name:?}: tenant name is reserved: \
                     {reserved:?} (in any letter case) labels metrics of no single tenant"
                )
            );
        }
        // A name must start with a letter or a digit (as the sidecar's always had to).
        assert_eq!(
            err("[[tenants]]\nname = \".a\""),
            "config test.toml: field `tenants[0].name`: \".a\": tenant name starts with '.'; it must start with a letter or a digit"
        );
        assert!(
            err("[[tenants]]\nname = \"\"")
                .contains("`tenants[0].name`: \"\": tenant name is empty")
        );
        assert!(Config::parse("[[tenants]]\nname = \"a.b_c-9\"", "t").is_ok());
    }

    #[test]
    fn endpoints_are_checked() {
        let base = "[[tenants]]\nname = \"a\"\n";
        let ok = Config::parse(
            &format!("{base}[[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"::1\"\nport = 80\nmode = \"enforce\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(ok.cross_tenant.endpoints[0].mode, EndpointMode::Enforce);
        assert!(
            err(&format!(
                "{base}[[cross_tenant.endpoints]]\ntenant = \"b\"\naddress = \"10.0.0.1\"\n"
            ))
            .contains("`cross_tenant.endpoints[0].tenant`: tenant \"b\" is not in `tenants`")
        );
        assert!(
            err(&format!(
                "{base}[[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"10.0.0.300\"\n"
            ))
            .contains("address")
        );
        let twice = format!(
            "{base}[[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"10.0.0.1\"\n[[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"10.0.0.1\"\n"
        );
        assert!(err(&twice).contains("`cross_tenant.endpoints[1]`"));
        assert!(err(&format!("{base}[[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"10.0.0.1\"\nmode = \"block\"\n"))
            .contains("mode"));
    }

    #[test]
    fn gpu_workloads_are_checked() {
        let base = "[[tenants]]\nname = \"a\"\n";
        let c = Config::parse(
            &format!("{base}[gpu]\nsource = \"off\"\n[[gpu.workloads]]\npod_uid = \"u1\"\ntenant = \"a\"\n[[gpu.workloads]]\ncgroup_contains = \"vllm\"\nshared = true\ntenants = [\"a\"]\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.gpu.workloads.len(), 2);
        assert_eq!(c.gpu.workloads[1].tenants, ["a"]);
        // A shared server lists the tenants it may report for: configured ones, once each.
        let shared = |rest: &str| {
            err(&format!(
                "{base}[[gpu.workloads]]\npod_uid = \"u\"\n[[gpu.workloads]]\ncgroup_contains = \"vllm\"\nshared = true\n{rest}"
            ))
        };
        assert!(
            err(&format!(
                "{base}[[gpu.workloads]]\ncgroup_contains = \"vllm\"\nshared = true\n"
            ))
            .contains("`gpu.workloads[0].tenants`: a shared server must list the tenants")
        );
        assert!(
            shared("tenants = [\"a\", \"b\"]").contains("`gpu.workloads[0]`: give either tenant"),
            "the first workload (neither tenant nor shared) is reported first"
        );
        let two = |rest: &str| {
            err(&format!(
                "{base}[[gpu.workloads]]\npod_uid = \"u\"\ntenant = \"a\"\n[[gpu.workloads]]\ncgroup_contains = \"vllm\"\nshared = true\n{rest}"
            ))
        };
        assert!(
            two("tenants = [\"a\", \"b\"]")
                .contains("`gpu.workloads[1].tenants`: tenant \"b\" is not in `tenants`")
        );
        assert!(
            two("tenants = [\"a\", \"a\"]")
                .contains("`gpu.workloads[1].tenants`: tenant \"a\" is listed twice")
        );
        assert!(
            two("tenants = []").contains("`gpu.workloads[1].tenants`: a shared server must list")
        );
        assert!(
            err(&format!(
                "{base}[[gpu.workloads]]\npod_uid = \"u\"\ntenant = \"a\"\ntenants = [\"a\"]\n"
            ))
            .contains(
                "`gpu.workloads[0].tenants`: only a shared server (shared = true) lists tenants"
            )
        );
        assert!(
            err(&format!(
                "{base}[[gpu.workloads]]\npod_uid = \"u\"\ntenant = \"b\"\n"
            ))
            .contains("`gpu.workloads[0].tenant`: tenant \"b\" is not in `tenants`")
        );
        assert!(
            err(&format!(
                "{base}[[gpu.workloads]]\npod_uid = \"u\"\ntenant = \"a\"\nshared = true\n"
            ))
            .contains("`gpu.workloads[0]`: give either tenant")
        );
        assert!(
            err(&format!("{base}[[gpu.workloads]]\ntenant = \"a\"\n"))
                .contains("exactly one of pod_uid and cgroup_contains")
        );
        assert!(err("[gpu]\nsource = \"cuda\"").contains("`gpu.source`"));
        assert!(err("[gpu]\npoll_interval_ms = 100").contains("`gpu.poll_interval_ms`"));
    }

    #[test]
    fn unknown_fields_and_bad_types_are_rejected() {
        let e = err("detach_on_shutdwn = true");
        assert!(e.contains("detach_on_shutdwn"), "{e}");
        let e = err("admin_addr = \"not an address\"");
        assert!(e.contains("admin_addr"), "{e}");
    }

    #[test]
    fn otlp_export_is_off_by_default_and_its_errors_name_the_field() {
        assert_eq!(Config::parse("", "t").unwrap().telemetry.otlp, None);
        let otlp = |extra: &str| {
            format!("[telemetry.otlp]\nendpoint = \"http://collector:4318\"\n{extra}")
        };
        let o = Config::parse(&otlp(""), "t")
            .unwrap()
            .telemetry
            .otlp
            .unwrap();
        assert_eq!((o.interval_ms, o.timeout_ms), (15_000, 2_000));
        assert_eq!(o.service_name, "bulkhead-agent");
        for (extra, field) in [
            ("interval_ms = 999", "telemetry.otlp.interval_ms"),
            ("timeout_ms = 0", "telemetry.otlp.timeout_ms"),
            (
                "interval_ms = 1000\ntimeout_ms = 1001",
                "telemetry.otlp.timeout_ms",
            ),
            ("service_name = \"\"", "telemetry.otlp.service_name"),
        ] {
            let e = err(&otlp(extra));
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = err("[telemetry.otlp]\nendpoint = \"https://c:4318\"");
        assert!(e.contains("telemetry.otlp.endpoint"), "{e}");
    }
}
