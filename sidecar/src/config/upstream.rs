//! `[upstream]`: the inference server behind the sidecar.

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the inference server, e.g. `http://127.0.0.1:8000` (required).
    pub url: String,
    /// Idle keep-alive connections kept per tenant.
    pub pool_max_idle_per_tenant: usize,
    pub connect_timeout_ms: u64,
    /// How long to wait for the upstream's response headers (a stream's body may run longer).
    pub response_timeout_ms: u64,
    /// What the upstream supports: `openai` (no `cache_salt`, no flush), `vllm` or `sglang`.
    pub flavor: Flavor,
    /// Request headers that routers and engines behind the sidecar read as the tenant's
    /// identity: overwritten with the verified tenant, never taken from the client. By
    /// default the Gateway API Inference Extension's fairness id, and the common `x-tenant-id`.
    pub identity_headers: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_max_idle_per_tenant: 32,
            connect_timeout_ms: 2000,
            response_timeout_ms: 600_000,
            flavor: Flavor::default(),
            identity_headers: vec![
                "x-gateway-inference-fairness-id".into(),
                "x-tenant-id".into(),
            ],
        }
    }
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() {
            return Err(invalid(
                "upstream.url",
                "required: the inference server's base URL (http://host:port)",
            ));
        }
        let uri: http::Uri = self
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
        if self.connect_timeout_ms == 0 {
            return Err(invalid("upstream.connect_timeout_ms", "must be > 0"));
        }
        if self.response_timeout_ms == 0 {
            return Err(invalid("upstream.response_timeout_ms", "must be > 0"));
        }
        for h in &self.identity_headers {
            let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                invalid(
                    "upstream.identity_headers",
                    format!("{h:?} is not a header name"),
                )
            })?;
            if name.as_str() != h.as_str() || crate::proxy::upstream::is_hop_by_hop(&name) {
                return Err(invalid(
                    "upstream.identity_headers",
                    format!("{h:?} must be a lowercase end-to-end header name"),
                ));
            }
        }
        Ok(())
    }
}

/// The inference server's kind, for prefix-cache isolation.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
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
