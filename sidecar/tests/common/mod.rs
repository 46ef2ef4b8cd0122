//! Shared test harness: a simulator and a sidecar on 127.0.0.1:0 in the test's runtime.
#![allow(dead_code)]

use base64::Engine;
use bulkhead_sidecar::Config;
use bulkhead_sidecar::auth::signature::{SignOptions, TENANT_HEADER, sign_request};
use bulkhead_sim::{SimConfig, SimHandle};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const GW_KEY: &[u8] = b"gateway-secret-0123456789abcdef!";
pub const ACME_KEY: &[u8] = b"acme-only-secret-0123456789abcde";

pub struct Harness {
    pub sim: SimHandle,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), bulkhead_sidecar::SidecarError>>>,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The test configuration; `extra` is appended (tenants and overrides).
pub fn config_text(upstream: &str, dir: &std::path::Path, tenants: &str) -> String {
    format!(
        r#"
[upstream]
url = "{upstream}"
[listen]
addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[auth]
max_skew_secs = 30
[queue]
max_inflight = 64
max_queue_per_tenant = 64
timeout_ms = 5000
[http]
max_body_bytes = 65536
header_read_timeout_ms = 300
drain_timeout_ms = 5000
[audit]
dir = "{audit}"
{tenants}
[[keys]]
id = "gw"
secret_files = ["{gw}"]
tenants = ["*"]
[[keys]]
id = "acme-key"
secret_files = ["{acme}"]
tenants = ["acme"]
"#,
        audit = dir.join("audit").display(),
        gw = dir.join("gw.key").display(),
        acme = dir.join("acme.key").display(),
    )
}

pub const DEFAULT_TENANTS: &str = r#"
[tenants.acme]
weight = 1
[tenants.globex]
weight = 1
"#;

impl Harness {
    pub async fn start(tenants: &str) -> Harness {
        Self::start_with(tenants, SimConfig::default(), |_| {}).await
    }

    pub async fn start_with(
        tenants: &str,
        sim: SimConfig,
        tweak: impl FnOnce(&mut String),
    ) -> Harness {
        Self::start_opts(tenants, sim, tweak, bulkhead_sidecar::Options::default()).await
    }

    /// Start with `opts` (its `config_path` is set here; `reload_poll` kept unless default).
    pub async fn start_opts(
        tenants: &str,
        sim: SimConfig,
        tweak: impl FnOnce(&mut String),
        mut opts: bulkhead_sidecar::Options,
    ) -> Harness {
        let sim = SimHandle::start(sim).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        std::fs::write(dir.path().join("gw.key"), b64.encode(GW_KEY)).unwrap();
        std::fs::write(dir.path().join("acme.key"), b64.encode(ACME_KEY)).unwrap();
        let mut text = config_text(&sim.url(), dir.path(), tenants);
        tweak(&mut text);
        let config_path = dir.path().join("sidecar.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        opts.config_path = Some(config_path.clone());
        if opts.reload_poll == bulkhead_sidecar::Options::default().reload_poll {
            opts.reload_poll = Duration::from_millis(25);
        }
        let task = tokio::spawn(bulkhead_sidecar::run_with(
            listener,
            admin_l,
            config,
            opts,
            async move {
                let _ = rx.await;
            },
        ));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        // Wait until the sidecar serves (poll with a deadline).
        let ready: Uri = format!("http://{admin}/readyz").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(ready.clone()).await
                && r.status() == http::StatusCode::OK
            {
                break;
            }
            assert!(Instant::now() < deadline, "sidecar never became ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Harness {
            sim,
            addr,
            admin,
            dir,
            config_path,
            client,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> Uri {
        format!("http://{}{}", self.addr, path).parse().unwrap()
    }

    /// A request signed by the gateway key for `tenant`.
    pub fn signed(
        &self,
        tenant: &str,
        method: Method,
        path: &str,
        body: &str,
    ) -> Request<Full<Bytes>> {
        self.signed_with(tenant, method, path, body, "gw", GW_KEY, |_| {})
    }

    #[allow(clippy::too_many_arguments)]
    pub fn signed_with(
        &self,
        tenant: &str,
        method: Method,
        path: &str,
        body: &str,
        key_id: &str,
        key: &[u8],
        tweak: impl FnOnce(&mut SignOptions),
    ) -> Request<Full<Bytes>> {
        let headers = signed_headers(tenant, &method, path, body.as_bytes(), key_id, key, tweak);
        self.request_with(method, path, headers, Bytes::from(body.to_string()))
    }

    /// A gateway-signed request whose body is any bytes (not only valid UTF-8).
    pub fn signed_bytes(
        &self,
        tenant: &str,
        method: Method,
        path: &str,
        body: &[u8],
    ) -> Request<Full<Bytes>> {
        let headers = signed_headers(tenant, &method, path, body, "gw", GW_KEY, |_| {});
        self.request_with(method, path, headers, Bytes::copy_from_slice(body))
    }

    fn request_with(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = self.url(path);
        *req.headers_mut() = headers;
        req
    }

    /// Closes the simulator's gate, sends `tenant` a streamed chat completion and reads its
    /// first frame: the stream is then held open (in flight) until the gate opens.
    pub async fn hold_stream(&self, tenant: &str, prompt: &str) -> Incoming {
        self.sim.sim.close_gate();
        let resp = self
            .send(self.signed(
                tenant,
                Method::POST,
                "/v1/chat/completions",
                &chat(prompt, r#","stream":true"#),
            ))
            .await;
        assert_eq!(resp.status(), http::StatusCode::OK);
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        body
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        self.client.request(req).await.unwrap()
    }

    pub async fn send_collect(&self, req: Request<Full<Bytes>>) -> (http::response::Parts, Bytes) {
        let r = self.send(req).await;
        let (p, b) = r.into_parts();
        (p, b.collect().await.unwrap().to_bytes())
    }

    pub async fn metrics(&self) -> String {
        let uri: Uri = format!("http://{}/metrics", self.admin).parse().unwrap();
        let r = self.client.get(uri).await.unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    /// The value of the sample whose line starts with `series` (name and labels as printed).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_in(&self.metrics().await, series)
    }

    /// Poll until `series` reaches `want` (or panic at the deadline).
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series).await;
            if v == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{series} is {v:?}, want {want}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Replace the config file atomically (as a Kubernetes volume update does).
    pub fn write_config(&self, text: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Shut down and keep the temporary directory (audit files) for inspection.
    pub async fn shutdown_keep_dir(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        self.dir
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The headers a gateway sends for `body`: the tenant header, content type and an RFC 9421
/// signature by `key_id` (`tweak` adjusts the signing options).
pub fn signed_headers(
    tenant: &str,
    method: &Method,
    path: &str,
    body: &[u8],
    key_id: &str,
    key: &[u8],
    tweak: impl FnOnce(&mut SignOptions),
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TENANT_HEADER, HeaderValue::from_str(tenant).unwrap());
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut o = SignOptions::new(key_id, now());
    tweak(&mut o);
    let path_only: Uri = path.parse().unwrap();
    sign_request(method, &path_only, &mut headers, body, key, &o).unwrap();
    headers
}

pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn chat(content: &str, extra: &str) -> String {
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]{extra}}}"#)
}

pub fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// One HTTP/1.1 keep-alive client connection of its own (not pooled), so a test decides
/// exactly which requests share a socket and when the socket closes.
pub struct H1Conn {
    /// The client side's local port (the sidecar's peer port for this connection).
    pub port: u16,
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl H1Conn {
    pub async fn open(addr: SocketAddr) -> H1Conn {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let port = s.local_addr().unwrap().port();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        H1Conn { port, send, task }
    }

    /// Send `req` (origin-form, with a Host header) and read the whole response.
    pub async fn request(
        &mut self,
        mut req: Request<Full<Bytes>>,
    ) -> hyper::Result<(http::response::Parts, Bytes)> {
        if let Some(host) = req.uri().authority().map(|a| a.to_string()) {
            req.headers_mut()
                .insert(http::header::HOST, HeaderValue::from_str(&host).unwrap());
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string());
        *req.uri_mut() = path.parse().unwrap();
        self.send.ready().await?;
        let (p, b) = self.send.send_request(req).await?.into_parts();
        Ok((p, b.collect().await?.to_bytes()))
    }

    /// Close the socket (the client side goes away).
    pub async fn close(self) {
        drop(self.send);
        self.task.abort();
        let _ = self.task.await;
    }
}
