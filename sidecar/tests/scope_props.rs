//! Property test: a tool-scoped credential never gets an out-of-scope tool through, whatever
//! spelling the entry uses (`type`, `name`, `function.name`) and wherever a tool can be
//! declared or forced (`tools`, `functions`, a message's `tools`, `tool_choice`, an
//! `allowed_tools` choice); and a tool the upstream reads as allowed, spelled one way, passes.
//!
//! The oracle is the upstream's reading of a tool: in the chat API a `function` tool (the
//! default type) by `function.name` and a legacy `functions` entry by `name`; in the Responses
//! API a `function` tool by its top-level `name`; any other type by its type.

use bulkhead_sidecar::auth::scope::{Scope, ScopeConfig};
use bulkhead_sidecar::proxy::{Api, Policy, Route, inspect};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const ALLOWED: [&str; 2] = ["ok", "web_search_preview"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Tools,
    Functions,
    MessageTools,
    Choice,
    AllowedTools,
}

#[derive(Debug, Clone)]
struct Entry {
    ty: Option<&'static str>,
    name: Option<&'static str>,
    function_name: Option<&'static str>,
}

impl Entry {
    fn json(&self) -> Value {
        let mut o = Map::new();
        if let Some(t) = self.ty {
            o.insert("type".into(), json!(t));
        }
        if let Some(n) = self.name {
            o.insert("name".into(), json!(n));
        }
        if let Some(n) = self.function_name {
            o.insert("function".into(), json!({ "name": n, "description": "d" }));
        }
        Value::Object(o)
    }

    /// The name the upstream reads; `None` when the entry is ambiguous or unnamed.
    fn upstream_name(&self, api: Api, legacy: bool) -> Option<&'static str> {
        if self.name.is_some() && self.function_name.is_some() {
            return None;
        }
        if legacy {
            return self.name;
        }
        let ty = match (api, self.ty) {
            (Api::Responses, None) => return None,
            (_, None) => "function",
            (_, Some(t)) => t,
        };
        if ty != "function" {
            return Some(ty);
        }
        if api == Api::Responses {
            self.name
        } else {
            self.function_name
        }
    }
}

fn entry() -> impl Strategy<Value = Entry> {
    let ty = prop::option::of(prop::sample::select(vec![
        "function",
        "code_interpreter",
        "mcp",
        "web_search_preview",
        "custom",
    ]));
    let name = || prop::option::of(prop::sample::select(vec!["ok", "bad", "exec_shell"]));
    (ty, name(), name()).prop_map(|(ty, name, function_name)| Entry {
        ty,
        name,
        function_name,
    })
}

fn body(api: Api, place: Place, entries: &[Entry]) -> Value {
    let list: Vec<Value> = entries.iter().map(Entry::json).collect();
    let mut b = match api {
        Api::Responses => json!({"model": "m", "input": "hi"}),
        _ => json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    };
    let o = b.as_object_mut().unwrap();
    match place {
        Place::Tools => {
            o.insert("tools".into(), Value::Array(list));
        }
        Place::Functions => {
            o.insert("functions".into(), Value::Array(list));
        }
        Place::MessageTools => {
            o.insert(
                "messages".into(),
                json!([{"role": "system", "content": "s", "tools": list}]),
            );
        }
        Place::Choice => {
            o.insert("tool_choice".into(), list[0].clone());
        }
        Place::AllowedTools => {
            let choice = match api {
                Api::Chat => {
                    json!({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": list}})
                }
                _ => json!({"type": "allowed_tools", "mode": "auto", "tools": list}),
            };
            o.insert("tool_choice".into(), choice);
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_spelling_gets_an_out_of_scope_tool_through(
        api in prop::sample::select(vec![Api::Chat, Api::Responses]),
        entries in prop::collection::vec(entry(), 1..4),
        which in any::<prop::sample::Index>(),
    ) {
        let place = {
            let all = match api {
                Api::Chat => vec![Place::Tools, Place::Choice, Place::AllowedTools, Place::Functions, Place::MessageTools],
                _ => vec![Place::Tools, Place::Choice, Place::AllowedTools],
            };
            *which.get(&all)
        };
        let scope = Scope::from_config(&ScopeConfig {
            tools: Some(ALLOWED.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .unwrap();
        let policy = Policy { scope: Some(&scope), ..Policy::open(16) };
        let b = body(api, place, &entries);
        let r = inspect(Route::Generate(api), &serde_json::to_vec(&b).unwrap(), policy);
        let legacy = place == Place::Functions;
        let used: &[Entry] = if place == Place::Choice { &entries[..1] } else { &entries };
        // The choice object's legacy reading (`function_call`) is not used here.
        let reads: Vec<Option<&str>> = used.iter().map(|e| e.upstream_name(api, legacy)).collect();
        let all_allowed = reads.iter().all(|n| n.is_some_and(|n| ALLOWED.contains(&n)));
        match &r {
            Ok(_) => prop_assert!(all_allowed, "{} accepted; the upstream reads {:?}", b, reads),
            Err(e) => {
                prop_assert_eq!(e.code.as_str(), "permission_denied", "{}: {}", b, e.message);
                prop_assert!(!all_allowed, "{} refused ({}) though every tool is allowed", b, e.message);
            }
        }
    }
}
