//! `[limits]`: where per-tenant limits and the replay cache live (this process or Redis).

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

/// Where per-tenant limits and the nonce replay cache are kept.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    /// In this process: each replica enforces the whole limit on its own.
    #[default]
    Local,
    /// In Redis (or Valkey), shared by every replica: `[limits.redis]`.
    Redis,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub backend: LimitsBackend,
    /// Required when `backend = "redis"`.
    pub redis: Option<RedisLimitsConfig>,
}

/// How each admission uses Redis.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitsMode {
    /// Every admission asks Redis (one round trip).
    #[default]
    Strict,
    /// Each replica takes leases of tokens and requests from Redis and spends them locally.
    Leased,
}

/// What an admission does while Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendFailure {
    /// Enforce each limit / `expected_replicas` in this process.
    #[default]
    Local,
    /// Refuse with 503 `limits_backend_unavailable`.
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisLimitsConfig {
    /// One Redis or Valkey server: `redis://host:6379/` (or `redis://user:pass@host/0`).
    pub url: Option<String>,
    /// The seed nodes of a Redis Cluster (instead of `url`).
    pub urls: Vec<String>,
    pub connect_timeout_ms: u64,
    /// A command not answered within this long counts as a backend failure.
    pub command_timeout_ms: u64,
    /// Prepended to every key: `{prefix}{<tenant>}:rpm` (no braces: the tenant is the hash tag).
    pub key_prefix: String,
    pub mode: LimitsMode,
    /// `leased`: tokens one lease takes at most (also capped at the limit / `expected_replicas`).
    pub lease_tokens: u64,
    /// `leased`: requests one lease takes at most (also capped as above).
    pub lease_requests: u32,
    /// A concurrency slot expires this long after its last renewal (a live replica renews its
    /// slots every third of it), so a crashed replica's slots come back within this long.
    pub concurrency_lease_ms: u64,
    pub on_backend_failure: BackendFailure,
    /// Replicas sharing the limits; with `on_backend_failure = "local"` each enforces
    /// limit / `expected_replicas` while Redis is unreachable.
    pub expected_replicas: u32,
}

impl Default for RedisLimitsConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            connect_timeout_ms: 500,
            command_timeout_ms: 100,
            key_prefix: "bulkhead:".into(),
            mode: LimitsMode::default(),
            lease_tokens: 2000,
            lease_requests: 10,
            concurrency_lease_ms: 15_000,
            on_backend_failure: BackendFailure::default(),
            expected_replicas: 1,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(r) = &self.redis else {
            if self.backend == LimitsBackend::Redis {
                return Err(invalid(
                    "limits.redis",
                    "required when limits.backend = \"redis\" (set url or urls)",
                ));
            }
            return Ok(());
        };
        r.validate()
    }
}

impl RedisLimitsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        match (&r.url, r.urls.is_empty()) {
            (None, true) => {
                return Err(invalid(
                    "limits.redis.url",
                    "set url (or urls for a cluster)",
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "limits.redis.urls",
                    "set either url (one server) or urls (a cluster), not both",
                ));
            }
            _ => {}
        }
        let check_url = |field: String, u: &str| -> Result<(), ConfigError> {
            let Some(rest) = u.strip_prefix("redis://") else {
                return Err(invalid(
                    field,
                    "must start with redis:// (TLS, rediss://, is not built in)",
                ));
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(invalid(field, "missing host"));
            }
            Ok(())
        };
        if let Some(u) = &r.url {
            check_url("limits.redis.url".into(), u)?;
        }
        for (i, u) in r.urls.iter().enumerate() {
            check_url(format!("limits.redis.urls[{i}]"), u)?;
        }
        if r.connect_timeout_ms == 0 || r.connect_timeout_ms > 60_000 {
            return Err(invalid(
                "limits.redis.connect_timeout_ms",
                "must be within 1..=60000",
            ));
        }
        if r.command_timeout_ms == 0 || r.command_timeout_ms > 10_000 {
            return Err(invalid(
                "limits.redis.command_timeout_ms",
                "must be within 1..=10000",
            ));
        }
        if r.key_prefix.len() > 64
            || r.key_prefix
                .bytes()
                .any(|b| b == b'{' || b == b'}' || !b.is_ascii_graphic())
        {
            return Err(invalid(
                "limits.redis.key_prefix",
                "must be at most 64 visible ASCII characters without { or } (the tenant name is \
                 the keys' hash tag)",
            ));
        }
        if r.lease_tokens == 0 {
            return Err(invalid("limits.redis.lease_tokens", "must be > 0"));
        }
        if r.lease_requests == 0 {
            return Err(invalid("limits.redis.lease_requests", "must be > 0"));
        }
        if r.concurrency_lease_ms < 300 || r.concurrency_lease_ms > 3_600_000 {
            return Err(invalid(
                "limits.redis.concurrency_lease_ms",
                "must be within 300..=3600000",
            ));
        }
        if r.concurrency_lease_ms < 3 * r.command_timeout_ms {
            return Err(invalid(
                "limits.redis.concurrency_lease_ms",
                "must be >= 3 x limits.redis.command_timeout_ms (slots are renewed every third \
                 of the lease)",
            ));
        }
        if r.expected_replicas == 0 || r.expected_replicas > 10_000 {
            return Err(invalid(
                "limits.redis.expected_replicas",
                "must be within 1..=10000",
            ));
        }
        Ok(())
    }
}
