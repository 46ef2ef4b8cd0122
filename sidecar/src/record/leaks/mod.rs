//! Leak detection on the request path: each tenant's canaries (secret marker strings planted
//! in its own data) and keywords (terms that belong to it), and injection markers ("ignore
//! previous instructions"), found by ONE Aho-Corasick automaton over every pattern, so the
//! cost per byte stays flat as patterns are added.
//!
//! Prompts are scanned whole (the parsed prompt fields); responses as they stream, across chunk
//! and event boundaries ([`StreamScan`] keeps the last `longest pattern - 1` bytes), every
//! string a client can read with one scanner per (choice, field path) ([`ResponseScan`]). A canary or
//! keyword of tenant A seen in tenant B's prompt or response is a hit (`owner` A, `seen_by` B);
//! in A's own traffic it is not. Patterns are matched ASCII-case-insensitively and are
//! printable ASCII without `"` or `\`, so their JSON encoding is themselves.
//!
//! The automaton reports every pattern, overlapping ones included (a tenant's own canary must
//! not hide another's that overlaps it), and so runs without a SIMD prefilter at about 1.5 ns
//! a byte. Most text holds no pattern at all: a [`Gate`] (a leftmost-first SIMD searcher,
//! Teddy, over the ASCII-lowercased text) says so first, about ten times faster; the
//! automaton runs only on text the gate found a pattern in.

use crate::config::{Config, OnCanary};
use crate::record::metrics::{LeakLabel, TenantMarker};
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind, packed};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Leak detection's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Another tenant's canary seen in a prompt or a response.
    pub canary_hits: Family<LeakLabel, Counter>,
    /// Another tenant's keyword seen in a prompt or a response.
    pub keyword_hits: Family<LeakLabel, Counter>,
    /// Injection markers in a tenant's prompts, by marker.
    pub injection_markers: Family<TenantMarker, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "canary_hits",
            "A canary of tenant `owner` seen in tenant `seen_by`'s prompt or response (a leak \
             signal: cache, RAG or prompt bleed)",
            m.canary_hits.clone(),
        );
        r.register(
            "keyword_hits",
            "A keyword of tenant `owner` seen in tenant `seen_by`'s prompt or response",
            m.keyword_hits.clone(),
        );
        r.register(
            "injection_markers",
            "Injection markers (leaks.injection_markers) in a tenant's prompts",
            m.injection_markers.clone(),
        );
        m
    }

    /// Count hit `h` in `seen_by`'s traffic.
    pub fn count(&self, seen_by: &str, h: &Hit) {
        let family = match h.kind {
            Kind::Marker => {
                self.injection_markers
                    .get_or_create(&TenantMarker {
                        tenant: seen_by.to_string(),
                        marker: h.owner.to_string(),
                    })
                    .inc();
                return;
            }
            Kind::Canary => &self.canary_hits,
            Kind::Keyword => &self.keyword_hits,
        };
        family
            .get_or_create(&LeakLabel {
                owner: h.owner.to_string(),
                seen_by: seen_by.to_string(),
                r#where: h.seen.as_str(),
            })
            .inc();
    }
}

/// What a pattern is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Canary,
    Keyword,
    Marker,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Canary => "canary",
            Kind::Keyword => "keyword",
            Kind::Marker => "marker",
        }
    }
}

/// Where a pattern was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Where {
    Prompt,
    Response,
}

impl Where {
    pub fn as_str(self) -> &'static str {
        match self {
            Where::Prompt => "prompt",
            Where::Response => "response",
        }
    }
}

#[derive(Debug)]
struct Pattern {
    kind: Kind,
    /// The tenant a canary or keyword belongs to; the marker's label for a marker.
    owner: Arc<str>,
    /// Its position in the owner's list (canaries, keywords) or in the marker list: what the
    /// audit records instead of the text.
    index: usize,
}

/// One pattern found, as recorded (never the pattern's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub kind: Kind,
    /// The owning tenant (canary, keyword) or the marker's label.
    pub owner: Arc<str>,
    pub index: usize,
    pub seen: Where,
}

/// Whether a text holds any pattern, ASCII-case-insensitively: never "no" for text that holds
/// one. A leftmost-first search finds a match whenever any occurrence exists, and, unlike the
/// overlapping search, can use the SIMD searcher; that searcher is case-sensitive, so the
/// text is lowercased, a window at a time, into a buffer on the stack.
#[derive(Debug)]
struct Gate {
    searcher: packed::Searcher,
    /// The longest pattern less one byte: how far consecutive windows overlap, so a pattern
    /// that starts in one window is wholly in it.
    overlap: usize,
}

#[cfg(test)]
thread_local! {
    /// Texts the automaton read on this thread: what the gate did not turn away.
    static AUTOMATON_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Text the gate lowercases and searches at a time (plus the overlap).
const GATE_WINDOW: usize = 8 * 1024;
/// Text shorter than this goes to the automaton directly (the gate would save little).
const GATE_MIN: usize = 256;
/// The longest pattern the configuration allows (`check_pattern`).
const MAX_PATTERN: usize = 256;

impl Gate {
    /// `None` where the SIMD searcher is not available (no SSSE3, or more than 64 patterns in
    /// all): every text then goes to the automaton.
    fn new(texts: &[&str]) -> Option<Self> {
        let longest = texts.iter().map(|t| t.len()).max()?;
        if longest > MAX_PATTERN {
            return None;
        }
        let mut b = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder();
        for t in texts {
            b.add(t.to_ascii_lowercase());
        }
        Some(Self {
            searcher: b.build()?,
            overlap: longest - 1,
        })
    }

    fn may_match(&self, text: &[u8]) -> bool {
        let mut buf = [0u8; GATE_WINDOW + MAX_PATTERN];
        let mut start = 0;
        loop {
            let end = (start + GATE_WINDOW + self.overlap).min(text.len());
            let window = &text[start..end];
            for (d, s) in buf.iter_mut().zip(window) {
                *d = s.to_ascii_lowercase();
            }
            if self.searcher.find(&buf[..window.len()]).is_some() {
                return true;
            }
            if end == text.len() {
                return false;
            }
            start += GATE_WINDOW;
        }
    }
}

/// The compiled patterns of one configuration.
#[derive(Debug)]
pub struct LeakPatterns {
    ac: Option<AhoCorasick>,
    gate: Option<Gate>,
    patterns: Vec<Pattern>,
    longest: usize,
    /// The shortest pattern's length: shorter text cannot hold one.
    shortest: usize,
    /// Some canary or keyword exists (responses are scanned only then).
    owned: bool,
    pub on_canary: OnCanary,
    pub scan_responses: bool,
}

/// The label of an injection marker: its words joined by `_`, lower case.
pub fn marker_label(marker: &str) -> String {
    marker
        .split_whitespace()
        .map(|w| w.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join("_")
}

impl LeakPatterns {
    /// Whether `hits` block the request or cut the response: a canary of another tenant
    /// under `leaks.on_canary = "block"`.
    pub fn blocks(&self, hits: &[Hit]) -> bool {
        self.on_canary == OnCanary::Block && hits.iter().any(|h| h.kind == Kind::Canary)
    }

    pub fn new(config: &Config) -> Self {
        let mut texts: Vec<&str> = Vec::new();
        let mut patterns = Vec::new();
        for (name, t) in &config.tenants {
            let owner: Arc<str> = Arc::from(name.as_str());
            for (kind, list) in [(Kind::Canary, &t.canaries), (Kind::Keyword, &t.keywords)] {
                for (index, p) in list.iter().enumerate() {
                    texts.push(p);
                    patterns.push(Pattern {
                        kind,
                        owner: owner.clone(),
                        index,
                    });
                }
            }
        }
        let owned = !patterns.is_empty();
        for (index, m) in config.leaks.injection_markers.iter().enumerate() {
            texts.push(m);
            patterns.push(Pattern {
                kind: Kind::Marker,
                owner: Arc::from(marker_label(m)),
                index,
            });
        }
        let longest = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        let shortest = texts.iter().map(|t| t.len()).min().unwrap_or(0);
        // Validated patterns (short printable ASCII, bounded count) always build.
        let ac = (!texts.is_empty())
            .then(|| {
                AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::Standard)
                    .build(&texts)
                    .ok()
            })
            .flatten();
        Self {
            ac,
            gate: Gate::new(&texts),
            patterns,
            longest,
            shortest,
            owned,
            on_canary: config.leaks.on_canary,
            scan_responses: config.leaks.scan_responses,
        }
    }

    /// Responses need scanning (some tenant has canaries or keywords).
    pub fn scans_responses(&self) -> bool {
        self.owned && self.scan_responses
    }

    fn hit(&self, id: usize, seen: Where) -> Hit {
        let p = &self.patterns[id];
        Hit {
            kind: p.kind,
            owner: p.owner.clone(),
            index: p.index,
            seen,
        }
    }

    /// The id and end of every pattern occurrence in `text`, overlapping ones included.
    fn each_match(&self, text: &[u8], mut found: impl FnMut(usize, usize)) {
        let Some(ac) = &self.ac else { return };
        if text.len() < self.shortest {
            return;
        }
        if text.len() >= GATE_MIN
            && let Some(gate) = &self.gate
            && !gate.may_match(text)
        {
            return;
        }
        #[cfg(test)]
        AUTOMATON_RUNS.with(|c| c.set(c.get() + 1));
        for m in ac.find_overlapping_iter(text) {
            found(m.pattern().as_usize(), m.end());
        }
    }

    /// Every pattern in `text` (each once), as seen by `tenant`: markers always, canaries and
    /// keywords only when they belong to another tenant.
    pub fn scan(&self, tenant: &str, text: &[u8], seen: Where, out: &mut Vec<Hit>) {
        self.each_match(text, |id, _| {
            self.push(tenant, id, seen, out);
        });
    }

    /// Record pattern `id` seen by `tenant` (each hit once in `out`); false when it is no hit
    /// (the tenant's own canary or keyword, a marker in a response).
    fn push(&self, tenant: &str, id: usize, seen: Where, out: &mut Vec<Hit>) -> bool {
        let p = &self.patterns[id];
        if p.kind != Kind::Marker && &*p.owner == tenant {
            return false;
        }
        if p.kind == Kind::Marker && seen == Where::Response {
            return false;
        }
        let h = self.hit(id, seen);
        if !out.contains(&h) {
            out.push(h);
        }
        true
    }
}

/// The memory a [`StreamScan`] keeps between pieces, at most (patterns are at most 256 bytes).
pub const MAX_KEPT: usize = 1024;

/// A response scanned as it streams: patterns split across pieces are found.
#[derive(Debug, Default)]
pub struct StreamScan {
    buf: Vec<u8>,
}

impl StreamScan {
    /// Scan the next piece of text; hits go to `out` (each pattern once per response).
    pub fn feed(&mut self, pats: &LeakPatterns, tenant: &str, data: &[u8], out: &mut Vec<Hit>) {
        self.feed_ids(pats, data, |id| {
            pats.push(tenant, id, Where::Response, out);
        });
    }

    /// Scan the next piece; `found` gets the id of every pattern that ends in it.
    fn feed_ids(&mut self, pats: &LeakPatterns, data: &[u8], mut found: impl FnMut(usize)) {
        if pats.ac.is_none() {
            return;
        }
        let carried = self.buf.len();
        self.buf.extend_from_slice(data);
        pats.each_match(&self.buf, |id, end| {
            // Matches wholly inside the carried tail were reported with the previous piece.
            if end > carried {
                found(id);
            }
        });
        let keep = pats.longest.saturating_sub(1).min(self.buf.len());
        let cut = self.buf.len() - keep;
        self.buf.drain(..cut);
        if self.buf.capacity() > MAX_KEPT {
            // A large piece's room is let go: only the tail stays between pieces.
            self.buf = self.buf.clone();
        }
    }
}

/// Field scanners per response, at most (all choices together); a field beyond them is scanned
/// by its choice's catch-all scanner.
pub const MAX_FIELD_STREAMS: usize = 512;
/// Choices with scanners of their own per response, at most (the sidecar allows 128 choices a
/// request); text of any further choice index goes to one catch-all scanner.
pub const MAX_CHOICE_STREAMS: usize = 128;
/// A field path longer than this is scanned by its choice's catch-all scanner.
pub const MAX_PATH: usize = 96;
/// Matches kept for inspection by [`ResponseScan::matches`].
const MAX_MATCHES: usize = 64;
/// The path of a catch-all scanner in [`ResponseScan::matches`].
pub const CATCH_ALL: &str = "*";

#[derive(Debug, Default)]
struct ChoiceScan {
    fields: std::collections::HashMap<Box<str>, StreamScan>,
    rest: StreamScan,
}

/// What the client can read of one response, scanned as it arrives: every string value of
/// every SSE event's JSON (and every object key) through one [`StreamScan`] per (choice, field
/// path), so that choices interleaved in one stream, or text moving between fields, never
/// split a pattern; a body that is not an event stream as raw bytes and as decoded JSON
/// strings (each string on its own, `\u` escapes decoded).
///
/// The choice of a value is the `index` of its element of `choices` (Chat, Completions), or
/// the event's `output_index` (Responses API, whose paths also carry the event `type`,
/// `content_index` and `summary_index`), else 0. In a path, an array element with an `index`
/// is `[index]` (tool calls), any other `[]` (fed in order: logprob tokens read as one text).
/// Memory is bounded: at most [`MAX_CHOICE_STREAMS`] choices and [`MAX_FIELD_STREAMS`] fields
/// get scanners of their own; the rest is scanned by catch-all scanners (per choice, then one
/// for all), which may join text of several fields but never skip any.
#[derive(Debug, Default)]
pub struct ResponseScan {
    choices: std::collections::HashMap<u64, ChoiceScan>,
    fields: usize,
    rest: StreamScan,
    /// A body's raw bytes.
    raw: StreamScan,
    /// A body's JSON strings, decoded.
    strings: JsonStrings,
    string_scan: StreamScan,
    matches: Vec<(u64, Box<str>)>,
}

impl ResponseScan {
    /// Scan one whole SSE event (its `data:` lines joined as a client joins them).
    pub fn event(&mut self, pats: &LeakPatterns, tenant: &str, ev: &[u8], out: &mut Vec<Hit>) {
        let mut lines: Vec<&[u8]> = Vec::new();
        for line in ev.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match line.strip_prefix(b"data:") {
                Some(d) => lines.push(d.strip_prefix(b" ").unwrap_or(d)),
                None if !line.is_empty() => self.feed_at(pats, tenant, 0, ":sse", line, out),
                None => {}
            }
        }
        if lines.is_empty() {
            return;
        }
        let data = lines.join(&b'\n');
        match serde_json::from_slice::<serde_json::Value>(&data) {
            Ok(v) => self.walk_event(pats, tenant, &v, out),
            Err(_) => self.feed_at(pats, tenant, 0, ":data", &data, out),
        }
    }

    /// Scan the next piece of a body that is not an event stream, from its first byte.
    pub fn body(&mut self, pats: &LeakPatterns, tenant: &str, data: &[u8], out: &mut Vec<Hit>) {
        self.raw.feed(pats, tenant, data, out);
        let Self {
            strings,
            string_scan,
            ..
        } = self;
        strings.decode(data, |piece| match piece {
            Some(text) => string_scan.feed(pats, tenant, text, out),
            // A string ended: the next one is scanned on its own.
            None => string_scan.buf.clear(),
        });
    }

    /// The (choice, field path) of each match found in events so far (at most 64; a
    /// catch-all scanner's path is [`CATCH_ALL`], the choice of the last one `u64::MAX`).
    pub fn matches(&self) -> &[(u64, Box<str>)] {
        &self.matches
    }

    fn walk_event(
        &mut self,
        pats: &LeakPatterns,
        tenant: &str,
        v: &serde_json::Value,
        out: &mut Vec<Hit>,
    ) {
        let serde_json::Value::Object(o) = v else {
            let mut path = String::new();
            return self.walk(pats, tenant, 0, &mut path, v, out);
        };
        let index = |k: &str| o.get(k).and_then(|i| i.as_u64());
        // Responses API events: one stream per output item, content part and event type.
        let mut prefix = String::new();
        if let Some(t) = o.get("type").and_then(|t| t.as_str()) {
            prefix.push_str(t);
            for k in ["content_index", "summary_index"] {
                if let Some(i) = index(k) {
                    prefix.push_str(&format!("#{i}"));
                }
            }
        }
        let choice = index("output_index").unwrap_or(0);
        let mut path = String::with_capacity(64);
        for (k, x) in o {
            self.key(pats, tenant, choice, &prefix, k, out);
            path.clear();
            if k == "choices"
                && let Some(choices) = x.as_array()
            {
                for (pos, c) in choices.iter().enumerate() {
                    let i = c
                        .get("index")
                        .and_then(|i| i.as_u64())
                        .unwrap_or(pos as u64);
                    path.clear();
                    self.walk(pats, tenant, i, &mut path, c, out);
                }
                continue;
            }
            path.push_str(&prefix);
            path.push('.');
            path.push_str(k);
            self.walk(pats, tenant, choice, &mut path, x, out);
        }
    }

    /// An object key: scanned on its own (keys are whole in every event).
    fn key(
        &mut self,
        pats: &LeakPatterns,
        tenant: &str,
        choice: u64,
        path: &str,
        k: &str,
        out: &mut Vec<Hit>,
    ) {
        pats.each_match(k.as_bytes(), |id, _| {
            if pats.push(tenant, id, Where::Response, out) {
                record(&mut self.matches, choice, &format!("{path}{{}}"));
            }
        });
    }

    fn walk(
        &mut self,
        pats: &LeakPatterns,
        tenant: &str,
        choice: u64,
        path: &mut String,
        v: &serde_json::Value,
        out: &mut Vec<Hit>,
    ) {
        let len = path.len();
        match v {
            serde_json::Value::String(s) => {
                self.feed_at(pats, tenant, choice, path, s.as_bytes(), out)
            }
            serde_json::Value::Array(a) => {
                for x in a {
                    match x.get("index").and_then(|i| i.as_u64()) {
                        Some(i) => {
                            use std::fmt::Write as _;
                            let _ = write!(path, "[{i}]");
                        }
                        None => path.push_str("[]"),
                    }
                    self.walk(pats, tenant, choice, path, x, out);
                    path.truncate(len);
                }
            }
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    self.key(pats, tenant, choice, path, k, out);
                    path.push('.');
                    path.push_str(k);
                    self.walk(pats, tenant, choice, path, x, out);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }

    /// Feed `data` to the scanner of (`choice`, `path`), or to a catch-all one.
    fn feed_at(
        &mut self,
        pats: &LeakPatterns,
        tenant: &str,
        choice: u64,
        path: &str,
        data: &[u8],
        out: &mut Vec<Hit>,
    ) {
        let Self {
            choices,
            fields,
            rest,
            matches,
            ..
        } = self;
        let (scan, key_choice, key_path) =
            if !choices.contains_key(&choice) && choices.len() >= MAX_CHOICE_STREAMS {
                (rest, u64::MAX, CATCH_ALL)
            } else {
                let c = choices.entry(choice).or_default();
                if path.len() > MAX_PATH {
                    (&mut c.rest, choice, CATCH_ALL)
                } else if c.fields.contains_key(path) {
                    (c.fields.get_mut(path).expect("present"), choice, path)
                } else if *fields < MAX_FIELD_STREAMS {
                    *fields += 1;
                    (c.fields.entry(path.into()).or_default(), choice, path)
                } else {
                    (&mut c.rest, choice, CATCH_ALL)
                }
            };
        scan.feed_ids(pats, data, |id| {
            if pats.push(tenant, id, Where::Response, out) {
                record(matches, key_choice, key_path);
            }
        });
    }
}

fn record(matches: &mut Vec<(u64, Box<str>)>, choice: u64, path: &str) {
    if matches.len() < MAX_MATCHES {
        matches.push((choice, path.into()));
    }
}

/// The strings of a JSON text fed in pieces, decoded (`\n`, `\"`, `\u0041`, ...; a `\u`
/// escape of a non-ASCII character decodes to the byte 0xFF, which no pattern contains).
#[derive(Debug, Default)]
struct JsonStrings {
    in_str: bool,
    esc: bool,
    /// Inside `\uXXXX`: hex digits read so far and their value.
    hex: Option<(u8, u32)>,
    out: Vec<u8>,
}

impl JsonStrings {
    /// `emit(Some(text))` for decoded string text, `emit(None)` where a string ends.
    fn decode(&mut self, data: &[u8], mut emit: impl FnMut(Option<&[u8]>)) {
        for &b in data {
            if !self.in_str {
                self.in_str = b == b'"';
                continue;
            }
            if let Some((n, v)) = self.hex {
                match (b as char).to_digit(16) {
                    Some(d) if n < 3 => {
                        self.hex = Some((n + 1, v * 16 + d));
                        continue;
                    }
                    Some(d) => {
                        let c = char::from_u32(v * 16 + d).filter(char::is_ascii);
                        self.out.push(c.map_or(0xFF, |c| c as u8));
                        self.hex = None;
                        continue;
                    }
                    // Not JSON: the escape ends here, as no pattern byte (the raw scan still
                    // sees the bytes).
                    None => {
                        self.out.push(0xFF);
                        self.hex = None;
                    }
                }
            }
            if self.esc {
                self.esc = false;
                match b {
                    b'u' => self.hex = Some((0, 0)),
                    b'n' => self.out.push(b'\n'),
                    b't' => self.out.push(b'\t'),
                    b'r' => self.out.push(b'\r'),
                    b'b' => self.out.push(0x08),
                    b'f' => self.out.push(0x0C),
                    other => self.out.push(other),
                }
                continue;
            }
            match b {
                b'\\' => self.esc = true,
                b'"' => {
                    self.in_str = false;
                    emit(Some(&self.out));
                    self.out.clear();
                    emit(None);
                }
                _ => self.out.push(b),
            }
        }
        // What the piece brought of an open string is scanned now, before the piece is sent.
        emit(Some(&self.out));
        self.out.clear();
    }
}

#[cfg(test)]
mod tests;
