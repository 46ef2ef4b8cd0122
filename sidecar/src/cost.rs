//! What each request cost: prices per million input, cached input and output tokens per
//! model (`[cost.models.<model>]`), overridden per tenant (`[cost.tenants.<tenant>.models.<model>]`),
//! with an optional price for every other model (`[cost.default]`, labelled `other`). The
//! cost of a request is its settled usage times its price, counted in
//! `bulkhead_cost_total{tenant,model}` and written in its audit record.

use crate::metrics::{Metrics, TenantModel};
use crate::proxy::Usage;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;

/// The `model` label of a model the price tables do not name.
pub const OTHER_MODEL: &str = "other";
/// Models in one price table at most.
pub const MAX_PRICED_MODELS: usize = 256;

/// A counter of cost in the configured currency.
pub type CostCounter = Counter<f64, AtomicU64>;

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
    /// The cost of `u` at this price.
    pub fn of(&self, u: Usage) -> f64 {
        let cached = u.cached.min(u.prompt);
        let fresh = u.prompt - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + u.completion as f64 * self.output)
            / 1e6
    }

    fn check(&self, field: &str) -> Result<(), (String, String)> {
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

/// One tenant's resolved prices, each with its counter looked up once.
#[derive(Clone, Default)]
pub struct TenantCost {
    models: HashMap<String, (Price, CostCounter)>,
    other: Option<(Price, CostCounter)>,
}

impl std::fmt::Debug for TenantCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCost")
            .field("models", &self.models.len())
            .field("other", &self.other.is_some())
            .finish()
    }
}

impl TenantCost {
    /// `tenant`'s prices under `c`: its own per model, then the shared per model, then its
    /// own default, then the shared default.
    pub fn new(c: &CostConfig, tenant: &str, metrics: &Metrics) -> TenantCost {
        let own = c.tenants.get(tenant);
        let counter = |model: &str| {
            metrics
                .cost
                .get_or_create(&TenantModel {
                    tenant: tenant.to_string(),
                    model: model.to_string(),
                })
                .clone()
        };
        let mut models = HashMap::new();
        let names = c
            .models
            .keys()
            .chain(own.into_iter().flat_map(|o| o.models.keys()));
        for m in names {
            if models.contains_key(m) {
                continue;
            }
            let price = own
                .and_then(|o| o.models.get(m))
                .or_else(|| c.models.get(m))
                .or_else(|| own.and_then(|o| o.default.as_ref()))
                .or(c.default.as_ref());
            if let Some(p) = price {
                models.insert(m.clone(), (*p, counter(m)));
            }
        }
        let other = own
            .and_then(|o| o.default)
            .or(c.default)
            .map(|p| (p, counter(OTHER_MODEL)));
        TenantCost { models, other }
    }

    /// Count what `usage` of `model` cost; `None` when no price applies.
    pub fn charge(&self, model: Option<&str>, usage: Usage) -> Option<f64> {
        let (price, counter) = model
            .and_then(|m| self.models.get(m))
            .or(self.other.as_ref())?;
        let cost = price.of(usage);
        counter.inc_by(cost);
        Some(cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_usage_times_price_per_million() {
        let p = Price {
            input: 2.0,
            cached_input: Some(0.5),
            output: 8.0,
        };
        let u = Usage {
            prompt: 1_000_000,
            completion: 500_000,
            cached: 400_000,
        };
        assert!((p.of(u) - (0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0)).abs() < 1e-12);
        let no_cached = Price {
            cached_input: None,
            ..p
        };
        assert!((no_cached.of(u) - (2.0 + 4.0)).abs() < 1e-12);
    }

    #[test]
    fn tenant_prices_override_shared_ones_and_labels_stay_bounded() {
        let c: CostConfig = toml::from_str(
            r#"
[models.a]
input = 1.0
output = 2.0
[default]
input = 10.0
output = 10.0
[tenants.t.models.a]
input = 3.0
output = 3.0
[tenants.t.models.b]
input = 4.0
output = 4.0
"#,
        )
        .unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let m = Metrics::register(&mut reg);
        let u = Usage {
            prompt: 1_000_000,
            completion: 0,
            cached: 0,
        };
        let t = TenantCost::new(&c, "t", &m);
        assert_eq!(t.charge(Some("a"), u), Some(3.0));
        assert_eq!(t.charge(Some("b"), u), Some(4.0));
        assert_eq!(t.charge(Some("zzz"), u), Some(10.0));
        let s = TenantCost::new(&c, "s", &m);
        assert_eq!(s.charge(Some("a"), u), Some(1.0));
        assert_eq!(s.charge(None, u), Some(10.0));
        let text = crate::metrics::encode(&reg);
        assert!(
            text.contains(r#"bulkhead_cost_total{tenant="t",model="other"} 10.0"#),
            "{text}"
        );
        assert!(!text.contains("zzz"));
        let empty = TenantCost::new(&CostConfig::default(), "t", &m);
        assert_eq!(empty.charge(Some("a"), u), None);
    }
}
