use super::*;
use proptest::prelude::*;

fn key(kid: &str, byte: u8) -> String {
    format!("{kid} {}\n", b64().encode([byte; 32]))
}

/// A format-1 line, as sealed before chaining (tenant name as the associated data).
fn seal_v1(keys: &SealKeys, tenant: &str, plain: &[u8]) -> Vec<u8> {
    let key = &keys.keys[&keys.current];
    let nonce = [7u8; NONCE_LEN];
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(tenant.as_bytes()),
        &mut buf,
    )
    .unwrap();
    format!(
        r#"{{"sealed":"{ALGORITHM}","kid":"{}","nonce":"{}","ct":"{}"}}"#,
        keys.current,
        b64().encode(nonce),
        b64().encode(&buf)
    )
    .into_bytes()
}

fn rec(n: usize) -> Vec<u8> {
    format!(r#"{{"tenant":"acme","request_id":"r{n}"}}"#).into_bytes()
}

/// Record `n`, sealed as the next line of `chain`.
fn sealed(keys: &SealKeys, chain: &mut Chain, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    assert!(keys.seal_chained("acme", chain, &rec(n), &mut out, &mut Scratch::default()));
    out
}

/// `n` records of a new stream (after `after`), as lines; and the chain after them.
fn stream(keys: &SealKeys, first: usize, n: usize, after: Option<Link>) -> (Vec<Vec<u8>>, Chain) {
    let mut chain = Chain::new(after).unwrap();
    let lines = (first..first + n)
        .map(|i| sealed(keys, &mut chain, i))
        .collect();
    (lines, chain)
}

/// Verify `lines` as one file (the last one without its newline when `torn`): the notes,
/// the problem count and the records shown.
fn verify(keys: &SealKeys, lines: &[Vec<u8>], torn: bool) -> (Vec<Note>, u64, Vec<Vec<u8>>) {
    let mut v = Verifier::new(keys, "acme");
    v.file("acme.jsonl");
    let mut shown = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let terminated = !(torn && i + 1 == lines.len());
        shown.extend(v.line(i + 1, l, terminated));
    }
    v.finish();
    (v.take_notes(), v.problems(), shown)
}

fn has(notes: &[Note], problem: bool, text: &str) -> bool {
    notes
        .iter()
        .any(|n| n.problem == problem && n.text.contains(text))
}

#[test]
fn format_1_round_trip_rotation_and_no_cross_tenant_opening() {
    let old = SealKeys::parse(&key("k1", 1)).unwrap();
    let record = br#"{"tenant":"acme","route":"/v1/chat/completions"}"#;
    let sealed_old = seal_v1(&old, "acme", record);
    assert!(is_sealed(&sealed_old));
    // Rotation: the new key first, the old one kept for reading.
    let rotated = SealKeys::parse(&format!("# rotated\n{}{}", key("k2", 2), key("k1", 1))).unwrap();
    let (lines, _) = stream(&rotated, 0, 1, None);
    assert!(String::from_utf8_lossy(&lines[0]).contains("\"kid\":\"k2\""));
    let o = rotated.open_record("acme", &sealed_old).unwrap();
    assert_eq!((o.plain.as_slice(), o.chain), (&record[..], None));
    assert_eq!(rotated.open("acme", &lines[0]).unwrap(), rec(0));
    // The same record under another tenant's name, or with another tenant's key: nothing.
    assert_eq!(rotated.open("globex", &sealed_old), Err(SealError::Open));
    assert_eq!(rotated.open("globex", &lines[0]), Err(SealError::Open));
    let globex = SealKeys::parse(&key("k2", 9)).unwrap();
    assert_eq!(globex.open("acme", &lines[0]), Err(SealError::Open));
    assert_eq!(
        globex.open("acme", &sealed_old),
        Err(SealError::UnknownKid("k1".into()))
    );
}

#[test]
fn chained_records_carry_stream_seq_and_the_previous_tag() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let (lines, chain) = stream(&keys, 0, 3, None);
    let text: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8(l.clone()).unwrap())
        .collect();
    let id = hex(&chain.stream());
    assert!(
            text[0].starts_with(&format!(
                r#"{{"sealed":"aes-256-gcm","v":2,"kid":"k1","stream":"{id}","seq":0,"start":true,"nonce":""#
            )),
            "{}",
            text[0]
        );
    assert!(!text[0].contains("prev") && !text[0].contains("acme"));
    let opened: Vec<Chained> = lines
        .iter()
        .map(|l| keys.open_record("acme", l).unwrap().chain.unwrap())
        .collect();
    assert_eq!(opened[0].prev, ZERO_TAG);
    for i in 1..3 {
        assert_eq!(opened[i].seq, i as u64);
        assert_eq!(opened[i].prev, opened[i - 1].tag);
        assert!(text[i].contains(&format!(
            r#""seq":{i},"prev":"{}""#,
            b64().encode(opened[i - 1].tag)
        )));
    }
    assert_eq!(
        chain.last(),
        Some(Link {
            stream: chain.stream(),
            seq: 2,
            tag: opened[2].tag
        })
    );
    // A restart names the last record; the link is authenticated too.
    let (next, _) = stream(&keys, 3, 1, chain.last());
    let c = keys.open_record("acme", &next[0]).unwrap().chain.unwrap();
    assert_eq!(c.after, chain.last());
    assert_eq!(keys.link_of("acme", &lines[2]), chain.last());
    // Any chain field changed: the record no longer opens (or is refused as malformed).
    let prev_of_2 = format!(r#""prev":"{}""#, b64().encode(opened[1].tag));
    let other_prev = format!(r#""prev":"{}""#, b64().encode(opened[0].tag));
    let edits: [(usize, &str, String); 7] = [
        (1, r#""seq":1"#, r#""seq":5"#.into()),
        (2, &prev_of_2, other_prev),
        (2, r#""v":2,"#, String::new()),
        (2, r#""v":2"#, r#""v":3"#.into()),
        (2, &id, hex(&[0xab; 16])),
        (0, r#""start":true,"#, String::new()),
        (2, r#""seq":2"#, r#""seq":0,"start":true"#.into()),
    ];
    let after = String::from_utf8(next[0].clone()).unwrap();
    for (i, from, to) in &edits {
        let bad = text[*i].replacen(from, to, 1);
        assert_ne!(bad, text[*i], "{from}");
        let e = keys.open_record("acme", bad.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                SealError::Open | SealError::Malformed(_) | SealError::Format(3)
            ),
            "{from}: {e}"
        );
    }
    let seq_pos = after.find(r#""after":{"stream":""#).unwrap();
    let bad = format!(
        "{}{}",
        &after[..seq_pos],
        &after[seq_pos..].replacen(r#","seq":2,"#, r#","seq":1,"#, 1)
    );
    assert_ne!(bad, after);
    assert_eq!(
        keys.open_record("acme", bad.as_bytes()),
        Err(SealError::Open)
    );
    assert_eq!(
        keys.open_record("acme", text[1].replace(r#""v":2"#, r#""v":9"#).as_bytes()),
        Err(SealError::Format(9))
    );
}

#[test]
fn a_clean_chain_and_a_linked_restart_are_not_problems() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let (mut lines, a) = stream(&keys, 0, 4, None);
    let (b, _) = stream(&keys, 4, 3, a.last());
    lines.extend(b);
    let (notes, problems, shown) = verify(&keys, &lines, false);
    assert_eq!(problems, 0, "{notes:?}");
    assert_eq!(shown, (0..7).map(rec).collect::<Vec<_>>());
    let ended = format!(
        "stream {} ended after seq 3; a new stream",
        hex(&a.stream())
    );
    assert!(has(&notes, false, &ended), "{notes:?}");
    assert!(
        has(&notes, false, "the last record read is stream"),
        "{notes:?}"
    );
    // The oldest records rotated away: the read begins inside a stream, not a problem.
    let (notes, problems, _) = verify(&keys, &lines[2..], false);
    assert_eq!(problems, 0, "{notes:?}");
    assert!(has(&notes, false, "begin inside stream"), "{notes:?}");
}

#[test]
fn each_fault_is_named() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let (lines, a) = stream(&keys, 0, 5, None);
    let check = |lines: &[Vec<u8>], torn: bool, want: &str| {
        let (notes, problems, _) = verify(&keys, lines, torn);
        assert!(problems > 0 && has(&notes, true, want), "{want}: {notes:?}");
    };
    let mut plain = lines.clone();
    plain.push(rec(99));
    check(&plain, false, "plain record");
    let mut dup = lines.clone();
    dup.insert(3, lines[2].clone());
    check(&dup, false, "duplicate: ");
    let (_, _, shown) = verify(&keys, &dup, false);
    assert_eq!(shown.len(), 5, "a duplicate is shown once");
    let mut gap = lines.clone();
    gap.remove(2);
    check(&gap, false, "gap: ");
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    check(&swapped, false, "out of order");
    let mut torn = lines.clone();
    let last = torn.last_mut().unwrap();
    last.truncate(last.len() / 2);
    check(&torn, true, "torn tail");
    // The end of a stream deleted before a restart: the next stream names its last record.
    let (b, _) = stream(&keys, 5, 2, a.last());
    let mut cut = lines[..3].to_vec();
    cut.extend(b.clone());
    check(&cut, false, "records deleted");
    // A format-1 record after chained ones; another tenant's record.
    let mut old = lines.clone();
    old.push(seal_v1(&keys, "acme", &rec(9)));
    check(&old, false, "unchained record");
    let mut moved = lines.clone();
    let mut globex = Chain::new(None).unwrap();
    let mut line = Vec::new();
    keys.seal_chained(
        "globex",
        &mut globex,
        &rec(1),
        &mut line,
        &mut Scratch::default(),
    );
    moved.push(line);
    check(&moved, false, "does not open");
    // A torn write before a restart (the next writer ended the line) is explained.
    let mut restart = lines.clone();
    restart.push(lines[4][..40].to_vec());
    restart.extend(b);
    let (notes, problems, _) = verify(&keys, &restart, false);
    assert_eq!(problems, 0, "{notes:?}");
    assert!(has(&notes, false, "torn write"), "{notes:?}");
    // The same torn line with no restart after it is not.
    let mut mid = lines.clone();
    mid.insert(3, lines[3][..40].to_vec());
    check(&mid, false, "unreadable line");
}

#[derive(Debug, Clone)]
enum Fault {
    Plain(usize),
    Duplicate(usize, usize),
    Delete(usize),
    Swap(usize),
    TornTail,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any::<usize>().prop_map(Fault::Plain),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Fault::Duplicate(a, b)),
        any::<usize>().prop_map(Fault::Delete),
        any::<usize>().prop_map(Fault::Swap),
        Just(Fault::TornTail),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Streams of random lengths, each a linked restart of the one before; one fault at a
    /// random place. Deleting the very first or the very last record is left out: nothing
    /// in the files can prove those (retention deletes the oldest records; see `finish`).
    #[test]
    fn a_random_fault_is_always_found(
        lens in proptest::collection::vec(1usize..6, 1..4),
        f in fault(),
    ) {
        let keys = SealKeys::parse(&key("k1", 1)).unwrap();
        let mut lines = Vec::new();
        let mut after = None;
        for n in lens {
            let (l, c) = stream(&keys, lines.len(), n, after);
            lines.extend(l);
            after = c.last();
        }
        let (notes, problems, _) = verify(&keys, &lines, false);
        prop_assert_eq!(problems, 0, "{:?}", notes);
        let len = lines.len();
        let mut torn = false;
        match f.clone() {
            Fault::Plain(at) => lines.insert(at % (len + 1), rec(1000)),
            Fault::Duplicate(from, to) => {
                let l = lines[from % len].clone();
                lines.insert(to % (len + 1), l);
            }
            Fault::Delete(at) => {
                prop_assume!(len >= 3);
                lines.remove(1 + at % (len - 2));
            }
            Fault::Swap(at) => {
                prop_assume!(len >= 2);
                lines.swap(at % (len - 1), at % (len - 1) + 1);
            }
            Fault::TornTail => {
                let last = lines.last_mut().unwrap();
                let keep = last.len() / 3;
                last.truncate(keep);
                torn = true;
            }
        }
        let (notes, problems, _) = verify(&keys, &lines, torn);
        prop_assert!(problems > 0, "{:?} not found: {:?}", f, notes);
    }
}

#[test]
fn bad_key_files_name_the_line() {
    assert_eq!(
        SealKeys::parse("# nothing\n").unwrap_err(),
        SealError::Empty
    );
    let e = SealKeys::parse("k1 AAAA\n").unwrap_err();
    assert!(
        e.to_string().contains("line 1") && e.to_string().contains("32 bytes"),
        "{e}"
    );
    let e = SealKeys::parse(&format!("{}{}", key("k1", 1), key("k1", 2))).unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}

#[test]
fn base64_is_appended_after_what_the_buffer_holds() {
    for prefix in [&b""[..], b"x", b"xy", b"prefix="] {
        let mut out = prefix.to_vec();
        push_b64(&mut out, b"hello");
        assert_eq!(out, [prefix, &b"aGVsbG8="[..]].concat(), "{prefix:?}");
    }
}

#[test]
fn debug_names_the_key_ids_count_never_a_key() {
    let keys = SealKeys::parse(&(key("k1", 1) + &key("k2", 2))).unwrap();
    let d = format!("{keys:?}");
    assert!(
        d.contains("SealKeys") && d.contains("\"k1\"") && d.contains("kids: 2"),
        "{d}"
    );
    assert!(!d.contains(&b64().encode([1u8; 32])), "{d}");
}

#[test]
fn key_ids_are_1_to_64_safe_characters() {
    let k = |kid: &str| SealKeys::parse(&key(kid, 1));
    assert!(k("a").is_ok());
    assert!(k(&"a".repeat(64)).is_ok());
    assert!(k("A.z-9_").is_ok());
    for bad in ["a".repeat(65), "a/b".into(), "a:b".into(), "ä".into()] {
        assert!(k(&bad).is_err(), "{bad}");
    }
    // An empty key id: the line has no key id, only a key.
    assert!(SealKeys::parse(&format!(" {}\n", b64().encode([1u8; 32]))).is_err());
}

#[test]
fn notes_name_the_file_and_line_and_count_what_did_not_open() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let other = SealKeys::parse(&key("k1", 2)).unwrap();
    let mut v = Verifier::new(&keys, "acme");
    v.file("acme.jsonl.1");
    assert!(v.line(3, br#"{"plain":true}"#, true).is_none());
    assert_eq!(v.unopened(), 0);
    // Sealed with another key under the same key id: does not open.
    assert!(v.line(4, &seal_v1(&other, "acme", b"{}"), true).is_none());
    assert_eq!(v.unopened(), 1);
    // Two records of format 1 open, and are counted as such.
    assert!(
        v.line(5, &seal_v1(&keys, "acme", b"{\"a\":1}"), true)
            .is_some()
    );
    assert!(
        v.line(6, &seal_v1(&keys, "acme", b"{\"a\":2}"), true)
            .is_some()
    );
    v.finish();
    let notes = v.take_notes();
    let at: Vec<&str> = notes.iter().map(|n| n.at.as_str()).collect();
    assert!(
        at.contains(&"acme.jsonl.1:3") && at.contains(&"acme.jsonl.1:4"),
        "{at:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.text.starts_with("2 records in the unchained format 1")),
        "{:?}",
        notes.iter().map(|n| &n.text).collect::<Vec<_>>()
    );
    assert_eq!(v.problems(), 2);
}

#[test]
fn gaps_are_reported_as_the_ranges_that_are_missing() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let (lines, chain) = stream(&keys, 0, 12, None);
    let s = hex(&chain.stream());
    // Delete seq 3..=5 and 8 and 10: three gaps, each named exactly.
    let kept: Vec<Vec<u8>> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4, 5, 8, 10].contains(i))
        .map(|(_, l)| l.clone())
        .collect();
    let (notes, problems, shown) = verify(&keys, &kept, false);
    let gaps: Vec<&str> = notes
        .iter()
        .filter(|n| n.text.starts_with("gap: "))
        .map(|n| n.text.as_str())
        .collect();
    assert_eq!(
        gaps,
        [
            format!("gap: stream {s} seq 3..=5 missing before this record (deleted)"),
            format!("gap: stream {s} seq 8 missing before this record (deleted)"),
            format!("gap: stream {s} seq 10 missing before this record (deleted)"),
        ]
    );
    assert_eq!((problems, shown.len()), (3, 7));
    // The last record read is named, as what a reader cannot see past.
    assert!(
        has(&notes, false, &format!("stream {s} seq 11:")),
        "{notes:?}"
    );
    // Records that come later in the files are out of order, not missing.
    let order = [0, 1, 2, 5, 3, 4, 6];
    let moved: Vec<Vec<u8>> = order.iter().map(|i| lines[*i].clone()).collect();
    let (notes, _, _) = verify(&keys, &moved, false);
    assert!(!has(&notes, true, "gap: "), "{notes:?}");
    assert!(has(&notes, true, "out of order"), "{notes:?}");
    // Within one jump, a record seen elsewhere splits the missing range in two.
    let order = [0, 1, 2, 9, 5, 10, 11];
    let moved: Vec<Vec<u8>> = order.iter().map(|i| lines[*i].clone()).collect();
    let (notes, _, _) = verify(&keys, &moved, false);
    for range in ["seq 3..=4 missing", "seq 6..=8 missing"] {
        assert!(has(&notes, true, range), "{range}: {notes:?}");
    }
}

#[test]
fn a_jump_past_any_audit_file_is_one_range() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    // A record claiming seq 1,000,002 after seq 1: 1,000,000 records missing, reported
    // whole; one short of the bound, the same range found record by record.
    for (next, range) in [(1_000_002, "2..=1000001"), (1_000_001, "2..=1000000")] {
        let (mut lines, mut chain) = stream(&keys, 0, 2, None);
        let s = hex(&chain.stream());
        chain.next = next;
        lines.push(sealed(&keys, &mut chain, 9));
        let (notes, _, _) = verify(&keys, &lines, false);
        let want = format!("gap: stream {s} seq {range} missing");
        assert!(has(&notes, true, &want), "{want}: {notes:?}");
    }
    // A jump of exactly the bound is read record by record: a record of it that comes later in
    // the files splits what is missing in two.
    let (mut lines, mut chain) = stream(&keys, 0, 2, None);
    let s = hex(&chain.stream());
    let mut between = chain;
    between.next = 500_000;
    chain.next = 1_000_001;
    lines.push(sealed(&keys, &mut chain, 9));
    lines.push(sealed(&keys, &mut between, 9));
    let (notes, _, _) = verify(&keys, &lines, false);
    for range in ["2..=499999", "500001..=1000000"] {
        let want = format!("gap: stream {s} seq {range} missing");
        assert!(has(&notes, true, &want), "{want}: {notes:?}");
    }
    // Far into a stream, a small jump is still read record by record: a record that comes
    // later in the files is not reported missing.
    let (mut lines, mut chain) = stream(&keys, 0, 2, None);
    let s = hex(&chain.stream());
    chain.next = 2_000_000;
    let far: Vec<Vec<u8>> = (10..14).map(|i| sealed(&keys, &mut chain, i)).collect();
    lines.extend([far[0].clone(), far[3].clone(), far[1].clone()]);
    let (notes, _, _) = verify(&keys, &lines, false);
    let want = format!("gap: stream {s} seq 2000002 missing");
    assert!(has(&notes, true, &want), "{want}: {notes:?}");
    assert!(has(&notes, true, "out of order"), "{notes:?}");
}

/// The reader's account in the corners the random faults do not build: a stream's first record
/// twice, a stream whose predecessor is missing whole, a predecessor read after the stream that
/// names it, a record that does not follow the one read before it (a writer forked from the
/// same state), and an unreadable first line before a stream's later record (which no restart
/// explains).
#[test]
fn the_reader_names_each_corner_of_the_chain() {
    let keys = SealKeys::parse(&key("k1", 1)).unwrap();
    let (a, ca) = stream(&keys, 0, 3, None);
    let (b, cb) = stream(&keys, 3, 2, ca.last());
    let (c, _) = stream(&keys, 5, 2, cb.last());
    let problem = |lines: &[Vec<u8>], want: &str| {
        let (notes, problems, shown) = verify(&keys, lines, false);
        assert!(problems > 0 && has(&notes, true, want), "{want}: {notes:?}");
        shown.len()
    };
    // A stream's first record again: a duplicate, shown once.
    let twice = [a.clone(), vec![a[0].clone()]].concat();
    assert_eq!(problem(&twice, "seq 0 again"), 3);
    // Stream b deleted whole: c names it, and nothing of it is between a and c.
    problem(
        &[a.clone(), c.clone()].concat(),
        "of which nothing is here between",
    );
    // Stream a read after b, which started after it (files in the wrong order).
    problem(&[b.clone(), a.clone()].concat(), "which started after it");
    // A forked writer: two records sealed at seq 2 from the same state; the next record of one
    // fork after the other fork's seq 2.
    let mut chain = Chain::new(None).unwrap();
    let (r0, r1) = (sealed(&keys, &mut chain, 0), sealed(&keys, &mut chain, 1));
    let mut fork = chain;
    let (_, r3) = (sealed(&keys, &mut chain, 2), sealed(&keys, &mut chain, 3));
    let other2 = sealed(&keys, &mut fork, 99);
    problem(&[r0, r1, other2, r3], "chain broken");
    // A cut line first, then seq 1 and 2 of a stream: only a stream's first record can say a
    // restart ended that line.
    let cut = [vec![a[0][..40].to_vec()], a[1..].to_vec()].concat();
    problem(&cut, "unreadable line");
    // Chained records only: no word of the unchained format.
    let (notes, _, _) = verify(&keys, &a, false);
    assert!(
        !notes.iter().any(|n| n.text.contains("unchained")),
        "{notes:?}"
    );
}
