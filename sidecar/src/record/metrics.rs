//! Prometheus plumbing shared by every component's metrics: the label sets, the latency
//! buckets and the text encoding of the registry. Each component defines and registers its
//! own families (`auth::Metrics`, `limits::metrics`, `cache::Metrics`, ...);
//! [`crate::registry::Metrics`] puts them and the per-request families into one registry.
//! Tenant labels only ever carry configured tenant names, so cardinality is bounded by the
//! config.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantCode {
    pub tenant: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantKind {
    pub tenant: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CurrencyLabel {
    pub currency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLimit {
    pub tenant: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModel {
    pub tenant: String,
    /// A model named in the price tables, or `other`.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReason {
    pub tenant: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A canary or keyword of `owner` seen in `seen_by`'s traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeakLabel {
    pub owner: String,
    pub seen_by: String,
    pub r#where: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantMarker {
    pub tenant: String,
    pub marker: String,
}

/// What a limits decision made without its shared backend did (`local`, `deny`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Action {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// A per-tenant latency histogram family.
pub type HistFamily = Family<TenantLabel, Histogram, fn() -> Histogram>;

/// The buckets of every latency histogram.
pub fn latency_histogram() -> Histogram {
    // 100 us .. ~105 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
