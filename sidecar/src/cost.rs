//! What each request cost: prices per million input, cached input and output tokens per
//! model (`[cost.models.<model>]`), overridden per tenant (`[cost.tenants.<tenant>.models.<model>]`),
//! with an optional price for every other model (`[cost.default]`, labelled `other`). The
//! cost of a request is its settled usage times its price, counted in
//! `bulkhead_cost_total{tenant,model}` and written in its audit record.

pub use crate::config::{CostConfig, OTHER_MODEL, Price, TenantPrices};
use crate::metrics::{Metrics, TenantModel};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

/// A counter of cost in the configured currency.
pub type CostCounter = Counter<f64, AtomicU64>;

/// What `t` costs at `price` (per million tokens; cached prompt tokens at `cached_input`,
/// `input` when it has none).
pub fn cost_of(price: &Price, t: Tokens) -> f64 {
    let cached = t.cached.min(t.prompt);
    let fresh = t.prompt - cached;
    (fresh as f64 * price.input
        + cached as f64 * price.cached_input.unwrap_or(price.input)
        + t.completion as f64 * price.output)
        / 1e6
}

/// Tokens a request used, as settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    /// Prompt tokens served from the prefix cache (part of `prompt`).
    pub cached: u64,
    pub completion: u64,
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

    /// Count what `tokens` of `model` cost; `None` when no price applies.
    pub fn charge(&self, model: Option<&str>, tokens: Tokens) -> Option<f64> {
        let (price, counter) = model
            .and_then(|m| self.models.get(m))
            .or(self.other.as_ref())?;
        let cost = cost_of(price, tokens);
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
        let u = Tokens {
            prompt: 1_000_000,
            completion: 500_000,
            cached: 400_000,
        };
        assert!((cost_of(&p, u) - (0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0)).abs() < 1e-12);
        let no_cached = Price {
            cached_input: None,
            ..p
        };
        assert!((cost_of(&no_cached, u) - (2.0 + 4.0)).abs() < 1e-12);
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
        let u = Tokens {
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
