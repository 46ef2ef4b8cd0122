//! The fields the sidecar owns or bounds: engine fields, stored items, the generation limits.

use super::*;

/// A non-negative whole number as a lax (pydantic) integer field reads it: integers, whole
/// floats (`1e5`), numeric strings, booleans. `null` is absent.
pub(super) fn lax_uint(v: &Value, field: &str) -> Result<Option<u64>, Refusal> {
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
pub(super) fn lax_bool(v: &Value, field: &str) -> Result<Option<bool>, Refusal> {
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
pub(super) fn take_uint(obj: &mut Map<String, Value>, key: &str) -> Result<Option<u64>, Refusal> {
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

pub(super) fn take_bool(obj: &mut Map<String, Value>, key: &str) -> Result<Option<bool>, Refusal> {
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

/// The engine-control fields: the sidecar's values written, the client's refused or replaced.
pub(super) fn engine_fields(
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
pub(super) fn stored_items(doc: &scan::Doc<'_>, body: &[u8]) -> Result<(), Refusal> {
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
pub(super) fn engine_field(message: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
    Refusal::new(RefusalCode::EngineField, message)
}

/// Streaming, usage and the completion reservation of a generating request.
pub(super) fn generation(
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
