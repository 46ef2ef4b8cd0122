//! Claims of the README that no other test pinned (issue 16), each checked over real sockets
//! against the simulator (and a fake node agent speaking the real protocol for tagging):
//!
//! - the salt formula as documented, computed here with ring's HMAC and compared with what
//!   reaches the upstream; the salt never reaches the log (the binary, `RUST_LOG=trace`);
//! - an exclusive tenant's requests carry no salt at all (the client's removed);
//! - flush calls go on the sidecar's own untagged connection;
//! - `on_flush_failure = "hold"` retries past `flush_attempts` until the queue timeout, then
//!   503 `queue`, never forwarding without the flush;
//! - an exclusive window closes at `exclusive_window_max_requests` and at
//!   `exclusive_window_ms` while another tenant waits;
//! - an HTTP/2 connection is re-tagged on each tenant change; a re-tag the agent refuses
//!   leaves the connection untagged, never under the previous tenant, and is logged as a
//!   warning once per code and tenant;
//! - a full replay-cache share is 503 `replay_cache_full`, nothing forwarded, counted;
//! - a salted tenant's requests dirty the cache for an exclusive tenant: a flush comes between
//!   them, and none between two requests of the same exclusive tenant.
//!
//! The same tagging against the real agent: `tests/tests/sidecar_agent.rs` (root).

mod common;
use base64::Engine;
use bulkhead_sim::SimConfig;
use bulkhead_testkit::agent::{AgentOptions, CallLog, FakeAgent};
use bulkhead_testkit::sidecar::{Launch, SidecarProcess};
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SALT_KEY: &[u8] = b"salt-key-0123456789abcdef-012345";
const PROMPT: &str = "the secret quarterly numbers of acme are eleven";

/// The README's formula: base64url without padding of HMAC-SHA256 under the salt key file's
/// key, over `"bulkhead cache_salt v1\0"`, the generation as 8 bytes big-endian, and the
/// tenant's name.
fn documented_salt(key: &[u8], generation: u64, tenant: &str) -> String {
    let mut msg = b"bulkhead cache_salt v1\0".to_vec();
    msg.extend_from_slice(&generation.to_be_bytes());
    msg.extend_from_slice(tenant.as_bytes());
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &msg);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// The `[cache]` section with the salt key written to `dir`, plus `extra` lines.
fn cache_section(dir: &std::path::Path, generation: u64, extra: &str) -> String {
    let key = dir.join("salt.key");
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode(SALT_KEY),
    )
    .unwrap();
    format!(
        "\n[cache]\nsalt_key_file = \"{}\"\nsalt_generation = {generation}\n{extra}\n",
        key.display()
    )
}

/// The sidecar on a vLLM-flavoured simulator with `tenants`, the `[cache]` lines `cache`, and
/// `tweak` applied last.
async fn start(
    tenants: &str,
    cache: &str,
    sim: SimConfig,
    tweak: impl FnOnce(&mut String),
) -> (Harness, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let section = cache_section(keys.path(), 1, cache);
    let h = Harness::start_with(tenants, sim, |t| {
        *t = t.replacen("[upstream]\n", "[upstream]\nflavor = \"vllm\"\n", 1);
        t.push_str(&section);
        tweak(t);
    })
    .await;
    (h, keys)
}

/// What the simulator received, in order: (path, tenant header or "").
fn upstream_log(h: &Harness) -> Vec<(String, String)> {
    h.sim
        .sim
        .requests()
        .iter()
        .map(|r| {
            let t = r
                .headers
                .get("x-bulkhead-tenant")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (r.path.clone(), t)
        })
        .collect()
}

fn pair(path: &str, tenant: &str) -> (String, String) {
    (path.to_string(), tenant.to_string())
}

/// The `cache_salt` of each request the simulator got on `path` from `tenant`.
fn salts_seen(h: &Harness, path: &str, tenant: &str) -> Vec<Option<String>> {
    h.sim
        .sim
        .requests()
        .iter()
        .filter(|r| {
            r.path == path
                && r.headers
                    .get("x-bulkhead-tenant")
                    .is_some_and(|t| t == tenant)
        })
        .map(|r| json(&r.body)["cache_salt"].as_str().map(str::to_string))
        .collect()
}

async fn post(h: &Harness, tenant: &str, path: &str, body: &str) -> (StatusCode, Bytes) {
    let (p, b) = h
        .send_collect(h.signed(tenant, Method::POST, path, body))
        .await;
    (p.status, b)
}

#[tokio::test]
async fn the_salt_is_the_documented_hmac_of_generation_and_tenant() {
    let tenants =
        "[tenants.acme]\nisolation = \"salted\"\n[tenants.globex]\nisolation = \"salted\"\n";
    let (h, _keys) = start(tenants, "", SimConfig::default(), |_| {}).await;
    let embed = r#"{"model":"m","input":"some words","cache_salt":"client"}"#;
    let tokenize = r#"{"model":"m","prompt":"some words","cache_salt":"client"}"#;
    for tenant in ["acme", "globex"] {
        let want = documented_salt(SALT_KEY, 1, tenant);
        for (path, body) in [
            ("/v1/chat/completions", chat("x", "")),
            (
                "/v1/completions",
                r#"{"model":"m","prompt":"x"}"#.to_string(),
            ),
            ("/v1/embeddings", embed.to_string()),
        ] {
            let (st, b) = post(&h, tenant, path, &body).await;
            assert_eq!(st, StatusCode::OK, "{path}: {b:?}");
            assert_eq!(
                salts_seen(&h, path, tenant),
                [Some(want.clone())],
                "{tenant} {path}"
            );
        }
        // The tokenizer routes never carry a salt: theirs is no field of the tokenizer's
        // request, so a client's is refused, and none is set (the simulator has no such route
        // and answers 404, after recording what it got).
        let (st, b) = post(&h, tenant, "/v1/tokenize", tokenize).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{b:?}");
        post(
            &h,
            tenant,
            "/v1/tokenize",
            r#"{"model":"m","prompt":"some words"}"#,
        )
        .await;
        assert_eq!(salts_seen(&h, "/v1/tokenize", tenant), [None]);
    }
    // A different generation or key gives a different salt (the formula's inputs matter).
    assert_ne!(
        documented_salt(SALT_KEY, 1, "acme"),
        documented_salt(SALT_KEY, 2, "acme")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn exclusive_tenants_requests_carry_no_salt_not_even_the_clients() {
    let tenants =
        "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\nisolation = \"salted\"\n";
    let (h, _keys) = start(tenants, "", SimConfig::default(), |_| {}).await;
    let with_salt = chat("x", r#","cache_salt":"acme-chosen-salt""#);
    let (st, _) = post(&h, "acme", "/v1/chat/completions", &with_salt).await;
    assert_eq!(st, StatusCode::OK);
    let embed = r#"{"model":"m","input":"words","cache_salt":"acme-chosen-salt"}"#;
    let (st, _) = post(&h, "acme", "/v1/embeddings", embed).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = post(&h, "acme", "/v1/chat/completions", &chat("y", "")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(salts_seen(&h, "/v1/chat/completions", "acme"), [None, None]);
    assert_eq!(salts_seen(&h, "/v1/embeddings", "acme"), [None]);
    for r in h.sim.sim.requests() {
        assert!(
            !String::from_utf8_lossy(&r.body).contains("acme-chosen-salt"),
            "the client's salt reached the upstream: {:?}",
            r.body
        );
    }
    h.wait_metric("bulkhead_cache_salt_overrides_total{tenant=\"acme\"}", 2.0)
        .await;
    h.shutdown().await;
}

use bulkhead_testkit::free_port;

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// The `bulkhead-sidecar` binary, run on a config file, its stdout and stderr captured.
struct Bin {
    p: SidecarProcess,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    client: HttpClient,
}

/// A config for the binary: the harness's, on free ports, upstream `upstream` (vLLM flavour),
/// keys in `dir`, plus `extra`.
fn bin_config(upstream: &str, dir: &std::path::Path, tenants: &str, extra: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    std::fs::write(dir.join("gw.key"), b64.encode(GW_KEY)).unwrap();
    std::fs::write(dir.join("acme.key"), b64.encode(ACME_KEY)).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    config_text(upstream, dir, tenants)
        .replace(
            "addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"",
            &format!("addr = \"127.0.0.1:{port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\""),
        )
        .replacen("[upstream]\n", "[upstream]\nflavor = \"vllm\"\n", 1)
        + extra
}

impl Bin {
    /// Start the binary on `config` (from [`bin_config`]) with `RUST_LOG=rust_log`, and wait
    /// until it is ready.
    async fn start(config: &std::path::Path, rust_log: &str, json_log: bool) -> Bin {
        let text = std::fs::read_to_string(config).unwrap();
        let launch = Launch {
            bin: Some(env!("CARGO_BIN_EXE_bulkhead-sidecar").into()),
            args: if json_log {
                vec!["--log-json".into()]
            } else {
                Vec::new()
            },
            env: vec![("RUST_LOG".into(), rust_log.into())],
        };
        let p = SidecarProcess::start_with(&text, config.parent().unwrap(), launch).await;
        Bin {
            addr: p.addr,
            admin: p.admin,
            p,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    /// A gateway-signed POST; the status (the body is read and dropped).
    async fn send(&self, tenant: &str, path: &str, body: &str) -> StatusCode {
        let headers = signed_headers(
            tenant,
            &Method::POST,
            path,
            body.as_bytes(),
            "gw",
            GW_KEY,
            |_| {},
        );
        let mut req = http::Request::new(Full::new(Bytes::from(body.to_string())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = format!("http://{}{path}", self.addr).parse().unwrap();
        *req.headers_mut() = headers;
        let r = self.client.request(req).await.unwrap();
        let status = r.status();
        let _ = r.into_body().collect().await;
        status
    }

    /// The admin port's `/metrics` text.
    async fn metrics(&self) -> String {
        let uri: http::Uri = format!("http://{}/metrics", self.admin).parse().unwrap();
        let r = self.client.get(uri).await.unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    /// SIGTERM, a clean exit, and everything it wrote (stdout and stderr).
    async fn stop(self) -> String {
        self.p.stop().await
    }
}

/// The binary, logging everything (`RUST_LOG=trace`, plain and JSON), serves salted
/// requests (with and without a client salt, refused ones, a reload to a new generation):
/// neither salt appears anywhere in what it writes: its log, its audit files, its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_salt_never_reaches_the_log() {
    let sim = bulkhead_sim::SimHandle::start(SimConfig::default())
        .await
        .unwrap();
    for json_log in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let tenants =
            "[tenants.acme]\nisolation = \"salted\"\n[tenants.globex]\nisolation = \"salted\"\n";
        let text = bin_config(
            &sim.url(),
            dir.path(),
            tenants,
            &cache_section(dir.path(), 1, ""),
        );
        let config = dir.path().join("sidecar.toml");
        std::fs::write(&config, &text).unwrap();
        let bin = Bin::start(&config, "trace", json_log).await;
        let before = sim.sim.requests().len();
        let salt1 = documented_salt(SALT_KEY, 1, "acme");
        let salt2 = documented_salt(SALT_KEY, 2, "acme");
        let path = "/v1/chat/completions";
        assert_eq!(bin.send("acme", path, &chat("x", "")).await, StatusCode::OK);
        // The client sends the real salt (had it leaked) and a salt of its own.
        let theirs = format!(r#","cache_salt":"{salt1}""#);
        assert_eq!(
            bin.send("acme", path, &chat("x", &theirs)).await,
            StatusCode::OK
        );
        assert_eq!(
            bin.send("acme", path, &chat("x", r#","stream":true"#))
                .await,
            StatusCode::OK
        );
        assert_eq!(
            bin.send("acme", path, "{not json").await,
            StatusCode::BAD_REQUEST
        );
        // A new generation through a reload: the new salt is not logged either.
        std::fs::write(
            &config,
            text.replace("salt_generation = 1", "salt_generation = 2"),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert_eq!(bin.send("acme", path, &chat("y", "")).await, StatusCode::OK);
            let last = sim.sim.requests().last().cloned().unwrap();
            if json(&last.body)["cache_salt"] == salt2.as_str() {
                break;
            }
            assert!(Instant::now() < deadline, "the reload never applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What reached the upstream is the documented salt, so the strings searched for below
        // are the real ones.
        let seen: Vec<String> = sim.sim.requests()[before..]
            .iter()
            .map(|r| json(&r.body)["cache_salt"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(seen[..3], [salt1.clone(), salt1.clone(), salt1.clone()]);
        let metrics = bin.metrics().await;
        assert!(metrics.contains("bulkhead_requests_total"), "{metrics}");
        let log = bin.stop().await;
        let mut audit = String::new();
        for e in std::fs::read_dir(dir.path().join("audit")).unwrap() {
            audit.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
        }
        assert!(audit.contains("\"tenant\":\"acme\""), "{audit}");
        // The capture works: the trace-level log is there, the reload included.
        assert!(log.contains("bulkhead-sidecar listening"), "{log}");
        assert!(log.contains("configuration reloaded"), "{log}");
        assert!(log.lines().count() > 10, "{log}");
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(SALT_KEY);
        for secret in [&salt1, &salt2, &key_b64] {
            for (what, text) in [("log", &log), ("audit", &audit), ("metrics", &metrics)] {
                let leaks: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains(secret.as_str()))
                    .collect();
                assert!(
                    leaks.is_empty(),
                    "json {json_log}: a salt or the salt key is in the {what}: {leaks:#?}"
                );
            }
        }
    }
    sim.stop().await;
}

// ---- a fake node agent (the real protocol), recording what it was asked ----

/// Serves the tagging protocol at `path`: tags of tenants in `refuse` are refused with
/// `unknown_tenant`, everything else accepted; every call is logged.
fn fake_agent(path: &std::path::Path, refuse: &'static [&'static str]) -> CallLog {
    FakeAgent::start(
        path,
        AgentOptions {
            refuse,
            ..Default::default()
        },
    )
    .calls
}

/// The calls on the client connection whose client port is `port` (sidecar side: local port
/// `h.addr`, peer port `port`), as (op, tenant, accepted).
fn client_calls(
    log: &CallLog,
    h: &Harness,
    port: u16,
) -> Vec<(&'static str, Option<String>, bool)> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|c| c.local_port == h.addr.port() && c.peer_port == port)
        .map(|c| (c.op, c.tenant.clone(), c.accepted))
        .collect()
}

fn agent_tweak(sock: &std::path::Path) -> impl FnOnce(&mut String) + use<> {
    let sock = sock.display().to_string();
    move |t: &mut String| {
        // Keep idle keep-alive connections open (the test config's 300 ms would close them).
        *t = t.replace(
            "header_read_timeout_ms = 300",
            "header_read_timeout_ms = 60000",
        );
        t.push_str(&format!("\n[agent]\nsocket = \"{sock}\"\n"));
    }
}

#[tokio::test]
async fn flush_calls_go_on_the_sidecars_own_untagged_connection() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let log = fake_agent(&sock, &[]);
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\n";
    let (h, _keys) = start(tenants, "", SimConfig::default(), agent_tweak(&sock)).await;
    for tenant in ["globex", "acme", "globex", "acme"] {
        let (st, b) = post(&h, tenant, "/v1/chat/completions", &chat("x", "")).await;
        assert_eq!(st, StatusCode::OK, "{tenant}: {b:?}");
    }
    let flushes = h.sim.sim.flushes();
    assert_eq!(flushes, (3, 0), "a flush before each tenant change");
    // Upstream connections the agent was asked about: (sidecar's local port, tenant).
    let upstream: Vec<(u16, Option<String>, &'static str)> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.peer_port == h.sim.addr.port())
        .map(|c| (c.local_port, c.tenant.clone(), c.op))
        .collect();
    let mut checked = (0, 0);
    for r in h.sim.sim.requests() {
        let port = r.peer.unwrap().port();
        let calls: Vec<_> = upstream.iter().filter(|(p, _, _)| *p == port).collect();
        if r.path == "/reset_prefix_cache" {
            // No tag, no untag, no lookup: the agent never heard of this connection.
            assert!(calls.is_empty(), "flush connection {port}: {calls:?}");
            assert!(
                !r.headers.contains_key("x-bulkhead-tenant"),
                "{:?}",
                r.headers
            );
            checked.0 += 1;
        } else {
            // The oracle sees tags: every forwarded request went on a connection tagged
            // with its tenant.
            let tenant = r.headers["x-bulkhead-tenant"].to_str().unwrap();
            assert_eq!(
                calls
                    .iter()
                    .map(|(_, t, op)| (*op, t.as_deref()))
                    .collect::<Vec<_>>(),
                [("tag", Some(tenant))],
                "{tenant} on {port}"
            );
            checked.1 += 1;
        }
    }
    assert_eq!(checked, (3, 4));
    h.shutdown().await;
}

#[tokio::test]
async fn hold_retries_the_flush_until_the_queue_timeout_and_never_forwards() {
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\n";
    let (h, _keys) = start(
        tenants,
        "on_flush_failure = \"hold\"\nflush_attempts = 2\nflush_retry_ms = 20",
        SimConfig::default(),
        |t| *t = t.replace("timeout_ms = 5000", "timeout_ms = 800"),
    )
    .await;
    let (st, _) = post(&h, "globex", "/v1/chat/completions", &chat("x", "")).await;
    assert_eq!(st, StatusCode::OK);
    // The server answers every flush "not flushed" from now on.
    h.sim.sim.refuse_next_flushes(1_000_000);
    let t0 = Instant::now();
    let (p, b) = h
        .send_collect(h.signed(
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &chat(PROMPT, ""),
        ))
        .await;
    let took = t0.elapsed();
    // Held to the queue timeout (not failed after `flush_attempts`), then 503 `queue`.
    assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{b:?}");
    let e = json(&b);
    assert_eq!(e["error"]["code"], "queue", "{e}");
    assert_eq!(p.headers["retry-after"], "1");
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_millis(4000),
        "{took:?}"
    );
    let (ok, refused) = h.sim.sim.flushes();
    assert_eq!(ok, 0);
    assert!(
        refused > 2 * 2,
        "kept retrying past flush_attempts: {refused}"
    );
    assert_eq!(
        upstream_log(&h)
            .iter()
            .filter(|(p, t)| p == "/v1/chat/completions" && t == "acme")
            .count(),
        0,
        "forwarded without the flush"
    );
    h.wait_metric("bulkhead_cache_gate_timeouts_total{kind=\"queue\"}", 1.0)
        .await;
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"503\"}", 1.0)
        .await;
    // The server flushes again: acme runs.
    h.sim.sim.refuse_next_flushes(0);
    let (st, _) = post(&h, "acme", "/v1/chat/completions", &chat(PROMPT, "")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h.sim.sim.flushes().0, 1);
    h.shutdown().await;
}

/// `acme` (exclusive) holds a stream open: its window is open. `globex` arrives and waits.
/// Returns the running globex request.
async fn open_window_with_globex_waiting(
    h: &Arc<Harness>,
) -> (
    hyper::body::Incoming,
    tokio::task::JoinHandle<(StatusCode, Bytes)>,
) {
    let held = h.hold_stream("acme", "hold this").await;
    let h2 = h.clone();
    let globex = tokio::spawn(async move {
        post(&h2, "globex", "/v1/chat/completions", &chat("later", "")).await
    });
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    (held, globex)
}

/// Send one acme chat in a task; Ok(status) if it finished, Err(task) if it is waiting at
/// the gate (queued) instead. (An admitted request shows as queued for an instant on its way
/// through the gate: one seen queued counts as held only if it is still unfinished 200 ms
/// later; admitted ones finish within milliseconds. `finish_window` then checks on the
/// upstream's side that it was held.)
async fn acme_or_queued(
    h: &Arc<Harness>,
) -> Result<StatusCode, tokio::task::JoinHandle<(StatusCode, Bytes)>> {
    let h2 = h.clone();
    let mut task =
        tokio::spawn(
            async move { post(&h2, "acme", "/v1/chat/completions", &chat("mine", "")).await },
        );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(10), &mut task).await {
            return Ok(r.unwrap().0);
        }
        if h.metric("bulkhead_queued_requests{tenant=\"acme\"}").await == Some(1.0) {
            return match tokio::time::timeout(Duration::from_millis(200), &mut task).await {
                Ok(r) => Ok(r.unwrap().0),
                Err(_) => Err(task),
            };
        }
        assert!(Instant::now() < deadline, "acme neither ran nor queued");
    }
}

/// After the held stream ends: globex runs (after a flush), then the held acme request (after
/// another); nothing else reaches the upstream.
async fn finish_window(
    h: &Arc<Harness>,
    mut held: hyper::body::Incoming,
    globex: tokio::task::JoinHandle<(StatusCode, Bytes)>,
    acme: tokio::task::JoinHandle<(StatusCode, Bytes)>,
    acme_before: usize,
) {
    let before = upstream_log(h).len();
    h.sim.sim.open_gate();
    while held.frame().await.is_some() {}
    assert_eq!(globex.await.unwrap().0, StatusCode::OK);
    assert_eq!(acme.await.unwrap().0, StatusCode::OK);
    let chat = "/v1/chat/completions";
    assert_eq!(
        upstream_log(h)[before..],
        [
            pair("/reset_prefix_cache", ""),
            pair(chat, "globex"),
            pair("/reset_prefix_cache", ""),
            pair(chat, "acme"),
        ]
    );
    // Before: the flush of the cache the sidecar found at start (its contents unknown), then
    // acme's window.
    let mut window = vec![pair("/reset_prefix_cache", "")];
    window.extend(vec![pair(chat, "acme"); acme_before]);
    assert_eq!(upstream_log(h)[..before], window);
}

#[tokio::test]
async fn an_exclusive_window_closes_after_its_request_budget_while_others_wait() {
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\n";
    let (h, _keys) = start(
        tenants,
        "exclusive_window_ms = 60000\nexclusive_window_max_requests = 3",
        SimConfig::default(),
        |_| {},
    )
    .await;
    let h = Arc::new(h);
    let (held, globex) = open_window_with_globex_waiting(&h).await;
    // globex waits; acme's window admits its 2nd and 3rd request still ...
    for _ in 0..2 {
        match acme_or_queued(&h).await {
            Ok(st) => assert_eq!(st, StatusCode::OK),
            Err(_) => panic!("acme's window closed before its request budget"),
        }
    }
    // ... and not a 4th: that one waits for globex.
    let Err(fourth) = acme_or_queued(&h).await else {
        panic!("acme's window admitted more than exclusive_window_max_requests");
    };
    finish_window(&h, held, globex, fourth, 3).await;
    Arc::into_inner(h).unwrap().shutdown().await;
}

#[tokio::test]
async fn an_exclusive_window_closes_after_its_time_while_others_wait() {
    const WINDOW: Duration = Duration::from_millis(400);
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n[tenants.globex]\n";
    // The simulator remembers every request (the window admits many).
    let sim = SimConfig {
        record_requests: 1 << 20,
        ..SimConfig::default()
    };
    let (h, _keys) = start(
        tenants,
        &format!(
            "exclusive_window_ms = {}\nexclusive_window_max_requests = 100000",
            WINDOW.as_millis()
        ),
        sim,
        |_| {},
    )
    .await;
    let h = Arc::new(h);
    let t0 = Instant::now();
    let (held, globex) = open_window_with_globex_waiting(&h).await;
    // acme's requests run while the window lasts, though globex waits; the first one after
    // it waits for globex. (The window opened after `t0`, when the held stream entered.)
    let mut admitted = 1;
    let (held_acme, held_sent) = loop {
        let sent = t0.elapsed();
        match acme_or_queued(&h).await {
            Ok(st) => {
                assert_eq!(st, StatusCode::OK);
                admitted += 1;
            }
            Err(task) => break (task, sent),
        }
        assert!(
            t0.elapsed() < WINDOW + Duration::from_secs(3),
            "acme's window stayed open past exclusive_window_ms"
        );
    };
    // The first request held was sent about when the window closed (it reaches the gate a
    // few milliseconds after it is sent): not before exclusive_window_ms, nor long after.
    assert!(
        held_sent >= WINDOW - Duration::from_millis(100),
        "the window closed {held_sent:?} after t0, before exclusive_window_ms"
    );
    assert!(
        held_sent < WINDOW + Duration::from_secs(2),
        "the window closed {held_sent:?} after t0"
    );
    assert!(admitted >= 2, "acme ran only its held stream");
    finish_window(&h, held, globex, held_acme, admitted).await;
    Arc::into_inner(h).unwrap().shutdown().await;
}

/// One HTTP/2 client connection of its own: (client port, sender).
async fn h2_conn(
    addr: std::net::SocketAddr,
) -> (u16, hyper::client::conn::http2::SendRequest<Full<Bytes>>) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let port = s.local_addr().unwrap().port();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (port, send)
}

#[tokio::test]
async fn an_h2_connection_is_retagged_on_each_tenant_change() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let log = fake_agent(&sock, &[]);
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), agent_tweak(&sock)).await;
    let (port, mut conn) = h2_conn(h.addr).await;
    for tenant in ["acme", "acme", "globex", "acme"] {
        conn.ready().await.unwrap();
        let r = conn
            .send_request(h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", "")))
            .await
            .unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), StatusCode::OK);
        let _ = r.into_body().collect().await.unwrap();
    }
    let tag = |t: &str| ("tag", Some(t.to_string()), true);
    assert_eq!(
        client_calls(&log, &h, port),
        [tag("acme"), tag("globex"), tag("acme")]
    );
    drop(conn);
    h.shutdown().await;
}

/// A re-tag the agent refuses (a tenant it does not know) must not leave the connection
/// under the previous tenant: it is untagged, and its bytes count as `untagged`.
#[tokio::test]
async fn a_refused_retag_leaves_the_connection_untagged_not_under_the_previous_tenant() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let log = fake_agent(&sock, &["globex"]);
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), agent_tweak(&sock)).await;
    let mut c = H1Conn::open(h.addr).await;
    for tenant in ["acme", "globex", "globex", "acme"] {
        let (p, _) = c
            .request(h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", "")))
            .await
            .unwrap();
        // Tagging never refuses a request.
        assert_eq!(p.status, StatusCode::OK, "{tenant}");
    }
    assert_eq!(
        client_calls(&log, &h, c.port),
        [
            ("tag", Some("acme".into()), true),
            ("tag", Some("globex".into()), false),
            ("untag", None, true),
            ("tag", Some("acme".into()), true),
        ]
    );
    // globex's upstream connection was never tagged (refused), and so carries no tag.
    let refused_upstream = log
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.peer_port == h.sim.addr.port() && c.tenant.as_deref() == Some("globex"))
        .count();
    assert_eq!(refused_upstream, 1);
    c.close().await;
    h.shutdown().await;
}

/// A tag the agent refuses is visible at the default log level: one warning per code and
/// tenant, naming both (not one per request); the requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_the_agent_refuses_is_logged_once_per_code_and_tenant() {
    let sim = bulkhead_sim::SimHandle::start(SimConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let calls = fake_agent(&sock, &["globex"]);
    let text = bin_config(
        &sim.url(),
        dir.path(),
        DEFAULT_TENANTS,
        &format!("\n[agent]\nsocket = \"{}\"\n", sock.display()),
    );
    let config = dir.path().join("sidecar.toml");
    std::fs::write(&config, &text).unwrap();
    let bin = Bin::start(&config, "info", true).await;
    for tenant in ["acme", "globex", "globex", "acme", "globex"] {
        let st = bin
            .send(tenant, "/v1/chat/completions", &chat("x", ""))
            .await;
        assert_eq!(st, StatusCode::OK, "{tenant}");
    }
    let log = bin.stop().await;
    let refused = calls.lock().unwrap().iter().filter(|c| !c.accepted).count();
    assert!(refused >= 2, "the agent refused {refused} tags");
    let warnings: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("the node agent refused to tag a socket"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert_eq!(warnings[0]["level"], "WARN");
    assert_eq!(warnings[0]["fields"]["code"], "unknown_tenant");
    assert_eq!(warnings[0]["fields"]["tenant"], "globex");
    sim.stop().await;
}

/// A key whose replay-cache share is full is refused with 503 `replay_cache_full` (type
/// `authentication_error`), before anything is forwarded, counted as an auth failure of that
/// reason (and of the tenant the verified signature named); another key goes on.
#[tokio::test]
async fn a_full_replay_cache_share_is_503_and_forwards_nothing() {
    // Two keys (gw, acme-key) and capacity 2: one live nonce each.
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        *t = t.replacen("[auth]\n", "[auth]\nreplay_cache_capacity = 2\n", 1);
    })
    .await;
    let path = "/v1/chat/completions";
    let (st, _) = post(&h, "globex", path, &chat("first", "")).await;
    assert_eq!(st, StatusCode::OK);
    let (p, b) = h
        .send_collect(h.signed("globex", Method::POST, path, &chat("second", "")))
        .await;
    assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{b:?}");
    let e = json(&b);
    assert_eq!(e["error"]["code"], "replay_cache_full", "{e}");
    assert_eq!(e["error"]["type"], "authentication_error", "{e}");
    assert_eq!(h.sim.sim.requests().len(), 1, "forwarded with a full cache");
    h.wait_metric(
        "bulkhead_auth_failures_total{reason=\"replay_cache_full\"}",
        1.0,
    )
    .await;
    h.wait_metric(
        "bulkhead_auth_failures_by_tenant_total{tenant=\"globex\",reason=\"replay_cache_full\"}",
        1.0,
    )
    .await;
    // The other key's share is its own.
    let req = h.signed_with(
        "acme",
        Method::POST,
        path,
        &chat("third", ""),
        "acme-key",
        ACME_KEY,
        |_| {},
    );
    let (p, _) = h.send_collect(req).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(h.sim.sim.requests().len(), 2);
    h.shutdown().await;
}

/// README (isolation): "any other tenant that ran (salted ones too) makes the cache dirty for
/// an exclusive tenant". Salts keep the salted tenant's blocks apart from the exclusive
/// tenant's unsalted ones, but the gate does not rely on them for an exclusive tenant: the
/// upstream sees a flush between every salted request and the exclusive request after it, and
/// none between two requests of the same exclusive tenant with nothing in between.
#[tokio::test]
async fn a_salted_tenant_dirties_the_cache_for_an_exclusive_tenant() {
    let tenants = "[tenants.acme]\nisolation = \"exclusive\"\n\
                   [tenants.globex]\nisolation = \"salted\"\n";
    let (h, _keys) = start(tenants, "", SimConfig::default(), |_| {}).await;
    let chat_path = "/v1/chat/completions";
    for tenant in ["globex", "acme", "acme", "globex", "acme"] {
        let (st, b) = post(&h, tenant, chat_path, &chat(PROMPT, "")).await;
        assert_eq!(st, StatusCode::OK, "{tenant}: {b:?}");
    }
    let flush = pair("/reset_prefix_cache", "");
    assert_eq!(
        upstream_log(&h),
        [
            pair(chat_path, "globex"),
            // The salted tenant ran: flush before the exclusive one.
            flush.clone(),
            pair(chat_path, "acme"),
            // The same exclusive tenant again, nobody in between: no flush.
            pair(chat_path, "acme"),
            // Out of the exclusive tenant's window (its blocks must not reach globex) ...
            flush.clone(),
            pair(chat_path, "globex"),
            // ... and the salted tenant ran again: flush before the exclusive one again.
            flush,
            pair(chat_path, "acme"),
        ]
    );
    assert_eq!(h.sim.sim.flushes(), (3, 0));
    // globex was salted indeed (each request with its salt), acme not.
    let globex_salt = documented_salt(SALT_KEY, 1, "globex");
    assert_eq!(
        salts_seen(&h, chat_path, "globex"),
        vec![Some(globex_salt.clone()), Some(globex_salt)]
    );
    assert_eq!(salts_seen(&h, chat_path, "acme"), vec![None; 3]);
    h.shutdown().await;
}
