//! End to end with a real Prometheus: it scrapes the agent, evaluates the shipped rules
//! (deploy/prometheus/rules.yaml), and the per-tenant series and the cross-tenant alert are
//! checked through its HTTP API. Needs root (the agent) and the `prometheus` binary (Debian's
//! package; `cargo xtask test` installs it); under CI=true a missing one fails the test.

use bulkhead_tests::harness::*;
use bulkhead_tests::stack::{Stack, TempDir};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn prometheus_bin() -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but no `prometheus` binary on PATH (apt-get install prometheus)")
        }
        None => {
            eprintln!(
                "SKIPPED: no `prometheus` binary on PATH (set CI=true to make this a failure)"
            );
            None
        }
    }
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(bin: &str, dir: &std::path::Path, scrape: &[(&str, SocketAddr)]) -> Self {
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/rules.yaml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n",
            rules.canonicalize().unwrap()
        );
        for (job, target) in scrape {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n        labels: {{node: e2e-node}}\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // A free port: bind, read, release (Prometheus cannot report a port 0 listener).
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self { child, addr }
    }

    /// An instant query's `data.result`, or `None` while Prometheus is not answering yet.
    fn try_query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (status, body) = try_http_get(self.addr, &path).ok()?;
        if status == 503 {
            return None; // still starting
        }
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        Some(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        self.try_query(promql).expect("Prometheus answers")
    }

    /// Polls `promql` until `ok` holds (90 s at most: Prometheus scrapes and evaluates every 1 s).
    fn wait_for(
        &self,
        what: &str,
        promql: &str,
        ok: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let result = self.try_query(promql);
            if let Some(r) = &result
                && ok(r)
            {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {promql} = {result:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn value(series: &serde_json::Value) -> f64 {
    series["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_sees_per_tenant_series_and_fires_the_cross_tenant_alert() {
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let Some(prom_bin) = prometheus_bin() else {
        return;
    };
    let vector_db = TcpListener::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let config = paths.config("")
        + &format!(
            "[[cross_tenant.endpoints]]\ntenant = \"beta\"\naddress = \"127.0.0.1\"\nport = {}\n",
            vector_db.local_addr().unwrap().port()
        );
    let agent = Agent::start(&agent_bin, &paths, &config);
    let dir = TempDir::new("prometheus-e2e");
    let stack = Stack::start(
        bulkhead_sim::SimConfig::default(),
        "[tenants.alpha]\nweight = 1\n[tenants.beta]\nweight = 1\n",
        "",
        Some(&paths.socket),
        &dir.0,
    )
    .await;
    let prom = Prometheus::start(
        &prom_bin,
        &paths.dir,
        &[
            ("bulkhead-agent", agent.admin),
            ("bulkhead-sidecar", stack.admin),
        ],
    );
    prom.wait_for("the first scrapes", "up == 1", |r| r.len() == 2);

    // Requests of both tenants through the sidecar: 4 for alpha, 2 for beta.
    for tenant in ["alpha", "beta", "alpha", "alpha", "beta", "alpha"] {
        assert_eq!(stack.chat(tenant, "hello", 16).await.status, 200);
    }

    // Two tenants' traffic, each on its own tagged pair.
    let client = agent.client();
    for (tenant, n) in [("alpha", 300_000usize), ("beta", 100_000)] {
        let (mut c, mut s) = tcp_pair();
        client.tag(c.as_fd(), tenant).unwrap();
        client.tag(s.as_fd(), tenant).unwrap();
        transfer(&mut c, &mut s, n);
    }
    // And one cross-tenant flow: alpha reaches beta's vector database.
    let flow = connect_tagged(&client, "alpha", vector_db.local_addr().unwrap()).unwrap();
    drop(flow);

    agent.wait_for("the agent's own counters", |m| {
        m.bytes("alpha", "egress") >= 300_000 && m.bytes("beta", "egress") >= 100_000
    });
    for (tenant, payload) in [("alpha", 300_000f64), ("beta", 100_000f64)] {
        let q = format!(
            "bulkhead_network_bytes_total{{job=\"bulkhead-agent\",tenant=\"{tenant}\",direction=\"egress\"}}"
        );
        let r = prom.wait_for(&format!("{tenant}'s egress bytes"), &q, |r| {
            r.len() == 1 && value(&r[0]) >= payload
        });
        assert_eq!(r[0]["metric"]["node"], "e2e-node");
        // What Prometheus stored came from the agent: never more than the agent counts now
        // (the sidecar's keep-alive connections still trickle ACKs, so not always equal).
        let now = agent.metrics().bytes(tenant, "egress");
        assert!(value(&r[0]) as u64 <= now, "{} > {now}", value(&r[0]));
    }
    let r = prom.wait_for(
        "the cross-tenant alert",
        "ALERTS{alertname=\"BulkheadCrossTenantFlow\",alertstate=\"firing\"}",
        |r| !r.is_empty(),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["metric"]["src_tenant"], "alpha");
    assert_eq!(r[0]["metric"]["dst_tenant"], "beta");
    assert_eq!(r[0]["metric"]["action"], "alert");
    assert_eq!(r[0]["metric"]["severity"], "critical");
    // No other tenant pair is alerting.
    let none = prom.query("ALERTS{alertname=\"BulkheadCrossTenantFlow\",src_tenant!=\"alpha\"}");
    assert!(none.is_empty(), "{none:?}");

    // The sidecar's per-tenant series, as Prometheus stored them.
    for (tenant, n) in [("alpha", 4.0), ("beta", 2.0)] {
        let q = format!(
            "sum(bulkhead_requests_total{{job=\"bulkhead-sidecar\",tenant=\"{tenant}\",code=\"200\"}})"
        );
        prom.wait_for(&format!("{tenant}'s requests"), &q, |r| {
            r.len() == 1 && value(&r[0]) == n
        });
        let q = format!(
            "sum(bulkhead_tokens_total{{job=\"bulkhead-sidecar\",tenant=\"{tenant}\",kind=\"completion\"}})"
        );
        prom.wait_for(&format!("{tenant}'s tokens"), &q, |r| {
            r.len() == 1 && value(&r[0]) > 0.0
        });
    }
    // No sidecar alert fires for this healthy traffic.
    let firing = prom.query("ALERTS{alertstate=\"firing\",alertname!=\"BulkheadCrossTenantFlow\"}");
    assert!(firing.is_empty(), "{firing:?}");
    stack.stop().await;
}
