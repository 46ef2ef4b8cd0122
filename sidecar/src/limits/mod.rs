//! How much a tenant may use: the per-replica limits ([`local`]), the token-fair queue
//! ([`wfq`]) and the limits shared by replicas over Redis ([`shared`]).
pub mod local;
pub mod metrics;
pub mod shared;
pub mod wfq;
