//! Property tests for body inspection and path classification.
//!
//! `inspect` never panics; whatever the client wrote, a body it accepts is forwarded as a
//! strict JSON object that every parser reads alike (no key written twice), carries the
//! tenant's salt (never the client's) exactly where the route is salted, and states the completion limit, choices and
//! streaming usage the sidecar reserved for, in the form the upstream reads; a body that is not
//! strict JSON is refused as `invalid_json`. `classify` accepts only canonical `/v1/` paths.

use bulkhead_sidecar::proxy::schema::{Body, Class, Engine};
use bulkhead_sidecar::proxy::{
    Api, Inspected, MAX_CHOICES, MAX_DEPTH, Policy, ROUTES, Refusal, Route, classify, inspect,
};
use http::Method;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Number, Value};

/// Every route kind `inspect` is called for.
const INSPECTED: [Route; 5] = [
    Route::Generate(Api::Chat),
    Route::Generate(Api::Completions),
    Route::Generate(Api::Responses),
    Route::Encode(Body::Embeddings),
    Route::Tokenize(Body::Tokenize),
];

/// The keys inspection reads or writes, and some of each schema class.
const KEYS: &[&str] = &[
    "prompt",
    "messages",
    "input",
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
    "x_not_in_any_schema",
];

/// The audit's prompt-hash key: two equivalent bodies hash their prompts alike.
static PROMPT_KEY: std::sync::LazyLock<ring::hmac::Key> =
    std::sync::LazyLock::new(|| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"prompt-key"));

/// The tenant's side, owned so that a strategy can produce it.
#[derive(Debug, Clone)]
struct Tenant {
    default_max_tokens: u64,
    salt: Option<String>,
}

impl Tenant {
    fn policy(&self) -> Policy<'_> {
        Policy {
            default_max_tokens: self.default_max_tokens,
            salt: self.salt.as_deref(),
            prompt_key: Some(&PROMPT_KEY),
            ..Policy::open(self.default_max_tokens)
        }
    }
}

fn tenant() -> impl Strategy<Value = Tenant> {
    (
        prop_oneof![4 => 1u64..=65_536, 1 => Just(u64::MAX)],
        prop_oneof![
            Just(None),
            Just(Some("tenant-salt".to_string())),
            any::<String>().prop_map(Some),
        ],
    )
        .prop_map(|(default_max_tokens, salt)| Tenant {
            default_max_tokens,
            salt,
        })
}

fn route() -> impl Strategy<Value = Route> {
    prop::sample::select(INSPECTED.to_vec())
}

// ---------------------------------------------------------------------------------------
// JSON values

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS.to_vec()).prop_map(String::from),
        1 => "[a-z_]{0,8}",
        1 => any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..300).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..300).prop_map(|n| Value::from(f64::from(n))),
        (-1.0e3f64..1.0e3).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "", "0", "1", "12", " 7 ", "1e3", "1.5", "-1", "true", "yes", "off", "T", "NaN",
            "null", "x",
        ])
        .prop_map(String::from),
        "[ -~]{0,12}",
        any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        string().prop_map(Value::String),
    ]
}

/// Arbitrary JSON: nested objects and arrays of strings, numbers (floats included), bools and
/// nulls, with object keys mostly from the ones inspection reads.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Whole numbers as a lax integer field may be written, and some that are not whole numbers.
fn lax_uint() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (0u64..5000).prop_map(Value::from),
        (0u64..5000).prop_map(|n| Value::from(n as f64)),
        (0u64..5000).prop_map(|n| Value::String(n.to_string())),
        (0u64..5000).prop_map(|n| Value::String(format!(" {n}.0 "))),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            "-1", "1.5", "\"lots\"", "1e300", "\"1e3\"", "[1]", "{}"
        ])
        .prop_map(|s| serde_json::from_str(s).unwrap()),
    ]
}

fn lax_bool() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        "null",
        "true",
        "false",
        "0",
        "1",
        "2",
        "\"true\"",
        "\"off\"",
        "\" Y \"",
        "\"maybe\"",
        "1.0",
        "[]",
    ])
    .prop_map(|s| serde_json::from_str(s).unwrap())
}

fn choices() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (1u64..=4).prop_map(Value::from),
        1 => (0u64..=MAX_CHOICES + 2).prop_map(Value::from),
        1 => (1u64..=4).prop_map(|n| Value::String(n.to_string())),
        1 => (1u64..=4).prop_map(|n| Value::from(n as f64)),
        1 => prop::sample::select(vec!["null", "true", "\"x\"", "-1", "1000"])
            .prop_map(|s| serde_json::from_str(s).unwrap()),
    ]
}

fn stream_options() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::Object(Map::new())),
        (lax_bool(), any::<bool>()).prop_map(|(u, c)| {
            let mut o = Map::new();
            o.insert("include_usage".into(), u);
            if c {
                o.insert("continuous_usage_stats".into(), Value::Bool(true));
            }
            Value::Object(o)
        }),
        Just(Value::from(3)),
    ]
}

fn messages() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["system", "user", "assistant"]),
            string(),
        )
            .prop_map(|(role, content)| serde_json::json!({ "role": role, "content": content })),
        0..4,
    )
    .prop_map(Value::Array)
}

/// A value for `key` that inspection will usually accept.
fn plausible(key: &'static str) -> BoxedStrategy<Value> {
    match key {
        "prompt" | "input" => prop_oneof![
            string().prop_map(Value::String),
            prop::collection::vec(string().prop_map(Value::String), 0..3).prop_map(Value::Array),
        ]
        .boxed(),
        "messages" => messages().boxed(),
        "cache_salt" => string().prop_map(Value::String).boxed(),
        "stream" | "include_usage" => lax_bool().boxed(),
        "stream_options" => stream_options().boxed(),
        "n" | "best_of" => choices().boxed(),
        _ => lax_uint().boxed(),
    }
}

/// The members of a request object, in order, duplicates allowed.
fn members() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(
        prop_oneof![
            5 => prop::sample::select(KEYS.to_vec())
                .prop_flat_map(|k| plausible(k).prop_map(move |v| (k.to_string(), v))),
            1 => (key(), json()),
        ],
        0..8,
    )
}

/// Write an object member by member, so duplicate keys reach the parser.
fn object_text(members: &[(String, Value)]) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).unwrap();
        out.push(b':');
        serde_json::to_writer(&mut out, v).unwrap();
    }
    out.push(b'}');
    out
}

// ---------------------------------------------------------------------------------------
// The oracle

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 1,
    }
}

/// The keys inspection may rewrite on `route`; every other member is forwarded unchanged.
fn rewritten(route: Route) -> &'static [&'static str] {
    match route {
        Route::Generate(_) => &[
            "cache_salt",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "n",
            "best_of",
            "request_id",
            "rid",
            "priority",
            "store",
            "previous_response_id",
        ],
        _ => &["cache_salt", "request_id", "rid", "priority"],
    }
}

/// Why the schema refuses `input` on `route`, if it does: a field outside the route's schema,
/// an engine field the tenant is not trusted with, or a client priority.
fn schema_refusals(route: Route, input: &Value) -> Vec<&'static str> {
    let body = route.body().unwrap();
    let obj = input.as_object().unwrap();
    let mut why = Vec::new();
    // A Responses input item naming a stored item.
    if body == Body::Responses
        && let Some(Value::Array(items)) = obj.get("input")
        && items
            .iter()
            .any(|i| i.get("type").and_then(Value::as_str) == Some("item_reference"))
    {
        why.push("engine_field");
    }
    for (k, v) in obj {
        match body.class(k) {
            None => why.push("unknown_field"),
            Some(Class::Engine(Engine::Trusted)) => why.push("engine_field"),
            Some(Class::Engine(Engine::Priority)) if !v.is_null() => why.push("owned_field"),
            _ => {}
        }
    }
    why
}

/// What any result of `inspect(route, input, policy)` must satisfy.
fn check(
    route: Route,
    policy: Policy<'_>,
    input: &[u8],
    result: &Result<Inspected, Refusal>,
) -> Result<(), TestCaseError> {
    let shown = String::from_utf8_lossy(input);
    let parsed = match serde_json::from_slice::<Value>(input) {
        Ok(v) => v,
        Err(_) => {
            // Not strict JSON: refused as such.
            let code = result.as_ref().err().map(|r| r.code.as_str());
            prop_assert_eq!(code, Some("invalid_json"), "{:?} on {}", route, shown);
            return Ok(());
        }
    };
    if depth(&parsed) > MAX_DEPTH || !parsed.is_object() {
        let code = result.as_ref().err().map(|r| r.code.as_str());
        prop_assert_eq!(code, Some("invalid_json"), "{:?} on {}", route, shown);
        return Ok(());
    }
    let info = match result {
        Ok(info) => info,
        Err(r) => {
            // A strict JSON object within the depth limit is refused only for a field the
            // schema does not forward, or for a field's value.
            let why = schema_refusals(route, &parsed);
            match r.code.as_str() {
                "unknown_field" | "engine_field" | "owned_field" => prop_assert!(
                    why.contains(&r.code.as_str()),
                    "{:?} on {}: {} ({})",
                    route,
                    shown,
                    r.code.as_str(),
                    r.message
                ),
                // `store: true` for a tenant that may not store; a list prompt too large.
                "permission_denied" | "request_too_large" | "invalid_parameter" => {}
                other => prop_assert!(false, "{:?} on {}: {} ({})", route, shown, other, r.message),
            }
            return Ok(());
        }
    };
    // An accepted body is one the schema forwards.
    prop_assert!(
        schema_refusals(route, &parsed).is_empty(),
        "{:?} on {}: accepted a field outside the schema",
        route,
        shown
    );
    check_forwarded(route, policy, &parsed, info).map_err(|e| {
        TestCaseError::fail(format!(
            "{e}\n  route {route:?}, salt {:?}, default {}\n  in:  {shown}\n  out: {}",
            policy.salt,
            policy.default_max_tokens,
            String::from_utf8_lossy(&info.body)
        ))
    })
}

/// The strings of a prompt-bearing value the model reads as text (not the payload of an
/// image, audio, video or file part).
fn prompt_strings(v: &Value, out: &mut Vec<String>) {
    const MEDIA: &[&str] = &[
        "image_url",
        "input_image",
        "input_audio",
        "audio_url",
        "video_url",
        "file",
        "input_file",
    ];
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| prompt_strings(x, out)),
        Value::Object(o) => {
            if o.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| MEDIA.contains(&t))
            {
                return;
            }
            // A part's `type` names the part; it is no text the model reads.
            o.iter()
                .filter(|(k, v)| !(k.as_str() == "type" && v.is_string()))
                .for_each(|(_, x)| prompt_strings(x, out));
        }
        _ => {}
    }
}

/// Any JSON value in which no object writes a key twice (deserialising fails otherwise).
struct NoDuplicates;

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = NoDuplicates;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_i64<E>(self, _: i64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_u64<E>(self, _: u64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_f64<E>(self, _: f64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_str<E>(self, _: &str) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<NoDuplicates, A::Error> {
                while a.next_element::<NoDuplicates>()?.is_some() {}
                Ok(NoDuplicates)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<NoDuplicates, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = m.next_key::<String>()? {
                    if !seen.insert(k) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    m.next_value::<NoDuplicates>()?;
                }
                Ok(NoDuplicates)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// What an accepted body must look like once forwarded.
fn check_forwarded(
    route: Route,
    policy: Policy<'_>,
    input: &Value,
    info: &Inspected,
) -> Result<(), TestCaseError> {
    let fwd: Value = serde_json::from_slice(&info.body)
        .map_err(|e| TestCaseError::fail(format!("forwarded body is not JSON: {e}")))?;
    let obj = fwd
        .as_object()
        .ok_or_else(|| TestCaseError::fail("forwarded body is not an object"))?;
    // One reading: no key written twice at any depth (a parser that keeps the first would
    // read another value than serde_json, which keeps the last), and the values serde_json
    // writes back read the same.
    prop_assert!(
        serde_json::from_slice::<NoDuplicates>(&info.body).is_ok(),
        "a key is written twice in the forwarded body"
    );
    let again = serde_json::to_vec(&fwd).unwrap();
    let reparsed: Value = serde_json::from_slice(&again).unwrap();
    prop_assert_eq!(&reparsed, &fwd, "re-parsing the forwarded body changes it");

    // The salt is the tenant's, where the route is salted, and nowhere else.
    let input = input.as_object().unwrap();
    prop_assert_eq!(info.client_salt, input.contains_key("cache_salt"));
    match (policy.salt, route.salted()) {
        (Some(salt), true) => prop_assert_eq!(obj.get("cache_salt"), Some(&Value::from(salt))),
        _ => prop_assert!(!obj.contains_key("cache_salt"), "cache_salt forwarded"),
    }
    // Everything inspection does not rewrite is forwarded as the client sent it.
    for (k, v) in input {
        if !rewritten(route).contains(&k.as_str()) {
            prop_assert_eq!(obj.get(k), Some(v), "member {:?} changed", k);
        }
    }

    // Every prompt-bearing string is in the scanned text, and its bytes in the estimate.
    let body = route.body().unwrap();
    let mut strings = Vec::new();
    for (k, v) in input {
        if matches!(body.class(k), Some(Class::Prompt | Class::Tools)) {
            prompt_strings(v, &mut strings);
        }
    }
    let text = String::from_utf8_lossy(&info.prompt_text);
    let mut bytes = 0;
    for s in &strings {
        prop_assert!(
            text.contains(s.as_str()),
            "prompt string {:?} not scanned",
            s
        );
        bytes += s.len();
    }
    prop_assert!(
        info.prompt_estimate >= (bytes as u64).div_ceil(4),
        "estimate {} for {} prompt bytes",
        info.prompt_estimate,
        bytes
    );

    let Route::Generate(api) = route else {
        prop_assert_eq!(info.completion_reserve, 0);
        return Ok(());
    };
    let uint = |k: &str| -> Result<Option<u64>, TestCaseError> {
        match obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| TestCaseError::fail(format!("`{k}` forwarded as {v}"))),
        }
    };
    // The completion limit the upstream reads, as a JSON unsigned integer.
    let limit = match api {
        Api::Chat => {
            let mct = uint("max_completion_tokens")?;
            let mt = uint("max_tokens")?;
            // Unambiguous, whichever field an upstream prefers: a `max_completion_tokens`
            // is positive and any `max_tokens` beside it says the same.
            if let Some(n) = mct {
                prop_assert!(n > 0, "max_completion_tokens forwarded as 0");
                prop_assert!(mt.is_none_or(|m| m == n), "two different limits forwarded");
            }
            match mct {
                Some(n) => n,
                None => mt.ok_or_else(|| TestCaseError::fail("no completion limit forwarded"))?,
            }
        }
        Api::Completions => {
            uint("max_tokens")?.ok_or_else(|| TestCaseError::fail("no max_tokens forwarded"))?
        }
        Api::Responses => uint("max_output_tokens")?
            .ok_or_else(|| TestCaseError::fail("no max_output_tokens forwarded"))?,
    };
    let mut choices = 1;
    if api != Api::Responses {
        for k in ["n", "best_of"] {
            if let Some(c) = uint(k)? {
                prop_assert!((1..=MAX_CHOICES).contains(&c), "`{}` forwarded as {}", k, c);
                choices = choices.max(c);
            }
        }
    }
    prop_assert!(
        info.completion_reserve >= limit.saturating_mul(choices),
        "reserved {} for a limit of {} x {} choices",
        info.completion_reserve,
        limit,
        choices
    );
    // Streaming as the upstream reads it, with usage asked for.
    let stream = match obj.get("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(TestCaseError::fail(format!("`stream` forwarded as {v}"))),
    };
    prop_assert_eq!(info.stream, stream);
    if stream && api != Api::Responses {
        prop_assert_eq!(
            fwd.pointer("/stream_options/include_usage"),
            Some(&Value::Bool(true)),
            "streamed without include_usage"
        );
        // The client gets the usage chunk exactly when it asked for it.
        let asked = input
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .is_some_and(|u| {
                matches!(u, Value::Bool(true))
                    || u.as_u64() == Some(1)
                    || u.as_str().is_some_and(|s| {
                        matches!(
                            s.trim().to_ascii_lowercase().as_str(),
                            "true" | "1" | "yes" | "on" | "t" | "y"
                        )
                    })
            });
        prop_assert_eq!(info.strip_usage_chunk, !asked);
    } else {
        prop_assert!(!info.strip_usage_chunk);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Valid chat / completions bodies and their mutations

#[derive(Debug, Clone)]
struct Valid {
    api: Api,
    members: Vec<(String, Value)>,
}

impl Valid {
    fn route(&self) -> Route {
        Route::Generate(self.api)
    }
}

fn valid_body() -> impl Strategy<Value = Valid> {
    (
        any::<bool>(),
        "[a-z ]{0,24}",
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(1u64..4096),
        prop::option::of(prop_oneof![Just(0u64), 1u64..4096]),
        prop::option::of(1u64..=4),
        prop::option::of(1u64..=4),
        prop::option::of(0.0f64..2.0),
        prop::option::of("[a-z]{1,8}"),
    )
        .prop_map(
            |(chat, text, stream, usage, mt, mct, n, best_of, temperature, salt)| {
                let mut m: Vec<(String, Value)> = vec![("model".into(), "m".into())];
                let api = if chat {
                    m.push((
                        "messages".into(),
                        serde_json::json!([{ "role": "user", "content": text }]),
                    ));
                    Api::Chat
                } else {
                    m.push(("prompt".into(), text.into()));
                    Api::Completions
                };
                let mut push = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.push((k.into(), v));
                    }
                };
                push("stream", stream.map(Value::from));
                push(
                    "stream_options",
                    usage.map(|u| serde_json::json!({ "include_usage": u })),
                );
                push("max_tokens", mt.map(Value::from));
                if chat {
                    push("max_completion_tokens", mct.map(Value::from));
                } else {
                    push("best_of", best_of.map(Value::from));
                }
                push("n", n.map(Value::from));
                push("temperature", temperature.map(Value::from));
                push("cache_salt", salt.map(Value::from));
                Valid { api, members: m }
            },
        )
}

/// Another spelling of the same value, as the upstream's lax fields read it.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    String,
    PaddedString,
    Float,
    FloatString,
}

fn respell(v: &Value, s: Spelling) -> Option<Value> {
    match v {
        Value::Number(n) => {
            let n = n.as_u64()?;
            Some(match s {
                Spelling::String => Value::String(n.to_string()),
                Spelling::PaddedString => Value::String(format!(" {n} ")),
                Spelling::Float => Value::from(n as f64),
                Spelling::FloatString => Value::String(format!("{n}.0")),
            })
        }
        Value::Bool(b) => Some(match s {
            Spelling::String => Value::from(if *b { "true" } else { "false" }),
            Spelling::PaddedString => Value::from(if *b { " Yes " } else { " off " }),
            Spelling::Float | Spelling::FloatString => Value::from(u64::from(*b)),
        }),
        _ => None,
    }
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop::sample::select(vec![
        Spelling::String,
        Spelling::PaddedString,
        Spelling::Float,
        Spelling::FloatString,
    ])
}

#[derive(Debug, Clone)]
enum Mutation {
    /// A UTF-8 byte order mark before the body.
    Bom,
    /// A member whose value is not a JSON number: `NaN`, `Infinity` and the like.
    NonFinite(&'static str),
    /// Bytes after the body.
    Trailing(Vec<u8>),
    /// A byte that is not UTF-8, inside a string or anywhere.
    InvalidUtf8 {
        at: Index,
        byte: u8,
        in_string: bool,
    },
    /// A member nested this deep in arrays.
    Nest(usize),
    /// Another member with the same key, before or after it.
    Duplicate {
        which: Index,
        value: Value,
        after: bool,
    },
    /// A client `cache_salt`, possibly twice.
    Salt(String, bool),
    /// A number or bool member spelled another way.
    Respell(Index, Spelling),
    /// A whole-number member replaced by an arbitrary lax integer.
    Number(Index, Value),
    /// A byte overwritten, inserted or removed, or the body cut short.
    Byte { at: Index, byte: u8, how: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Bom),
        prop::sample::select(vec![
            "NaN",
            "Infinity",
            "-Infinity",
            "nan",
            "inf",
            "1e999",
            "+1",
            "01",
            ".5"
        ])
        .prop_map(Mutation::NonFinite),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 1..6),
            prop::sample::select(vec![" \n", "{}", ",", "x", "\0", " {\"cache_salt\":\"v\"}"])
                .prop_map(|s| s.as_bytes().to_vec()),
        ]
        .prop_map(Mutation::Trailing),
        (any::<Index>(), 0x80u8..=0xff, any::<bool>()).prop_map(|(at, byte, in_string)| {
            Mutation::InvalidUtf8 {
                at,
                byte,
                in_string,
            }
        }),
        prop_oneof![1usize..8, (MAX_DEPTH - 3)..(MAX_DEPTH + 3), 120usize..140]
            .prop_map(Mutation::Nest),
        (any::<Index>(), json(), any::<bool>()).prop_map(|(which, value, after)| {
            Mutation::Duplicate {
                which,
                value,
                after,
            }
        }),
        ("[a-z]{0,8}", any::<bool>()).prop_map(|(s, twice)| Mutation::Salt(s, twice)),
        (any::<Index>(), spelling()).prop_map(|(i, s)| Mutation::Respell(i, s)),
        (any::<Index>(), lax_uint()).prop_map(|(i, v)| Mutation::Number(i, v)),
        (any::<Index>(), any::<u8>(), 0u8..4).prop_map(|(at, byte, how)| Mutation::Byte {
            at,
            byte,
            how
        }),
    ]
}

/// Apply a member-level mutation; `None` for a mutation of the body's bytes.
fn edit(members: &[(String, Value)], m: &Mutation) -> Option<Vec<(String, Value)>> {
    let mut members = members.to_vec();
    match m {
        Mutation::Duplicate {
            which,
            value,
            after,
        } => {
            if !members.is_empty() {
                let i = which.index(members.len());
                let dup = (members[i].0.clone(), value.clone());
                members.insert(if *after { i + 1 } else { i }, dup);
            }
        }
        Mutation::Salt(s, twice) => {
            members.push(("cache_salt".into(), s.as_str().into()));
            if *twice {
                members.insert(0, ("cache_salt".into(), "first".into()));
            }
        }
        Mutation::Respell(i, s) => {
            if !members.is_empty() {
                let i = i.index(members.len());
                if let Some(v) = respell(&members[i].1, *s) {
                    members[i].1 = v;
                }
            }
        }
        Mutation::Number(i, v) => {
            let nums: Vec<usize> = (0..members.len())
                .filter(|&j| members[j].1.is_u64())
                .collect();
            if !nums.is_empty() {
                members[nums[i.index(nums.len())]].1 = v.clone();
            }
        }
        _ => return None,
    }
    Some(members)
}

/// Apply `m` to a body given member by member; the result is the body's bytes.
fn mutate(members: &[(String, Value)], m: &Mutation) -> Vec<u8> {
    if let Some(members) = edit(members, m) {
        return object_text(&members);
    }
    let text = || object_text(members);
    match m {
        Mutation::Bom => [&b"\xef\xbb\xbf"[..], &text()].concat(),
        Mutation::NonFinite(tok) => {
            let body = text();
            [&b"{\"temperature\":"[..], tok.as_bytes(), b",", &body[1..]].concat()
        }
        Mutation::Trailing(t) => [text(), t.clone()].concat(),
        Mutation::InvalidUtf8 {
            at,
            byte,
            in_string,
        } => {
            let mut body = text();
            let quotes: Vec<usize> = (0..body.len()).filter(|&i| body[i] == b'"').collect();
            let pos = if *in_string && !quotes.is_empty() {
                quotes[at.index(quotes.len())] + 1
            } else {
                at.index(body.len() + 1)
            };
            body.insert(pos, *byte);
            body
        }
        Mutation::Nest(d) => {
            let body = text();
            let nest = format!("{{\"x\":{}{},", "[".repeat(*d), "]".repeat(*d));
            [nest.as_bytes(), &body[1..]].concat()
        }
        Mutation::Byte { at, byte, how } => {
            let mut body = text();
            let pos = at.index(body.len());
            match how {
                0 => body[pos] = *byte,
                1 => body.insert(pos, *byte),
                2 => {
                    body.remove(pos);
                }
                _ => body.truncate(pos),
            }
            body
        }
        Mutation::Duplicate { .. }
        | Mutation::Salt(..)
        | Mutation::Respell(..)
        | Mutation::Number(..) => text(),
    }
}

/// The parts of an `Inspected` that two equivalent bodies must agree on.
fn outcome(i: &Inspected) -> (Value, bool, bool, u64, u64, Option<String>) {
    (
        serde_json::from_slice(&i.body).unwrap_or_default(),
        i.stream,
        i.strip_usage_chunk,
        i.prompt_estimate,
        i.completion_reserve,
        i.prompt_hash.as_ref().map(|h| h.value()),
    )
}

// ---------------------------------------------------------------------------------------
// Paths

/// Path segments: a few real ones and the ones a canonicaliser would rewrite.
const SEGMENTS: [&str; 16] = [
    "v1",
    "chat",
    "completions",
    "models",
    "embeddings",
    "m",
    "",
    ".",
    "..",
    "%",
    "%2e",
    "%2F",
    "%2e%2e",
    "v1.",
    ".x",
    "x%",
];

fn path() -> impl Strategy<Value = String> {
    let segment = || prop::sample::select(SEGMENTS.to_vec());
    prop_oneof![
        // Segments from the alphabet, under /v1/ or not.
        (
            any::<bool>(),
            prop::collection::vec(segment(), 0..6),
            any::<bool>()
        )
            .prop_map(|(v1, segs, trailing)| {
                let mut p = if v1 {
                    "/v1/".to_string()
                } else {
                    "/".to_string()
                };
                p.push_str(&segs.join("/"));
                if trailing {
                    p.push('/');
                }
                p
            }),
        // A known route with a segment inserted or replaced.
        (
            prop::sample::select(ROUTES.iter().map(|(p, _)| *p).collect::<Vec<_>>()),
            any::<Index>(),
            segment(),
            any::<bool>(),
        )
            .prop_map(|(p, at, seg, replace)| {
                let mut segs: Vec<&str> = p.split('/').collect();
                let i = 1 + at.index(segs.len());
                if replace && i < segs.len() {
                    segs[i] = seg;
                } else {
                    segs.insert(i.min(segs.len()), seg);
                }
                segs.join("/")
            }),
        // Characters from a small alphabet.
        "(/v1/)?[v1cm%./]{0,14}",
    ]
}

fn canonical(path: &str) -> bool {
    path.starts_with("/v1/")
        && !path.contains('%')
        && path[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

fn allowed(route: Route, method: &Method) -> bool {
    match route {
        Route::Generate(_) | Route::Encode(_) | Route::Tokenize(_) => *method == Method::POST,
        Route::Models => *method == Method::GET,
        Route::StoredResponse => [Method::GET, Method::POST, Method::DELETE].contains(method),
        Route::Admin | Route::Unknown => true,
    }
}

/// The route a canonical path names.
fn expected_route(path: &str) -> Route {
    ROUTES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, r)| *r)
        .unwrap_or(if path.starts_with("/v1/models/") {
            Route::Models
        } else if path.starts_with("/v1/responses/") {
            Route::StoredResponse
        } else {
            Route::Unknown
        })
}

// ---------------------------------------------------------------------------------------

proptest! {
    // 256 cases each (proptest's default); `PROPTEST_CASES=20000` for a longer run.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes: no panic, and only what parses as strict JSON can be accepted.
    #[test]
    fn arbitrary_bytes(route in route(), t in tenant(), body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[{}\\[\\]\":, 0-9a-z.eE+-]{0,40}".prop_map(String::into_bytes),
    ]) {
        let r = inspect(route, &body, t.policy());
        check(route, t.policy(), &body, &r)?;
    }

    /// Arbitrary JSON values at the top level, and arbitrary request objects (duplicate keys
    /// included) made mostly of the members inspection reads.
    #[test]
    fn arbitrary_json(route in route(), t in tenant(), body in prop_oneof![
        1 => json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        4 => members().prop_map(|m| object_text(&m)),
    ]) {
        let r = inspect(route, &body, t.policy());
        check(route, t.policy(), &body, &r)?;
    }

    /// Valid chat and completions bodies are accepted; after mutations (BOM, NaN, trailing
    /// bytes, invalid UTF-8, deep nesting, duplicate keys, numbers respelled, bytes changed)
    /// whatever is accepted is still forwarded as the oracle requires, on its own route and
    /// on any other.
    #[test]
    fn mutated_valid_bodies(
        valid in valid_body(),
        t in tenant(),
        ms in prop::collection::vec(mutation(), 1..3),
        other in route(),
    ) {
        let original = object_text(&valid.members);
        let r = inspect(valid.route(), &original, t.policy());
        prop_assert!(r.is_ok(), "valid body refused: {:?}", r.as_ref().err().map(|e| &e.message));
        check(valid.route(), t.policy(), &original, &r)?;
        let mut body = mutate(&valid.members, &ms[0]);
        for m in &ms[1..] {
            // Later mutations work on what the earlier ones left, when that is still an object.
            if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(&body) {
                body = mutate(&o.into_iter().collect::<Vec<_>>(), m);
            }
        }
        for route in [valid.route(), other] {
            let r = inspect(route, &body, t.policy());
            check(route, t.policy(), &body, &r)?;
        }
    }

    /// The same request spelled differently (numbers as strings or floats, bools as strings,
    /// the client's salt once or twice, a member given twice with the last one real) is
    /// forwarded as the same bytes, with the same reservation.
    #[test]
    fn equivalent_spellings_forward_the_same_body(
        valid in valid_body(),
        t in tenant(),
        m in prop_oneof![
            (any::<Index>(), spelling()).prop_map(|(i, s)| Mutation::Respell(i, s)),
            (any::<Index>(), json()).prop_map(|(which, value)| Mutation::Duplicate { which, value, after: false }),
        ],
        salt in prop::option::of("[a-z]{0,8}"),
    ) {
        let route = valid.route();
        let members: Vec<_> = valid.members.iter().filter(|(k, _)| k != "cache_salt").cloned().collect();
        let base = inspect(route, &object_text(&members), t.policy()).expect("valid body");
        let mut edited = edit(&members, &m).expect("a member-level mutation");
        if let Some(s) = salt {
            edited = edit(&edited, &Mutation::Salt(s, true)).expect("a member-level mutation");
        }
        let body = object_text(&edited);
        let r = inspect(route, &body, t.policy());
        check(route, t.policy(), &body, &r)?;
        let i = r.map_err(|e| TestCaseError::fail(format!("{}: {}", e.code.as_str(), e.message)))?;
        prop_assert_eq!(outcome(&i), outcome(&base), "{}", String::from_utf8_lossy(&body));
    }

    /// Only canonical `/v1/` paths are classified, each as the route table says; a path with
    /// `%` never is.
    #[test]
    fn only_canonical_paths_are_classified(
        path in path(),
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
    ) {
        let r = classify(&method, &path);
        if path.contains('%') {
            prop_assert!(r.is_err(), "{} classified as {:?}", path, r.ok());
        }
        match &r {
            Ok(route) => {
                prop_assert!(canonical(&path), "{} classified as {:?}", path, route);
                prop_assert_eq!(*route, expected_route(&path), "{}", path);
                prop_assert!(allowed(*route, &method), "{} {} classified", method, path);
            }
            Err(e) => {
                let code = if !path.starts_with("/v1/") {
                    "not_found"
                } else if path.contains('%') {
                    "encoded_path"
                } else if !canonical(&path) {
                    "non_canonical_path"
                } else {
                    prop_assert!(!allowed(expected_route(&path), &method), "{} {} refused", method, path);
                    "method_not_allowed"
                };
                prop_assert_eq!(e.code.as_str(), code, "{} {}", method, path);
            }
        }
    }
}

/// The generators reach every outcome often enough that the properties above are not vacuous.
#[test]
fn generators_reach_accepted_and_refused_bodies() {
    let mut runner = TestRunner::deterministic();
    let sample = |runner: &mut TestRunner, s: &BoxedStrategy<(Route, Vec<u8>)>| {
        let mut ok = 0;
        let mut codes = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (route, body) = s.new_tree(runner).unwrap().current();
            let p = Policy {
                salt: Some("s"),
                ..Policy::open(16)
            };
            match inspect(route, &body, p) {
                Ok(_) => ok += 1,
                Err(e) => {
                    codes.insert(e.code.as_str());
                }
            }
        }
        (ok, codes)
    };
    let arbitrary = (route(), members().prop_map(|m| object_text(&m))).boxed();
    let (ok, codes) = sample(&mut runner, &arbitrary);
    assert!(ok >= 25, "only {ok}/200 arbitrary request objects accepted");
    for code in [
        "invalid_parameter",
        "unknown_field",
        "engine_field",
        "owned_field",
    ] {
        assert!(codes.contains(code), "{code}: {codes:?}");
    }
    let mutated = (valid_body(), mutation())
        .prop_map(|(v, m)| (v.route(), mutate(&v.members, &m)))
        .boxed();
    let (ok, codes) = sample(&mut runner, &mutated);
    assert!(ok >= 40, "only {ok}/200 mutated bodies accepted");
    assert!(codes.contains("invalid_json"), "{codes:?}");
    let paths = path();
    let ok = (0..200)
        .filter(|_| {
            let p = paths.new_tree(&mut runner).unwrap().current();
            classify(&Method::POST, &p).is_ok() || classify(&Method::GET, &p).is_ok()
        })
        .count();
    assert!(ok >= 20, "only {ok}/200 paths classified");
}
