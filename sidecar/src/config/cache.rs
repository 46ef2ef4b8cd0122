//! `[cache]`: prefix-cache isolation (salts, exclusive windows, flushes).

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Base64 key (a Kubernetes Secret file, >= 16 bytes) for the `salted` tier's salts.
    pub salt_key_file: Option<PathBuf>,
    /// Folded into every salt: bump it to change all salts without a new key.
    pub salt_generation: u64,
    /// An exclusive tenant's window lasts at most this long while others wait.
    pub exclusive_window_ms: u64,
    /// ... and admits at most this many requests while others wait.
    pub exclusive_window_max_requests: u32,
    /// Attempts per flush before it counts as failed.
    pub flush_attempts: u32,
    /// Pause between flush attempts.
    pub flush_retry_ms: u64,
    /// Time limit for one flush call.
    pub flush_timeout_ms: u64,
    pub on_flush_failure: FlushFailure,
    /// Every wait for running requests the gate imposes ends after this long: an exclusive
    /// request waiting for other tenants' requests fails (503 `exclusive_drain_timeout`), and
    /// requests waiting for a closed exclusive window's requests stop waiting (see
    /// `flush_refused_while_busy`).
    pub exclusive_drain_timeout_ms: u64,
    /// The upstream refuses a flush while it runs requests (SGLang answering 400, vLLM 409 or
    /// `success: false`), so a confirmed flush proves it idle. Only then may the gate, once a
    /// closed window's requests outlive `exclusive_drain_timeout_ms` (a client that stopped
    /// reading), flush and let others run; without it they get 503 until those requests end.
    pub flush_refused_while_busy: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            salt_key_file: None,
            salt_generation: 0,
            exclusive_window_ms: 2000,
            exclusive_window_max_requests: 64,
            flush_attempts: 3,
            flush_retry_ms: 100,
            flush_timeout_ms: 5000,
            on_flush_failure: FlushFailure::default(),
            exclusive_drain_timeout_ms: 5000,
            flush_refused_while_busy: false,
        }
    }
}

impl CacheConfig {
    /// This section's own rules (the ones involving tenants or the upstream are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.exclusive_window_ms == 0 {
            return Err(invalid("cache.exclusive_window_ms", "must be > 0"));
        }
        if self.exclusive_window_max_requests == 0 {
            return Err(invalid(
                "cache.exclusive_window_max_requests",
                "must be > 0",
            ));
        }
        if self.flush_attempts == 0 || self.flush_attempts > 100 {
            return Err(invalid("cache.flush_attempts", "must be within 1..=100"));
        }
        if self.flush_timeout_ms == 0 {
            return Err(invalid("cache.flush_timeout_ms", "must be > 0"));
        }
        if self.exclusive_drain_timeout_ms == 0 {
            return Err(invalid("cache.exclusive_drain_timeout_ms", "must be > 0"));
        }
        Ok(())
    }
}

/// How a tenant's requests are kept apart in the upstream's prefix cache.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Cache blocks may be shared with other shared tenants (no salt).
    #[default]
    Shared,
    /// A keyed per-tenant `cache_salt` on every request: never shares blocks.
    Salted,
    /// Runs alone, in windows, with the cache flushed before and after.
    Exclusive,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Shared => "shared",
            Isolation::Salted => "salted",
            Isolation::Exclusive => "exclusive",
        }
    }
}

/// What an exclusive-window request does when the upstream does not confirm a flush.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlushFailure {
    /// Answer 503 `cache_flush_failed` once `flush_attempts` attempts failed.
    #[default]
    Fail,
    /// Keep the request waiting and retry until the queue timeout.
    Hold,
}
