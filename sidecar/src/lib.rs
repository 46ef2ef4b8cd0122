//! bulkhead-sidecar: authenticated, rate-limited, fair, metered proxy for OpenAI-compatible
//! inference servers.
//!
//! Entry points: [`run`] / [`run_with`] serve the proxy and admin listeners the caller binds;
//! [`signature::sign_request`] signs a request as the trusted gateway does. The simulated
//! inference server and the benchmark live in the `bulkhead-sim` crate.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod cost;
pub mod digest;
pub mod http_util;
pub mod isolation;
pub mod jwt;
pub mod kv;
pub mod leaks;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod responses;
pub mod runtime;
pub mod schema;
pub mod scope;
pub mod seal;
pub mod server;
pub mod shared_limits;
pub mod signature;
pub mod tagging;
pub mod telemetry;
pub mod upstream;
pub mod wfq;

pub use config::Config;
pub use server::{Options, SidecarError, run, run_with};
