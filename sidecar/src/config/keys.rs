//! `[[keys]]`: the HMAC keys of RFC 9421 signatures, the tenants each may assert and its scope.

use super::{Config, ConfigError, KeyEncoding, invalid, read_key_file_as};
use crate::auth::scope::{Scope, ScopeConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    /// Files holding the secret (several for rotation: any one verifies).
    pub secret_files: Vec<PathBuf>,
    /// `base64` (default) or `raw`.
    pub encoding: String,
    /// Tenants this key may assert; `*` for a gateway key.
    pub tenants: Vec<String>,
    /// What requests signed with this key may ask for (`[keys.scope]`); everything when absent.
    pub scope: ScopeConfig,
}

/// `id`, `secret_files` and `tenants` have no default: validation requires them.
impl Default for KeyConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            secret_files: Vec::new(),
            encoding: "base64".into(),
            tenants: Vec::new(),
            scope: ScopeConfig::default(),
        }
    }
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

impl KeyConfig {
    /// `keys[i]`; `earlier`: the entries before it (entries sharing an id are one key).
    pub fn validate(
        &self,
        i: usize,
        earlier: &[KeyConfig],
        tenants: &dyn Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        let f = |x: &str| format!("keys[{i}].{x}");
        if self.id.is_empty() || self.id.len() > 128 {
            return Err(invalid(f("id"), "must be 1-128 characters"));
        }
        if self.secret_files.is_empty() {
            return Err(invalid(f("secret_files"), "at least one file is required"));
        }
        if self.encoding != "base64" && self.encoding != "raw" {
            return Err(invalid(f("encoding"), "must be \"base64\" or \"raw\""));
        }
        if self.tenants.is_empty() {
            return Err(invalid(f("tenants"), "list the tenants, or \"*\" for any"));
        }
        for t in &self.tenants {
            if t != "*" && !tenants(t) {
                return Err(invalid(f("tenants"), format!("unknown tenant {t:?}")));
            }
        }
        Scope::from_config(&self.scope)
            .map_err(|e| invalid(f(&format!("scope.{}", e.field)), e.message))?;
        // Entries sharing an id are one key: they must not disagree on its scope.
        if let Some(first) = earlier.iter().find(|o| o.id == self.id)
            && first.scope != self.scope
        {
            return Err(invalid(
                f("scope"),
                format!("differs from an earlier entry with id {:?}", self.id),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Read every key file. Called at start and on reload, so a bad key file rejects the reload.
    pub fn load_keys(&self) -> Result<Vec<LoadedKey>, ConfigError> {
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            let mut secrets = Vec::new();
            for (j, p) in k.secret_files.iter().enumerate() {
                let field = format!("keys[{i}].secret_files[{j}]");
                let encoding = if k.encoding == "raw" {
                    KeyEncoding::Raw
                } else {
                    KeyEncoding::Base64
                };
                let secret = read_key_file_as(p, &field, encoding)?;
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
}
