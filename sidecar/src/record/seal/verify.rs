//! Reading a tenant's sealed audit back: [`Verifier`] opens each record and checks what the
//! chain proves (see the module documentation of [`super`]).

use super::{Chained, Link, Opened, SealError, SealKeys, StreamId, Tag, hex, is_sealed};
use std::collections::{HashMap, HashSet};

/// What `audit read` says about one place in the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `file:line`, or empty when about the whole read.
    pub at: String,
    pub text: String,
    /// Tampering or damage (a record the reader cannot vouch for): `audit read` exits 1.
    pub problem: bool,
}

/// What the verifier knows of one stream.
struct Seen {
    /// The highest `seq` read, and its tag.
    max: u64,
    max_tag: Tag,
    seqs: HashSet<u64>,
}

/// Where the `seq`s of a stream jumped (records may be missing there).
struct Jump {
    stream: StreamId,
    from: u64,
    to: u64,
    at: String,
}

/// A line that is not a whole record, waiting for the next record to say whether it was a
/// write cut short by a restart.
struct Unreadable {
    at: String,
    /// The last record of the stream being read when it came.
    before: Option<Link>,
}

/// Checks one tenant's audit, line by line in the order written (oldest file first), for what
/// the chain proves (see the module documentation):
///
/// * a plain (unsealed) line, a line that is not a whole record, a record that does not open
///   with the tenant's keys, a format-1 record after a format-2 one;
/// * a duplicate, a record out of order, a gap in a stream's `seq`s (records deleted);
/// * at a restart, the new stream's first record names the previous stream's last record: when
///   it is not the last one read, records were deleted at the end of that stream;
/// * a torn tail: a last line cut short.
///
/// It cannot prove that nothing was deleted after the last record read (unless a later stream
/// names it), nor before the first (retention deletes the oldest files): [`Verifier::finish`]
/// says where the records read begin and end.
pub struct Verifier<'a> {
    keys: &'a SealKeys,
    tenant: &'a str,
    file: String,
    streams: HashMap<StreamId, Seen>,
    current: Option<StreamId>,
    jumps: Vec<Jump>,
    chained: u64,
    unchained: u64,
    unopened: u64,
    problems: u64,
    unreadable: Option<Unreadable>,
    /// Streams named as a predecessor by a stream read: predecessor -> successor.
    named: HashMap<StreamId, StreamId>,
    notes: Vec<Note>,
}

impl<'a> Verifier<'a> {
    pub fn new(keys: &'a SealKeys, tenant: &'a str) -> Self {
        Self {
            keys,
            tenant,
            file: String::new(),
            streams: HashMap::new(),
            current: None,
            jumps: Vec::new(),
            chained: 0,
            unchained: 0,
            unopened: 0,
            problems: 0,
            unreadable: None,
            named: HashMap::new(),
            notes: Vec::new(),
        }
    }

    /// The lines that follow are from this file.
    pub fn file(&mut self, name: &str) {
        name.clone_into(&mut self.file);
    }

    /// The notes since the last call, in order.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Problems found so far (tampering or damage).
    pub fn problems(&self) -> u64 {
        self.problems
    }

    /// Sealed records that did not open (counted in [`Verifier::problems`] too).
    pub fn unopened(&self) -> u64 {
        self.unopened
    }

    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.file)
    }

    fn note(&mut self, at: String, problem: bool, text: String) {
        self.problems += u64::from(problem);
        self.notes.push(Note { at, text, problem });
    }

    fn last_read(&self) -> Option<Link> {
        let s = self.current?;
        let seen = self.streams.get(&s)?;
        Some(Link {
            stream: s,
            seq: seen.max,
            tag: seen.max_tag,
        })
    }

    /// One line (without its newline; `terminated` is false for a last line that has none).
    /// Returns the record to show: only records that open with the tenant's keys, each once.
    pub fn line(&mut self, n: usize, line: &[u8], terminated: bool) -> Option<Vec<u8>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        if !is_sealed(line) {
            if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() {
                let at = self.at(n);
                self.note(
                    at,
                    true,
                    "plain record: an unsealed line in a sealed audit (anyone who can write the \
                     file can write one); not shown"
                        .into(),
                );
            } else {
                self.unreadable(n, terminated);
            }
            return None;
        }
        match self.keys.open_record(self.tenant, line) {
            Err(SealError::NotSealed) => {
                self.unreadable(n, terminated);
                None
            }
            Err(e) => {
                self.unopened += 1;
                let at = self.at(n);
                self.note(at, true, format!("{e}; not shown"));
                None
            }
            Ok(Opened { plain, chain: None }) => {
                if self.chained > 0 {
                    let at = self.at(n);
                    self.note(
                        at,
                        true,
                        "unchained record: a format-1 record after chained (format-2) records, \
                         which a writer never writes"
                            .into(),
                    );
                } else {
                    self.unchained += 1;
                }
                Some(plain)
            }
            Ok(Opened {
                plain,
                chain: Some(c),
            }) => {
                self.chained += 1;
                self.chained_record(n, c).then_some(plain)
            }
        }
    }

    fn unreadable(&mut self, n: usize, terminated: bool) {
        let at = self.at(n);
        if !terminated {
            self.note(
                at,
                true,
                "torn tail: the last line is cut short (the writer was stopped mid-write, or \
                 the file was cut); its record is lost"
                    .into(),
            );
            return;
        }
        if let Some(u) = self.unreadable.take() {
            self.note(u.at, true, UNREADABLE.into());
        }
        self.unreadable = Some(Unreadable {
            at,
            before: self.last_read(),
        });
    }

    /// A format-2 record; true when it is to be shown.
    fn chained_record(&mut self, n: usize, c: Chained) -> bool {
        if let Some(u) = self.unreadable.take() {
            // A write cut short by a stop: the next writer ends the torn line and its first
            // record names the record before it.
            if c.seq == 0 && c.after == u.before {
                self.note(
                    u.at,
                    false,
                    "torn write: a line cut short when the writer stopped; the next stream \
                     names the record before it as its predecessor"
                        .into(),
                );
            } else {
                self.note(u.at, true, UNREADABLE.into());
            }
        }
        if c.seq == 0 {
            self.start(n, c)
        } else {
            self.next(n, c)
        }
    }

    fn start(&mut self, n: usize, c: Chained) -> bool {
        let s = hex(&c.stream);
        if let Some(seen) = self.streams.get_mut(&c.stream) {
            let dup = !seen.seqs.insert(0);
            let at = self.at(n);
            if dup {
                self.note(
                    at,
                    true,
                    format!("duplicate: stream {s} seq 0 again; not shown"),
                );
                return false;
            }
            self.note(
                at,
                true,
                format!("out of order: the first record of stream {s} after its later records"),
            );
            return true;
        }
        let at = self.at(n);
        self.named_before(&at, &c.stream);
        if let Some(after) = c.after {
            self.named.insert(after.stream, c.stream);
        }
        match (self.last_read(), c.after) {
            (Some(last), Some(after)) if after.stream == last.stream => {
                let a = hex(&last.stream);
                if after == last {
                    self.note(
                        at,
                        false,
                        format!(
                            "stream {a} ended after seq {}; a new stream {s} started (a restart: \
                             its first record names that record as its predecessor)",
                            last.seq
                        ),
                    );
                } else if after.seq > last.seq {
                    self.note(
                        at,
                        true,
                        format!(
                            "records deleted: stream {s} started after seq {} of stream {a}, \
                             but the last record of {a} read is seq {}: seq {}..={} missing",
                            after.seq,
                            last.seq,
                            last.seq + 1,
                            after.seq
                        ),
                    );
                } else {
                    self.note(
                        at,
                        true,
                        format!(
                            "out of order: stream {s} started after seq {} of stream {a}, but \
                             records of {a} up to seq {} come before it",
                            after.seq, last.seq
                        ),
                    );
                }
            }
            (Some(last), Some(after)) => {
                let (a, x) = (hex(&last.stream), hex(&after.stream));
                let text = if self.streams.contains_key(&after.stream) {
                    format!(
                        "out of order: stream {s} started after stream {x} seq {}, but comes \
                         after stream {a}",
                        after.seq
                    )
                } else {
                    format!(
                        "records deleted: stream {s} started after stream {x} seq {}, of which \
                         nothing is here between stream {a} and it",
                        after.seq
                    )
                };
                self.note(at, true, text);
            }
            (Some(last), None) => {
                let a = hex(&last.stream);
                self.note(
                    at,
                    false,
                    format!(
                        "stream {a} ended after seq {}; a new stream {s} started (it names no \
                         predecessor: its writer found no record it could open at the end of the \
                         file, so records deleted at the end of {a} cannot be detected)",
                        last.seq
                    ),
                );
            }
            (None, Some(after)) => {
                self.note(
                    at,
                    false,
                    format!(
                        "stream {s} started after stream {} seq {}, whose records are not in \
                         these files (rotated away, or not read)",
                        hex(&after.stream),
                        after.seq
                    ),
                );
            }
            (None, None) => {}
        }
        self.streams.insert(
            c.stream,
            Seen {
                max: 0,
                max_tag: c.tag,
                seqs: HashSet::from([0]),
            },
        );
        self.current = Some(c.stream);
        true
    }

    fn next(&mut self, n: usize, c: Chained) -> bool {
        let s = hex(&c.stream);
        let current = self.current;
        let Some(seen) = self.streams.get_mut(&c.stream) else {
            let at = self.at(n);
            self.named_before(&at, &c.stream);
            if self.streams.is_empty() {
                self.note(
                    at,
                    false,
                    format!(
                        "the records read begin inside stream {s}, at seq {}: the records before \
                         it were rotated away (or are in files not read)",
                        c.seq
                    ),
                );
            } else {
                self.note(
                    at,
                    true,
                    format!(
                        "out of order: stream {s} seq {} without the stream's first record, after \
                         stream {}",
                        c.seq,
                        current.map(|c| hex(&c)).unwrap_or_default()
                    ),
                );
            }
            self.streams.insert(
                c.stream,
                Seen {
                    max: c.seq,
                    max_tag: c.tag,
                    seqs: HashSet::from([c.seq]),
                },
            );
            self.current = Some(c.stream);
            return true;
        };
        if !seen.seqs.insert(c.seq) {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!("duplicate: stream {s} seq {} again; not shown", c.seq),
            );
            return false;
        }
        let max = seen.max;
        if current != Some(c.stream) {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!(
                    "out of order: stream {s} seq {} after a later stream started",
                    c.seq
                ),
            );
        } else if c.seq == max + 1 {
            let broken = c.prev != seen.max_tag;
            (seen.max, seen.max_tag) = (c.seq, c.tag);
            if broken {
                let at = self.at(n);
                self.note(
                    at,
                    true,
                    format!(
                        "chain broken: stream {s} seq {} does not follow the seq {max} read \
                         before it",
                        c.seq
                    ),
                );
            }
        } else if c.seq > max {
            (seen.max, seen.max_tag) = (c.seq, c.tag);
            let at = self.at(n);
            self.jumps.push(Jump {
                stream: c.stream,
                from: max,
                to: c.seq,
                at,
            });
        } else {
            let at = self.at(n);
            self.note(
                at,
                true,
                format!("out of order: stream {s} seq {} after seq {max}", c.seq),
            );
        }
        true
    }

    /// A stream first seen after a stream that names it as its predecessor: out of order.
    fn named_before(&mut self, at: &str, stream: &StreamId) {
        if let Some(succ) = self.named.get(stream) {
            let text = format!(
                "out of order: stream {} comes after stream {}, which started after it",
                hex(stream),
                hex(succ)
            );
            self.note(at.to_string(), true, text);
        }
    }

    /// After the last line: gaps, an unexplained unreadable line, and where the records end.
    pub fn finish(&mut self) {
        if let Some(u) = self.unreadable.take() {
            self.note(u.at, true, UNREADABLE.into());
        }
        for j in std::mem::take(&mut self.jumps) {
            let seqs = self.streams.get(&j.stream).map(|s| &s.seqs);
            let mut missing: Vec<(u64, u64)> = Vec::new();
            // A jump bigger than any audit file holds is reported whole.
            if j.to - j.from > 1_000_000 {
                missing.push((j.from + 1, j.to - 1));
            } else {
                for q in j.from + 1..j.to {
                    if seqs.is_some_and(|s| s.contains(&q)) {
                        continue;
                    }
                    match missing.last_mut() {
                        Some(r) if r.1 + 1 == q => r.1 = q,
                        _ => missing.push((q, q)),
                    }
                }
            }
            let s = hex(&j.stream);
            for (a, b) in missing {
                let range = if a == b {
                    format!("seq {a}")
                } else {
                    format!("seq {a}..={b}")
                };
                self.note(
                    j.at.clone(),
                    true,
                    format!("gap: stream {s} {range} missing before this record (deleted)"),
                );
            }
        }
        if let Some(last) = self.last_read() {
            self.note(
                String::new(),
                false,
                format!(
                    "the last record read is stream {} seq {}: records deleted after it cannot \
                     be detected from the files alone (compare with the sidecar's log line \
                     \"audit stream ended\", or with a later stream's first record)",
                    hex(&last.stream),
                    last.seq
                ),
            );
        }
        if self.unchained > 0 {
            self.note(
                String::new(),
                false,
                format!(
                    "{} records in the unchained format 1 (written before chaining): their \
                     order, duplicates and deletions cannot be checked",
                    self.unchained
                ),
            );
        }
    }
}

const UNREADABLE: &str = "unreadable line: not a whole record (damaged, or written by \
                          something else), and no restart explains it; not shown";
