//! Credential scopes: what one credential (an HMAC key or a JWT) may ask for. A scope limits
//! the routes, the request's `model`, the tools a request declares or forces, and
//! `max_tokens`; an absent list allows everything. Checked once the tenant is known (routes)
//! and when the body is inspected (the rest); a refusal is 403 `permission_denied` naming
//! what was refused, and nothing reaches the upstream.

use serde::Deserialize;
use std::collections::BTreeSet;

/// Entries in one scope list at most.
pub const MAX_SCOPE_ENTRIES: usize = 1024;
/// Bytes of one scope entry at most.
pub const MAX_SCOPE_ENTRY_BYTES: usize = 256;

/// A scope as written in the configuration (`[keys.scope]`, `[auth.jwt.tiers.<tier>]`) or in
/// a JWT's scope claim.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// Values of the request body's `model` this credential may use.
    pub models: Option<Vec<String>>,
    /// Request paths (`/v1/chat/completions`), a prefix ending in `/*` (`/v1/models/*`), or
    /// `*` for every route.
    pub routes: Option<Vec<String>>,
    /// Function names the request may declare (`tools[].function.name`) or force
    /// (`tool_choice`).
    pub tools: Option<Vec<String>>,
    /// The largest completion limit (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`) a request may ask for; requests without one get at most this.
    pub max_tokens: Option<u64>,
}

/// Why a scope is not valid: the field (relative to the scope) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScopeError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ScopeError {
    ScopeError {
        field,
        message: message.into(),
    }
}

/// A route pattern of a scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoutePattern {
    Exact(String),
    /// `/v1/models/*`: the path `/v1/models` and everything below it.
    Prefix(String),
}

impl RoutePattern {
    fn matches(&self, path: &str) -> bool {
        match self {
            RoutePattern::Exact(p) => p == path,
            RoutePattern::Prefix(p) => {
                path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            }
        }
    }
}

/// A list of route patterns; `None` is every route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(Option<Vec<RoutePattern>>);

impl Routes {
    /// Every route.
    pub const ALL: Routes = Routes(None);

    /// Parse `*`, exact `/v1/...` paths and `/v1/.../*` prefixes.
    pub fn parse(list: &[String]) -> Result<Routes, String> {
        if list.len() > MAX_SCOPE_ENTRIES {
            return Err(format!("at most {MAX_SCOPE_ENTRIES} entries"));
        }
        let mut out = Vec::new();
        for r in list {
            if r == "*" {
                return Ok(Routes(None));
            }
            if !r.starts_with("/v1/") || r.len() > MAX_SCOPE_ENTRY_BYTES {
                return Err(format!(
                    "{r:?} is not \"*\", a /v1/ path or a /v1/.../* prefix (at most \
                     {MAX_SCOPE_ENTRY_BYTES} bytes)"
                ));
            }
            let p = match r.strip_suffix("/*") {
                Some(prefix) => RoutePattern::Prefix(prefix.to_string()),
                None => RoutePattern::Exact(r.clone()),
            };
            let text = match &p {
                RoutePattern::Exact(s) | RoutePattern::Prefix(s) => s,
            };
            if text.contains(['*', '%', '?', '#']) || text.split('/').skip(1).any(str::is_empty) {
                return Err(format!(
                    "{r:?}: only a trailing /* may be a wildcard, and no empty segment"
                ));
            }
            out.push(p);
        }
        out.sort();
        out.dedup();
        Ok(Routes(Some(out)))
    }

    pub fn allows(&self, path: &str) -> bool {
        match &self.0 {
            None => true,
            Some(list) => list.iter().any(|p| p.matches(path)),
        }
    }

    pub fn is_all(&self) -> bool {
        self.0.is_none()
    }
}

/// A validated scope. The default allows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub models: Option<BTreeSet<String>>,
    pub routes: Routes,
    pub tools: Option<BTreeSet<String>>,
    pub max_tokens: Option<u64>,
}

fn names(
    field: &'static str,
    list: &Option<Vec<String>>,
) -> Result<Option<BTreeSet<String>>, ScopeError> {
    let Some(list) = list else {
        return Ok(None);
    };
    if list.len() > MAX_SCOPE_ENTRIES {
        return Err(err(field, format!("at most {MAX_SCOPE_ENTRIES} entries")));
    }
    for n in list {
        if n.is_empty() || n.len() > MAX_SCOPE_ENTRY_BYTES {
            return Err(err(
                field,
                format!("entries must be 1-{MAX_SCOPE_ENTRY_BYTES} bytes"),
            ));
        }
    }
    Ok(Some(list.iter().cloned().collect()))
}

impl Scope {
    /// Validate a configured (or claimed) scope.
    pub fn from_config(c: &ScopeConfig) -> Result<Scope, ScopeError> {
        let routes = match &c.routes {
            None => Routes::ALL,
            Some(list) => Routes::parse(list).map_err(|m| err("routes", m))?,
        };
        if c.max_tokens == Some(0) {
            return Err(err("max_tokens", "must be > 0 (omit for no limit)"));
        }
        Ok(Scope {
            models: names("models", &c.models)?,
            routes,
            tools: names("tools", &c.tools)?,
            max_tokens: c.max_tokens,
        })
    }

    /// Whether this scope allows everything.
    pub fn is_unlimited(&self) -> bool {
        *self == Scope::default()
    }

    /// Whether the scope limits anything in the body (models or tools), which an opaque
    /// (uninspected) route could not be held to.
    pub fn limits_body(&self) -> bool {
        self.models.is_some() || self.tools.is_some() || self.max_tokens.is_some()
    }

    /// What both scopes allow.
    pub fn intersect(&self, other: &Scope) -> Scope {
        fn both(
            a: &Option<BTreeSet<String>>,
            b: &Option<BTreeSet<String>>,
        ) -> Option<BTreeSet<String>> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.intersection(b).cloned().collect()),
                (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                (None, None) => None,
            }
        }
        let routes = match (&self.routes.0, &other.routes.0) {
            (None, _) => other.routes.clone(),
            (_, None) => self.routes.clone(),
            // A path both allow: keep each pattern of one that the other covers entirely.
            (Some(a), Some(b)) => {
                let covers = |list: &[RoutePattern], p: &RoutePattern| match p {
                    RoutePattern::Exact(s) => list.iter().any(|q| q.matches(s)),
                    RoutePattern::Prefix(s) => list.iter().any(|q| match q {
                        RoutePattern::Prefix(t) => RoutePattern::Prefix(t.clone()).matches(s),
                        RoutePattern::Exact(_) => false,
                    }),
                };
                let mut out: Vec<RoutePattern> = a
                    .iter()
                    .filter(|p| covers(b, p))
                    .chain(b.iter().filter(|p| covers(a, p)))
                    .cloned()
                    .collect();
                out.sort();
                out.dedup();
                Routes(Some(out))
            }
        };
        Scope {
            models: both(&self.models, &other.models),
            routes,
            tools: both(&self.tools, &other.tools),
            max_tokens: match (self.max_tokens, other.max_tokens) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }

    pub fn allows_tool(&self, tool: &str) -> bool {
        self.tools.as_ref().is_none_or(|t| t.contains(tool))
    }
}

/// `s` quoted for an error message: at most 64 bytes (cut on a character boundary, marked
/// with `...`), with quotes, backslashes and control characters escaped.
pub fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let end = s.floor_char_boundary(MAX);
    format!("{:?}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(models: Option<&[&str]>, routes: Option<&[&str]>, max: Option<u64>) -> Scope {
        let v = |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| s.to_string()).collect());
        Scope::from_config(&ScopeConfig {
            models: v(models),
            routes: v(routes),
            tools: None,
            max_tokens: max,
        })
        .unwrap()
    }

    #[test]
    fn routes_match_exactly_or_below_a_prefix() {
        let r = Routes::parse(&["/v1/chat/completions".into(), "/v1/models/*".into()]).unwrap();
        assert!(r.allows("/v1/chat/completions"));
        assert!(r.allows("/v1/models"));
        assert!(r.allows("/v1/models/m"));
        assert!(!r.allows("/v1/modelsx"));
        assert!(!r.allows("/v1/completions"));
        assert!(Routes::parse(&["*".into()]).unwrap().is_all());
        for bad in ["v1/x", "/v1/*/x", "/v1//x", "/v2/x", "/v1/a%2f"] {
            assert!(Routes::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn intersection_allows_what_both_allow() {
        let a = scope(
            Some(&["a", "b"]),
            Some(&["/v1/models/*", "/v1/chat/completions"]),
            Some(100),
        );
        let b = scope(
            Some(&["b", "c"]),
            Some(&["/v1/models/m", "/v1/embeddings"]),
            None,
        );
        let c = a.intersect(&b);
        assert_eq!(c.models, Some(["b".to_string()].into()));
        assert!(c.routes.allows("/v1/models/m"));
        assert!(!c.routes.allows("/v1/models/n"));
        assert!(!c.routes.allows("/v1/chat/completions"));
        assert!(!c.routes.allows("/v1/embeddings"));
        assert_eq!(c.max_tokens, Some(100));
        assert_eq!(a.intersect(&Scope::default()), a);
        assert!(Scope::default().is_unlimited());
    }

    #[test]
    fn quoted_escapes_and_caps() {
        assert_eq!(quoted("a\"b\n"), r#""a\"b\n""#);
        let long = "é".repeat(100);
        let q = quoted(&long);
        assert!(q.len() < 80 && q.ends_with("..."), "{q}");
    }

    #[test]
    fn list_and_entry_sizes_are_bounded_exactly() {
        let many = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>();
        let route = |i: usize| format!("/v1/r{i}");
        assert!(Routes::parse(&many(MAX_SCOPE_ENTRIES, &route)).is_ok());
        assert!(Routes::parse(&many(MAX_SCOPE_ENTRIES + 1, &route)).is_err());
        let long = |n: usize| format!("/v1/{}", "a".repeat(n - 4));
        assert!(Routes::parse(&[long(MAX_SCOPE_ENTRY_BYTES)]).is_ok());
        assert!(Routes::parse(&[long(MAX_SCOPE_ENTRY_BYTES + 1)]).is_err());
        let tools = |list: Vec<String>| {
            Scope::from_config(&ScopeConfig {
                tools: Some(list),
                ..Default::default()
            })
        };
        let name = |i: usize| format!("t{i}");
        assert!(tools(many(MAX_SCOPE_ENTRIES, &name)).is_ok());
        let e = tools(many(MAX_SCOPE_ENTRIES + 1, &name)).unwrap_err();
        assert_eq!(e.field, "tools");
        assert!(tools(vec!["x".repeat(MAX_SCOPE_ENTRY_BYTES)]).is_ok());
        assert!(tools(vec!["x".repeat(MAX_SCOPE_ENTRY_BYTES + 1)]).is_err());
        assert!(tools(vec![String::new()]).is_err());
        assert!(tools(vec!["x".into()]).is_ok());
    }

    #[test]
    fn what_a_scope_limits() {
        assert!(Routes::ALL.is_all());
        assert!(!Routes::parse(&["/v1/models".into()]).unwrap().is_all());
        assert!(Scope::default().is_unlimited());
        assert!(!Scope::default().limits_body());
        let only = |c: ScopeConfig| Scope::from_config(&c).unwrap();
        let routes = only(ScopeConfig {
            routes: Some(vec!["/v1/models".into()]),
            ..Default::default()
        });
        // Routes alone: limited, but nothing in the body.
        assert!(!routes.is_unlimited() && !routes.limits_body());
        for c in [
            ScopeConfig {
                models: Some(vec!["m".into()]),
                ..Default::default()
            },
            ScopeConfig {
                tools: Some(vec!["t".into()]),
                ..Default::default()
            },
            ScopeConfig {
                max_tokens: Some(5),
                ..Default::default()
            },
        ] {
            let s = only(c.clone());
            assert!(s.limits_body() && !s.is_unlimited(), "{c:?}");
        }
    }
}
