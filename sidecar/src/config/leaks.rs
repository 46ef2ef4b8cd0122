//! `[leaks]`: what to do about canaries, and the injection markers counted.

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

/// Leak detection: what to do about canaries, and the injection markers counted.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LeaksConfig {
    /// Another tenant's canary in a prompt or a response: `count` (metric and audit) or
    /// `block` (also refuse the request / cut the response).
    pub on_canary: OnCanary,
    /// Phrases counted per tenant in prompts (`bulkhead_injection_markers_total`).
    pub injection_markers: Vec<String>,
    /// Scan responses for other tenants' canaries and keywords as they stream.
    pub scan_responses: bool,
}

/// The injection markers shipped by default (phrases of cross-tenant and prompt-injection
/// attempts).
pub const DEFAULT_INJECTION_MARKERS: [&str; 12] = [
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
];

impl Default for LeaksConfig {
    fn default() -> Self {
        Self {
            on_canary: OnCanary::default(),
            injection_markers: DEFAULT_INJECTION_MARKERS.map(String::from).to_vec(),
            scan_responses: true,
        }
    }
}

impl LeaksConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.injection_markers.len() > 64 {
            return Err(invalid(
                "leaks.injection_markers",
                "at most 64 (each is a label value)",
            ));
        }
        for m in &self.injection_markers {
            check_pattern("leaks.injection_markers", m, 3, 128)?;
        }
        Ok(())
    }
}

/// What a canary of another tenant causes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
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
pub(super) fn check_pattern(
    field: &str,
    p: &str,
    min: usize,
    max: usize,
) -> Result<(), ConfigError> {
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
