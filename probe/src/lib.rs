//! bulkhead-probe: isolation smoke tests against a live Bulkhead deployment, run with two test
//! tenants' credentials (A and B), as an operator would try to break in:
//!
//! - `signed_accepted`: both test tenants' signed requests are served (else nothing below
//!   means anything);
//! - `unsigned`, `tampered`, `replayed`, `cross_tenant_key`: an unsigned request, a body
//!   changed after signing, a signed request sent twice, and A's key claiming tenant B are
//!   refused (401 with the matching code);
//! - `client_salt_ignored`: B's fresh prompt sent with two different client `cache_salt`
//!   values still hits the prefix cache the second time (the client's salt never reaches the
//!   server), with a same-salt repeat as the control;
//! - `cross_tenant_cache`: B sending A's fresh prompt is no faster than B's miss on another
//!   fresh prompt, with A's own repeat as the control (it must hit);
//! - `canary_not_returned`, `canary_prompt_blocked` (with a canary of A): A's planted canary
//!   never comes back to B, streamed or not, as a client reads the answer (SSE events decoded
//!   and reassembled per choice and field by [`sse`]) nor, with the sidecar's metrics, in the
//!   sidecar's own count of canaries in responses; B's prompt holding it is refused (403
//!   `canary_blocked`) or counted;
//! - `tagged_bytes` (with the agent's metrics URL): the agent's byte counter of A grows.
//!
//! Timing checks compare medians over `timing.samples` fresh prompts: a time to first token
//! below `timing.hit_ratio` x the miss median is a hit.
//!
//! [`run_probe`] runs them and returns a [`Report`] (exit code, Prometheus text).
#![forbid(unsafe_code)]

pub mod checks;
pub mod client;
pub mod config;
pub mod report;
pub mod sse;

pub use checks::{CHECKS, run_probe};
pub use config::{ConfigError, ProbeConfig, RawConfig};
pub use report::{CheckResult, Outcome, Report, exit, write_textfile};

/// PUT `report` to a Pushgateway at `base` (`http://host:9091`), grouped by job
/// `bulkhead_probe` and, when given, `instance`.
pub async fn push(
    cfg: &ProbeConfig,
    base: &str,
    instance: Option<&str>,
    report: &Report,
) -> Result<(), client::HttpError> {
    let mut url = format!("{}/metrics/job/bulkhead_probe", base.trim_end_matches('/'));
    if let Some(i) = instance {
        url.push_str(&grouping_label("instance", i));
    }
    let http = client::Http::new(cfg);
    let status = http.put(&url, report.to_prometheus()).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(client::HttpError::Transport(format!(
            "{url}: the Pushgateway answered {status}"
        )))
    }
}

/// `/name/value` of a Pushgateway grouping key: base64url (`name@base64`) where the value holds
/// a `/` or is empty (the Pushgateway's only way for those), percent-encoded otherwise.
fn grouping_label(name: &str, value: &str) -> String {
    use base64::Engine;
    if value.is_empty() {
        format!("/{name}@base64/=")
    } else if value.contains('/') {
        let v = base64::engine::general_purpose::URL_SAFE.encode(value);
        format!("/{name}@base64/{v}")
    } else {
        format!("/{name}/{}", percent_encode(value))
    }
}

/// Percent-encode a path segment (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::grouping_label;

    #[test]
    fn grouping_labels() {
        assert_eq!(grouping_label("instance", "vllm-0"), "/instance/vllm-0");
        assert_eq!(grouping_label("instance", "a b:1"), "/instance/a%20b%3A1");
        // base64url of "ns/vllm"
        assert_eq!(
            grouping_label("instance", "ns/vllm"),
            "/instance@base64/bnMvdmxsbQ=="
        );
        assert_eq!(grouping_label("instance", ""), "/instance@base64/=");
    }
}
