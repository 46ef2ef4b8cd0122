//! The upstream side: one hyper client (connection pool) per tenant, whose connector tags each
//! new connection with the tenant through the node agent; and RFC 9110 hop-by-hop header rules.

use crate::config::UpstreamConfig;
use crate::http_util::BoxError;
use crate::node::tagging::Tagger;
use bytes::Bytes;
use http::Uri;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// A connector that tags each new upstream connection with the pool's tenant.
#[derive(Clone)]
pub struct TaggingConnector {
    inner: HttpConnector,
    tenant: Arc<str>,
    tagger: Arc<Tagger>,
}

impl tower_service::Service<Uri> for TaggingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let tagger = self.tagger.clone();
        let tenant = self.tenant.clone();
        Box::pin(async move {
            let io = fut.await?;
            if tagger.enabled() {
                tagger.tag(io.inner().as_fd(), &tenant).await;
            }
            Ok(io)
        })
    }
}

pub type UpstreamClient = Client<TaggingConnector, Full<Bytes>>;

/// The tenant's own pool: no connection ever carries two tenants' requests.
pub fn upstream_client(cfg: &UpstreamConfig, tenant: &str, tagger: Arc<Tagger>) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
    let conn = TaggingConnector {
        inner: http,
        tenant: Arc::from(tenant),
        tagger,
    };
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cfg.pool_max_idle_per_tenant)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn)
}

/// Remove the headers that apply to one connection only (RFC 9110 section 7.6.1), plus those
/// named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for t in s.split(',') {
                if let Ok(n) = HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The headers that apply to one connection only.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` applies to one connection only.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }
}
