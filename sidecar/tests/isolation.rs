//! Prefix-cache isolation tiers against the simulator's prefix cache: a tenant probing another
//! tenant's exact prompt gets a hit only under `shared`; `salted` replaces client salts with
//! a keyed per-tenant salt; `exclusive` runs alone with the cache flushed around it, and a
//! flush the upstream does not confirm holds or fails the request per config.
//!
//! Cache decisions are asserted on the simulator's own verdict (`x-sim-prefix-cache`);
//! timings only as lower bounds that the simulator's prefill sleep guarantees (a miss costs
//! 3 blocks x 200 ms) or with a wide margin.

mod common;
use base64::Engine;
use bulkhead_sim::SimConfig;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPT: &str = "the secret quarterly numbers of acme are eleven";
const MISS: Duration = Duration::from_millis(600);

fn sim_config() -> SimConfig {
    SimConfig {
        prefix_block_words: 3,
        prefill_per_block: Duration::from_millis(200),
        cached_prefill_per_block: Duration::from_millis(2),
        ..SimConfig::default()
    }
}

struct Setup {
    h: Harness,
    _keys: tempfile::TempDir,
}

async fn start(flavor: &str, tenants: &str, cache: &str) -> Setup {
    start_sim(flavor, tenants, cache, sim_config()).await
}

async fn start_sim(flavor: &str, tenants: &str, cache: &str, sim: SimConfig) -> Setup {
    start_upstream(&format!("flavor = \"{flavor}\"\n"), tenants, cache, sim).await
}

/// `upstream`: lines for the `[upstream]` section (the flavor and more).
async fn start_upstream(upstream: &str, tenants: &str, cache: &str, sim: SimConfig) -> Setup {
    let keys = tempfile::tempdir().unwrap();
    let salt_key = keys.path().join("salt.key");
    std::fs::write(
        &salt_key,
        base64::engine::general_purpose::STANDARD.encode(b"salt-key-0123456789abcdef-012345"),
    )
    .unwrap();
    let flavor_line = format!("[upstream]\n{upstream}");
    let cache = format!(
        "\n[cache]\nsalt_key_file = \"{}\"\nsalt_generation = 1\n{cache}\n",
        salt_key.display()
    );
    let h = Harness::start_with(tenants, sim, |t| {
        *t = t.replacen("[upstream]\n", &flavor_line, 1);
        t.push_str(&cache);
    })
    .await;
    Setup { h, _keys: keys }
}

/// Send `content` as `tenant`; the response head, body and latency.
async fn ask_raw(
    h: &Harness,
    tenant: &str,
    content: &str,
) -> (http::response::Parts, Bytes, Duration) {
    let t0 = Instant::now();
    let (p, b) = h
        .send_collect(h.signed(
            tenant,
            Method::POST,
            "/v1/chat/completions",
            &chat(content, ""),
        ))
        .await;
    (p, b, t0.elapsed())
}

/// Generation requests the simulator got from `tenant`.
fn forwarded(h: &Harness, tenant: &str) -> usize {
    salts_seen(h, tenant).len()
}

/// Send `content` as `tenant`; the status, the simulator's cache verdict and the latency.
async fn ask(
    h: &Harness,
    tenant: &str,
    content: &str,
    extra: &str,
) -> (StatusCode, String, Duration) {
    let t0 = Instant::now();
    let (p, b) = h
        .send_collect(h.signed(
            tenant,
            Method::POST,
            "/v1/chat/completions",
            &chat(content, extra),
        ))
        .await;
    let verdict = p
        .headers
        .get("x-sim-prefix-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| String::from_utf8_lossy(&b).into_owned());
    (p.status, verdict, t0.elapsed())
}

fn salts_seen(h: &Harness, tenant: &str) -> Vec<Option<String>> {
    h.sim
        .sim
        .requests()
        .iter()
        .filter(|r| {
            r.path == "/v1/chat/completions"
                && r.headers
                    .get("x-bulkhead-tenant")
                    .is_some_and(|t| t == tenant)
        })
        .map(|r| json(&r.body)["cache_salt"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn shared_tenants_see_each_others_prefix() {
    let s = start("vllm", DEFAULT_TENANTS, "").await;
    let h = &s.h;
    let (st, v, a_took) = ask(h, "acme", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert!(a_took >= MISS, "{a_took:?}");
    // globex probes acme's exact prompt: the cache answers (the leak the tiers close).
    let (st, v, b_took) = ask(h, "globex", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "hit"));
    assert!(b_took < Duration::from_millis(450), "hit took {b_took:?}");
    // A client's own salt is removed (and counted) for shared tenants too.
    let (st, _, _) = ask(h, "globex", "other words here", r#","cache_salt":"mine""#).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(salts_seen(h, "globex"), [None, None]);
    h.wait_metric(
        "bulkhead_cache_salt_overrides_total{tenant=\"globex\"}",
        1.0,
    )
    .await;
    assert_eq!(h.sim.sim.flushes(), (0, 0));
    s.h.shutdown().await;
}

#[tokio::test]
async fn salted_tenants_never_share_blocks_and_client_salts_are_replaced() {
    let tenants = r#"
[tenants.acme]
isolation = "salted"
[tenants.globex]
isolation = "salted"
"#;
    let s = start("vllm", tenants, "").await;
    let h = &s.h;
    let (_, v, took) = ask(h, "acme", PROMPT, "").await;
    assert_eq!(v, "miss");
    assert!(took >= MISS);
    // acme's own repeat hits: the cache works under its salt.
    let (_, v, _) = ask(h, "acme", PROMPT, "").await;
    assert_eq!(v, "hit");
    // globex probing the same prompt: a miss, with the full prefill time.
    let (st, v, took) = ask(h, "globex", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert!(took >= MISS, "{took:?}");
    let acme_salt = salts_seen(h, "acme")[0].clone().unwrap();
    let globex_salt = salts_seen(h, "globex")[0].clone().unwrap();
    assert_ne!(acme_salt, globex_salt);
    assert!(acme_salt.len() >= 43 && !acme_salt.contains("acme"));
    // Even sending acme's salt (had it leaked) gets globex its own salt: still a miss.
    let roadmap = "acme private roadmap words go here";
    let (_, v, _) = ask(h, "acme", roadmap, "").await;
    assert_eq!(v, "miss");
    let extra = format!(r#","cache_salt":"{acme_salt}""#);
    let (st, v, took) = ask(h, "globex", roadmap, &extra).await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert!(took >= Duration::from_millis(200));
    assert_eq!(
        salts_seen(h, "globex"),
        [Some(globex_salt.clone()), Some(globex_salt)]
    );
    h.wait_metric(
        "bulkhead_cache_salt_overrides_total{tenant=\"globex\"}",
        1.0,
    )
    .await;
    assert_eq!(
        h.metric("bulkhead_cache_salt_overrides_total{tenant=\"acme\"}")
            .await,
        Some(0.0)
    );
    // The salt is a secret: not in the metrics.
    assert!(!h.metrics().await.contains(&acme_salt));
    s.h.shutdown().await;
}

#[tokio::test]
async fn exclusive_tenant_runs_alone_and_the_cache_is_flushed_around_it() {
    let tenants = r#"
[tenants.acme]
isolation = "exclusive"
[tenants.globex]
"#;
    let s = start("vllm", tenants, "").await;
    let h = &s.h;
    // globex first, then acme with the same prompt: flushed before acme, so a miss.
    let (_, v, _) = ask(h, "globex", PROMPT, "").await;
    assert_eq!(v, "miss");
    let (st, v, took) = ask(h, "acme", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert!(took >= MISS, "{took:?}");
    assert_eq!(h.sim.sim.flushes(), (1, 0));
    // acme again: its window, its own cache, no flush.
    let (_, v, _) = ask(h, "acme", PROMPT, "").await;
    assert_eq!(v, "hit");
    assert_eq!(h.sim.sim.flushes(), (1, 0));
    // globex probes acme's prompt: flushed after acme's window, a miss with full prefill.
    let (st, v, took) = ask(h, "globex", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert!(took >= MISS, "{took:?}");
    assert_eq!(h.sim.sim.flushes(), (2, 0));
    h.wait_metric("bulkhead_cache_flushes_total{result=\"ok\"}", 2.0)
        .await;
    assert!(
        h.metrics()
            .await
            .contains("bulkhead_cache_flush_duration_seconds_count 2")
    );

    // While acme's stream is in flight, globex waits; it runs after acme ends and a flush.
    let mut body = h.hold_stream("acme", "hold this").await;
    let started = h.sim.sim.started();
    let h2 = std::sync::Arc::new(s);
    let h3 = h2.clone();
    let globex = tokio::spawn(async move { ask(&h3.h, "globex", "later words", "").await });
    h2.h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    assert_eq!(h2.h.sim.sim.started(), started, "globex ran alongside acme");
    h2.h.sim.sim.open_gate();
    while body.frame().await.is_some() {}
    let (st, v, _) = globex.await.unwrap();
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    // Flushed before acme's stream (globex ran last) and again before globex.
    assert_eq!(h2.h.sim.sim.flushes(), (4, 0));
    let s = std::sync::Arc::into_inner(h2).unwrap();
    s.h.shutdown().await;
}

#[tokio::test]
async fn exclusive_request_is_held_until_a_flush_succeeds() {
    let tenants = r#"
[tenants.acme]
isolation = "exclusive"
[tenants.globex]
"#;
    let s = start(
        "sglang",
        tenants,
        "on_flush_failure = \"hold\"\nflush_retry_ms = 20",
    )
    .await;
    let h = &s.h;
    let (_, v, _) = ask(h, "globex", PROMPT, "").await;
    assert_eq!(v, "miss");
    // Someone else keeps the server busy (a stream straight to it, held open).
    h.sim.sim.close_gate();
    let direct = {
        let mut r = http::Request::new(http_body_util::Full::new(bytes::Bytes::from(chat(
            "busy",
            r#","stream":true"#,
        ))));
        *r.method_mut() = Method::POST;
        *r.uri_mut() = format!("{}/v1/chat/completions", h.sim.url())
            .parse()
            .unwrap();
        h.client.request(r).await.unwrap()
    };
    let mut direct = direct.into_body();
    direct.frame().await.unwrap().unwrap();
    let h2 = std::sync::Arc::new(s);
    let h3 = h2.clone();
    let acme = tokio::spawn(async move { ask(&h3.h, "acme", PROMPT, "").await });
    // The flush is refused ("Cache not flushed because there are pending requests"), retried,
    // and acme is not forwarded meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h2.h.sim.sim.flushes().1 < 3 {
        assert!(Instant::now() < deadline, "no refused flushes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!acme.is_finished());
    assert!(
        salts_seen(&h2.h, "acme").is_empty(),
        "forwarded before a flush"
    );
    let refused =
        h2.h.metric("bulkhead_cache_flushes_total{result=\"refused\"}")
            .await
            .unwrap();
    assert!(refused >= 3.0, "{refused}");
    // The server goes idle: the flush succeeds and acme runs, on an empty cache.
    h2.h.sim.sim.open_gate();
    while direct.frame().await.is_some() {}
    let (st, v, _) = acme.await.unwrap();
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert_eq!(h2.h.sim.sim.flushes().0, 1);
    h2.h.wait_metric("bulkhead_cache_flushes_total{result=\"ok\"}", 1.0)
        .await;
    let s = std::sync::Arc::into_inner(h2).unwrap();
    s.h.shutdown().await;
}

#[tokio::test]
async fn unconfirmed_flush_fails_the_request_with_a_clear_error() {
    let tenants = r#"
[tenants.acme]
isolation = "exclusive"
[tenants.globex]
"#;
    for (flavor, busy_status) in [("vllm", 200), ("vllm", 503), ("sglang", 200)] {
        let sim = SimConfig {
            reset_busy_status: busy_status,
            ..sim_config()
        };
        let s = start_sim(
            flavor,
            tenants,
            "on_flush_failure = \"fail\"\nflush_attempts = 2\nflush_retry_ms = 10",
            sim,
        )
        .await;
        let h = &s.h;
        let (_, v, _) = ask(h, "globex", PROMPT, "").await;
        assert_eq!(v, "miss");
        // The server answers every flush unsuccessfully (vLLM: 200 {"success": false}).
        h.sim.sim.refuse_next_flushes(2);
        let (p, b) = h
            .send_collect(h.signed(
                "acme",
                Method::POST,
                "/v1/chat/completions",
                &chat(PROMPT, ""),
            ))
            .await;
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{flavor}");
        let e = json(&b);
        assert_eq!(e["error"]["code"], "cache_flush_failed", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("did not confirm the prefix-cache flush")
        );
        assert!(
            salts_seen(h, "acme").is_empty(),
            "{flavor}: forwarded anyway"
        );
        assert_eq!(h.sim.sim.flushes(), (0, 2));
        h.wait_metric("bulkhead_cache_flushes_total{result=\"refused\"}", 2.0)
            .await;
        // Once the server flushes again, acme runs (on an empty cache).
        let (st, v, _) = ask(h, "acme", PROMPT, "").await;
        assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"), "{flavor}");
        assert_eq!(h.sim.sim.flushes(), (1, 2));
        s.h.shutdown().await;
    }
}

#[tokio::test]
async fn openai_upstream_refuses_isolation_tiers_at_load() {
    let dir = tempfile::tempdir().unwrap();
    for tier in ["salted", "exclusive"] {
        let tenants = format!("[tenants.acme]\nisolation = \"{tier}\"\n");
        let text = config_text("http://127.0.0.1:1", dir.path(), &tenants);
        let e = bulkhead_sidecar::Config::from_toml(&text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenants.acme.isolation"), "{e}");
        assert!(e.contains("upstream.flavor"), "{e}");
    }
}

#[tokio::test]
async fn bumping_the_salt_generation_changes_the_salt_on_reload() {
    let tenants = "[tenants.acme]\nisolation = \"salted\"\n[tenants.globex]\n";
    let s = start("vllm", tenants, "").await;
    let h = &s.h;
    let (_, v, _) = ask(h, "acme", PROMPT, "").await;
    assert_eq!(v, "miss");
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    h.write_config(&text.replace("salt_generation = 1", "salt_generation = 2"));
    h.wait_metric("bulkhead_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    // Same tenant, same prompt, new salt: its old blocks are unreachable.
    let (_, v, took) = ask(h, "acme", PROMPT, "").await;
    assert_eq!(v, "miss");
    assert!(took >= MISS);
    let salts = salts_seen(h, "acme");
    assert_eq!(salts.len(), 2);
    assert!(salts[0].is_some() && salts[1].is_some());
    assert_ne!(salts[0], salts[1]);
    s.h.shutdown().await;
}

const EXCLUSIVE_ACME: &str = r#"
[tenants.acme]
isolation = "exclusive"
[tenants.globex]
"#;

/// The harness's queue timeout: the old gate's only bound on these waits.
const QUEUE_TIMEOUT: Duration = Duration::from_millis(5000);
const DRAIN: Duration = Duration::from_millis(400);

/// Assert a 503 `exclusive_drain_timeout` that came within the drain bound, long before the
/// queue timeout.
fn assert_drain_timeout(p: &http::response::Parts, b: &Bytes, took: Duration, min: Duration) {
    assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{b:?}");
    let e = json(b);
    assert_eq!(e["error"]["code"], "exclusive_drain_timeout", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cache.exclusive_drain_timeout_ms")
    );
    assert_eq!(p.headers["retry-after"], "1");
    assert!(p.headers.contains_key("x-request-id"));
    assert!(
        took >= min && took < QUEUE_TIMEOUT / 2,
        "took {took:?}, bound {min:?}"
    );
}

#[tokio::test]
async fn an_exclusive_request_gives_up_when_shared_requests_do_not_drain() {
    let s = Arc::new(
        start(
            "vllm",
            EXCLUSIVE_ACME,
            &format!("exclusive_drain_timeout_ms = {}", DRAIN.as_millis()),
        )
        .await,
    );
    let h = &s.h;
    // globex keeps a long stream open (the upstream holds it after its first token).
    let mut held = h.hold_stream("globex", "a long answer").await;
    // acme must not run beside it: it waits for the drain, and globex's newer request queues
    // behind acme meanwhile.
    let s2 = s.clone();
    let acme = tokio::spawn(async move {
        let r = ask_raw(&s2.h, "acme", PROMPT).await;
        (r, Instant::now())
    });
    h.wait_metric("bulkhead_queued_requests{tenant=\"acme\"}", 1.0)
        .await;
    let s2 = s.clone();
    let globex = tokio::spawn(async move {
        let r = ask(&s2.h, "globex", "later words", "").await;
        (r, Instant::now())
    });
    h.wait_metric("bulkhead_queued_requests{tenant=\"globex\"}", 1.0)
        .await;
    // The stream never ends: acme fails at the drain bound, not at the queue timeout.
    let ((p, b, took), acme_done) = acme.await.unwrap();
    assert_drain_timeout(&p, &b, took, DRAIN);
    assert_eq!(forwarded(h, "acme"), 0);
    // globex's queued request went at once, and newcomers run straight away.
    let ((st, _, _), globex_done) = globex.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(
        globex_done.saturating_duration_since(acme_done) < Duration::from_secs(2),
        "globex waited on after acme gave up"
    );
    let (st, _, took) = ask(h, "globex", "more words", "").await;
    assert_eq!(st, StatusCode::OK);
    assert!(took < DRAIN, "{took:?}");
    h.wait_metric(
        "bulkhead_cache_gate_timeouts_total{kind=\"exclusive_drain\"}",
        1.0,
    )
    .await;
    h.wait_metric("bulkhead_requests_total{tenant=\"acme\",code=\"503\"}", 1.0)
        .await;
    assert_eq!(
        h.metric("bulkhead_cache_gate_timeouts_total{kind=\"window_drain\"}")
            .await,
        Some(0.0)
    );
    // Once the stream ends, acme tries again and runs alone, on a flushed cache.
    h.sim.sim.open_gate();
    while held.frame().await.is_some() {}
    let (st, v, _) = ask(h, "acme", PROMPT, "").await;
    assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"));
    assert_eq!(h.sim.sim.flushes(), (1, 0));
    let s = Arc::into_inner(s).unwrap();
    s.h.shutdown().await;
}

#[tokio::test]
async fn shared_requests_are_refused_not_held_behind_an_exclusive_window_that_does_not_drain() {
    // Without `flush_refused_while_busy` no flush is tried; with it, the flush is refused
    // while the upstream still runs acme's stream (3 attempts): refused either way, never run
    // beside it.
    for (trust_flush, refused_flushes) in [(false, 0), (true, 3)] {
        let cache = format!(
            "exclusive_window_ms = 200\nexclusive_drain_timeout_ms = {}\n\
             flush_refused_while_busy = {trust_flush}",
            DRAIN.as_millis()
        );
        let s = start_upstream(
            "flavor = \"vllm\"\nconnect_timeout_ms = 100\n",
            EXCLUSIVE_ACME,
            &cache,
            sim_config(),
        )
        .await;
        let h = &s.h;
        let mut held = h.hold_stream("acme", "hold this").await;
        let started = h.sim.sim.started();
        // globex waits for acme's stream, at most the drain bound.
        let (p, b, took) = ask_raw(h, "globex", PROMPT).await;
        assert_drain_timeout(&p, &b, took, DRAIN);
        // While the stream runs, newcomers are refused too.
        let (p, b, took) = ask_raw(h, "globex", "other words").await;
        assert_drain_timeout(&p, &b, took, Duration::ZERO);
        assert_eq!(h.sim.sim.started(), started, "globex ran beside acme");
        // One confirmed flush so far: before acme's first request (the cache the sidecar
        // found at start is unknown).
        assert_eq!(h.sim.sim.flushes().0, 1);
        let refused = h.sim.sim.flushes().1;
        assert!(
            refused >= refused_flushes && refused <= 2 * refused_flushes,
            "{trust_flush}: {refused}"
        );
        h.wait_metric(
            "bulkhead_cache_gate_timeouts_total{kind=\"window_drain\"}",
            2.0,
        )
        .await;
        // acme's stream ends: globex runs at once, after a flush, on a cache without acme.
        h.sim.sim.open_gate();
        while held.frame().await.is_some() {}
        let (st, v, took) = ask(h, "globex", PROMPT, "").await;
        assert_eq!((st, v.as_str()), (StatusCode::OK, "miss"), "{trust_flush}");
        assert!(took < MISS + DRAIN, "{took:?}");
        assert_eq!(h.sim.sim.flushes().0, 2);
        s.h.shutdown().await;
    }
}

/// The forwarded body differs from the client's (the salt replaced or added), so the
/// Content-Digest sent along is taken again; it is resumed from the client's digest check where
/// the two bodies share a prefix. Long prompts (several of the kept 16 KiB states), the salt
/// added at the end or a client salt replaced at the start: the upstream's digest always
/// describes the bytes it got.
#[tokio::test]
async fn the_forwarded_digest_of_a_long_salted_prompt_describes_the_forwarded_body() {
    let tenants = "[tenants.acme]\nisolation = \"salted\"\n";
    // No simulated prefill time: the prompt is long, the cache is not what is tested.
    let s = start_sim("vllm", tenants, "", SimConfig::default()).await;
    let h = &s.h;
    let long = "retrieved passage words ".repeat(1_600);
    let bodies = [
        chat(&long, ""),
        format!(
            r#"{{"cache_salt":"client-salt","model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#
        ),
    ];
    for body in &bodies {
        assert!(body.len() > 2 * 16 * 1024);
        let (p, _) = h
            .send_collect(h.signed("acme", Method::POST, "/v1/chat/completions", body))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    let reqs = h.sim.sim.requests();
    assert_eq!(reqs.len(), 2);
    for (r, sent) in reqs.iter().zip(&bodies) {
        assert_ne!(&r.body[..], sent.as_bytes(), "the salt changed the body");
        assert!(json(&r.body)["cache_salt"].as_str().is_some());
        let cd = r.headers["content-digest"].to_str().unwrap();
        bulkhead_sidecar::auth::digest::verify(cd, &r.body).unwrap();
    }
    s.h.shutdown().await;
}
