//! The response on its way back: metered (usage, chunks, time to first token, KV tokens) and
//! delivered so that a client that stops reading can never hold what the request holds
//! (a fair-queue slot, the cache gate, a reservation):
//! - a non-streamed response up to [`BUFFER_UP_TO`] is read whole from the upstream, the
//!   exchange finishes, and only then is the body written to the client;
//! - a stream (or a larger body) is pumped by its own task through a small channel; when the
//!   client has not taken a frame for `http.response_write_idle_timeout_ms` the response is
//!   cut, the upstream request dropped (cancelling it) and the exchange finished.

use super::exchange::{Cut, Exchange, MAX_MODEL, Scanned, Usage};
use super::refusal::{Refusal, RefusalCode, rate_headers};
use crate::http_util::{BoxError, ProxyBody, full};
use crate::proxy::upstream::strip_hop_by_hop;
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Non-streamed responses up to this size are read whole before being written to the client.
pub const BUFFER_UP_TO: usize = 1 << 20;
/// Frames in flight between the pump and the client connection.
const PUMP_FRAMES: usize = 4;
/// The largest `usage` object kept by the scanner.
const MAX_USAGE_BYTES: usize = 4096;

/// The parts of a response (or stream event) the sidecar reads.
#[derive(serde::Deserialize)]
struct ResponseView {
    #[serde(default)]
    usage: Option<UsageView>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    /// The Responses API's stream events carry usage in `response.usage`.
    #[serde(default)]
    response: Option<InnerResponse>,
    /// The model that served the answer.
    #[serde(default)]
    model: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct InnerResponse {
    #[serde(default)]
    usage: Option<UsageView>,
    #[serde(default)]
    model: Option<serde_json::Value>,
}

impl ResponseView {
    /// The model the answer names: its `model`, or the Responses API's `response.model`.
    fn served_model(&self) -> Option<String> {
        model_name(
            self.model
                .as_ref()
                .or(self.response.as_ref().and_then(|r| r.model.as_ref())),
        )
    }
}

/// A served model name as kept: a string, cut to [`MAX_MODEL`] bytes.
fn model_name(v: Option<&serde_json::Value>) -> Option<String> {
    let mut m = v?.as_str()?.to_string();
    m.truncate(m.floor_char_boundary(MAX_MODEL));
    Some(m)
}

#[derive(serde::Deserialize)]
pub struct UsageView {
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<TokenDetails>,
}

/// `prompt_tokens_details` (Chat, Completions) or `input_tokens_details` (Responses).
#[derive(serde::Deserialize)]
struct TokenDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl UsageView {
    fn usage(&self) -> Usage {
        let prompt = self.prompt_tokens.unwrap_or(0);
        let completion = self
            .completion_tokens
            .unwrap_or_else(|| self.total_tokens.map_or(0, |t| t.saturating_sub(prompt)));
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(prompt);
        Usage {
            prompt,
            completion,
            cached,
        }
    }
}

/// Finds the top-level `"usage"` object and `"model"` string of a JSON document of any size,
/// fed in pieces.
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// The last key at depth 1 was "model" and its value has not started.
    model_next: bool,
    /// The raw text of the top-level `model` string, while it is read.
    model_capture: Option<Vec<u8>>,
    model: Option<Vec<u8>>,
    depth: u32,
    in_str: bool,
    esc: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    key: Option<Vec<u8>>,
    /// The last key at depth 1 was "usage" and its value has not started.
    usage_next: bool,
    capture: Option<Vec<u8>>,
    found: Option<Vec<u8>>,
}

impl UsageScanner {
    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if let Some(c) = &mut self.capture {
                if c.len() < MAX_USAGE_BYTES {
                    c.push(b);
                } else {
                    self.capture = None;
                }
            }
            if self.in_str {
                let closes = !self.esc && b == b'"';
                if let Some(m) = &mut self.model_capture
                    && !closes
                {
                    if m.len() < 4 * MAX_MODEL {
                        m.push(b);
                    } else {
                        self.model_capture = None;
                    }
                }
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if closes {
                    self.in_str = false;
                    if let Some(k) = self.key.take() {
                        self.usage_next = k == b"usage";
                        self.model_next = k == b"model";
                    } else if let Some(m) = self.model_capture.take() {
                        self.model = Some(m);
                    }
                } else if let Some(k) = &mut self.key
                    && k.len() < 8
                {
                    k.push(b);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    if self.depth == 1 && self.expect_key {
                        self.key = Some(Vec::new());
                        self.expect_key = false;
                    } else if self.model_next {
                        // The value of the top-level "model" key (after a key, the next
                        // string is its value unless an object or array came first).
                        self.model_capture = Some(Vec::new());
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 1 && self.usage_next && b == b'{' {
                        self.capture = Some(vec![b'{']);
                    }
                    self.usage_next = false;
                    self.model_next = false;
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expect_key = b == b'{';
                    }
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 1
                        && let Some(c) = self.capture.take()
                    {
                        self.found = Some(c);
                    }
                }
                b',' if self.depth == 1 => {
                    self.expect_key = true;
                    self.usage_next = false;
                }
                b':' | b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => self.usage_next = false,
            }
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        let f = self.found.as_deref()?;
        serde_json::from_slice::<UsageView>(f)
            .ok()
            .map(|u| u.usage())
    }

    /// The top-level `model` string (escapes decoded, cut to [`MAX_MODEL`] bytes).
    pub fn model(&self) -> Option<String> {
        let raw = self.model.as_deref()?;
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        let v = serde_json::from_slice::<serde_json::Value>(&quoted).ok()?;
        model_name(Some(&v))
    }
}

fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Look at one SSE event: record usage and count content chunks; false to drop it.
fn inspect_event(ev: &[u8], strip_usage: bool, ex: &mut Exchange) -> bool {
    let mut keep = true;
    for line in ev.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" || data.is_empty() {
            continue;
        }
        let has_usage = data.windows(7).any(|w| w == b"\"usage\"");
        // The served model, from the first event that names it.
        let has_model =
            ex.meter().served_model.is_none() && data.windows(7).any(|w| w == b"\"model\"");
        let view = if has_usage || has_model {
            serde_json::from_slice::<ResponseView>(data).ok()
        } else {
            None
        };
        let Some(v) = view else {
            ex.meter().chunks += 1;
            continue;
        };
        if ex.meter().served_model.is_none() {
            ex.meter().served_model = v.served_model();
        }
        let usage = v
            .usage
            .as_ref()
            .or(v.response.as_ref().and_then(|r| r.usage.as_ref()));
        if let Some(u) = usage {
            ex.meter().usage = Some(u.usage());
        }
        let empty_choices = v.choices.as_ref().is_some_and(|c| c.is_empty());
        if empty_choices && strip_usage {
            keep = false;
        } else if !empty_choices {
            ex.meter().chunks += 1;
        }
    }
    keep
}

/// Sent in place of the rest of a stream cut for another tenant's canary.
const CANARY_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the response carried a marker that belongs to another tenant's data and was cut\",\"type\":\"server_error\",\"code\":\"canary_blocked\"}}\n\n";

enum Filter {
    Sse {
        buf: BytesMut,
        strip_usage: bool,
    },
    /// A buffered body is parsed whole at its end (`None`); a pumped one is scanned.
    Json(Option<UsageScanner>),
}

impl Filter {
    fn data(&mut self, data: Bytes, ex: &mut Exchange) -> Option<Bytes> {
        if !data.is_empty() {
            ex.first_byte();
        }
        match self {
            Filter::Json(scan) => {
                if let Some(scan) = scan {
                    scan.feed(&data);
                    // Pumped: scanned as it goes (a buffered body is scanned whole at its end).
                    if ex.scan_response(Scanned::Body(&data)) {
                        return None;
                    }
                }
                Some(data)
            }
            Filter::Sse { buf, strip_usage } => {
                buf.extend_from_slice(&data);
                let mut out = BytesMut::new();
                while let Some(end) = event_end(buf) {
                    let ev = buf.split_to(end);
                    if ex.scan_response(Scanned::Event(&ev)) {
                        // The event that completes another tenant's canary is withheld.
                        out.extend_from_slice(CANARY_EVENT);
                        buf.clear();
                        break;
                    }
                    if inspect_event(&ev, *strip_usage, ex) {
                        out.extend_from_slice(&ev);
                    }
                }
                ex.kv_sync();
                (!out.is_empty()).then(|| out.freeze())
            }
        }
    }

    /// The end of the body; `whole` is the body when it was buffered.
    fn end(&mut self, ex: &mut Exchange, whole: Option<&[u8]>) -> Option<Bytes> {
        let tail = match self {
            Filter::Json(scan) => {
                (ex.meter().usage, ex.meter().served_model) = match (scan, whole) {
                    (Some(scan), _) => (scan.usage(), scan.model()),
                    (None, Some(body)) => match serde_json::from_slice::<ResponseView>(body) {
                        Ok(v) => (v.usage.as_ref().map(|u| u.usage()), v.served_model()),
                        Err(_) => (None, None),
                    },
                    (None, None) => (None, None),
                };
                None
            }
            Filter::Sse { buf, strip_usage } => {
                let ev = buf.split();
                (!ev.is_empty() && inspect_event(&ev, *strip_usage, ex)).then(|| ev.freeze())
            }
        };
        ex.meter().ended = true;
        tail
    }
}

/// The answer carries a `content-encoding` other than `identity`.
fn encoded(h: &http::HeaderMap) -> bool {
    h.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .any(|e| !e.trim().eq_ignore_ascii_case("identity"))
        })
    })
}

/// Meter and deliver the upstream's response.
pub async fn respond(
    mut ex: Exchange,
    resp: Response<Incoming>,
    strip_usage: bool,
    write_idle: Duration,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    let (mut parts, mut body) = resp.into_parts();
    ex.answered(parts.status);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(info) = ex.rate_info() {
        rate_headers(&mut parts.headers, info);
    }
    if encoded(&parts.headers) {
        // Asked for `identity`; an answer it cannot read can be neither scanned nor metered.
        // Nothing of it is counted: settled like an answer that broke off (refunded).
        tracing::warn!(request_id = %ex.request_id(), "upstream answer is content-encoded");
        let r = Refusal::new(
            RefusalCode::UpstreamEncodedResponse,
            "the inference server's answer was content-encoded although the sidecar asked for \
             identity; it cannot be scanned or metered and was withheld",
        );
        let resp = r.response();
        ex.refuse(r);
        return resp;
    }
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        if strip_usage {
            // The body may lose its usage chunk: its length is no longer known.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let filter = Filter::Sse {
            buf: BytesMut::new(),
            strip_usage,
        };
        return Response::from_parts(parts, pump(ex, body, filter, None, write_idle));
    }
    let mut filter = Filter::Json(None);
    let mut buf = BytesMut::new();
    // Read the whole answer (up to BUFFER_UP_TO) within the response deadline.
    let read = async {
        loop {
            match body.frame().await {
                None => return Ok(false),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && let Some(out) = filter.data(data, &mut ex)
                    {
                        buf.extend_from_slice(&out);
                        if buf.len() > BUFFER_UP_TO {
                            return Ok(true);
                        }
                    }
                }
            }
        }
    };
    let refusal = match tokio::time::timeout_at(deadline, read).await {
        // Scanned whole before any byte is sent; one too large to buffer, from its first byte.
        Ok(Ok(_)) if ex.scan_response(Scanned::Body(&buf)) => {
            // The answer carried another tenant's canary: it never reaches the client. The
            // upstream did the work: its usage is settled as answered.
            filter.end(&mut ex, Some(&buf));
            ex.withheld(StatusCode::BAD_GATEWAY);
            let resp = Refusal::new(
                RefusalCode::CanaryWithheld,
                "the inference server's answer carried a marker that belongs to another \
                 tenant's data and was withheld",
            )
            .response();
            drop(ex);
            return resp;
        }
        Ok(Ok(false)) => None,
        Ok(Ok(true)) => {
            // Too large to buffer: metered and scanned as it streams, from the start (the
            // prefix was scanned above).
            let mut scan = UsageScanner::default();
            scan.feed(&buf);
            filter = Filter::Json(Some(scan));
            let prefix = buf.freeze();
            return Response::from_parts(parts, pump(ex, body, filter, Some(prefix), write_idle));
        }
        Ok(Err(e)) => {
            tracing::warn!(request_id = %ex.request_id(), error = %e, "upstream response body failed");
            Some(Refusal::new(
                RefusalCode::UpstreamBodyError,
                "the inference server's answer broke off",
            ))
        }
        Err(_) => Some(Refusal::new(
            RefusalCode::UpstreamTimeout,
            "the inference server did not finish its answer in time",
        )),
    };
    if let Some(r) = refusal {
        let resp = r.response();
        ex.refuse(r);
        return resp;
    }
    filter.end(&mut ex, Some(&buf));
    drop(ex);
    Response::from_parts(parts, full(buf.freeze()))
}

type Item = Result<Frame<Bytes>, BoxError>;

/// The client's side of a pumped response.
struct PumpedBody {
    rx: mpsc::Receiver<Item>,
    /// Set when the pump cut the response: its end is then an error, not a clean end.
    cut: Arc<AtomicBool>,
}

impl Body for PumpedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if self.cut.load(Ordering::Acquire) => {
                Poll::Ready(Some(Err("response cut".into())))
            }
            other => other,
        }
    }
}

fn pump(
    mut ex: Exchange,
    mut body: Incoming,
    mut filter: Filter,
    prefix: Option<Bytes>,
    write_idle: Duration,
) -> ProxyBody {
    let (tx, rx) = mpsc::channel::<Item>(PUMP_FRAMES);
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    tokio::spawn(async move {
        // Deliver one frame; false when the response must stop.
        async fn send(
            tx: &mpsc::Sender<Item>,
            data: Bytes,
            idle: Duration,
            ex: &mut Exchange,
        ) -> bool {
            match tokio::time::timeout(idle, tx.send(Ok(Frame::data(data)))).await {
                Ok(Ok(())) => true,
                Ok(Err(_)) => {
                    ex.cut(Cut::ClientGone);
                    false
                }
                Err(_) => {
                    tracing::info!(request_id = %ex.request_id(), "response cut: the client stopped reading");
                    ex.cut(Cut::WriteTimeout);
                    false
                }
            }
        }
        let mut go = match prefix {
            Some(p) => send(&tx, p, write_idle, &mut ex).await,
            None => true,
        };
        while go {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tx.closed() => {
                    ex.cut(Cut::ClientGone);
                    break;
                }
            };
            match frame {
                None => {
                    if let Some(t) = filter.end(&mut ex, None) {
                        send(&tx, t, write_idle, &mut ex).await;
                    }
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(request_id = %ex.request_id(), error = %e, "upstream response body failed");
                    ex.cut(Cut::UpstreamError);
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(out) = filter.data(data, &mut ex) {
                            go = send(&tx, out, write_idle, &mut ex).await;
                        }
                        if ex.leak_blocked() {
                            // Cut for another tenant's canary: an SSE stream ended with its
                            // error event; any other body breaks off.
                            if !matches!(filter, Filter::Sse { .. }) {
                                ex.cut(Cut::UpstreamError);
                            }
                            break;
                        }
                    }
                    Err(trailers) => go = tx.send(Ok(trailers)).await.is_ok(),
                },
            }
        }
        if ex.is_cut() {
            flag.store(true, Ordering::Release);
        }
        // Dropping the upstream body cancels the upstream request; `ex` finishes here.
        drop(body);
        drop(ex);
    });
    PumpedBody { rx, cut }.boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_event_boundaries() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\nx"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
    }

    #[test]
    fn only_an_identity_content_encoding_is_readable() {
        let mut h = http::HeaderMap::new();
        assert!(!encoded(&h));
        for (v, want) in [
            ("identity", false),
            (" Identity ", false),
            ("identity, identity", false),
            ("gzip", true),
            ("identity, gzip", true),
            ("br", true),
            ("", true),
        ] {
            h.insert(header::CONTENT_ENCODING, v.parse().unwrap());
            assert_eq!(encoded(&h), want, "{v:?}");
        }
        // A second header counts too; so does a value that is not text.
        h.insert(header::CONTENT_ENCODING, "identity".parse().unwrap());
        h.append(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        assert!(encoded(&h));
        h.insert(
            header::CONTENT_ENCODING,
            http::HeaderValue::from_bytes(b"\xffgzip").unwrap(),
        );
        assert!(encoded(&h));
    }

    #[test]
    fn an_answer_names_its_model_at_the_top_or_in_its_response() {
        let served = |doc: &str| {
            serde_json::from_str::<ResponseView>(doc)
                .unwrap()
                .served_model()
        };
        assert_eq!(
            served(r#"{"model":"c","choices":[]}"#).as_deref(),
            Some("c")
        );
        assert_eq!(
            served(r#"{"type":"response.created","response":{"model":"r","usage":null}}"#)
                .as_deref(),
            Some("r")
        );
        assert_eq!(
            served(r#"{"model":"top","response":{"model":"inner"}}"#).as_deref(),
            Some("top")
        );
        assert_eq!(served(r#"{"model":7,"choices":[]}"#), None);
        assert_eq!(served(r#"{"choices":[{"model":"x"}]}"#), None);
        let long = format!(r#"{{"model":"{}"}}"#, "é".repeat(MAX_MODEL));
        let m = served(&long).unwrap();
        assert!(
            m.len() <= MAX_MODEL && m.len() > MAX_MODEL - 2,
            "{}",
            m.len()
        );
    }

    fn model(pieces: &[&[u8]]) -> Option<String> {
        let mut s = UsageScanner::default();
        for p in pieces {
            s.feed(p);
        }
        s.model()
    }

    #[test]
    fn the_served_model_is_the_top_level_model_string_in_any_split() {
        let doc = br#"{"id":"x","choices":[{"model":"inner","text":"\"model\": \"no\""}],"modelx":"y","model" : "served\/m\u0031","usage":{"model":"u"}}"#;
        assert_eq!(model(&[doc]).as_deref(), Some("served/m1"));
        for cut in 1..doc.len() {
            assert_eq!(
                model(&[&doc[..cut], &doc[cut..]]).as_deref(),
                Some("served/m1"),
                "split at {cut}"
            );
        }
        // Not a string, not top-level, absent: none.
        for doc in [
            &br#"{"model":5,"x":"y"}"#[..],
            br#"{"model":null,"x":"y"}"#,
            br#"{"model":{"name":"m"},"x":"y"}"#,
            br#"{"model":["m"],"x":"y"}"#,
            br#"{"choices":[{"model":"m"}]}"#,
            br#"{"x":"model","y":"m"}"#,
            br#"{"usage":{"prompt_tokens":1}}"#,
        ] {
            assert_eq!(model(&[doc]), None, "{}", String::from_utf8_lossy(doc));
        }
        // A long name is cut; one too long to keep is dropped.
        let long = |n: usize| format!(r#"{{"model":"{}","x":"y"}}"#, "a".repeat(n));
        assert_eq!(model(&[long(300).as_bytes()]), Some("a".repeat(MAX_MODEL)));
        assert_eq!(
            model(&[long(4 * MAX_MODEL).as_bytes()]).map(|m| m.len()),
            Some(MAX_MODEL)
        );
        assert_eq!(model(&[long(4 * MAX_MODEL + 1).as_bytes()]), None);
        // The usage beside it is still found.
        let mut s = UsageScanner::default();
        s.feed(br#"{"model":"m","usage":{"prompt_tokens":2,"completion_tokens":3}}"#);
        assert_eq!(
            (s.model().as_deref(), s.usage().map(|u| u.total())),
            (Some("m"), Some(5))
        );
    }

    fn scan(pieces: &[&[u8]]) -> Option<Usage> {
        let mut s = UsageScanner::default();
        for p in pieces {
            s.feed(p);
        }
        s.usage()
    }

    #[test]
    fn usage_is_found_at_the_top_level_only_in_any_split() {
        let doc = br#"{"id":"x","choices":[{"usage":{"prompt_tokens":999},"text":"a \"usage\": {}"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12},"z":1}"#;
        let want = Some(Usage {
            prompt: 5,
            completion: 7,
            cached: 0,
        });
        assert_eq!(scan(&[doc]), want);
        for cut in 1..doc.len() {
            assert_eq!(scan(&[&doc[..cut], &doc[cut..]]), want, "split at {cut}");
        }
        // Responses API names; usage first; no usage.
        assert_eq!(
            scan(&[br#"{"usage":{"input_tokens":3,"output_tokens":4},"output":[]}"#]),
            Some(Usage {
                prompt: 3,
                completion: 4,
                cached: 0,
            })
        );
        // Cached prompt tokens, as Chat and Responses name them.
        assert_eq!(
            scan(&[
                br#"{"usage":{"prompt_tokens":9,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":8}}}"#
            ])
            .map(|u| u.cached),
            Some(8)
        );
        assert_eq!(
            scan(&[
                br#"{"usage":{"input_tokens":9,"output_tokens":1,"input_tokens_details":{"cached_tokens":99}}}"#
            ])
            .map(|u| u.cached),
            Some(9)
        );
        assert_eq!(
            scan(&[br#"{"choices":[{"usage":{"prompt_tokens":1}}]}"#]),
            None
        );
        assert_eq!(scan(&[br#"{"usage":null}"#]), None);
    }

    #[test]
    fn a_large_body_is_scanned_in_pieces() {
        let mut doc = br#"{"data":[""#.to_vec();
        doc.extend(std::iter::repeat_n(b'x', 3 * BUFFER_UP_TO));
        doc.extend_from_slice(br#""],"usage":{"prompt_tokens":40000,"total_tokens":40000}}"#);
        let pieces: Vec<&[u8]> = doc.chunks(16 * 1024).collect();
        assert_eq!(
            scan(&pieces),
            Some(Usage {
                prompt: 40000,
                completion: 0,
                cached: 0,
            })
        );
    }

    #[test]
    fn a_usage_object_is_kept_up_to_its_bound() {
        // `{"prompt_tokens":7,"x":"xx...x"}`, `len` bytes long.
        let object = |len: usize| {
            let head = r#"{"prompt_tokens":7,"x":""#;
            format!("{head}{}\"}}", "x".repeat(len - head.len() - 2))
        };
        assert_eq!(object(100).len(), 100);
        let doc = |len: usize| format!(r#"{{"usage":{}}}"#, object(len));
        let got = |len: usize| scan(&[doc(len).as_bytes()]).map(|u| u.prompt);
        assert_eq!(got(MAX_USAGE_BYTES), Some(7));
        assert_eq!(got(MAX_USAGE_BYTES + 1), None);
    }

    #[test]
    fn an_event_ends_at_its_blank_line_lf_or_crlf() {
        assert_eq!(event_end(b"data: x\n\n"), Some(9));
        assert_eq!(event_end(b"data: x\n\r\nmore"), Some(10));
        assert_eq!(event_end(b"data: x\n\rz"), None);
        assert_eq!(event_end(b"data: x\n"), None);
        assert_eq!(event_end(b"\n"), None);
        assert_eq!(event_end(b""), None);
    }

    #[test]
    fn only_the_top_level_usage_is_read() {
        let doc =
            br#"{"choices":[{"a":1,"usage":{"prompt_tokens":999}}],"usage":{"prompt_tokens":7}}"#;
        assert_eq!(scan(&[doc]).map(|u| u.prompt), Some(7));
        let nested_only = br#"{"choices":[{"a":1,"usage":{"prompt_tokens":999}}]}"#;
        assert_eq!(scan(&[nested_only]), None);
    }
}
