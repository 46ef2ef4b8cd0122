//! The sidecar's TOML configuration: parsing, validation (errors name the field) and key loading.
//!
//! One file per section: each holds the section's struct, its `Default` (the only place a
//! default is written; serde fills absent fields from it) and its `validate`. This file holds
//! [`Config`], the rules that span sections, and the one reader of key files.

mod audit;
mod auth;
mod cache;
mod cost;
mod keys;
mod leaks;
mod limits;
mod model;
mod restart;
mod server;
mod telemetry;
mod tenants;
mod upstream;

pub use audit::*;
pub use auth::*;
pub use cache::*;
pub use cost::*;
pub use keys::*;
pub use leaks::*;
pub use limits::*;
pub use model::*;
pub use restart::*;
pub use server::*;
pub use telemetry::*;
pub use tenants::*;
pub use upstream::*;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The example configuration shipped with the crate (used by the demo and `check-config`).
pub const EXAMPLE_CONFIG: &str = include_str!("../../examples/sidecar.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Parse(String),
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

/// Key bytes at least: a shorter key would make an HMAC anyone can forge.
pub const MIN_KEY_BYTES: usize = 16;

/// How a key file holds its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEncoding {
    /// Base64 text, surrounding whitespace ignored (as a Kubernetes Secret mounts it).
    Base64,
    /// The file's bytes as they are (`keys[].encoding = "raw"`).
    Raw,
}

/// A key file as a Kubernetes Secret mounts it: base64, surrounding whitespace ignored, at
/// least [`MIN_KEY_BYTES`] once decoded. Every base64 key file of the configuration
/// (`cache.salt_key_file`, `audit.hash_key_file`, `keys[].secret_files`) is read here; errors
/// name `field`.
pub fn read_key_file(p: &Path, field: &str) -> Result<Vec<u8>, ConfigError> {
    read_key_file_as(p, field, KeyEncoding::Base64)
}

/// [`read_key_file`], for a file in `encoding`: the same checks, the same errors.
pub fn read_key_file_as(
    p: &Path,
    field: &str,
    encoding: KeyEncoding,
) -> Result<Vec<u8>, ConfigError> {
    let raw = std::fs::read(p)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", p.display())))?;
    let key = match encoding {
        KeyEncoding::Raw => raw,
        KeyEncoding::Base64 => decode_key(&raw).map_err(|m| invalid(field, m))?,
    };
    if key.len() < MIN_KEY_BYTES {
        return Err(invalid(
            field,
            format!("key shorter than {MIN_KEY_BYTES} bytes"),
        ));
    }
    Ok(key)
}

/// A base64 key file's text: standard alphabet, padded, surrounding whitespace ignored.
pub fn decode_key(text: &[u8]) -> Result<Vec<u8>, &'static str> {
    use base64::Engine;
    let text = std::str::from_utf8(text).map_err(|_| "not valid base64")?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| "not valid base64")
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole file. Every section (and every field in it) has a default, the section's
/// `Default`; what has none (`upstream.url`, at least one tenant, a key or `[auth.jwt]`) is
/// required by validation, whose errors name the field.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub upstream: UpstreamConfig,
    pub listen: ListenConfig,
    pub auth: AuthConfig,
    pub queue: QueueConfig,
    pub http: HttpLimits,
    pub audit: AuditConfig,
    pub agent: AgentConfig,
    pub runtime: RuntimeConfig,
    pub cache: CacheConfig,
    /// Where limits and the replay cache live: this process (default) or Redis.
    pub limits: LimitsConfig,
    /// The served model's KV-cache geometry; enables `bulkhead_sidecar_kv_inflight_bytes` and KV reports.
    pub model: Option<ModelConfig>,
    pub leaks: LeaksConfig,
    pub tenants: BTreeMap<String, TenantConfig>,
    pub keys: Vec<KeyConfig>,
    /// Prices per million tokens, for `bulkhead_cost_total` and the audit log's `cost`.
    pub cost: CostConfig,
    /// OpenTelemetry export (`[telemetry.otlp]`); off by default.
    pub telemetry: TelemetryConfig,
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Check every section, then the rules between sections; the error names the first bad
    /// field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tenant = |t: &str| self.tenants.contains_key(t);
        self.upstream.validate()?;
        self.auth.validate(&tenant)?;
        self.queue.validate()?;
        self.leaks.validate()?;
        self.http.validate()?;
        self.agent.validate()?;
        self.runtime.validate()?;
        if self.tenants.is_empty() {
            return Err(invalid("tenants", "at least one tenant is required"));
        }
        for (name, t) in &self.tenants {
            t.validate(name, &self.tenants, self.upstream.flavor)?;
            self.check_isolation(name, t)?;
        }
        self.cache.validate()?;
        // A request let past the gate reaches the upstream within the connect timeout; the
        // drain bound must outlast that before a flush may vouch for it.
        if self.cache.flush_refused_while_busy
            && self.cache.exclusive_drain_timeout_ms <= self.upstream.connect_timeout_ms
        {
            return Err(invalid(
                "cache.exclusive_drain_timeout_ms",
                "must be > upstream.connect_timeout_ms when cache.flush_refused_while_busy is set",
            ));
        }
        if let Some(m) = &self.model {
            m.validate()?;
        }
        self.audit.validate(self.tenants.len())?;
        self.cost.validate(&tenant)?;
        self.limits.validate()?;
        if self.keys.is_empty() && self.auth.jwt.is_none() {
            return Err(invalid(
                "keys",
                "at least one key is required (or configure [auth.jwt])",
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            k.validate(i, &self.keys[..i], &tenant)?;
        }
        self.telemetry.validate()
    }

    /// A tenant's isolation tier against the upstream (`cache_salt` and a flush) and the
    /// salt key.
    fn check_isolation(&self, name: &str, t: &TenantConfig) -> Result<(), ConfigError> {
        let flavor = self.upstream.flavor;
        match t.isolation {
            Isolation::Shared => Ok(()),
            Isolation::Salted | Isolation::Exclusive if flavor == Flavor::Openai => Err(invalid(
                format!("tenants.{name}.isolation"),
                format!(
                    "\"{}\" needs an upstream with cache_salt and a cache flush; \
                     upstream.flavor = \"openai\" has neither (set upstream.flavor to \
                     \"vllm\" or \"sglang\", or use \"shared\")",
                    t.isolation.as_str()
                ),
            )),
            Isolation::Salted if self.cache.salt_key_file.is_none() => Err(invalid(
                "cache.salt_key_file",
                format!("required: tenants.{name}.isolation is \"salted\""),
            )),
            Isolation::Salted | Isolation::Exclusive => Ok(()),
        }
    }

    /// Read the salt key (base64, >= 16 bytes) when one is configured.
    pub fn load_salt_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        self.cache
            .salt_key_file
            .as_deref()
            .map(|p| read_key_file(p, "cache.salt_key_file"))
            .transpose()
    }

    /// Each tenant's audit sealing keys (`tenants.<name>.audit_key_file`).
    pub fn load_audit_seals(
        &self,
    ) -> Result<
        std::collections::HashMap<String, std::sync::Arc<crate::record::seal::SealKeys>>,
        ConfigError,
    > {
        let mut out = std::collections::HashMap::new();
        for (name, t) in &self.tenants {
            if let Some(p) = &t.audit_key_file {
                let keys = crate::record::seal::SealKeys::load(p).map_err(|e| {
                    invalid(
                        format!("tenants.{name}.audit_key_file"),
                        format!("{}: {e}", p.display()),
                    )
                })?;
                out.insert(name.clone(), std::sync::Arc::new(keys));
            }
        }
        Ok(out)
    }

    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue.timeout_ms)
    }
}

#[cfg(test)]
mod doc_tests;
#[cfg(test)]
mod tests;
