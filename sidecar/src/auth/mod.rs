//! Who is asking: RFC 9421 HTTP message signatures and their replay cache ([`signature`]),
//! JWTs against a JWKS ([`jwt`]), the Content-Digest check ([`digest`]) and what a credential
//! may use ([`scope`]).
pub mod digest;
pub mod jwt;
mod metrics;
pub mod scope;
pub mod signature;

pub use metrics::Metrics;
