//! The probe's configuration: a small TOML file ([`RawConfig`], every field optional so flags
//! can supply or override any of them) turned into a validated [`ProbeConfig`].

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused (`Invalid` names the field as written in the TOML file, or
/// the flag that set it).
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

/// One test tenant as written in the file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// The tenant's name (the `x-bulkhead-tenant` header).
    pub name: Option<String>,
    /// The key id the sidecar knows the key by (`[[keys]] id`).
    pub key_id: Option<String>,
    /// A file holding the base64 of the key's secret bytes (as the sidecar's key files).
    pub key_file: Option<PathBuf>,
}

/// Timing-probe settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTiming {
    pub samples: Option<usize>,
    pub prompt_words: Option<usize>,
    pub hit_ratio: Option<f64>,
}

/// The file as written: every field optional (flags may give it instead).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The sidecar's API, `http://host:port`.
    pub target: Option<String>,
    /// The model to ask for; discovered from `/v1/models` when absent.
    pub model: Option<String>,
    pub tenant_a: Option<RawTenant>,
    pub tenant_b: Option<RawTenant>,
    /// A file holding a canary of tenant A (one line); enables the canary checks.
    pub canary_file: Option<PathBuf>,
    /// The sidecar's metrics (`http://host:9465/metrics`): `canary_prompt_blocked` looks for
    /// its count of the canary in B's prompt, `canary_not_returned` fails when its count of
    /// canaries in responses rises during the check.
    pub sidecar_metrics_url: Option<String>,
    /// The node agent's metrics on the sidecar's node (`http://host:9464/metrics`).
    pub agent_metrics_url: Option<String>,
    /// The whole run at most (seconds).
    pub timeout_secs: Option<u64>,
    /// One request at most (seconds).
    pub request_timeout_secs: Option<u64>,
    /// Tokens asked for in the canary checks (the model's chance to repeat a leaked canary).
    pub canary_max_tokens: Option<u32>,
    pub timing: Option<RawTiming>,
}

impl RawConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Check every field and read the key and canary files.
    pub fn finish(self) -> Result<ProbeConfig, ConfigError> {
        let target = self
            .target
            .ok_or_else(|| invalid("target", "required (or --target)"))?;
        let target = base_url("target", &target)?;
        let model = match self.model {
            Some(m) if m.trim().is_empty() => return Err(invalid("model", "must not be empty")),
            m => m,
        };
        let tenant_a = tenant("tenant_a", "--a", self.tenant_a.unwrap_or_default())?;
        let tenant_b = tenant("tenant_b", "--b", self.tenant_b.unwrap_or_default())?;
        if tenant_a.name == tenant_b.name {
            return Err(invalid(
                "tenant_b.name",
                "must differ from tenant_a.name: the probe needs two tenants",
            ));
        }
        let canary = match &self.canary_file {
            None => None,
            Some(p) => Some(read_canary(p)?),
        };
        let sidecar_metrics_url = self
            .sidecar_metrics_url
            .map(|u| metrics_url("sidecar_metrics_url", &u))
            .transpose()?;
        let agent_metrics_url = self
            .agent_metrics_url
            .map(|u| metrics_url("agent_metrics_url", &u))
            .transpose()?;
        let timeout_secs = self.timeout_secs.unwrap_or(600);
        if !(1..=86_400).contains(&timeout_secs) {
            return Err(invalid("timeout_secs", "must be within 1..=86400"));
        }
        let request_timeout_secs = self.request_timeout_secs.unwrap_or(120);
        if !(1..=3_600).contains(&request_timeout_secs) {
            return Err(invalid("request_timeout_secs", "must be within 1..=3600"));
        }
        let canary_max_tokens = self.canary_max_tokens.unwrap_or(64);
        if !(1..=4096).contains(&canary_max_tokens) {
            return Err(invalid("canary_max_tokens", "must be within 1..=4096"));
        }
        let t = self.timing.unwrap_or_default();
        let samples = t.samples.unwrap_or(5);
        if !(1..=50).contains(&samples) {
            return Err(invalid("timing.samples", "must be within 1..=50"));
        }
        let prompt_words = t.prompt_words.unwrap_or(1024);
        if !(64..=100_000).contains(&prompt_words) {
            return Err(invalid("timing.prompt_words", "must be within 64..=100000"));
        }
        let hit_ratio = t.hit_ratio.unwrap_or(0.5);
        if !(hit_ratio.is_finite() && hit_ratio > 0.0 && hit_ratio < 1.0) {
            return Err(invalid(
                "timing.hit_ratio",
                "must be above 0 and below 1 (a hit is faster than hit_ratio x the miss median)",
            ));
        }
        Ok(ProbeConfig {
            target,
            model,
            tenant_a,
            tenant_b,
            canary,
            sidecar_metrics_url,
            agent_metrics_url,
            timeout: Duration::from_secs(timeout_secs),
            request_timeout: Duration::from_secs(request_timeout_secs),
            canary_max_tokens,
            timing: Timing {
                samples,
                prompt_words,
                hit_ratio,
            },
        })
    }
}

/// A test tenant's credentials, read and checked.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantCreds {
    pub name: String,
    pub key_id: String,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TenantCreds {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCreds")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Timing-probe settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Samples per timing check (each a fresh prompt; the medians are compared).
    pub samples: usize,
    /// Words per probe prompt.
    pub prompt_words: usize,
    /// A time to first token below `hit_ratio` x the miss median counts as a cache hit.
    pub hit_ratio: f64,
}

/// The probe's configuration, checked, with the key and canary files read.
#[derive(Clone)]
pub struct ProbeConfig {
    /// `http://host:port`, no trailing slash.
    pub target: String,
    pub model: Option<String>,
    pub tenant_a: TenantCreds,
    pub tenant_b: TenantCreds,
    /// A canary of tenant A (a secret marker string).
    pub canary: Option<String>,
    pub sidecar_metrics_url: Option<String>,
    pub agent_metrics_url: Option<String>,
    pub timeout: Duration,
    pub request_timeout: Duration,
    pub canary_max_tokens: u32,
    pub timing: Timing,
}

impl std::fmt::Debug for ProbeConfig {
    // Never print the canary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeConfig")
            .field("target", &self.target)
            .field("model", &self.model)
            .field("tenant_a", &self.tenant_a)
            .field("tenant_b", &self.tenant_b)
            .field("canary", &self.canary.as_ref().map(|_| "<redacted>"))
            .field("sidecar_metrics_url", &self.sidecar_metrics_url)
            .field("agent_metrics_url", &self.agent_metrics_url)
            .field("timeout", &self.timeout)
            .field("request_timeout", &self.request_timeout)
            .field("canary_max_tokens", &self.canary_max_tokens)
            .field("timing", &self.timing)
            .finish()
    }
}

impl ProbeConfig {
    /// Parse and check a TOML text (key and canary files are read).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        RawConfig::from_toml(text)?.finish()
    }
}

/// `http://authority` with an optional trailing slash; returned without it.
fn base_url(field: &str, s: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| invalid(field, format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            field,
            "must be an http:// URL (https is not supported: run the probe next to the sidecar)",
        ));
    }
    if uri.authority().is_none() {
        return Err(invalid(field, "has no host"));
    }
    if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
        return Err(invalid(field, "must be http://host:port, without a path"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// A full `http://` URL; `/metrics` when it has no path.
fn metrics_url(field: &str, s: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| invalid(field, format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(invalid(field, "must be an http://host:port/path URL"));
    }
    if matches!(uri.path(), "" | "/") && uri.query().is_none() {
        return Ok(format!("{}/metrics", s.trim_end_matches('/')));
    }
    Ok(s.to_string())
}

fn tenant(section: &str, flag: &str, t: RawTenant) -> Result<TenantCreds, ConfigError> {
    let f = |k: &str| format!("{section}.{k}");
    let name = t
        .name
        .ok_or_else(|| invalid(f("name"), format!("required (or {flag}-tenant)")))?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            f("name"),
            "must be a non-empty tenant name (letters, digits, '-', '_', '.')",
        ));
    }
    let key_id = t
        .key_id
        .ok_or_else(|| invalid(f("key_id"), format!("required (or {flag}-key-id)")))?;
    if key_id.is_empty() || http::HeaderValue::from_str(&key_id).is_err() || key_id.contains('"') {
        return Err(invalid(f("key_id"), "must be a non-empty printable key id"));
    }
    let path = t
        .key_file
        .ok_or_else(|| invalid(f("key_file"), format!("required (or {flag}-key-file)")))?;
    let key = read_key(&f("key_file"), &path)?;
    Ok(TenantCreds { name, key_id, key })
}

/// A key file: the base64 of the secret bytes (surrounding whitespace ignored), >= 16 bytes.
pub fn read_key(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use base64::Engine;
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| invalid(field, format!("{} is not valid base64", path.display())))?;
    if key.len() < 16 {
        return Err(invalid(field, "secret shorter than 16 bytes"));
    }
    Ok(key)
}

fn read_canary(path: &Path) -> Result<String, ConfigError> {
    let field = "canary_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let canary = text.trim();
    if canary.len() < 8 {
        return Err(invalid(
            field,
            "the canary must be at least 8 characters (a rare string nobody types by chance)",
        ));
    }
    if canary.contains('\n') {
        return Err(invalid(field, "must hold one canary on one line"));
    }
    Ok(canary.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn files() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        std::fs::write(
            d.path().join("a.key"),
            b64.encode(b"probe-a-secret-0123456789abcdef"),
        )
        .unwrap();
        std::fs::write(
            d.path().join("b.key"),
            b64.encode(b"probe-b-secret-0123456789abcdef"),
        )
        .unwrap();
        std::fs::write(d.path().join("short.key"), b64.encode(b"short")).unwrap();
        std::fs::write(d.path().join("bad.key"), "not base64 !!").unwrap();
        std::fs::write(d.path().join("canary"), "  BHCANARY-7f3a9c2e1d  \n").unwrap();
        d
    }

    fn text(d: &Path, extra: &str) -> String {
        format!(
            r#"
target = "http://127.0.0.1:8080/"
{extra}
[tenant_a]
name = "probe-a"
key_id = "probe-a-key"
key_file = "{a}"
[tenant_b]
name = "probe-b"
key_id = "probe-b-key"
key_file = "{b}"
"#,
            a = d.join("a.key").display(),
            b = d.join("b.key").display()
        )
    }

    fn err(t: &str) -> (String, String) {
        match ProbeConfig::from_toml(t) {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_files() {
        let d = files();
        let c = ProbeConfig::from_toml(&text(d.path(), "")).unwrap();
        assert_eq!(c.target, "http://127.0.0.1:8080");
        assert_eq!(c.tenant_a.key, b"probe-a-secret-0123456789abcdef");
        assert_eq!(c.timing.samples, 5);
        assert_eq!(c.timing.prompt_words, 1024);
        assert_eq!(c.timing.hit_ratio, 0.5);
        assert_eq!(c.timeout, Duration::from_secs(600));
        assert!(c.canary.is_none() && c.model.is_none());
        // Debug output never holds the key.
        assert!(!format!("{c:?}").contains("secret"));
        let extra = format!(
            "canary_file = \"{}\"\nagent_metrics_url = \"http://10.0.0.1:9464\"\n",
            d.path().join("canary").display()
        );
        let c = ProbeConfig::from_toml(&text(d.path(), &extra)).unwrap();
        assert_eq!(c.canary.as_deref(), Some("BHCANARY-7f3a9c2e1d"));
        assert_eq!(
            c.agent_metrics_url.as_deref(),
            Some("http://10.0.0.1:9464/metrics")
        );
        assert!(!format!("{c:?}").contains("BHCANARY"));
    }

    #[test]
    fn errors_name_the_field() {
        let d = files();
        let t = text(d.path(), "");
        assert!(matches!(
            ProbeConfig::from_toml(&format!("bogus = 1\n{t}")),
            Err(ConfigError::Parse(m)) if m.contains("bogus")
        ));
        assert_eq!(err(&t.replace("http://", "https://")).0, "target");
        assert_eq!(err(&t.replace(":8080/", ":8080/v1")).0, "target");
        assert_eq!(
            err(&t.replace("\"probe-b\"", "\"probe-a\"")).0,
            "tenant_b.name"
        );
        assert_eq!(err(&t.replace("b.key", "short.key")).0, "tenant_b.key_file");
        assert_eq!(err(&t.replace("a.key", "bad.key")).0, "tenant_a.key_file");
        assert_eq!(
            err(&t.replace("a.key", "missing.key")).0,
            "tenant_a.key_file"
        );
        let no_key_id = t.replace("key_id = \"probe-a-key\"\n", "");
        assert_eq!(err(&no_key_id).0, "tenant_a.key_id");
        for (extra, field) in [
            ("[timing]\nsamples = 0", "timing.samples"),
            ("[timing]\nhit_ratio = 1.5", "timing.hit_ratio"),
            ("[timing]\nprompt_words = 3", "timing.prompt_words"),
            ("timeout_secs = 0", "timeout_secs"),
            ("sidecar_metrics_url = \"ftp://x\"", "sidecar_metrics_url"),
            ("canary_file = \"/nonexistent/canary\"", "canary_file"),
            ("model = \" \"", "model"),
        ] {
            // [timing] must come after the top-level keys: append it.
            let t = if extra.starts_with('[') {
                format!("{t}{extra}\n")
            } else {
                text(d.path(), extra)
            };
            assert_eq!(err(&t).0, field, "{extra}");
        }
        let (f, m) = err("[tenant_a]\nname = \"a\"\n");
        assert_eq!((f.as_str(), m.contains("--target")), ("target", true));
    }
}
