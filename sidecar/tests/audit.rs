//! The audit log under floods, over real sockets: a client holding no key cannot fill the audit
//! disk (records cut short, rate limited, drops counted), and one tenant's flood rotates only
//! its own files (another tenant's records stay; the directory stays within its cap).

mod common;
use common::*;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use std::path::Path;
use std::time::{Duration, Instant};

/// Three streams (acme, globex, _unauthenticated) of 128 KiB each; files rotate at 64 KiB.
const MAX_TOTAL: u64 = 384 * 1024;
const SHARE: u64 = MAX_TOTAL / 3;
const RATE: u64 = 20;
const BURST: u64 = 20;

fn small_audit(text: &mut String) {
    *text = text.replace(
        "[audit]\n",
        &format!(
            "[audit]\nmax_file_bytes = 65536\nmax_total_bytes = {MAX_TOTAL}\n\
             unauthenticated_per_second = {RATE}\nunauthenticated_burst = {BURST}\n"
        ),
    );
}

/// (file name, size) of every file in the audit directory.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn total(dir: &Path) -> u64 {
    files(dir).iter().map(|(_, s)| s).sum()
}

/// Every record in `<stem>.jsonl` and its rotated files.
fn records(dir: &Path, stem: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (name, _) in files(dir) {
        if name == format!("{stem}.jsonl") || name.starts_with(&format!("{stem}.jsonl.")) {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
        }
    }
    out
}

fn with_id(mut req: Request<Full<bytes::Bytes>>, id: &str) -> Request<Full<bytes::Bytes>> {
    req.headers_mut()
        .insert("x-request-id", HeaderValue::from_str(id).unwrap());
    req
}

#[tokio::test]
async fn unauthenticated_flood_with_long_paths_is_cut_short_rate_limited_and_counted() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), small_audit).await;
    let dir = h.dir.path().join("audit");
    let long = "x".repeat(8 * 1024);
    let sent = 600u64;
    let t0 = Instant::now();
    for i in 0..sent {
        // Half refused by authentication (401), half not under /v1/ (404).
        let path = if i % 2 == 0 {
            format!("/v1/chat/completions/{long}")
        } else {
            format!("/{long}")
        };
        let mut req = Request::new(Full::new(bytes::Bytes::from_static(b"{}")));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = h.url(&path);
        let (p, _) = h.send_collect(req).await;
        assert!(
            p.status == StatusCode::UNAUTHORIZED || p.status == StatusCode::NOT_FOUND,
            "{}",
            p.status
        );
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Every record is either written or counted as dropped (poll: the writer flushes every 50 ms).
    let dropped = "bulkhead_audit_dropped_total{reason=\"rate_limited\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, dropped_n) = loop {
        let w = records(&dir, "_unauthenticated").len() as u64;
        let d = h.metric(dropped).await.unwrap_or(0.0) as u64;
        if w + d == sent {
            break (w, d);
        }
        assert!(
            Instant::now() < deadline,
            "{w} written + {d} dropped != {sent} sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The bucket: BURST at once, then RATE per second.
    let allowed = BURST + (RATE as f64 * (elapsed + 0.2)).ceil() as u64;
    assert!(
        written <= allowed && written >= 1,
        "{written} written in {elapsed:.2}s"
    );
    assert!(dropped_n >= sent - allowed, "{dropped_n} dropped");
    for rec in records(&dir, "_unauthenticated") {
        let route = rec["route"].as_str().unwrap();
        assert!(route.len() <= 256, "route of {} bytes", route.len());
        assert_eq!(rec["route_truncated"], true, "{rec}");
        assert!(route.ends_with("xxxx"));
        assert!(rec["reason"] == "missing" || rec["reason"] == "not_found");
    }
    let unauth: u64 = files(&dir)
        .iter()
        .filter(|(n, _)| n.starts_with("_unauthenticated.jsonl"))
        .map(|(_, s)| s)
        .sum();
    // Bounded by the records allowed (each well under 1 KiB), not by what was sent (~5 MB).
    assert!(
        unauth <= allowed * 1024 && unauth <= SHARE,
        "{unauth} bytes"
    );
    // The drop reasons are a fixed set, all exported from the start.
    let m = h.metrics().await;
    for reason in ["rate_limited", "buffer_full", "oversized", "write_failed"] {
        let s = format!("bulkhead_audit_dropped_total{{reason=\"{reason}\"}}");
        assert!(metric_in(&m, &s).is_some(), "{s} missing");
    }
    assert_eq!(
        metric_in(&m, "bulkhead_audit_dropped_total{reason=\"buffer_full\"}"),
        Some(0.0)
    );
    h.shutdown().await;
}

#[tokio::test]
async fn one_tenants_flood_rotates_only_its_own_files_within_the_cap() {
    let tenants = "[tenants.acme]\nrequests_per_minute = 1\n[tenants.globex]\n";
    let h = Harness::start_with(tenants, Default::default(), small_audit).await;
    let dir = h.dir.path().join("audit");
    // globex's records, on disk before the flood.
    for i in 0..20 {
        let req = h.signed("globex", Method::GET, "/v1/models", "");
        let (p, _) = h.send_collect(with_id(req, &format!("globex-{i}"))).await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&dir, "globex").len() < 20 {
        assert!(Instant::now() < deadline, "globex's records never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // acme floods: ~1.8 KiB records (a long path; refused by its request limit after the
    // first), 900 KiB in all, seven times its share.
    let path = format!("/v1/models/{}", "a".repeat(1500));
    let flood = 500;
    for i in 0..flood {
        let req = h.signed("acme", Method::GET, &path, "");
        let (p, _) = h.send_collect(with_id(req, &format!("acme-{i}"))).await;
        assert!(p.status == StatusCode::TOO_MANY_REQUESTS || i == 0);
        if i % 25 == 0 {
            assert!(total(&dir) <= MAX_TOTAL, "{:?}", files(&dir));
        }
    }
    // The flood's last record is written (newest in acme.jsonl).
    let last = format!("acme-{}", flood - 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cur = std::fs::read_to_string(dir.join("acme.jsonl")).unwrap_or_default();
        if cur.contains(&last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acme's last record never appeared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listing = files(&dir);
    assert!(total(&dir) <= MAX_TOTAL, "{listing:?}");
    assert!(
        listing.iter().any(|(n, _)| n == "acme.jsonl.1"),
        "no rotation: {listing:?}"
    );
    let acme: u64 = listing
        .iter()
        .filter(|(n, _)| n.starts_with("acme.jsonl"))
        .map(|(_, s)| s)
        .sum();
    assert!(acme <= SHARE, "acme holds {acme} bytes: {listing:?}");
    for (n, s) in &listing {
        assert!(*s <= 65536, "{n} is {s} bytes");
    }
    // Every one of globex's records is still there.
    let globex: Vec<String> = records(&dir, "globex")
        .iter()
        .map(|r| r["client_request_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("globex-{i}")).collect();
    assert_eq!(globex, want);
    // acme kept its newest records, in order, each whole.
    let acme_recs = records(&dir, "acme");
    // At least a rotated file's worth (64 KiB of ~2 KiB records): right after a rotation the
    // current file is nearly empty.
    assert!(acme_recs.len() >= 30, "{}", acme_recs.len());
    assert!(acme_recs.iter().all(|r| r["tenant"] == "acme"));
    assert_eq!(
        h.metric("bulkhead_audit_dropped_total{reason=\"buffer_full\"}")
            .await,
        Some(0.0)
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_tenant_added_by_reload_gets_its_own_audit_file() {
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), small_audit).await;
    let dir = h.dir.path().join("audit");
    let text = std::fs::read_to_string(&h.config_path)
        .unwrap()
        .replace("[tenants.globex]", "[tenants.initech]\n[tenants.globex]");
    // Four streams now need 4 x 128 KiB.
    let text = text.replace(
        &format!("max_total_bytes = {MAX_TOTAL}"),
        "max_total_bytes = 524288",
    );
    h.write_config(&text);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let req = h.signed("initech", Method::GET, "/v1/models", "");
    let (p, _) = h.send_collect(with_id(req, "initech-0")).await;
    assert_eq!(p.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&dir, "initech").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no initech.jsonl: {:?}",
            files(&dir)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        records(&dir, "initech")[0]["client_request_id"],
        "initech-0"
    );
    assert!(records(&dir, "_unauthenticated").is_empty());
    h.shutdown().await;
}

/// The audit's prompt hash, computed here from the key and the documented input (each prompt
/// field present, as `name=<its JSON, keys sorted>\n`): an operator holding the key can find the
/// records of a known prompt, and nobody else can.
#[tokio::test]
async fn the_prompt_hash_is_the_documented_hmac_of_the_prompt() {
    use base64::Engine;
    let keys = tempfile::tempdir().unwrap();
    let key = b"audit-hash-key-0123456789abcdef!";
    let key_file = keys.path().join("hash.key");
    std::fs::write(
        &key_file,
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replace(
            "[audit]\n",
            &format!("[audit]\nhash_key_file = \"{}\"\n", key_file.display()),
        );
    })
    .await;
    for tenant in ["acme", "globex"] {
        let (p, _) = h
            .send_collect(h.signed(
                tenant,
                Method::POST,
                "/v1/chat/completions",
                &chat("hello", ""),
            ))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let dir = h.shutdown_keep_dir().await;
    let audit = dir.path().join("audit");
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        br#"messages=[{"content":"hello","role":"user"}]
"#,
    );
    let want: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    for tenant in ["acme", "globex"] {
        let recs = records(&audit, tenant);
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["prompt_hash"], want.as_str(), "{tenant}");
    }
}
