//! Body inspection for the routes that run the model. Only a body the sidecar fully parsed is
//! forwarded, and it is forwarded as the sidecar serialises it: whatever the client wrote
//! (duplicate keys, a BOM, NaN, trailing bytes, numbers as strings), the upstream reads exactly
//! the values the sidecar reserved tokens for and set the salt in.

use super::refusal::Refusal;
use super::routes::{Api, Route};
use crate::scope::Scope;
use bytes::Bytes;
use serde_json::{Map, Value};

/// Nesting beyond this is refused (tool schemas nest, but not this deep).
pub const MAX_DEPTH: usize = 64;
/// Choices (`n`, `best_of`) per request at most.
pub const MAX_CHOICES: u64 = 128;

/// What inspection learned, and the body to forward.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The sidecar's own serialisation of the request.
    pub body: Bytes,
    pub stream: bool,
    /// The sidecar asked for stream usage; the extra usage chunk is removed on the way back.
    pub strip_usage_chunk: bool,
    pub prompt_estimate: u64,
    /// Completion tokens the upstream may generate: `max_tokens` (as forwarded) x choices.
    pub completion_reserve: u64,
    /// The prompt fields, for the audit log's keyed hash.
    pub prompt_hash_input: Vec<u8>,
    /// The client sent a `cache_salt` (removed or replaced).
    pub client_salt: bool,
    /// The body's `model`, when it is a string.
    pub model: Option<String>,
}

/// The tenant's side of inspection.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub default_max_tokens: u64,
    /// The tenant's `cache_salt` (salted tier).
    pub salt: Option<&'a str>,
    /// What the credential may ask for (models, tools, `max_tokens`); `None` allows all.
    pub scope: Option<&'a Scope>,
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
    Refusal::invalid("invalid_parameter", format!("`{field}` must be {what}"))
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

fn text_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_len).sum(),
        Value::Object(o) => o.values().map(text_len).sum(),
        Value::Number(_) => 2,
        _ => 0,
    }
}

/// Parse, check and rewrite the body of an inspected route.
pub fn inspect(route: Route, body: &[u8], policy: Policy<'_>) -> Result<Inspected, Refusal> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::invalid(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !depth_ok(&v) {
        return Err(Refusal::invalid(
            "invalid_json",
            format!("the request body nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    let Some(obj) = v.as_object_mut() else {
        return Err(Refusal::invalid(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    };
    if let Some(scope) = policy.scope {
        check_scope(route, obj, scope)?;
    }
    let mut info = Inspected {
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        client_salt: obj.remove("cache_salt").is_some(),
        ..Inspected::default()
    };
    if let Some(salt) = policy.salt
        && route.salted()
    {
        obj.insert("cache_salt".into(), Value::String(salt.into()));
    }
    let mut hash_input = Vec::new();
    let mut prompt_bytes = 0usize;
    for k in ["messages", "prompt", "input", "suffix", "instructions"] {
        if let Some(x) = obj.get(k) {
            prompt_bytes += text_len(x);
            if k == "messages"
                && let Some(a) = x.as_array()
            {
                prompt_bytes += 16 * a.len();
            }
            hash_input.extend_from_slice(k.as_bytes());
            hash_input.push(b'=');
            let _ = serde_json::to_writer(&mut hash_input, x);
            hash_input.push(b'\n');
        }
    }
    info.prompt_hash_input = hash_input;
    match route {
        Route::Generate(api) => {
            info.prompt_estimate = prompt_bytes.div_ceil(4) as u64;
            generation(api, obj, policy, &mut info)?;
        }
        // Scoring and embedding inputs have many shapes: reserve by size (an upper bound).
        Route::Encode => info.prompt_estimate = body.len().div_ceil(4) as u64,
        _ => {}
    }
    let mut out = Vec::with_capacity(body.len() + 64);
    serde_json::to_writer(&mut out, &v).map_err(|e| {
        Refusal::invalid("invalid_json", format!("cannot re-serialise the body: {e}"))
    })?;
    info.body = Bytes::from(out);
    Ok(info)
}

/// The name a tool entry (`tools[]`, `functions[]`) or a forcing `tool_choice` /
/// `function_call` object goes by: `function.name`, else `name`, else (built-in tools of the
/// Responses API) `type`.
fn tool_name(v: &Value) -> Option<&str> {
    v.pointer("/function/name")
        .or_else(|| v.get("name"))
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
}

/// The credential's scope over the body: the `model` it names and the tools it declares or
/// forces. `max_tokens` is checked where the completion limit is read.
fn check_scope(route: Route, obj: &Map<String, Value>, scope: &Scope) -> Result<(), Refusal> {
    if scope.models.is_some() {
        match obj.get("model") {
            Some(Value::String(m)) if scope.allows_model(m) => {}
            Some(Value::String(m)) => return Err(Refusal::denied("model", m)),
            // The tokenizer-only routes may leave the model to the server's default.
            None | Some(Value::Null) if route == Route::Tokenize => {}
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
    let named = |v: &Value| -> Result<(), Refusal> {
        match tool_name(v) {
            Some(n) if scope.allows_tool(n) => Ok(()),
            Some(n) => Err(Refusal::denied("tool", n)),
            None => Err(Refusal::permission(
                "a tool without a name is outside this credential's scope",
            )),
        }
    };
    for key in ["tools", "functions"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => list.iter().try_for_each(named)?,
            Some(_) => return Err(bad(key, "an array")),
        }
    }
    for key in ["tool_choice", "function_call"] {
        match obj.get(key) {
            // "none", "auto", "required": no function named.
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(v @ Value::Object(o)) => {
                // `{"type": "allowed_tools", "tools": [...]}` names several.
                match o.get("tools") {
                    Some(Value::Array(list)) => list.iter().try_for_each(named)?,
                    _ => named(v)?,
                }
            }
            Some(_) => return Err(bad(key, "a string or an object")),
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
    info.completion_reserve = max.saturating_mul(choices);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy<'static> = Policy {
        default_max_tokens: 256,
        salt: None,
        scope: None,
    };

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
            "prompt":"xy","suffix":7,"instructions":null}"#;
        let i = inspect(Route::Generate(Api::Chat), body, P).unwrap();
        // Text bytes: "user" "text" "abcdef" "assistant" "ok" = 25, 16 a message = 32,
        // "xy" = 2, a number = 2: 61 bytes, a token per 4 started.
        assert_eq!(i.prompt_estimate, 16);
        assert_eq!(i.model.as_deref(), Some("m"));
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
        assert_eq!(chat(&over).unwrap_err().code, "invalid_parameter");
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
        let i = inspect(Route::Encode, br#"{"input":"abcd abcd"}"#, P).unwrap();
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
        let i = inspect(Route::Encode, br#"{"input":"x"}"#, p).unwrap();
        assert_eq!(fwd(&i)["cache_salt"], "s3cret");
        let i = inspect(Route::Tokenize, br#"{"prompt":"x","cache_salt":"c"}"#, p).unwrap();
        assert!(fwd(&i).get("cache_salt").is_none());
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
                chat(extra).unwrap_err().code,
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
        // Read correctly rounded (serde_json's `float_roundtrip`), a number written in its
        // shortest form is forwarded in the same form: the upstream reads the client's value,
        // and the forwarded body is its own serialisation.
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
                text.ends_with(&format!(r#""temperature":{x}}}"#)),
                "{x}: {text}"
            );
            let again = serde_json::to_vec(&fwd(&i)).unwrap();
            assert_eq!(again, i.body.to_vec(), "{x}");
        }
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
            assert_eq!(e.code, "invalid_json", "{}", String::from_utf8_lossy(b));
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
        let scope = crate::scope::Scope::from_config(&crate::scope::ScopeConfig {
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
                .unwrap_or_else(|r| r.code)
        };
        let chat = Route::Generate(Api::Chat);
        let resp = Route::Generate(Api::Responses);
        for (route, body, want) in [
            (chat, r#"{"model":"m","messages":[]}"#, "ok"),
            (chat, r#"{"model":"x","messages":[]}"#, "permission_denied"),
            (chat, r#"{"model":7,"messages":[]}"#, "invalid_parameter"),
            (chat, r#"{"messages":[]}"#, "permission_denied"),
            (Route::Tokenize, r#"{"prompt":"x"}"#, "ok"),
            (
                Route::Tokenize,
                r#"{"model":"x","prompt":"x"}"#,
                "permission_denied",
            ),
            (Route::Encode, r#"{"input":"x"}"#, "permission_denied"),
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
}
