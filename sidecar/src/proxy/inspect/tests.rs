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
        out.starts_with(r#"{"prompt":"x","seed":1.8446744073709552e+19,"top_k":-0.0,"top_p":0.5,"#),
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
    // Each refusal names what is wrong, as serde_json reads the body.
    let message = |b: &[u8]| {
        inspect(Route::Generate(Api::Completions), b, P)
            .unwrap_err()
            .message
            .into_owned()
    };
    assert_eq!(
        message(br#"["prompt"]"#),
        "the request body must be a JSON object"
    );
    assert_eq!(
        message(deep.as_bytes()),
        format!("the request body nests deeper than {MAX_DEPTH} levels")
    );
    assert!(
        message(br#"{"prompt":"x","temperature":NaN}"#)
            .starts_with("the request body is not valid JSON: ")
    );
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
    assert!(v.get("rid").is_none() && v.get("request_id").is_none() && v.get("priority").is_none());
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
