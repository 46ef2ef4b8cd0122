//! Fairness by tokens (Virtual Token Counter) and per-tenant KV-cache quotas, over real
//! sockets against the simulator, which is the independent oracle: it counts the tokens it
//! served and the KV-cache tokens each tenant's running generations held.

mod common;
use bulkhead_sim::SimConfig;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A prompt of `bytes` bytes made of 4-byte words ("w123 "), unique per request so the
/// simulator's prefix cache does not make repeats cheap. Simulator tokens = words, sidecar
/// estimate = bytes / 4: the two agree.
fn prompt(bytes: usize, n: u64) -> String {
    let mut s = format!("q{n:07} ");
    while s.len() + 4 <= bytes {
        s.push_str("abc ");
    }
    s
}

const MAX_TOKENS: u64 = 16;

/// Signs gateway requests from spawned tasks.
#[derive(Clone, Copy)]
struct Signer(std::net::SocketAddr);

impl Signer {
    fn signed(
        self,
        tenant: &str,
        method: Method,
        path: &str,
        body: &str,
    ) -> http::Request<http_body_util::Full<bytes::Bytes>> {
        let headers = signed_headers(tenant, &method, path, body.as_bytes(), "gw", GW_KEY, |_| {});
        let mut req = http::Request::new(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )));
        *req.method_mut() = method;
        *req.uri_mut() = format!("http://{}{path}", self.0).parse().unwrap();
        *req.headers_mut() = headers;
        req
    }
}

/// `loops` clients of `tenant`, each sending one streamed request after another with prompts
/// of `bytes` until `stop`; each returns how many requests got a 200.
fn load(
    h: &Harness,
    tenant: &'static str,
    loops: usize,
    bytes: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..loops)
        .map(|l| {
            let client = h.client.clone();
            let stop = stop.clone();
            let signer = Signer(h.addr);
            tokio::spawn(async move {
                let mut ok = 0;
                for i in 0..100_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let body = chat(
                        &prompt(bytes, l as u64 * 1_000_000 + i),
                        &format!(r#","stream":true,"max_tokens":{MAX_TOKENS}"#),
                    );
                    let req = signer.signed(tenant, Method::POST, "/v1/chat/completions", &body);
                    let r = client.request(req).await.unwrap();
                    let status = r.status();
                    r.into_body().collect().await.unwrap();
                    if status == StatusCode::OK {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect()
}

/// Weighted tokens the simulator served `tenant` (input cost 1, output cost 2: the defaults).
fn served(h: &Harness, tenant: &str) -> f64 {
    let kv = h.sim.sim.tenant_kv(tenant);
    kv.prompt_tokens as f64 + 2.0 * kv.completion_tokens as f64
}

/// Run `big` (32 KiB prompts) and `small` (256-byte prompts) against each other, both always
/// backlogged, for `run`; the weighted tokens the simulator served each meanwhile.
async fn skewed_run(
    h: &Harness,
    (acme_bytes, acme_clients): (usize, usize),
    (globex_bytes, globex_clients): (usize, usize),
    run: Duration,
) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    // Far more clients than upstream slots: both tenants always have requests waiting (a
    // tenant whose queue runs dry loses its turn, as VTC means it to).
    let mut tasks = load(h, "acme", acme_clients, acme_bytes, stop.clone());
    tasks.extend(load(
        h,
        "globex",
        globex_clients,
        globex_bytes,
        stop.clone(),
    ));
    // Measure from the moment both have requests waiting to the moment the clients stop.
    for t in ["acme", "globex"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while h
            .metric(&format!("bulkhead_queued_requests{{tenant=\"{t}\"}}"))
            .await
            .unwrap_or(0.0)
            < 2.0
        {
            assert!(Instant::now() < deadline, "{t} never had requests waiting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (big0, small0) = (served(h, "acme"), served(h, "globex"));
    tokio::time::sleep(run).await;
    let (big, small) = (served(h, "acme") - big0, served(h, "globex") - small0);
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    (big, small)
}

fn skew_config(max_inflight: usize) -> impl FnOnce(&mut String) {
    move |t: &mut String| {
        *t = t.replace(
            "max_inflight = 64",
            &format!("max_inflight = {max_inflight}"),
        );
        *t = t.replace(
            "max_queue_per_tenant = 64\ntimeout_ms = 5000",
            "max_queue_per_tenant = 64\ntimeout_ms = 30000",
        );
    }
}

fn sim_config() -> SimConfig {
    SimConfig {
        // Every request takes 5 ms (long next to the sidecar's own work, so the clients keep
        // both queues full); prefill grows with the prompt (an uncached 16-word block costs
        // 10 us), as on a real server.
        time_to_first_token: Duration::from_millis(5),
        prefill_per_block: Duration::from_micros(10),
        completion_tokens: MAX_TOKENS,
        record_requests: 16,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prompts_do_not_buy_more_of_the_server() {
    let max_inflight = 1;
    let h = Harness::start_with(DEFAULT_TENANTS, sim_config(), skew_config(max_inflight)).await;
    let (big_bytes, small_bytes) = (32 * 1024, 256);
    let (big, small) = skewed_run(
        &h,
        (big_bytes, 4),
        (small_bytes, 24),
        Duration::from_secs(4),
    )
    .await;
    // VTC's bound in this configuration: while both are backlogged their counters differ by
    // at most U = max_inflight x (input_cost x L + output_cost x M), L the largest prompt
    // (8,192 tokens + the chat template's 4), M = max_tokens; over the run the weighted
    // tokens served differ by at most 2U.
    let l = (big_bytes / 4 + 4) as f64;
    let u = max_inflight as f64 * (l + 2.0 * MAX_TOKENS as f64);
    eprintln!("served: big {big}, small {small}, 2U = {}", 2.0 * u);
    assert!(
        small > 3.0 * u,
        "the run was too short to judge (small served {small}, U {u})"
    );
    assert!(
        (big - small).abs() <= 2.0 * u,
        "served tokens big {big} vs small {small} differ by more than 2U = {}",
        2.0 * u
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_divide_tokens() {
    let max_inflight = 1;
    let tenants = "[tenants.acme]\nweight = 3\n[tenants.globex]\nweight = 1\n";
    let h = Harness::start_with(tenants, sim_config(), skew_config(max_inflight)).await;
    let (a, g) = skewed_run(&h, (1024, 12), (1024, 12), Duration::from_secs(4)).await;
    let ratio = a / g;
    eprintln!("served: acme (weight 3) {a}, globex (weight 1) {g}, ratio {ratio:.3}");
    assert!(
        (2.7..=3.3).contains(&ratio),
        "acme:globex served {a}:{g} = {ratio:.3}, not 3:1 within 10 %"
    );
    h.shutdown().await;
}

/// The time to the first streamed token of one small request of `tenant`.
async fn ttft(h: &Harness, tenant: &str, n: u64) -> Duration {
    let body = chat(
        &prompt(256, 9_000_000 + n),
        r#","stream":true,"max_tokens":4"#,
    );
    let t0 = Instant::now();
    let r = h
        .send(h.signed(tenant, Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut b = r.into_body();
    while let Some(f) = b.frame().await {
        if f.unwrap().data_ref().is_some_and(|d| !d.is_empty()) {
            break;
        }
    }
    let d = t0.elapsed();
    b.collect().await.unwrap();
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_quota_keeps_a_flood_of_long_prompts_in_its_lane() {
    let quota = 10_000u64;
    let tenants = format!("[tenants.acme]\nmax_kv_tokens = {quota}\n[tenants.globex]\n");
    let sim = SimConfig {
        // Every request waits 30 ms for its first token; prefill grows with the prompt: a
        // 32 KiB prompt (512 blocks) takes another ~100 ms.
        time_to_first_token: Duration::from_millis(30),
        prefill_per_block: Duration::from_micros(200),
        completion_tokens: MAX_TOKENS,
        record_requests: 16,
        ..SimConfig::default()
    };
    let h = Harness::start_with(&tenants, sim, skew_config(4)).await;
    let mut idle = Vec::new();
    for n in 0..9 {
        idle.push(ttft(&h, "globex", n).await);
    }
    let idle = median(idle);
    // acme floods with 8 clients of 32 KiB prompts (~8,200 tokens each: one fits the quota).
    let stop = Arc::new(AtomicBool::new(false));
    let flood = load(&h, "acme", 8, 32 * 1024, stop.clone());
    h.wait_metric("bulkhead_inflight_requests{tenant=\"acme\"}", 1.0)
        .await;
    let mut during = Vec::new();
    let mut sampled = 0;
    for n in 0..9 {
        during.push(ttft(&h, "globex", 100 + n).await);
        for series in [
            "bulkhead_kv_cache_tokens{tenant=\"acme\"}",
            "bulkhead_kv_cache_reserved_tokens{tenant=\"acme\"}",
        ] {
            let v = h.metric(series).await.unwrap();
            assert!(v <= quota as f64, "{series} = {v} > quota {quota}");
            sampled += (v > 0.0) as u32;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let served: u64 = futures_join(flood).await;
    let during = median(during);
    let peak = h.sim.sim.tenant_kv("acme").peak;
    eprintln!(
        "victim TTFT p50 idle {idle:?}, during the flood {during:?}; acme peak KV at the \
         simulator {peak} (quota {quota}); {served} flood requests served"
    );
    assert!(sampled > 0, "the flood never held anything while sampled");
    assert!(served >= 2, "the flood was not served at all");
    assert!(
        peak <= quota,
        "the simulator saw acme hold {peak} KV tokens, over its quota of {quota}"
    );
    assert!(
        during.as_secs_f64() <= 1.5 * idle.as_secs_f64(),
        "the victim's TTFT went from {idle:?} idle to {during:?} during the flood"
    );
    assert_eq!(
        h.metric("bulkhead_kv_cache_quota_tokens{tenant=\"acme\"}")
            .await,
        Some(quota as f64)
    );
    h.shutdown().await;
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n
}

#[tokio::test]
async fn a_request_larger_than_the_kv_quota_is_refused_and_a_bad_quota_is_named() {
    let h = Harness::start("[tenants.acme]\nmax_kv_tokens = 300\n[tenants.globex]\n").await;
    let body = chat("hi", r#","max_tokens":400"#);
    let (p, b) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    let j = json(&b);
    assert_eq!(j["error"]["code"], "request_too_large");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_kv_tokens"),
        "{j}"
    );
    assert!(
        h.sim.sim.requests().is_empty(),
        "nothing reached the upstream"
    );
    // Within the quota: served.
    let body = chat("hi", r#","max_tokens":100"#);
    let (p, _) = h
        .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", &body))
        .await;
    assert_eq!(p.status, StatusCode::OK);
    h.shutdown().await;

    // A quota no request without max_tokens could fit is a configuration error.
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "http://127.0.0.1:9",
        dir.path(),
        "[tenants.acme]\nmax_kv_tokens = 256\n",
    );
    let err = bulkhead_sidecar::Config::from_toml(&text).unwrap_err();
    assert!(
        err.to_string().contains("tenants.acme.max_kv_tokens"),
        "{err}"
    );
}
