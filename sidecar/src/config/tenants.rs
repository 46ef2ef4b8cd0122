//! `[tenants.<name>]`: each tenant's weight, limits, isolation tier, patterns and body fields.

use super::leaks::check_pattern;
use super::{ConfigError, Flavor, Isolation, invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    pub weight: u32,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Completion tokens reserved when a request has no `max_tokens`.
    pub default_max_tokens: u64,
    /// Prefix-cache isolation tier: `shared` (default), `salted` or `exclusive`.
    pub isolation: Isolation,
    /// KV-cache tokens the tenant's in-flight requests may hold at most (each reserves its
    /// prompt estimate + `max_tokens` x choices); requests beyond wait in the fair queue.
    pub max_kv_tokens: Option<u64>,
    /// Secret marker strings planted in this tenant's own data (documents, system prompts, RAG
    /// index): seen in another tenant's prompt or response, they are a leak.
    pub canaries: Vec<String>,
    /// Terms that belong to this tenant: another tenant using them is counted.
    pub keywords: Vec<String>,
    /// Seal this tenant's audit records with its own key (AES-256-GCM); lines `<kid> <base64
    /// 32-byte key>`, the first seals, all open.
    pub audit_key_file: Option<PathBuf>,
    /// `/v1/` routes the sidecar does not know: `refuse` (default, 404) or `forward` (opaque,
    /// charged by body size; only for `shared` tenants, since no salt can be set).
    pub unknown_routes: UnknownRoutes,
    /// Body fields outside the route's schema this tenant may send: forwarded, and counted
    /// and scanned as prompt text.
    pub extra_fields: Vec<String>,
    /// The engine priority written into this tenant's requests (vLLM's priority scheduler:
    /// lower runs first); a client's own `priority` is refused.
    pub priority: i64,
    /// Engine-control fields this tenant may send as written (`kv_transfer_params` for a
    /// disaggregated deployment's own router, ...).
    pub trusted_engine_fields: Vec<String>,
    /// Whether this tenant's Responses API answers may be stored on the inference server (a
    /// store all tenants share); `store` is written `false` otherwise.
    pub store_responses: bool,
    /// Whether a client's W3C `traceparent` is continued for this tenant (its spans join the
    /// client's trace, sampled as the client says); by default a new trace is started that
    /// links to the client's.
    pub trust_traceparent: bool,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            weight: 1,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
            default_max_tokens: 256,
            isolation: Isolation::default(),
            max_kv_tokens: None,
            canaries: Vec::new(),
            keywords: Vec::new(),
            audit_key_file: None,
            unknown_routes: UnknownRoutes::default(),
            extra_fields: Vec::new(),
            priority: 0,
            trusted_engine_fields: Vec::new(),
            store_responses: false,
            trust_traceparent: false,
        }
    }
}

/// What happens to a `/v1/` route outside the sidecar's route table.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRoutes {
    #[default]
    Refuse,
    Forward,
}

impl TenantConfig {
    /// `tenants.<name>`: its own fields, its patterns against every tenant's in `all` (a
    /// pattern has one owner), and its body fields against the upstream's `flavor`.
    pub fn validate(
        &self,
        name: &str,
        all: &BTreeMap<String, TenantConfig>,
        flavor: Flavor,
    ) -> Result<(), ConfigError> {
        let f = |k: &str| format!("tenants.{name}.{k}");
        // The rule the node agent applies too (its tenants must match these names).
        if let Err(e) = agent_common::check_tenant_name(name) {
            return Err(invalid(format!("tenants.{name}"), e.to_string()));
        }
        if self.weight == 0 || self.weight > 10_000 {
            return Err(invalid(f("weight"), "must be within 1..=10000"));
        }
        if self.requests_per_minute == Some(0) {
            return Err(invalid(
                f("requests_per_minute"),
                "must be > 0 (omit for no limit)",
            ));
        }
        if self.tokens_per_minute == Some(0) {
            return Err(invalid(
                f("tokens_per_minute"),
                "must be > 0 (omit for no limit)",
            ));
        }
        if self.max_concurrent == Some(0) {
            return Err(invalid(
                f("max_concurrent"),
                "must be > 0 (omit for no limit)",
            ));
        }
        if self.default_max_tokens == 0 {
            return Err(invalid(f("default_max_tokens"), "must be > 0"));
        }
        if let Some(kv) = self.max_kv_tokens
            && kv <= self.default_max_tokens
        {
            return Err(invalid(
                f("max_kv_tokens"),
                format!(
                    "must be larger than default_max_tokens ({}): every request reserves its \
                     prompt plus max_tokens",
                    self.default_max_tokens
                ),
            ));
        }
        for (k, list, min) in [
            ("canaries", &self.canaries, 8),
            ("keywords", &self.keywords, 3),
        ] {
            if list.len() > 1000 {
                return Err(invalid(f(k), "at most 1000"));
            }
            for p in list {
                check_pattern(&f(k), p, min, 256)?;
                let lower = p.to_ascii_lowercase();
                if let Some((other, _)) = all.iter().find(|(o, ot)| {
                    o.as_str() != name
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
        check_body_fields(&f, self, flavor)?;
        if self.unknown_routes == UnknownRoutes::Forward && self.isolation != Isolation::Shared {
            return Err(invalid(
                f("unknown_routes"),
                format!(
                    "\"forward\" is only for \"shared\" tenants: an unknown route's body is \
                     not inspected, so the {} tier could not be applied to it",
                    self.isolation.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// A tenant's body-field settings: extra fields outside the schema (never an engine field),
/// trusted engine fields (only those the schema lists as such), and a priority only where the
/// upstream reads one.
fn check_body_fields(
    f: &dyn Fn(&str) -> String,
    t: &TenantConfig,
    flavor: Flavor,
) -> Result<(), ConfigError> {
    use crate::proxy::schema::{Body, Class, Engine};
    let class_anywhere = |name: &str| Body::ALL.iter().find_map(|b| b.class(name));
    if t.extra_fields.len() > 256 {
        return Err(invalid(f("extra_fields"), "at most 256"));
    }
    for x in &t.extra_fields {
        if x.is_empty() || x.len() > 256 {
            return Err(invalid(f("extra_fields"), "entries must be 1-256 bytes"));
        }
        if let Some(Class::Engine(_)) = class_anywhere(x) {
            return Err(invalid(
                f("extra_fields"),
                format!(
                    "{x:?} is an engine-control field: list it in trusted_engine_fields if the \
                     tenant may steer the engine"
                ),
            ));
        }
    }
    for x in &t.trusted_engine_fields {
        if class_anywhere(x) != Some(Class::Engine(Engine::Trusted)) {
            return Err(invalid(
                f("trusted_engine_fields"),
                format!(
                    "{x:?} is not an engine field a tenant can be trusted with (see the field \
                     classes in sidecar/README.md)"
                ),
            ));
        }
    }
    if t.priority != 0 && flavor == Flavor::Openai {
        return Err(invalid(
            f("priority"),
            "needs upstream.flavor = \"vllm\" or \"sglang\" (an engine that reads `priority`)",
        ));
    }
    Ok(())
}
