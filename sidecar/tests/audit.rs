//! The audit log under floods, over real sockets: a client holding no key cannot fill the audit
//! disk (records cut short, rate limited, drops counted), and one tenant's flood rotates only
//! its own files (another tenant's records stay; the directory stays within its cap).
//! And the sealed audit's chain: each way of altering a sealed tenant's files (a plain line, a
//! duplicate, a deletion, a swap, a torn line, across rotations and restarts) is named by
//! `bulkhead-sidecar audit read` with exit 1; clean files and restarts exit 0.

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
    // A long prompt (hashed after the request went out, from pieces of the client's bytes and
    // the canonical bytes written for the rest: an escape, the keys out of order).
    let long = "the quick brown fox ".repeat(2500);
    let (p, _) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &format!(r#"{{"messages":[{{"role":"user","content":"{long}\u00e9"}}],"model":"m"}}"#),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    let dir = h.shutdown_keep_dir().await;
    let audit = dir.path().join("audit");
    let hex = |input: &[u8]| -> String {
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), input);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    };
    let want = hex(br#"messages=[{"content":"hello","role":"user"}]
"#);
    for tenant in ["acme", "globex"] {
        let recs = records(&audit, tenant);
        assert_eq!(recs.len(), if tenant == "acme" { 2 } else { 1 }, "{recs:?}");
        assert_eq!(recs[0]["prompt_hash"], want.as_str(), "{tenant}");
    }
    let want_long =
        hex(format!("messages=[{{\"content\":\"{long}\u{e9}\",\"role\":\"user\"}}]\n").as_bytes());
    assert_eq!(
        records(&audit, "acme")[1]["prompt_hash"],
        want_long.as_str()
    );
}

// ---- The sealed audit's chain, read back with `bulkhead-sidecar audit read` ----
//
// Records are written by the real writer (`AuditLog`, sealing on its thread, rotating small
// files), each run of it a stream; the files are then altered as an attacker (or a crash)
// would, and the CLI must name what was done, with exit 1 (0 for clean files and restarts).

use bulkhead_sidecar::record::audit::{AuditLimits, AuditLog, AuditRecord};
use bulkhead_sidecar::record::seal::SealKeys;
use std::path::PathBuf;
use std::sync::Arc;

const ACME_AUDIT_KEY: &str = "acme-1 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n";

/// The audit directory and acme's key file.
struct Sealed {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
}

impl Sealed {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let key = tmp.path().join("acme.audit.key");
        std::fs::write(&key, ACME_AUDIT_KEY).unwrap();
        Self {
            _tmp: tmp,
            dir,
            key,
        }
    }

    /// One run of the writer (a stream): records `from..from + n` of acme, sealed, in files
    /// that rotate at `file_bytes`; returns when they are on disk.
    fn run(&self, from: usize, n: usize, file_bytes: u64) {
        let limits = AuditLimits {
            max_file_bytes: file_bytes,
            max_total_bytes: 1 << 30,
            unauthenticated_per_second: 10,
            unauthenticated_burst: 10,
        };
        let (log, writer) = AuditLog::start(
            self.dir.clone(),
            b"hash-key",
            limits,
            ["acme"],
            Default::default(),
        )
        .unwrap();
        let keys = Arc::new(SealKeys::parse(ACME_AUDIT_KEY).unwrap());
        log.set_seals(Arc::new([("acme".to_string(), keys)].into()));
        for i in from..from + n {
            log.record(AuditRecord {
                tenant: "acme".into(),
                request_id: format!("r{i}"),
                method: "POST".into(),
                route: "/v1/chat/completions".into(),
                status: 200,
                ..Default::default()
            });
        }
        // The last clone gone, the writer writes what is left and ends.
        drop(log);
        writer.join().unwrap();
    }

    /// acme's files, oldest first (`.N` .. `.1`, then `acme.jsonl`).
    fn files(&self) -> Vec<PathBuf> {
        let mut rotated: Vec<(u64, PathBuf)> = files(&self.dir)
            .into_iter()
            .filter_map(|(n, _)| {
                let idx = n.strip_prefix("acme.jsonl.")?.parse().ok()?;
                Some((idx, self.dir.join(n)))
            })
            .collect();
        rotated.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
        out.push(self.dir.join("acme.jsonl"));
        out
    }

    /// `audit read --tenant acme --key-file K --dir D`: exit code, request ids shown, stderr.
    fn read(&self) -> (i32, Vec<String>, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-sidecar"))
            .args(["audit", "read", "--tenant", "acme", "--key-file"])
            .arg(&self.key)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        let ids = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["request_id"].as_str().unwrap().to_string()
            })
            .collect();
        (
            out.status.code().unwrap(),
            ids,
            String::from_utf8(out.stderr).unwrap(),
        )
    }
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// A clean sealed audit: 30 records over several rotated files (about 3 a file).
fn clean() -> Sealed {
    let s = Sealed::new();
    s.run(0, 30, 2000);
    assert!(s.files().len() >= 5, "{:?}", s.files());
    s
}

#[test]
fn a_clean_chain_across_rotations_reads_back_whole() {
    let s = clean();
    let raw = std::fs::read_to_string(s.dir.join("acme.jsonl")).unwrap();
    assert!(
        raw.lines()
            .all(|l| l.starts_with(r#"{"sealed":"aes-256-gcm","v":2,"kid":"acme-1","stream":""#)),
        "{raw}"
    );
    let (code, shown, err) = s.read();
    assert_eq!(code, 0, "{err}");
    assert_eq!(shown, ids(0..30));
    assert!(err.contains("chain: ok"), "{err}");
    assert!(
        err.contains("records deleted after it cannot be detected"),
        "{err}"
    );
}

#[test]
fn a_plain_line_appended_is_named_and_not_shown() {
    let s = clean();
    let cur = s.dir.join("acme.jsonl");
    let mut lines = lines_of(&cur);
    lines.push(r#"{"tenant":"acme","request_id":"forged","status":200}"#.into());
    write_lines(&cur, &lines);
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("acme.jsonl:") && err.contains("plain record"),
        "{err}"
    );
    assert_eq!(shown, ids(0..30), "the forged record is not shown");
}

#[test]
fn a_duplicated_line_is_named_and_shown_once() {
    let s = clean();
    let f = &s.files()[1];
    let mut lines = lines_of(f);
    lines.push(lines[0].clone());
    write_lines(f, &lines);
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("duplicate: stream"), "{err}");
    assert_eq!(shown, ids(0..30));
}

#[test]
fn a_deleted_line_is_a_gap() {
    let s = clean();
    let f = &s.files()[2];
    let mut lines = lines_of(f);
    let gone = lines.remove(1);
    write_lines(f, &lines);
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("gap: stream") && err.contains("missing"),
        "{err}"
    );
    assert_eq!(shown.len(), 29);
    let seq = serde_json::from_str::<serde_json::Value>(&gone).unwrap()["seq"].clone();
    assert!(err.contains(&format!("seq {seq} missing")), "{seq}: {err}");
}

#[test]
fn two_lines_swapped_are_out_of_order() {
    let s = clean();
    let f = &s.files()[1];
    let mut lines = lines_of(f);
    lines.swap(0, 1);
    write_lines(f, &lines);
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("out of order: stream"), "{err}");
    assert_eq!(shown.len(), 30);
}

#[test]
fn a_truncated_last_line_is_a_torn_tail() {
    let s = clean();
    let cur = s.dir.join("acme.jsonl");
    let text = std::fs::read_to_string(&cur).unwrap();
    std::fs::write(&cur, &text[..text.len() - 40]).unwrap();
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("torn tail"), "{err}");
    assert_eq!(shown, ids(0..29));
}

#[test]
fn a_file_cut_short_before_a_rotation_is_a_gap_where_the_next_file_goes_on() {
    let s = clean();
    let files = s.files();
    let rotated = &files[files.len() - 2];
    // Its last record half gone; the next record is in the next file.
    let text = std::fs::read_to_string(rotated).unwrap();
    std::fs::write(rotated, &text[..text.len() - 100]).unwrap();
    let (code, shown, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("torn tail") && err.contains("gap: stream"),
        "{err}"
    );
    assert_eq!(shown.len(), 29);
    // The same with the whole line gone: a gap at the next file's first record.
    let s = clean();
    let files = s.files();
    let rotated = &files[files.len() - 2];
    let mut lines = lines_of(rotated);
    lines.pop();
    write_lines(rotated, &lines);
    let (code, _, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("acme.jsonl:1: gap: stream"), "{err}");
}

#[test]
fn a_restart_is_two_linked_streams_and_not_a_problem() {
    let s = Sealed::new();
    s.run(0, 5, 2000);
    s.run(5, 5, 2000);
    let (code, shown, err) = s.read();
    assert_eq!(code, 0, "{err}");
    assert_eq!(shown, ids(0..10));
    assert!(err.contains("ended after seq 4; a new stream"), "{err}");
    assert!(err.contains("chain: ok"), "{err}");
}

#[test]
fn a_write_cut_short_by_a_crash_then_a_restart_is_explained() {
    let s = Sealed::new();
    s.run(0, 5, 1 << 20);
    // Killed mid-write: half a record at the end, no newline.
    let cur = s.dir.join("acme.jsonl");
    let last = lines_of(&cur).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&cur).unwrap();
    std::io::Write::write_all(&mut f, &last.as_bytes()[..last.len() / 2]).unwrap();
    drop(f);
    let (code, _, err) = s.read();
    assert_eq!(code, 1, "before the restart, a torn tail: {err}");
    assert!(err.contains("torn tail"), "{err}");
    // The next run ends the torn line and names the last whole record.
    s.run(5, 3, 1 << 20);
    let (code, shown, err) = s.read();
    assert_eq!(code, 0, "{err}");
    assert_eq!(shown, ids(0..8));
    assert!(
        err.contains("torn write") && err.contains("ended after seq 4"),
        "{err}"
    );
}

#[test]
fn records_deleted_at_the_end_of_a_stream_are_found_by_the_next_stream() {
    let s = Sealed::new();
    s.run(0, 6, 1 << 20);
    let cur = s.dir.join("acme.jsonl");
    let (code, _, err) = s.read();
    assert_eq!(code, 0, "{err}");
    // Cut the last two: alone, that cannot be proven (the read just ends earlier) ...
    let mut lines = lines_of(&cur);
    lines.truncate(4);
    write_lines(&cur, &lines);
    let (code, shown, err) = s.read();
    assert_eq!((code, shown), (0, ids(0..4)), "{err}");
    assert!(
        err.contains("seq 3: records deleted after it cannot be detected"),
        "{err}"
    );
    // ... but the next stream's first record names seq 5 as the last one written before it.
    let s = Sealed::new();
    s.run(0, 6, 1 << 20);
    s.run(6, 2, 1 << 20);
    let cur = s.dir.join("acme.jsonl");
    let mut lines = lines_of(&cur);
    lines.drain(4..6);
    write_lines(&cur, &lines);
    let (code, _, err) = s.read();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("records deleted") && err.contains("seq 4..=5 missing"),
        "{err}"
    );
}

/// A small deterministic generator (xorshift), so that a failure names its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Random runs of the writer (random lengths, restarts and file sizes), then one random fault
/// at a random place across the files: `audit read` always exits 1. (Deleting the very first
/// or the very last record is left out: nothing in the files can prove those.)
#[test]
fn a_random_fault_in_random_files_is_always_found() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let s = Sealed::new();
        let file_bytes = [1500, 3000, 1 << 20][rng.below(3)];
        let mut n = 0;
        for _ in 0..1 + rng.below(3) {
            let k = 1 + rng.below(12);
            s.run(n, k, file_bytes);
            n += k;
        }
        let (code, shown, err) = s.read();
        assert_eq!((code, shown.len()), (0, n), "seed {seed}: {err}");
        // Every line, with the file it is in.
        let files = s.files();
        let mut all: Vec<(usize, String)> = Vec::new();
        for (i, f) in files.iter().enumerate() {
            all.extend(lines_of(f).into_iter().map(|l| (i, l)));
        }
        let total = all.len();
        let mut torn = false;
        let fault = rng.below(5);
        match fault {
            0 => {
                let at = rng.below(total + 1);
                let file = all.get(at).map_or(files.len() - 1, |(f, _)| *f);
                let plain = r#"{"tenant":"acme","request_id":"forged"}"#.to_string();
                all.insert(at, (file, plain));
            }
            1 => {
                let (from, at) = (rng.below(total), rng.below(total + 1));
                let file = all.get(at).map_or(files.len() - 1, |(f, _)| *f);
                let line = all[from].1.clone();
                all.insert(at, (file, line));
            }
            2 if total >= 3 => {
                all.remove(1 + rng.below(total - 2));
            }
            3 if total >= 2 => {
                let at = rng.below(total - 1);
                let (a, b) = (all[at].1.clone(), all[at + 1].1.clone());
                (all[at].1, all[at + 1].1) = (b, a);
            }
            _ => torn = true,
        }
        for (i, f) in files.iter().enumerate() {
            let mut text: String = all
                .iter()
                .filter(|(file, _)| *file == i)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            if torn && i + 1 == files.len() {
                text.truncate(text.len().saturating_sub(30));
            }
            std::fs::write(f, text).unwrap();
        }
        let (code, _, err) = s.read();
        assert_eq!(code, 1, "seed {seed}, fault {fault}: not found: {err}");
    }
}
