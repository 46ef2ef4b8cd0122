//! The inspection as it was before the single pass ([`super::scan`]): the whole body parsed
//! into a `serde_json::Value`, checked and re-serialised. Kept for the tests, which hold the
//! single pass to the same answers (refusals, reservations, owned values, prompt hash and
//! forwarded object).

use super::{
    Class, Engine, Inspected, MAX_DEPTH, MEDIA_PAYLOAD, MEDIA_TYPES, Policy, bad, class_of,
    depth_ok, engine_field, engine_fields, generation, tool_name,
};
use crate::auth::scope::Scope;
use crate::proxy::refusal::{Refusal, RefusalCode};
use crate::proxy::routes::{Api, Route};
use crate::proxy::schema::Body;
use bytes::Bytes;
use serde_json::{Map, Value};

/// What the prompt-bearing fields hold.
#[derive(Debug, Default)]
struct Tally {
    text_bytes: usize,
    /// Numbers: token ids (counted as one token each), or numbers the template renders.
    numbers: u64,
    media: u64,
}

impl Tally {
    /// A prompt-bearing value: every string (and object key, which a template renders for
    /// tool schemas) counted and copied into `text`; a media part charged as one part, its
    /// payload neither counted nor copied.
    fn add(&mut self, v: &Value, text: &mut Vec<u8>) {
        match v {
            Value::String(s) => {
                self.text_bytes += s.len();
                text.extend_from_slice(s.as_bytes());
            }
            Value::Number(_) => self.numbers += 1,
            Value::Bool(_) | Value::Null => {}
            Value::Array(a) => a.iter().for_each(|x| self.add(x, text)),
            Value::Object(o) => {
                let media = o
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| MEDIA_TYPES.contains(&t));
                if media {
                    self.media += 1;
                }
                for (k, x) in o {
                    if media && MEDIA_PAYLOAD.contains(&k.as_str()) {
                        continue;
                    }
                    self.text_bytes += k.len();
                    // A part's `type` is no text the model reads: left out of the scanned
                    // text, so consecutive text parts read as the one text they render to.
                    if k == "type"
                        && let Value::String(t) = x
                    {
                        self.text_bytes += t.len();
                        continue;
                    }
                    self.add(x, text);
                }
            }
        }
    }
}

/// Parse, check and rewrite the body of an inspected route.
pub fn inspect(route: Route, body: &[u8], policy: Policy<'_>) -> Result<Inspected, Refusal> {
    let Some(schema) = route.body() else {
        return Err(Refusal::new(
            RefusalCode::InvalidParameter,
            "this route takes no inspected body",
        ));
    };
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            RefusalCode::InvalidJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !depth_ok(&v) {
        return Err(Refusal::new(
            RefusalCode::InvalidJson,
            format!("the request body nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    let Some(obj) = v.as_object_mut() else {
        return Err(Refusal::new(
            RefusalCode::InvalidJson,
            "the request body must be a JSON object",
        ));
    };
    let mut info = Inspected {
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        prompts: 1,
        ..Inspected::default()
    };
    let mut prompt_fields: Vec<String> = Vec::new();
    let mut owned: Vec<(String, Engine)> = Vec::new();
    for key in obj.keys() {
        match class_of(schema, key, policy)? {
            Class::Prompt | Class::Tools => prompt_fields.push(key.clone()),
            Class::Engine(e) => owned.push((key.clone(), e)),
            Class::Scope | Class::Size | Class::Stream | Class::Pass => {}
        }
    }
    if let Some(scope) = policy.scope {
        check_scope(route, schema, obj, scope)?;
    }
    engine_fields(schema, obj, &owned, policy, &mut info)?;
    if schema == Body::Responses {
        stored_items(obj)?;
    }
    if let Some(salt) = policy.salt
        && route.salted()
    {
        obj.insert("cache_salt".into(), Value::String(salt.into()));
    }
    let mut tally = Tally::default();
    let mut text = Vec::with_capacity(body.len());
    let mut messages = 0u64;
    for k in &prompt_fields {
        let Some(x) = obj.get(k) else { continue };
        tally.add(x, &mut text);
        if k == "messages"
            && let Some(a) = x.as_array()
        {
            messages += a.len() as u64;
        }
    }
    info.prompt_text = text;
    // Bytes of text a token per 4 started, each number a token (token-id prompts), each
    // message 4 tokens of template, each media part the configured worst case.
    info.prompt_estimate = (tally.text_bytes.div_ceil(4) as u64)
        .saturating_add(tally.numbers)
        .saturating_add(messages.saturating_mul(4))
        .saturating_add(tally.media.saturating_mul(policy.media_tokens));
    if let Route::Generate(api) = route {
        if api == Api::Completions {
            info.prompts = prompt_count(obj.get("prompt"));
        }
        generation(api, obj, policy, &mut info)?;
    }
    let (out, prompt_ranges) = serialise(obj, &prompt_fields, body.len() + 64)?;
    // The audit's prompt hash: HMAC over `<field>=<JSON>\n` for each prompt field, the JSON
    // as forwarded (serde_json writes a nested value as it writes it alone).
    if let Some(key) = policy.prompt_key.filter(|_| !prompt_ranges.is_empty()) {
        let mut h = ring::hmac::Context::with_key(key);
        for (k, r) in &prompt_ranges {
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(&out[r.clone()]);
            h.update(b"\n");
        }
        info.prompt_hash = Some(super::prompt_hash::PromptHash::ready(
            crate::record::audit::hex_tag(&h.sign()),
        ));
    }
    info.body = Bytes::from(out);
    Ok(info)
}

/// Where a prompt field's value sits in the forwarded body.
type PromptRanges<'k> = Vec<(&'k str, std::ops::Range<usize>)>;

/// The body as serde_json writes the object (keys in its order), and where each of
/// `prompt_fields` sits in it, in body order.
fn serialise<'k>(
    obj: &Map<String, Value>,
    prompt_fields: &'k [String],
    capacity: usize,
) -> Result<(Vec<u8>, PromptRanges<'k>), Refusal> {
    let failed = |e: serde_json::Error| {
        Refusal::new(
            RefusalCode::InvalidJson,
            format!("cannot re-serialise the body: {e}"),
        )
    };
    let mut out = Vec::with_capacity(capacity);
    let mut ranges = Vec::with_capacity(prompt_fields.len());
    out.push(b'{');
    for (i, (k, x)) in obj.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).map_err(failed)?;
        out.push(b':');
        let start = out.len();
        serde_json::to_writer(&mut out, x).map_err(failed)?;
        if let Some(p) = prompt_fields.iter().find(|p| *p == k) {
            ranges.push((p.as_str(), start..out.len()));
        }
    }
    out.push(b'}');
    Ok((out, ranges))
}

/// How many prompts a completions `prompt` holds: a list of strings or of token-id lists is
/// one prompt an entry; a string or one token-id list is one prompt.
fn prompt_count(p: Option<&Value>) -> u64 {
    match p {
        Some(Value::Array(a)) if a.iter().any(|x| x.is_string() || x.is_array()) => {
            (a.len() as u64).max(1)
        }
        _ => 1,
    }
}

/// A Responses API input item that names a stored item (`item_reference`) is looked up in the
/// store every tenant shares, by an id the sidecar cannot hold to its owner: refused.
fn stored_items(obj: &Map<String, Value>) -> Result<(), Refusal> {
    let Some(Value::Array(items)) = obj.get("input") else {
        return Ok(());
    };
    if items
        .iter()
        .any(|i| i.get("type").and_then(Value::as_str) == Some("item_reference"))
    {
        return Err(engine_field(
            "an `item_reference` input item names a stored item of the inference server's \
             shared store; send the item itself",
        ));
    }
    Ok(())
}

/// The credential's scope over the body: the `model` it names and the tools it declares or
/// forces. `max_tokens` is checked where the completion limit is read.
fn check_scope(
    route: Route,
    schema: Body,
    obj: &Map<String, Value>,
    scope: &Scope,
) -> Result<(), Refusal> {
    if scope.models.is_some() {
        match obj.get("model") {
            Some(Value::String(m)) if scope.allows_model(m) => {}
            Some(Value::String(m)) => return Err(Refusal::denied("model", m)),
            // The tokenizer-only routes may leave the model to the server's default.
            None | Some(Value::Null) if matches!(route, Route::Tokenize(_)) => {}
            None | Some(Value::Null) => {
                return Err(Refusal::permission(
                    "this credential may use only some models: name one in `model`",
                ));
            }
            Some(_) => return Err(bad("model", "a string")),
        }
    }
    if scope.tools.is_none() {
        return Ok(());
    }
    let named = |v: &Value, legacy: bool| -> Result<(), Refusal> {
        let n = tool_name(schema, v, legacy)?;
        if scope.allows_tool(n) {
            Ok(())
        } else {
            Err(Refusal::denied("tool", n))
        }
    };
    for (key, legacy) in [("tools", false), ("functions", true)] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => list.iter().try_for_each(|t| named(t, legacy))?,
            Some(_) => return Err(bad(key, "an array")),
        }
    }
    // vLLM and SGLang also take tools declared on a (system or developer) message, and a
    // `tool_reference` content part names one.
    if let Some(Value::Array(msgs)) = obj.get("messages") {
        for m in msgs {
            match m.get("tools") {
                None | Some(Value::Null) => {}
                Some(Value::Array(list)) => list.iter().try_for_each(|t| named(t, false))?,
                Some(_) => return Err(bad("messages[].tools", "an array")),
            }
            if let Some(Value::Array(parts)) = m.get("content") {
                for p in parts {
                    if p.get("type").and_then(Value::as_str) == Some("tool_reference") {
                        match p.get("name").and_then(Value::as_str) {
                            Some(n) if scope.allows_tool(n) => {}
                            Some(n) => return Err(Refusal::denied("tool", n)),
                            None => {
                                return Err(Refusal::permission(
                                    "a tool reference without a name is outside this \
                                     credential's scope",
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    for (key, legacy) in [("tool_choice", false), ("function_call", true)] {
        match obj.get(key) {
            // "none", "auto", "required": no function named.
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(v @ Value::Object(o)) => {
                if o.get("type").and_then(Value::as_str) == Some("allowed_tools") {
                    // Chat: `{"allowed_tools": {"tools": [...]}}`; Responses: `{"tools": [...]}`.
                    let list = o
                        .get("allowed_tools")
                        .and_then(|a| a.get("tools"))
                        .or_else(|| o.get("tools"));
                    match list {
                        Some(Value::Array(list)) => {
                            list.iter().try_for_each(|t| named(t, false))?
                        }
                        _ => return Err(bad(key, "an allowed_tools choice with a tools list")),
                    }
                } else {
                    named(v, legacy)?
                }
            }
            Some(_) => return Err(bad(key, "a string or an object")),
        }
    }
    // Template arguments reach the rendered prompt: tools, documents or a template passed
    // there would go around the tool scope.
    if obj.contains_key("chat_template") {
        return Err(Refusal::permission(
            "a chat template override is outside a tool-scoped credential's scope",
        ));
    }
    if let Some(kw) = obj.get("chat_template_kwargs") {
        match kw {
            Value::Null => {}
            Value::Object(o) => {
                for k in [
                    "tools",
                    "functions",
                    "documents",
                    "chat_template",
                    "template",
                ] {
                    if o.contains_key(k) {
                        return Err(Refusal::permission(format!(
                            "`chat_template_kwargs.{k}` is outside a tool-scoped credential's \
                             scope"
                        )));
                    }
                }
            }
            _ => return Err(bad("chat_template_kwargs", "an object")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_serde_jsons_own_serialisation_and_the_ranges_hold_each_prompt_field() {
        let body = serde_json::json!({
            "model": "m\u{e9}\"q",
            "messages": [{"role": "user", "content": "a\nb \u{1f600} \\ \u{7f}"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": 1.5e300}}}],
            "max_tokens": 12,
            "z": null,
        });
        let obj = body.as_object().unwrap();
        let fields = ["messages".to_string(), "tools".to_string()];
        let (out, ranges) = serialise(obj, &fields, 0).unwrap();
        assert_eq!(out, serde_json::to_vec(&body).unwrap());
        assert_eq!(ranges.len(), 2);
        for (k, r) in ranges {
            assert_eq!(
                &out[r],
                serde_json::to_vec(&body[k]).unwrap().as_slice(),
                "{k}"
            );
        }
    }
}

/// The single pass ([`super::inspect`]) against this one, on bodies written every way a
/// client may write them.
#[cfg(test)]
mod differential {
    use super::super::{Flavor, Inspected, Policy, inspect as single_pass};
    use crate::auth::scope::{Scope, ScopeConfig};
    use crate::proxy::refusal::Refusal;
    use crate::proxy::routes::{Api, Route};
    use crate::proxy::schema::Body;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// A second JSON reader, written apart from serde_json and from the scanner: it keeps the
    /// FIRST of duplicate keys (serde_json keeps the last), so a forwarded body both read
    /// alike has no key two parsers could read apart.
    struct FirstWins<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl FirstWins<'_> {
        fn read(b: &[u8]) -> Option<Value> {
            let mut p = FirstWins { b, i: 0 };
            let v = p.value()?;
            p.ws();
            (p.i == b.len()).then_some(v)
        }
        fn ws(&mut self) {
            while self.i < self.b.len() && b" \t\r\n".contains(&self.b[self.i]) {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> bool {
            self.ws();
            let ok = self.b.get(self.i) == Some(&c);
            if ok {
                self.i += 1;
            }
            ok
        }
        fn value(&mut self) -> Option<Value> {
            self.ws();
            match *self.b.get(self.i)? {
                b'{' => {
                    self.i += 1;
                    let mut o = Map::new();
                    if self.eat(b'}') {
                        return Some(Value::Object(o));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        if !self.eat(b':') {
                            return None;
                        }
                        let v = self.value()?;
                        o.entry(k).or_insert(v);
                        if self.eat(b'}') {
                            return Some(Value::Object(o));
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut a = Vec::new();
                    if self.eat(b']') {
                        return Some(Value::Array(a));
                    }
                    loop {
                        a.push(self.value()?);
                        if self.eat(b']') {
                            return Some(Value::Array(a));
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                b'"' => self.string().map(Value::String),
                _ => {
                    let start = self.i;
                    while self.i < self.b.len() && !b",]} \t\r\n".contains(&self.b[self.i]) {
                        self.i += 1;
                    }
                    let t = std::str::from_utf8(&self.b[start..self.i]).ok()?;
                    match t {
                        "null" => Some(Value::Null),
                        "true" => Some(Value::Bool(true)),
                        "false" => Some(Value::Bool(false)),
                        _ if t.contains(['.', 'e', 'E']) => {
                            serde_json::Number::from_f64(t.parse().ok()?).map(Value::Number)
                        }
                        _ => t
                            .parse::<u64>()
                            .map(Value::from)
                            .or_else(|_| t.parse::<i64>().map(Value::from))
                            .ok()
                            .or_else(|| {
                                serde_json::Number::from_f64(t.parse().ok()?).map(Value::Number)
                            }),
                    }
                }
            }
        }
        fn string(&mut self) -> Option<String> {
            if self.b.get(self.i) != Some(&b'"') {
                return None;
            }
            self.i += 1;
            let mut units: Vec<u16> = Vec::new();
            let mut out = String::new();
            loop {
                let c = *self.b.get(self.i)?;
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let e = *self.b.get(self.i)?;
                        self.i += 1;
                        let u = match e {
                            b'u' => {
                                let h =
                                    std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
                                self.i += 4;
                                u16::from_str_radix(h, 16).ok()?
                            }
                            b'n' => 10,
                            b't' => 9,
                            b'r' => 13,
                            b'b' => 8,
                            b'f' => 12,
                            b'"' | b'\\' | b'/' => u16::from(e),
                            _ => return None,
                        };
                        units.push(u);
                    }
                    _ => {
                        out.push_str(&String::from_utf16(&units).ok()?);
                        units.clear();
                        let len = match c {
                            0..=0x1f => return None,
                            0x20..=0x7f => 1,
                            0xc0..=0xdf => 2,
                            0xe0..=0xef => 3,
                            _ => 4,
                        };
                        let ch =
                            std::str::from_utf8(self.b.get(self.i - 1..self.i - 1 + len)?).ok()?;
                        out.push_str(ch);
                        self.i += len - 1;
                    }
                }
            }
            out.push_str(&String::from_utf16(&units).ok()?);
            Some(out)
        }
    }

    /// A JSON value with the spelling choices a client has.
    #[derive(Debug, Clone)]
    enum J {
        Lit(&'static str),
        Num(&'static str),
        Raw(String),
        Str(String, u8),
        Arr(Vec<J>, bool),
        Obj(Vec<(String, u8, J)>, bool),
    }

    fn write_str(s: &str, how: u8, out: &mut String) {
        match how % 4 {
            // As serde_json writes it.
            0 => out.push_str(&serde_json::to_string(s).unwrap()),
            // Everything outside ASCII escaped (surrogate pairs), `/` as `\/`.
            1 => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '/' => out.push_str("\\/"),
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                            let mut b = [0u16; 2];
                            for u in c.encode_utf16(&mut b) {
                                out.push_str(&format!("\\u{u:04X}"));
                            }
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            // Letters escaped too (`pr\u006fmpt`).
            2 => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        c if c.is_ascii_alphanumeric() && (c as u32).is_multiple_of(2) => {
                            out.push_str(&format!("\\u{:04x}", c as u32))
                        }
                        c => {
                            let e = serde_json::to_string(&c.to_string()).unwrap();
                            out.push_str(&e[1..e.len() - 1]);
                        }
                    }
                }
                out.push('"');
            }
            // A lone surrogate, or a broken escape.
            _ => {
                let e = serde_json::to_string(s).unwrap();
                out.push_str(&e[..e.len() - 1]);
                out.push_str(if how & 4 == 0 {
                    "\\ud800\""
                } else {
                    "\\udc01x\""
                });
            }
        }
    }

    fn render(j: &J, out: &mut String) {
        match j {
            J::Lit(t) | J::Num(t) => out.push_str(t),
            J::Raw(t) => out.push_str(t),
            J::Str(s, how) => write_str(s, *how, out),
            J::Arr(items, ws) => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if *ws { " , " } else { "," });
                    }
                    render(x, out);
                }
                out.push(']');
            }
            J::Obj(members, ws) => {
                out.push_str(if *ws { "{ " } else { "{" });
                for (i, (k, how, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, *how, out);
                    out.push_str(if *ws { " :\n" } else { ":" });
                    render(v, out);
                }
                out.push_str(if *ws { "\t}" } else { "}" });
            }
        }
    }

    const KEYS: &[&str] = &[
        "prompt",
        "messages",
        "input",
        "model",
        "cache_salt",
        "stream",
        "stream_options",
        "include_usage",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "documents",
        "chat_template_kwargs",
        "suffix",
        "instructions",
        "priority",
        "request_id",
        "rid",
        "store",
        "previous_response_id",
        "kv_transfer_params",
        "temperature",
        "role",
        "content",
        "type",
        "text",
        "name",
        "function",
        "image_url",
        "url",
        "x_extra",
        "allowed_tools",
        "seed",
    ];

    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "1",
        "7",
        "12",
        "256",
        "1.0",
        "2.50",
        "1e5",
        "1E+2",
        "-1.5e-3",
        "0.5",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "100000000000000000000000",
        "0.30000000000000004",
        "5e-324",
        "1e-400",
        "1e400",
        "1.7976931348623157e308",
        "129",
        "-1",
        "01",
        "1.",
        ".5",
        "-",
    ];

    const STRINGS: &[&str] = &[
        "",
        "x",
        "m",
        "user",
        "hello there",
        "text",
        "function",
        "tool_reference",
        "item_reference",
        "image_url",
        "input_image",
        "lookup",
        "exec",
        "12",
        " 3 ",
        "true",
        "off",
        "a/b",
        "http://x/y.png",
        "caf\u{e9}",
        "\u{1f600} emoji",
        "a/b\\c\"d",
        "line\nbreak\t\u{1}",
        "\u{2028}",
    ];

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => prop::sample::select(KEYS).prop_map(String::from),
            1 => "[a-z_]{0,6}",
            1 => any::<String>(),
        ]
    }

    /// A top-level key: often a prompt field, whose bytes are counted and hashed.
    fn top_key() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => prop::sample::select(vec!["prompt", "messages", "input", "documents", "suffix"])
                .prop_map(String::from),
            3 => key(),
        ]
    }

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(STRINGS).prop_map(String::from),
            1 => any::<String>(),
            1 => "[a-z/\\\\ ]{40,200}",
        ]
    }

    /// Mostly spelled plainly; now and then escaped, and rarely broken.
    fn how() -> impl Strategy<Value = u8> {
        prop_oneof![12 => Just(0u8), 2 => Just(1u8), 2 => Just(2u8), 1 => 3u8..8]
    }

    fn json() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["null", "true", "false"]).prop_map(J::Lit),
            prop::sample::select(NUMBERS).prop_map(J::Num),
            (string(), how()).prop_map(|(s, h)| J::Str(s, h)),
        ];
        leaf.prop_recursive(5, 40, 5, |inner| {
            prop_oneof![
                (
                    prop::collection::vec(inner.clone(), 0..5),
                    prop::bool::weighted(0.2)
                )
                    .prop_map(|(a, ws)| J::Arr(a, ws)),
                (
                    prop::collection::vec((key(), how(), inner), 0..5),
                    prop::bool::weighted(0.2)
                )
                    .prop_map(|(m, ws)| J::Obj(m, ws)),
            ]
        })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec((top_key(), how(), json()), 0..8),
            prop::bool::weighted(0.2),
            prop_oneof![
                20 => Just(None),
                1 => Just(Some(0usize)),
                1 => (60usize..70).prop_map(Some),
            ],
            prop_oneof![
                30 => Just(None),
                1 => (any::<prop::sample::Index>(), any::<u8>(), 0u8..3).prop_map(Some),
            ],
        )
            .prop_map(|(members, ws, nest, byte)| {
                let mut out = String::new();
                let mut members = members;
                if let Some(d) = nest {
                    let deep = format!("{}{}", "[".repeat(d), "]".repeat(d));
                    // First: a later `documents` keeps serde_json from reading it at all.
                    members.insert(0, ("documents".into(), 0, J::Raw(deep)));
                }
                render(&J::Obj(members, ws), &mut out);
                let mut b = out.into_bytes();
                if let Some((at, c, how)) = byte {
                    let i = at.index(b.len());
                    match how {
                        0 => b[i] = c,
                        1 => b.insert(i, c),
                        _ => b.truncate(i),
                    }
                }
                b
            })
    }

    static KEY: std::sync::LazyLock<ring::hmac::Key> =
        std::sync::LazyLock::new(|| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k"));

    static SCOPE: std::sync::LazyLock<Scope> = std::sync::LazyLock::new(|| {
        Scope::from_config(&ScopeConfig {
            models: Some(vec!["m".into()]),
            routes: None,
            tools: Some(vec!["lookup".into(), "web_search_preview".into()]),
            max_tokens: Some(300),
        })
        .unwrap()
    });
    static TRUSTED: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["kv_transfer_params".into()]);
    static EXTRA: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["x_extra".into()]);

    fn policy(bits: u8, salt: Option<&'static str>) -> Policy<'static> {
        Policy {
            default_max_tokens: 256,
            salt,
            scope: (bits & 1 != 0).then(|| &*SCOPE),
            request_id: "rq-1",
            flavor: [Flavor::Vllm, Flavor::Sglang, Flavor::Openai][usize::from(bits >> 1) % 3],
            priority: 3,
            trusted: if bits & 8 != 0 { &TRUSTED } else { &[] },
            extra_fields: if bits & 16 != 0 { &EXTRA } else { &[] },
            store_responses: bits & 32 != 0,
            media_tokens: 100,
            prompt_key: Some(&KEY),
        }
    }

    const ROUTES: [Route; 6] = [
        Route::Generate(Api::Chat),
        Route::Generate(Api::Completions),
        Route::Generate(Api::Responses),
        Route::Encode(Body::Embeddings),
        Route::Encode(Body::Pooling),
        Route::Tokenize(Body::Tokenize),
    ];

    fn outcome(i: &Inspected) -> impl PartialEq + std::fmt::Debug + '_ {
        (
            (
                i.stream,
                i.strip_usage_chunk,
                i.prompt_estimate,
                i.completion_reserve,
            ),
            (
                i.prompts,
                i.prompt_hash.as_ref().map(|h| h.value()),
                &i.prompt_text,
                i.client_salt,
            ),
            (&i.model, &i.previous_response_id, &i.stored_response_id),
        )
    }

    fn refusal(r: &Refusal) -> (u16, &str, &str, &str) {
        (
            r.status().as_u16(),
            r.code.kind(),
            r.code.as_str(),
            &r.message,
        )
    }

    /// Both paths on one body: the same refusal, or the same reading and forwarded object.
    fn agree(route: Route, p: Policy<'_>, body: &[u8]) -> Result<bool, TestCaseError> {
        let shown = String::from_utf8_lossy(body);
        match (super::inspect(route, body, p), single_pass(route, body, p)) {
            (Err(a), Err(b)) => {
                prop_assert_eq!(refusal(&a), refusal(&b), "{:?} {}", route, shown);
                Ok(false)
            }
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(outcome(&a), outcome(&b), "{:?} {}", route, shown);
                let want: Value = serde_json::from_slice(&a.body).unwrap();
                let got: Value = serde_json::from_slice(&b.body).map_err(|e| {
                    TestCaseError::fail(format!(
                        "forwarded {e}: {}",
                        String::from_utf8_lossy(&b.body)
                    ))
                })?;
                prop_assert_eq!(&got, &want, "{:?} {}", route, shown);
                let second = FirstWins::read(&b.body);
                prop_assert_eq!(
                    second.as_ref(),
                    Some(&want),
                    "the second reader reads {} otherwise",
                    String::from_utf8_lossy(&b.body)
                );
                Ok(true)
            }
            (a, b) => Err(TestCaseError::fail(format!(
                "{route:?} {shown}: before {:?}, now {:?}",
                a.map(|_| ()).map_err(|r| r.message),
                b.map(|_| ()).map_err(|r| r.message)
            ))),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_single_pass_reads_every_body_as_the_tree_did(
            body in body(),
            route in prop::sample::select(ROUTES.to_vec()),
            bits in any::<u8>(),
            salt in prop::option::of(prop::sample::select(vec!["s", "t\u{e9}\"nant"])),
        ) {
            agree(route, policy(bits, salt), &body)?;
        }
    }

    /// The generator reaches accepted bodies, with escapes, whitespace and duplicates, and
    /// each kind of refusal.
    /// A short prompt's hash is taken in the inspection; a long prompt's (32 KiB and more) is
    /// recorded as pieces and taken off the request path: the same hash as the tree's, whether
    /// the prompt's bytes are canonical as sent or not.
    #[test]
    fn a_long_prompts_deferred_hash_is_the_trees() {
        let short = format!(
            r#"{{"messages":[{{"content":"{}","role":"user"}}],"model":"m"}}"#,
            "the quick brown fox ".repeat(100)
        );
        let p = policy(0, None);
        let now = single_pass(Route::Generate(Api::Chat), short.as_bytes(), p).unwrap();
        let shown = format!("{:?}", now.prompt_hash);
        assert!(
            shown.starts_with("Some(PromptHash(") && !shown.contains("deferred"),
            "{shown}"
        );
        assert!(agree(Route::Generate(Api::Chat), p, short.as_bytes()).unwrap());
        let text = "the quick brown fox ".repeat(2000);
        let bodies = [
            // Canonical as sent: the hash reads the client's bytes.
            format!(r#"{{"messages":[{{"content":"{text}","role":"user"}}],"model":"m"}}"#),
            // Keys out of order, escapes, spaces, a tool list: rewritten pieces in between.
            format!(
                r#"{{ "model" : "m", "messages" : [ {{"role":"user", "content":"A{text}\/"}},
                {{"role":"assistant","content":"ok"}} ],
                "tools":[{{"type":"function","function":{{"name":"lookup","parameters":{{"b":1,"a":2.50}}}}}}]}}"#
            ),
        ];
        for body in bodies {
            for bits in [0u8, 1, 8, 16] {
                let p = policy(bits, Some("s"));
                let now = single_pass(Route::Generate(Api::Chat), body.as_bytes(), p).unwrap();
                assert!(
                    format!("{:?}", now.prompt_hash).contains("deferred"),
                    "{:?}",
                    now.prompt_hash
                );
                assert!(agree(Route::Generate(Api::Chat), p, body.as_bytes()).unwrap());
            }
        }
    }

    #[test]
    fn the_generator_reaches_accepted_and_refused_bodies() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut ok, mut escaped_ok) = (0, 0);
        let mut codes = std::collections::BTreeSet::new();
        for n in 0..3000 {
            let b = body().new_tree(&mut runner).unwrap().current();
            let route = ROUTES[n % ROUTES.len()];
            let p = policy(0, Some("s"));
            match single_pass(route, &b, p) {
                Ok(_) => {
                    ok += 1;
                    escaped_ok += usize::from(b.contains(&b'\\'));
                }
                Err(r) => {
                    codes.insert(r.code.as_str());
                }
            }
            agree(route, p, &b).unwrap();
        }
        assert!(
            ok >= 300 && escaped_ok >= 20,
            "{ok} accepted, {escaped_ok} with escapes"
        );
        for c in [
            "invalid_json",
            "unknown_field",
            "invalid_parameter",
            "owned_field",
        ] {
            assert!(codes.contains(c), "{c}: {codes:?}");
        }
    }
}

/// The cost of one inspection, before and after, for a profiler to count (BENCHMARKS.md):
/// `BULKHEAD_INSPECT_PATH=tree|scan BULKHEAD_INSPECT_BODY=small|32k|256k BULKHEAD_INSPECT_N=20
/// valgrind --tool=callgrind target/release/deps/bulkhead_sidecar-* --ignored --exact
/// proxy::inspect::reference::cost::inspect_cost` (and `N=0` for the harness alone).
#[cfg(test)]
mod cost {
    use super::super::{Policy, inspect_bytes};
    use crate::auth::scope::Scope;
    use crate::proxy::routes::{Api, Route};

    /// A chat body whose user message holds `prompt_bytes` of prose (with line breaks).
    pub fn chat_body(prompt_bytes: usize) -> Vec<u8> {
        let mut text = String::with_capacity(prompt_bytes + 64);
        let words = [
            "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. ",
        ];
        let mut i = 0;
        while text.len() < prompt_bytes {
            text.push_str(words[i % words.len()]);
            if i % 97 == 96 {
                text.push('\n');
            }
            i += 1;
        }
        serde_json::to_vec(&serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 64,
            "temperature": 0.7,
            "stream": true,
        }))
        .unwrap()
    }

    #[test]
    #[ignore = "a profiler's driver: run it under callgrind"]
    fn inspect_cost() {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let body = bytes::Bytes::from(match var("BULKHEAD_INSPECT_BODY", "small").as_str() {
            "32k" => chat_body(32 * 1024),
            "256k" => chat_body(256 * 1024),
            _ => chat_body(20),
        });
        let n: usize = var("BULKHEAD_INSPECT_N", "1").parse().unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"audit-key");
        let scope = Scope::default();
        let p = Policy {
            salt: Some("tenant-salt"),
            scope: Some(&scope),
            request_id: "0123456789abcdef",
            prompt_key: Some(&key),
            ..Policy::open(256)
        };
        let tree = var("BULKHEAD_INSPECT_PATH", "scan") == "tree";
        let route = Route::Generate(Api::Chat);
        let mut total = 0;
        for _ in 0..n {
            let i = if tree {
                super::inspect(route, std::hint::black_box(&body), p)
            } else {
                inspect_bytes(route, std::hint::black_box(&body), p)
            }
            .unwrap();
            total += std::hint::black_box(i.body.len());
        }
        eprintln!(
            "{} bytes in, {total} bytes out over {n} inspections",
            body.len()
        );
    }
}
