//! A credential's scope over the body: models, tools (as each API names them), template
//! arguments.

use super::*;

/// The name a tool goes by for the credential's scope, as each API names things: in the
/// chat API a `function` tool by `function.name` (legacy `functions` entries by `name`), in
/// the Responses API a `function` tool by its top-level `name`; any other type (built-in
/// tools: `code_interpreter`, `mcp`, `web_search_preview`, ...) by its type. An entry that
/// carries the other API's spelling too is refused, so no reader can take another name.
pub(super) fn tool_name(api: Body, v: &Value, legacy: bool) -> Result<&str, Refusal> {
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
pub(super) fn check_scope(
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
