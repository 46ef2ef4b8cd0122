//! What a client sees of an answer: a server-sent event stream parsed as an EventSource or the
//! OpenAI SDKs parse it ([`SseParser`]), each event's JSON decoded and its string values
//! concatenated per choice and per field ([`Transcript`]), so a secret streamed a few
//! characters per event is searched for in the text a client puts together, not in the raw
//! bytes (where event framing sits between its pieces).
//!
//! A location names where a string was: `choice 0, delta.content`,
//! `choice 1, delta.tool_calls[0].function.arguments`,
//! `response.output_text.delta (output 0, content 0), delta`, `error.message`. Array elements
//! that carry an integer `index` (chat choices, streamed tool calls) are keyed by it, not by
//! their position in one event, so the pieces of one choice join up across events and two
//! choices never do.

use serde_json::Value;
use std::collections::BTreeMap;

/// An incremental parser of `text/event-stream` (the WHATWG rules): lines end in CRLF, LF or
/// CR (also when a read ends between the CR and the LF); `data:` with or without one space;
/// the `data:` lines of one event joined by `\n`; a blank line ends the event; lines starting
/// with `:` are comments; other fields (`event:`, `id:`, `retry:`) are ignored.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
    first_line_done: bool,
}

impl SseParser {
    /// Feed the next piece of the stream as it was read; the data of each event it completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        self.lines(false, &mut out);
        out
    }

    /// The end of the stream. A last line or event without its terminator counts too (more
    /// than a browser shows, as a leak check should).
    pub fn finish(mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.lines(true, &mut out);
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut out);
        }
        out.extend(self.data.take());
        out
    }

    fn lines(&mut self, at_end: bool, out: &mut Vec<String>) {
        let mut start = 0;
        while let Some(rel) = self.buf[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let i = start + rel;
            let next = if self.buf[i] == b'\r' {
                match self.buf.get(i + 1) {
                    Some(b'\n') => i + 2,
                    Some(_) => i + 1,
                    // The LF of a CRLF may be in the next read.
                    None if !at_end => break,
                    None => i + 1,
                }
            } else {
                i + 1
            };
            let line = self.buf[start..i].to_vec();
            self.line(&line, out);
            start = next;
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<String>) {
        let text = String::from_utf8_lossy(line);
        let mut line: &str = &text;
        if !self.first_line_done {
            self.first_line_done = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            out.extend(self.data.take());
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

/// The location of data that is not JSON (its text is kept as it came).
pub const NOT_JSON: &str = "data that is not JSON";

/// The texts of a stream as a client reassembles them: every string value of every event,
/// concatenated per location (choice, JSON path; for the Responses API per event type,
/// `output_index`, `content_index`).
#[derive(Debug, Default)]
pub struct Transcript {
    texts: BTreeMap<String, String>,
    /// Events with data (`[DONE]` included).
    pub events: usize,
    /// An event was an error with code `canary_blocked` (the sidecar cut the stream).
    pub canary_blocked: bool,
}

impl Transcript {
    /// The transcript of a whole event stream.
    pub fn from_sse(body: &[u8]) -> Self {
        let mut p = SseParser::default();
        let mut t = Transcript::default();
        for data in p.feed(body) {
            t.event(&data);
        }
        for data in p.finish() {
            t.event(&data);
        }
        t
    }

    /// Add one event's data.
    pub fn event(&mut self, data: &str) {
        self.events += 1;
        let d = data.trim();
        if d == "[DONE]" || d.is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(d) {
            Ok(v) => {
                if v.pointer("/error/code").and_then(Value::as_str) == Some("canary_blocked") {
                    self.canary_blocked = true;
                }
                strings(&v, &mut |loc, s| {
                    self.texts.entry(loc).or_default().push_str(s);
                });
            }
            Err(_) => self
                .texts
                .entry(NOT_JSON.to_string())
                .or_default()
                .push_str(data),
        }
    }

    /// The reassembled text at `location`.
    pub fn text(&self, location: &str) -> Option<&str> {
        self.texts.get(location).map(String::as_str)
    }

    /// The locations whose reassembled text holds `needle` (ASCII case-insensitively, as the
    /// sidecar matches canaries), in order.
    pub fn find(&self, needle: &str) -> Vec<String> {
        self.texts
            .iter()
            .filter(|(_, t)| contains(t, needle))
            .map(|(l, _)| l.clone())
            .collect()
    }
}

/// The locations of the string values of a decoded answer that hold `needle` (each value on
/// its own, ASCII case-insensitively), in document order, each once.
pub fn find_in_value(v: &Value, needle: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    strings(v, &mut |loc, s| {
        if contains(s, needle) && !found.contains(&loc) {
            found.push(loc);
        }
    });
    found
}

/// `hay` holds `needle`, ASCII case-insensitively (an empty needle is never found).
pub fn contains(hay: &str, needle: &str) -> bool {
    !needle.is_empty()
        && hay
            .to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
}

enum Seg<'a> {
    Key(&'a str),
    Index(u64),
    Choice(u64),
}

/// Call `f(location, string)` for every string value of `v` (object keys are not values).
pub fn strings(v: &Value, f: &mut impl FnMut(String, &str)) {
    // A Responses API event: its deltas join up per type and output/content index.
    let mut prefix = None;
    if let Some(ty) = v.get("type").and_then(Value::as_str) {
        let idx: Vec<String> = [
            ("output_index", "output"),
            ("content_index", "content"),
            ("summary_index", "summary"),
        ]
        .iter()
        .filter_map(|(k, name)| v.get(*k)?.as_u64().map(|i| format!("{name} {i}")))
        .collect();
        if !idx.is_empty() {
            prefix = Some(format!("{ty} ({})", idx.join(", ")));
        }
    }
    walk(v, &mut Vec::new(), prefix.as_deref(), f);
}

fn walk<'a>(
    v: &'a Value,
    path: &mut Vec<Seg<'a>>,
    prefix: Option<&str>,
    f: &mut impl FnMut(String, &str),
) {
    match v {
        Value::String(s) => f(render(prefix, path), s),
        Value::Object(m) => {
            for (k, x) in m {
                path.push(Seg::Key(k));
                walk(x, path, prefix, f);
                path.pop();
            }
        }
        Value::Array(a) => {
            let choices = matches!(path.as_slice(), [Seg::Key("choices")]);
            for (pos, x) in a.iter().enumerate() {
                let i = x.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
                if choices {
                    // `choice N` replaces `choices`.
                    let top = path.pop();
                    path.push(Seg::Choice(i));
                    walk(x, path, prefix, f);
                    path.pop();
                    path.extend(top);
                } else {
                    path.push(Seg::Index(i));
                    walk(x, path, prefix, f);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn render(prefix: Option<&str>, path: &[Seg]) -> String {
    let mut head = prefix.map(str::to_string);
    let mut field = String::new();
    for s in path {
        match s {
            Seg::Choice(i) => head = Some(format!("choice {i}")),
            Seg::Key(k) => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(k);
            }
            Seg::Index(i) => field.push_str(&format!("[{i}]")),
        }
    }
    match (head, field.is_empty()) {
        (Some(h), true) => h,
        (Some(h), false) => format!("{h}, {field}"),
        (None, true) => "(the whole value)".to_string(),
        (None, false) => field,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "BHCANARY-3f9c1e7a2b";

    /// A chat chunk of `choice` carrying `content`.
    fn chunk(choice: u64, content: &str) -> String {
        serde_json::json!({"id": "c", "object": "chat.completion.chunk",
            "choices": [{"index": choice, "delta": {"content": content}, "finish_reason": null}]})
        .to_string()
    }

    /// Feed `body` cut at `cuts` (byte offsets, ascending).
    fn events_cut(body: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            out.extend(p.feed(&body[at..c]));
            at = c;
        }
        out.extend(p.feed(&body[at..]));
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_survive_every_split_crlf_cr_and_data_without_a_space() {
        // CRLF, LF and lone CR line ends; `data:` with and without a space; a comment; an
        // `event:` field; one event's JSON over two `data:` lines (a read ending between
        // their CR and LF must not end the event); a multi-byte character; [DONE].
        let body = "\u{feff}: keep-alive\r\n\r\nevent: message\r\ndata:{\"a\":\"x\u{e9}\"}\r\n\r\n\
                    data: {\"b\":\r\n\
                    data:  [1, 2]}\n\n\
                    data: {\"c\":3}\r\r\
                    data: [DONE]\n\n";
        let b = body.as_bytes();
        let want = vec![
            "{\"a\":\"x\u{e9}\"}".to_string(),
            "{\"b\":\n [1, 2]}".to_string(),
            "{\"c\":3}".to_string(),
            "[DONE]".to_string(),
        ];
        assert_eq!(events_cut(b, &[]), want);
        // Every single cut, and every pair of cuts (a CR and its LF in different reads, a
        // `data:` prefix or a UTF-8 character split).
        for i in 0..=b.len() {
            assert_eq!(events_cut(b, &[i]), want, "cut at {i}");
            for j in i..=b.len() {
                assert_eq!(events_cut(b, &[i, j]), want, "cuts at {i}, {j}");
            }
        }
        // Byte by byte.
        let every: Vec<usize> = (1..b.len()).collect();
        assert_eq!(events_cut(b, &every), want);
        // The multi-line JSON decodes (the newline is whitespace).
        let v: Value = serde_json::from_str(&want[1]).unwrap();
        assert_eq!(v["b"][1], 2);
    }

    #[test]
    fn a_last_event_without_its_blank_line_still_counts() {
        assert_eq!(
            events_cut(b"data: {\"x\":1}\n\ndata: tail", &[]),
            vec!["{\"x\":1}", "tail"]
        );
        // A lone CR at the very end ends the line.
        assert_eq!(events_cut(b"data: a\r", &[]), vec!["a"]);
        assert!(events_cut(b": only a comment\n\n", &[]).is_empty());
    }

    #[test]
    fn a_canary_streamed_three_characters_per_event_is_found_in_its_choice() {
        // Choice 0 and choice 1 alternate; the canary is in choice 0 only.
        let text0 = format!("the code word is {CANARY}, as asked");
        let text1 = "nothing to see in this other choice at all, none";
        let mut body = String::new();
        let (c0, c1): (Vec<char>, Vec<char>) = (text0.chars().collect(), text1.chars().collect());
        for i in 0..c0.len().max(c1.len()).div_ceil(3) {
            for (choice, chars) in [(0, &c0), (1, &c1)] {
                let piece: String = chars.iter().skip(3 * i).take(3).collect();
                if !piece.is_empty() {
                    body.push_str(&format!("data: {}\n\n", chunk(choice, &piece)));
                }
            }
        }
        body.push_str("data: [DONE]\n\n");
        // Not in the raw bytes: the event framing sits between its pieces.
        assert!(!body.contains(CANARY));
        let t = Transcript::from_sse(body.as_bytes());
        assert_eq!(t.text("choice 0, delta.content"), Some(text0.as_str()));
        assert_eq!(t.text("choice 1, delta.content"), Some(text1));
        assert_eq!(t.find(CANARY), vec!["choice 0, delta.content"]);
        // Matched ASCII case-insensitively, as the sidecar does.
        assert_eq!(
            t.find(&CANARY.to_lowercase()),
            vec!["choice 0, delta.content"]
        );
        assert!(!t.canary_blocked);
    }

    #[test]
    fn halves_of_a_canary_in_two_choices_are_no_leak() {
        // Choice 0 ends with the first half, choice 1 starts with the second, all of choice 0
        // first: the events' contents in arrival order would spell the canary, no client's
        // text does.
        let (h1, h2) = CANARY.split_at(9);
        let mut body = String::new();
        for p in ["some text ", "ending in ", h1] {
            body.push_str(&format!("data: {}\n\n", chunk(0, p)));
        }
        for p in [h2, " and more", " text"] {
            body.push_str(&format!("data: {}\n\n", chunk(1, p)));
        }
        let t = Transcript::from_sse(body.as_bytes());
        assert!(t.find(CANARY).is_empty(), "{:?}", t.texts);
        assert!(t.find(h1) == vec!["choice 0, delta.content"]);
        assert!(t.find(h2) == vec!["choice 1, delta.content"]);
    }

    #[test]
    fn every_field_a_client_reassembles() {
        let (h1, h2) = CANARY.split_at(7);
        let events = [
            // Reasoning (vLLM's two spellings), refusal, tool call name and arguments.
            serde_json::json!({"choices": [{"index": 2, "delta": {"reasoning_content": h1, "reasoning": h1, "refusal": h1,
                "tool_calls": [{"index": 1, "id": "t", "function": {"name": h1, "arguments": h1}}]}}]}),
            serde_json::json!({"choices": [{"index": 2, "delta": {"reasoning_content": h2, "reasoning": h2, "refusal": h2,
                "tool_calls": [{"index": 1, "function": {"name": h2, "arguments": h2}}]}}]}),
            // Completions.
            serde_json::json!({"choices": [{"index": 0, "text": h1}]}),
            serde_json::json!({"choices": [{"index": 0, "text": h2}]}),
            // Responses API: text deltas per output and content index; another content
            // index in between does not join.
            serde_json::json!({"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": h1}),
            serde_json::json!({"type": "response.output_text.delta", "output_index": 1, "content_index": 1, "delta": "zz"}),
            serde_json::json!({"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": h2}),
            // An unknown field: every string value joins per path.
            serde_json::json!({"choices": [{"index": 3, "delta": {"audio": {"transcript": h1}}}]}),
            serde_json::json!({"choices": [{"index": 3, "delta": {"audio": {"transcript": h2}}}]}),
        ];
        let mut body = String::new();
        for e in &events {
            body.push_str(&format!("data: {e}\n\n"));
        }
        let t = Transcript::from_sse(body.as_bytes());
        assert_eq!(
            t.find(CANARY),
            vec![
                "choice 0, text",
                "choice 2, delta.reasoning",
                "choice 2, delta.reasoning_content",
                "choice 2, delta.refusal",
                "choice 2, delta.tool_calls[1].function.arguments",
                "choice 2, delta.tool_calls[1].function.name",
                "choice 3, delta.audio.transcript",
                "response.output_text.delta (output 1, content 0), delta",
            ]
        );
    }

    #[test]
    fn data_that_is_not_json_and_the_sidecars_cut_are_seen() {
        let body = format!(
            "data: {CANARY}\n\ndata: {{\"error\":{{\"message\":\"cut\",\"type\":\"server_error\",\"code\":\"canary_blocked\"}}}}\n\n"
        );
        let t = Transcript::from_sse(body.as_bytes());
        assert_eq!(t.find(CANARY), vec![NOT_JSON]);
        assert!(t.canary_blocked);
        assert_eq!(t.events, 2);
        // A JSON escape hides the canary from the raw bytes, not from the decoded text.
        let escaped = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u0042HCANARY-3f9c1e7a2b\"}}]}\n\n";
        assert!(!escaped.contains(CANARY));
        assert_eq!(
            Transcript::from_sse(escaped.as_bytes()).find(CANARY),
            vec!["choice 0, delta.content"]
        );
    }

    #[test]
    fn a_whole_answer_is_searched_value_by_value() {
        let (h1, h2) = CANARY.split_at(9);
        let v = serde_json::json!({"id": "x", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": format!("a {h1}")}},
            {"index": 1, "message": {"role": "assistant", "content": format!("{h2} b"),
                "tool_calls": [{"function": {"name": "f", "arguments": format!("{{\"q\":\"{CANARY}\"}}")}}]}},
        ]});
        assert_eq!(
            find_in_value(&v, CANARY),
            vec!["choice 1, message.tool_calls[0].function.arguments"]
        );
        assert_eq!(
            find_in_value(
                &serde_json::json!({"output": [{"content": [{"text": CANARY}]}]}),
                CANARY
            ),
            vec!["output[0].content[0].text"]
        );
        assert!(find_in_value(&serde_json::json!(CANARY), "").is_empty());
        assert_eq!(
            find_in_value(&serde_json::json!(CANARY), CANARY),
            vec!["(the whole value)"]
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped_from_the_first_line_only() {
        let mut p = SseParser::default();
        let events = p.feed("\u{feff}data: first\n\ndata: second\n\n".as_bytes());
        assert_eq!(events, ["first", "second"]);
    }

    #[test]
    fn the_done_marker_and_empty_events_carry_no_text() {
        let body = format!("data: {}\n\ndata: [DONE]\n\n", chunk(0, "hi"));
        let t = Transcript::from_sse(body.as_bytes());
        assert!(t.find("DONE").is_empty(), "{:?}", t.find("DONE"));
        assert_eq!(t.find("hi").len(), 1);
    }
}
