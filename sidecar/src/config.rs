//! The sidecar's TOML configuration: parsing, validation (errors name the field) and key loading.

use crate::scope::{Scope, ScopeConfig};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The example configuration shipped with the crate (used by the demo and `check-config`).
pub const EXAMPLE_CONFIG: &str = include_str!("../examples/sidecar.toml");

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

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub http: HttpLimits,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Where limits and the replay cache live: this process (default) or Redis.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The served model's KV-cache geometry; enables `bulkhead_kv_cache_bytes` and KV reports.
    pub model: Option<ModelConfig>,
    #[serde(default)]
    pub leaks: LeaksConfig,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Prices per million tokens, for `bulkhead_cost_total` and the audit log's `cost`.
    #[serde(default)]
    pub cost: CostConfig,
}

/// Leak detection: what to do about canaries, and the injection markers counted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LeaksConfig {
    /// Another tenant's canary in a prompt or a response: `count` (metric and audit) or
    /// `block` (also refuse the request / cut the response).
    #[serde(default)]
    pub on_canary: OnCanary,
    /// Phrases counted per tenant in prompts (`bulkhead_injection_markers_total`).
    #[serde(default = "default_injection_markers")]
    pub injection_markers: Vec<String>,
    /// Scan responses for other tenants' canaries and keywords as they stream.
    #[serde(default = "yes")]
    pub scan_responses: bool,
}

impl Default for LeaksConfig {
    fn default() -> Self {
        Self {
            on_canary: OnCanary::default(),
            injection_markers: default_injection_markers(),
            scan_responses: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// The injection markers shipped by default (phrases of cross-tenant and prompt-injection
/// attempts).
pub fn default_injection_markers() -> Vec<String> {
    [
        "ignore previous instructions",
        "ignore all previous instructions",
        "ignore previous context",
        "disregard previous instructions",
        "forget your instructions",
        "reveal your system prompt",
        "print your system prompt",
        "switch to tenant",
        "act as tenant",
        "other tenant",
        "another customer's data",
        "developer mode",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// What a canary of another tenant causes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnCanary {
    /// Count it and write it to both tenants' audit.
    #[default]
    Count,
    /// Also refuse the request (prompt) or cut the response.
    Block,
}

/// Canaries, keywords and markers: printable ASCII without `"` or `\` (their JSON encoding is
/// themselves), within `min..=max` bytes.
fn check_pattern(field: &str, p: &str, min: usize, max: usize) -> Result<(), ConfigError> {
    if p.len() < min || p.len() > max {
        return Err(invalid(
            field,
            format!("each must be {min}..={max} bytes (one is {})", p.len()),
        ));
    }
    if !p
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(invalid(
            field,
            "each must be printable ASCII without '\"' or '\\'",
        ));
    }
    if p.trim() != p {
        return Err(invalid(field, "no leading or trailing spaces"));
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the inference server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// Idle keep-alive connections kept per tenant.
    #[serde(default = "default_pool_idle")]
    pub pool_max_idle_per_tenant: usize,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long to wait for the upstream's response headers (a stream's body may run longer).
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// What the upstream supports: `openai` (no `cache_salt`, no flush), `vllm` or `sglang`.
    #[serde(default)]
    pub flavor: Flavor,
}

/// The inference server's kind, for prefix-cache isolation.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Any OpenAI-compatible server: no `cache_salt`, no cache flush.
    #[default]
    Openai,
    /// vLLM: `cache_salt`; flush with `POST /reset_prefix_cache`.
    Vllm,
    /// SGLang: `cache_salt`; flush with `POST /flush_cache`.
    Sglang,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Openai => "openai",
            Flavor::Vllm => "vllm",
            Flavor::Sglang => "sglang",
        }
    }

    /// The flush endpoint, when the server has one.
    pub fn flush_path(self) -> Option<&'static str> {
        match self {
            Flavor::Openai => None,
            Flavor::Vllm => Some("/reset_prefix_cache"),
            Flavor::Sglang => Some("/flush_cache"),
        }
    }
}

/// How a tenant's requests are kept apart in the upstream's prefix cache.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlushFailure {
    /// Answer 503 `cache_flush_failed` once `flush_attempts` attempts failed.
    #[default]
    Fail,
    /// Keep the request waiting and retry until the queue timeout.
    Hold,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Base64 key (a Kubernetes Secret file, >= 16 bytes) for the `salted` tier's salts.
    pub salt_key_file: Option<PathBuf>,
    /// Folded into every salt: bump it to change all salts without a new key.
    #[serde(default)]
    pub salt_generation: u64,
    /// An exclusive tenant's window lasts at most this long while others wait.
    #[serde(default = "default_window_ms")]
    pub exclusive_window_ms: u64,
    /// ... and admits at most this many requests while others wait.
    #[serde(default = "default_window_requests")]
    pub exclusive_window_max_requests: u32,
    /// Attempts per flush before it counts as failed.
    #[serde(default = "default_flush_attempts")]
    pub flush_attempts: u32,
    /// Pause between flush attempts.
    #[serde(default = "default_flush_retry_ms")]
    pub flush_retry_ms: u64,
    /// Time limit for one flush call.
    #[serde(default = "default_flush_timeout_ms")]
    pub flush_timeout_ms: u64,
    #[serde(default)]
    pub on_flush_failure: FlushFailure,
    /// Every wait for running requests the gate imposes ends after this long: an exclusive
    /// request waiting for other tenants' requests fails (503 `exclusive_drain_timeout`), and
    /// requests waiting for a closed exclusive window's requests stop waiting (see
    /// `flush_refused_while_busy`).
    #[serde(default = "default_drain_timeout_ms")]
    pub exclusive_drain_timeout_ms: u64,
    /// The upstream refuses a flush while it runs requests (SGLang answering 400, vLLM 409 or
    /// `success: false`), so a confirmed flush proves it idle. Only then may the gate, once a
    /// closed window's requests outlive `exclusive_drain_timeout_ms` (a client that stopped
    /// reading), flush and let others run; without it they get 503 until those requests end.
    #[serde(default)]
    pub flush_refused_while_busy: bool,
}
impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            salt_key_file: None,
            salt_generation: 0,
            exclusive_window_ms: default_window_ms(),
            exclusive_window_max_requests: default_window_requests(),
            flush_attempts: default_flush_attempts(),
            flush_retry_ms: default_flush_retry_ms(),
            flush_timeout_ms: default_flush_timeout_ms(),
            on_flush_failure: FlushFailure::default(),
            exclusive_drain_timeout_ms: default_drain_timeout_ms(),
            flush_refused_while_busy: false,
        }
    }
}
fn default_window_ms() -> u64 {
    2000
}
fn default_window_requests() -> u32 {
    64
}
fn default_flush_attempts() -> u32 {
    3
}
fn default_flush_retry_ms() -> u64 {
    100
}
fn default_flush_timeout_ms() -> u64 {
    5000
}
fn default_drain_timeout_ms() -> u64 {
    5000
}

/// Where per-tenant limits and the nonce replay cache are kept.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    /// In this process: each replica enforces the whole limit on its own.
    #[default]
    Local,
    /// In Redis (or Valkey), shared by every replica: `[limits.redis]`.
    Redis,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub backend: LimitsBackend,
    /// Required when `backend = "redis"`.
    pub redis: Option<RedisLimitsConfig>,
}

/// How each admission uses Redis.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitsMode {
    /// Every admission asks Redis (one round trip).
    #[default]
    Strict,
    /// Each replica takes leases of tokens and requests from Redis and spends them locally.
    Leased,
}

/// What an admission does while Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendFailure {
    /// Enforce each limit / `expected_replicas` in this process.
    #[default]
    Local,
    /// Refuse with 503 `limits_backend_unavailable`.
    Deny,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisLimitsConfig {
    /// One Redis or Valkey server: `redis://host:6379/` (or `redis://user:pass@host/0`).
    pub url: Option<String>,
    /// The seed nodes of a Redis Cluster (instead of `url`).
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// A command not answered within this long counts as a backend failure.
    #[serde(default = "default_redis_command_timeout")]
    pub command_timeout_ms: u64,
    /// Prepended to every key: `{prefix}{<tenant>}:rpm` (no braces: the tenant is the hash tag).
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    #[serde(default)]
    pub mode: LimitsMode,
    /// `leased`: tokens one lease takes at most (also capped at the limit / `expected_replicas`).
    #[serde(default = "default_lease_tokens")]
    pub lease_tokens: u64,
    /// `leased`: requests one lease takes at most (also capped as above).
    #[serde(default = "default_lease_requests")]
    pub lease_requests: u32,
    /// A concurrency slot expires this long after its last renewal (a live replica renews its
    /// slots every third of it), so a crashed replica's slots come back within this long.
    #[serde(default = "default_concurrency_lease")]
    pub concurrency_lease_ms: u64,
    #[serde(default)]
    pub on_backend_failure: BackendFailure,
    /// Replicas sharing the limits; with `on_backend_failure = "local"` each enforces
    /// limit / `expected_replicas` while Redis is unreachable.
    #[serde(default = "default_expected_replicas")]
    pub expected_replicas: u32,
}
impl Default for RedisLimitsConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            connect_timeout_ms: default_redis_connect_timeout(),
            command_timeout_ms: default_redis_command_timeout(),
            key_prefix: default_redis_prefix(),
            mode: LimitsMode::default(),
            lease_tokens: default_lease_tokens(),
            lease_requests: default_lease_requests(),
            concurrency_lease_ms: default_concurrency_lease(),
            on_backend_failure: BackendFailure::default(),
            expected_replicas: default_expected_replicas(),
        }
    }
}
fn default_redis_connect_timeout() -> u64 {
    500
}
fn default_redis_command_timeout() -> u64 {
    100
}
fn default_redis_prefix() -> String {
    "bulkhead:".into()
}
fn default_lease_tokens() -> u64 {
    2000
}
fn default_lease_requests() -> u32 {
    10
}
fn default_concurrency_lease() -> u64 {
    15_000
}
fn default_expected_replicas() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    Fp16,
    Fp8,
    Fp32,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp8 => 1,
            Dtype::Bf16 | Dtype::Fp16 => 2,
            Dtype::Fp32 => 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
}

impl ModelConfig {
    /// KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.layers as u64 * self.kv_heads as u64 * self.head_dim as u64 * self.dtype.bytes()
    }
}
fn default_response_timeout_ms() -> u64 {
    600_000
}
fn default_pool_idle() -> usize {
    32
}
fn default_connect_timeout_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default = "default_listen")]
    pub addr: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin_addr: SocketAddr,
}
impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            addr: default_listen(),
            admin_addr: default_admin(),
        }
    }
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Signature label to verify (RFC 9421 `Signature-Input` dictionary key).
    #[serde(default = "default_label")]
    pub label: String,
    /// Allowed clock skew for `created`, in seconds; also the replay window.
    #[serde(default = "default_skew")]
    pub max_skew_secs: u64,
    /// Nonces remembered at most (fail closed with 503 when full of live nonces).
    #[serde(default = "default_replay_capacity")]
    pub replay_cache_capacity: usize,
    /// Routes that accept an RFC 9421 signature (`*`, paths, or `/v1/.../*` prefixes).
    #[serde(default = "all_routes")]
    pub hmac_routes: Vec<String>,
    /// Forward the client's `Authorization` header to the upstream (off: it is removed).
    #[serde(default)]
    pub forward_authorization: bool,
    /// Tenants from JWTs (`Authorization: Bearer`); off when absent.
    pub jwt: Option<JwtConfig>,
}
impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            label: default_label(),
            max_skew_secs: default_skew(),
            replay_cache_capacity: default_replay_capacity(),
            hmac_routes: all_routes(),
            forward_authorization: false,
            jwt: None,
        }
    }
}
fn all_routes() -> Vec<String> {
    vec!["*".into()]
}

/// `[auth.jwt]`: bearer tokens signed by an identity provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted `iss` values (exact match).
    pub issuers: Vec<String>,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// A JWKS file (reloaded with the configuration: on change and on SIGHUP).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http://` only), fetched at start and every `jwks_refresh_ms`.
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh_ms")]
    pub jwks_refresh_ms: u64,
    /// Fetches at most this often (an unknown `kid` asks for an early one; after a failed
    /// fetch the next is this long after).
    #[serde(default = "default_jwks_min_refresh_ms")]
    pub jwks_min_refresh_ms: u64,
    #[serde(default = "default_jwks_timeout_ms")]
    pub jwks_timeout_ms: u64,
    #[serde(default = "default_jwks_max_bytes")]
    pub jwks_max_bytes: usize,
    /// Accepted algorithms: any of `RS256`, `ES256`, `EdDSA`.
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// Allowed clock skew for `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_jwt_leeway")]
    pub leeway_secs: u64,
    /// Longer tokens are refused.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// The claim naming the tenant: a name, or a dotted path into nested objects.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// A claim naming the token's tier (a key of `tiers`), whose scope the token gets.
    pub tier_claim: Option<String>,
    /// The tier of a token without the tier claim; without it such tokens are refused.
    pub default_tier: Option<String>,
    #[serde(default)]
    pub tiers: BTreeMap<String, ScopeConfig>,
    /// A claim holding a scope object (`models`, `routes`, `tools`, `max_tokens`) that
    /// narrows the tier's.
    pub scope_claim: Option<String>,
    /// Routes that accept a JWT.
    #[serde(default = "all_routes")]
    pub routes: Vec<String>,
}
fn default_jwks_refresh_ms() -> u64 {
    300_000
}
fn default_jwks_min_refresh_ms() -> u64 {
    10_000
}
fn default_jwks_timeout_ms() -> u64 {
    2000
}
fn default_jwks_max_bytes() -> usize {
    256 * 1024
}
/// The JWT signature algorithms the sidecar verifies.
pub const JWT_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];
fn default_jwt_algorithms() -> Vec<String> {
    JWT_ALGORITHMS.iter().map(|a| a.to_string()).collect()
}
fn default_jwt_leeway() -> u64 {
    30
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_tenant_claim() -> String {
    "tenant_id".into()
}
fn default_label() -> String {
    "bulkhead".into()
}
fn default_skew() -> u64 {
    30
}
fn default_replay_capacity() -> usize {
    100_000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests in flight to the upstream at most, all tenants together.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Requests waiting per tenant at most.
    #[serde(default = "default_queue_len")]
    pub max_queue_per_tenant: usize,
    #[serde(default = "default_queue_timeout")]
    pub timeout_ms: u64,
    /// What a tenant's turn costs: `tokens` (Virtual Token Counter, the default) or
    /// `requests` (one unit per request).
    #[serde(default)]
    pub fairness: Fairness,
    /// Counter units per prompt token (`fairness = "tokens"`).
    #[serde(default = "default_input_token_cost")]
    pub input_token_cost: f64,
    /// Counter units per output token (`fairness = "tokens"`); output usually costs more.
    #[serde(default = "default_output_token_cost")]
    pub output_token_cost: f64,
}
impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_inflight: default_max_inflight(),
            max_queue_per_tenant: default_queue_len(),
            timeout_ms: default_queue_timeout(),
            fairness: Fairness::default(),
            input_token_cost: default_input_token_cost(),
            output_token_cost: default_output_token_cost(),
        }
    }
}

/// How the fair queue charges a tenant's turns.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fairness {
    /// Tokens served (prompt and output, weighted): the Virtual Token Counter.
    #[default]
    Tokens,
    /// One unit per request, whatever its size.
    Requests,
}
fn default_input_token_cost() -> f64 {
    1.0
}
fn default_output_token_cost() -> f64 {
    2.0
}
fn default_max_inflight() -> usize {
    64
}
fn default_queue_len() -> usize {
    128
}
fn default_queue_timeout() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpLimits {
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
    /// A request body must arrive within this long of its headers (408 otherwise).
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_ms: u64,
    /// Request-body bytes held in memory at once, all requests together (503 beyond).
    #[serde(default = "default_inflight_body_bytes")]
    pub max_inflight_body_bytes: usize,
    /// Client connections served at once; more are accepted and closed at once (counted).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams per client connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// A client connection with no request in progress for this long is closed (HTTP/2:
    /// GOAWAY). A new connection must start its first request within
    /// `header_read_timeout_ms`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// A response the client stops reading for this long is cut (and its upstream request
    /// cancelled), so a stalled client never holds a queue slot or the cache gate.
    #[serde(default = "default_write_idle")]
    pub response_write_idle_timeout_ms: u64,
}
impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout_ms: default_header_timeout(),
            drain_timeout_ms: default_drain(),
            body_read_timeout_ms: default_body_read_timeout(),
            max_inflight_body_bytes: default_inflight_body_bytes(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_streams(),
            idle_timeout_ms: default_idle_timeout(),
            response_write_idle_timeout_ms: default_write_idle(),
        }
    }
}
fn default_body_read_timeout() -> u64 {
    30_000
}
fn default_inflight_body_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_streams() -> u32 {
    64
}
fn default_idle_timeout() -> u64 {
    60_000
}
fn default_write_idle() -> u64 {
    30_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_drain() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory for per-tenant `<tenant>.jsonl` files; no audit log when absent.
    pub dir: Option<PathBuf>,
    /// Key for the keyed prompt hash (base64 file); a random per-process key when absent.
    pub hash_key_file: Option<PathBuf>,
    /// A stream's `<stream>.jsonl` rotates to `.1`, `.2`, ... at this size (or at half the
    /// stream's share of `max_total_bytes`, when that is smaller).
    #[serde(default = "default_audit_max_file_bytes")]
    pub max_file_bytes: u64,
    /// All audit files together never exceed this; each stream (every tenant, and
    /// `_unauthenticated`) gets an equal share and only its own old files are deleted.
    #[serde(default = "default_audit_max_total_bytes")]
    pub max_total_bytes: u64,
    /// Records of refused, unauthenticated requests written per second at most ...
    #[serde(default = "default_audit_unauth_rate")]
    pub unauthenticated_per_second: u32,
    /// ... with bursts up to this many (the rest are counted as dropped).
    #[serde(default = "default_audit_unauth_burst")]
    pub unauthenticated_burst: u32,
}
impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            hash_key_file: None,
            max_file_bytes: default_audit_max_file_bytes(),
            max_total_bytes: default_audit_max_total_bytes(),
            unauthenticated_per_second: default_audit_unauth_rate(),
            unauthenticated_burst: default_audit_unauth_burst(),
        }
    }
}
fn default_audit_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_audit_max_total_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_audit_unauth_rate() -> u32 {
    100
}
fn default_audit_unauth_burst() -> u32 {
    100
}
/// The `model` label of a model the price tables do not name.
pub const OTHER_MODEL: &str = "other";
/// Models in one price table at most.
pub const MAX_PRICED_MODELS: usize = 256;

/// Prices per million tokens, in `cost.currency`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input (prompt) tokens that were not served from the prefix cache.
    pub input: f64,
    /// Input tokens served from the prefix cache (`prompt_tokens_details.cached_tokens`);
    /// `input` when absent.
    pub cached_input: Option<f64>,
    /// Output (completion) tokens.
    pub output: f64,
}

impl Price {
    pub(crate) fn check(&self, field: &str) -> Result<(), (String, String)> {
        for (k, v) in [
            ("input", Some(self.input)),
            ("cached_input", self.cached_input),
            ("output", Some(self.output)),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (0.0..=1e6).contains(&v))
            {
                return Err((format!("{field}.{k}"), "must be within 0..=1000000".into()));
            }
        }
        Ok(())
    }
}

/// A tenant's own prices, over the shared ones.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantPrices {
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
    pub default: Option<Price>,
}

/// `[cost]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// The unit of `bulkhead_cost_total` and the audit log's `cost` (documentation only).
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
    /// The price of models no table names (counted under `model="other"`).
    pub default: Option<Price>,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantPrices>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            currency: default_currency(),
            models: BTreeMap::new(),
            default: None,
            tenants: BTreeMap::new(),
        }
    }
}

fn default_currency() -> String {
    "USD".into()
}

impl CostConfig {
    /// Check every price; the error is `(field, message)`.
    pub fn check(&self, tenants: &dyn Fn(&str) -> bool) -> Result<(), (String, String)> {
        if self.currency.is_empty()
            || self.currency.len() > 16
            || !self.currency.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err((
                "cost.currency".into(),
                "must be 1-16 letters or digits".into(),
            ));
        }
        let table = |prefix: &str, models: &BTreeMap<String, Price>| {
            if models.len() > MAX_PRICED_MODELS {
                return Err((
                    format!("{prefix}models"),
                    format!("at most {MAX_PRICED_MODELS} models"),
                ));
            }
            for (m, p) in models {
                if m.is_empty() || m.len() > 256 || m == OTHER_MODEL {
                    return Err((
                        format!("{prefix}models.{m}"),
                        format!("model names are 1-256 bytes and not {OTHER_MODEL:?}"),
                    ));
                }
                p.check(&format!("{prefix}models.{m}"))?;
            }
            Ok(())
        };
        table("cost.", &self.models)?;
        if let Some(p) = &self.default {
            p.check("cost.default")?;
        }
        for (t, tp) in &self.tenants {
            if !tenants(t) {
                return Err((format!("cost.tenants.{t}"), format!("unknown tenant {t:?}")));
            }
            table(&format!("cost.tenants.{t}."), &tp.models)?;
            if let Some(p) = &tp.default {
                p.check(&format!("cost.tenants.{t}.default"))?;
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
            && self.default.is_none()
            && self
                .tenants
                .values()
                .all(|t| t.models.is_empty() && t.default.is_none())
    }
}

/// The smallest `audit.max_file_bytes`; each stream's share is at least twice this.
pub const AUDIT_MIN_FILE_BYTES: u64 = 64 * 1024;
/// `audit.max_total_bytes` is at most this many times `audit.max_file_bytes`.
pub const AUDIT_MAX_FILES: u64 = 1024;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node agent's socket; tagging and KV reports are off when absent.
    pub socket: Option<PathBuf>,
    /// How often to report per-tenant KV-cache bytes (needs `[model]`).
    #[serde(default = "default_kv_interval")]
    pub kv_report_interval_ms: u64,
    /// Client connections tagged per tenant at most; beyond, a tenant's extra connections
    /// count as untagged, so no tenant can evict others' tags from the agent's map.
    #[serde(default = "default_max_tagged")]
    pub max_tagged_connections_per_tenant: usize,
}
impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: None,
            kv_report_interval_ms: default_kv_interval(),
            max_tagged_connections_per_tenant: default_max_tagged(),
        }
    }
}
fn default_max_tagged() -> usize {
    1024
}
fn default_kv_interval() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 (default) uses one per CPU. Read at start only.
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Completion tokens reserved when a request has no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Prefix-cache isolation tier: `shared` (default), `salted` or `exclusive`.
    #[serde(default)]
    pub isolation: Isolation,
    /// KV-cache tokens the tenant's in-flight requests may hold at most (each reserves its
    /// prompt estimate + `max_tokens` x choices); requests beyond wait in the fair queue.
    pub max_kv_tokens: Option<u64>,
    /// Secret marker strings planted in this tenant's own data (documents, system prompts, RAG
    /// index): seen in another tenant's prompt or response, they are a leak.
    #[serde(default)]
    pub canaries: Vec<String>,
    /// Terms that belong to this tenant: another tenant using them is counted.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Seal this tenant's audit records with its own key (AES-256-GCM); lines `<kid> <base64
    /// 32-byte key>`, the first seals, all open.
    pub audit_key_file: Option<PathBuf>,
    /// `/v1/` routes the sidecar does not know: `refuse` (default, 404) or `forward` (opaque,
    /// charged by body size; only for `shared` tenants, since no salt can be set).
    #[serde(default)]
    pub unknown_routes: UnknownRoutes,
}

/// What happens to a `/v1/` route outside the sidecar's route table.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRoutes {
    #[default]
    Refuse,
    Forward,
}
fn default_weight() -> u32 {
    1
}
fn default_max_tokens() -> u64 {
    256
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    /// Files holding the secret (several for rotation: any one verifies).
    pub secret_files: Vec<PathBuf>,
    /// `base64` (default) or `raw`.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// Tenants this key may assert; `*` for a gateway key.
    pub tenants: Vec<String>,
    /// What requests signed with this key may ask for (`[keys.scope]`); everything when absent.
    #[serde(default)]
    pub scope: ScopeConfig,
}
fn default_encoding() -> String {
    "base64".into()
}

/// A key after its files have been read.
#[derive(Clone)]
pub struct LoadedKey {
    pub id: String,
    pub secrets: Vec<Vec<u8>>,
    pub tenants: TenantBinding,
    pub scope: Arc<Scope>,
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey")
            .field("id", &self.id)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("tenants", &self.tenants)
            .field("scope", &self.scope)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantBinding {
    Any,
    Only(BTreeSet<String>),
}

impl TenantBinding {
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            TenantBinding::Any => true,
            TenantBinding::Only(s) => s.contains(tenant),
        }
    }
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

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let uri: http::Uri = self
            .upstream
            .url
            .parse()
            .map_err(|e| invalid("upstream.url", format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                "upstream.url",
                "only http:// upstreams are supported",
            ));
        }
        if uri.authority().is_none() {
            return Err(invalid("upstream.url", "missing host"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid("upstream.url", "must not have a path"));
        }
        if self.upstream.connect_timeout_ms == 0 {
            return Err(invalid("upstream.connect_timeout_ms", "must be > 0"));
        }
        if self.upstream.response_timeout_ms == 0 {
            return Err(invalid("upstream.response_timeout_ms", "must be > 0"));
        }
        if self.auth.label.is_empty()
            || !self
                .auth
                .label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
            || !self.auth.label.as_bytes()[0].is_ascii_lowercase()
        {
            return Err(invalid(
                "auth.label",
                "must be an RFC 8941 key (lowercase letter, then a-z 0-9 _ - . *)",
            ));
        }
        if self.auth.max_skew_secs == 0 || self.auth.max_skew_secs > 3600 {
            return Err(invalid("auth.max_skew_secs", "must be within 1..=3600"));
        }
        if self.auth.replay_cache_capacity == 0 {
            return Err(invalid("auth.replay_cache_capacity", "must be > 0"));
        }
        if self.queue.max_inflight == 0 {
            return Err(invalid("queue.max_inflight", "must be > 0"));
        }
        if self.queue.timeout_ms == 0 {
            return Err(invalid("queue.timeout_ms", "must be > 0"));
        }
        if self.leaks.injection_markers.len() > 64 {
            return Err(invalid(
                "leaks.injection_markers",
                "at most 64 (each is a label value)",
            ));
        }
        for m in &self.leaks.injection_markers {
            check_pattern("leaks.injection_markers", m, 3, 128)?;
        }
        for (field, v) in [
            ("queue.input_token_cost", self.queue.input_token_cost),
            ("queue.output_token_cost", self.queue.output_token_cost),
        ] {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err(invalid(field, "must be a number within 0..=1000000"));
            }
        }
        if self.queue.input_token_cost == 0.0 && self.queue.output_token_cost == 0.0 {
            return Err(invalid(
                "queue.input_token_cost",
                "input and output token costs cannot both be 0",
            ));
        }
        if self.http.max_header_bytes < 1024 {
            return Err(invalid("http.max_header_bytes", "must be >= 1024"));
        }
        if self.http.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be > 0"));
        }
        if self.http.header_read_timeout_ms == 0 {
            return Err(invalid("http.header_read_timeout_ms", "must be > 0"));
        }
        if self.http.body_read_timeout_ms == 0 {
            return Err(invalid("http.body_read_timeout_ms", "must be > 0"));
        }
        if self.http.max_inflight_body_bytes < self.http.max_body_bytes {
            return Err(invalid(
                "http.max_inflight_body_bytes",
                "must be >= http.max_body_bytes (or no body of the largest size could be read)",
            ));
        }
        if self.http.max_connections == 0 || self.http.max_connections > 1_000_000 {
            return Err(invalid(
                "http.max_connections",
                "must be within 1..=1000000",
            ));
        }
        if self.http.idle_timeout_ms == 0 {
            return Err(invalid("http.idle_timeout_ms", "must be > 0"));
        }
        if self.http.max_concurrent_streams == 0 || self.http.max_concurrent_streams > 10_000 {
            return Err(invalid(
                "http.max_concurrent_streams",
                "must be within 1..=10000",
            ));
        }
        if self.http.response_write_idle_timeout_ms == 0 {
            return Err(invalid(
                "http.response_write_idle_timeout_ms",
                "must be > 0",
            ));
        }
        if self.agent.max_tagged_connections_per_tenant == 0 {
            return Err(invalid(
                "agent.max_tagged_connections_per_tenant",
                "must be > 0",
            ));
        }
        if self.runtime.worker_threads > 256 {
            return Err(invalid("runtime.worker_threads", "must be within 0..=256"));
        }
        if self.tenants.is_empty() {
            return Err(invalid("tenants", "at least one tenant is required"));
        }
        for (name, t) in &self.tenants {
            let f = |k: &str| format!("tenants.{name}.{k}");
            // The rule the node agent applies too (its tenants must match these names).
            if let Err(e) = agent_common::check_tenant_name(name) {
                return Err(invalid(format!("tenants.{name}"), e.to_string()));
            }
            if t.weight == 0 || t.weight > 10_000 {
                return Err(invalid(f("weight"), "must be within 1..=10000"));
            }
            if t.requests_per_minute == Some(0) {
                return Err(invalid(
                    f("requests_per_minute"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.tokens_per_minute == Some(0) {
                return Err(invalid(
                    f("tokens_per_minute"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.max_concurrent == Some(0) {
                return Err(invalid(
                    f("max_concurrent"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.default_max_tokens == 0 {
                return Err(invalid(f("default_max_tokens"), "must be > 0"));
            }
            if let Some(kv) = t.max_kv_tokens
                && kv <= t.default_max_tokens
            {
                return Err(invalid(
                    f("max_kv_tokens"),
                    format!(
                        "must be larger than default_max_tokens ({}): every request reserves its \
                         prompt plus max_tokens",
                        t.default_max_tokens
                    ),
                ));
            }
            for (k, list, min) in [("canaries", &t.canaries, 8), ("keywords", &t.keywords, 3)] {
                if list.len() > 1000 {
                    return Err(invalid(f(k), "at most 1000"));
                }
                for p in list {
                    check_pattern(&f(k), p, min, 256)?;
                    let lower = p.to_ascii_lowercase();
                    if let Some((other, _)) = self.tenants.iter().find(|(o, ot)| {
                        *o != name
                            && ot
                                .canaries
                                .iter()
                                .chain(&ot.keywords)
                                .any(|q| q.to_ascii_lowercase() == lower)
                    }) {
                        return Err(invalid(
                            f(k),
                            format!("one also belongs to tenant {other}: a pattern has one owner"),
                        ));
                    }
                }
            }
            if t.unknown_routes == UnknownRoutes::Forward && t.isolation != Isolation::Shared {
                return Err(invalid(
                    f("unknown_routes"),
                    format!(
                        "\"forward\" is only for \"shared\" tenants: an unknown route's body is \
                         not inspected, so the {} tier could not be applied to it",
                        t.isolation.as_str()
                    ),
                ));
            }
            let flavor = self.upstream.flavor;
            match t.isolation {
                Isolation::Shared => {}
                Isolation::Salted | Isolation::Exclusive if flavor == Flavor::Openai => {
                    return Err(invalid(
                        f("isolation"),
                        format!(
                            "\"{}\" needs an upstream with cache_salt and a cache flush; \
                             upstream.flavor = \"openai\" has neither (set upstream.flavor to \
                             \"vllm\" or \"sglang\", or use \"shared\")",
                            t.isolation.as_str()
                        ),
                    ));
                }
                Isolation::Salted if self.cache.salt_key_file.is_none() => {
                    return Err(invalid(
                        "cache.salt_key_file",
                        format!("required: tenants.{name}.isolation is \"salted\""),
                    ));
                }
                Isolation::Salted | Isolation::Exclusive => {}
            }
        }
        let c = &self.cache;
        if c.exclusive_window_ms == 0 {
            return Err(invalid("cache.exclusive_window_ms", "must be > 0"));
        }
        if c.exclusive_window_max_requests == 0 {
            return Err(invalid(
                "cache.exclusive_window_max_requests",
                "must be > 0",
            ));
        }
        if c.flush_attempts == 0 || c.flush_attempts > 100 {
            return Err(invalid("cache.flush_attempts", "must be within 1..=100"));
        }
        if c.flush_timeout_ms == 0 {
            return Err(invalid("cache.flush_timeout_ms", "must be > 0"));
        }
        if c.exclusive_drain_timeout_ms == 0 {
            return Err(invalid("cache.exclusive_drain_timeout_ms", "must be > 0"));
        }
        // A request let past the gate reaches the upstream within the connect timeout; the
        // drain bound must outlast that before a flush may vouch for it.
        if c.flush_refused_while_busy
            && c.exclusive_drain_timeout_ms <= self.upstream.connect_timeout_ms
        {
            return Err(invalid(
                "cache.exclusive_drain_timeout_ms",
                "must be > upstream.connect_timeout_ms when cache.flush_refused_while_busy is set",
            ));
        }
        if let Some(m) = &self.model {
            for (k, v) in [
                ("layers", m.layers),
                ("kv_heads", m.kv_heads),
                ("head_dim", m.head_dim),
            ] {
                if v == 0 || v > 1_000_000 {
                    return Err(invalid(format!("model.{k}"), "must be within 1..=1000000"));
                }
            }
        }
        self.validate_audit()?;
        self.cost
            .check(&|t| self.tenants.contains_key(t))
            .map_err(|(field, message)| invalid(field, message))?;
        self.validate_limits()?;
        if self.agent.kv_report_interval_ms < 100 {
            return Err(invalid("agent.kv_report_interval_ms", "must be >= 100"));
        }
        if self.keys.is_empty() && self.auth.jwt.is_none() {
            return Err(invalid(
                "keys",
                "at least one key is required (or configure [auth.jwt])",
            ));
        }
        crate::scope::Routes::parse(&self.auth.hmac_routes)
            .map_err(|m| invalid("auth.hmac_routes", m))?;
        if let Some(j) = &self.auth.jwt {
            self.validate_jwt(j)?;
        }
        for (i, k) in self.keys.iter().enumerate() {
            let f = |x: &str| format!("keys[{i}].{x}");
            if k.id.is_empty() || k.id.len() > 128 {
                return Err(invalid(f("id"), "must be 1-128 characters"));
            }
            if k.secret_files.is_empty() {
                return Err(invalid(f("secret_files"), "at least one file is required"));
            }
            if k.encoding != "base64" && k.encoding != "raw" {
                return Err(invalid(f("encoding"), "must be \"base64\" or \"raw\""));
            }
            if k.tenants.is_empty() {
                return Err(invalid(f("tenants"), "list the tenants, or \"*\" for any"));
            }
            for t in &k.tenants {
                if t != "*" && !self.tenants.contains_key(t) {
                    return Err(invalid(f("tenants"), format!("unknown tenant {t:?}")));
                }
            }
            Scope::from_config(&k.scope)
                .map_err(|e| invalid(f(&format!("scope.{}", e.field)), e.message))?;
            // Entries sharing an id are one key: they must not disagree on its scope.
            if let Some(first) = self.keys[..i].iter().find(|o| o.id == k.id)
                && first.scope != k.scope
            {
                return Err(invalid(
                    f("scope"),
                    format!("differs from an earlier entry with id {:?}", k.id),
                ));
            }
        }
        Ok(())
    }

    fn validate_jwt(&self, j: &JwtConfig) -> Result<(), ConfigError> {
        let f = |k: &str| format!("auth.jwt.{k}");
        let strings = |k: &str, list: &[String]| -> Result<(), ConfigError> {
            if list.is_empty() || list.len() > 64 {
                return Err(invalid(f(k), "list 1-64 values"));
            }
            if list.iter().any(|s| s.is_empty() || s.len() > 1024) {
                return Err(invalid(f(k), "values must be 1-1024 bytes"));
            }
            Ok(())
        };
        strings("issuers", &j.issuers)?;
        strings("audiences", &j.audiences)?;
        strings("algorithms", &j.algorithms)?;
        if let Some(a) = j
            .algorithms
            .iter()
            .find(|a| !JWT_ALGORITHMS.contains(&a.as_str()))
        {
            return Err(invalid(
                f("algorithms"),
                format!("{a:?} is not one of \"RS256\", \"ES256\", \"EdDSA\""),
            ));
        }
        if j.jwks_file.is_none() && j.jwks_url.is_none() {
            return Err(invalid(f("jwks_file"), "set jwks_file, jwks_url or both"));
        }
        if let Some(u) = &j.jwks_url {
            let uri: http::Uri = u
                .parse()
                .map_err(|e| invalid(f("jwks_url"), format!("not a URL: {e}")))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(invalid(
                    f("jwks_url"),
                    "only http:// URLs are supported (no TLS stack): use the IdP's in-cluster \
                     service address, or a jwks_file kept up to date",
                ));
            }
        }
        for (k, v, lo, hi) in [
            ("jwks_refresh_ms", j.jwks_refresh_ms, 1000, 86_400_000),
            ("jwks_min_refresh_ms", j.jwks_min_refresh_ms, 100, 3_600_000),
            ("jwks_timeout_ms", j.jwks_timeout_ms, 1, 60_000),
            ("jwks_max_bytes", j.jwks_max_bytes as u64, 1024, 16 << 20),
            ("leeway_secs", j.leeway_secs, 0, 3600),
            ("max_token_bytes", j.max_token_bytes as u64, 256, 65_536),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(invalid(f(k), format!("must be within {lo}..={hi}")));
            }
        }
        for (k, v) in [
            ("tenant_claim", Some(&j.tenant_claim)),
            ("tier_claim", j.tier_claim.as_ref()),
            ("scope_claim", j.scope_claim.as_ref()),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 256)
            {
                return Err(invalid(f(k), "must be 1-256 bytes"));
            }
        }
        if j.tier_claim.is_none() && (!j.tiers.is_empty() || j.default_tier.is_some()) {
            return Err(invalid(
                f("tier_claim"),
                "required when tiers are configured",
            ));
        }
        if j.tier_claim.is_some() && j.tiers.is_empty() {
            return Err(invalid(f("tiers"), "list at least one tier for tier_claim"));
        }
        if let Some(d) = &j.default_tier
            && !j.tiers.contains_key(d)
        {
            return Err(invalid(
                f("default_tier"),
                format!("{d:?} is not in auth.jwt.tiers"),
            ));
        }
        for (name, t) in &j.tiers {
            Scope::from_config(t)
                .map_err(|e| invalid(f(&format!("tiers.{name}.{}", e.field)), e.message))?;
        }
        crate::scope::Routes::parse(&j.routes).map_err(|m| invalid(f("routes"), m))?;
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let Some(r) = &l.redis else {
            if l.backend == LimitsBackend::Redis {
                return Err(invalid(
                    "limits.redis",
                    "required when limits.backend = \"redis\" (set url or urls)",
                ));
            }
            return Ok(());
        };
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

    fn validate_audit(&self) -> Result<(), ConfigError> {
        let a = &self.audit;
        if a.max_file_bytes < AUDIT_MIN_FILE_BYTES {
            return Err(invalid(
                "audit.max_file_bytes",
                format!("must be >= {AUDIT_MIN_FILE_BYTES} (64 KiB)"),
            ));
        }
        if a.max_file_bytes > a.max_total_bytes {
            return Err(invalid(
                "audit.max_file_bytes",
                format!(
                    "must be <= audit.max_total_bytes ({} > {})",
                    a.max_file_bytes, a.max_total_bytes
                ),
            ));
        }
        if a.max_total_bytes / a.max_file_bytes > AUDIT_MAX_FILES {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be <= {AUDIT_MAX_FILES} x audit.max_file_bytes (raise max_file_bytes)"
                ),
            ));
        }
        // Every stream (each tenant and `_unauthenticated`) keeps a current and a rotated file.
        let streams = self.tenants.len() as u64 + 1;
        let least = streams.saturating_mul(2 * AUDIT_MIN_FILE_BYTES);
        if a.max_total_bytes < least {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be >= {least}: {streams} streams ({} tenants and _unauthenticated) \
                     x 128 KiB each",
                    self.tenants.len()
                ),
            ));
        }
        if a.unauthenticated_per_second == 0 || a.unauthenticated_per_second > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_per_second",
                "must be within 1..=100000",
            ));
        }
        if a.unauthenticated_burst == 0 || a.unauthenticated_burst > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_burst",
                "must be within 1..=100000",
            ));
        }
        Ok(())
    }

    /// Read every key file. Called at start and on reload, so a bad key file rejects the reload.
    pub fn load_keys(&self) -> Result<Vec<LoadedKey>, ConfigError> {
        use base64::Engine;
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            let mut secrets = Vec::new();
            for (j, p) in k.secret_files.iter().enumerate() {
                let field = format!("keys[{i}].secret_files[{j}]");
                let raw = std::fs::read(p).map_err(|e| {
                    invalid(field.clone(), format!("cannot read {}: {e}", p.display()))
                })?;
                let secret = if k.encoding == "base64" {
                    let text = String::from_utf8(raw)
                        .map_err(|_| invalid(field.clone(), "not base64 text"))?;
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map_err(|_| invalid(field.clone(), "not valid base64"))?
                } else {
                    raw
                };
                if secret.len() < 16 {
                    return Err(invalid(field, "secret shorter than 16 bytes"));
                }
                secrets.push(secret);
            }
            let tenants = if k.tenants.iter().any(|t| t == "*") {
                TenantBinding::Any
            } else {
                TenantBinding::Only(k.tenants.iter().cloned().collect())
            };
            let scope = Scope::from_config(&k.scope)
                .map_err(|e| invalid(format!("keys[{i}].scope.{}", e.field), e.message))?;
            out.push(LoadedKey {
                id: k.id.clone(),
                secrets,
                tenants,
                scope: Arc::new(scope),
            });
        }
        Ok(out)
    }

    /// Read the salt key (base64, >= 16 bytes) when one is configured.
    pub fn load_salt_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        use base64::Engine;
        let Some(p) = &self.cache.salt_key_file else {
            return Ok(None);
        };
        let field = "cache.salt_key_file";
        let text = std::fs::read_to_string(p)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", p.display())))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| invalid(field, "not valid base64"))?;
        if key.len() < 16 {
            return Err(invalid(field, "key shorter than 16 bytes"));
        }
        Ok(Some(key))
    }

    /// Each tenant's audit sealing keys (`tenants.<name>.audit_key_file`).
    pub fn load_audit_seals(
        &self,
    ) -> Result<std::collections::HashMap<String, std::sync::Arc<crate::seal::SealKeys>>, ConfigError>
    {
        let mut out = std::collections::HashMap::new();
        for (name, t) in &self.tenants {
            if let Some(p) = &t.audit_key_file {
                let keys = crate::seal::SealKeys::load(p).map_err(|e| {
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
mod tests {
    use super::*;

    fn base() -> String {
        r#"
[upstream]
url = "http://127.0.0.1:8000"
[tenants.acme]
requests_per_minute = 10
[[keys]]
id = "gw"
secret_files = ["/nonexistent"]
tenants = ["*"]
"#
        .to_string()
    }

    #[test]
    fn example_config_is_valid() {
        Config::from_toml(EXAMPLE_CONFIG).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let bad = base().replace("requests_per_minute = 10", "requests_per_minute = 0");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("tenants.acme.requests_per_minute"), "{e}");
        let bad = base().replace("http://127.0.0.1:8000", "ftp://x");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("upstream.url"), "{e}");
        let bad = base().replace("[\"*\"]", "[\"nobody\"]");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("keys[0].tenants"), "{e}");
        let bad = base() + "\nbogus = 1\n";
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn tenant_names_follow_the_shared_rule() {
        let named = |name: &str| base().replace("[tenants.acme]", &format!("[tenants.{name:?}]"));
        // Reserved names (the node agent's metric labels of no tenant), in any letter case.
        for (name, reserved) in [
            ("untagged", "untagged"),
            ("Shared", "shared"),
            ("UNATTRIBUTED", "unattributed"),
        ] {
            let e = Config::from_toml(&named(name)).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "config field `tenants.{name}`: tenant name is reserved: {reserved:?} \
                     (in any letter case) labels metrics of no single tenant"
                )
            );
        }
        let e = Config::from_toml(&named("a b")).unwrap_err().to_string();
        assert_eq!(
            e,
            "config field `tenants.a b`: tenant name has the character ' ' at position 2; \
             use letters, digits, '.', '_' and '-'"
        );
        let e = Config::from_toml(&named("-a")).unwrap_err().to_string();
        assert!(
            e.contains("`tenants.-a`: tenant name starts with '-'"),
            "{e}"
        );
        let e = Config::from_toml(&named(&"x".repeat(65)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tenant name is 65 bytes long; at most 64 are allowed"),
            "{e}"
        );
        Config::from_toml(&named("a.b_c-9")).unwrap();
    }

    #[test]
    fn isolation_tiers_need_a_capable_upstream() {
        let salted = base().replace(
            "requests_per_minute = 10",
            "requests_per_minute = 10\nisolation = \"salted\"",
        );
        let e = Config::from_toml(&salted).unwrap_err().to_string();
        assert!(
            e.contains("tenants.acme.isolation") && e.contains("openai"),
            "{e}"
        );
        let excl = base().replace(
            "requests_per_minute = 10",
            "requests_per_minute = 10\nisolation = \"exclusive\"",
        );
        let e = Config::from_toml(&excl).unwrap_err().to_string();
        assert!(e.contains("tenants.acme.isolation"), "{e}");
        let vllm = |t: &str| t.replace("8000\"", "8000\"\nflavor = \"vllm\"");
        Config::from_toml(&vllm(&excl)).unwrap();
        let e = Config::from_toml(&vllm(&salted)).unwrap_err().to_string();
        assert!(e.contains("cache.salt_key_file"), "{e}");
        let ok = vllm(&salted) + "[cache]\nsalt_key_file = \"/k\"\n";
        let c = Config::from_toml(&ok).unwrap();
        assert_eq!(c.tenants["acme"].isolation, Isolation::Salted);
        let bad = base().replace("8000\"", "8000\"\nflavor = \"tgi\"");
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn audit_limits_are_validated() {
        let with = |extra: &str| base() + "[audit]\n" + extra;
        let c = Config::from_toml(&with("")).unwrap();
        assert_eq!(c.audit.max_file_bytes, 64 << 20);
        assert_eq!(c.audit.max_total_bytes, 512 << 20);
        assert_eq!(c.audit.unauthenticated_per_second, 100);
        for (extra, field) in [
            ("max_file_bytes = 1000", "audit.max_file_bytes"),
            (
                "max_file_bytes = 2000000\nmax_total_bytes = 1000000",
                "audit.max_file_bytes",
            ),
            (
                "max_file_bytes = 65536\nmax_total_bytes = 1000000000",
                "audit.max_total_bytes",
            ),
            // acme and _unauthenticated: 2 x 128 KiB at least.
            (
                "max_file_bytes = 65536\nmax_total_bytes = 200000",
                "audit.max_total_bytes",
            ),
            (
                "unauthenticated_per_second = 0",
                "audit.unauthenticated_per_second",
            ),
            ("unauthenticated_burst = 0", "audit.unauthenticated_burst"),
        ] {
            let e = Config::from_toml(&with(extra)).unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        Config::from_toml(&with("max_file_bytes = 65536\nmax_total_bytes = 262144")).unwrap();
        assert!(Config::from_toml(&with("max_bytes = 1")).is_err());
    }

    #[test]
    fn drain_timeout_is_validated() {
        let c = Config::from_toml(&base()).unwrap();
        assert_eq!(c.cache.exclusive_drain_timeout_ms, 5000);
        assert!(!c.cache.flush_refused_while_busy);
        let cache = |extra: &str| format!("{}[cache]\n{extra}\n", base());
        let e = Config::from_toml(&cache("exclusive_drain_timeout_ms = 0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.exclusive_drain_timeout_ms"), "{e}");
        // Trusting a flush to vouch for running requests needs a bound past the connect
        // timeout (2000 ms by default).
        let e = Config::from_toml(&cache(
            "flush_refused_while_busy = true\nexclusive_drain_timeout_ms = 2000",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cache.exclusive_drain_timeout_ms") && e.contains("connect_timeout_ms"),
            "{e}"
        );
        let c = Config::from_toml(&cache(
            "flush_refused_while_busy = true\nexclusive_drain_timeout_ms = 2001",
        ))
        .unwrap();
        assert_eq!(c.cache.exclusive_drain_timeout_ms, 2001);
    }

    #[test]
    fn limits_backend_is_validated() {
        let c = Config::from_toml(&base()).unwrap();
        assert_eq!(c.limits.backend, LimitsBackend::Local);
        assert!(c.limits.redis.is_none());
        let with = |extra: &str| format!("{}[limits]\n{extra}\n", base());
        let redis = |extra: &str| {
            with(&format!(
                "backend = \"redis\"\n[limits.redis]\nurl = \"redis://127.0.0.1:6379/\"\n{extra}"
            ))
        };
        let c = Config::from_toml(&redis("")).unwrap();
        let r = c.limits.redis.unwrap();
        assert_eq!(r.mode, LimitsMode::Strict);
        assert_eq!(r.on_backend_failure, BackendFailure::Local);
        assert_eq!(r.key_prefix, "bulkhead:");
        assert_eq!((r.command_timeout_ms, r.expected_replicas), (100, 1));
        for (text, field) in [
            (with("backend = \"redis\""), "limits.redis"),
            (
                with("backend = \"redis\"\n[limits.redis]\n"),
                "limits.redis.url",
            ),
            (redis("urls = [\"redis://a:1\"]"), "limits.redis.urls"),
            (
                with("backend = \"redis\"\n[limits.redis]\nurl = \"rediss://h/\""),
                "limits.redis.url",
            ),
            (
                with("backend = \"redis\"\n[limits.redis]\nurls = [\"redis://a:1\", \"http://b\"]"),
                "limits.redis.urls[1]",
            ),
            (
                redis("command_timeout_ms = 0"),
                "limits.redis.command_timeout_ms",
            ),
            (
                redis("connect_timeout_ms = 0"),
                "limits.redis.connect_timeout_ms",
            ),
            (redis("key_prefix = \"a{b}\""), "limits.redis.key_prefix"),
            (redis("lease_tokens = 0"), "limits.redis.lease_tokens"),
            (redis("lease_requests = 0"), "limits.redis.lease_requests"),
            (
                redis("concurrency_lease_ms = 100"),
                "limits.redis.concurrency_lease_ms",
            ),
            (
                redis("concurrency_lease_ms = 600\ncommand_timeout_ms = 300"),
                "limits.redis.concurrency_lease_ms",
            ),
            (
                redis("expected_replicas = 0"),
                "limits.redis.expected_replicas",
            ),
        ] {
            let e = Config::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
        }
        assert!(Config::from_toml(&redis("mode = \"eventual\"")).is_err());
        assert!(Config::from_toml(&redis("on_backend_failure = \"open\"")).is_err());
        assert!(Config::from_toml(&redis("bogus = 1")).is_err());
        let c = Config::from_toml(&redis(
            "mode = \"leased\"\non_backend_failure = \"deny\"\nexpected_replicas = 3",
        ))
        .unwrap();
        let r = c.limits.redis.unwrap();
        assert_eq!(
            (r.mode, r.on_backend_failure, r.expected_replicas),
            (LimitsMode::Leased, BackendFailure::Deny, 3)
        );
    }

    /// The configurations in deploy/'s ConfigMaps parse and validate (the shared-limits one
    /// on Redis).
    #[test]
    fn deploy_example_configs_are_valid() {
        for (file, backend) in [
            ("example-vllm/sidecar-configmap.yaml", LimitsBackend::Local),
            (
                "example-shared-limits/sidecar-configmap.yaml",
                LimitsBackend::Redis,
            ),
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy")
                .join(file);
            let yaml = std::fs::read_to_string(&path).unwrap();
            let toml: String = yaml
                .lines()
                .skip_while(|l| l.trim() != "sidecar.toml: |")
                .skip(1)
                .take_while(|l| l.is_empty() || l.starts_with("    "))
                .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
                .collect();
            let c = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(c.limits.backend, backend, "{file}");
        }
    }

    #[test]
    fn kv_bytes_per_token() {
        let m = ModelConfig {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: Dtype::Bf16,
        };
        assert_eq!(m.kv_bytes_per_token(), 131_072);
        let m = ModelConfig {
            dtype: Dtype::Fp8,
            ..m
        };
        assert_eq!(m.kv_bytes_per_token(), 65_536);
    }

    #[test]
    fn missing_key_file_is_reported() {
        let cfg = Config::from_toml(&base()).unwrap();
        let e = cfg.load_keys().unwrap_err().to_string();
        assert!(e.contains("keys[0].secret_files[0]"), "{e}");
    }
}
