//! Reload on SIGHUP (its own test binary: the signal goes to the whole process).

mod common;
use common::*;
use http::{Method, StatusCode};
use std::time::Duration;

#[tokio::test]
async fn sighup_reloads() {
    let opts = bulkhead_sidecar::Options {
        sighup: true,
        // Far longer than the test: only the signal can trigger this reload.
        reload_poll: Duration::from_secs(3600),
        ..Default::default()
    };
    let h = Harness::start_opts(DEFAULT_TENANTS, Default::default(), |_| {}, opts).await;
    let original = std::fs::read_to_string(&h.config_path).unwrap();
    let limited = original.replace(
        "[tenants.acme]\nweight = 1",
        "[tenants.acme]\nweight = 1\nrequests_per_minute = 1",
    );
    assert_ne!(limited, original);
    h.write_config(&limited);
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let send = || h.signed("acme", Method::GET, "/v1/models", "");
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    assert_eq!(
        h.send_collect(send()).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.shutdown().await;
}
