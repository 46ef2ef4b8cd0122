//! The audit record: what one JSON line holds, and the bounds on its client-controlled
//! strings.

use super::{MAX_METHOD, MAX_ROUTE, MAX_SHORT, MAX_UNAUTHENTICATED_ROUTE, UNAUTHENTICATED};
use ring::hmac;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    pub ts_unix_ms: u64,
    pub tenant: String,
    pub key_id: Option<String>,
    /// The sidecar's own id (also sent upstream and to the client as `x-request-id`).
    pub request_id: String,
    /// The client's `x-request-id`, kept for correlation only (never sent upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub method: String,
    pub route: String,
    pub status: u16,
    pub reason: Option<String>,
    pub stream: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub reserved_tokens: Option<u64>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub queue_ms: Option<f64>,
    /// HMAC-SHA256 (hex) of the prompt part of the body under the audit key.
    pub prompt_hash: Option<String>,
    /// The request body's `model` (cut to 128 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt tokens the upstream served from its prefix cache, when it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// The model the answer named (the one that served it, cut to 128 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// What the request cost in `cost.currency` (usage x the tenant's price for
    /// `price_model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The price used: the served model's, else the request's `model`'s (a model of the
    /// price tables), else `other` (`[cost.default]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_model: Option<String>,
    /// Set (and written) when `route` was cut short; see [`MAX_UNAUTHENTICATED_ROUTE`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub route_truncated: bool,
    /// Set (and written) when `method` was cut short; see [`MAX_METHOD`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub method_truncated: bool,
    /// Canaries, keywords and injection markers found (by owner and index, never the text).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaks: Vec<LeakRecord>,
}

/// One canary, keyword or injection marker found, as the audit records it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeakRecord {
    /// `canary`, `keyword` or `marker`.
    pub kind: &'static str,
    /// The tenant the canary or keyword belongs to; the marker's label.
    pub owner: String,
    /// The pattern's position in the owner's `canaries` / `keywords` (or in the marker list).
    pub index: usize,
    /// `prompt` or `response`.
    pub r#where: &'static str,
    /// In the owner's record: the tenant whose traffic carried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_by: Option<String>,
}

impl LeakRecord {
    pub fn new(h: &crate::record::leaks::Hit, seen_by: Option<&str>) -> Self {
        Self {
            kind: h.kind.as_str(),
            owner: h.owner.to_string(),
            index: h.index,
            r#where: h.seen.as_str(),
            seen_by: seen_by.map(str::to_string),
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary; true when it was cut.
fn truncate(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let end = s.floor_char_boundary(max);
    s.truncate(end);
    true
}

impl AuditRecord {
    /// Bound every string a client can influence, so that a record's size is bounded.
    pub(super) fn bound(&mut self) {
        let route_max = if self.tenant == UNAUTHENTICATED {
            MAX_UNAUTHENTICATED_ROUTE
        } else {
            MAX_ROUTE
        };
        self.route_truncated |= truncate(&mut self.route, route_max);
        self.method_truncated |= truncate(&mut self.method, MAX_METHOD);
        truncate(&mut self.request_id, MAX_SHORT);
        truncate(&mut self.tenant, MAX_SHORT);
        for s in [
            &mut self.key_id,
            &mut self.client_request_id,
            &mut self.reason,
            &mut self.prompt_hash,
            &mut self.model,
            &mut self.served_model,
            &mut self.price_model,
        ]
        .into_iter()
        .flatten()
        {
            truncate(s, MAX_SHORT);
        }
    }
}

/// A prompt hash as the audit record writes it: the HMAC tag in lowercase hex.
pub fn hex_tag(tag: &hmac::Tag) -> String {
    let mut out = String::with_capacity(64);
    for b in tag.as_ref() {
        out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
        out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
    }
    out
}
