//! What each request cost: prices per million input, cached input and output tokens per
//! model (`[cost.models.<model>]`), overridden per tenant (`[cost.tenants.<tenant>.models.<model>]`),
//! with an optional price for every other model (`[cost.default]`, labelled `other`). A
//! request is priced by the model that served it (the answer's `model`), then the request's
//! `model`, then the default. The cost of a request is its settled usage times its price,
//! counted in `bulkhead_cost_total{tenant,model}` and written in its audit record; an answer
//! no price applies to is counted in `bulkhead_cost_unpriced_total{tenant}`.

pub use crate::config::{CostConfig, OTHER_MODEL, Price, TenantPrices};
use crate::record::metrics::{CurrencyLabel, TenantLabel, TenantModel};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

/// A counter of cost in the configured currency.
pub type CostCounter = Counter<f64, AtomicU64>;

/// What requests cost, and the price of a GPU-hour.
#[derive(Clone, Default)]
pub struct Metrics {
    /// What requests cost (`[cost]` prices x usage), by tenant and priced model.
    pub cost: Family<TenantModel, CostCounter>,
    /// Answers with usage that no `[cost]` price applied to (tenants with prices).
    pub unpriced: Family<TenantLabel, Counter>,
    /// `cost.gpu_hour_price`, labelled with `cost.currency` (no series when unset).
    pub gpu_hour_price: Family<CurrencyLabel, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "cost",
            "What requests cost in cost.currency: usage x the [cost] price per million input, \
             cached input and output tokens, by tenant and model (a model the price tables do \
             not name is \"other\")",
            m.cost.clone(),
        );
        r.register(
            "cost_unpriced",
            "Answers with usage that no [cost] price applied to (neither the served model, nor \
             the request's model, nor a default; tenants with some price only)",
            m.unpriced.clone(),
        );
        r.register(
            "gpu_hour_price",
            "cost.gpu_hour_price: the price of one GPU-hour in cost.currency (recording rules \
             price each tenant's GPU busy time with it); no series when unset",
            m.gpu_hour_price.clone(),
        );
        m
    }

    /// Exports `cost.gpu_hour_price` (at start and on every reload).
    pub fn set_gpu_hour_price(&self, cost: &CostConfig) {
        self.gpu_hour_price.clear();
        if let Some(p) = cost.gpu_hour_price {
            self.gpu_hour_price
                .get_or_create(&CurrencyLabel {
                    currency: cost.currency.clone(),
                })
                .set(p);
        }
    }
}

/// What `t` costs at `price` (per million tokens; cached prompt tokens at `cached_input`,
/// `input` when it has none).
pub fn cost_of(price: &Price, t: Usage) -> f64 {
    let cached = t.cached.min(t.prompt);
    let fresh = t.prompt - cached;
    (fresh as f64 * price.input
        + cached as f64 * price.cached_input.unwrap_or(price.input)
        + t.completion as f64 * price.output)
        / 1e6
}

/// Tokens a request used, as settled (the answer's `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    /// Prompt tokens served from the prefix cache (part of `prompt`).
    pub cached: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
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

    /// Some price is configured for this tenant (a model's or the default).
    pub fn is_priced(&self) -> bool {
        !self.models.is_empty() || self.other.is_some()
    }

    /// Count what `tokens` cost at the price of the model that `served` them, else the one
    /// `requested`, else the default; the cost and the price's name (a model, or `other`),
    /// `None` when no price applies.
    pub fn charge(
        &self,
        served: Option<&str>,
        requested: Option<&str>,
        tokens: Usage,
    ) -> Option<Charged> {
        let named = |m: Option<&str>| {
            m.and_then(|m| self.models.get_key_value(m))
                .map(|(k, v)| (k.as_str(), v))
        };
        let (name, (price, counter)) = named(served)
            .or_else(|| named(requested))
            .or_else(|| self.other.as_ref().map(|o| (OTHER_MODEL, o)))?;
        let cost = cost_of(price, tokens);
        counter.inc_by(cost);
        Some(Charged {
            cost,
            price_model: name.to_string(),
        })
    }
}

/// What a request was charged.
#[derive(Debug, Clone, PartialEq)]
pub struct Charged {
    pub cost: f64,
    /// The price used: a model of the price tables, or `other` (`[cost.default]`).
    pub price_model: String,
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
        let m = Metrics::register(reg.sub_registry_with_prefix("bulkhead"));
        let u = Usage {
            prompt: 1_000_000,
            completion: 0,
            cached: 0,
        };
        let t = TenantCost::new(&c, "t", &m);
        let cost = |tc: &TenantCost, served: Option<&str>, requested: Option<&str>| {
            tc.charge(served, requested, u)
                .map(|c| (c.cost, c.price_model))
        };
        assert_eq!(cost(&t, None, Some("a")), Some((3.0, "a".into())));
        assert_eq!(cost(&t, None, Some("b")), Some((4.0, "b".into())));
        assert_eq!(cost(&t, None, Some("zzz")), Some((10.0, "other".into())));
        // The served model's price first, then the request's, then the default.
        assert_eq!(cost(&t, Some("a"), None), Some((3.0, "a".into())));
        assert_eq!(cost(&t, Some("b"), Some("a")), Some((4.0, "b".into())));
        assert_eq!(cost(&t, Some("zzz"), Some("a")), Some((3.0, "a".into())));
        assert_eq!(cost(&t, Some("zzz"), None), Some((10.0, "other".into())));
        let s = TenantCost::new(&c, "s", &m);
        assert_eq!(cost(&s, None, Some("a")), Some((1.0, "a".into())));
        assert_eq!(cost(&s, None, None), Some((10.0, "other".into())));
        assert!(t.is_priced() && s.is_priced());
        let text = crate::record::metrics::encode(&reg);
        assert!(
            text.contains(r#"bulkhead_cost_total{tenant="t",model="other"} 20.0"#),
            "{text}"
        );
        assert!(!text.contains("zzz"));
        let empty = TenantCost::new(&CostConfig::default(), "t", &m);
        assert_eq!(empty.charge(Some("a"), Some("a"), u), None);
        assert!(!empty.is_priced());
        // Only a model's price, no default: another model is unpriced.
        let only: CostConfig = toml::from_str("[models.a]\ninput = 1.0\noutput = 1.0\n").unwrap();
        let only = TenantCost::new(&only, "t", &m);
        assert!(only.is_priced());
        assert_eq!(only.charge(Some("b"), None, u), None);
    }

    #[test]
    fn the_gpu_hour_price_is_exported_in_its_currency_only_when_set_and_checked() {
        let mut reg = prometheus_client::registry::Registry::default();
        let m = Metrics::register(reg.sub_registry_with_prefix("bulkhead"));
        let c: CostConfig = toml::from_str("currency = \"EUR\"\ngpu_hour_price = 2.5\n").unwrap();
        assert_eq!(c.check(&|_| true), Ok(()));
        m.set_gpu_hour_price(&c);
        let text = crate::record::metrics::encode(&reg);
        assert!(
            text.contains(r#"bulkhead_gpu_hour_price{currency="EUR"} 2.5"#),
            "{text}"
        );
        // A reload without it leaves no series.
        m.set_gpu_hour_price(&CostConfig::default());
        assert!(!crate::record::metrics::encode(&reg).contains("bulkhead_gpu_hour_price{"));
        for bad in ["-1.0", "nan", "1e7"] {
            let c: CostConfig = toml::from_str(&format!("gpu_hour_price = {bad}\n")).unwrap();
            assert_eq!(
                c.check(&|_| true).unwrap_err().0,
                "cost.gpu_hour_price",
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_shows_how_many_prices_never_their_counters() {
        let c = TenantCost {
            models: HashMap::new(),
            other: None,
        };
        assert_eq!(format!("{c:?}"), "TenantCost { models: 0, other: false }");
    }
}
