//! Shared test harness: a simulator and a sidecar on 127.0.0.1:0 in the test's runtime
//! (`bulkhead_testkit::in_process`), with the sidecar tests' configuration and keys.
#![allow(dead_code, unused_imports)]

use bulkhead_client::SignOptions;
use bulkhead_sim::{SimConfig, SimHandle};
use bulkhead_testkit::in_process::InProcess;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use bulkhead_testkit::http::metric_in;
pub use bulkhead_testkit::now;
pub use bulkhead_testkit::sidecar::signed_headers;

pub const GW_KEY: &[u8] = b"gateway-secret-0123456789abcdef!";
pub const ACME_KEY: &[u8] = b"acme-only-secret-0123456789abcde";

pub struct Harness {
    pub sim: SimHandle,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub sidecar: InProcess,
}

/// A response body's bytes as they came, and whether it ended in an error (a response the
/// sidecar cut) rather than cleanly.
pub async fn read_to_end_or_error(mut body: Incoming) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    while let Some(f) = body.frame().await {
        match f {
            Ok(f) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(_) => return (got, true),
        }
    }
    (got, false)
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
        bulkhead_testkit::write_key(&dir.path().join("gw.key"), GW_KEY);
        bulkhead_testkit::write_key(&dir.path().join("acme.key"), ACME_KEY);
        let mut text = config_text(&sim.url(), dir.path(), tenants);
        tweak(&mut text);
        let config_path = dir.path().join("sidecar.toml");
        std::fs::write(&config_path, &text).unwrap();
        opts.config_path = Some(config_path.clone());
        if opts.reload_poll == bulkhead_sidecar::Options::default().reload_poll {
            opts.reload_poll = Duration::from_millis(25);
        }
        let sidecar = InProcess::start(&text, opts).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        Harness {
            sim,
            addr: sidecar.addr,
            admin: sidecar.admin,
            dir,
            config_path,
            client,
            sidecar,
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
        let url = format!("http://{}/metrics", self.admin);
        bulkhead_testkit::http::wait_metric(&url, series, want).await;
    }

    pub async fn shutdown(mut self) {
        self.sidecar.shutdown().await;
    }

    /// Replace the config file atomically (as a Kubernetes volume update does).
    pub fn write_config(&self, text: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Shut down and keep the temporary directory (audit files) for inspection.
    pub async fn shutdown_keep_dir(mut self) -> tempfile::TempDir {
        self.sidecar.shutdown().await;
        self.dir
    }

    pub fn trigger_shutdown(&mut self) {
        self.sidecar.trigger_shutdown();
    }
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
