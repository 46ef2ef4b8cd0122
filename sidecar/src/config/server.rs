//! The serving process's own sections: `[listen]`, `[http]` (limits and timeouts), `[queue]`
//! (the fair queue), `[agent]` (the node agent) and `[runtime]`.

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `[listen]` (read at start only).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// `[http]`: client-side limits and timeouts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub header_read_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout_ms: u64,
    /// A request body must arrive within this long of its headers (408 otherwise).
    pub body_read_timeout_ms: u64,
    /// Request-body bytes held in memory at once, all requests together (503 beyond).
    pub max_inflight_body_bytes: usize,
    /// Client connections served at once; more are accepted and closed at once (counted).
    pub max_connections: usize,
    /// HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// A client connection with no request in progress for this long is closed (HTTP/2:
    /// GOAWAY). A new connection must start its first request within
    /// `header_read_timeout_ms`.
    pub idle_timeout_ms: u64,
    /// A response the client stops reading for this long is cut (and its upstream request
    /// cancelled), so a stalled client never holds a queue slot or the cache gate.
    pub response_write_idle_timeout_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 8 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            drain_timeout_ms: 30_000,
            body_read_timeout_ms: 30_000,
            max_inflight_body_bytes: 64 * 1024 * 1024,
            max_connections: 4096,
            max_concurrent_streams: 64,
            idle_timeout_ms: 60_000,
            response_write_idle_timeout_ms: 30_000,
        }
    }
}

impl HttpLimits {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_header_bytes < 1024 {
            return Err(invalid("http.max_header_bytes", "must be >= 1024"));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be > 0"));
        }
        if self.header_read_timeout_ms == 0 {
            return Err(invalid("http.header_read_timeout_ms", "must be > 0"));
        }
        if self.body_read_timeout_ms == 0 {
            return Err(invalid("http.body_read_timeout_ms", "must be > 0"));
        }
        if self.max_inflight_body_bytes < self.max_body_bytes {
            return Err(invalid(
                "http.max_inflight_body_bytes",
                "must be >= http.max_body_bytes (or no body of the largest size could be read)",
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(invalid(
                "http.max_connections",
                "must be within 1..=1000000",
            ));
        }
        if self.idle_timeout_ms == 0 {
            return Err(invalid("http.idle_timeout_ms", "must be > 0"));
        }
        if self.max_concurrent_streams == 0 || self.max_concurrent_streams > 10_000 {
            return Err(invalid(
                "http.max_concurrent_streams",
                "must be within 1..=10000",
            ));
        }
        if self.response_write_idle_timeout_ms == 0 {
            return Err(invalid(
                "http.response_write_idle_timeout_ms",
                "must be > 0",
            ));
        }
        Ok(())
    }
}

/// `[queue]`: the fair queue in front of the upstream.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests in flight to the upstream at most, all tenants together.
    pub max_inflight: usize,
    /// Requests waiting per tenant at most.
    pub max_queue_per_tenant: usize,
    pub timeout_ms: u64,
    /// What a tenant's turn costs: `tokens` (Virtual Token Counter, the default) or
    /// `requests` (one unit per request).
    pub fairness: Fairness,
    /// Counter units per prompt token (`fairness = "tokens"`).
    pub input_token_cost: f64,
    /// Counter units per output token (`fairness = "tokens"`); output usually costs more.
    pub output_token_cost: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_inflight: 64,
            max_queue_per_tenant: 128,
            timeout_ms: 30_000,
            fairness: Fairness::default(),
            input_token_cost: 1.0,
            output_token_cost: 2.0,
        }
    }
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_inflight == 0 {
            return Err(invalid("queue.max_inflight", "must be > 0"));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("queue.timeout_ms", "must be > 0"));
        }
        for (field, v) in [
            ("queue.input_token_cost", self.input_token_cost),
            ("queue.output_token_cost", self.output_token_cost),
        ] {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err(invalid(field, "must be a number within 0..=1000000"));
            }
        }
        if self.input_token_cost == 0.0 && self.output_token_cost == 0.0 {
            return Err(invalid(
                "queue.input_token_cost",
                "input and output token costs cannot both be 0",
            ));
        }
        Ok(())
    }
}

/// How the fair queue charges a tenant's turns.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fairness {
    /// Tokens served (prompt and output, weighted): the Virtual Token Counter.
    #[default]
    Tokens,
    /// One unit per request, whatever its size.
    Requests,
}

/// `[agent]`: the node agent beside the sidecar.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The node agent's socket; tagging and KV reports are off when absent.
    pub socket: Option<PathBuf>,
    /// How often to report per-tenant KV-cache bytes (needs `[model]`).
    pub kv_report_interval_ms: u64,
    /// Deprecated and ignored: every client connection is tagged. The cap kept a tenant from
    /// evicting others' tags from the agent's LRU map; the agent now keeps each tag in the
    /// socket's own storage, which nothing evicts. Still accepted so that a configuration
    /// that sets it starts; a warning names it.
    pub max_tagged_connections_per_tenant: Option<usize>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: None,
            kv_report_interval_ms: 5000,
            max_tagged_connections_per_tenant: None,
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kv_report_interval_ms < 100 {
            return Err(invalid("agent.kv_report_interval_ms", "must be >= 100"));
        }
        Ok(())
    }
}

/// `[runtime]` (read at start only).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 (default) uses one per CPU.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > 256 {
            return Err(invalid("runtime.worker_threads", "must be within 0..=256"));
        }
        Ok(())
    }
}
