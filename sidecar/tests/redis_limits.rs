//! Limits and replay protection shared by sidecar replicas through a real redis-server
//! (started here on a free loopback port, without persistence, killed at the end).
//!
//! Without `redis-server` on PATH each test prints why it skips; under a truthy `CI`
//! environment variable a missing `redis-server` fails instead.

mod common;
use bulkhead_sidecar::config::{LimitsMode, RedisLimitsConfig};
use bulkhead_sidecar::limits::local::{LimitKind, LimitNumbers, SharedClock};
use bulkhead_sidecar::limits::metrics::Metrics;
use bulkhead_sidecar::limits::shared::{Grant, SharedError, SharedLimits, SharedTenant, scripts};
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sidecar's estimate for `chat("hi", max_tokens=100)`: the message's keys and strings
/// (17 bytes) a token per 4 started, 4 tokens for the message, and the limit: 5 + 4 + 100.
const EST: u64 = 9 + 100;

/// `true` when the tests can run; prints a skip line (or panics under CI) when not.
fn redis_available(test: &str) -> bool {
    bulkhead_testkit::skip::require_runs(
        "redis-server",
        &format!("{test}: redis-server is not installed (`cargo xtask setup` installs it)"),
    )
}

/// A redis-server child process on 127.0.0.1:`port`, killed when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    async fn start() -> RedisServer {
        Self::start_extra(|_| Vec::new()).await
    }

    /// Start with `extra(port)` arguments on a free port.
    async fn start_extra(extra: impl Fn(u16) -> Vec<String>) -> RedisServer {
        // A port just found free may be taken again by another test before the server binds
        // it: then try another.
        for _ in 0..5 {
            let port = bulkhead_testkit::free_port();
            let mut s = RedisServer {
                port,
                child: None,
                dir: tempfile::tempdir().unwrap(),
                extra: extra(port),
            };
            if s.try_spawn().await {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Start (again) on this server's port.
    async fn spawn(&mut self) {
        assert!(
            self.try_spawn().await,
            "redis-server did not start on port {}",
            self.port
        );
    }

    /// Start the server and wait until it answers; `false` when the process that answers on
    /// the port is not this one (or it exited).
    async fn try_spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let pid = child.id();
        self.child = Some(child);
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if let Ok(c) = redis::Client::open(url.as_str())
                && let Ok(mut conn) = c.get_multiplexed_async_connection().await
                && let Ok(info) = redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await
            {
                if info.contains(&format!("process_id:{pid}\r")) {
                    return true;
                }
                self.kill();
                return false;
            }
            assert!(Instant::now() < deadline, "redis-server never answered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Calls of `cmd` so far (INFO commandstats).
    async fn calls(&self, cmd: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `[limits]` sections for a sidecar on `url`, then the tenants.
fn limits_section(url: &str, redis_extra: &str, tenants: &str) -> String {
    format!(
        "[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"{url}\"\n{redis_extra}\n{tenants}"
    )
}

async fn replicas(n: usize, tenants: &str) -> Vec<Harness> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Harness::start(tenants).await);
    }
    v
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request signed by the gateway key, to the sidecar at `addr`.
fn signed_to(
    addr: SocketAddr,
    tenant: &str,
    method: Method,
    path: &str,
    body: &str,
) -> Request<Full<Bytes>> {
    let headers = signed_headers(tenant, &method, path, body.as_bytes(), "gw", GW_KEY, |_| {});
    let mut req = Request::new(Full::new(Bytes::from(body.to_string())));
    *req.method_mut() = method;
    *req.uri_mut() = format!("http://{addr}{path}").parse::<Uri>().unwrap();
    *req.headers_mut() = headers;
    req
}

fn stream_body() -> String {
    chat("hi", r#","stream":true,"max_tokens":100"#)
}

/// Send `total` streamed requests of `tenant` at once, request i to replica i % n, with every
/// simulator's gate closed (no usage reconciles during the burst); the admitted responses are
/// kept open. Returns (admitted responses, refusal codes).
async fn burst(addrs: &[SocketAddr], tenant: &str, total: usize) -> (Vec<Response>, Vec<String>) {
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..total {
        let req = signed_to(
            addrs[i % addrs.len()],
            tenant,
            Method::POST,
            "/v1/chat/completions",
            &stream_body(),
        );
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.request(req).await.unwrap() }));
    }
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status() {
            StatusCode::OK => ok.push(r),
            StatusCode::TOO_MANY_REQUESTS => {
                let b = r.into_body().collect().await.unwrap().to_bytes();
                refused.push(json(&b)["error"]["code"].as_str().unwrap().to_string());
            }
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, refused)
}

type Response = http::Response<Incoming>;

async fn burst_bound(n_replicas: usize, mode: &str, slack_per_replica: u64) {
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        &format!("mode = \"{mode}\"\nlease_tokens = 300\nexpected_replicas = {n_replicas}"),
        "[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\n",
    );
    let hs = replicas(n_replicas, &tenants).await;
    for h in &hs {
        h.sim.sim.close_gate();
    }
    let addrs: Vec<_> = hs.iter().map(|h| h.addr).collect();
    let (ok, refused) = burst(&addrs, "acme", 40).await;
    let admitted = ok.len() as u64 * EST;
    let bound = 1000 + n_replicas as u64 * slack_per_replica;
    println!(
        "{mode}, {n_replicas} replicas: admitted {} requests = {admitted} tokens against \
         1000 TPM (over-admission {} tokens; bound {bound})",
        ok.len(),
        admitted as i64 - 1000
    );
    assert!(
        admitted <= bound,
        "admitted {admitted} tokens, bound {bound}"
    );
    // Not far below the limit either: strict loses at most what one more request would
    // need; leased at most what sits in the replicas' leases (given back after 1 s idle).
    let least = match mode {
        "strict" => 1000 - EST,
        _ => 1000u64.saturating_sub(n_replicas as u64 * slack_per_replica),
    };
    assert!(
        admitted >= least,
        "admitted only {admitted} tokens, expected at least {least}"
    );
    assert!(refused.iter().all(|c| c == "tokens"), "{refused:?}");
    for h in &hs {
        h.sim.sim.open_gate();
    }
    for r in ok {
        r.into_body().collect().await.unwrap();
    }
    for h in hs {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_burst_over_two_and_three_replicas_holds_the_token_limit() {
    if !redis_available("strict_burst") {
        return;
    }
    // Strict: at most the limit plus one reservation per replica.
    burst_bound(2, "strict", EST).await;
    burst_bound(3, "strict", EST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_burst_over_two_and_three_replicas_stays_within_replicas_times_lease() {
    if !redis_available("leased_burst") {
        return;
    }
    // Leased: at most the limit plus one lease (300 tokens, capped at 1000 / replicas) per
    // replica.
    burst_bound(2, "leased", 300).await;
    burst_bound(3, "leased", 300).await;
}

#[tokio::test]
async fn requests_per_minute_and_concurrency_hold_across_replicas() {
    if !redis_available("rpm_and_concurrency") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\nrequests_per_minute = 3\n[tenants.globex]\nmax_concurrent = 2\n",
    );
    let hs = replicas(2, &tenants).await;
    let c = client();
    let mut codes = Vec::new();
    for i in 0..6 {
        let r = c
            .request(signed_to(
                hs[i % 2].addr,
                "acme",
                Method::GET,
                "/v1/models",
                "",
            ))
            .await
            .unwrap();
        codes.push(r.status().as_u16());
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=20).contains(&retry), "{retry}");
            let b = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(json(&b)["error"]["code"], "requests");
        }
    }
    assert_eq!(codes, [200, 200, 200, 429, 429, 429]);

    // Concurrency: two streams held open, one on each replica; a third on either is refused.
    for h in &hs {
        h.sim.sim.close_gate();
    }
    let send = |i: usize| {
        signed_to(
            hs[i].addr,
            "globex",
            Method::POST,
            "/v1/chat/completions",
            &stream_body(),
        )
    };
    let a = c.request(send(0)).await.unwrap();
    let b = c.request(send(1)).await.unwrap();
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    for i in 0..2 {
        let r = c.request(send(i)).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&body)["error"]["code"], "concurrency");
    }
    // One ends: its slot comes back for the other replica at once.
    hs[0].sim.sim.open_gate();
    a.into_body().collect().await.unwrap();
    hs[0]
        .wait_metric("bulkhead_inflight_requests{tenant=\"globex\"}", 0.0)
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.request(send(1)).await.unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for h in &hs {
        h.sim.sim.open_gate();
    }
    drop(b);
    for h in hs {
        h.shutdown().await;
    }
}

#[tokio::test]
async fn a_replay_sent_to_the_other_replica_is_refused() {
    if !redis_available("replay") {
        return;
    }
    let redis = RedisServer::start().await;
    // acme has no limits (its nonce takes a call of its own); globex has one (its nonce is
    // recorded by the admission's script).
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\n[tenants.globex]\nrequests_per_minute = 2\n",
    );
    let hs = replicas(2, &tenants).await;
    let c = client();
    for (tenant, replays) in [("acme", 1.0), ("globex", 1.0)] {
        let body = chat("once", "");
        let headers = signed_headers(
            tenant,
            &Method::POST,
            "/v1/chat/completions",
            body.as_bytes(),
            "gw",
            GW_KEY,
            |_| {},
        );
        let to = |addr: SocketAddr| {
            let mut req = Request::new(Full::new(Bytes::from(body.clone())));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = format!("http://{addr}/v1/chat/completions")
                .parse()
                .unwrap();
            *req.headers_mut() = headers.clone();
            req
        };
        let r = c.request(to(hs[0].addr)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{tenant}");
        let r = c.request(to(hs[1].addr)).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{tenant}");
        let b = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&b)["error"]["code"], "replayed");
        assert_eq!(
            hs[1]
                .metric(&format!(
                    "bulkhead_auth_failures_by_tenant_total{{tenant=\"{tenant}\",reason=\"replayed\"}}"
                ))
                .await,
            Some(replays)
        );
        // Never attributed to the tenant.
        assert_eq!(
            hs[1]
                .metric(&format!(
                    "bulkhead_requests_total{{tenant=\"{tenant}\",code=\"401\"}}"
                ))
                .await,
            None
        );
    }
    assert_eq!(
        hs[1]
            .metric("bulkhead_unattributed_requests_total{reason=\"replayed\"}")
            .await,
        Some(2.0)
    );
    // The replay used none of globex's 2 requests per minute: one more is admitted, then no more.
    let send = || signed_to(hs[1].addr, "globex", Method::GET, "/v1/models", "");
    assert_eq!(c.request(send()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        c.request(send()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // The nonces live under the key id's own hash tag, with an expiry.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("bulkhead:{replay:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 31_000, "{ttl}");
    for h in hs {
        h.shutdown().await;
    }
}

/// A replay refused by Redis's replay cache comes after the signature verified and the body was
/// inspected (the nonce is recorded by the admission's script): its audit record is the
/// unauthenticated one, with nothing of the refused request's identity or body in it (no key
/// id, model, prompt hash or leak hits).
#[tokio::test]
async fn a_replay_refused_by_redis_is_audited_as_unauthenticated_with_nothing_of_the_request() {
    if !redis_available("replay_audit") {
        return;
    }
    let redis = RedisServer::start().await;
    // globex has a limit, so its nonce is recorded by the admission's script; the prompt
    // carries acme's canary, a leak hit on the first (admitted) request.
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\ncanaries = [\"CANARY-acme-7f3a9c5e\"]\n\
         [tenants.globex]\nrequests_per_minute = 5\n",
    );
    let hs = replicas(2, &tenants).await;
    let body = chat("repeat CANARY-acme-7f3a9c5e", "");
    let headers = signed_headers(
        "globex",
        &Method::POST,
        "/v1/chat/completions",
        body.as_bytes(),
        "gw",
        GW_KEY,
        |_| {},
    );
    let to = |h: &Harness| {
        let mut req = Request::new(Full::new(Bytes::from(body.clone())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = h.url("/v1/chat/completions");
        *req.headers_mut() = headers.clone();
        req
    };
    let (p, _) = hs[0].send_collect(to(&hs[0])).await;
    assert_eq!(p.status, StatusCode::OK);
    let (p, b) = hs[1].send_collect(to(&hs[1])).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&b)["error"]["code"], "replayed");
    let dir = hs[1].dir.path().join("audit");
    let read = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read("_unauthenticated.jsonl").is_empty() {
        assert!(Instant::now() < deadline, "no unauthenticated audit record");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recs = read("_unauthenticated.jsonl");
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec["tenant"], "_unauthenticated");
    assert_eq!(rec["status"], 401);
    assert_eq!(rec["reason"], "replayed");
    for field in ["key_id", "prompt_hash", "model", "leaks", "reserved_tokens"] {
        assert!(
            rec.get(field).is_none_or(serde_json::Value::is_null),
            "{field} of the refused request reached the unauthenticated record: {rec}"
        );
    }
    assert_eq!(rec["stream"], false);
    // The replica that refused it wrote nothing for globex (nor for acme, whose canary it was).
    assert!(read("globex.jsonl").is_empty());
    assert!(read("acme.jsonl").is_empty());
    for h in hs {
        h.shutdown().await;
    }
}

/// A request `h` can send again and again: signed once (one nonce), for `tenant`.
fn replayable(h: &Harness, tenant: &str, path: &str) -> impl Fn() -> Request<Full<Bytes>> + use<> {
    let headers = signed_headers(tenant, &Method::GET, path, b"", "gw", GW_KEY, |_| {});
    let uri = h.url(path);
    move || {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        req
    }
}

/// A nonce Redis accepted is also remembered by the replica that served it, so while Redis is
/// down (`on_backend_failure = "local"`) that replica refuses its replay: for a nonce checked
/// by a call of its own (acme: no limits), for one recorded by the admission script (globex,
/// admitted), and for one the admission script recorded while a limit refused the request
/// (globex's second: Redis burned that nonce, and so does the replica).
#[tokio::test]
async fn nonces_redis_accepted_are_refused_locally_while_redis_is_down() {
    if !redis_available("replay_outage") {
        return;
    }
    let mut redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "command_timeout_ms = 100\nconnect_timeout_ms = 200\non_backend_failure = \"local\"",
        "[tenants.acme]\n[tenants.globex]\nrequests_per_minute = 1\n",
    );
    let h = Harness::start(&tenants).await;
    let acme = replayable(&h, "acme", "/v1/models");
    let globex = replayable(&h, "globex", "/v1/models");
    let globex_refused = replayable(&h, "globex", "/v1/models");
    assert_eq!(h.send_collect(acme()).await.0.status, StatusCode::OK);
    assert_eq!(h.send_collect(globex()).await.0.status, StatusCode::OK);
    let (p, b) = h.send_collect(globex_refused()).await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{b:?}");
    // Redis has all three nonces.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("bulkhead:{replay:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let held: u64 = redis::cmd("ZCARD")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, 3);
    drop(conn);

    redis.kill();
    for (name, replay) in [
        ("acme", &acme),
        ("globex", &globex),
        ("globex's refused request", &globex_refused),
    ] {
        let (p, b) = h.send_collect(replay()).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{name}: {b:?}");
        assert_eq!(json(&b)["error"]["code"], "replayed", "{name}");
    }
    // The replica did decide without Redis: a fresh request is admitted by the local fallback.
    assert_eq!(
        h.send_collect(h.signed("acme", Method::GET, "/v1/models", ""))
            .await
            .0
            .status,
        StatusCode::OK
    );
    assert_eq!(h.metric("bulkhead_limits_backend_up").await, Some(0.0));
    assert_eq!(
        h.sim.sim.requests().len(),
        3,
        "the replays never reached the model server"
    );
    h.shutdown().await;
}

/// A sidecar on a runtime of its own, so it can die as a process would: every task stops at
/// once and nothing it held is released.
struct Doomed {
    addr: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Doomed {
    fn start(tenants: String) -> Doomed {
        let (tx_addr, rx_addr) = std::sync::mpsc::channel();
        let (tx_kill, rx_kill) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let h = rt.block_on(Harness::start(&tenants));
            h.sim.sim.close_gate();
            tx_addr.send(h.addr).unwrap();
            let _ = rx_kill.recv();
            std::mem::forget(h);
            rt.shutdown_background();
        });
        Doomed {
            addr: rx_addr.recv().unwrap(),
            kill: Some(tx_kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_slots_come_back_within_the_lease() {
    if !redis_available("dead_replica") {
        return;
    }
    let redis = RedisServer::start().await;
    let lease_ms = 1200;
    let tenants = limits_section(
        &redis.url(),
        &format!("concurrency_lease_ms = {lease_ms}"),
        "[tenants.acme]\nmax_concurrent = 2\n[tenants.globex]\n",
    );
    let mut doomed = Doomed::start(tenants.clone());
    let live = Harness::start(&tenants).await;
    let c = client();
    let send = |addr| {
        signed_to(
            addr,
            "acme",
            Method::POST,
            "/v1/chat/completions",
            &stream_body(),
        )
    };
    let held = [
        c.request(send(doomed.addr)).await.unwrap(),
        c.request(send(doomed.addr)).await.unwrap(),
    ];
    assert!(held.iter().all(|r| r.status() == StatusCode::OK));
    // Renewed while the replica lives: still refused after more than one lease.
    tokio::time::sleep(Duration::from_millis(lease_ms + 300)).await;
    let r = c.request(send(live.addr)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    doomed.kill();
    let killed = Instant::now();
    let r = c.request(send(live.addr)).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the dead replica's slots were released at once, not by expiry"
    );
    let back = loop {
        let r = c.request(send(live.addr)).await.unwrap();
        if r.status() == StatusCode::OK {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_millis(lease_ms + 1000),
            "slots still held {:?} after the replica died",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("a dead replica's slots came back {back:?} after it died (lease {lease_ms} ms)");
    assert!(back <= Duration::from_millis(lease_ms + 200), "{back:?}");
    drop(held);
    live.sim.sim.open_gate();
    live.shutdown().await;
}

/// Redis dies under load and comes back: `local` enforces limit / expected_replicas in each
/// replica meanwhile (no request waits past the timeouts), metrics say so, and the shared
/// limit holds again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back_with_local_fallback() {
    if !redis_available("redis_down_local") {
        return;
    }
    let mut redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "command_timeout_ms = 100\nconnect_timeout_ms = 200\nexpected_replicas = 2\non_backend_failure = \"local\"",
        "[tenants.acme]\nrequests_per_minute = 4\n[tenants.globex]\n",
    );
    let hs = replicas(2, &tenants).await;
    let c = client();
    let models = |i: usize| signed_to(hs[i % 2].addr, "acme", Method::GET, "/v1/models", "");
    // Shared: 4 in all.
    let mut ok = 0;
    for i in 0..8 {
        if c.request(models(i)).await.unwrap().status() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 4);
    redis.kill();
    // Each replica now enforces ceil(4 / 2) = 2 on its own, answering promptly.
    let mut per_replica = [0, 0];
    for i in 0..8 {
        let t = Instant::now();
        let r = c.request(models(i)).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a request waited {:?}",
            t.elapsed()
        );
        match r.status() {
            StatusCode::OK => per_replica[i % 2] += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(per_replica, [2, 2]);
    for h in &hs {
        assert_eq!(h.metric("bulkhead_limits_backend_up").await, Some(0.0));
        let d = h
            .metric("bulkhead_limits_degraded_decisions_total{action=\"local\"}")
            .await
            .unwrap();
        assert!(d >= 8.0, "{d}");
    }
    redis.spawn().await;
    for h in &hs {
        h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    }
    // A fresh Redis (no persistence): the shared limit of 4 holds across both again.
    let mut ok = 0;
    for i in 0..8 {
        if c.request(models(i)).await.unwrap().status() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 4);
    for h in hs {
        h.shutdown().await;
    }
}

#[tokio::test]
async fn redis_down_with_deny_refuses_with_its_own_code() {
    if !redis_available("redis_down_deny") {
        return;
    }
    let mut redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "command_timeout_ms = 100\nconnect_timeout_ms = 200\non_backend_failure = \"deny\"",
        "[tenants.acme]\nrequests_per_minute = 100\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    let send = || h.signed("acme", Method::GET, "/v1/models", "");
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    redis.kill();
    for _ in 0..3 {
        let t = Instant::now();
        let (p, b) = h.send_collect(send()).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "waited {:?}",
            t.elapsed()
        );
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&b)["error"]["code"], "limits_backend_unavailable");
        assert_eq!(p.headers["retry-after"], "1");
    }
    assert_eq!(h.metric("bulkhead_limits_backend_up").await, Some(0.0));
    let d = h
        .metric("bulkhead_limits_degraded_decisions_total{action=\"deny\"}")
        .await
        .unwrap();
    assert!(d >= 3.0, "{d}");
    assert_eq!(h.sim.sim.requests().len(), 1);
    redis.spawn().await;
    h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    h.shutdown().await;
}

/// Usage replaces the reservation in Redis as it does locally, and a request takes one
/// admission script call (plus one settlement call and one nonce call).
#[tokio::test]
async fn usage_is_reconciled_in_redis() {
    if !redis_available("reconcile") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &stream_body()))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    // The client sees the shared limit's state, as OpenAI's headers name it.
    let header = |n: &str| {
        p.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(header("x-ratelimit-limit-tokens"), Some(1000));
    assert!(
        header("x-ratelimit-remaining-tokens").is_some_and(|r| r <= 1000 - EST),
        "{:?}",
        p.headers
    );
    // The simulator uses 5 prompt + 16 completion tokens: the balance is 1000 - 21 (plus what
    // refilled meanwhile, 1000 a minute), not 1000 - EST = 894.
    wait_balance(&redis, "acme", 1000.0 - 21.0 - 1.0).await;
    // With the scripts loaded, a request takes two script calls: the admission (which
    // records the nonce too) and the settlement.
    let evals = async || redis.calls("evalsha").await + redis.calls("eval").await;
    let before = evals().await;
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &stream_body()))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    wait_balance(&redis, "acme", 1000.0 - 2.0 * 21.0 - 1.0).await;
    assert_eq!(evals().await - before, 2);
    h.shutdown().await;
}

/// `tenant`'s token balance in Redis (`None`: no key; a full bucket's key is deleted).
async fn balance(conn: &mut redis::aio::MultiplexedConnection, tenant: &str) -> Option<f64> {
    redis::cmd("HGET")
        .arg(format!("bulkhead:{{{tenant}}}:tpm"))
        .arg("b")
        .query_async(conn)
        .await
        .unwrap()
}

/// Wait (5 s at most) until `tenant`'s token balance in Redis satisfies `ok`.
async fn wait_balance_until(redis: &RedisServer, tenant: &str, ok: impl Fn(Option<f64>) -> bool) {
    let mut conn = redis.conn().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = balance(&mut conn, tenant).await;
        if ok(b) {
            return;
        }
        assert!(Instant::now() < deadline, "{tenant}'s balance {b:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait (5 s at most) until `tenant`'s token balance in Redis is at least `at_least` (no key
/// is a full bucket of 1000).
async fn wait_balance(redis: &RedisServer, tenant: &str, at_least: f64) {
    wait_balance_until(redis, tenant, |b| {
        (at_least..=1000.0).contains(&b.unwrap_or(1000.0))
    })
    .await
}

/// The upstream refuses the request (it did no work): the whole reservation goes back to
/// Redis, as it does locally.
#[tokio::test]
async fn an_upstream_refusal_gives_the_reservation_back_in_redis() {
    if !redis_available("refund") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    // An empty prompt list: the sidecar reserves max_tokens, the simulator (as vLLM) says 400.
    let body = r#"{"model":"m","prompt":[],"max_tokens":600}"#;
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/completions", body))
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("empty list"), "{b:?}");
    // It was admitted in Redis (before it was forwarded), then settled: all 600 back.
    assert!(redis.calls("evalsha").await >= 1);
    wait_balance(&redis, "acme", 999.0).await;
    h.shutdown().await;
}

/// Leased mode: a lease left unused for a second goes back to Redis, every tenant's.
#[tokio::test]
async fn idle_leases_go_back_to_redis() {
    if !redis_available("lease_return") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "mode = \"leased\"\nlease_tokens = 300\nexpected_replicas = 1",
        "[tenants.acme]\ntokens_per_minute = 1000\n[tenants.globex]\ntokens_per_minute = 1000\n",
    );
    let h = Harness::start(&tenants).await;
    let mut conn = redis.conn().await;
    for tenant in ["acme", "globex"] {
        let (p, _) = h
            .send_collect(h.signed(tenant, Method::POST, "/v1/chat/completions", &stream_body()))
            .await;
        assert_eq!(p.status, StatusCode::OK);
        // The replica took its lease beside the request.
        let b = balance(&mut conn, tenant).await;
        assert!(
            b.is_some_and(|b| b < 1000.0 - 300.0),
            "{tenant}'s balance {b:?}"
        );
    }
    // Only the 21 tokens the simulator used stay spent.
    for tenant in ["acme", "globex"] {
        wait_balance(&redis, tenant, 1000.0 - 21.0 - 1.0).await;
    }
    h.shutdown().await;
}

/// A Redis Cluster of three masters on loopback, when redis-server can run one: the limits
/// hold across two replicas and every key of a tenant is in one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_on_a_three_master_cluster() {
    if !redis_available("cluster") {
        return;
    }
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            RedisServer::start_extra(|port| {
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("nodes-{port}.conf"),
                ]
            })
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !created {
        agent_common::skip::skip(
            "redis-cli could not create a cluster here; hash tags are checked by key \
             inspection in a_tenants_keys_share_one_hash_tag",
        );
        return;
    }
    // Wait until every node agrees the cluster is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut n.conn().await)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let urls: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
    let tenants = format!(
        "[limits]\nbackend = \"redis\"\n[limits.redis]\nurls = [{}]\nconnect_timeout_ms = 2000\ncommand_timeout_ms = 500\n\
         [tenants.acme]\nrequests_per_minute = 3\ntokens_per_minute = 100000\nmax_concurrent = 10\n[tenants.globex]\n",
        urls.join(", ")
    );
    let hs = replicas(2, &tenants).await;
    for h in &hs {
        h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    }
    let c = client();
    let mut codes = Vec::new();
    for i in 0..5 {
        let r = c
            .request(signed_to(
                hs[i % 2].addr,
                "acme",
                Method::POST,
                "/v1/chat/completions",
                &chat("hi", ""),
            ))
            .await
            .unwrap();
        codes.push(r.status().as_u16());
        r.into_body().collect().await.unwrap();
    }
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    // The tenant's keys all hash to one slot (its {acme} tag), whichever node holds them.
    let mut slots = std::collections::HashSet::new();
    for k in [
        "bulkhead:{acme}:rpm",
        "bulkhead:{acme}:tpm",
        "bulkhead:{acme}:conc",
    ] {
        let s: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query_async(&mut nodes[0].conn().await)
            .await
            .unwrap();
        slots.insert(s);
    }
    assert_eq!(slots.len(), 1);
    let mut found = 0;
    for n in &nodes {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("bulkhead:{acme}:*")
            .query_async(&mut n.conn().await)
            .await
            .unwrap();
        found += keys.len();
        assert!(
            keys.is_empty() || keys.len() >= 2,
            "a tenant's keys are split: {keys:?}"
        );
    }
    assert!(found >= 2, "{found}");
    // One cluster node given as `url` (one server) is refused: the backend stays down and
    // decisions are local (here: the fallback's limit) instead of half working.
    let wrong = Harness::start(&limits_section(
        &nodes[0].url(),
        "connect_timeout_ms = 300",
        "[tenants.acme]\nrequests_per_minute = 3\n[tenants.globex]\n",
    ))
    .await;
    let (p, _) = wrong
        .send_collect(wrong.signed("acme", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(wrong.metric("bulkhead_limits_backend_up").await, Some(0.0));
    assert_eq!(
        wrong
            .metric("bulkhead_limits_degraded_decisions_total{action=\"local\"}")
            .await,
        Some(2.0),
        "the nonce and the admission"
    );
    // Not one command was sent to it (each would have failed: keys of other nodes, or of
    // two hash tags in one script).
    assert_eq!(
        wrong
            .metric("bulkhead_limits_backend_errors_total{kind=\"error\"}")
            .await,
        Some(0.0)
    );
    wrong.shutdown().await;
    for h in hs {
        h.shutdown().await;
    }
}

/// The keys a standalone Redis holds for a tenant all carry its `{tenant}` hash tag.
#[tokio::test]
async fn a_tenants_keys_share_one_hash_tag() {
    if !redis_available("hash_tags") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "key_prefix = \"bh1:\"",
        "[tenants.acme]\nrequests_per_minute = 100\ntokens_per_minute = 100000\nmax_concurrent = 4\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    h.sim.sim.close_gate();
    let r = h
        .send(h.signed("acme", Method::POST, "/v1/chat/completions", &stream_body()))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut conn = redis.conn().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("bh1:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    let tenant_keys: Vec<&String> = keys
        .iter()
        .filter(|k| !k.starts_with("bh1:{replay:"))
        .collect();
    assert_eq!(
        tenant_keys,
        ["bh1:{acme}:conc", "bh1:{acme}:rpm", "bh1:{acme}:tpm"]
    );
    // Each has an expiry: nothing outlives its use.
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
    // One admission call per request (INFO commandstats counts EVALSHA/EVAL).
    let evals = redis.calls("evalsha").await + redis.calls("eval").await;
    assert!(evals >= 2, "{evals}");
    h.sim.sim.open_gate();
    r.into_body().collect().await.unwrap();
    h.shutdown().await;
}

/// Redis restarts empty while a replica holds a concurrency slot: the replica's renewal puts
/// the slot back, so the limit holds again within a third of the lease.
#[tokio::test]
async fn live_slots_are_put_back_after_a_redis_restart() {
    if !redis_available("slots_after_restart") {
        return;
    }
    let mut redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "concurrency_lease_ms = 900\ncommand_timeout_ms = 100\nconnect_timeout_ms = 200",
        "[tenants.acme]\nmax_concurrent = 1\n[tenants.globex]\n",
    );
    let hs = replicas(2, &tenants).await;
    let held = hs[0].hold_stream("acme", "long").await;
    let c = client();
    let models = || signed_to(hs[1].addr, "acme", Method::GET, "/v1/models", "");
    let (p, _) = {
        let r = c.request(models()).await.unwrap();
        (r.status(), ())
    };
    assert_eq!(p, StatusCode::TOO_MANY_REQUESTS);
    redis.kill();
    redis.spawn().await;
    for h in &hs {
        h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    }
    // Short requests on the other replica (each releases its own slot at once) until the
    // held stream's slot is back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.request(models()).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let b = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(json(&b)["error"]["code"], "concurrency");
            break;
        }
        r.into_body().collect().await.unwrap();
        assert!(Instant::now() < deadline, "the live slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hs[0].sim.sim.open_gate();
    drop(held);
    for h in hs {
        h.shutdown().await;
    }
}

/// A response stored through one replica can be continued through another by the tenant that
/// stored it, and by no other tenant: the owner is remembered in Redis.
#[tokio::test]
async fn a_stored_response_is_the_same_tenants_on_every_replica() {
    if !redis_available("stored responses") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\nstore_responses = true\n[tenants.globex]\n",
    );
    let mut hs = Vec::new();
    for _ in 0..2 {
        hs.push(
            Harness::start_with(&tenants, Default::default(), |t| {
                *t = t.replace("[upstream]\n", "[upstream]\nflavor = \"vllm\"\n")
            })
            .await,
        );
    }
    for h in &hs {
        h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    }
    let c = client();
    let send = |addr, tenant: &'static str, body: String| {
        let c = c.clone();
        async move {
            let r = c
                .request(signed_to(
                    addr,
                    tenant,
                    Method::POST,
                    "/v1/responses",
                    &body,
                ))
                .await
                .unwrap();
            let st = r.status();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (st, serde_json::from_slice::<serde_json::Value>(&b).unwrap())
        }
    };
    let (st, v) = send(hs[0].addr, "acme", r#"{"model":"m","input":"keep"}"#.into()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let next = format!(r#"{{"model":"m","input":"more","previous_response_id":"{id}"}}"#);
    let (st, v) = send(hs[1].addr, "globex", next.clone()).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    let (st, v) = send(hs[1].addr, "acme", next).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for h in hs {
        h.shutdown().await;
    }
}

/// A rate header of `p` as a number.
fn header_u64(p: &http::response::Parts, name: &str) -> Option<u64> {
    p.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Leased mode with 4 expected replicas: a replica's lease is the smaller of the configured
/// lease and its share of the limit (the limit / 4), for requests and for tokens, so the
/// replicas' leases together never hold more than the limit. The rate headers show what the
/// replica's lease holds after the request took its own share.
#[tokio::test]
async fn a_lease_is_at_most_the_replicas_share_of_the_limit() {
    if !redis_available("lease_share") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "mode = \"leased\"\nexpected_replicas = 4\nlease_tokens = 300\nlease_requests = 30",
        "[tenants.acme]\nrequests_per_minute = 100\ntokens_per_minute = 1000\n\
         [tenants.globex]\nrequests_per_minute = 100\n",
    );
    let h = Harness::start(&tenants).await;
    h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &stream_body()))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    // 1000 / 4 = 250 tokens (under lease_tokens = 300), 100 / 4 = 25 requests (under 30).
    assert_eq!(header_u64(&p, "x-ratelimit-remaining-tokens"), Some(250));
    assert_eq!(header_u64(&p, "x-ratelimit-remaining-requests"), Some(25));
    assert_eq!(header_u64(&p, "x-ratelimit-limit-tokens"), Some(1000));
    // A tenant with a request limit only: its first request, with no lease yet, asks Redis
    // and takes one.
    let (p, b) = h
        .send_collect(h.signed("globex", Method::GET, "/v1/models", ""))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    assert_eq!(header_u64(&p, "x-ratelimit-remaining-requests"), Some(25));
    assert_eq!(header_u64(&p, "x-ratelimit-remaining-tokens"), None);
    let evals = redis.calls("evalsha").await + redis.calls("eval").await;
    assert!(evals >= 2, "{evals}");
    h.shutdown().await;
}

/// Leased mode, a request limit only: the requests a replica leased and left unused go back to
/// Redis after a second idle, where another replica can use them (long before the limit
/// would give them back: one request every 30 s).
#[tokio::test]
async fn an_idle_lease_of_requests_goes_back_to_redis() {
    if !redis_available("request_lease_return") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "mode = \"leased\"",
        "[tenants.acme]\nrequests_per_minute = 2\n[tenants.globex]\n",
    );
    let hs = replicas(2, &tenants).await;
    for h in &hs {
        h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    }
    let c = client();
    let models = |i: usize| signed_to(hs[i].addr, "acme", Method::GET, "/v1/models", "");
    // The first replica takes both requests of the minute: one for this request, one leased.
    assert_eq!(c.request(models(0)).await.unwrap().status(), StatusCode::OK);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    loop {
        let r = c.request(models(1)).await.unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let b = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&b)["error"]["code"], "requests");
        assert!(
            Instant::now() < deadline,
            "the idle lease never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "the other replica was admitted {:?} after the lease was taken",
        started.elapsed()
    );
    for h in hs {
        h.shutdown().await;
    }
}

/// The renewals that keep a live request's concurrency slot do not bring back the slot of a
/// request that has finished: with one of two slots held by a stream, a second request is
/// admitted after any number of renewals.
#[tokio::test]
async fn a_finished_requests_slot_stays_released_across_renewals() {
    if !redis_available("slot_not_renewed") {
        return;
    }
    let redis = RedisServer::start().await;
    let tenants = limits_section(
        &redis.url(),
        "concurrency_lease_ms = 600",
        "[tenants.acme]\nmax_concurrent = 2\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    let held = h.hold_stream("acme", "long").await;
    let models = || h.signed("acme", Method::GET, "/v1/models", "");
    assert_eq!(h.send_collect(models()).await.0.status, StatusCode::OK);
    // Its slot is released in Redis: the held stream's is the only one.
    let mut conn = redis.conn().await;
    let slots = async |conn: &mut redis::aio::MultiplexedConnection| -> u64 {
        redis::cmd("ZCARD")
            .arg("bulkhead:{acme}:conc")
            .query_async(conn)
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while slots(&mut conn).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the finished request's slot stayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two renewals of the held slot (every 200 ms; nothing else calls a script now).
    let evals = async || redis.calls("evalsha").await + redis.calls("eval").await;
    let before = evals().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while evals().await < before + 2 {
        assert!(Instant::now() < deadline, "the held slot was never renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slots(&mut conn).await, 1);
    let (p, b) = h.send_collect(models()).await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    h.sim.sim.open_gate();
    held.collect().await.unwrap();
    h.shutdown().await;
}

/// While Redis is unreachable the replica counts the tenant's requests itself; a configuration
/// reload that leaves the tenant's limits as they were keeps that count (a reload is no way
/// past the limit).
#[tokio::test]
async fn a_reload_keeps_the_local_count_while_redis_is_down() {
    // Nothing listens on port 1: the backend is down from the start.
    let tenants = limits_section(
        "redis://127.0.0.1:1/",
        "connect_timeout_ms = 100\non_backend_failure = \"local\"",
        "[tenants.acme]\nrequests_per_minute = 2\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    let send = || h.signed("acme", Method::GET, "/v1/models", "");
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    assert_eq!(h.send_collect(send()).await.0.status, StatusCode::OK);
    assert_eq!(
        h.send_collect(send()).await.0.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let changed = text.replace("[tenants.globex]\n", "[tenants.globex]\nweight = 2\n");
    assert_ne!(text, changed);
    h.write_config(&changed);
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    let (p, b) = h.send_collect(send()).await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{b:?}");
    assert_eq!(json(&b)["error"]["code"], "requests");
    assert_eq!(h.metric("bulkhead_limits_backend_up").await, Some(0.0));
    h.shutdown().await;
}

/// The shared limits of one replica, used directly (no HTTP), on `redis`.
fn shared_limits(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut RedisLimitsConfig),
) -> std::sync::Arc<SharedLimits> {
    let mut cfg = RedisLimitsConfig {
        url: Some(redis.url()),
        // Longer than any pause below: a slow Redis is not a failed one here.
        command_timeout_ms: 5000,
        ..RedisLimitsConfig::default()
    };
    tweak(&mut cfg);
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    SharedLimits::start(cfg, metrics, SharedClock::system())
}

/// Load the admission and settlement scripts, so that a paused Redis holds their first call.
async fn load_scripts(redis: &RedisServer) {
    let mut conn = redis.conn().await;
    for s in [&*scripts::ADMIT, &*scripts::SETTLE] {
        s.prepare_invoke().load_async(&mut conn).await.unwrap();
    }
}

/// Poll `f` once (without waking anything).
fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// A request given up while Redis is slow (the client went away during the admission): the
/// script still runs and takes a concurrency slot when Redis gets to it, and the replica
/// releases that slot, so the tenant is not held at its limit until the slot's lease expires
/// (a minute here).
#[tokio::test]
async fn an_admission_given_up_while_redis_is_slow_gives_its_slot_back() {
    if !redis_available("cancelled_admission") {
        return;
    }
    let redis = RedisServer::start().await;
    load_scripts(&redis).await;
    let s = shared_limits(&redis, |c| c.concurrency_lease_ms = 60_000);
    assert!(s.wait_connected().await);
    let one = LimitNumbers {
        max_concurrent: Some(1),
        ..LimitNumbers::default()
    };
    let t = s.tenant("acme", one);
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let given_up = tokio::time::timeout(Duration::from_millis(300), t.admit(1, None)).await;
    assert!(given_up.is_err(), "admitted while Redis was paused");
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let grant = admitted_within(&t, deadline, "the given-up admission's slot").await;
    // An admission dropped without an outcome (its exchange ended early) releases its slot.
    drop(grant);
    let deadline = Instant::now() + Duration::from_secs(5);
    drop(admitted_within(&t, deadline, "the dropped admission's slot").await);
}

/// Admit `t` (estimate 1) as soon as its concurrency limit lets it, before `deadline`.
async fn admitted_within(t: &std::sync::Arc<SharedTenant>, deadline: Instant, what: &str) -> Grant {
    loop {
        match t.admit(1, None).await {
            Ok(g) => return g,
            Err(SharedError::Limit(r)) if r.kind == LimitKind::Concurrency => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(Instant::now() < deadline, "{what} was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Leased mode: two requests on one replica find its lease empty and both ask Redis; the
/// first takes the whole bucket (its own tokens and the rest as lease), so Redis refuses the
/// second, which is then served from that lease rather than refused while the replica holds
/// tokens.
#[tokio::test]
async fn a_request_refused_by_redis_is_served_from_the_lease_another_just_took() {
    if !redis_available("lease_after_refusal") {
        return;
    }
    let redis = RedisServer::start().await;
    load_scripts(&redis).await;
    let s = shared_limits(&redis, |c| {
        c.mode = LimitsMode::Leased;
        c.lease_tokens = 1000;
    });
    assert!(s.wait_connected().await);
    let t = s.tenant(
        "acme",
        LimitNumbers {
            tokens_per_minute: Some(1000),
            ..LimitNumbers::default()
        },
    );
    let evals = async || redis.calls("evalsha").await + redis.calls("eval").await;
    let before = evals().await;
    let mut first = std::pin::pin!(t.admit(EST, None));
    let mut second = std::pin::pin!(t.admit(EST, None));
    // Both are sent before either answer is read.
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    let first = first.await.expect("the first request is admitted");
    let second = second
        .await
        .expect("the second request is served from the first one's lease");
    assert!(evals().await >= before + 2, "both asked Redis");
    // The lease: 1000 - EST after the first request, EST less after the second.
    assert_eq!(second.info().remaining_tokens, Some(1000 - 2 * EST));
    drop((first, second));
}

/// Leased mode: what a request did not use goes back into the replica's lease, without a call
/// to Redis, and the next requests are served from that lease, its requests and tokens counted
/// down.
#[tokio::test]
async fn a_leased_replica_spends_and_refills_its_lease_locally() {
    if !redis_available("lease_local") {
        return;
    }
    let redis = RedisServer::start().await;
    load_scripts(&redis).await;
    let s = shared_limits(&redis, |c| {
        c.mode = LimitsMode::Leased;
        c.lease_tokens = 300;
        c.lease_requests = 10;
    });
    assert!(s.wait_connected().await);
    let t = s.tenant(
        "acme",
        LimitNumbers {
            requests_per_minute: Some(100),
            tokens_per_minute: Some(1000),
            max_concurrent: None,
        },
    );
    let remaining = |g: &Grant| (g.info().remaining_requests, g.info().remaining_tokens);
    let first = t.admit(EST, None).await.unwrap();
    assert_eq!(remaining(&first), (Some(10), Some(300)));
    let evals = async || redis.calls("evalsha").await + redis.calls("eval").await;
    let before = evals().await;
    // It used 21 tokens: the other 88 go into the lease.
    first.reconcile(Some(21));
    let second = t.admit(EST, None).await.unwrap();
    assert_eq!(remaining(&second), (Some(9), Some(300 + 88 - EST)));
    // Refunded whole: all its tokens go back into the lease.
    second.refund();
    let third = t.admit(EST, None).await.unwrap();
    assert_eq!(remaining(&third), (Some(8), Some(300 + 88 - EST)));
    assert_eq!(evals().await, before, "Redis was asked");
    drop(third);
}

/// Leased mode: a lease in use stays with the replica (only one left idle for a second goes
/// back), so a replica serving a steady flow of requests asks Redis for none of them.
#[tokio::test]
async fn a_lease_in_use_stays_with_the_replica() {
    if !redis_available("lease_kept") {
        return;
    }
    let redis = RedisServer::start().await;
    load_scripts(&redis).await;
    let s = shared_limits(&redis, |c| {
        c.mode = LimitsMode::Leased;
        c.lease_tokens = 300;
    });
    assert!(s.wait_connected().await);
    let t = s.tenant(
        "acme",
        LimitNumbers {
            tokens_per_minute: Some(10_000),
            ..LimitNumbers::default()
        },
    );
    drop(t.admit(1, None).await.unwrap());
    let evals = async || redis.calls("evalsha").await + redis.calls("eval").await;
    let before = evals().await;
    // A request every 50 ms for 750 ms (three lease-return rounds), each a token of the lease.
    let end = Instant::now() + Duration::from_millis(750);
    let mut served = 0;
    while Instant::now() < end {
        let g = t.admit(1, None).await.unwrap();
        served += 1;
        assert_eq!(
            g.info().remaining_tokens,
            Some(300 - served),
            "request {served}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(evals().await, before, "Redis was asked");
}

/// The real usage replaces the reservation exactly: after a request that used 21 tokens the
/// bucket holds the limit less 21 (plus the little that refilled since), not the whole limit.
#[tokio::test]
async fn the_bucket_is_charged_the_usage_not_more_nor_less() {
    if !redis_available("exact_usage") {
        return;
    }
    let redis = RedisServer::start().await;
    // 200 a minute: the 21 tokens take 6 s to refill.
    let tenants = limits_section(
        &redis.url(),
        "",
        "[tenants.acme]\ntokens_per_minute = 200\n[tenants.globex]\n",
    );
    let h = Harness::start(&tenants).await;
    h.wait_metric("bulkhead_limits_backend_up", 1.0).await;
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &stream_body()))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{b:?}");
    wait_balance_until(&redis, "acme", |b| {
        b.is_some_and(|b| (200.0 - 21.0 - 1.0..200.0 - 1.0).contains(&b))
    })
    .await;
    h.shutdown().await;
}

/// A replica starting while Redis is slow to answer waits for it (up to the connect
/// timeout), so its first decision is the shared one.
#[tokio::test]
async fn a_replica_waits_for_a_slow_redis_at_start() {
    if !redis_available("slow_start") {
        return;
    }
    let redis = RedisServer::start().await;
    load_scripts(&redis).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(500)
        .arg("ALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let s = shared_limits(&redis, |c| c.connect_timeout_ms = 10_000);
    assert!(s.wait_connected().await);
    let t = s.tenant(
        "acme",
        LimitNumbers {
            requests_per_minute: Some(10),
            ..LimitNumbers::default()
        },
    );
    let g = t.admit(1, None).await.unwrap();
    assert!(matches!(g, Grant::Shared(_)), "{g:?}");
}

/// A connect timeout shorter than the command timeout is a valid configuration: the replica
/// connects.
#[tokio::test]
async fn a_connect_timeout_under_the_command_timeout_connects() {
    if !redis_available("short_connect_timeout") {
        return;
    }
    let redis = RedisServer::start().await;
    let s = shared_limits(&redis, |c| {
        c.connect_timeout_ms = 50;
        c.command_timeout_ms = 200;
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.wait_connected().await {
        assert!(Instant::now() < deadline, "never connected");
    }
}

/// While Redis refuses the replica (here: a password it was not given) the replica tries again
/// with a backoff (50 ms doubling up to 1 s), not in a loop: Redis sees a handful of
/// connections in a second and a half.
#[tokio::test]
async fn reconnection_attempts_back_off() {
    if !redis_available("backoff") {
        return;
    }
    let redis = RedisServer::start().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let url = format!("redis://:s3cret@127.0.0.1:{}/", redis.port);
    let connections = async || -> u64 {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    let before = connections().await;
    let s = shared_limits(&redis, |_| {});
    // Observed over a fixed window: attempts at about 0, 50, 150, 350 and 750 ms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = connections().await - before - 1;
    println!("{n} connections in 1.5 s");
    assert!((1..=20).contains(&n), "{n} connections in 1.5 s");
    assert!(!s.wait_connected().await);
}
