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
use super::scan::{self, Kind, Node, Out};
use crate::auth::scope::{Scope, quoted};
use crate::config::Flavor;
use crate::proxy::schema::{Body, Class, Engine};
use bytes::Bytes;
use serde_json::{Map, Value};
use std::borrow::Cow;

mod fields;
pub mod prompt_hash;
#[cfg(test)]
mod reference;
mod scope;

use fields::*;
use scope::*;

pub use super::scan::MAX_DEPTH;
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
    /// (compact, keys sorted); a long prompt's is taken later ([`prompt_hash`]).
    pub prompt_hash: Option<prompt_hash::PromptHash>,
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
    inspect_bytes(route, &Bytes::copy_from_slice(body), policy)
}

/// [`inspect`] of a body the caller holds as [`Bytes`]: a long prompt's hash keeps a reference
/// to it, not a copy.
pub fn inspect_bytes(
    route: Route,
    client: &Bytes,
    policy: Policy<'_>,
) -> Result<Inspected, Refusal> {
    let body: &[u8] = client;
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
    // already); a long prompt's input is recorded, to be hashed off the request path.
    if let Some(key) = policy.prompt_key.filter(|_| !prompt_fields.is_empty()) {
        fn input(prompt_fields: &[usize], doc: &scan::Doc<'_>, body: &[u8], h: &mut impl Out) {
            for &i in prompt_fields {
                let m = &doc.members[i];
                h.put(m.key.as_bytes());
                h.put(b"=");
                m.value.write_canonical(body, h);
                h.put(b"\n");
            }
        }
        let long: usize = prompt_fields
            .iter()
            .map(|&i| doc.members[i].value.span.len())
            .sum();
        info.prompt_hash = Some(if long >= prompt_hash::DEFER_FROM {
            let mut rec = prompt_hash::Recorder::new(client);
            input(&prompt_fields, &doc, body, &mut rec);
            rec.finish(key)
        } else {
            let mut h = ring::hmac::Context::with_key(key);
            input(&prompt_fields, &doc, body, &mut h);
            prompt_hash::PromptHash::ready(crate::record::audit::hex_tag(&h.sign()))
        });
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

#[cfg(test)]
mod tests;
