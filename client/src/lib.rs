//! What a client of `bulkhead-sidecar` needs, and what the sidecar shares with its clients:
//! RFC 9421 request signing ([`signature::sign_request`]) with the signature base
//! construction the sidecar's verifier uses too, the RFC 9530 `Content-Digest` a signed body
//! carries ([`digest`]), and the wire constants below.
//!
//! No async runtime, no HTTP client: the probe, the simulator's benchmark and the stack tests
//! sign `http` requests with it and send them with their own clients.

pub mod digest;
pub mod signature;

pub use signature::{SignOptions, SignatureError, sign_request};

/// The header naming the tenant; the signature must cover it.
pub const TENANT_HEADER: &str = "x-bulkhead-tenant";
/// Every client header with this prefix is removed by the sidecar unless the signature covers
/// it (a signer covers each one present).
pub const RESERVED_PREFIX: &str = "x-bulkhead-";
/// The one signature algorithm (`alg` parameter) the sidecar accepts.
pub const ALG: &str = "hmac-sha256";
/// The signature label a signer uses unless told otherwise (the sidecar's default
/// `[auth] signature_label`).
pub const DEFAULT_LABEL: &str = "bulkhead";
