//! What happened and who pays: the Prometheus plumbing every component's metrics share
//! ([`metrics`]; [`crate::registry`] registers them all), prices ([`cost`]), the
//! chained audit log ([`audit`]) and its seal ([`seal`]), and cross-tenant leak detection
//! ([`leaks`]).
pub mod audit;
pub mod cost;
pub mod leaks;
pub mod metrics;
pub mod seal;
