//! One of each test harness, for the workspace's tests (a dev-dependency only):
//!
//! - [`sidecar`]: requests signed as a gateway signs them, the built `bulkhead-sidecar`
//!   binary started on a config file and awaited ([`sidecar::SidecarProcess`]);
//!   [`in_process`] (feature `in-process`) runs it in the test's runtime instead;
//! - [`http`]: a plain GET, a metric read from a scrape, readiness and metrics polled with a
//!   deadline, and a tiny fake HTTP server that records what it was sent ([`http::Fake`]);
//! - [`agent`]: a fake node agent speaking the real tagging protocol, recording its calls and
//!   KV reports;
//! - [`skip`]: the rule for a test that cannot run here (a visible skip, a failure under CI).
//!
//! The simulator is `bulkhead_sim::SimHandle::start` (re-exported as [`sim`]).

pub mod agent;
pub mod http;
#[cfg(feature = "in-process")]
pub mod in_process;
pub mod sidecar;
pub mod skip;

pub use bulkhead_sim as sim;

/// A free port on 127.0.0.1 (bound, then released for a child process to bind; a caller that
/// can lose the race retries with another).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Unix seconds now (a signature's `created`).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Write `key` base64-encoded to `path`, as a Kubernetes Secret mounts a key file.
pub fn write_key(path: &std::path::Path, key: &[u8]) {
    use base64::Engine;
    std::fs::write(path, base64::engine::general_purpose::STANDARD.encode(key)).unwrap();
}
