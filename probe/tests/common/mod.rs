//! Test harness: bulkhead-sim (with a prefix cache whose misses are measurably slow) and the
//! built bulkhead-sidecar binary in front of it (`bulkhead_testkit`), two test tenants with
//! their own keys, and small fake HTTP servers (agent metrics, Pushgateway, a leaky upstream).
#![allow(dead_code)]

use bulkhead_sim::{SimConfig, SimHandle};
use bulkhead_testkit::sidecar::SidecarProcess;
use http::StatusCode;
use std::net::SocketAddr;
use std::time::Duration;

pub use bulkhead_testkit::http::Fake;

pub const A_KEY: &[u8] = b"probe-a-secret-0123456789abcdef!";
pub const B_KEY: &[u8] = b"probe-b-secret-0123456789abcdef!";
pub const CANARY: &str = "BHCANARY-3f9c1e7a2b";

/// 16-word blocks; a block not in the cache costs 4 ms of prefill, a cached one 0.05 ms: a
/// 512-word prompt misses in about 128 ms and hits in about 2 ms.
pub fn sim_config() -> SimConfig {
    SimConfig {
        prefix_block_words: 16,
        prefill_per_block: Duration::from_millis(4),
        cached_prefill_per_block: Duration::from_micros(50),
        ..SimConfig::default()
    }
}

/// How the sidecar under test is set up.
pub struct Setup {
    /// Both test tenants' isolation tier.
    pub isolation: &'static str,
    /// The tenants A's key may assert (a TOML array).
    pub a_key_tenants: &'static str,
    /// The upstream: the simulator with this config, or another server.
    pub upstream: Upstream,
    /// Configure [`CANARY`] as probe-a's canary with this `leaks.on_canary` (`count`, `block`).
    pub on_canary: Option<&'static str>,
}

pub enum Upstream {
    Sim(SimConfig),
    Url(String),
}

impl Setup {
    /// The correct stack: both tenants salted, each key bound to its own tenant.
    pub fn correct() -> Self {
        Self {
            isolation: "salted",
            a_key_tenants: r#"["probe-a"]"#,
            upstream: Upstream::Sim(sim_config()),
            on_canary: None,
        }
    }
}

pub struct Stack {
    pub sim: Option<SimHandle>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    sidecar: Option<SidecarProcess>,
}

impl Stack {
    pub async fn start(setup: Setup) -> Stack {
        let (sim, upstream) = match setup.upstream {
            Upstream::Sim(c) => {
                let s = SimHandle::start(c).await.unwrap();
                let url = s.url();
                (Some(s), url)
            }
            Upstream::Url(u) => (None, u),
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        bulkhead_testkit::write_key(&d.join("a.key"), A_KEY);
        bulkhead_testkit::write_key(&d.join("b.key"), B_KEY);
        bulkhead_testkit::write_key(&d.join("salt.key"), b"salt-key-0123456789abcdef-012345");
        std::fs::write(d.join("canary"), format!("{CANARY}\n")).unwrap();
        let text = format!(
            r#"
[upstream]
url = "{upstream}"
flavor = "vllm"
[listen]
addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[auth]
max_skew_secs = 30
[queue]
max_inflight = 64
max_queue_per_tenant = 64
timeout_ms = 10000
[audit]
dir = "{dir}/audit"
[cache]
salt_key_file = "{dir}/salt.key"
salt_generation = 1
{leaks}
[tenants.probe-a]
isolation = "{iso}"
{canaries}
[tenants.probe-b]
isolation = "{iso}"
[[keys]]
id = "probe-a-key"
secret_files = ["{dir}/a.key"]
tenants = {a_tenants}
[[keys]]
id = "probe-b-key"
secret_files = ["{dir}/b.key"]
tenants = ["probe-b"]
"#,
            dir = d.display(),
            iso = setup.isolation,
            a_tenants = setup.a_key_tenants,
            leaks = setup
                .on_canary
                .map_or(String::new(), |m| format!("[leaks]\non_canary = \"{m}\"")),
            canaries = if setup.on_canary.is_some() {
                format!("canaries = [\"{CANARY}\"]")
            } else {
                String::new()
            },
        );
        let sidecar = SidecarProcess::start(&text, d).await;
        Stack {
            sim,
            addr: sidecar.addr,
            admin: sidecar.admin,
            dir,
            sidecar: Some(sidecar),
        }
    }

    /// The probe's configuration for this stack; `extra` lines go at the top level.
    pub fn probe_toml(&self, extra: &str) -> String {
        let d = self.dir.path();
        format!(
            r#"
target = "http://{addr}"
timeout_secs = 120
request_timeout_secs = 30
{extra}
[tenant_a]
name = "probe-a"
key_id = "probe-a-key"
key_file = "{a}"
[tenant_b]
name = "probe-b"
key_id = "probe-b-key"
key_file = "{b}"
"#,
            addr = self.addr,
            a = d.join("a.key").display(),
            b = d.join("b.key").display(),
        )
    }

    /// The timing settings the tests use (the sim's misses are slow enough for 512 words).
    pub fn probe_toml_timed(&self, extra: &str) -> String {
        format!(
            "{}[timing]\nsamples = 5\nprompt_words = 512\nhit_ratio = 0.5\n",
            self.probe_toml(extra)
        )
    }

    pub fn canary_file(&self) -> std::path::PathBuf {
        self.dir.path().join("canary")
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.admin)
    }

    pub async fn shutdown(mut self) {
        if let Some(p) = self.sidecar.take() {
            p.stop().await;
        }
        if let Some(s) = self.sim.take() {
            s.stop().await;
        }
    }
}

/// An agent's metrics page; tenant A's byte counter grows by 1500 per scrape when `grows`.
pub async fn fake_agent(grows: bool) -> Fake {
    Fake::start(move |_, all| {
        let n = if grows { 1500 * all.len() } else { 4096 };
        let text = format!(
            "# TYPE bulkhead_network_bytes counter\n\
             bulkhead_network_bytes_total{{tenant=\"probe-a\",direction=\"egress\"}} {n}\n\
             bulkhead_network_bytes_total{{tenant=\"probe-b\",direction=\"egress\"}} 7\n\
             bulkhead_agent_up 1\n"
        );
        (StatusCode::OK, "text/plain; version=0.0.4", text)
    })
    .await
}

/// How [`leaky_upstream`] answers. Streams go 3 characters per event, as a real model
/// streams a few characters per token: the canary is never whole in the raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leak {
    /// Two choices whose events alternate: choice 0 repeats every prompt the upstream has
    /// seen (a cross-tenant prompt bleed), choice 1 is filler.
    InChoice0,
    /// The same with the prompts in choice 1 and the filler in choice 0.
    InChoice1,
    /// One choice repeating every prompt.
    OneChoice,
    /// No leak: choice 0 ends with the first half of [`CANARY`] and choice 1 starts with the
    /// second, all of choice 0's events first, so the events' contents in arrival order spell
    /// the canary while no client's text holds it.
    Halves,
}

/// Filler text of `n` characters.
fn filler(n: usize) -> String {
    "nothing of interest in this choice, just words. "
        .chars()
        .cycle()
        .take(n)
        .collect()
}

/// The chunks of a stream of `texts` (one per choice), 3 characters per event: choices
/// alternate when `interleave`, else each choice's events come in turn.
fn sse_chunks(texts: &[String], interleave: bool) -> Vec<(usize, String)> {
    let pieces: Vec<Vec<String>> = texts
        .iter()
        .map(|t| {
            let c: Vec<char> = t.chars().collect();
            c.chunks(3).map(|p| p.iter().collect()).collect()
        })
        .collect();
    let mut out = Vec::new();
    if interleave {
        let n = pieces.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..n {
            for (choice, p) in pieces.iter().enumerate() {
                if let Some(x) = p.get(i) {
                    out.push((choice, x.clone()));
                }
            }
        }
    } else {
        for (choice, p) in pieces.iter().enumerate() {
            out.extend(p.iter().map(|x| (choice, x.clone())));
        }
    }
    out
}

/// An OpenAI-compatible upstream answering as `leak` says (streamed or not, as asked).
pub async fn leaky_upstream(leak: Leak) -> Fake {
    Fake::start(move |req, all| {
        if req.path != "/v1/chat/completions" {
            return (StatusCode::NOT_FOUND, "application/json", r#"{"error":{"message":"no","type":"x","code":"not_found"}}"#.into());
        }
        let mut everything = String::new();
        for r in all {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body)
                && let Some(c) = v.pointer("/messages/0/content").and_then(|c| c.as_str())
            {
                everything.push_str(c);
                everything.push(' ');
            }
        }
        let n = everything.chars().count();
        let texts = match leak {
            Leak::InChoice0 => vec![everything, filler(n)],
            Leak::InChoice1 => vec![filler(n), everything],
            Leak::OneChoice => vec![everything],
            Leak::Halves => {
                let (h1, h2) = CANARY.split_at(CANARY.len() / 2);
                vec![format!("{} {h1}", filler(40)), format!("{h2} {}", filler(40))]
            }
        };
        let stream = serde_json::from_slice::<serde_json::Value>(&req.body)
            .ok()
            .and_then(|v| v["stream"].as_bool())
            .unwrap_or(false);
        let usage = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15});
        if stream {
            let mut body = String::new();
            for (choice, piece) in sse_chunks(&texts, leak != Leak::Halves) {
                let chunk = serde_json::json!({"id": "x", "object": "chat.completion.chunk", "model": "leaky",
                    "choices": [{"index": choice, "delta": {"content": piece}, "finish_reason": null}]});
                body.push_str(&format!("data: {chunk}\n\n"));
            }
            let ends: Vec<_> = (0..texts.len())
                .map(|i| serde_json::json!({"index": i, "delta": {}, "finish_reason": "stop"}))
                .collect();
            let last = serde_json::json!({"id": "x", "object": "chat.completion.chunk", "model": "leaky",
                "choices": ends, "usage": usage});
            body.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
            // The streamed canary is never whole in the bytes: only reassembly finds it.
            assert!(!body.contains(CANARY), "the test upstream must split the canary");
            (StatusCode::OK, "text/event-stream", body)
        } else {
            let choices: Vec<_> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| serde_json::json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}))
                .collect();
            let v = serde_json::json!({"id": "x", "object": "chat.completion", "model": "leaky",
                "choices": choices, "usage": usage});
            (StatusCode::OK, "application/json", v.to_string())
        }
    })
    .await
}

/// A sidecar metrics page for the canary cross-check: tenant B's request counter grows by 10
/// per scrape when `counts_b`; a canary of tenant acme seen by tenant globex in a response is
/// counted once from the second scrape on when `hit`.
pub async fn fake_sidecar_metrics(counts_b: bool, hit: bool) -> Fake {
    Fake::start(move |_, all| {
        let n = all.len();
        let requests = if counts_b { 10 * n } else { 3 };
        let hits = usize::from(hit && n > 1);
        let text = format!(
            "# TYPE bulkhead_requests counter\n\
             bulkhead_requests_total{{tenant=\"probe-b\",code=\"200\"}} {requests}\n\
             # TYPE bulkhead_canary_hits counter\n\
             bulkhead_canary_hits_total{{owner=\"acme\",seen_by=\"globex\",where=\"response\"}} {hits}\n\
             bulkhead_canary_hits_total{{owner=\"probe-a\",seen_by=\"probe-b\",where=\"prompt\"}} 5\n"
        );
        (StatusCode::OK, "text/plain; version=0.0.4", text)
    })
    .await
}
