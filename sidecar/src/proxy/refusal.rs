//! [`Refusal`]: every answer the sidecar gives itself instead of the upstream's, with its
//! status, OpenAI-style error, metric reason and audit reason in one value.

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

/// Why a request was answered by the sidecar. `code` is the OpenAI error code, the metric
/// reason and the audit reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// OpenAI error `type`.
    pub kind: &'static str,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
    pub rate: Option<Box<RateInfo>>,
    /// Counted in `bulkhead_rate_limited_total{limit}` when set.
    pub limit: Option<LimitKind>,
    /// Counted in `bulkhead_auth_failures_total{reason}` when set.
    pub auth: bool,
}

impl Refusal {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
            rate: None,
            limit: None,
            auth: false,
        }
    }

    /// 400 `invalid_request_error` with `code`.
    pub fn invalid(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn server(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(status, "server_error", code, message)
    }

    /// 403 `permission_denied`: the credential's scope does not allow this request.
    pub fn permission(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "permission_denied",
            message,
        )
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
        let status = match e {
            AuthError::ReplayCacheFull => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut r = Self::new(
            status,
            "authentication_error",
            reason,
            format!("authentication failed ({reason}): {e}"),
        );
        r.auth = true;
        r
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
        let mut r = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            rej.kind.as_str(),
            msg,
        )
        .with_retry(rej.retry_after);
        r.rate = Some(Box::new(rej.info));
        r.limit = Some(rej.kind);
        r
    }

    /// What the shared limits decided against: a limit (429), a replayed nonce or a full
    /// replay share (as [`Refusal::auth`]), or an unreachable backend with
    /// `on_backend_failure = "deny"` (503 `limits_backend_unavailable`).
    pub fn shared(e: SharedError) -> Self {
        match e {
            SharedError::Limit(rej) => Self::limit(rej),
            SharedError::Auth(e) => Self::auth(&e),
            SharedError::Unavailable => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "limits_backend_unavailable",
                "the shared limits backend is unavailable and limits.redis.on_backend_failure \
                 is \"deny\"; try again",
            )
            .with_retry(Duration::from_secs(1)),
        }
    }

    pub fn queue(e: QueueError) -> Self {
        let (status, msg) = match e {
            QueueError::OverKvQuota { need, quota } => {
                return Self::invalid(
                    "request_too_large",
                    format!(
                        "this request may hold up to {need} KV-cache tokens (prompt estimate plus \
                         max_tokens x choices x prompts), more than the tenant's quota of {quota} \
                         (max_kv_tokens); lower max_tokens"
                    ),
                );
            }
            QueueError::KvQuotaTimeout => {
                let mut r = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "kv_quota",
                    "timed out waiting for the tenant's KV-cache quota (max_kv_tokens): its \
                     requests in flight hold it",
                )
                .with_retry(Duration::from_secs(1));
                r.limit = Some(LimitKind::KvTokens);
                return r;
            }
            QueueError::Full => (
                StatusCode::TOO_MANY_REQUESTS,
                "the tenant's fair-share queue is full",
            ),
            QueueError::Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timed out waiting for the tenant's fair share of the upstream",
            ),
        };
        let mut r =
            Self::new(status, "rate_limit_error", "queue", msg).with_retry(Duration::from_secs(1));
        r.limit = Some(LimitKind::Queue);
        r
    }

    pub fn gate(e: GateError) -> Self {
        match e {
            GateError::Timeout => {
                let mut r = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "rate_limit_error",
                    "queue",
                    "timed out waiting for the tenant's cache-isolation window",
                )
                .with_retry(Duration::from_secs(1));
                r.limit = Some(LimitKind::Queue);
                r
            }
            GateError::FlushFailed(why) => {
                tracing::warn!(reason = %why, "request refused: prefix-cache flush not confirmed");
                Self::server(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache_flush_failed",
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
                Self::server(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "exclusive_drain_timeout",
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
        let mut r = json_error(self.status, self.kind, self.code, &self.message);
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

/// OpenAI's `x-ratelimit-*` headers.
pub fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    let mut set = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    if let Some(v) = info.limit_requests {
        set("x-ratelimit-limit-requests", v.to_string());
    }
    if let Some(v) = info.remaining_requests {
        set("x-ratelimit-remaining-requests", v.to_string());
    }
    if let Some(v) = info.reset_requests {
        set("x-ratelimit-reset-requests", format_reset(v));
    }
    if let Some(v) = info.limit_tokens {
        set("x-ratelimit-limit-tokens", v.to_string());
    }
    if let Some(v) = info.remaining_tokens {
        set("x-ratelimit-remaining-tokens", v.to_string());
    }
    if let Some(v) = info.reset_tokens {
        set("x-ratelimit-reset-tokens", format_reset(v));
    }
}
