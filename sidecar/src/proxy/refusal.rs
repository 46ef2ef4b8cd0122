//! [`Refusal`]: every answer the sidecar gives itself instead of the upstream's, with its
//! [`RefusalCode`] (which fixes the status, the OpenAI error type, the metric and audit reason
//! and the limit it counts against) and its message.
//!
//! The codes are documented in ONE table, sidecar/README.md's "Error codes"; a test here holds
//! the table to [`RefusalCode::all`].

use crate::auth::signature::AuthError;
use crate::cache::GateError;
use crate::http_util::{ProxyBody, json_error};
use crate::limits::local::{LimitKind, RateInfo, Rejection, format_reset};
use crate::limits::shared::SharedError;
use crate::limits::wfq::QueueError;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use std::borrow::Cow;
use std::time::Duration;

/// Why the sidecar answered a request itself. Each code has one status and one OpenAI error
/// type; its wire string ([`RefusalCode::as_str`]) is the error `code`, the audit `reason` and
/// the metric `reason`. Two wire strings are shared by two codes that differ in status
/// (`queue`: full or timed out; `canary_blocked`: in the prompt or in the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// The path is percent-encoded.
    EncodedPath,
    /// The path has empty, `.` or `..` segments.
    NonCanonicalPath,
    /// Not under `/v1/`.
    NotFound,
    /// The wrong method for a known route.
    MethodNotAllowed,
    /// Authentication failed (signature or JWT), for this reason.
    Auth(AuthReason),
    /// Outside the credential's scope.
    PermissionDenied,
    /// An admin route.
    RouteForbidden,
    /// An unknown route of a tenant with `unknown_routes = "refuse"`.
    UnknownRoute,
    BodyTooLarge,
    BodyTimeout,
    /// `http.max_inflight_body_bytes`.
    ServerBusy,
    BodyUnreadable,
    UnsupportedContentEncoding,
    InvalidJson,
    InvalidParameter,
    UnexpectedBody,
    /// The request alone reserves more than a limit could ever admit.
    RequestTooLarge,
    UnknownField,
    /// A field the sidecar sets (`priority`).
    OwnedField,
    /// An engine-control field the tenant is not trusted with.
    EngineField,
    PreviousResponseNotFound,
    BadUri,
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Concurrent requests.
    Concurrency,
    /// The tenant's fair-share queue is full (429 `queue`).
    QueueFull,
    /// The gate or the fair queue took longer than `queue.timeout_ms` (503 `queue`).
    QueueTimeout,
    /// `queue.timeout_ms` ran out while the tenant's requests held its `max_kv_tokens`.
    KvQuota,
    /// The prompt carries another tenant's canary (403 `canary_blocked`).
    CanaryBlocked,
    /// A buffered answer carried another tenant's canary and was withheld (502
    /// `canary_blocked`).
    CanaryWithheld,
    CacheFlushFailed,
    ExclusiveDrainTimeout,
    LimitsBackendUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamBodyError,
    UpstreamEncodedResponse,
}

/// An authentication failure's reason ([`AuthError::reason`]), made only from an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthReason(&'static str);

impl From<&AuthError> for AuthReason {
    fn from(e: &AuthError) -> Self {
        AuthReason(e.reason())
    }
}

impl RefusalCode {
    /// Every code but [`RefusalCode::Auth`] (see [`RefusalCode::all`]).
    pub const ALL: [RefusalCode; 36] = {
        use RefusalCode::*;
        [
            EncodedPath,
            NonCanonicalPath,
            NotFound,
            MethodNotAllowed,
            PermissionDenied,
            RouteForbidden,
            UnknownRoute,
            BodyTooLarge,
            BodyTimeout,
            ServerBusy,
            BodyUnreadable,
            UnsupportedContentEncoding,
            InvalidJson,
            InvalidParameter,
            UnexpectedBody,
            RequestTooLarge,
            UnknownField,
            OwnedField,
            EngineField,
            PreviousResponseNotFound,
            BadUri,
            Requests,
            Tokens,
            Concurrency,
            QueueFull,
            QueueTimeout,
            KvQuota,
            CanaryBlocked,
            CanaryWithheld,
            CacheFlushFailed,
            ExclusiveDrainTimeout,
            LimitsBackendUnavailable,
            UpstreamUnavailable,
            UpstreamTimeout,
            UpstreamBodyError,
            UpstreamEncodedResponse,
        ]
    };

    /// Every code, each authentication reason included.
    pub fn all() -> impl Iterator<Item = RefusalCode> {
        Self::ALL.into_iter().chain(
            AuthError::REASONS
                .into_iter()
                .map(|r| RefusalCode::Auth(AuthReason(r))),
        )
    }

    /// The error `code` on the wire, the audit `reason` and the metric `reason`.
    pub fn as_str(self) -> &'static str {
        use RefusalCode::*;
        match self {
            EncodedPath => "encoded_path",
            NonCanonicalPath => "non_canonical_path",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Auth(AuthReason(r)) => r,
            PermissionDenied => "permission_denied",
            RouteForbidden => "route_forbidden",
            UnknownRoute => "unknown_route",
            BodyTooLarge => "body_too_large",
            BodyTimeout => "body_timeout",
            ServerBusy => "server_busy",
            BodyUnreadable => "body_unreadable",
            UnsupportedContentEncoding => "unsupported_content_encoding",
            InvalidJson => "invalid_json",
            InvalidParameter => "invalid_parameter",
            UnexpectedBody => "unexpected_body",
            RequestTooLarge => "request_too_large",
            UnknownField => "unknown_field",
            OwnedField => "owned_field",
            EngineField => "engine_field",
            PreviousResponseNotFound => "previous_response_not_found",
            BadUri => "bad_uri",
            Requests => "requests",
            Tokens => "tokens",
            Concurrency => "concurrency",
            QueueFull | QueueTimeout => "queue",
            KvQuota => "kv_quota",
            CanaryBlocked | CanaryWithheld => "canary_blocked",
            CacheFlushFailed => "cache_flush_failed",
            ExclusiveDrainTimeout => "exclusive_drain_timeout",
            LimitsBackendUnavailable => "limits_backend_unavailable",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            UpstreamBodyError => "upstream_body_error",
            UpstreamEncodedResponse => "upstream_encoded_response",
        }
    }

    pub fn status(self) -> StatusCode {
        use RefusalCode::*;
        match self {
            EncodedPath | NonCanonicalPath | BodyUnreadable | InvalidJson | InvalidParameter
            | UnexpectedBody | RequestTooLarge | UnknownField | OwnedField | BadUri => {
                StatusCode::BAD_REQUEST
            }
            Auth(AuthReason(r)) if r == AuthError::ReplayCacheFull.reason() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Auth(_) => StatusCode::UNAUTHORIZED,
            PermissionDenied | RouteForbidden | EngineField | CanaryBlocked => {
                StatusCode::FORBIDDEN
            }
            NotFound | UnknownRoute | PreviousResponseNotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedContentEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Requests | Tokens | Concurrency | QueueFull | KvQuota => StatusCode::TOO_MANY_REQUESTS,
            ServerBusy
            | QueueTimeout
            | CacheFlushFailed
            | ExclusiveDrainTimeout
            | LimitsBackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            CanaryWithheld | UpstreamUnavailable | UpstreamBodyError | UpstreamEncodedResponse => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OpenAI error `type`.
    pub fn kind(self) -> &'static str {
        use RefusalCode::*;
        match self {
            Auth(_) => "authentication_error",
            PermissionDenied | RouteForbidden | EngineField | CanaryBlocked => "permission_error",
            Requests | Tokens | Concurrency | QueueFull | QueueTimeout | KvQuota => {
                "rate_limit_error"
            }
            ServerBusy
            | CanaryWithheld
            | CacheFlushFailed
            | ExclusiveDrainTimeout
            | LimitsBackendUnavailable
            | UpstreamUnavailable
            | UpstreamTimeout
            | UpstreamBodyError
            | UpstreamEncodedResponse => "server_error",
            EncodedPath
            | NonCanonicalPath
            | NotFound
            | MethodNotAllowed
            | UnknownRoute
            | BodyTooLarge
            | BodyTimeout
            | BodyUnreadable
            | UnsupportedContentEncoding
            | InvalidJson
            | InvalidParameter
            | UnexpectedBody
            | RequestTooLarge
            | UnknownField
            | OwnedField
            | PreviousResponseNotFound
            | BadUri => "invalid_request_error",
        }
    }

    /// The limit it counts against in `bulkhead_rate_limited_total{limit}`.
    pub fn limit(self) -> Option<LimitKind> {
        match self {
            RefusalCode::Requests => Some(LimitKind::Requests),
            RefusalCode::Tokens => Some(LimitKind::Tokens),
            RefusalCode::Concurrency => Some(LimitKind::Concurrency),
            RefusalCode::QueueFull | RefusalCode::QueueTimeout => Some(LimitKind::Queue),
            RefusalCode::KvQuota => Some(LimitKind::KvTokens),
            _ => None,
        }
    }

    /// Counted in `bulkhead_auth_failures_total{reason}` (and never attributed to a tenant).
    pub fn is_auth(self) -> bool {
        matches!(self, RefusalCode::Auth(_))
    }

    /// The code of a limit's rejection.
    fn of_limit(kind: LimitKind) -> Self {
        match kind {
            LimitKind::Requests => RefusalCode::Requests,
            LimitKind::Tokens => RefusalCode::Tokens,
            LimitKind::Concurrency => RefusalCode::Concurrency,
            LimitKind::Queue => RefusalCode::QueueFull,
            LimitKind::KvTokens => RefusalCode::KvQuota,
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was answered by the sidecar.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
    pub rate: Option<Box<RateInfo>>,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            rate: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// 403 `permission_denied`: the credential's scope does not allow this request.
    pub fn permission(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(RefusalCode::PermissionDenied, message)
    }

    /// 403 `permission_denied` naming the refused `what` (a route, model or tool), quoted,
    /// escaped and cut short.
    pub fn denied(what: &str, name: &str) -> Self {
        Self::permission(format!(
            "{what} {} is outside this credential's scope",
            crate::auth::scope::quoted(name)
        ))
    }

    pub fn with_retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn auth(e: &AuthError) -> Self {
        let reason = e.reason();
        Self::new(
            RefusalCode::Auth(e.into()),
            format!("authentication failed ({reason}): {e}"),
        )
    }

    /// A limit refused the request (429 with `Retry-After` and rate headers).
    pub fn limit(rej: Rejection) -> Self {
        let msg = match rej.kind {
            LimitKind::Requests => "rate limit reached: requests per minute",
            LimitKind::Tokens => "rate limit reached: tokens per minute",
            LimitKind::Concurrency => "rate limit reached: concurrent requests",
            LimitKind::Queue => "the tenant's fair-share queue is full",
            LimitKind::KvTokens => "the tenant's KV-cache quota is held by its requests in flight",
        };
        let mut r = Self::new(RefusalCode::of_limit(rej.kind), msg).with_retry(rej.retry_after);
        r.rate = Some(Box::new(rej.info));
        r
    }

    /// What the shared limits decided against: a limit (429), a replayed nonce or a full
    /// replay share (as [`Refusal::auth`]), or an unreachable backend with
    /// `on_backend_failure = "deny"` (503 `limits_backend_unavailable`).
    pub fn shared(e: SharedError) -> Self {
        match e {
            SharedError::Limit(rej) => Self::limit(rej),
            SharedError::Auth(e) => Self::auth(&e),
            SharedError::Unavailable => Self::new(
                RefusalCode::LimitsBackendUnavailable,
                "the shared limits backend is unavailable and limits.redis.on_backend_failure \
                 is \"deny\"; try again",
            )
            .with_retry(Duration::from_secs(1)),
        }
    }

    pub fn queue(e: QueueError) -> Self {
        let (code, msg) = match e {
            QueueError::OverKvQuota { need, quota } => {
                return Self::new(
                    RefusalCode::RequestTooLarge,
                    format!(
                        "this request may hold up to {need} KV-cache tokens (prompt estimate plus \
                         max_tokens x choices x prompts), more than the tenant's quota of {quota} \
                         (max_kv_tokens); lower max_tokens"
                    ),
                );
            }
            QueueError::KvQuotaTimeout => (
                RefusalCode::KvQuota,
                "timed out waiting for the tenant's KV-cache quota (max_kv_tokens): its \
                 requests in flight hold it",
            ),
            QueueError::Full => (
                RefusalCode::QueueFull,
                "the tenant's fair-share queue is full",
            ),
            QueueError::Timeout => (
                RefusalCode::QueueTimeout,
                "timed out waiting for the tenant's fair share of the upstream",
            ),
        };
        Self::new(code, msg).with_retry(Duration::from_secs(1))
    }

    pub fn gate(e: GateError) -> Self {
        match e {
            GateError::Timeout => Self::new(
                RefusalCode::QueueTimeout,
                "timed out waiting for the tenant's cache-isolation window",
            )
            .with_retry(Duration::from_secs(1)),
            GateError::FlushFailed(why) => {
                tracing::warn!(reason = %why, "request refused: prefix-cache flush not confirmed");
                Self::new(
                    RefusalCode::CacheFlushFailed,
                    "the inference server did not confirm the prefix-cache flush that tenant \
                     isolation needs before this request; it was not forwarded",
                )
                .with_retry(Duration::from_secs(1))
            }
            GateError::DrainTimeout => {
                tracing::warn!(
                    "request refused: requests it must not run beside outlived \
                     cache.exclusive_drain_timeout_ms"
                );
                Self::new(
                    RefusalCode::ExclusiveDrainTimeout,
                    "requests that prefix-cache isolation does not let this request run beside \
                     were still running after cache.exclusive_drain_timeout_ms; it was not \
                     forwarded",
                )
                .with_retry(Duration::from_secs(1))
            }
        }
    }

    /// The response the client gets.
    pub fn response(&self) -> Response<ProxyBody> {
        let c = self.code;
        let mut r = json_error(c.status(), c.kind(), c.as_str(), &self.message);
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(info) = &self.rate {
            rate_headers(r.headers_mut(), info);
        }
        r
    }
}

/// OpenAI's `x-ratelimit-*` headers (names built once; counts written as integers).
pub fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    use http::HeaderName;
    const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    const REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
    const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
    let mut reset = |name: HeaderName, d: Duration| {
        if let Ok(v) = HeaderValue::from_str(&format_reset(d)) {
            h.insert(name, v);
        }
    };
    if let Some(d) = info.reset_requests {
        reset(RESET_REQUESTS, d);
    }
    if let Some(d) = info.reset_tokens {
        reset(RESET_TOKENS, d);
    }
    for (name, v) in [
        (LIMIT_REQUESTS, info.limit_requests),
        (REMAINING_REQUESTS, info.remaining_requests),
        (LIMIT_TOKENS, info.limit_tokens),
        (REMAINING_TOKENS, info.remaining_tokens),
    ] {
        if let Some(v) = v {
            h.insert(name, HeaderValue::from(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// (status, type, code) of each row of sidecar/README.md's "Error codes" table, one per
    /// code a row lists.
    fn documented() -> BTreeSet<(u16, String, String)> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Error codes\n")
            .nth(1)
            .expect("README.md has an \"Error codes\" section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let mut rows = BTreeSet::new();
        for line in section.lines().filter(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Ok(status) = cells[1].parse::<u16>() else {
                continue; // the header and its rule
            };
            let kind = ticked(cells[2]);
            assert_eq!(kind.len(), 1, "one type per row: {line}");
            let codes = ticked(cells[3]);
            assert!(!codes.is_empty(), "no code in: {line}");
            for code in codes {
                assert!(
                    rows.insert((status, kind[0].clone(), code)),
                    "listed twice: {line}"
                );
            }
        }
        rows
    }

    #[test]
    fn the_readmes_error_table_lists_exactly_the_codes_with_their_status_and_type() {
        let codes: BTreeSet<(u16, String, String)> = RefusalCode::all()
            .map(|c| {
                (
                    c.status().as_u16(),
                    c.kind().to_string(),
                    c.as_str().to_string(),
                )
            })
            .collect();
        let documented = documented();
        let missing: Vec<_> = codes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&codes).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "not in the README's table: {missing:?}; in the table but no code: {extra:?}"
        );
        // Each variant is told apart by what the client sees.
        assert_eq!(codes.len(), RefusalCode::all().count());
    }

    #[test]
    fn a_refusals_response_carries_its_codes_status_type_and_limit_headers() {
        let r = Refusal::new(RefusalCode::QueueTimeout, "slow").with_retry(Duration::from_secs(1));
        let resp = r.response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.code.limit(), Some(LimitKind::Queue));
        let auth = Refusal::auth(&AuthError::ReplayCacheFull);
        assert_eq!(
            (auth.status(), auth.code.kind(), auth.code.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication_error",
                "replay_cache_full"
            )
        );
        assert!(auth.code.is_auth());
        assert_eq!(
            Refusal::auth(&AuthError::Replayed).status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
