use super::*;
use disk::parse_name;
use std::path::Path;

fn limits(file: u64, total: u64) -> AuditLimits {
    AuditLimits {
        max_file_bytes: file,
        max_total_bytes: total,
        unauthenticated_per_second: 10,
        unauthenticated_burst: 5,
    }
}

fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn line(tag: &str, n: usize, len: usize) -> Vec<u8> {
    let mut l = format!("{{\"t\":\"{tag}\",\"n\":{n},\"pad\":\"");
    while l.len() < len - 3 {
        l.push('x');
    }
    l.push_str("\"}\n");
    l.into_bytes()
}

fn dir_total(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn lines_of(dir: &Path, stem: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if parse_name(&name).is_some_and(|(s, _)| s == stem) {
            let text = std::fs::read_to_string(e.path()).unwrap();
            out.extend(text.lines().map(str::to_string));
        }
    }
    out
}

#[test]
fn truncation_is_on_a_char_boundary_and_marked() {
    let mut rec = AuditRecord {
        tenant: UNAUTHENTICATED.into(),
        route: format!("/v1/{}", "é".repeat(4000)),
        method: "X".repeat(100),
        ..Default::default()
    };
    rec.bound();
    assert!(rec.route.len() <= MAX_UNAUTHENTICATED_ROUTE && rec.route.len() >= 250);
    assert!(rec.route_truncated && rec.method_truncated);
    assert_eq!(rec.method.len(), MAX_METHOD);
    let json = serde_json::to_value(&rec).unwrap();
    assert_eq!(json["route_truncated"], true);
    let mut short = AuditRecord {
        tenant: "acme".into(),
        route: "/v1/models".into(),
        method: "GET".into(),
        ..Default::default()
    };
    short.bound();
    let json = serde_json::to_value(&short).unwrap();
    assert!(json.get("route_truncated").is_none(), "{json}");
    assert_eq!(json["route"], "/v1/models");
}

#[test]
fn names_parse() {
    assert_eq!(parse_name("acme.jsonl"), Some(("acme", 0)));
    assert_eq!(parse_name("acme.jsonl.12"), Some(("acme", 12)));
    assert_eq!(
        parse_name("_unauthenticated.jsonl.1"),
        Some((UNAUTHENTICATED, 1))
    );
    for bad in [
        "acme.jsonl.0",
        "acme.jsonl.01",
        "acme.json",
        "x",
        ".jsonl",
        "a b.jsonl",
    ] {
        assert_eq!(parse_name(bad), None, "{bad}");
    }
}

#[test]
fn bucket_refills_at_rate_up_to_burst() {
    let (capacity, per_sec) = bucket_numbers(10, 5);
    let mut b = TokenBucket::full(capacity, per_sec);
    let t0 = Instant::now();
    assert_eq!((0..20).filter(|_| b.take(1.0, t0)).count(), 5);
    assert!(!b.take(1.0, t0 + Duration::from_millis(50)));
    assert!(b.take(1.0, t0 + Duration::from_millis(110)));
    let later = t0 + Duration::from_secs(100);
    assert_eq!((0..20).filter(|_| b.take(1.0, later)).count(), 5);
    // A burst of 0 still lets one through.
    assert_eq!(bucket_numbers(10, 0), (1.0, 10.0));
}

#[test]
fn one_streams_burst_does_not_drop_anothers_records() {
    let drops = Drops::default();
    let mut st = State::new(set(&["a", "b"]), &limits(1 << 20, 1 << 30));
    let cap = st.stream_cap;
    let l = line("a", 0, 1000);
    let now = Instant::now();
    let mut kept = 0;
    for _ in 0..(cap / 1000 + 100) {
        if st.push("a", &l, None, now, &drops).is_ok() {
            kept += 1;
        }
    }
    assert!(kept <= cap / 1000 && kept > 0);
    assert!(drops.buffer_full.get() >= 100);
    let full = drops.buffer_full.get();
    for _ in 0..100 {
        st.push("b", &line("b", 0, 1000), None, now, &drops)
            .unwrap();
    }
    assert_eq!(drops.buffer_full.get(), full);
    // Unauthenticated: rate limited before buffering; unknown tenants go to its buffer.
    let ok = (0..50)
        .filter(|_| st.push(UNAUTHENTICATED, b"{}\n", None, now, &drops).is_ok())
        .count();
    assert_eq!(ok, 5);
    assert_eq!(drops.rate_limited.get(), 45);
    st.push("gone", b"{}\n", None, now, &drops).unwrap();
    assert_eq!(st.pending[UNAUTHENTICATED].data.len(), 6 * 3);
}

#[test]
fn rotation_keeps_each_stream_within_its_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // 3 streams of 30 000 bytes; files rotate at 10 000.
    let lim = limits(10_000, 90_000);
    let mut d = Disk::open(dir.clone(), lim, set(&["a", "b"]), Drops::default());
    assert_eq!((d.share, d.file_limit), (30_000, 10_000));
    let b_lines: Vec<u8> = (0..20).flat_map(|n| line("b", n, 200)).collect();
    d.append("b", &b_lines);
    for n in 0..2000 {
        d.append("a", &line("a", n, 300));
        assert!(dir_total(&dir) <= 90_000);
        assert!(d.group_total("a") <= 30_000);
    }
    assert_eq!(lines_of(&dir, "b").len(), 20, "b's records were deleted");
    assert!(dir.join("a.jsonl.1").exists() && dir.join("a.jsonl.2").exists());
    assert!(!dir.join("a.jsonl.3").exists());
    let a = lines_of(&dir, "a");
    // The newest records are kept, in order: the last one is in a.jsonl.
    assert!(a.len() >= 60, "{}", a.len());
    let cur = std::fs::read_to_string(dir.join("a.jsonl")).unwrap();
    assert!(
        cur.trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("\"n\":1999")
    );
    for f in std::fs::read_dir(&dir).unwrap() {
        assert!(f.unwrap().metadata().unwrap().len() <= 10_000);
    }
    // Restart with a smaller cap: existing files are counted and trimmed at once.
    drop(d);
    let d = Disk::open(
        dir.clone(),
        limits(10_000, 60_000),
        set(&["a", "b"]),
        Drops::default(),
    );
    assert!(dir_total(&dir) <= 60_000);
    assert_eq!(lines_of(&dir, "b").len(), 20);
    drop(d);
}

#[test]
fn retired_tenants_files_count_against_the_unauthenticated_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let lim = limits(10_000, 90_000);
    let mut d = Disk::open(dir.clone(), lim, set(&["a", "b"]), Drops::default());
    let bl: Vec<u8> = (0..40).flat_map(|n| line("b", n, 500)).collect();
    d.append("b", &bl);
    assert_eq!(d.group_total("b"), 20_000);
    // b is removed and c, d added: 4 streams of 22 500; b's 20 000 bytes now count for
    // _unauthenticated.
    d.configure(lim, set(&["a", "c", "d"]));
    assert_eq!(lines_of(&dir, "b").len(), 40);
    // A late record of b goes to _unauthenticated.jsonl.
    d.append("b", &line("late-b", 0, 200));
    assert_eq!(lines_of(&dir, UNAUTHENTICATED).len(), 1);
    for n in 0..1000 {
        d.append(UNAUTHENTICATED, &line("u", n, 300));
        assert!(d.group_total(UNAUTHENTICATED) <= 22_500);
        assert!(dir_total(&dir) <= 90_000);
    }
    // b's files went only as far as needed (its newest file stays), a was never touched.
    assert_eq!(lines_of(&dir, "b").len(), 20);
    assert!(!dir.join("b.jsonl.1").exists());
    let al: Vec<u8> = (0..10).flat_map(|n| line("a", n, 500)).collect();
    d.append("a", &al);
    for n in 0..1000 {
        d.append(UNAUTHENTICATED, &line("u", n, 300));
    }
    assert_eq!(lines_of(&dir, "a").len(), 10);
    assert!(dir_total(&dir) <= 90_000);
}

/// Sealing happens as records reach the file: a record dropped (too large for a file)
/// takes no `seq`, so the chain read back has no gap, across rotations.
#[test]
fn a_dropped_sealed_record_leaves_no_gap_in_the_chain() {
    use crate::record::seal::{SealKeys, Verifier};
    let tmp = tempfile::tempdir().unwrap();
    let drops = Drops::default();
    let mut d = Disk::open(
        tmp.path().to_path_buf(),
        limits(1500, 1 << 20),
        set(&["a"]),
        drops.clone(),
    );
    let keys = SealKeys::parse("k1 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n").unwrap();
    let seal = Sealer {
        tenant: "a".into(),
        keys: Arc::new(keys),
    };
    let mut data = Vec::new();
    for n in 0..12 {
        // The fifth is larger than a file once sealed.
        data.extend(line("a", n, if n == 4 { 1400 } else { 200 }));
    }
    d.append_sealed("a", &seal, &data);
    assert_eq!(drops.oversized.get(), 1);
    assert!(tmp.path().join("a.jsonl.2").exists(), "no rotation");
    let mut v = Verifier::new(&seal.keys, "a");
    let mut shown = Vec::new();
    for idx in (0..=20).rev() {
        let path = d.path("a", idx);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        v.file(&path.display().to_string());
        for (i, l) in text.lines().enumerate() {
            shown.extend(v.line(i + 1, l.as_bytes(), true));
        }
    }
    v.finish();
    let notes = v.take_notes();
    assert_eq!(v.problems(), 0, "{notes:?}");
    assert_eq!(shown.len(), 11);
    assert!(
        notes.iter().any(
            |n| n.text.contains("the last record read is stream") && n.text.contains("seq 10:")
        ),
        "{notes:?}"
    );
}

#[test]
fn an_oversized_line_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let drops = Drops::default();
    let mut d = Disk::open(
        tmp.path().to_path_buf(),
        limits(1000, 6000),
        set(&["a"]),
        drops.clone(),
    );
    let mut data = line("a", 0, 100);
    data.extend(line("a", 1, 5000));
    data.extend(line("a", 2, 100));
    d.append("a", &data);
    assert_eq!(drops.oversized.get(), 1);
    assert_eq!(lines_of(tmp.path(), "a").len(), 2);
}
