//! `[cost]`: prices per million tokens, for `bulkhead_cost_total` and the audit log's `cost`.

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `model` label of a model the price tables do not name.
pub const OTHER_MODEL: &str = "other";
/// Models in one price table at most.
pub const MAX_PRICED_MODELS: usize = 256;

/// Prices per million tokens, in `cost.currency`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantPrices {
    pub models: BTreeMap<String, Price>,
    pub default: Option<Price>,
}

/// `[cost]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CostConfig {
    /// The unit of `bulkhead_cost_total` and the audit log's `cost` (documentation only).
    pub currency: String,
    pub models: BTreeMap<String, Price>,
    /// The price of models no table names (counted under `model="other"`).
    pub default: Option<Price>,
    pub tenants: BTreeMap<String, TenantPrices>,
    /// The price of one GPU-hour (optional): exported as `bulkhead_gpu_hour_price`, so a
    /// recording rule prices each tenant's GPU busy time (the node agent's
    /// `bulkhead_gpu_busy_seconds_total`) beside its tokens.
    pub gpu_hour_price: Option<f64>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            models: BTreeMap::new(),
            default: None,
            tenants: BTreeMap::new(),
            gpu_hour_price: None,
        }
    }
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

    /// [`CostConfig::check`] as a configuration error.
    pub fn validate(&self, tenants: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        self.check(tenants)
            .map_err(|(field, message)| invalid(field, message))
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
