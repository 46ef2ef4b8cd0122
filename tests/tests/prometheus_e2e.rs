//! End to end with a real Prometheus: it scrapes the agent, evaluates the shipped rules
//! (deploy/prometheus/rules.yaml), and the per-tenant series and the cross-tenant alert are
//! checked through its HTTP API. Prometheus sends its alerts to a real Alertmanager running the
//! shipped routing (deploy/alertmanager/alertmanager.yaml, with its webhook URLs pointed at this
//! test's own receiver and shorter group timings), and the notifications are checked as the
//! on-call receives them. Needs root (the agent), the `prometheus` binary (Debian's package) and
//! `prometheus-alertmanager` (Debian's package; `cargo xtask test` installs both through the
//! deploy check); under CI=true a missing one fails the test.

use bulkhead_tests::harness::*;
use bulkhead_tests::stack::{Stack, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `name` on PATH, from the Debian package `package`; None (a visible skip) when missing,
/// except under a truthy `CI`, where a missing binary fails the test.
fn require_bin(name: &str, package: &str) -> Option<String> {
    match bulkhead_testkit::skip::on_path(name) {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None => {
            agent_common::skip::skip(&format!(
                "no `{name}` binary on PATH (apt-get install {package})"
            ));
            None
        }
    }
}

/// A free loopback port: bind, read, release (Prometheus and Alertmanager cannot report the
/// port of a port-0 listener).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `cond` every 100 ms until it returns Some, failing after `within`.
fn poll<T>(what: &str, within: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The on-call's end: an HTTP server on 127.0.0.1:0 that records every POST (path and JSON
/// body) and answers 200. Alertmanager's webhook for receiver R is `http://ADDR/R`.
struct Webhook {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Webhook {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let sink = sink.clone();
                std::thread::spawn(move || {
                    if let Some(n) = Self::serve(conn) {
                        sink.lock().unwrap().push(n);
                    }
                });
            }
        });
        Self { addr, received }
    }

    /// One request: (path, JSON body), answered 200 and the connection closed.
    fn serve(mut conn: TcpStream) -> Option<(String, serde_json::Value)> {
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut reader = BufReader::new(conn.try_clone().ok()?);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let path = line.split_whitespace().nth(1)?.to_string();
        let mut len = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).ok()?;
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .ok()?;
        Some((path, serde_json::from_slice(&body).ok()?))
    }

    fn received(&self) -> Vec<(String, serde_json::Value)> {
        self.received.lock().unwrap().clone()
    }
}

/// A real Alertmanager with the shipped configuration, its receivers' URLs pointed at
/// `webhook` and its group timings shortened (so the test waits seconds, not minutes).
struct Alertmanager {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's `group_interval`: a changed group is notified again at most this often.
const GROUP_INTERVAL: Duration = Duration::from_secs(1);

impl Alertmanager {
    fn start(bin: &str, dir: &std::path::Path, webhook: SocketAddr) -> Self {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/alertmanager/alertmanager.yaml");
        let mut config = std::fs::read_to_string(&shipped).unwrap();
        for (from, to) in [
            (
                "https://security-webhook.invalid/bulkhead",
                format!("http://{webhook}/security"),
            ),
            (
                "https://platform-webhook.invalid/bulkhead",
                format!("http://{webhook}/platform"),
            ),
            ("group_wait: 30s", "group_wait: 1s".to_string()),
            (
                "group_interval: 5m",
                format!("group_interval: {}s", GROUP_INTERVAL.as_secs()),
            ),
        ] {
            assert_eq!(
                config.matches(from).count(),
                1,
                "{} no longer has exactly one `{from}`: update this test",
                shipped.display()
            );
            config = config.replace(from, &to);
        }
        let file = dir.join("alertmanager.yaml");
        std::fs::write(&file, config).unwrap();
        let addr = free_addr();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=") // no gossip port: a single instance
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus-alertmanager");
        let am = Self { child, addr };
        poll("Alertmanager to be ready", Duration::from_secs(30), || {
            matches!(try_http_get(am.addr, "/-/ready"), Ok((200, _))).then_some(())
        });
        am
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
    /// Scrapes each `(job, target, labels)` (labels as a YAML flow mapping, as the PodMonitors
    /// would set them) every second and sends its alerts to `alertmanager`.
    fn start(
        bin: &str,
        dir: &std::path::Path,
        scrape: &[(&str, SocketAddr, &str)],
        alertmanager: SocketAddr,
    ) -> Self {
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/rules.yaml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
             scrape_configs:\n",
            rules.canonicalize().unwrap()
        );
        for (job, target, labels) in scrape {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n        labels: {labels}\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = free_addr();
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
async fn prometheus_sees_per_tenant_series_and_alertmanager_delivers_the_security_alerts() {
    let agent_bin = workspace_bin("bulkhead-agent");
    if !require_bpf(&agent_bin) {
        return;
    }
    let Some(prom_bin) = require_bin("prometheus", "prometheus") else {
        return;
    };
    let Some(am_bin) = require_bin("prometheus-alertmanager", "prometheus-alertmanager") else {
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
    let webhook = Webhook::start();
    let am = Alertmanager::start(&am_bin, &paths.dir, webhook.addr);
    let prom = Prometheus::start(
        &prom_bin,
        &paths.dir,
        &[
            ("bulkhead-agent", agent.admin, "{node: e2e-node}"),
            (
                "bulkhead-sidecar",
                stack.admin,
                "{namespace: e2e, pod: sidecar-0}",
            ),
        ],
        am.addr,
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

    // A replayed signature: one signed request sent 8 times. The first is answered, the 7
    // copies are refused, which is above the alert's threshold (more than 5 in 5 minutes: a
    // single replay is what a client retrying raw bytes does, a burst is an attack).
    let statuses = stack.chat_replayed("alpha", 8).await;
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(statuses[1..].iter().all(|s| *s == 401), "{statuses:?}");

    // The on-call's view: each alert arrives once, at the security receiver.
    let alerts_at = |receiver: &str, alertname: &str| -> Vec<serde_json::Value> {
        webhook
            .received()
            .iter()
            .filter(|(path, _)| path == &format!("/{receiver}"))
            .flat_map(|(_, n)| n["alerts"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["labels"]["alertname"] == alertname)
            .collect()
    };
    let flow = poll(
        "the cross-tenant notification",
        Duration::from_secs(60),
        || alerts_at("security", "BulkheadCrossTenantFlow").pop(),
    );
    assert_eq!(flow["status"], "firing");
    assert_eq!(flow["labels"]["src_tenant"], "alpha");
    assert_eq!(flow["labels"]["dst_tenant"], "beta");
    assert_eq!(flow["labels"]["node"], "e2e-node");
    assert_eq!(flow["labels"]["team"], "security");
    assert_eq!(
        flow["annotations"]["summary"],
        "traffic from tenant alpha to tenant beta on e2e-node"
    );
    assert_eq!(
        flow["annotations"]["runbook_url"],
        "deploy/RUNBOOK.md#bulkheadcrosstenantflow"
    );
    let replay = poll("the replay notification", Duration::from_secs(60), || {
        alerts_at("security", "BulkheadAuthTenantMismatchOrReplay").pop()
    });
    assert_eq!(replay["status"], "firing");
    assert_eq!(replay["labels"]["reason"], "replayed");
    assert_eq!(replay["labels"]["namespace"], "e2e");
    assert_eq!(replay["labels"]["pod"], "sidecar-0");
    assert_eq!(replay["labels"]["team"], "security");
    // The replayed copies carried a valid signature for alpha: the alert names the tenant.
    assert_eq!(replay["labels"]["tenant"], "alpha");
    let summary = replay["annotations"]["summary"].as_str().unwrap();
    let (n, rest) = summary.split_once(' ').unwrap();
    assert!(n.parse::<u32>().is_ok_and(|n| n >= 6), "{summary}");
    assert_eq!(
        rest,
        "replayed requests for tenant alpha in 5m at e2e/sidecar-0"
    );
    assert_eq!(
        replay["annotations"]["runbook_url"],
        "deploy/RUNBOOK.md#bulkheadauthtenantmismatchorreplay"
    );

    // Nothing else: Alertmanager would send a changed or new group within group_wait +
    // group_interval; waiting three group intervals past the last notification shows there
    // is no other (an absence has no event to poll for).
    let quiet_until = Instant::now() + 3 * GROUP_INTERVAL;
    while Instant::now() < quiet_until {
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = webhook.received();
    let summary: Vec<(String, Vec<String>)> = all
        .iter()
        .map(|(path, n)| {
            let names = n["alerts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|a| format!("{}/{}", a["labels"]["alertname"], a["status"]))
                        .collect()
                })
                .unwrap_or_default();
            (path.clone(), names)
        })
        .collect();
    assert_eq!(all.len(), 2, "exactly two notifications: {summary:?}");
    assert!(
        all.iter()
            .all(|(path, n)| path == "/security" && n["alerts"].as_array().map(Vec::len) == Some(1)),
        "{summary:?}"
    );
    stack.stop().await;
}
