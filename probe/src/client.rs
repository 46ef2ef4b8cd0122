//! HTTP to the sidecar (signed as a test tenant, or not at all), time to first token, and
//! Prometheus text scrapes.

use crate::config::{ProbeConfig, TenantCreds};
use bulkhead_client::{SignOptions, TENANT_HEADER, sign_request};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const CHAT_PATH: &str = "/v1/chat/completions";

/// A request that did not get a whole answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad request URL {0}")]
    Url(String),
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    /// `error.code` of a JSON error body.
    pub code: Option<String>,
    /// From sending to the first non-empty body frame that is not an SSE comment (the time
    /// to first token of a stream).
    pub first_byte: Duration,
    pub body: Bytes,
}

impl Answer {
    pub fn describe(&self) -> String {
        match &self.code {
            Some(c) => format!("{} {c}", self.status.as_u16()),
            None => self.status.as_u16().to_string(),
        }
    }
}

/// A request prepared to send (and, for replays, to send again unchanged).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Http {
    pub fn new(cfg: &ProbeConfig) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(cfg.request_timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(conn),
            base: cfg.target.clone(),
            timeout: cfg.request_timeout,
        }
    }

    /// A request with `tenant` in the tenant header and no signature.
    pub fn unsigned(&self, tenant: &str, method: Method, path: &str, body: Bytes) -> Prepared {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(tenant) {
            headers.insert(TENANT_HEADER, v);
        }
        if !body.is_empty() {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Prepared {
            method,
            path: path.to_string(),
            headers,
            body,
        }
    }

    /// A request for tenant `claim` signed with `key`'s credentials (RFC 9421, as a gateway).
    pub fn signed(
        &self,
        key: &TenantCreds,
        claim: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Prepared, HttpError> {
        let mut p = self.unsigned(claim, method, path, body);
        let uri: Uri = path.parse().map_err(|_| HttpError::Url(path.to_string()))?;
        sign_request(
            &p.method,
            &uri,
            &mut p.headers,
            &p.body,
            &key.key,
            &SignOptions::new(key.key_id.clone(), now()),
        )
        .map_err(|e| HttpError::Sign(e.to_string()))?;
        Ok(p)
    }

    /// Send and read the whole answer, timing the first body frame.
    pub async fn send(&self, p: &Prepared) -> Result<Answer, HttpError> {
        let url = format!("{}{}", self.base, p.path);
        self.send_to(&url, p).await
    }

    pub async fn send_to(&self, url: &str, p: &Prepared) -> Result<Answer, HttpError> {
        let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
        let mut req = Request::new(Full::new(p.body.clone()));
        *req.method_mut() = p.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = p.headers.clone();
        let fut = async {
            let t0 = Instant::now();
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(format!("{url}: {}", error_chain(&e))))?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut first = None;
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| HttpError::Transport(format!("{url}: reading the body: {e}")))?;
                if let Some(d) = frame.data_ref()
                    && !d.is_empty()
                {
                    // An SSE comment (`: keep-alive`) is no token.
                    if !d.starts_with(b":") {
                        first.get_or_insert_with(|| t0.elapsed());
                    }
                    buf.extend_from_slice(d);
                }
            }
            let first_byte = first.unwrap_or_else(|| t0.elapsed());
            let body = Bytes::from(buf);
            let code = (!status.is_success())
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_string));
            Ok(Answer {
                status,
                code,
                first_byte,
                body,
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))?
    }

    /// GET a Prometheus text page.
    pub async fn scrape(&self, url: &str) -> Result<String, HttpError> {
        let p = Prepared {
            method: Method::GET,
            path: String::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let a = self.send_to(url, &p).await?;
        if !a.status.is_success() {
            return Err(HttpError::Transport(format!(
                "{url}: answered {}",
                a.status
            )));
        }
        Ok(String::from_utf8_lossy(&a.body).into_owned())
    }

    /// PUT `body` (the Pushgateway API).
    pub async fn put(&self, url: &str, body: String) -> Result<StatusCode, HttpError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        let p = Prepared {
            method: Method::PUT,
            path: String::new(),
            headers,
            body: Bytes::from(body),
        };
        Ok(self.send_to(url, &p).await?.status)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The sum of the samples of `name` whose labels include every pair of `want` (Prometheus or
/// OpenMetrics text). `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || !line.starts_with(name) {
            continue;
        }
        let rest = &line[name.len()..];
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = label_end(r) else { continue };
            (parse_labels(&r[..end]), r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            (Vec::new(), rest.trim())
        } else {
            continue; // another metric with this prefix
        };
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if want
            .iter()
            .all(|(k, w)| labels.iter().any(|(lk, lv)| lk == k && lv == w))
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The index of the `}` closing a label set (quotes and escapes respected).
fn label_end(s: &str) -> Option<usize> {
    let mut in_str = false;
    let mut esc = false;
    for (i, c) in s.char_indices() {
        match (in_str, esc, c) {
            (true, true, _) => esc = false,
            (true, false, '\\') => esc = true,
            (true, false, '"') => in_str = false,
            (false, _, '"') => in_str = true,
            (false, _, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        let Some(after) = rest[eq + 1..].trim_start().strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, o)) => val.push(o),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                o => val.push(o),
            }
        }
        let Some(end) = end else { break };
        out.push((key, val));
        rest = &after[end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let text = "# HELP bulkhead_network_bytes Bytes\n\
            # TYPE bulkhead_network_bytes counter\n\
            bulkhead_network_bytes_total{tenant=\"probe-a\",direction=\"egress\"} 100\n\
            bulkhead_network_bytes_total{direction=\"ingress\",tenant=\"probe-a\"} 23\n\
            bulkhead_network_bytes_total{tenant=\"probe-ab\",direction=\"ingress\"} 1000\n\
            bulkhead_network_bytes_total_other{tenant=\"probe-a\"} 5\n\
            bulkhead_canary_hits_total{owner=\"a\",seen_by=\"b,\\\"}x\",where=\"prompt\"} 2\n\
            bulkhead_up 1\n";
        assert_eq!(
            metric_sum(
                text,
                "bulkhead_network_bytes_total",
                &[("tenant", "probe-a")]
            ),
            Some(123.0)
        );
        assert_eq!(
            metric_sum(
                text,
                "bulkhead_network_bytes_total",
                &[("tenant", "nobody")]
            ),
            None
        );
        assert_eq!(
            metric_sum(
                text,
                "bulkhead_canary_hits_total",
                &[("seen_by", "b,\"}x"), ("where", "prompt")]
            ),
            Some(2.0)
        );
        assert_eq!(metric_sum(text, "bulkhead_up", &[]), Some(1.0));
    }
}
