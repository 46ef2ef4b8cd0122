//! The sidecar's TOML configuration: parsing, validation (errors name the field) and key loading.

use crate::auth::scope::{Scope, ScopeConfig};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The example configuration shipped with the crate (used by the demo and `check-config`).
mod validate;

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

/// A key file as a Kubernetes Secret mounts it: base64, surrounding whitespace ignored, at
/// least 16 bytes once decoded (an empty or short key would make an HMAC anyone can forge).
pub fn read_key_file(p: &std::path::Path, field: &str) -> Result<Vec<u8>, ConfigError> {
    use base64::Engine;
    let text = std::fs::read_to_string(p)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", p.display())))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| invalid(field, "not valid base64"))?;
    if key.len() < 16 {
        return Err(invalid(field, "key shorter than 16 bytes"));
    }
    Ok(key)
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
    /// The served model's KV-cache geometry; enables `bulkhead_sidecar_kv_inflight_bytes` and KV reports.
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
    /// OpenTelemetry export (`[telemetry.otlp]`); off by default.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: traces and the GenAI metrics over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp: Option<OtlpConfig>,
}

/// `[telemetry.otlp]`: where and how spans and metrics are exported (read at start only).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`): spans go to
    /// `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`.
    pub endpoint: String,
    /// The share of new traces sampled (0.0 ..= 1.0); a trusted client's sampled flag is
    /// followed (parent-based).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Spans waiting for export at most; beyond, new spans are dropped and counted.
    #[serde(default = "default_queue_spans")]
    pub max_queue_spans: usize,
    /// Spans in one export request at most.
    #[serde(default = "default_batch_spans")]
    pub max_batch_spans: usize,
    /// How long spans wait for a fuller batch at most.
    #[serde(default = "default_export_interval")]
    pub export_interval_ms: u64,
    /// One export request's time limit; a batch that misses it is dropped and counted.
    #[serde(default = "default_export_timeout")]
    pub timeout_ms: u64,
    /// How often the GenAI metrics are exported (0: traces only).
    #[serde(default = "default_metrics_interval")]
    pub metrics_interval_ms: u64,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_sample_ratio() -> f64 {
    0.1
}
fn default_queue_spans() -> usize {
    4096
}
fn default_batch_spans() -> usize {
    512
}
fn default_export_interval() -> u64 {
    1000
}
fn default_export_timeout() -> u64 {
    2000
}
fn default_metrics_interval() -> u64 {
    15000
}
fn default_service_name() -> String {
    "bulkhead-sidecar".into()
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
    /// Request headers that routers and engines behind the sidecar read as the tenant's
    /// identity: overwritten with the verified tenant, never taken from the client.
    #[serde(default = "default_identity_headers")]
    pub identity_headers: Vec<String>,
}

/// The Gateway API Inference Extension's fairness id, and the common `x-tenant-id`.
pub fn default_identity_headers() -> Vec<String> {
    vec![
        "x-gateway-inference-fairness-id".into(),
        "x-tenant-id".into(),
    ]
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
    /// Prompt tokens charged for each image, audio or video part of a prompt (its worst case:
    /// never the length of its URL or data).
    #[serde(default = "default_media_part_tokens")]
    pub media_part_tokens: u64,
}

fn default_media_part_tokens() -> u64 {
    crate::proxy::schema::DEFAULT_MEDIA_TOKENS
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
    /// The issuers: either `iss` strings (exact match), all trusting the keys of `jwks_file` /
    /// `jwks_url` below and naming any tenant; or `[[auth.jwt.issuers]]` tables, each an
    /// issuer with keys and tenants of its own (see [`JwtIssuerConfig`]). Not both kinds.
    pub issuers: Vec<JwtIssuer>,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// A JWKS file (reloaded with the configuration: on change and on SIGHUP), for issuers
    /// given as strings.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http://` only), fetched at start and every `jwks_refresh_ms`, for issuers
    /// given as strings.
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
/// One entry of `auth.jwt.issuers`: an `iss` string, or an issuer table.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtIssuer {
    Name(String),
    Table(JwtIssuerConfig),
}

impl<'de> Deserialize<'de> for JwtIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = JwtIssuer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an issuer (`iss`) string, or an issuer table (issuer, jwks_file and/or \
                     jwks_url, tenants)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JwtIssuer, E> {
                Ok(JwtIssuer::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<JwtIssuer, A::Error> {
                JwtIssuerConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(JwtIssuer::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// `[[auth.jwt.issuers]]`: one issuer (an IdP realm) with its own keys and the tenants its
/// tokens may name, so one realm's keys can never mint another realm's tenants.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The `iss` value (exact match).
    pub issuer: String,
    /// This issuer's JWKS file (reloaded with the configuration).
    pub jwks_file: Option<PathBuf>,
    /// This issuer's JWKS URL (`http://` only), fetched as `auth.jwt.jwks_refresh_ms` and the
    /// other `jwks_*` settings say.
    pub jwks_url: Option<String>,
    /// The configured tenants this issuer's tokens may name; any other is refused
    /// (`tenant_not_allowed_for_issuer`).
    pub tenants: Vec<String>,
    /// The header `typ` required (e.g. `at+jwt`, RFC 9068; compared without letter case and
    /// without an `application/` prefix); absent: any.
    pub typ: Option<String>,
    /// The `azp` (authorized party) values accepted; absent: any, or none.
    pub allowed_azp: Option<Vec<String>>,
}

/// One issuer as the verifier sees it, whichever way it was configured.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRealm<'a> {
    /// Where it is configured: `auth.jwt` (issuers given as strings) or `auth.jwt.issuers[i]`.
    pub field: String,
    /// Accepted `iss` values.
    pub issuers: Vec<&'a str>,
    pub jwks_file: Option<&'a PathBuf>,
    pub jwks_url: Option<&'a String>,
    /// The tenants its tokens may name; `None`: any configured tenant.
    pub tenants: Option<&'a [String]>,
    pub typ: Option<&'a str>,
    pub allowed_azp: Option<&'a [String]>,
}

impl JwtConfig {
    /// The issuers, each with its keys: the strings of `issuers` as one issuer with the
    /// top-level `jwks_file` / `jwks_url` and any tenant, then each issuer table.
    pub fn realms(&self) -> Vec<JwtRealm<'_>> {
        let names: Vec<&str> = self
            .issuers
            .iter()
            .filter_map(|i| match i {
                JwtIssuer::Name(n) => Some(n.as_str()),
                JwtIssuer::Table(_) => None,
            })
            .collect();
        let mut out = Vec::new();
        if !names.is_empty() {
            out.push(JwtRealm {
                field: "auth.jwt".into(),
                issuers: names,
                jwks_file: self.jwks_file.as_ref(),
                jwks_url: self.jwks_url.as_ref(),
                tenants: None,
                typ: None,
                allowed_azp: None,
            });
        }
        for (i, entry) in self.issuers.iter().enumerate() {
            if let JwtIssuer::Table(t) = entry {
                out.push(JwtRealm {
                    field: format!("auth.jwt.issuers[{i}]"),
                    issuers: vec![t.issuer.as_str()],
                    jwks_file: t.jwks_file.as_ref(),
                    jwks_url: t.jwks_url.as_ref(),
                    tenants: Some(&t.tenants),
                    typ: t.typ.as_deref(),
                    allowed_azp: t.allowed_azp.as_deref(),
                });
            }
        }
        out
    }
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
    /// The price of one GPU-hour (optional): exported as `bulkhead_gpu_hour_price`, so a
    /// recording rule prices each tenant's GPU busy time (the node agent's
    /// `bulkhead_gpu_busy_seconds_total`) beside its tokens.
    #[serde(default)]
    pub gpu_hour_price: Option<f64>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            currency: default_currency(),
            models: BTreeMap::new(),
            default: None,
            tenants: BTreeMap::new(),
            gpu_hour_price: None,
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
        if let Some(p) = self.gpu_hour_price
            && (!p.is_finite() || !(0.0..=1e6).contains(&p))
        {
            return Err((
                "cost.gpu_hour_price".into(),
                "must be a number within 0..=1000000".into(),
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
    /// Body fields outside the route's schema this tenant may send: forwarded, and counted
    /// and scanned as prompt text.
    #[serde(default)]
    pub extra_fields: Vec<String>,
    /// The engine priority written into this tenant's requests (vLLM's priority scheduler:
    /// lower runs first); a client's own `priority` is refused.
    #[serde(default)]
    pub priority: i64,
    /// Engine-control fields this tenant may send as written (`kv_transfer_params` for a
    /// disaggregated deployment's own router, ...).
    #[serde(default)]
    pub trusted_engine_fields: Vec<String>,
    /// Whether this tenant's Responses API answers may be stored on the inference server (a
    /// store all tenants share); `store` is written `false` otherwise.
    #[serde(default)]
    pub store_responses: bool,
    /// Whether a client's W3C `traceparent` is continued for this tenant (its spans join the
    /// client's trace, sampled as the client says); by default a new trace is started that
    /// links to the client's.
    #[serde(default)]
    pub trust_traceparent: bool,
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
mod tests;
