//! The binary's `sign` and `check-config` subcommands; a request signed by the CLI passes.

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-sidecar");

#[tokio::test]
async fn cli_signature_is_accepted() {
    let h = Harness::start(DEFAULT_TENANTS).await;
    let body = chat("from the cli", "");
    let body_file = h.dir.path().join("body.json");
    std::fs::write(&body_file, &body).unwrap();
    let out = Command::new(BIN)
        .args([
            "sign",
            "--key-id",
            "gw",
            "--tenant",
            "acme",
            "--path",
            "/v1/chat/completions",
        ])
        .arg("--key-file")
        .arg(h.dir.path().join("gw.key"))
        .arg("--body-file")
        .arg(&body_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = h.url("/v1/chat/completions");
    for line in text.lines() {
        let (k, v) = line.split_once(": ").unwrap();
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    for k in [
        "signature",
        "signature-input",
        "content-digest",
        "x-bulkhead-tenant",
    ] {
        assert!(req.headers().contains_key(k), "{k} missing in {text}");
    }
    assert!(!text.contains("gateway-secret"));
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let key = dir.path().join("k");
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[tenants.acme]\n[[keys]]\nid = \"gw\"\nsecret_files = [\"{}\"]\ntenants = [\"*\"]\n",
        key.display()
    );
    std::fs::write(&good, &text).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("[tenants.acme]", "[tenants.acme]\nweight = 0"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenants.acme.weight"));
    // The embedded example parses.
    let out = Command::new(BIN).arg("example-config").output().unwrap();
    assert!(out.status.success());
    bulkhead_sidecar::Config::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
}
