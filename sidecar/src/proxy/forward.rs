//! The forwarding phases: the request as the upstream gets it ([`upstream_request`]), sent on
//! the tenant's own pool ([`forward`]) until its response head arrives.

use super::exchange::Exchange;
use super::{Refusal, RefusalCode};
use crate::auth::digest::Sha256Prefixes;
use crate::auth::signature::RESERVED_PREFIX;
use crate::runtime::{ConnCtx, Runtime, TenantRuntime};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use std::time::Duration;

// Header names built once, not parsed from a string on every request.
const SIGNATURE: HeaderName = HeaderName::from_static("signature");
const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The upstream's answer, ready to be metered.
pub(super) struct Forward {
    pub resp: Response<Incoming>,
    pub strip_usage: bool,
    pub write_idle: Duration,
    pub deadline: tokio::time::Instant,
}

/// Phase: the request as the upstream gets it.
pub(super) fn upstream_request(
    ex: &mut Exchange,
    rt: &Runtime,
    conn: &ConnCtx,
    parts: Parts,
    covered: &std::collections::HashSet<String>,
    (client_body, prefixes, body): (&Bytes, Option<&Sha256Prefixes>, Bytes),
) -> Result<Request<Full<Bytes>>, Refusal> {
    let mut h = parts.headers;
    crate::proxy::upstream::strip_hop_by_hop(&mut h);
    // The client's credential (a bearer token, a gateway API key) stays here unless asked.
    if !rt.config.auth.forward_authorization {
        h.remove(header::AUTHORIZATION);
    }
    let spoofable: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX) && !covered.contains(k.as_str()))
        .cloned()
        .collect();
    for k in spoofable {
        h.remove(k);
    }
    // The body may have been re-serialised: a digest sent along describes the new one.
    let had_digest = h.contains_key(&CONTENT_DIGEST);
    for k in [
        SIGNATURE,
        SIGNATURE_INPUT,
        header::HOST,
        CONTENT_DIGEST,
        header::CONTENT_LENGTH,
        X_REQUEST_ID,
    ] {
        h.remove(k);
    }
    if had_digest {
        // The client's digest check kept the hash of its prefixes: only what the forwarded
        // body changed (usually the members added at its end) is hashed again.
        let digest = match prefixes {
            Some(p) => p.content_digest(client_body, &body),
            None => crate::auth::digest::content_digest_sha256(&body),
        };
        h.insert(
            CONTENT_DIGEST,
            HeaderValue::from_str(&digest).expect("a digest is a valid header value"),
        );
    }
    h.insert(X_REQUEST_ID, ex.request_id_header().clone());
    // The trace context is the sidecar's: the upstream's spans join the sidecar's trace, never
    // one a client named (a trusted tenant's trace is continued through the sidecar's span).
    h.remove(&TRACEPARENT);
    h.remove(&TRACESTATE);
    if let Some((parent, state)) = ex.trace().upstream() {
        h.insert(TRACEPARENT, parent);
        if let Some(state) = state {
            h.insert(TRACESTATE, state);
        }
    }
    // Identity headers that routers and engines behind the sidecar read: the verified tenant,
    // never the client's.
    let tenant = ex
        .tenant()
        .and_then(|t| HeaderValue::from_str(&t.name).ok());
    for name in &rt.config.upstream.identity_headers {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            h.remove(&n);
            if let Some(v) = &tenant {
                h.insert(n, v.clone());
            }
        }
    }
    // The answer must be readable to be scanned and metered: never compressed (an encoded
    // answer is refused, see meter.rs).
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", conn.peer.ip()),
        None => conn.peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    let mut uri_parts = rt.upstream.clone().into_parts();
    uri_parts.path_and_query = parts.uri.path_and_query().cloned();
    let uri = Uri::from_parts(uri_parts)
        .map_err(|_| Refusal::new(RefusalCode::BadUri, "bad request target"))?;
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = h;
    Ok(up)
}

/// Phase: send it on the tenant's own pool and wait for the response head.
pub(super) async fn forward(
    ex: &mut Exchange,
    rt: &Runtime,
    tenant: &TenantRuntime,
    up: Request<Full<Bytes>>,
    strip_usage: bool,
) -> Result<Forward, Refusal> {
    let timeout = Duration::from_millis(rt.config.upstream.response_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    ex.sent();
    let answer = tokio::time::timeout_at(deadline, tenant.client.request(up)).await;
    ex.trace().upstream_done(match &answer {
        Ok(Ok(resp)) => Some(resp.status().as_u16()),
        _ => None,
    });
    match answer {
        Ok(Ok(resp)) => Ok(Forward {
            resp,
            strip_usage,
            write_idle: Duration::from_millis(rt.config.http.response_write_idle_timeout_ms),
            deadline,
        }),
        Err(_) => {
            tracing::warn!(tenant = %tenant.name, request_id = %ex.request_id(), "upstream response timed out");
            Err(Refusal::new(
                RefusalCode::UpstreamTimeout,
                "the inference server did not answer in time",
            ))
        }
        Ok(Err(e)) => {
            tracing::warn!(tenant = %tenant.name, request_id = %ex.request_id(), error = %e, "upstream request failed");
            // Nothing reached the upstream's model: the reservation is given back.
            ex.not_delivered();
            Err(Refusal::new(
                RefusalCode::UpstreamUnavailable,
                "the inference server could not be reached",
            ))
        }
    }
}
