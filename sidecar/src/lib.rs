//! bulkhead-sidecar: authenticated, rate-limited, fair, metered proxy for OpenAI-compatible
//! inference servers.
#![forbid(unsafe_code)]

pub mod config;
pub mod digest;
pub mod limits;
pub mod signature;
