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

/// An audit hash key file that is empty (or under 16 bytes) stops the sidecar at start, naming
/// the field: an empty key would make prompt hashes anyone can recompute.
#[test]
fn a_short_audit_hash_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    for (content, why) in [("", "empty"), ("MDEyMzQ1Njc4OWFiY2Rl\n", "15 bytes")] {
        let hash_key = dir.path().join("hash");
        std::fs::write(&hash_key, content).unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[upstream]\nurl = \"http://127.0.0.1:1\"\n[listen]\naddr = \"127.0.0.1:0\"\n\
                 admin_addr = \"127.0.0.1:0\"\n[audit]\ndir = \"{}\"\nhash_key_file = \"{}\"\n\
                 [tenants.acme]\n[[keys]]\nid = \"gw\"\nsecret_files = [\"{}\"]\ntenants = [\"*\"]\n",
                dir.path().display(),
                hash_key.display(),
                key.display()
            ),
        )
        .unwrap();
        // A sidecar that starts anyway is killed at the deadline, and the test fails.
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        // The log goes to standard output or error, as the subscriber writes it.
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(78), "{why}: {err}");
        assert!(
            err.contains("audit.hash_key_file") && err.contains("shorter than 16 bytes"),
            "{why}: {err}"
        );
    }
}

/// `sign` reads its key as the sidecar reads key files: a key the sidecar would refuse (short,
/// or not base64) is refused, naming the flag, instead of producing signatures no sidecar
/// accepts.
#[test]
fn sign_refuses_a_key_the_sidecar_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    for (content, raw, why) in [
        ("MDEyMzQ1Njc4OWFiY2Rl\n", false, "shorter than 16 bytes"),
        ("not base64!", false, "not valid base64"),
        ("01234567", true, "shorter than 16 bytes"),
    ] {
        std::fs::write(&key, content).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["sign", "--key-id", "gw", "--tenant", "acme", "--key-file"])
            .arg(&key);
        if raw {
            cmd.arg("--raw-key");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{content:?} was accepted");
        assert!(
            err.contains("--key-file") && err.contains(why),
            "{content:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{content:?}: no headers printed");
    }
    // 16 bytes, with the newline a Secret file may end in: accepted.
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZg==\n").unwrap();
    let out = Command::new(BIN)
        .args(["sign", "--key-id", "gw", "--tenant", "acme", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--log-format json` (the agent's flag) writes JSON lines, as the older `--log-json` still
/// does; `--log-format text` does not.
#[test]
fn log_format_json_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    // Invalid (no tenants): the sidecar logs the bad field and exits 78 at once.
    std::fs::write(&config, "[upstream]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    for (flags, json) in [
        (&["--log-format", "json"][..], true),
        (&["--log-json"][..], true),
        (&["--log-format", "text"][..], false),
    ] {
        let out = Command::new(BIN)
            .arg("run")
            .args(flags)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{flags:?}");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = log
            .lines()
            .find(|l| l.contains("bad configuration"))
            .unwrap_or_else(|| panic!("{flags:?}: {log}"));
        assert!(line.contains("tenants"), "{flags:?}: {line}");
        let parsed = serde_json::from_str::<serde_json::Value>(line);
        assert_eq!(parsed.is_ok(), json, "{flags:?}: {line}");
        if let Ok(v) = parsed {
            assert_eq!(v["level"], "ERROR", "{line}");
        }
    }
}

/// `runtime.worker_threads` is applied (it was read, validated and documented, but the
/// runtime was always built with one worker per CPU): the start line names the count.
#[test]
fn the_runtime_has_the_configured_worker_threads() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gw.key");
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    for workers in [1usize, 3] {
        let config = dir.path().join(format!("w{workers}.toml"));
        std::fs::write(
            &config,
            format!(
                "[upstream]\nurl = \"http://127.0.0.1:1\"\n[listen]\naddr = \"127.0.0.1:0\"\n\
                 admin_addr = \"127.0.0.1:0\"\n[audit]\ndir = \"{}\"\n[runtime]\n\
                 worker_threads = {workers}\n[tenants.acme]\n[[keys]]\nid = \"gw\"\n\
                 secret_files = [\"{}\"]\ntenants = [\"*\"]\n",
                dir.path().display(),
                key.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Read the log until the start line (or the end of output: the test then fails).
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains("bulkhead-sidecar listening"))
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let line = reader
            .join()
            .unwrap()
            .expect("the sidecar logged its start");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["fields"]["workers"], workers, "{line}");
    }
}
