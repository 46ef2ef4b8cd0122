//! bulkhead-sidecar: authenticated, rate-limited, fair, metered proxy for OpenAI-compatible
//! inference servers.
//!
//! Entry points: [`run`] / [`run_with`] serve the proxy and admin listeners the caller binds;
//! [`auth::signature::sign_request`] signs a request as the trusted gateway does. The simulated
//! inference server and the benchmark live in the `bulkhead-sim` crate.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
pub mod config;
pub mod http_util;
pub mod limits;
pub mod node;
pub mod proxy;
pub mod record;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod telemetry;

pub use config::Config;
pub use server::{Options, SidecarError, run, run_with};
