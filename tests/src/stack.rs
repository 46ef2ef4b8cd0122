//! The request path in one process: `bulkhead-sim` (the inference server) and
//! `bulkhead-sidecar` in front of it, on 127.0.0.1:0, with a gateway key that signs requests
//! for any tenant. Used by the demo and the end-to-end tests (with the real agent beside it).

use bulkhead_testkit::in_process::InProcess;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The gateway's HMAC key (test material, not a secret of any deployment).
pub const GATEWAY_KEY: &[u8] = b"bulkhead-demo-gateway-key-32-bytes!!";
pub const GATEWAY_KEY_ID: &str = "gateway";

pub struct Stack {
    pub sim: bulkhead_sim::SimHandle,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    sidecar: InProcess,
}

/// One answered request, as a client sees it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub latency: Duration,
    pub completion_tokens: u64,
}

impl Stack {
    /// Starts the sim and the sidecar. `tenants` is the sidecar's `[tenants.*]` tables, `extra`
    /// any other sections (`[queue]`, `[model]`, ...);
    /// `agent_socket`, when given, is the node agent's tagging socket; `dir` holds the key,
    /// the audit log and the config.
    pub async fn start(
        sim: bulkhead_sim::SimConfig,
        tenants: &str,
        extra: &str,
        agent_socket: Option<&Path>,
        dir: &Path,
    ) -> Stack {
        let sim = bulkhead_sim::SimHandle::start(sim)
            .await
            .expect("start the sim");
        std::fs::create_dir_all(dir).unwrap();
        let key_file = dir.join("gateway.key");
        bulkhead_testkit::write_key(&key_file, GATEWAY_KEY);
        let agent = agent_socket
            .map(|p| format!("[agent]\nsocket = {:?}\nkv_report_interval_ms = 100\n", p))
            .unwrap_or_default();
        let text = format!(
            "[upstream]\nurl = \"{}\"\n[listen]\naddr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\n\
             [auth]\nmax_skew_secs = 30\n{extra}\n[audit]\ndir = {:?}\n{agent}{tenants}\n\
             [[keys]]\nid = \"{GATEWAY_KEY_ID}\"\nsecret_files = [{:?}]\ntenants = [\"*\"]\n",
            sim.url(),
            dir.join("audit"),
            key_file,
        );
        let sidecar = InProcess::start(&text, bulkhead_sidecar::Options::default()).await;
        Stack {
            sim,
            addr: sidecar.addr,
            admin: sidecar.admin,
            client: Client::builder(TokioExecutor::new()).build_http(),
            sidecar,
        }
    }

    /// GET on the admin port: (status, body), or None when nothing answers.
    pub async fn get_admin(&self, path: &str) -> Option<(StatusCode, String)> {
        let uri: Uri = format!("http://{}{path}", self.admin).parse().unwrap();
        let resp = self.client.get(uri).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// A chat completion for `tenant`, signed by the gateway, sent through the sidecar.
    pub async fn chat(&self, tenant: &str, prompt: &str, max_tokens: u64) -> Outcome {
        self.send_chat(tenant, prompt, max_tokens, false).await
    }

    /// As [`Stack::chat`], streamed (SSE); the outcome comes when the stream ends.
    pub async fn chat_stream(&self, tenant: &str, prompt: &str, max_tokens: u64) -> Outcome {
        self.send_chat(tenant, prompt, max_tokens, true).await
    }

    /// One chat completion for `tenant`, signed once by the gateway and sent `times` times,
    /// byte for byte: what a replaying attacker (or a client retrying raw bytes) sends. The
    /// statuses in order: the first is answered, the copies are refused as `replayed`.
    pub async fn chat_replayed(&self, tenant: &str, times: usize) -> Vec<StatusCode> {
        let (headers, body) = self.signed_chat(tenant, "hello", 4, false);
        let mut statuses = Vec::with_capacity(times);
        for _ in 0..times {
            statuses.push(self.send(headers.clone(), body.clone()).await.status);
        }
        statuses
    }

    async fn send_chat(
        &self,
        tenant: &str,
        prompt: &str,
        max_tokens: u64,
        stream: bool,
    ) -> Outcome {
        let (headers, body) = self.signed_chat(tenant, prompt, max_tokens, stream);
        self.send(headers, body).await
    }

    /// The headers (signature included) and body of a chat completion for `tenant`.
    fn signed_chat(
        &self,
        tenant: &str,
        prompt: &str,
        max_tokens: u64,
        stream: bool,
    ) -> (HeaderMap, String) {
        let body = serde_json::json!({
            "model": "sim",
            "max_tokens": max_tokens,
            "stream": stream,
            "messages": [{"role": "user", "content": prompt}],
        })
        .to_string();
        let headers = gateway_headers(tenant, &body);
        (headers, body)
    }

    async fn send(&self, headers: HeaderMap, body: String) -> Outcome {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = format!("http://{}/v1/chat/completions", self.addr)
            .parse()
            .unwrap();
        *req.headers_mut() = headers;
        let start = Instant::now();
        let resp = self.client.request(req).await.expect("the sidecar answers");
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let latency = start.elapsed();
        let completion_tokens = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["usage"]["completion_tokens"].as_u64())
            .unwrap_or(0);
        Outcome {
            status,
            latency,
            completion_tokens,
        }
    }

    /// Stops the sidecar (draining) and the sim.
    pub async fn stop(mut self) {
        self.sidecar.stop().await;
        self.sim.stop().await;
    }
}

/// The headers of a chat completion (`POST /v1/chat/completions`) with `body` for `tenant`,
/// signed now by the gateway key.
pub fn gateway_headers(tenant: &str, body: &str) -> HeaderMap {
    bulkhead_testkit::sidecar::signed_headers(
        tenant,
        &Method::POST,
        "/v1/chat/completions",
        body.as_bytes(),
        GATEWAY_KEY_ID,
        GATEWAY_KEY,
        |_| {},
    )
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("bulkhead-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
