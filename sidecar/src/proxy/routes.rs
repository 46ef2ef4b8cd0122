//! The routes the sidecar knows, in one table, matched on the exact path. A path that is not
//! already in its canonical form (percent-encoding, empty or dot segments, a trailing slash)
//! is refused rather than normalised, so the sidecar and the upstream can never disagree on
//! which route a request is for.

use super::refusal::{Refusal, RefusalCode};
use crate::proxy::schema::Body;
use http::Method;

/// The OpenAI-compatible APIs that run the model to generate tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    Responses,
}

impl Api {
    /// The request model of the API's body.
    pub fn body(self) -> Body {
        match self {
            Api::Chat => Body::Chat,
            Api::Completions => Body::Completions,
            Api::Responses => Body::Responses,
        }
    }
}

/// What the sidecar does with a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Runs the model and generates: JSON inspected and re-serialised, the tier's salt,
    /// stream usage, tokens reserved for prompt + completion (`max_tokens` x choices).
    Generate(Api),
    /// Runs the model over the input only (embeddings, pooling, scoring): JSON inspected and
    /// re-serialised, the tier's salt, the prompt estimate reserved.
    Encode(Body),
    /// Uses the tokenizer only: JSON inspected and re-serialised (no client salt), no tokens.
    Tokenize(Body),
    /// Lists models: `GET`, no body, no tokens.
    Models,
    /// A stored Responses API answer (`/v1/responses/<id>`, `.../cancel`, `.../input_items`):
    /// no body, no tokens, forwarded only when this sidecar handed `<id>` to the tenant.
    StoredResponse,
    /// Changes the server for everyone (LoRA adapters): never forwarded.
    Admin,
    /// Anything else under `/v1/`: refused unless the tenant's `unknown_routes = "forward"`.
    Unknown,
}

/// Every route the sidecar knows (vLLM's and SGLang's OpenAI-compatible servers).
pub const ROUTES: &[(&str, Route)] = &[
    ("/v1/chat/completions", Route::Generate(Api::Chat)),
    ("/v1/completions", Route::Generate(Api::Completions)),
    ("/v1/responses", Route::Generate(Api::Responses)),
    ("/v1/embeddings", Route::Encode(Body::Embeddings)),
    ("/v1/score", Route::Encode(Body::Score)),
    ("/v1/rerank", Route::Encode(Body::Rerank)),
    ("/v1/classify", Route::Encode(Body::Classify)),
    ("/v1/pooling", Route::Encode(Body::Pooling)),
    ("/v1/tokenize", Route::Tokenize(Body::Tokenize)),
    ("/v1/detokenize", Route::Tokenize(Body::Detokenize)),
    ("/v1/models", Route::Models),
    ("/v1/load_lora_adapter", Route::Admin),
    ("/v1/unload_lora_adapter", Route::Admin),
];

impl Route {
    /// Whether the body is parsed, checked and forwarded as the sidecar re-serialised it.
    pub fn inspected(self) -> bool {
        self.body().is_some()
    }

    /// The request model of an inspected route's body.
    pub fn body(self) -> Option<Body> {
        match self {
            Route::Generate(api) => Some(api.body()),
            Route::Encode(b) | Route::Tokenize(b) => Some(b),
            Route::Models | Route::StoredResponse | Route::Admin | Route::Unknown => None,
        }
    }

    /// Whether the tenant's `cache_salt` is set on this route.
    pub fn salted(self) -> bool {
        matches!(self, Route::Generate(_) | Route::Encode(_))
    }
}

/// Refuse a path that is not canonical; a canonical one is matched exactly.
pub fn classify(method: &Method, path: &str) -> Result<Route, Refusal> {
    if !path.starts_with("/v1/") {
        return Err(Refusal::new(
            RefusalCode::NotFound,
            "only /v1/ routes are served",
        ));
    }
    if path.contains('%') {
        return Err(Refusal::new(
            RefusalCode::EncodedPath,
            "percent-encoded request paths are not accepted",
        ));
    }
    let rest = &path[1..];
    if rest
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(Refusal::new(
            RefusalCode::NonCanonicalPath,
            "request paths must not have empty, \".\" or \"..\" segments or a trailing slash",
        ));
    }
    let route = ROUTES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, r)| *r)
        .or_else(|| path.starts_with("/v1/models/").then_some(Route::Models))
        .or_else(|| {
            path.starts_with("/v1/responses/")
                .then_some(Route::StoredResponse)
        })
        .unwrap_or(Route::Unknown);
    let allowed = match route {
        Route::Generate(_) | Route::Encode(_) | Route::Tokenize(_) => *method == Method::POST,
        Route::Models => *method == Method::GET,
        Route::StoredResponse => [Method::GET, Method::POST, Method::DELETE].contains(method),
        Route::Admin | Route::Unknown => true,
    };
    if !allowed {
        return Err(Refusal::new(
            RefusalCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        ));
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(method: Method, path: &str) -> &'static str {
        classify(&method, path)
            .map(|_| "ok")
            .unwrap_or_else(|r| r.code.as_str())
    }

    #[test]
    fn bodies_are_inspected_on_the_model_routes_and_salted_where_the_cache_is_used() {
        let routes = [
            Route::Generate(Api::Chat),
            Route::Generate(Api::Completions),
            Route::Generate(Api::Responses),
            Route::Encode(Body::Embeddings),
            Route::Tokenize(Body::Tokenize),
            Route::Models,
            Route::StoredResponse,
            Route::Admin,
            Route::Unknown,
        ];
        let inspected: Vec<bool> = routes.iter().map(|r| r.inspected()).collect();
        let salted: Vec<bool> = routes.iter().map(|r| r.salted()).collect();
        assert_eq!(
            inspected,
            [true, true, true, true, true, false, false, false, false]
        );
        assert_eq!(
            salted,
            [true, true, true, true, false, false, false, false, false]
        );
    }

    #[test]
    fn canonical_paths_match_exactly() {
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions").unwrap(),
            Route::Generate(Api::Chat)
        );
        assert_eq!(
            classify(&Method::GET, "/v1/models/m").unwrap(),
            Route::Models
        );
        assert_eq!(
            classify(&Method::POST, "/v1/Chat/completions").unwrap(),
            Route::Unknown
        );
        // A stored response by id: read, cancelled or deleted; nothing else.
        for (m, p) in [
            (Method::GET, "/v1/responses/resp_1"),
            (Method::DELETE, "/v1/responses/resp_1"),
            (Method::POST, "/v1/responses/resp_1/cancel"),
            (Method::GET, "/v1/responses/resp_1/input_items"),
        ] {
            assert_eq!(classify(&m, p).unwrap(), Route::StoredResponse, "{m} {p}");
        }
        assert_eq!(
            code(Method::PUT, "/v1/responses/resp_1"),
            "method_not_allowed"
        );
        assert_eq!(
            code(Method::PATCH, "/v1/responses/resp_1"),
            "method_not_allowed"
        );
        assert_eq!(
            classify(&Method::POST, "/v1/responses").unwrap(),
            Route::Generate(Api::Responses)
        );
        assert_eq!(
            classify(&Method::GET, "/v1/responsesx/1").unwrap(),
            Route::Unknown
        );
    }

    #[test]
    fn encodings_and_odd_segments_are_refused() {
        for p in [
            "/v1/chat/complet%69ons",
            "/v1/chat%2fcompletions",
            "/v1/%2E%2e/admin",
        ] {
            assert_eq!(code(Method::POST, p), "encoded_path", "{p}");
        }
        for p in [
            "/v1/chat/completions/",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v1/../admin",
        ] {
            assert_eq!(code(Method::POST, p), "non_canonical_path", "{p}");
        }
        assert_eq!(code(Method::POST, "/admin"), "not_found");
        assert_eq!(
            code(Method::GET, "/v1/chat/completions"),
            "method_not_allowed"
        );
    }
}
