//! Body inspection for the routes that run the model. Bodies are closed by default: every
//! top-level field is looked up in the route's [`schema`](crate::proxy::schema) and handled by its
//! class (a field in no class is refused as `unknown_field`), and only a body the sidecar fully
//! parsed is forwarded: the client's bytes, read in one pass ([`super::scan`]), with the
//! members the sidecar owns or changed written by it and any member whose bytes another parser
//! could read otherwise (duplicate or escaped keys, numbers serde_json writes differently)
//! written as serde_json writes it. Whatever the client wrote (duplicate keys, a BOM, NaN,
//! trailing bytes, numbers as strings), the upstream reads exactly the values the sidecar
//! reserved tokens for and set the salt, request id and priority in.

use super::refusal::{Refusal, RefusalCode};
use super::routes::{Api, Route};
use super::scan::{self, Kind, Node};
use crate::auth::scope::{Scope, quoted};
use crate::config::Flavor;
use crate::proxy::schema::{Body, Class, Engine};
use bytes::Bytes;
use serde_json::{Map, Value};
use std::borrow::Cow;

#[cfg(test)]
mod reference;

/// Nesting beyond this is refused (tool schemas nest, but not this deep).
pub const MAX_DEPTH: usize = 64;
/// Sequences (choices x prompts: `n`, `best_of`, a list `prompt`) per request at most.
pub const MAX_CHOICES: u64 = 128;
pub use crate::proxy::schema::DEFAULT_MEDIA_TOKENS;

/// What inspection learned, and the body to forward.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The body to forward: the client's bytes with the sidecar's members spliced in.
    pub body: Bytes,
    pub stream: bool,
    /// The sidecar asked for stream usage; the extra usage chunk is removed on the way back.
    pub strip_usage_chunk: bool,
    pub prompt_estimate: u64,
    /// Completion tokens the upstream may generate: the completion limit (as forwarded) x
    /// choices x prompts.
    pub completion_reserve: u64,
    /// Prompts in the request (a list `prompt` on `/v1/completions`; 1 otherwise).
    pub prompts: u64,
    /// The audit log's keyed hash of the prompt fields (with [`Policy::prompt_key`]; `None`
    /// without one or without prompt fields): HMAC-SHA256 over `<field>=<JSON>\n` for each
    /// prompt-bearing field in key order, the JSON as serde_json writes the field's value
    /// (compact, keys sorted).
    pub prompt_hash: Option<String>,
    /// Every prompt-bearing string as the model reads it, concatenated in order: what the
    /// leak scan reads.
    pub prompt_text: Vec<u8>,
    /// The client sent a `cache_salt` (removed or replaced).
    pub client_salt: bool,
    /// The body's `model`, when it is a string.
    pub model: Option<String>,
    /// `previous_response_id`: forwarded only when this sidecar handed the id to the tenant.
    pub previous_response_id: Option<String>,
    /// The id the upstream will store this response under (Responses API with `store`).
    pub stored_response_id: Option<String>,
}

/// The tenant's side of inspection.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub default_max_tokens: u64,
    /// The tenant's `cache_salt` (salted tier).
    pub salt: Option<&'a str>,
    /// What the credential may ask for (models, tools, `max_tokens`); `None` allows all.
    pub scope: Option<&'a Scope>,
    /// The sidecar's id of this request: the engine's request id on every route.
    pub request_id: &'a str,
    /// Which engine fields the upstream reads (`request_id` or `rid`, `priority`).
    pub flavor: Flavor,
    /// `tenants.<name>.priority`, written on the routes that take one.
    pub priority: i64,
    /// `tenants.<name>.trusted_engine_fields`.
    pub trusted: &'a [String],
    /// `tenants.<name>.extra_fields`: fields outside the schema, forwarded as prompt text.
    pub extra_fields: &'a [String],
    /// `tenants.<name>.store_responses`.
    pub store_responses: bool,
    /// Prompt tokens charged for each image, audio or video part.
    pub media_tokens: u64,
    /// The audit's prompt-hash key; `None`: no prompt hash.
    pub prompt_key: Option<&'a ring::hmac::Key>,
}

impl Policy<'static> {
    /// No salt, no scope, no engine settings: the defaults of a tenant with this
    /// completion default.
    pub const fn open(default_max_tokens: u64) -> Self {
        Policy {
            default_max_tokens,
            salt: None,
            scope: None,
            request_id: "req",
            flavor: Flavor::Vllm,
            priority: 0,
            trusted: &[],
            extra_fields: &[],
            store_responses: false,
            media_tokens: DEFAULT_MEDIA_TOKENS,
            prompt_key: None,
        }
    }
}

/// Whether `v` nests at most `MAX_DEPTH` levels (the parser already stopped at 128, which
/// bounds this recursion).
fn depth_ok(v: &Value) -> bool {
    fn within(v: &Value, left: usize) -> bool {
        match v {
            Value::Array(a) => left > 0 && a.iter().all(|x| within(x, left - 1)),
            Value::Object(o) => left > 0 && o.values().all(|x| within(x, left - 1)),
            _ => true,
        }
    }
    within(v, MAX_DEPTH)
}

fn bad(field: &str, what: &str) -> Refusal {
    Refusal::new(
        RefusalCode::InvalidParameter,
        format!("`{field}` must be {what}"),
    )
}

/// A non-negative whole number as a lax (pydantic) integer field reads it: integers, whole
/// floats (`1e5`), numeric strings, booleans. `null` is absent.
fn lax_uint(v: &Value, field: &str) -> Result<Option<u64>, Refusal> {
    let whole =
        |f: f64| (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 9.0e15).then_some(f as u64);
    let n = match v {
        Value::Null => return Ok(None),
        Value::Bool(b) => Some(u64::from(*b)),
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().and_then(whole)),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<u64>()
                .ok()
                .or_else(|| s.parse::<f64>().ok().and_then(whole))
        }
        _ => None,
    };
    n.map(Some)
        .ok_or_else(|| bad(field, "a non-negative whole number"))
}

/// A boolean as a lax (pydantic) bool field reads it. `null` is absent.
fn lax_bool(v: &Value, field: &str) -> Result<Option<bool>, Refusal> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(Some(false)),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(Some(true)),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "t" | "y" => Ok(Some(true)),
            "false" | "0" | "no" | "off" | "f" | "n" => Ok(Some(false)),
            _ => Err(bad(field, "a boolean")),
        },
        _ => Err(bad(field, "a boolean")),
    }
}

/// Read `key` as a whole number and write it back as one (or remove a `null`).
fn take_uint(obj: &mut Map<String, Value>, key: &str) -> Result<Option<u64>, Refusal> {
    let Some(v) = obj.get(key) else {
        return Ok(None);
    };
    let n = lax_uint(v, key)?;
    match n {
        Some(n) => obj.insert(key.into(), Value::from(n)),
        None => obj.remove(key),
    };
    Ok(n)
}

fn take_bool(obj: &mut Map<String, Value>, key: &str) -> Result<Option<bool>, Refusal> {
    let Some(v) = obj.get(key) else {
        return Ok(None);
    };
    let b = lax_bool(v, key)?;
    match b {
        Some(b) => obj.insert(key.into(), Value::Bool(b)),
        None => obj.remove(key),
    };
    Ok(b)
}

/// Content-part types that carry an image, audio, video or file rather than text (chat,
/// Responses, vLLM's and SGLang's extensions).
const MEDIA_TYPES: &[&str] = &[
    "audio",
    "audio_url",
    "file",
    "image",
    "image_embeds",
    "image_pil",
    "image_url",
    "input_audio",
    "input_file",
    "input_image",
    "input_video",
    "video",
    "video_url",
];

/// The keys of a media part that hold the media itself (a URL, base64 data, a file id): never
/// counted as text, since the model does not read them as text.
const MEDIA_PAYLOAD: &[&str] = &[
    "audio_url",
    "data",
    "file",
    "file_data",
    "file_id",
    "file_url",
    "image",
    "image_embeds",
    "image_url",
    "input_audio",
    "url",
    "video_url",
];

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
    /// payload neither counted nor copied. Objects are read in serde_json's map order (by
    /// key, the last of duplicate keys).
    fn add(&mut self, body: &[u8], v: &Node<'_>, text: &mut Vec<u8>) {
        match &v.kind {
            Kind::Str { escaped } => {
                let raw = &body[v.span.start + 1..v.span.end - 1];
                let before = text.len();
                if *escaped {
                    scan::decode_into(raw, text);
                } else {
                    text.extend_from_slice(raw);
                }
                self.text_bytes += text.len() - before;
            }
            Kind::Num => self.numbers += 1,
            Kind::Bool | Kind::Null => {}
            Kind::Array(a) => a.iter().for_each(|x| self.add(body, x, text)),
            Kind::Object(o) => {
                let media = v
                    .get("type")
                    .and_then(|t| t.str(body))
                    .is_some_and(|t| MEDIA_TYPES.contains(&t.as_ref()));
                if media {
                    self.media += 1;
                }
                for m in o {
                    let k = m.key.as_ref();
                    if media && MEDIA_PAYLOAD.contains(&k) {
                        continue;
                    }
                    self.text_bytes += k.len();
                    // A part's `type` is no text the model reads: left out of the scanned
                    // text, so consecutive text parts read as the one text they render to.
                    if k == "type"
                        && let Some(t) = m.value.str(body)
                    {
                        self.text_bytes += t.len();
                        continue;
                    }
                    self.add(body, &m.value, text);
                }
            }
        }
    }
}

/// The refusal of a body [`scan::parse`] rejected, worded as serde_json words it (a refused
/// body is read a second time, only to name what is wrong).
fn not_json(body: &[u8], why: scan::Invalid) -> Refusal {
    match serde_json::from_slice::<Value>(body) {
        Err(e) => Refusal::new(
            RefusalCode::InvalidJson,
            format!("the request body is not valid JSON: {e}"),
        ),
        Ok(v) if !depth_ok(&v) => Refusal::new(
            RefusalCode::InvalidJson,
            format!("the request body nests deeper than {MAX_DEPTH} levels"),
        ),
        Ok(v) if !v.is_object() => Refusal::new(
            RefusalCode::InvalidJson,
            "the request body must be a JSON object",
        ),
        Ok(_) => Refusal::new(
            RefusalCode::InvalidJson,
            format!("the request body is not valid JSON: {why}"),
        ),
    }
}

/// Check and rewrite the body of an inspected route in one pass over its bytes.
///
/// The body is read once ([`scan::parse`]); the fields the sidecar reads or owns (all but the
/// prompt-bearing ones, which are small) are read into a map and handled there; the prompt
/// fields are counted, scanned and hashed from the skeleton. The forwarded body is the
/// client's bytes with the owned members replaced, removed or appended: a member is copied as
/// written when the sidecar did not change it and its bytes read alike under every parser
/// (`safe`), and written as serde_json writes it otherwise; earlier members of a duplicated
/// key are dropped. So the upstream reads exactly the object the sidecar checked.
pub fn inspect(route: Route, body: &[u8], policy: Policy<'_>) -> Result<Inspected, Refusal> {
    let Some(schema) = route.body() else {
        return Err(Refusal::new(
            RefusalCode::InvalidParameter,
            "this route takes no inspected body",
        ));
    };
    let doc = scan::parse(body).map_err(|why| not_json(body, why))?;
    // Classified in serde_json's map order, so the first field refused is the same.
    let mut is_prompt = vec![false; doc.members.len()];
    let mut prompt_fields: Vec<usize> = Vec::new();
    let mut owned: Vec<(String, Engine)> = Vec::new();
    for &i in &doc.order {
        let key = doc.members[i].key.as_ref();
        match class_of(schema, key, policy)? {
            Class::Prompt | Class::Tools => {
                is_prompt[i] = true;
                prompt_fields.push(i);
            }
            Class::Engine(e) => owned.push((key.to_string(), e)),
            Class::Scope | Class::Size | Class::Stream | Class::Pass => {}
        }
    }
    // Every other field is small: read as serde_json reads it.
    let mut obj = Map::new();
    for &i in &doc.order {
        if !is_prompt[i] {
            let m = &doc.members[i];
            obj.insert(m.key.to_string(), m.value.to_value(body));
        }
    }
    let before = obj.clone();
    let mut info = Inspected {
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        prompts: 1,
        ..Inspected::default()
    };
    if let Some(scope) = policy.scope {
        check_scope(route, schema, &obj, &doc, body, scope)?;
    }
    engine_fields(schema, &mut obj, &owned, policy, &mut info)?;
    if schema == Body::Responses {
        stored_items(&doc, body)?;
    }
    if let Some(salt) = policy.salt
        && route.salted()
    {
        obj.insert("cache_salt".into(), Value::String(salt.into()));
    }
    let mut tally = Tally::default();
    let mut text = Vec::with_capacity(body.len());
    let mut messages = 0u64;
    for &i in &prompt_fields {
        let m = &doc.members[i];
        tally.add(body, &m.value, &mut text);
        if m.key == "messages"
            && let Kind::Array(a) = &m.value.kind
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
            info.prompts = prompt_count(doc.get("prompt"), body);
        }
        generation(api, &mut obj, policy, &mut info)?;
    }
    info.body = Bytes::from(splice(body, &doc, &is_prompt, obj, &before)?);
    // The audit's prompt hash: HMAC over `<field>=<JSON>\n` for each prompt field in key
    // order, the JSON as serde_json writes the value (the client's bytes when they are that
    // already).
    if let Some(key) = policy.prompt_key.filter(|_| !prompt_fields.is_empty()) {
        let mut h = ring::hmac::Context::with_key(key);
        for &i in &prompt_fields {
            let m = &doc.members[i];
            h.update(m.key.as_bytes());
            h.update(b"=");
            m.value.write_canonical(body, &mut h);
            h.update(b"\n");
        }
        info.prompt_hash = Some(crate::record::audit::hex_tag(&h.sign()));
    }
    Ok(info)
}

/// The forwarded body: the client's members in the client's order (the last of a duplicated
/// key), each as written when it is unchanged and safe to copy, else as serde_json writes it;
/// then the members the sidecar added, in key order.
fn splice(
    body: &[u8],
    doc: &scan::Doc<'_>,
    is_prompt: &[bool],
    mut obj: Map<String, Value>,
    before: &Map<String, Value>,
) -> Result<Vec<u8>, Refusal> {
    let failed = |e: serde_json::Error| {
        Refusal::new(
            RefusalCode::InvalidJson,
            format!("cannot serialise the body: {e}"),
        )
    };
    let mut last = vec![false; doc.members.len()];
    for &i in &doc.order {
        last[i] = true;
    }
    let mut out = Vec::with_capacity(body.len() + 160);
    out.push(b'{');
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
    };
    for (i, m) in doc.members.iter().enumerate() {
        if !last[i] {
            continue;
        }
        let as_written = m.plain_key && m.value.safe;
        if is_prompt[i] {
            sep(&mut out);
            if as_written {
                out.extend_from_slice(&body[m.span.clone()]);
            } else {
                scan::write_key(&m.key, &mut out);
                m.value.write_canonical(body, &mut out);
            }
            continue;
        }
        let Some(v) = obj.remove(m.key.as_ref()) else {
            continue;
        };
        sep(&mut out);
        if as_written && before.get(m.key.as_ref()) == Some(&v) {
            out.extend_from_slice(&body[m.span.clone()]);
        } else {
            scan::write_key(&m.key, &mut out);
            serde_json::to_writer(&mut out, &v).map_err(failed)?;
        }
    }
    for (k, v) in &obj {
        sep(&mut out);
        scan::write_key(k, &mut out);
        serde_json::to_writer(&mut out, v).map_err(failed)?;
    }
    out.push(b'}');
    Ok(out)
}

/// The class of a top-level field: the schema's, a tenant's opted-in extra field as prompt
/// text, or refused.
fn class_of(schema: Body, key: &str, policy: Policy<'_>) -> Result<Class, Refusal> {
    if let Some(c) = schema.class(key) {
        return Ok(c);
    }
    if policy.extra_fields.iter().any(|f| f == key) {
        return Ok(Class::Prompt);
    }
    Err(Refusal::new(
        RefusalCode::UnknownField,
        format!(
            "field {} is not one the sidecar forwards on this route (the operator can allow \
             it with tenants.<name>.extra_fields)",
            quoted(key)
        ),
    ))
}

/// How many prompts a completions `prompt` holds: a list of strings or of token-id lists is
/// one prompt an entry; a string or one token-id list is one prompt.
fn prompt_count(p: Option<&Node<'_>>, _body: &[u8]) -> u64 {
    match p.map(|p| &p.kind) {
        Some(Kind::Array(a))
            if a.iter()
                .any(|x| matches!(x.kind, Kind::Str { .. } | Kind::Array(_))) =>
        {
            (a.len() as u64).max(1)
        }
        _ => 1,
    }
}

/// The engine-control fields: the sidecar's values written, the client's refused or replaced.
fn engine_fields(
    schema: Body,
    obj: &mut Map<String, Value>,
    owned: &[(String, Engine)],
    policy: Policy<'_>,
    info: &mut Inspected,
) -> Result<(), Refusal> {
    let mut store = None;
    for (key, e) in owned {
        match e {
            Engine::Salt => info.client_salt |= obj.remove(key).is_some(),
            Engine::RequestId => {
                obj.remove(key);
            }
            Engine::Priority => {
                if !obj.get(key).is_some_and(Value::is_null) {
                    return Err(Refusal::new(
                        RefusalCode::OwnedField,
                        format!(
                            "`{key}` is set by the sidecar from the tenant's configuration \
                             (tenants.<name>.priority); remove it from the request"
                        ),
                    ));
                }
                obj.remove(key);
            }
            Engine::Trusted => {
                if !policy.trusted.iter().any(|f| f == key) {
                    return Err(engine_field(format!(
                        "field {} steers the inference server for every tenant; only a tenant \
                         with it in trusted_engine_fields may send it",
                        quoted(key)
                    )));
                }
            }
            Engine::PreviousResponse => match obj.get(key) {
                Some(Value::String(id)) => info.previous_response_id = Some(id.clone()),
                Some(Value::Null) | None => {
                    obj.remove(key);
                }
                Some(_) => return Err(bad(key, "a string")),
            },
            Engine::Store => store = lax_bool(&obj[key.as_str()], key)?,
        }
    }
    let id = policy.request_id;
    match policy.flavor {
        Flavor::Vllm if schema.has("request_id") => {
            // vLLM's Responses API stores a response under its request id.
            let rid = if schema == Body::Responses {
                format!("resp_{id}")
            } else {
                id.to_string()
            };
            obj.insert("request_id".into(), Value::String(rid));
        }
        Flavor::Sglang if schema.has("rid") => {
            obj.insert("rid".into(), Value::String(id.to_string()));
        }
        _ => {}
    }
    if policy.flavor != Flavor::Openai && schema.has("priority") {
        obj.insert("priority".into(), Value::from(policy.priority));
    }
    if schema == Body::Responses {
        // The upstream stores by default: only a tenant allowed to store may leave it so.
        if store == Some(true) && !policy.store_responses {
            return Err(Refusal::permission(
                "this tenant may not store responses on the inference server \
                 (tenants.<name>.store_responses)",
            ));
        }
        let stores = policy.store_responses && store != Some(false);
        obj.insert("store".into(), Value::Bool(stores));
        if stores {
            info.stored_response_id = obj
                .get("request_id")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
    }
    Ok(())
}

/// A Responses API input item that names a stored item (`item_reference`) is looked up in the
/// store every tenant shares, by an id the sidecar cannot hold to its owner: refused.
fn stored_items(doc: &scan::Doc<'_>, body: &[u8]) -> Result<(), Refusal> {
    let Some(Kind::Array(items)) = doc.get("input").map(|n| &n.kind) else {
        return Ok(());
    };
    if items.iter().any(|i| {
        i.get("type")
            .and_then(|t| t.str(body))
            .is_some_and(|t| t == "item_reference")
    }) {
        return Err(engine_field(
            "an `item_reference` input item names a stored item of the inference server's \
             shared store; send the item itself",
        ));
    }
    Ok(())
}

/// 403 `engine_field`: the body steers the engine, or names its shared state, beyond what the
/// tenant is trusted with.
fn engine_field(message: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
    Refusal::new(RefusalCode::EngineField, message)
}

/// The name a tool goes by for the credential's scope, as each API names things: in the
/// chat API a `function` tool by `function.name` (legacy `functions` entries by `name`), in
/// the Responses API a `function` tool by its top-level `name`; any other type (built-in
/// tools: `code_interpreter`, `mcp`, `web_search_preview`, ...) by its type. An entry that
/// carries the other API's spelling too is refused, so no reader can take another name.
fn tool_name(api: Body, v: &Value, legacy: bool) -> Result<&str, Refusal> {
    let Some(o) = v.as_object() else {
        return Err(Refusal::permission(
            "a tool that is not an object is outside this credential's scope",
        ));
    };
    let unnamed =
        || Refusal::permission("a tool without a name is outside this credential's scope");
    let both = || {
        Refusal::permission(
            "a tool that carries both `name` and `function.name` is outside this \
             credential's scope",
        )
    };
    if o.contains_key("name") && o.contains_key("function") {
        return Err(both());
    }
    if legacy {
        return o.get("name").and_then(Value::as_str).ok_or_else(unnamed);
    }
    let ty = match o.get("type") {
        None if api != Body::Responses => "function",
        Some(Value::String(t)) => t.as_str(),
        _ => return Err(unnamed()),
    };
    if ty != "function" {
        return Ok(ty);
    }
    if api == Body::Responses {
        o.get("name").and_then(Value::as_str).ok_or_else(unnamed)
    } else {
        v.pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(unnamed)
    }
}

/// The credential's scope over the body: the `model` it names and the tools it declares or
/// forces. `max_tokens` is checked where the completion limit is read.
fn check_scope(
    route: Route,
    schema: Body,
    obj: &Map<String, Value>,
    doc: &scan::Doc<'_>,
    body: &[u8],
    scope: &Scope,
) -> Result<(), Refusal> {
    // A field read here is in `obj`, or a prompt field read from its bytes.
    let field = |key: &str| -> Option<Cow<'_, Value>> {
        obj.get(key)
            .map(Cow::Borrowed)
            .or_else(|| doc.get(key).map(|n| Cow::Owned(n.to_value(body))))
    };
    if scope.models.is_some() {
        match field("model").as_deref() {
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
        match field(key).as_deref() {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => list.iter().try_for_each(|t| named(t, legacy))?,
            Some(_) => return Err(bad(key, "an array")),
        }
    }
    // vLLM and SGLang also take tools declared on a (system or developer) message, and a
    // `tool_reference` content part names one.
    if let Some(Kind::Array(msgs)) = doc.get("messages").map(|n| &n.kind) {
        for m in msgs {
            match m.get("tools").map(|t| &t.kind) {
                None | Some(Kind::Null) => {}
                Some(Kind::Array(list)) => list
                    .iter()
                    .try_for_each(|t| named(&t.to_value(body), false))?,
                Some(_) => return Err(bad("messages[].tools", "an array")),
            }
            if let Some(Kind::Array(parts)) = m.get("content").map(|n| &n.kind) {
                for p in parts {
                    if p.get("type")
                        .and_then(|t| t.str(body))
                        .is_some_and(|t| t == "tool_reference")
                    {
                        match p.get("name").and_then(|n| n.str(body)) {
                            Some(n) if scope.allows_tool(&n) => {}
                            Some(n) => return Err(Refusal::denied("tool", &n)),
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
        match field(key).as_deref() {
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
    if doc.get("chat_template").is_some() {
        return Err(Refusal::permission(
            "a chat template override is outside a tool-scoped credential's scope",
        ));
    }
    if let Some(kw) = field("chat_template_kwargs") {
        match kw.as_ref() {
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

/// Streaming, usage and the completion reservation of a generating request.
fn generation(
    api: Api,
    obj: &mut Map<String, Value>,
    policy: Policy<'_>,
    info: &mut Inspected,
) -> Result<(), Refusal> {
    info.stream = take_bool(obj, "stream")?.unwrap_or(false);
    if info.stream && api != Api::Responses {
        let so = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if so.is_null() {
            *so = Value::Object(Map::new());
        }
        let Some(so) = so.as_object_mut() else {
            return Err(bad("stream_options", "an object"));
        };
        if take_bool(so, "include_usage")? != Some(true) {
            so.insert("include_usage".into(), Value::Bool(true));
            info.strip_usage_chunk = true;
        }
    }
    // The completion limit the upstream will honour, written back as a plain integer; a
    // request without one gets the tenant's default written in.
    let max = match api {
        Api::Chat => {
            let mct = take_uint(obj, "max_completion_tokens")?;
            let mt = take_uint(obj, "max_tokens")?;
            // vLLM: `max_completion_tokens or max_tokens`.
            match (mct.filter(|n| *n > 0), mt) {
                (Some(n), Some(_)) => {
                    obj.insert("max_tokens".into(), Value::from(n));
                    Some(n)
                }
                (Some(n), None) => Some(n),
                (None, m) => {
                    if mct == Some(0) {
                        obj.remove("max_completion_tokens");
                    }
                    m
                }
            }
        }
        Api::Completions => take_uint(obj, "max_tokens")?,
        Api::Responses => take_uint(obj, "max_output_tokens")?,
    };
    let cap = policy.scope.and_then(|s| s.max_tokens);
    let max = match max {
        Some(n) => {
            if let Some(cap) = cap
                && n > cap
            {
                return Err(Refusal::permission(format!(
                    "a completion limit of {n} tokens is outside this credential's scope \
                     (at most {cap})"
                )));
            }
            n
        }
        None => {
            let key = if api == Api::Responses {
                "max_output_tokens"
            } else {
                "max_tokens"
            };
            let n = cap.map_or(policy.default_max_tokens, |c| {
                c.min(policy.default_max_tokens)
            });
            obj.insert(key.into(), Value::from(n));
            n
        }
    };
    let mut choices = 1;
    if api != Api::Responses {
        for key in ["n", "best_of"] {
            if let Some(c) = take_uint(obj, key)? {
                if c == 0 || c > MAX_CHOICES {
                    return Err(bad(key, &format!("within 1..={MAX_CHOICES}")));
                }
                choices = choices.max(c);
            }
        }
    }
    let sequences = choices.saturating_mul(info.prompts);
    if sequences > MAX_CHOICES {
        return Err(Refusal::new(
            RefusalCode::RequestTooLarge,
            format!(
                "{} prompts x {choices} choices is {sequences} sequences, more than the \
                 {MAX_CHOICES} a request may generate",
                info.prompts
            ),
        ));
    }
    info.completion_reserve = max.saturating_mul(sequences);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy<'static> = Policy::open(256);

    fn fwd(i: &Inspected) -> Value {
        serde_json::from_slice(&i.body).unwrap()
    }

    #[test]
    fn lax_fields_read_what_pydantic_reads_and_nothing_else() {
        use serde_json::json;
        let uint = |v: Value| lax_uint(&v, "f").map_err(|_| ());
        assert_eq!(uint(json!(null)), Ok(None));
        assert_eq!(uint(json!(true)), Ok(Some(1)));
        assert_eq!(uint(json!(false)), Ok(Some(0)));
        assert_eq!(uint(json!(7)), Ok(Some(7)));
        assert_eq!(uint(json!(1e5)), Ok(Some(100_000)));
        assert_eq!(uint(json!(" 12 ")), Ok(Some(12)));
        assert_eq!(uint(json!("3.0")), Ok(Some(3)));
        assert_eq!(uint(json!(8.0e15)), Ok(Some(8_000_000_000_000_000)));
        // Past 9e15 a float no longer holds every whole number: refused, not rounded.
        for bad in [
            json!(9.0e15),
            json!(1.5),
            json!(-1),
            json!("x"),
            json!([1]),
            json!({}),
        ] {
            assert_eq!(uint(bad.clone()), Err(()), "{bad}");
        }
        let boolean = |v: Value| lax_bool(&v, "f").map_err(|_| ());
        assert_eq!(boolean(json!(null)), Ok(None));
        assert_eq!(boolean(json!(true)), Ok(Some(true)));
        assert_eq!(boolean(json!(0)), Ok(Some(false)));
        assert_eq!(boolean(json!(1)), Ok(Some(true)));
        for t in ["true", "1", "yes", "on", "t", "y", " TRUE "] {
            assert_eq!(boolean(json!(t)), Ok(Some(true)), "{t}");
        }
        for f in ["false", "0", "no", "off", "f", "n", "No"] {
            assert_eq!(boolean(json!(f)), Ok(Some(false)), "{f}");
        }
        for bad in [json!(2), json!(0.5), json!("maybe"), json!([]), json!({})] {
            assert_eq!(boolean(bad.clone()), Err(()), "{bad}");
        }
    }

    #[test]
    fn the_prompt_estimate_counts_every_prompt_field_and_each_message() {
        let body = br#"{"model":"m","messages":[
            {"role":"user","content":[{"type":"text","text":"abcdef"}]},
            {"role":"assistant","content":"ok"}],
            "tools":[{"type":"function","function":{"name":"f","description":"dddd"}}],
            "documents":[{"t":"xy"}]}"#;
        let i = inspect(Route::Generate(Api::Chat), body, P).unwrap();
        // Keys and strings: the messages 33 + 22 bytes, the tool 40, the document 3: 98
        // bytes, a token per 4 started (25), and 4 tokens a message (8).
        assert_eq!(i.prompt_estimate, 33);
        assert_eq!(i.model.as_deref(), Some("m"));
        // Everything the model reads is in the scanned text, the tool description included.
        let text = String::from_utf8(i.prompt_text.clone()).unwrap();
        for part in ["abcdef", "ok", "dddd", "xy"] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // Completions: the prompt and the suffix.
        let i = inspect(
            Route::Generate(Api::Completions),
            br#"{"prompt":"xy","suffix":"abcdefgh"}"#,
            P,
        )
        .unwrap();
        assert_eq!(i.prompt_estimate, 3);
    }

    #[test]
    fn stream_usage_choices_and_a_zero_limit_are_read_as_the_upstream_reads_them() {
        let chat = |b: &str| inspect(Route::Generate(Api::Chat), b.as_bytes(), P);
        // Not streamed: no stream options added, no usage chunk to strip.
        let i = chat(r#"{"messages":[]}"#).unwrap();
        assert!(!i.strip_usage_chunk);
        assert!(fwd(&i).get("stream_options").is_none(), "{}", fwd(&i));
        // The Responses API streams its usage anyway and has no stream_options.
        let i = inspect(
            Route::Generate(Api::Responses),
            br#"{"input":"x","stream":true}"#,
            P,
        )
        .unwrap();
        assert!(i.stream && !i.strip_usage_chunk);
        assert!(fwd(&i).get("stream_options").is_none(), "{}", fwd(&i));
        // `max_completion_tokens: 0` is "not set" to vLLM: removed, `max_tokens` rules.
        let i = chat(r#"{"messages":[],"max_completion_tokens":0,"max_tokens":5}"#).unwrap();
        let v = fwd(&i);
        assert!(v.get("max_completion_tokens").is_none(), "{v}");
        assert_eq!(
            (v["max_tokens"].as_u64(), i.completion_reserve),
            (Some(5), 5)
        );
        // Choices: up to MAX_CHOICES, each reserving the completion limit.
        let i = chat(&format!(
            r#"{{"messages":[],"max_tokens":2,"n":{MAX_CHOICES}}}"#
        ))
        .unwrap();
        assert_eq!(i.completion_reserve, 2 * MAX_CHOICES);
        let over = format!(r#"{{"messages":[],"n":{}}}"#, MAX_CHOICES + 1);
        assert_eq!(chat(&over).unwrap_err().code.as_str(), "invalid_parameter");
    }

    #[test]
    fn nesting_is_allowed_to_max_depth_and_no_deeper() {
        let nest = |levels: usize| {
            let mut v = Value::Null;
            for _ in 0..levels {
                v = Value::Array(vec![v]);
            }
            v
        };
        assert!(depth_ok(&nest(MAX_DEPTH)));
        assert!(!depth_ok(&nest(MAX_DEPTH + 1)));
        // An empty object is a level too, innermost as anywhere.
        let around_object = |arrays: usize| {
            let mut v = Value::Object(Map::new());
            for _ in 0..arrays {
                v = Value::Array(vec![v]);
            }
            v
        };
        assert!(depth_ok(&around_object(MAX_DEPTH - 1)));
        assert!(!depth_ok(&around_object(MAX_DEPTH)));
        let mut obj = Map::new();
        obj.insert("x".into(), nest(MAX_DEPTH - 1));
        assert!(depth_ok(&Value::Object(obj.clone())));
        obj.insert("x".into(), nest(MAX_DEPTH));
        assert!(!depth_ok(&Value::Object(obj)));
    }

    #[test]
    fn strips_salt_asks_for_usage_and_writes_the_limit() {
        let b = br#"{"model":"m","cache_salt":"victim","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hello there"}]}"#;
        let i = inspect(Route::Generate(Api::Chat), b, P).unwrap();
        assert!(i.stream && i.strip_usage_chunk && i.client_salt);
        assert_eq!(i.completion_reserve, 10);
        assert!(i.prompt_estimate >= 3);
        let v = fwd(&i);
        assert!(v.get("cache_salt").is_none());
        assert_eq!(v["stream_options"]["include_usage"], true);
        // No limit: the tenant default is reserved and written in.
        let b = br#"{"stream":true,"stream_options":{"include_usage":true},"prompt":"x"}"#;
        let i = inspect(Route::Generate(Api::Completions), b, P).unwrap();
        assert!(!i.strip_usage_chunk && !i.client_salt);
        assert_eq!(i.completion_reserve, 256);
        assert_eq!(fwd(&i)["max_tokens"], 256);
        let i = inspect(Route::Generate(Api::Responses), br#"{"input":"x"}"#, P).unwrap();
        assert_eq!(fwd(&i)["max_output_tokens"], 256);
        // Embeddings reserve no completion.
        let i = inspect(
            Route::Encode(Body::Embeddings),
            br#"{"input":"abcd abcd"}"#,
            P,
        )
        .unwrap();
        assert_eq!(i.completion_reserve, 0);
        assert!(i.prompt_estimate > 0);
    }

    #[test]
    fn salt_replaces_the_clients_on_model_routes_only() {
        let p = Policy {
            salt: Some("s3cret"),
            ..P
        };
        let b = br#"{"prompt":"x","cache_salt":"mine"}"#;
        let i = inspect(Route::Generate(Api::Completions), b, p).unwrap();
        assert_eq!(fwd(&i)["cache_salt"], "s3cret");
        assert!(i.client_salt);
        let i = inspect(Route::Encode(Body::Embeddings), br#"{"input":"x"}"#, p).unwrap();
        assert_eq!(fwd(&i)["cache_salt"], "s3cret");
        // The tokenizer takes no salt: not a field of its request, so a client's is refused.
        let i = inspect(Route::Tokenize(Body::Tokenize), br#"{"prompt":"x"}"#, p).unwrap();
        assert!(fwd(&i).get("cache_salt").is_none());
        let e = inspect(
            Route::Tokenize(Body::Tokenize),
            br#"{"prompt":"x","cache_salt":"c"}"#,
            p,
        )
        .unwrap_err();
        assert_eq!(e.code.as_str(), "unknown_field");
    }

    #[test]
    fn token_fields_are_read_as_the_upstream_reads_them() {
        let chat = |extra: &str| {
            let b = format!(r#"{{"messages":[]{extra}}}"#);
            inspect(Route::Generate(Api::Chat), b.as_bytes(), P)
        };
        for (extra, want) in [
            (r#","max_tokens":1e5"#, 100_000),
            (r#","max_tokens":"100000""#, 100_000),
            (r#","max_tokens":100.0"#, 100),
            (r#","max_tokens":null"#, 256),
            (r#","max_completion_tokens":7,"max_tokens":100"#, 7),
            (r#","max_completion_tokens":0,"max_tokens":9"#, 9),
            (r#","max_tokens":10,"n":"3""#, 30),
            (r#","max_tokens":10,"n":2,"best_of":5"#, 50),
        ] {
            let i = chat(extra).unwrap();
            assert_eq!(i.completion_reserve, want, "{extra}");
            let v = fwd(&i);
            assert!(
                v["max_tokens"].is_u64() || v["max_completion_tokens"].is_u64(),
                "{extra}: {v}"
            );
        }
        for extra in [
            r#","max_tokens":-1"#,
            r#","max_tokens":1.5"#,
            r#","max_tokens":"lots""#,
            r#","max_tokens":[1]"#,
            r#","n":129"#,
            r#","n":0"#,
            r#","best_of":1000"#,
            r#","stream":"maybe""#,
            r#","stream":true,"stream_options":3"#,
        ] {
            assert_eq!(
                chat(extra).unwrap_err().code.as_str(),
                "invalid_parameter",
                "{extra}"
            );
        }
        // A numeric-string limit is forwarded as the number that was reserved.
        let v = fwd(&chat(r#","max_tokens":"12","stream":"true""#).unwrap());
        assert_eq!(v["max_tokens"], 12);
        assert_eq!(v["stream"], true);
    }

    #[test]
    fn numbers_are_forwarded_as_the_client_wrote_them() {
        // Read correctly rounded (serde_json's `float_roundtrip`), a number is forwarded as the
        // client wrote it: the upstream reads the client's value, the one the sidecar read.
        for x in [
            "-2.705345999997654e-179",
            "0.30000000000000004",
            "1.7976931348623157e+308",
            "5e-324",
            "0.7",
        ] {
            let b = format!(r#"{{"prompt":"x","temperature":{x}}}"#);
            let i = inspect(Route::Generate(Api::Completions), b.as_bytes(), P).unwrap();
            let text = String::from_utf8(i.body.to_vec()).unwrap();
            assert!(
                text.contains(&format!(r#""temperature":{x}"#)),
                "{x}: {text}"
            );
            let want: Value = serde_json::from_str(x).unwrap();
            assert_eq!(fwd(&i)["temperature"], want, "{x}");
        }
    }

    #[test]
    fn the_forwarded_body_is_the_clients_bytes_where_every_parser_reads_them_alike() {
        let text = |b: &[u8]| {
            let i = inspect(Route::Generate(Api::Completions), b, P).unwrap();
            String::from_utf8(i.body.to_vec()).unwrap()
        };
        // Unchanged members keep the client's spelling: whitespace, escapes, order.
        let b = br#"{ "prompt" : "caf\u00e9 \/ x" , "temperature":0.5 , "seed":7 }"#;
        let out = text(b);
        assert!(
            out.starts_with(r#"{"prompt" : "caf\u00e9 \/ x","temperature":0.5,"seed":7,"#),
            "{out}"
        );
        // Bytes another parser could read otherwise are written as serde_json writes them:
        // an escaped key, a duplicate (the last kept, as serde_json keeps it), a nested
        // duplicate, a big integer and `-0`.
        let out = text(br#"{"pr\u006fmpt":"x","seed":1,"seed":2}"#);
        assert!(out.starts_with(r#"{"prompt":"x","seed":2,"#), "{out}");
        let out = text(br#"{"prompt":[{"b":1,"b":2,"a":3}]}"#);
        assert!(out.starts_with(r#"{"prompt":[{"a":3,"b":2}],"#), "{out}");
        let out = text(br#"{"prompt":"x","seed":18446744073709551616,"top_k":-0,"top_p":0.50}"#);
        assert!(
            out.starts_with(
                r#"{"prompt":"x","seed":1.8446744073709552e+19,"top_k":-0.0,"top_p":0.5,"#
            ),
            "{out}"
        );
    }

    #[test]
    fn bodies_the_parser_rejects_are_refused() {
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let deep = format!(r#"{{"prompt":"x","x":{deep}}}"#);
        for b in [
            &b"\xef\xbb\xbf{\"prompt\":\"x\"}"[..],
            br#"{"prompt":"x","temperature":NaN}"#,
            br#"{"prompt":"x","temperature":Infinity}"#,
            br#"{"prompt":"x"} {"cache_salt":"v"}"#,
            b"{\"prompt\":\"\xff\xfe\"}",
            br#"["prompt"]"#,
            b"",
            deep.as_bytes(),
        ] {
            let e = inspect(Route::Generate(Api::Completions), b, P).unwrap_err();
            assert_eq!(
                e.code.as_str(),
                "invalid_json",
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // Duplicate keys: the forwarded body has one, the sidecar's.
        let p = Policy {
            salt: Some("mine"),
            ..P
        };
        let i = inspect(
            Route::Generate(Api::Completions),
            br#"{"prompt":"x","cache_salt":"a","cache_salt":"b"}"#,
            p,
        )
        .unwrap();
        let text = String::from_utf8(i.body.to_vec()).unwrap();
        assert_eq!(text.matches("cache_salt").count(), 1, "{text}");
        assert!(text.contains(r#""cache_salt":"mine""#));
    }

    #[test]
    fn scopes_hold_models_tools_and_limits_in_every_shape() {
        let scope = crate::auth::scope::Scope::from_config(&crate::auth::scope::ScopeConfig {
            models: Some(vec!["m".into()]),
            routes: None,
            tools: Some(vec!["ok".into(), "web_search".into()]),
            max_tokens: Some(50),
        })
        .unwrap();
        let p = Policy {
            scope: Some(&scope),
            ..P
        };
        let code = |route, body: &str| {
            inspect(route, body.as_bytes(), p)
                .map(|_| "ok")
                .unwrap_or_else(|r| r.code.as_str())
        };
        let chat = Route::Generate(Api::Chat);
        let resp = Route::Generate(Api::Responses);
        for (route, body, want) in [
            (chat, r#"{"model":"m","messages":[]}"#, "ok"),
            (chat, r#"{"model":"x","messages":[]}"#, "permission_denied"),
            (chat, r#"{"model":7,"messages":[]}"#, "invalid_parameter"),
            (chat, r#"{"messages":[]}"#, "permission_denied"),
            (Route::Tokenize(Body::Tokenize), r#"{"prompt":"x"}"#, "ok"),
            (
                Route::Tokenize(Body::Tokenize),
                r#"{"model":"x","prompt":"x"}"#,
                "permission_denied",
            ),
            (
                Route::Encode(Body::Embeddings),
                r#"{"input":"x"}"#,
                "permission_denied",
            ),
            // Responses API tools: `name` at the top, built-in tools by `type`.
            (
                resp,
                r#"{"model":"m","input":"x","tools":[{"type":"function","name":"ok"},{"type":"web_search"}]}"#,
                "ok",
            ),
            (
                resp,
                r#"{"model":"m","input":"x","tools":[{"type":"file_search"}]}"#,
                "permission_denied",
            ),
            (
                resp,
                r#"{"model":"m","input":"x","tool_choice":{"type":"function","name":"no"}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"tool_choice":{"type":"allowed_tools","tools":[{"type":"function","function":{"name":"no"}}]}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"tool_choice":{"type":"allowed_tools","tools":[{"type":"function","function":{"name":"ok"}}]}}"#,
                "ok",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"tool_choice":"required","tools":[{"function":{"name":"ok"}}]}"#,
                "ok",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"tools":[{}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"tools":{"a":1}}"#,
                "invalid_parameter",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"function_call":{"name":"no"}}"#,
                "permission_denied",
            ),
            // The completion limit, as the upstream reads it.
            (
                chat,
                r#"{"model":"m","messages":[],"max_tokens":"50"}"#,
                "ok",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"max_tokens":51}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"model":"m","messages":[],"max_completion_tokens":51,"max_tokens":1}"#,
                "permission_denied",
            ),
            (
                resp,
                r#"{"model":"m","input":"x","max_output_tokens":1e3}"#,
                "permission_denied",
            ),
        ] {
            assert_eq!(code(route, body), want, "{body}");
        }
        // Without a limit the scope's is written in when it is below the tenant default.
        let i = inspect(chat, br#"{"model":"m","messages":[]}"#, p).unwrap();
        assert_eq!(fwd(&i)["max_tokens"], 50);
        assert_eq!(i.completion_reserve, 50);
    }

    fn code(route: Route, body: &str, p: Policy<'_>) -> &'static str {
        inspect(route, body.as_bytes(), p)
            .map(|_| "ok")
            .unwrap_or_else(|r| r.code.as_str())
    }

    #[test]
    fn a_field_outside_the_schema_is_refused_by_name_unless_the_tenant_opts_it_in() {
        let chat = Route::Generate(Api::Chat);
        let e = inspect(chat, br#"{"messages":[],"x_secret":"v"}"#, P).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code.as_str()),
            (400, "unknown_field")
        );
        assert!(e.message.contains("\"x_secret\""), "{}", e.message);
        // The name is escaped and cut short.
        let long = format!(r#"{{"messages":[],"{}\n":1}}"#, "k".repeat(300));
        let e = inspect(chat, long.as_bytes(), P).unwrap_err();
        assert!(e.message.contains("...") && e.message.contains("kkk"));
        assert!(e.message.len() < 300, "{}", e.message);
        // A field of another route is unknown here too.
        assert_eq!(
            code(chat, r#"{"messages":[],"max_output_tokens":5}"#, P),
            "unknown_field"
        );
        assert_eq!(
            code(Route::Generate(Api::Responses), r#"{"input":"x","n":4}"#, P),
            "unknown_field"
        );
        // Opted in: forwarded, counted and scanned as prompt text.
        let extra = ["x_secret".to_string()];
        let p = Policy {
            extra_fields: &extra,
            ..P
        };
        let i = inspect(chat, br#"{"messages":[],"x_secret":"abcdefgh"}"#, p).unwrap();
        assert_eq!(fwd(&i)["x_secret"], "abcdefgh");
        assert!(i.prompt_estimate >= 2);
        assert!(String::from_utf8_lossy(&i.prompt_text).contains("abcdefgh"));
    }

    #[test]
    fn every_prompt_and_every_choice_is_reserved() {
        let comp = Route::Generate(Api::Completions);
        // 80 prompts x 16 tokens: the red team's list prompt.
        let prompts: Vec<String> = (0..80).map(|i| format!("\"p{i}\"")).collect();
        let body = format!(r#"{{"prompt":[{}],"max_tokens":16}}"#, prompts.join(","));
        let i = inspect(comp, body.as_bytes(), P).unwrap();
        assert_eq!((i.prompts, i.completion_reserve), (80, 1280));
        // Token-id prompts: one list is one prompt, each id a token.
        let i = inspect(
            comp,
            br#"{"prompt":[1,2,3,4,5,6,7,8],"max_tokens":4,"n":2}"#,
            P,
        )
        .unwrap();
        assert_eq!(
            (i.prompts, i.prompt_estimate, i.completion_reserve),
            (1, 8, 8)
        );
        let i = inspect(
            comp,
            br#"{"prompt":[[1,2],[3,4,5]],"max_tokens":4,"n":3}"#,
            P,
        )
        .unwrap();
        assert_eq!(
            (i.prompts, i.prompt_estimate, i.completion_reserve),
            (2, 5, 24)
        );
        // Choices x prompts beyond MAX_CHOICES: too large.
        let body = format!(r#"{{"prompt":[{}],"n":2}}"#, prompts.join(","));
        let e = inspect(comp, body.as_bytes(), P).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code.as_str()),
            (400, "request_too_large")
        );
        let body = format!(r#"{{"prompt":[{}],"best_of":2}}"#, prompts[..64].join(","));
        assert_eq!(code(comp, &body, P), "ok");
    }

    #[test]
    fn media_parts_cost_the_configured_worst_case_never_their_url_length() {
        let p = Policy {
            media_tokens: 1000,
            ..P
        };
        let url = format!("data:image/png;base64,{}", "A".repeat(40_000));
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{url}"}}}},{{"type":"text","text":"what"}}]}}]}}"#
        );
        let i = inspect(Route::Generate(Api::Chat), body.as_bytes(), p).unwrap();
        assert!(
            (1000..1100).contains(&i.prompt_estimate),
            "{}",
            i.prompt_estimate
        );
        assert!(!String::from_utf8_lossy(&i.prompt_text).contains("AAAA"));
        // A text field on a media part is still read.
        let body = r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"http://x/y.png","detail":"zzzzzzzz"}]}]}"#;
        let i = inspect(Route::Generate(Api::Responses), body.as_bytes(), p).unwrap();
        assert!(String::from_utf8_lossy(&i.prompt_text).contains("zzzzzzzz"));
        assert!(!String::from_utf8_lossy(&i.prompt_text).contains("http://x"));
    }

    #[test]
    fn engine_fields_are_the_sidecars() {
        let chat = Route::Generate(Api::Chat);
        let resp = Route::Generate(Api::Responses);
        let p = Policy {
            request_id: "sidecar-id",
            priority: 5,
            ..P
        };
        // The client's request ids are replaced (vLLM: `request_id`; SGLang: `rid`).
        let i = inspect(
            chat,
            br#"{"messages":[],"request_id":"victim","rid":"v2"}"#,
            p,
        )
        .unwrap();
        let v = fwd(&i);
        assert_eq!(v["request_id"], "sidecar-id");
        assert!(v.get("rid").is_none(), "{v}");
        assert_eq!(v["priority"], 5);
        let sg = Policy {
            flavor: Flavor::Sglang,
            ..p
        };
        let v = fwd(&inspect(chat, br#"{"messages":[],"request_id":"victim"}"#, sg).unwrap());
        assert_eq!(
            (v.get("request_id"), &v["rid"]),
            (None, &Value::from("sidecar-id"))
        );
        // An OpenAI-compatible upstream gets neither, nor a priority.
        let oa = Policy {
            flavor: Flavor::Openai,
            ..p
        };
        let v = fwd(&inspect(chat, br#"{"messages":[],"rid":"x"}"#, oa).unwrap());
        assert!(
            v.get("rid").is_none() && v.get("request_id").is_none() && v.get("priority").is_none()
        );
        // The Responses API stores under its request id: the sidecar's, `resp_`-prefixed.
        let v = fwd(&inspect(resp, br#"{"input":"x","request_id":"resp_victim"}"#, p).unwrap());
        assert_eq!(v["request_id"], "resp_sidecar-id");
        // A client priority is refused; so is an engine field the tenant is not trusted with.
        assert_eq!(
            code(chat, r#"{"messages":[],"priority":-100}"#, p),
            "owned_field"
        );
        assert_eq!(code(chat, r#"{"messages":[],"priority":null}"#, p), "ok");
        let kv = r#"{"messages":[],"kv_transfer_params":{"remote_host":"10.0.0.9"}}"#;
        let e = inspect(chat, kv.as_bytes(), p).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code.as_str()),
            (403, "engine_field")
        );
        let trusted = ["kv_transfer_params".to_string()];
        let t = Policy {
            trusted: &trusted,
            ..p
        };
        let v = fwd(&inspect(chat, kv.as_bytes(), t).unwrap());
        assert_eq!(v["kv_transfer_params"]["remote_host"], "10.0.0.9");
        for f in [
            r#""chat_template":"{{ x }}""#,
            r#""lora_path":"/x""#,
            r#""custom_logit_processor":"x""#,
            r#""return_cached_tokens_details":true"#,
            r#""extra_key":"other""#,
            r#""bootstrap_host":"h""#,
        ] {
            assert_eq!(
                code(chat, &format!(r#"{{"messages":[],{f}}}"#), p),
                "engine_field",
                "{f}"
            );
        }
    }

    #[test]
    fn responses_are_stored_only_for_tenants_allowed_to() {
        let resp = Route::Generate(Api::Responses);
        let p = Policy {
            request_id: "rq",
            ..P
        };
        // Not allowed: written false (the upstream stores by default), a client `true` refused.
        let i = inspect(resp, br#"{"input":"x"}"#, p).unwrap();
        assert_eq!(fwd(&i)["store"], false);
        assert_eq!(i.stored_response_id, None);
        let e = inspect(resp, br#"{"input":"x","store":true}"#, p).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code.as_str()),
            (403, "permission_denied")
        );
        // Allowed: stored unless the client says not to, under the sidecar's id.
        let s = Policy {
            store_responses: true,
            ..p
        };
        let i = inspect(resp, br#"{"input":"x"}"#, s).unwrap();
        assert_eq!(fwd(&i)["store"], true);
        assert_eq!(i.stored_response_id.as_deref(), Some("resp_rq"));
        let i = inspect(resp, br#"{"input":"x","store":"false"}"#, s).unwrap();
        assert_eq!(
            (fwd(&i)["store"].clone(), i.stored_response_id),
            (Value::Bool(false), None)
        );
        // An input item that names a stored item: refused (the store is every tenant's).
        let e = inspect(
            resp,
            br#"{"input":[{"type":"item_reference","id":"msg_other"}]}"#,
            p,
        )
        .unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code.as_str()),
            (403, "engine_field")
        );
        assert_eq!(
            code(
                resp,
                r#"{"input":[{"type":"message","role":"user","content":"x"}]}"#,
                p
            ),
            "ok"
        );
        // A previous response id is handed to the caller to check.
        let i = inspect(resp, br#"{"input":"x","previous_response_id":"resp_9"}"#, p).unwrap();
        assert_eq!(i.previous_response_id.as_deref(), Some("resp_9"));
        assert_eq!(
            code(resp, r#"{"input":"x","previous_response_id":7}"#, p),
            "invalid_parameter"
        );
    }

    #[test]
    fn tools_are_named_as_each_api_names_them() {
        let scope = crate::auth::scope::Scope::from_config(&crate::auth::scope::ScopeConfig {
            tools: Some(vec!["lookup".into(), "web_search_preview".into()]),
            ..Default::default()
        })
        .unwrap();
        let p = Policy {
            scope: Some(&scope),
            ..P
        };
        let chat = Route::Generate(Api::Chat);
        let resp = Route::Generate(Api::Responses);
        for (route, body, want) in [
            // Responses: a built-in tool is its type, whatever `name` it carries.
            (
                resp,
                r#"{"input":"x","tools":[{"type":"code_interpreter","name":"lookup"}]}"#,
                "permission_denied",
            ),
            (
                resp,
                r#"{"input":"x","tools":[{"type":"mcp","server_url":"http://evil","name":"lookup","server_label":"lookup"}]}"#,
                "permission_denied",
            ),
            (
                resp,
                r#"{"input":"x","tools":[{"type":"web_search_preview"}]}"#,
                "ok",
            ),
            (
                resp,
                r#"{"input":"x","tools":[{"type":"function","name":"lookup"}]}"#,
                "ok",
            ),
            // A function named at the top and in `function.name`: refused in either API.
            (
                resp,
                r#"{"input":"x","tools":[{"type":"function","name":"exec_shell","function":{"name":"lookup"}}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"tools":[{"type":"function","name":"exec_shell","function":{"name":"lookup"}}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"tools":[{"type":"function","function":{"name":"lookup"}}]}"#,
                "ok",
            ),
            (
                resp,
                r#"{"input":"x","tools":[{"name":"lookup"}]}"#,
                "permission_denied",
            ),
            // Forcing: the same names.
            (
                resp,
                r#"{"input":"x","tool_choice":{"type":"code_interpreter"}}"#,
                "permission_denied",
            ),
            (
                resp,
                r#"{"input":"x","tool_choice":{"type":"allowed_tools","mode":"auto","tools":[{"type":"mcp","name":"lookup"}]}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"tool_choice":{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[{"type":"function","function":{"name":"exec"}}]}}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"tool_choice":{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[{"type":"function","function":{"name":"lookup"}}]}}}"#,
                "ok",
            ),
            (
                chat,
                r#"{"messages":[],"tool_choice":{"type":"function","name":"exec","function":{"name":"lookup"}}}"#,
                "permission_denied",
            ),
            // Tools declared on a message, or referenced in a content part.
            (
                chat,
                r#"{"messages":[{"role":"system","content":"s","tools":[{"type":"function","function":{"name":"exec"}}]}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[{"role":"user","content":[{"type":"tool_reference","name":"exec"}]}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[{"role":"user","content":[{"type":"tool_reference","name":"lookup"}]}]}"#,
                "ok",
            ),
            (chat, r#"{"messages":[],"chat_template_kwargs":null}"#, "ok"),
            // Template arguments that carry tools, documents or a template.
            (
                chat,
                r#"{"messages":[],"chat_template_kwargs":{"tools":[{"function":{"name":"exec"}}]}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"chat_template_kwargs":{"documents":[]}}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"chat_template_kwargs":{"enable_thinking":false}}"#,
                "ok",
            ),
            (
                chat,
                r#"{"messages":[],"functions":[{"name":"exec"}]}"#,
                "permission_denied",
            ),
            (
                chat,
                r#"{"messages":[],"functions":[{"name":"lookup","function":{"name":"lookup"}}]}"#,
                "permission_denied",
            ),
        ] {
            assert_eq!(code(route, body, p), want, "{body}");
        }
        // Without a tool scope, the same template arguments pass (and are counted).
        let i = inspect(
            chat,
            br#"{"messages":[],"chat_template_kwargs":{"documents":[{"text":"abcdefgh"}]}}"#,
            P,
        )
        .unwrap();
        assert!(String::from_utf8_lossy(&i.prompt_text).contains("abcdefgh"));
    }

    #[test]
    fn engine_fields_are_written_only_where_the_upstream_reads_them() {
        let p = Policy {
            request_id: "rq",
            priority: 1,
            ..P
        };
        let sg = Policy {
            flavor: Flavor::Sglang,
            ..p
        };
        // The tokenizer's request has neither an id nor a priority.
        for policy in [p, sg] {
            let v = fwd(&inspect(
                Route::Tokenize(Body::Tokenize),
                br#"{"prompt":"x"}"#,
                policy,
            )
            .unwrap());
            assert_eq!(v, serde_json::json!({"prompt": "x"}));
        }
        // vLLM's pooling request has `request_id` and no `rid`: SGLang's spelling is not
        // written where the route has none.
        let v = fwd(&inspect(Route::Encode(Body::Pooling), br#"{"input":"x"}"#, sg).unwrap());
        assert!(
            v.get("rid").is_none() && v.get("request_id").is_none(),
            "{v}"
        );
        assert_eq!(v["priority"], 1);
        // `store` is the Responses API's: a chat body's is forwarded as written, none added.
        let v = fwd(&inspect(Route::Generate(Api::Chat), br#"{"messages":[]}"#, p).unwrap());
        assert!(v.get("store").is_none(), "{v}");
        let v = fwd(&inspect(
            Route::Generate(Api::Chat),
            br#"{"messages":[],"store":true}"#,
            p,
        )
        .unwrap());
        assert_eq!(v["store"], true);
    }
}
